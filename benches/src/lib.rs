//! Benchmark tools for vma-rs: `vma-randread` measures random 4 KiB reads through the
//! seekable reader against `pread` on the raw image; `vma-shuffled` writes an archive the way
//! a live vzdump lays it out (random uuid, clusters shuffled), the baseline of `dedup.sh`.
//! `compare.sh` runs everything and
//! prints the table recorded in `RESULTS.md`.
#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

/// A small deterministic generator (xorshift64*), so that every run reads the same offsets.
pub struct Offsets(u64);

impl Offsets {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> Offsets {
        Offsets(seed.max(1))
    }

    /// The next 4 KiB-aligned offset below `size - 4096`.
    pub fn next_block(&mut self, size: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (r % (size / 4096).max(1)) * 4096
    }
}
