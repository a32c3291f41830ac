//! The prefetching reader: the streaming reader with its input read on a thread of its
//! own, into a few whole extent buffers handed over without a copy.

use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread;

use vma_iobuf::AlignedBuf;

use crate::error::{Error, Result};
use crate::stream::{
    core_accessors, read_extents, sealed, stream_methods, ArchiveStream, Core, Extent, Fill, Input,
};
use crate::ReadOptions;

/// Buffers of a prefetching reader: one being filled, one ready, one in use. Each holds
/// one extent of the largest size, or smaller ones up to 1 MiB in all.
pub const PREFETCH_BUFFERS: usize = 3;

/// Bytes of small extents a prefetching reader gathers in one buffer before handing it
/// over: enough that a run of header-only extents costs few hand-overs, little enough
/// that an archive of small extents touches (page-faults in) little of the buffers.
const BATCH: usize = 1 << 20;

/// A streaming reader whose input is read on a thread of its own: the same extents,
/// checks, results and errors (at the same bytes) as a [`StreamReader`](crate::StreamReader)
/// over the same input.
///
/// [`new`](Self::new) reads and checks the archive header, then starts a thread that reads
/// extent after extent into up to [`PREFETCH_BUFFERS`] extent buffers, each handed over
/// whole: on two cores reading (a `read` system call's copy, or a decompressor) and
/// checking (CRC32C, the caller's writes) overlap, and no byte is copied twice. Small
/// extents are gathered up to 1 MiB per buffer.
///
/// The thread stops at the end of the input, after the first read error or damaged header
/// (which the reader then reports exactly as a direct one would), or when the reader is
/// dropped; a thread blocked in `read` on a pipe stops when that returns.
pub struct PrefetchingReader {
    core: Core,
    thread: Prefetch,
}

impl PrefetchingReader {
    /// Reads and checks the archive header with default [`ReadOptions`], then starts the
    /// reading thread.
    pub fn new<R: Read + Send + 'static>(reader: R) -> Result<PrefetchingReader> {
        Self::with_options(reader, ReadOptions::default())
    }

    /// Reads and checks the archive header, then starts the reading thread.
    pub fn with_options<R: Read + Send + 'static>(
        mut reader: R,
        options: ReadOptions,
    ) -> Result<PrefetchingReader> {
        let core = Core::open(&mut reader, options)?;
        let thread = Prefetch::spawn(Box::new(reader)).map_err(|source| Error::Read {
            offset: core.header_size(),
            source,
        })?;
        Ok(PrefetchingReader { core, thread })
    }

    /// The next extent, checked; `Ok(None)` once the archive ended complete.
    pub fn next_extent(&mut self) -> Result<Option<Extent<'_>>> {
        self.core.next_extent(Input::Prefetch(&mut self.thread))
    }

    /// Bytes of memory the reader holds, roughly: all its extent buffers, wherever they
    /// are, and the set of clusters seen.
    pub fn memory(&self) -> usize {
        self.thread.buffer_bytes.load(Ordering::Relaxed) + self.core.walk_memory()
    }

    core_accessors!();

    fn core(&self) -> &Core {
        &self.core
    }

    pub(crate) fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
}

impl sealed::Stream for PrefetchingReader {}

impl ArchiveStream for PrefetchingReader {
    stream_methods!(PrefetchingReader);
}

/// The reading thread of a prefetching reader, its two channels (filled buffers to the
/// reader, used ones back) and the extents of the current buffer not yet handed out.
pub(crate) struct Prefetch {
    filled: Receiver<(AlignedBuf, Vec<Fill>)>,
    used: SyncSender<AlignedBuf>,
    pending: std::vec::IntoIter<Fill>,
    /// Bytes allocated for the buffers, kept up to date by the thread.
    buffer_bytes: Arc<AtomicUsize>,
}

impl Prefetch {
    fn spawn(mut input: Box<dyn Read + Send>) -> io::Result<Prefetch> {
        let (to_reader, filled) = sync_channel(1);
        let (used, from_reader) = sync_channel::<AlignedBuf>(PREFETCH_BUFFERS);
        let buffer_bytes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&buffer_bytes);
        thread::Builder::new()
            .name("vma-prefetch".into())
            .spawn(move || {
                let mut allocated = 0;
                let mut carry = None;
                loop {
                    let mut buf = match from_reader.try_recv() {
                        Ok(buf) => buf,
                        Err(_) if allocated < PREFETCH_BUFFERS => {
                            allocated += 1;
                            AlignedBuf::default()
                        }
                        Err(_) => match from_reader.recv() {
                            Ok(buf) => buf,
                            Err(_) => return,
                        },
                    };
                    let before = buf.capacity();
                    let (fills, last) = read_extents(&mut *input, &mut buf, &mut carry, BATCH);
                    // Buffers only grow.
                    counted.fetch_add(buf.capacity() - before, Ordering::Relaxed);
                    if to_reader.send((buf, fills)).is_err() || last {
                        return;
                    }
                }
            })?;
        Ok(Prefetch {
            filled,
            used,
            pending: Vec::new().into_iter(),
            buffer_bytes,
        })
    }

    /// The next extent: in `buf` already, or in the next buffer, which replaces `buf`
    /// (handed back to the thread). `None` if the thread is gone without a last word (it
    /// panicked).
    pub(crate) fn next(&mut self, buf: &mut AlignedBuf) -> Option<Fill> {
        loop {
            if let Some(fill) = self.pending.next() {
                return Some(fill);
            }
            let (next, fills) = self.filled.recv().ok()?;
            let done = std::mem::replace(buf, next);
            if done.capacity() > 0 {
                // The thread may have stopped (its last buffer sent): then it is freed.
                let _ = self.used.try_send(done);
            }
            self.pending = fills.into_iter();
        }
    }
}
