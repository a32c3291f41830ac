//! Extent headers: the 512 bytes in front of each run of stored clusters.

use std::ops::Range;

use byteorder::{BigEndian, ByteOrder};
use md5::{Digest, Md5};
use uuid::Uuid;

use crate::consts::extent_offsets as off;
use crate::consts::*;
use crate::error::{FormatError, Result};
use crate::header::DeviceId;

bitflags::bitflags! {
    /// Which 4 KiB blocks of a cluster are stored: bit j set means block j (bytes
    /// `j*4096..(j+1)*4096` of the cluster) follows in the extent's data.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct BlockMask: u16 {
        /// Block 0, the first 4 KiB of the cluster.
        const B0 = 1 << 0;
        /// Block 1.
        const B1 = 1 << 1;
        /// Block 2.
        const B2 = 1 << 2;
        /// Block 3.
        const B3 = 1 << 3;
        /// Block 4.
        const B4 = 1 << 4;
        /// Block 5.
        const B5 = 1 << 5;
        /// Block 6.
        const B6 = 1 << 6;
        /// Block 7.
        const B7 = 1 << 7;
        /// Block 8.
        const B8 = 1 << 8;
        /// Block 9.
        const B9 = 1 << 9;
        /// Block 10.
        const B10 = 1 << 10;
        /// Block 11.
        const B11 = 1 << 11;
        /// Block 12.
        const B12 = 1 << 12;
        /// Block 13.
        const B13 = 1 << 13;
        /// Block 14.
        const B14 = 1 << 14;
        /// Block 15, the last 4 KiB of the cluster.
        const B15 = 1 << 15;
    }
}

impl BlockMask {
    /// The mask with only block `index` (0..16) set.
    pub const fn block(index: usize) -> BlockMask {
        BlockMask::from_bits_retain(1 << index)
    }

    /// Whether block `index` is stored.
    pub const fn has_block(self, index: usize) -> bool {
        self.bits() & (1 << index) != 0
    }

    /// Number of stored blocks.
    pub const fn stored_blocks(self) -> usize {
        self.bits().count_ones() as usize
    }

    /// Number of stored bytes.
    pub const fn stored_len(self) -> usize {
        self.stored_blocks() * VMA_BLOCK_SIZE
    }

    /// For each stored block in order: its index in the cluster and the offset of its bytes
    /// within the cluster's stored data.
    pub fn stored_block_offsets(self) -> impl Iterator<Item = (usize, usize)> {
        let bits = self.bits();
        (0..VMA_BLOCKS_PER_CLUSTER)
            .filter(move |j| bits & (1 << j) != 0)
            .enumerate()
            .map(|(n, j)| (j, n * VMA_BLOCK_SIZE))
    }
}

/// One blockinfo slot of an extent header, as the u64 says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BlockInfo {
    /// Bits 63..48: which blocks are stored.
    pub mask: BlockMask,
    /// Bits 47..40: reserved; zero in what Proxmox writes.
    pub reserved: u8,
    /// Bits 39..32: the device, 0 for an unused slot.
    pub dev_id: u8,
    /// Bits 31..0: the cluster number within the device.
    pub cluster: u32,
}

impl BlockInfo {
    /// An unused slot.
    pub const EMPTY: BlockInfo = BlockInfo {
        mask: BlockMask::empty(),
        reserved: 0,
        dev_id: 0,
        cluster: 0,
    };

    /// A used slot for `cluster` of `device` with the stored blocks in `mask`.
    pub const fn new(device: DeviceId, cluster: u32, mask: BlockMask) -> BlockInfo {
        BlockInfo {
            mask,
            reserved: 0,
            dev_id: device.get(),
            cluster,
        }
    }

    /// Splits the raw u64 into its fields.
    pub const fn from_u64(raw: u64) -> BlockInfo {
        BlockInfo {
            mask: BlockMask::from_bits_retain((raw >> 48) as u16),
            reserved: (raw >> 40) as u8,
            dev_id: (raw >> 32) as u8,
            cluster: raw as u32,
        }
    }

    /// Joins the fields into the raw u64.
    pub const fn to_u64(self) -> u64 {
        ((self.mask.bits() as u64) << 48)
            | ((self.reserved as u64) << 40)
            | ((self.dev_id as u64) << 32)
            | self.cluster as u64
    }

    /// The device, or `None` for an unused slot (which readers skip entirely).
    pub const fn device(self) -> Option<DeviceId> {
        DeviceId::new(self.dev_id)
    }
}

/// A used slot together with where its stored blocks lie in the extent's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSlot {
    /// Slot index, 0..59.
    pub slot: usize,
    /// The device.
    pub device: DeviceId,
    /// The cluster number.
    pub cluster: u32,
    /// Stored blocks.
    pub mask: BlockMask,
    /// Byte range of the stored blocks within the extent's data (which starts right after
    /// the 512-byte extent header).
    pub data: Range<usize>,
}

/// An extent header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentHeader {
    /// The archive's uuid.
    pub uuid: Uuid,
    /// Number of 4 KiB blocks stored after the header.
    pub block_count: u16,
    /// The 59 slots.
    pub blockinfo: [BlockInfo; VMA_BLOCKS_PER_EXTENT],
}

impl ExtentHeader {
    /// An extent header for the given slots, with `block_count` derived from their masks.
    /// Unused slots (dev_id 0) do not count, whatever their mask.
    pub fn new(uuid: Uuid, blockinfo: [BlockInfo; VMA_BLOCKS_PER_EXTENT]) -> ExtentHeader {
        let block_count = count_blocks(&blockinfo) as u16;
        ExtentHeader {
            uuid,
            block_count,
            blockinfo,
        }
    }

    /// Decodes and checks an extent header: magic, reserved field, MD5, and `block_count`
    /// against the masks. The uuid is checked by [`check_uuid`](Self::check_uuid).
    pub fn decode(bytes: &[u8]) -> Result<ExtentHeader> {
        let bytes = crate::error::prefix(bytes, VMA_EXTENT_HEADER_SIZE, "extent header")?;
        let magic: [u8; 4] = bytes[off::MAGIC..off::MAGIC + 4].try_into().unwrap();
        if magic != VMA_EXTENT_MAGIC {
            return Err(FormatError::ExtentBadMagic { found: magic });
        }
        let reserved = BigEndian::read_u16(&bytes[off::RESERVED1..]);
        if reserved != 0 {
            return Err(FormatError::ExtentReserved(reserved));
        }
        let stored: [u8; 16] = bytes[off::MD5SUM..off::MD5SUM + 16].try_into().unwrap();
        let computed = extent_md5(bytes);
        if stored != computed {
            return Err(FormatError::ExtentChecksum { stored, computed });
        }
        let block_count = BigEndian::read_u16(&bytes[off::BLOCK_COUNT..]);
        let mut blockinfo = [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT];
        for (i, info) in blockinfo.iter_mut().enumerate() {
            *info = BlockInfo::from_u64(BigEndian::read_u64(&bytes[off::BLOCKINFO + 8 * i..]));
        }
        let counted = count_blocks(&blockinfo);
        if counted != block_count as usize {
            return Err(FormatError::ExtentBlockCount {
                declared: block_count,
                counted,
            });
        }
        Ok(ExtentHeader {
            uuid: Uuid::from_bytes(bytes[off::UUID..off::UUID + 16].try_into().unwrap()),
            block_count,
            blockinfo,
        })
    }

    /// The length of the extent (header plus data) whose header starts `bytes`, from its
    /// `block_count` alone, without checking anything else: for code that must find
    /// extent boundaries in a byte stream it passes on (a compressor cutting frames), not
    /// for reading. `None` while fewer than the field's 8 bytes are there.
    pub fn len_from_prefix(bytes: &[u8]) -> Option<usize> {
        let field = bytes.get(off::BLOCK_COUNT..off::BLOCK_COUNT + 2)?;
        Some(VMA_EXTENT_HEADER_SIZE + BigEndian::read_u16(field) as usize * VMA_BLOCK_SIZE)
    }

    /// Encodes the header with its MD5, exactly as Proxmox's writer does.
    pub fn encode(&self) -> [u8; VMA_EXTENT_HEADER_SIZE] {
        let mut out = [0u8; VMA_EXTENT_HEADER_SIZE];
        out[off::MAGIC..off::MAGIC + 4].copy_from_slice(&VMA_EXTENT_MAGIC);
        BigEndian::write_u16(&mut out[off::BLOCK_COUNT..], self.block_count);
        out[off::UUID..off::UUID + 16].copy_from_slice(self.uuid.as_bytes());
        for (i, info) in self.blockinfo.iter().enumerate() {
            BigEndian::write_u64(&mut out[off::BLOCKINFO + 8 * i..], info.to_u64());
        }
        let md5 = extent_md5(&out);
        out[off::MD5SUM..off::MD5SUM + 16].copy_from_slice(&md5);
        out
    }

    /// Fails unless the extent carries the archive's uuid.
    pub fn check_uuid(&self, archive: &Uuid) -> Result<()> {
        if self.uuid != *archive {
            return Err(FormatError::ExtentUuid {
                expected: *archive,
                found: self.uuid,
            });
        }
        Ok(())
    }

    /// Bytes of stored data that follow the header.
    pub fn data_len(&self) -> usize {
        self.block_count as usize * VMA_BLOCK_SIZE
    }

    /// Total size of the extent: header plus data.
    pub fn extent_len(&self) -> usize {
        VMA_EXTENT_HEADER_SIZE + self.data_len()
    }

    /// The used slots (dev_id != 0) in order, each with the range of its stored blocks in
    /// the extent's data.
    pub fn clusters(&self) -> impl Iterator<Item = ClusterSlot> + '_ {
        let mut pos = 0usize;
        self.blockinfo
            .iter()
            .enumerate()
            .filter_map(move |(slot, info)| {
                let device = info.device()?;
                let start = pos;
                pos += info.mask.stored_len();
                Some(ClusterSlot {
                    slot,
                    device,
                    cluster: info.cluster,
                    mask: info.mask,
                    data: start..pos,
                })
            })
    }
}

/// Blocks stored by the used slots.
fn count_blocks(blockinfo: &[BlockInfo]) -> usize {
    blockinfo
        .iter()
        .filter(|info| info.dev_id != 0)
        .map(|info| info.mask.stored_blocks())
        .sum()
}

/// MD5 over the extent header with the MD5 field taken as zero.
fn extent_md5(header: &[u8]) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update(&header[..off::MD5SUM]);
    md5.update([0u8; 16]);
    md5.update(&header[off::MD5SUM + 16..VMA_EXTENT_HEADER_SIZE]);
    md5.finalize().into()
}
