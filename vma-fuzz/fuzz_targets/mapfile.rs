#![no_main]
//! The restore map parser of `vma extract -r`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vma_cli::mapfile::parse(data);
});
