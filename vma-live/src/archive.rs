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
//!
//! An output `s3://BUCKET/KEY` goes into a multipart upload instead ([`vma_s3`]; endpoint,
//! region and credentials from the standard AWS environment variables and files),
//! plain or through the same zstd compressor: the upload is completed only when the
//! archive is, and aborted on any failure, so no object appears under the key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vma_writer::{
    Builder, Device, FileWriter, PartialFile, Summary, Writer, WriterHandle, ZstdOptions,
    ZstdWriter,
};

use vma_s3::{Location, S3Upload};

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
    S3(Writer<S3Upload>),
    S3Zstd(Writer<ZstdWriter<S3Upload>>),
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
        cancel: &Arc<std::sync::atomic::AtomicBool>,
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
        let s3 = Location::is_s3(path.as_os_str())
            .then(|| {
                let at = Location::parse(&path.to_string_lossy())?;
                let config = vma_s3::Config::from_env()?;
                // As for a file: an existing archive is never replaced (checked by a
                // HEAD: a multipart upload has no create-only mode).
                match config.open(&at) {
                    Ok(_) => return Err(Error::OutputExists(at.to_string())),
                    Err(vma_s3::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                let total: u64 = devices.iter().map(|(_, size)| size).sum();
                let bound = vma_writer::max_archive_len(total);
                let mut upload = config.create_sized(&at, bound)?;
                // Cancelled (Ctrl-C) before it completes: aborted, not completed.
                upload.cancel_when(Arc::clone(cancel));
                Ok(upload)
            })
            .transpose()?;
        let (output, handle) = if let Some(upload) = s3 {
            if zstd {
                let encoder = ZstdWriter::new(upload, zstd_options())
                    .map_err(|source| compress_error(path, "zstd setup", source))?;
                let writer = builder.build(encoder)?;
                let handle = writer.handle();
                (Output::S3Zstd(writer), handle)
            } else {
                let writer = builder.build(upload)?;
                let handle = writer.handle();
                (Output::S3(writer), handle)
            }
        } else if zstd {
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
    /// it its final name (completes the upload). Returns the writer's summary
    /// and the bytes stored (compressed, with zstd).
    pub(crate) fn finish(self) -> Result<(Summary, u64), Error> {
        let stored = |path: &Path, summary: &Summary| {
            std::fs::metadata(path).map_or(summary.archive_bytes, |m| m.len())
        };
        match self.output {
            Output::File(w) => {
                let summary = w.finish()?;
                let bytes = stored(&self.path, &summary);
                Ok((summary, bytes))
            }
            Output::Zstd(writer) => {
                let (summary, encoder) = writer.finish()?;
                let (file, _) = encoder
                    .finish()
                    .map_err(|source| compress_error(&self.path, "zstd finish", source))?;
                file.commit(true)?;
                let bytes = stored(&self.path, &summary);
                Ok((summary, bytes))
            }
            Output::S3(writer) => {
                let (summary, upload) = writer.finish()?;
                let bytes = upload.finish()?;
                Ok((summary, bytes))
            }
            Output::S3Zstd(writer) => {
                let (summary, encoder) = writer.finish()?;
                let (upload, _) = encoder
                    .finish()
                    .map_err(|source| compress_error(&self.path, "zstd finish", source))?;
                let bytes = upload.finish()?;
                Ok((summary, bytes))
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
            // Dropping the upload aborts it.
            Output::S3(writer) => {
                let _ = writer.abort();
            }
            Output::S3Zstd(writer) => {
                let _ = writer.abort();
            }
        }
    }
}

fn zstd_options() -> ZstdOptions {
    ZstdOptions {
        level: ZSTD_LEVEL,
        threads: zstd_threads(),
        ..ZstdOptions::default()
    }
}

fn compress_error(path: &Path, op: &'static str, source: std::io::Error) -> Error {
    Error::Compress {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn create_zstd(builder: Builder, path: &Path) -> Result<Writer<ZstdFile>, Error> {
    let file = PartialFile::create(path)?;
    let encoder = ZstdFile::new(file, zstd_options())
        .map_err(|source| compress_error(path, "zstd setup", source))?;
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
