//! The crate's error type.

use std::io;

/// Errors of server setup and of a connection's protocol handling.
///
/// Errors of individual requests are not reported through this type: they
/// are sent to the client as NBD error codes (see [`crate::Errno`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a socket or stream.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// Binding a listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address or socket path.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An export was registered twice under the same name.
    #[error("duplicate export name {0:?}")]
    DuplicateExport(String),
    /// An export's name or parameters are not acceptable.
    #[error("invalid export {name:?}: {reason}")]
    InvalidExport {
        /// Export name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A server option is out of range.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// The peer violated the protocol (the connection was closed).
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// A server thread panicked.
    #[error("a server thread panicked")]
    ThreadPanicked,
}
