#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

use std::ops::{Deref, DerefMut};

/// Alignment of an [`AlignedBuf`]: one page.
pub const PAGE: usize = 4096;

/// A fixed-length, zero-initialised byte buffer whose first byte is page-aligned.
#[derive(Default)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes starting on a page boundary.
    pub fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + PAGE];
        let start = storage.as_ptr().align_offset(PAGE);
        assert!(start < PAGE, "alignment");
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated.
    pub fn capacity(&self) -> usize {
        self.storage.capacity()
    }

    /// Grows the buffer to at least `len` bytes (a new allocation: contents are not kept
    /// beyond `keep` bytes).
    pub fn grow(&mut self, len: usize, keep: usize) {
        if len <= self.len {
            return;
        }
        let mut bigger = AlignedBuf::new(len);
        let keep = keep.min(self.len);
        bigger[..keep].copy_from_slice(&self[..keep]);
        *self = bigger;
    }

    /// The largest length [`set_len`](Self::set_len) accepts.
    pub fn max_len(&self) -> usize {
        self.storage.len().saturating_sub(self.start)
    }

    /// Shortens the visible length (the allocation stays); never lengthens beyond what
    /// was allocated.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.max_len(), "beyond the allocation");
        self.len = len;
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_aligned_and_sized() {
        for len in [0, 1, 4096, 65536 + 3, 4 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % PAGE, 0);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                b[len - 1] = 7;
                assert_eq!(b[len - 1], 7);
            }
        }
        let mut b = AlignedBuf::new(512);
        b[..3].copy_from_slice(&[1, 2, 3]);
        b.grow(100_000, 3);
        assert_eq!(b.len(), 100_000);
        assert_eq!(&b[..4], &[1, 2, 3, 0]);
        assert_eq!(b.as_ptr() as usize % PAGE, 0);
        assert!(b.max_len() >= 100_000);
        assert_eq!(AlignedBuf::default().max_len(), 0);
        b.set_len(10);
        assert_eq!(b.len(), 10);
        b.set_len(100_000);
        assert_eq!(b.len(), 100_000);
    }
}
