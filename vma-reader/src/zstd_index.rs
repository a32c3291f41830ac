//! Random access into a `.vma.zst` as Proxmox writes it (`zstd --rsyncable --threads=N`:
//! one zstd frame, no seek table), through a sidecar index built by one pass ([`build`]).
//!
//! zstd's multi-threaded compressor cuts its input into jobs (8 MiB at level 3) and
//! compresses each job after the first with a fresh context: entropy tables and repeat
//! offsets reset, and only a raw prefix of the data before the job (the "overlap", 256 KiB
//! at level 3) as history. Job boundaries are block boundaries inside the one frame. So a
//! fresh decoder, given that prefix and a synthetic frame header (the frame's window, no
//! content size, no checksum) followed by the original blocks from a job's first block on,
//! decodes the rest of the job exactly. The index records such restart points, each one
//! verified while indexing: a second decoder started there reproduces, block by block,
//! everything the real decoder of the frame decodes up to the next restart point (and
//! the real decoder checks the frame's content checksum at its end). A point that was not
//! verified is never recorded.
//!
//! The prefix is handed to a restarted decoder as the content of raw blocks at the start
//! of the synthetic frame (output and discarded): to the decoder that is exactly a
//! prefix (raw content, repeat offsets at their initial values, no entropy tables), and
//! nothing is borrowed, so the decoder can live as long as the verification needs.
//! Candidates are screened first with `ZSTD_DCtx_refPrefix` on their first block, for
//! each prefix length of a ladder (0, window/8, window/4, window/2, window), shortest
//! first and at most an eighth of the distance from the current segment's start until
//! [`RESCUE_DISTANCE`]; the chosen length is then verified by the raw-block decoder, the
//! one readers use.
//!
//! The sidecar layout is in `spec/FORMAT.md` ("Sidecar index of a stock .vma.zst"):
//! a 16-byte header, each prefix stored as its own zstd frame, a table of 48 bytes per
//! segment, and a 64-byte trailer. Opening reads only the header, the table and the
//! trailer ([`ZstdIndex::from_file`]); prefixes are read on demand with positional reads.

use std::fs::File;

use crate::read_at::ReadAt;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use byteorder::{ByteOrder, LittleEndian as LE};
use zstd::zstd_safe::{self, DCtx, InBuffer, OutBuffer, ResetDirective};

/// The magic a sidecar index starts with.
pub const INDEX_MAGIC: [u8; 8] = *b"VMAZIDX\0";
/// The version of the sidecar layout this crate writes and reads.
pub const INDEX_VERSION: u32 = 1;
/// Bytes of the sidecar's header.
pub const HEADER_SIZE: u64 = 16;
/// Bytes of the sidecar's trailer.
pub const TRAILER_SIZE: u64 = 64;
/// Bytes of one segment's entry in the table.
pub const ENTRY_SIZE: u64 = 48;
/// The magic ending the trailer.
const TRAILER_MAGIC: [u8; 4] = *b"ZIDX";
/// Content a segment holds, at least, before a new restart point is tried: restart
/// points come at job boundaries (8 MiB apart at level 3, 32 MiB at level 19), so
/// segments are one job each, a unit the reader's cache keeps a few of.
pub const TARGET_SEGMENT: u64 = 4 << 20;
/// The most content a segment may hold (the bound of a decompressed unit in memory):
/// an archive with longer stretches without a restart point (`zstd --single-thread`
/// output has none at all) cannot be indexed.
pub const MAX_SEGMENT: u64 = crate::source::MAX_FRAME_CONTENT as u64;
/// The most compressed bytes a segment may take (zstd's blocks take at most a few bytes
/// more than their content; this bounds what reading a segment allocates).
pub const MAX_COMPRESSED_SEGMENT: u64 = 2 * MAX_SEGMENT;
/// Distance from a segment's start from which a restart point may need any prefix: before,
/// a prefix may be at most an eighth of the distance. zstd's real job boundaries need
/// only the overlap (a window/8 at level 3, 256 KiB every 8 MiB), while inside a job a
/// block decodes from a fresh decoder, if at all, only with the whole window as prefix
/// (single-threaded output too): such points, verified all the same, are taken only
/// when no job boundary came for 16 MiB, so they do not crowd out cheaper ones.
pub const RESCUE_DISTANCE: u64 = MAX_SEGMENT / 4;
/// The largest window an indexed frame may have (`windowLog` 24): zstd's jobs are four
/// windows long, so a larger window means segments over [`MAX_SEGMENT`] anyway.
pub const MAX_WINDOW: u64 = 16 << 20;
/// zstd's largest block content.
const MAX_BLOCK: usize = 128 << 10;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Level the prefixes are stored at.
const PREFIX_LEVEL: i32 = 3;

/// What can be wrong building or reading a sidecar index. Offsets say which file:
/// `offset` of the compressed archive, `index_offset` of the sidecar.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZstdIndexError {
    /// The compressed file is not a well-formed zstd stream at this offset.
    #[error("zstd stream at byte {offset}: {what}")]
    Stream {
        /// Where in the compressed file.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The zstd decoder rejects the stream (damage, or a failing content checksum).
    #[error("zstd stream at byte {offset} does not decompress: {what}")]
    Decode {
        /// Offset of the block (or checksum) being decoded.
        offset: u64,
        /// zstd's error.
        what: String,
    },
    /// The compressed file ends early.
    #[error("zstd stream is truncated at byte {offset}")]
    Truncated {
        /// Where it ended.
        offset: u64,
    },
    /// The stream has no restart point often enough to be indexed.
    #[error(
        "zstd stream at byte {offset} cannot be indexed: {what}; make it seekable \
         (vma recompress ARCHIVE.vma.zst SEEKABLE.vma.zst) or decompress it \
         (zstd -d -o ARCHIVE.vma ARCHIVE.vma.zst)"
    )]
    CannotIndex {
        /// Offset of the stretch that has no restart point.
        offset: u64,
        /// Why.
        what: String,
    },
    /// Reading the compressed file failed.
    #[error("reading the zstd stream at byte {offset}: {source}")]
    Io {
        /// Where the read was.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing the sidecar failed.
    #[error("writing the index: {0}")]
    Write(#[source] io::Error),
    /// Reading the sidecar failed.
    #[error("reading the index at byte {index_offset}: {source}")]
    IndexIo {
        /// Where in the sidecar.
        index_offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The sidecar is not a well-formed index (a lying or damaged one).
    #[error("index at byte {index_offset}: {what}")]
    BadIndex {
        /// Where in the sidecar.
        index_offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The sidecar indexes another file (or this one before it changed).
    #[error("the index is not of this archive: {what}; rebuild it with vma index")]
    OtherArchive {
        /// What differs.
        what: String,
    },
    /// A segment of the compressed file does not match its index entry or decode.
    #[error("zstd segment {segment} at compressed byte {offset}: {what}")]
    Segment {
        /// Segment number, from 0.
        segment: u64,
        /// Its offset in the compressed file.
        offset: u64,
        /// What is wrong.
        what: String,
    },
}

impl ZstdIndexError {
    /// Whether the error means the caller asked the impossible (an archive that cannot be
    /// indexed, an index of another archive) rather than damage or an I/O failure.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ZstdIndexError::CannotIndex { .. } | ZstdIndexError::OtherArchive { .. }
        )
    }

    /// Whether the error is the operating system's (reading or writing a file).
    pub fn is_io(&self) -> bool {
        matches!(
            self,
            ZstdIndexError::Io { .. } | ZstdIndexError::Write(_) | ZstdIndexError::IndexIo { .. }
        )
    }
}

type Result<T, E = ZstdIndexError> = std::result::Result<T, E>;

/// One segment of an index: a run of whole blocks of one frame a fresh decoder decodes
/// from its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Offset of its first block's header in the compressed file.
    pub compressed_offset: u64,
    /// Offset of its content in the decompressed archive.
    pub offset: u64,
    /// Offset of its stored (zstd-compressed) prefix in the sidecar.
    pub prefix_offset: u64,
    /// Bytes of its blocks in the compressed file.
    pub compressed_len: u32,
    /// Bytes of its content.
    pub len: u32,
    /// Bytes of the prefix (the content just before the segment) a decoder needs.
    pub prefix_len: u32,
    /// Bytes of the stored prefix in the sidecar (0 when `prefix_len` is 0).
    pub prefix_stored_len: u32,
    /// CRC32C of its compressed bytes.
    pub crc32c: u32,
    /// The frame's window descriptor byte, for the synthetic frame header.
    pub window_descriptor: u8,
}

impl Segment {
    fn encode(&self, out: &mut [u8]) {
        LE::write_u64(&mut out[0..], self.compressed_offset);
        LE::write_u64(&mut out[8..], self.offset);
        LE::write_u64(&mut out[16..], self.prefix_offset);
        LE::write_u32(&mut out[24..], self.compressed_len);
        LE::write_u32(&mut out[28..], self.len);
        LE::write_u32(&mut out[32..], self.prefix_len);
        LE::write_u32(&mut out[36..], self.prefix_stored_len);
        LE::write_u32(&mut out[40..], self.crc32c);
        out[44] = self.window_descriptor;
        out[45..48].fill(0);
    }

    fn decode(b: &[u8]) -> (Segment, [u8; 3]) {
        let s = Segment {
            compressed_offset: LE::read_u64(&b[0..]),
            offset: LE::read_u64(&b[8..]),
            prefix_offset: LE::read_u64(&b[16..]),
            compressed_len: LE::read_u32(&b[24..]),
            len: LE::read_u32(&b[28..]),
            prefix_len: LE::read_u32(&b[32..]),
            prefix_stored_len: LE::read_u32(&b[36..]),
            crc32c: LE::read_u32(&b[40..]),
            window_descriptor: b[44],
        };
        (s, [b[45], b[46], b[47]])
    }
}

/// The window size a window descriptor byte gives.
pub fn window_size(descriptor: u8) -> u64 {
    let base = 1u64 << (10 + (descriptor >> 3));
    base + base / 8 * u64::from(descriptor & 7)
}

/// The smallest window descriptor whose window holds `size` bytes (for single-segment
/// frames, whose window is their content size).
fn descriptor_for(size: u64) -> Option<u8> {
    (0..=255u8).find(|&d| window_size(d) >= size)
}

/// What [`build`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSummary {
    /// Segments in the index.
    pub segments: u64,
    /// Bytes of the decompressed archive.
    pub content_len: u64,
    /// Bytes of the compressed file.
    pub compressed_len: u64,
    /// Bytes of the sidecar written.
    pub index_len: u64,
    /// zstd frames in the file.
    pub frames: u64,
    /// Content bytes of each segment, in order.
    pub segment_lens: Vec<u32>,
}

/// A reader that counts what it has read and keeps its last 4 bytes.
struct Counted<R> {
    inner: R,
    pos: u64,
    tail: [u8; 4],
}

impl<R: Read> Counted<R> {
    /// Fills `buf`; `Ok(false)` if the input ends before its first byte and `eof_ok`.
    fn fill(&mut self, buf: &mut [u8], eof_ok: bool) -> Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) if done == 0 && eof_ok => return Ok(false),
                Ok(0) => return Err(ZstdIndexError::Truncated { offset: self.pos }),
                Ok(n) => {
                    done += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ZstdIndexError::Io {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
        let keep = buf.len().min(4);
        self.tail.rotate_left(keep);
        self.tail[4 - keep..].copy_from_slice(&buf[buf.len() - keep..]);
        Ok(true)
    }
}

fn zstd_err(code: usize) -> String {
    zstd_safe::get_error_name(code).to_string()
}

/// Feeds `input` to `d`, handing all the output to `sink`; returns zstd's hint (0 when
/// the frame ended). Input left after the frame's end is an error.
fn feed(
    d: &mut DCtx<'_>,
    input: &[u8],
    scratch: &mut [u8],
    sink: &mut dyn FnMut(&[u8]) -> std::result::Result<(), String>,
) -> std::result::Result<usize, String> {
    let mut inb = InBuffer::around(input);
    loop {
        let mut outb = OutBuffer::around(scratch);
        let hint = d.decompress_stream(&mut outb, &mut inb).map_err(zstd_err)?;
        let n = outb.pos();
        sink(&scratch[..n])?;
        if n < scratch.len() {
            if inb.pos() == input.len() {
                return Ok(hint);
            }
            if hint == 0 {
                return Err("data follows the end of the frame".into());
            }
        }
    }
}

/// The synthetic frame header of a restarted decoder: no content size, no checksum, no
/// dictionary, not single-segment, and the frame's window.
fn synthetic_header(window_descriptor: u8) -> [u8; 6] {
    let m = ZSTD_MAGIC;
    [m[0], m[1], m[2], m[3], 0x00, window_descriptor]
}

/// A decoder restarted at a segment: a synthetic frame whose first blocks are raw blocks
/// holding the prefix (output and discarded), followed by the segment's original blocks.
pub(crate) struct SegmentDecoder {
    d: DCtx<'static>,
    scratch: Vec<u8>,
}

impl SegmentDecoder {
    pub(crate) fn new(
        window_descriptor: u8,
        prefix: &[u8],
    ) -> std::result::Result<SegmentDecoder, String> {
        let mut d = DCtx::try_create().ok_or("zstd cannot create a decoder")?;
        let window = window_size(window_descriptor);
        if window > MAX_WINDOW {
            return Err(format!("window of {window} bytes"));
        }
        // The decoder refuses windows over 128 MiB by default; ours are at most 16 MiB.
        let mut scratch = vec![0u8; 2 * MAX_BLOCK];
        let mut discarded = 0usize;
        let mut count = |b: &[u8]| {
            discarded += b.len();
            Ok(())
        };
        let mut input = Vec::with_capacity(6 + prefix.len() + prefix.len() / MAX_BLOCK * 3 + 3);
        input.extend_from_slice(&synthetic_header(window_descriptor));
        let chunk = (window as usize).min(MAX_BLOCK);
        for part in prefix.chunks(chunk) {
            let header = (part.len() as u32) << 3; // raw, not last
            input.extend_from_slice(&header.to_le_bytes()[..3]);
            input.extend_from_slice(part);
        }
        feed(&mut d, &input, &mut scratch, &mut count)?;
        if discarded != prefix.len() {
            return Err(format!(
                "the prefix decoded to {discarded} bytes, not {}",
                prefix.len()
            ));
        }
        Ok(SegmentDecoder { d, scratch })
    }

    /// Feeds whole blocks; their content is appended to `out`, which may grow to `limit`.
    pub(crate) fn feed(
        &mut self,
        blocks: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> std::result::Result<(), String> {
        let mut sink = |b: &[u8]| {
            if out.len() + b.len() > limit {
                return Err(format!("decodes to more than {limit} bytes"));
            }
            out.extend_from_slice(b);
            Ok(())
        };
        feed(&mut self.d, blocks, &mut self.scratch, &mut sink).map(|_| ())
    }
}

/// Whether a fresh decoder, with `prefix` referenced as history, decodes `block` (whole,
/// header included) of a frame with this window to exactly `want`.
fn screens<'a>(d: &mut DCtx<'a>, prefix: &'a [u8], wd: u8, block: &[u8], want: &[u8]) -> bool {
    if d.reset(ResetDirective::SessionOnly).is_err() || d.ref_prefix(prefix).is_err() {
        return false;
    }
    let mut input = Vec::with_capacity(6 + block.len());
    input.extend_from_slice(&synthetic_header(wd));
    input.extend_from_slice(block);
    let mut scratch = vec![0u8; 2 * MAX_BLOCK];
    let mut at = 0usize;
    let mut sink = |b: &[u8]| {
        if want.get(at..at + b.len()) != Some(b) {
            return Err(String::new());
        }
        at += b.len();
        Ok(())
    };
    feed(d, &input, &mut scratch, &mut sink).is_ok() && at == want.len()
}

/// The last bytes of the content decoded so far.
struct History {
    buf: Vec<u8>,
    keep: usize,
}

impl History {
    fn push(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
        if self.buf.len() > 2 * self.keep + MAX_BLOCK {
            let cut = self.buf.len() - self.keep;
            self.buf.drain(..cut);
        }
    }

    fn tail(&self, n: usize) -> &[u8] {
        &self.buf[self.buf.len() - n.min(self.buf.len())..]
    }
}

/// A segment whose start is fixed, its verifier running.
struct Open {
    compressed_offset: u64,
    offset: u64,
    prefix: Vec<u8>,
    verifier: SegmentDecoder,
    /// Compressed bytes and CRC32C of its blocks so far.
    compressed_len: u64,
    crc: u32,
    /// Its blocks' content so far.
    len: u64,
}

impl Open {
    fn start(
        compressed_offset: u64,
        offset: u64,
        wd: u8,
        prefix: Vec<u8>,
    ) -> std::result::Result<Open, String> {
        let verifier = SegmentDecoder::new(wd, &prefix)?;
        Ok(Open {
            compressed_offset,
            offset,
            prefix,
            verifier,
            compressed_len: 0,
            crc: 0,
            len: 0,
        })
    }

    /// Where it ends if it ends now.
    fn cut(&self) -> Cut {
        Cut {
            compressed_len: self.compressed_len,
            crc: self.crc,
            len: self.len,
        }
    }

    /// Feeds a block to the verifier: whether it decodes to `want`.
    fn verify(&mut self, block: &[u8], want: &[u8], out: &mut Vec<u8>) -> bool {
        out.clear();
        let ok = self.verifier.feed(block, out, want.len()).is_ok() && out[..] == *want;
        self.compressed_len += block.len() as u64;
        self.crc = crc32c::crc32c_append(self.crc, block);
        self.len += want.len() as u64;
        ok
    }
}

/// Where an open segment ends when the candidate after it is accepted: its state just
/// before the candidate's first block.
#[derive(Clone, Copy)]
struct Cut {
    compressed_len: u64,
    crc: u32,
    len: u64,
}

/// The sidecar being written.
struct Out<W> {
    w: W,
    pos: u64,
    table: Vec<u8>,
    lens: Vec<u32>,
    cctx: zstd_safe::CCtx<'static>,
}

impl<W: Write> Out<W> {
    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b).map_err(ZstdIndexError::Write)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Records a finished segment (its prefix written now).
    fn segment(&mut self, s: &Open, cut: Cut, wd: u8) -> Result<()> {
        if cut.len == 0 {
            return Ok(()); // Only empty blocks: nothing to read there.
        }
        let prefix_offset = self.pos;
        let mut stored = 0;
        if !s.prefix.is_empty() {
            let mut buf = vec![0u8; zstd_safe::compress_bound(s.prefix.len())];
            let n = self
                .cctx
                .compress(&mut buf[..], &s.prefix, PREFIX_LEVEL)
                .map_err(|c| ZstdIndexError::Write(io::Error::other(zstd_err(c))))?;
            self.write(&buf[..n])?;
            stored = n as u32;
        }
        let seg = Segment {
            compressed_offset: s.compressed_offset,
            offset: s.offset,
            prefix_offset,
            compressed_len: cut.compressed_len as u32,
            len: cut.len as u32,
            prefix_len: s.prefix.len() as u32,
            prefix_stored_len: stored,
            crc32c: cut.crc,
            window_descriptor: wd,
        };
        let mut e = [0u8; ENTRY_SIZE as usize];
        seg.encode(&mut e);
        self.table.extend_from_slice(&e);
        self.lens.push(seg.len);
        Ok(())
    }
}

/// One frame's parameters.
struct FrameInfo {
    wd: u8,
    window: u64,
    checksum: bool,
    /// The content size its header declares, if it declares one.
    content_size: Option<u64>,
}

/// Reads a frame header after its magic (at `start`); feeds it to `truth`.
fn frame_header<R: Read>(
    r: &mut Counted<R>,
    start: u64,
    truth: &mut DCtx<'_>,
    scratch: &mut [u8],
) -> Result<FrameInfo> {
    let bad = |what: String| ZstdIndexError::Stream {
        offset: start,
        what,
    };
    let mut fhd = [0u8; 1];
    r.fill(&mut fhd, false)?;
    let fhd = fhd[0];
    if fhd & 0x08 != 0 {
        return Err(bad("frame header's reserved bit is set".into()));
    }
    let single = fhd & 0x20 != 0;
    let did_len = [0, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_len = match fhd >> 6 {
        0 => usize::from(single),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let mut rest = [0u8; 1 + 4 + 8];
    let n = usize::from(!single) + did_len + fcs_len;
    r.fill(&mut rest[..n], false)?;
    let did = &rest[usize::from(!single)..usize::from(!single) + did_len];
    if did.iter().any(|&b| b != 0) {
        return Err(bad("the frame needs a dictionary".into()));
    }
    let fcs = &rest[n - fcs_len..n];
    let content_size = (fcs_len > 0).then(|| {
        let mut v = [0u8; 8];
        v[..fcs_len].copy_from_slice(fcs);
        u64::from_le_bytes(v) + if fcs_len == 2 { 256 } else { 0 }
    });
    let (wd, window) = if let (true, Some(size)) = (single, content_size) {
        let wd = descriptor_for(size.max(1 << 10)).unwrap_or(u8::MAX);
        (wd, size)
    } else {
        (rest[0], window_size(rest[0]))
    };
    if window_size(wd) > MAX_WINDOW {
        return Err(ZstdIndexError::CannotIndex {
            offset: start,
            what: format!(
                "its window of {window} bytes is over {MAX_WINDOW} (zstd's jobs, four \
                 windows each, would be segments larger than {MAX_SEGMENT} bytes)"
            ),
        });
    }
    let mut header = Vec::with_capacity(18);
    header.extend_from_slice(&ZSTD_MAGIC);
    header.push(fhd);
    header.extend_from_slice(&rest[..n]);
    feed(truth, &header, scratch, &mut |_| Ok(())).map_err(|what| ZstdIndexError::Decode {
        offset: start,
        what,
    })?;
    Ok(FrameInfo {
        wd,
        window,
        checksum: fhd & 0x04 != 0,
        content_size,
    })
}

/// Indexes the zstd file `input` (read once, from its start, to its end) and writes the
/// sidecar to `out`. Memory: the real decoder, up to two verifying decoders and the last
/// 2 windows of content (with a 2 MiB window, 27 MB of peak RSS measured for all of
/// `vma index`), plus 48 bytes per segment for the table. See the module docs for the
/// method.
pub fn build<R: Read, W: Write>(input: R, out: W) -> Result<BuildSummary> {
    let mut r = Counted {
        inner: input,
        pos: 0,
        tail: [0; 4],
    };
    let mut out = Out {
        w: out,
        pos: 0,
        table: Vec::new(),
        lens: Vec::new(),
        cctx: zstd_safe::CCtx::try_create()
            .ok_or_else(|| ZstdIndexError::Write(io::Error::other("zstd cannot compress")))?,
    };
    let mut head = [0u8; HEADER_SIZE as usize];
    head[..8].copy_from_slice(&INDEX_MAGIC);
    LE::write_u32(&mut head[8..], INDEX_VERSION);
    out.write(&head)?;
    let mut content = 0u64;
    let mut frames = 0u64;
    loop {
        let start = r.pos;
        let mut magic = [0u8; 4];
        if !r.fill(&mut magic, true)? {
            break;
        }
        if magic == ZSTD_MAGIC {
            content = index_frame(&mut r, start, content, &mut out)?;
            frames += 1;
        } else if magic[0] & 0xf0 == 0x50 && magic[1..] == [0x2a, 0x4d, 0x18] {
            let mut size = [0u8; 4];
            r.fill(&mut size, false)?;
            let mut left = u64::from(u32::from_le_bytes(size));
            let mut buf = [0u8; 8192];
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                r.fill(&mut buf[..n], false)?;
                left -= n as u64;
            }
        } else {
            return Err(ZstdIndexError::Stream {
                offset: start,
                what: "neither a zstd frame nor a skippable frame starts here".into(),
            });
        }
    }
    if frames == 0 {
        return Err(ZstdIndexError::Stream {
            offset: r.pos,
            what: "the file holds no zstd frame".into(),
        });
    }
    let table_offset = out.pos;
    let table = std::mem::take(&mut out.table);
    out.write(&table)?;
    let mut t = [0u8; TRAILER_SIZE as usize];
    LE::write_u64(&mut t[0..], r.pos);
    t[8..12].copy_from_slice(&r.tail);
    LE::write_u64(&mut t[16..], content);
    LE::write_u64(&mut t[24..], table.len() as u64 / ENTRY_SIZE);
    LE::write_u64(&mut t[32..], table_offset);
    LE::write_u32(&mut t[40..], crc32c::crc32c(&table));
    // Bytes 44..56: the header section, which add_headers may add (none yet).
    let crc = crc32c::crc32c(&t[..56]);
    LE::write_u32(&mut t[56..], crc);
    t[60..].copy_from_slice(&TRAILER_MAGIC);
    out.write(&t)?;
    out.w.flush().map_err(ZstdIndexError::Write)?;
    Ok(BuildSummary {
        segments: table.len() as u64 / ENTRY_SIZE,
        content_len: content,
        compressed_len: r.pos,
        index_len: out.pos,
        frames,
        segment_lens: out.lens,
    })
}

/// Reads the block at `r.pos` (header and body) into `block`; whether it is the last.
fn read_block<R: Read>(r: &mut Counted<R>, block_max: usize, block: &mut Vec<u8>) -> Result<bool> {
    let boff = r.pos;
    let bad = |what: String| ZstdIndexError::Stream { offset: boff, what };
    let mut h = [0u8; 3];
    r.fill(&mut h, false)?;
    let h = u32::from(h[0]) | u32::from(h[1]) << 8 | u32::from(h[2]) << 16;
    let size = (h >> 3) as usize;
    let body = match (h >> 1) & 3 {
        // zstd calls an empty compressed block corrupt, but its streaming decoder, fed
        // block by block, takes the 0 bytes it then wants next for the frame's end.
        2 if size == 0 => return Err(bad("compressed block of 0 bytes".into())),
        0 | 2 => size,
        1 => 1,
        _ => return Err(bad("block of the reserved type 3".into())),
    };
    if size > block_max {
        return Err(bad(format!(
            "block of {size} bytes, more than the frame's maximum of {block_max}"
        )));
    }
    block.clear();
    block.extend_from_slice(&h.to_le_bytes()[..3]);
    block.resize(3 + body, 0);
    r.fill(&mut block[3..], false)?;
    Ok(h & 1 != 0)
}

/// The restart points of one frame, found block by block: the current segment `cur`
/// (its verifier running) and at most one candidate after it, with where `cur` ends if
/// the candidate is accepted.
struct FrameIndexer {
    wd: u8,
    ladder: Vec<usize>,
    history: History,
    cur: Option<Open>,
    cand: Option<(Open, Cut)>,
    /// Archive offset of the next block's content.
    content: u64,
    got: Vec<u8>,
}

impl FrameIndexer {
    /// Takes block `block` at compressed offset `boff`, which the real decoder decoded to
    /// `want`.
    fn block<W: Write>(
        &mut self,
        boff: u64,
        block: &[u8],
        want: &[u8],
        out: &mut Out<W>,
    ) -> Result<()> {
        let to_err = |what: String| ZstdIndexError::Decode { offset: boff, what };
        let content = self.content;
        match self.cur.as_ref() {
            None => {
                self.cur = Some(Open::start(boff, content, self.wd, Vec::new()).map_err(to_err)?)
            }
            Some(c)
                if self.cand.is_none()
                    && !want.is_empty()
                    && content - c.offset >= TARGET_SEGMENT =>
            {
                let cut = c.cut();
                let d = content - c.offset;
                self.cand = self.try_candidate(boff, block, want, d).map(|o| (o, cut));
            }
            Some(_) => {}
        }
        let c = self.cur.as_mut().expect("set above");
        let before = c.cut();
        let ok_cur = c.verify(block, want, &mut self.got);
        let ok_cand = match self.cand.as_mut() {
            Some((o, _)) => o.verify(block, want, &mut self.got),
            None => false,
        };
        if !ok_cand {
            self.cand = None;
        }
        if !ok_cur {
            // The current segment cannot go on: it ends where the candidate starts, or
            // here if a restart point verifies at this very block.
            let (next, cut) = match self.cand.take() {
                Some(oc) => oc,
                None => {
                    let mut got = std::mem::take(&mut self.got);
                    let o = (!want.is_empty())
                        .then(|| self.try_candidate(boff, block, want, MAX_SEGMENT))
                        .flatten()
                        .and_then(|mut o| o.verify(block, want, &mut got).then_some(o));
                    self.got = got;
                    let Some(o) = o else {
                        let c = self.cur.as_ref().expect("set");
                        return Err(ZstdIndexError::CannotIndex {
                            offset: boff,
                            what: format!(
                                "decoding from the restart point at byte {} diverges \
                                 here, and no restart point verifies here",
                                c.compressed_offset
                            ),
                        });
                    };
                    (o, before)
                }
            };
            out.segment(self.cur.as_ref().expect("set"), cut, self.wd)?;
            self.cur = Some(next);
        } else if self
            .cand
            .as_ref()
            .is_some_and(|(o, _)| o.len >= TARGET_SEGMENT)
        {
            let (next, cut) = self.cand.take().expect("checked");
            out.segment(self.cur.as_ref().expect("set"), cut, self.wd)?;
            self.cur = Some(next);
        }
        self.content += want.len() as u64;
        self.history.push(want);
        let c = self.cur.as_ref().expect("set");
        let open = self.cand.as_ref().map_or(c.cut(), |(_, cut)| *cut);
        if open.len > MAX_SEGMENT || open.compressed_len > MAX_COMPRESSED_SEGMENT {
            return Err(ZstdIndexError::CannotIndex {
                offset: c.compressed_offset,
                what: format!(
                    "no restart point within the {MAX_SEGMENT} bytes of content from here (a \
                     stream compressed with zstd --single-thread, or in one job, has none)"
                ),
            });
        }
        Ok(())
    }

    /// The frame ended, verified to its end: an open candidate is accepted.
    fn finish<W: Write>(mut self, out: &mut Out<W>) -> Result<u64> {
        let Some(mut c) = self.cur.take() else {
            return Ok(self.content);
        };
        if let Some((next, cut)) = self.cand.take() {
            out.segment(&c, cut, self.wd)?;
            c = next;
        }
        out.segment(&c, c.cut(), self.wd)?;
        Ok(self.content)
    }

    /// A restart point at this block (content at `self.content`, `distance` bytes after
    /// the current segment's start), if one screens with some prefix length of the ladder
    /// (the shortest that does) that the distance affords: at most an eighth of it, or any
    /// once it is [`RESCUE_DISTANCE`]. Its verifier is started but not yet fed the block.
    fn try_candidate(&self, boff: u64, block: &[u8], want: &[u8], distance: u64) -> Option<Open> {
        let mut d = DCtx::try_create()?;
        let mut tried = None;
        for &p in &self.ladder {
            if p as u64 > distance / 8 && distance < RESCUE_DISTANCE {
                break;
            }
            let p = p.min(self.history.buf.len());
            if tried == Some(p) {
                continue;
            }
            tried = Some(p);
            let prefix = self.history.tail(p);
            if screens(&mut d, prefix, self.wd, block, want) {
                return Open::start(boff, self.content, self.wd, prefix.to_vec()).ok();
            }
        }
        None
    }
}

/// Indexes one frame (its magic read, at `start`; its content starting at archive offset
/// `content`); returns the content offset after it.
fn index_frame<R: Read, W: Write>(
    r: &mut Counted<R>,
    start: u64,
    content: u64,
    out: &mut Out<W>,
) -> Result<u64> {
    let mut truth = DCtx::try_create().ok_or_else(|| ZstdIndexError::Decode {
        offset: start,
        what: "zstd cannot create a decoder".into(),
    })?;
    let mut scratch = vec![0u8; 2 * MAX_BLOCK];
    let info = frame_header(r, start, &mut truth, &mut scratch)?;
    let block_max = info.window.min(MAX_BLOCK as u64) as usize;
    let w = window_size(info.wd) as usize;
    let mut ladder = vec![0, w / 8, w / 4, w / 2, w];
    ladder.dedup();
    let mut ix = FrameIndexer {
        wd: info.wd,
        history: History {
            buf: Vec::new(),
            keep: w,
        },
        ladder,
        cur: None,
        cand: None,
        content,
        got: Vec::with_capacity(MAX_BLOCK),
    };
    let mut block = Vec::with_capacity(MAX_BLOCK + 3);
    let mut want = Vec::with_capacity(MAX_BLOCK);
    let mut decoded = 0u64;
    loop {
        let boff = r.pos;
        let last = read_block(r, block_max, &mut block)?;
        // The truth: the real decoder over the original frame.
        want.clear();
        let mut sink = |b: &[u8]| {
            want.extend_from_slice(b);
            Ok(())
        };
        feed(&mut truth, &block, &mut scratch, &mut sink)
            .map_err(|what| ZstdIndexError::Decode { offset: boff, what })?;
        decoded += want.len() as u64;
        ix.block(boff, &block, &want, out)?;
        if last {
            break;
        }
    }
    let end = r.pos;
    let decode_err = |what: String| ZstdIndexError::Decode { offset: end, what };
    // zstd's streaming decoder, fed block by block, does not compare the declared size
    // with what an empty last block ends (its one-shot decoder and `zstd -t` do).
    if let Some(declared) = info.content_size.filter(|&n| n != decoded) {
        return Err(decode_err(format!(
            "the frame declares {declared} bytes of content but holds {decoded}"
        )));
    }
    if info.checksum {
        let mut sum = [0u8; 4];
        r.fill(&mut sum, false)?;
        let hint = feed(&mut truth, &sum, &mut scratch, &mut |_| Ok(())).map_err(decode_err)?;
        if hint != 0 {
            return Err(decode_err(
                "the frame does not end after its checksum".into(),
            ));
        }
    }
    ix.finish(out)
}

/// A sidecar index, checked against its archive: the table of segments (48 bytes each,
/// held in memory; 60 000 segments for a 500 GB archive is under 3 MiB), prefixes left in
/// the sidecar until a segment is read.
#[derive(Debug, Clone)]
pub struct ZstdIndex {
    segments: Vec<Segment>,
    content_len: u64,
    archive_len: u64,
    index_len: u64,
    /// Where the stored header reads are in the sidecar, and their stored bytes.
    headers: Option<(u64, u32)>,
}

impl ZstdIndex {
    /// Reads and checks the sidecar `index` of the compressed file `archive`: its header,
    /// trailer and table (not the prefixes), which must describe `archive` (its length and
    /// last 4 bytes) and be consistent (segments contiguous in content, ascending and
    /// within the file in compressed bytes, prefixes within the sidecar).
    pub fn from_file(index: &File, archive: &dyn ReadAt) -> Result<ZstdIndex> {
        let archive_len = archive
            .size()
            .map_err(|source| ZstdIndexError::Io { offset: 0, source })?;
        let mut tail = [0u8; 4];
        if archive_len >= 4 {
            archive
                .read_exact_at(&mut tail, archive_len - 4)
                .map_err(|source| ZstdIndexError::Io {
                    offset: archive_len - 4,
                    source,
                })?;
        }
        let index_len = index
            .metadata()
            .map_err(|source| ZstdIndexError::IndexIo {
                index_offset: 0,
                source,
            })?
            .len();
        Self::parse(
            &mut |buf, at| FileExt::read_exact_at(index, buf, at),
            index_len,
            archive_len,
            tail,
        )
    }

    /// [`from_file`](Self::from_file) over a sidecar in memory, for an archive of
    /// `archive_len` bytes ending with `archive_tail`.
    pub fn from_bytes(index: &[u8], archive_len: u64, archive_tail: [u8; 4]) -> Result<ZstdIndex> {
        let mut read = |buf: &mut [u8], at: u64| {
            let src = usize::try_from(at)
                .ok()
                .and_then(|at| index.get(at..at.checked_add(buf.len())?))
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        };
        Self::parse(&mut read, index.len() as u64, archive_len, archive_tail)
    }

    fn parse(
        read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
        index_len: u64,
        archive_len: u64,
        archive_tail: [u8; 4],
    ) -> Result<ZstdIndex> {
        let bad = |index_offset: u64, what: String| ZstdIndexError::BadIndex { index_offset, what };
        let mut read_at = |buf: &mut [u8], at: u64| {
            read(buf, at).map_err(|source| ZstdIndexError::IndexIo {
                index_offset: at,
                source,
            })
        };
        if index_len < HEADER_SIZE + TRAILER_SIZE {
            return Err(bad(
                0,
                format!(
                    "{index_len} bytes, shorter than a header and a trailer ({})",
                    HEADER_SIZE + TRAILER_SIZE
                ),
            ));
        }
        check_header(&mut read_at)?;
        let at = index_len - TRAILER_SIZE;
        let mut t = [0u8; TRAILER_SIZE as usize];
        read_at(&mut t, at)?;
        if t[60..] != TRAILER_MAGIC {
            return Err(bad(at + 60, "no trailer (bad magic): truncated?".into()));
        }
        if LE::read_u32(&t[56..]) != crc32c::crc32c(&t[..56]) {
            return Err(bad(at + 56, "trailer CRC32C mismatch".into()));
        }
        if t[12..16] != [0; 4] {
            return Err(bad(at + 12, "reserved trailer bytes are not zero".into()));
        }
        let indexed_len = LE::read_u64(&t[0..]);
        if indexed_len != archive_len || t[8..12] != archive_tail {
            return Err(ZstdIndexError::OtherArchive {
                what: format!(
                    "it indexes a {indexed_len}-byte file ending in {}, the archive is \
                     {archive_len} bytes ending in {}",
                    hex(&t[8..12]),
                    hex(&archive_tail)
                ),
            });
        }
        let content_len = LE::read_u64(&t[16..]);
        let count = LE::read_u64(&t[24..]);
        let table_offset = LE::read_u64(&t[32..]);
        let room = (at - HEADER_SIZE) / ENTRY_SIZE;
        if count > room || count > archive_len / 4 {
            return Err(bad(
                at + 24,
                format!("{count} segments cannot fit (room for {room} in the index)"),
            ));
        }
        let headers = header_section(&t, at).map_err(|what| bad(at + 44, what))?;
        let table_end = headers.map_or(at, |(offset, _)| offset);
        if Some(table_offset) != table_end.checked_sub(count * ENTRY_SIZE) {
            return Err(bad(
                at + 32,
                format!(
                    "the table at byte {table_offset} does not end where what follows it starts \
                     ({table_end})"
                ),
            ));
        }
        let mut table = vec![0u8; (count * ENTRY_SIZE) as usize];
        read_at(&mut table, table_offset)?;
        if LE::read_u32(&t[40..]) != crc32c::crc32c(&table) {
            return Err(bad(at + 40, "table CRC32C mismatch".into()));
        }
        let mut segments = Vec::with_capacity(count as usize);
        let mut next_content = 0u64;
        let mut next_compressed = 0u64;
        for (i, e) in table.chunks_exact(ENTRY_SIZE as usize).enumerate() {
            let eo = table_offset + i as u64 * ENTRY_SIZE;
            let (s, reserved) = Segment::decode(e);
            check_entry(
                &s,
                reserved,
                next_content,
                next_compressed,
                archive_len,
                table_offset,
            )
            .map_err(|what| bad(eo, format!("segment {i}: {what}")))?;
            next_content += u64::from(s.len);
            next_compressed = s.compressed_offset + u64::from(s.compressed_len);
            segments.push(s);
        }
        if next_content != content_len {
            return Err(bad(
                at + 16,
                format!("the segments hold {next_content} bytes, the trailer says {content_len}"),
            ));
        }
        Ok(ZstdIndex {
            segments,
            content_len,
            archive_len,
            index_len,
            headers,
        })
    }

    /// Where the header reads stored by [`add_headers`] are in the sidecar (offset and
    /// stored bytes), if it has them.
    pub fn header_section(&self) -> Option<(u64, u32)> {
        self.headers
    }

    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Segment `n`.
    pub fn segment(&self, n: usize) -> Option<&Segment> {
        self.segments.get(n)
    }

    /// The segment holding decompressed byte `offset`, if the archive is that long.
    pub fn segment_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.content_len {
            return None;
        }
        Some(self.segments.partition_point(|s| s.offset <= offset) - 1)
    }

    /// Bytes of the decompressed archive.
    pub fn content_len(&self) -> u64 {
        self.content_len
    }

    /// Bytes of the compressed file indexed.
    pub fn compressed_len(&self) -> u64 {
        self.archive_len
    }

    /// Bytes of the sidecar.
    pub fn index_len(&self) -> u64 {
        self.index_len
    }

    /// Bytes of memory the index holds.
    pub fn memory(&self) -> usize {
        self.segments.capacity() * std::mem::size_of::<Segment>()
    }

    /// Checks `compressed`, the bytes read for segment `n`, against the segment's length
    /// and CRC32C: an archive changed since it was indexed (or damaged) is found without
    /// decoding anything. Returns the segment.
    pub fn check_segment(&self, n: usize, compressed: &[u8]) -> Result<Segment> {
        let Some(&s) = self.segments.get(n) else {
            return Err(ZstdIndexError::Segment {
                segment: n as u64,
                offset: 0,
                what: format!("no such segment (the index has {})", self.segments.len()),
            });
        };
        let crc = crc32c::crc32c(compressed);
        if compressed.len() != s.compressed_len as usize || crc != s.crc32c {
            return Err(ZstdIndexError::Segment {
                segment: n as u64,
                offset: s.compressed_offset,
                what: format!(
                    "CRC32C {crc:#010x} of its {} bytes, the index says {:#010x} of {}: the \
                     archive changed since it was indexed, or is damaged",
                    compressed.len(),
                    s.crc32c,
                    s.compressed_len
                ),
            });
        }
        Ok(s)
    }

    /// The content of segment `n`: its compressed bytes `compressed` (read from the
    /// archive at [`Segment::compressed_offset`]) checked against the CRC32C, its prefix
    /// `stored_prefix` (read from the sidecar) decompressed, and the segment decoded.
    pub fn decode(&self, n: usize, compressed: &[u8], stored_prefix: &[u8]) -> Result<Vec<u8>> {
        let s = self.check_segment(n, compressed)?;
        let fail = |what: String| ZstdIndexError::Segment {
            segment: n as u64,
            offset: s.compressed_offset,
            what,
        };
        let mut prefix = Vec::new();
        if s.prefix_len > 0 {
            prefix = Vec::with_capacity(s.prefix_len as usize);
            let mut d = zstd::bulk::Decompressor::new().map_err(|e| fail(format!("zstd: {e}")))?;
            d.decompress_to_buffer(stored_prefix, &mut prefix)
                .map_err(|e| ZstdIndexError::BadIndex {
                    index_offset: s.prefix_offset,
                    what: format!("segment {n}: its prefix does not decompress: {e}"),
                })?;
            if prefix.len() != s.prefix_len as usize {
                return Err(ZstdIndexError::BadIndex {
                    index_offset: s.prefix_offset,
                    what: format!(
                        "segment {n}: its prefix holds {} bytes, not {}",
                        prefix.len(),
                        s.prefix_len
                    ),
                });
            }
        }
        let mut d = SegmentDecoder::new(s.window_descriptor, &prefix).map_err(&fail)?;
        drop(prefix);
        let mut out = Vec::with_capacity(s.len as usize);
        d.feed(compressed, &mut out, s.len as usize)
            .map_err(|e| fail(format!("does not decode: {e}")))?;
        if out.len() != s.len as usize {
            return Err(fail(format!(
                "decodes to {} bytes, not {}",
                out.len(),
                s.len
            )));
        }
        Ok(out)
    }
}

/// Reads and checks the sidecar's header.
fn check_header(read_at: &mut dyn FnMut(&mut [u8], u64) -> Result<()>) -> Result<()> {
    let bad = |index_offset: u64, what: String| ZstdIndexError::BadIndex { index_offset, what };
    let mut head = [0u8; HEADER_SIZE as usize];
    read_at(&mut head, 0)?;
    if head[..8] != INDEX_MAGIC {
        return Err(bad(0, "not a vma index (bad magic)".into()));
    }
    let version = LE::read_u32(&head[8..]);
    if version != INDEX_VERSION {
        return Err(bad(
            8,
            format!("version {version}, this reader knows {INDEX_VERSION}"),
        ));
    }
    if head[12..] != [0; 4] {
        return Err(bad(12, "reserved header bytes are not zero".into()));
    }
    Ok(())
}

/// The header section a trailer (at sidecar offset `at`) names: `None` when its fields
/// are zero; it must end where the trailer starts.
fn header_section(t: &[u8], at: u64) -> std::result::Result<Option<(u64, u32)>, String> {
    let offset = LE::read_u64(&t[44..]);
    let len = LE::read_u32(&t[52..]);
    match (offset, len) {
        (0, 0) => Ok(None),
        _ if offset >= HEADER_SIZE && len > 0 && offset + u64::from(len) == at => {
            Ok(Some((offset, len)))
        }
        _ => Err(format!(
            "a header section of {len} bytes at byte {offset} does not end where the trailer \
             starts ({at})"
        )),
    }
}

/// The most bytes of stored header reads (decompressed) an index may hold: the archive
/// header and 512 bytes per extent of about 1.8 TB of archive. A larger archive's index
/// stores none (opening then decodes every segment).
pub const MAX_HEADER_BYTES: usize = 256 << 20;

/// The header reads of a sidecar's header section (`stored`, at sidecar offset `at`), for
/// an archive of `content_len` bytes: ascending, not overlapping, inside the archive.
pub fn parse_headers(stored: &[u8], at: u64, content_len: u64) -> Result<Vec<(u64, Vec<u8>)>> {
    let bad = |what: String| ZstdIndexError::BadIndex {
        index_offset: at,
        what: format!("header section: {what}"),
    };
    let bytes = zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress(stored, MAX_HEADER_BYTES))
        .map_err(|e| bad(format!("does not decompress: {e}")))?;
    let mut b = &bytes[..];
    let mut out = Vec::new();
    let mut end = 0u64;
    while !b.is_empty() {
        if b.len() < 12 {
            return Err(bad("ends inside an entry".into()));
        }
        let offset = LE::read_u64(b);
        let len = LE::read_u32(&b[8..]) as usize;
        b = &b[12..];
        if len == 0 || len > b.len() || offset < end || offset + len as u64 > content_len {
            return Err(bad(format!(
                "{len} bytes at archive byte {offset} (after {end}, of {content_len})"
            )));
        }
        out.push((offset, b[..len].to_vec()));
        end = offset + len as u64;
        b = &b[len..];
    }
    Ok(out)
}

/// Stores in the sidecar `index` (as [`build`] wrote it, open for reading and writing)
/// the reads that opening the archive `archive` through it makes (the archive header and
/// every extent header), so that opening later reads them from the sidecar instead of
/// decoding every segment. Returns the sidecar's new length; an index of an archive whose
/// header reads exceed [`MAX_HEADER_BYTES`] is left as it is.
pub fn add_headers(archive: File, index: &File) -> std::result::Result<u64, crate::Error> {
    let io_err = |index_offset: u64| {
        move |source| {
            crate::Error::ZstdIndex(ZstdIndexError::IndexIo {
                index_offset,
                source,
            })
        }
    };
    let reads =
        crate::seekable::recorded_header_reads(archive, index.try_clone().map_err(io_err(0))?)?;
    let len = index.metadata().map_err(io_err(0))?.len();
    let mut merged: Vec<(u64, Vec<u8>)> = Vec::new();
    for (offset, bytes) in reads {
        match merged.last_mut() {
            Some((o, b)) if *o + b.len() as u64 >= offset => {
                let keep =
                    (offset + bytes.len() as u64).saturating_sub(*o + b.len() as u64) as usize;
                b.extend_from_slice(&bytes[bytes.len() - keep..]);
            }
            _ => merged.push((offset, bytes)),
        }
    }
    let mut raw = Vec::new();
    for (offset, bytes) in &merged {
        raw.extend_from_slice(&offset.to_le_bytes());
        raw.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        raw.extend_from_slice(bytes);
    }
    if raw.is_empty() || raw.len() > MAX_HEADER_BYTES {
        return Ok(len);
    }
    // With zstd's content checksum: the trailer's CRC covers only where the section is.
    let stored = zstd::bulk::Compressor::new(PREFIX_LEVEL)
        .and_then(|mut c| {
            c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
            c.compress(&raw)
        })
        .map_err(io_err(len))?;
    let at = len - TRAILER_SIZE;
    let mut t = [0u8; TRAILER_SIZE as usize];
    FileExt::read_exact_at(index, &mut t, at).map_err(io_err(at))?;
    LE::write_u64(&mut t[44..], at);
    LE::write_u32(&mut t[52..], stored.len() as u32);
    let crc = crc32c::crc32c(&t[..56]);
    LE::write_u32(&mut t[56..], crc);
    index.write_all_at(&stored, at).map_err(io_err(at))?;
    let end = at + stored.len() as u64;
    index.write_all_at(&t, end).map_err(io_err(end))?;
    index.set_len(end + TRAILER_SIZE).map_err(io_err(end))?;
    Ok(end + TRAILER_SIZE)
}

/// Checks one entry of the table, given where the entries before it end.
fn check_entry(
    s: &Segment,
    reserved: [u8; 3],
    next_content: u64,
    next_compressed: u64,
    archive_len: u64,
    table_offset: u64,
) -> std::result::Result<(), String> {
    if reserved != [0; 3] {
        return Err("reserved bytes are not zero".into());
    }
    if s.offset != next_content {
        return Err(format!(
            "its content starts at {}, the segments before end at {next_content}",
            s.offset
        ));
    }
    if s.len == 0 || u64::from(s.len) > MAX_SEGMENT {
        return Err(format!("{} bytes of content (1 to {MAX_SEGMENT})", s.len));
    }
    if s.compressed_offset < next_compressed || s.compressed_offset < 4 {
        return Err(format!(
            "compressed byte {} is before the end of what precedes it ({next_compressed})",
            s.compressed_offset
        ));
    }
    let end = s
        .compressed_offset
        .saturating_add(u64::from(s.compressed_len));
    if u64::from(s.compressed_len) > MAX_COMPRESSED_SEGMENT {
        return Err(format!(
            "{} compressed bytes (at most {MAX_COMPRESSED_SEGMENT})",
            s.compressed_len
        ));
    }
    if s.compressed_len < 3 || end > archive_len {
        return Err(format!(
            "its {} compressed bytes at {} are not within the {archive_len}-byte archive",
            s.compressed_len, s.compressed_offset
        ));
    }
    let window = window_size(s.window_descriptor);
    if window > MAX_WINDOW {
        return Err(format!("window of {window} bytes (at most {MAX_WINDOW})"));
    }
    if u64::from(s.prefix_len) > window || u64::from(s.prefix_len) > s.offset {
        return Err(format!(
            "a prefix of {} bytes (window {window}, content before it {})",
            s.prefix_len, s.offset
        ));
    }
    let stored_ok = (s.prefix_len == 0) == (s.prefix_stored_len == 0)
        && s.prefix_offset >= HEADER_SIZE
        && s.prefix_offset
            .saturating_add(u64::from(s.prefix_stored_len))
            <= table_offset;
    if !stored_ok {
        return Err(format!(
            "its stored prefix of {} bytes at byte {} is not between the header and the table",
            s.prefix_stored_len, s.prefix_offset
        ));
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
