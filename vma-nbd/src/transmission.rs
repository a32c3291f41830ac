//! The transmission phase: request parsing and validation, dispatch to
//! worker threads, reply encoding.

use std::io::{self, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;

use crate::export::MAX_PAYLOAD;
use crate::handshake::{discard, read_exact_or_eof, Session};
use crate::proto::*;
use crate::{BlockStatus, Errno, Error};

/// Most descriptors sent in one block status reply.
const MAX_EXTENTS: usize = 1024;
/// Longest error message sent in a structured error chunk.
const MAX_ERROR_MESSAGE: usize = 1024;

/// Per-connection concurrency limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnOptions {
    /// Worker threads per connection (0: handle requests on the reader thread).
    pub workers: usize,
    /// Requests read but not yet answered.
    pub max_in_flight: usize,
    /// Payload bytes (write data, read buffers) of requests in flight.
    pub max_in_flight_bytes: usize,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A validated request ready to be executed.
#[derive(Debug)]
enum Job {
    Read {
        handle: u64,
        offset: u64,
        len: u32,
    },
    Write {
        handle: u64,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    WriteZeroes {
        handle: u64,
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush {
        handle: u64,
    },
    BlockStatus {
        handle: u64,
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

impl Job {
    fn handle(&self) -> u64 {
        match *self {
            Job::Read { handle, .. }
            | Job::Write { handle, .. }
            | Job::WriteZeroes { handle, .. }
            | Job::Flush { handle }
            | Job::BlockStatus { handle, .. } => handle,
        }
    }
}

/// What to do with a request header.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// `NBD_CMD_DISC`: stop reading, finish outstanding requests, close.
    Disconnect,
    /// Unrecoverable protocol violation: close the connection.
    Close(String),
    /// Answer right away (after skipping `discard` payload bytes).
    Reply {
        result: Result<(), (Errno, &'static str)>,
        discard: u32,
    },
    /// Read the write payload, then run the job.
    Write { offset: u64, len: u32, fua: bool },
    /// Run a job that has no payload.
    Run(JobSpec),
}

#[derive(Debug, PartialEq, Eq)]
enum JobSpec {
    Read {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

fn validate(h: &RequestHeader, s: &Session) -> Action {
    let req = Request::new(h, s);
    match h.command {
        CMD_READ => req.read(),
        CMD_WRITE => req.write(),
        CMD_WRITE_ZEROES => req.write_zeroes(),
        CMD_FLUSH => req.flush(),
        CMD_TRIM => req.trim(),
        CMD_CACHE => req.cache(),
        CMD_BLOCK_STATUS => req.block_status(),
        CMD_DISC => Action::Disconnect,
        _ => fail(Errno::Inval, "unknown command"),
    }
}

/// A refusal of a request without payload.
fn fail(errno: Errno, msg: &'static str) -> Action {
    Action::Reply {
        result: Err((errno, msg)),
        discard: 0,
    }
}

/// Success, with nothing to do.
fn ok() -> Action {
    Action::Reply {
        result: Ok(()),
        discard: 0,
    }
}

/// A request header with what every command's validation asks of it: one method per
/// command.
struct Request<'a> {
    h: &'a RequestHeader,
    s: &'a Session,
    in_bounds: bool,
    aligned: bool,
}

impl Request<'_> {
    fn new<'a>(h: &'a RequestHeader, s: &'a Session) -> Request<'a> {
        let len = u64::from(h.length);
        let min = u64::from(s.block.min);
        Request {
            h,
            s,
            in_bounds: h.offset.checked_add(len).is_some_and(|end| end <= s.size),
            aligned: h.offset.is_multiple_of(min) && len.is_multiple_of(min),
        }
    }

    fn read(&self) -> Action {
        let (h, s) = (self.h, self.s);
        let bad_df = h.flags & CMD_FLAG_DF != 0 && !s.structured;
        if h.flags & !(CMD_FLAG_FUA | CMD_FLAG_DF) != 0 || bad_df {
            fail(Errno::Inval, "invalid flags for read")
        } else if h.length > s.block.max {
            fail(Errno::Inval, "read larger than the maximum block size")
        } else if !self.in_bounds {
            fail(Errno::Inval, "read beyond the end of the export")
        } else if !self.aligned {
            fail(Errno::Inval, "read not aligned to the minimum block size")
        } else if h.length == 0 {
            ok()
        } else {
            Action::Run(JobSpec::Read {
                offset: h.offset,
                len: h.length,
            })
        }
    }

    fn write(&self) -> Action {
        let (h, s) = (self.h, self.s);
        if h.length > MAX_PAYLOAD {
            return Action::Close(format!(
                "write payload of {} bytes exceeds {MAX_PAYLOAD}",
                h.length
            ));
        }
        // The payload is skipped on every error.
        let fail = |errno, msg| Action::Reply {
            result: Err((errno, msg)),
            discard: h.length,
        };
        if h.flags & !CMD_FLAG_FUA != 0 {
            fail(Errno::Inval, "invalid flags for write")
        } else if s.read_only {
            fail(Errno::Perm, "export is read-only")
        } else if h.length > s.block.max {
            fail(Errno::Inval, "write larger than the maximum block size")
        } else if !self.in_bounds {
            fail(Errno::NoSpc, "write beyond the end of the export")
        } else if !self.aligned {
            fail(Errno::Inval, "write not aligned to the minimum block size")
        } else if h.length == 0 {
            ok()
        } else {
            Action::Write {
                offset: h.offset,
                len: h.length,
                fua: h.flags & CMD_FLAG_FUA != 0,
            }
        }
    }

    fn write_zeroes(&self) -> Action {
        let (h, s) = (self.h, self.s);
        if h.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0 {
            fail(Errno::Inval, "invalid flags for write zeroes")
        } else if s.read_only {
            fail(Errno::Perm, "export is read-only")
        } else if !self.in_bounds {
            fail(Errno::NoSpc, "write zeroes beyond the end of the export")
        } else if !self.aligned {
            fail(
                Errno::Inval,
                "write zeroes not aligned to the minimum block size",
            )
        } else if h.length == 0 {
            ok()
        } else {
            Action::Run(JobSpec::WriteZeroes {
                offset: h.offset,
                len: h.length,
                fua: h.flags & CMD_FLAG_FUA != 0,
            })
        }
    }

    fn flush(&self) -> Action {
        if self.h.flags & !CMD_FLAG_FUA != 0 {
            fail(Errno::Inval, "invalid flags for flush")
        } else {
            Action::Run(JobSpec::Flush)
        }
    }

    /// Not advertised; accepted as a validated no-op (the protocol lets a server ignore
    /// trims).
    fn trim(&self) -> Action {
        if self.h.flags & !CMD_FLAG_FUA != 0 {
            fail(Errno::Inval, "invalid flags for trim")
        } else if self.s.read_only {
            fail(Errno::Perm, "export is read-only")
        } else if !self.in_bounds {
            fail(Errno::Inval, "trim beyond the end of the export")
        } else if !self.aligned {
            fail(Errno::Inval, "trim not aligned to the minimum block size")
        } else {
            ok()
        }
    }

    /// Not advertised; some clients send it anyway: a no-op.
    fn cache(&self) -> Action {
        if self.h.flags != 0 {
            fail(Errno::Inval, "invalid flags for cache")
        } else if !self.in_bounds {
            fail(Errno::Inval, "cache beyond the end of the export")
        } else {
            ok()
        }
    }

    fn block_status(&self) -> Action {
        let h = self.h;
        if !self.s.base_allocation {
            fail(Errno::Inval, "no metadata context negotiated")
        } else if h.flags & !CMD_FLAG_REQ_ONE != 0 {
            fail(Errno::Inval, "invalid flags for block status")
        } else if h.length == 0 {
            fail(Errno::Inval, "zero-length block status")
        } else if !self.in_bounds {
            fail(Errno::Inval, "block status beyond the end of the export")
        } else if !self.aligned {
            fail(
                Errno::Inval,
                "block status not aligned to the minimum block size",
            )
        } else {
            Action::Run(JobSpec::BlockStatus {
                offset: h.offset,
                len: h.length,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
    }
}

/// Limits requests and buffered bytes in flight (backpressure: the reader
/// stops reading the socket while the budget is exhausted).
struct Budget {
    max_count: usize,
    max_bytes: usize,
    state: Mutex<(usize, usize)>,
    cv: Condvar,
}

impl Budget {
    fn acquire(&self, bytes: usize) {
        let mut st = lock(&self.state);
        // A request larger than the byte budget still runs when alone.
        while st.0 > 0 && (st.0 >= self.max_count || st.1.saturating_add(bytes) > self.max_bytes) {
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.0 += 1;
        st.1 += bytes;
    }

    fn release(&self, bytes: usize) {
        let mut st = lock(&self.state);
        st.0 = st.0.saturating_sub(1);
        st.1 = st.1.saturating_sub(bytes);
        drop(st);
        self.cv.notify_all();
    }
}

struct Conn<'a, W> {
    s: &'a Session,
    writer: Mutex<W>,
    budget: Budget,
    broken: AtomicBool,
    on_broken: Option<&'a (dyn Fn() + Sync)>,
}

fn simple_header(buf: &mut [u8], error: u32, handle: u64) {
    buf[..SIMPLE_REPLY_LEN].copy_from_slice(&SimpleReply { error, handle }.encode());
}

fn chunk_header(buf: &mut [u8], flags: u16, kind: u16, handle: u64, length: u32) {
    let h = ChunkHeader {
        flags,
        kind,
        handle,
        length,
    };
    buf[..STRUCTURED_REPLY_LEN].copy_from_slice(&h.encode());
}

fn chunk(kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; STRUCTURED_REPLY_LEN];
    // Payloads built here are small (bounded error messages, descriptors).
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    chunk_header(&mut buf, REPLY_FLAG_DONE, kind, handle, len);
    buf.extend_from_slice(payload);
    buf
}

fn truncate_message(msg: &str) -> &str {
    if msg.len() <= MAX_ERROR_MESSAGE {
        return msg;
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

impl<W: Write> Conn<'_, W> {
    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Writes one complete reply under the writer lock.
    fn send(&self, buf: &[u8]) {
        if self.is_broken() {
            return;
        }
        let mut w = lock(&self.writer);
        if w.write_all(buf).and_then(|()| w.flush()).is_err() {
            self.broken.store(true, Ordering::Relaxed);
            drop(w);
            // Wake up the reader, which may be blocked on the socket.
            if let Some(hook) = self.on_broken {
                hook();
            }
        }
    }

    fn reply_ok(&self, handle: u64, command: u16) {
        if self.s.structured && command == CMD_READ {
            self.send(&chunk(REPLY_TYPE_NONE, handle, &[]));
        } else {
            let mut buf = [0u8; SIMPLE_REPLY_LEN];
            simple_header(&mut buf, 0, handle);
            self.send(&buf);
        }
    }

    fn reply_err(&self, handle: u64, errno: Errno, msg: &str) {
        if self.s.structured {
            let msg = truncate_message(msg);
            let mut payload = errno.code().to_be_bytes().to_vec();
            // Bounded by MAX_ERROR_MESSAGE.
            payload.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            payload.extend_from_slice(msg.as_bytes());
            self.send(&chunk(REPLY_TYPE_ERROR, handle, &payload));
        } else {
            let mut buf = [0u8; SIMPLE_REPLY_LEN];
            simple_header(&mut buf, errno.code(), handle);
            self.send(&buf);
        }
    }

    fn reply_result(&self, handle: u64, command: u16, r: io::Result<()>, what: &str) {
        match r {
            Ok(()) => self.reply_ok(handle, command),
            Err(e) => self.reply_err(handle, Errno::from_io_error(&e), &format!("{what}: {e}")),
        }
    }

    /// Executes a job and sends its reply; never panics on backend panics.
    fn run(&self, job: Job) {
        let handle = job.handle();
        if catch_unwind(AssertUnwindSafe(|| self.execute(job))).is_err() {
            self.reply_err(handle, Errno::Io, "internal error: export panicked");
        }
    }

    fn execute(&self, job: Job) {
        let export = &*self.s.export;
        match job {
            Job::Read {
                handle,
                offset,
                len,
            } => {
                let hdr = if self.s.structured {
                    STRUCTURED_REPLY_LEN + 8
                } else {
                    SIMPLE_REPLY_LEN
                };
                // `len` is at most the export's maximum block size.
                let mut buf = vec![0u8; hdr + len as usize];
                if let Err(e) = export.read_at(&mut buf[hdr..], offset) {
                    let msg = format!("read failed: {e}");
                    return self.reply_err(handle, Errno::from_io_error(&e), &msg);
                }
                if !self.s.structured {
                    simple_header(&mut buf, 0, handle);
                    self.send(&buf);
                } else if buf[hdr..].iter().all(|&b| b == 0) {
                    let mut payload = [0u8; 12];
                    payload[..8].copy_from_slice(&offset.to_be_bytes());
                    payload[8..].copy_from_slice(&len.to_be_bytes());
                    self.send(&chunk(REPLY_TYPE_OFFSET_HOLE, handle, &payload));
                } else {
                    // 8 + len <= 8 + MAX_PAYLOAD fits in u32.
                    let clen = len + 8;
                    chunk_header(
                        &mut buf,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        handle,
                        clen,
                    );
                    buf[STRUCTURED_REPLY_LEN..hdr].copy_from_slice(&offset.to_be_bytes());
                    self.send(&buf);
                }
            }
            Job::Write {
                handle,
                offset,
                data,
                fua,
            } => {
                let mut r = export.write_at(&data, offset);
                if fua && r.is_ok() {
                    r = export.flush();
                }
                self.reply_result(handle, CMD_WRITE, r, "write failed");
            }
            Job::WriteZeroes {
                handle,
                offset,
                len,
                fua,
            } => {
                let mut r = export.write_zeroes(offset, u64::from(len));
                if fua && r.is_ok() {
                    r = export.flush();
                }
                self.reply_result(handle, CMD_WRITE_ZEROES, r, "write zeroes failed");
            }
            Job::Flush { handle } => {
                self.reply_result(handle, CMD_FLUSH, export.flush(), "flush failed");
            }
            Job::BlockStatus {
                handle,
                offset,
                len,
                req_one,
            } => match export.block_status(offset, len) {
                Ok(extents) => {
                    let descs = normalize_extents(&extents, len, self.s.block.min, req_one);
                    let mut payload = Vec::with_capacity(4 + 8 * descs.len());
                    payload.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
                    for (l, f) in descs {
                        payload.extend_from_slice(&l.to_be_bytes());
                        payload.extend_from_slice(&f.to_be_bytes());
                    }
                    self.send(&chunk(REPLY_TYPE_BLOCK_STATUS, handle, &payload));
                }
                Err(e) => {
                    let msg = format!("block status failed: {e}");
                    self.reply_err(handle, Errno::from_io_error(&e), &msg);
                }
            },
        }
    }
}

/// Turns a backend's extent list into protocol descriptors: clipped to the
/// request, zero-length entries dropped, equal neighbours merged, at most
/// [`MAX_EXTENTS`] entries, boundaries aligned to `min` (a request is
/// aligned, so only backend extents can be unaligned: the list is cut at the
/// first unaligned boundary), never empty (falls back to "data").
fn normalize_extents(
    extents: &[BlockStatus],
    len: u32,
    min: u32,
    req_one: bool,
) -> Vec<(u32, u32)> {
    let total = u64::from(len);
    let min = u64::from(min.max(1));
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        if covered >= total {
            break;
        }
        let l = e.len.min(total - covered);
        if l == 0 {
            continue;
        }
        let flags = e.flags();
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += l,
            _ => {
                if out.len() >= MAX_EXTENTS {
                    break;
                }
                out.push((l, flags));
            }
        }
        covered += l;
    }
    if min > 1 {
        let mut pos = 0u64;
        let mut aligned = Vec::with_capacity(out.len());
        for (l, f) in out {
            let end = pos + l;
            if end.is_multiple_of(min) {
                aligned.push((l, f));
                pos = end;
            } else {
                let down = end - end % min;
                if down > pos {
                    aligned.push((down - pos, f));
                }
                break;
            }
        }
        if aligned.is_empty() && covered > 0 {
            // The first block has mixed status: report it as data.
            aligned.push((min.min(total), 0));
        }
        out = aligned;
    }
    if out.is_empty() {
        out.push((total, 0));
    }
    if req_one {
        out.truncate(1);
    }
    // Every length is at most `len`, so it fits in u32.
    out.into_iter()
        .map(|(l, f)| (u32::try_from(l).unwrap_or(len), f))
        .collect()
}

/// Reads requests until disconnect, EOF or a protocol violation; valid ones
/// are handed to `dispatch`, invalid ones answered directly.
fn reader_loop<R: Read, W: Write>(
    r: &mut R,
    conn: &Conn<'_, W>,
    dispatch: &mut dyn FnMut(Job),
) -> Result<(), Error> {
    loop {
        if conn.is_broken() {
            return Ok(());
        }
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        if !read_exact_or_eof(r, &mut hdr)? {
            return Ok(());
        }
        let h = RequestHeader::parse(&hdr)?;
        let job = match validate(&h, conn.s) {
            Action::Disconnect => return Ok(()),
            Action::Close(msg) => return Err(Error::Protocol(msg)),
            Action::Reply { result, discard: n } => {
                discard(r, u64::from(n))?;
                match result {
                    Ok(()) => conn.reply_ok(h.handle, h.command),
                    Err((errno, msg)) => conn.reply_err(h.handle, errno, msg),
                }
                continue;
            }
            Action::Write { offset, len, fua } => {
                // At most MAX_PAYLOAD bytes, accounted in the budget.
                let n = len as usize;
                conn.budget.acquire(n);
                let mut data = vec![0u8; n];
                if let Err(e) = r.read_exact(&mut data) {
                    conn.budget.release(n);
                    return Err(e.into());
                }
                Job::Write {
                    handle: h.handle,
                    offset,
                    data,
                    fua,
                }
            }
            Action::Run(spec) => {
                let handle = h.handle;
                let (job, cost) = match spec {
                    JobSpec::Read { offset, len } => (
                        Job::Read {
                            handle,
                            offset,
                            len,
                        },
                        len as usize,
                    ),
                    JobSpec::WriteZeroes { offset, len, fua } => (
                        Job::WriteZeroes {
                            handle,
                            offset,
                            len,
                            fua,
                        },
                        0,
                    ),
                    JobSpec::Flush => (Job::Flush { handle }, 0),
                    JobSpec::BlockStatus {
                        offset,
                        len,
                        req_one,
                    } => (
                        Job::BlockStatus {
                            handle,
                            offset,
                            len,
                            req_one,
                        },
                        0,
                    ),
                };
                conn.budget.acquire(cost);
                job
            }
        };
        dispatch(job);
    }
}

fn job_cost(job: &Job) -> usize {
    match job {
        Job::Read { len, .. } => *len as usize,
        Job::Write { data, .. } => data.len(),
        _ => 0,
    }
}

impl<'a, W: Write> Conn<'a, W> {
    fn new(
        s: &'a Session,
        w: W,
        opts: &ConnOptions,
        on_broken: Option<&'a (dyn Fn() + Sync)>,
    ) -> Self {
        Conn {
            s,
            writer: Mutex::new(w),
            budget: Budget {
                max_count: opts.max_in_flight.max(1),
                max_bytes: opts.max_in_flight_bytes,
                state: Mutex::new((0, 0)),
                cv: Condvar::new(),
            },
            broken: AtomicBool::new(false),
            on_broken,
        }
    }

    fn run_and_release(&self, job: Job) {
        let cost = job_cost(&job);
        self.run(job);
        self.budget.release(cost);
    }
}

/// Serves the transmission phase on the calling thread, one request at a
/// time (no `Send` bounds needed).
pub(crate) fn serve_inline<R: Read, W: Write>(r: &mut R, w: W, s: &Session) -> Result<(), Error> {
    let opts = ConnOptions {
        workers: 0,
        max_in_flight: 1,
        max_in_flight_bytes: usize::MAX,
    };
    let conn = Conn::new(s, w, &opts, None);
    reader_loop(r, &conn, &mut |job| conn.run_and_release(job))
}

/// Serves the transmission phase with `opts.workers` worker threads; the
/// calling thread reads requests. Returns when the client disconnected and
/// every request read has been answered.
pub(crate) fn serve_pooled<R: Read, W: Write + Send>(
    r: &mut R,
    w: W,
    s: &Session,
    opts: &ConnOptions,
    on_broken: Option<&(dyn Fn() + Sync)>,
) -> Result<(), Error> {
    let conn = Conn::new(s, w, opts, on_broken);
    if opts.workers == 0 {
        return reader_loop(r, &conn, &mut |job| conn.run_and_release(job));
    }
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Mutex::new(rx);
    thread::scope(|scope| {
        let mut spawned = 0;
        for i in 0..opts.workers {
            let (conn, rx) = (&conn, &rx);
            let worker = move || loop {
                let job = lock(rx).recv();
                match job {
                    Ok(job) => conn.run_and_release(job),
                    Err(mpsc::RecvError) => break,
                }
            };
            if thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(scope, worker)
                .is_ok()
            {
                spawned += 1;
            }
        }
        let result = reader_loop(r, &conn, &mut |job| {
            if spawned == 0 {
                conn.run_and_release(job);
            } else if let Err(mpsc::SendError(job)) = tx.send(job) {
                conn.run_and_release(job);
            }
        });
        drop(tx);
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlockSize;
    use std::sync::Arc;

    struct Zero(u64);
    impl crate::Export for Zero {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
    }

    fn session(ro: bool, min: u32, structured: bool) -> Session {
        Session {
            export: Arc::new(Zero(1 << 20)),
            size: 1 << 20,
            read_only: ro,
            block: BlockSize {
                min,
                preferred: 4096,
                max: 65536,
            },
            structured,
            base_allocation: structured,
            flags: 0,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            handle: 7,
            offset,
            length,
        }
    }

    fn err_of(a: Action) -> Option<(Errno, u32)> {
        match a {
            Action::Reply {
                result: Err((e, _)),
                discard,
            } => Some((e, discard)),
            _ => None,
        }
    }

    #[test]
    fn validation() {
        let s = session(false, 1, false);
        let size = 1u64 << 20;
        assert_eq!(
            err_of(validate(&req(CMD_READ, 0, size, 1), &s)),
            Some((Errno::Inval, 0))
        );
        assert_eq!(
            err_of(validate(&req(CMD_READ, 0, u64::MAX, 2), &s)),
            Some((Errno::Inval, 0))
        );
        assert_eq!(
            err_of(validate(&req(CMD_WRITE, 0, size - 1, 2), &s)),
            Some((Errno::NoSpc, 2))
        );
        assert_eq!(
            err_of(validate(&req(CMD_WRITE_ZEROES, 0, size, 1), &s)),
            Some((Errno::NoSpc, 0))
        );
        assert_eq!(
            err_of(validate(&req(CMD_READ, 0, 0, 65537), &s)),
            Some((Errno::Inval, 0))
        );
        assert_eq!(
            err_of(validate(&req(CMD_WRITE, 0, 0, 65537), &s)),
            Some((Errno::Inval, 65537))
        );
        assert!(matches!(
            validate(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &s),
            Action::Close(_)
        ));
        assert_eq!(
            err_of(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &s)),
            Some((Errno::Inval, 0))
        );
        assert_eq!(
            err_of(validate(
                &req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1),
                &s
            )),
            Some((Errno::Inval, 0))
        );
        assert_eq!(
            err_of(validate(&req(99, 0, 0, 0), &s)),
            Some((Errno::Inval, 0))
        );
        assert_eq!(
            err_of(validate(&req(CMD_BLOCK_STATUS, 0, 0, 512), &s)),
            Some((Errno::Inval, 0))
        );
        assert_eq!(validate(&req(CMD_DISC, 0, 0, 0), &s), Action::Disconnect);
        assert_eq!(
            validate(&req(CMD_READ, 0, size, 0), &s),
            Action::Reply {
                result: Ok(()),
                discard: 0
            }
        );
        assert!(matches!(
            validate(
                &req(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                    0,
                    1 << 20
                ),
                &s
            ),
            Action::Run(JobSpec::WriteZeroes { fua: true, .. })
        ));

        let ro = session(true, 512, true);
        assert_eq!(
            err_of(validate(&req(CMD_WRITE, 0, 0, 512), &ro)),
            Some((Errno::Perm, 512))
        );
        assert_eq!(
            err_of(validate(&req(CMD_TRIM, 0, 0, 512), &ro)),
            Some((Errno::Perm, 0))
        );
        assert_eq!(
            err_of(validate(&req(CMD_READ, 0, 1, 512), &ro)),
            Some((Errno::Inval, 0))
        );
        assert_eq!(
            err_of(validate(&req(CMD_READ, 0, 0, 100), &ro)),
            Some((Errno::Inval, 0))
        );
        assert!(matches!(
            validate(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &ro),
            Action::Run(_)
        ));
        assert!(matches!(
            validate(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20), &ro),
            Action::Run(JobSpec::BlockStatus { req_one: true, .. })
        ));
        assert_eq!(
            err_of(validate(&req(CMD_BLOCK_STATUS, 0, 0, 0), &ro)),
            Some((Errno::Inval, 0))
        );
    }

    #[test]
    fn extent_normalization() {
        let e = [
            BlockStatus::data(100),
            BlockStatus::data(100),
            BlockStatus::hole(1000),
            BlockStatus::zero(5),
        ];
        assert_eq!(
            normalize_extents(&e, 500, 1, false),
            vec![(200, 0), (300, 3)]
        );
        assert_eq!(normalize_extents(&e, 500, 1, true), vec![(200, 0)]);
        assert_eq!(normalize_extents(&[], 500, 1, false), vec![(500, 0)]);
        assert_eq!(
            normalize_extents(&[BlockStatus::hole(0)], 500, 1, false),
            vec![(500, 0)]
        );
        // Unaligned backend extents with min 512.
        let e = [BlockStatus::data(700), BlockStatus::hole(1348)];
        assert_eq!(normalize_extents(&e, 2048, 512, false), vec![(512, 0)]);
        let e = [BlockStatus::hole(100), BlockStatus::data(1948)];
        assert_eq!(normalize_extents(&e, 2048, 512, false), vec![(512, 0)]);
        let e = [BlockStatus::hole(1024), BlockStatus::data(1024)];
        assert_eq!(
            normalize_extents(&e, 2048, 512, false),
            vec![(1024, 3), (1024, 0)]
        );
        // Descriptor count is capped.
        let many: Vec<BlockStatus> = (0..5000)
            .map(|i| {
                if i % 2 == 0 {
                    BlockStatus::data(1)
                } else {
                    BlockStatus::hole(1)
                }
            })
            .collect();
        assert_eq!(normalize_extents(&many, 5000, 1, false).len(), MAX_EXTENTS);
    }
}
