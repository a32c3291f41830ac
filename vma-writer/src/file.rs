//! File output that never leaves a file looking like a complete archive unless it is one.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tempfile::NamedTempFile;

use crate::builder::{Builder, Device, VmState};
use crate::error::{Error, Result};
use crate::writer::{forward_writes, Summary, Writer, WriterHandle};

/// An archive being written to a file. The data goes to `.NAME.partial-XXXXXX` in the
/// target's directory (mode 0666 less the umask); only a successful [`finish`](FileWriter::finish)
/// renames it to `NAME`. An aborted, failed or dropped writer removes the temporary file;
/// a killed process leaves it behind under its `.partial` name, never under `NAME`.
///
/// `NAME` is never overwritten: [`Builder::create_file`] fails if it exists, and the final
/// rename fails (without replacing anything) if it appeared in the meantime.
#[derive(Debug)]
pub struct FileWriter {
    writer: Writer<PartialFile>,
    path: PathBuf,
    fsync: bool,
}

fn file_error(path: &Path, op: &'static str, e: io::Error) -> Error {
    Error::File {
        path: path.to_owned(),
        op,
        source: Arc::new(e),
    }
}

/// The directory a path's file lives in (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

impl FileWriter {
    pub(crate) fn create(builder: Builder, path: &Path) -> Result<FileWriter> {
        // Validate the declaration before creating anything on disk.
        builder.encode_header()?;
        let fsync = builder.fsync;
        Ok(FileWriter {
            writer: builder.build(PartialFile::create(path)?)?,
            path: path.to_owned(),
            fsync,
        })
    }

    forward_writes!(writer.handle);

    /// The final path of the archive.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Finishes the archive (see [`Writer::finish`]), fsyncs it if the builder asked for it
    /// (the default), renames it to its final name without replacing an existing file, and
    /// fsyncs the directory. On any error the temporary file is removed.
    pub fn finish(self) -> Result<Summary> {
        let FileWriter { writer, fsync, .. } = self;
        let (summary, file) = writer.finish()?;
        file.commit(fsync)?;
        Ok(summary)
    }

    /// Abandons the archive and removes the temporary file.
    pub fn abort(self) -> Result<()> {
        self.writer.abort().map(drop)
    }
}

/// A file written under a temporary name (`.NAME.partial-XXXXXX`, mode 0666 less the
/// umask) in its
/// target's directory and given its final name only by [`commit`](PartialFile::commit);
/// dropped without a commit, it removes itself. [`FileWriter`] writes archives through one;
/// use it directly to put something between the writer and the file (a compressor, say).
#[derive(Debug)]
pub struct PartialFile {
    temp: NamedTempFile,
    path: PathBuf,
}

impl PartialFile {
    /// Creates the temporary file for `path`, which must not exist
    /// ([`Error::TargetExists`]).
    pub fn create(path: impl AsRef<Path>) -> Result<PartialFile> {
        let path = path.as_ref();
        let Some(name) = path.file_name() else {
            let e = io::Error::new(io::ErrorKind::InvalidInput, "the path names no file");
            return Err(file_error(path, "create", e));
        };
        match fs::symlink_metadata(path) {
            Ok(_) => {
                return Err(Error::TargetExists {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_error(path, "create", e)),
        }
        let mut prefix = OsString::from(".");
        prefix.push(name);
        prefix.push(".partial-");
        // Mode 0666 less the umask (0644 under the usual umask), as Proxmox's writer
        // creates archives, not tempfile's 0600.
        let temp = tempfile::Builder::new()
            .prefix(&prefix)
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(parent_dir(path))
            .map_err(|e| file_error(path, "create", e))?;
        Ok(PartialFile {
            temp,
            path: path.to_owned(),
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary file.
    pub fn as_file(&self) -> &File {
        self.temp.as_file()
    }

    /// Gives the file its final name, without replacing a file that appeared there in the
    /// meantime; with `fsync`, makes the data and the rename durable first and after. On
    /// any error the temporary file is removed.
    pub fn commit(self, fsync: bool) -> Result<()> {
        let PartialFile { temp, path } = self;
        if fsync {
            temp.as_file()
                .sync_all()
                .map_err(|e| file_error(temp.path(), "fsync", e))?;
        }
        if let Err(e) = temp.persist_noclobber(&path) {
            return Err(if e.error.kind() == io::ErrorKind::AlreadyExists {
                Error::TargetExists { path }
            } else {
                file_error(&path, "rename", e.error)
            });
        }
        if fsync {
            let dir = parent_dir(&path);
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| file_error(dir, "fsync", e))?;
        }
        Ok(())
    }
}

impl io::Write for PartialFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.temp.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.temp.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.temp.flush()
    }
}
