//! The archive grammar, once for every reader: after the header come data extents, then
//! optionally the extent index's extents, then optionally a seal, then nothing. The [`Walker`] is told what the reader found at the
//! current archive offset and says what it is, keeping every per-archive count and check
//! (the slots through [`Validator`], extent counts, CRC32C damage, the seal hash) and the
//! checks at the end (every cluster present, nothing after a seal).
//!
//! It does no I/O: the streaming reader feeds it from a `Read`, the seekable one from
//! positional reads, and a reader of any other source can do the same. A reader calls,
//! for each position:
//!
//! 1. [`more`](Walker::more) with how many bytes its input holds there (at least a
//!    header's worth, or all it has): `false` means the archive ended, complete;
//! 2. [`extent`](Walker::extent) with the header decoded from the first 512 bytes:
//!    [`Step::Seal`] (read on at the new position) or [`Step::Data`];
//! 3. for data, [`data`](Walker::data) with the bytes available and (optionally) the
//!    data to check, before it uses the extent.

use std::ops::Range;

use vma_format::extent_index::{Decoder, IndexExtent, IndexKind};
use vma_format::integrity::{self, DataChecksum, Seal, SealHasher, SealKind};
use vma_format::{
    ArchiveHeader, DeviceId, ExtentHeader, FormatError, Uuid, VMA_EXTENT_HEADER_SIZE,
};

use crate::error::{Error, Result};
use crate::integrity::{
    check_seal, describe_clusters, ClusterAddress, DamagedExtent, ExtentChecksum,
    ExtentIndexStatus, IntegrityReport, SealStatus,
};
use crate::options::OnDamage;
use crate::validate::{CheckedSlot, Validator};
use crate::verify::{DeviceReport, VerifyReport};

/// What came at a position of the archive.
#[allow(clippy::large_enum_variant)] // reason: boxing would allocate once per extent
pub(crate) enum Step {
    /// A seal (or one of an unknown version), 512 bytes: read on at the new position.
    Seal,
    /// A data extent, header checked; its slots and data are checked by
    /// [`Walker::data`].
    Data(ExtentHeader),
}

/// How [`Walker::data`] treats an extent's CRC32C.
pub(crate) enum DataCheck<'d> {
    /// Check it against these data bytes.
    Verify(&'d [u8]),
    /// Do not check it ([`ExtentChecksum::NotChecked`], not counted as checked).
    Skip,
    /// Headers only: count extents carrying one as checksummed, check nothing.
    Count,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reading,
    Sealed,
    Done,
}

/// The grammar and the per-archive state of one reading of an archive.
pub(crate) struct Walker {
    uuid: Uuid,
    validator: Validator,
    integrity: IntegrityReport,
    seal: Option<SealHasher>,
    on_damage: OnDamage,
    pos: u64,
    state: State,
    /// Extents before the seal (data and index extents): what the seal counts.
    extents: u64,
    index: IndexCheck,
}

/// The check of the extent index against the data extent headers, in constant memory:
/// the SHA-256 of the headers read against the SHA-256 of the copies the index holds.
struct IndexCheck {
    /// Archive offset of the first index extent, once one came.
    offset: Option<u64>,
    /// A known-version index extent came: data extents may no longer follow.
    started: bool,
    decoder: Decoder,
    /// SHA-256 of the data extent headers read (a [`SealHasher`] over no archive header).
    real: SealHasher,
    /// SHA-256 of the copies.
    copies: SealHasher,
    /// The first thing found wrong.
    failure: Option<String>,
    /// The status was settled.
    done: bool,
    /// The archive is opened through the index: the data extents fed are its copies, so
    /// there is nothing to compare (see [`Walker::opening_through_index`]).
    opening: bool,
    /// Index extents fed while opening through the index.
    opened: u64,
}

impl Default for IndexCheck {
    fn default() -> Self {
        IndexCheck {
            offset: None,
            started: false,
            decoder: Decoder::new(),
            real: SealHasher::new(&[]),
            copies: SealHasher::new(&[]),
            failure: None,
            done: false,
            opening: false,
            opened: 0,
        }
    }
}

impl Walker {
    /// A walk over the extents after `header`, whose encoded bytes are `header_bytes`;
    /// `verify_seal`: hash the headers to check a seal against.
    pub(crate) fn new(
        header: &ArchiveHeader,
        header_bytes: &[u8],
        verify_seal: bool,
        on_damage: OnDamage,
    ) -> Walker {
        Walker {
            uuid: header.uuid,
            validator: Validator::new(header),
            integrity: IntegrityReport::default(),
            seal: verify_seal.then(|| SealHasher::new(header_bytes)),
            on_damage,
            pos: header_bytes.len() as u64,
            state: State::Reading,
            extents: 0,
            index: IndexCheck::default(),
        }
    }

    /// Archive offset of what comes next (the bytes walked so far).
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    pub(crate) fn set_on_damage(&mut self, on_damage: OnDamage) {
        self.on_damage = on_damage;
    }

    /// Whether the archive ended here, complete.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The input holds `available` bytes at [`position`](Self::position) (0: it ended
    /// there; a reader may stop counting at a header's worth). `Ok(false)`: the archive
    /// ended complete; `Ok(true)`: an extent header is there, for
    /// [`extent`](Self::extent).
    pub(crate) fn more(&mut self, available: u64) -> Result<bool> {
        let offset = self.pos;
        if available == 0 {
            if self.state != State::Sealed {
                // Sealed: checked at the seal already.
                self.finish_index()?;
                self.validator.finish(offset)?;
            }
            self.state = State::Done;
            return Ok(false);
        }
        if self.state == State::Sealed {
            return Err(Error::DataAfterSeal { offset });
        }
        if available < VMA_EXTENT_HEADER_SIZE as u64 {
            return Err(Error::TruncatedExtent {
                offset,
                got: available,
                needed: VMA_EXTENT_HEADER_SIZE as u64,
            });
        }
        Ok(true)
    }

    /// The extent header at [`position`](Self::position), as decoded.
    pub(crate) fn extent(
        &mut self,
        decoded: std::result::Result<ExtentHeader, FormatError>,
    ) -> Result<Step> {
        let offset = self.pos;
        let extent = decoded.map_err(|source| Error::Extent { offset, source })?;
        if extent.uuid != self.uuid {
            return Err(Error::ExtentUuid {
                offset,
                expected: self.uuid,
                found: extent.uuid,
            });
        }
        match Seal::from_extent(&extent) {
            SealKind::NotASeal => Ok(Step::Data(extent)),
            SealKind::Seal(seal) => {
                self.finish_index()?;
                let status = check_seal(offset, &seal, self.extents, self.seal.as_ref());
                if let (SealStatus::Mismatch { reason, .. }, OnDamage::Fail) =
                    (&status, self.on_damage)
                {
                    return Err(Error::SealMismatch {
                        offset,
                        reason: reason.clone(),
                    });
                }
                self.integrity.seal = status;
                // A complete archive has every cluster before its seal.
                self.validator.finish(offset)?;
                self.pos += VMA_EXTENT_HEADER_SIZE as u64;
                self.state = State::Sealed;
                Ok(Step::Seal)
            }
            SealKind::UnknownVersion(v) => {
                // A seal this crate cannot read: reported, skipped like an empty extent.
                self.integrity.seal = SealStatus::UnknownVersion(v);
                self.pos += VMA_EXTENT_HEADER_SIZE as u64;
                Ok(Step::Seal)
            }
            SealKind::Malformed => Err(Error::MalformedSeal { offset }),
        }
    }

    /// The data extent [`extent`](Self::extent) returned, with `available` bytes of input
    /// from its start (at least its length, or all there are) and its raw 512 header
    /// bytes (hashed for the seal): checks the length, then each slot (handed to `each`
    /// with its range in the data), then the CRC32C as `check` says. Returns the extent's
    /// index and what its checksum said; the position moves past it.
    pub(crate) fn data(
        &mut self,
        extent: &ExtentHeader,
        available: u64,
        raw_header: &[u8],
        check: DataCheck<'_>,
        each: impl FnMut(&CheckedSlot, Range<usize>),
    ) -> Result<(u64, ExtentChecksum)> {
        let offset = self.pos;
        let len = extent.extent_len() as u64;
        if available < len {
            return Err(Error::TruncatedExtent {
                offset,
                got: available,
                needed: len,
            });
        }
        if IndexExtent::is_tagged(extent) {
            return self.index_extent(offset, extent, raw_header);
        }
        if self.index.started {
            return Err(Error::DataAfterIndex { offset });
        }
        self.validator.check_extent(offset, extent, each)?;
        let index = self.extents;
        let checksum = self.checksum(offset, index, extent, check)?;
        if let Some(seal) = &mut self.seal {
            seal.extent(raw_header);
        }
        if !self.index.opening {
            self.index.real.extent(raw_header);
        }
        self.integrity.total_extents += 1;
        self.extents += 1;
        self.pos += len;
        Ok((index, checksum))
    }

    /// An extent of the extent index (empty, like the seal): hashed for the seal, counted
    /// among the extents before it, its copies compared with the headers read.
    fn index_extent(
        &mut self,
        offset: u64,
        extent: &ExtentHeader,
        raw_header: &[u8],
    ) -> Result<(u64, ExtentChecksum)> {
        let ix = &mut self.index;
        ix.offset.get_or_insert(offset);
        match IndexExtent::from_extent(extent) {
            IndexKind::Index(x) => {
                ix.started = true;
                if ix.opening {
                    // Decoded by the opener already.
                    ix.opened += 1;
                } else if ix.failure.is_none() {
                    let copies = &mut ix.copies;
                    if let Err(e) = ix.decoder.push(&x, |h| copies.extent(h)) {
                        ix.failure = Some(e.to_string());
                    }
                }
            }
            IndexKind::UnknownVersion(v) => {
                // Reported, skipped like an empty extent.
                self.integrity.extent_index = ExtentIndexStatus::UnknownVersion(v);
                ix.done = true;
            }
            IndexKind::Malformed => return Err(Error::MalformedIndex { offset }),
            IndexKind::NotIndex => unreachable!("tagged"),
        }
        if let Some(seal) = &mut self.seal {
            seal.extent(raw_header);
        }
        let index = self.extents;
        self.extents += 1;
        self.pos += VMA_EXTENT_HEADER_SIZE as u64;
        Ok((index, ExtentChecksum::Absent))
    }

    /// At the seal or the end: settles the extent index's status (an error for a mismatch
    /// when stopping at damage).
    fn finish_index(&mut self) -> Result<()> {
        let ix = &mut self.index;
        let Some(offset) = ix.offset else {
            return Ok(());
        };
        if std::mem::replace(&mut ix.done, true) {
            return Ok(());
        }
        if ix.opening {
            self.integrity.extent_index = ExtentIndexStatus::Opened { extents: ix.opened };
            return Ok(());
        }
        let data = self.integrity.total_extents;
        let failure = ix.failure.take().or_else(|| match ix.decoder.finish() {
            Err(e) => Some(e.to_string()),
            Ok(count) if count != data => Some(format!(
                "it copies {count} data extent headers, the archive has {data}"
            )),
            Ok(_) if ix.real.seal() != ix.copies.seal() => {
                Some("its copies differ from the data extent headers".into())
            }
            Ok(_) => None,
        });
        self.integrity.extent_index = match failure {
            None => ExtentIndexStatus::Consistent {
                extents: ix.decoder.extents(),
            },
            Some(reason) if self.on_damage == OnDamage::Fail => {
                return Err(Error::ExtentIndexMismatch { offset, reason });
            }
            Some(reason) => ExtentIndexStatus::Mismatch { offset, reason },
        };
        Ok(())
    }

    /// Opening through the index: the next extent is this index extent, which the opener
    /// decoded and checked already (MD5, uuid, layout, its place in the index): hashed
    /// for the seal and counted, without decoding it again.
    pub(crate) fn checked_index_extent(&mut self, raw_header: &[u8]) -> Result<()> {
        debug_assert!(self.index.opening);
        if self.state == State::Sealed {
            return Err(Error::DataAfterSeal { offset: self.pos });
        }
        self.index.offset.get_or_insert(self.pos);
        self.index.started = true;
        self.index.opened += 1;
        if let Some(seal) = &mut self.seal {
            seal.extent(raw_header);
        }
        self.extents += 1;
        self.pos += VMA_EXTENT_HEADER_SIZE as u64;
        Ok(())
    }

    /// The data extents to come are the extent index's copies, then come its own
    /// extents and the seal: every check runs as usual but the comparison of the copies
    /// with the headers, which are not read ([`ExtentIndexStatus::Opened`]).
    pub(crate) fn opening_through_index(&mut self) {
        self.index.opening = true;
    }

    fn checksum(
        &mut self,
        offset: u64,
        index: u64,
        extent: &ExtentHeader,
        check: DataCheck<'_>,
    ) -> Result<ExtentChecksum> {
        let data = match (extent.data_checksum(), check) {
            (DataChecksum::Absent, _) => return Ok(ExtentChecksum::Absent),
            (DataChecksum::UnknownVersion(v), _) => {
                self.integrity.unverifiable_extents += 1;
                return Ok(ExtentChecksum::UnknownVersion(v));
            }
            (DataChecksum::Crc32c(_), DataCheck::Skip) => return Ok(ExtentChecksum::NotChecked),
            (DataChecksum::Crc32c(_), DataCheck::Count) => {
                self.integrity.checksummed_extents += 1;
                return Ok(ExtentChecksum::NotChecked);
            }
            (DataChecksum::Crc32c(stored), DataCheck::Verify(data)) => (stored, data),
        };
        let (stored, data) = data;
        self.integrity.checksummed_extents += 1;
        let computed = integrity::data_crc32c(data);
        if computed == stored {
            return Ok(ExtentChecksum::Verified);
        }
        let clusters: Vec<ClusterAddress> = extent
            .clusters()
            .map(|s| ClusterAddress {
                device: s.device,
                cluster: s.cluster,
            })
            .collect();
        if self.on_damage == OnDamage::Fail {
            return Err(Error::DataChecksum {
                index,
                offset,
                stored,
                computed,
                clusters: describe_clusters(&clusters, |id| self.device_name(id)),
            });
        }
        self.integrity.damaged.push(DamagedExtent {
            index,
            offset,
            stored,
            computed,
            clusters,
        });
        Ok(ExtentChecksum::Mismatch { stored, computed })
    }

    fn device_name(&self, id: DeviceId) -> String {
        self.validator
            .device(id)
            .map_or_else(|| format!("device {id}"), |d| d.name.clone())
    }

    /// What the integrity extension said so far.
    pub(crate) fn integrity(&self) -> &IntegrityReport {
        &self.integrity
    }

    /// Gives up the integrity report.
    pub(crate) fn into_integrity(self) -> IntegrityReport {
        self.integrity
    }

    /// Clusters and the device bytes they cover, over all devices, so far.
    pub(crate) fn clusters_read(&self) -> (u64, u64) {
        self.validator.devices().fold((0, 0), |(c, b), d| {
            (c + d.stats.clusters, b + d.stats.span_bytes)
        })
    }

    /// Bytes of memory the walk holds, roughly (the sets of clusters seen).
    pub(crate) fn memory(&self) -> usize {
        self.validator.memory()
    }

    /// Figures per device and integrity so far (complete once done).
    pub(crate) fn report(&self) -> VerifyReport {
        VerifyReport {
            devices: self
                .validator
                .devices()
                .map(|d| DeviceReport {
                    id: d.id,
                    name: d.name.clone(),
                    size: d.size,
                    clusters: d.stats.clusters,
                    stored_bytes: d.stats.stored_bytes,
                    zero_clusters: d.stats.zero_clusters,
                    zero_bytes: d.size.saturating_sub(d.stats.stored_bytes),
                    sparse_bytes: d.stats.sparse_bytes,
                    partial_sparse_bytes: d.stats.partial_sparse_bytes,
                })
                .collect(),
            integrity: self.integrity.clone(),
            archive_bytes: self.pos,
            complete: self.is_done(),
        }
    }
}
