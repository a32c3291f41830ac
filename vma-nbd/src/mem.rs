//! An export held in memory, for tests, examples and fuzzing.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::export::{BlockSize, BlockStatus, Errno, Export};

/// A RAM disk: the export's bytes in a `Vec`, with counters of what the server did.
///
/// ```
/// use vma_nbd::{Export, MemExport};
///
/// let disk = MemExport::new(vec![0; 1 << 20]).report_holes(64 * 1024);
/// disk.write_at(b"hello", 70_000)?;
/// let status = disk.block_status(0, 1 << 20)?;
/// assert!(status[0].hole && !status[1].hole);
/// assert_eq!(disk.writes(), 1);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct MemExport {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    hole_granule: Option<u64>,
    block: BlockSize,
    block_status_calls: AtomicUsize,
    writes: AtomicUsize,
    flushes: AtomicUsize,
}

impl MemExport {
    /// A writable export of these bytes, reporting everything as data.
    pub fn new(data: Vec<u8>) -> MemExport {
        MemExport {
            data: Mutex::new(data),
            read_only: false,
            hole_granule: None,
            block: BlockSize::default(),
            block_status_calls: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
        }
    }

    /// Makes the export read-only (writes fail with `EPERM`).
    pub fn read_only(mut self, yes: bool) -> MemExport {
        self.read_only = yes;
        self
    }

    /// Reports all-zero runs of `granule` bytes (aligned to it) as holes in
    /// [`block_status`](Export::block_status).
    pub fn report_holes(mut self, granule: u64) -> MemExport {
        self.hole_granule = Some(granule.max(1));
        self
    }

    /// Sets the block size constraints the export advertises.
    pub fn block_size(mut self, block: BlockSize) -> MemExport {
        self.block = block;
        self
    }

    /// A copy of the export's bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// How many writes the server made.
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// How many flushes the server made.
    pub fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }

    /// How many block status queries the server made.
    pub fn block_status_calls(&self) -> usize {
        self.block_status_calls.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The byte range `offset..offset + len` of a buffer of `size` bytes, if it lies inside.
fn range(offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
    usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(len)?))
        .filter(|r| r.end <= size)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.lock();
        buf.copy_from_slice(&data[range(offset, buf.len(), data.len())?]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(Errno::Perm.to_io_error());
        }
        let mut data = self.lock();
        let r = range(offset, buf.len(), data.len())?;
        data[r].copy_from_slice(buf);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<BlockStatus>> {
        self.block_status_calls.fetch_add(1, Ordering::SeqCst);
        let Some(granule) = self.hole_granule else {
            return Ok(vec![BlockStatus::data(u64::from(len))]);
        };
        let data = self.lock();
        let end = (offset + u64::from(len)).min(data.len() as u64);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let g_start = pos / granule * granule;
            let next = (g_start + granule).min(end);
            let g_end = (g_start + granule).min(data.len() as u64);
            let zero = data[g_start as usize..g_end as usize]
                .iter()
                .all(|&b| b == 0);
            out.push(if zero {
                BlockStatus::hole(next - pos)
            } else {
                BlockStatus::data(next - pos)
            });
            pos = next;
        }
        Ok(out)
    }

    fn block_size(&self) -> BlockSize {
        self.block
    }
}
