//! The one error type of this crate, and the kinds callers tell errors apart by.
//!
//! Whatever the error, a failed [`run_backup`](crate::run_backup) leaves the VM running,
//! no backup job or target node of ours in QEMU, and no file under the archive's name.

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde_json::Value;

use crate::backup::DRIVES_CONFIG_NAME;

/// What kind of failure an [`Error`] is, for callers that map errors to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The options cannot work: a reserved config name, a drive given twice, a device
    /// name or size the archive format cannot hold.
    Usage,
    /// A drive asked for is not in the VM, or the VM has no drive to back up.
    NotFound,
    /// Reading a config file or creating, writing or finishing the archive failed in the
    /// operating system (including a full filesystem and an archive that already exists).
    Io,
    /// QEMU or QMP failed: the QMP socket cannot be reached, QEMU refused a command or
    /// sent something that is not QMP, a backup job failed, QEMU went away.
    Qemu,
    /// The backup was cancelled through [`BackupOptions::cancel`](crate::BackupOptions::cancel).
    Interrupted,
    /// A failure of this program or its surroundings that none of the above describes
    /// (the NBD server failing, a writer invariant broken): a bug, please report it.
    Internal,
}

/// One backup job's failure as QEMU reported it in `BLOCK_JOB_COMPLETED`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    /// The job id.
    pub job: String,
    /// QEMU's `error` member, e.g. `Input/output error`.
    pub error: String,
}

impl fmt::Display for JobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.job, self.error)
    }
}

fn join<T: fmt::Display>(items: &[T], sep: &str) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(sep)
}

/// Everything that can go wrong in a live backup, and in the QMP client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A config file to embed could not be read.
    #[error("config {name}: {}: {source}", .path.display())]
    ReadConfig {
        /// The config's name in the archive.
        name: String,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A config was given the name of the entry that describes the drives.
    #[error("config name {DRIVES_CONFIG_NAME} is reserved for the drive list")]
    ReservedConfigName,
    /// A drive asked for by node name is not in the VM.
    #[error("no drive with node name {name:?} (the VM has: {})", .known.join(", "))]
    NoSuchDrive {
        /// The node name asked for.
        name: String,
        /// The node names the VM has.
        known: Vec<String>,
    },
    /// A drive asked for twice.
    #[error("drive {name:?} given twice")]
    DuplicateDrive {
        /// The node name.
        name: String,
    },
    /// The VM has no drive with a medium.
    #[error("the VM has no drive to back up (query-block lists none with a medium)")]
    NoDrives,

    /// Connecting to the QMP socket failed.
    #[error("connecting to QEMU at {}: {source}", .path.display())]
    QmpConnect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Writing a command to the QMP socket failed.
    #[error("QMP: sending {command}: {source}")]
    QmpSend {
        /// The command.
        command: String,
        /// The OS error.
        source: io::Error,
    },
    /// QEMU closed the QMP connection (it exited, or was killed).
    #[error("QMP connection closed by QEMU (did QEMU exit?)")]
    QmpClosed,
    /// No greeting on a fresh QMP connection.
    #[error(
        "QMP: no greeting in time (QEMU serves one client per QMP socket: is another connected?)"
    )]
    QmpNoGreeting,
    /// No reply to a command in time.
    #[error("QMP: no answer to {command} in time")]
    QmpTimeout {
        /// The command.
        command: String,
    },
    /// The first message on the socket is not a QMP greeting.
    #[error("QMP protocol error: expected the QMP greeting, got {got}")]
    QmpGreeting {
        /// What came instead.
        got: Value,
    },
    /// A line on the socket that is not a JSON object.
    #[error("QMP protocol error: not JSON: {line}")]
    QmpNotJson {
        /// The line (its first 200 characters).
        line: String,
    },
    /// A reply with neither `return` nor `error`.
    #[error("QMP protocol error: reply without result: {reply}")]
    QmpReply {
        /// The reply.
        reply: Value,
    },
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {desc} ({class})")]
    QmpCommand {
        /// The command.
        command: String,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's error description.
        desc: String,
    },
    /// A `query-block` reply this crate cannot use.
    #[error("query-block: {reason}: {reply}")]
    QueryBlock {
        /// What is wrong with it.
        reason: &'static str,
        /// The reply, or the entry of it that is wrong.
        reply: Value,
    },
    /// QEMU wrote a range the archive cannot take: not whole 64 KiB clusters.
    #[error(
        "QEMU wrote {len} bytes at offset {offset} of device {device}: not whole 64 KiB \
         clusters (is the job's cluster size 64 KiB?)"
    )]
    Unaligned {
        /// The device's number in the archive, from 1.
        device: usize,
        /// Where the write started.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// QEMU's backup job of one or more drives failed.
    #[error("QEMU's backup job failed: {}", join(.failures, "; "))]
    JobFailed {
        /// Each failed job with QEMU's error.
        failures: Vec<JobFailure>,
    },
    /// The archive did not take a copy-before-write push within the bound:
    /// our filter dropped the snapshot so the guest's write could go on, and
    /// the jobs failed.
    #[error(
        "the archive did not take the old data of a guest write within {secs} s \
         (--cbw-timeout): the snapshot was dropped so the guest could go on, and the \
         backup failed ({})",
        join(.failures, "; ")
    )]
    SnapshotBroken {
        /// The bound in seconds.
        secs: u32,
        /// QEMU's job errors.
        failures: Vec<JobFailure>,
    },
    /// A drive is not attached to a guest device, so no copy-before-write
    /// filter can be put in front of it.
    #[error(
        "drive {node:?} is attached to no guest device (query-block gives no qdev): \
         a --cbw-timeout filter cannot be inserted (back up without it: --cbw-timeout 0)"
    )]
    NoGuestDevice {
        /// The drive's node name.
        node: String,
    },
    /// A job was cancelled by someone other than this crate.
    #[error("QEMU's backup job failed: job {job} was cancelled outside this program")]
    JobCancelled {
        /// The job id.
        job: String,
    },
    /// After a failure the jobs were cancelled, but QEMU did not end them in time.
    #[error("{source}; and the jobs did not end within {secs} s of being cancelled")]
    CancelTimeout {
        /// The failure that made the backup cancel its jobs.
        source: Box<Error>,
        /// How long it waited.
        secs: u64,
    },

    /// Writing the archive failed while the jobs ran; they were cancelled.
    #[error("writing the archive failed, backup cancelled: {source}")]
    ArchiveFailed {
        /// What failed.
        source: Box<Error>,
    },
    /// The archive writer refused a declaration or failed to write or finish.
    #[error(transparent)]
    Writer(#[from] vma_writer::Error),
    /// The output object exists already (an archive is never replaced).
    #[error("{0}: the object already exists")]
    OutputExists(String),

    /// The archive's bucket (an `s3://` output) failed: starting, uploading or
    /// completing the upload.
    #[error(transparent)]
    S3(#[from] vma_s3::Error),
    /// The zstd encoder around the archive file failed.
    #[error("{}: {op} failed: {source}", .path.display())]
    Compress {
        /// The archive.
        path: PathBuf,
        /// `"zstd setup"` or `"zstd finish"`.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// An export wrote to a device number the archive does not have (a bug).
    #[error("no device number {0} in the archive")]
    NoDevice(usize),

    /// The private directory for the NBD socket could not be created.
    #[error("creating a socket directory: {0}")]
    SocketDir(#[source] io::Error),
    /// The NBD socket's path cannot be given to QEMU.
    #[error("the NBD socket path {} is not UTF-8", .0.display())]
    SocketPath(PathBuf),
    /// The thread storing buffered copy-before-write pushes could not start.
    #[error("starting the copy-before-write buffer's thread: {0}")]
    PushThread(#[source] io::Error),
    /// The NBD server failed to start or to stop.
    #[error("NBD server: {0}")]
    Nbd(#[source] vma_nbd::Error),

    /// The backup was cancelled through its cancel flag.
    #[error("backup interrupted; the jobs were cancelled")]
    Interrupted,
}

impl Error {
    /// The kind of failure, for mapping errors to exit codes.
    pub fn kind(&self) -> ErrorKind {
        use Error as E;
        match self {
            E::ReservedConfigName | E::DuplicateDrive { .. } | E::SocketPath(_) => ErrorKind::Usage,
            E::NoSuchDrive { .. } | E::NoDrives => ErrorKind::NotFound,
            E::ReadConfig { .. } | E::Compress { .. } | E::SocketDir(_) => ErrorKind::Io,
            E::QmpConnect { .. }
            | E::QmpSend { .. }
            | E::QmpClosed
            | E::QmpNoGreeting
            | E::QmpTimeout { .. }
            | E::QmpGreeting { .. }
            | E::QmpNotJson { .. }
            | E::QmpReply { .. }
            | E::QmpCommand { .. }
            | E::QueryBlock { .. }
            | E::Unaligned { .. }
            | E::JobFailed { .. }
            | E::JobCancelled { .. }
            | E::CancelTimeout { .. } => ErrorKind::Qemu,
            E::SnapshotBroken { .. } => ErrorKind::Io,
            E::NoGuestDevice { .. } => ErrorKind::Usage,
            E::ArchiveFailed { source } => source.kind(),
            E::Writer(e) => writer_kind(e),
            E::OutputExists(_) => ErrorKind::Io,
            E::S3(e) if e.io_kind() == std::io::ErrorKind::InvalidInput => ErrorKind::Usage,
            E::S3(_) => ErrorKind::Io,
            E::Nbd(vma_nbd::Error::Bind { .. }) => ErrorKind::Io,
            E::Nbd(_) | E::NoDevice(_) | E::PushThread(_) => ErrorKind::Internal,
            E::Interrupted => ErrorKind::Interrupted,
        }
    }

    /// Whether the archive's filesystem is full (`ENOSPC` or `EDQUOT`), here or in an
    /// error this one wraps: the one I/O failure a caller can often do something about.
    pub fn is_no_space(&self) -> bool {
        match self {
            Error::ArchiveFailed { source } | Error::CancelTimeout { source, .. } => {
                source.is_no_space()
            }
            Error::Writer(vma_writer::Error::Sink { source, .. })
            | Error::Writer(vma_writer::Error::File { source, .. }) => is_no_space(source),
            Error::Compress { source, .. } => is_no_space(source),
            _ => false,
        }
    }
}

/// The kind of an archive writer's error, as the `vma` command classifies them.
fn writer_kind(e: &vma_writer::Error) -> ErrorKind {
    match e.kind() {
        vma_writer::ErrorKind::Io => ErrorKind::Io,
        vma_writer::ErrorKind::Usage => ErrorKind::Usage,
        _ => ErrorKind::Internal,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    /// One value of every variant with the kind it must have.
    fn every_variant() -> Vec<(Error, ErrorKind)> {
        let mut all = option_variants();
        all.extend(qemu_variants());
        all.extend(archive_and_local_variants());
        // `Error::kind` matches exhaustively, so a new variant must be classified
        // there; list one value of it here too.
        all
    }

    /// Errors of the options and the drive selection.
    fn option_variants() -> Vec<(Error, ErrorKind)> {
        use ErrorKind as K;
        vec![
            (
                Error::ReadConfig {
                    name: "qemu-server.conf".into(),
                    path: "/x".into(),
                    source: os(libc::ENOENT),
                },
                K::Io,
            ),
            (Error::ReservedConfigName, K::Usage),
            (
                Error::NoSuchDrive {
                    name: "d9".into(),
                    known: vec!["d0".into(), "d1".into()],
                },
                K::NotFound,
            ),
            (Error::DuplicateDrive { name: "d0".into() }, K::Usage),
            (Error::NoDrives, K::NotFound),
        ]
    }

    /// Errors of QMP and of QEMU's jobs.
    fn qemu_variants() -> Vec<(Error, ErrorKind)> {
        use ErrorKind as K;
        vec![
            (
                Error::QmpConnect {
                    path: "/run/qmp".into(),
                    source: os(libc::ENOENT),
                },
                K::Qemu,
            ),
            (
                Error::QmpSend {
                    command: "query-block".into(),
                    source: os(libc::EIO),
                },
                K::Qemu,
            ),
            (Error::QmpClosed, K::Qemu),
            (Error::QmpNoGreeting, K::Qemu),
            (
                Error::QmpTimeout {
                    command: "transaction".into(),
                },
                K::Qemu,
            ),
            (Error::QmpGreeting { got: Value::Null }, K::Qemu),
            (Error::QmpNotJson { line: "hi".into() }, K::Qemu),
            (Error::QmpReply { reply: Value::Null }, K::Qemu),
            (
                Error::QmpCommand {
                    command: "blockdev-add".into(),
                    class: "GenericError".into(),
                    desc: "nope".into(),
                },
                K::Qemu,
            ),
            (
                Error::QueryBlock {
                    reason: "expected a list",
                    reply: Value::Null,
                },
                K::Qemu,
            ),
        ]
    }

    /// Errors of the archive, the NBD server and the cancel flag.
    fn archive_and_local_variants() -> Vec<(Error, ErrorKind)> {
        use ErrorKind as K;
        vec![
            (
                Error::Unaligned {
                    device: 1,
                    offset: 100,
                    len: 512,
                },
                K::Qemu,
            ),
            (
                Error::JobFailed {
                    failures: vec![JobFailure {
                        job: "j0".into(),
                        error: "Input/output error".into(),
                    }],
                },
                K::Qemu,
            ),
            (Error::JobCancelled { job: "j0".into() }, K::Qemu),
            (
                Error::SnapshotBroken {
                    secs: 5,
                    failures: vec![],
                },
                K::Io,
            ),
            (Error::NoGuestDevice { node: "d0".into() }, K::Usage),
            (
                Error::CancelTimeout {
                    source: Box::new(Error::Interrupted),
                    secs: 60,
                },
                K::Qemu,
            ),
            (
                Error::ArchiveFailed {
                    source: Box::new(sink_error(libc::EIO)),
                },
                K::Io,
            ),
            (Error::Writer(vma_writer::Error::ReservedName), K::Usage),
            (
                Error::Compress {
                    path: "/b/vm.vma.zst".into(),
                    op: "zstd finish",
                    source: os(libc::EIO),
                },
                K::Io,
            ),
            (Error::NoDevice(3), K::Internal),
            (Error::SocketDir(os(libc::EACCES)), K::Io),
            (Error::PushThread(os(libc::EAGAIN)), K::Internal),
            (Error::SocketPath("/tmp/\u{fffd}".into()), K::Usage),
            (Error::Nbd(vma_nbd::Error::Config("x".into())), K::Internal),
            (Error::Interrupted, K::Interrupted),
        ]
    }

    fn sink_error(code: i32) -> Error {
        Error::Writer(vma_writer::Error::Sink {
            offset: 0,
            source: Arc::new(os(code)),
        })
    }

    #[test]
    fn every_variant_has_its_kind_and_a_message() {
        for (e, kind) in every_variant() {
            assert_eq!(e.kind(), kind, "{e:?}");
            assert!(!e.to_string().is_empty(), "{e:?}");
        }
    }

    #[test]
    fn writer_errors_are_classified_as_vma_does() {
        let exists = vma_writer::Error::TargetExists {
            path: "/b/vm.vma".into(),
        };
        assert_eq!(Error::from(exists).kind(), ErrorKind::Io);
        assert_eq!(sink_error(libc::ENOSPC).kind(), ErrorKind::Io);
        let bad = vma_writer::Error::ReservedName;
        assert_eq!(Error::from(bad).kind(), ErrorKind::Usage);
        let missing = vma_writer::Error::Incomplete {
            total: 1,
            missing: Vec::new(),
        };
        assert_eq!(Error::from(missing).kind(), ErrorKind::Internal);
        let bind = vma_nbd::Error::Bind {
            addr: "/s".into(),
            source: os(libc::EACCES),
        };
        assert_eq!(Error::Nbd(bind).kind(), ErrorKind::Io);
    }

    #[test]
    fn messages_name_what_failed() {
        let e = Error::NoSuchDrive {
            name: "nope".into(),
            known: vec!["d0".into(), "d1".into()],
        };
        assert_eq!(
            e.to_string(),
            "no drive with node name \"nope\" (the VM has: d0, d1)"
        );
        let e = Error::JobFailed {
            failures: vec![
                JobFailure {
                    job: "j0".into(),
                    error: "Input/output error".into(),
                },
                JobFailure {
                    job: "j1".into(),
                    error: "No space left on device".into(),
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "QEMU's backup job failed: j0: Input/output error; j1: No space left on device"
        );
        let e = Error::ArchiveFailed {
            source: Box::new(sink_error(libc::ENOSPC)),
        };
        assert!(
            e.to_string().starts_with("writing the archive failed"),
            "{e}"
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[derive(Debug)]
    struct Wrapped(io::Error);
    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        let enospc = || os(libc::ENOSPC);
        assert!(is_no_space(&enospc()));
        assert!(is_no_space(&io::Error::other(Wrapped(enospc()))));
        assert!(!is_no_space(&io::Error::other(Wrapped(os(libc::EIO)))));
        assert!(!is_no_space(&io::Error::other("x")));
        let kind_only = io::Error::new(enospc().kind(), "full at some path");
        assert!(is_no_space(&kind_only));

        assert!(sink_error(libc::ENOSPC).is_no_space());
        assert!(!sink_error(libc::EIO).is_no_space());
        let wrapped = Error::ArchiveFailed {
            source: Box::new(sink_error(libc::EDQUOT)),
        };
        assert!(wrapped.is_no_space());
        assert!(!Error::QmpClosed.is_no_space());
    }
}
