//! Helpers shared by the integration tests: an in-memory export, a raw NBD
//! client speaking bytes over a socket, and QEMU tool checks.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use vma_nbd::proto::*;
use vma_nbd::{BlockSize, MemExport, Server, ServerHandle};

/// Granularity at which [`mem_with`] exports report holes.
pub const HOLE_GRANULE: u64 = 64 * 1024;

/// A RAM disk of these bytes.
pub fn mem(data: Vec<u8>, read_only: bool) -> Arc<MemExport> {
    Arc::new(MemExport::new(data).read_only(read_only))
}

/// A RAM disk that may report all-zero 64 KiB granules as holes, with block sizes.
pub fn mem_with(
    data: Vec<u8>,
    read_only: bool,
    report_holes: bool,
    block: BlockSize,
) -> Arc<MemExport> {
    let e = MemExport::new(data).read_only(read_only).block_size(block);
    Arc::new(if report_holes {
        e.report_holes(HOLE_GRANULE)
    } else {
        e
    })
}

/// Panics unless the QEMU tools used by the tests are installed.
pub fn require_qemu_tools() {
    for tool in ["qemu-img", "qemu-io"] {
        vma_testkit::require_tool(tool);
    }
}

/// A deterministic, non-zero-heavy test pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}

/// Starts a server with the given exports on a unix socket in a new tempdir.
pub fn start(exports: Vec<(&str, Arc<MemExport>)>) -> (tempfile::TempDir, PathBuf, ServerHandle) {
    let mut b = Server::builder();
    for (name, e) in exports {
        b = b.export(name, e);
    }
    start_with(b)
}

pub fn start_with(builder: vma_nbd::ServerBuilder) -> (tempfile::TempDir, PathBuf, ServerHandle) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let handle = builder.build().unwrap().listen_unix(&sock).unwrap();
    (dir, sock, handle)
}

pub fn nbd_uri(name: &str, sock: &Path) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Runs a command, returning its output (never panics on failure status).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run_ok(cmd: &str, args: &[&str]) -> Output {
    let out = run(cmd, args);
    vma_testkit::assert_success(&out, &format!("{cmd} {args:?}"));
    out
}

/// Runs `qemu-io` with `options` (format, `-r`, ...) on `target` (an image or an
/// NBD URI) and each of `commands` as a `-c`; fails unless it succeeds and every
/// `read -P` pattern matched.
pub fn qemu_io<S: AsRef<str>>(options: &[&str], target: &str, commands: &[S]) {
    let mut args: Vec<&str> = options.to_vec();
    args.push(target);
    for c in commands {
        args.extend(["-c", c.as_ref()]);
    }
    let out = run_ok("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("verification failed"), "{stdout}");
}

/// The number after `"key": ` in a line of `qemu-img map --output=json`.
pub fn json_u64(line: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\": ");
    let i = line.find(&pat)? + pat.len();
    line[i..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// A raw NBD client for protocol tests.
pub struct Client {
    pub s: UnixStream,
}

pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub payload: Vec<u8>,
}

impl Client {
    /// Connects and does the initial greeting (client flags: fixed newstyle,
    /// no zeroes).
    pub fn connect(path: &Path) -> Client {
        Self::connect_flags(path, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    }

    pub fn connect_flags(path: &Path, flags: u32) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client { s };
        let g = c.read_n(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        c.send(&flags.to_be_bytes());
        c
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.send(&v);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(be_u64(&h[..8]), OPTION_REPLY_MAGIC);
        let option = be_u32(&h[8..12]);
        let kind = be_u32(&h[12..16]);
        let len = be_u32(&h[16..20]);
        let data = self.read_n(len as usize);
        OptReply { option, kind, data }
    }

    /// Sends `OPT_INFO`/`OPT_GO` and collects the replies up to the final one.
    pub fn info(&mut self, option: u32, name: &str, requests: &[u16]) -> (Vec<OptReply>, OptReply) {
        self.option(option, &info_data(name, requests));
        let mut infos = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, option);
            if r.kind == REP_INFO {
                infos.push(r);
            } else {
                return (infos, r);
            }
        }
    }

    /// Negotiates (optionally structured replies and `base:allocation`) and
    /// enters transmission with `OPT_GO`; returns (size, transmission flags).
    pub fn go(&mut self, name: &str, structured: bool, meta: bool) -> (u64, u16) {
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.opt_reply().kind, REP_ACK);
        }
        if meta {
            self.option(OPT_SET_META_CONTEXT, &meta_data(name, &["base:allocation"]));
            let r = self.opt_reply();
            assert_eq!(r.kind, REP_META_CONTEXT);
            assert_eq!(&r.data[4..], b"base:allocation");
            assert_eq!(self.opt_reply().kind, REP_ACK);
        }
        let (infos, fin) = self.info(OPT_GO, name, &[INFO_BLOCK_SIZE]);
        assert_eq!(
            fin.kind,
            REP_ACK,
            "GO failed: {:?}",
            String::from_utf8_lossy(&fin.data)
        );
        let export = infos
            .iter()
            .find(|r| r.data[..2] == INFO_EXPORT.to_be_bytes())
            .expect("INFO_EXPORT missing");
        assert_eq!(export.data.len(), 12);
        let size = u64::from_be_bytes(export.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
        (size, flags)
    }

    pub fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let h = RequestHeader {
            flags,
            command,
            handle,
            offset,
            length,
        };
        self.send(&h.encode());
    }

    /// Reads a simple reply: (error, handle).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let r = self.read_n(16);
        assert_eq!(be_u32(&r[..4]), SIMPLE_REPLY_MAGIC);
        (be_u32(&r[4..8]), be_u64(&r[8..16]))
    }

    pub fn chunk(&mut self) -> Chunk {
        let r = self.read_n(20);
        assert_eq!(be_u32(&r[..4]), STRUCTURED_REPLY_MAGIC);
        let len = be_u32(&r[16..20]);
        Chunk {
            flags: be_u16(&r[4..6]),
            kind: be_u16(&r[6..8]),
            handle: be_u64(&r[8..16]),
            payload: self.read_n(len as usize),
        }
    }

    /// True if the server closed the connection (EOF or reset).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                false
            }
            Err(_) => true,
        }
    }

    pub fn disconnect(mut self) {
        self.request(CMD_DISC, 0, 0, 0, 0);
        assert!(self.is_closed());
    }
}

pub fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().unwrap())
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}
