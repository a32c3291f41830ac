#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod bitmap;
mod builder;
mod compress;
mod error;
mod file;
mod identity;
mod sink;
#[cfg(unix)]
mod source;
mod writer;

pub use builder::{Builder, Device, RecordedCluster, VmState};
pub use compress::{ZstdOptions, ZstdSummary, ZstdWriter, DEFAULT_FRAME_SIZE};
pub use error::{Error, ErrorKind, MissingClusters, Result};
pub use file::{FileWriter, PartialFile};
pub use identity::{derived_uuid, uuid_from_name};
#[cfg(unix)]
pub use source::source_size;
pub use vma_format::{DeviceId, Uuid};
pub use writer::{DeviceSummary, Summary, Writer, WriterHandle};

/// The sector size device sizes are rounded to for Proxmox (QEMU measures disks in
/// 512-byte sectors).
pub const SECTOR_SIZE: u64 = 512;

/// Rounds a size up to a multiple of 512, as Proxmox's `vma create` records device sizes.
///
/// Proxmox's restore writes whole sectors only, so a device recorded with a size that is
/// not a multiple of 512 loses its last bytes there; record `round_up_to_sector(len)` for
/// a `len`-byte image and let the bytes past the image read as zero. The writer records
/// whatever size it is given. (Sizes within 511 of `u64::MAX`, far beyond any valid
/// device, saturate to the largest multiple of 512.)
pub const fn round_up_to_sector(size: u64) -> u64 {
    match size.checked_add(SECTOR_SIZE - 1) {
        Some(s) => s / SECTOR_SIZE * SECTOR_SIZE,
        None => u64::MAX / SECTOR_SIZE * SECTOR_SIZE,
    }
}

/// The most bytes an archive of disks holding `device_bytes` in all can take, with the
/// integrity extension and the extent index: the data, an extent header per 58 clusters
/// (or per partial extent, one per device at most), the index's copies of those headers,
/// the seal, and 16 MiB for the archive header and its configs. A bound for sizing an
/// output ahead (an S3 multipart upload's part size), not the exact size.
pub fn max_archive_len(device_bytes: u64) -> u64 {
    use vma_format::{
        VMA_BLOCKS_PER_EXTENT, VMA_CLUSTER_SIZE, VMA_EXTENT_HEADER_SIZE, VMA_MAX_DEVICES,
    };
    let clusters = device_bytes.div_ceil(VMA_CLUSTER_SIZE as u64);
    // Slot 58 carries the data checksum: 58 clusters per extent.
    let extents = clusters.div_ceil(VMA_BLOCKS_PER_EXTENT as u64 - 1) + VMA_MAX_DEVICES as u64;
    let index = vma_format::extent_index::extents_for(extents);
    let headers = (extents + index + 1) * VMA_EXTENT_HEADER_SIZE as u64;
    device_bytes
        .saturating_add(headers)
        .saturating_add(16 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_rounding() {
        assert_eq!(round_up_to_sector(0), 0);
        assert_eq!(round_up_to_sector(1), 512);
        assert_eq!(round_up_to_sector(512), 512);
        assert_eq!(round_up_to_sector(1000), 1024);
        assert_eq!(round_up_to_sector(5_255_225), 5_255_680);
        assert_eq!(round_up_to_sector(u64::MAX), u64::MAX - 511);
    }
}
