//! The one error type of this crate, and the kinds callers tell errors apart by.

use std::io;
use std::path::PathBuf;

use vma_format::FormatError;

/// What kind of failure an [`Error`] is, for callers that map errors to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The archive's bytes are wrong: a bad checksum, a truncated or inconsistent
    /// archive, data whose integrity check failed.
    Damaged,
    /// The archive is well formed, but a config or device name cannot become a file name
    /// safely (see [`safe_file_name`](crate::safe_file_name)).
    UnsafeName,
    /// Reading the archive or writing output failed in the operating system.
    Io,
    /// The caller asked for something impossible: an unknown device, an output that
    /// already exists, a target too small.
    Usage,
}

/// Everything that can go wrong reading, verifying or extracting an archive.
///
/// Messages say what is wrong and, for archive damage, at which archive byte offset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The archive header does not decode (bad magic, MD5, pointers, names, ...).
    #[error("{0}")]
    Header(FormatError),
    /// A reserved field of the archive header is not zero.
    #[error("archive header at byte {offset}: reserved byte is {value:#04x}, must be 0")]
    HeaderReserved {
        /// Archive offset of the byte.
        offset: u64,
        /// Its value.
        value: u8,
    },
    /// The input ends before it could be a VMA archive and does not start like one.
    #[error("not a VMA archive: the input is {len} bytes long and does not start with the magic 564d4100 (\"VMA\\0\")")]
    NotAnArchive {
        /// Bytes there are.
        len: u64,
    },
    /// The archive ends inside its header.
    #[error("archive ends at byte {got} inside its header of {needed} bytes")]
    TruncatedHeader {
        /// Bytes there are.
        got: u64,
        /// Bytes the header needs.
        needed: u64,
    },
    /// An extent header does not decode (magic, reserved field, MD5, block count).
    #[error("extent at byte {offset}: {source}")]
    Extent {
        /// Archive offset of the extent.
        offset: u64,
        /// What is wrong.
        source: FormatError,
    },
    /// An extent carries another archive's uuid.
    #[error("extent at byte {offset}: uuid {found} differs from the archive's {expected}")]
    ExtentUuid {
        /// Archive offset of the extent.
        offset: u64,
        /// The archive's uuid.
        expected: vma_format::Uuid,
        /// The extent's uuid.
        found: vma_format::Uuid,
    },
    /// The archive ends inside an extent (cut mid-extent).
    #[error(
        "extent at byte {offset}: archive ends after {got} of its {needed} bytes (cut mid-extent)"
    )]
    TruncatedExtent {
        /// Archive offset of the extent.
        offset: u64,
        /// Bytes of the extent there are.
        got: u64,
        /// Bytes the extent needs (512 while its header is incomplete).
        needed: u64,
    },
    /// A used blockinfo slot has its reserved bits set.
    #[error("extent at byte {offset}: slot {slot} has reserved bits {value:#04x}, must be 0")]
    SlotReserved {
        /// Archive offset of the extent.
        offset: u64,
        /// The slot.
        slot: usize,
        /// The reserved bits.
        value: u8,
    },
    /// A slot names a device id the header does not declare.
    #[error("extent at byte {offset}: slot {slot} names undeclared device id {dev_id}")]
    UnknownDevice {
        /// Archive offset of the extent.
        offset: u64,
        /// The slot.
        slot: usize,
        /// The device id.
        dev_id: u8,
    },
    /// A cluster number past the end of its device.
    #[error("extent at byte {offset}: cluster {cluster} of device {device} is past its end ({clusters} clusters)")]
    ClusterPastEnd {
        /// Archive offset of the extent.
        offset: u64,
        /// Device name.
        device: String,
        /// The cluster number.
        cluster: u32,
        /// Clusters the device has.
        clusters: u64,
    },
    /// A mask that stores blocks wholly past the end of the device.
    #[error("extent at byte {offset}: cluster {cluster} of device {device} stores blocks past the device end (mask {mask:#06x}, allowed {allowed:#06x})")]
    MaskPastEnd {
        /// Archive offset of the extent.
        offset: u64,
        /// Device name.
        device: String,
        /// The cluster number.
        cluster: u32,
        /// The mask.
        mask: u16,
        /// The blocks that lie within the device.
        allowed: u16,
    },
    /// A cluster stored twice.
    #[error("extent at byte {offset}: duplicate cluster {cluster} of device {device}")]
    DuplicateCluster {
        /// Archive offset of the extent.
        offset: u64,
        /// Device name.
        device: String,
        /// The cluster number.
        cluster: u32,
    },
    /// A cluster of the vmstate stream out of order.
    #[error("extent at byte {offset}: vmstate cluster {found} out of order (expected {expected})")]
    VmstateOrder {
        /// Archive offset of the extent.
        offset: u64,
        /// The cluster that should come next.
        expected: u64,
        /// The cluster found.
        found: u32,
    },
    /// The archive ended with clusters of a device never stored.
    #[error("archive ends at byte {offset}: cluster {cluster} of device {device} is missing")]
    MissingCluster {
        /// Archive offset of the end.
        offset: u64,
        /// Device name of the first device with a missing cluster.
        device: String,
        /// Its first missing cluster.
        cluster: u64,
    },
    /// An archive file too small to hold a slot for every cluster its header declares.
    #[error("archive of {file_len} bytes can hold at most {max_clusters} clusters, but its devices have {clusters}: clusters are missing")]
    TooSmallForDevices {
        /// File length.
        file_len: u64,
        /// Clusters the devices have.
        clusters: u64,
        /// Most clusters the file could record.
        max_clusters: u64,
    },
    /// An extent's data does not match its CRC32C (only an error when stopping at damage).
    #[error("extent {index} at byte {offset}: data CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x}); it holds {clusters}")]
    DataChecksum {
        /// Extent index (0 = first extent).
        index: u64,
        /// Archive offset of the extent.
        offset: u64,
        /// CRC32C recorded.
        stored: u32,
        /// CRC32C of the data.
        computed: u32,
        /// The clusters it holds, for the message.
        clusters: String,
    },
    /// The seal does not match what precedes it (only an error when stopping at damage).
    #[error("seal at byte {offset}: {reason}")]
    SealMismatch {
        /// Archive offset of the seal extent.
        offset: u64,
        /// What differs.
        reason: String,
    },
    /// An extent tagged as a seal but not laid out as one.
    #[error("extent at byte {offset}: malformed seal")]
    MalformedSeal {
        /// Archive offset of the seal extent.
        offset: u64,
    },
    /// An extent tagged as an extent index extent but not laid out as one.
    #[error("extent at byte {offset}: malformed extent index extent")]
    MalformedIndex {
        /// Archive offset of the extent.
        offset: u64,
    },
    /// A data extent after the extent index, which comes only right before the seal.
    #[error("data extent at byte {offset} after the extent index")]
    DataAfterIndex {
        /// Archive offset of the data extent.
        offset: u64,
    },
    /// The extent index does not decode (its extents disagree on their number, the count
    /// does not fit them, non-zero padding).
    #[error("extent index at byte {offset}: {source}")]
    ExtentIndex {
        /// Archive offset of the first index extent (or, when that is unknown, of the one
        /// at fault).
        offset: u64,
        /// What is wrong.
        source: vma_format::extent_index::ExtentIndexError,
    },
    /// The extent index decodes but does not fit the archive: it lists data extents that
    /// do not end where it starts, does not fit in the file, or lists a seal or an index
    /// extent.
    #[error("extent index at byte {offset}: {reason}")]
    ExtentIndexLayout {
        /// Archive offset of the first index extent.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A header copy in the extent index that is not a valid extent header (opening
    /// through the index).
    #[error(
        "extent index at byte {offset}: copy {copy} (of the data extent at byte {at}): {source}"
    )]
    IndexCopy {
        /// Archive offset of the first index extent.
        offset: u64,
        /// Which copy, 0 for the first data extent's.
        copy: u64,
        /// Where the data extent it copies is.
        at: u64,
        /// What is wrong with it.
        source: FormatError,
    },
    /// The extent index's copies differ from the data extent headers read (only an error
    /// when stopping at damage).
    #[error("extent index at byte {offset}: {reason}")]
    ExtentIndexMismatch {
        /// Archive offset of the first index extent.
        offset: u64,
        /// What differs.
        reason: String,
    },
    /// Bytes after the seal, which must close the archive.
    #[error("archive continues at byte {offset} after its seal")]
    DataAfterSeal {
        /// Archive offset of the first byte after the seal.
        offset: u64,
    },
    /// A name that must not become a file name.
    #[error("{what} {name:?} is not a plain file name: it {reason}")]
    UnsafeName {
        /// What the name is of ("config", "device", "file name").
        what: &'static str,
        /// The name (possibly cut for display).
        name: String,
        /// What is wrong with it.
        reason: vma_format::NameProblem,
    },
    /// Two outputs would get the same file name.
    #[error("two outputs would be named {name:?}")]
    NameCollision {
        /// The file name.
        name: String,
    },
    /// Reading the archive failed.
    #[error("reading archive at byte {offset}: {source}")]
    Read {
        /// Archive offset of the read.
        offset: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Creating, writing or renaming an output failed.
    #[error("{}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A device asked for by name or id that the archive does not have.
    #[error("the archive has no device {0}")]
    NoSuchDevice(String),
    /// An output file exists and overwriting was not allowed.
    #[error("{} already exists", .0.display())]
    OutputExists(PathBuf),
    /// A target file or block device smaller than the device it should receive.
    #[error("{}: target holds {target_size} bytes, device {device} needs {size}", path.display())]
    TargetTooSmall {
        /// The target.
        path: PathBuf,
        /// The device.
        device: String,
        /// Bytes the target holds.
        target_size: u64,
        /// Device size.
        size: u64,
    },
    /// Another misuse, described.
    #[error("{0}")]
    Usage(String),
    /// A zstd-compressed archive without a seek table: one zstd stream, as `zstd` (and
    /// so vzdump) writes it, which cannot be read at random.
    #[error(
        "the {stream_len}-byte zstd stream has no seek table (it is compressed as one stream, \
         as zstd and vzdump write it, or cut short), so it cannot be read at random \
         without an index: index it once (vma index ARCHIVE.vma.zst writes \
         ARCHIVE.vma.zst.idx, used from then on), make it seekable (vma recompress \
         ARCHIVE.vma.zst SEEKABLE.vma.zst), decompress it (zstd -d -o ARCHIVE.vma \
         ARCHIVE.vma.zst), or create it seekable (vma create ARCHIVE.vma.zst ...)"
    )]
    NotSeekable {
        /// Bytes of the compressed file.
        stream_len: u64,
    },
    /// The seek table of a seekable zstd archive is wrong.
    #[error("{0}")]
    SeekTable(vma_format::seek_table::SeekTableError),
    /// A frame of a seekable zstd archive is damaged or disagrees with the seek table.
    #[error("zstd frame {frame} at compressed byte {offset}: {reason}")]
    Frame {
        /// Index of the frame.
        frame: u64,
        /// Offset of the frame in the compressed file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An lzop archive's container is damaged: a block header that lies, a truncated
    /// block, a checksum that fails (the error names the byte offset).
    #[error("{0}")]
    Lzop(crate::lzop::LzopError),
    /// Indexing a zstd stream failed, or its sidecar index is wrong, is another archive's,
    /// or disagrees with the archive (the error names the byte offset and which file).
    #[error("{0}")]
    ZstdIndex(crate::zstd_index::ZstdIndexError),
    /// A streaming reader used again after it returned an error.
    #[error("the reader already failed; no more extents can be read")]
    Failed,
}

impl Error {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::UnsafeName { .. } | Error::NameCollision { .. } => ErrorKind::UnsafeName,
            Error::Read { .. } | Error::Write { .. } => ErrorKind::Io,
            Error::NoSuchDevice(_)
            | Error::OutputExists(_)
            | Error::TargetTooSmall { .. }
            | Error::Usage(_)
            | Error::NotSeekable { .. }
            | Error::Failed => ErrorKind::Usage,
            Error::ZstdIndex(e) if e.is_usage() => ErrorKind::Usage,
            Error::ZstdIndex(e) if e.is_io() => ErrorKind::Io,
            _ => ErrorKind::Damaged,
        }
    }

    /// Whether the archive is damaged (the kind is [`ErrorKind::Damaged`]).
    pub fn is_damage(&self) -> bool {
        self.kind() == ErrorKind::Damaged
    }

    pub(crate) fn write(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Write {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
