//! The sink thread: the only place that touches the user's `Write`. It receives finished
//! extents over a bounded channel, hashes their headers for the seal, writes them, and
//! gives the cluster buffers back to the producers. At the end (integrity on) it writes
//! the extent index (copies of every data extent's header, kept as they went by) and the
//! seal.

use std::io::{self, IoSlice, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crossbeam_channel::{Receiver, Sender};
use vma_format::extent_index;
use vma_format::integrity::{data_crc32c_append, SealHasher};
use vma_format::{
    BlockInfo, ExtentHeader, Uuid, VMA_BLOCKS_PER_EXTENT, VMA_WRITER_CLUSTERS_PER_EXTENT,
};

use crate::error::{Error, Result};

/// An extent being assembled: its slots and, per slot that stores blocks, the packed
/// blocks in a buffer of their own (moved, never copied, from the producer that packed
/// them to the sink).
pub(crate) struct Assembly {
    slots: [BlockInfo; VMA_BLOCKS_PER_EXTENT],
    used: usize,
    data: Vec<Vec<u8>>,
    /// CRC32C of the data, computed by the producer that completed the extent (so that
    /// the sink thread, the one sequential stage, only hashes and writes).
    crc: u32,
}

impl Assembly {
    /// An empty extent: one the sink gave back, emptied, if there is one.
    pub(crate) fn new(reused: Option<Box<Assembly>>) -> Box<Assembly> {
        match reused {
            Some(mut extent) => {
                extent.slots = [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT];
                extent.used = 0;
                extent.data.clear();
                extent.crc = 0;
                extent
            }
            None => Box::new(Assembly {
                slots: [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT],
                used: 0,
                data: Vec::with_capacity(VMA_WRITER_CLUSTERS_PER_EXTENT),
                crc: 0,
            }),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.used == 0
    }

    pub(crate) fn is_full(&self) -> bool {
        self.used >= VMA_WRITER_CLUSTERS_PER_EXTENT
    }

    /// Fills the next slot. The caller checks [`is_full`](Self::is_full) first.
    /// Computes the CRC32C of the data (done outside any lock, before sending).
    pub(crate) fn checksum(&mut self) {
        self.crc = self
            .data
            .iter()
            .fold(0, |crc, d| data_crc32c_append(crc, d));
    }

    pub(crate) fn push(&mut self, info: BlockInfo, stored: Vec<u8>) {
        self.slots[self.used] = info;
        self.used += 1;
        if !stored.is_empty() {
            self.data.push(stored);
        }
    }
}

/// What producers send to the sink thread.
pub(crate) enum Msg {
    /// An extent to write.
    Extent(Box<Assembly>),
    /// All extents are sent: write the seal (with integrity on), flush, stop.
    Finish,
    /// Stop without finishing.
    Abort,
}

/// What the sink thread and the producers share: the poison and the stop flag.
#[derive(Default)]
pub(crate) struct Health {
    failure: OnceLock<Error>,
    /// Set by abort: the sink discards whatever is still queued.
    stop: AtomicBool,
}

impl Health {
    /// The error that poisoned the writer, if any.
    pub(crate) fn failure(&self) -> Option<Error> {
        self.failure.get().cloned()
    }

    /// Fails unless healthy.
    pub(crate) fn check(&self) -> Result<()> {
        match self.failure.get() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    pub(crate) fn poison(&self, error: Error) {
        let _ = self.failure.set(error);
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// The sink thread's fixed inputs.
pub(crate) struct SinkSetup {
    pub(crate) uuid: Uuid,
    pub(crate) integrity: bool,
    /// With `integrity`: keep every data extent's header and write the extent index
    /// before the seal.
    pub(crate) extent_index: bool,
    pub(crate) header: Vec<u8>,
    pub(crate) rx: Receiver<Msg>,
    pub(crate) clusters_back: Sender<Vec<u8>>,
    pub(crate) extents_back: Sender<Box<Assembly>>,
    pub(crate) health: Arc<Health>,
}

/// What a finished sink thread reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SinkReport {
    /// Archive bytes written, seal included.
    pub(crate) bytes: u64,
    /// Data extents written (the seal and the index extents not counted).
    pub(crate) extents: u64,
    /// Index extents written (0 without the extent index).
    pub(crate) index_extents: u64,
}

/// Runs the sink thread. Always hands the sink back; the result says whether the archive
/// was finished (`Ok`) or not.
pub(crate) fn run<W: Write>(mut sink: W, setup: SinkSetup) -> (W, Result<SinkReport>) {
    let result = run_dyn(&mut sink, setup);
    (sink, result)
}

fn run_dyn(sink: &mut dyn Write, setup: SinkSetup) -> Result<SinkReport> {
    let mut out = Output { sink, offset: 0 };
    let mut hasher = setup.integrity.then(|| SealHasher::new(&setup.header));
    let health = &setup.health;
    let fail = |out: &Output, e: io::Error| {
        let error = Error::Sink {
            offset: out.offset,
            source: Arc::new(e),
        };
        health.poison(error.clone());
        error
    };
    if let Err(e) = out.write(&[&setup.header]) {
        return Err(fail(&out, e));
    }
    let mut extents = 0u64;
    // The extent index's input: 512 bytes per data extent (see `Builder::extent_index`).
    let mut headers: Option<Vec<[u8; 512]>> =
        (setup.integrity && setup.extent_index).then(Vec::new);
    for msg in setup.rx.iter() {
        match msg {
            Msg::Extent(extent) => {
                if health.stopped() {
                    recycle(&setup, extent);
                    continue;
                }
                let mut header = ExtentHeader::new(setup.uuid, extent.slots);
                if setup.integrity {
                    header.set_data_checksum(extent.crc);
                }
                let encoded = header.encode();
                if let Some(hasher) = &mut hasher {
                    hasher.extent(&encoded);
                }
                if let Some(headers) = &mut headers {
                    headers.push(encoded);
                }
                let mut parts: Vec<&[u8]> = Vec::with_capacity(extent.data.len() + 1);
                parts.push(&encoded);
                parts.extend(extent.data.iter().map(Vec::as_slice));
                let written = out.write(&parts);
                drop(parts);
                recycle(&setup, extent);
                if let Err(e) = written {
                    return Err(fail(&out, e));
                }
                extents += 1;
            }
            Msg::Finish => {
                let mut index_extents = 0u64;
                if let (Some(hasher), Some(headers)) = (&mut hasher, headers.take()) {
                    let index = extent_index::encode(setup.uuid, &headers).map_err(|e| {
                        let error = Error::Sink {
                            offset: out.offset,
                            source: Arc::new(io::Error::other(e)),
                        };
                        health.poison(error.clone());
                        error
                    })?;
                    drop(headers);
                    for extent in &index {
                        hasher.extent(extent);
                    }
                    let parts: Vec<&[u8]> = index.iter().map(|e| &e[..]).collect();
                    if let Err(e) = out.write(&parts) {
                        return Err(fail(&out, e));
                    }
                    index_extents = index.len() as u64;
                }
                if let Some(hasher) = hasher.take() {
                    debug_assert_eq!(hasher.extents(), extents + index_extents);
                    let encoded = hasher.seal().to_extent(setup.uuid).encode();
                    if let Err(e) = out.write(&[&encoded]) {
                        return Err(fail(&out, e));
                    }
                }
                if let Err(e) = out.sink.flush() {
                    return Err(fail(&out, e));
                }
                return Ok(SinkReport {
                    bytes: out.offset,
                    extents,
                    index_extents,
                });
            }
            Msg::Abort => break,
        }
    }
    Err(Error::Aborted)
}

/// Gives an extent and its cluster buffers back to the producers (dropping them if the
/// pools are full).
fn recycle(setup: &SinkSetup, mut extent: Box<Assembly>) {
    for buffer in extent.data.drain(..) {
        let _ = setup.clusters_back.try_send(buffer);
    }
    let _ = setup.extents_back.try_send(extent);
}

/// The user's sink with the running offset.
struct Output<'a> {
    sink: &'a mut dyn Write,
    offset: u64,
}

impl Output<'_> {
    /// Writes `parts` in order, vectored where the sink supports it.
    fn write(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let mut index = 0;
        let mut skip = 0;
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len());
        loop {
            while index < parts.len() && skip == parts[index].len() {
                index += 1;
                skip = 0;
            }
            if index == parts.len() {
                return Ok(());
            }
            slices.clear();
            slices.push(IoSlice::new(&parts[index][skip..]));
            slices.extend(parts[index + 1..].iter().map(|p| IoSlice::new(p)));
            let mut n = match self.sink.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.offset += n as u64;
            while index < parts.len() && n >= parts[index].len() - skip {
                n -= parts[index].len() - skip;
                index += 1;
                skip = 0;
            }
            skip += n;
        }
    }
}
