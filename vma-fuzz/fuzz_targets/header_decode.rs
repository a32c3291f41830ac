#![no_main]
//! `ArchiveHeader::header_size_from_prefix` + `decode` over arbitrary bytes.
use libfuzzer_sys::fuzz_target;
use vma_format::ArchiveHeader;

fuzz_target!(|data: &[u8]| {
    let size = ArchiveHeader::header_size_from_prefix(data);
    if let Ok(size) = size {
        assert!(size >= 12288, "header_size {size} below the fixed header");
    }
    if let Ok(header) = ArchiveHeader::decode(data) {
        // A decoded header must re-encode and decode to itself.
        if let Ok(bytes) = header.encode() {
            let again = ArchiveHeader::decode(&bytes).expect("re-encoded header decodes");
            assert_eq!(again, header);
        }
    }
});
