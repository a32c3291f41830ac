//! vma-rs's integrity extension: a CRC32C over each extent's data and a seal that closes
//! the archive, both carried in blockinfo slots with dev_id 0, which every VMA reader skips.
//!
//! Layout (see `spec/FORMAT.md`, "Integrity extension"):
//! - Checksum entry, slot 58 (the 59th, which Proxmox's writer never fills): dev_id 0, mask
//!   = [`CHECKSUM_TAG`], reserved = [`INTEGRITY_VERSION`], cluster = CRC32C of the
//!   `block_count * 4096` data bytes that follow the extent header.
//! - Seal: one extent with block_count 0 and every slot dev_id 0, after the last data
//!   extent. Slot 0: mask = [`SEAL_TAG`], reserved = version, cluster = payload length.
//!   Slots 1.. carry the payload, 7 bytes each (mask big-endian, reserved, cluster
//!   big-endian): the number of extents before the seal (u64 big-endian) and the SHA-256
//!   of the archive header and every extent header before the seal ([`SealHasher`]).
//!   Each of those extent headers carries its data's CRC32C, so the seal covers the data
//!   through them while a reader need only read headers to check it.

use byteorder::{BigEndian, ByteOrder};

use crate::consts::{VMA_BLOCKS_PER_EXTENT, VMA_EXTENT_HEADER_SIZE};
use crate::extent::{BlockInfo, BlockMask, ExtentHeader};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Slot of the per-extent checksum entry.
pub const CHECKSUM_SLOT: usize = VMA_BLOCKS_PER_EXTENT - 1;
/// Mask bits that mark a checksum entry (`"CS"`).
pub const CHECKSUM_TAG: u16 = 0x4353;
/// Mask bits of slot 0 that mark a seal extent (`"SL"`).
pub const SEAL_TAG: u16 = 0x534c;
/// The checksum entry version this crate writes and understands.
pub const INTEGRITY_VERSION: u8 = 1;
/// The seal version this crate writes and understands. Version 1 (an early development
/// format that hashed every archive byte) is read as an unknown version.
pub const SEAL_VERSION: u8 = 2;
/// Payload bytes per dev_id-0 slot: the 56 bits beside dev_id (mask, reserved, cluster).
pub const PAYLOAD_BYTES_PER_SLOT: usize = 7;
const SEAL_BYTES_PER_SLOT: usize = PAYLOAD_BYTES_PER_SLOT;
/// Payload of a version-2 seal: extent count and SHA-256.
const SEAL_PAYLOAD_LEN: usize = 8 + 32;

/// What an extent header says about the integrity of its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataChecksum {
    /// No checksum entry (an archive from another writer, or an extent using all 59 slots).
    Absent,
    /// CRC32C of the extent's data bytes.
    Crc32c(u32),
    /// A checksum entry of a version this crate does not know: to be reported, not trusted.
    UnknownVersion(u8),
}

/// CRC32C (Castagnoli) of extent data, hardware-accelerated where the CPU allows.
pub fn data_crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Continues a CRC32C over more bytes, for data that arrives in pieces.
pub fn data_crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

impl ExtentHeader {
    /// The data checksum this extent carries.
    pub fn data_checksum(&self) -> DataChecksum {
        let info = self.blockinfo[CHECKSUM_SLOT];
        if info.dev_id != 0 || info.mask.bits() != CHECKSUM_TAG {
            return DataChecksum::Absent;
        }
        if info.reserved != INTEGRITY_VERSION {
            return DataChecksum::UnknownVersion(info.reserved);
        }
        DataChecksum::Crc32c(info.cluster)
    }

    /// Records the CRC32C of the extent's data in the checksum slot. Returns `false` (and
    /// changes nothing) when that slot holds a cluster.
    pub fn set_data_checksum(&mut self, crc: u32) -> bool {
        let slot = &mut self.blockinfo[CHECKSUM_SLOT];
        if slot.dev_id != 0 {
            return false;
        }
        *slot = BlockInfo {
            mask: BlockMask::from_bits_retain(CHECKSUM_TAG),
            reserved: INTEGRITY_VERSION,
            dev_id: 0,
            cluster: crc,
        };
        true
    }
}

/// The archive seal: proof that the archive is complete and its headers unaltered up to
/// it (and, through the CRC32C each extent header carries, its data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    /// Number of extents before the seal.
    pub extents: u64,
    /// SHA-256 over the archive header and every extent header before the seal.
    pub sha256: [u8; 32],
}

/// Computes a seal as an archive goes by: feed it the archive header, then each extent
/// header (the 512 bytes as stored) in archive order; the data is not hashed.
///
/// ```
/// use vma_format::integrity::SealHasher;
/// let mut hasher = SealHasher::new(b"the archive header bytes");
/// hasher.extent(&[0u8; 512]);
/// let seal = hasher.seal();
/// assert_eq!(seal.extents, 1);
/// ```
#[derive(Debug, Clone)]
pub struct SealHasher {
    sha: Sha256,
    extents: u64,
}

impl SealHasher {
    /// Starts with the archive header's bytes (all of them, blobs included).
    pub fn new(archive_header: &[u8]) -> SealHasher {
        SealHasher {
            sha: Sha256::new_with_prefix(archive_header),
            extents: 0,
        }
    }

    /// Adds the next extent's header, as stored. It must be
    /// [`VMA_EXTENT_HEADER_SIZE`] bytes long.
    pub fn extent(&mut self, header: &[u8]) {
        debug_assert_eq!(header.len(), VMA_EXTENT_HEADER_SIZE);
        self.sha.update(header);
        self.extents += 1;
    }

    /// Extent headers added so far.
    pub fn extents(&self) -> u64 {
        self.extents
    }

    /// The seal for what was added so far (the hasher can go on).
    pub fn seal(&self) -> Seal {
        Seal {
            extents: self.extents,
            sha256: self.sha.clone().finalize().into(),
        }
    }
}

/// What an extent is, as far as the seal goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealKind {
    /// Not a seal: an ordinary extent.
    NotASeal,
    /// A seal of [`SEAL_VERSION`].
    Seal(Seal),
    /// A seal of a version this crate does not know.
    UnknownVersion(u8),
    /// Tagged as a seal but not laid out as one (data, a used slot, a bad length).
    Malformed,
}

impl Seal {
    /// The seal extent header for an archive with this uuid.
    pub fn to_extent(&self, uuid: Uuid) -> ExtentHeader {
        let mut payload = [0u8; SEAL_PAYLOAD_LEN];
        BigEndian::write_u64(&mut payload[..8], self.extents);
        payload[8..].copy_from_slice(&self.sha256);
        let mut slots = [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT];
        slots[0] = BlockInfo {
            mask: BlockMask::from_bits_retain(SEAL_TAG),
            reserved: SEAL_VERSION,
            dev_id: 0,
            cluster: SEAL_PAYLOAD_LEN as u32,
        };
        pack_payload(&payload, &mut slots[1..]);
        ExtentHeader::new(uuid, slots)
    }

    /// Classifies an extent header (already decoded and checked) as a seal or not.
    pub fn from_extent(extent: &ExtentHeader) -> SealKind {
        let first = extent.blockinfo[0];
        if first.dev_id != 0 || first.mask.bits() != SEAL_TAG {
            return SealKind::NotASeal;
        }
        if extent.block_count != 0 || extent.blockinfo.iter().any(|s| s.dev_id != 0) {
            return SealKind::Malformed;
        }
        if first.reserved != SEAL_VERSION {
            return SealKind::UnknownVersion(first.reserved);
        }
        if first.cluster as usize != SEAL_PAYLOAD_LEN {
            return SealKind::Malformed;
        }
        let mut payload =
            [0u8; SEAL_PAYLOAD_LEN.div_ceil(SEAL_BYTES_PER_SLOT) * SEAL_BYTES_PER_SLOT];
        unpack_payload(&extent.blockinfo[1..], &mut payload);
        SealKind::Seal(Seal {
            extents: BigEndian::read_u64(&payload[..8]),
            sha256: payload[8..SEAL_PAYLOAD_LEN].try_into().unwrap(),
        })
    }
}

/// Packs `payload` into `slots`, [`PAYLOAD_BYTES_PER_SLOT`] bytes each in the order mask
/// (big-endian), reserved, cluster (big-endian), dev_id 0, the last slot used zero padded.
/// Slots beyond the payload are left alone. The payload must fit.
pub(crate) fn pack_payload(payload: &[u8], slots: &mut [BlockInfo]) {
    debug_assert!(payload.len() <= slots.len() * PAYLOAD_BYTES_PER_SLOT);
    for (slot, chunk) in slots.iter_mut().zip(payload.chunks(PAYLOAD_BYTES_PER_SLOT)) {
        let mut b = [0u8; PAYLOAD_BYTES_PER_SLOT];
        b[..chunk.len()].copy_from_slice(chunk);
        *slot = BlockInfo {
            mask: BlockMask::from_bits_retain(BigEndian::read_u16(&b[0..2])),
            reserved: b[2],
            dev_id: 0,
            cluster: BigEndian::read_u32(&b[3..7]),
        };
    }
}

/// The inverse of [`pack_payload`]: fills `out` from the slots' 7 bytes each (as many
/// slots as `out` needs; `out` must not be longer than the slots hold).
pub(crate) fn unpack_payload(slots: &[BlockInfo], out: &mut [u8]) {
    debug_assert!(out.len() <= slots.len() * PAYLOAD_BYTES_PER_SLOT);
    for (slot, chunk) in slots.iter().zip(out.chunks_mut(PAYLOAD_BYTES_PER_SLOT)) {
        let mut b = [0u8; PAYLOAD_BYTES_PER_SLOT];
        BigEndian::write_u16(&mut b[0..2], slot.mask.bits());
        b[2] = slot.reserved;
        BigEndian::write_u32(&mut b[3..7], slot.cluster);
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::DeviceId;

    #[test]
    fn seal_round_trips_through_bytes() {
        let seal = Seal {
            extents: 0x0102_0304_0506_0708,
            sha256: std::array::from_fn(|i| i as u8 * 7 + 1),
        };
        let extent = seal.to_extent(Uuid::from_u128(9));
        let bytes = extent.encode();
        let back = ExtentHeader::decode(&bytes).unwrap();
        assert_eq!(back.block_count, 0);
        assert!(
            back.clusters().next().is_none(),
            "no slot a reader would use"
        );
        assert_eq!(Seal::from_extent(&back), SealKind::Seal(seal));
    }

    #[test]
    fn seal_payload_is_big_endian_on_disk() {
        let seal = Seal {
            extents: 0x0102_0304_0506_0708,
            sha256: [0xff; 32],
        };
        let extent = seal.to_extent(Uuid::nil());
        // Slot 1 carries the first 7 payload bytes as mask (BE), reserved, cluster (BE):
        // on disk (a big-endian u64) they are the payload bytes in order around dev_id 0.
        let slot = extent.blockinfo[1].to_u64().to_be_bytes();
        assert_eq!(slot, [0x01, 0x02, 0x03, 0x00, 0x04, 0x05, 0x06, 0x07]);
        let slot = extent.blockinfo[2].to_u64().to_be_bytes();
        assert_eq!(slot, [0x08, 0xff, 0xff, 0x00, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn ordinary_extents_are_not_seals_and_carry_no_checksum() {
        let mut slots = [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT];
        slots[0] = BlockInfo::new(DeviceId::new(1).unwrap(), 0, BlockMask::B0);
        let mut e = ExtentHeader::new(Uuid::nil(), slots);
        assert_eq!(Seal::from_extent(&e), SealKind::NotASeal);
        assert_eq!(e.data_checksum(), DataChecksum::Absent);
        assert!(e.set_data_checksum(0xdead_beef));
        let back = ExtentHeader::decode(&e.encode()).unwrap();
        assert_eq!(back.data_checksum(), DataChecksum::Crc32c(0xdead_beef));
        assert_eq!(back.block_count, 1, "the checksum entry stores no blocks");
    }

    #[test]
    fn unknown_versions_and_bad_seals_are_told_apart() {
        let mut e = Seal {
            extents: 1,
            sha256: [0; 32],
        }
        .to_extent(Uuid::nil());
        e.blockinfo[0].reserved = 1;
        assert_eq!(Seal::from_extent(&e), SealKind::UnknownVersion(1));
        e.blockinfo[0].reserved = SEAL_VERSION;
        e.blockinfo[7].dev_id = 1;
        assert_eq!(Seal::from_extent(&e), SealKind::Malformed);
        let mut e = ExtentHeader::new(Uuid::nil(), [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT]);
        e.blockinfo[CHECKSUM_SLOT].mask = BlockMask::from_bits_retain(CHECKSUM_TAG);
        e.blockinfo[CHECKSUM_SLOT].reserved = 9;
        assert_eq!(e.data_checksum(), DataChecksum::UnknownVersion(9));
    }

    /// The seal hashes the archive header and the extent headers, in order, and nothing
    /// else: the same bytes give the same seal however they are fed.
    #[test]
    fn seal_hasher_hashes_headers_in_order() {
        let header = b"archive header";
        let (a, b) = ([1u8; VMA_EXTENT_HEADER_SIZE], [2u8; VMA_EXTENT_HEADER_SIZE]);
        let mut h = SealHasher::new(header);
        h.extent(&a);
        h.extent(&b);
        let seal = h.seal();
        assert_eq!(seal.extents, 2);
        let mut all = header.to_vec();
        all.extend_from_slice(&a);
        all.extend_from_slice(&b);
        assert_eq!(seal.sha256, <[u8; 32]>::from(Sha256::digest(&all)));
        let mut swapped = SealHasher::new(header);
        swapped.extent(&b);
        swapped.extent(&a);
        assert_ne!(swapped.seal(), seal, "order matters");
    }

    #[test]
    fn crc32c_is_castagnoli() {
        assert_eq!(data_crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            data_crc32c_append(data_crc32c(b"1234"), b"56789"),
            0xe306_9283
        );
    }
}
