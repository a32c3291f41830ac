#![no_main]
//! `SeekableArchive` over a temporary file holding arbitrary bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vma_fuzz::check_seekable(data);
});
