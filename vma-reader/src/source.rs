//! Where the seekable reader's archive bytes come from: a positional byte source, read at
//! any offset by any number of threads at once. One walker and one index serve every
//! source; only how bytes at an archive offset are fetched differs:
//!
//! - a plain archive file: positional reads (`pread`) of the file;
//! - a seekable zstd archive (zstd's seekable format, as `vma create X.vma.zst` writes
//!   it): its seek table maps an archive offset to the frame holding it, and frames are
//!   decompressed on demand into a bounded cache;
//! - an lzop archive (`.vma.lzo`, as vzdump writes it with `lzop`): one scan of its block
//!   headers, at opening, indexes which compressed bytes hold which archive bytes (see
//!   [`crate::lzop::LzopIndex`]), and blocks are decompressed on demand, their data
//!   checksums verified, into a cache of the same design and bound.
//! - a zstd archive as `zstd` and vzdump write it (one frame, no seek table), read through
//!   its sidecar index ([`crate::zstd_index`]): segments of whole blocks that a fresh
//!   decoder decodes from a stored prefix, decoded on demand into a cache of the same
//!   design and bound (a segment is at most [`crate::zstd_index::MAX_SEGMENT`]).
//!
//! Cache bound: frames are kept, most recently used last, while they hold at most
//! [`FRAME_CACHE_BYTES`] in all (at least the last one used, whatever its size); each
//! frame's content is at most [`MAX_FRAME_CONTENT`] (the seek table is refused
//! otherwise), and a thread decompressing holds one frame more until it is cached. With
//! `vma create`'s frames (2 MiB to 6 MiB) that is about 32 MiB plus 6 MiB per reading
//! thread. Headers read while indexing decompress only a frame's first 128 KiB when that
//! is all they need, so opening costs a fraction of a full decompression when most frames
//! hold one extent. An lzop archive's cache keeps blocks the same way, within the same
//! [`FRAME_CACHE_BYTES`]; a block's content is at most [`crate::lzop::MAX_BLOCK_SIZE`]
//! (64 MiB, lzop's own limit; the file is refused otherwise), so with the 256 KiB blocks
//! lzop writes that is 32 MiB plus 256 KiB per reading thread. Its index takes 32 bytes
//! per block (128 KiB per GiB of archive).

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

pub use vma_format::seek_table::MAX_FRAME_CONTENT;
use vma_format::seek_table::{SeekIndex, SeekTableError, ZSTD_FRAME_MAGIC};

use crate::cache::{read_units, UnitCache};
use crate::error::{Error, Result};
use crate::lzop::{LzopIndex, LZOP_MAGIC};
use crate::read_at::{Bytes, ReadAt};
use crate::zstd_index::{ZstdIndex, ZstdIndexError};

/// Bytes of decompressed frames (or lzop blocks) the cache of a compressed archive keeps.
pub const FRAME_CACHE_BYTES: usize = 32 << 20;
/// Segments of a sidecar-indexed zstd file decoded ahead of a sequential reader, each on
/// a thread of its own (so memory holds up to this many segments more than the cache).
pub(crate) const READ_AHEAD: usize = 2;
/// Bytes of a frame's content decompressed when only its start is needed.
const PREFIX: usize = 128 << 10;

/// How an archive opened for random access is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Packing {
    /// A plain archive file.
    Plain,
    /// Seekable zstd.
    SeekableZstd {
        /// zstd frames the seek table lists.
        frames: u64,
        /// Bytes of the compressed file.
        compressed_len: u64,
    },
    /// One zstd stream as `zstd` (and so Proxmox's vzdump) writes it, read through a
    /// sidecar index (see [`crate::zstd_index`]).
    IndexedZstd {
        /// Segments the index lists.
        segments: u64,
        /// Bytes of the compressed file.
        compressed_len: u64,
        /// Bytes of the sidecar index.
        index_len: u64,
    },
    /// lzop (`.vma.lzo`), indexed by its block headers.
    Lzop {
        /// lzop blocks in the file.
        blocks: u64,
        /// Bytes of the compressed file.
        compressed_len: u64,
    },
}

/// Archive bytes at any offset.
pub(crate) enum Source {
    Plain { file: Bytes, len: u64 },
    Zstd(Box<ZstdSource>),
    Lzop(Box<LzopSource>),
    Indexed(Box<IndexedSource>),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Plain { len, .. } => write!(f, "Plain({len} bytes)"),
            Source::Zstd(z) => write!(f, "SeekableZstd({} frames)", z.index.frames()),
            Source::Lzop(l) => write!(f, "Lzop({} blocks)", l.index.blocks()),
            Source::Indexed(x) => write!(f, "IndexedZstd({} segments)", x.inner.index.segments()),
        }
    }
}

impl Source {
    /// The source of an archive file: seekable zstd if it starts like zstd, lzop if it
    /// starts like lzop, else plain. A zstd file without a seek table is
    /// [`Error::NotSeekable`].
    pub(crate) fn open(file: Bytes) -> Result<Source> {
        let len = file
            .size()
            .map_err(|source| Error::Read { offset: 0, source })?;
        let mut magic = [0u8; LZOP_MAGIC.len()];
        let head = (len as usize).min(magic.len());
        read_file(&*file, &mut magic[..head], 0)?;
        if magic[..head].starts_with(&ZSTD_FRAME_MAGIC) {
            ZstdSource::open(file, len).map(|z| Source::Zstd(Box::new(z)))
        } else if magic == LZOP_MAGIC {
            LzopSource::open(file, len).map(|l| Source::Lzop(Box::new(l)))
        } else {
            Ok(Source::Plain { file, len })
        }
    }

    /// The source of a zstd file read through its sidecar index `index`, which is checked
    /// against the file (see [`ZstdIndex::from_file`]).
    pub(crate) fn with_index(file: Bytes, index: File) -> Result<Source> {
        let zindex = ZstdIndex::from_file(&index, &*file).map_err(zindex_error)?;
        let headers = match zindex.header_section() {
            None => Vec::new(),
            Some((at, len)) => {
                let mut stored = vec![0u8; len as usize];
                FileExt::read_exact_at(&index, &mut stored, at).map_err(|source| {
                    zindex_error(ZstdIndexError::IndexIo {
                        index_offset: at,
                        source,
                    })
                })?;
                crate::zstd_index::parse_headers(&stored, at, zindex.content_len())
                    .map_err(zindex_error)?
            }
        };
        Ok(Source::Indexed(Box::new(IndexedSource::new(
            file, index, zindex, headers, false,
        ))))
    }

    /// [`with_index`](Self::with_index) of an index without stored header reads, keeping
    /// a copy of every read ([`take_recorded`](Self::take_recorded)).
    pub(crate) fn with_index_recording(file: Bytes, index: File) -> Result<Source> {
        let zindex = ZstdIndex::from_file(&index, &*file).map_err(zindex_error)?;
        Ok(Source::Indexed(Box::new(IndexedSource::new(
            file,
            index,
            zindex,
            Vec::new(),
            true,
        ))))
    }

    /// The reads a recording source made, in order.
    pub(crate) fn take_recorded(&self) -> Vec<(u64, Vec<u8>)> {
        match self {
            Source::Indexed(x) => x.record.as_ref().map_or(Vec::new(), |r| {
                std::mem::take(&mut *r.lock().unwrap_or_else(PoisonError::into_inner))
            }),
            _ => Vec::new(),
        }
    }

    /// Opening is over: header reads kept for it are dropped.
    pub(crate) fn opened(&self) {
        if let Source::Indexed(x) = self {
            x.headers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }

    /// Bytes of the (decompressed) archive.
    pub(crate) fn len(&self) -> u64 {
        match self {
            Source::Plain { len, .. } => *len,
            Source::Zstd(z) => z.index.content_len(),
            Source::Lzop(l) => l.index.content_len(),
            Source::Indexed(x) => x.inner.index.content_len(),
        }
    }

    pub(crate) fn packing(&self) -> Packing {
        match self {
            Source::Plain { .. } => Packing::Plain,
            Source::Zstd(z) => Packing::SeekableZstd {
                frames: z.index.frames() as u64,
                compressed_len: z.file_len,
            },
            Source::Lzop(l) => Packing::Lzop {
                blocks: l.index.blocks() as u64,
                compressed_len: l.index.compressed_len(),
            },
            Source::Indexed(x) => Packing::IndexedZstd {
                segments: x.inner.index.segments() as u64,
                compressed_len: x.inner.index.compressed_len(),
                index_len: x.inner.index.index_len(),
            },
        }
    }

    /// Bytes of memory held beyond the file: the frame (or block) index and the cache.
    pub(crate) fn memory(&self) -> usize {
        match self {
            Source::Plain { .. } => 0,
            Source::Zstd(z) => z.index.memory() + z.cache.bytes(),
            Source::Lzop(l) => l.index.memory() + l.cache.bytes(),
            Source::Indexed(x) => x.inner.index.memory() + x.inner.cache.bytes(),
        }
    }

    /// For an archive read through a sidecar index, reads every segment's compressed bytes
    /// and checks them against the index's CRC32Cs (nothing is decompressed); other
    /// sources have nothing to check beyond what reading them checks.
    pub(crate) fn check_unchanged(&self) -> Result<()> {
        let Source::Indexed(x) = self else {
            return Ok(());
        };
        let inner = &x.inner;
        let mut compressed = Vec::new();
        for n in 0..inner.index.segments() {
            let s = *inner.index.segment(n).expect("a segment of the index");
            compressed.resize(s.compressed_len as usize, 0);
            read_file(&*inner.file, &mut compressed, s.compressed_offset)?;
            inner
                .index
                .check_segment(n, &compressed)
                .map_err(zindex_error)?;
        }
        Ok(())
    }

    /// Fills `buf` from archive offset `offset`; the archive must hold all of it.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Source::Plain { file, .. } => file
                .read_exact_at(buf, offset)
                .map_err(|source| Error::Read { offset, source }),
            Source::Zstd(z) => z.read_exact_at(buf, offset),
            Source::Lzop(l) => l.read_exact_at(buf, offset),
            Source::Indexed(x) => x.read_exact_at(buf, offset),
        }
    }

    /// Reads what there is at `offset`, up to `buf.len()` bytes; 0 at the end.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let n = (buf.len() as u64).min(self.len().saturating_sub(offset)) as usize;
        self.read_exact_at(&mut buf[..n], offset)?;
        Ok(n)
    }
}

/// An I/O error for a source error, for `Read` and `read_at` callers: an OS error stays
/// itself, anything else (a damaged frame or block) is `InvalidData` carrying the error
/// (its message, and the error itself for [`from_io`]).
pub(crate) fn into_io(e: Error) -> io::Error {
    match e {
        Error::Read { source, .. } => source,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

/// The source error an [`into_io`] error carries, found again in an error of a reader
/// over a source; any other error unchanged.
pub(crate) fn from_io(e: Error) -> Error {
    match e {
        Error::Read { offset, source } => match source.get_ref().is_some_and(|i| i.is::<Error>()) {
            true => *source
                .into_inner()
                .expect("checked")
                .downcast::<Error>()
                .expect("checked"),
            false => Error::Read { offset, source },
        },
        other => other,
    }
}

/// A seekable zstd archive file.
pub(crate) struct ZstdSource {
    file: Bytes,
    file_len: u64,
    index: SeekIndex,
    cache: UnitCache,
}

impl ZstdSource {
    /// Opens a seekable zstd file of `file_len` bytes: reads and checks its seek table
    /// ([`Error::NotSeekable`] without one).
    pub(crate) fn open(file: Bytes, file_len: u64) -> Result<ZstdSource> {
        let table_err = |e: SeekTableError| match e {
            SeekTableError::NoFooter { stream_len } => Error::NotSeekable { stream_len },
            other => Error::SeekTable(other),
        };
        let tail = (vma_format::seek_table::FOOTER_SIZE as u64).min(file_len);
        let mut footer = vec![0u8; tail as usize];
        read_file(&*file, &mut footer, file_len - tail)?;
        let len = SeekIndex::table_len(&footer, file_len).map_err(table_err)?;
        let mut table = vec![0u8; len];
        read_file(&*file, &mut table, file_len - len as u64)?;
        let index = SeekIndex::parse(&table, file_len).map_err(table_err)?;
        Ok(ZstdSource {
            file,
            file_len,
            index,
            cache: UnitCache::new(FRAME_CACHE_BYTES),
        })
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let locate = |at| {
            let frame = self.index.frame_at(at)?;
            let span = self.index.frame(frame).expect("frame_at names a frame");
            Some((frame, span.offset, span.len))
        };
        read_units(buf, offset, locate, |frame, need| self.content(frame, need))
    }

    /// At least the first `need` bytes of a frame's content: from the cache, else
    /// decompressed (only its start when that is all that is needed) and cached. A frame
    /// is decompressed by one thread at a time: others that need it wait for it (an NBD
    /// client's parallel requests often fall into one frame).
    fn content(&self, frame: usize, need: usize) -> Result<Arc<Vec<u8>>> {
        self.cache.get(frame, need, || {
            let span = self.index.frame(frame).expect("a frame of the index");
            if need <= PREFIX && span.len as usize > 2 * PREFIX {
                self.decompress_prefix(frame, PREFIX)
            } else {
                self.decompress(frame)
            }
        })
    }

    /// The frame index of the seek table.
    pub(crate) fn index(&self) -> &SeekIndex {
        &self.index
    }

    fn frame_error(&self, frame: usize, reason: impl Into<String>) -> Error {
        let span = self.index.frame(frame).expect("a frame of the index");
        Error::Frame {
            frame: frame as u64,
            offset: span.compressed_offset,
            reason: reason.into(),
        }
    }

    /// The whole content of a frame, checked against the seek table (and against the
    /// frame's checksum, by zstd, when it carries one).
    fn decompress(&self, frame: usize) -> Result<Vec<u8>> {
        let mut content = Vec::new();
        self.decompress_into(frame, &mut Vec::new(), &mut content)?;
        Ok(content)
    }

    /// [`decompress`](Self::decompress) into buffers the caller keeps for the next frame:
    /// `compressed` for the frame's bytes, `content` (emptied first) for its content.
    pub(crate) fn decompress_into(
        &self,
        frame: usize,
        compressed: &mut Vec<u8>,
        content: &mut Vec<u8>,
    ) -> Result<()> {
        let span = self.index.frame(frame).expect("a frame of the index");
        compressed.resize(span.compressed_len as usize, 0);
        read_file(&*self.file, compressed, span.compressed_offset)?;
        // The frame header's own content size (our writer records it), against the table.
        if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(compressed) {
            if n != u64::from(span.len) {
                return Err(self.frame_error(
                    frame,
                    format!("holds {n} bytes, the seek table says {}", span.len),
                ));
            }
        }
        content.clear();
        content.reserve(span.len as usize);
        let mut decompressor = zstd::bulk::Decompressor::new()
            .map_err(|e| self.frame_error(frame, format!("zstd: {e}")))?;
        decompressor
            .decompress_to_buffer(&compressed[..], content)
            .map_err(|e| self.frame_error(frame, format!("does not decompress: {e}")))?;
        if content.len() != span.len as usize {
            return Err(self.frame_error(
                frame,
                format!(
                    "holds {} bytes, the seek table says {}",
                    content.len(),
                    span.len
                ),
            ));
        }
        Ok(())
    }

    /// The first `len` bytes of a frame's content, decompressing (and reading) no more of
    /// the frame than that takes. The frame's checksum is not checked (the whole frame is
    /// not read); the whole-frame reads of the data do check it.
    fn decompress_prefix(&self, frame: usize, len: usize) -> Result<Vec<u8>> {
        let span = self.index.frame(frame).expect("a frame of the index");
        let compressed = FileRange {
            file: &*self.file,
            at: span.compressed_offset,
            end: span.compressed_offset + span.compressed_len as u64,
        };
        let mut decoder = zstd::stream::read::Decoder::new(compressed)
            .map_err(|e| self.frame_error(frame, format!("zstd: {e}")))?
            .single_frame();
        let mut content = vec![0u8; len];
        decoder
            .read_exact(&mut content)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => self.frame_error(
                    frame,
                    format!(
                        "holds fewer than the {} bytes the seek table says",
                        span.len
                    ),
                ),
                _ if e.get_ref().is_some_and(|inner| inner.is::<ReadError>()) => {
                    let inner = e.into_inner().expect("checked").downcast::<ReadError>();
                    let ReadError(offset, source) = *inner.expect("checked");
                    Error::Read { offset, source }
                }
                _ => self.frame_error(frame, format!("does not decompress: {e}")),
            })?;
        Ok(content)
    }
}

/// An lzop archive file, indexed by its block headers.
pub(crate) struct LzopSource {
    file: Bytes,
    index: LzopIndex,
    cache: UnitCache,
}

impl LzopSource {
    fn open(file: Bytes, file_len: u64) -> Result<LzopSource> {
        let whole = FileRange {
            file: &*file,
            at: 0,
            end: file_len,
        };
        let index = LzopIndex::scan(BufReader::new(whole), file_len).map_err(lzop_error)?;
        Ok(LzopSource {
            file,
            index,
            cache: UnitCache::new(FRAME_CACHE_BYTES),
        })
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let locate = |at| {
            let n = self.index.block_at(at)?;
            let b = self.index.block(n).expect("block_at names a block");
            Some((n, b.offset, b.len))
        };
        read_units(buf, offset, locate, |n, _| {
            self.cache.get(n, 0, || {
                let b = self.index.block(n).expect("a block of the index");
                let mut bytes = vec![0u8; b.file_len() as usize];
                read_file(&*self.file, &mut bytes, b.header_offset)?;
                self.index.decode(n, &bytes).map_err(lzop_error)
            })
        })
    }
}

/// A zstd file read through a sidecar index: a unit of the cache is a segment (about
/// one job of zstd's multi-threaded compressor, 8 MiB at level 3, at most
/// [`crate::zstd_index::MAX_SEGMENT`]), decoded from its compressed bytes (their CRC32C
/// checked) and its prefix (read from the sidecar). Read sequentially (the segment after
/// the one read last, or the same again), the next [`READ_AHEAD`] segments are decoded
/// ahead on other threads: a segment cannot be decoded from its middle, so opening (which
/// walks the extent headers, spread over every segment) and `cat` or `qemu-img convert`
/// decode every segment, and that is their cost.
/// Reads of the archive: offset and bytes.
type Reads = Vec<(u64, Vec<u8>)>;

pub(crate) struct IndexedSource {
    inner: Arc<Indexed>,
    /// Header reads stored in the sidecar (`vma index` stores them), served while opening.
    headers: Mutex<Reads>,
    /// Every read, when recording them.
    record: Option<Mutex<Reads>>,
}

struct Indexed {
    file: Bytes,
    sidecar: File,
    index: ZstdIndex,
    cache: UnitCache,
    /// The segment read last (`usize::MAX`: none yet).
    last: AtomicUsize,
    /// Segments being decoded ahead.
    ahead: AtomicUsize,
}

impl Indexed {
    fn load(&self, n: usize) -> Result<Vec<u8>> {
        let s = *self.index.segment(n).expect("a segment of the index");
        let mut compressed = vec![0u8; s.compressed_len as usize];
        read_file(&*self.file, &mut compressed, s.compressed_offset)?;
        let mut prefix = vec![0u8; s.prefix_stored_len as usize];
        FileExt::read_exact_at(&self.sidecar, &mut prefix, s.prefix_offset).map_err(|source| {
            zindex_error(ZstdIndexError::IndexIo {
                index_offset: s.prefix_offset,
                source,
            })
        })?;
        self.index
            .decode(n, &compressed, &prefix)
            .map_err(zindex_error)
    }
}

impl IndexedSource {
    fn new(
        file: Bytes,
        sidecar: File,
        index: ZstdIndex,
        headers: Vec<(u64, Vec<u8>)>,
        record: bool,
    ) -> IndexedSource {
        IndexedSource {
            headers: Mutex::new(headers),
            record: record.then(|| Mutex::new(Vec::new())),
            inner: Arc::new(Indexed {
                file,
                sidecar,
                index,
                cache: UnitCache::new(FRAME_CACHE_BYTES),
                last: AtomicUsize::new(usize::MAX),
                ahead: AtomicUsize::new(0),
            }),
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        {
            let headers = self.headers.lock().unwrap_or_else(PoisonError::into_inner);
            let i = headers.partition_point(|(o, _)| *o <= offset);
            if let Some((o, bytes)) = i.checked_sub(1).map(|i| &headers[i]) {
                let within = (offset - o) as usize;
                if within + buf.len() <= bytes.len() {
                    buf.copy_from_slice(&bytes[within..within + buf.len()]);
                    return Ok(());
                }
            }
        }
        self.read_segments(buf, offset)?;
        if let Some(record) = &self.record {
            let mut r = record.lock().unwrap_or_else(PoisonError::into_inner);
            r.push((offset, buf.to_vec()));
        }
        Ok(())
    }

    fn read_segments(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inner = &self.inner;
        let locate = |at| {
            let n = inner.index.segment_at(at)?;
            let s = inner.index.segment(n).expect("segment_at names a segment");
            Some((n, s.offset, s.len))
        };
        read_units(buf, offset, locate, |n, _| {
            self.read_ahead(n);
            inner.cache.get(n, 0, || inner.load(n))
        })
    }

    /// Decodes the [`READ_AHEAD`] segments after `n` on other threads if `n` is read
    /// sequentially (after `n - 1`, or again), at most [`READ_AHEAD`] at a time. Their
    /// errors are left to the read that needs them (nothing is cached then).
    fn read_ahead(&self, n: usize) {
        let inner = &self.inner;
        let prev = inner.last.swap(n, Ordering::Relaxed);
        if prev != n && prev.wrapping_add(1) != n {
            return;
        }
        for next in n + 1..(n + 1 + READ_AHEAD).min(inner.index.segments()) {
            if inner.cache.has(next) {
                continue;
            }
            if inner.ahead.fetch_add(1, Ordering::AcqRel) >= READ_AHEAD {
                inner.ahead.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            let worker = Arc::clone(inner);
            let spawned = std::thread::Builder::new()
                .name("vma-zstd-ahead".into())
                .spawn(move || {
                    let _ = worker.cache.get(next, 0, || worker.load(next));
                    worker.ahead.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                inner.ahead.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        }
    }
}

/// A sidecar index error as this crate's: a failing read of the archive stays a read
/// error.
pub(crate) fn zindex_error(e: ZstdIndexError) -> Error {
    match e {
        ZstdIndexError::Io { offset, source } => Error::Read { offset, source },
        other => Error::ZstdIndex(other),
    }
}

/// An lzop error as this crate's: a failing read stays a read error.
fn lzop_error(e: crate::lzop::LzopError) -> Error {
    match e {
        crate::lzop::LzopError::Io { offset, source } => Error::Read { offset, source },
        other => Error::Lzop(other),
    }
}

fn read_file(file: &dyn ReadAt, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset)
        .map_err(|source| Error::Read { offset, source })
}

/// An OS error reading the compressed file, kept apart from the decompressor's own.
#[derive(Debug)]
struct ReadError(u64, io::Error);

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reading at byte {}: {}", self.0, self.1)
    }
}

impl std::error::Error for ReadError {}

/// A range of a file as a `Read`, by positional reads.
struct FileRange<'f> {
    file: &'f dyn ReadAt,
    at: u64,
    end: u64,
}

impl io::Seek for FileRange<'_> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        let to = match pos {
            io::SeekFrom::Start(n) => Some(n),
            io::SeekFrom::Current(d) => self.at.checked_add_signed(d),
            io::SeekFrom::End(d) => self.end.checked_add_signed(d),
        };
        self.at = to
            .filter(|&n| n <= self.end)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek outside the file"))?;
        Ok(self.at)
    }
}

impl Read for FileRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.end - self.at) as usize;
        self.file
            .read_exact_at(&mut buf[..n], self.at)
            .map_err(|e| io::Error::new(e.kind(), ReadError(self.at, e)))?;
        self.at += n as u64;
        Ok(n)
    }
}
