#![no_main]
//! Arbitrary writer operations; whatever finishes must read back exactly.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|plan: vma_fuzz::Plan| {
    vma_fuzz::check_roundtrip(&plan);
});
