//! The one-pass streaming reader: header, then extent by extent into one reused buffer.

use std::io::{self, Read};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread;

use vma_format::{
    cluster, ArchiveHeader, BlockMask, DeviceId, ExtentHeader, VMA_EXTENT_HEADER_SIZE,
    VMA_FIXED_HEADER_SIZE, VMA_MAGIC, VMA_MAX_EXTENT_SIZE,
};
use vma_iobuf::AlignedBuf;

use crate::error::{Error, Result};
use crate::integrity::{ExtentChecksum, IntegrityReport};
use crate::options::OnDamage;
use crate::validate::CheckedSlot;
use crate::verify::VerifyReport;
use crate::walk::{DataCheck, Step, Walker};

/// What a reader checks beyond the format itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    /// Check each extent's CRC32C where it carries one (cheap; default on).
    pub verify_checksums: bool,
    /// Hash the headers to check a seal against (cheap: 512 bytes an extent; default on).
    pub verify_seal: bool,
    /// Fail at the first CRC32C or seal mismatch instead of recording it in the
    /// [`IntegrityReport`] (default off).
    pub stop_on_damage: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            verify_checksums: true,
            verify_seal: true,
            stop_on_damage: false,
        }
    }
}

/// Reads an archive in one pass from any [`Read`]: a file, a pipe, a decompressor.
///
/// [`new`](Self::new) reads and checks the header; [`next_extent`](Self::next_extent)
/// then yields extent after extent, each checked (MD5, uuid, slots, duplicates, CRC32C)
/// before it is handed out. After the last extent it checks that no cluster is missing,
/// and only then returns `Ok(None)`. Memory: one extent buffer (at most
/// [`VMA_MAX_EXTENT_SIZE`] bytes) plus about one bit per cluster seen.
///
/// After an error every further call fails with [`Error::Failed`].
///
/// [`prefetching`](StreamReader::prefetching) moves the reading (and whatever decompression
/// the `Read` does) to a thread of its own, which reads the next extents into spare
/// buffers while the caller checks and uses the current one.
pub struct StreamReader<R> {
    pub(crate) inner: R,
    pub(crate) core: Core,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the archive header, with default [`ReadOptions`].
    pub fn new(reader: R) -> Result<StreamReader<R>> {
        Self::with_options(reader, ReadOptions::default())
    }

    /// Reads and checks the archive header.
    pub fn with_options(mut reader: R, options: ReadOptions) -> Result<StreamReader<R>> {
        let core = Core::open(&mut reader, options)?;
        Ok(StreamReader {
            inner: reader,
            core,
        })
    }

    /// Gives back the inner reader. (A [`prefetching`](StreamReader::prefetching) reader's
    /// is [`io::Empty`]: its input belongs to the reading thread.)
    pub fn into_inner(self) -> R {
        self.inner
    }

    pub(crate) fn from_parts(inner: R, core: Core) -> StreamReader<R> {
        StreamReader { inner, core }
    }

    pub(crate) fn set_stop_on_damage(&mut self, yes: bool) {
        // The walker holds the policy; `options` is only read at open.
        self.core.walker.set_on_damage(OnDamage::stop_if(yes));
    }

    /// The next extent, checked; `Ok(None)` once the archive ended complete.
    pub fn next_extent(&mut self) -> Result<Option<Extent<'_>>> {
        self.core.next_extent(&mut self.inner)
    }

    /// Reads to the end, checking everything, and returns the report.
    pub fn verify_all(&mut self, mut progress: impl FnMut(&ReadProgress)) -> Result<VerifyReport> {
        while self.next_extent()?.is_some() {
            progress(&self.progress());
        }
        Ok(self.report())
    }
}

/// How far reading has come, after an extent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadProgress {
    /// Archive bytes read (the header included).
    pub archive_bytes: u64,
    /// Cluster slots read, vmstate included.
    pub clusters: u64,
    /// Device bytes those clusters cover.
    pub device_bytes: u64,
}

/// A [`StreamReader`] whose input is read on a thread of its own.
pub type PrefetchingReader = StreamReader<io::Empty>;

impl StreamReader<io::Empty> {
    /// Reads and checks the archive header, then starts a thread that reads extent after
    /// extent from `reader` into up to [`PREFETCH_BUFFERS`] extent buffers, each handed
    /// over whole: on two cores reading (a `read` system call's copy, or a decompressor)
    /// and checking (CRC32C, the caller's writes) overlap, and no byte is copied twice.
    ///
    /// The thread stops at the end of the input, after the first read error or damaged
    /// header (which the reader then reports exactly as a direct one would), or when the
    /// reader is dropped; a thread blocked in `read` on a pipe stops when that returns.
    pub fn prefetching<R: Read + Send + 'static>(
        mut reader: R,
        options: ReadOptions,
    ) -> Result<PrefetchingReader> {
        let mut core = Core::open(&mut reader, options)?;
        core.prefetch = Some(
            Prefetch::spawn(Box::new(reader)).map_err(|source| Error::Read {
                offset: core.header_size,
                source,
            })?,
        );
        Ok(StreamReader {
            inner: io::empty(),
            core,
        })
    }
}

impl<R> StreamReader<R> {
    /// The archive header.
    pub fn header(&self) -> &ArchiveHeader {
        &self.core.header
    }

    /// Size of the header in bytes; the first extent starts here.
    pub fn header_size(&self) -> u64 {
        self.core.header_size
    }

    /// Archive bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.core.walker.position()
    }

    /// How far reading has come: archive bytes, clusters and the device bytes they cover.
    pub fn progress(&self) -> ReadProgress {
        let (clusters, device_bytes) = self.core.walker.clusters_read();
        ReadProgress {
            archive_bytes: self.core.walker.position(),
            clusters,
            device_bytes,
        }
    }

    /// Whether the archive was read to its end and found complete.
    pub fn is_finished(&self) -> bool {
        self.core.walker.is_done()
    }

    /// What the integrity extension said so far (complete once finished).
    pub fn integrity(&self) -> &IntegrityReport {
        self.core.walker.integrity()
    }

    /// Figures per device and integrity so far (complete once finished).
    pub fn report(&self) -> VerifyReport {
        self.core.walker.report()
    }

    /// Bytes of memory the reader holds, roughly: its extent buffers (a prefetching
    /// reader's all of them, wherever they are) and the set of clusters seen.
    pub fn memory(&self) -> usize {
        let buffers = match &self.core.prefetch {
            Some(p) => p.buffer_bytes.load(Ordering::Relaxed),
            None => self.core.buf.capacity(),
        };
        buffers + self.core.walker.memory()
    }

    /// How many clusters of the vmstate device `id` arrived (they run 0, 1, 2, ...).
    pub(crate) fn vmstate_clusters(&self, id: DeviceId) -> u64 {
        self.core.walker.vmstate_clusters(id)
    }
}

/// One extent, checked, borrowed from the reader's buffer until the next call.
#[derive(Debug, Clone, Copy)]
pub struct Extent<'a> {
    header: &'a ExtentHeader,
    data: &'a [u8],
    slots: &'a [(CheckedSlot, Range<usize>)],
    offset: u64,
    index: u64,
    checksum: ExtentChecksum,
}

impl<'a> Extent<'a> {
    /// Archive offset of the extent header.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Index of the extent, 0 for the first after the archive header.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Length of the extent: header plus data.
    pub fn len(&self) -> usize {
        VMA_EXTENT_HEADER_SIZE + self.data.len()
    }

    /// Whether the extent stores no data (a header only).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The decoded extent header.
    pub fn header(&self) -> &'a ExtentHeader {
        self.header
    }

    /// The data after the header: the stored blocks of all its clusters.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// What the data checksum said.
    pub fn checksum(&self) -> ExtentChecksum {
        self.checksum
    }

    /// The clusters, in slot order.
    pub fn clusters(&self) -> impl Iterator<Item = Cluster<'a>> + 'a {
        let data = self.data;
        self.slots.iter().map(move |(s, range)| Cluster {
            device: s.device,
            cluster: s.cluster,
            mask: s.mask,
            span: s.span,
            data: &data[range.clone()],
            data_offset: range.start,
        })
    }
}

/// One cluster of an extent: which device and cluster it is, which blocks are stored,
/// and those blocks' bytes (a slice of the reader's buffer, not a copy).
#[derive(Debug, Clone, Copy)]
pub struct Cluster<'a> {
    /// The device.
    pub device: DeviceId,
    /// Cluster number within the device.
    pub cluster: u32,
    /// Stored blocks; the others are zero.
    pub mask: BlockMask,
    /// Bytes of the cluster inside the device: 65536, less for the device's last cluster.
    pub span: usize,
    /// The stored blocks, `mask.stored_len()` bytes in block order.
    pub data: &'a [u8],
    data_offset: usize,
}

impl<'a> Cluster<'a> {
    /// Byte offset of the cluster within its device.
    pub fn device_offset(&self) -> u64 {
        cluster::cluster_offset(self.cluster)
    }

    /// Offset of this cluster's stored blocks within the extent's data.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// Each stored block: its index in the cluster (0..16) and its bytes, cut at the
    /// device end.
    pub fn blocks(&self) -> impl Iterator<Item = (usize, &'a [u8])> + 'a {
        let data = self.data;
        let span = self.span;
        self.mask.stored_block_offsets().map(move |(j, at)| {
            let len = vma_format::cluster::block_span(j, span);
            (j, &data[at..at + len])
        })
    }
}

/// The reader without its `Read`: everything that need not be generic.
pub(crate) struct Core {
    header: ArchiveHeader,
    header_size: u64,
    pub(crate) options: ReadOptions,
    /// The extent buffer, page-aligned so that reads into it and copies out of it stay
    /// off the slow path of `rep movsb` (see [`vma_format::aligned`]).
    buf: AlignedBuf,
    extent: Option<ExtentHeader>,
    slots: Vec<(CheckedSlot, Range<usize>)>,
    /// The grammar: counts, checks, the seal.
    walker: Walker,
    /// Where the current extent starts in `buf` (a prefetching reader's buffers hold
    /// several small extents).
    at: usize,
    /// The reading thread of a prefetching reader.
    prefetch: Option<Prefetch>,
    /// After an error every call fails.
    failed: bool,
    current: (u64, u64, ExtentChecksum),
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads and checks an archive header from the start of `r`; returns its bytes.
pub(crate) fn read_header(r: &mut dyn Read) -> Result<(ArchiveHeader, Vec<u8>)> {
    let mut bytes = vec![0u8; VMA_FIXED_HEADER_SIZE];
    let got = read_full(r, &mut bytes).map_err(|source| Error::Read { offset: 0, source })?;
    if got < VMA_FIXED_HEADER_SIZE {
        let n = got.min(VMA_MAGIC.len());
        if got == 0 || bytes[..n] != VMA_MAGIC[..n] {
            return Err(match bytes[..got].first_chunk::<4>() {
                Some(&found) => Error::Header(vma_format::FormatError::BadMagic { found }),
                None => Error::NotAnArchive { len: got as u64 },
            });
        }
        // Say "not a VMA archive" rather than "short" when the prefix already shows it.
        let needed = match ArchiveHeader::header_size_from_prefix(&bytes[..got]) {
            Ok(size) => size,
            Err(vma_format::FormatError::TooShort { .. }) => VMA_FIXED_HEADER_SIZE,
            Err(e) => return Err(Error::Header(e)),
        };
        return Err(Error::TruncatedHeader {
            got: got as u64,
            needed: needed as u64,
        });
    }
    let size = ArchiveHeader::header_size_from_prefix(&bytes).map_err(Error::Header)?;
    // Read the rest as it arrives rather than allocating what the header claims.
    r.take((size - VMA_FIXED_HEADER_SIZE) as u64)
        .read_to_end(&mut bytes)
        .map_err(|source| Error::Read {
            offset: VMA_FIXED_HEADER_SIZE as u64,
            source,
        })?;
    if bytes.len() < size {
        return Err(Error::TruncatedHeader {
            got: bytes.len() as u64,
            needed: size as u64,
        });
    }
    let header = ArchiveHeader::decode(&bytes).map_err(Error::Header)?;
    if let Some(at) = ArchiveHeader::first_nonzero_reserved(&bytes) {
        return Err(Error::HeaderReserved {
            offset: at as u64,
            value: bytes[at],
        });
    }
    Ok((header, bytes))
}

impl Core {
    fn open(r: &mut dyn Read, options: ReadOptions) -> Result<Core> {
        let (header, bytes) = read_header(r)?;
        let on_damage = OnDamage::stop_if(options.stop_on_damage);
        let walker = Walker::new(&header, &bytes, options.verify_seal, on_damage);
        Ok(Core {
            walker,
            header,
            header_size: bytes.len() as u64,
            options,
            buf: AlignedBuf::default(),
            extent: None,
            slots: Vec::new(),
            at: 0,
            prefetch: None,
            failed: false,
            current: (0, 0, ExtentChecksum::Absent),
        })
    }

    fn next_extent(&mut self, r: &mut dyn Read) -> Result<Option<Extent<'_>>> {
        if self.failed {
            return Err(Error::Failed);
        }
        if self.walker.is_done() {
            return Ok(None);
        }
        match self.advance(r) {
            Ok(true) => {
                let (offset, index, checksum) = self.current;
                let header = self.extent.as_ref().expect("set by advance");
                Ok(Some(Extent {
                    data: &self.buf
                        [self.at + VMA_EXTENT_HEADER_SIZE..self.at + header.extent_len()],
                    header,
                    slots: &self.slots,
                    offset,
                    index,
                    checksum,
                }))
            }
            Ok(false) => Ok(None),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Reads the next extent's bytes into `self.buf`, from `r` or from the prefetching
    /// thread.
    fn fill(&mut self, r: &mut dyn Read) -> Result<Fill> {
        match &mut self.prefetch {
            None => {
                let (mut fills, _) = read_extents(r, &mut self.buf, &mut None, 1);
                Ok(fills.pop().expect("one extent"))
            }
            Some(p) => p.next(&mut self.buf).ok_or(Error::Read {
                offset: self.walker.position(),
                source: io::Error::other("the reading thread stopped"),
            }),
        }
    }

    /// Reads the next data extent into the buffer; `false` at a complete end.
    fn advance(&mut self, r: &mut dyn Read) -> Result<bool> {
        const H: usize = VMA_EXTENT_HEADER_SIZE;
        loop {
            let offset = self.walker.position();
            let fill = self.fill(r)?;
            self.at = fill.start;
            if let Some((0, source)) = fill.error {
                return Err(Error::Read { offset, source });
            }
            let got = fill.got as u64;
            if !self.walker.more(got)? {
                return Ok(false);
            }
            let decoded = match fill.header {
                Some(extent) => Ok(extent),
                None => ExtentHeader::decode(&self.buf[self.at..][..H]),
            };
            let extent = match self.walker.extent(decoded)? {
                Step::Seal => continue,
                Step::Data(extent) => extent,
            };
            if let Some((at, source)) = fill.error {
                return Err(Error::Read {
                    offset: offset + at as u64,
                    source,
                });
            }
            let at = self.at;
            let len = extent.extent_len();
            let check = if self.options.verify_checksums {
                // Whole once the walker has seen that the extent is not truncated.
                DataCheck::Verify(self.buf.get(at + H..at + len).unwrap_or_default())
            } else {
                DataCheck::Skip
            };
            self.slots.clear();
            let slots = &mut self.slots;
            let (index, checksum) =
                self.walker
                    .data(&extent, got, &self.buf[at..at + H], check, |s, range| {
                        slots.push((*s, range))
                    })?;
            self.current = (offset, index, checksum);
            self.extent = Some(extent);
            return Ok(true);
        }
    }
}

/// Buffers of a prefetching reader: one being filled, one ready, one in use. Each holds
/// one extent of the largest size, or smaller ones up to 1 MiB in all.
pub const PREFETCH_BUFFERS: usize = 3;

/// Bytes of small extents a prefetching reader gathers in one buffer before handing it
/// over: enough that a run of header-only extents costs few hand-overs, little enough
/// that an archive of small extents touches (page-faults in) little of the buffers.
const BATCH: usize = 1 << 20;

/// One extent's bytes as read: where in the buffer it starts, how many bytes arrived,
/// the header if it decoded, and the read error that stopped it (with the offset, within
/// the extent, where it happened).
pub(crate) struct Fill {
    start: usize,
    got: usize,
    header: Option<ExtentHeader>,
    error: Option<(usize, io::Error)>,
}

impl Fill {
    /// Whether nothing can follow: the input ended, failed, or held no valid header.
    fn is_last(&self) -> bool {
        self.error.is_some()
            || match &self.header {
                Some(h) => self.got < h.extent_len(),
                None => true,
            }
    }
}

/// Makes `buf` at least `len` bytes long, keeping its first `keep` bytes. It grows by
/// doubling (up to the largest extent) so that a run of ever larger extents costs few
/// reallocations, and no more than the archive's extents need.
fn reserve(buf: &mut AlignedBuf, len: usize, keep: usize) {
    if buf.len() < len {
        let to = len.max(buf.len() * 2).min(VMA_MAX_EXTENT_SIZE);
        buf.grow(to, keep);
    }
}

/// Reads extents into `buf` from its start, each header and then, if that decodes, its
/// data, until `batch` bytes are filled (`1`: one extent), an extent would not fit in the
/// largest buffer, or the input ends or fails; returns them. `carry` holds a header read
/// for an earlier buffer that did not fit there, and receives one that does not fit
/// here. The second value says whether the input is done (ended, failed, or held
/// something that is not a whole extent): the last [`Fill`] tells which. The checks
/// beyond decoding a header (so as to know its length) are the caller's.
fn read_extents(
    r: &mut dyn Read,
    buf: &mut AlignedBuf,
    carry: &mut Option<[u8; VMA_EXTENT_HEADER_SIZE]>,
    batch: usize,
) -> (Vec<Fill>, bool) {
    const H: usize = VMA_EXTENT_HEADER_SIZE;
    let mut fills = Vec::new();
    let mut at = 0;
    while at < batch {
        reserve(buf, at + H, at);
        let got = match carry.take() {
            Some(header) => {
                buf[at..at + H].copy_from_slice(&header);
                H
            }
            None => match read_full(r, &mut buf[at..at + H]) {
                Ok(got) => got,
                Err(e) => {
                    fills.push(Fill {
                        start: at,
                        got: 0,
                        header: None,
                        error: Some((0, e)),
                    });
                    return (fills, true);
                }
            },
        };
        let header = (got == H)
            .then(|| ExtentHeader::decode(&buf[at..at + H]).ok())
            .flatten();
        let Some(len) = header.as_ref().map(ExtentHeader::extent_len) else {
            fills.push(Fill {
                start: at,
                got,
                header,
                error: None,
            });
            return (fills, true);
        };
        if at + len > VMA_MAX_EXTENT_SIZE {
            // Never at the start: a buffer holds the largest extent.
            *carry = Some(buf[at..at + H].try_into().expect("one header"));
            return (fills, false);
        }
        reserve(buf, at + len, at + H);
        let fill = match read_full(r, &mut buf[at + H..at + len]) {
            Ok(data) => Fill {
                start: at,
                got: got + data,
                header,
                error: None,
            },
            Err(e) => Fill {
                start: at,
                got,
                header,
                error: Some((H, e)),
            },
        };
        let last = fill.is_last();
        fills.push(fill);
        if last {
            return (fills, true);
        }
        at += len;
    }
    (fills, false)
}

/// The reading thread of a prefetching reader, its two channels (filled buffers to the
/// reader, used ones back) and the extents of the current buffer not yet handed out.
pub(crate) struct Prefetch {
    filled: Receiver<(AlignedBuf, Vec<Fill>)>,
    used: SyncSender<AlignedBuf>,
    pending: std::vec::IntoIter<Fill>,
    /// Bytes allocated for the buffers, kept up to date by the thread.
    buffer_bytes: Arc<AtomicUsize>,
}

impl Prefetch {
    fn spawn(mut input: Box<dyn Read + Send>) -> io::Result<Prefetch> {
        let (to_reader, filled) = sync_channel(1);
        let (used, from_reader) = sync_channel::<AlignedBuf>(PREFETCH_BUFFERS);
        let buffer_bytes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&buffer_bytes);
        thread::Builder::new()
            .name("vma-prefetch".into())
            .spawn(move || {
                let mut allocated = 0;
                let mut carry = None;
                loop {
                    let mut buf = match from_reader.try_recv() {
                        Ok(buf) => buf,
                        Err(_) if allocated < PREFETCH_BUFFERS => {
                            allocated += 1;
                            AlignedBuf::default()
                        }
                        Err(_) => match from_reader.recv() {
                            Ok(buf) => buf,
                            Err(_) => return,
                        },
                    };
                    let before = buf.capacity();
                    let (fills, last) = read_extents(&mut *input, &mut buf, &mut carry, BATCH);
                    // Buffers only grow.
                    counted.fetch_add(buf.capacity() - before, Ordering::Relaxed);
                    if to_reader.send((buf, fills)).is_err() || last {
                        return;
                    }
                }
            })?;
        Ok(Prefetch {
            filled,
            used,
            pending: Vec::new().into_iter(),
            buffer_bytes,
        })
    }

    /// The next extent: in `buf` already, or in the next buffer, which replaces `buf`
    /// (handed back to the thread). `None` if the thread is gone without a last word (it
    /// panicked).
    fn next(&mut self, buf: &mut AlignedBuf) -> Option<Fill> {
        loop {
            if let Some(fill) = self.pending.next() {
                return Some(fill);
            }
            let (next, fills) = self.filled.recv().ok()?;
            let done = std::mem::replace(buf, next);
            if done.capacity() > 0 {
                // The thread may have stopped (its last buffer sent): then it is freed.
                let _ = self.used.try_send(done);
            }
            self.pending = fills.into_iter();
        }
    }
}
