//! A reader for the lzop container (`.vma.lzo`, which Proxmox VE's vzdump writes with
//! `lzop`). No crate reads the container, so it is parsed here; the LZO1X blocks inside are
//! decompressed by the `lzo` crate.
//!
//! Container layout (all integers big-endian): 9 magic bytes, a header (versions, method,
//! flags, mode, mtime, file name, header checksum, optional extra field), then blocks of
//! `[uncompressed len u32][compressed len u32][checksums...][data]`, ending with an
//! uncompressed length of 0. Every length is bounded before anything is allocated, and the
//! data checksums the header asks for (Adler-32 or CRC-32) are verified.

use std::io::{self, Read};

/// The 9 bytes every lzop file starts with.
pub const LZOP_MAGIC: [u8; 9] = [0x89, b'L', b'Z', b'O', 0x00, 0x0d, 0x0a, 0x1a, 0x0a];

/// lzop's own limit on the uncompressed size of a block.
const MAX_BLOCK_SIZE: u32 = 64 * 1024 * 1024;

const F_ADLER32_D: u32 = 0x0001;
const F_ADLER32_C: u32 = 0x0002;
const F_H_EXTRA_FIELD: u32 = 0x0040;
const F_CRC32_D: u32 = 0x0100;
const F_CRC32_C: u32 = 0x0200;
const F_MULTIPART: u32 = 0x0400;
const F_H_FILTER: u32 = 0x0800;
const F_H_CRC32: u32 = 0x1000;

/// What can be wrong with an lzop stream.
#[derive(Debug, thiserror::Error)]
pub enum LzopError {
    /// The stream does not start with the lzop magic.
    #[error("not an lzop stream (bad magic)")]
    BadMagic,
    /// A header field this reader cannot handle.
    #[error("lzop header: {0}")]
    Unsupported(String),
    /// The header checksum does not match.
    #[error("lzop header checksum mismatch")]
    HeaderChecksum,
    /// A block whose lengths are impossible.
    #[error("lzop block {block}: {what}")]
    BadBlock {
        /// Block number, from 0.
        block: u64,
        /// What is wrong.
        what: String,
    },
    /// A block's data checksum does not match.
    #[error("lzop block {block}: {kind} checksum mismatch")]
    Checksum {
        /// Block number, from 0.
        block: u64,
        /// Which checksum.
        kind: &'static str,
    },
    /// The stream ended inside the header or a block.
    #[error("lzop stream is truncated")]
    Truncated,
}

impl From<LzopError> for io::Error {
    fn from(e: LzopError) -> io::Error {
        match e {
            LzopError::Truncated => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            e => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// Decompresses an lzop stream as a `Read`.
pub struct LzopReader<R> {
    inner: R,
    flags: u32,
    block: u64,
    out: Vec<u8>,
    pos: usize,
    compressed: Vec<u8>,
    done: bool,
}

impl<R: Read> LzopReader<R> {
    /// Reads and checks the lzop header (magic included).
    pub fn new(mut inner: R) -> Result<LzopReader<R>, LzopError> {
        let mut magic = [0u8; 9];
        read_exact(&mut inner, &mut magic)?;
        if magic != LZOP_MAGIC {
            return Err(LzopError::BadMagic);
        }
        // Everything after the magic up to the header checksum is checksummed.
        let mut h = Checksummed::new(&mut inner);
        let version = h.u16()?;
        let _lib_version = h.u16()?;
        if version >= 0x0940 {
            let needed = h.u16()?;
            if needed > 0x1040 {
                return Err(LzopError::Unsupported(format!(
                    "needs lzop version {needed:#x} to extract"
                )));
            }
        }
        let method = h.u8()?;
        if !(1..=3).contains(&method) {
            return Err(LzopError::Unsupported(format!(
                "compression method {method} (only LZO1X methods 1-3 exist)"
            )));
        }
        if version >= 0x0940 {
            let _level = h.u8()?;
        }
        let flags = h.u32()?;
        if flags & F_MULTIPART != 0 {
            return Err(LzopError::Unsupported("multipart archives".into()));
        }
        if flags & F_H_FILTER != 0 {
            return Err(LzopError::Unsupported("filters".into()));
        }
        let _mode = h.u32()?;
        let _mtime_low = h.u32()?;
        if version >= 0x0940 {
            let _mtime_high = h.u32()?;
        }
        let name_len = h.u8()? as usize;
        let mut name = [0u8; 255];
        h.bytes(&mut name[..name_len])?;
        let (adler, crc) = h.sums();
        let expected = if flags & F_H_CRC32 != 0 { crc } else { adler };
        if be_u32(&mut inner)? != expected {
            return Err(LzopError::HeaderChecksum);
        }
        if flags & F_H_EXTRA_FIELD != 0 {
            let mut h = Checksummed::new(&mut inner);
            let len = h.u32()?;
            // Read and discard the extra field without trusting its length for allocation.
            let mut left = len as u64;
            let mut buf = [0u8; 4096];
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                h.bytes(&mut buf[..n])?;
                left -= n as u64;
            }
            let (adler, crc) = h.sums();
            let expected = if flags & F_H_CRC32 != 0 { crc } else { adler };
            if be_u32(&mut inner)? != expected {
                return Err(LzopError::HeaderChecksum);
            }
        }
        Ok(LzopReader {
            inner,
            flags,
            block: 0,
            out: Vec::new(),
            pos: 0,
            compressed: Vec::new(),
            done: false,
        })
    }

    /// Reads and decompresses the next block into `self.out`; false at the end.
    fn next_block(&mut self) -> Result<bool, LzopError> {
        let block = self.block;
        let bad = |what: String| LzopError::BadBlock { block, what };
        let dst_len = be_u32(&mut self.inner)?;
        if dst_len == 0 {
            return Ok(false);
        }
        if dst_len > MAX_BLOCK_SIZE {
            return Err(bad(format!(
                "uncompressed size {dst_len} exceeds lzop's limit"
            )));
        }
        let src_len = be_u32(&mut self.inner)?;
        if src_len == 0 || src_len > dst_len {
            return Err(bad(format!(
                "compressed size {src_len} for {dst_len} uncompressed bytes"
            )));
        }
        let d_adler = (self.flags & F_ADLER32_D != 0)
            .then(|| be_u32(&mut self.inner))
            .transpose()?;
        let d_crc = (self.flags & F_CRC32_D != 0)
            .then(|| be_u32(&mut self.inner))
            .transpose()?;
        let stored = src_len == dst_len;
        let c_adler = (!stored && self.flags & F_ADLER32_C != 0)
            .then(|| be_u32(&mut self.inner))
            .transpose()?;
        let c_crc = (!stored && self.flags & F_CRC32_C != 0)
            .then(|| be_u32(&mut self.inner))
            .transpose()?;

        let dst_len = dst_len as usize;
        self.out.resize(dst_len, 0);
        if stored {
            read_exact(&mut self.inner, &mut self.out)?;
        } else {
            self.compressed.resize(src_len as usize, 0);
            read_exact(&mut self.inner, &mut self.compressed)?;
            check_sum(
                c_adler,
                || adler32(&self.compressed),
                block,
                "compressed Adler-32",
            )?;
            check_sum(
                c_crc,
                || crc32fast::hash(&self.compressed),
                block,
                "compressed CRC-32",
            )?;
            let n = lzo::decompress_into(&self.compressed, &mut self.out)
                .map_err(|e| bad(format!("LZO1X data is corrupt: {e}")))?;
            if n != dst_len {
                return Err(bad(format!(
                    "decompressed to {n} bytes, header says {dst_len}"
                )));
            }
        }
        check_sum(d_adler, || adler32(&self.out), block, "Adler-32")?;
        check_sum(d_crc, || crc32fast::hash(&self.out), block, "CRC-32")?;
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

/// Adler-32 as lzop computes it (initial value 1).
/// Compares a block's `stored` checksum, where the header carries one, with
/// the one `compute` gives.
fn check_sum(
    stored: Option<u32>,
    compute: impl FnOnce() -> u32,
    block: u64,
    kind: &'static str,
) -> Result<(), LzopError> {
    match stored {
        Some(sum) if sum != compute() => Err(LzopError::Checksum { block, kind }),
        _ => Ok(()),
    }
}

fn adler32(data: &[u8]) -> u32 {
    let mut a = adler2::Adler32::new();
    a.write_slice(data);
    a.checksum()
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), LzopError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => LzopError::Truncated,
        _ => LzopError::Unsupported(format!("read error: {e}")),
    })
}

fn be_u32<R: Read>(r: &mut R) -> Result<u32, LzopError> {
    let mut b = [0u8; 4];
    read_exact(r, &mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads header fields while keeping both checksums lzop may use for them.
struct Checksummed<'a, R> {
    inner: &'a mut R,
    adler: adler2::Adler32,
    crc: crc32fast::Hasher,
}

impl<'a, R: Read> Checksummed<'a, R> {
    fn new(inner: &'a mut R) -> Self {
        Checksummed {
            inner,
            adler: adler2::Adler32::new(),
            crc: crc32fast::Hasher::new(),
        }
    }

    fn bytes(&mut self, buf: &mut [u8]) -> Result<(), LzopError> {
        read_exact(self.inner, buf)?;
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

    fn sums(self) -> (u32, u32) {
        (self.adler.checksum(), self.crc.finalize())
    }
}
