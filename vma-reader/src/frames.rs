//! One pass over a seekable zstd archive with its frames decompressed on several threads.
//!
//! zstd's own decoder is one thread, and on an archive that compresses well decompression
//! costs more than everything else an extract does. The frames of a seekable `.vma.zst`
//! (as `vma create X.vma.zst` writes it) are independent, so a reader of the file (not a
//! pipe) can decompress the next few frames at once, each on a worker, by positional
//! reads, and hand their contents over in order.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use crate::error::{Error, Result};
use crate::read_at::ReadAt;
use crate::source::{into_io, ZstdSource, FRAME_CACHE_BYTES};

/// A frame to decompress, and the buffer to decompress it into.
struct Job {
    frame: usize,
    content: Vec<u8>,
}

/// A worker's answer: the frame and its content, or why it has none.
struct Done {
    frame: usize,
    content: Result<Vec<u8>>,
}

/// The archive bytes of a seekable zstd file, in order, as a `Read`: the frames ahead of
/// the reader are decompressed on worker threads (and checked against the seek table and
/// their checksums) while it consumes the current one.
///
/// Memory: the frames in flight hold at most [`FRAME_CACHE_BYTES`] of content (at least
/// one frame, whatever its size), plus each worker's copy of its compressed frame; the
/// buffers are reused from frame to frame. A damaged frame is reported when the reader
/// reaches it, as an [`io::ErrorKind::InvalidData`] error carrying the reader's
/// [`Error::Frame`], after the content of every frame before it.
pub struct ParallelZstdReader {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    /// Content length of each frame, from the seek table.
    lens: Vec<usize>,
    /// The next frame to hand to a worker, and the next to give the reader.
    next_job: usize,
    next_out: usize,
    /// Frames handed out and not yet given to the reader, and their content bytes.
    in_flight: usize,
    in_flight_bytes: usize,
    /// Frames back from the workers ahead of the one the reader needs.
    arrived: BTreeMap<usize, Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
    spare: Vec<Vec<u8>>,
    /// An error was returned: the reader ends there.
    failed: bool,
}

impl ParallelZstdReader {
    /// Opens a seekable zstd file for one pass with `threads` decompressing workers (at
    /// least one). A zstd file without a seek table is [`Error::NotSeekable`].
    pub fn open(file: File, threads: usize) -> Result<ParallelZstdReader> {
        Self::from_source(Arc::new(file), threads)
    }

    /// [`open`](Self::open) of any byte source (a file, an object in a bucket).
    pub fn from_source(file: Arc<dyn ReadAt>, threads: usize) -> Result<ParallelZstdReader> {
        let len = file
            .size()
            .map_err(|source| Error::Read { offset: 0, source })?;
        let source = Arc::new(ZstdSource::open(file, len)?);
        let lens = (0..source.index().frames())
            .map(|f| source.index().frame(f).expect("a frame of the index").len as usize)
            .collect();
        let (jobs, job_queue) = channel::<Job>();
        let job_queue = Arc::new(Mutex::new(job_queue));
        let (done_tx, done) = channel();
        let workers = (0..threads.max(1))
            .map(|n| {
                let (source, job_queue, done_tx) =
                    (Arc::clone(&source), Arc::clone(&job_queue), done_tx.clone());
                thread::Builder::new()
                    .name(format!("zstd-frames-{n}"))
                    .spawn(move || work(&source, &job_queue, &done_tx))
                    .map_err(|source| Error::Read { offset: 0, source })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ParallelZstdReader {
            jobs: Some(jobs),
            done,
            workers,
            lens,
            next_job: 0,
            next_out: 0,
            in_flight: 0,
            in_flight_bytes: 0,
            arrived: BTreeMap::new(),
            current: Vec::new(),
            pos: 0,
            spare: Vec::new(),
            failed: false,
        })
    }

    /// Hands frames to the workers while the frames in flight stay within the bound.
    fn dispatch(&mut self) {
        let Some(jobs) = &self.jobs else { return };
        while self.next_job < self.lens.len() {
            let len = self.lens[self.next_job];
            let limit = 2 * self.workers.len() + 1;
            if self.in_flight > 0
                && (self.in_flight >= limit || self.in_flight_bytes + len > FRAME_CACHE_BYTES)
            {
                break;
            }
            let content = self.spare.pop().unwrap_or_default();
            let job = Job {
                frame: self.next_job,
                content,
            };
            if jobs.send(job).is_err() {
                // Every worker is gone (each stops only when the queue closes or it
                // panics); the wait below reports it.
                break;
            }
            self.next_job += 1;
            self.in_flight += 1;
            self.in_flight_bytes += len;
        }
    }

    /// The content of the next frame, once its worker is done with it.
    fn next_frame(&mut self) -> Result<Vec<u8>> {
        let frame = self.next_out;
        let content = loop {
            if let Some(content) = self.arrived.remove(&frame) {
                break content;
            }
            match self.done.recv() {
                Ok(done) => {
                    self.arrived.insert(done.frame, done.content);
                }
                Err(_) => {
                    break Err(Error::Read {
                        offset: 0,
                        source: io::Error::other("a zstd decompression thread died"),
                    })
                }
            }
        };
        self.next_out += 1;
        self.in_flight -= 1;
        self.in_flight_bytes -= self.lens[frame];
        content
    }
}

/// A worker: decompresses the frames it is given until the queue closes.
fn work(source: &ZstdSource, jobs: &Mutex<Receiver<Job>>, done: &Sender<Done>) {
    let mut compressed = Vec::new();
    loop {
        let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(Job { frame, mut content }) = job else {
            return;
        };
        // A panic would leave the reader waiting for this frame forever: it becomes the
        // frame's error instead.
        let content = panic::catch_unwind(AssertUnwindSafe(|| {
            source.decompress_into(frame, &mut compressed, &mut content)
        }))
        .unwrap_or_else(|_| {
            Err(Error::Read {
                offset: 0,
                source: io::Error::other("a zstd decompression thread panicked"),
            })
        })
        .map(|()| content);
        if done.send(Done { frame, content }).is_err() {
            return;
        }
    }
}

impl Read for ParallelZstdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.failed || self.next_out == self.lens.len() {
                return Ok(0);
            }
            self.dispatch();
            match self.next_frame() {
                Ok(content) => {
                    let done = std::mem::replace(&mut self.current, content);
                    if done.capacity() > 0 {
                        self.spare.push(done);
                    }
                    self.pos = 0;
                }
                Err(e) => {
                    self.failed = true;
                    return Err(into_io(e));
                }
            }
            self.dispatch();
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl fmt::Debug for ParallelZstdReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParallelZstdReader")
            .field("frames", &self.lens.len())
            .field("next_frame", &self.next_out)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl Drop for ParallelZstdReader {
    fn drop(&mut self) {
        // Closing the queue stops each worker after its current frame.
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
