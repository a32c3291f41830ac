//! The NBD client: against the project's own server, against fake servers
//! that lie, and against QEMU (qemu-storage-daemon, qemu-nbd) as the real
//! peer.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{json_u64, mem, mem_with, pattern, qemu_io, run_ok, start};
use vma_nbd::proto::*;
use vma_nbd::{
    create_image, BlockSize, BlockStatus, Client, Errno, Error, MemExport, Server, StorageDaemon,
    Violation, ZeroMode,
};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const TIMEOUT: Option<Duration> = Some(Duration::from_secs(10));

/// Runs `f(0)` to `f(n - 1)` each on its own thread, all at once; returns when all ended.
fn on_threads(n: usize, f: impl Fn(usize) + Sync) {
    thread::scope(|s| {
        for t in 0..n {
            let f = &f;
            s.spawn(move || f(t));
        }
    });
}

fn connect(sock: &Path, name: &str) -> Client {
    Client::builder()
        .export_name(name)
        .timeout(TIMEOUT)
        .connect_unix(sock)
        .unwrap()
}

// ---------------------------------------------------------------------------
// Against the project's own server.

#[test]
fn client_types_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Client>();
    send_sync::<vma_nbd::PendingRead>();
    send_sync::<vma_nbd::Pending>();
    send_sync::<vma_nbd::PendingStatus>();
    send_sync::<StorageDaemon>();
    send_sync::<Error>();
}

#[test]
fn own_server_read_write_zeroes_flush() {
    let e = Arc::new(MemExport::new(vec![0; 4 * MIB]).report_holes(64 * KIB as u64));
    let (_d, sock, _h) = start(vec![("disk", e.clone())]);
    let c = connect(&sock, "disk");
    let info = c.info();
    assert_eq!(info.size, 4 * MIB as u64);
    assert!(info.structured_replies && info.block_status && info.can_write_zeroes());
    assert!(!info.read_only() && info.can_flush());

    let mut model = vec![0u8; 4 * MIB];
    for (offset, len, seed) in [
        (4097usize, 70_001usize, 1u8),
        (MIB - 3, 200_000, 2),
        (3 * MIB, 5, 3),
    ] {
        let data = pattern(len, seed);
        c.write_at(&data, offset as u64).unwrap();
        model[offset..offset + len].copy_from_slice(&data);
    }
    c.write_zeroes(4100, 1000, ZeroMode::MayUnmap).unwrap();
    c.write_zeroes(MIB as u64, 10, ZeroMode::NoHole).unwrap();
    model[4100..5100].fill(0);
    model[MIB..MIB + 10].fill(0);
    c.flush().unwrap();
    assert!(e.flushes() >= 1);
    assert_eq!(e.snapshot(), model);

    let mut back = vec![0xffu8; 4 * MIB];
    c.read_at(&mut back, 0).unwrap();
    assert_eq!(back, model);
    let odd = c.submit_read(12345, 54321).unwrap().wait().unwrap();
    assert_eq!(odd, &model[12345..12345 + 54321]);

    // Holes: 64 KiB granules that are all zero.
    let status = c.block_status(0, 4 * MIB as u64).unwrap();
    assert_eq!(status.iter().map(|s| s.len).sum::<u64>(), 4 * MIB as u64);
    let mut pos = 0usize;
    for s in &status {
        let granules_zero = model[pos..pos + s.len as usize].iter().all(|&b| b == 0);
        assert_eq!(s.hole, granules_zero, "extent {s:?} at {pos}");
        pos += s.len as usize;
    }
    assert!(status.iter().filter(|s| s.hole).count() >= 2, "{status:?}");
    c.disconnect().unwrap();
}

#[test]
fn own_server_simple_replies_and_no_block_status() {
    let data = pattern(MIB, 7);
    let (_d, sock, _h) = start(vec![("d", mem(data.clone(), false))]);
    let c = Client::builder()
        .export_name("d")
        .structured_replies(false)
        .connect_unix(&sock)
        .unwrap();
    let info = c.info();
    assert!(!info.structured_replies && !info.block_status);
    assert_eq!(
        c.submit_read(999, 4096).unwrap().wait().unwrap(),
        &data[999..999 + 4096]
    );
    assert_eq!(
        c.block_status(4096, 8192).unwrap(),
        vec![BlockStatus::data(8192)]
    );
    c.write_at(b"abc", 10).unwrap();
    let expected = [data[9], b'a', b'b', b'c', data[13]];
    assert_eq!(c.submit_read(9, 5).unwrap().wait().unwrap(), expected);
    let c2 = Client::builder()
        .export_name("d")
        .block_status(false)
        .connect_unix(&sock)
        .unwrap();
    assert!(c2.info().structured_replies && !c2.info().block_status);
    c.disconnect().unwrap();
    c2.disconnect().unwrap();
}

#[test]
fn own_server_checks_before_sending() {
    let block = BlockSize {
        min: 512,
        preferred: 4096,
        max: 64 * KIB as u32,
    };
    let (_d, sock, _h) = start(vec![
        ("rw", mem_with(vec![0; MIB], false, false, block)),
        ("ro", mem(vec![1; MIB], true)),
    ]);
    let c = connect(&sock, "rw");
    assert_eq!(c.block_size(), block);
    assert!(matches!(
        c.submit_read(100, 512),
        Err(Error::Unaligned { min: 512, .. })
    ));
    assert!(matches!(
        c.write_at(&[1; 100], 0),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        c.submit_read(MIB as u64 - 512, 1024),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        c.write_zeroes(u64::MAX - 511, 512, ZeroMode::MayUnmap),
        Err(Error::OutOfBounds { .. })
    ));
    // Longer than the maximum payload: split.
    let data = pattern(MIB, 3);
    c.write_at(&data, 0).unwrap();
    assert_eq!(c.submit_read(0, MIB).unwrap().wait().unwrap(), data);
    assert!(c.submit_read(0, 0).unwrap().wait().unwrap().is_empty());
    let ro = connect(&sock, "ro");
    assert!(ro.info().read_only());
    assert!(matches!(
        ro.write_at(&[1; 512], 0),
        Err(Error::ReadOnly(Command::Write))
    ));
    assert!(matches!(
        ro.write_zeroes(0, 512, ZeroMode::NoHole),
        Err(Error::ReadOnly(Command::WriteZeroes))
    ));
    ro.flush().unwrap();
    // Still usable after the refusals.
    assert_eq!(
        c.submit_read(512, 512).unwrap().wait().unwrap(),
        &data[512..1024]
    );
}

#[test]
fn own_server_many_requests_in_flight_from_several_threads() {
    let size = 16 * MIB;
    let e = mem(vec![0; size], false);
    let server = Server::builder()
        .export("disk", e.clone())
        .workers(4)
        .max_in_flight(64);
    let (_d, sock, _h) = common::start_with(server);
    let c = Client::builder()
        .export_name("disk")
        .max_in_flight(48)
        .timeout(TIMEOUT)
        .connect_unix(&sock)
        .unwrap();
    let piece = 64 * KIB;
    on_threads(4, |t| {
        // Each thread owns a quarter; many writes in flight, then reads.
        let base = t * size / 4;
        let mut pending = Vec::new();
        for i in 0..size / 4 / piece {
            let data = pattern(piece, (t * 64 + i) as u8);
            pending.push(c.submit_write(&data, (base + i * piece) as u64).unwrap());
        }
        pending.into_iter().for_each(|p| p.wait().unwrap());
        let reads: Vec<_> = (0..size / 4 / piece)
            .map(|i| c.submit_read((base + i * piece) as u64, piece).unwrap())
            .collect();
        for (i, r) in reads.into_iter().enumerate() {
            assert_eq!(r.wait().unwrap(), pattern(piece, (t * 64 + i) as u8));
        }
    });
    // Pendings dropped unwaited are harmless.
    for i in 0..20 {
        drop(c.submit_read(i * 4096, 4096).unwrap());
    }
    c.flush().unwrap();
    c.disconnect().unwrap();
}

#[test]
fn own_server_refuses_unknown_export_and_serves_tcp() {
    let data = pattern(MIB, 5);
    let (_d, sock, _h) = start(vec![("disk", mem(data.clone(), true))]);
    let err = Client::connect_unix(&sock, "nope").unwrap_err();
    assert!(
        matches!(&err, Error::Refused { reply: REP_ERR_UNKNOWN, message, .. } if message.contains("nope")),
        "{err}"
    );
    let server = Server::builder()
        .export("disk", mem(data.clone(), true))
        .build()
        .unwrap();
    let h = server.listen_tcp("127.0.0.1:0").unwrap();
    let vma_nbd::ListenAddr::Tcp(addr) = h.local_addr().clone() else {
        panic!("not TCP")
    };
    let c = Client::connect_tcp(addr, "disk").unwrap();
    let mut buf = vec![0; MIB];
    c.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, data);
    c.disconnect().unwrap();
    h.shutdown().unwrap();
}

#[test]
fn own_server_going_away_fails_requests() {
    let (_d, sock, h) = start(vec![("disk", mem(vec![0; MIB], false))]);
    let c = connect(&sock, "disk");
    c.write_at(&[1; 4096], 0).unwrap();
    h.shutdown().unwrap();
    let t = Instant::now();
    let err = c.submit_read(0, 4096).and_then(|p| p.wait()).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(err.root(), Error::ServerClosed | Error::Io(_)),
        "{err}"
    );
    // Later requests fail the same way, at once.
    assert!(matches!(c.flush(), Err(Error::Disconnected(_))));
    assert!(c.disconnect().is_err());
}

// ---------------------------------------------------------------------------
// Fake servers: a real handshake, then replies that break the protocol.

/// How a fake server negotiates.
#[derive(Clone, Copy)]
struct Fake {
    size: u64,
    flags: u16,
    structured: bool,
    meta: bool,
    /// Answer `NBD_OPT_GO` with `NBD_REP_ERR_UNSUP` (then take `NBD_OPT_EXPORT_NAME`).
    no_go: bool,
    block: [u32; 3],
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            size: MIB as u64,
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_WRITE_ZEROES,
            structured: true,
            meta: true,
            no_go: false,
            block: [1, 4096, MIB as u32],
        }
    }
}

/// The context id fake servers give `base:allocation`.
const FAKE_CONTEXT: u32 = 7;

/// Accepts one connection on a new socket and runs `script` on it.
fn raw_server(
    script: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let t = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        script(&mut s);
    });
    (dir, sock, t)
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    s.read_exact(&mut v).unwrap();
    v
}

fn opt_reply(s: &mut UnixStream, option: u32, kind: u32, data: &[u8]) {
    let h = OptionReplyHeader {
        option,
        kind,
        length: data.len() as u32,
    };
    // The client may already have hung up on an earlier lie.
    let _ = s.write_all(&h.encode()).and_then(|()| s.write_all(data));
}

fn greeting(s: &mut UnixStream) {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&g).unwrap();
    let flags = u32::from_be_bytes(read_n(s, 4).try_into().unwrap());
    assert_eq!(flags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
}

/// The server side of a handshake as `f` describes it.
fn negotiate_fake(s: &mut UnixStream, f: Fake) {
    greeting(s);
    loop {
        let h = OptionHeader::parse(&read_n(s, 16).try_into().unwrap()).unwrap();
        let _data = read_n(s, h.length as usize);
        match h.option {
            OPT_STRUCTURED_REPLY if f.structured => opt_reply(s, h.option, REP_ACK, &[]),
            OPT_SET_META_CONTEXT if f.meta => {
                let mut d = FAKE_CONTEXT.to_be_bytes().to_vec();
                d.extend_from_slice(b"base:allocation");
                opt_reply(s, h.option, REP_META_CONTEXT, &d);
                opt_reply(s, h.option, REP_ACK, &[]);
            }
            OPT_GO if !f.no_go => {
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&f.size.to_be_bytes());
                d.extend_from_slice(&f.flags.to_be_bytes());
                opt_reply(s, h.option, REP_INFO, &d);
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in f.block {
                    d.extend_from_slice(&v.to_be_bytes());
                }
                opt_reply(s, h.option, REP_INFO, &d);
                opt_reply(s, h.option, REP_ACK, &[]);
                return;
            }
            OPT_EXPORT_NAME => {
                let mut d = f.size.to_be_bytes().to_vec();
                d.extend_from_slice(&f.flags.to_be_bytes());
                s.write_all(&d).unwrap();
                return;
            }
            _ => opt_reply(s, h.option, REP_ERR_UNSUP, b"no"),
        }
    }
}

fn fake(
    f: Fake,
    script: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<()>) {
    raw_server(move |s| {
        negotiate_fake(s, f);
        script(s);
    })
}

fn read_request(s: &mut UnixStream) -> RequestHeader {
    RequestHeader::parse(&read_n(s, REQUEST_HEADER_LEN).try_into().unwrap()).unwrap()
}

fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = chunk_claiming(flags, kind, handle, payload.len() as u32);
    v.extend_from_slice(payload);
    v
}

/// A chunk header whose length says `length`, with none of that payload.
fn chunk_claiming(flags: u16, kind: u16, handle: u64, length: u32) -> Vec<u8> {
    ChunkHeader {
        flags,
        kind,
        handle,
        length,
    }
    .encode()
    .to_vec()
}

/// A simple reply, without error, to request `handle`.
fn simple_ok(handle: u64) -> Vec<u8> {
    SimpleReply { error: 0, handle }.encode().to_vec()
}

fn data_chunk(flags: u16, handle: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    chunk(flags, REPLY_TYPE_OFFSET_DATA, handle, &p)
}

fn error_payload(code: u32, msg: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p
}

fn status_payload(context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = context.to_be_bytes().to_vec();
    for (len, flags) in extents {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
    }
    p
}

/// Drains the connection until the client hangs up.
fn until_closed(s: &mut UnixStream) {
    let _ = std::io::copy(s, &mut std::io::sink());
}

/// A fake server that answers the first request with `reply`; returns the
/// error the client's `request` ended with.
fn lie(
    f: Fake,
    request: impl FnOnce(&Client) -> Result<(), Error>,
    reply: impl FnOnce(&RequestHeader) -> Vec<u8> + Send + 'static,
) -> Error {
    let (_d, sock, t) = fake(f, move |s| {
        let req = read_request(s);
        s.write_all(&reply(&req)).unwrap();
        until_closed(s);
    });
    let c = Client::builder()
        .timeout(TIMEOUT)
        .connect_unix(&sock)
        .unwrap();
    let started = Instant::now();
    let err = request(&c).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "slow: {err}");
    // Every later request fails at once.
    assert!(matches!(c.flush(), Err(Error::Disconnected(_))), "{err}");
    drop(c);
    t.join().unwrap();
    err
}

fn read_4k(c: &Client) -> Result<(), Error> {
    c.submit_read(4096, 4096)?.wait().map(drop)
}

fn status_1m(c: &Client) -> Result<(), Error> {
    c.block_status(0, MIB as u64).map(drop)
}

/// A lie: its name, the request that draws it, the reply, and the
/// violation the client must find in it.
type Lie = (
    &'static str,
    fn(&Client) -> Result<(), Error>,
    Box<dyn FnOnce(&RequestHeader) -> Vec<u8> + Send>,
    fn(&Violation) -> bool,
);

/// `lie!(name, request, violation pattern, |request header| reply)`.
macro_rules! lie {
    ($name:expr, $request:expr, $violation:pat, |$r:pat_param| $reply:block) => {{
        let lie: Lie = (
            $name,
            $request,
            Box::new(|$r: &RequestHeader| $reply),
            |v| matches!(v, $violation),
        );
        lie
    }};
}

fn check_lies(lies: Vec<Lie>) {
    for (name, request, reply, expected) in lies {
        let err = lie(Fake::default(), request, reply);
        let v = err
            .violation()
            .unwrap_or_else(|| panic!("{name}: not a violation: {err}"));
        assert!(expected(v), "{name}: {err}");
    }
}

/// Read replies for the wrong handle, or data in the wrong place.
#[test]
fn lying_read_replies_give_typed_errors() {
    check_lies(vec![
        lie!("wrong handle", read_4k, Violation::UnknownHandle(_), |r| {
            data_chunk(REPLY_FLAG_DONE, r.handle + 1, r.offset, &[1; 4096])
        }),
        lie!(
            "oversized length",
            read_4k,
            Violation::ChunkOutOfBounds { .. },
            |r| {
                let mut v = chunk_claiming(0, REPLY_TYPE_OFFSET_DATA, r.handle, 0xffff_fff0);
                v.extend_from_slice(&r.offset.to_be_bytes());
                v
            }
        ),
        lie!(
            "chunk past the request",
            read_4k,
            Violation::ChunkOutOfBounds {
                offset: 8096,
                len: 200,
                ..
            },
            |r| { data_chunk(REPLY_FLAG_DONE, r.handle, r.offset + 4000, &[1; 200]) }
        ),
        lie!(
            "chunk before the request",
            read_4k,
            Violation::ChunkOutOfBounds { .. },
            |r| { data_chunk(REPLY_FLAG_DONE, r.handle, r.offset - 1, &[1; 10]) }
        ),
        lie!(
            "overlapping chunks",
            read_4k,
            Violation::ChunkOverlap { .. },
            |r| {
                let mut v = data_chunk(0, r.handle, r.offset, &[1; 3000]);
                v.extend(data_chunk(
                    REPLY_FLAG_DONE,
                    r.handle,
                    r.offset + 2999,
                    &[2; 1097],
                ));
                v
            }
        ),
        lie!(
            "short read",
            read_4k,
            Violation::ShortRead {
                covered: 4000,
                len: 4096
            },
            |r| {
                let mut v = data_chunk(0, r.handle, r.offset, &[1; 4000]);
                v.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.handle, &[]));
                v
            }
        ),
        lie!(
            "hole past the request",
            read_4k,
            Violation::ChunkOutOfBounds { .. },
            |r| {
                let mut p = r.offset.to_be_bytes().to_vec();
                p.extend_from_slice(&4097u32.to_be_bytes());
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, r.handle, &p)
            }
        ),
    ]);
}

/// Replies whose framing is wrong.
#[test]
fn lying_reply_framing_gives_typed_errors() {
    check_lies(vec![
        lie!(
            "bad magic",
            read_4k,
            Violation::BadReplyMagic(0x1234_5678),
            |_| { vec![0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0] }
        ),
        lie!(
            "simple reply to a structured read",
            read_4k,
            Violation::UnexpectedSimpleReply(Command::Read),
            |r| { simple_ok(r.handle) }
        ),
        lie!(
            "unknown chunk type",
            read_4k,
            Violation::UnexpectedChunk { kind: 77, .. },
            |r| { chunk(REPLY_FLAG_DONE, 77, r.handle, &[]) }
        ),
        lie!("NONE without DONE", read_4k, Violation::NoneNotDone, |r| {
            chunk(0, REPLY_TYPE_NONE, r.handle, &[])
        }),
    ]);
}

/// Error chunks that do not add up.
#[test]
fn lying_error_chunks_give_typed_errors() {
    check_lies(vec![
        lie!(
            "error message longer than its chunk",
            read_4k,
            Violation::BadErrorMessage {
                message_len: 100,
                ..
            },
            |r| {
                let mut p = error_payload(5, "boom");
                p[4..6].copy_from_slice(&100u16.to_be_bytes());
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, r.handle, &p)
            }
        ),
        lie!(
            "huge error chunk",
            read_4k,
            Violation::BadChunkLength { .. },
            |r| { chunk_claiming(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, r.handle, 1 << 30) }
        ),
        lie!("error value 0", read_4k, Violation::ZeroError, |r| {
            chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                r.handle,
                &error_payload(0, ""),
            )
        }),
        lie!(
            "error offset outside the request",
            read_4k,
            Violation::ChunkOutOfBounds { .. },
            |r| {
                let mut p = error_payload(5, "x");
                p.extend_from_slice(&(r.offset + 4096).to_be_bytes());
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, r.handle, &p)
            }
        ),
    ]);
}

/// Block status replies that break the rules.
#[test]
fn lying_block_status_replies_give_typed_errors() {
    check_lies(vec![
        lie!(
            "block status extent of length 0",
            status_1m,
            Violation::EmptyExtent,
            |r| {
                let p = status_payload(FAKE_CONTEXT, &[(4096, 0), (0, 0)]);
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, r.handle, &p)
            }
        ),
        lie!(
            "block status extents past the request",
            status_1m,
            Violation::ExtentsPastRequest(_),
            |r| {
                let p = status_payload(FAKE_CONTEXT, &[(MIB as u32, 0), (4096, 3)]);
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, r.handle, &p)
            }
        ),
        lie!(
            "block status for another context",
            status_1m,
            Violation::WrongContext {
                expected: FAKE_CONTEXT,
                ..
            },
            |r| {
                let p = status_payload(FAKE_CONTEXT + 1, &[(4096, 0)]);
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, r.handle, &p)
            }
        ),
        lie!(
            "huge block status chunk",
            status_1m,
            Violation::BadChunkLength { .. },
            |r| {
                chunk_claiming(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    r.handle,
                    u32::MAX - 3,
                )
            }
        ),
        lie!(
            "block status without status",
            status_1m,
            Violation::MissingBlockStatus,
            |r| { chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.handle, &[]) }
        ),
        lie!(
            "read data in a block status reply",
            status_1m,
            Violation::UnexpectedChunk {
                command: Command::BlockStatus,
                ..
            },
            |r| { data_chunk(REPLY_FLAG_DONE, r.handle, 0, &[1; 16]) }
        ),
    ]);
}

#[test]
fn server_errors_are_per_request_and_the_connection_stays() {
    let (_d, sock, t) = fake(Fake::default(), |s| {
        let r = read_request(s);
        let p = error_payload(Errno::Io.code(), "disk on fire");
        s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, r.handle, &p))
            .unwrap();
        // An unknown error type with a trailing field, and an unknown value.
        let r = read_request(s);
        let _ = read_n(s, r.length as usize);
        let mut p = error_payload(12345, "odd");
        p.extend_from_slice(&[9; 8]);
        s.write_all(&chunk(REPLY_FLAG_DONE, 0x8003, r.handle, &p))
            .unwrap();
        // Data, a hole and an error offset in one reply, out of order.
        let r = read_request(s);
        let mut v = data_chunk(0, r.handle, r.offset + 2048, &[7; 2048]);
        let mut hole = r.offset.to_be_bytes().to_vec();
        hole.extend_from_slice(&2048u32.to_be_bytes());
        v.extend(chunk(0, REPLY_TYPE_OFFSET_HOLE, r.handle, &hole));
        v.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.handle, &[]));
        s.write_all(&v).unwrap();
        // A simple reply to a flush is allowed.
        let r = read_request(s);
        assert_eq!(r.command, CMD_FLUSH);
        s.write_all(&simple_ok(r.handle)).unwrap();
        // ESHUTDOWN: the client stops sending.
        let r = read_request(s);
        let p = error_payload(Errno::Shutdown.code(), "");
        s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, r.handle, &p))
            .unwrap();
        let r = read_request(s);
        assert_eq!(r.command, CMD_DISC);
        until_closed(s);
    });
    let c = connect(&sock, "");
    let err = c.submit_read(0, 4096).unwrap().wait().unwrap_err();
    assert!(
        matches!(&err, Error::Request { command: Command::Read, errno: Errno::Io, code: 5, message, .. } if message == "disk on fire"),
        "{err}"
    );
    assert!(err.to_string().contains("disk on fire"), "{err}");
    let err = c.write_at(&[1; 512], 0).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Request {
                errno: Errno::Inval,
                code: 12345,
                ..
            }
        ),
        "{err}"
    );
    let mut expected = vec![0u8; 2048];
    expected.extend_from_slice(&[7; 2048]);
    let mut buf = vec![0xaa; 4096];
    c.read_at(&mut buf, 8192).unwrap();
    assert_eq!(buf, expected);
    c.flush().unwrap();
    let err = c.write_zeroes(0, 4096, ZeroMode::NoHole).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Request {
                errno: Errno::Shutdown,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(c.flush(), Err(Error::ServerShutdown)));
    c.disconnect().unwrap();
    t.join().unwrap();
}

#[test]
fn silent_server_times_out() {
    let (_d, sock, t) = fake(Fake::default(), |s| {
        let _ = read_request(s);
        until_closed(s);
    });
    let c = Client::builder()
        .timeout(Some(Duration::from_millis(300)))
        .connect_unix(&sock)
        .unwrap();
    let started = Instant::now();
    let err = c.submit_read(0, 512).unwrap().wait().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err.root(), Error::Timeout(_)), "{err}");
    drop(c);
    t.join().unwrap();
}

#[test]
fn server_closing_mid_reply_fails_everything_in_flight() {
    let (_d, sock, t) = fake(Fake::default(), |s| {
        let r1 = read_request(s);
        let _r2 = read_request(s);
        let v = data_chunk(REPLY_FLAG_DONE, r1.handle, r1.offset, &[1; 4096]);
        s.write_all(&v[..v.len() - 100]).unwrap();
    });
    let c = connect(&sock, "");
    let a = c.submit_read(0, 4096).unwrap();
    let b = c.submit_read(4096, 4096).unwrap();
    assert!(matches!(a.wait().unwrap_err().root(), Error::ServerClosed));
    assert!(matches!(b.wait().unwrap_err().root(), Error::ServerClosed));
    t.join().unwrap();
}

#[test]
fn fallbacks_export_name_simple_replies_and_zero_writes() {
    // No NBD_OPT_GO, no structured replies, no WRITE_ZEROES.
    let f = Fake {
        flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
        structured: false,
        meta: false,
        no_go: true,
        size: 4 * MIB as u64,
        ..Fake::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let (_d, sock, t) = fake(f, move |s| loop {
        let r = read_request(s);
        match r.command {
            CMD_WRITE => {
                let data = read_n(s, r.length as usize);
                tx.send((r.offset, r.length, data.iter().all(|&b| b == 0)))
                    .unwrap();
                s.write_all(&simple_ok(r.handle)).unwrap();
            }
            CMD_READ => {
                let mut v = simple_ok(r.handle);
                v.extend(pattern(r.length as usize, r.offset as u8));
                s.write_all(&v).unwrap();
            }
            CMD_DISC => break,
            other => panic!("unexpected command {other}"),
        }
    });
    let c = connect(&sock, "any");
    let info = c.info();
    assert!(!info.structured_replies && !info.block_status && !info.can_write_zeroes());
    assert_eq!(info.block, BlockSize::default());
    c.write_zeroes(4096, 2 * MIB as u64 + 10, ZeroMode::MayUnmap)
        .unwrap();
    assert_eq!(
        c.submit_read(3, 100).unwrap().wait().unwrap(),
        pattern(100, 3)
    );
    c.disconnect().unwrap();
    t.join().unwrap();
    let writes: Vec<_> = rx.iter().collect();
    assert_eq!(
        writes,
        vec![
            (4096, MIB as u32, true),
            (4096 + MIB as u64, MIB as u32, true),
            (4096 + 2 * MIB as u64, 10, true)
        ]
    );
}

/// A fake server's whole behaviour.
type Script = Box<dyn FnOnce(&mut UnixStream) + Send>;

/// Answers the first option with an option reply header of `kind` and `len`.
fn first_reply(kind: u32, len: u32) -> Script {
    Box::new(move |s| {
        greeting(s);
        let _ = read_n(s, 16);
        let h = OptionReplyHeader {
            option: OPT_STRUCTURED_REPLY,
            kind,
            length: len,
        };
        s.write_all(&h.encode()).unwrap();
        until_closed(s);
    })
}

/// Refuses every option but `NBD_OPT_GO`, which it answers with `infos`.
fn go_infos(infos: Vec<Vec<u8>>) -> Script {
    Box::new(move |s| {
        greeting(s);
        for _ in 0..3 {
            let h = OptionHeader::parse(&read_n(s, 16).try_into().unwrap()).unwrap();
            let _ = read_n(s, h.length as usize);
            if h.option != OPT_GO {
                opt_reply(s, h.option, REP_ERR_UNSUP, &[]);
                continue;
            }
            for i in &infos {
                opt_reply(s, OPT_GO, REP_INFO, i);
            }
            opt_reply(s, OPT_GO, REP_ACK, &[]);
            break;
        }
        until_closed(s);
    })
}

fn export_info(flags: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&(MIB as u64).to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

fn block_info(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

#[test]
fn lying_handshakes_give_typed_errors() {
    type Case = (&'static str, Script, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        (
            "bad greeting",
            Box::new(|s| {
                s.write_all(b"NOTMAGIC........\0\0").unwrap();
                until_closed(s);
            }),
            |e| matches!(e.violation(), Some(Violation::BadGreeting(_))),
        ),
        (
            "oldstyle",
            Box::new(|s| {
                let mut g = NBDMAGIC.to_be_bytes().to_vec();
                g.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
                g.extend_from_slice(&[0; 2]);
                s.write_all(&g).unwrap();
                until_closed(s);
            }),
            |e| matches!(e.violation(), Some(Violation::Oldstyle)),
        ),
        ("huge option reply", first_reply(REP_ACK, 1 << 30), |e| {
            matches!(e.violation(), Some(Violation::OptionReplyTooLong { .. }))
        }),
        ("unexpected option reply", first_reply(REP_SERVER, 0), |e| {
            matches!(e.violation(), Some(Violation::UnexpectedOptionReply { .. }))
        }),
        ("closed during the handshake", Box::new(greeting), |e| {
            matches!(e, Error::HandshakeClosed)
        }),
        (
            "GO without export information",
            go_infos(vec![block_info(1, 4096, MIB as u32)]),
            |e| matches!(e.violation(), Some(Violation::MissingExportInfo)),
        ),
        (
            "export information of the wrong length",
            go_infos(vec![export_info(FLAG_HAS_FLAGS)[..11].to_vec()]),
            |e| {
                matches!(
                    e.violation(),
                    Some(Violation::BadInfo {
                        info: Some(INFO_EXPORT),
                        ..
                    })
                )
            },
        ),
        (
            "minimum block size not a power of two",
            go_infos(vec![
                export_info(FLAG_HAS_FLAGS),
                block_info(3, 4096, MIB as u32),
            ]),
            |e| matches!(e.violation(), Some(Violation::BadBlockSize { min: 3, .. })),
        ),
        (
            "maximum below preferred",
            go_infos(vec![
                export_info(FLAG_HAS_FLAGS),
                block_info(512, 4096, 1024),
            ]),
            |e| matches!(e.violation(), Some(Violation::BadBlockSize { .. })),
        ),
        (
            "no NBD_FLAG_HAS_FLAGS",
            go_infos(vec![export_info(FLAG_READ_ONLY)]),
            |e| matches!(e.violation(), Some(Violation::MissingHasFlags(_))),
        ),
    ];
    for (name, script, expected) in cases {
        let (_d, sock, t) = raw_server(script);
        let err = Client::builder()
            .timeout(TIMEOUT)
            .connect_unix(&sock)
            .unwrap_err();
        assert!(expected(&err), "{name}: {err}");
        t.join().unwrap();
    }
    // A server that accepts and says nothing: the handshake times out.
    let (_d, sock, t) = raw_server(until_closed);
    let err = Client::builder()
        .timeout(Some(Duration::from_millis(200)))
        .connect_unix(&sock)
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    t.join().unwrap();
}

// ---------------------------------------------------------------------------
// Against QEMU: qemu-storage-daemon and qemu-nbd.

fn require_qemu() {
    for tool in ["qemu-storage-daemon", "qemu-img", "qemu-io", "qemu-nbd"] {
        vma_testkit::require_tool(tool);
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One line of `qemu-img map --output=json`.
#[derive(Debug)]
struct MapEntry {
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
    host_offset: bool,
}

fn qemu_map(format: &str, image: &Path) -> Vec<MapEntry> {
    let out = run_ok(
        "qemu-img",
        &["map", "--output=json", "-f", format, path_str(image)],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| MapEntry {
            start: json_u64(l, "start").unwrap(),
            length: json_u64(l, "length").unwrap(),
            data: l.contains("\"data\": true"),
            zero: l.contains("\"zero\": true"),
            host_offset: l.contains("\"offset\""),
        })
        .collect()
}

/// The map entries that overlap `start..end`.
fn map_at(map: &[MapEntry], start: u64, end: u64) -> Vec<&MapEntry> {
    map.iter()
        .filter(|m| m.start < end && m.start + m.length > start)
        .collect()
}

fn writable(image: &Path, format: &str) -> StorageDaemon {
    StorageDaemon::builder(image, format)
        .writable(true)
        .start()
        .unwrap_or_else(|e| panic!("{format}: {e}"))
}

/// `qemu-img compare`s the guest-visible content of `image` with `model`.
fn assert_guest_content(image: &Path, format: &str, model: &[u8]) {
    let reference = image.with_extension("reference.raw");
    std::fs::write(&reference, model).unwrap();
    let (image, reference) = (path_str(image), path_str(&reference));
    run_ok(
        "qemu-img",
        &["compare", "-f", format, "-F", "raw", image, reference],
    );
}

fn qemu_client(d: &StorageDaemon) -> Client {
    d.connect_with(Client::builder().timeout(TIMEOUT)).unwrap()
}

/// [`writable`] and a [`qemu_client`] of it.
fn writable_client(image: &Path, format: &str) -> (StorageDaemon, Client) {
    let d = writable(image, format);
    let c = qemu_client(&d);
    (d, c)
}

/// Disconnects the client, then shuts the daemon down: both must go cleanly.
fn disconnect_and_shut_down(c: Client, d: StorageDaemon) {
    c.disconnect().unwrap();
    d.shutdown().unwrap();
}

/// For a test against QEMU: its tools are there; a new temporary folder for its files.
fn qemu_test_dir() -> tempfile::TempDir {
    require_qemu();
    tempfile::tempdir().unwrap()
}

/// [`qemu_test_dir`] with a new `format` image `name` of `size` bytes in it.
fn qemu_test_image(name: &str, format: &str, size: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = qemu_test_dir();
    let image = dir.path().join(name);
    create_image(&image, format, size).unwrap();
    (dir, image)
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn every_format_round_trips_through_the_daemon() {
    let dir = qemu_test_dir();
    let size = 8 * MIB;
    for format in ["raw", "qcow2", "vmdk", "vdi", "vhdx", "qed"] {
        let image = dir.path().join(format!("disk.{format}"));
        create_image(&image, format, size as u64).unwrap();
        let (d, c) = writable_client(&image, format);
        assert_eq!(d.size(), size as u64, "{format}");
        let info = c.info();
        assert!(
            info.structured_replies && info.block_status,
            "{format}: {info:?}"
        );
        assert!(info.can_write_zeroes() && info.can_flush() && !info.read_only());
        // Byte-granular for most formats; vhdx asks for 512-byte sectors.
        let min = info.block.min as usize;
        let expected_min = if matches!(format, "vhdx" | "qed") {
            512
        } else {
            1
        };
        assert_eq!(min, expected_min, "{format}: {info:?}");
        let align = |x: usize| x / min * min;
        if min > 1 {
            assert!(matches!(c.write_at(&[1], 1), Err(Error::Unaligned { .. })));
        }
        let mut model = vec![0u8; size];
        for (offset, len, seed) in [
            (1usize, 4095usize, 1u8),
            (65_537, 300_001, 2),
            (MIB + 17, MIB + 5, 3),
            (size - 1000, 1000, 4),
        ] {
            let (offset, len) = (align(offset), align(len));
            let data = pattern(len, seed);
            c.write_at(&data, offset as u64).unwrap();
            model[offset..offset + len].copy_from_slice(&data);
        }
        let (z1, z1_len) = (align(70_000), align(5_000));
        let (z2, z2_len) = (align(MIB + 100), 64 * KIB);
        c.write_zeroes(z1 as u64, z1_len as u64, ZeroMode::MayUnmap)
            .unwrap();
        c.write_zeroes(z2 as u64, z2_len as u64, ZeroMode::NoHole)
            .unwrap();
        model[z1..z1 + z1_len].fill(0);
        model[z2..z2 + z2_len].fill(0);
        c.flush().unwrap();
        let mut back = vec![0xee; size];
        c.read_at(&mut back, 0).unwrap();
        assert!(back == model, "{format}: read back differs");
        c.disconnect().unwrap();
        let socket_dir = d.socket_path().parent().unwrap().to_path_buf();
        d.shutdown().unwrap();
        assert!(!socket_dir.exists(), "{format}: socket directory left");
        assert_guest_content(&image, format, &model);
    }
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn write_zeroes_leaves_qcow2_clusters_unallocated() {
    let (_dir, image) = qemu_test_image("z.qcow2", "qcow2", 4 * MIB as u64);
    let (d, c) = writable_client(&image, "qcow2");
    c.write_at(&pattern(2 * MIB, 9), 0).unwrap();
    // Over allocated data: unmapped, and zeroed but kept allocated.
    c.write_zeroes(256 * KIB as u64, 512 * KIB as u64, ZeroMode::MayUnmap)
        .unwrap();
    c.write_zeroes(MIB as u64, 256 * KIB as u64, ZeroMode::NoHole)
        .unwrap();
    // Over nothing: stays unallocated.
    c.write_zeroes(3 * MIB as u64, MIB as u64, ZeroMode::MayUnmap)
        .unwrap();
    c.flush().unwrap();
    // The client sees the holes too.
    let status = c.block_status(0, 4 * MIB as u64).unwrap();
    assert_eq!(status[0], BlockStatus::data(256 * KIB as u64), "{status:?}");
    assert!(
        status[1].zero && status[1].len == 512 * KIB as u64,
        "{status:?}"
    );
    disconnect_and_shut_down(c, d);
    let map = qemu_map("qcow2", &image);
    let mib = MIB as u64;
    let kib = KIB as u64;
    for m in map_at(&map, 256 * kib, 768 * kib) {
        assert!(
            !m.data && m.zero && !m.host_offset,
            "unmapped range allocated: {m:?}"
        );
    }
    for m in map_at(&map, mib, mib + 256 * kib) {
        assert!(
            !m.data && m.zero && m.host_offset,
            "NO_HOLE range deallocated: {m:?}"
        );
    }
    for m in map_at(&map, 3 * mib, 4 * mib) {
        assert!(!m.data && !m.host_offset, "zeroes allocated: {m:?}");
    }
    for m in map_at(&map, 0, 256 * kib) {
        assert!(m.data, "data lost: {m:?}");
    }
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn block_status_reports_the_holes_of_a_sparse_qcow2() {
    let (_dir, image) = qemu_test_image("sparse.qcow2", "qcow2", 16 * MIB as u64);
    let writes = [
        "write -P 0xaa 1M 512k",
        "write -P 0xbb 5M 64k",
        "write -P 0xcc 15M 1M",
    ];
    qemu_io(&["-f", "qcow2"], path_str(&image), &writes);
    let d = StorageDaemon::builder(&image, "qcow2").start().unwrap();
    let c = qemu_client(&d);
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < c.size() {
        let got = c.block_status(pos, c.size() - pos).unwrap();
        assert!(!got.is_empty());
        pos += got.iter().map(|e| e.len).sum::<u64>();
        extents.extend(got);
    }
    assert_eq!(pos, 16 * MIB as u64);
    // Merge what separate replies split, then compare with QEMU's own map.
    let mut merged: Vec<BlockStatus> = Vec::new();
    for e in extents {
        match merged.last_mut() {
            Some(l) if l.hole == e.hole && l.zero == e.zero => l.len += e.len,
            _ => merged.push(e),
        }
    }
    let m = MIB as u64;
    let k = KIB as u64;
    assert_eq!(
        merged,
        vec![
            BlockStatus::hole(m),
            BlockStatus::data(512 * k),
            BlockStatus::hole(3 * m + 512 * k),
            BlockStatus::data(64 * k),
            BlockStatus::hole(10 * m - 64 * k),
            BlockStatus::data(m),
        ]
    );
    let data: Vec<(u64, u64)> = qemu_map("qcow2", &image)
        .iter()
        .filter(|e| e.data)
        .map(|e| (e.start, e.length))
        .collect();
    assert_eq!(data, vec![(m, 512 * k), (5 * m, 64 * k), (15 * m, m)]);
    // The read-only export refuses writes before they are sent.
    assert!(c.info().read_only());
    assert!(matches!(c.write_at(&[1], 0), Err(Error::ReadOnly(_))));
    let mut buf = vec![0; 64 * KIB];
    c.read_at(&mut buf, 5 * m).unwrap();
    assert!(buf.iter().all(|&b| b == 0xbb));
    disconnect_and_shut_down(c, d);
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn many_requests_in_flight_against_the_daemon() {
    let size = 32 * MIB;
    let (_dir, image) = qemu_test_image("busy.qcow2", "qcow2", size as u64);
    let d = writable(&image, "qcow2");
    let c = d
        .connect_with(Client::builder().max_in_flight(64).timeout(TIMEOUT))
        .unwrap();
    let piece = 256 * KIB;
    // Writes out of order from two threads, then pipelined reads in order.
    on_threads(2, |t| {
        let mut window = std::collections::VecDeque::new();
        for i in (t..size / piece).step_by(2).rev() {
            window.push_back(
                c.submit_write(&pattern(piece, i as u8), (i * piece) as u64)
                    .unwrap(),
            );
            if window.len() > 24 {
                window.pop_front().unwrap().wait().unwrap();
            }
        }
        window.into_iter().for_each(|p| p.wait().unwrap());
    });
    c.flush().unwrap();
    let mut window = std::collections::VecDeque::new();
    let mut next = 0;
    let mut checked = 0;
    while checked < size / piece {
        while next < size / piece && window.len() < 48 {
            window.push_back(c.submit_read((next * piece) as u64, piece).unwrap());
            next += 1;
        }
        let data = window.pop_front().unwrap().wait().unwrap();
        assert!(data == pattern(piece, checked as u8), "piece {checked}");
        checked += 1;
    }
    disconnect_and_shut_down(c, d);
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qcow2_with_a_backing_file_reads_through_the_chain() {
    let dir = qemu_test_dir();
    let backing = pattern(2 * MIB, 1);
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    std::fs::write(&base, &backing).unwrap();
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            path_str(&top),
        ],
    );
    let (d, c) = writable_client(&top, "qcow2");
    c.write_at(&[0x55; 4096], 8192).unwrap();
    let mut expected = backing.clone();
    expected[8192..12288].fill(0x55);
    let mut buf = vec![0; 2 * MIB];
    c.read_at(&mut buf, 0).unwrap();
    assert!(buf == expected);
    disconnect_and_shut_down(c, d);
    assert!(
        std::fs::read(&base).unwrap() == backing,
        "backing file written"
    );
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_nbd_as_the_peer() {
    let (dir, image) = qemu_test_image("n.qcow2", "qcow2", 4 * MIB as u64);
    let sock = dir.path().join("qemu-nbd.sock");
    let mut child = std::process::Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-x", "disk", "--discard=unmap", "-k"])
        .arg(&sock)
        .arg(&image)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = loop {
        match Client::builder()
            .export_name("disk")
            .timeout(TIMEOUT)
            .connect_unix(&sock)
        {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("qemu-nbd did not come up: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    let info = c.info();
    assert!(info.structured_replies && info.block_status && info.can_write_zeroes());
    let data = pattern(MIB + 3, 8);
    c.write_at(&data, 12_345).unwrap();
    c.write_zeroes(2 * MIB as u64, MIB as u64, ZeroMode::MayUnmap)
        .unwrap();
    c.flush().unwrap();
    assert_eq!(
        c.submit_read(12_345, MIB + 3).unwrap().wait().unwrap(),
        data
    );
    let status = c.block_status(2 * MIB as u64, 2 * MIB as u64).unwrap();
    assert!(status.iter().all(|s| s.zero), "{status:?}");
    c.disconnect().unwrap();
    // Without --persistent, qemu-nbd ends with its only client.
    assert!(child.wait().unwrap().success());
    let mut model = vec![0u8; 4 * MIB];
    model[12_345..12_345 + MIB + 3].copy_from_slice(&data);
    assert_guest_content(&image, "qcow2", &model);
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_io_reads_what_the_client_wrote_through_the_daemon() {
    let (_dir, image) = qemu_test_image("io.vmdk", "vmdk", 2 * MIB as u64);
    let (d, c) = writable_client(&image, "vmdk");
    c.write_at(&[0x42; 3 * 4096], 4096).unwrap();
    c.flush().unwrap();
    // QEMU's own NBD client on a second connection sees the data.
    let commands = ["read -P 0x42 4k 12k", "read -P 0 16k 4k"];
    qemu_io(&["-r", "-f", "raw"], &d.nbd_uri(), &commands);
    disconnect_and_shut_down(c, d);
}

// ---------------------------------------------------------------------------
// Faults around the daemon.

/// What is left in a directory.
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect()
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn images_qemu_cannot_open_name_the_image_and_what_qemu_said() {
    let dir = qemu_test_dir();
    let garbage = dir.path().join("garbage.qcow2");
    std::fs::write(&garbage, b"this is not an image at all").unwrap();
    let missing = dir.path().join("missing.qcow2");
    let good = dir.path().join("good.qcow2");
    create_image(&good, "qcow2", MIB as u64).unwrap();
    let cases: Vec<(&Path, &str, &str)> = vec![
        (&garbage, "qcow2", "Image is not in qcow2 format"),
        (&missing, "qcow2", "Could not open"),
        (&good, "qcow3", "'qcow3'"),
    ];
    let sockets = tempfile::tempdir().unwrap();
    for (image, format, qemu_says) in cases {
        let err = StorageDaemon::builder(image, format)
            .temp_dir(sockets.path())
            .start()
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::DaemonStart { .. }), "{text}");
        assert!(text.contains(qemu_says), "{text}");
        assert!(text.contains(path_str(image)), "{text}");
    }
    let err = StorageDaemon::builder(&good, "qcow2,file.filename=/etc/passwd")
        .start()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidFormat(_)), "{err}");
    // A file QEMU cannot write: a writable export of a read-only file.
    let ro = dir.path().join("ro.raw");
    std::fs::write(&ro, vec![0; 4096]).unwrap();
    let mut perms = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    std::fs::set_permissions(&ro, perms).unwrap();
    if std::fs::OpenOptions::new().write(true).open(&ro).is_err() {
        // (root can write anyway; then there is nothing to test.)
        let err = StorageDaemon::builder(&ro, "raw")
            .writable(true)
            .temp_dir(sockets.path())
            .start()
            .unwrap_err();
        assert!(err.to_string().contains("Permission denied"), "{err}");
    }
    assert_eq!(entries(sockets.path()), Vec::<PathBuf>::new());
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn a_daemon_killed_mid_way_fails_the_client_without_hanging() {
    let (_dir, image) = qemu_test_image("k.qcow2", "qcow2", 64 * MIB as u64);
    let (d, c) = writable_client(&image, "qcow2");
    let pid = d.id().unwrap();
    let socket_dir = d.socket_path().parent().unwrap().to_path_buf();
    let started = Instant::now();
    let err = thread::scope(|s| {
        let writer = s.spawn(|| {
            let data = pattern(MIB, 1);
            let mut i = 0u64;
            loop {
                if let Err(e) = c.write_at(&data, (i % 64) * MIB as u64) {
                    return e;
                }
                i += 1;
            }
        });
        thread::sleep(Duration::from_millis(200));
        run_ok("kill", &["-KILL", &pid.to_string()]);
        writer.join().unwrap()
    });
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(err.root(), Error::ServerClosed | Error::Io(_)),
        "{err}"
    );
    assert!(c.flush().is_err());
    drop(c);
    let err = d.shutdown().unwrap_err();
    assert!(matches!(err, Error::DaemonExit { .. }), "{err}");
    assert!(
        err.to_string().contains("SIGKILL") || err.to_string().contains("signal"),
        "{err}"
    );
    assert!(!socket_dir.exists());
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn daemon_missing_from_path_is_a_clear_error() {
    // Runs itself again with a PATH that holds no QEMU.
    const CHILD: &str = "VMA_NBD_TEST_NO_QEMU";
    if std::env::var_os(CHILD).is_some() {
        let err = StorageDaemon::builder("/nonexistent.qcow2", "qcow2")
            .start()
            .unwrap_err();
        assert!(
            matches!(&err, Error::ToolMissing { program } if program == "qemu-storage-daemon"),
            "{err}"
        );
        assert!(err.to_string().contains("qemu-utils"), "{err}");
        let err = create_image("/nonexistent/x.qcow2", "qcow2", 1).unwrap_err();
        assert!(matches!(err, Error::ToolMissing { .. }), "{err}");
        return;
    }
    let empty = qemu_test_dir();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "daemon_missing_from_path_is_a_clear_error",
            "--include-ignored",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env("PATH", empty.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 passed"), "{text}");
}
