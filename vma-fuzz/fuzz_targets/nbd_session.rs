#![no_main]
//! A whole NBD client session (handshake and transmission) from arbitrary bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vma_nbd::fuzz::run_session(data);
});
