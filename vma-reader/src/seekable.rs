//! Random access to the devices of an archive file, without extracting anything.
//!
//! The archive's bytes come from a [`Source`]: a plain file, or a seekable zstd file
//! decompressed frame by frame (see the `source` module for its cache's bound).
//! Reads of a plain file go through positional reads ([`FileExt::read_at`]) rather than a memory map:
//! the bytes are copied once either way (from the page cache into the caller's buffer),
//! but a mapped file that shrinks under the reader (another process truncating the
//! archive) kills the process with `SIGBUS`, while `pread` returns an error the caller
//! can handle. It also needs no `unsafe` and no address space for archives larger than
//! memory.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use vma_format::extent_index::{self, Decoder, IndexExtent, IndexKind};
use vma_format::integrity::{Seal, SealKind};
use vma_format::{
    cluster, ArchiveHeader, BlockMask, DeviceId, DeviceInfo, ExtentHeader, VMA_BLOCKS_PER_CLUSTER,
    VMA_BLOCKS_PER_EXTENT, VMA_BLOCK_SIZE, VMA_CLUSTER_SIZE, VMA_EXTENT_HEADER_SIZE,
    VMA_MAX_DEVICES,
};

use crate::error::{Error, Result};
use crate::index::{DeviceIndex, MAX_RELATIVE_OFFSET};
use crate::integrity::{IntegrityReport, SealStatus};
use crate::options::OnDamage;
use crate::options::ReadOptions;
use crate::read_at::ReadAt;
use crate::source::{from_io, into_io, Packing, Source};
use crate::stream::read_header;
use crate::stream::{sealed, IntoArchiveStream, StreamReader};
use crate::walk::{DataCheck, Step, Walker};

/// Bytes read at once while scanning headers of extents that store no data.
const SCAN_WINDOW: usize = 64 * 1024;

/// Bytes read at once from the start of the archive for its header (the fixed 12 KiB and,
/// usually, all of the blob buffer).
const HEAD_WINDOW: usize = 16 * 1024;

/// Bytes read at once from the end of the archive to find the extent index: the seal,
/// the index and, when it is small (up to about 400 data extents), all of it. A larger
/// index takes one more read.
pub(crate) const TAIL_WINDOW: usize = 256 * 1024;

/// An archive file opened for random access.
///
/// Opening reads the header and every extent header, checks them all as the streaming
/// reader does (header MD5s, uuid, reserved fields, unknown devices, clusters past the
/// end, duplicates, missing clusters, truncation) and builds an index from each cluster
/// to its stored data. See the crate docs for the index's memory. The seal is checked too
/// (it hashes headers only); the data's CRC32Cs need the data:
/// [`verify`](crate::verify)`(&archive, ...)` reads them.
///
/// Where the headers come from: an archive written by vma-rs with the integrity extension
/// ends with an *extent index* (copies of every data extent's header, then the seal; see
/// [`vma_format::extent_index`]). Opening reads the header, then the last 256 KiB
/// and, for a large index (over about 400 data extents), the rest of it in one more read: three
/// or four reads whatever the archive's size, which matters when every read is a round
/// trip (a bucket read by ranged requests). The copies go through every check a scan
/// makes, and the seal, which covers them, must hold: an index that does not decode or
/// whose seal fails is an error, not a reason to scan. The trust limit: opening checks
/// the copies against the seal, not against the headers they copy, which it does not
/// read; a full verify (the streaming reader, [`verify`](crate::verify)) reads and
/// compares them ([`ExtentIndexStatus`](crate::ExtentIndexStatus)). Any other archive
/// (Proxmox's, `--no-integrity`, no seal, no index) is scanned: one read per extent
/// that stores data, seeking over the data, in larger windows over runs of empty ones.
///
/// The archive must not change while open: reads of a truncated file fail with an I/O
/// error, and a rewritten file yields whatever its bytes now are.
#[derive(Debug, Clone)]
pub struct SeekableArchive {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    source: Source,
    header: ArchiveHeader,
    header_size: u64,
    file_len: u64,
    /// Indexed by device id.
    index: Vec<Option<DeviceIndex>>,
    integrity: IntegrityReport,
    memory: usize,
}

/// A device named by id or by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRef<'a> {
    /// By id.
    Id(DeviceId),
    /// By name.
    Name(&'a str),
}

impl From<DeviceId> for DeviceRef<'_> {
    fn from(id: DeviceId) -> Self {
        DeviceRef::Id(id)
    }
}

impl<'a> From<&'a str> for DeviceRef<'a> {
    fn from(name: &'a str) -> Self {
        DeviceRef::Name(name)
    }
}

impl<'a> From<&'a String> for DeviceRef<'a> {
    fn from(name: &'a String) -> Self {
        DeviceRef::Name(name)
    }
}

impl SeekableArchive {
    /// Opens and indexes the archive at `path`: a plain archive, a seekable zstd one (as
    /// `vma create ARCHIVE.vma.zst` writes it; a zstd file without a seek table is
    /// [`Error::NotSeekable`]), or an lzop one (`.vma.lzo`, indexed by its block headers).
    pub fn open(path: impl AsRef<Path>) -> Result<SeekableArchive> {
        let file = File::open(path.as_ref()).map_err(|source| Error::Read { offset: 0, source })?;
        Self::from_file(file)
    }

    /// Indexes an open archive file, plain, seekable zstd or lzop.
    pub fn from_file(file: File) -> Result<SeekableArchive> {
        Self::from_read_at(Arc::new(file))
    }

    /// Indexes an archive in any byte source ([`ReadAt`]: a file, an object in a bucket
    /// read by ranged requests), plain, seekable zstd or lzop, as [`open`](Self::open)
    /// does a file.
    pub fn from_read_at(bytes: Arc<dyn ReadAt>) -> Result<SeekableArchive> {
        Self::from_source(Source::open(bytes)?)
    }

    /// [`from_file_with_index`](Self::from_file_with_index) of an archive in any byte
    /// source, with its sidecar index in a local file.
    pub fn from_read_at_with_index(bytes: Arc<dyn ReadAt>, index: File) -> Result<SeekableArchive> {
        Self::from_source(Source::with_index(bytes, index)?)
    }

    /// Opens a zstd archive (one stream, as `zstd` and Proxmox's vzdump write it) through
    /// its sidecar index at `index` (written by [`zstd_index::build`](crate::zstd_index::build),
    /// `vma index`).
    pub fn open_with_index(
        path: impl AsRef<Path>,
        index: impl AsRef<Path>,
    ) -> Result<SeekableArchive> {
        let file = File::open(path.as_ref()).map_err(|source| Error::Read { offset: 0, source })?;
        let index = File::open(index.as_ref()).map_err(|source| {
            Error::ZstdIndex(crate::zstd_index::ZstdIndexError::IndexIo {
                index_offset: 0,
                source,
            })
        })?;
        Self::from_file_with_index(file, index)
    }

    /// [`open_with_index`](Self::open_with_index) of open files. The index is checked
    /// against the archive (its length and last 4 bytes) and for consistency; a segment's
    /// compressed bytes are checked against their CRC32C when read. Memory: 48 bytes per
    /// segment for the table (3 MiB for a 500 GB archive), and the cache of decoded
    /// segments ([`FRAME_CACHE_BYTES`](crate::FRAME_CACHE_BYTES), at least one segment;
    /// segments are about 8 MiB at zstd's level 3, at most 64 MiB) plus one segment per
    /// reading thread while it decodes.
    pub fn from_file_with_index(archive: File, index: File) -> Result<SeekableArchive> {
        Self::from_source(Source::with_index(Arc::new(archive), index)?)
    }

    pub(crate) fn from_source(source: Source) -> Result<SeekableArchive> {
        let file_len = source.len();
        let head = (HEAD_WINDOW as u64).min(file_len).max(1) as usize;
        let (header, bytes) = read_header(&mut BufReader::with_capacity(
            head,
            Positional::new(&source),
        ))
        .map_err(from_io)?;
        let header_size = bytes.len() as u64;
        check_fits(&header, header_size, file_len)?;
        let (mut index, integrity) = match index_from_tail(&source, file_len, &header, &bytes)? {
            Some(opened) => opened,
            None => {
                let walker = Walker::new(&header, &bytes, true, OnDamage::Report);
                drop(bytes);
                index_extents(&source, file_len, &header, header_size, walker)?
            }
        };
        for ix in index.iter_mut().flatten() {
            ix.shrink();
        }
        let memory = index.iter().flatten().map(DeviceIndex::memory).sum();
        source.opened();
        Ok(SeekableArchive {
            shared: Arc::new(Shared {
                source,
                header,
                header_size,
                file_len,
                index,
                integrity,
                memory,
            }),
        })
    }

    /// The archive header.
    pub fn header(&self) -> &ArchiveHeader {
        &self.shared.header
    }

    /// The archive's length (decompressed, for a compressed file).
    pub fn len(&self) -> u64 {
        self.shared.file_len
    }

    /// Whether the archive file is empty (never, for an archive that opened).
    pub fn is_empty(&self) -> bool {
        self.shared.file_len == 0
    }

    /// The devices, in id order.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.shared.header.devices
    }

    /// The data of a config entry.
    pub fn config(&self, name: &str) -> Option<&[u8]> {
        self.shared.header.config(name).map(|c| c.data.as_slice())
    }

    /// What the extent headers say about integrity: `checksummed_extents` counts extents
    /// that carry a CRC32C (not yet checked: [`verify`](crate::verify)`(&archive, ...)`
    /// reads the data), and the seal is checked against the headers
    /// ([`SealStatus::Sealed`](crate::SealStatus::Sealed) when it holds).
    pub fn integrity(&self) -> &IntegrityReport {
        &self.shared.integrity
    }

    /// Bytes of memory the index holds (for a compressed file, with the frame index and
    /// the frames cached at the moment).
    pub fn index_memory(&self) -> usize {
        self.shared.memory + self.shared.source.memory()
    }

    /// How the file is packed.
    pub fn packing(&self) -> Packing {
        self.shared.source.packing()
    }

    /// Checks that the compressed file is still the one its sidecar index describes
    /// (opened with [`open_with_index`](Self::open_with_index) or
    /// [`from_file_with_index`](Self::from_file_with_index)): every segment's compressed
    /// bytes are read and checked against the index's CRC32Cs, nothing is decompressed.
    /// Opening such an archive reads its headers from the index, so this is what finds a
    /// change in the archive without reading its data. For the other packings there is
    /// nothing more to check than opening did.
    pub fn check_unchanged(&self) -> Result<()> {
        self.shared.source.check_unchanged()
    }

    /// A reader of one device.
    pub fn device<'a>(&self, which: impl Into<DeviceRef<'a>>) -> Result<DeviceReader> {
        let which = which.into();
        let info = match which {
            DeviceRef::Id(id) => self.shared.header.device(id),
            DeviceRef::Name(name) => self.shared.header.device_by_name(name),
        };
        let Some(info) = info else {
            return Err(Error::NoSuchDevice(match which {
                DeviceRef::Id(id) => format!("with id {id}"),
                DeviceRef::Name(name) => format!("{name:?}"),
            }));
        };
        Ok(DeviceReader {
            shared: Arc::clone(&self.shared),
            id: info.id,
            size: info.size,
            pos: 0,
        })
    }
}

/// The reads of the archive that opening `archive` through the sidecar `index` makes
/// (the archive header, the look at the end for an extent index, and every extent header
/// or the index), by offset (opening looks at the end first).
pub(crate) fn recorded_header_reads(archive: File, index: File) -> Result<Vec<(u64, Vec<u8>)>> {
    let a = SeekableArchive::from_source(Source::with_index_recording(Arc::new(archive), index)?)?;
    let mut reads = a.shared.source.take_recorded();
    reads.sort_by_key(|(offset, _)| *offset);
    Ok(reads)
}

impl sealed::Input for &SeekableArchive {}

/// The archive file read again from its start, by positional reads (the file's own
/// offset is left alone): [`verify`](crate::verify)`(&archive, ...)` checks the data's
/// CRC32Cs, which opening does not read.
impl<'a> IntoArchiveStream for &'a SeekableArchive {
    type Stream = StreamReader<Box<dyn Read + 'a>>;

    fn into_stream(self, options: ReadOptions) -> Result<Self::Stream> {
        StreamReader::with_options(Box::new(Positional::new(&self.shared.source)), options)
    }
}

/// Checks that the index can address the file and that the file can hold a slot for each
/// cluster the header declares: what the header may make us allocate is bounded by what
/// a complete archive of this length can hold.
fn check_fits(header: &ArchiveHeader, header_size: u64, file_len: u64) -> Result<()> {
    if file_len.saturating_sub(header_size) > MAX_RELATIVE_OFFSET {
        return Err(Error::Usage(format!(
            "archive of {file_len} bytes is larger than the seekable reader can index"
        )));
    }
    let clusters: u64 = header
        .devices
        .iter()
        .filter(|d| !d.is_vmstate())
        .map(DeviceInfo::cluster_count)
        .sum();
    let max_clusters = file_len.saturating_sub(header_size) / VMA_EXTENT_HEADER_SIZE as u64
        * VMA_BLOCKS_PER_EXTENT as u64;
    if clusters > max_clusters {
        return Err(Error::TooSmallForDevices {
            file_len,
            clusters,
            max_clusters,
        });
    }
    Ok(())
}

/// Reads and checks every extent header after the archive header (seeking over the data)
/// and the seal, and indexes where each cluster's data is (the index by device id).
fn index_extents(
    file: &Source,
    file_len: u64,
    header: &ArchiveHeader,
    header_size: u64,
    mut walker: Walker,
) -> Result<(Vec<Option<DeviceIndex>>, IntegrityReport)> {
    let mut index = empty_index(header);
    let mut scanner = Scanner::new(file, file_len);
    loop {
        let pos = walker.position();
        if !walker.more(file_len - pos)? {
            break;
        }
        let raw = scanner.header_at(pos)?;
        let extent = match walker.extent(ExtentHeader::decode(raw))? {
            Step::Seal => {
                scanner.last_data = 0;
                continue;
            }
            Step::Data(extent) => extent,
        };
        let data_start = pos + VMA_EXTENT_HEADER_SIZE as u64 - header_size;
        walker.data(
            &extent,
            file_len - pos,
            raw,
            DataCheck::Count,
            record_in(&mut index, data_start),
        )?;
        scanner.last_data = extent.data_len();
    }
    Ok((index, walker.into_integrity()))
}

/// A fresh index with an entry per declared device, by device id.
fn empty_index(header: &ArchiveHeader) -> Vec<Option<DeviceIndex>> {
    let mut index: Vec<Option<DeviceIndex>> = (0..VMA_MAX_DEVICES).map(|_| None).collect();
    for d in &header.devices {
        index[d.id.index()] = Some(DeviceIndex::default());
    }
    index
}

/// Opens through the extent index at the end of the archive, if there is one: `None`
/// when the last extent is not a seal of a known version preceded by an index extent
/// (then the archive is scanned). Once the tail claims an index, whatever is wrong with
/// it is an error.
fn index_from_tail(
    file: &Source,
    file_len: u64,
    header: &ArchiveHeader,
    header_bytes: &[u8],
) -> Result<Option<(Vec<Option<DeviceIndex>>, IntegrityReport)>> {
    let Some(tail) = read_tail(file, file_len, header, header_bytes.len() as u64)? else {
        return Ok(None);
    };
    walk_index(&tail, file_len, header, header_bytes).map(Some)
}

/// The extent index and the seal, as read from the end of an archive.
struct Tail {
    /// Archive offset of the first index extent.
    index_start: u64,
    /// The index extents, 512 bytes each.
    index: Vec<u8>,
    /// The seal extent.
    seal: Vec<u8>,
}

/// Reads the end of the archive: `None` unless it ends with an index extent and a seal.
fn read_tail(
    file: &Source,
    file_len: u64,
    header: &ArchiveHeader,
    header_size: u64,
) -> Result<Option<Tail>> {
    const H: u64 = VMA_EXTENT_HEADER_SIZE as u64;
    let body = file_len.saturating_sub(header_size);
    if body < 2 * H {
        return Ok(None);
    }
    // A zstd file read through its sidecar index replays the reads opening made, stored
    // in the index: read just the seal and the extent before it there, the rest (if it
    // is an index) after.
    let window = match file {
        Source::Indexed(_) => 2 * H,
        _ => TAIL_WINDOW as u64,
    };
    let tail_len = window.min(body);
    let tail_start = file_len - tail_len;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact_at(&mut tail, tail_start)?;
    let in_tail = |at: u64| &tail[(at - tail_start) as usize..][..VMA_EXTENT_HEADER_SIZE];
    let ours = |at: u64| {
        ExtentHeader::decode(in_tail(at))
            .ok()
            .filter(|e| e.uuid == header.uuid)
    };
    let seal_at = file_len - H;
    match ours(seal_at).map(|e| Seal::from_extent(&e)) {
        Some(SealKind::Seal(_)) => {}
        _ => return Ok(None),
    }
    let last_at = seal_at - H;
    let total = match ours(last_at).map(|e| IndexExtent::from_extent(&e)) {
        Some(IndexKind::Index(x)) => x.total,
        Some(IndexKind::Malformed) => return Err(Error::MalformedIndex { offset: last_at }),
        _ => return Ok(None),
    };
    // At most as many index extents as the copies of the headers before them could
    // fill: this bounds what a lying total makes us read.
    let start = seal_at
        .checked_sub(u64::from(total) * H)
        .filter(|&start| start >= header_size && total > 0)
        .filter(|&start| extent_index::extents_for((start - header_size) / H) >= u64::from(total));
    let Some(index_start) = start else {
        return Err(Error::ExtentIndexLayout {
            offset: last_at,
            reason: format!(
                "its last extent says it has {total} extents, which the {body} bytes after \
                 the archive header cannot hold with the data extents they copy"
            ),
        });
    };
    let index = if index_start >= tail_start {
        tail[(index_start - tail_start) as usize..(seal_at - tail_start) as usize].to_vec()
    } else {
        let mut index = vec![0u8; (seal_at - index_start) as usize];
        let (before, within) = index.split_at_mut((tail_start - index_start) as usize);
        file.read_exact_at(before, index_start)?;
        within.copy_from_slice(&tail[..(seal_at - tail_start) as usize]);
        index
    };
    Ok(Some(Tail {
        index_start,
        index,
        seal: in_tail(seal_at).to_vec(),
    }))
}

/// Runs the walk of a scan over the copies the index holds (as the data extents at the
/// offsets they add up to), then over the index extents and the seal, and indexes the
/// clusters from the copies.
fn walk_index(
    tail: &Tail,
    file_len: u64,
    header: &ArchiveHeader,
    header_bytes: &[u8],
) -> Result<(Vec<Option<DeviceIndex>>, IntegrityReport)> {
    const H: u64 = VMA_EXTENT_HEADER_SIZE as u64;
    let index_start = tail.index_start;
    let mut walker = Walker::new(header, header_bytes, true, OnDamage::Report);
    walker.opening_through_index();
    let mut index = empty_index(header);
    let mut decoder = Decoder::new();
    let mut copies: Vec<[u8; VMA_EXTENT_HEADER_SIZE]> = Vec::with_capacity(1);
    let mut copy = 0u64;
    for (i, raw) in tail.index.chunks_exact(VMA_EXTENT_HEADER_SIZE).enumerate() {
        let at = index_start + i as u64 * H;
        let extent =
            ExtentHeader::decode(raw).map_err(|source| Error::Extent { offset: at, source })?;
        if extent.uuid != header.uuid {
            return Err(Error::ExtentUuid {
                offset: at,
                expected: header.uuid,
                found: extent.uuid,
            });
        }
        let x = match IndexExtent::from_extent(&extent) {
            IndexKind::Index(x) => x,
            IndexKind::Malformed => return Err(Error::MalformedIndex { offset: at }),
            _ => {
                return Err(index_layout(
                    index_start,
                    format!("the extent at byte {at} is not one of its extents"),
                ))
            }
        };
        decoder
            .push(&x, |h| copies.push(*h))
            .map_err(|source| Error::ExtentIndex {
                offset: index_start,
                source,
            })?;
        for raw in copies.drain(..) {
            feed_copy(
                &mut walker,
                &mut index,
                header_bytes.len() as u64,
                index_start,
                copy,
                &raw,
            )?;
            copy += 1;
        }
    }
    decoder.finish().map_err(|source| Error::ExtentIndex {
        offset: index_start,
        source,
    })?;
    if walker.position() != index_start {
        return Err(index_layout(
            index_start,
            format!(
                "the data extents it lists end at byte {}, it starts at byte {index_start}",
                walker.position()
            ),
        ));
    }
    // Its own extents (checked above), then the seal as a scan meets it.
    for raw in tail.index.chunks_exact(VMA_EXTENT_HEADER_SIZE) {
        walker.checked_index_extent(raw)?;
    }
    walker.more(file_len - walker.position())?;
    if let Step::Data(_) = walker.extent(ExtentHeader::decode(&tail.seal))? {
        unreachable!("the tail ends with a seal");
    }
    walker.more(file_len - walker.position())?;
    let integrity = walker.into_integrity();
    if let SealStatus::Mismatch { offset, reason } = &integrity.seal {
        return Err(Error::SealMismatch {
            offset: *offset,
            reason: format!("{reason} (opening through the extent index)"),
        });
    }
    Ok((index, integrity))
}

/// [`Error::ExtentIndexLayout`].
fn index_layout(offset: u64, reason: String) -> Error {
    Error::ExtentIndexLayout { offset, reason }
}

/// One header copy, walked as the data extent at the walker's position (which must end
/// before the index), its clusters indexed.
fn feed_copy(
    walker: &mut Walker,
    index: &mut [Option<DeviceIndex>],
    header_size: u64,
    index_start: u64,
    copy: u64,
    raw: &[u8; VMA_EXTENT_HEADER_SIZE],
) -> Result<()> {
    const H: u64 = VMA_EXTENT_HEADER_SIZE as u64;
    let pos = walker.position();
    let past = || {
        index_layout(
            index_start,
            format!("the data extents it lists run past its start (copy {copy})"),
        )
    };
    if pos + H > index_start {
        return Err(past());
    }
    let extent = ExtentHeader::decode(raw).map_err(|source| Error::IndexCopy {
        offset: index_start,
        copy,
        at: pos,
        source,
    })?;
    walker.more(index_start - pos)?;
    let extent = match walker.extent(Ok(extent))? {
        Step::Data(e) if !IndexExtent::is_tagged(&e) => e,
        _ => {
            return Err(index_layout(
                index_start,
                format!("copy {copy} is not a data extent's header"),
            ))
        }
    };
    if pos + extent.extent_len() as u64 > index_start {
        return Err(past());
    }
    let data_start = pos + H - header_size;
    walker.data(
        &extent,
        index_start - pos,
        raw,
        DataCheck::Count,
        record_in(index, data_start),
    )?;
    Ok(())
}

/// Reads extent headers, in windows when extents are small so that an archive of
/// mostly zero clusters (headers back to back) is scanned in large reads.
struct Scanner<'f> {
    file: &'f Source,
    file_len: u64,
    window: Vec<u8>,
    start: u64,
    last_data: usize,
}

impl<'f> Scanner<'f> {
    fn new(file: &'f Source, file_len: u64) -> Scanner<'f> {
        Scanner {
            file,
            file_len,
            window: Vec::with_capacity(SCAN_WINDOW),
            start: 0,
            last_data: 0,
        }
    }

    fn header_at(&mut self, pos: u64) -> Result<&[u8]> {
        // The walker saw that a whole header is there.
        let need = VMA_EXTENT_HEADER_SIZE as u64;
        let have = self.file_len - pos;
        let inside = pos >= self.start && pos + need <= self.start + self.window.len() as u64;
        if !inside {
            // After an extent with data the next header is far away: read just it.
            let want = if self.last_data == 0 {
                SCAN_WINDOW
            } else {
                VMA_EXTENT_HEADER_SIZE
            };
            let len = (want as u64).min(have) as usize;
            self.window.resize(len, 0);
            self.file.read_exact_at(&mut self.window, pos)?;
            self.start = pos;
        }
        let at = (pos - self.start) as usize;
        Ok(&self.window[at..at + VMA_EXTENT_HEADER_SIZE])
    }
}

/// A `Read` over a source by positional reads, leaving the file's own offset alone.
struct Positional<'f> {
    file: &'f Source,
    pos: u64,
}

impl<'f> Positional<'f> {
    fn new(file: &'f Source) -> Self {
        Positional { file, pos: 0 }
    }
}

impl Read for Positional<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos).map_err(into_io)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A run of a device's bytes that share one state, from
/// [`DeviceReader::allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Allocation {
    /// Bytes in the run (a multiple of 4 KiB except at the device end or the length
    /// asked for).
    pub len: u64,
    /// Whether the archive stores them (else they read as zero).
    pub stored: bool,
}

/// One device of a [`SeekableArchive`] as a byte array: [`Read`] + [`Seek`], and
/// positional [`read_at`](Self::read_at) that several threads may call at once.
/// Blocks the archive does not store read as zeros. Cloning is cheap (a reference count
/// and a position).
#[derive(Debug, Clone)]
pub struct DeviceReader {
    shared: Arc<Shared>,
    id: DeviceId,
    size: u64,
    pos: u64,
}

impl DeviceReader {
    /// The device id.
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// The device info from the header.
    pub fn info(&self) -> &DeviceInfo {
        self.shared.header.device(self.id).expect("device exists")
    }

    /// The device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn index(&self) -> &DeviceIndex {
        self.shared.index[self.id.index()]
            .as_ref()
            .expect("every device has an index")
    }

    /// The blocks of a cluster the archive stores (the others read as zeros), or `None`
    /// for a cluster past the device end.
    pub fn mask(&self, cluster: u32) -> Option<BlockMask> {
        cluster::cluster_span(cluster, self.size)?;
        Some(self.index().get(cluster as u64).0)
    }

    /// Whether the archive stores any block of this cluster (false past the end).
    pub fn is_allocated(&self, cluster: u32) -> bool {
        self.mask(cluster).is_some_and(|m| !m.is_empty())
    }

    /// From `offset`, how many bytes (at most `max_len`) share one state, stored or
    /// zero, in 4 KiB blocks, or `None` at or past the device end. What an NBD server
    /// needs to answer block-status queries with holes.
    pub fn allocation(&self, offset: u64, max_len: u64) -> Option<Allocation> {
        if offset >= self.size || max_len == 0 {
            return None;
        }
        let limit = self.size.min(offset.saturating_add(max_len));
        let block = VMA_BLOCK_SIZE as u64;
        let stored_at = |at: u64| {
            let (mask, _) = self.index().get(at / VMA_CLUSTER_SIZE as u64);
            mask.has_block((at % VMA_CLUSTER_SIZE as u64 / block) as usize)
        };
        let state = stored_at(offset);
        let mut end = (offset / block + 1) * block;
        while end < limit {
            // Whole zero clusters without an entry are skipped at once.
            let (mask, _) = self.index().get(end / VMA_CLUSTER_SIZE as u64);
            if !state && mask.is_empty() && end.is_multiple_of(VMA_CLUSTER_SIZE as u64) {
                end += VMA_CLUSTER_SIZE as u64;
                continue;
            }
            if stored_at(end) != state {
                break;
            }
            end += block;
        }
        Some(Allocation {
            len: end.min(limit) - offset,
            stored: state,
        })
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the device end, 0 at or
    /// past it. Takes `&self`: any number of threads may read at once.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let cluster_size = VMA_CLUSTER_SIZE as u64;
        let mut done = 0;
        while done < n {
            let at = offset + done as u64;
            let within = (at % cluster_size) as usize;
            let take = (n - done).min(VMA_CLUSTER_SIZE - within);
            let (mask, relative) = self.index().get(at / cluster_size);
            let data = self.shared.header_size + relative;
            self.read_cluster(mask, data, within, &mut buf[done..done + take])?;
            done += take;
        }
        Ok(n)
    }

    /// Fills `out` with the cluster's bytes from `within` on: runs of stored blocks in one
    /// read each, zeros elsewhere.
    fn read_cluster(
        &self,
        mask: BlockMask,
        data: u64,
        within: usize,
        out: &mut [u8],
    ) -> io::Result<()> {
        let end = within + out.len();
        let mut p = within;
        while p < end {
            let j = p / VMA_BLOCK_SIZE;
            let stored = mask.has_block(j);
            let mut k = j + 1;
            while k < VMA_BLOCKS_PER_CLUSTER
                && k * VMA_BLOCK_SIZE < end
                && mask.has_block(k) == stored
            {
                k += 1;
            }
            let run_end = end.min(k * VMA_BLOCK_SIZE);
            let dst = &mut out[p - within..run_end - within];
            if stored {
                let before = BlockMask::from_bits_retain(mask.bits() & ((1u16 << j) - 1));
                let at = data + (before.stored_len() + p % VMA_BLOCK_SIZE) as u64;
                self.shared.source.read_exact_at(dst, at).map_err(into_io)?;
            } else {
                dst.fill(0);
            }
            p = run_end;
        }
        Ok(())
    }
}

impl Read for DeviceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for DeviceReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(n) => {
                self.pos = n;
                Ok(n)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }
}

/// What the walker's `each` does while indexing: records each slot's stored blocks in its
/// device's index, at `data_start` (relative to the header's end) plus their place in the
/// extent.
fn record_in(
    index: &mut [Option<DeviceIndex>],
    data_start: u64,
) -> impl FnMut(&crate::validate::CheckedSlot, std::ops::Range<usize>) + '_ {
    move |slot, range| {
        if let Some(ix) = index[slot.device.index()].as_mut() {
            ix.set(slot.cluster, slot.mask, data_start + range.start as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + Clone>() {}

    #[test]
    fn readers_are_shareable() {
        assert_send_sync::<DeviceReader>();
        assert_send_sync::<SeekableArchive>();
    }
}
