//! The on-disk structures of VMA, the Virtual Machine Archive format that Proxmox VE
//! writes for every full VM backup, exact to the byte and strictly validated.
//!
//! An archive is an [`ArchiveHeader`] (identity, config files, device table) followed by
//! extents: an [`ExtentHeader`] of 59 [`BlockInfo`] slots, then the stored 4 KiB blocks of
//! up to 59 clusters of any devices, in any order. The [`cluster`] module is the codec
//! both sides use to turn a 64 KiB cluster into a [`BlockMask`] and stored blocks and back.
//!
//! This crate is pure: no files, no threads. `vma-writer` and `vma-reader` build on it;
//! they never compute an offset or a bit position themselves.
//!
//! ```
//! use vma_format::{cluster, ArchiveHeader, BlockInfo, ConfigEntry, DeviceId, DeviceInfo,
//!                  ExtentHeader, VMA_BLOCKS_PER_EXTENT, VMA_CLUSTER_SIZE};
//!
//! let header = ArchiveHeader {
//!     uuid: uuid::Uuid::from_u128(0x1234),
//!     ctime: 1_700_000_000,
//!     configs: vec![ConfigEntry { name: "qemu-server.conf".into(), data: b"memory: 512\n".to_vec() }],
//!     devices: vec![DeviceInfo { id: DeviceId::new(1).unwrap(), name: "drive-scsi0".into(), size: 70_000 }],
//! };
//! let bytes = header.encode()?;
//! assert_eq!(bytes.len(), 12288 + 512);
//! assert_eq!(ArchiveHeader::decode(&bytes)?, header);
//!
//! // The second cluster of a 70 000-byte device holds 4464 bytes: two blocks, the second
//! // zero-padded past the end.
//! let span = cluster::cluster_span(1, 70_000).unwrap();
//! let data = vec![0xab; VMA_CLUSTER_SIZE];
//! let mask = cluster::scan_cluster(&data, span);
//! let mut stored = Vec::new();
//! cluster::pack_cluster(&data, span, mask, &mut stored);
//! assert_eq!(stored.len(), 8192);
//!
//! let mut slots = [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT];
//! slots[0] = BlockInfo::new(DeviceId::new(1).unwrap(), 1, mask);
//! let extent = ExtentHeader::new(header.uuid, slots);
//! assert_eq!(ExtentHeader::decode(&extent.encode())?, extent);
//! # Ok::<(), vma_format::FormatError>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod aligned;
pub mod cluster;
mod consts;
mod error;
mod extent;
mod header;
pub mod integrity;

pub use consts::*;
pub use error::{BlobField, FormatError, NameProblem, Result};
pub use extent::{BlockInfo, BlockMask, ClusterSlot, ExtentHeader};
pub use header::{ArchiveHeader, ConfigEntry, DeviceId, DeviceInfo};
pub use uuid::Uuid;
