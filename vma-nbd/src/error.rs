//! The crate's error type, and the protocol violations a client detects.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::proto::Command;
use crate::Errno;

/// Errors of the server, the client and the storage daemon.
///
/// Errors of individual requests a server answers are not reported through
/// this type on the server side: they are sent to the client as NBD error
/// codes (see [`crate::Errno`]); a client sees them as [`Error::Request`].
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

    /// Connecting to a server failed.
    #[error("cannot connect to NBD server {addr}: {source}")]
    Connect {
        /// The address or socket path.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The server broke the protocol; the client hung up on it.
    #[error("NBD server violated the protocol: {0}")]
    Violation(#[from] Violation),
    /// The server refused an option of the handshake (an unknown export,
    /// for instance).
    #[error("NBD server refused {option}: {} {message:?}", rep_name(*.reply))]
    Refused {
        /// The option (`NBD_OPT_GO`, ...).
        option: &'static str,
        /// The error reply type (`REP_ERR_*`).
        reply: u32,
        /// The server's message (possibly empty).
        message: String,
    },
    /// The server closed the connection during the handshake (after
    /// `NBD_OPT_EXPORT_NAME` this is how it refuses an export).
    #[error("NBD server closed the connection during the handshake")]
    HandshakeClosed,
    /// The server answered a request with an error.
    #[error(
        "{command} of {len} bytes at offset {offset} failed: {errno} (error {code}){}",
        message_suffix(message)
    )]
    Request {
        /// The command.
        command: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The error, unknown values read as `EINVAL` (as the protocol asks).
        errno: Errno,
        /// The error value the server sent.
        code: u32,
        /// The server's message, if it sent one.
        message: String,
    },
    /// A request is not aligned to the server's minimum block size.
    #[error("{command} of {len} bytes at offset {offset} is not aligned to the export's minimum block size {min}")]
    Unaligned {
        /// The command.
        command: Command,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The minimum block size.
        min: u32,
    },
    /// A request reaches past the end of the export.
    #[error("{command} of {len} bytes at offset {offset} reaches past the end of the export ({size} bytes)")]
    OutOfBounds {
        /// The command.
        command: Command,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// A write to an export the server marked read-only.
    #[error("{0} refused: the export is read-only")]
    ReadOnly(Command),
    /// No reply came within the client's timeout; the connection was closed.
    #[error("no reply from the NBD server within {0:?}")]
    Timeout(std::time::Duration),
    /// The server closed the connection while requests were in flight.
    #[error("the NBD server closed the connection")]
    ServerClosed,
    /// The server is shutting down (it answered `ESHUTDOWN`); the client
    /// sends no more requests.
    #[error("the NBD server is shutting down")]
    ServerShutdown,
    /// The connection failed earlier; `0` is why. Every request in flight
    /// and every later request fails with this.
    #[error("NBD connection lost: {0}")]
    Disconnected(#[source] Arc<Error>),

    /// A QEMU program is not installed.
    #[error("{program} not found: install QEMU's tools (Debian/Ubuntu package qemu-utils)")]
    ToolMissing {
        /// The program (`qemu-storage-daemon`, `qemu-img`).
        program: String,
    },
    /// A QEMU program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An image format name that is not a QEMU block driver name.
    #[error("invalid image format name {0:?}")]
    InvalidFormat(String),
    /// `qemu-storage-daemon` did not come up serving the image.
    #[error("qemu-storage-daemon cannot serve {} as {format}: {message}", .image.display())]
    DaemonStart {
        /// The image.
        image: PathBuf,
        /// Its format.
        format: String,
        /// What QEMU said (its standard error), or what went wrong.
        message: String,
    },
    /// `qemu-storage-daemon` did not end cleanly (it died, or refused to quit).
    #[error("qemu-storage-daemon serving {} ended badly: {message}", .image.display())]
    DaemonExit {
        /// The image.
        image: PathBuf,
        /// The exit status and what QEMU said.
        message: String,
    },
    /// `qemu-img` failed.
    #[error("qemu-img {action} {} failed: {message}", .image.display())]
    QemuImg {
        /// What it was asked to do (`create`).
        action: &'static str,
        /// The image.
        image: PathBuf,
        /// Its exit status and standard error.
        message: String,
    },
    /// The private socket path is longer than a unix socket address allows.
    #[error("socket path {} is too long for a unix socket (set TMPDIR to a shorter directory)", .0.display())]
    SocketPathTooLong(PathBuf),
}

impl Error {
    /// The protocol violation behind this error, looking through
    /// [`Error::Disconnected`].
    pub fn violation(&self) -> Option<&Violation> {
        match self {
            Error::Violation(v) => Some(v),
            Error::Disconnected(cause) => cause.violation(),
            _ => None,
        }
    }

    /// The error that ended the connection, looking through
    /// [`Error::Disconnected`] (`self` for any other error).
    pub fn root(&self) -> &Error {
        match self {
            Error::Disconnected(cause) => cause.root(),
            e => e,
        }
    }
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

fn rep_name(reply: u32) -> String {
    use crate::proto::*;
    let name = match reply {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        other => return format!("error reply {other:#x}"),
    };
    name.to_owned()
}

/// Something an NBD server sent that the protocol does not allow. The
/// client never acts on such a reply: it closes the connection and fails
/// every request in flight.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// The greeting does not start with `NBDMAGIC`.
    #[error("bad greeting magic {0:#018x}")]
    BadGreeting(u64),
    /// The server speaks the oldstyle handshake, which this client does not.
    #[error("oldstyle handshake (not supported)")]
    Oldstyle,
    /// An option reply does not start with the option reply magic.
    #[error("bad option reply magic {0:#018x}")]
    BadOptionReplyMagic(u64),
    /// An option reply names another option than the one in progress.
    #[error("reply to option {got} while option {expected} was in progress")]
    WrongOption {
        /// The option sent.
        expected: u32,
        /// The option the reply names.
        got: u32,
    },
    /// An option reply is longer than this client accepts.
    #[error("option reply of {len} bytes (at most {max} accepted)")]
    OptionReplyTooLong {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// More replies to one option than this client accepts.
    #[error("too many replies to option {0}")]
    TooManyOptionReplies(u32),
    /// A reply type that is not valid for the option.
    #[error("reply type {kind:#x} is not valid for option {option}")]
    UnexpectedOptionReply {
        /// The option.
        option: u32,
        /// The reply type.
        kind: u32,
    },
    /// An information item of the wrong length.
    #[error("information item {info:?} of {len} bytes is malformed")]
    BadInfo {
        /// Its type, if the item was long enough to have one.
        info: Option<u16>,
        /// Its length.
        len: usize,
    },
    /// `NBD_OPT_GO` succeeded without `NBD_INFO_EXPORT`.
    #[error("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")]
    MissingExportInfo,
    /// The transmission flags lack `NBD_FLAG_HAS_FLAGS`.
    #[error("transmission flags {0:#06x} lack NBD_FLAG_HAS_FLAGS")]
    MissingHasFlags(u16),
    /// Block size constraints the protocol does not allow.
    #[error("invalid block size constraints: minimum {min}, preferred {preferred}, maximum {max}")]
    BadBlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// A malformed `NBD_REP_META_CONTEXT` reply.
    #[error("malformed meta context reply of {len} bytes")]
    BadMetaContext {
        /// Its length.
        len: usize,
    },
    /// A meta context the client did not ask for, or one selected twice.
    #[error("meta context {0:?} was not asked for (or was selected twice)")]
    UnexpectedMetaContext(String),
    /// The reply to `NBD_OPT_EXPORT_NAME` carried nonzero padding.
    #[error("nonzero padding after the export information")]
    BadPadding,

    /// A reply that starts with neither reply magic.
    #[error("bad reply magic {0:#010x}")]
    BadReplyMagic(u32),
    /// A reply for a handle that is not in flight.
    #[error("reply for handle {0:#x}, which is not in flight")]
    UnknownHandle(u64),
    /// A structured reply chunk although structured replies were not negotiated.
    #[error("structured reply chunk although structured replies were not negotiated")]
    UnexpectedStructuredReply,
    /// A simple reply that the protocol forbids here (to a read once
    /// structured replies are negotiated, or a successful one to block status).
    #[error("simple reply to {0}, which needs a structured reply")]
    UnexpectedSimpleReply(Command),
    /// A chunk type that is not valid in the reply to this command.
    #[error("chunk type {kind:#06x} is not valid in a reply to {command}")]
    UnexpectedChunk {
        /// The request's command.
        command: Command,
        /// The chunk type.
        kind: u16,
    },
    /// A chunk whose payload length does not fit its type.
    #[error("chunk type {kind:#06x} with a payload of {len} bytes")]
    BadChunkLength {
        /// The chunk type.
        kind: u16,
        /// The payload length.
        len: u32,
    },
    /// A `REPLY_TYPE_NONE` chunk without the done flag.
    #[error("NBD_REPLY_TYPE_NONE chunk without NBD_REPLY_FLAG_DONE")]
    NoneNotDone,
    /// Read data or a hole, or an error offset, outside the request.
    #[error("chunk for {len} bytes at offset {offset} lies outside the request for {request_len} bytes at {request_offset}")]
    ChunkOutOfBounds {
        /// Where the chunk says it is.
        offset: u64,
        /// Its length.
        len: u64,
        /// The request's offset.
        request_offset: u64,
        /// The request's length.
        request_len: u32,
    },
    /// An `OFFSET_HOLE` chunk of length 0.
    #[error("hole chunk of length 0")]
    EmptyHole,
    /// A content chunk that overlaps an earlier one of the same reply.
    #[error("chunk for {len} bytes at offset {offset} overlaps earlier data of the reply")]
    ChunkOverlap {
        /// Where the chunk says it is.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// A read reply split into more pieces than this client tracks.
    #[error("read reply fragmented into more than {0} separate pieces")]
    TooFragmented(usize),
    /// A successful read reply that did not deliver every byte.
    #[error("successful read reply delivered {covered} of {len} bytes")]
    ShortRead {
        /// Bytes delivered.
        covered: u64,
        /// Bytes requested.
        len: u32,
    },
    /// An error chunk or simple reply whose error value is 0 where an
    /// error is required.
    #[error("error chunk with error value 0")]
    ZeroError,
    /// An error chunk whose message does not fit its payload (or exceeds
    /// the protocol's 4096 bytes).
    #[error("error message of {message_len} bytes in a payload of {len} bytes")]
    BadErrorMessage {
        /// Announced message length.
        message_len: u16,
        /// Chunk payload length.
        len: u32,
    },
    /// A block status chunk for another context than the one negotiated.
    #[error("block status for meta context {got}, negotiated {expected}")]
    WrongContext {
        /// The negotiated context id.
        expected: u32,
        /// The id in the chunk.
        got: u32,
    },
    /// A second block status chunk in one reply (one context is negotiated).
    #[error("more than one block status chunk in a reply")]
    DuplicateBlockStatus,
    /// A successful block status reply without a block status chunk.
    #[error("successful block status reply without extents")]
    MissingBlockStatus,
    /// A block status descriptor of length 0.
    #[error("block status descriptor of length 0")]
    EmptyExtent,
    /// Block status descriptors that continue after the requested range.
    #[error("block status descriptors continue past the {0} bytes requested")]
    ExtentsPastRequest(u32),
}
