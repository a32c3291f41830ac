#![no_main]
//! `ExtentHeader::decode` over arbitrary bytes; decoded headers round-trip.
use libfuzzer_sys::fuzz_target;
use vma_format::{ExtentHeader, VMA_MAX_EXTENT_SIZE};

fuzz_target!(|data: &[u8]| {
    if let Ok(ext) = ExtentHeader::decode(data) {
        assert!(ext.extent_len() <= VMA_MAX_EXTENT_SIZE);
        assert_eq!(ext.extent_len(), 512 + ext.data_len());
        let mut total = 0usize;
        for slot in ext.clusters() {
            let _ = slot;
            total += 1;
        }
        assert!(total <= 59);
        let again = ExtentHeader::decode(&ext.encode()).expect("re-encoded extent decodes");
        assert_eq!(again, ext);
    }
});
