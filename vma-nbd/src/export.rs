//! The [`Export`] trait that storage backends implement, and its helpers.

use std::io;

use crate::proto::{STATE_HOLE, STATE_ZERO};

/// Largest request payload the server will ever buffer (32 MiB).
///
/// [`BlockSize::max`] may not exceed it; it is also the limit above which a
/// `CMD_WRITE` payload is not skipped but the connection is dropped.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// A storage backend served over NBD.
///
/// The server validates every request before calling into the export:
/// `offset + len` is within [`size`](Export::size), lengths respect
/// [`block_size`](Export::block_size) (alignment to `min`, at most `max` for
/// reads and writes), and no write method is called when
/// [`read_only`](Export::read_only) is true. Methods may be called
/// concurrently from several threads (pipelined requests of one connection,
/// or several connections).
///
/// Errors are mapped to NBD error codes with [`Errno::from_io_error`]; use
/// [`Errno::to_io_error`] to return a specific NBD error.
pub trait Export: Send + Sync {
    /// Size of the export in bytes. Read once when a client selects the
    /// export; it must not change while clients are connected.
    fn size(&self) -> u64;

    /// Whether the export is read-only. Read-only exports advertise
    /// `NBD_FLAG_READ_ONLY` (and `NBD_FLAG_CAN_MULTI_CONN`); writes to them
    /// are answered with `EPERM` without calling the write methods.
    fn read_only(&self) -> bool;

    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes `data` at `offset`. Default: `EPERM`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let _ = (offset, data);
        Err(Errno::Perm.to_io_error())
    }

    /// Makes `len` bytes at `offset` read as zeroes (`NBD_CMD_WRITE_ZEROES`;
    /// the `NO_HOLE` flag is accepted and not passed on: a backend that can
    /// punch holes should only do so where that keeps later writes safe).
    ///
    /// Default: calls [`write_at`](Export::write_at) with a zero buffer of
    /// at most 1 MiB at a time.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1024 * 1024;
        let zeroes = vec![0u8; usize::try_from(len.min(CHUNK)).unwrap_or(0)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK);
            let n_usize = usize::try_from(n).unwrap_or(zeroes.len());
            self.write_at(&zeroes[..n_usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Makes all writes that were completed before the call durable.
    /// Default: nothing to do.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Allocation status of `len` bytes at `offset` (`base:allocation`).
    ///
    /// Returns consecutive extents starting at `offset`. The server clips
    /// them to the request, merges neighbours with equal flags, and may
    /// report fewer extents than returned; returning fewer bytes than asked
    /// is allowed (the client asks again). Default: all data.
    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<BlockStatus>> {
        let _ = offset;
        Ok(vec![BlockStatus::data(u64::from(len))])
    }

    /// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE` and
    /// enforced on requests. Default: min 1, preferred 4096, max 32 MiB.
    fn block_size(&self) -> BlockSize {
        BlockSize::default()
    }

    /// Whether to advertise `NBD_FLAG_CAN_MULTI_CONN` (a flush on one
    /// connection covers writes of all connections). Default: only for
    /// read-only exports.
    fn can_multi_conn(&self) -> bool {
        self.read_only()
    }
}

/// Block size constraints of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size: alignment of offsets and lengths. A power of two,
    /// 1 ..= 64 KiB.
    pub min: u32,
    /// Preferred block size: a power of two, at least `max(min, 512)`.
    pub preferred: u32,
    /// Maximum length of a read or write: a multiple of `min`, at most
    /// [`MAX_PAYLOAD`], and at least `preferred` (or the export size if
    /// that is smaller).
    pub max: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        Self {
            min: 1,
            preferred: 4096,
            max: MAX_PAYLOAD,
        }
    }
}

impl BlockSize {
    /// Checks the constraints for an export of `size` bytes.
    pub fn validate(&self, size: u64) -> Result<(), String> {
        let Self {
            min,
            preferred,
            max,
        } = *self;
        if !min.is_power_of_two() || min > 65536 {
            return Err(format!(
                "minimum block size {min} is not a power of two <= 64 KiB"
            ));
        }
        if !preferred.is_power_of_two() || preferred < min.max(512) {
            return Err(format!(
                "preferred block size {preferred} is not a power of two >= max(min, 512)"
            ));
        }
        if max == 0 || max % min != 0 || max > MAX_PAYLOAD {
            return Err(format!(
                "maximum block size {max} is not a multiple of {min} in 1..={MAX_PAYLOAD}"
            ));
        }
        if u64::from(max) < u64::from(preferred).min(size) {
            return Err(format!(
                "maximum block size {max} is below the preferred block size {preferred}"
            ));
        }
        Ok(())
    }
}

/// A run of bytes with one allocation status, as [`Export::block_status`] answers (an
/// extent descriptor of NBD's block status reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length in bytes.
    pub len: u64,
    /// Not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl BlockStatus {
    /// Allocated data (status 0).
    pub fn data(len: u64) -> Self {
        Self {
            len,
            hole: false,
            zero: false,
        }
    }

    /// An unallocated hole reading as zeroes.
    pub fn hole(len: u64) -> Self {
        Self {
            len,
            hole: true,
            zero: true,
        }
    }

    /// Allocated, but known to read as zeroes.
    pub fn zero(len: u64) -> Self {
        Self {
            len,
            hole: false,
            zero: true,
        }
    }

    /// The `base:allocation` status flags.
    pub fn flags(&self) -> u32 {
        (if self.hole { STATE_HOLE } else { 0 }) | (if self.zero { STATE_ZERO } else { 0 })
    }
}

/// The error values of the NBD protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Errno {
    /// `NBD_EPERM` (1): operation not permitted (e.g. write to a read-only export).
    Perm,
    /// `NBD_EIO` (5): input/output error.
    Io,
    /// `NBD_ENOMEM` (12): out of memory.
    NoMem,
    /// `NBD_EINVAL` (22): invalid argument.
    Inval,
    /// `NBD_ENOSPC` (28): no space left (e.g. write past the end).
    NoSpc,
    /// `NBD_EOVERFLOW` (75): value too large.
    Overflow,
    /// `NBD_ENOTSUP` (95): operation not supported.
    NotSup,
    /// `NBD_ESHUTDOWN` (108): server shutting down.
    Shutdown,
}

impl Errno {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// The error for a wire value, if it is one of the defined values.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => return None,
        })
    }

    /// The NBD error for an error returned by an [`Export`].
    ///
    /// OS errors map by errno (`EDQUOT`/`EFBIG` to `ENOSPC`, `EROFS`/
    /// `EACCES` to `EPERM`, `ENOTSUP` to `EINVAL` because the protocol
    /// reserves `ENOTSUP` for fast-zero requests); other errors by kind;
    /// anything else is `EIO`.
    pub fn from_io_error(err: &io::Error) -> Self {
        if let Some(code) = err.raw_os_error() {
            return match code {
                libc::EPERM | libc::EACCES | libc::EROFS => Errno::Perm,
                libc::ENOMEM => Errno::NoMem,
                libc::EINVAL | libc::ENOTSUP | libc::ENOSYS => Errno::Inval,
                libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
                libc::EOVERFLOW => Errno::Overflow,
                libc::ESHUTDOWN => Errno::Shutdown,
                _ => Errno::Io,
            };
        }
        match err.kind() {
            io::ErrorKind::PermissionDenied => Errno::Perm,
            io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported => Errno::Inval,
            io::ErrorKind::OutOfMemory => Errno::NoMem,
            _ => Errno::Io,
        }
    }

    /// An OS error that [`Errno::from_io_error`] maps back to `self`
    /// (except `NotSup`, which maps to `Inval`).
    pub fn to_io_error(self) -> io::Error {
        let code = match self {
            Errno::Perm => libc::EPERM,
            Errno::Io => libc::EIO,
            Errno::NoMem => libc::ENOMEM,
            Errno::Inval => libc::EINVAL,
            Errno::NoSpc => libc::ENOSPC,
            Errno::Overflow => libc::EOVERFLOW,
            Errno::NotSup => libc::ENOTSUP,
            Errno::Shutdown => libc::ESHUTDOWN,
        };
        io::Error::from_raw_os_error(code)
    }
}

impl From<Errno> for io::Error {
    fn from(e: Errno) -> Self {
        e.to_io_error()
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_roundtrip() {
        for e in [
            Errno::Perm,
            Errno::Io,
            Errno::NoMem,
            Errno::Inval,
            Errno::NoSpc,
            Errno::Overflow,
            Errno::Shutdown,
        ] {
            assert_eq!(Errno::from_io_error(&e.to_io_error()), e);
            assert_eq!(Errno::from_code(e.code()), Some(e));
        }
        assert_eq!(Errno::from_code(0), None);
    }

    #[test]
    fn errno_mapping() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(Errno::from_io_error(&os(libc::EDQUOT)), Errno::NoSpc);
        assert_eq!(Errno::from_io_error(&os(libc::EFBIG)), Errno::NoSpc);
        assert_eq!(Errno::from_io_error(&os(libc::EROFS)), Errno::Perm);
        assert_eq!(Errno::from_io_error(&os(libc::ENOTSUP)), Errno::Inval);
        assert_eq!(Errno::from_io_error(&os(libc::EBADF)), Errno::Io);
        let k = |k| io::Error::new(k, "x");
        assert_eq!(
            Errno::from_io_error(&k(io::ErrorKind::PermissionDenied)),
            Errno::Perm
        );
        assert_eq!(
            Errno::from_io_error(&k(io::ErrorKind::InvalidInput)),
            Errno::Inval
        );
        assert_eq!(
            Errno::from_io_error(&k(io::ErrorKind::UnexpectedEof)),
            Errno::Io
        );
    }

    #[test]
    fn block_size_validation() {
        assert!(BlockSize::default().validate(1 << 30).is_ok());
        let bs = |min, preferred, max| BlockSize {
            min,
            preferred,
            max,
        };
        assert!(bs(512, 4096, 1 << 20).validate(1 << 30).is_ok());
        assert!(bs(3, 4096, 1 << 20).validate(1 << 30).is_err());
        assert!(bs(1 << 17, 1 << 17, 1 << 20).validate(1 << 30).is_err());
        assert!(bs(1, 256, 1 << 20).validate(1 << 30).is_err());
        assert!(bs(512, 4096, 1000).validate(1 << 30).is_err());
        assert!(bs(512, 4096, 2048).validate(1 << 30).is_err());
        assert!(bs(512, 4096, 2048).validate(1024).is_ok());
        assert!(bs(1, 4096, MAX_PAYLOAD + 1).validate(1 << 30).is_err());
    }

    struct Ro;
    impl Export for Ro {
        fn size(&self) -> u64 {
            4096
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
    }

    #[test]
    fn defaults() {
        let e = Ro;
        assert_eq!(
            Errno::from_io_error(&e.write_at(&[1], 0).unwrap_err()),
            Errno::Perm
        );
        assert_eq!(
            Errno::from_io_error(&e.write_zeroes(0, 10).unwrap_err()),
            Errno::Perm
        );
        assert!(e.write_zeroes(0, 0).is_ok());
        assert!(e.flush().is_ok());
        assert_eq!(
            e.block_status(0, 100).unwrap(),
            vec![BlockStatus::data(100)]
        );
        assert!(e.can_multi_conn());
        assert_eq!(BlockStatus::hole(1).flags(), STATE_HOLE | STATE_ZERO);
        assert_eq!(BlockStatus::zero(1).flags(), STATE_ZERO);
    }
}
