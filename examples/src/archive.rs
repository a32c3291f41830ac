//! The archive being written: vma-writer behind a temporary file that gets
//! its final name only when the archive is complete.
//!
//! Plain archives use the writer's own file helper ([`vma_writer::FileWriter`]).
//! Compressed ones (`--zstd`) go through the writer's generic `Write` sink:
//! a zstd encoder around a temporary file created the same way
//! (`.NAME.partial-XXXXXX` next to the target), finished, fsynced and renamed
//! without replacing an existing file here. Either way an aborted or failed
//! backup removes the temporary file.

use std::io;
use std::path::Path;
use std::sync::Arc;

use vma_writer::{Builder, Device, FileWriter, PartialFile, Summary, Writer, WriterHandle};

use crate::export::{RangeSink, SinkError};

/// zstd level: the same default as `zstd` and vzdump.
const ZSTD_LEVEL: i32 = 3;

type ZstdFile = zstd::stream::write::Encoder<'static, PartialFile>;

enum Output {
    File(FileWriter),
    Zstd(Writer<ZstdFile>),
}

/// An archive being written.
pub(crate) struct Archive {
    output: Output,
    handle: WriterHandle,
    devices: Vec<Device>,
}

/// Converts a writer error, telling a full filesystem apart.
pub(crate) fn sink_error(e: &vma_writer::Error) -> SinkError {
    let no_space = match e {
        vma_writer::Error::Sink { source, .. } | vma_writer::Error::File { source, .. } => {
            is_no_space(source)
        }
        _ => false,
    };
    SinkError {
        message: e.to_string(),
        no_space,
    }
}

/// Whether `e`, or an I/O error it wraps, says the filesystem is full.
/// tempfile puts the path around the OS error, keeping only its kind, so
/// kinds are compared too (through the OS errors, as naming the kinds
/// needs a newer Rust than the workspace's minimum).
fn is_no_space(e: &io::Error) -> bool {
    let full = |e: &io::Error| {
        [libc::ENOSPC, libc::EDQUOT].iter().any(|&code| {
            e.raw_os_error() == Some(code) || e.kind() == io::Error::from_raw_os_error(code).kind()
        })
    };
    if full(e) {
        return true;
    }
    let mut inner: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|r| r as _);
    while let Some(err) = inner {
        if err.downcast_ref::<io::Error>().is_some_and(full) {
            return true;
        }
        inner = err.source();
    }
    false
}

fn io_error(path: &Path, op: &str, e: &io::Error) -> SinkError {
    SinkError {
        message: format!("{}: {op} failed: {e}", path.display()),
        no_space: is_no_space(e),
    }
}

impl Archive {
    /// Declares the archive and creates its temporary file next to `path`
    /// (which must not exist).
    pub(crate) fn create(
        path: &Path,
        zstd: bool,
        configs: &[(String, Vec<u8>)],
        devices: &[(String, u64)],
    ) -> Result<Archive, SinkError> {
        let mut builder = Builder::new();
        for (name, data) in configs {
            builder.add_config(name, data).map_err(|e| sink_error(&e))?;
        }
        let mut ids = Vec::new();
        for (name, size) in devices {
            ids.push(
                builder
                    .add_device(name, *size)
                    .map_err(|e| sink_error(&e))?,
            );
        }
        let (output, handle) = if zstd {
            let writer = create_zstd(builder, path)?;
            let handle = writer.handle();
            (Output::Zstd(writer), handle)
        } else {
            let writer = builder.create_file(path).map_err(|e| sink_error(&e))?;
            let handle = writer.handle();
            (Output::File(writer), handle)
        };
        Ok(Archive {
            output,
            handle,
            devices: ids,
        })
    }

    /// The sink the NBD exports write into.
    pub(crate) fn sink(&self) -> Arc<dyn RangeSink> {
        Arc::new(HandleSink {
            handle: self.handle.clone(),
            devices: self.devices.clone(),
        })
    }

    /// Completes the archive (checking every cluster was written) and gives
    /// it its final name.
    pub(crate) fn finish(self) -> Result<Summary, SinkError> {
        match self.output {
            Output::File(w) => w.finish().map_err(|e| sink_error(&e)),
            Output::Zstd(writer) => {
                let (summary, encoder) = writer.finish().map_err(|e| sink_error(&e))?;
                let file = encoder
                    .finish()
                    .map_err(|e| io_error(Path::new("archive"), "zstd finish", &e))?;
                file.commit(true).map_err(|e| sink_error(&e))?;
                Ok(summary)
            }
        }
    }

    /// Abandons the archive and removes the temporary file.
    pub(crate) fn abort(self) {
        match self.output {
            Output::File(w) => {
                let _ = w.abort();
            }
            Output::Zstd(writer) => {
                // Dropping the encoder drops the temporary file, removing it.
                let _ = writer.abort();
            }
        }
    }
}

fn create_zstd(builder: Builder, path: &Path) -> Result<Writer<ZstdFile>, SinkError> {
    let file = PartialFile::create(path).map_err(|e| sink_error(&e))?;
    let encoder = ZstdFile::new(file, ZSTD_LEVEL).map_err(|e| io_error(path, "zstd setup", &e))?;
    builder.build(encoder).map_err(|e| sink_error(&e))
}

/// Forwards export writes to the writer.
struct HandleSink {
    handle: WriterHandle,
    devices: Vec<Device>,
}

impl HandleSink {
    fn device(&self, index: usize) -> Result<Device, SinkError> {
        self.devices
            .get(index)
            .copied()
            .ok_or_else(|| SinkError::new(format!("no device number {index}")))
    }
}

impl RangeSink for HandleSink {
    fn write(&self, device: usize, offset: u64, data: &[u8]) -> Result<(), SinkError> {
        let device = self.device(device)?;
        self.handle
            .write_range(device, offset, data)
            .map_err(|e| sink_error(&e))
    }

    fn write_zeroes(&self, device: usize, offset: u64, len: u64) -> Result<(), SinkError> {
        let device = self.device(device)?;
        self.handle
            .write_zero_range(device, offset, len)
            .map_err(|e| sink_error(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped(io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} at some path", self.0)
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn full_filesystem_is_recognised_through_wrappers() {
        let enospc = || io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(is_no_space(&enospc()));
        assert!(is_no_space(&io::Error::other(Wrapped(enospc()))));
        assert!(!is_no_space(&io::Error::other(Wrapped(
            io::Error::from_raw_os_error(libc::EIO)
        ))));
        assert!(!is_no_space(&io::Error::other("x")));
        let kind_only = io::Error::new(enospc().kind(), "full at some path");
        assert!(is_no_space(&kind_only));
    }
}
