//! The lzop container (`.vma.lzo`, which Proxmox VE's vzdump writes with `lzop`): a
//! streaming decompressor ([`LzopReader`]) and a block index for random access
//! ([`LzopIndex`]). No crate reads the container, so it is parsed here; the LZO1X blocks
//! inside are decompressed by the `lzo` crate.
//!
//! Layout (all integers big-endian): 9 magic bytes, a header (versions, method, flags,
//! mode, mtime, file name, header checksum, optional extra field), then blocks of
//! `[uncompressed len u32][compressed len u32][checksums...][data]`, ending with an
//! uncompressed length of 0. A block's uncompressed length is at most [`MAX_BLOCK_SIZE`]
//! (lzop's own limit; lzop writes 256 KiB blocks) and its compressed length is at most its
//! uncompressed one (equal when lzop stored it uncompressed). Every length is bounded
//! before anything is allocated, the data checksums the header asks for (Adler-32 or
//! CRC-32) are verified, and every error names the byte offset in the compressed file
//! where the fault is.

use std::io::{self, Read, Seek};

/// The 9 bytes every lzop file starts with.
pub const LZOP_MAGIC: [u8; 9] = [0x89, b'L', b'Z', b'O', 0x00, 0x0d, 0x0a, 0x1a, 0x0a];

/// lzop's own limit on the uncompressed size of a block (64 MiB).
pub const MAX_BLOCK_SIZE: u32 = 64 * 1024 * 1024;

const F_ADLER32_D: u32 = 0x0001;
const F_ADLER32_C: u32 = 0x0002;
const F_H_EXTRA_FIELD: u32 = 0x0040;
const F_CRC32_D: u32 = 0x0100;
const F_CRC32_C: u32 = 0x0200;
const F_MULTIPART: u32 = 0x0400;
const F_H_FILTER: u32 = 0x0800;
const F_H_CRC32: u32 = 0x1000;

/// What can be wrong with an lzop stream. Offsets are bytes of the compressed file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LzopError {
    /// The stream does not start with the lzop magic.
    #[error("not an lzop stream (bad magic)")]
    BadMagic,
    /// A header field this reader cannot handle.
    #[error("lzop header at byte {offset}: {what}")]
    Unsupported {
        /// Where the field is.
        offset: u64,
        /// What is unsupported.
        what: String,
    },
    /// The header checksum does not match.
    #[error("lzop header checksum mismatch at byte {offset}")]
    HeaderChecksum {
        /// Where the checksum is.
        offset: u64,
    },
    /// A block whose lengths are impossible or whose data does not decompress.
    #[error("lzop block {block} at byte {offset}: {what}")]
    BadBlock {
        /// Block number, from 0.
        block: u64,
        /// Where the block (its header) starts.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A block's checksum does not match.
    #[error("lzop block {block} at byte {offset}: {kind} checksum mismatch")]
    Checksum {
        /// Block number, from 0.
        block: u64,
        /// Where the block (its header) starts.
        offset: u64,
        /// Which checksum.
        kind: &'static str,
    },
    /// The stream ended inside the header or a block.
    #[error("lzop stream is truncated at byte {offset}")]
    Truncated {
        /// Where the stream ended.
        offset: u64,
    },
    /// Reading the compressed bytes failed.
    #[error("reading the lzop stream at byte {offset}: {source}")]
    Io {
        /// Where the read was.
        offset: u64,
        /// The error of the input.
        #[source]
        source: io::Error,
    },
}

impl LzopError {
    /// The byte offset in the compressed file the error is about (0 for a bad magic).
    pub fn offset(&self) -> u64 {
        match self {
            LzopError::BadMagic => 0,
            LzopError::Unsupported { offset, .. }
            | LzopError::HeaderChecksum { offset }
            | LzopError::BadBlock { offset, .. }
            | LzopError::Checksum { offset, .. }
            | LzopError::Truncated { offset }
            | LzopError::Io { offset, .. } => *offset,
        }
    }
}

impl From<LzopError> for io::Error {
    /// An error of the input stays that error; a truncation is `UnexpectedEof`; the rest
    /// is `InvalidData`.
    fn from(e: LzopError) -> io::Error {
        match e {
            LzopError::Io { source, .. } => source,
            e @ LzopError::Truncated { .. } => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            e => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// A reader that counts the bytes it has read, so errors can say where they are.
struct Counted<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Counted<R> {
    fn bytes(&mut self, buf: &mut [u8]) -> Result<(), LzopError> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => return Err(LzopError::Truncated { offset: self.pos }),
                Ok(n) => {
                    done += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(LzopError::Io {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, LzopError> {
        let mut b = [0u8; 4];
        self.bytes(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
}

/// Reads the lzop header (magic included) and returns its flags.
fn read_header<R: Read>(r: &mut Counted<R>) -> Result<u32, LzopError> {
    let mut magic = [0u8; 9];
    r.bytes(&mut magic)?;
    if magic != LZOP_MAGIC {
        return Err(LzopError::BadMagic);
    }
    // Everything after the magic up to the header checksum is checksummed.
    let mut h = Checksummed::new(r);
    let version = h.u16()?;
    let _lib_version = h.u16()?;
    if version >= 0x0940 {
        let at = h.pos();
        let needed = h.u16()?;
        if needed > 0x1040 {
            return Err(LzopError::Unsupported {
                offset: at,
                what: format!("needs lzop version {needed:#x} to extract"),
            });
        }
    }
    let at = h.pos();
    let method = h.u8()?;
    if !(1..=3).contains(&method) {
        return Err(LzopError::Unsupported {
            offset: at,
            what: format!("compression method {method} (only LZO1X methods 1-3 exist)"),
        });
    }
    if version >= 0x0940 {
        let _level = h.u8()?;
    }
    let at = h.pos();
    let flags = h.u32()?;
    for (flag, what) in [(F_MULTIPART, "multipart archives"), (F_H_FILTER, "filters")] {
        if flags & flag != 0 {
            return Err(LzopError::Unsupported {
                offset: at,
                what: what.into(),
            });
        }
    }
    let _mode = h.u32()?;
    let _mtime_low = h.u32()?;
    if version >= 0x0940 {
        let _mtime_high = h.u32()?;
    }
    let name_len = h.u8()? as usize;
    let mut name = [0u8; 255];
    h.bytes(&mut name[..name_len])?;
    h.check(flags)?;
    if flags & F_H_EXTRA_FIELD != 0 {
        let mut h = Checksummed::new(r);
        let len = h.u32()?;
        // Read and discard the extra field without trusting its length for allocation.
        let mut left = u64::from(len);
        let mut buf = [0u8; 4096];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            h.bytes(&mut buf[..n])?;
            left -= n as u64;
        }
        h.check(flags)?;
    }
    Ok(flags)
}

/// The header of one block: its lengths and the checksums that follow them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockHeader {
    dst_len: u32,
    src_len: u32,
    d_adler: Option<u32>,
    d_crc: Option<u32>,
    c_adler: Option<u32>,
    c_crc: Option<u32>,
}

impl BlockHeader {
    fn stored(&self) -> bool {
        self.src_len == self.dst_len
    }
}

/// Bytes of a block's header, for the container's flags, when its data is `stored`.
fn header_len(flags: u32, stored: bool) -> u64 {
    let sums = [
        flags & F_ADLER32_D != 0,
        flags & F_CRC32_D != 0,
        !stored && flags & F_ADLER32_C != 0,
        !stored && flags & F_CRC32_C != 0,
    ];
    8 + 4 * sums.iter().filter(|&&s| s).count() as u64
}

/// Reads the header of block `block`, which starts at `r.pos`; `None` at the end marker.
fn read_block_header<R: Read>(
    r: &mut Counted<R>,
    flags: u32,
    block: u64,
) -> Result<Option<BlockHeader>, LzopError> {
    let offset = r.pos;
    let bad = |what: String| LzopError::BadBlock {
        block,
        offset,
        what,
    };
    let dst_len = r.u32()?;
    if dst_len == 0 {
        return Ok(None);
    }
    if dst_len > MAX_BLOCK_SIZE {
        return Err(bad(format!(
            "uncompressed length {dst_len} exceeds lzop's limit of {MAX_BLOCK_SIZE}"
        )));
    }
    let src_len = r.u32()?;
    if src_len == 0 || src_len > dst_len {
        return Err(bad(format!(
            "compressed length {src_len} for {dst_len} uncompressed bytes"
        )));
    }
    let stored = src_len == dst_len;
    let mut sum = |present: bool| present.then(|| r.u32()).transpose();
    Ok(Some(BlockHeader {
        dst_len,
        src_len,
        d_adler: sum(flags & F_ADLER32_D != 0)?,
        d_crc: sum(flags & F_CRC32_D != 0)?,
        c_adler: sum(!stored && flags & F_ADLER32_C != 0)?,
        c_crc: sum(!stored && flags & F_CRC32_C != 0)?,
    }))
}

/// Bytes a block must hold when more blocks follow it: lzop cuts its input into blocks of
/// 256 KiB and fills each but the last, from a pipe too (vzdump's case).
pub const MIN_FULL_BLOCK: u32 = 64 * 1024;

/// The rule lzop's block lengths follow: every block but the last holds as many bytes as
/// the first, the last no more, and the first at least [`MIN_FULL_BLOCK`] when more follow.
/// It bounds an index to one entry per [`MIN_FULL_BLOCK`] of content, whatever the file.
#[derive(Debug, Default)]
struct BlockLengths {
    first: Option<u32>,
    /// A block shorter than the first was seen: it must have been the last.
    short: bool,
}

impl BlockLengths {
    fn check(&mut self, len: u32, block: u64, offset: u64) -> Result<(), LzopError> {
        let bad = |what: String| LzopError::BadBlock {
            block,
            offset,
            what,
        };
        let Some(first) = self.first else {
            self.first = Some(len);
            return Ok(());
        };
        if self.short {
            return Err(bad(format!(
                "a block follows a short one (lzop fills every block but the last with {first} bytes)"
            )));
        }
        if first < MIN_FULL_BLOCK {
            return Err(bad(format!(
                "the first block holds {first} bytes and another follows (lzop's hold at least {MIN_FULL_BLOCK} but the last)"
            )));
        }
        if len > first {
            return Err(bad(format!(
                "uncompressed length {len} is more than the first block's {first}"
            )));
        }
        self.short = len < first;
        Ok(())
    }
}

/// Decodes block `block` (header at `offset`) from its `data` into `out`, verifying the
/// checksums its header carries.
fn decode_block(
    h: &BlockHeader,
    data: &[u8],
    out: &mut Vec<u8>,
    block: u64,
    offset: u64,
) -> Result<(), LzopError> {
    let check = |stored: Option<u32>, compute: &dyn Fn() -> u32, kind| match stored {
        Some(sum) if sum != compute() => Err(LzopError::Checksum {
            block,
            offset,
            kind,
        }),
        _ => Ok(()),
    };
    let dst_len = h.dst_len as usize;
    out.clear();
    if h.stored() {
        out.extend_from_slice(data);
    } else {
        check(h.c_adler, &|| adler32(data), "compressed Adler-32")?;
        check(h.c_crc, &|| crc32fast::hash(data), "compressed CRC-32")?;
        out.resize(dst_len, 0);
        let n = lzo::decompress_into(data, out).map_err(|e| LzopError::BadBlock {
            block,
            offset,
            what: format!("LZO1X data is corrupt: {e}"),
        })?;
        if n != dst_len {
            return Err(LzopError::BadBlock {
                block,
                offset,
                what: format!("decompressed to {n} bytes, its header says {dst_len}"),
            });
        }
    }
    check(h.d_adler, &|| adler32(out), "Adler-32")?;
    check(h.d_crc, &|| crc32fast::hash(out), "CRC-32")?;
    Ok(())
}

/// Decompresses an lzop stream as a `Read`.
pub struct LzopReader<R> {
    inner: Counted<R>,
    flags: u32,
    block: u64,
    lengths: BlockLengths,
    out: Vec<u8>,
    pos: usize,
    compressed: Vec<u8>,
    done: bool,
}

impl<R: Read> LzopReader<R> {
    /// Reads and checks the lzop header (magic included).
    pub fn new(inner: R) -> Result<LzopReader<R>, LzopError> {
        let mut inner = Counted { inner, pos: 0 };
        let flags = read_header(&mut inner)?;
        Ok(LzopReader {
            inner,
            flags,
            block: 0,
            lengths: BlockLengths::default(),
            out: Vec::new(),
            pos: 0,
            compressed: Vec::new(),
            done: false,
        })
    }

    /// Reads and decompresses the next block into `self.out`; false at the end.
    fn next_block(&mut self) -> Result<bool, LzopError> {
        let offset = self.inner.pos;
        let Some(h) = read_block_header(&mut self.inner, self.flags, self.block)? else {
            return Ok(false);
        };
        self.lengths.check(h.dst_len, self.block, offset)?;
        self.compressed.resize(h.src_len as usize, 0);
        self.inner.bytes(&mut self.compressed)?;
        decode_block(&h, &self.compressed, &mut self.out, self.block, offset)?;
        self.pos = 0;
        self.block += 1;
        Ok(true)
    }
}

impl<R: Read> Read for LzopReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            if !self.next_block()? {
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One block of an [`LzopIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LzopBlock {
    /// Offset of its content in the decompressed stream.
    pub offset: u64,
    /// Offset of its header in the compressed file.
    pub header_offset: u64,
    /// Bytes of its header (lengths and checksums).
    pub header_len: u32,
    /// Bytes of its content.
    pub len: u32,
    /// Bytes of its data in the compressed file (equal to `len` when stored).
    pub compressed_len: u32,
}

impl LzopBlock {
    /// Bytes of the compressed file the block takes, header included.
    pub fn file_len(&self) -> u64 {
        u64::from(self.header_len) + u64::from(self.compressed_len)
    }
}

/// The blocks of an lzop file, found by one scan of their headers (the data between them
/// is skipped, not read): which compressed bytes hold which decompressed ones. Memory:
/// 32 bytes per block (8 MiB per 64 GiB of content in lzop's 256 KiB blocks), at most one
/// block per [`MIN_FULL_BLOCK`] of content (lzop's block lengths are checked), so a hostile
/// file of tiny blocks is refused rather than indexed.
#[derive(Debug, Clone)]
pub struct LzopIndex {
    flags: u32,
    blocks: Vec<LzopBlock>,
    content_len: u64,
    compressed_len: u64,
}

impl LzopIndex {
    /// Scans the lzop file `r` of `file_len` bytes: its header, then every block header
    /// up to the end marker, seeking over the data. Bytes after the end marker are
    /// ignored, as the streaming reader ignores them.
    pub fn scan<R: Read + Seek>(r: R, file_len: u64) -> Result<LzopIndex, LzopError> {
        let mut r = Counted { inner: r, pos: 0 };
        let flags = read_header(&mut r)?;
        let mut blocks = Vec::new();
        let mut lengths = BlockLengths::default();
        let mut content_len = 0u64;
        loop {
            let block = blocks.len() as u64;
            let header_offset = r.pos;
            let Some(h) = read_block_header(&mut r, flags, block)? else {
                break;
            };
            lengths.check(h.dst_len, block, header_offset)?;
            let end = r.pos + u64::from(h.src_len);
            if end > file_len {
                return Err(LzopError::BadBlock {
                    block,
                    offset: header_offset,
                    what: format!(
                        "its {} compressed bytes run past the end of the {file_len}-byte file",
                        h.src_len
                    ),
                });
            }
            r.inner
                .seek_relative(i64::from(h.src_len))
                .map_err(|source| LzopError::Io {
                    offset: r.pos,
                    source,
                })?;
            r.pos = end;
            blocks.push(LzopBlock {
                offset: content_len,
                header_offset,
                header_len: header_len(flags, h.stored()) as u32,
                len: h.dst_len,
                compressed_len: h.src_len,
            });
            content_len += u64::from(h.dst_len);
        }
        blocks.shrink_to_fit();
        Ok(LzopIndex {
            flags,
            blocks,
            content_len,
            compressed_len: file_len,
        })
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Block `n`.
    pub fn block(&self, n: usize) -> Option<&LzopBlock> {
        self.blocks.get(n)
    }

    /// The block holding decompressed byte `offset`, if the stream is that long.
    pub fn block_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.content_len {
            return None;
        }
        Some(self.blocks.partition_point(|b| b.offset <= offset) - 1)
    }

    /// Bytes of the decompressed stream.
    pub fn content_len(&self) -> u64 {
        self.content_len
    }

    /// Bytes of the compressed file scanned.
    pub fn compressed_len(&self) -> u64 {
        self.compressed_len
    }

    /// Bytes of memory the index holds.
    pub fn memory(&self) -> usize {
        self.blocks.capacity() * std::mem::size_of::<LzopBlock>()
    }

    /// The content of block `n` from `bytes`, the [`LzopBlock::file_len`] bytes of the
    /// file at its header: its header is read again (it must agree with the index), its
    /// data decompressed, and the checksums its header carries verified.
    pub fn decode(&self, n: usize, bytes: &[u8]) -> Result<Vec<u8>, LzopError> {
        let b = self.blocks[n];
        let mut r = Counted {
            inner: bytes,
            pos: b.header_offset,
        };
        let h = read_block_header(&mut r, self.flags, n as u64)?;
        if h.map(|h| (h.dst_len, h.src_len)) != Some((b.len, b.compressed_len)) {
            return Err(LzopError::BadBlock {
                block: n as u64,
                offset: b.header_offset,
                what: "its header changed since the file was indexed".into(),
            });
        }
        let h = h.expect("checked");
        let data = &bytes[b.header_len as usize..];
        if data.len() != b.compressed_len as usize {
            return Err(LzopError::Truncated {
                offset: b.header_offset + bytes.len() as u64,
            });
        }
        let mut out = Vec::with_capacity(b.len as usize);
        decode_block(&h, data, &mut out, n as u64, b.header_offset)?;
        Ok(out)
    }
}

fn adler32(data: &[u8]) -> u32 {
    let mut a = adler2::Adler32::new();
    a.write_slice(data);
    a.checksum()
}

/// Reads header fields while keeping both checksums lzop may use for them.
struct Checksummed<'a, R> {
    inner: &'a mut Counted<R>,
    adler: adler2::Adler32,
    crc: crc32fast::Hasher,
}

impl<'a, R: Read> Checksummed<'a, R> {
    fn new(inner: &'a mut Counted<R>) -> Self {
        Checksummed {
            inner,
            adler: adler2::Adler32::new(),
            crc: crc32fast::Hasher::new(),
        }
    }

    fn pos(&self) -> u64 {
        self.inner.pos
    }

    fn bytes(&mut self, buf: &mut [u8]) -> Result<(), LzopError> {
        self.inner.bytes(buf)?;
        self.adler.write_slice(buf);
        self.crc.update(buf);
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, LzopError> {
        let mut b = [0u8; 1];
        self.bytes(&mut b)?;
        Ok(b[0])
    }

    fn u16(&mut self) -> Result<u16, LzopError> {
        let mut b = [0u8; 2];
        self.bytes(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, LzopError> {
        let mut b = [0u8; 4];
        self.bytes(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    /// Reads the checksum that follows and compares it with the bytes read so far.
    fn check(self, flags: u32) -> Result<(), LzopError> {
        let expected = if flags & F_H_CRC32 != 0 {
            self.crc.finalize()
        } else {
            self.adler.checksum()
        };
        let offset = self.inner.pos;
        if self.inner.u32()? != expected {
            return Err(LzopError::HeaderChecksum { offset });
        }
        Ok(())
    }
}
