#![no_main]
//! The lzop block index of the seekable reader over arbitrary bytes taken as a whole
//! file: an index that scans describes blocks that follow each other within lzop's
//! limits, maps every content offset to its block, and decodes to what the streaming
//! reader reads.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vma_fuzz::check_lzop_index(data);
});
