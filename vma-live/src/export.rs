//! The NBD exports QEMU's backup jobs write into: one per drive, each turning
//! NBD writes into archive range writes.
//!
//! The guest waits for every copy-before-write push to be acknowledged, so
//! an export never answers QEMU with an error and never blocks on anything
//! but handing the data to the archive writer. When archiving fails, the
//! first error is latched, every later write is acknowledged and dropped,
//! and the orchestrator (polling [`Latch::failed`]) cancels the jobs.
//!
//! With a copy-before-write filter of our own ([`crate::backup`]), the
//! guest's pushes and the background copy reach an export over two
//! connections and may both send a 64 KiB cluster (with the same data: the
//! background copy reads pushed clusters back from the push target, which
//! answers zeroes). The first write of each cluster is stored, later ones
//! are acknowledged and dropped.
//!
//! The pushes may go to an export of their own ([`DriveExport::pushes`]) that
//! acknowledges them from a bounded in-memory [`PushBuffer`]: a push's
//! clusters are claimed when it arrives (so the background copy skips them),
//! its data is copied into the buffer, and a drain thread stores it behind
//! the background copy. The guest then waits for a memory copy, not for the
//! archive writer; only when the buffer is full does it wait, as without one.
//! Nothing goes to disk but the archive.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use vma_nbd::Export;

use crate::Error;

/// Where the exports put the data: byte ranges of the archive's devices.
///
/// `offset` is a multiple of 64 KiB; `len` is a multiple of 64 KiB unless
/// the range ends at the device's end. Called concurrently.
pub trait RangeSink: Send + Sync {
    /// Stores `data` at `offset` of device number `device` (0-based, in
    /// declaration order).
    fn write(&self, device: usize, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// Records `len` bytes of zeroes at `offset` of device number `device`.
    fn write_zeroes(&self, device: usize, offset: u64, len: u64) -> Result<(), Error>;
}

/// A [`RangeSink`] that takes at most `rate` bytes of data per second, as
/// vzdump's `bwlimit` does: each write waits for its turn on one shared
/// clock, so the archive fills no faster than the limit however many
/// writers there are. Zero ranges cost nothing.
pub struct RateLimited {
    inner: Arc<dyn RangeSink>,
    rate: u64,
    /// When the data written so far is due.
    due: Mutex<Option<std::time::Instant>>,
}

impl RateLimited {
    /// `inner`, limited to `rate` bytes per second (at least 1).
    pub fn new(inner: Arc<dyn RangeSink>, rate: u64) -> RateLimited {
        RateLimited {
            inner,
            rate: rate.max(1),
            due: Mutex::new(None),
        }
    }
}

impl RangeSink for RateLimited {
    fn write(&self, device: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
        let cost = Duration::from_secs_f64(data.len() as f64 / self.rate as f64);
        let until = {
            let mut due = self.due.lock().unwrap_or_else(PoisonError::into_inner);
            let now = std::time::Instant::now();
            let start = due.filter(|d| *d > now).unwrap_or(now);
            let until = start + cost;
            *due = Some(until);
            until
        };
        std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
        self.inner.write(device, offset, data)
    }

    fn write_zeroes(&self, device: usize, offset: u64, len: u64) -> Result<(), Error> {
        self.inner.write_zeroes(device, offset, len)
    }
}

/// The first archiving failure, shared by all exports of one backup.
#[derive(Debug, Default)]
pub struct Latch {
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl Latch {
    /// Records `err` unless a failure is already recorded.
    pub fn fail(&self, err: Error) {
        let mut slot = self.error.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(err);
        }
        self.failed.store(true, Ordering::Release);
    }

    /// Whether a failure was recorded.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Takes the recorded failure (`None` if there is none, or it was taken).
    pub fn take(&self) -> Option<Error> {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Byte counters of one export, readable while the backup runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes received in `NBD_CMD_WRITE`s.
    pub data_bytes: AtomicU64,
    /// Bytes received as `NBD_CMD_WRITE_ZEROES`.
    pub zero_bytes: AtomicU64,
    /// Write requests (of both kinds).
    pub requests: AtomicU64,
    /// Requests that did not start where the previous one ended: QEMU's
    /// parallel copy requests overtaking each other, and copy-before-write
    /// pushes of areas ahead of the copy.
    pub non_sequential: AtomicU64,
    /// `NBD_CMD_FLUSH` requests.
    pub flushes: AtomicU64,
    /// Write requests that came to the push export ([`DriveExport::pushes`]):
    /// copy-before-write pushes, each a guest write that waited for it.
    pub pushes: AtomicU64,
    last_end: AtomicU64,
}

impl Counters {
    /// Bytes received so far (data and zeroes).
    pub fn received(&self) -> u64 {
        self.data_bytes.load(Ordering::Relaxed) + self.zero_bytes.load(Ordering::Relaxed)
    }

    fn note(&self, offset: u64, end: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.last_end.swap(end, Ordering::Relaxed) != offset {
            self.non_sequential.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The NBD export of one drive.
pub struct DriveExport {
    sink: Arc<dyn RangeSink>,
    latch: Arc<Latch>,
    device: usize,
    size: u64,
    delay: Option<Duration>,
    counters: Arc<Counters>,
    /// One bit per 64 KiB cluster: stored (or being stored) already. Shared
    /// with the drive's push export.
    claimed: Arc<Vec<AtomicU64>>,
    /// Where this export's writes go instead of straight to the sink.
    buffer: Option<Arc<PushBuffer>>,
}

impl std::fmt::Debug for DriveExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriveExport")
            .field("device", &self.device)
            .field("size", &self.size)
            .field("delay", &self.delay)
            .finish_non_exhaustive()
    }
}

const CLUSTER: u64 = 65536;

impl DriveExport {
    /// An export of `size` bytes writing into device number `device` of
    /// `sink`. `delay` is slept before each data write (to slow a backup down
    /// for demos and tests).
    pub fn new(
        sink: Arc<dyn RangeSink>,
        latch: Arc<Latch>,
        device: usize,
        size: u64,
        delay: Option<Duration>,
    ) -> DriveExport {
        DriveExport {
            sink,
            latch,
            device,
            size,
            delay,
            counters: Arc::new(Counters::default()),
            claimed: Arc::new(
                (0..size.div_ceil(CLUSTER).div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            ),
            buffer: None,
        }
    }

    /// A second export of the same drive, for the copy-before-write filter's
    /// pushes: it shares this export's counters and its record of stored
    /// clusters, and acknowledges a push once its data is in `buffer` (it
    /// waits only while the buffer is full). No delay is slept.
    pub fn pushes(&self, buffer: Arc<PushBuffer>) -> DriveExport {
        DriveExport {
            sink: Arc::clone(&self.sink),
            latch: Arc::clone(&self.latch),
            device: self.device,
            size: self.size,
            delay: None,
            counters: Arc::clone(&self.counters),
            claimed: Arc::clone(&self.claimed),
            buffer: Some(buffer),
        }
    }

    fn note(&self, offset: u64, end: u64) {
        self.counters.note(offset, end);
        if self.buffer.is_some() {
            self.counters.pushes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Claims the clusters of `offset..offset + len`; returns the runs of
    /// clusters not claimed before, as byte ranges (relative to `offset`).
    fn claim(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let end = offset.saturating_add(len).min(self.size);
        let mut at = offset;
        while at < end {
            let next = (at / CLUSTER + 1) * CLUSTER;
            let cluster = at / CLUSTER;
            let bit = 1u64 << (cluster % 64);
            let word = usize::try_from(cluster / 64)
                .ok()
                .and_then(|w| self.claimed.get(w));
            let fresh = word.is_some_and(|w| w.fetch_or(bit, Ordering::AcqRel) & bit == 0);
            let piece_end = next.min(end);
            if fresh {
                match runs.last_mut() {
                    Some(run) if run.0 + run.1 == at - offset => run.1 += piece_end - at,
                    _ => runs.push((at - offset, piece_end - at)),
                }
            }
            at = piece_end;
        }
        runs
    }

    /// The export's counters.
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Checks QEMU's request against what the archive writer takes: ranges
    /// start on a cluster and cover whole clusters except at the end.
    fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        let end = offset.saturating_add(len);
        if !offset.is_multiple_of(CLUSTER) || (!len.is_multiple_of(CLUSTER) && end != self.size) {
            return Err(Error::Unaligned {
                device: self.device + 1,
                offset,
                len,
            });
        }
        Ok(())
    }

    fn store(&self, offset: u64, len: u64, op: impl FnOnce() -> Result<(), Error>) {
        if self.latch.failed() {
            return;
        }
        if let Err(e) = self.check_range(offset, len).and_then(|()| op()) {
            self.latch.fail(e);
        }
    }
}

impl Export for DriveExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        // QEMU's backup job never reads its target; answer zeroes rather
        // than an error, as an archive target has nothing else to show.
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        let len = data.len() as u64;
        self.note(offset, offset + len);
        self.store(offset, len, || {
            for (at, n) in self.claim(offset, len) {
                let piece = usize::try_from(at)
                    .ok()
                    .zip(usize::try_from(at + n).ok())
                    .and_then(|(a, b)| data.get(a..b))
                    .unwrap_or_default();
                match &self.buffer {
                    Some(b) => b.put(self.device, offset + at, Piece::Data(piece.to_vec())),
                    None => self.sink.write(self.device, offset + at, piece)?,
                }
            }
            Ok(())
        });
        self.counters.data_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.note(offset, offset + len);
        self.store(offset, len, || {
            for (at, n) in self.claim(offset, len) {
                match &self.buffer {
                    Some(b) => b.put(self.device, offset + at, Piece::Zeroes(n)),
                    None => self.sink.write_zeroes(self.device, offset + at, n)?,
                }
            }
            Ok(())
        });
        self.counters.zero_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // The archive is made durable when it is finished; nothing the
        // backup job could wait for here.
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// What a buffered push stores.
#[derive(Debug)]
enum Piece {
    Data(Vec<u8>),
    Zeroes(u64),
}

impl Piece {
    /// Bytes of buffer it takes.
    fn bytes(&self) -> usize {
        match self {
            Piece::Data(d) => d.len(),
            Piece::Zeroes(_) => 0,
        }
    }
}

#[derive(Debug, Default)]
struct Pending {
    queue: VecDeque<(usize, u64, Piece)>,
    /// Data bytes queued or being stored.
    bytes: usize,
    /// No more pushes: drain what is queued, then stop.
    closed: bool,
    /// Stop at once, dropping what is queued.
    abandoned: bool,
}

/// Copy-before-write pushes acknowledged from memory and stored behind the
/// background copy by a thread of its own (see the module docs).
///
/// Memory: at most `capacity` bytes of pushed data (a single push larger
/// than that waits for an empty buffer and is then taken alone). Storing
/// failures are latched as the exports' are; pushes after one are dropped.
#[derive(Debug)]
pub struct PushBuffer {
    capacity: usize,
    pending: Mutex<Pending>,
    /// Signalled when bytes leave the buffer.
    space: Condvar,
    /// Signalled when a push arrives or the buffer closes.
    work: Condvar,
    /// Most data bytes the buffer held at once.
    peak: AtomicU64,
}

impl PushBuffer {
    /// A buffer of `capacity` bytes (at least 1) whose drain thread stores
    /// into `sink`, latching failures in `latch`. [`Drain::finish`] stores
    /// what is left and stops the thread; dropping the [`Drain`] stops it
    /// without storing.
    pub fn start(
        capacity: usize,
        sink: Arc<dyn RangeSink>,
        latch: Arc<Latch>,
    ) -> io::Result<(Arc<PushBuffer>, Drain)> {
        let buffer = Arc::new(PushBuffer {
            capacity: capacity.max(1),
            pending: Mutex::new(Pending::default()),
            space: Condvar::new(),
            work: Condvar::new(),
            peak: AtomicU64::new(0),
        });
        let b = Arc::clone(&buffer);
        let thread = std::thread::Builder::new()
            .name("vma-live-pushes".into())
            .spawn(move || b.drain(sink.as_ref(), &latch))?;
        let drain = Drain {
            buffer: Arc::clone(&buffer),
            thread: Some(thread),
        };
        Ok((buffer, drain))
    }

    /// The most bytes of pushed data it held at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a piece, waiting while it does not fit.
    fn put(&self, device: usize, offset: u64, piece: Piece) {
        let n = piece.bytes();
        let mut p = self.lock();
        while p.bytes > 0 && p.bytes + n > self.capacity && !p.abandoned {
            p = self.space.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
        if p.abandoned || p.closed {
            return;
        }
        p.bytes += n;
        self.peak.fetch_max(p.bytes as u64, Ordering::Relaxed);
        p.queue.push_back((device, offset, piece));
        self.work.notify_one();
    }

    /// The drain thread: stores pieces in arrival order until closed and
    /// empty, or abandoned.
    fn drain(&self, sink: &dyn RangeSink, latch: &Latch) {
        loop {
            let (device, offset, piece) = {
                let mut p = self.lock();
                loop {
                    if p.abandoned {
                        return;
                    }
                    if let Some(item) = p.queue.pop_front() {
                        break item;
                    }
                    if p.closed {
                        return;
                    }
                    p = self.work.wait(p).unwrap_or_else(PoisonError::into_inner);
                }
            };
            if !latch.failed() {
                let stored = match &piece {
                    Piece::Data(d) => sink.write(device, offset, d),
                    Piece::Zeroes(n) => sink.write_zeroes(device, offset, *n),
                };
                if let Err(e) = stored {
                    latch.fail(e);
                }
            }
            self.lock().bytes -= piece.bytes();
            self.space.notify_all();
        }
    }

    fn stop(&self, abandon: bool) {
        let mut p = self.lock();
        p.closed = true;
        p.abandoned |= abandon;
        self.work.notify_all();
        self.space.notify_all();
    }
}

/// The drain thread of a [`PushBuffer`]; dropped, it stops at once and
/// drops what was not stored.
#[derive(Debug)]
pub struct Drain {
    buffer: Arc<PushBuffer>,
    thread: Option<JoinHandle<()>>,
}

impl Drain {
    /// Stores every push still buffered (no more may arrive: the NBD server
    /// has stopped) and stops the thread. Failures are in the latch.
    pub fn finish(mut self) {
        self.buffer.stop(false);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.buffer.stop(true);
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(usize, u64, u64, bool)>>,
        fail_at: Option<u64>,
    }

    impl Recorder {
        /// A recorder whose write at `offset` fails (with ENOSPC).
        fn failing_at(offset: u64) -> Arc<Recorder> {
            Arc::new(Recorder {
                fail_at: Some(offset),
                ..Recorder::default()
            })
        }
    }

    impl RangeSink for Recorder {
        fn write(&self, device: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
            if Some(offset) == self.fail_at {
                return Err(Error::Writer(vma_writer::Error::Sink {
                    offset,
                    source: Arc::new(io::Error::from_raw_os_error(libc::ENOSPC)),
                }));
            }
            self.calls
                .lock()
                .unwrap()
                .push((device, offset, data.len() as u64, false));
            Ok(())
        }
        fn write_zeroes(&self, device: usize, offset: u64, len: u64) -> Result<(), Error> {
            self.calls.lock().unwrap().push((device, offset, len, true));
            Ok(())
        }
    }

    #[test]
    fn writes_pass_through_and_failures_latch() {
        let rec = Recorder::failing_at(3 * CLUSTER);
        let latch = Arc::new(Latch::default());
        let size = 4 * CLUSTER + 512;
        let e = DriveExport::new(rec.clone(), latch.clone(), 1, size, None);
        e.write_at(&vec![1; 2 * CLUSTER as usize], CLUSTER).unwrap();
        e.write_zeroes(0, CLUSTER).unwrap();
        e.write_at(&[7; 512], 4 * CLUSTER).unwrap();
        assert!(!latch.failed());
        assert_eq!(e.counters().non_sequential.load(Ordering::Relaxed), 3);
        // Unaligned: latched, still acknowledged.
        e.write_at(&[0; 512], 100).unwrap();
        assert!(latch.failed());
        assert!(matches!(
            latch.take(),
            Some(Error::Unaligned {
                device: 2,
                offset: 100,
                len: 512
            })
        ));
        // After a failure nothing reaches the sink, everything is acked.
        e.write_at(&vec![1; CLUSTER as usize], 3 * CLUSTER).unwrap();
        assert_eq!(rec.calls.lock().unwrap().len(), 3);
        assert_eq!(e.counters().received(), size + 512);
    }

    #[test]
    fn sink_error_latches_first_error() {
        let rec = Recorder::failing_at(0);
        let latch = Arc::new(Latch::default());
        let e = DriveExport::new(rec, latch.clone(), 0, 2 * CLUSTER, None);
        e.write_at(&vec![1; CLUSTER as usize], 0).unwrap();
        e.write_at(&[1], 1).unwrap();
        assert!(latch.take().unwrap().is_no_space());
        assert!(e.flush().is_ok());
    }

    /// A sink whose writes wait until the gate opens.
    #[derive(Default)]
    struct Gated {
        inner: Recorder,
        open: Mutex<bool>,
        opened: Condvar,
    }

    impl Gated {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
        fn wait(&self) {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
    }

    impl RangeSink for Gated {
        fn write(&self, device: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
            self.wait();
            self.inner.write(device, offset, data)
        }
        fn write_zeroes(&self, device: usize, offset: u64, len: u64) -> Result<(), Error> {
            self.wait();
            self.inner.write_zeroes(device, offset, len)
        }
    }

    #[test]
    fn pushes_are_acknowledged_from_the_buffer_and_stored_once_behind_the_copy() {
        let sink = Arc::new(Gated::default());
        let latch = Arc::new(Latch::default());
        let size = 8 * CLUSTER;
        let (buffer, drain) =
            PushBuffer::start(2 * CLUSTER as usize, sink.clone(), latch.clone()).unwrap();
        let copy = DriveExport::new(sink.clone(), latch.clone(), 0, size, None);
        let push = Arc::new(copy.pushes(Arc::clone(&buffer)));
        // The archive writer is stuck, yet two clusters of pushes are acknowledged.
        push.write_at(&vec![2; CLUSTER as usize], 2 * CLUSTER)
            .unwrap();
        push.write_zeroes(6 * CLUSTER, CLUSTER).unwrap();
        push.write_at(&vec![3; CLUSTER as usize], 3 * CLUSTER)
            .unwrap();
        // A third waits for room: back-pressure, as without a buffer.
        let done = Arc::new(AtomicBool::new(false));
        let third = {
            let (push, done) = (Arc::clone(&push), Arc::clone(&done));
            std::thread::spawn(move || {
                push.write_at(&vec![4; CLUSTER as usize], 4 * CLUSTER)
                    .unwrap();
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !done.load(Ordering::SeqCst),
            "a push beyond the buffer waits"
        );
        assert!(sink.inner.calls.lock().unwrap().is_empty());
        sink.open();
        third.join().unwrap();
        // The background copy of everything stores only what was not pushed.
        copy.write_at(&vec![1; size as usize], 0).unwrap();
        drain.finish();
        assert!(!latch.failed());
        let mut calls = sink.inner.calls.lock().unwrap().clone();
        calls.sort_by_key(|c| c.1);
        assert_eq!(
            calls,
            [
                (0, 0, 2 * CLUSTER, false),
                (0, 2 * CLUSTER, CLUSTER, false),
                (0, 3 * CLUSTER, CLUSTER, false),
                (0, 4 * CLUSTER, CLUSTER, false),
                (0, 5 * CLUSTER, CLUSTER, false),
                (0, 6 * CLUSTER, CLUSTER, true),
                (0, 7 * CLUSTER, CLUSTER, false),
            ]
        );
        assert_eq!(buffer.peak(), 2 * CLUSTER);
        // Four pushes, and five requests in all.
        let c = copy.counters();
        assert_eq!(c.pushes.load(Ordering::Relaxed), 4);
        assert_eq!(c.requests.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_failed_drain_is_latched_and_an_abandoned_one_frees_waiting_pushes() {
        let rec = Recorder::failing_at(0);
        let latch = Arc::new(Latch::default());
        let (buffer, drain) = PushBuffer::start(1, rec.clone(), latch.clone()).unwrap();
        let push =
            DriveExport::new(rec.clone(), latch.clone(), 0, 4 * CLUSTER, None).pushes(buffer);
        push.write_at(&vec![1; CLUSTER as usize], 0).unwrap();
        push.write_at(&vec![1; CLUSTER as usize], CLUSTER).unwrap();
        drain.finish();
        assert!(latch.take().unwrap().is_no_space());
        assert!(
            rec.calls.lock().unwrap().is_empty(),
            "nothing stored after the failure"
        );

        // Abandoned while a push waits for room: the push returns, nothing is stored.
        let sink = Arc::new(Gated::default());
        let latch = Arc::new(Latch::default());
        let (buffer, drain) = PushBuffer::start(1, sink.clone(), latch.clone()).unwrap();
        let push =
            Arc::new(DriveExport::new(sink.clone(), latch, 0, 4 * CLUSTER, None).pushes(buffer));
        push.write_at(&vec![1; CLUSTER as usize], 0).unwrap();
        let waiting = {
            let push = Arc::clone(&push);
            std::thread::spawn(move || push.write_at(&vec![1; CLUSTER as usize], CLUSTER))
        };
        std::thread::sleep(Duration::from_millis(50));
        let dropper = std::thread::spawn(move || drop(drain));
        std::thread::sleep(Duration::from_millis(50));
        sink.open();
        dropper.join().unwrap();
        waiting.join().unwrap().unwrap();
        assert!(sink.inner.calls.lock().unwrap().len() <= 1);
    }

    #[test]
    fn each_cluster_is_stored_once() {
        let rec = Arc::new(Recorder::default());
        let latch = Arc::new(Latch::default());
        let size = 6 * CLUSTER + 512;
        let e = DriveExport::new(rec.clone(), latch.clone(), 0, size, None);
        // A push of cluster 2, then a background copy of clusters 0..6
        // overlapping it, then a zero request over 4..end, then the tail.
        e.write_at(&vec![2; CLUSTER as usize], 2 * CLUSTER).unwrap();
        e.write_at(&vec![1; 5 * CLUSTER as usize], 0).unwrap();
        e.write_zeroes(4 * CLUSTER, 2 * CLUSTER + 512).unwrap();
        e.write_at(&[9; 512], 6 * CLUSTER).unwrap();
        assert!(!latch.failed());
        assert_eq!(
            *rec.calls.lock().unwrap(),
            [
                (0, 2 * CLUSTER, CLUSTER, false),
                (0, 0, 2 * CLUSTER, false),
                (0, 3 * CLUSTER, 2 * CLUSTER, false),
                (0, 5 * CLUSTER, CLUSTER + 512, true),
            ]
        );
        // The bytes QEMU sent are all counted, stored or not.
        assert_eq!(e.counters().received(), 8 * CLUSTER + 1024);
    }
}
