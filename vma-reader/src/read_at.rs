//! Where a seekable reader's bytes come from: anything that can fill a buffer from any
//! offset, from several threads at once. A local file is one ([`File`], by `pread`); an
//! object in a bucket read by ranged requests is another (`vma-s3`). The seekable reader,
//! its decompressors and its walker see only this trait, so every packing (plain,
//! seekable zstd, lzop, sidecar-indexed zstd) reads the same from any of them.

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Bytes at any offset of a fixed-length object, read by positional reads.
///
/// Implementations must be safe to call from many threads at once, and must return an
/// error rather than fewer bytes when the object holds less than asked for (an object
/// that shrank under the reader).
pub trait ReadAt: Send + Sync + fmt::Debug {
    /// Bytes the object holds.
    fn size(&self) -> io::Result<u64>;

    /// Fills `buf` from `offset`; the object must hold all of it (else
    /// [`io::ErrorKind::UnexpectedEof`]).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// A hint: these ranges, in this order, are about to be read. A remote source can
    /// fetch them at once (in parallel, coalesced); a local file ignores it. The default
    /// does nothing.
    fn will_read(&self, ranges: &[Range<u64>]) {
        let _ = ranges;
    }
}

impl ReadAt for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }

    fn will_read(&self, ranges: &[Range<u64>]) {
        (**self).will_read(ranges);
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Box<T> {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }

    fn will_read(&self, ranges: &[Range<u64>]) {
        (**self).will_read(ranges);
    }
}

/// A shared byte source, as the readers hold it.
pub(crate) type Bytes = Arc<dyn ReadAt>;
