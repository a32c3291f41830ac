//! Where `vma create` writes the archive, as Proxmox's writer takes an output name:
//! `exec:CMD` runs CMD through the shell and writes into its standard input (vzdump's
//! backup of a VM without disks runs `vma create ... 'exec:zstd --threads=1 > FILE'`), an
//! existing FIFO is written into, `-` is standard output, `s3://BUCKET/KEY` is an object
//! written by a multipart upload that is completed only once the archive is complete (and
//! aborted otherwise: no object appears under the key), and anything else is a new file,
//! written under a temporary name and renamed only once complete.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use vma_writer::PartialFile;

use crate::error::{CliError, Exit, Result};

/// Set by SIGINT, SIGTERM or SIGHUP once asked for (`vma create`, an upload): the archive
/// is abandoned (a temporary file removed, a multipart upload aborted rather than
/// completed) instead of the process dying with it half made. The handler is installed
/// on the first call; without one (none could be installed) a signal ends the process
/// as before.
pub(crate) fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let set = Arc::clone(&flag);
        let _ = ctrlc::set_handler(move || set.store(true, Ordering::Relaxed));
        flag
    })
    .clone()
}

/// An output as named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A new file.
    File(PathBuf),
    /// An existing FIFO.
    Fifo(PathBuf),
    /// Standard output (`-`).
    Stdout,
    /// A shell command's standard input (`exec:CMD`).
    Exec(String),
    /// An object in a bucket (`s3://BUCKET/KEY`).
    S3(vma_s3::Location),
}

impl Target {
    /// What the name means (a malformed `s3://` URL is a usage error).
    pub(crate) fn parse(name: &Path) -> Result<Target> {
        if let Some(at) = crate::remote::location(name) {
            return at.map(Target::S3);
        }
        Ok(Self::parse_local(name))
    }

    fn parse_local(name: &Path) -> Target {
        let text = name.as_os_str().as_encoded_bytes();
        if let Some(command) = text.strip_prefix(b"exec:") {
            return Target::Exec(String::from_utf8_lossy(command).into_owned());
        }
        if name.as_os_str() == "-" {
            return Target::Stdout;
        }
        match std::fs::metadata(name) {
            Ok(m) if m.file_type().is_fifo() => Target::Fifo(name.to_owned()),
            _ => Target::File(name.to_owned()),
        }
    }

    /// The output, for messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Target::File(p) | Target::Fifo(p) => p.display().to_string(),
            Target::Stdout => "standard output".into(),
            Target::Exec(c) => format!("exec:{c}"),
            Target::S3(at) => at.to_string(),
        }
    }
}

/// An open output.
#[derive(Debug)]
pub(crate) enum Sink {
    /// A new file under its temporary name.
    File(PartialFile),
    /// A FIFO or standard output.
    Pipe(File),
    /// The pipe into a command's standard input (the command is the [`Running`]
    /// [`Sink::open`] returns beside it).
    Exec(ChildStdin),
    /// A multipart upload (dropped unfinished, it is aborted).
    S3(Box<vma_s3::S3Upload>),
}

/// A command the archive is written into. Dropped before it was waited for (after a
/// failure), it is stopped and reaped: it must not finish what it made of a partial
/// archive, nor outlive `vma`.
#[derive(Debug)]
pub(crate) struct Running {
    child: Option<Child>,
}

impl Running {
    /// Waits for the command to end (once its pipe, in the [`Sink`], is closed).
    fn wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.take().map(|mut c| c.wait()).transpose()
    }

    /// Stops the command unless it has ended already, and reaps it; how it ended.
    pub(crate) fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // A command that already ended (it closed its input early) keeps its status.
        let ended = child.try_wait().ok().flatten();
        if ended.is_none() {
            let _ = child.kill();
        }
        let status = child.wait().ok();
        ended.or(status)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Sink {
    /// Opens the output: creates the temporary file, opens the FIFO (which waits for a
    /// reader, as Proxmox's writer does), starts the command (returned beside), or starts
    /// the multipart upload (sized for an archive of at most `size_hint` bytes, when
    /// known: S3 takes at most 10,000 parts).
    pub(crate) fn open(target: &Target, size_hint: Option<u64>) -> Result<(Sink, Option<Running>)> {
        let fail = |e: io::Error| CliError::io(target.describe(), e);
        Ok(match target {
            Target::File(path) => (Sink::File(PartialFile::create(path)?), None),
            Target::Fifo(path) => {
                let fifo = OpenOptions::new().write(true).open(path).map_err(fail)?;
                (Sink::Pipe(fifo), None)
            }
            Target::Stdout => {
                let stdout = io::stdout().as_fd().try_clone_to_owned().map_err(fail)?;
                (Sink::Pipe(File::from(stdout)), None)
            }
            Target::Exec(command) => {
                let mut child = Command::new("/bin/sh")
                    .arg("-c")
                    .arg(command)
                    .stdin(Stdio::piped())
                    .spawn()
                    .map_err(fail)?;
                let stdin = child.stdin.take().expect("stdin is piped");
                let running = Running { child: Some(child) };
                (Sink::Exec(stdin), Some(running))
            }
            Target::S3(at) => {
                // Installed before the upload is initiated, so that no signal can come
                // between the upload's start and its cancel flag.
                let interrupted = interrupt_flag();
                let mut upload = crate::remote::create(at, size_hint)?;
                upload.cancel_when(interrupted);
                (Sink::S3(Box::new(upload)), None)
            }
        })
    }

    /// Completes the output once the whole archive was written into it: renames the file
    /// into place, or closes the pipe and checks that the command succeeded.
    pub(crate) fn complete(
        self,
        command: Option<Running>,
        target: &Target,
        fsync: bool,
    ) -> Result<()> {
        match self {
            Sink::File(file) => Ok(file.commit(fsync)?),
            Sink::Pipe(mut pipe) => pipe
                .flush()
                .and_then(|()| if fsync { pipe.sync_all() } else { Ok(()) })
                .or_else(|e| match e.raw_os_error() {
                    // A pipe cannot be synced: what was written is with the reader.
                    Some(libc::EINVAL) | Some(libc::EROFS) => Ok(()),
                    _ => Err(e),
                })
                .map_err(|e| CliError::io(target.describe(), e)),
            Sink::S3(upload) => upload.finish().map(drop).map_err(crate::remote::error),
            Sink::Exec(stdin) => {
                drop(stdin);
                let Some(mut running) = command else {
                    return Ok(());
                };
                match running
                    .wait()
                    .map_err(|e| CliError::io(target.describe(), e))?
                {
                    Some(status) if !status.success() => Err(command_failed(target, status)),
                    _ => Ok(()),
                }
            }
        }
    }
}

/// The error of an output that failed: a command the archive went into is stopped (unless
/// it has ended) and how it ended is the message; for another output, `e`.
pub(crate) fn output_failure(
    target: &Target,
    command: Option<&mut Running>,
    e: CliError,
) -> CliError {
    match command.and_then(Running::stop) {
        Some(status) if status.success() => command_stopped_reading(target, status),
        Some(status) => command_failed(target, status),
        None => e,
    }
}

/// The error of a command that did not succeed.
pub(crate) fn command_failed(target: &Target, status: ExitStatus) -> CliError {
    CliError::new(
        Exit::Io,
        format!("{}: the command failed ({status})", target.describe()),
    )
}

/// The error of a command that stopped reading the archive before its end.
pub(crate) fn command_stopped_reading(target: &Target, status: ExitStatus) -> CliError {
    CliError::new(
        Exit::Io,
        format!(
            "{}: the command stopped reading the archive before its end ({status})",
            target.describe()
        ),
    )
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::File(f) => f.write(buf),
            Sink::Pipe(p) => p.write(buf),
            Sink::Exec(s) => s.write(buf),
            Sink::S3(u) => u.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sink::File(f) => f.write_vectored(bufs),
            Sink::Pipe(p) => p.write_vectored(bufs),
            Sink::Exec(s) => s.write_vectored(bufs),
            Sink::S3(u) => u.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::File(f) => f.flush(),
            Sink::Pipe(p) => p.flush(),
            Sink::Exec(s) => s.flush(),
            Sink::S3(u) => u.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_mean_what_proxmox_makes_of_them() {
        let parse = |name: &str| Target::parse(Path::new(name)).expect("a valid name");
        assert_eq!(
            parse("exec:zstd --threads=1 > x.dat"),
            Target::Exec("zstd --threads=1 > x.dat".into())
        );
        assert_eq!(parse("-"), Target::Stdout);
        assert_eq!(
            parse("/nonexistent/a.vma"),
            Target::File("/nonexistent/a.vma".into())
        );
        assert_eq!(parse("./-"), Target::File("./-".into()));
        assert_eq!(
            parse("s3://bucket/dir/a.vma.zst"),
            Target::S3(vma_s3::Location::parse("s3://bucket/dir/a.vma.zst").expect("valid"))
        );
        assert_eq!(
            Target::parse(Path::new("s3://bucket")).map_err(|e| e.exit),
            Err(crate::error::Exit::Usage)
        );
    }
}
