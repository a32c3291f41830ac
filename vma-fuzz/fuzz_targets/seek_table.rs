#![no_main]
//! The seek table of zstd's seekable format over arbitrary bytes taken as a whole stream:
//! a table that parses describes frames that fill exactly the bytes before it, lookups
//! agree with the frames, and a table without checksums re-encodes to the same bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vma_fuzz::check_seek_table(data);
});
