//! A streaming, out-of-order writer for VMA, the Virtual Machine Archive format of
//! Proxmox VE's full VM backups.
//!
//! Declare the archive first with a [`Builder`] (config files, disks, the optional RAM
//! state), then write clusters of any disk in any order, from one thread or many, into any
//! [`std::io::Write`] (a file, a pipe, a socket, a compressor) and [`finish`](Writer::finish).
//! The writer finds zero blocks itself, accounts for every cluster (a cluster written twice
//! or never is an error, not a broken archive) and keeps its memory bounded whatever the
//! size of the disks. What it writes restores with Proxmox's own `vma extract`.
//!
//! ```
//! use vma_writer::Builder;
//!
//! let mut builder = Builder::new();
//! builder.add_config("qemu-server.conf", b"memory: 512\nscsi0: local:vm-100-disk-0\n")?;
//! let disk = builder.add_device("drive-scsi0", 3 * 65536 + 1000)?;
//! let writer = builder.build(Vec::new())?;
//!
//! // Clusters in any order; a backup job delivers them as the guest touches them.
//! writer.write_range(disk, 2 * 65536, &[0xab; 65536 + 1000])?; // ends at the device end
//! writer.write_zero_cluster(disk, 1)?;
//! writer.write_cluster(disk, 0, &[1; 65536])?;
//!
//! let (summary, archive) = writer.finish()?;
//! assert_eq!(summary.devices[0].clusters, 4);
//! assert_eq!(summary.archive_bytes, archive.len() as u64);
//! assert_eq!(&archive[..4], b"VMA\0");
//! # Ok::<(), vma_writer::Error>(())
//! ```
//!
//! # Several producers
//!
//! [`Writer::handle`] gives a cloneable `Send + Sync` [`WriterHandle`] with the same write
//! calls. Each call scans for zeros and packs the cluster on the calling thread, straight
//! into a buffer that becomes part of the extent (the only copy of the data); a short lock
//! then records the clusters in the extent being assembled. The call that fills an extent
//! takes it out, computes its CRC32C and sends it into a bounded channel (blocking while
//! the channel is full), all without the lock. A dedicated sink thread hashes and writes
//! the extents; it is the only code that touches the `Write`, and no lock is held while
//! it does.
//!
//! # Memory
//!
//! An extent holds at most 58 clusters, 3.7 MiB of packed data. In flight per archive: two
//! extents queued in the channel, one being written, one being assembled, and per write
//! call in progress at most one finished extent on its way into the channel plus its batch
//! of up to 16 packed clusters (1 MiB): about 15 MiB + 4.7 MiB per concurrent call, at
//! most, whatever the size of the disks. Packed-cluster buffers are reused, not
//! reallocated. The accounting adds one bit per cluster of each disk, allocated in 256 KiB
//! chunks as clusters are written: 2 KiB per GiB of disk, 2 MiB per TiB, 512 MiB for the
//! largest possible disk (256 TiB). [`WriterHandle::write_file`] adds its 4 MiB read
//! buffer per call.
//!
//! # Failure
//!
//! The first error of the sink poisons the writer: every later call, on every handle,
//! returns that same [`Error`]. [`Writer::abort`] (or dropping the writer) abandons the
//! archive without its end marker. With the integrity extension (on by default,
//! [`Builder::integrity`]) each extent carries a CRC32C of its data and a successful finish
//! appends a seal (extent count and SHA-256 of every header, each carrying its data's
//! CRC32C), both in places that Proxmox's reader and every other VMA reader ignore.
//!
//! # Files
//!
//! [`Builder::create_file`] writes under a temporary name and renames the archive into
//! place only when it is complete; [`WriterHandle::write_file`] backs up a regular file
//! (skipping the holes of a sparse one) or a block device.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod bitmap;
mod builder;
mod error;
mod file;
mod sink;
#[cfg(unix)]
mod source;
mod writer;

pub use builder::{Builder, Device, VmState};
pub use error::{Error, MissingClusters, Result};
pub use file::{FileWriter, PartialFile};
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
