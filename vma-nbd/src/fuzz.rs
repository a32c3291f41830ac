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
//! The parsers in [`crate::proto`] can also be fuzzed on their own.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, OnceLock};

use crate::transmission::lock;
use crate::{BlockSize, Export, Extent, Server};

/// Size of each fuzzing export.
pub const EXPORT_SIZE: u64 = 64 * 1024;
/// Output beyond this many bytes is counted but not kept.
const MAX_OUTPUT: usize = 1 << 20;

struct MemExport {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    block: BlockSize,
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        EXPORT_SIZE
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = lock(&self.data);
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| data.get(start..end))
            .ok_or(io::ErrorKind::InvalidInput)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut data = lock(&self.data);
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let dst = start
            .checked_add(buf.len())
            .and_then(|end| data.get_mut(start..end))
            .ok_or(io::ErrorKind::InvalidInput)?;
        dst.copy_from_slice(buf);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        // Odd-sized alternating extents to exercise the normalisation.
        let mut v = Vec::new();
        let mut left = u64::from(len);
        let mut i = offset;
        while left > 0 {
            let l = left.min(1000 + i % 3000);
            v.push(if (i / 1000).is_multiple_of(2) {
                Extent::data(l)
            } else {
                Extent::hole(l)
            });
            left -= l;
            i += l;
        }
        Ok(v)
    }
    fn block_size(&self) -> BlockSize {
        self.block
    }
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mk = |read_only, min| {
            Arc::new(MemExport {
                data: Mutex::new(vec![0x5a; EXPORT_SIZE as usize]),
                read_only,
                block: BlockSize {
                    min,
                    preferred: 4096,
                    max: 32 * 1024,
                },
            })
        };
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
