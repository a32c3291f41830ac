#![no_main]
//! The extent index decoder over arbitrary bytes taken as 512-byte extents: what decodes
//! decodes the same streaming and whole, and re-encodes to the same extents.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vma_fuzz::check_extent_index(data);
});
