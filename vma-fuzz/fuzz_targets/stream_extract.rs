#![no_main]
//! `Extractor` into a fresh temporary directory.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vma_fuzz::check_extract(data);
});
