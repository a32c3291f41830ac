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
    let header = OptionReplyHeader {
        option,
        kind,
        length: len,
    };
    let mut msg = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    msg.extend_from_slice(&header.encode());
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

/// What an option leaves the handshake to do.
enum Step {
    /// Read the next option.
    Next,
    /// The handshake is over.
    Done(Outcome),
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
    let mut haggle = Haggle {
        w,
        exports,
        st: State {
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            ..State::default()
        },
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
            haggle.reply(option, REP_ERR_TOO_BIG, b"option data too long")?;
            continue;
        }
        // Bounded by MAX_OPTION_LEN.
        let mut data = vec![0u8; length as usize];
        r.read_exact(&mut data)?;

        let step = match option {
            OPT_EXPORT_NAME => haggle.export_name(data)?,
            OPT_ABORT => haggle.abort(),
            OPT_LIST => haggle.list(&data)?,
            OPT_INFO | OPT_GO => haggle.info(option, &data)?,
            OPT_STRUCTURED_REPLY => haggle.structured_reply(&data)?,
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => haggle.meta_context(option, &data)?,
            _ => {
                haggle.reply(option, REP_ERR_UNSUP, b"option not supported")?;
                Step::Next
            }
        };
        if let Step::Done(outcome) = step {
            return Ok(outcome);
        }
    }
}

/// The option haggling after the greeting: one method per option.
struct Haggle<'a, W> {
    w: &'a mut W,
    exports: &'a BTreeMap<String, Arc<dyn Export>>,
    st: State,
}

impl<W: Write> Haggle<'_, W> {
    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        send_reply(self.w, option, kind, data)
    }

    /// Replies with an error and goes on to the next option.
    fn refuse(&mut self, option: u32, kind: u32, msg: &[u8]) -> io::Result<Step> {
        self.reply(option, kind, msg)?;
        Ok(Step::Next)
    }

    /// `NBD_OPT_EXPORT_NAME`: enters transmission, or disconnects (it cannot report an
    /// error).
    fn export_name(&mut self, data: Vec<u8>) -> Result<Step, Error> {
        let name = String::from_utf8(data)
            .map_err(|_| Error::Protocol("export name is not UTF-8".into()))?;
        // No way to report an error here: hard disconnect.
        let export = self
            .exports
            .get(&name)
            .ok_or_else(|| Error::Protocol(format!("unknown export {name:?}")))?;
        let session = self.st.session(&name, export);
        let mut msg = Vec::with_capacity(134);
        msg.extend_from_slice(&session.size.to_be_bytes());
        msg.extend_from_slice(&session.flags.to_be_bytes());
        if !self.st.no_zeroes {
            msg.extend_from_slice(&[0u8; 124]);
        }
        self.w.write_all(&msg)?;
        self.w.flush()?;
        Ok(Step::Done(Outcome::Transmission(session)))
    }

    /// `NBD_OPT_ABORT`.
    fn abort(&mut self) -> Step {
        // The client may already have closed the connection.
        let _ = self.reply(OPT_ABORT, REP_ACK, &[]);
        Step::Done(Outcome::Closed)
    }

    /// `NBD_OPT_LIST`.
    fn list(&mut self, data: &[u8]) -> io::Result<Step> {
        if !data.is_empty() {
            return self.refuse(OPT_LIST, REP_ERR_INVALID, b"OPT_LIST takes no data");
        }
        for name in self.exports.keys() {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            send_reply(self.w, OPT_LIST, REP_SERVER, &d)?;
        }
        self.reply(OPT_LIST, REP_ACK, &[])?;
        Ok(Step::Next)
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO` (which then enters transmission).
    fn info(&mut self, option: u32, data: &[u8]) -> io::Result<Step> {
        let req = match parse_info_request(data) {
            Ok(req) => req,
            Err(e) => return self.refuse(option, REP_ERR_INVALID, e.to_string().as_bytes()),
        };
        let Some(export) = self.exports.get(&req.name) else {
            let msg = format!("unknown export {:?}", req.name);
            return self.refuse(option, REP_ERR_UNKNOWN, msg.as_bytes());
        };
        let session = self.st.session(&req.name, export);
        self.reply(option, REP_INFO, &info_export(&session))?;
        if req.requests.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(req.name.as_bytes());
            self.reply(option, REP_INFO, &d)?;
        }
        // Always sent: clients ignore information they did not ask for.
        self.reply(option, REP_INFO, &info_block_size(&session.block))?;
        self.reply(option, REP_ACK, &[])?;
        Ok(if option == OPT_GO {
            Step::Done(Outcome::Transmission(session))
        } else {
            Step::Next
        })
    }

    /// `NBD_OPT_STRUCTURED_REPLY`.
    fn structured_reply(&mut self, data: &[u8]) -> io::Result<Step> {
        let option = OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return self.refuse(option, REP_ERR_INVALID, b"option takes no data");
        }
        self.st.structured = true;
        self.reply(option, REP_ACK, &[])?;
        Ok(Step::Next)
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: only
    /// `base:allocation` exists.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<Step> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // Replaced even if the option fails.
            self.st.meta_export = None;
        }
        if !self.st.structured {
            return self.refuse(
                option,
                REP_ERR_INVALID,
                b"structured replies not negotiated",
            );
        }
        let req = match parse_meta_context_request(data) {
            Ok(req) => req,
            Err(e) => return self.refuse(option, REP_ERR_INVALID, e.to_string().as_bytes()),
        };
        if !self.exports.contains_key(&req.export_name) {
            let msg = format!("unknown export {:?}", req.export_name);
            return self.refuse(option, REP_ERR_UNKNOWN, msg.as_bytes());
        }
        if req.queries.iter().any(|q| !q.contains(':')) {
            return self.refuse(option, REP_ERR_INVALID, b"query without namespace");
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
            self.reply(option, REP_META_CONTEXT, &d)?;
            if set {
                self.st.meta_export = Some(req.export_name);
            }
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(Step::Next)
    }
}
