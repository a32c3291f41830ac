//! The cluster codec that writer and reader share: which blocks of a cluster are stored,
//! how they are packed, and how they are laid back into a cluster.
//!
//! A cluster is 16 blocks of 4 KiB. Blocks that are all zero are not stored; blocks wholly
//! past the device's end are never stored; the block that straddles the end is stored
//! with the bytes past the end as zeros.

use crate::consts::*;
use crate::extent::BlockMask;

/// Number of clusters a device of `size` bytes spans.
pub const fn cluster_count(size: u64) -> u64 {
    size.div_ceil(VMA_CLUSTER_SIZE as u64)
}

/// Byte offset of a cluster within its device.
pub const fn cluster_offset(cluster: u32) -> u64 {
    cluster as u64 * VMA_CLUSTER_SIZE as u64
}

/// How many bytes of `cluster` lie inside a device of `size` bytes: 65536 for every
/// cluster but the last, which may be shorter; `None` for a cluster past the end.
pub const fn cluster_span(cluster: u32, size: u64) -> Option<usize> {
    let start = cluster_offset(cluster);
    if start >= size {
        return None;
    }
    let rest = size - start;
    Some(if rest >= VMA_CLUSTER_SIZE as u64 {
        VMA_CLUSTER_SIZE
    } else {
        rest as usize
    })
}

/// The blocks that lie at least partly within the first `span` bytes of a cluster: those
/// that may be stored.
pub const fn span_mask(span: usize) -> BlockMask {
    let blocks = span.div_ceil(VMA_BLOCK_SIZE);
    if blocks >= VMA_BLOCKS_PER_CLUSTER {
        BlockMask::all()
    } else {
        BlockMask::from_bits_retain((1u16 << blocks) - 1)
    }
}

/// The bytes of a cluster that Proxmox's restore counts as "sparse": those of the
/// blocks `mask` does not store, counted in whole 512-byte sectors inside the first
/// `span` bytes (the cluster's bytes inside the device; the reference restores only the
/// device's whole sectors). Its `vma -v` statistics add these up.
pub const fn unstored_sector_bytes(mask: BlockMask, span: usize) -> u64 {
    const SECTOR: usize = 512;
    let end = span / SECTOR * SECTOR;
    let mut total = 0u64;
    let mut j = 0;
    while j < VMA_BLOCKS_PER_CLUSTER {
        let start = j * VMA_BLOCK_SIZE;
        if !mask.has_block(j) && start < end {
            let stop = if start + VMA_BLOCK_SIZE < end {
                start + VMA_BLOCK_SIZE
            } else {
                end
            };
            total += (stop - start) as u64;
        }
        j += 1;
    }
    total
}

/// Bytes of the device that the blocks `mask` stores cover, in a cluster with `span`
/// bytes inside the device: 4096 per block, less what the block that straddles the
/// device end has past it.
pub const fn stored_device_bytes(mask: BlockMask, span: usize) -> u64 {
    let mut n = mask.stored_len();
    if span > 0 {
        let last = (span - 1) / VMA_BLOCK_SIZE;
        if last < VMA_BLOCKS_PER_CLUSTER && mask.has_block(last) {
            n -= (last + 1) * VMA_BLOCK_SIZE - span;
        }
    }
    n as u64
}

/// Bytes of block `block` (0..16) inside the first `span` bytes of its cluster: 4096,
/// less for the block that straddles the device end, 0 past it.
pub const fn block_span(block: usize, span: usize) -> usize {
    let start = block * VMA_BLOCK_SIZE;
    if start >= span {
        0
    } else if span - start < VMA_BLOCK_SIZE {
        span - start
    } else {
        VMA_BLOCK_SIZE
    }
}

/// Whether every byte is zero. Reads a word at a time, not a byte at a time.
pub fn is_zero(bytes: &[u8]) -> bool {
    const CHUNK: usize = 256;
    let mut chunks = bytes.chunks_exact(CHUNK);
    for chunk in &mut chunks {
        // Folding a whole chunk without early exit lets the compiler vectorise it.
        let acc = chunk.chunks_exact(16).fold(0u128, |acc, w| {
            acc | u128::from_ne_bytes(w.try_into().unwrap())
        });
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// The mask of a cluster: blocks within `span` that hold a non-zero byte within `span`.
///
/// `data` is the cluster's bytes from its start; it may be shorter than 64 KiB (missing
/// bytes count as zero) and bytes at or past `span` are ignored.
pub fn scan_cluster(data: &[u8], span: usize) -> BlockMask {
    let data = &data[..data.len().min(span)];
    let mut bits = 0u16;
    for (j, block) in data.chunks(VMA_BLOCK_SIZE).enumerate() {
        if !is_zero(block) {
            bits |= 1 << j;
        }
    }
    BlockMask::from_bits_retain(bits)
}

/// Appends the stored blocks of a cluster to `out`, in block order: for each block in
/// `mask`, its bytes from `data` within `span`, zero-padded to 4 KiB.
///
/// Blocks in `mask` past `span` would be stored as zeros; callers pass a mask from
/// [`scan_cluster`] (or a subset of [`span_mask`]) so that never happens.
pub fn pack_cluster(data: &[u8], span: usize, mask: BlockMask, out: &mut Vec<u8>) {
    let data = &data[..data.len().min(span)];
    if mask == BlockMask::all() && data.len() == VMA_CLUSTER_SIZE {
        crate::copies::extend(out, data);
        return;
    }
    for (j, _) in mask.stored_block_offsets() {
        let start = (j * VMA_BLOCK_SIZE).min(data.len());
        let end = ((j + 1) * VMA_BLOCK_SIZE).min(data.len());
        crate::copies::extend(out, &data[start..end]);
        out.resize(out.len() + VMA_BLOCK_SIZE - (end - start), 0);
    }
}

/// Lays stored blocks back into a cluster: `out` (up to 64 KiB, usually the cluster's
/// span) receives each stored block at its place and zeros elsewhere.
///
/// `stored` must hold `mask.stored_len()` bytes.
pub fn unpack_cluster(mask: BlockMask, stored: &[u8], out: &mut [u8]) {
    debug_assert_eq!(stored.len(), mask.stored_len());
    if mask == BlockMask::all() {
        let n = out.len().min(VMA_CLUSTER_SIZE);
        crate::copies::copy(&mut out[..n], &stored[..n]);
        return;
    }
    for (j, block) in out
        .chunks_mut(VMA_BLOCK_SIZE)
        .enumerate()
        .take(VMA_BLOCKS_PER_CLUSTER)
    {
        if mask.has_block(j) {
            let at = BlockMask::from_bits_retain(mask.bits() & ((1u16 << j) - 1)).stored_len();
            crate::copies::copy(block, &stored[at..at + block.len()]);
        } else {
            block.fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_bytes_of_stored_blocks() {
        assert_eq!(stored_device_bytes(BlockMask::all(), 65536), 65536);
        assert_eq!(
            stored_device_bytes(BlockMask::B0 | BlockMask::B1, 4097),
            4097
        );
        assert_eq!(stored_device_bytes(BlockMask::B1, 4097), 1);
        assert_eq!(stored_device_bytes(BlockMask::B0, 4097), 4096);
        assert_eq!(stored_device_bytes(BlockMask::empty(), 100), 0);
        assert_eq!(block_span(0, 100), 100);
        assert_eq!(block_span(1, 4097), 1);
        assert_eq!(block_span(2, 4097), 0);
        assert_eq!(block_span(15, 65536), 4096);
    }

    #[test]
    fn unstored_bytes_count_whole_sectors_inside() {
        assert_eq!(unstored_sector_bytes(BlockMask::all(), 65536), 0);
        assert_eq!(unstored_sector_bytes(BlockMask::empty(), 65536), 65536);
        assert_eq!(unstored_sector_bytes(BlockMask::B0, 65536), 61440);
        // A 1000-byte span: one whole sector; the straddling sector is not restored.
        assert_eq!(unstored_sector_bytes(BlockMask::empty(), 1000), 512);
        assert_eq!(unstored_sector_bytes(BlockMask::B0, 1024), 0);
        // 197120 - 3 * 65536 = 512 bytes in the last cluster of vec2's efidisk.
        assert_eq!(unstored_sector_bytes(BlockMask::empty(), 512), 512);
        assert_eq!(unstored_sector_bytes(BlockMask::B1, 8192), 4096);
    }

    #[test]
    fn spans_at_the_device_end() {
        assert_eq!(cluster_span(0, 1), Some(1));
        assert_eq!(cluster_span(0, 65536), Some(65536));
        assert_eq!(cluster_span(1, 65536), None);
        assert_eq!(cluster_span(1, 65537), Some(1));
        assert_eq!(span_mask(1).bits(), 1);
        assert_eq!(span_mask(4096).bits(), 1);
        assert_eq!(span_mask(4097).bits(), 3);
        assert_eq!(span_mask(65536), BlockMask::all());
        assert_eq!(cluster_count(0), 0);
        assert_eq!(cluster_count(65537), 2);
        assert_eq!(cluster_count(VMA_MAX_DEVICE_SIZE), VMA_MAX_CLUSTERS);
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut block = vec![0u8; 4096 + 7];
        assert!(is_zero(&block));
        for i in [0, 1, 255, 256, 4095, 4096, 4102] {
            block[i] = 1;
            assert!(!is_zero(&block), "byte {i}");
            block[i] = 0;
        }
    }

    #[test]
    fn bytes_past_the_end_are_neither_scanned_nor_stored() {
        let mut data = vec![0u8; VMA_CLUSTER_SIZE];
        data[4095] = 7;
        data[4100] = 9; // past the span below
        let span = 4097;
        let mask = scan_cluster(&data, span);
        assert_eq!(mask.bits(), 0b01);
        data[4096] = 5;
        let mask = scan_cluster(&data, span);
        assert_eq!(mask.bits(), 0b11);
        let mut out = Vec::new();
        pack_cluster(&data, span, mask, &mut out);
        assert_eq!(out.len(), 8192);
        assert_eq!(out[4096], 5);
        assert!(is_zero(&out[4097..]), "the straddling block is zero-padded");
        let mut back = vec![0xffu8; span];
        unpack_cluster(mask, &out, &mut back);
        assert_eq!(back[..], data[..span]);
    }

    #[test]
    fn short_data_counts_as_zero() {
        let data = vec![1u8; 5000];
        let mask = scan_cluster(&data, VMA_CLUSTER_SIZE);
        assert_eq!(mask.bits(), 0b11);
        let mut out = Vec::new();
        pack_cluster(&data, VMA_CLUSTER_SIZE, mask, &mut out);
        assert_eq!(out.len(), 8192);
        assert!(is_zero(&out[5000..]));
    }

    #[test]
    fn unpack_places_blocks_and_zeros_the_rest() {
        let mask = BlockMask::B1 | BlockMask::B15;
        let mut stored = vec![1u8; 4096];
        stored.extend(vec![2u8; 4096]);
        let mut out = vec![0xaau8; VMA_CLUSTER_SIZE];
        unpack_cluster(mask, &stored, &mut out);
        assert!(is_zero(&out[..4096]));
        assert!(out[4096..8192].iter().all(|&b| b == 1));
        assert!(is_zero(&out[8192..61440]));
        assert!(out[61440..].iter().all(|&b| b == 2));
    }
}
