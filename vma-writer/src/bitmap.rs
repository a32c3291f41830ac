//! One bit per cluster of a device: which clusters are written (or claimed by a write in
//! progress). Allocated in chunks as clusters are touched.

/// Clusters per chunk: 2^21 bits, 256 KiB of bitmap, 128 GiB of device.
const CHUNK_BITS: u64 = 1 << 21;
const CHUNK_WORDS: usize = (CHUNK_BITS / 64) as usize;

/// A bitmap over `len` clusters; a chunk never touched reads as all clear.
pub(crate) struct ClusterBitmap {
    len: u64,
    chunks: Vec<Option<Box<[u64]>>>,
}

/// Bits `lo..hi` (0..=64) of a word.
fn word_mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl ClusterBitmap {
    pub(crate) fn new(len: u64) -> ClusterBitmap {
        let chunks = len.div_ceil(CHUNK_BITS) as usize;
        ClusterBitmap {
            len,
            chunks: (0..chunks).map(|_| None).collect(),
        }
    }

    /// Calls `f(chunk, word, mask)` for each word that bits `start..end` touch.
    fn words(start: u64, end: u64, mut f: impl FnMut(usize, usize, u64) -> bool) {
        let mut pos = start;
        while pos < end {
            let word_start = pos & !63;
            let word_end = (word_start + 64).min(end);
            let mask = word_mask(pos - word_start, word_end - word_start);
            let chunk = (pos / CHUNK_BITS) as usize;
            let word = ((pos % CHUNK_BITS) / 64) as usize;
            if !f(chunk, word, mask) {
                return;
            }
            pos = word_end;
        }
    }

    /// The first set bit in `start..end`.
    pub(crate) fn first_set(&self, start: u64, end: u64) -> Option<u64> {
        let end = end.min(self.len);
        let mut pos = start;
        while pos < end {
            let chunk = (pos / CHUNK_BITS) as usize;
            let chunk_end = ((chunk as u64 + 1) * CHUNK_BITS).min(end);
            if let Some(words) = &self.chunks[chunk] {
                let mut found = None;
                Self::words(pos, chunk_end, |_, w, mask| {
                    let hit = words[w] & mask;
                    if hit != 0 {
                        found = Some(
                            chunk as u64 * CHUNK_BITS + w as u64 * 64 + hit.trailing_zeros() as u64,
                        );
                        return false;
                    }
                    true
                });
                if found.is_some() {
                    return found;
                }
            }
            pos = chunk_end;
        }
        None
    }

    /// The first clear bits in `start..end`, at most `limit` of them.
    pub(crate) fn first_clear(&self, start: u64, end: u64, limit: usize) -> Vec<u64> {
        let end = end.min(self.len);
        let mut out = Vec::new();
        let mut pos = start;
        while pos < end && out.len() < limit {
            let chunk = (pos / CHUNK_BITS) as usize;
            let chunk_end = ((chunk as u64 + 1) * CHUNK_BITS).min(end);
            match &self.chunks[chunk] {
                None => {
                    let n = (limit - out.len()) as u64;
                    out.extend(pos..chunk_end.min(pos + n));
                }
                Some(words) => Self::words(pos, chunk_end, |_, w, mask| {
                    let mut clear = !words[w] & mask;
                    while clear != 0 && out.len() < limit {
                        out.push(
                            chunk as u64 * CHUNK_BITS
                                + w as u64 * 64
                                + clear.trailing_zeros() as u64,
                        );
                        clear &= clear - 1;
                    }
                    out.len() < limit
                }),
            }
            pos = chunk_end;
        }
        out
    }

    /// Sets bits `start..end`.
    pub(crate) fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.len);
        let chunks = &mut self.chunks;
        Self::words(start, end, |c, w, mask| {
            let words = chunks[c].get_or_insert_with(|| vec![0u64; CHUNK_WORDS].into_boxed_slice());
            words[w] |= mask;
            true
        });
    }

    /// Clears bits `start..end`.
    pub(crate) fn clear_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.len);
        let chunks = &mut self.chunks;
        Self::words(start, end, |c, w, mask| {
            if let Some(words) = &mut chunks[c] {
                words[w] &= !mask;
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_across_words_and_chunks() {
        let len = CHUNK_BITS * 2 + 100;
        let mut b = ClusterBitmap::new(len);
        assert_eq!(b.first_set(0, len), None);
        assert_eq!(b.first_clear(0, len, 3), vec![0, 1, 2]);
        b.set_range(5, 200);
        assert_eq!(b.first_set(0, len), Some(5));
        assert_eq!(b.first_set(200, len), None);
        assert_eq!(b.first_set(199, 200), Some(199));
        assert_eq!(b.first_clear(0, len, 2), vec![0, 1]);
        assert_eq!(b.first_clear(5, len, 2), vec![200, 201]);
        let edge = CHUNK_BITS - 3;
        b.set_range(edge, edge + 10);
        assert_eq!(b.first_set(300, len), Some(edge));
        assert_eq!(b.first_clear(edge, len, 1), vec![edge + 10]);
        b.clear_range(edge + 1, edge + 9);
        assert_eq!(b.first_clear(edge, len, 2), vec![edge + 1, edge + 2]);
        b.set_range(0, len);
        assert_eq!(b.first_clear(0, len, 5), Vec::<u64>::new());
        b.clear_range(len - 1, len);
        assert_eq!(b.first_clear(0, len, 5), vec![len - 1]);
        // words(): a full word
        assert_eq!(word_mask(0, 64), u64::MAX);
        assert_eq!(word_mask(3, 5), 0b11000);
    }
}
