//! Listener lifecycle, shutdown, single-stream serving and configuration.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use vma_nbd::proto::*;
use vma_nbd::{BlockSize, Error, Server};

const SIZE: usize = 256 * 1024;

#[test]
fn shutdown_disconnects_clients_and_removes_socket() {
    let (_d, sock, h) = start(vec![("disk", mem(pattern(SIZE, 1), false))]);
    let mut idle = Client::connect(&sock); // stuck in the handshake
    let mut active = Client::connect(&sock);
    active.go("disk", false, false);
    for _ in 0..100 {
        if h.connections() == 2 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.connections(), 2);
    assert!(sock.exists());
    h.shutdown().unwrap();
    assert!(!sock.exists());
    assert!(idle.is_closed());
    assert!(active.is_closed());
    assert!(UnixStream::connect(&sock).is_err());
}

#[test]
fn shutdown_trigger_ends_wait() {
    let (_d, sock, h) = start(vec![("disk", mem(pattern(SIZE, 1), false))]);
    let trigger = h.shutdown_trigger();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(h.wait().is_ok()).unwrap());
    thread::sleep(Duration::from_millis(50));
    assert!(rx.try_recv().is_err(), "wait returned early");
    trigger.trigger();
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    assert!(!sock.exists());
}

#[test]
fn stop_after_last_client() {
    let builder = Server::builder()
        .export("disk", mem(pattern(SIZE, 1), true))
        .stop_after_last_client(true);
    let (_d, sock, h) = start_with(builder);
    // Not stopping before any client came.
    thread::sleep(Duration::from_millis(100));
    assert!(!h.is_finished());
    let mut a = Client::connect(&sock);
    a.go("disk", false, false);
    let mut b = Client::connect(&sock);
    b.go("disk", false, false);
    a.disconnect();
    thread::sleep(Duration::from_millis(100));
    assert!(!h.is_finished(), "stopped while a client was connected");
    b.request(CMD_READ, 0, 1, 0, 16);
    assert_eq!(b.simple_reply(), (0, 1));
    assert_eq!(b.read_n(16), pattern(SIZE, 1)[..16]);
    b.disconnect();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(h.wait().is_ok()).unwrap());
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    assert!(!sock.exists());
}

#[test]
fn concurrent_clients() {
    let e = mem(pattern(SIZE, 2), false);
    let (_d, sock, h) = start(vec![("disk", e.clone())]);
    let workers: Vec<_> = (0..6u64)
        .map(|t| {
            let sock = sock.clone();
            thread::spawn(move || {
                let mut c = Client::connect(&sock);
                c.go("disk", t % 2 == 0, false);
                let off = t * 4096;
                c.request(CMD_WRITE, 0, 1, off, 4096);
                c.send(&[t as u8; 4096]);
                // Even with structured replies, writes get simple replies.
                assert_eq!(c.simple_reply(), (0, 1));
                c.disconnect();
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let snap = e.snapshot();
    for t in 0..6usize {
        assert!(snap[t * 4096..(t + 1) * 4096].iter().all(|&b| b == t as u8));
    }
    h.shutdown().unwrap();
}

#[test]
fn max_connections_limit() {
    let builder = Server::builder()
        .export("disk", mem(pattern(SIZE, 1), false))
        .max_connections(1);
    let (_d, sock, _h) = start_with(builder);
    let mut first = Client::connect(&sock);
    first.go("disk", false, false);
    let mut second = UnixStream::connect(&sock).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 18];
    assert_eq!(std::io::Read::read(&mut second, &mut buf).unwrap_or(0), 0);
    first.disconnect();
}

#[test]
fn listen_on_existing_path_fails() {
    let (_d, sock, _h) = start(vec![("disk", mem(pattern(SIZE, 1), false))]);
    let server = Server::builder().build().unwrap();
    assert!(matches!(server.listen_unix(&sock), Err(Error::Bind { .. })));
    // The running listener is unaffected.
    Client::connect(&sock).option(OPT_ABORT, &[]);
}

#[test]
fn serve_split_on_socket_pair() {
    let e = mem(pattern(SIZE, 3), false);
    let server = Server::builder()
        .export("disk", e.clone())
        .workers(2)
        .build()
        .unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || server.serve_split(&a, &a));
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = Client { s: b };
    let g = c.read_n(18);
    assert_eq!(&g[..8], b"NBDMAGIC");
    c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    c.go("disk", true, false);
    c.request(CMD_READ, 0, 1, 100, 50);
    let ch = c.chunk();
    assert_eq!(&ch.payload[8..], &pattern(SIZE, 3)[100..150]);
    c.disconnect();
    t.join().unwrap().unwrap();
}

#[test]
fn serve_stream_in_memory() {
    // A whole client session as one byte string.
    let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    input.extend_from_slice(&IHAVEOPT.to_be_bytes());
    input.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    input.extend_from_slice(&4u32.to_be_bytes());
    input.extend_from_slice(b"disk");
    input.extend_from_slice(
        &RequestHeader {
            flags: 0,
            command: CMD_READ,
            handle: 77,
            offset: 8,
            length: 8,
        }
        .encode(),
    );
    input.extend_from_slice(
        &RequestHeader {
            flags: 0,
            command: CMD_DISC,
            handle: 0,
            offset: 0,
            length: 0,
        }
        .encode(),
    );
    let e = mem(pattern(SIZE, 4), false);
    let server = Server::builder().export("disk", e).build().unwrap();
    let mut stream = InOut {
        input: std::io::Cursor::new(input),
        output: Vec::new(),
    };
    server.serve_stream(&mut stream).unwrap();
    let out = stream.output;
    // greeting (18) + export info (10) + simple reply (16) + data (8)
    assert_eq!(out.len(), 18 + 10 + 16 + 8);
    assert_eq!(&out[18..26], &(SIZE as u64).to_be_bytes());
    assert_eq!(&out[28..32], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&out[36..44], &77u64.to_be_bytes());
    assert_eq!(&out[44..], &pattern(SIZE, 4)[8..16]);

    // Garbage is a protocol error, not a panic.
    let mut stream = InOut {
        input: std::io::Cursor::new(vec![0xff; 64]),
        output: Vec::new(),
    };
    assert!(server.serve_stream(&mut stream).is_err());
}

struct InOut {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl std::io::Read for InOut {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for InOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn builder_validation() {
    let e = || mem(vec![0; 4096], false);
    assert!(matches!(
        Server::builder().export("a", e()).export("a", e()).build(),
        Err(Error::DuplicateExport(_))
    ));
    assert!(matches!(
        Server::builder().export("x".repeat(5000), e()).build(),
        Err(Error::InvalidExport { .. })
    ));
    assert!(matches!(
        Server::builder().export("a\0b", e()).build(),
        Err(Error::InvalidExport { .. })
    ));
    let bad = mem_with(
        vec![0; 4096],
        false,
        false,
        BlockSize {
            min: 3,
            preferred: 4096,
            max: 65536,
        },
    );
    assert!(matches!(
        Server::builder().export("a", bad).build(),
        Err(Error::InvalidExport { .. })
    ));
    assert!(matches!(
        Server::builder().max_in_flight(0).build(),
        Err(Error::Config(_))
    ));
    let s = Server::builder()
        .export("b", e())
        .export("a", e())
        .build()
        .unwrap();
    assert_eq!(s.export_names().collect::<Vec<_>>(), ["a", "b"]);
}
