#![no_main]
//! Everything a server sends to the NBD client (handshake and replies to a fixed set of
//! requests) from arbitrary bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vma_nbd::fuzz::run_client_session(data);
});
