//! Devices restored into something other than a file: an image opened by QEMU's block
//! layer, a network block device, anything that takes positional writes.
//!
//! The extractor writes a device given a [`DeviceSink`] (with
//! [`Extractor::target_sink`](crate::Extractor::target_sink)) exactly as it writes an
//! existing target file: each stored run of blocks once, in archive order, zeros where the
//! archive stores none unless the target is said to read as zero already, never past the
//! device end. Once the whole archive has validated it calls [`DeviceSink::finish`]; a sink
//! dropped without it belongs to a failed extraction.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Where the extractor writes one device: positional writes and zeroing, and a last call
/// that makes it all durable.
///
/// Offsets and lengths are device bytes; every request lies inside the device. Requests do
/// not overlap each other, except that zeros are never written where data was.
pub trait DeviceSink {
    /// Writes `data` at `offset`. An error ends the extraction.
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zero (the sink may deallocate them).
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;

    /// Called once the whole archive has validated, before the extraction reports success:
    /// every write must be durable (flushed) when it returns `Ok`, and whatever the sink
    /// holds released. A sink dropped without this call belongs to a failed extraction.
    fn finish(self: Box<Self>) -> io::Result<()>;
}

/// What one device of the extraction is written into.
pub(crate) enum Output {
    /// A file or block device.
    File(File),
    /// A sink of the caller's.
    Sink(Box<dyn DeviceSink>),
    /// A sink already finished.
    Finished,
}

impl From<File> for Output {
    fn from(file: File) -> Self {
        Output::File(file)
    }
}

fn finished() -> io::Error {
    io::Error::other("the device's sink was already finished")
}

impl Output {
    pub(crate) fn write_all_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Output::File(f) => f.write_all_at(data, offset),
            Output::Sink(s) => s.write_at(data, offset),
            Output::Finished => Err(finished()),
        }
    }

    pub(crate) fn write_zeroes(&mut self, mut offset: u64, mut len: u64) -> io::Result<()> {
        static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
        match self {
            Output::File(f) => {
                while len > 0 {
                    let n = len.min(ZEROS.len() as u64) as usize;
                    f.write_all_at(&ZEROS[..n], offset)?;
                    offset += n as u64;
                    len -= n as u64;
                }
                Ok(())
            }
            Output::Sink(s) => s.write_zeroes(offset, len),
            Output::Finished => Err(finished()),
        }
    }

    /// A file's fsync; a sink syncs in [`finish`](Self::finish).
    pub(crate) fn sync_all(&self) -> io::Result<()> {
        match self {
            Output::File(f) => f.sync_all(),
            Output::Sink(_) | Output::Finished => Ok(()),
        }
    }

    /// Finishes a sink (once); nothing for a file.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        match std::mem::replace(self, Output::Finished) {
            Output::File(f) => {
                *self = Output::File(f);
                Ok(())
            }
            Output::Sink(s) => s.finish(),
            Output::Finished => Ok(()),
        }
    }
}
