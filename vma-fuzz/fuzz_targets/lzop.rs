#![no_main]
//! `LzopReader` over arbitrary bytes, read to the end with a cap.
use libfuzzer_sys::fuzz_target;
use std::io::Read;

/// Decompressed bytes read at most per input.
const CAP: usize = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = vma_reader::lzop::LzopReader::new(data) else {
        return;
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    while total < CAP {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                assert!(n <= buf.len());
                total += n;
            }
        }
    }
});
