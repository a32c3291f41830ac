//! The archive being written: vma-writer behind a temporary file that gets
//! its final name only when the archive is complete.
//!
//! Plain archives use the writer's own file helper ([`vma_writer::FileWriter`]).
//! Compressed ones (`--zstd`) go through the writer's generic `Write` sink:
//! vma-writer's seekable zstd compressor ([`ZstdWriter`]: independent frames
//! cut at extent boundaries and a seek table, as `vma create X.vma.zst`
//! writes, so `vma serve`/`cat` read the backup in place and `zstd -d` and
//! Proxmox's restore read it as any `.vma.zst`) around a temporary file
//! created the same way (`.NAME.partial-XXXXXX` next to the target),
//! finished, fsynced and renamed without replacing an existing file here.
//! Either way an aborted or failed backup removes the temporary file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vma_writer::{
    Builder, Device, FileWriter, PartialFile, Summary, Writer, WriterHandle, ZstdOptions,
    ZstdWriter,
};

use crate::export::RangeSink;
use crate::Error;

/// zstd level: the same default as `zstd` and vzdump.
const ZSTD_LEVEL: i32 = 3;

type ZstdFile = ZstdWriter<PartialFile>;

/// Compressing threads: half the cores, at least one (vzdump's default for
/// its zstd), so that the guest beside the backup keeps a core.
fn zstd_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

enum Output {
    File(FileWriter),
    Zstd(Writer<ZstdFile>),
}

/// An archive being written.
pub(crate) struct Archive {
    path: PathBuf,
    output: Output,
    handle: WriterHandle,
    devices: Vec<Device>,
}

impl Archive {
    /// Declares the archive and creates its temporary file next to `path`
    /// (which must not exist).
    pub(crate) fn create(
        path: &Path,
        zstd: bool,
        configs: &[(String, Vec<u8>)],
        devices: &[(String, u64)],
    ) -> Result<Archive, Error> {
        let mut builder = Builder::new();
        for (name, data) in configs {
            builder.add_config(name, data)?;
        }
        let mut ids = Vec::new();
        for (name, size) in devices {
            ids.push(builder.add_device(name, *size)?);
        }
        let (output, handle) = if zstd {
            let writer = create_zstd(builder, path)?;
            let handle = writer.handle();
            (Output::Zstd(writer), handle)
        } else {
            let writer = builder.create_file(path)?;
            let handle = writer.handle();
            (Output::File(writer), handle)
        };
        Ok(Archive {
            path: path.to_path_buf(),
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
    pub(crate) fn finish(self) -> Result<Summary, Error> {
        match self.output {
            Output::File(w) => Ok(w.finish()?),
            Output::Zstd(writer) => {
                let (summary, encoder) = writer.finish()?;
                let (file, _) = encoder.finish().map_err(|source| Error::Compress {
                    path: self.path,
                    op: "zstd finish",
                    source,
                })?;
                file.commit(true)?;
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

fn create_zstd(builder: Builder, path: &Path) -> Result<Writer<ZstdFile>, Error> {
    let file = PartialFile::create(path)?;
    let options = ZstdOptions {
        level: ZSTD_LEVEL,
        threads: zstd_threads(),
        ..ZstdOptions::default()
    };
    let encoder = ZstdFile::new(file, options).map_err(|source| Error::Compress {
        path: path.to_path_buf(),
        op: "zstd setup",
        source,
    })?;
    Ok(builder.build(encoder)?)
}

/// Forwards export writes to the writer.
struct HandleSink {
    handle: WriterHandle,
    devices: Vec<Device>,
}

impl HandleSink {
    fn device(&self, index: usize) -> Result<Device, Error> {
        self.devices
            .get(index)
            .copied()
            .ok_or(Error::NoDevice(index))
    }
}

impl RangeSink for HandleSink {
    fn write(&self, device: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
        let device = self.device(device)?;
        Ok(self.handle.write_range(device, offset, data)?)
    }

    fn write_zeroes(&self, device: usize, offset: u64, len: u64) -> Result<(), Error> {
        let device = self.device(device)?;
        Ok(self.handle.write_zero_range(device, offset, len)?)
    }
}
