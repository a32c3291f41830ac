//! An NBD client with several requests in flight.
//!
//! [`Client`] negotiates a connection (fixed newstyle, structured replies,
//! `base:allocation`, `NBD_OPT_GO` with block size constraints, with
//! fallbacks for servers that lack any of them) and then sends requests
//! from any number of threads. A reader thread takes the replies off the
//! socket as they come, in whatever order the server sends them, checks
//! every one of them against the request it answers, and hands the result
//! to whoever waits for it. Because the replies are always drained, a
//! thread that writes a large payload can never block the server from
//! answering, however many requests are in flight.
//!
//! Two ways to use it:
//! * the `submit_*` methods send one request and return a [`PendingRead`]
//!   or [`Pending`] to wait on later: keep a window of them open to stream
//!   an image (the reads run ahead of whatever consumes them);
//! * [`read_at`](Client::read_at), [`write_at`](Client::write_at),
//!   [`write_zeroes`](Client::write_zeroes), [`flush`](Client::flush) and
//!   [`block_status`](Client::block_status) block until done, pipelining
//!   what they split internally; they may be called from several threads
//!   at once.
//!
//! Requests longer than the server's maximum payload are split; offsets and
//! lengths must be multiples of the server's minimum block size
//! ([`ExportInfo::block`]), which for images exported by QEMU is usually 1.

mod negotiate;
mod replies;

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use negotiate::{negotiate, Negotiated, Wishes};
use replies::{Body, Coverage, Entry, Outcome, Shared, State};

use crate::proto::*;
use crate::transmission::lock;
use crate::{BlockSize, BlockStatus, Error};

/// Read and write buffers of a connection (large payloads bypass them).
const IO_BUFFER: usize = 64 * 1024;
/// Longest `NBD_CMD_WRITE_ZEROES` sent at once.
const MAX_ZERO_REQUEST: u64 = 1 << 30;
/// Zeroes written with `NBD_CMD_WRITE` when the server lacks `WRITE_ZEROES`.
const ZERO_BUFFER: usize = 1 << 20;
static ZEROES: [u8; ZERO_BUFFER] = [0; ZERO_BUFFER];
/// How long closing waits for the server to answer what is in flight and
/// hang up, when no timeout is configured.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server told about the export during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size of the export in bytes.
    pub size: u64,
    /// Transmission flags (`proto::FLAG_*`).
    pub flags: u16,
    /// The block size constraints the client obeys: the server's, with the
    /// maximum capped at [`MAX_PAYLOAD`](crate::MAX_PAYLOAD), or the
    /// protocol's defaults if it announced none.
    pub block: BlockSize,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// `base:allocation` was selected: [`Client::block_status`] asks the server.
    pub block_status: bool,
}

impl ExportInfo {
    /// The server refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    /// The server supports `NBD_CMD_FLUSH`.
    pub fn can_flush(&self) -> bool {
        self.flags & FLAG_SEND_FLUSH != 0
    }

    /// The server supports `NBD_CMD_WRITE_ZEROES`.
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & FLAG_SEND_WRITE_ZEROES != 0
    }

    /// Several connections to this export see each other's writes and one
    /// flush covers all of them.
    pub fn can_multi_conn(&self) -> bool {
        self.flags & FLAG_CAN_MULTI_CONN != 0
    }
}

/// How `NBD_CMD_WRITE_ZEROES` may make a range read as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// The server may deallocate the range (punch a hole, leave a qcow2
    /// cluster unallocated).
    MayUnmap,
    /// The range stays allocated (`NBD_CMD_FLAG_NO_HOLE`).
    NoHole,
}

/// Configures and opens a [`Client`] connection.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    wishes: Wishes,
    max_in_flight: usize,
    max_in_flight_bytes: usize,
    timeout: Option<Duration>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            wishes: Wishes {
                export: String::new(),
                structured: true,
                block_status: true,
            },
            max_in_flight: 16,
            max_in_flight_bytes: 64 * 1024 * 1024,
            timeout: None,
        }
    }
}

impl ClientBuilder {
    /// The export to open (default: the empty name, a server's default export).
    pub fn export_name(mut self, name: impl Into<String>) -> Self {
        self.wishes.export = name.into();
        self
    }

    /// Ask for structured replies (default on; off forces simple replies,
    /// and with them no block status).
    pub fn structured_replies(mut self, yes: bool) -> Self {
        self.wishes.structured = yes;
        self
    }

    /// Ask for `base:allocation` (default on; off makes
    /// [`Client::block_status`] report everything as data).
    pub fn block_status(mut self, yes: bool) -> Self {
        self.wishes.block_status = yes;
        self
    }

    /// Requests sent and not yet answered, at most (default 16; at least 1).
    /// Submitting more waits for answers.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Payload bytes of the requests in flight, at most (default 64 MiB). A
    /// single larger request is still sent, alone.
    pub fn max_in_flight_bytes(mut self, n: usize) -> Self {
        self.max_in_flight_bytes = n;
        self
    }

    /// Longest wait for a reply, or for room to send a request (default:
    /// none). When it passes, the connection is closed and every request
    /// fails with [`Error::Timeout`].
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connects to a server on a unix socket.
    pub fn connect_unix(self, path: impl AsRef<Path>) -> Result<Client, Error> {
        let path = path.as_ref();
        let connect_err = |source| Error::Connect {
            addr: path.display().to_string(),
            source,
        };
        let s = UnixStream::connect(path).map_err(connect_err)?;
        s.set_write_timeout(self.timeout).map_err(connect_err)?;
        let (r, w, hangup) =
            halves(&s, UnixStream::try_clone, UnixStream::shutdown).map_err(connect_err)?;
        self.open(r, w, Transport::Unix(s), Some(hangup))
    }

    /// Connects to a server over TCP.
    pub fn connect_tcp(self, addr: impl ToSocketAddrs + fmt::Debug) -> Result<Client, Error> {
        let connect_err = |source| Error::Connect {
            addr: format!("{addr:?}"),
            source,
        };
        let s = TcpStream::connect(&addr).map_err(connect_err)?;
        s.set_nodelay(true).map_err(connect_err)?;
        s.set_write_timeout(self.timeout).map_err(connect_err)?;
        let (r, w, hangup) =
            halves(&s, TcpStream::try_clone, TcpStream::shutdown).map_err(connect_err)?;
        self.open(r, w, Transport::Tcp(s), Some(hangup))
    }

    /// Runs a connection over an already connected stream given as its two
    /// halves (a reader thread owns `reader`). The client cannot interrupt a
    /// blocked `reader`: a timeout fails the requests, but the reader thread
    /// ends only when `reader` does.
    pub fn connect_split<R, W>(self, reader: R, writer: W) -> Result<Client, Error>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        self.open(reader, writer, Transport::Stream, None)
    }

    fn open<R, W>(
        self,
        reader: R,
        writer: W,
        transport: Transport,
        hangup: Option<replies::Hangup>,
    ) -> Result<Client, Error>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        transport.set_read_timeout(self.timeout);
        let timeout = self.timeout;
        let (client, reader) = self
            .handshake(reader, writer, transport, hangup)
            .map_err(|e| timed_out(e, timeout))?;
        client.transport.set_read_timeout(None);
        client.start(reader)
    }

    /// Negotiates; the reply reader is not started yet.
    pub(crate) fn handshake<R, W>(
        self,
        reader: R,
        writer: W,
        transport: Transport,
        hangup: Option<replies::Hangup>,
    ) -> Result<(Client, std::io::BufReader<R>), Error>
    where
        R: Read,
        W: Write + Send + 'static,
    {
        let mut r = std::io::BufReader::with_capacity(IO_BUFFER, reader);
        let mut w = BufWriter::with_capacity(IO_BUFFER, writer);
        let info = negotiate(&mut r, &mut w, &self.wishes)?;
        let client = Client {
            shared: Arc::new(Shared {
                info,
                state: Mutex::new(State {
                    next_handle: 1,
                    ..State::default()
                }),
                cv: std::sync::Condvar::new(),
                hangup,
            }),
            writer: Mutex::new(Box::new(w)),
            reader: None,
            transport,
            max_in_flight: self.max_in_flight,
            max_in_flight_bytes: self.max_in_flight_bytes,
            timeout: self.timeout,
            closed: false,
        };
        Ok((client, r))
    }
}

/// What can interrupt the connection from outside the reader thread.
/// A socket's reader and writer halves and a hangup that shuts it down (which
/// wakes a reader thread blocked on it).
fn halves<S: Send + Sync + 'static>(
    s: &S,
    clone: fn(&S) -> io::Result<S>,
    shutdown: fn(&S, Shutdown) -> io::Result<()>,
) -> io::Result<(S, S, replies::Hangup)> {
    let hangup = clone(s)?;
    let hangup: replies::Hangup = Box::new(move || {
        let _ = shutdown(&hangup, Shutdown::Both);
    });
    Ok((clone(s)?, clone(s)?, hangup))
}

pub(crate) enum Transport {
    Unix(UnixStream),
    Tcp(TcpStream),
    Stream,
}

impl Transport {
    fn shutdown_write(&self) {
        let _ = match self {
            Transport::Unix(s) => s.shutdown(Shutdown::Write),
            Transport::Tcp(s) => s.shutdown(Shutdown::Write),
            Transport::Stream => Ok(()),
        };
    }

    /// Bounds blocking reads: during the handshake, and while waiting for
    /// the server to hang up after `NBD_CMD_DISC`.
    fn set_read_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            Transport::Unix(s) => s.set_read_timeout(t),
            Transport::Tcp(s) => s.set_read_timeout(t),
            Transport::Stream => Ok(()),
        };
    }
}

/// A connection to one export of an NBD server.
///
/// All methods take `&self` and may be called from several threads. Closing
/// ([`disconnect`](Client::disconnect), or dropping the client) sends
/// `NBD_CMD_DISC`; requests still in flight are answered first, so their
/// [`Pending`]s remain usable.
pub struct Client {
    shared: Arc<Shared>,
    writer: Mutex<Box<dyn Write + Send>>,
    reader: Option<JoinHandle<Result<(), Arc<Error>>>>,
    transport: Transport,
    max_in_flight: usize,
    max_in_flight_bytes: usize,
    timeout: Option<Duration>,
    closed: bool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.info())
            .field("max_in_flight", &self.max_in_flight)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts configuring a connection.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects to `export` on a unix socket with the default settings.
    pub fn connect_unix(path: impl AsRef<Path>, export: &str) -> Result<Client, Error> {
        Client::builder().export_name(export).connect_unix(path)
    }

    /// Connects to `export` over TCP with the default settings.
    pub fn connect_tcp(
        addr: impl ToSocketAddrs + fmt::Debug,
        export: &str,
    ) -> Result<Client, Error> {
        Client::builder().export_name(export).connect_tcp(addr)
    }

    /// Starts the reply reader thread.
    fn start<R: Read + Send + 'static>(mut self, reader: R) -> Result<Client, Error> {
        let shared = Arc::clone(&self.shared);
        let t = thread::Builder::new()
            .name("nbd-client-replies".into())
            .spawn(move || replies::run(reader, &shared))?;
        self.reader = Some(t);
        Ok(self)
    }

    /// Reads replies on the calling thread until the stream ends (for the
    /// fuzzing entry points, which submit everything first).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn run_replies_inline<R: Read>(&self, reader: R) -> Result<(), Arc<Error>> {
        replies::run(reader, &self.shared)
    }

    /// What the server told about the export.
    pub fn info(&self) -> ExportInfo {
        let n: &Negotiated = &self.shared.info;
        ExportInfo {
            size: n.size,
            flags: n.flags,
            block: n.block,
            structured_replies: n.structured,
            block_status: n.base_allocation.is_some(),
        }
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.shared.info.size
    }

    /// The block size constraints requests must follow.
    pub fn block_size(&self) -> BlockSize {
        self.shared.info.block
    }

    /// Checks a request against the export before anything is sent.
    fn check(&self, command: Command, offset: u64, len: u64) -> Result<(), Error> {
        let info = &self.shared.info;
        let writes = matches!(command, Command::Write | Command::WriteZeroes);
        if writes && info.flags & FLAG_READ_ONLY != 0 {
            return Err(Error::ReadOnly(command));
        }
        if offset.checked_add(len).is_none_or(|end| end > info.size) {
            return Err(Error::OutOfBounds {
                command,
                offset,
                len,
                size: info.size,
            });
        }
        let min = u64::from(info.block.min);
        if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            return Err(Error::Unaligned {
                command,
                offset,
                len,
                min: info.block.min,
            });
        }
        Ok(())
    }

    /// Waits for room in the budget, registers the request and sends it.
    fn send(&self, req: Entry, flags: u16, payload: &[u8]) -> Result<u64, Error> {
        let (command, offset, len, cost) = (req.command, req.offset, req.len, req.cost);
        let handle = {
            let mut st = lock(&self.shared.state);
            let deadline = self.timeout.map(|t| Instant::now() + t);
            loop {
                if let Some(cause) = &st.failed {
                    return Err(Error::Disconnected(Arc::clone(cause)));
                }
                if st.shutdown {
                    return Err(Error::ServerShutdown);
                }
                let room = st.in_flight < self.max_in_flight
                    && st.in_flight_bytes.saturating_add(cost) <= self.max_in_flight_bytes;
                if st.in_flight == 0 || room {
                    break;
                }
                st = self.wait_step(st, deadline);
            }
            let handle = st.next_handle;
            st.next_handle += 1;
            st.in_flight += 1;
            st.in_flight_bytes += cost;
            st.entries.insert(handle, req);
            handle
        };
        let header = RequestHeader {
            flags,
            command: command.code(),
            handle,
            offset,
            length: len,
        }
        .encode();
        let sent = {
            let mut w = lock(&self.writer);
            w.write_all(&header)
                .and_then(|()| w.write_all(payload))
                .and_then(|()| w.flush())
        };
        if let Err(e) = sent {
            let mut st = lock(&self.shared.state);
            st.entries.remove(&handle);
            let cause = self
                .shared
                .fail(&mut st, timed_out(Error::Io(e), self.timeout));
            return Err(Error::Disconnected(cause));
        }
        Ok(handle)
    }

    /// One wait on the condition variable; past the deadline the
    /// connection fails with [`Error::Timeout`].
    fn wait_step<'a>(
        &self,
        st: std::sync::MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> std::sync::MutexGuard<'a, State> {
        wait_step(&self.shared, st, deadline, self.timeout)
    }

    fn parts(&self) -> Parts {
        Parts {
            shared: Arc::clone(&self.shared),
            timeout: self.timeout,
            handles: VecDeque::new(),
        }
    }

    /// Sends a read of `len` bytes at `offset`.
    pub fn submit_read(&self, offset: u64, len: usize) -> Result<PendingRead, Error> {
        self.submit_read_into(vec![0; len], offset)
    }

    /// Sends a read of `buf.len()` bytes at `offset` that fills `buf` (its
    /// contents are overwritten; reuse buffers of earlier reads this way). A
    /// read of at most the maximum payload is one request and returns `buf`
    /// itself; a longer one is split, and assembled when waited for.
    pub fn submit_read_into(&self, buf: Vec<u8>, offset: u64) -> Result<PendingRead, Error> {
        let len = buf.len();
        self.check(Command::Read, offset, len as u64)?;
        let max = self.shared.info.block.max as usize;
        let mut parts = self.parts();
        if len == 0 {
            return Ok(PendingRead {
                parts,
                out: Some(buf),
                len,
            });
        }
        let (out, mut first) = if len <= max {
            (None, Some(buf))
        } else {
            (Some(buf), None)
        };
        let mut pos = 0;
        while pos < len {
            let n = max.min(len - pos);
            let part = first.take().unwrap_or_else(|| vec![0; n]);
            let body = Body::Read {
                buf: Some(part),
                coverage: Coverage::default(),
            };
            let entry = Entry::new(Command::Read, offset + pos as u64, wire_len(n), n, body);
            parts.handles.push_back(self.send(entry, 0, &[])?);
            pos += n;
        }
        Ok(PendingRead { parts, out, len })
    }

    /// Sends a write of `data` at `offset`; the payload is on its way to
    /// the server when this returns, so `data` may be reused at once.
    pub fn submit_write(&self, data: &[u8], offset: u64) -> Result<Pending, Error> {
        self.check(Command::Write, offset, data.len() as u64)?;
        let max = self.shared.info.block.max as usize;
        let mut parts = self.parts();
        for (i, piece) in data.chunks(max).enumerate() {
            let at = offset + (i * max) as u64;
            let entry = Entry::new(
                Command::Write,
                at,
                wire_len(piece.len()),
                piece.len(),
                Body::Other,
            );
            parts.handles.push_back(self.send(entry, 0, piece)?);
        }
        Ok(Pending { parts })
    }

    /// Sends requests that make `len` bytes at `offset` read as zeroes:
    /// `NBD_CMD_WRITE_ZEROES`, or writes of zeroes if the server lacks it.
    pub fn submit_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
    ) -> Result<Pending, Error> {
        self.check(Command::WriteZeroes, offset, len)?;
        let info = &self.shared.info;
        let mut parts = self.parts();
        if info.flags & FLAG_SEND_WRITE_ZEROES == 0 {
            let step = (ZERO_BUFFER as u64).min(u64::from(info.block.max));
            let mut pos = 0;
            while pos < len {
                let n = step.min(len - pos) as usize;
                let entry = Entry::new(Command::Write, offset + pos, wire_len(n), n, Body::Other);
                parts.handles.push_back(self.send(entry, 0, &ZEROES[..n])?);
                pos += n as u64;
            }
            return Ok(Pending { parts });
        }
        let min = u64::from(info.block.min);
        let step = MAX_ZERO_REQUEST / min * min;
        let flags = match mode {
            ZeroMode::MayUnmap => 0,
            ZeroMode::NoHole => CMD_FLAG_NO_HOLE,
        };
        let mut pos = 0;
        while pos < len {
            let n = step.min(len - pos);
            let entry = Entry::new(Command::WriteZeroes, offset + pos, n as u32, 0, Body::Other);
            parts.handles.push_back(self.send(entry, flags, &[])?);
            pos += n;
        }
        Ok(Pending { parts })
    }

    /// Sends `NBD_CMD_FLUSH`: once it is answered, every write answered
    /// before it was sent is on stable storage. Nothing is sent if the
    /// server does not offer flushing (it has nothing to flush then).
    pub fn submit_flush(&self) -> Result<Pending, Error> {
        let mut parts = self.parts();
        if self.shared.info.flags & FLAG_SEND_FLUSH != 0 {
            let entry = Entry::new(Command::Flush, 0, 0, 0, Body::Other);
            parts.handles.push_back(self.send(entry, 0, &[])?);
        }
        Ok(Pending { parts })
    }

    /// Fills `buf` with the bytes at `offset`, with up to
    /// [`max_in_flight`](ClientBuilder::max_in_flight) requests in flight.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.check(Command::Read, offset, buf.len() as u64)?;
        let max = self.shared.info.block.max as usize;
        let mut window: VecDeque<(PendingRead, usize)> = VecDeque::new();
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut pos = 0;
        while pos < buf.len() || !window.is_empty() {
            if pos < buf.len() && window.len() < self.max_in_flight {
                let n = max.min(buf.len() - pos);
                let mut b = spare.pop().unwrap_or_default();
                b.resize(n, 0);
                window.push_back((self.submit_read_into(b, offset + pos as u64)?, pos));
                pos += n;
                continue;
            }
            if let Some((p, at)) = window.pop_front() {
                let data = p.wait()?;
                buf[at..at + data.len()].copy_from_slice(&data);
                spare.push(data);
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` and waits until the server has answered.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), Error> {
        self.check(Command::Write, offset, data.len() as u64)?;
        let max = self.shared.info.block.max as usize;
        let mut window = VecDeque::new();
        for (i, piece) in data.chunks(max).enumerate() {
            if window.len() >= self.max_in_flight {
                if let Some(p) = window.pop_front() {
                    Pending::wait(p)?;
                }
            }
            window.push_back(self.submit_write(piece, offset + (i * max) as u64)?);
        }
        window.into_iter().try_for_each(Pending::wait)
    }

    /// Makes `len` bytes at `offset` read as zeroes and waits for it.
    pub fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<(), Error> {
        self.submit_write_zeroes(offset, len, mode)?.wait()
    }

    /// Flushes the server's caches and waits for it.
    pub fn flush(&self) -> Result<(), Error> {
        self.submit_flush()?.wait()
    }

    /// The allocation status of the bytes from `offset`: consecutive extents
    /// covering at least the first byte and at most `len` bytes (the server
    /// may answer for less than asked: ask again from where it stopped).
    /// Without `base:allocation` everything is reported as data.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockStatus>, Error> {
        self.submit_block_status(offset, len)?.wait()
    }

    /// Sends a block status query; see [`block_status`](Client::block_status).
    pub fn submit_block_status(&self, offset: u64, len: u64) -> Result<PendingStatus, Error> {
        self.check(Command::BlockStatus, offset, len)?;
        let info = &self.shared.info;
        let parts = self.parts();
        if len == 0 || info.base_allocation.is_none() {
            let answer = (len > 0)
                .then(|| BlockStatus::data(len))
                .into_iter()
                .collect();
            return Ok(PendingStatus {
                parts,
                answer: Some(answer),
            });
        }
        let min = u64::from(info.block.min);
        // At most u32::MAX, on the minimum's grid.
        let n = len.min(u64::from(u32::MAX) / min * min) as u32;
        let body = Body::Status { extents: None };
        let entry = Entry::new(Command::BlockStatus, offset, n, 0, body);
        let mut parts = parts;
        parts.handles.push_back(self.send(entry, 0, &[])?);
        Ok(PendingStatus {
            parts,
            answer: None,
        })
    }

    /// Sends `NBD_CMD_DISC`, waits for the server to answer what is in flight
    /// and hang up, and reports whether the connection failed at any point.
    pub fn disconnect(mut self) -> Result<(), Error> {
        self.close()
    }

    fn close(&mut self) -> Result<(), Error> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        let failed = lock(&self.shared.state).failed.clone();
        if failed.is_none() {
            let disc = RequestHeader {
                flags: 0,
                command: CMD_DISC,
                handle: 0,
                offset: 0,
                length: 0,
            }
            .encode();
            let mut w = lock(&self.writer);
            let _ = w.write_all(&disc).and_then(|()| w.flush());
        }
        self.transport.shutdown_write();
        self.transport
            .set_read_timeout(Some(self.timeout.unwrap_or(CLOSE_TIMEOUT)));
        let result = match self.reader.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => return Err(Error::ThreadPanicked),
            None => Ok(()),
        };
        match failed {
            // The connection had ended before we hung up.
            Some(cause) => Err(Error::Disconnected(cause)),
            None => result.map_err(Error::Disconnected),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A socket timeout (which only a configured timeout sets) as [`Error::Timeout`].
fn timed_out(e: Error, timeout: Option<Duration>) -> Error {
    match (e, timeout) {
        (Error::Io(io), Some(t))
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Error::Timeout(t)
        }
        (e, _) => e,
    }
}

/// The length of one wire request, which the callers have bounded by the
/// maximum payload.
fn wire_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn wait_step<'a>(
    shared: &Shared,
    st: std::sync::MutexGuard<'a, State>,
    deadline: Option<Instant>,
    timeout: Option<Duration>,
) -> std::sync::MutexGuard<'a, State> {
    match (deadline, timeout) {
        (Some(d), Some(t)) => {
            let now = Instant::now();
            if now >= d {
                let mut st = st;
                shared.fail(&mut st, Error::Timeout(t));
                return st;
            }
            shared
                .cv
                .wait_timeout(st, d - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0
        }
        _ => shared.cv.wait(st).unwrap_or_else(PoisonError::into_inner),
    }
}

/// The wire requests behind one submitted request, collected in order.
struct Parts {
    shared: Arc<Shared>,
    timeout: Option<Duration>,
    handles: VecDeque<u64>,
}

impl Parts {
    /// How a request in flight shows in `{:?}`: its type and how many NBD
    /// requests it was split into.
    fn debug(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(name)
            .field("requests", &self.handles.len())
            .finish_non_exhaustive()
    }

    /// Waits for the next part's reply.
    fn next(&mut self) -> Option<Result<Outcome, Error>> {
        let handle = self.handles.pop_front()?;
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut st = lock(&self.shared.state);
        loop {
            if st.entries.get(&handle).is_some_and(|e| e.done) {
                let e = st.entries.remove(&handle)?;
                return Some(e.into_outcome());
            }
            if let Some(cause) = &st.failed {
                let cause = Arc::clone(cause);
                st.entries.remove(&handle);
                return Some(Err(Error::Disconnected(cause)));
            }
            if !st.entries.contains_key(&handle) {
                // Only a failed connection drops entries: not reached.
                return Some(Err(Error::ServerClosed));
            }
            st = wait_step(&self.shared, st, deadline, self.timeout);
        }
    }
}

impl Drop for Parts {
    fn drop(&mut self) {
        if self.handles.is_empty() {
            return;
        }
        let mut st = lock(&self.shared.state);
        for h in self.handles.drain(..) {
            match st.entries.get_mut(&h) {
                Some(e) if e.done => {
                    st.entries.remove(&h);
                }
                Some(e) => e.abandoned = true,
                None => {}
            }
        }
    }
}

/// A read in flight; [`wait`](PendingRead::wait) for its data. Dropping it
/// without waiting is fine (the reply is still read and dropped).
pub struct PendingRead {
    parts: Parts,
    /// The caller's buffer, when the read was split (or empty).
    out: Option<Vec<u8>>,
    len: usize,
}

impl fmt::Debug for PendingRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingRead")
            .field("len", &self.len)
            .field("requests", &self.parts.handles.len())
            .finish_non_exhaustive()
    }
}

impl PendingRead {
    /// Length of the read.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the read is of zero bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Waits for the data.
    pub fn wait(mut self) -> Result<Vec<u8>, Error> {
        let Some(mut out) = self.out.take() else {
            return match self.parts.next() {
                Some(Ok(Outcome::Data(d))) => Ok(d),
                Some(Err(e)) => Err(e),
                _ => Err(Error::ServerClosed),
            };
        };
        let mut pos = 0;
        while let Some(r) = self.parts.next() {
            match r? {
                Outcome::Data(d) => {
                    out[pos..pos + d.len()].copy_from_slice(&d);
                    pos += d.len();
                }
                _ => return Err(Error::ServerClosed),
            }
        }
        Ok(out)
    }
}

/// A write, write-zeroes or flush in flight; [`wait`](Pending::wait) for
/// the server's answer. Dropping it without waiting ignores the answer.
pub struct Pending {
    parts: Parts,
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.parts.debug("Pending", f)
    }
}

impl Pending {
    /// Waits until the server has answered; the first error wins.
    pub fn wait(mut self) -> Result<(), Error> {
        let mut result = Ok(());
        while let Some(r) = self.parts.next() {
            if let (Err(e), Ok(())) = (r, &result) {
                result = Err(e);
            }
        }
        result
    }
}

/// A block status query in flight; [`wait`](PendingStatus::wait) for the extents.
pub struct PendingStatus {
    parts: Parts,
    /// The answer known without asking (no `base:allocation`, or nothing asked).
    answer: Option<Vec<BlockStatus>>,
}

impl fmt::Debug for PendingStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.parts.debug("PendingStatus", f)
    }
}

impl PendingStatus {
    /// Waits for the extents: consecutive, from the query's offset, at most
    /// its length, at least one unless the query was empty.
    pub fn wait(mut self) -> Result<Vec<BlockStatus>, Error> {
        if let Some(answer) = self.answer.take() {
            return Ok(answer);
        }
        match self.parts.next() {
            Some(Ok(Outcome::Extents(e))) => Ok(e),
            Some(Err(e)) => Err(e),
            _ => Err(Error::ServerClosed),
        }
    }
}
