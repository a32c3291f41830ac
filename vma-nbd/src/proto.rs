//! Wire-level constants and parsers of the NBD protocol.
//!
//! Everything in the NBD protocol is big-endian ("network byte order").
//! The names follow the upstream protocol document (`doc/proto.md` of the
//! reference implementation) without their `NBD_` prefix.
//!
//! The parse functions in this module never panic and never allocate more
//! than the (already bounded) input they are given, so they can be called on
//! arbitrary bytes, e.g. from a fuzz target.

use crate::{Error, Violation};

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after [`NBDMAGIC`] and by the client
/// in front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic number in front of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic number of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic number of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic number of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export is a rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `CMD_WRITE_ZEROES` is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `CMD_FLAG_DF` is supported on reads.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections may be used on the same export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: choose an export and enter transmission (cannot fail gracefully).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS (not supported by this server).
pub const OPT_STARTTLS: u32 = 5;
/// Option: query information about an export.
pub const OPT_INFO: u32 = 6;
/// Option: like [`OPT_INFO`], then enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: enable structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: extended headers (not supported by this server).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success / end of list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of an `OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one information item of `OPT_INFO` / `OPT_GO`.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// Option error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
/// Option error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
/// Option error: unknown export.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
/// Option error: server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
/// Option error: block size information must be requested.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
/// Option error: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

/// Information type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (followed by a payload).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim / discard.
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch hint).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: do not punch holes (`CMD_WRITE_ZEROES`).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment the reply (`CMD_READ`).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: only one extent wanted (`CMD_BLOCK_STATUS`).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail unless zeroing is fast (`CMD_WRITE_ZEROES`).
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply type: no payload.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured reply type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply type: zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply type: block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply type: error.
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
/// Structured reply type: error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

/// `base:allocation` state flag: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The only metadata context this server knows.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Context id this server assigns to `base:allocation`.
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of an option header on the wire (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a simple reply header on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header on the wire.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Largest option payload the server reads; longer options are skipped
/// (without buffering) and answered with [`REP_ERR_TOO_BIG`].
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name, query) allowed by the protocol.
pub const MAX_STRING_LEN: usize = 4096;

/// A transmission request header (the 28 bytes in front of every command).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub command: u16,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (payload length for `CMD_WRITE`).
    pub length: u32,
}

impl RequestHeader {
    /// Parses a request header; fails if the magic is wrong.
    pub fn parse(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, Error> {
        let mut c = Cursor::new(buf);
        let magic = c.u32().unwrap_or(0);
        if magic != REQUEST_MAGIC {
            return Err(Error::Protocol(format!("bad request magic {magic:#010x}")));
        }
        // The lengths are statically right, the defaults are never used.
        Ok(Self {
            flags: c.u16().unwrap_or(0),
            command: c.u16().unwrap_or(0),
            handle: c.u64().unwrap_or(0),
            offset: c.u64().unwrap_or(0),
            length: c.u32().unwrap_or(0),
        })
    }

    /// Encodes the header as a client would send it.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// An option header of the handshake phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Parses an option header; fails if it does not start with `IHAVEOPT`.
    pub fn parse(buf: &[u8; OPTION_HEADER_LEN]) -> Result<Self, Error> {
        let mut c = Cursor::new(buf);
        if c.u64() != Some(IHAVEOPT) {
            return Err(Error::Protocol("bad option magic".into()));
        }
        Ok(Self {
            option: c.u32().unwrap_or(0),
            length: c.u32().unwrap_or(0),
        })
    }
}

/// Parsed data of an `OPT_INFO` / `OPT_GO` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Requested export name.
    pub name: String,
    /// Requested information types (`INFO_*`).
    pub requests: Vec<u16>,
}

/// Parses the data of an `OPT_INFO` / `OPT_GO` option.
///
/// The data must be consumed exactly; trailing or missing bytes are an
/// error (answered with [`REP_ERR_INVALID`] by the server).
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, Error> {
    let mut c = Cursor::new(data);
    let name = c.string32()?;
    let n = c
        .u16()
        .ok_or_else(|| Error::Protocol("info request: missing count".into()))?;
    let mut requests = Vec::with_capacity(usize::from(n).min(c.remaining() / 2));
    for _ in 0..n {
        requests.push(
            c.u16()
                .ok_or_else(|| Error::Protocol("info request: truncated list".into()))?,
        );
    }
    c.finish("info request")?;
    Ok(InfoRequest { name, requests })
}

/// Parsed data of an `OPT_LIST_META_CONTEXT` / `OPT_SET_META_CONTEXT` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export_name: String,
    /// Queries (e.g. `base:allocation`).
    pub queries: Vec<String>,
}

/// Parses the data of a meta context option.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, Error> {
    let mut c = Cursor::new(data);
    let export_name = c.string32()?;
    let n = c
        .u32()
        .ok_or_else(|| Error::Protocol("meta context: missing count".into()))?;
    // Every query needs at least its 4 length bytes: bound the capacity.
    let cap = usize::try_from(n)
        .unwrap_or(usize::MAX)
        .min(c.remaining() / 4);
    let mut queries = Vec::with_capacity(cap);
    for _ in 0..n {
        queries.push(c.string32()?);
    }
    c.finish("meta context")?;
    Ok(MetaContextRequest {
        export_name,
        queries,
    })
}

/// Checks an export name or other protocol string: at most
/// [`MAX_STRING_LEN`] bytes and no NUL character.
pub fn check_string(s: &str) -> Result<(), Error> {
    if s.len() > MAX_STRING_LEN {
        return Err(Error::Protocol(format!(
            "string longer than {MAX_STRING_LEN} bytes"
        )));
    }
    if s.contains('\0') {
        return Err(Error::Protocol("string contains NUL".into()));
    }
    Ok(())
}

/// Size of an option reply header on the wire (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of the server's greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Magic the server sends after [`NBDMAGIC`] in the oldstyle handshake.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Size of the reply to `OPT_EXPORT_NAME` without the 124 zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// The zero bytes after the reply to `OPT_EXPORT_NAME` unless `FLAG_C_NO_ZEROES`.
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Payload of an `OFFSET_HOLE` chunk: offset and length.
pub const HOLE_CHUNK_LEN: u32 = 12;
/// Size of one block status descriptor (length and flags).
pub const BLOCK_DESCRIPTOR_LEN: usize = 8;
/// Most descriptors a block status chunk should carry (the protocol's
/// recommendation, and the most a client of this crate accepts).
pub const MAX_BLOCK_DESCRIPTORS: u32 = 1 << 20;

impl OptionHeader {
    /// Encodes the header as a client sends it in front of the option data.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// The header of an option reply (fixed newstyle handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to (`OPT_*`).
    pub option: u32,
    /// Reply type (`REP_*`).
    pub kind: u32,
    /// Length of the reply data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Encodes the header as the server sends it.
    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
        b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.kind.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Parses an option reply header; fails if the magic is wrong.
    pub fn parse(buf: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<Self, Violation> {
        let mut c = Cursor::new(buf);
        let magic = c.u64().unwrap_or(0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(Violation::BadOptionReplyMagic(magic));
        }
        Ok(Self {
            option: c.u32().unwrap_or(0),
            kind: c.u32().unwrap_or(0),
            length: c.u32().unwrap_or(0),
        })
    }

    /// Whether the reply type is an error (bit 31 set).
    pub fn is_error(&self) -> bool {
        self.kind & 0x8000_0000 != 0
    }
}

/// A simple reply header (without its magic, which tells it apart from a
/// structured reply chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Error value (0: success).
    pub error: u32,
    /// Handle of the request.
    pub handle: u64,
}

impl SimpleReply {
    /// Encodes the reply header with its magic.
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b
    }

    /// Parses the 12 bytes after the magic.
    pub fn parse(buf: &[u8; SIMPLE_REPLY_LEN - 4]) -> Self {
        let mut c = Cursor::new(buf);
        Self {
            error: c.u32().unwrap_or(0),
            handle: c.u64().unwrap_or(0),
        }
    }
}

/// A structured reply chunk header (without its magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags (`REPLY_FLAG_*`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// Handle of the request.
    pub handle: u64,
    /// Length of the payload that follows.
    pub length: u32,
}

impl ChunkHeader {
    /// Encodes the chunk header with its magic.
    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_LEN] {
        let mut b = [0u8; STRUCTURED_REPLY_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Parses the 16 bytes after the magic.
    pub fn parse(buf: &[u8; STRUCTURED_REPLY_LEN - 4]) -> Self {
        let mut c = Cursor::new(buf);
        Self {
            flags: c.u16().unwrap_or(0),
            kind: c.u16().unwrap_or(0),
            handle: c.u64().unwrap_or(0),
            length: c.u32().unwrap_or(0),
        }
    }

    /// Whether this is the last chunk of its reply.
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// Whether the chunk type is an error type (bit 15 set).
    pub fn is_error(&self) -> bool {
        self.kind & 0x8000 != 0
    }
}

/// The data of an `OPT_INFO` / `OPT_GO` option, as a client sends it.
pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    v.extend_from_slice(&len32(name.len()).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&u16::try_from(requests.len()).unwrap_or(0).to_be_bytes());
    for r in requests.iter().take(usize::from(u16::MAX)) {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

/// The data of a meta context option, as a client sends it.
pub fn encode_meta_context_request(export_name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = len32(export_name.len()).to_be_bytes().to_vec();
    v.extend_from_slice(export_name.as_bytes());
    v.extend_from_slice(&len32(queries.len()).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&len32(q.len()).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// A length that the caller has already bounded (protocol strings are at
/// most [`MAX_STRING_LEN`] bytes).
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// An `INFO_EXPORT` item: size and transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoExport {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_*`).
    pub flags: u16,
}

/// Block size constraints as an `INFO_BLOCK_SIZE` item states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoBlockSize {
    /// Minimum block size.
    pub min: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload size.
    pub max: u32,
}

/// One information item of a `REP_INFO` reply that a client of this crate
/// understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// `INFO_EXPORT`.
    Export(InfoExport),
    /// `INFO_BLOCK_SIZE`.
    BlockSize(InfoBlockSize),
    /// Any other type (to be ignored, as the protocol requires).
    Other(u16),
}

/// Parses the data of a `REP_INFO` reply; the known types must have their
/// exact lengths.
pub fn parse_info(data: &[u8]) -> Result<Info, Violation> {
    let mut c = Cursor::new(data);
    let Some(kind) = c.u16() else {
        return Err(Violation::BadInfo {
            info: None,
            len: data.len(),
        });
    };
    let bad = Violation::BadInfo {
        info: Some(kind),
        len: data.len(),
    };
    let info = match kind {
        INFO_EXPORT => Info::Export(InfoExport {
            size: c.u64().ok_or(bad.clone())?,
            flags: c.u16().ok_or(bad.clone())?,
        }),
        INFO_BLOCK_SIZE => {
            let (Some(min), Some(preferred), Some(max)) = (c.u32(), c.u32(), c.u32()) else {
                return Err(bad);
            };
            Info::BlockSize(InfoBlockSize {
                min,
                preferred,
                max,
            })
        }
        other => return Ok(Info::Other(other)),
    };
    if c.remaining() != 0 {
        return Err(bad);
    }
    Ok(info)
}

/// Parses the reply to `OPT_EXPORT_NAME` (size and flags; the zero bytes,
/// if any, are not part of `buf`).
pub fn parse_export_name_reply(buf: &[u8; EXPORT_NAME_REPLY_LEN]) -> InfoExport {
    let mut c = Cursor::new(buf);
    InfoExport {
        size: c.u64().unwrap_or(0),
        flags: c.u16().unwrap_or(0),
    }
}

/// A `REP_META_CONTEXT` reply: the context id and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// Id the server uses for the context in block status replies.
    pub id: u32,
    /// Name of the context.
    pub name: String,
}

/// Parses the data of a `REP_META_CONTEXT` reply.
pub fn parse_meta_context(data: &[u8]) -> Result<MetaContext, Violation> {
    let bad = || Violation::BadMetaContext { len: data.len() };
    let mut c = Cursor::new(data);
    let id = c.u32().ok_or_else(bad)?;
    let raw = c.bytes(c.remaining()).unwrap_or_default();
    if raw.len() > MAX_STRING_LEN {
        return Err(bad());
    }
    let name = std::str::from_utf8(raw).map_err(|_| bad())?;
    Ok(MetaContext {
        id,
        name: name.to_owned(),
    })
}

/// The fixed part of an error chunk (`REPLY_TYPE_ERROR`, `REPLY_TYPE_ERROR_OFFSET`
/// and unknown types with bit 15 set): the error value and message length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorChunkHead {
    /// Error value (nonzero).
    pub error: u32,
    /// Length of the message that follows.
    pub message_len: u16,
}

/// Size of [`ErrorChunkHead`] on the wire.
pub const ERROR_CHUNK_HEAD_LEN: usize = 6;

impl ErrorChunkHead {
    /// Parses the 6 bytes at the start of an error chunk's payload.
    pub fn parse(buf: &[u8; ERROR_CHUNK_HEAD_LEN]) -> Self {
        let mut c = Cursor::new(buf);
        Self {
            error: c.u32().unwrap_or(0),
            message_len: c.u16().unwrap_or(0),
        }
    }
}

/// One block status descriptor: length and status flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    /// Length of the extent (nonzero in a valid reply).
    pub length: u32,
    /// Status flags (`STATE_*` for `base:allocation`).
    pub flags: u32,
}

impl BlockDescriptor {
    /// Parses one descriptor.
    pub fn parse(buf: &[u8; BLOCK_DESCRIPTOR_LEN]) -> Self {
        let mut c = Cursor::new(buf);
        Self {
            length: c.u32().unwrap_or(0),
            flags: c.u32().unwrap_or(0),
        }
    }
}

/// An NBD command, for messages and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Command {
    /// `CMD_READ`.
    Read,
    /// `CMD_WRITE`.
    Write,
    /// `CMD_DISC`.
    Disconnect,
    /// `CMD_FLUSH`.
    Flush,
    /// `CMD_TRIM`.
    Trim,
    /// `CMD_CACHE`.
    Cache,
    /// `CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `CMD_BLOCK_STATUS`.
    BlockStatus,
}

impl Command {
    /// The command type on the wire.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disconnect => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Read => "NBD_CMD_READ",
            Command::Write => "NBD_CMD_WRITE",
            Command::Disconnect => "NBD_CMD_DISC",
            Command::Flush => "NBD_CMD_FLUSH",
            Command::Trim => "NBD_CMD_TRIM",
            Command::Cache => "NBD_CMD_CACHE",
            Command::WriteZeroes => "NBD_CMD_WRITE_ZEROES",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
        })
    }
}

/// Bounds-checked big-endian reader over a byte slice.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// A string preceded by its 32-bit length.
    fn string32(&mut self) -> Result<String, Error> {
        let len = self
            .u32()
            .ok_or_else(|| Error::Protocol("truncated string length".into()))?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_STRING_LEN {
            return Err(Error::Protocol("string too long".into()));
        }
        let raw = self
            .bytes(len)
            .ok_or_else(|| Error::Protocol("string exceeds option length".into()))?;
        let s =
            std::str::from_utf8(raw).map_err(|_| Error::Protocol("string is not UTF-8".into()))?;
        check_string(s)?;
        Ok(s.to_owned())
    }

    fn finish(&self, what: &str) -> Result<(), Error> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(Error::Protocol(format!("{what}: trailing bytes")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }

    #[test]
    fn request_header_roundtrip() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(RequestHeader::parse(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(RequestHeader::parse(&bad).is_err());
    }

    #[test]
    fn option_header() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..].copy_from_slice(&7u32.to_be_bytes());
        let h = OptionHeader::parse(&b).unwrap();
        assert_eq!((h.option, h.length), (OPT_GO, 7));
        b[0] = 0;
        assert!(OptionHeader::parse(&b).is_err());
    }

    #[test]
    fn info_request_parsing() {
        let r = parse_info_request(&info("disk", &[INFO_BLOCK_SIZE, INFO_NAME])).unwrap();
        assert_eq!(r.name, "disk");
        assert_eq!(r.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        assert!(parse_info_request(&info("", &[])).unwrap().name.is_empty());
        // Truncated, trailing, oversized name length, too short.
        let mut d = info("disk", &[1, 2]);
        d.pop();
        assert!(parse_info_request(&d).is_err());
        let mut d = info("disk", &[1]);
        d.push(0);
        assert!(parse_info_request(&d).is_err());
        let mut d = info("disk", &[]);
        d[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&d).is_err());
        assert!(parse_info_request(&[0, 0, 0]).is_err());
        // Counts bigger than the data do not allocate or panic.
        let mut d = info("", &[]);
        d[4..6].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(parse_info_request(&d).is_err());
        // NUL in the name.
        assert!(parse_info_request(&info("a\0b", &[])).is_err());
    }

    #[test]
    fn meta_context_parsing() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let r = parse_meta_context_request(&d).unwrap();
        assert_eq!(r.export_name, "disk");
        assert_eq!(r.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
        for cut in 0..d.len() {
            assert!(parse_meta_context_request(&d[..cut]).is_err(), "cut {cut}");
        }
        let mut huge = 0u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&huge).is_err());
    }

    #[test]
    fn reply_headers_roundtrip() {
        let o = OptionReplyHeader {
            option: OPT_GO,
            kind: REP_ERR_UNKNOWN,
            length: 9,
        };
        let b = o.encode();
        assert_eq!(OptionReplyHeader::parse(&b).unwrap(), o);
        assert!(o.is_error());
        let mut bad = b;
        bad[0] ^= 1;
        assert!(matches!(
            OptionReplyHeader::parse(&bad),
            Err(Violation::BadOptionReplyMagic(_))
        ));
        let r = SimpleReply {
            error: 5,
            handle: 77,
        };
        let b = r.encode();
        assert_eq!(
            u32::from_be_bytes(b[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(SimpleReply::parse(b[4..].try_into().unwrap()), r);
        let c = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_ERROR,
            handle: 1 << 60,
            length: 6,
        };
        let b = c.encode();
        assert_eq!(ChunkHeader::parse(b[4..].try_into().unwrap()), c);
        assert!(c.is_done() && c.is_error());
        let h = OptionHeader {
            option: OPT_GO,
            length: 3,
        };
        assert_eq!(OptionHeader::parse(&h.encode()).unwrap(), h);
    }

    #[test]
    fn info_items() {
        let mut e = INFO_EXPORT.to_be_bytes().to_vec();
        e.extend_from_slice(&(1u64 << 33).to_be_bytes());
        e.extend_from_slice(&FLAG_HAS_FLAGS.to_be_bytes());
        assert_eq!(
            parse_info(&e).unwrap(),
            Info::Export(InfoExport {
                size: 1 << 33,
                flags: FLAG_HAS_FLAGS
            })
        );
        for cut in 0..e.len() {
            assert!(parse_info(&e[..cut]).is_err(), "cut {cut}");
        }
        e.push(0);
        assert!(parse_info(&e).is_err());
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, 1 << 25] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        assert!(matches!(parse_info(&b).unwrap(), Info::BlockSize(_)));
        assert_eq!(parse_info(&[0, 9, 1, 2, 3]).unwrap(), Info::Other(9));
        let mut m = 7u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"base:allocation");
        let ctx = parse_meta_context(&m).unwrap();
        assert_eq!((ctx.id, ctx.name.as_str()), (7, "base:allocation"));
        assert!(parse_meta_context(&m[..3]).is_err());
        assert!(parse_meta_context(&[0, 0, 0, 1, 0xff]).is_err());
        let data = encode_meta_context_request("disk", &["base:allocation"]);
        let r = parse_meta_context_request(&data).unwrap();
        assert_eq!(r.queries, vec!["base:allocation"]);
        let r = parse_info_request(&encode_info_request("disk", &[INFO_BLOCK_SIZE])).unwrap();
        assert_eq!(
            (r.name.as_str(), r.requests),
            ("disk", vec![INFO_BLOCK_SIZE])
        );
    }
}
