//! Entry points for fuzzing the protocol handling.
//!
//! [`run_session`] plays arbitrary bytes as the client side of a whole
//! connection (handshake and transmission) against a server with small
//! in-memory exports, and returns what the server answered. It must never
//! panic, hang or allocate in proportion to lengths found in the input;
//! a fuzz target is just:
//!
//! ```
//! fn fuzz_target(data: &[u8]) {
//!     let _ = vma_nbd::fuzz::run_session(data);
//! }
//! # fuzz_target(b"\0\0\0\x03IHAVEOPT\0\0\0\x03\0\0\0\0");
//! ```
//!
//! [`run_client_session`] does the same for the client: arbitrary bytes are
//! everything a server sends, against a fixed set of requests.
//!
//! The parsers in [`crate::proto`] can also be fuzzed on their own.

use std::io::{self, Read, Write};
use std::sync::{Arc, OnceLock};

use crate::client::Transport;
use crate::proto::*;
use crate::{BlockSize, Client, MemExport, Server, ZeroMode};

/// Size of each fuzzing export.
pub const EXPORT_SIZE: u64 = 64 * 1024;
/// Output beyond this many bytes is counted but not kept.
const MAX_OUTPUT: usize = 1 << 20;

/// Size of the runs of zero and non-zero bytes in the fuzzing exports: odd, so that
/// block status answers need clipping and merging.
const RUN: usize = 1000;

/// An export of alternating zero and non-zero runs, reporting the zero ones as holes.
fn export(read_only: bool, min: u32) -> MemExport {
    let data = (0..EXPORT_SIZE as usize)
        .map(|i| if (i / RUN).is_multiple_of(2) { 0x5a } else { 0 })
        .collect();
    MemExport::new(data)
        .read_only(read_only)
        .report_holes(RUN as u64)
        .block_size(BlockSize {
            min,
            preferred: 4096,
            max: 32 * 1024,
        })
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mk = |read_only, min| Arc::new(export(read_only, min));
        match Server::builder()
            .export("", mk(false, 1))
            .export("rw", mk(false, 1))
            .export("ro512", mk(true, 512))
            .workers(0)
            .build()
        {
            Ok(s) => s,
            Err(e) => unreachable!("fuzz server configuration is valid: {e}"),
        }
    })
}

struct MemStream<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for MemStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for MemStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = MAX_OUTPUT.saturating_sub(self.output.len());
        self.output.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs one connection with `input` as everything the client sends and
/// returns (up to 1 MiB of) what the server sent back.
///
/// The server has three exports of [`EXPORT_SIZE`] bytes: `""` and `"rw"`
/// (writable, shared between runs) and `"ro512"` (read-only, 512-byte
/// minimum block size); the maximum block size is 32 KiB.
pub fn run_session(input: &[u8]) -> Vec<u8> {
    let mut stream = MemStream {
        input,
        output: Vec::new(),
    };
    let _ = server().serve_stream(&mut stream);
    stream.output
}

/// One request of the client fuzzing session.
#[derive(Debug, Clone, Copy)]
enum Step {
    Read(u64, usize),
    Write(u64, usize),
    Zeroes(u64, u64),
    Status(u64, u64),
    Flush,
}

/// The requests [`run_client_session`] sends, all before reading any reply:
/// with the export of [`client_session_seeds`] they get handles 1 to 6.
const STEPS: [Step; 6] = [
    Step::Read(0, 4096),
    Step::Read(100_000, 70_000),
    Step::Write(8192, 512),
    Step::Zeroes(0, 65536),
    Step::Status(0, 1 << 20),
    Step::Flush,
];

/// What one submitted request is waited for with.
enum Submitted {
    Read(usize, crate::PendingRead),
    Done(crate::Pending),
    Status(u64, crate::PendingStatus),
}

fn submit(c: &Client, step: Step) -> Option<Submitted> {
    Some(match step {
        Step::Read(offset, len) => Submitted::Read(len, c.submit_read(offset, len).ok()?),
        Step::Write(offset, len) => Submitted::Done(c.submit_write(&vec![0xab; len], offset).ok()?),
        Step::Zeroes(offset, len) => Submitted::Done(
            c.submit_write_zeroes(offset, len, ZeroMode::MayUnmap)
                .ok()?,
        ),
        Step::Status(offset, len) => {
            Submitted::Status(len, c.submit_block_status(offset, len).ok()?)
        }
        Step::Flush => Submitted::Done(c.submit_flush().ok()?),
    })
}

/// Plays `input` as everything a server sends during one connection: the
/// handshake, then the replies to a fixed set of requests (reads, a write,
/// write-zeroes, block status, flush) that the client sends first. Returns
/// how many requests succeeded. Whatever the input, this must not panic,
/// hang, or allocate in proportion to a length in it; every answer the
/// client accepts is checked against its request.
pub fn run_client_session(input: &[u8]) -> usize {
    // Everything is submitted before any reply is read, so the budget must
    // hold every piece: with the smallest maximum payload a server may
    // announce (512 bytes), the steps are under 300 requests.
    let builder = Client::builder().export_name("fuzz").max_in_flight(4096);
    let Ok((client, reader)) = builder.handshake(input, io::sink(), Transport::Stream, None) else {
        return 0;
    };
    let submitted: Vec<Submitted> = STEPS.iter().filter_map(|&s| submit(&client, s)).collect();
    let _ = client.run_replies_inline(reader);
    let mut ok = 0;
    for s in submitted {
        match s {
            Submitted::Read(len, p) => {
                if let Ok(data) = p.wait() {
                    assert_eq!(data.len(), len, "read returned the wrong length");
                    ok += 1;
                }
            }
            Submitted::Done(p) => ok += usize::from(p.wait().is_ok()),
            Submitted::Status(len, p) => {
                if let Ok(extents) = p.wait() {
                    let total: u64 = extents.iter().map(|e| e.len).sum();
                    assert!(
                        !extents.is_empty() && total <= len,
                        "bad extents {extents:?}"
                    );
                    assert!(extents.iter().all(|e| e.len > 0), "empty extent");
                    ok += 1;
                }
            }
        }
    }
    ok
}

fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    let length = data.len() as u32;
    out.extend_from_slice(
        &OptionReplyHeader {
            option,
            kind,
            length,
        }
        .encode(),
    );
    out.extend_from_slice(data);
}

fn reply_chunk(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, payload: &[u8]) {
    let length = payload.len() as u32;
    out.extend_from_slice(
        &ChunkHeader {
            flags,
            kind,
            handle,
            length,
        }
        .encode(),
    );
    out.extend_from_slice(payload);
}

/// The server's side of a handshake with a 1 MiB export.
fn seed_handshake(structured: bool, go: bool) -> Vec<u8> {
    let mut v = NBDMAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    let flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_WRITE_ZEROES;
    if structured {
        option_reply(&mut v, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let mut ctx = META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        ctx.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        option_reply(&mut v, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
        option_reply(&mut v, OPT_SET_META_CONTEXT, REP_ACK, &[]);
    } else {
        option_reply(&mut v, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, b"no");
    }
    if go {
        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export.extend_from_slice(&flags.to_be_bytes());
        option_reply(&mut v, OPT_GO, REP_INFO, &export);
        let mut block = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for n in [1u32, 4096, 1 << 20] {
            block.extend_from_slice(&n.to_be_bytes());
        }
        option_reply(&mut v, OPT_GO, REP_INFO, &block);
        option_reply(&mut v, OPT_GO, REP_ACK, &[]);
    } else {
        option_reply(&mut v, OPT_GO, REP_ERR_UNSUP, &[]);
        v.extend_from_slice(&(1u64 << 20).to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
    }
    v
}

/// Structured replies to [`STEPS`], in a shuffled order, mixing data,
/// holes, block status and an error.
fn structured_replies(out: &mut Vec<u8>) {
    let done = REPLY_FLAG_DONE;
    // Step 2 (read 70000 at 100000): a hole, then data, then NONE.
    let mut hole = 100_000u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&30_000u32.to_be_bytes());
    reply_chunk(out, 0, REPLY_TYPE_OFFSET_HOLE, 2, &hole);
    let mut data = 130_000u64.to_be_bytes().to_vec();
    data.extend(std::iter::repeat_n(0x5a, 40_000));
    reply_chunk(out, 0, REPLY_TYPE_OFFSET_DATA, 2, &data);
    reply_chunk(out, done, REPLY_TYPE_NONE, 2, &[]);
    // Step 1: one data chunk.
    let mut data = 0u64.to_be_bytes().to_vec();
    data.extend(std::iter::repeat_n(1, 4096));
    reply_chunk(out, done, REPLY_TYPE_OFFSET_DATA, 1, &data);
    // Steps 3 and 4: a structured and a simple success.
    reply_chunk(out, done, REPLY_TYPE_NONE, 3, &[]);
    out.extend_from_slice(
        &SimpleReply {
            error: 0,
            handle: 4,
        }
        .encode(),
    );
    // Step 5: block status.
    let mut status = META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    for (len, flags) in [
        (4096u32, 0u32),
        (61_440, STATE_HOLE | STATE_ZERO),
        (1 << 20, 0),
    ] {
        status.extend_from_slice(&len.to_be_bytes());
        status.extend_from_slice(&flags.to_be_bytes());
    }
    reply_chunk(out, done, REPLY_TYPE_BLOCK_STATUS, 5, &status);
    // Step 6: an error with a message.
    let mut err = 5u32.to_be_bytes().to_vec();
    err.extend_from_slice(&4u16.to_be_bytes());
    err.extend_from_slice(b"oops");
    reply_chunk(out, done, REPLY_TYPE_ERROR, 6, &err);
}

/// Simple replies to [`STEPS`] (no block status request is sent then).
fn simple_replies(out: &mut Vec<u8>) {
    for (handle, len) in [(2u64, 70_000usize), (1, 4096)] {
        out.extend_from_slice(&SimpleReply { error: 0, handle }.encode());
        out.extend(std::iter::repeat_n(handle as u8, len));
    }
    for (handle, error) in [(3u64, 0u32), (4, 28), (5, 0)] {
        out.extend_from_slice(&SimpleReply { error, handle }.encode());
    }
}

/// Server transcripts that [`run_client_session`] accepts in full: with
/// structured replies, with simple replies, and through the
/// `NBD_OPT_EXPORT_NAME` fallback. Seeds for the fuzz target.
pub fn client_session_seeds() -> Vec<Vec<u8>> {
    let mut structured = seed_handshake(true, true);
    structured_replies(&mut structured);
    let mut simple = seed_handshake(false, true);
    simple_replies(&mut simple);
    let mut export_name = seed_handshake(false, false);
    simple_replies(&mut export_name);
    vec![structured, simple, export_name]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator, to avoid a dev-dependency.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = crate::proto::IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn valid_prefix() -> Vec<u8> {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend(opt(crate::proto::OPT_STRUCTURED_REPLY, &[]));
        let mut meta = 2u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"rw");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        v.extend(opt(crate::proto::OPT_SET_META_CONTEXT, &meta));
        let mut go = 2u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"rw");
        go.extend_from_slice(&0u16.to_be_bytes());
        v.extend(opt(crate::proto::OPT_GO, &go));
        v
    }

    #[test]
    fn random_inputs_do_not_panic() {
        let mut rng = Lcg(42);
        let prefix = valid_prefix();
        for round in 0..3000 {
            let mut input = if round % 2 == 0 {
                prefix.clone()
            } else {
                Vec::new()
            };
            let n = (rng.next() % 400) as usize;
            for _ in 0..n {
                // Bias towards small values and valid magics.
                let b = match rng.next() % 8 {
                    0 => 0x25,
                    1 => 0x60,
                    2 => 0x95,
                    3 => 0x13,
                    4 => 0,
                    _ => rng.next() as u8,
                };
                input.push(b);
            }
            let _ = run_session(&input);
        }
    }

    #[test]
    fn client_seeds_are_accepted() {
        let seeds = client_session_seeds();
        // All six succeed but the flush, which the server fails.
        assert_eq!(run_client_session(&seeds[0]), 5);
        // Simple replies: no block status request; a write-zeroes fails.
        assert_eq!(run_client_session(&seeds[1]), 5);
        assert_eq!(run_client_session(&seeds[2]), 5);
    }

    #[test]
    fn small_maximum_payloads_do_not_block_submission() {
        let mut input = client_session_seeds()[0].clone();
        // The block size item of the seed: minimum 1, preferred 4096, maximum 1 MiB.
        let mut item = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for n in [1u32, 4096, 1 << 20] {
            item.extend_from_slice(&n.to_be_bytes());
        }
        let at = input
            .windows(item.len())
            .position(|w| w == item)
            .expect("block size item in the seed");
        input[at + 6..at + 10].copy_from_slice(&512u32.to_be_bytes());
        input[at + 10..at + 14].copy_from_slice(&512u32.to_be_bytes());
        // Replies no longer match; what matters is that this returns.
        let _ = run_client_session(&input);
    }

    #[test]
    fn mutated_client_sessions_do_not_panic() {
        let mut rng = Lcg(99);
        let seeds = client_session_seeds();
        for round in 0..4000 {
            let mut input = seeds[round % seeds.len()].clone();
            for _ in 0..(1 + rng.next() % 4) {
                let at = (rng.next() as usize) % input.len();
                match rng.next() % 4 {
                    0 => input[at] = rng.next() as u8,
                    1 => input[at] ^= 1 << (rng.next() % 8),
                    2 => input.truncate(at),
                    _ => input.insert(at, rng.next() as u8),
                }
                if input.is_empty() {
                    break;
                }
            }
            let _ = run_client_session(&input);
        }
    }

    #[test]
    fn structured_requests_do_not_panic() {
        let mut rng = Lcg(7);
        for _ in 0..2000 {
            let mut input = valid_prefix();
            for _ in 0..(rng.next() % 8) {
                let h = crate::proto::RequestHeader {
                    flags: (rng.next() % 32) as u16,
                    command: (rng.next() % 10) as u16,
                    handle: rng.next(),
                    offset: match rng.next() % 4 {
                        0 => rng.next() % EXPORT_SIZE,
                        1 => u64::MAX - rng.next() % 10,
                        _ => (rng.next() % 128) * 512,
                    },
                    length: match rng.next() % 4 {
                        0 => rng.next() as u32,
                        _ => ((rng.next() % 80) * 512) as u32,
                    },
                };
                input.extend_from_slice(&h.encode());
                let payload = (rng.next() % 2048) as usize;
                input.extend(std::iter::repeat_n(0xabu8, payload));
            }
            let out = run_session(&input);
            assert!(out.starts_with(b"NBDMAGIC"));
        }
    }
}
