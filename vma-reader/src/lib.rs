//! Read VMA archives, the full VM backups Proxmox VE writes, without Proxmox: verify them,
//! extract them, or read their disks in place.
//!
//! - [`StreamReader`] reads an archive in one pass from any [`Read`](std::io::Read) (a
//!   file, a pipe, a decompressor), extent by extent into one reused buffer;
//!   [`StreamReader::prefetching`] reads (and decompresses) on a second thread instead, into
//!   [`PREFETCH_BUFFERS`] buffers handed over whole, so that reading and checking overlap.
//! - [`verify`] runs every check and writes nothing.
//! - [`Extractor`] writes devices to sparse files or existing targets, and config files.
//! - [`SeekableArchive`] indexes an archive file and gives each device as a
//!   [`DeviceReader`]: `Read + Seek` and thread-safe positional reads.
//!
//! Layout and decoding belong to [`vma_format`]; this crate never computes an offset or a
//! bit position itself.
//!
//! ```
//! use vma_format::{cluster, ArchiveHeader, BlockInfo, ConfigEntry, DeviceId, DeviceInfo,
//!                  ExtentHeader, VMA_BLOCKS_PER_EXTENT};
//! use vma_reader::{verify, Extractor, SeekableArchive, VerifyOptions};
//! use std::io::Read;
//!
//! // An archive of one 128 KiB device: cluster 0 stores its first block, cluster 1 is zero.
//! let id = DeviceId::new(1).unwrap();
//! let header = ArchiveHeader {
//!     uuid: vma_format::Uuid::from_u128(7),
//!     ctime: 0,
//!     configs: vec![ConfigEntry { name: "qemu-server.conf".into(), data: b"cores: 2\n".to_vec() }],
//!     devices: vec![DeviceInfo { id, name: "drive-scsi0".into(), size: 131072 }],
//! };
//! let mut archive = header.encode()?;
//! let mut slots = [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT];
//! slots[0] = BlockInfo::new(id, 0, vma_format::BlockMask::B0);
//! slots[1] = BlockInfo::new(id, 1, vma_format::BlockMask::empty());
//! archive.extend_from_slice(&ExtentHeader::new(header.uuid, slots).encode());
//! archive.extend_from_slice(&[0xab; 4096]);
//!
//! // Verify from any reader.
//! let report = verify(&archive[..], VerifyOptions::default())?;
//! assert!(report.is_ok());
//! assert_eq!(report.devices[0].stored_bytes, 4096);
//!
//! // Extract: a 128 KiB sparse disk-drive-scsi0.raw and qemu-server.conf.
//! let dir = tempfile::tempdir()?;
//! Extractor::new(dir.path()).extract(&archive[..])?;
//! let disk = std::fs::read(dir.path().join("disk-drive-scsi0.raw"))?;
//! assert_eq!(disk.len(), 131072);
//! assert!(disk[..4096].iter().all(|&b| b == 0xab) && disk[4096..].iter().all(|&b| b == 0));
//!
//! // Or read the device in place.
//! let path = dir.path().join("backup.vma");
//! std::fs::write(&path, &archive)?;
//! let vma = SeekableArchive::open(&path)?;
//! let mut dev = vma.device("drive-scsi0")?;
//! let mut buf = [0u8; 8];
//! assert_eq!(dev.read_at(&mut buf, 4092)?, 8);
//! assert_eq!(buf, [0xab, 0xab, 0xab, 0xab, 0, 0, 0, 0]);
//! let mut all = Vec::new();
//! dev.read_to_end(&mut all)?;
//! assert_eq!(all, disk);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Checks
//!
//! Both readers check everything Proxmox's reader checks (header and extent MD5, magic,
//! version, uuid, reserved fields, `block_count` against the masks, truncation) and what it
//! misses: a cluster past its device's end, a mask storing blocks past it, an undeclared
//! device id, a cluster stored twice, clusters missing at the end (the first one is named),
//! and vmstate clusters out of order (vmstate is a stream: its clusters must run 0, 1,
//! 2, ... within its declared size, and need not all be there). Every error says at which
//! archive byte it was found; [`Error::kind`] tells damage from I/O from misuse.
//!
//! # Integrity extension
//!
//! Archives written by vma-rs may carry a CRC32C of each extent's data and a seal at the
//! end (extent count and SHA-256 of every header before it, each extent header holding its
//! data's CRC32C; see [`vma_format::integrity`]). Readers check the
//! CRC32C of every extent carrying one and record mismatches in an [`IntegrityReport`]
//! (the extent's index, offset and clusters), or fail at the first with
//! [`ReadOptions::stop_on_damage`]. A seal must be the last extent: any byte after it is an
//! error, and so is a malformed one; extensions of an unknown version are reported as
//! unverifiable, not trusted and not rejected. Archives without these (all of Proxmox's)
//! read as unsealed and unchecksummed.
//!
//! # File names (policy)
//!
//! Names in an archive are untrusted. A config or device name becomes part of a path only
//! if it is a plain file name: not empty, not `.` or `..`, without `/` or NUL, and at most
//! 255 bytes long (the whole file name too, `disk-<name>.raw` included). Anything else
//! fails with [`Error::UnsafeName`] ([`ErrorKind::UnsafeName`]) before any file is
//! created; nothing is escaped or rewritten. [`safe_file_name`] is that check, and every
//! path this crate builds goes through it. Two outputs with the same name fail with
//! [`Error::NameCollision`].
//!
//! Output files are named as Proxmox's `vma extract` names them: `disk-<device name>.raw`
//! for a device, `vmstate.bin` for the RAM state (device `vmstate`), and a config entry by
//! its own name (`qemu-server.conf`, `qemu-server.fw`). They are written under temporary
//! names (`.<name>.partial`) and renamed only once the whole archive has validated; on
//! failure they are removed. Existing files or block devices given as targets are written
//! in place.
//!
//! # Memory
//!
//! The streaming reader holds one extent (at most [`VMA_MAX_EXTENT_SIZE`](vma_format::VMA_MAX_EXTENT_SIZE),
//! 3.7 MiB) and a set of the clusters seen: one bit per cluster in 64-byte chunks that
//! exist only once a cluster in them arrived, so memory follows the archive's content, not
//! the sizes its header declares (at worst about 100 bytes per cluster slot read, for
//! cluster numbers scattered one per chunk; 1.25 bits per cluster for an ordinary archive).
//!
//! The seekable reader's index takes 8 bytes per cluster in chunks of 512 clusters that
//! store any data, nothing for chunks of all-zero clusters, and 8 bytes per 512 declared
//! clusters for the chunk table (layout in the `index` module source). Before allocating
//! anything it checks that the file is large enough to hold a slot for every declared
//! cluster (59 per 512-byte extent header), so a header declaring 255 devices of 256 TiB
//! in a small file fails at once ([`Error::TooSmallForDevices`]) instead of allocating;
//! every allocation is thus bounded by the file's size. While opening, the seen-set above
//! is held too and freed afterwards.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod error;
mod extract;
mod index;
mod integrity;
mod names;
mod seekable;
mod stream;
mod validate;
mod verify;

pub use error::{Error, ErrorKind, Result};
pub use extract::{DamagedRange, ExtractReport, ExtractedFile, Extractor};
pub use integrity::{ClusterAddress, DamagedExtent, ExtentChecksum, IntegrityReport, SealStatus};
pub use names::{
    config_file_name, device_file_name, safe_file_name, MAX_FILE_NAME_LEN, VMSTATE_FILE_NAME,
};
pub use seekable::{DeviceReader, DeviceRef, SeekableArchive};
pub use stream::{Cluster, Extent, PrefetchingReader, ReadOptions, StreamReader, PREFETCH_BUFFERS};
pub use verify::{verify, DeviceReport, VerifyOptions, VerifyReport};
