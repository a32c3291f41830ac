//! The fixed newstyle handshake (option haggling).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::proto::*;
use crate::{BlockSize, Error, Export};

/// The state the transmission phase needs, fixed at the end of the handshake.
pub(crate) struct Session {
    pub export: Arc<dyn Export>,
    pub size: u64,
    pub read_only: bool,
    pub block: BlockSize,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected for this export.
    pub base_allocation: bool,
    pub flags: u16,
}

pub(crate) enum Outcome {
    /// Enter the transmission phase.
    Transmission(Session),
    /// The client aborted or went away during the handshake.
    Closed,
}

/// Negotiated state while haggling.
#[derive(Default)]
struct State {
    no_zeroes: bool,
    structured: bool,
    /// Export name of the last successful `OPT_SET_META_CONTEXT` that
    /// selected `base:allocation`.
    meta_export: Option<String>,
}

impl State {
    fn session(&self, name: &str, export: &Arc<dyn Export>) -> Session {
        let read_only = export.read_only();
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH;
        if read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_WRITE_ZEROES;
        }
        if self.structured {
            flags |= FLAG_SEND_DF;
        }
        if export.can_multi_conn() {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        Session {
            export: Arc::clone(export),
            size: export.size(),
            read_only,
            block: export.block_size(),
            structured: self.structured,
            base_allocation: self.structured && self.meta_export.as_deref() == Some(name),
            flags,
        }
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the
/// first byte.
pub(crate) fn read_exact_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads and drops `len` bytes using a fixed-size buffer.
pub(crate) fn discard<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn send_reply<W: Write>(w: &mut W, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("option reply too long"))?;
    let mut msg = Vec::with_capacity(20 + data.len());
    msg.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg)?;
    w.flush()
}

fn info_export(s: &Session) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&s.size.to_be_bytes());
    d.extend_from_slice(&s.flags.to_be_bytes());
    d
}

fn info_block_size(b: &BlockSize) -> Vec<u8> {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [b.min, b.preferred, b.max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

fn meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// Runs the server side of the fixed newstyle handshake.
pub(crate) fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    exports: &BTreeMap<String, Arc<dyn Export>>,
) -> Result<Outcome, Error> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting)?;
    w.flush()?;

    let mut cf = [0u8; 4];
    if !read_exact_or_eof(r, &mut cf)? {
        return Ok(Outcome::Closed);
    }
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Error::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let mut st = State {
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        ..State::default()
    };

    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        if !read_exact_or_eof(r, &mut hdr)? {
            return Ok(Outcome::Closed);
        }
        let OptionHeader { option, length } = OptionHeader::parse(&hdr)?;
        if length > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                return Err(Error::Protocol("export name too long".into()));
            }
            discard(r, u64::from(length))?;
            send_reply(w, option, REP_ERR_TOO_BIG, b"option data too long")?;
            continue;
        }
        // Bounded by MAX_OPTION_LEN.
        let mut data = vec![0u8; length as usize];
        r.read_exact(&mut data)?;

        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data)
                    .map_err(|_| Error::Protocol("export name is not UTF-8".into()))?;
                // No way to report an error here: hard disconnect.
                let export = exports
                    .get(&name)
                    .ok_or_else(|| Error::Protocol(format!("unknown export {name:?}")))?;
                let session = st.session(&name, export);
                let mut msg = Vec::with_capacity(134);
                msg.extend_from_slice(&session.size.to_be_bytes());
                msg.extend_from_slice(&session.flags.to_be_bytes());
                if !st.no_zeroes {
                    msg.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&msg)?;
                w.flush()?;
                return Ok(Outcome::Transmission(session));
            }
            OPT_ABORT => {
                // The client may already have closed the connection.
                let _ = send_reply(w, option, REP_ACK, &[]);
                return Ok(Outcome::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_reply(w, option, REP_ERR_INVALID, b"OPT_LIST takes no data")?;
                    continue;
                }
                for name in exports.keys() {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    send_reply(w, option, REP_SERVER, &d)?;
                }
                send_reply(w, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(&data) {
                    Ok(req) => req,
                    Err(e) => {
                        send_reply(w, option, REP_ERR_INVALID, e.to_string().as_bytes())?;
                        continue;
                    }
                };
                let Some(export) = exports.get(&req.name) else {
                    let msg = format!("unknown export {:?}", req.name);
                    send_reply(w, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let session = st.session(&req.name, export);
                send_reply(w, option, REP_INFO, &info_export(&session))?;
                if req.requests.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(req.name.as_bytes());
                    send_reply(w, option, REP_INFO, &d)?;
                }
                // Always sent: clients ignore information they did not ask for.
                send_reply(w, option, REP_INFO, &info_block_size(&session.block))?;
                send_reply(w, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(Outcome::Transmission(session));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_reply(w, option, REP_ERR_INVALID, b"option takes no data")?;
                    continue;
                }
                st.structured = true;
                send_reply(w, option, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // Replaced even if the option fails.
                    st.meta_export = None;
                }
                if !st.structured {
                    send_reply(
                        w,
                        option,
                        REP_ERR_INVALID,
                        b"structured replies not negotiated",
                    )?;
                    continue;
                }
                let req = match parse_meta_context_request(&data) {
                    Ok(req) => req,
                    Err(e) => {
                        send_reply(w, option, REP_ERR_INVALID, e.to_string().as_bytes())?;
                        continue;
                    }
                };
                if !exports.contains_key(&req.export_name) {
                    let msg = format!("unknown export {:?}", req.export_name);
                    send_reply(w, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                }
                if req.queries.iter().any(|q| !q.contains(':')) {
                    send_reply(w, option, REP_ERR_INVALID, b"query without namespace")?;
                    continue;
                }
                let selected = if set {
                    req.queries.iter().any(|q| q == META_BASE_ALLOCATION)
                } else {
                    req.queries.is_empty()
                        || req
                            .queries
                            .iter()
                            .any(|q| q == "base:" || q == META_BASE_ALLOCATION)
                };
                if selected {
                    let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
                    let d = meta_context_reply(id, META_BASE_ALLOCATION);
                    send_reply(w, option, REP_META_CONTEXT, &d)?;
                    if set {
                        st.meta_export = Some(req.export_name);
                    }
                }
                send_reply(w, option, REP_ACK, &[])?;
            }
            _ => {
                send_reply(w, option, REP_ERR_UNSUP, b"option not supported")?;
            }
        }
    }
}
