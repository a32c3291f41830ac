//! Exit codes and the one-line error the command prints.

use std::fmt;
use std::io;

/// The documented exit codes of `vma`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Ok = 0,
    /// 1: an internal error (a bug: please report it).
    Internal = 1,
    /// 2: the command line or a restore map is wrong, or asks for something impossible.
    Usage = 2,
    /// 3: the archive is invalid or damaged (including data that failed its checksum and
    /// names that cannot safely become file names).
    Damaged = 3,
    /// 4: reading or writing a file failed (missing input, full disk, existing output).
    Io = 4,
    /// 5: the archive does not hold what was asked for (a config or device name).
    NotFound = 5,
}

/// An error on its way to stderr and the exit code.
#[derive(Debug)]
pub struct CliError {
    /// The exit code.
    pub exit: Exit,
    /// The message, one line.
    pub message: String,
}

impl CliError {
    /// An error with this exit code.
    pub fn new(exit: Exit, message: impl Into<String>) -> CliError {
        CliError {
            exit,
            message: message.into(),
        }
    }

    /// A usage error.
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError::new(Exit::Usage, message)
    }

    /// An I/O failure on `what` (a path or a description).
    pub fn io(what: impl fmt::Display, e: io::Error) -> CliError {
        // Decompressors report damaged input as InvalidData or an early end: that is
        // archive damage, not an I/O failure.
        let exit = match e.kind() {
            io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => Exit::Damaged,
            _ => Exit::Io,
        };
        CliError::new(exit, format!("{what}: {e}"))
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<vma_reader::Error> for CliError {
    fn from(e: vma_reader::Error) -> CliError {
        use vma_reader::ErrorKind;
        let exit = match e.kind() {
            ErrorKind::Damaged | ErrorKind::UnsafeName => Exit::Damaged,
            ErrorKind::Io => {
                // A decompressor failing mid-stream surfaces as an I/O error of the reader.
                match std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<io::Error>())
                    .map(io::Error::kind)
                {
                    Some(io::ErrorKind::InvalidData) => Exit::Damaged,
                    _ => Exit::Io,
                }
            }
            ErrorKind::Usage => Exit::Usage,
            _ => Exit::Internal,
        };
        CliError::new(exit, e.to_string())
    }
}

impl From<vma_writer::Error> for CliError {
    fn from(e: vma_writer::Error) -> CliError {
        use vma_writer::ErrorKind;
        let exit = match e.kind() {
            ErrorKind::Io => Exit::Io,
            ErrorKind::Usage => Exit::Usage,
            _ => Exit::Internal,
        };
        CliError::new(exit, e.to_string())
    }
}

/// Result alias of the command.
pub type Result<T, E = CliError> = std::result::Result<T, E>;
