//! The reply side of a client connection: requests in flight, and the loop
//! that reads, checks and delivers the server's replies.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Condvar, Mutex};

use super::negotiate::Negotiated;
use crate::handshake::{discard, read_exact_or_eof};
use crate::proto::*;
use crate::transmission::lock;
use crate::{BlockStatus, Errno, Error, Violation};

/// Most separate pieces a read reply may arrive in before it merges (a
/// server that sends its chunks in order never has more than one).
pub(crate) const MAX_PIECES: usize = 4096;
/// Longest payload accepted for an error chunk.
const MAX_ERROR_CHUNK: u32 = 64 * 1024;
/// Descriptors read from the socket at a time.
const DESCRIPTOR_BATCH: usize = 512;

/// What a request collects while its reply arrives.
#[derive(Debug)]
pub(crate) enum Body {
    /// A read: the buffer (taken out while the reader fills it) and which
    /// parts of it the reply has delivered.
    Read {
        buf: Option<Vec<u8>>,
        coverage: Coverage,
    },
    /// A block status query: the extents, once their chunk arrived.
    Status { extents: Option<Vec<BlockStatus>> },
    /// Anything else: only success or failure.
    Other,
}

/// A request in flight, or answered but not yet collected.
#[derive(Debug)]
pub(crate) struct Entry {
    pub command: Command,
    pub offset: u64,
    pub len: u32,
    /// Budget it holds while unanswered.
    pub cost: usize,
    pub body: Body,
    /// The first error the server reported for it.
    pub error: Option<Error>,
    /// The reply is complete.
    pub done: bool,
    /// Nobody will collect the result.
    pub abandoned: bool,
}

/// What a completed request produced.
#[derive(Debug)]
pub(crate) enum Outcome {
    Data(Vec<u8>),
    Extents(Vec<BlockStatus>),
    Done,
}

impl Entry {
    pub(crate) fn new(command: Command, offset: u64, len: u32, cost: usize, body: Body) -> Entry {
        Entry {
            command,
            offset,
            len,
            cost,
            body,
            error: None,
            done: false,
            abandoned: false,
        }
    }

    pub(crate) fn into_outcome(self) -> Result<Outcome, Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        Ok(match self.body {
            Body::Read { buf, .. } => Outcome::Data(buf.unwrap_or_default()),
            Body::Status { extents } => Outcome::Extents(extents.unwrap_or_default()),
            Body::Other => Outcome::Done,
        })
    }
}

/// Byte ranges of a read request that its reply has delivered, relative to
/// the request's offset: sorted, disjoint, and merged where they touch.
#[derive(Debug, Default)]
pub(crate) struct Coverage {
    ranges: Vec<(u64, u64)>,
    total: u64,
}

impl Coverage {
    /// Adds `start..end` (non-empty); fails if it overlaps what is there.
    pub(crate) fn insert(&mut self, start: u64, end: u64) -> Result<(), Violation> {
        let overlap = Violation::ChunkOverlap {
            offset: start,
            len: end - start,
        };
        let i = self.ranges.partition_point(|r| r.1 < start);
        for r in self.ranges[i..].iter().take_while(|r| r.0 < end) {
            if r.1 > start {
                return Err(overlap);
            }
        }
        let left = self.ranges.get(i).is_some_and(|r| r.1 == start);
        let k = if left { i + 1 } else { i };
        let right = self.ranges.get(k).is_some_and(|r| r.0 == end);
        match (left, right) {
            (true, true) => {
                self.ranges[i].1 = self.ranges[k].1;
                self.ranges.remove(k);
            }
            (true, false) => self.ranges[i].1 = end,
            (false, true) => self.ranges[k].0 = start,
            (false, false) => {
                if self.ranges.len() >= MAX_PIECES {
                    return Err(Violation::TooFragmented(MAX_PIECES));
                }
                self.ranges.insert(i, (start, end));
            }
        }
        self.total += end - start;
        Ok(())
    }

    /// Bytes delivered.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }
}

/// Mutable state of a connection, under [`Shared::state`].
#[derive(Debug, Default)]
pub(crate) struct State {
    pub entries: HashMap<u64, Entry>,
    pub next_handle: u64,
    /// Requests sent and not yet answered, and the payload bytes they hold.
    pub in_flight: usize,
    pub in_flight_bytes: usize,
    /// Why the connection ended; set once.
    pub failed: Option<Arc<Error>>,
    /// The server answered `ESHUTDOWN`.
    pub shutdown: bool,
}

/// Undoes the socket when the connection must end now.
pub(crate) type Hangup = Box<dyn Fn() + Send + Sync>;

/// What the submitting threads and the reply reader share.
pub(crate) struct Shared {
    pub info: Negotiated,
    pub state: Mutex<State>,
    pub cv: Condvar,
    pub hangup: Option<Hangup>,
}

impl Shared {
    /// Ends the connection with `cause` (unless it has already ended) and
    /// wakes everybody; returns the cause that stands.
    pub(crate) fn fail(&self, st: &mut State, cause: Error) -> Arc<Error> {
        let cause = st.failed.get_or_insert_with(|| Arc::new(cause)).clone();
        if let Some(h) = &self.hangup {
            h();
        }
        self.cv.notify_all();
        cause
    }
}

/// The parts of a request a chunk is checked against.
#[derive(Clone, Copy)]
struct Target {
    command: Command,
    offset: u64,
    len: u32,
}

impl Target {
    fn contains(&self, offset: u64, len: u64) -> Result<u64, Violation> {
        let out = Violation::ChunkOutOfBounds {
            offset,
            len,
            request_offset: self.offset,
            request_len: self.len,
        };
        let rel = offset.checked_sub(self.offset).ok_or(out.clone())?;
        match rel.checked_add(len) {
            Some(end) if end <= u64::from(self.len) => Ok(rel),
            _ => Err(out),
        }
    }
}

/// Reads replies until the server closes the connection or breaks the
/// protocol; then fails whatever is still in flight.
pub(crate) fn run(mut r: impl Read, shared: &Shared) -> Result<(), Arc<Error>> {
    let result = loop {
        match receive(&mut r, shared) {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let mut st = lock(&shared.state);
    match result {
        Ok(()) if st.in_flight == 0 => {
            // Later requests fail; nobody waits for an answer now.
            shared.fail(&mut st, Error::ServerClosed);
            Ok(())
        }
        Ok(()) => Err(shared.fail(&mut st, Error::ServerClosed)),
        Err(e) => Err(shared.fail(&mut st, e)),
    }
}

/// Reads one reply message; `Ok(false)` at a close between messages.
fn receive(r: &mut impl Read, shared: &Shared) -> Result<bool, Error> {
    let mut magic = [0u8; 4];
    if !read_exact_or_eof(r, &mut magic).map_err(closed)? {
        return Ok(false);
    }
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => {
            let mut b = [0u8; SIMPLE_REPLY_LEN - 4];
            r.read_exact(&mut b).map_err(closed)?;
            simple(r, shared, SimpleReply::parse(&b))?;
        }
        STRUCTURED_REPLY_MAGIC => {
            if !shared.info.structured {
                return Err(Violation::UnexpectedStructuredReply.into());
            }
            let mut b = [0u8; STRUCTURED_REPLY_LEN - 4];
            r.read_exact(&mut b).map_err(closed)?;
            chunk(r, shared, ChunkHeader::parse(&b))?;
        }
        other => return Err(Violation::BadReplyMagic(other).into()),
    }
    Ok(true)
}

/// A close in the middle of a message, or a reset, is the server going away.
fn closed(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => Error::ServerClosed,
        _ => Error::Io(e),
    }
}

/// The request a reply is for; only requests still waiting for their reply count.
fn target(shared: &Shared, handle: u64) -> Result<Target, Violation> {
    let st = lock(&shared.state);
    match st.entries.get(&handle) {
        Some(e) if !e.done => Ok(Target {
            command: e.command,
            offset: e.offset,
            len: e.len,
        }),
        _ => Err(Violation::UnknownHandle(handle)),
    }
}

fn simple(r: &mut impl Read, shared: &Shared, h: SimpleReply) -> Result<(), Error> {
    let t = target(shared, h.handle)?;
    if shared.info.structured && t.command == Command::Read {
        return Err(Violation::UnexpectedSimpleReply(t.command).into());
    }
    if h.error != 0 {
        record_error(shared, h.handle, t, h.error, String::new());
    } else if t.command == Command::Read {
        cover(shared, h.handle, 0, u64::from(t.len))?;
        fill(r, shared, h.handle, 0, u64::from(t.len))?;
    } else if t.command == Command::BlockStatus {
        return Err(Violation::UnexpectedSimpleReply(t.command).into());
    }
    complete(shared, h.handle)
}

fn chunk(r: &mut impl Read, shared: &Shared, h: ChunkHeader) -> Result<(), Error> {
    let t = target(shared, h.handle)?;
    let unexpected = Violation::UnexpectedChunk {
        command: t.command,
        kind: h.kind,
    };
    let bad_length = Violation::BadChunkLength {
        kind: h.kind,
        len: h.length,
    };
    match h.kind {
        REPLY_TYPE_NONE => {
            if h.length != 0 {
                return Err(bad_length.into());
            }
            if !h.is_done() {
                return Err(Violation::NoneNotDone.into());
            }
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE if t.command != Command::Read => {
            return Err(unexpected.into());
        }
        REPLY_TYPE_OFFSET_DATA => data_chunk(r, shared, &h, t)?,
        REPLY_TYPE_OFFSET_HOLE => hole_chunk(r, shared, &h, t)?,
        REPLY_TYPE_BLOCK_STATUS if t.command != Command::BlockStatus => {
            return Err(unexpected.into());
        }
        REPLY_TYPE_BLOCK_STATUS => status_chunk(r, shared, &h)?,
        kind if h.is_error() => error_chunk(r, shared, &h, t, kind)?,
        _ => return Err(unexpected.into()),
    }
    if h.is_done() {
        complete(shared, h.handle)?;
    }
    Ok(())
}

fn read_u64(r: &mut impl Read) -> Result<u64, Error> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).map_err(closed)?;
    Ok(u64::from_be_bytes(b))
}

fn data_chunk(r: &mut impl Read, shared: &Shared, h: &ChunkHeader, t: Target) -> Result<(), Error> {
    if h.length <= 8 {
        return Err(Violation::BadChunkLength {
            kind: h.kind,
            len: h.length,
        }
        .into());
    }
    let offset = read_u64(r)?;
    let len = u64::from(h.length - 8);
    let rel = t.contains(offset, len)?;
    cover(shared, h.handle, rel, len)?;
    fill(r, shared, h.handle, rel, len)
}

fn hole_chunk(r: &mut impl Read, shared: &Shared, h: &ChunkHeader, t: Target) -> Result<(), Error> {
    if h.length != HOLE_CHUNK_LEN {
        return Err(Violation::BadChunkLength {
            kind: h.kind,
            len: h.length,
        }
        .into());
    }
    let offset = read_u64(r)?;
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(closed)?;
    let len = u64::from(u32::from_be_bytes(b));
    if len == 0 {
        return Err(Violation::EmptyHole.into());
    }
    let rel = t.contains(offset, len)?;
    cover(shared, h.handle, rel, len)?;
    with_buffer(shared, h.handle, |buf| {
        // In range: checked against the request, whose length is the buffer's.
        if let Some(dst) = buf.get_mut(rel as usize..(rel + len) as usize) {
            dst.fill(0);
        }
    });
    Ok(())
}

/// Runs `f` on a read's buffer without holding the state lock meanwhile
/// (only this thread takes buffers out); `false` if the request is gone.
fn with_buffer(shared: &Shared, handle: u64, f: impl FnOnce(&mut Vec<u8>)) -> bool {
    let taken = match lock(&shared.state).entries.get_mut(&handle) {
        Some(Entry {
            body: Body::Read { buf, .. },
            ..
        }) => buf.take(),
        _ => None,
    };
    let Some(mut buf) = taken else {
        return false;
    };
    f(&mut buf);
    if let Some(Entry {
        body: Body::Read { buf: slot, .. },
        ..
    }) = lock(&shared.state).entries.get_mut(&handle)
    {
        *slot = Some(buf);
    }
    true
}

/// Records that a read's reply delivers `len` bytes at `rel`.
fn cover(shared: &Shared, handle: u64, rel: u64, len: u64) -> Result<(), Violation> {
    let mut st = lock(&shared.state);
    match st.entries.get_mut(&handle).map(|e| &mut e.body) {
        Some(Body::Read { coverage, .. }) => coverage.insert(rel, rel + len),
        _ => Err(Violation::UnknownHandle(handle)),
    }
}

/// Reads `len` payload bytes into a read's buffer at `rel` (already
/// checked to lie inside it), without holding the state lock meanwhile.
fn fill(r: &mut impl Read, shared: &Shared, handle: u64, rel: u64, len: u64) -> Result<(), Error> {
    let mut result = Ok(());
    let found = with_buffer(shared, handle, |buf| {
        result = match buf.get_mut(rel as usize..(rel + len) as usize) {
            Some(dst) => r.read_exact(dst).map_err(closed),
            None => Err(Violation::UnknownHandle(handle).into()),
        };
    });
    if !found {
        // The request was given up on (the connection is failing): skip.
        discard(r, len).map_err(closed)?;
    }
    result
}

fn status_chunk(r: &mut impl Read, shared: &Shared, h: &ChunkHeader) -> Result<(), Error> {
    let bad_length = Violation::BadChunkLength {
        kind: h.kind,
        len: h.length,
    };
    let descriptors = h.length.saturating_sub(4) / BLOCK_DESCRIPTOR_LEN as u32;
    if h.length < 12
        || !(h.length - 4).is_multiple_of(BLOCK_DESCRIPTOR_LEN as u32)
        || descriptors > MAX_BLOCK_DESCRIPTORS
    {
        return Err(bad_length.into());
    }
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(closed)?;
    let context = u32::from_be_bytes(b);
    let expected = shared.info.base_allocation;
    if expected != Some(context) {
        return Err(Violation::WrongContext {
            expected: expected.unwrap_or(0),
            got: context,
        }
        .into());
    }
    let t = target(shared, h.handle)?;
    let extents = read_extents(r, descriptors as usize, t.len)?;
    let mut st = lock(&shared.state);
    match st.entries.get_mut(&h.handle).map(|e| &mut e.body) {
        Some(Body::Status { extents: slot }) if slot.is_none() => *slot = Some(extents),
        Some(Body::Status { .. }) => return Err(Violation::DuplicateBlockStatus.into()),
        _ => return Err(Violation::UnknownHandle(h.handle).into()),
    }
    Ok(())
}

/// Reads `n` descriptors for a request of `len` bytes and returns them as
/// extents clipped to the request, neighbours of equal status merged.
fn read_extents(r: &mut impl Read, n: usize, len: u32) -> Result<Vec<BlockStatus>, Error> {
    let mut out: Vec<BlockStatus> = Vec::new();
    let mut covered = 0u64;
    let mut batch = [0u8; DESCRIPTOR_BATCH * BLOCK_DESCRIPTOR_LEN];
    let mut left = n;
    while left > 0 {
        let k = left.min(DESCRIPTOR_BATCH);
        let bytes = &mut batch[..k * BLOCK_DESCRIPTOR_LEN];
        r.read_exact(bytes).map_err(closed)?;
        for raw in bytes.chunks_exact(BLOCK_DESCRIPTOR_LEN) {
            let d = BlockDescriptor::parse(raw.try_into().unwrap_or(&[0; BLOCK_DESCRIPTOR_LEN]));
            if d.length == 0 {
                return Err(Violation::EmptyExtent.into());
            }
            if covered >= u64::from(len) {
                return Err(Violation::ExtentsPastRequest(len).into());
            }
            // Only the last descriptor may reach past the request: clip it.
            let l = u64::from(d.length).min(u64::from(len) - covered);
            let e = BlockStatus {
                len: l,
                hole: d.flags & STATE_HOLE != 0,
                zero: d.flags & STATE_ZERO != 0,
            };
            match out.last_mut() {
                Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += l,
                _ => out.push(e),
            }
            covered += l;
        }
        left -= k;
    }
    Ok(out)
}

fn error_chunk(
    r: &mut impl Read,
    shared: &Shared,
    h: &ChunkHeader,
    t: Target,
    kind: u16,
) -> Result<(), Error> {
    let with_offset = kind == REPLY_TYPE_ERROR_OFFSET;
    let fixed = ERROR_CHUNK_HEAD_LEN as u32 + if with_offset { 8 } else { 0 };
    if h.length < fixed || h.length > MAX_ERROR_CHUNK {
        return Err(Violation::BadChunkLength {
            kind,
            len: h.length,
        }
        .into());
    }
    let mut b = [0u8; ERROR_CHUNK_HEAD_LEN];
    r.read_exact(&mut b).map_err(closed)?;
    let head = ErrorChunkHead::parse(&b);
    let msg_len = u32::from(head.message_len);
    let fits = if with_offset {
        msg_len == h.length - fixed
    } else {
        msg_len <= h.length - fixed
    };
    if !fits || usize::from(head.message_len) > MAX_STRING_LEN {
        return Err(Violation::BadErrorMessage {
            message_len: head.message_len,
            len: h.length,
        }
        .into());
    }
    if head.error == 0 {
        return Err(Violation::ZeroError.into());
    }
    // At most MAX_STRING_LEN bytes.
    let mut msg = vec![0u8; usize::from(head.message_len)];
    r.read_exact(&mut msg).map_err(closed)?;
    if with_offset {
        if t.command == Command::Flush {
            return Err(Violation::UnexpectedChunk {
                command: t.command,
                kind,
            }
            .into());
        }
        let offset = read_u64(r)?;
        t.contains(offset, 1)?;
    } else {
        discard(r, u64::from(h.length - fixed - msg_len)).map_err(closed)?;
    }
    let message = String::from_utf8_lossy(&msg).into_owned();
    record_error(shared, h.handle, t, head.error, message);
    Ok(())
}

/// Keeps the first error the server reported for a request.
fn record_error(shared: &Shared, handle: u64, t: Target, code: u32, message: String) {
    let errno = Errno::from_code(code).unwrap_or(Errno::Inval);
    let mut st = lock(&shared.state);
    if errno == Errno::Shutdown {
        st.shutdown = true;
    }
    if let Some(e) = st.entries.get_mut(&handle) {
        e.error.get_or_insert(Error::Request {
            command: t.command,
            offset: t.offset,
            len: u64::from(t.len),
            errno,
            code,
            message,
        });
    }
}

/// Ends a request's reply: checks that a success delivered everything,
/// frees its budget and wakes whoever waits for it.
fn complete(shared: &Shared, handle: u64) -> Result<(), Error> {
    let mut st = lock(&shared.state);
    let Some(e) = st.entries.get_mut(&handle) else {
        return Err(Violation::UnknownHandle(handle).into());
    };
    if e.error.is_none() {
        match &e.body {
            Body::Read { coverage, .. } if coverage.total() != u64::from(e.len) => {
                return Err(Violation::ShortRead {
                    covered: coverage.total(),
                    len: e.len,
                }
                .into());
            }
            Body::Status { extents: None } => return Err(Violation::MissingBlockStatus.into()),
            _ => {}
        }
    }
    e.done = true;
    let (cost, abandoned) = (e.cost, e.abandoned);
    if abandoned {
        st.entries.remove(&handle);
    }
    st.in_flight = st.in_flight.saturating_sub(1);
    st.in_flight_bytes = st.in_flight_bytes.saturating_sub(cost);
    drop(st);
    shared.cv.notify_all();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_and_detects_overlap() {
        let mut c = Coverage::default();
        c.insert(10, 20).unwrap();
        c.insert(30, 40).unwrap();
        assert_eq!(c.ranges, vec![(10, 20), (30, 40)]);
        c.insert(20, 30).unwrap();
        assert_eq!(c.ranges, vec![(10, 40)]);
        c.insert(0, 10).unwrap();
        c.insert(40, 41).unwrap();
        assert_eq!(c.ranges, vec![(0, 41)]);
        assert_eq!(c.total(), 41);
        for (s, e) in [(0, 1), (40, 42), (5, 50), (40, 41)] {
            assert!(
                matches!(c.insert(s, e), Err(Violation::ChunkOverlap { .. })),
                "{s}..{e}"
            );
        }
        let mut c = Coverage::default();
        c.insert(5, 6).unwrap();
        c.insert(1, 2).unwrap();
        assert!(c.insert(0, 10).is_err());
        assert!(c.insert(1, 3).is_err());
        c.insert(2, 5).unwrap();
        assert_eq!(c.ranges, vec![(1, 6)]);
    }

    #[test]
    fn coverage_is_bounded() {
        let mut c = Coverage::default();
        for i in 0..MAX_PIECES as u64 {
            c.insert(2 * i, 2 * i + 1).unwrap();
        }
        assert_eq!(
            c.insert(u64::MAX - 1, u64::MAX),
            Err(Violation::TooFragmented(MAX_PIECES))
        );
    }

    #[test]
    fn extents_are_checked_and_clipped() {
        let desc = |v: &[(u32, u32)]| {
            v.iter()
                .flat_map(|(l, f)| [l.to_be_bytes(), f.to_be_bytes()].concat())
                .collect::<Vec<u8>>()
        };
        let d = desc(&[(100, 0), (50, 0), (1000, 3)]);
        let e = read_extents(&mut &d[..], 3, 400).unwrap();
        assert_eq!(e, vec![BlockStatus::data(150), BlockStatus::hole(250)]);
        let d = desc(&[(400, 0), (1, 3)]);
        assert!(matches!(
            read_extents(&mut &d[..], 2, 400),
            Err(Error::Violation(Violation::ExtentsPastRequest(400)))
        ));
        let d = desc(&[(0, 0)]);
        assert!(matches!(
            read_extents(&mut &d[..], 1, 400),
            Err(Error::Violation(Violation::EmptyExtent))
        ));
        // Unknown flag bits are ignored.
        let d = desc(&[(10, 0xffff_fff0)]);
        assert_eq!(
            read_extents(&mut &d[..], 1, 10).unwrap(),
            vec![BlockStatus::data(10)]
        );
    }
}
