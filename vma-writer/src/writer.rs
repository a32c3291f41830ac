//! The writer: argument checks and accounting, zero scan and packing on the caller's
//! thread, and the hand-off of finished extents to the sink thread.
//!
//! A write call claims its clusters in the device's bitmap (one short lock), scans and packs
//! each cluster into a pooled 64 KiB buffer of its own (no lock; this is the only copy of
//! the data), then moves batches of up to 16 packed clusters into the extent being
//! assembled (one short lock per batch). The call that fills an extent takes it out under
//! that lock, then, without it, computes its CRC32C and sends it into the bounded channel,
//! blocking while the channel is full (backpressure). `finish` waits for every call in
//! progress before it ships the last extent, so no extent can arrive after the seal.

use std::fmt;
use std::io::Write;
use std::mem;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use vma_format::cluster::{self, cluster_count, cluster_span, pack_cluster, scan_cluster};
use vma_format::{
    BlockInfo, BlockMask, DeviceId, Uuid, VMA_CLUSTER_SIZE, VMA_WRITER_CLUSTERS_PER_EXTENT,
};

use crate::bitmap::ClusterBitmap;
use crate::builder::{Builder, Device, Observer, RecordedCluster, VmState};
use crate::error::{Error, MissingClusters, Result};
use crate::sink::{self, Assembly, Health, Msg, SinkReport, SinkSetup};

/// Finished extents that may wait in the channel to the sink thread.
pub(crate) const EXTENT_QUEUE: usize = 2;
/// Clusters a data call packs before it moves them into the extent (1 MiB).
const BATCH_CLUSTERS: usize = 16;
/// Zero clusters a call moves into extents per lock.
const ZERO_BATCH: usize = 1024;
/// Cluster buffers kept for reuse: about as many as are in flight at once.
const POOL_CLUSTERS: usize = (EXTENT_QUEUE + 4) * VMA_WRITER_CLUSTERS_PER_EXTENT;
/// How many missing clusters `finish` names, per device and devices.
const MISSING_PER_DEVICE: usize = 8;
const MISSING_DEVICES: usize = 8;

/// What a finished archive holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// The archive's uuid.
    pub uuid: Uuid,
    /// Bytes written to the sink, header and seal included.
    pub archive_bytes: u64,
    /// Data extents written (the seal and the index extents not counted).
    pub extents: u64,
    /// Index extents written before the seal (0 without the extent index, see
    /// [`Builder::extent_index`](crate::Builder::extent_index)).
    pub index_extents: u64,
    /// Whether the integrity extension (checksums and seal) was on.
    pub integrity: bool,
    /// One entry per device, in id order.
    pub devices: Vec<DeviceSummary>,
}

/// What was stored for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceSummary {
    /// The device's id.
    pub id: DeviceId,
    /// Its name.
    pub name: String,
    /// Its declared size in bytes.
    pub size: u64,
    /// Clusters recorded (for vmstate: clusters appended).
    pub clusters: u64,
    /// Bytes of stored blocks (whole 4 KiB blocks, so the block that straddles the end
    /// counts in full).
    pub stored_bytes: u64,
    /// Bytes of the device that were zero and are not stored.
    pub zero_bytes: u64,
}

struct DeviceMeta {
    id: DeviceId,
    name: String,
    size: u64,
    clusters: u64,
    vmstate: bool,
}

struct DeviceState {
    /// Written (or claimed by a call in progress); empty for vmstate.
    written: ClusterBitmap,
    committed: u64,
    stored: u64,
    zero: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Finishing,
    Finished,
    Aborted,
}

struct State {
    phase: Phase,
    tx: Option<Sender<Msg>>,
    extent: Box<Assembly>,
    /// Extents sent to the sink.
    extents: u64,
    /// Calls in progress.
    active: usize,
    devices: Vec<DeviceState>,
    /// In canonical order: the next cluster to record (device index, cluster number);
    /// `None` once every disk is complete (the vmstate stream's turn).
    turn: Option<(usize, u64)>,
    /// Calls waiting for their turn (canonical order).
    waiting: usize,
    /// A wait for a turn can no longer end well: a call failed with clusters claimed and
    /// not recorded, or `finish` found every call in progress waiting.
    order_broken: bool,
}

impl State {
    fn check_open(&self) -> Result<()> {
        match self.phase {
            Phase::Open => Ok(()),
            Phase::Finishing | Phase::Finished => Err(Error::Finished),
            Phase::Aborted => Err(Error::Aborted),
        }
    }
}

/// The vmstate byte stream: bytes not yet making a whole cluster wait in `staging`.
struct VmstateStream {
    index: usize,
    written: u64,
    next_cluster: u32,
    staging: Vec<u8>,
}

/// A packed cluster on its way into an extent.
struct Pending {
    cluster: u32,
    mask: BlockMask,
    span: usize,
    stored: Vec<u8>,
}

/// Clusters a call has claimed and not yet moved into an extent.
struct Claim {
    device: usize,
    next: u64,
    end: u64,
}

pub(crate) struct Shared {
    archive: u64,
    uuid: Uuid,
    integrity: bool,
    /// Clusters enter the archive in canonical order ([`Builder::canonical_order`]).
    canonical: bool,
    devices: Vec<DeviceMeta>,
    state: Mutex<State>,
    idle: Condvar,
    /// Told whenever the canonical order's turn moves on or can no longer move.
    turn: Condvar,
    health: Arc<Health>,
    clusters_back: Receiver<Vec<u8>>,
    extents_back: Receiver<Box<Assembly>>,
    vmstate: Mutex<Option<VmstateStream>>,
    /// What [`Builder::on_cluster`] set, called as clusters are recorded.
    observer: Option<Mutex<Observer>>,
}

/// A call in progress: counted so that `finish` can wait for it; on drop (also on an
/// error or a panic half way) it releases the clusters it claimed and did not store.
struct Call<'a> {
    shared: &'a Shared,
    claim: Option<Claim>,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(claim) = &self.claim {
            if claim.next < claim.end {
                st.devices[claim.device]
                    .written
                    .clear_range(claim.next, claim.end);
                if self.shared.canonical {
                    st.order_broken = true;
                    self.shared.turn.notify_all();
                }
            }
        }
        st.active -= 1;
        // `finish` waits for no call in progress, or (canonical order) for every one to be
        // waiting for a turn.
        if st.active == st.waiting {
            self.shared.idle.notify_all();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn disk(&self, device: Device) -> Result<usize> {
        self.slot(device, false)
    }

    fn stream(&self, vmstate: VmState) -> Result<usize> {
        self.slot(vmstate.0, true)
    }

    /// The index of a token's device, if it is of this archive and of the kind asked for.
    fn slot(&self, device: Device, vmstate: bool) -> Result<usize> {
        self.health.check()?;
        let index = usize::from(device.id.get()) - 1;
        match self.devices.get(index) {
            Some(meta) if device.archive == self.archive && meta.vmstate == vmstate => Ok(index),
            _ => Err(Error::UnknownDevice {
                id: device.id.get(),
            }),
        }
    }

    /// Starts a call, claiming clusters `start..end` of a device if asked to.
    fn enter(&self, claim: Option<(usize, u64, u64)>) -> Result<Call<'_>> {
        let mut st = self.lock();
        self.health.check()?;
        st.check_open()?;
        if let Some((device, start, end)) = claim {
            let bitmap = &mut st.devices[device].written;
            if let Some(cluster) = bitmap.first_set(start, end) {
                return Err(Error::DuplicateCluster {
                    device: self.devices[device].name.clone(),
                    cluster: cluster as u32,
                });
            }
            bitmap.set_range(start, end);
        }
        st.active += 1;
        drop(st);
        Ok(Call {
            shared: self,
            claim: claim.map(|(device, next, end)| Claim { device, next, end }),
        })
    }

    /// A buffer for one packed cluster, from the pool if the sink gave one back.
    fn buffer(&self) -> Vec<u8> {
        match self.clusters_back.try_recv() {
            Ok(mut buffer) => {
                buffer.clear();
                buffer
            }
            Err(_) => Vec::with_capacity(VMA_CLUSTER_SIZE),
        }
    }

    /// Zero scan and packing of one cluster (`data` from the cluster's start, possibly
    /// shorter than its span: missing bytes are zero).
    fn pack(&self, cluster: u32, span: usize, data: &[u8]) -> Pending {
        let mask = scan_cluster(data, span);
        let stored = if mask.is_empty() {
            Vec::new()
        } else {
            let mut buffer = self.buffer();
            pack_cluster(data, span, mask, &mut buffer);
            buffer
        };
        Pending {
            cluster,
            mask,
            span,
            stored,
        }
    }

    /// Tells the observer, if any, that a disk's cluster is being recorded.
    fn observe(&self, device: DeviceId, p: &Pending) {
        if let Some(observer) = &self.observer {
            let mut observer = observer.lock().unwrap_or_else(PoisonError::into_inner);
            (observer.0)(&RecordedCluster {
                device,
                cluster: p.cluster,
                span: p.span,
                mask: p.mask,
            });
        }
    }

    /// Moves packed clusters of one device into extents (a short lock), and ships each
    /// extent that fills up (outside the lock).
    fn commit(&self, call: &mut Call<'_>, device: usize, batch: &mut Vec<Pending>) -> Result<()> {
        let id = self.devices[device].id;
        // In canonical order, the turn stays with this call once it has it: the next
        // cluster to record is always this call's next one.
        let mut first = batch.first().map(|p| p.cluster).filter(|_| self.canonical);
        let mut pending = batch.drain(..);
        loop {
            let (full, tx) = {
                let mut st = self.lock();
                if let Some(cluster) = first.take() {
                    st = self.await_turn(st, device, cluster)?;
                }
                self.health.check()?;
                if st.phase == Phase::Aborted {
                    return Err(Error::Aborted);
                }
                let mut full = None;
                for p in pending.by_ref() {
                    if !self.devices[device].vmstate {
                        self.observe(id, &p);
                    }
                    let state = &mut *st;
                    let d = &mut state.devices[device];
                    d.committed += 1;
                    d.stored += p.mask.stored_len() as u64;
                    d.zero +=
                        (p.span - cluster::stored_device_bytes(p.mask, p.span) as usize) as u64;
                    state
                        .extent
                        .push(BlockInfo::new(id, p.cluster, p.mask), p.stored);
                    if let Some(claim) = &mut call.claim {
                        claim.next = u64::from(p.cluster) + 1;
                    }
                    if self.canonical {
                        self.advance(state, device, p.cluster);
                    }
                    if state.extent.is_full() {
                        full = Some(self.take_extent(state));
                        break;
                    }
                }
                if self.canonical {
                    self.turn.notify_all();
                }
                match full {
                    None => return Ok(()),
                    Some(extent) => (extent, st.tx.clone()),
                }
            };
            self.ship(full, tx)?;
        }
    }

    /// Canonical order: waits until the next cluster to record is `cluster` of `device`
    /// (for the vmstate stream: until every disk is complete).
    fn await_turn<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        device: usize,
        cluster: u32,
    ) -> Result<MutexGuard<'a, State>> {
        let mine = (!self.devices[device].vmstate).then_some((device, u64::from(cluster)));
        loop {
            if st.turn == mine {
                return Ok(st);
            }
            self.health.check()?;
            if st.phase == Phase::Aborted {
                return Err(Error::Aborted);
            }
            if st.order_broken {
                return Err(Error::OutOfOrder {
                    device: self.devices[device].name.clone(),
                    cluster,
                });
            }
            st.waiting += 1;
            if st.waiting == st.active {
                self.idle.notify_all();
            }
            st = self.turn.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.waiting -= 1;
        }
    }

    /// Canonical order: the turn after `cluster` of `device` was recorded.
    fn advance(&self, st: &mut State, device: usize, cluster: u32) {
        if self.devices[device].vmstate {
            return;
        }
        let next = u64::from(cluster) + 1;
        st.turn = if next < self.devices[device].clusters {
            Some((device, next))
        } else {
            first_disk(&self.devices, device + 1)
        };
    }

    /// Takes the extent being assembled out of the state, leaving an empty one.
    fn take_extent(&self, st: &mut State) -> Box<Assembly> {
        st.extents += 1;
        let fresh = Assembly::new(self.extents_back.try_recv().ok());
        mem::replace(&mut st.extent, fresh)
    }

    /// Checksums a finished extent and hands it to the sink thread; blocks while the
    /// channel is full (backpressure). Never called with the state lock held: `finish`
    /// waits for every call in progress, so no extent is shipped after the last one.
    fn ship(&self, mut extent: Box<Assembly>, tx: Option<Sender<Msg>>) -> Result<()> {
        if self.integrity {
            extent.checksum();
        }
        let Some(tx) = tx else {
            return Err(Error::Aborted);
        };
        tx.send(Msg::Extent(extent)).map_err(|_| self.sink_gone())
    }

    /// The error to report when the sink thread is no longer there. Takes the state lock.
    fn sink_gone(&self) -> Error {
        // A sink error poisons before the thread lets go of the channel; an abort stops
        // it; otherwise the thread died in a panic of the sink's `Write`.
        if let Some(e) = self.health.failure() {
            return e;
        }
        if self.lock().phase == Phase::Aborted {
            return Error::Aborted;
        }
        self.health.poison(Error::SinkPanicked);
        self.health.failure().unwrap_or(Error::SinkPanicked)
    }

    /// Stores clusters `first..first + count` of a disk: from `data` (which starts at the
    /// first cluster), or as zero clusters.
    fn store(&self, device: usize, first: u64, count: u64, data: Option<&[u8]>) -> Result<()> {
        let end = first + count;
        let mut call = self.enter(Some((device, first, end)))?;
        let size = self.devices[device].size;
        let limit = if data.is_some() {
            BATCH_CLUSTERS
        } else {
            ZERO_BATCH
        };
        let mut batch = Vec::with_capacity(limit.min(count as usize));
        for (i, cluster) in (first..end).enumerate() {
            let cluster = cluster as u32;
            let span = cluster_span(cluster, size).unwrap_or(0);
            let pending = match data {
                None => Pending {
                    cluster,
                    mask: BlockMask::empty(),
                    span,
                    stored: Vec::new(),
                },
                Some(bytes) => {
                    let start = (i * VMA_CLUSTER_SIZE).min(bytes.len());
                    let chunk = &bytes[start..(start + VMA_CLUSTER_SIZE).min(bytes.len())];
                    self.pack(cluster, span, chunk)
                }
            };
            batch.push(pending);
            if batch.len() >= limit {
                self.commit(&mut call, device, &mut batch)?;
            }
        }
        if !batch.is_empty() {
            self.commit(&mut call, device, &mut batch)?;
        }
        Ok(())
    }

    /// Checks a byte range of a disk; returns its first cluster and cluster count.
    fn range(&self, device: usize, offset: u64, len: u64) -> Result<(u64, u64)> {
        let meta = &self.devices[device];
        let cluster = VMA_CLUSTER_SIZE as u64;
        let misaligned = |reason| Error::Misaligned {
            device: meta.name.clone(),
            offset,
            len,
            reason,
        };
        if !offset.is_multiple_of(cluster) {
            return Err(misaligned("the offset is not a multiple of 65536"));
        }
        let end = offset.checked_add(len);
        match end {
            Some(end) if end <= meta.clusters * cluster => {
                if !len.is_multiple_of(cluster) && end != meta.size {
                    return Err(misaligned(
                        "the length is not a multiple of 65536 and the range does not end at the device end",
                    ));
                }
                Ok((offset / cluster, len.div_ceil(cluster)))
            }
            _ => Err(Error::RangePastEnd {
                device: meta.name.clone(),
                offset,
                len,
                size: meta.size,
            }),
        }
    }

    fn write_cluster(&self, device: Device, cluster: u32, data: Option<&[u8]>) -> Result<()> {
        let index = self.disk(device)?;
        let meta = &self.devices[index];
        let Some(span) = cluster_span(cluster, meta.size) else {
            return Err(Error::ClusterPastEnd {
                device: meta.name.clone(),
                cluster: cluster.into(),
                clusters: meta.clusters,
            });
        };
        if let Some(data) = data {
            let ok = data.len() == VMA_CLUSTER_SIZE
                || (span < VMA_CLUSTER_SIZE
                    && data.len() >= span
                    && data.len() <= VMA_CLUSTER_SIZE);
            if !ok {
                return Err(Error::ClusterLength {
                    device: meta.name.clone(),
                    cluster,
                    len: data.len(),
                    span,
                });
            }
        }
        self.store(index, cluster.into(), 1, data)
    }

    fn write_range(
        &self,
        device: Device,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<()> {
        let index = self.disk(device)?;
        let (first, count) = self.range(index, offset, len)?;
        if count == 0 {
            return self.enter(None).map(drop);
        }
        self.store(index, first, count, data)
    }

    fn append_vmstate(&self, vmstate: VmState, data: &[u8]) -> Result<()> {
        let index = self.stream(vmstate)?;
        let size = self.devices[index].size;
        let mut call = self.enter(None)?;
        let mut guard = self.vmstate.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(stream) = guard.as_mut() else {
            return Err(Error::UnknownDevice {
                id: vmstate.id().get(),
            });
        };
        let fits = stream
            .written
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= size);
        if !fits {
            return Err(Error::VmstateOverflow {
                size,
                written: stream.written,
                len: data.len(),
            });
        }
        stream.written += data.len() as u64;
        let mut rest = data;
        let mut batch = Vec::with_capacity(BATCH_CLUSTERS);
        if !stream.staging.is_empty() {
            let take = (VMA_CLUSTER_SIZE - stream.staging.len()).min(rest.len());
            stream.staging.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if stream.staging.len() == VMA_CLUSTER_SIZE {
                let pending = self.pack_staging(stream, size);
                batch.push(pending);
            }
        }
        while rest.len() >= VMA_CLUSTER_SIZE {
            let (chunk, tail) = rest.split_at(VMA_CLUSTER_SIZE);
            rest = tail;
            let cluster = stream.next_cluster;
            stream.next_cluster += 1;
            batch.push(self.pack(cluster, VMA_CLUSTER_SIZE, chunk));
            if batch.len() >= BATCH_CLUSTERS {
                self.commit(&mut call, index, &mut batch)?;
            }
        }
        stream.staging.extend_from_slice(rest);
        if !batch.is_empty() {
            self.commit(&mut call, index, &mut batch)?;
        }
        Ok(())
    }

    /// Packs the staged vmstate bytes as the stream's next cluster. A full cluster with
    /// every block stored is moved as it is: no second copy.
    fn pack_staging(&self, stream: &mut VmstateStream, size: u64) -> Pending {
        let cluster = stream.next_cluster;
        stream.next_cluster += 1;
        let span = cluster_span(cluster, size).unwrap_or(0);
        let mask = scan_cluster(&stream.staging, span);
        if mask == BlockMask::all() && stream.staging.len() == VMA_CLUSTER_SIZE {
            let stored = mem::replace(&mut stream.staging, self.buffer());
            return Pending {
                cluster,
                mask,
                span,
                stored,
            };
        }
        let pending = self.pack(cluster, span, &stream.staging);
        stream.staging.clear();
        pending
    }

    /// Waits for calls in progress, flushes vmstate and the last extent, checks that every
    /// cluster is there and tells the sink to seal. Returns the per-device summaries.
    fn finish(&self) -> Result<Vec<DeviceSummary>> {
        {
            let mut st = self.lock();
            self.health.check()?;
            st.check_open()?;
            st.phase = Phase::Finishing;
            while st.active > 0 {
                if self.canonical && st.waiting == st.active {
                    // No call can start any more and none is working: no turn can come.
                    st.order_broken = true;
                    self.turn.notify_all();
                }
                st = self.idle.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
        }
        let tail = {
            let mut guard = self.vmstate.lock().unwrap_or_else(PoisonError::into_inner);
            match guard.as_mut() {
                Some(stream) if !stream.staging.is_empty() => {
                    let size = self.devices[stream.index].size;
                    Some((stream.index, self.pack_staging(stream, size)))
                }
                _ => None,
            }
        };
        let mut st = self.lock();
        self.health.check()?;
        self.check_complete(&st)?;
        let mut last = Vec::new();
        if let Some((index, p)) = tail {
            let id = self.devices[index].id;
            let d = &mut st.devices[index];
            d.committed += 1;
            d.stored += p.mask.stored_len() as u64;
            d.zero += (p.span - cluster::stored_device_bytes(p.mask, p.span) as usize) as u64;
            st.extent
                .push(BlockInfo::new(id, p.cluster, p.mask), p.stored);
            if st.extent.is_full() {
                last.push(self.take_extent(&mut st));
            }
        }
        // Like Proxmox's writer, always at least one extent (an empty one if need be).
        if !st.extent.is_empty() || st.extents == 0 {
            last.push(self.take_extent(&mut st));
        }
        let tx = st.tx.take();
        st.phase = Phase::Finished;
        let summaries = self
            .devices
            .iter()
            .zip(&st.devices)
            .map(|(meta, d)| DeviceSummary {
                id: meta.id,
                name: meta.name.clone(),
                size: meta.size,
                clusters: d.committed,
                stored_bytes: d.stored,
                zero_bytes: d.zero,
            })
            .collect();
        drop(st);
        for extent in last {
            self.ship(extent, tx.clone())?;
        }
        match tx {
            Some(tx) if tx.send(Msg::Finish).is_ok() => Ok(summaries),
            Some(_) => Err(self.sink_gone()),
            None => Err(Error::Aborted),
        }
    }

    fn check_complete(&self, st: &State) -> Result<()> {
        let mut total = 0;
        let mut missing = Vec::new();
        for (meta, d) in self.devices.iter().zip(&st.devices) {
            if meta.vmstate || d.committed == meta.clusters {
                continue;
            }
            let absent = meta.clusters - d.committed;
            total += absent;
            if missing.len() < MISSING_DEVICES {
                let clusters = d
                    .written
                    .first_clear(0, meta.clusters, MISSING_PER_DEVICE)
                    .into_iter()
                    .map(|c| c as u32)
                    .collect();
                missing.push(MissingClusters {
                    device: meta.name.clone(),
                    clusters,
                    total: absent,
                });
            }
        }
        if total == 0 {
            Ok(())
        } else {
            Err(Error::Incomplete { total, missing })
        }
    }

    /// Stops the archive: later calls fail, the sink thread discards what is queued.
    fn abort(&self) {
        self.health.stop();
        let mut st = self.lock();
        if st.phase != Phase::Finished {
            st.phase = Phase::Aborted;
        }
        self.turn.notify_all();
        if let Some(tx) = st.tx.take() {
            let _ = tx.send(Msg::Abort);
        }
        drop(st);
        self.drain_pool();
    }

    fn drain_pool(&self) {
        while self.clusters_back.try_recv().is_ok() {}
        while self.extents_back.try_recv().is_ok() {}
    }
}

/// A cloneable, `Send + Sync` handle for writing into an archive from any thread; every
/// method takes `&self`. Get one with [`Writer::handle`].
///
/// Each call does its zero scan and packing on the calling thread, so several threads
/// writing at once (one per drive, say) scale until the sink thread is the bottleneck.
#[derive(Clone)]
pub struct WriterHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for WriterHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriterHandle")
            .field("uuid", &self.shared.uuid)
            .finish_non_exhaustive()
    }
}

impl WriterHandle {
    /// Stores one cluster of a disk: `data` is 65536 bytes, except for the device's last
    /// cluster, which may be given from its span (the bytes inside the device) up to 65536
    /// bytes; bytes past the device end are ignored.
    ///
    /// Errors: a cluster past the end, a wrong length, a cluster already written, a device
    /// of another archive, a finished, aborted or poisoned writer.
    pub fn write_cluster(&self, device: Device, cluster: u32, data: &[u8]) -> Result<()> {
        self.shared.write_cluster(device, cluster, Some(data))
    }

    /// Records one cluster of a disk as all zero, without data.
    pub fn write_zero_cluster(&self, device: Device, cluster: u32) -> Result<()> {
        self.shared.write_cluster(device, cluster, None)
    }

    /// Stores the bytes of a disk at `offset`: the offset is a multiple of 65536, and the
    /// length too unless the range ends exactly at the device end (a range that ends inside
    /// the last cluster's padding is accepted; the bytes past the end are ignored).
    ///
    /// A range is claimed as a whole before any of it is stored: if one of its clusters was
    /// already written, nothing is stored and the error names that cluster.
    pub fn write_range(&self, device: Device, offset: u64, data: &[u8]) -> Result<()> {
        self.shared
            .write_range(device, offset, data.len() as u64, Some(data))
    }

    /// Records the clusters of a disk range as all zero (for NBD `WRITE_ZEROES` or a hole
    /// in a source); the range follows the rules of [`write_range`](Self::write_range).
    pub fn write_zero_range(&self, device: Device, offset: u64, len: u64) -> Result<()> {
        self.shared.write_range(device, offset, len, None)
    }

    /// Appends bytes to the RAM-state stream. Appends may have any length; whole clusters
    /// are stored as they fill up (numbered 0, 1, 2, ...) and `finish` stores the partial
    /// last one. At most the declared size may be appended. Appends from several threads
    /// are serialised (a stream has one order).
    pub fn append_vmstate(&self, vmstate: VmState, data: &[u8]) -> Result<()> {
        self.shared.append_vmstate(vmstate, data)
    }

    /// The disk declared under `name`.
    pub fn device(&self, name: &str) -> Option<Device> {
        self.find(|d| d.name == name && !d.vmstate)
    }

    /// The RAM-state stream, if one was declared.
    pub fn vmstate(&self) -> Option<VmState> {
        self.find(|d| d.vmstate).map(VmState)
    }

    fn find(&self, which: impl Fn(&DeviceMeta) -> bool) -> Option<Device> {
        self.shared
            .devices
            .iter()
            .find(|d| which(d))
            .map(|d| Device {
                id: d.id,
                archive: self.shared.archive,
            })
    }

    /// The declared size of a disk, in bytes.
    pub fn device_size(&self, device: Device) -> Result<u64> {
        let index = self.shared.disk(device)?;
        Ok(self.shared.devices[index].size)
    }

    /// The name of a disk.
    pub fn device_name(&self, device: Device) -> Result<&str> {
        let index = self.shared.disk(device)?;
        Ok(&self.shared.devices[index].name)
    }

    /// The archive's uuid.
    pub fn uuid(&self) -> Uuid {
        self.shared.uuid
    }

    /// Abandons the archive from any thread, as [`Writer::abort`] does, without waiting for
    /// the sink: every call in progress or to come (on any handle) fails with
    /// [`Error::Aborted`], and so does [`Writer::finish`]. For a producer whose source
    /// failed, so that the other producers stop at once (in
    /// [canonical order](crate::Builder::canonical_order) they may be waiting for the
    /// clusters it will never write).
    pub fn abort(&self) {
        self.shared.abort();
    }
}

/// Forwards the write calls of a writer to its handle.
macro_rules! forward_writes {
    ($($field:ident).+) => {
        /// See [`WriterHandle::write_cluster`].
        pub fn write_cluster(&self, device: Device, cluster: u32, data: &[u8]) -> Result<()> {
            self.$($field).+.write_cluster(device, cluster, data)
        }

        /// See [`WriterHandle::write_zero_cluster`].
        pub fn write_zero_cluster(&self, device: Device, cluster: u32) -> Result<()> {
            self.$($field).+.write_zero_cluster(device, cluster)
        }

        /// See [`WriterHandle::write_range`].
        pub fn write_range(&self, device: Device, offset: u64, data: &[u8]) -> Result<()> {
            self.$($field).+.write_range(device, offset, data)
        }

        /// See [`WriterHandle::write_zero_range`].
        pub fn write_zero_range(&self, device: Device, offset: u64, len: u64) -> Result<()> {
            self.$($field).+.write_zero_range(device, offset, len)
        }

        /// See [`WriterHandle::append_vmstate`].
        pub fn append_vmstate(&self, vmstate: VmState, data: &[u8]) -> Result<()> {
            self.$($field).+.append_vmstate(vmstate, data)
        }

        /// See [`WriterHandle::write_file`].
        #[cfg(unix)]
        pub fn write_file(
            &self,
            device: Device,
            source: &std::fs::File,
            progress: Option<&mut dyn FnMut(u64)>,
        ) -> Result<u64> {
            self.$($field).+.write_file(device, source, progress)
        }

        /// A cloneable handle for writing from other threads.
        pub fn handle(&self) -> WriterHandle {
            self.$($field).+.clone()
        }
    };
}
pub(crate) use forward_writes;

/// The first disk (not the vmstate stream) at index `from` or later, at its cluster 0.
fn first_disk(devices: &[DeviceMeta], from: usize) -> Option<(usize, u64)> {
    (from..devices.len())
        .find(|&i| !devices[i].vmstate)
        .map(|i| (i, 0))
}

type SinkThread<W> = JoinHandle<(W, Result<SinkReport>)>;

/// An archive being written into a `Write` sink. Declare it with a [`Builder`]; write
/// clusters of any device in any order, from this thread or from others through
/// [`handle`](Writer::handle)s; then [`finish`](Writer::finish) it.
///
/// Dropping a `Writer` without finishing it aborts the archive (see
/// [`abort`](Writer::abort)).
pub struct Writer<W: Write + Send + 'static> {
    pub(crate) handle: WriterHandle,
    integrity: bool,
    thread: Option<SinkThread<W>>,
}

impl<W: Write + Send + 'static> fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("uuid", &self.handle.shared.uuid)
            .field("integrity", &self.integrity)
            .finish_non_exhaustive()
    }
}

impl<W: Write + Send + 'static> Writer<W> {
    pub(crate) fn start(mut builder: Builder, sink: W) -> Result<Writer<W>> {
        builder.settle_uuid();
        let header = builder.encode_header()?;
        let (tx, rx) = bounded(EXTENT_QUEUE);
        let (clusters_tx, clusters_rx) = bounded(POOL_CLUSTERS);
        let (extents_tx, extents_rx) = bounded(EXTENT_QUEUE + 2);
        let health = Arc::new(Health::default());
        let devices: Vec<DeviceMeta> = builder
            .header
            .devices
            .iter()
            .map(|d| DeviceMeta {
                id: d.id,
                name: d.name.clone(),
                size: d.size,
                clusters: cluster_count(d.size),
                vmstate: d.is_vmstate(),
            })
            .collect();
        let states = devices
            .iter()
            .map(|d| DeviceState {
                written: ClusterBitmap::new(if d.vmstate { 0 } else { d.clusters }),
                committed: 0,
                stored: 0,
                zero: 0,
            })
            .collect();
        let turn = first_disk(&devices, 0);
        let vmstate = devices
            .iter()
            .position(|d| d.vmstate)
            .map(|index| VmstateStream {
                index,
                written: 0,
                next_cluster: 0,
                staging: Vec::with_capacity(VMA_CLUSTER_SIZE),
            });
        let setup = SinkSetup {
            uuid: builder.header.uuid,
            integrity: builder.integrity,
            extent_index: builder.extent_index,
            header,
            rx,
            clusters_back: clusters_tx,
            extents_back: extents_tx,
            health: health.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("vma-sink".into())
            .spawn(move || sink::run(sink, setup))
            .map_err(|e| Error::Thread(Arc::new(e)))?;
        let shared = Shared {
            archive: builder.archive,
            uuid: builder.header.uuid,
            integrity: builder.integrity,
            canonical: builder.canonical,
            devices,
            state: Mutex::new(State {
                phase: Phase::Open,
                tx: Some(tx),
                extent: Assembly::new(None),
                extents: 0,
                active: 0,
                devices: states,
                turn,
                waiting: 0,
                order_broken: false,
            }),
            idle: Condvar::new(),
            turn: Condvar::new(),
            health,
            clusters_back: clusters_rx,
            extents_back: extents_rx,
            vmstate: Mutex::new(vmstate),
            observer: builder.observer.map(Mutex::new),
        };
        Ok(Writer {
            handle: WriterHandle {
                shared: Arc::new(shared),
            },
            integrity: builder.integrity,
            thread: Some(thread),
        })
    }

    forward_writes!(handle);

    /// The archive's uuid.
    pub fn uuid(&self) -> Uuid {
        self.handle.shared.uuid
    }

    /// Completes the archive: waits for write calls still running on other threads, stores
    /// the last partial vmstate cluster, checks that every cluster of every disk was
    /// written, writes the last extent and (with integrity on) the seal, flushes the sink
    /// and hands it back with a summary.
    ///
    /// Fails with [`Error::Incomplete`] (naming the first missing clusters) if a cluster is
    /// missing, or with the sink's error; either way the archive is abandoned unsealed and
    /// the sink dropped. Handles fail with [`Error::Finished`] afterwards.
    pub fn finish(mut self) -> Result<(Summary, W)> {
        let shared = self.handle.shared.clone();
        let result = shared.finish();
        if result.is_err() {
            shared.abort();
        }
        let joined = self.join();
        shared.drain_pool();
        let devices = result?;
        let (sink, report) = joined?;
        let report = report?;
        Ok((
            Summary {
                uuid: shared.uuid,
                archive_bytes: report.bytes,
                extents: report.extents,
                index_extents: report.index_extents,
                integrity: self.integrity,
                devices,
            },
            sink,
        ))
    }

    /// Abandons the archive: what is queued is discarded, no seal is written, and the sink
    /// is handed back as it is (holding a truncated archive that no reader accepts as
    /// complete). Handles fail with [`Error::Aborted`] afterwards.
    ///
    /// Waits for the sink's write in progress, if any, to return.
    pub fn abort(mut self) -> Result<W> {
        self.handle.shared.abort();
        let (sink, _) = self.join()?;
        Ok(sink)
    }

    fn join(&mut self) -> Result<(W, Result<SinkReport>)> {
        let thread = self.thread.take().ok_or(Error::Aborted)?;
        thread.join().map_err(|_| Error::SinkPanicked)
    }
}

impl<W: Write + Send + 'static> Drop for Writer<W> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.handle.shared.abort();
            let _ = self.join();
        }
    }
}
