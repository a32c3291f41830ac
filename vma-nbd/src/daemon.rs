//! QEMU's block layer beside us: `qemu-storage-daemon` opens an image in
//! any format QEMU knows and exports it over NBD on a private unix socket.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::transmission::lock;
use crate::{Client, ClientBuilder, Error};

/// The daemon's program name, looked up on `PATH`.
pub const STORAGE_DAEMON: &str = "qemu-storage-daemon";
/// The image tool's program name, looked up on `PATH`.
pub const QEMU_IMG: &str = "qemu-img";
/// util-linux's tool that starts a program with a parent-death signal
/// ([`StorageDaemonBuilder::die_with_parent`]), looked up on `PATH`.
pub const SETPRIV: &str = "setpriv";
/// Most bytes of the daemon's standard error kept for error messages.
const MAX_STDERR: usize = 16 * 1024;
/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long the daemon gets to quit before it is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);
/// QEMU's NBD server allocates a buffer for every request; glibc hands each
/// of these (1 MiB and up) back to the kernel when freed, so every request
/// page-faults its buffer in again. Keeping them in the heap made writing
/// 1 GiB into a qcow2 through the daemon about 30 % faster. Set only when
/// the environment has no `GLIBC_TUNABLES` of its own.
const MALLOC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456";

/// Configures a [`StorageDaemon`].
#[derive(Debug, Clone)]
pub struct StorageDaemonBuilder {
    image: PathBuf,
    format: String,
    writable: bool,
    discard: bool,
    detect_zeroes: bool,
    export_name: String,
    program: OsString,
    startup_timeout: Duration,
    temp_dir: Option<PathBuf>,
    die_with_parent: bool,
}

impl StorageDaemonBuilder {
    /// Export the image writable (default: read-only; the image is then
    /// opened read-only too).
    pub fn writable(mut self, yes: bool) -> Self {
        self.writable = yes;
        self
    }

    /// Let write-zeroes and discards deallocate (`discard=unmap`; default
    /// on). Without it, zeroed qcow2 clusters stay allocated.
    pub fn discard(mut self, yes: bool) -> Self {
        self.discard = yes;
        self
    }

    /// Turn writes of all-zero data into write-zeroes that deallocate
    /// (`detect-zeroes=unmap`, or `on` without discard; default off).
    pub fn detect_zeroes(mut self, yes: bool) -> Self {
        self.detect_zeroes = yes;
        self
    }

    /// The NBD export name (default `vma`).
    pub fn export_name(mut self, name: impl Into<String>) -> Self {
        self.export_name = name.into();
        self
    }

    /// The program to run (default [`STORAGE_DAEMON`], looked up on `PATH`).
    pub fn program(mut self, program: impl Into<OsString>) -> Self {
        self.program = program.into();
        self
    }

    /// How long the daemon may take to open the image (default 30 s).
    pub fn startup_timeout(mut self, t: Duration) -> Self {
        self.startup_timeout = t;
        self
    }

    /// Where the private socket directory is made (default: the system's
    /// temporary directory, `TMPDIR`). A unix socket path holds at most
    /// 107 bytes.
    pub fn temp_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.temp_dir = Some(dir.into());
        self
    }

    /// Have the kernel kill the daemon (SIGKILL) when the thread that
    /// starts it ends, the process killed included (default off). Without
    /// it a process killed by SIGKILL leaves its daemon running:
    /// qemu-storage-daemon does not quit when its monitor's input closes.
    /// The daemon is started through util-linux's [`SETPRIV`]
    /// (`setpriv --pdeathsig KILL`), so that must be installed. The signal
    /// follows the starting *thread*: start the daemon from a thread that
    /// outlives it (the main thread, say).
    pub fn die_with_parent(mut self, yes: bool) -> Self {
        self.die_with_parent = yes;
        self
    }

    /// Starts the daemon and waits until it serves the image.
    pub fn start(self) -> Result<StorageDaemon, Error> {
        check_format(&self.format)?;
        let base = self.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = private_dir(&base)?;
        let socket = dir.join("nbd.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            let _ = std::fs::remove_dir(&dir);
            return Err(Error::SocketPathTooLong(socket));
        }
        let mut daemon = match self.spawn(&socket) {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        daemon.dir = Some(dir);
        daemon.socket = socket;
        daemon.ready(self.startup_timeout)?;
        Ok(daemon)
    }

    fn args(&self, socket: &Path) -> Vec<OsString> {
        let ro = if self.writable { "off" } else { "on" };
        let block_device =
            std::fs::metadata(&self.image).is_ok_and(|m| m.file_type().is_block_device());
        let protocol = if block_device { "host_device" } else { "file" };
        let mut file = opt(&format!(
            "driver={protocol},node-name=proto,read-only={ro},filename="
        ));
        file.push(escape(self.image.as_os_str()));
        let mut fmt = format!(
            "driver={},node-name=fmt,file=proto,read-only={ro}",
            self.format
        );
        if self.discard {
            file.push(",discard=unmap");
            fmt.push_str(",discard=unmap");
        }
        if self.detect_zeroes {
            fmt.push_str(if self.discard {
                ",detect-zeroes=unmap"
            } else {
                ",detect-zeroes=on"
            });
        }
        let mut server = opt("addr.type=unix,addr.path=");
        server.push(escape(socket.as_os_str()));
        let export = format!(
            "type=nbd,id=export0,node-name=fmt,name={},writable={}",
            self.export_name.replace(',', ",,"),
            if self.writable { "on" } else { "off" }
        );
        // The monitor comes last: its greeting then means every option
        // before it has been processed.
        [
            opt("--blockdev"),
            file,
            opt("--blockdev"),
            opt(&fmt),
            opt("--nbd-server"),
            server,
            opt("--export"),
            opt(&export),
            opt("--chardev"),
            opt("stdio,id=qmp0"),
            opt("--monitor"),
            opt("chardev=qmp0"),
        ]
        .into()
    }

    fn spawn(&self, socket: &Path) -> Result<StorageDaemon, Error> {
        let program = self.program.to_string_lossy().into_owned();
        let mut command = if self.die_with_parent {
            // setpriv would report a missing daemon only as its own exit
            // status: look both up first, so each gets its own error.
            let daemon = on_path(&self.program).ok_or_else(|| Error::ToolMissing {
                program: program.clone(),
            })?;
            let setpriv = on_path(OsStr::new(SETPRIV)).ok_or_else(|| Error::Spawn {
                program: format!("{SETPRIV} (util-linux), to tie the daemon to this process"),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(daemon);
            c
        } else {
            Command::new(&self.program)
        };
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            command.env("GLIBC_TUNABLES", MALLOC_TUNABLES);
        }
        let mut child = command
            .args(self.args(socket))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| spawn_error(program, source))?;
        let stdin = child.stdin.take();
        let lines = child
            .stdout
            .take()
            .map(|out| Mutex::new(forward_lines(out)));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_thread = child.stderr.take().map(|e| capture(e, Arc::clone(&stderr)));
        Ok(StorageDaemon {
            child: Some(child),
            stdin,
            lines,
            stderr,
            stderr_thread,
            dir: None,
            socket: PathBuf::new(),
            image: self.image.clone(),
            format: self.format.clone(),
            export_name: self.export_name.clone(),
            size: 0,
            writable: self.writable,
        })
    }
}

/// Where `program` is: itself if it names a path, else the first executable
/// file of that name in a `PATH` directory.
fn on_path(program: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.as_bytes().contains(&b'/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

fn opt(s: &str) -> OsString {
    OsString::from(s)
}

/// A value inside QEMU's `key=value,...` syntax: commas are doubled.
fn escape(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn check_format(format: &str) -> Result<(), Error> {
    let ok = !format.is_empty()
        && format.len() <= 64
        && format
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidFormat(format.to_owned()))
    }
}

fn spawn_error(program: String, source: std::io::Error) -> Error {
    if source.kind() == std::io::ErrorKind::NotFound {
        Error::ToolMissing { program }
    } else {
        Error::Spawn { program, source }
    }
}

/// A new directory only we can enter, for the daemon's socket.
fn private_dir(base: &Path) -> Result<PathBuf, Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("vma-nbd-{}-{n}-{nanos:08x}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::Io(e)),
        }
    }
}

/// Sends the lines of the daemon's standard output (QMP) to a channel.
fn forward_lines(out: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Keeps the first [`MAX_STDERR`] bytes of the daemon's standard error.
fn capture(mut err: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match err.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut kept = lock(&into);
                    let room = MAX_STDERR.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
    })
}

/// A running `qemu-storage-daemon` that exports one image over NBD on a
/// unix socket in a private directory (mode 0700).
///
/// ```no_run
/// use vma_nbd::StorageDaemon;
///
/// let daemon = StorageDaemon::builder("disk.qcow2", "qcow2").start()?;
/// let client = daemon.connect()?;
/// let mut first = vec![0; 65536];
/// client.read_at(&mut first, 0)?;
/// println!("{} bytes, guest-visible", daemon.size());
/// drop(client);
/// daemon.shutdown()?; // QMP quit, reap, remove the socket directory
/// # Ok::<(), vma_nbd::Error>(())
/// ```
///
/// Dropping it shuts it down too (errors ignored). If this process is
/// killed outright, the daemon keeps running (nothing asks it to quit).
#[derive(Debug)]
pub struct StorageDaemon {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// The QMP lines (in a mutex only to make the daemon `Sync`).
    lines: Option<Mutex<Receiver<String>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<JoinHandle<()>>,
    dir: Option<PathBuf>,
    socket: PathBuf,
    image: PathBuf,
    format: String,
    export_name: String,
    size: u64,
    writable: bool,
}

impl StorageDaemon {
    /// Starts configuring a daemon for `image` in `format` (a QEMU block
    /// driver name: `raw`, `qcow2`, `vmdk`, `vdi`, `vhdx`, `qed`, ...).
    pub fn builder(image: impl AsRef<Path>, format: &str) -> StorageDaemonBuilder {
        StorageDaemonBuilder {
            image: image.as_ref().to_path_buf(),
            format: format.to_owned(),
            writable: false,
            discard: true,
            detect_zeroes: false,
            export_name: "vma".into(),
            program: STORAGE_DAEMON.into(),
            startup_timeout: Duration::from_secs(30),
            temp_dir: None,
            die_with_parent: false,
        }
    }

    /// Waits for the QMP greeting (sent once every option is processed),
    /// negotiates QMP, and learns the export's size.
    fn ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let started = self
            .expect_line(deadline, "\"QMP\"")
            .and_then(|()| self.qmp("qmp_capabilities", deadline));
        if let Err(message) = started {
            return Err(self.fail_start(message));
        }
        let client = Client::builder()
            .export_name(&self.export_name)
            .timeout(Some(timeout))
            .connect_unix(&self.socket);
        match client {
            Ok(c) => {
                self.size = c.size();
                drop(c);
                Ok(())
            }
            Err(e) => Err(self.fail_start(format!("its NBD export does not work: {e}"))),
        }
    }

    /// Sends a QMP command and waits for its answer.
    fn qmp(&mut self, command: &str, deadline: Instant) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("its monitor is closed")?;
        writeln!(stdin, "{{\"execute\": \"{command}\"}}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("cannot talk to its monitor: {e}"))?;
        self.expect_line(deadline, "\"return\"")
    }

    /// Reads QMP lines until one contains `what`; a QMP error or the end of
    /// the output (the daemon exited) is an error.
    fn expect_line(&mut self, deadline: Instant, what: &str) -> Result<(), String> {
        let lines = self.lines.as_mut().ok_or("its monitor is closed")?;
        let lines = lines.get_mut().unwrap_or_else(PoisonError::into_inner);
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(wait) {
                Ok(line) if line.contains("\"error\"") => return Err(format!("QMP: {line}")),
                Ok(line) if line.contains(what) => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err("it did not come up in time".into());
                }
                Err(RecvTimeoutError::Disconnected) => return Err("it exited".into()),
            }
        }
    }

    /// Stops the daemon after a failed start; the error carries what it said.
    fn fail_start(&mut self, what: String) -> Error {
        let status = self.stop();
        let stderr = self.stderr_text();
        let exited_badly = status.is_some_and(|s| !s.success());
        let message = match (stderr.is_empty(), exited_badly) {
            // QEMU's own words say it best ("Could not open 'x': ...").
            (false, true) => stderr,
            (false, false) => format!("{what}: {stderr}"),
            (true, _) => match status {
                Some(s) => format!("{what} ({s})"),
                None => what,
            },
        };
        Error::DaemonStart {
            image: self.image.clone(),
            format: self.format.clone(),
            message,
        }
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stderr))
            .trim()
            .to_owned()
    }

    /// Asks the daemon to quit (killing it if it does not), reaps it and
    /// removes the socket directory; returns its exit status if it ran.
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "{{\"execute\": \"quit\"}}").and_then(|()| stdin.flush());
        }
        let deadline = Instant::now() + QUIT_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                _ => {
                    let _ = child.kill();
                    break None;
                }
            }
        };
        let _ = child.wait();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        self.lines = None;
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        status
    }

    /// Asks the daemon to quit, waits for it and removes the socket
    /// directory. Fails if it had died or did not quit cleanly.
    pub fn shutdown(mut self) -> Result<(), Error> {
        match self.stop() {
            Some(s) if s.success() => Ok(()),
            status => {
                let what = match status {
                    Some(s) => s.to_string(),
                    None => format!("it did not quit within {QUIT_TIMEOUT:?} and was killed"),
                };
                let stderr = self.stderr_text();
                let message = if stderr.is_empty() {
                    what
                } else {
                    format!("{what}: {stderr}")
                };
                Err(Error::DaemonExit {
                    image: self.image.clone(),
                    message,
                })
            }
        }
    }

    /// Connects a client with the default settings.
    pub fn connect(&self) -> Result<Client, Error> {
        self.connect_with(Client::builder())
    }

    /// Connects a client configured by `builder` (its export name is set
    /// to this daemon's).
    pub fn connect_with(&self, builder: ClientBuilder) -> Result<Client, Error> {
        builder
            .export_name(&self.export_name)
            .connect_unix(&self.socket)
    }

    /// The image's guest-visible (virtual) size: the export's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// Its format.
    pub fn format(&self) -> &str {
        &self.format
    }

    /// Whether the export is writable.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The NBD socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The NBD export name.
    pub fn export_name(&self) -> &str {
        &self.export_name
    }

    /// The export as a URI for QEMU's tools (`qemu-img`, `qemu-io`).
    pub fn nbd_uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.export_name,
            self.socket.display()
        )
    }

    /// The daemon's process id.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Creates an image with `qemu-img create -f FORMAT PATH SIZE`.
pub fn create_image(path: impl AsRef<Path>, format: &str, size: u64) -> Result<(), Error> {
    check_format(format)?;
    let path = path.as_ref();
    let out = Command::new(QEMU_IMG)
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|source| spawn_error(QEMU_IMG.into(), source))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Err(Error::QemuImg {
        action: "create",
        image: path.to_path_buf(),
        message: format!("{}: {stderr}", out.status),
    })
}
