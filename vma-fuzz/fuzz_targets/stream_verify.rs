#![no_main]
//! `vma_reader::verify` over arbitrary bytes.
use libfuzzer_sys::fuzz_target;
use vma_reader::{verify, VerifyOptions};

fuzz_target!(|data: &[u8]| {
    let _ = verify(data, VerifyOptions::default());
});
