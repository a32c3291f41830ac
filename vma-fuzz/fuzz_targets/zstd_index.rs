#![no_main]
//! The sidecar index of a stock `.vma.zst` over arbitrary bytes: taken as a sidecar, one
//! that parses describes contiguous segments within the archive; taken as a zstd stream,
//! one that indexes decodes, segment by segment, to what zstd decodes of it.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vma_fuzz::check_zstd_index(data);
});
