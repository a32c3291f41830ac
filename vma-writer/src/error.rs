//! The one error type of this crate.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use vma_format::FormatError;

/// Clusters of one device that were never written, as [`Error::Incomplete`] reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingClusters {
    /// The device's name.
    pub device: String,
    /// The first missing cluster numbers, ascending (at most a few per device).
    pub clusters: Vec<u32>,
    /// How many clusters of this device are missing in all.
    pub total: u64,
}

impl fmt::Display for MissingClusters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.device)?;
        for (i, c) in self.clusters.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{c}")?;
        }
        let shown = self.clusters.len() as u64;
        if self.total > shown {
            write!(f, " and {} more", self.total - shown)?;
        }
        Ok(())
    }
}

fn list_missing(missing: &[MissingClusters]) -> String {
    missing
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Everything that can go wrong while declaring or writing an archive.
///
/// The error is cheap to clone: the first failure of the sink poisons the writer and every
/// later call returns a clone of that same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A config entry or device that cannot be declared: vma-format's checks
    /// ([`ArchiveHeader::add_config`](vma_format::ArchiveHeader::add_config),
    /// [`add_device`](vma_format::ArchiveHeader::add_device)) refused it.
    #[error("{kind} {name:?}: {source}")]
    Declaration {
        /// `"config"` or `"device"`.
        kind: &'static str,
        /// The name as given.
        name: String,
        /// What is wrong.
        source: FormatError,
    },
    /// The name `vmstate` given to [`Builder::add_device`](crate::Builder::add_device).
    #[error(
        "the device name \"vmstate\" is reserved for the VM's RAM state: use Builder::add_vmstate"
    )]
    ReservedName,
    /// The header could not be encoded.
    #[error("archive header: {0}")]
    Format(#[from] FormatError),

    /// A [`Device`](crate::Device) or [`VmState`](crate::VmState) of another archive.
    #[error("device id {id} does not belong to this archive (it was declared on another Builder)")]
    UnknownDevice {
        /// The id the token carries.
        id: u8,
    },
    /// A cluster written a second time.
    #[error("device {device}: cluster {cluster} written twice")]
    DuplicateCluster {
        /// The device's name.
        device: String,
        /// The cluster number.
        cluster: u32,
    },
    /// A cluster number at or past the device's end.
    #[error(
        "device {device}: cluster {cluster} is past the end (the device has {clusters} clusters)"
    )]
    ClusterPastEnd {
        /// The device's name.
        device: String,
        /// The cluster number.
        cluster: u64,
        /// Clusters the device has.
        clusters: u64,
    },
    /// Cluster data of the wrong length.
    #[error(
        "device {device}: cluster {cluster} given {len} bytes, expected 65536 \
         (or, for the device's last cluster, {span} to 65536)"
    )]
    ClusterLength {
        /// The device's name.
        device: String,
        /// The cluster number.
        cluster: u32,
        /// Bytes given.
        len: usize,
        /// Bytes of the cluster inside the device.
        span: usize,
    },
    /// A byte range that does not start or end on a cluster boundary.
    #[error(
        "device {device}: range at byte {offset}, {len} bytes: {reason} \
         (ranges start at a multiple of 65536 and end at one, or exactly at the device end)"
    )]
    Misaligned {
        /// The device's name.
        device: String,
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A byte range that ends past the device.
    #[error(
        "device {device}: range at byte {offset}, {len} bytes, ends past the device end at {size}"
    )]
    RangePastEnd {
        /// The device's name.
        device: String,
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// The device's size.
        size: u64,
    },
    /// More vmstate bytes than declared.
    #[error("vmstate: appending {len} bytes to the {written} written would exceed its declared size of {size}")]
    VmstateOverflow {
        /// The declared size.
        size: u64,
        /// Bytes appended so far.
        written: u64,
        /// Bytes in the refused call.
        len: usize,
    },
    /// In [canonical order](crate::Builder::canonical_order), a write call waited for
    /// clusters before its range that no call will record any more: a call that claimed
    /// some failed, or `finish` (or `abort`) came while it waited.
    #[error(
        "device {device}: cluster {cluster} waited for clusters before it (canonical order) \
         that no write call will record any more"
    )]
    OutOfOrder {
        /// The device's name.
        device: String,
        /// The first cluster of the call that waited.
        cluster: u32,
    },
    /// `finish` found clusters that were never written.
    #[error("archive incomplete: {total} clusters never written ({})", list_missing(.missing))]
    Incomplete {
        /// Missing clusters in all devices.
        total: u64,
        /// The first few missing clusters of each incomplete device (at most 8 devices).
        missing: Vec<MissingClusters>,
    },

    /// Writing to the sink failed; the writer is poisoned and the archive unusable.
    #[error("writing the archive failed at byte {offset}: {source}")]
    Sink {
        /// Archive byte offset of the write that failed.
        offset: u64,
        /// What the sink said.
        source: Arc<io::Error>,
    },
    /// The sink thread died without reporting an error (a panic inside the sink's `Write`).
    #[error("the archive's sink thread panicked")]
    SinkPanicked,
    /// The sink thread could not be started.
    #[error("could not start the archive's sink thread: {0}")]
    Thread(Arc<io::Error>),
    /// A call after [`finish`](crate::Writer::finish) (or while it runs).
    #[error("the archive is already finished")]
    Finished,
    /// A call after [`abort`](crate::Writer::abort), or after the writer was dropped.
    #[error("the archive was aborted")]
    Aborted,

    /// The file helper's target already exists; it is never overwritten.
    #[error("{}: already exists, refusing to overwrite it", .path.display())]
    TargetExists {
        /// The target path.
        path: PathBuf,
    },
    /// A file operation of the file helper failed.
    #[error("{}: {op} failed: {source}", .path.display())]
    File {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`"create"`, `"fsync"`, `"rename"`).
        op: &'static str,
        /// The OS error.
        source: Arc<io::Error>,
    },
    /// Reading the source of [`WriterHandle::write_file`](crate::WriterHandle::write_file)
    /// failed.
    #[error("reading the source at byte {offset} failed: {source}")]
    Source {
        /// Byte offset in the source.
        offset: u64,
        /// The OS error.
        source: Arc<io::Error>,
    },
    /// The source of [`WriterHandle::write_file`](crate::WriterHandle::write_file) is
    /// larger than the device.
    #[error("device {device}: the source has {source_size} bytes, more than the device's {size}")]
    SourceTooLarge {
        /// The device's name.
        device: String,
        /// The source's size.
        source_size: u64,
        /// The device's size.
        size: u64,
    },
}

/// What kind of failure an [`Error`] is, for callers that map errors to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// What was declared cannot be an archive (a bad name, a size, nothing at all), or a
    /// source does not fit its device: the user can fix it by asking differently.
    Usage,
    /// The program using the writer broke its contract: a cluster twice, past the end or
    /// of the wrong length, an incomplete archive, a token of another archive, a call
    /// after finishing or aborting. For a tool built on the writer, a bug.
    Misuse,
    /// Writing the archive or reading a source failed in the operating system, or the
    /// target exists.
    Io,
    /// A bug: a thread panicked or could not start.
    Internal,
}

impl Error {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Sink { .. }
            | Error::File { .. }
            | Error::TargetExists { .. }
            | Error::Source { .. } => ErrorKind::Io,
            Error::SinkPanicked | Error::Thread(_) => ErrorKind::Internal,
            Error::Declaration { .. }
            | Error::ReservedName
            | Error::Format(_)
            | Error::SourceTooLarge { .. } => ErrorKind::Usage,
            Error::UnknownDevice { .. }
            | Error::DuplicateCluster { .. }
            | Error::ClusterPastEnd { .. }
            | Error::ClusterLength { .. }
            | Error::Misaligned { .. }
            | Error::RangePastEnd { .. }
            | Error::VmstateOverflow { .. }
            | Error::Incomplete { .. }
            | Error::OutOfOrder { .. }
            | Error::Finished
            | Error::Aborted => ErrorKind::Misuse,
        }
    }

    /// Whether this error poisoned the writer (a sink failure): every later call on any
    /// handle returns it again.
    pub fn is_poison(&self) -> bool {
        matches!(self, Error::Sink { .. } | Error::SinkPanicked)
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
