//! vma-rs's extent index: copies of every data extent's header, written after the last
//! data extent and before the seal, so that a reader with random access learns where every
//! cluster is from the end of the file in a constant number of reads instead of one read
//! per extent.
//!
//! Layout (see `spec/FORMAT.md`, "Extent index"): `T` *index extents*, each an empty
//! extent (block_count 0, every slot dev_id 0, the archive's uuid, a valid MD5) like the
//! seal, so that every VMA reader skips them.
//! - Slot 0: mask = [`INDEX_TAG`] (`"IX"`), reserved = [`INDEX_VERSION`], cluster = `T`,
//!   the same in every index extent.
//! - Slots 1..=57: 7 payload bytes each (mask big-endian, reserved, cluster big-endian, as
//!   the seal packs its payload), [`PAYLOAD_PER_EXTENT`] = 399 bytes per extent.
//! - Slot 58 (where vma-rs's data checksum goes): all zero, so that no reader takes
//!   payload bytes there for a checksum entry.
//!
//! The payload, concatenated over the index extents in order and zero padded at the end,
//! is the number `N` of data extents (u64 big-endian) then their `N` 512-byte headers,
//! verbatim, in archive order. `T` is the fewest extents that hold it.
//!
//! Everything here is pure: [`encode`] makes the index extents, [`IndexExtent::from_extent`]
//! recognises one, [`Decoder`] (or [`decode`]) checks and unpacks them.

use std::fmt;

use byteorder::{BigEndian, ByteOrder};
use uuid::Uuid;

use crate::consts::{VMA_BLOCKS_PER_EXTENT, VMA_EXTENT_HEADER_SIZE};
use crate::extent::{BlockInfo, BlockMask, ExtentHeader};
use crate::integrity::{pack_payload, unpack_payload, PAYLOAD_BYTES_PER_SLOT};

/// Mask bits of slot 0 that mark an index extent (`"IX"`).
pub const INDEX_TAG: u16 = 0x4958;
/// The extent index version this crate writes and understands.
pub const INDEX_VERSION: u8 = 1;
/// Payload slots per index extent: 1..=57 (slot 58, the data checksum's, stays empty).
const PAYLOAD_SLOTS: usize = VMA_BLOCKS_PER_EXTENT - 2;
/// The slot left all zero.
const CHECKSUM_SLOT: usize = VMA_BLOCKS_PER_EXTENT - 1;
/// Payload bytes per index extent.
pub const PAYLOAD_PER_EXTENT: usize = PAYLOAD_SLOTS * PAYLOAD_BYTES_PER_SLOT;
/// Bytes of the payload before the headers: the count `N`.
const COUNT_LEN: usize = 8;

/// A header copy: the 512 bytes of a data extent's header, as stored.
pub type HeaderBytes = [u8; VMA_EXTENT_HEADER_SIZE];

/// Index extents needed for `headers` data extent headers.
pub fn extents_for(headers: u64) -> u64 {
    (COUNT_LEN as u64 + headers * VMA_EXTENT_HEADER_SIZE as u64).div_ceil(PAYLOAD_PER_EXTENT as u64)
}

/// What is wrong with an extent index. `extent` counts index extents from 0, the first
/// one after the last data extent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtentIndexError {
    /// An index extent says the index has a different number of extents than the first.
    TotalDiffers {
        /// The index extent.
        extent: u64,
        /// The total the first index extent gives.
        first: u32,
        /// The total this one gives.
        found: u32,
    },
    /// More index extents than their total says.
    TooManyExtents {
        /// The total.
        total: u32,
    },
    /// Fewer index extents than their total says.
    Truncated {
        /// Index extents found.
        found: u64,
        /// The total they give.
        total: u32,
    },
    /// The count of data extents does not give the number of index extents there are.
    CountMismatch {
        /// Data extents the payload says it copies.
        count: u64,
        /// Index extents there are.
        total: u32,
        /// Index extents `count` headers need.
        needed: u64,
    },
    /// A non-zero byte in the padding after the last header.
    NonZeroPadding {
        /// The index extent.
        extent: u64,
        /// Byte offset of the byte in the payload (all extents' payloads concatenated).
        payload_offset: u64,
    },
    /// Too many headers for the slot-0 total (a u32).
    TooLarge {
        /// Headers given.
        headers: u64,
    },
}

impl fmt::Display for ExtentIndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtentIndexError::TotalDiffers {
                extent,
                first,
                found,
            } => write!(
                f,
                "extent index: index extent {extent} says the index has {found} extents, \
                 the first says {first}"
            ),
            ExtentIndexError::TooManyExtents { total } => write!(
                f,
                "extent index: more index extents than the {total} they say there are"
            ),
            ExtentIndexError::Truncated { found, total } => write!(
                f,
                "extent index: {found} of its {total} index extents are there"
            ),
            ExtentIndexError::CountMismatch {
                count,
                total,
                needed,
            } => write!(
                f,
                "extent index: it copies {count} headers, which need {needed} index extents, \
                 not {total}"
            ),
            ExtentIndexError::NonZeroPadding {
                extent,
                payload_offset,
            } => write!(
                f,
                "extent index: non-zero padding in index extent {extent} (payload byte \
                 {payload_offset})"
            ),
            ExtentIndexError::TooLarge { headers } => {
                write!(f, "extent index: {headers} headers are too many to index")
            }
        }
    }
}

impl std::error::Error for ExtentIndexError {}

/// One index extent's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexExtent {
    /// The number of index extents in the index (`T`).
    pub total: u32,
    /// Its [`PAYLOAD_PER_EXTENT`] payload bytes.
    pub payload: [u8; PAYLOAD_PER_EXTENT],
}

/// What an extent is, as far as the extent index goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexKind {
    /// Not an index extent.
    NotIndex,
    /// An index extent of [`INDEX_VERSION`].
    Index(Box<IndexExtent>),
    /// An index extent of a version this crate does not know.
    UnknownVersion(u8),
    /// Tagged as an index extent but not laid out as one (data, a used slot).
    Malformed,
}

impl IndexExtent {
    /// Whether slot 0 carries the index tag (a cheap test before
    /// [`from_extent`](Self::from_extent)).
    pub fn is_tagged(extent: &ExtentHeader) -> bool {
        let first = extent.blockinfo[0];
        first.dev_id == 0 && first.mask.bits() == INDEX_TAG
    }

    /// Classifies an extent header (already decoded and checked).
    pub fn from_extent(extent: &ExtentHeader) -> IndexKind {
        if !Self::is_tagged(extent) {
            return IndexKind::NotIndex;
        }
        if extent.block_count != 0
            || extent.blockinfo.iter().any(|s| s.dev_id != 0)
            || extent.blockinfo[CHECKSUM_SLOT] != BlockInfo::EMPTY
        {
            return IndexKind::Malformed;
        }
        let first = extent.blockinfo[0];
        if first.reserved != INDEX_VERSION {
            return IndexKind::UnknownVersion(first.reserved);
        }
        let mut payload = [0u8; PAYLOAD_PER_EXTENT];
        unpack_payload(&extent.blockinfo[1..CHECKSUM_SLOT], &mut payload);
        IndexKind::Index(Box::new(IndexExtent {
            total: first.cluster,
            payload,
        }))
    }

    /// The index extent header for an archive with this uuid.
    pub fn to_extent(&self, uuid: Uuid) -> ExtentHeader {
        let mut slots = [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT];
        slots[0] = BlockInfo {
            mask: BlockMask::from_bits_retain(INDEX_TAG),
            reserved: INDEX_VERSION,
            dev_id: 0,
            cluster: self.total,
        };
        pack_payload(&self.payload, &mut slots[1..CHECKSUM_SLOT]);
        ExtentHeader::new(uuid, slots)
    }
}

/// The index extents (encoded, 512 bytes each, in order) for the data extent `headers`
/// of an archive with this uuid.
///
/// ```
/// use vma_format::extent_index::{decode, encode, IndexExtent, IndexKind};
/// use vma_format::{ExtentHeader, Uuid};
/// let headers = vec![[7u8; 512]; 3];
/// let extents = encode(Uuid::nil(), &headers).unwrap();
/// assert_eq!(extents.len(), 4); // 8 + 3 * 512 bytes at 399 per extent
/// let parsed: Vec<IndexExtent> = extents
///     .iter()
///     .map(|b| match IndexExtent::from_extent(&ExtentHeader::decode(b).unwrap()) {
///         IndexKind::Index(x) => *x,
///         other => panic!("{other:?}"),
///     })
///     .collect();
/// assert_eq!(decode(&parsed).unwrap(), headers);
/// ```
pub fn encode(uuid: Uuid, headers: &[HeaderBytes]) -> Result<Vec<HeaderBytes>, ExtentIndexError> {
    let n = headers.len() as u64;
    let total =
        u32::try_from(extents_for(n)).map_err(|_| ExtentIndexError::TooLarge { headers: n })?;
    let mut out = Vec::with_capacity(total as usize);
    let mut current = IndexExtent {
        total,
        payload: [0u8; PAYLOAD_PER_EXTENT],
    };
    let mut fill = 0usize;
    let mut count = [0u8; COUNT_LEN];
    BigEndian::write_u64(&mut count, n);
    let chunks = std::iter::once(&count[..]).chain(headers.iter().map(|h| &h[..]));
    for mut bytes in chunks {
        while !bytes.is_empty() {
            let take = bytes.len().min(PAYLOAD_PER_EXTENT - fill);
            current.payload[fill..fill + take].copy_from_slice(&bytes[..take]);
            fill += take;
            bytes = &bytes[take..];
            if fill == PAYLOAD_PER_EXTENT {
                out.push(current.to_extent(uuid).encode());
                current.payload = [0u8; PAYLOAD_PER_EXTENT];
                fill = 0;
            }
        }
    }
    if fill > 0 {
        out.push(current.to_extent(uuid).encode());
    }
    debug_assert_eq!(out.len(), total as usize);
    Ok(out)
}

/// Checks and unpacks index extents one at a time, handing out each header copy as soon
/// as it is complete: memory stays at one header whatever the index's size.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    /// The total the first index extent gives.
    total: Option<u32>,
    /// Index extents pushed.
    seen: u64,
    /// Payload bytes consumed.
    consumed: u64,
    /// The data extent count, once its 8 bytes are in.
    count: Option<u64>,
    /// Headers handed out.
    emitted: u64,
    /// The partial count or header.
    partial: Vec<u8>,
}

impl Decoder {
    /// A decoder before the first index extent.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Index extents pushed so far.
    pub fn extents(&self) -> u64 {
        self.seen
    }

    /// The total the first index extent gives, once one was pushed.
    pub fn total(&self) -> Option<u32> {
        self.total
    }

    /// The number of data extents the index copies, once known (after the first push).
    pub fn count(&self) -> Option<u64> {
        self.count
    }

    /// The next index extent: checks its total against the first one's and the count
    /// against the total, and calls `each` with every header copy completed by it.
    pub fn push(
        &mut self,
        extent: &IndexExtent,
        mut each: impl FnMut(&HeaderBytes),
    ) -> Result<(), ExtentIndexError> {
        let index = self.seen;
        let total = *self.total.get_or_insert(extent.total);
        if extent.total != total {
            return Err(ExtentIndexError::TotalDiffers {
                extent: index,
                first: total,
                found: extent.total,
            });
        }
        if index >= u64::from(total) {
            return Err(ExtentIndexError::TooManyExtents { total });
        }
        self.seen += 1;
        let mut bytes = &extent.payload[..];
        while !bytes.is_empty() {
            match self.count {
                None => {
                    let take = (COUNT_LEN - self.partial.len()).min(bytes.len());
                    self.partial.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    self.consumed += take as u64;
                    if self.partial.len() == COUNT_LEN {
                        let count = BigEndian::read_u64(&self.partial);
                        self.partial.clear();
                        let needed = (COUNT_LEN as u64)
                            .saturating_add(count.saturating_mul(VMA_EXTENT_HEADER_SIZE as u64))
                            .div_ceil(PAYLOAD_PER_EXTENT as u64);
                        if needed != u64::from(total) {
                            return Err(ExtentIndexError::CountMismatch {
                                count,
                                total,
                                needed,
                            });
                        }
                        self.count = Some(count);
                    }
                }
                Some(count) if self.emitted < count => {
                    let take = (VMA_EXTENT_HEADER_SIZE - self.partial.len()).min(bytes.len());
                    self.partial.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    self.consumed += take as u64;
                    if self.partial.len() == VMA_EXTENT_HEADER_SIZE {
                        let header: &HeaderBytes = self.partial[..].try_into().unwrap();
                        each(header);
                        self.partial.clear();
                        self.emitted += 1;
                    }
                }
                Some(_) => {
                    if let Some(at) = bytes.iter().position(|&b| b != 0) {
                        return Err(ExtentIndexError::NonZeroPadding {
                            extent: index,
                            payload_offset: self.consumed + at as u64,
                        });
                    }
                    self.consumed += bytes.len() as u64;
                    bytes = &[];
                }
            }
        }
        Ok(())
    }

    /// Checks that every index extent was pushed; returns the number of headers.
    pub fn finish(&self) -> Result<u64, ExtentIndexError> {
        match (self.total, self.count) {
            (Some(total), Some(count)) if self.seen == u64::from(total) => Ok(count),
            (total, _) => Err(ExtentIndexError::Truncated {
                found: self.seen,
                total: total.unwrap_or(0),
            }),
        }
    }
}

/// Checks and unpacks a whole index: the header copies, in archive order.
pub fn decode(extents: &[IndexExtent]) -> Result<Vec<HeaderBytes>, ExtentIndexError> {
    let mut decoder = Decoder::new();
    let mut out = Vec::new();
    for extent in extents {
        decoder.push(extent, |h| out.push(*h))?;
    }
    decoder.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(bytes: &[HeaderBytes]) -> Vec<IndexExtent> {
        bytes
            .iter()
            .map(|b| {
                let e = ExtentHeader::decode(b).expect("a valid extent");
                assert_eq!(e.block_count, 0);
                assert!(e.clusters().next().is_none(), "no slot a reader would use");
                match IndexExtent::from_extent(&e) {
                    IndexKind::Index(x) => *x,
                    other => panic!("{other:?}"),
                }
            })
            .collect()
    }

    #[test]
    fn empty_index_is_one_extent() {
        let bytes = encode(Uuid::nil(), &[]).unwrap();
        assert_eq!(bytes.len(), 1);
        assert_eq!(decode(&parse(&bytes)).unwrap(), Vec::<HeaderBytes>::new());
    }

    #[test]
    fn slot_zero_says_tag_version_and_total() {
        let bytes = encode(Uuid::from_u128(5), &[[1u8; 512]; 2]).unwrap();
        assert_eq!(bytes.len(), 3);
        let e = ExtentHeader::decode(&bytes[1]).unwrap();
        assert_eq!(e.uuid, Uuid::from_u128(5));
        let slot0 = e.blockinfo[0].to_u64().to_be_bytes();
        assert_eq!(slot0, [0x49, 0x58, 1, 0, 0, 0, 0, 3]);
        // The first payload slot of the first extent: the count 2, big-endian.
        let e = ExtentHeader::decode(&bytes[0]).unwrap();
        let slot1 = e.blockinfo[1].to_u64().to_be_bytes();
        assert_eq!(slot1, [0, 0, 0, 0, 0, 0, 0, 0]);
        let slot2 = e.blockinfo[2].to_u64().to_be_bytes();
        assert_eq!(slot2, [2, 1, 1, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn lies_are_typed_errors() {
        let headers = vec![[9u8; 512]; 5];
        let good = parse(&encode(Uuid::nil(), &headers).unwrap());
        assert_eq!(good.len(), 7);

        let mut x = good.clone();
        x[3].total = 8;
        assert_eq!(
            decode(&x),
            Err(ExtentIndexError::TotalDiffers {
                extent: 3,
                first: 7,
                found: 8
            })
        );

        assert_eq!(
            decode(&good[..6]),
            Err(ExtentIndexError::Truncated { found: 6, total: 7 })
        );
        let mut more = good.clone();
        more.push(good[6].clone());
        assert_eq!(
            decode(&more),
            Err(ExtentIndexError::TooManyExtents { total: 7 })
        );

        let mut x = good.clone();
        x[0].payload[7] = 6;
        assert!(matches!(
            decode(&x),
            Err(ExtentIndexError::CountMismatch {
                count: 6,
                total: 7,
                ..
            })
        ));

        let mut x = good.clone();
        *x[6].payload.last_mut().unwrap() = 1;
        assert_eq!(
            decode(&x),
            Err(ExtentIndexError::NonZeroPadding {
                extent: 6,
                payload_offset: 7 * PAYLOAD_PER_EXTENT as u64 - 1
            })
        );
        assert_eq!(
            decode(&[]),
            Err(ExtentIndexError::Truncated { found: 0, total: 0 })
        );
    }

    #[test]
    fn tagged_but_wrong_is_told_apart() {
        let bytes = encode(Uuid::nil(), &[]).unwrap();
        let mut e = ExtentHeader::decode(&bytes[0]).unwrap();
        e.blockinfo[0].reserved = 2;
        assert_eq!(IndexExtent::from_extent(&e), IndexKind::UnknownVersion(2));
        e.blockinfo[0].reserved = INDEX_VERSION;
        e.blockinfo[9].dev_id = 1;
        assert_eq!(IndexExtent::from_extent(&e), IndexKind::Malformed);
        let plain = ExtentHeader::new(Uuid::nil(), [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT]);
        assert_eq!(IndexExtent::from_extent(&plain), IndexKind::NotIndex);
    }

    proptest! {
        #[test]
        fn round_trips(
            headers in proptest::collection::vec(proptest::array::uniform32(any::<u8>()), 0..40),
            uuid in any::<u128>(),
        ) {
            // 512-byte headers from 32 random bytes each, repeated with a twist.
            let headers: Vec<HeaderBytes> = headers
                .iter()
                .map(|seed| std::array::from_fn(|i| seed[i % 32].wrapping_add((i / 32) as u8)))
                .collect();
            let bytes = encode(Uuid::from_u128(uuid), &headers).unwrap();
            prop_assert_eq!(bytes.len() as u64, extents_for(headers.len() as u64));
            let parsed = parse(&bytes);
            prop_assert_eq!(decode(&parsed).unwrap(), headers.clone());
            // Streaming gives the same headers at once, extent by extent.
            let mut d = Decoder::new();
            let mut streamed = Vec::new();
            for x in &parsed {
                d.push(x, |h| streamed.push(*h)).unwrap();
            }
            prop_assert_eq!(d.finish().unwrap(), headers.len() as u64);
            prop_assert_eq!(streamed, headers);
        }
    }
}
