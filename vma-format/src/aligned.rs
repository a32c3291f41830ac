//! Page-aligned byte buffers for I/O and large copies.
//!
//! On some x86 CPUs (measured on AMD EPYC) `rep movsb`, which both glibc's `memcpy` and
//! the kernel's `copy_to_user`/`copy_from_user` use for large copies, runs about 20 times
//! slower when `(dst - src) mod 4096` lies in `1..64`. A `Vec<u8>` of a few MiB comes
//! from `mmap` and starts 16 bytes past a page boundary, so `read`ing file data at a
//! page-aligned file offset into it hits exactly that case. An [`AlignedBuf`] starts on
//! a page boundary instead.

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

/// Pieces [`copy`] cuts an aliasing copy into: below glibc's `rep movsb` threshold, so
/// each piece is copied with vector moves, which do not have the slow case.
const PIECE: usize = 2048;

/// `dst.copy_from_slice(src)`, avoiding the slow case of `rep movsb`: when
/// `(dst - src) mod 4096` is in `1..64` it copies in pieces small enough for `memcpy`
/// to use vector moves instead.
///
/// # Panics
///
/// If the lengths differ, like `copy_from_slice`.
pub fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy: lengths differ");
    let distance = (dst.as_ptr() as usize).wrapping_sub(src.as_ptr() as usize) % PAGE;
    if dst.len() <= PIECE || !(1..64).contains(&distance) {
        dst.copy_from_slice(src);
        return;
    }
    for (d, s) in dst.chunks_mut(PIECE).zip(src.chunks(PIECE)) {
        d.copy_from_slice(s);
    }
}

/// `out.extend_from_slice(src)`, avoiding the slow case of `rep movsb` like [`copy`].
pub fn extend(out: &mut Vec<u8>, src: &[u8]) {
    out.reserve(src.len());
    let end = out.as_ptr() as usize + out.len();
    let distance = end.wrapping_sub(src.as_ptr() as usize) % PAGE;
    if src.len() <= PIECE || !(1..64).contains(&distance) {
        out.extend_from_slice(src);
        return;
    }
    for piece in src.chunks(PIECE) {
        out.extend_from_slice(piece);
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
    fn copy_at_every_distance() {
        let src: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut dst = AlignedBuf::new(20_000 + 2 * PAGE);
        for shift in [0, 1, 16, 63, 64, 100, 4095] {
            for len in [0, 5, PIECE, PIECE + 1, 10_000, 20_000] {
                dst.fill(0xee);
                copy(&mut dst[shift..shift + len], &src[..len]);
                assert_eq!(&dst[shift..shift + len], &src[..len]);
                assert!(dst[..shift].iter().all(|&x| x == 0xee));
                assert!(dst[shift + len..].iter().all(|&x| x == 0xee));
            }
        }
    }

    #[test]
    fn extend_at_every_distance() {
        let src: Vec<u8> = (0..20_000u32).map(|i| (i * 13 + i / 509) as u8).collect();
        for start in [0, 1, 16, 63, 64, 4000] {
            for len in [0, 7, PIECE, PIECE + 1, 20_000] {
                let mut out = vec![9u8; start];
                extend(&mut out, &src[..len]);
                assert_eq!(out.len(), start + len);
                assert!(out[..start].iter().all(|&x| x == 9));
                assert_eq!(&out[start..], &src[..len]);
            }
        }
    }

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
