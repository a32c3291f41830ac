//! The seekable reader's index: where each cluster's stored blocks lie in the archive.
//!
//! Per device, one `u64` entry per cluster, in chunks of 512 clusters (4 KiB), each chunk
//! allocated only when one of its clusters stores data:
//!
//! ```text
//!  63            48 47                                           0
//! +----------------+----------------------------------------------+
//! |  block mask    |  (data offset - header_size) / 512           |
//! +----------------+----------------------------------------------+
//! ```
//!
//! Every extent is 512 + n * 4096 bytes and starts a multiple of 512 bytes after the
//! header, and each cluster's data a multiple of 4096 bytes into its extent, so the data
//! offset relative to the header's end is a multiple of 512: 48 bits of it cover archives
//! up to 2^57 bytes. A mask of 0 (entry 0, or no chunk) is a cluster with nothing
//! stored, which reads as zeros: once the archive has validated complete, every cluster
//! without an entry is such a cluster.
//!
//! Memory: 8 bytes per cluster in chunks that hold any data, nothing for chunks of
//! all-zero clusters, and 8 bytes per 512 clusters for the chunk table.

use vma_format::BlockMask;

/// Clusters per chunk.
const CHUNK: usize = 512;
const OFFSET_BITS: u32 = 48;
const OFFSET_MASK: u64 = (1 << OFFSET_BITS) - 1;
/// Unit of the stored offset.
const OFFSET_UNIT: u64 = 512;
/// Largest relative offset an entry can hold.
pub(crate) const MAX_RELATIVE_OFFSET: u64 = OFFSET_MASK * OFFSET_UNIT;

/// Index of one device.
#[derive(Debug, Default)]
pub(crate) struct DeviceIndex {
    chunks: Vec<Option<Box<[u64; CHUNK]>>>,
}

impl DeviceIndex {
    /// Records a cluster whose stored data starts `relative` bytes after the header's end
    /// (a multiple of 512). Clusters storing nothing need no entry.
    pub(crate) fn set(&mut self, cluster: u32, mask: BlockMask, relative: u64) {
        if mask.is_empty() {
            return;
        }
        debug_assert!(relative.is_multiple_of(OFFSET_UNIT) && relative <= MAX_RELATIVE_OFFSET);
        let (c, i) = (cluster as usize / CHUNK, cluster as usize % CHUNK);
        if self.chunks.len() <= c {
            self.chunks.resize_with(c + 1, || None);
        }
        let chunk = self.chunks[c].get_or_insert_with(|| Box::new([0; CHUNK]));
        chunk[i] = ((mask.bits() as u64) << OFFSET_BITS) | (relative / OFFSET_UNIT);
    }

    /// The stored blocks of a cluster and where they start, relative to the header's end.
    pub(crate) fn get(&self, cluster: u64) -> (BlockMask, u64) {
        let (c, i) = (
            (cluster / CHUNK as u64) as usize,
            (cluster % CHUNK as u64) as usize,
        );
        match self.chunks.get(c) {
            Some(Some(chunk)) => {
                let e = chunk[i];
                (
                    BlockMask::from_bits_retain((e >> OFFSET_BITS) as u16),
                    (e & OFFSET_MASK) * OFFSET_UNIT,
                )
            }
            _ => (BlockMask::empty(), 0),
        }
    }

    /// Bytes of memory held.
    pub(crate) fn memory(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Option<Box<[u64; CHUNK]>>>()
            + self.chunks.iter().flatten().count() * CHUNK * 8
    }

    /// Trims the chunk table to what it holds.
    pub(crate) fn shrink(&mut self) {
        self.chunks.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_holes_read_empty() {
        let mut ix = DeviceIndex::default();
        assert_eq!(ix.get(5), (BlockMask::empty(), 0));
        ix.set(5, BlockMask::B3 | BlockMask::B4, 512 * 77);
        ix.set(1000, BlockMask::all(), MAX_RELATIVE_OFFSET);
        ix.set(7, BlockMask::empty(), 4096);
        assert_eq!(ix.get(5), (BlockMask::B3 | BlockMask::B4, 512 * 77));
        assert_eq!(ix.get(1000), (BlockMask::all(), MAX_RELATIVE_OFFSET));
        assert_eq!(ix.get(7), (BlockMask::empty(), 0));
        assert_eq!(ix.get(600), (BlockMask::empty(), 0));
        assert_eq!(ix.get(u32::MAX as u64), (BlockMask::empty(), 0));
        assert_eq!(ix.memory(), ix.chunks.capacity() * 8 + 2 * 4096);
    }
}
