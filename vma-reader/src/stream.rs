//! The one-pass streaming reader: header, then extent by extent into one reused buffer;
//! the [`ArchiveStream`] trait of it and of the [`PrefetchingReader`]; what verification
//! and extraction read from ([`IntoArchiveStream`]).

use std::io::{self, Read};
use std::ops::Range;

use vma_format::{
    cluster, ArchiveHeader, BlockMask, DeviceId, ExtentHeader, VMA_EXTENT_HEADER_SIZE,
    VMA_FIXED_HEADER_SIZE, VMA_MAGIC, VMA_MAX_EXTENT_SIZE,
};
use vma_iobuf::AlignedBuf;

use crate::error::{Error, Result};
use crate::integrity::{ExtentChecksum, IntegrityReport};
use crate::options::{OnDamage, ReadOptions};
use crate::prefetch::{Prefetch, PrefetchingReader};
use crate::validate::CheckedSlot;
use crate::verify::VerifyReport;
use crate::walk::{DataCheck, Step, Walker};

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
/// [`PrefetchingReader`] does the same with the reading (and whatever decompression the
/// `Read` does) on a thread of its own, which reads the next extents into spare buffers
/// while the caller checks and uses the current one. Both are [`ArchiveStream`]s.
pub struct StreamReader<R> {
    inner: R,
    core: Core,
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

    /// Gives back the inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next extent, checked; `Ok(None)` once the archive ended complete.
    pub fn next_extent(&mut self) -> Result<Option<Extent<'_>>> {
        self.core.next_extent(Input::Direct(&mut self.inner))
    }

    /// Bytes of memory the reader holds, roughly: its extent buffer and the set of
    /// clusters seen.
    pub fn memory(&self) -> usize {
        self.core.buf.capacity() + self.core.walk_memory()
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

/// The accessors every reader has, as inherent methods (so that no trait need be in
/// scope) delegating to its [`Core`].
macro_rules! core_accessors {
    () => {
        /// The archive header.
        pub fn header(&self) -> &vma_format::ArchiveHeader {
            self.core().header()
        }

        /// Size of the header in bytes; the first extent starts here.
        pub fn header_size(&self) -> u64 {
            self.core().header_size()
        }

        /// Archive bytes consumed so far.
        pub fn position(&self) -> u64 {
            self.core().position()
        }

        /// How far reading has come: archive bytes, clusters and the device bytes they
        /// cover.
        pub fn progress(&self) -> $crate::ReadProgress {
            self.core().progress()
        }

        /// Whether the archive was read to its end and found complete.
        pub fn is_finished(&self) -> bool {
            self.core().is_finished()
        }

        /// What the integrity extension said so far (complete once finished).
        pub fn integrity(&self) -> &$crate::IntegrityReport {
            self.core().integrity()
        }

        /// Figures per device and integrity so far (complete once finished).
        pub fn report(&self) -> $crate::VerifyReport {
            self.core().report()
        }
    };
}
pub(crate) use core_accessors;

/// The [`ArchiveStream`] methods of a reader type with a `core` and inherent
/// `next_extent` and `memory` (one list for both readers).
macro_rules! stream_methods {
    ($reader:ident) => {
        fn header(&self) -> &vma_format::ArchiveHeader {
            self.core.header()
        }
        fn next_extent(&mut self) -> $crate::Result<Option<$crate::Extent<'_>>> {
            $reader::next_extent(self)
        }
        fn position(&self) -> u64 {
            self.core.position()
        }
        fn progress(&self) -> $crate::ReadProgress {
            self.core.progress()
        }
        fn is_finished(&self) -> bool {
            self.core.is_finished()
        }
        fn integrity(&self) -> &$crate::IntegrityReport {
            self.core.integrity()
        }
        fn report(&self) -> $crate::VerifyReport {
            self.core.report()
        }
        fn memory(&self) -> usize {
            $reader::memory(self)
        }
    };
}
pub(crate) use stream_methods;

impl<R> StreamReader<R> {
    core_accessors!();

    fn core(&self) -> &Core {
        &self.core
    }
}

pub(crate) mod sealed {
    /// Only this crate's readers are [`ArchiveStream`](super::ArchiveStream)s, so that
    /// the trait may grow.
    pub trait Stream {}
    /// Only this crate's types are
    /// [`IntoArchiveStream`](super::IntoArchiveStream), so that the trait may grow.
    pub trait Input {}
}

/// An archive being read in one pass, its header read: a [`StreamReader`] or a
/// [`PrefetchingReader`]. What [`verify`](crate::verify) and
/// [`Extractor::extract`](crate::Extractor::extract) read from, and what code that reads
/// either kind of reader can be written against.
pub trait ArchiveStream: sealed::Stream {
    /// The archive header.
    fn header(&self) -> &ArchiveHeader;
    /// The next extent, checked; `Ok(None)` once the archive ended complete.
    fn next_extent(&mut self) -> Result<Option<Extent<'_>>>;
    /// Archive bytes consumed so far.
    fn position(&self) -> u64;
    /// How far reading has come.
    fn progress(&self) -> ReadProgress;
    /// Whether the archive was read to its end and found complete.
    fn is_finished(&self) -> bool;
    /// What the integrity extension said so far (complete once finished).
    fn integrity(&self) -> &IntegrityReport;
    /// Figures per device and integrity so far (complete once finished).
    fn report(&self) -> VerifyReport;
    /// Bytes of memory the reader holds, roughly.
    fn memory(&self) -> usize;
}

impl<R: Read> sealed::Stream for StreamReader<R> {}

impl<R: Read> ArchiveStream for StreamReader<R> {
    stream_methods!(StreamReader);
}

/// What [`verify`](crate::verify) and [`Extractor::extract`](crate::Extractor::extract)
/// read from: any [`Read`] (its header not read yet), an [`ArchiveStream`] whose header
/// was read already (to print it, say, or to prepare targets from it), or a
/// [`SeekableArchive`](crate::SeekableArchive) (its file read again from the start).
pub trait IntoArchiveStream: sealed::Input {
    /// The stream it becomes.
    type Stream: ArchiveStream;

    /// A `Read` or an archive file: opens a stream with these options. A stream: keeps
    /// its own options, but takes the damage policy of these.
    fn into_stream(self, options: ReadOptions) -> Result<Self::Stream>;
}

impl<R: Read> sealed::Input for R {}

impl<R: Read> IntoArchiveStream for R {
    type Stream = StreamReader<R>;

    fn into_stream(self, options: ReadOptions) -> Result<StreamReader<R>> {
        StreamReader::with_options(self, options)
    }
}

impl<R: Read> sealed::Input for StreamReader<R> {}

impl<R: Read> IntoArchiveStream for StreamReader<R> {
    type Stream = StreamReader<R>;

    fn into_stream(mut self, options: ReadOptions) -> Result<StreamReader<R>> {
        self.core.set_on_damage(options.damage_policy());
        Ok(self)
    }
}

impl sealed::Input for PrefetchingReader {}

impl IntoArchiveStream for PrefetchingReader {
    type Stream = PrefetchingReader;

    fn into_stream(mut self, options: ReadOptions) -> Result<PrefetchingReader> {
        self.core_mut().set_on_damage(options.damage_policy());
        Ok(self)
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

/// Where a [`Core`] gets its extents' bytes.
pub(crate) enum Input<'a> {
    /// Read here, one extent at a time.
    Direct(&'a mut dyn Read),
    /// Read by a thread, several small extents per buffer.
    Prefetch(&'a mut Prefetch),
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
    pub(crate) fn open(r: &mut dyn Read, options: ReadOptions) -> Result<Core> {
        let (header, bytes) = read_header(r)?;
        let walker = Walker::new(
            &header,
            &bytes,
            options.verifies_seal(),
            options.damage_policy(),
        );
        Ok(Core {
            walker,
            header,
            header_size: bytes.len() as u64,
            options,
            buf: AlignedBuf::default(),
            extent: None,
            slots: Vec::new(),
            at: 0,
            failed: false,
            current: (0, 0, ExtentChecksum::Absent),
        })
    }

    pub(crate) fn header(&self) -> &ArchiveHeader {
        &self.header
    }

    pub(crate) fn header_size(&self) -> u64 {
        self.header_size
    }

    pub(crate) fn position(&self) -> u64 {
        self.walker.position()
    }

    pub(crate) fn progress(&self) -> ReadProgress {
        let (clusters, device_bytes) = self.walker.clusters_read();
        ReadProgress {
            archive_bytes: self.walker.position(),
            clusters,
            device_bytes,
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.walker.is_done()
    }

    pub(crate) fn integrity(&self) -> &IntegrityReport {
        self.walker.integrity()
    }

    pub(crate) fn report(&self) -> VerifyReport {
        self.walker.report()
    }

    /// Bytes of memory held for the clusters seen (the buffers are the reader's).
    pub(crate) fn walk_memory(&self) -> usize {
        self.walker.memory()
    }

    pub(crate) fn set_on_damage(&mut self, on_damage: OnDamage) {
        self.options = self.options.clone().on_damage(on_damage);
        self.walker.set_on_damage(on_damage);
    }

    pub(crate) fn next_extent(&mut self, mut input: Input<'_>) -> Result<Option<Extent<'_>>> {
        if self.failed {
            return Err(Error::Failed);
        }
        if self.walker.is_done() {
            return Ok(None);
        }
        match self.advance(&mut input) {
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

    /// Reads the next extent's bytes into `self.buf`, from the input or from the
    /// prefetching thread.
    fn fill(&mut self, input: &mut Input<'_>) -> Result<Fill> {
        match input {
            Input::Direct(r) => {
                let (mut fills, _) = read_extents(*r, &mut self.buf, &mut None, 1);
                Ok(fills.pop().expect("one extent"))
            }
            Input::Prefetch(p) => p.next(&mut self.buf).ok_or(Error::Read {
                offset: self.walker.position(),
                source: io::Error::other("the reading thread stopped"),
            }),
        }
    }

    /// Reads the next data extent into the buffer; `false` at a complete end.
    fn advance(&mut self, input: &mut Input<'_>) -> Result<bool> {
        const H: usize = VMA_EXTENT_HEADER_SIZE;
        loop {
            let offset = self.walker.position();
            let fill = self.fill(input)?;
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
            let check = if self.options.verifies_checksums() {
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

/// One extent's bytes as read: where in the buffer it starts, how many bytes arrived,
/// the header if it decoded, and the read error that stopped it (with the offset, within
/// the extent, where it happened).
pub(crate) struct Fill {
    pub(crate) start: usize,
    pub(crate) got: usize,
    pub(crate) header: Option<ExtentHeader>,
    pub(crate) error: Option<(usize, io::Error)>,
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
pub(crate) fn read_extents(
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
