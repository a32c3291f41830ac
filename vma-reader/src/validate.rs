//! The checks every extent goes through, whichever reader read it: slots name declared
//! devices, clusters lie within them, each cluster appears once, vmstate runs in order,
//! and at the end nothing is missing.

use std::collections::BTreeMap;

use vma_format::{cluster, ArchiveHeader, BlockMask, DeviceId, ExtentHeader, VMA_MAX_DEVICES};

use crate::error::{Error, Result};

/// Clusters per chunk of a [`ClusterSet`]: 512 bits, 64 bytes.
const SET_CHUNK: u32 = 512;
const SET_WORDS: usize = (SET_CHUNK / 64) as usize;

/// The clusters of one device seen so far: one bit per cluster, in 64-byte chunks that
/// exist only once a cluster in them was seen, so that memory follows the clusters in
/// the archive, not the device sizes its header declares.
///
/// The chunk being filled is kept out of the map: archives store clusters mostly in
/// order, so most lookups never touch the map.
#[derive(Debug, Default)]
pub(crate) struct ClusterSet {
    chunks: BTreeMap<u32, [u64; SET_WORDS]>,
    current: Option<(u32, [u64; SET_WORDS])>,
}

impl ClusterSet {
    /// Adds a cluster; `false` if it was there already.
    pub(crate) fn insert(&mut self, cluster: u32) -> bool {
        let key = cluster / SET_CHUNK;
        let bit = cluster % SET_CHUNK;
        if self.current.map(|(k, _)| k) != Some(key) {
            self.flush();
            let words = self.chunks.remove(&key).unwrap_or([0; SET_WORDS]);
            self.current = Some((key, words));
        }
        let (_, words) = self.current.as_mut().expect("just set");
        let word = &mut words[(bit / 64) as usize];
        let m = 1u64 << (bit % 64);
        let new = *word & m == 0;
        *word |= m;
        new
    }

    fn flush(&mut self) {
        if let Some((key, words)) = self.current.take() {
            self.chunks.insert(key, words);
        }
    }

    /// The first cluster in `0..count` not in the set.
    pub(crate) fn first_missing(&mut self, count: u64) -> Option<u64> {
        self.flush();
        let mut next = 0u64;
        for (&key, words) in &self.chunks {
            let base = key as u64 * SET_CHUNK as u64;
            if base > next || next >= count {
                break;
            }
            for (w, &word) in words.iter().enumerate() {
                if word != u64::MAX {
                    next = base + w as u64 * 64 + word.trailing_ones() as u64;
                    return (next < count).then_some(next);
                }
            }
            next = base + SET_CHUNK as u64;
        }
        (next < count).then_some(next)
    }

    /// Bytes of memory held, roughly.
    pub(crate) fn memory(&self) -> usize {
        // A BTreeMap entry costs its key and value plus about a third again in node slack.
        self.chunks.len() * (4 + 8 * SET_WORDS) * 4 / 3
    }
}

/// Per-device figures gathered while reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeviceStats {
    pub(crate) clusters: u64,
    /// Device bytes of the clusters seen.
    pub(crate) span_bytes: u64,
    pub(crate) stored_bytes: u64,
    pub(crate) zero_clusters: u64,
    /// Proxmox's "sparse bytes" ([`cluster::unstored_sector_bytes`]).
    pub(crate) sparse_bytes: u64,
    /// The part of `sparse_bytes` in clusters that store some blocks.
    pub(crate) partial_sparse_bytes: u64,
}

/// What the validator knows of one device.
#[derive(Debug)]
pub(crate) struct DeviceState {
    pub(crate) id: DeviceId,
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) clusters: u64,
    pub(crate) vmstate: bool,
    seen: ClusterSet,
    /// For vmstate: the cluster that must come next.
    next_vmstate: u64,
    pub(crate) stats: DeviceStats,
}

/// A cluster slot that passed every check, with the bytes of it inside the device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckedSlot {
    pub(crate) device: DeviceId,
    pub(crate) cluster: u32,
    pub(crate) mask: BlockMask,
    /// Bytes of the cluster inside the device (65536 except for the last cluster).
    pub(crate) span: usize,
}

/// Validation state over a whole archive.
#[derive(Debug)]
pub(crate) struct Validator {
    /// Indexed by device id; `None` for undeclared ids.
    devices: Vec<Option<DeviceState>>,
    /// The declared ids, in order: what [`devices`](Self::devices) walks (progress asks
    /// after every extent).
    declared: Vec<usize>,
}

impl Validator {
    pub(crate) fn new(header: &ArchiveHeader) -> Validator {
        let mut devices: Vec<Option<DeviceState>> = (0..VMA_MAX_DEVICES).map(|_| None).collect();
        for d in &header.devices {
            devices[d.id.index()] = Some(DeviceState {
                id: d.id,
                name: d.name.clone(),
                size: d.size,
                clusters: d.cluster_count(),
                vmstate: d.is_vmstate(),
                seen: ClusterSet::default(),
                next_vmstate: 0,
                stats: DeviceStats::default(),
            });
        }
        let declared = (0..devices.len())
            .filter(|&i| devices[i].is_some())
            .collect();
        Validator { devices, declared }
    }

    /// Checks every used slot of an extent at archive offset `offset`, records its
    /// clusters as seen, and hands each checked slot to `each` in slot order.
    pub(crate) fn check_extent(
        &mut self,
        offset: u64,
        extent: &ExtentHeader,
        mut each: impl FnMut(&CheckedSlot, std::ops::Range<usize>),
    ) -> Result<()> {
        for slot in extent.clusters() {
            let info = extent.blockinfo[slot.slot];
            if info.reserved != 0 {
                return Err(Error::SlotReserved {
                    offset,
                    slot: slot.slot,
                    value: info.reserved,
                });
            }
            let Some(dev) = self.devices[slot.device.index()].as_mut() else {
                return Err(Error::UnknownDevice {
                    offset,
                    slot: slot.slot,
                    dev_id: slot.device.get(),
                });
            };
            let Some(span) = cluster::cluster_span(slot.cluster, dev.size) else {
                return Err(Error::ClusterPastEnd {
                    offset,
                    device: dev.name.clone(),
                    cluster: slot.cluster,
                    clusters: dev.clusters,
                });
            };
            let allowed = cluster::span_mask(span);
            if !slot.mask.difference(allowed).is_empty() {
                return Err(Error::MaskPastEnd {
                    offset,
                    device: dev.name.clone(),
                    cluster: slot.cluster,
                    mask: slot.mask.bits(),
                    allowed: allowed.bits(),
                });
            }
            if dev.vmstate {
                if slot.cluster as u64 != dev.next_vmstate {
                    return Err(Error::VmstateOrder {
                        offset,
                        expected: dev.next_vmstate,
                        found: slot.cluster,
                    });
                }
                dev.next_vmstate += 1;
            } else if !dev.seen.insert(slot.cluster) {
                return Err(Error::DuplicateCluster {
                    offset,
                    device: dev.name.clone(),
                    cluster: slot.cluster,
                });
            }
            let stats = &mut dev.stats;
            stats.clusters += 1;
            stats.span_bytes += span as u64;
            stats.stored_bytes += cluster::stored_device_bytes(slot.mask, span);
            let sparse = cluster::unstored_sector_bytes(slot.mask, span);
            stats.sparse_bytes += sparse;
            if slot.mask.is_empty() {
                stats.zero_clusters += 1;
            } else {
                stats.partial_sparse_bytes += sparse;
            }
            each(
                &CheckedSlot {
                    device: slot.device,
                    cluster: slot.cluster,
                    mask: slot.mask,
                    span,
                },
                slot.data,
            );
        }
        Ok(())
    }

    /// Fails with the first missing cluster of the first incomplete device (vmstate is
    /// exempt); `end` is the archive offset where the archive ended.
    pub(crate) fn finish(&mut self, end: u64) -> Result<()> {
        for dev in self.devices.iter_mut().flatten() {
            if dev.vmstate {
                continue;
            }
            if let Some(cluster) = dev.seen.first_missing(dev.clusters) {
                return Err(Error::MissingCluster {
                    offset: end,
                    device: dev.name.clone(),
                    cluster,
                });
            }
        }
        Ok(())
    }

    /// The declared devices in id order.
    pub(crate) fn devices(&self) -> impl Iterator<Item = &DeviceState> {
        self.declared
            .iter()
            .filter_map(|&i| self.devices[i].as_ref())
    }

    /// A declared device.
    pub(crate) fn device(&self, id: DeviceId) -> Option<&DeviceState> {
        self.devices[id.index()].as_ref()
    }

    /// Bytes of memory the seen-sets hold, roughly.
    pub(crate) fn memory(&self) -> usize {
        self.devices().map(|d| d.seen.memory()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_set_finds_duplicates_and_gaps() {
        let mut s = ClusterSet::default();
        assert_eq!(s.first_missing(0), None);
        assert_eq!(s.first_missing(3), Some(0));
        for c in 0..1500u32 {
            assert!(s.insert(c));
        }
        assert!(!s.insert(700));
        assert!(!s.insert(5));
        assert_eq!(s.first_missing(1500), None);
        assert_eq!(s.first_missing(1501), Some(1500));
        let mut s = ClusterSet::default();
        for c in (0..2000u32).filter(|&c| c != 1024) {
            s.insert(c);
        }
        assert_eq!(s.first_missing(2000), Some(1024));
        let mut s = ClusterSet::default();
        for c in 512..1024u32 {
            s.insert(c);
        }
        assert_eq!(s.first_missing(1024), Some(0));
        let mut s = ClusterSet::default();
        s.insert(u32::MAX);
        assert!(!s.insert(u32::MAX));
        assert_eq!(s.first_missing(1 << 32), Some(0));
        assert!(s.memory() < 200);
    }
}
