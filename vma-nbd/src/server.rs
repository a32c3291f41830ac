//! Server configuration, listeners and shutdown.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::handshake::{handshake, Outcome};
use crate::proto::check_string;
use crate::transmission::{lock, serve_inline, serve_pooled, ConnOptions};
use crate::{Error, Export};

/// How often a listener checks for shutdown while no client connects. A
/// client that connects is accepted at once: the listener sleeps in poll(2)
/// on its socket (QEMU's `blockdev-add` of an NBD node waits for the
/// handshake with its main loop stopped, and the guest's I/O with it).
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Read buffer of a connection (large write payloads bypass it).
const READ_BUFFER: usize = 64 * 1024;

/// Configures and builds a [`Server`].
pub struct ServerBuilder {
    exports: Vec<(String, Arc<dyn Export>)>,
    conn: ConnOptions,
    max_connections: usize,
    stop_after_last_client: bool,
}

impl fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder")
            .field(
                "exports",
                &self.exports.iter().map(|e| &e.0).collect::<Vec<_>>(),
            )
            .field("conn", &self.conn)
            .field("max_connections", &self.max_connections)
            .field("stop_after_last_client", &self.stop_after_last_client)
            .finish()
    }
}

impl Default for ServerBuilder {
    fn default() -> Self {
        Self {
            exports: Vec::new(),
            conn: ConnOptions {
                workers: 4,
                max_in_flight: 16,
                max_in_flight_bytes: 64 * 1024 * 1024,
            },
            max_connections: 64,
            stop_after_last_client: false,
        }
    }
}

impl ServerBuilder {
    /// Adds an export under `name` (at most 4096 bytes, no NUL; the empty
    /// name is what clients use for "the default export").
    pub fn export(mut self, name: impl Into<String>, export: Arc<dyn Export>) -> Self {
        self.exports.push((name.into(), export));
        self
    }

    /// Worker threads per connection that execute requests concurrently
    /// (default 4; 0 executes them one by one on the connection's thread).
    pub fn workers(mut self, n: usize) -> Self {
        self.conn.workers = n;
        self
    }

    /// Requests per connection that may be read but not yet answered
    /// (default 16). When reached, the server stops reading the socket.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.conn.max_in_flight = n;
        self
    }

    /// Payload bytes (write data and read buffers) per connection that may
    /// be in flight (default 64 MiB). A single larger request is still
    /// served, alone.
    pub fn max_in_flight_bytes(mut self, n: usize) -> Self {
        self.conn.max_in_flight_bytes = n;
        self
    }

    /// Simultaneous connections per listener (default 64); further clients
    /// are disconnected right after `accept`.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Stop a listener once its last client disconnected, after at least
    /// one client connected (for one-shot exports; default off).
    pub fn stop_after_last_client(mut self, yes: bool) -> Self {
        self.stop_after_last_client = yes;
        self
    }

    /// Checks the configuration and builds the server.
    pub fn build(self) -> Result<Server, Error> {
        if self.conn.max_in_flight == 0 {
            return Err(Error::Config("max_in_flight must be at least 1".into()));
        }
        if self.conn.workers > 256 {
            return Err(Error::Config("at most 256 workers per connection".into()));
        }
        if self.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        let mut exports = BTreeMap::new();
        for (name, export) in self.exports {
            if let Err(e) = check_string(&name) {
                return Err(Error::InvalidExport {
                    name,
                    reason: e.to_string(),
                });
            }
            if let Err(reason) = export.block_size().validate(export.size()) {
                return Err(Error::InvalidExport { name, reason });
            }
            if exports.contains_key(&name) {
                return Err(Error::DuplicateExport(name));
            }
            exports.insert(name, export);
        }
        Ok(Server {
            inner: Arc::new(Inner {
                exports,
                conn: self.conn,
                max_connections: self.max_connections,
                stop_after_last_client: self.stop_after_last_client,
            }),
        })
    }
}

struct Inner {
    exports: BTreeMap<String, Arc<dyn Export>>,
    conn: ConnOptions,
    max_connections: usize,
    stop_after_last_client: bool,
}

/// An NBD server: a set of named exports plus connection settings.
///
/// Cheap to clone. Serve it on listeners with [`listen_unix`](Server::listen_unix)
/// / [`listen_tcp`](Server::listen_tcp), or on single streams with
/// [`serve_stream`](Server::serve_stream) / [`serve_split`](Server::serve_split).
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.inner.exports.keys().collect::<Vec<_>>())
            .field("conn", &self.inner.conn)
            .finish_non_exhaustive()
    }
}

/// A single stream used for both directions, borrowed one call at a time.
struct Duplex<S>(RefCell<S>);

impl<S: Read> Read for &Duplex<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl<S: Write> Write for &Duplex<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

impl Server {
    /// Starts configuring a server.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Names of the exports, sorted.
    pub fn export_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.inner.exports.keys().map(String::as_str)
    }

    /// Serves one connection over a single `Read + Write` stream, handling
    /// requests one at a time on the calling thread (no pipelining
    /// concurrency; replies are in request order).
    ///
    /// Returns `Ok(())` when the client disconnects (`NBD_CMD_DISC`,
    /// `NBD_OPT_ABORT`, or EOF between messages), `Err` on protocol
    /// violations and I/O errors. Useful for tests and fuzzing (the
    /// `fuzz` module, with the `fuzzing` feature).
    pub fn serve_stream<S: Read + Write>(&self, stream: S) -> Result<(), Error> {
        let duplex = Duplex(RefCell::new(stream));
        let mut r = BufReader::with_capacity(READ_BUFFER, &duplex);
        let mut w = &duplex;
        match handshake(&mut r, &mut w, &self.inner.exports)? {
            Outcome::Closed => Ok(()),
            Outcome::Transmission(session) => serve_inline(&mut r, w, &session),
        }
    }

    /// Serves one connection given its two halves: the calling thread reads
    /// requests, the configured worker threads execute them concurrently and
    /// write replies (whole replies under a mutex, possibly out of order).
    ///
    /// Returns when the client disconnected and every request read has been
    /// answered. If writing a reply fails, the remaining replies are dropped
    /// and the function returns once `reader` reports EOF or an error.
    pub fn serve_split<R: Read, W: Write + Send>(&self, reader: R, writer: W) -> Result<(), Error> {
        self.serve_halves(reader, writer, None)
    }

    fn serve_halves<R: Read, W: Write + Send>(
        &self,
        reader: R,
        mut writer: W,
        on_broken: Option<&(dyn Fn() + Sync)>,
    ) -> Result<(), Error> {
        let mut r = BufReader::with_capacity(READ_BUFFER, reader);
        match handshake(&mut r, &mut writer, &self.inner.exports)? {
            Outcome::Closed => Ok(()),
            Outcome::Transmission(session) => {
                serve_pooled(&mut r, writer, &session, &self.inner.conn, on_broken)
            }
        }
    }

    fn serve_peer(&self, peer: &Peer) -> Result<(), Error> {
        let result = match peer {
            Peer::Unix(s) => self.serve_halves(s, s, Some(&|| peer.shutdown())),
            Peer::Tcp(s) => self.serve_halves(s, s, Some(&|| peer.shutdown())),
        };
        peer.shutdown();
        result
    }

    /// Listens on a new unix socket at `path` (which must not exist) and
    /// serves clients on background threads. The socket file is removed
    /// when the listener stops.
    pub fn listen_unix(&self, path: impl AsRef<Path>) -> Result<ServerHandle, Error> {
        let path = path.as_ref();
        let bind_err = |source| Error::Bind {
            addr: path.display().to_string(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        if let Err(e) = listener.set_nonblocking(true) {
            let _ = std::fs::remove_file(path);
            return Err(bind_err(e));
        }
        self.spawn_listener(
            Listener::Unix(listener),
            ListenAddr::Unix(path.to_path_buf()),
        )
    }

    /// Listens on a TCP address (e.g. `"127.0.0.1:10809"`; port 0 picks a
    /// free port, see [`ServerHandle::local_addr`]).
    pub fn listen_tcp(&self, addr: impl ToSocketAddrs + fmt::Debug) -> Result<ServerHandle, Error> {
        let bind_err = |source| Error::Bind {
            addr: format!("{addr:?}"),
            source,
        };
        let listener = TcpListener::bind(&addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        self.spawn_listener(Listener::Tcp(listener), ListenAddr::Tcp(local))
    }

    fn spawn_listener(&self, listener: Listener, addr: ListenAddr) -> Result<ServerHandle, Error> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            table: std::sync::Mutex::new(ConnTable::default()),
        });
        let server = self.clone();
        let sh = Arc::clone(&shared);
        let socket_path = match &addr {
            ListenAddr::Unix(p) => Some(p.clone()),
            ListenAddr::Tcp(_) => None,
        };
        let thread = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&server, listener, &sh, socket_path))
            .map_err(|e| {
                if let ListenAddr::Unix(p) = &addr {
                    let _ = std::fs::remove_file(p);
                }
                Error::Io(e)
            })?;
        Ok(ServerHandle {
            addr,
            shared,
            thread: Some(thread),
        })
    }
}

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address (with the actual port).
    Tcp(SocketAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Peer> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Peer::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Peer::Tcp(s)),
        }
    }

    /// Waits until a client is there to accept, or `timeout` passed.
    fn wait(&self, timeout: Duration) {
        let fd = match self {
            Listener::Unix(l) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let timeout = Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        if rustix::event::poll(&mut fds, Some(&timeout)).is_err() {
            thread::sleep(ACCEPT_POLL);
        }
    }
}

enum Peer {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Peer {
    fn prepare(&self) -> io::Result<()> {
        match self {
            Peer::Unix(s) => s.set_nonblocking(false),
            Peer::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)
            }
        }
    }

    fn try_clone(&self) -> io::Result<Peer> {
        Ok(match self {
            Peer::Unix(s) => Peer::Unix(s.try_clone()?),
            Peer::Tcp(s) => Peer::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Peer::Unix(s) => s.shutdown(Shutdown::Both),
            Peer::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

#[derive(Default)]
struct ConnTable {
    next_id: u64,
    live: HashMap<u64, Peer>,
    ever_connected: bool,
}

struct Shared {
    stop: AtomicBool,
    table: std::sync::Mutex<ConnTable>,
}

impl Shared {
    /// Stops the listener and disconnects every client.
    fn trigger(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let table = lock(&self.table);
        for peer in table.live.values() {
            peer.shutdown();
        }
    }

    fn register(&self, peer: &Peer, max: usize) -> Option<u64> {
        let clone = peer.try_clone().ok()?;
        let mut table = lock(&self.table);
        if self.stop.load(Ordering::SeqCst) || table.live.len() >= max {
            return None;
        }
        let id = table.next_id;
        table.next_id += 1;
        table.live.insert(id, clone);
        table.ever_connected = true;
        Some(id)
    }

    fn unregister(&self, id: u64, stop_when_idle: bool) {
        let mut table = lock(&self.table);
        table.live.remove(&id);
        if stop_when_idle && table.live.is_empty() && table.ever_connected {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

fn accept_loop(
    server: &Server,
    listener: Listener,
    shared: &Arc<Shared>,
    socket_path: Option<PathBuf>,
) -> Result<(), Error> {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut panicked = false;
    let once = server.inner.stop_after_last_client;
    while !shared.stop.load(Ordering::SeqCst) {
        let peer = match listener.accept() {
            Ok(peer) => peer,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                listener.wait(ACCEPT_POLL);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // E.g. out of file descriptors: back off.
                thread::sleep(ACCEPT_POLL * 5);
                continue;
            }
        };
        // Join finished connection threads.
        let (done, running): (Vec<_>, Vec<_>) = threads.into_iter().partition(|t| t.is_finished());
        threads = running;
        for t in done {
            panicked |= t.join().is_err();
        }
        if peer.prepare().is_err() {
            continue;
        }
        let Some(id) = shared.register(&peer, server.inner.max_connections) else {
            peer.shutdown();
            continue;
        };
        let (srv, sh) = (server.clone(), Arc::clone(shared));
        let spawned = thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                // Errors only concern this client; the server goes on.
                let _ = srv.serve_peer(&peer);
                drop(peer);
                sh.unregister(id, once);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(_) => shared.unregister(id, once),
        }
    }
    drop(listener);
    shared.trigger();
    for t in threads {
        panicked |= t.join().is_err();
    }
    if let Some(path) = socket_path {
        let _ = std::fs::remove_file(path);
    }
    if panicked {
        Err(Error::ThreadPanicked)
    } else {
        Ok(())
    }
}

/// Controls a running listener. Dropping it shuts the listener down.
pub struct ServerHandle {
    addr: ListenAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

/// Stops a listener from another thread (e.g. a signal handler thread).
#[derive(Clone)]
pub struct ShutdownTrigger {
    shared: Arc<Shared>,
}

impl fmt::Debug for ShutdownTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownTrigger").finish_non_exhaustive()
    }
}

impl ShutdownTrigger {
    /// Stops accepting and disconnects all clients; the owner of the
    /// [`ServerHandle`] sees [`ServerHandle::wait`] return.
    pub fn trigger(&self) {
        self.shared.trigger();
    }
}

impl ServerHandle {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// Number of connected clients.
    pub fn connections(&self) -> usize {
        lock(&self.shared.table).live.len()
    }

    /// Whether the listener has stopped (after a shutdown, or on its own
    /// with [`ServerBuilder::stop_after_last_client`]).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// A cloneable trigger that shuts this listener down.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Stops accepting, disconnects all clients (hard disconnect), joins all
    /// threads and removes the unix socket file.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.shared.trigger();
        self.join()
    }

    /// Waits until the listener stops on its own or through a
    /// [`ShutdownTrigger`], then cleans up like [`shutdown`](Self::shutdown).
    pub fn wait(mut self) -> Result<(), Error> {
        self.join()
    }

    fn join(&mut self) -> Result<(), Error> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::ThreadPanicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shared.trigger();
            let _ = self.join();
        }
    }
}
