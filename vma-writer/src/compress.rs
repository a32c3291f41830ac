//! Seekable zstd output: a `Write` that compresses an archive on several threads into
//! independent zstd frames cut at extent boundaries, and ends it with the seek table of
//! zstd's seekable format (see `vma_format::seek_table`).
//!
//! The bytes written are the plain archive, in order. The writer follows its layout as it
//! passes (the header's `header_size`, then each extent's `block_count`) to know where
//! extents end, gathers whole extents into a frame until it holds at least the target
//! size, and hands the frame to a worker thread. Finished frames are written in order as
//! they come back. Any `zstd` decoder reads the result as one stream (the seek table is
//! a skippable frame); a seekable reader decompresses only the frames it needs.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::mem;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use vma_format::seek_table::{self, FrameEntry};
use vma_format::{ArchiveHeader, ExtentHeader};

/// Default content of a frame: whole extents are gathered until a frame holds at least
/// this much. Large enough that starting each frame without history costs little ratio
/// (measured in benches/RESULTS.md), small enough that a random read decompresses little.
pub const DEFAULT_FRAME_SIZE: usize = 2 << 20;
/// Bytes a frame holds at most when the input does not look like an archive (frames are
/// then cut every this many bytes); an archive's frames stay below the target size plus
/// one extent.
const OPAQUE_FRAME_SIZE: usize = 4 << 20;
/// Bytes of the archive header read before its size is known.
const HEADER_PREFIX: usize = vma_format::header_offsets::RESERVED;

/// Options of a [`ZstdWriter`].
#[derive(Debug, Clone, Copy)]
pub struct ZstdOptions {
    /// zstd compression level (as `zstd -LEVEL`).
    pub level: i32,
    /// Worker threads compressing frames.
    pub threads: usize,
    /// Target content of a frame, see [`DEFAULT_FRAME_SIZE`].
    pub frame_size: usize,
}

impl Default for ZstdOptions {
    /// Level 3 (zstd's default, and vzdump's), one worker per core, 2 MiB frames.
    fn default() -> Self {
        ZstdOptions {
            level: 3,
            threads: thread::available_parallelism().map_or(1, |n| n.get()),
            frame_size: DEFAULT_FRAME_SIZE,
        }
    }
}

/// What a finished [`ZstdWriter`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ZstdSummary {
    /// zstd frames written (the seek table not counted).
    pub frames: u64,
    /// Bytes written into the writer (the plain archive).
    pub content_bytes: u64,
    /// Bytes written to the inner writer, seek table included.
    pub compressed_bytes: u64,
}

/// A frame for a worker: its number and content.
type Job = (u64, Vec<u8>);
/// A worker's answer: the frame's number, its content buffer (for reuse) and the
/// compressed frame.
type Done = (u64, Vec<u8>, io::Result<Vec<u8>>);

/// A `Write` that compresses what it is given into seekable zstd, see the module docs.
///
/// Memory: at most `2 * threads` frames in flight (each up to the frame size plus one
/// extent, about 6 MiB at the defaults), their compressed copies, and 8 bytes per frame
/// for the seek table. [`finish`](Self::finish) must be called to write the last frame
/// and the table; a writer dropped without it stops its threads and leaves the output
/// without a table (and without its last frames).
pub struct ZstdWriter<W: Write> {
    inner: W,
    frame_size: usize,
    /// The frame being gathered, and where it starts in the archive.
    frame: Vec<u8>,
    frame_start: u64,
    layout: Layout,
    pool: Pool,
    max_in_flight: usize,
    next_frame: u64,
    next_write: u64,
    /// Compressed frames back from the workers before their turn.
    ready: BTreeMap<u64, Vec<u8>>,
    spare: Vec<Vec<u8>>,
    entries: Vec<FrameEntry>,
    compressed: u64,
    /// The first failure (compressing or writing), returned by every later call.
    failed: Option<(io::ErrorKind, String)>,
}

/// Where the unit (header or extent) being passed starts and, once its first bytes were
/// seen, where it ends.
#[derive(Debug, Clone, Copy)]
struct Layout {
    start: u64,
    end: Option<u64>,
    /// The input is not an archive: frames are cut by size alone.
    opaque: bool,
}

impl<W: Write> ZstdWriter<W> {
    /// Starts the workers; the archive is written into `inner` frame by frame.
    pub fn new(inner: W, options: ZstdOptions) -> io::Result<ZstdWriter<W>> {
        let threads = options.threads.max(1);
        let (jobs, job_rx) = channel::<Job>();
        let (done_tx, done) = channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (job_rx, done_tx) = (Arc::clone(&job_rx), done_tx.clone());
            let level = options.level;
            let worker = thread::Builder::new()
                .name(format!("vma-zstd-{i}"))
                .spawn(move || compress_frames(level, &job_rx, &done_tx))?;
            workers.push(worker);
        }
        Ok(ZstdWriter {
            inner,
            frame_size: options.frame_size.max(1),
            frame: Vec::new(),
            frame_start: 0,
            layout: Layout {
                start: 0,
                end: None,
                opaque: false,
            },
            pool: Pool {
                jobs: Some(jobs),
                done,
                workers,
            },
            max_in_flight: 2 * threads,
            next_frame: 0,
            next_write: 0,
            ready: BTreeMap::new(),
            spare: Vec::new(),
            entries: Vec::new(),
            compressed: 0,
            failed: None,
        })
    }

    /// Compresses what is left, writes the last frames and the seek table, flushes, and
    /// gives back the inner writer.
    pub fn finish(mut self) -> io::Result<(W, ZstdSummary)> {
        self.check()?;
        if !self.frame.is_empty() {
            let len = self.frame.len();
            self.cut(len)?;
        }
        self.pool.jobs = None;
        while self.next_write < self.next_frame {
            self.wait_one()?;
        }
        let table = seek_table::encode(&self.entries);
        self.emit(&table)?;
        self.inner.flush()?;
        let summary = ZstdSummary {
            frames: self.entries.len() as u64,
            content_bytes: self.entries.iter().map(|e| e.decompressed as u64).sum(),
            compressed_bytes: self.compressed,
        };
        let ZstdWriter { inner, pool, .. } = self;
        drop(pool);
        Ok((inner, summary))
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some((kind, message)) => Err(io::Error::new(*kind, message.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        if self.failed.is_none() {
            self.failed = Some((e.kind(), e.to_string()));
        }
        e
    }

    /// Follows the layout through the bytes gathered and cuts the frame at the end of each
    /// unit once it is large enough.
    fn cut_at_boundaries(&mut self) -> io::Result<()> {
        loop {
            let gathered_end = self.frame_start + self.frame.len() as u64;
            if self.layout.opaque {
                if self.frame.len() >= OPAQUE_FRAME_SIZE {
                    self.cut(OPAQUE_FRAME_SIZE)?;
                    continue;
                }
                return Ok(());
            }
            let end = match self.layout.end {
                Some(end) => end,
                None => {
                    let at = (self.layout.start - self.frame_start) as usize;
                    let len = match unit_len(self.layout.start, &self.frame[at..]) {
                        Unit::Len(len) => len,
                        Unit::Wait => return Ok(()),
                        Unit::Opaque => {
                            self.layout.opaque = true;
                            continue;
                        }
                    };
                    let end = self.layout.start + len as u64;
                    self.layout.end = Some(end);
                    end
                }
            };
            if end > gathered_end {
                return Ok(());
            }
            self.layout = Layout {
                start: end,
                end: None,
                opaque: false,
            };
            let len = (end - self.frame_start) as usize;
            if len >= self.frame_size {
                self.cut(len)?;
            }
        }
    }

    /// Sends the first `len` gathered bytes off as a frame.
    fn cut(&mut self, len: usize) -> io::Result<()> {
        let mut rest = self.spare.pop().unwrap_or_default();
        rest.clear();
        rest.extend_from_slice(&self.frame[len..]);
        self.frame.truncate(len);
        let frame = mem::replace(&mut self.frame, rest);
        self.frame_start += len as u64;
        while self.next_frame - self.next_write >= self.max_in_flight as u64 {
            self.wait_one()?;
        }
        let sent = self
            .pool
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send((self.next_frame, frame)).is_ok());
        if !sent {
            return Err(self.fail(io::Error::other("a zstd worker thread stopped")));
        }
        self.next_frame += 1;
        while let Ok(done) = self.pool.done.try_recv() {
            self.take(done)?;
        }
        self.write_ready()
    }

    /// Waits for the next frame in order and writes it (with any after it that are back).
    fn wait_one(&mut self) -> io::Result<()> {
        while !self.ready.contains_key(&self.next_write) {
            let Ok(done) = self.pool.done.recv() else {
                return Err(self.fail(io::Error::other("a zstd worker thread stopped")));
            };
            self.take(done)?;
        }
        self.write_ready()
    }

    fn take(&mut self, (index, content, compressed): Done) -> io::Result<()> {
        let compressed = compressed.map_err(|e| self.fail(e))?;
        let entry = FrameEntry {
            compressed: compressed.len() as u32,
            decompressed: content.len() as u32,
        };
        // Entries are kept in frame order: slot them by number.
        let i = index as usize;
        if self.entries.len() <= i {
            self.entries.resize(
                i + 1,
                FrameEntry {
                    compressed: 0,
                    decompressed: 0,
                },
            );
        }
        self.entries[i] = entry;
        if self.spare.len() < self.max_in_flight {
            self.spare.push(content);
        }
        self.ready.insert(index, compressed);
        Ok(())
    }

    fn write_ready(&mut self) -> io::Result<()> {
        while let Some(frame) = self.ready.remove(&self.next_write) {
            self.emit(&frame)?;
            self.next_write += 1;
        }
        Ok(())
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes).map_err(|e| self.fail(e))?;
        self.compressed += bytes.len() as u64;
        Ok(())
    }
}

impl<W: Write> Write for ZstdWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        self.frame.extend_from_slice(buf);
        self.cut_at_boundaries()?;
        Ok(buf.len())
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.check()?;
        let mut n = 0;
        for buf in bufs {
            self.frame.extend_from_slice(buf);
            n += buf.len();
        }
        self.cut_at_boundaries()?;
        Ok(n)
    }

    /// Writes completed frames' bytes on; does not end a frame early (that would cost
    /// ratio and move frame boundaries off extent boundaries).
    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        self.write_ready()?;
        self.inner.flush()
    }
}

/// What the first bytes of a unit say.
enum Unit {
    /// Its length.
    Len(usize),
    /// Too few bytes yet.
    Wait,
    /// The input is not an archive.
    Opaque,
}

/// The length of the unit at archive offset `start` whose first bytes are `bytes`.
fn unit_len(start: u64, bytes: &[u8]) -> Unit {
    if start == 0 {
        if bytes.len() < HEADER_PREFIX {
            return Unit::Wait;
        }
        return match ArchiveHeader::header_size_from_prefix(bytes) {
            Ok(len) => Unit::Len(len),
            Err(_) => Unit::Opaque,
        };
    }
    ExtentHeader::len_from_prefix(bytes).map_or(Unit::Wait, Unit::Len)
}

/// The worker threads and their channels. Dropped, it closes the job channel (the
/// workers end after their current frame) and joins them.
struct Pool {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A worker: compresses frames until the job channel closes.
fn compress_frames(level: i32, jobs: &Mutex<Receiver<Job>>, done: &Sender<Done>) {
    let mut compressor = match ::zstd::bulk::Compressor::new(level) {
        Ok(c) => c,
        Err(e) => {
            // Answer every job with the error, so that the writer reports it.
            while let Ok((index, content)) = recv(jobs) {
                let _ = done.send((index, content, Err(io::Error::new(e.kind(), e.to_string()))));
            }
            return;
        }
    };
    let setup = compressor
        .include_checksum(true)
        .and_then(|()| compressor.include_contentsize(true));
    while let Ok((index, content)) = recv(jobs) {
        let result = match &setup {
            Ok(()) => compressor.compress(&content),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        if done.send((index, content, result)).is_err() {
            return;
        }
    }
}

fn recv(jobs: &Mutex<Receiver<Job>>) -> Result<Job, std::sync::mpsc::RecvError> {
    jobs.lock().unwrap_or_else(PoisonError::into_inner).recv()
}
