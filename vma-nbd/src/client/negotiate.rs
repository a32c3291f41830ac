//! The client side of the fixed newstyle handshake.

use std::io::{self, Read, Write};

use crate::export::MAX_PAYLOAD;
use crate::proto::*;
use crate::{BlockSize, Error, Violation};

/// What the client asks for.
#[derive(Debug, Clone)]
pub(crate) struct Wishes {
    pub export: String,
    pub structured: bool,
    pub block_status: bool,
}

/// What the handshake settled; fixed for the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    /// The constraints the client obeys (the server's, with the maximum
    /// capped at [`MAX_PAYLOAD`] and rounded down to the minimum).
    pub block: BlockSize,
    pub structured: bool,
    /// The id of `base:allocation`, if the server selected it.
    pub base_allocation: Option<u32>,
}

/// The server's answer to one option, once its replies are read.
enum Answer {
    Ack,
    Refused { reply: u32, message: String },
}

/// Reads exactly `buf.len()` bytes; a close is [`Error::HandshakeClosed`].
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), Error> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => Error::HandshakeClosed,
        _ => Error::Io(e),
    })
}

fn send_option<W: Write>(w: &mut W, option: u32, data: &[u8]) -> Result<(), Error> {
    let length = u32::try_from(data.len()).map_err(|_| io::Error::other("option too long"))?;
    let mut msg = OptionHeader { option, length }.encode().to_vec();
    msg.extend_from_slice(data);
    w.write_all(&msg)?;
    w.flush()?;
    Ok(())
}

/// Reads one option reply (header and data, at most [`MAX_OPTION_LEN`] bytes).
fn read_reply<R: Read>(r: &mut R, option: u32) -> Result<(OptionReplyHeader, Vec<u8>), Error> {
    let mut hdr = [0u8; OPTION_REPLY_HEADER_LEN];
    read_full(r, &mut hdr)?;
    let h = OptionReplyHeader::parse(&hdr)?;
    if h.option != option {
        return Err(Violation::WrongOption {
            expected: option,
            got: h.option,
        }
        .into());
    }
    if h.length > MAX_OPTION_LEN {
        return Err(Violation::OptionReplyTooLong {
            len: h.length,
            max: MAX_OPTION_LEN,
        }
        .into());
    }
    // Bounded by MAX_OPTION_LEN.
    let mut data = vec![0u8; h.length as usize];
    read_full(r, &mut data)?;
    Ok((h, data))
}

fn message(data: &[u8]) -> String {
    String::from_utf8_lossy(&data[..data.len().min(MAX_STRING_LEN)]).into_owned()
}

/// Most replies accepted for one option (a few are normal).
const MAX_OPTION_REPLIES: usize = 1024;

/// Reads the replies to an option: `on_reply` sees every non-final one.
fn answer<R: Read>(
    r: &mut R,
    option: u32,
    mut on_reply: impl FnMut(u32, &[u8]) -> Result<(), Error>,
) -> Result<Answer, Error> {
    for _ in 0..MAX_OPTION_REPLIES {
        let (h, data) = read_reply(r, option)?;
        if h.is_error() {
            return Ok(Answer::Refused {
                reply: h.kind,
                message: message(&data),
            });
        }
        if h.kind == REP_ACK {
            if !data.is_empty() {
                return Err(Violation::UnexpectedOptionReply {
                    option,
                    kind: h.kind,
                }
                .into());
            }
            return Ok(Answer::Ack);
        }
        on_reply(h.kind, &data)?;
    }
    Err(Violation::TooManyOptionReplies(option).into())
}

/// Checks and adopts the server's block size constraints.
fn block_size(b: InfoBlockSize) -> Result<BlockSize, Violation> {
    let bad = Violation::BadBlockSize {
        min: b.min,
        preferred: b.preferred,
        max: b.max,
    };
    let min_ok = b.min.is_power_of_two() && b.min <= 65536;
    let preferred_ok = b.preferred.is_power_of_two() && b.preferred >= b.min.max(512);
    if !min_ok || !preferred_ok || b.max < b.preferred {
        return Err(bad);
    }
    // A server may announce "no limit" (0xffffffff): stay within what the
    // protocol calls safe, and on the minimum's grid.
    let max = b.max.min(MAX_PAYLOAD) / b.min * b.min;
    Ok(BlockSize {
        min: b.min,
        preferred: b.preferred,
        max,
    })
}

fn check_flags(flags: u16) -> Result<u16, Violation> {
    if flags & FLAG_HAS_FLAGS == 0 {
        return Err(Violation::MissingHasFlags(flags));
    }
    Ok(flags)
}

/// Runs the handshake and returns what it settled.
pub(crate) fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    wishes: &Wishes,
) -> Result<Negotiated, Error> {
    check_string(&wishes.export).map_err(|_| Error::InvalidExport {
        name: wishes.export.clone(),
        reason: "not a valid NBD export name".into(),
    })?;
    let mut greeting = [0u8; GREETING_LEN];
    read_full(r, &mut greeting)?;
    let magic = u64::from_be_bytes(greeting[0..8].try_into().unwrap_or_default());
    if magic != NBDMAGIC {
        return Err(Violation::BadGreeting(magic).into());
    }
    let second = u64::from_be_bytes(greeting[8..16].try_into().unwrap_or_default());
    if second != IHAVEOPT {
        return Err(if second == OLDSTYLE_MAGIC {
            Violation::Oldstyle
        } else {
            Violation::BadGreeting(second)
        }
        .into());
    }
    let hflags = u16::from_be_bytes([greeting[16], greeting[17]]);
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = 0;
    if fixed {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes())?;
    if !fixed {
        // Plain newstyle knows nothing but NBD_OPT_EXPORT_NAME.
        return export_name(r, w, &wishes.export, no_zeroes, false, None);
    }

    let structured = wishes.structured && {
        send_option(w, OPT_STRUCTURED_REPLY, &[])?;
        let a = answer(r, OPT_STRUCTURED_REPLY, |kind, _| {
            Err(Violation::UnexpectedOptionReply {
                option: OPT_STRUCTURED_REPLY,
                kind,
            }
            .into())
        })?;
        matches!(a, Answer::Ack)
    };
    let base_allocation = if structured && wishes.block_status {
        set_meta_context(r, w, &wishes.export)?
    } else {
        None
    };
    go(r, w, wishes, no_zeroes, structured, base_allocation)
}

/// Selects `base:allocation`; `None` if the server does not offer it.
fn set_meta_context<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &str,
) -> Result<Option<u32>, Error> {
    let data = encode_meta_context_request(export, &[META_BASE_ALLOCATION]);
    send_option(w, OPT_SET_META_CONTEXT, &data)?;
    let mut id = None;
    let a = answer(r, OPT_SET_META_CONTEXT, |kind, data| {
        expect_reply(OPT_SET_META_CONTEXT, kind, REP_META_CONTEXT)?;
        let ctx = parse_meta_context(data)?;
        if ctx.name != META_BASE_ALLOCATION || id.is_some() {
            return Err(Violation::UnexpectedMetaContext(ctx.name).into());
        }
        id = Some(ctx.id);
        Ok(())
    })?;
    Ok(match a {
        Answer::Ack => id,
        // Treated as "no block status": everything reads as data.
        Answer::Refused { .. } => None,
    })
}

/// `NBD_OPT_GO` with a block size request, falling back to
/// `NBD_OPT_EXPORT_NAME` if the server does not know it.
fn go<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    wishes: &Wishes,
    no_zeroes: bool,
    structured: bool,
    base_allocation: Option<u32>,
) -> Result<Negotiated, Error> {
    send_option(
        w,
        OPT_GO,
        &encode_info_request(&wishes.export, &[INFO_BLOCK_SIZE]),
    )?;
    let mut export = None;
    let mut block = None;
    let a = answer(r, OPT_GO, |kind, data| {
        expect_reply(OPT_GO, kind, REP_INFO)?;
        match parse_info(data)? {
            Info::Export(e) => export = Some(e),
            Info::BlockSize(b) => block = Some(block_size(b)?),
            Info::Other(_) => {}
        }
        Ok(())
    })?;
    match a {
        Answer::Ack => {
            let e = export.ok_or(Violation::MissingExportInfo)?;
            Ok(Negotiated {
                size: e.size,
                flags: check_flags(e.flags)?,
                block: block.unwrap_or_default(),
                structured,
                base_allocation,
            })
        }
        Answer::Refused {
            reply: REP_ERR_UNSUP,
            ..
        } => export_name(r, w, &wishes.export, no_zeroes, structured, base_allocation),
        Answer::Refused { reply, message } => Err(Error::Refused {
            option: "NBD_OPT_GO",
            reply,
            message,
        }),
    }
}

fn export_name<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &str,
    no_zeroes: bool,
    structured: bool,
    base_allocation: Option<u32>,
) -> Result<Negotiated, Error> {
    send_option(w, OPT_EXPORT_NAME, export.as_bytes())?;
    let mut reply = [0u8; EXPORT_NAME_REPLY_LEN];
    read_full(r, &mut reply)?;
    let e = parse_export_name_reply(&reply);
    if !no_zeroes {
        let mut zeroes = [0u8; EXPORT_NAME_ZEROES];
        read_full(r, &mut zeroes)?;
        if zeroes.iter().any(|&b| b != 0) {
            return Err(Violation::BadPadding.into());
        }
    }
    Ok(Negotiated {
        size: e.size,
        flags: check_flags(e.flags)?,
        block: BlockSize::default(),
        structured,
        base_allocation,
    })
}

/// Checks that the server answered `option` with a reply of the kind `wanted`.
fn expect_reply(option: u32, kind: u32, wanted: u32) -> Result<(), Error> {
    if kind == wanted {
        Ok(())
    } else {
        Err(Violation::UnexpectedOptionReply { option, kind }.into())
    }
}
