//! Images in any format QEMU knows, through `qemu-storage-daemon` on a private unix
//! socket and the NBD client of `vma-nbd`: restore targets ([`NbdSink`]), new images for
//! `extract --format` ([`create_image`]) and `create` sources ([`NbdSource`]).

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use vma_nbd::{Client, Pending, PendingRead, StorageDaemon, ZeroMode};
use vma_writer::{Device, WriterHandle};

use crate::error::{CliError, Exit, Result};

/// Image formats handed to QEMU: those `qemu-img` can create and write, and the
/// read-only ones `create` can read. Anything else is refused before QEMU runs.
pub(crate) const FORMATS: [&str; 13] = [
    "raw",
    "qcow2",
    "qcow",
    "vmdk",
    "vdi",
    "vhdx",
    "vpc",
    "qed",
    "parallels",
    "bochs",
    "cloop",
    "dmg",
    "luks",
];

/// Requests kept in flight on one connection.
const WINDOW: usize = 16;
/// Bytes per read of a `create` source: 16 clusters. With [`WINDOW`] reads in flight
/// and [`QUEUE`] chunks queued, at most 20 MiB are read ahead of the writer.
const READ_CHUNK: u64 = 1 << 20;
/// Read chunks queued between the NBD reader and the archive writer.
const QUEUE: usize = 4;
const CLUSTER: u64 = vma_format::VMA_CLUSTER_SIZE as u64;

/// A usage error for a format name QEMU is not asked about.
pub(crate) fn check_format(format: &str, what: &str) -> Result<()> {
    if FORMATS.contains(&format) {
        return Ok(());
    }
    Err(CliError::usage(format!(
        "{what}: unknown image format '{format}' (known: {})",
        FORMATS.join(", ")
    )))
}

/// An error of QEMU's side, naming the image (QEMU's own message included where it said
/// one). Exit 4: the image cannot be read or written as asked.
fn qemu_error(image: &Path, e: vma_nbd::Error) -> CliError {
    let text = e.to_string();
    let message = if text.contains(&image.display().to_string()) {
        text
    } else {
        format!("{}: {text}", image.display())
    };
    CliError::new(Exit::Io, message)
}

/// Starts a daemon that opens `image` as `format` and connects to it, with up to
/// [`WINDOW`] requests in flight. The daemon dies with this process, however it ends
/// (SIGKILL included): every caller starts it on the main thread, which lives as long.
fn open(image: &Path, format: &str, writable: bool) -> Result<(StorageDaemon, Client)> {
    let daemon = StorageDaemon::builder(image, format)
        .writable(writable)
        .die_with_parent(true)
        .start()
        .map_err(|e| qemu_error(image, e))?;
    let client = daemon
        .connect_with(Client::builder().max_in_flight(WINDOW))
        .map_err(|e| qemu_error(image, e))?;
    Ok((daemon, client))
}

/// Creates a new image of `size` bytes with `qemu-img create` (it must not exist).
pub(crate) fn create_image(path: &Path, format: &str, size: u64) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(CliError::new(
            Exit::Io,
            format!("{}: already exists", path.display()),
        ));
    }
    vma_nbd::create_image(path, format, size).map_err(|e| qemu_error(path, e))
}

/// An existing image written through a writable daemon, with up to [`WINDOW`] requests
/// in flight. Zeroing sends `WRITE_ZEROES` (which may deallocate); requests not aligned
/// to the export's minimum block size (vhdx, qed: 512) are read, patched and written.
pub(crate) struct NbdSink {
    image: PathBuf,
    daemon: Option<StorageDaemon>,
    client: Option<Client>,
    window: VecDeque<Pending>,
    min: u64,
    size: u64,
}

impl NbdSink {
    /// Opens `image` as `format` for writing.
    pub(crate) fn open(image: &Path, format: &str) -> Result<NbdSink> {
        let (daemon, client) = open(image, format, true)?;
        Ok(NbdSink {
            image: image.to_owned(),
            min: u64::from(client.block_size().min.max(1)),
            size: client.size(),
            client: Some(client),
            daemon: Some(daemon),
            window: VecDeque::new(),
        })
    }

    /// The image's guest-visible size.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    fn client(&self) -> io::Result<&Client> {
        self.client
            .as_ref()
            .ok_or_else(|| io::Error::other("the connection to qemu-storage-daemon is closed"))
    }

    /// The error of a failed request: the connection and the daemon are shut down, and
    /// how the daemon ended (it may have died) is added to the message.
    fn fail(&mut self, e: vma_nbd::Error) -> io::Error {
        self.window.clear();
        drop(self.client.take());
        let ended = match self.daemon.take().map(StorageDaemon::shutdown) {
            Some(Err(d)) => format!(" ({d})"),
            _ => String::new(),
        };
        io::Error::other(format!("{e}{ended}"))
    }

    fn push(&mut self, submitted: std::result::Result<Pending, vma_nbd::Error>) -> io::Result<()> {
        match submitted {
            Ok(p) => self.window.push_back(p),
            Err(e) => return Err(self.fail(e)),
        }
        if self.window.len() > WINDOW {
            if let Some(p) = self.window.pop_front() {
                p.wait().map_err(|e| self.fail(e))?;
            }
        }
        Ok(())
    }

    fn drain(&mut self) -> io::Result<()> {
        while let Some(p) = self.window.pop_front() {
            p.wait().map_err(|e| self.fail(e))?;
        }
        Ok(())
    }

    /// Writes `data` (or zeros, when `None`) at an unaligned range: waits for what is in
    /// flight, reads the aligned blocks around it, patches them and writes them back.
    fn patch(&mut self, data: Option<&[u8]>, offset: u64, len: u64) -> io::Result<()> {
        self.drain()?;
        let start = offset / self.min * self.min;
        let end = (offset + len)
            .div_ceil(self.min)
            .saturating_mul(self.min)
            .min(self.size);
        let mut buf = vec![0u8; (end - start) as usize];
        let at = (offset - start) as usize;
        let result = self.client()?.read_at(&mut buf, start).and_then(|()| {
            match data {
                Some(d) => buf[at..at + d.len()].copy_from_slice(d),
                None => buf[at..at + len as usize].fill(0),
            }
            self.client()
                .map_err(vma_nbd::Error::Io)?
                .write_at(&buf, start)
        });
        result.map_err(|e| self.fail(e))
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.min) && len.is_multiple_of(self.min)
    }
}

impl vma_reader::DeviceSink for NbdSink {
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        if !self.aligned(offset, data.len() as u64) {
            return self.patch(Some(data), offset, data.len() as u64);
        }
        let submitted = self.client()?.submit_write(data, offset);
        self.push(submitted)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let a = offset.div_ceil(self.min) * self.min;
        let b = (offset + len) / self.min * self.min;
        if a >= b {
            return self.patch(None, offset, len);
        }
        if a > offset {
            self.patch(None, offset, a - offset)?;
        }
        let submitted = self
            .client()?
            .submit_write_zeroes(a, b - a, ZeroMode::MayUnmap);
        self.push(submitted)?;
        if offset + len > b {
            self.patch(None, b, offset + len - b)?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        self.drain()?;
        let flushed = self.client()?.flush();
        flushed.map_err(|e| self.fail(e))?;
        if let Some(c) = self.client.take() {
            c.disconnect().map_err(|e| self.fail(e))?;
        }
        match self.daemon.take() {
            Some(d) => d.shutdown().map_err(|e| io::Error::other(e.to_string())),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for NbdSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdSink")
            .field("image", &self.image)
            .finish_non_exhaustive()
    }
}

/// A `create` source: an image read through a read-only daemon.
pub(crate) struct NbdSource {
    daemon: StorageDaemon,
    client: Client,
    /// The image's guest-visible size.
    pub(crate) len: u64,
}

impl NbdSource {
    /// Opens `image` as `format` for reading.
    pub(crate) fn open(image: &Path, format: &str) -> Result<NbdSource> {
        let (daemon, client) = open(image, format, false)?;
        Ok(NbdSource {
            len: client.size(),
            daemon,
            client,
        })
    }

    /// Stops the daemon; fails if it had died (how it ended says more than the lost
    /// connection does).
    pub(crate) fn close(self) -> std::result::Result<(), vma_nbd::Error> {
        let NbdSource { daemon, client, .. } = self;
        let disconnected = client.disconnect();
        daemon.shutdown().and(disconnected)
    }
}

/// What the NBD reader hands the archive writer, in device order.
enum Item {
    /// Bytes at an offset (the bytes past the image end are zeros already).
    Data(u64, Vec<u8>),
    /// A range that reads as zero.
    Zero(u64, u64),
}

/// A request of the reader's window.
enum Queued {
    Read(u64, u64, PendingRead),
    Zero(u64, u64),
}

fn source_error(offset: u64, e: impl std::fmt::Display) -> vma_writer::Error {
    vma_writer::Error::Source {
        offset,
        source: std::sync::Arc::new(io::Error::other(e.to_string())),
    }
}

/// Backs up an image served by `source` into `device`: a reader thread asks block status,
/// skips what reads as zero and keeps reads in flight ahead of the writer (this thread),
/// which packs what arrives into the archive. `progress` gets the device bytes done.
pub(crate) fn write_source(
    handle: &WriterHandle,
    device: Device,
    source: &NbdSource,
    progress: &mut dyn FnMut(u64),
) -> std::result::Result<(), vma_writer::Error> {
    let size = handle.device_size(device)?;
    let (tx, rx) = mpsc::sync_channel::<std::result::Result<Item, vma_writer::Error>>(QUEUE);
    let (spare_tx, spare) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let mut plan = Plan::new(&source.client, source.len, size, &tx, spare);
            if let Err(e) = plan.run() {
                let _ = tx.send(Err(e));
            }
        });
        let mut outcome = Ok(());
        for item in rx.iter() {
            let done = match item {
                Ok(Item::Data(at, buf)) => {
                    let r = handle.write_range(device, at, &buf);
                    let end = at + buf.len() as u64;
                    let _ = spare_tx.send(buf);
                    r.map(|()| end)
                }
                Ok(Item::Zero(at, len)) => {
                    handle.write_zero_range(device, at, len).map(|()| at + len)
                }
                Err(e) => Err(e),
            };
            match done {
                Ok(end) => progress(end),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        // Unblocks a reader waiting to send, if the writer stopped early.
        drop(rx);
        let _ = reader.join();
        outcome
    })
}

/// The reader's side of [`write_source`].
struct Plan<'a> {
    client: &'a Client,
    /// The image's size, and the device's (rounded up to 512).
    len: u64,
    size: u64,
    tx: &'a mpsc::SyncSender<std::result::Result<Item, vma_writer::Error>>,
    spare: mpsc::Receiver<Vec<u8>>,
    window: VecDeque<Queued>,
    reads: usize,
    /// Everything before this is queued.
    cursor: u64,
    /// Data not yet queued, on cluster boundaries.
    pending: Option<Range<u64>>,
}

impl<'a> Plan<'a> {
    fn new(
        client: &'a Client,
        len: u64,
        size: u64,
        tx: &'a mpsc::SyncSender<std::result::Result<Item, vma_writer::Error>>,
        spare: mpsc::Receiver<Vec<u8>>,
    ) -> Plan<'a> {
        Plan {
            client,
            len,
            size,
            tx,
            spare,
            window: VecDeque::new(),
            reads: 0,
            cursor: 0,
            pending: None,
        }
    }

    fn run(&mut self) -> std::result::Result<(), vma_writer::Error> {
        match self.walk() {
            Ok(()) | Err(Walk::Stopped) => Ok(()),
            Err(Walk::Failed(e)) => Err(e),
        }
    }

    fn walk(&mut self) -> std::result::Result<(), Walk> {
        let mut pos = 0;
        while pos < self.len {
            let extents = self
                .client
                .block_status(pos, self.len - pos)
                .map_err(|e| Walk::Failed(source_error(pos, e)))?;
            if extents.iter().all(|e| e.len == 0) {
                let e = "qemu-storage-daemon answered block status with nothing";
                return Err(Walk::Failed(source_error(pos, e)));
            }
            for e in extents {
                let end = (pos + e.len).min(self.len);
                if !e.zero {
                    self.data(pos, end)?;
                }
                pos = end;
            }
        }
        if let Some(r) = self.pending.take() {
            self.queue_reads(r)?;
        }
        if self.cursor < self.size {
            self.queue(Queued::Zero(self.cursor, self.size - self.cursor))?;
        }
        while !self.window.is_empty() {
            self.send_oldest()?;
        }
        Ok(())
    }

    /// Image bytes `a..b` hold data: their clusters are to be read.
    fn data(&mut self, a: u64, b: u64) -> std::result::Result<(), Walk> {
        // A cluster already queued (it held data before `a`) is not queued again.
        let start = (a / CLUSTER * CLUSTER).max(self.cursor);
        let end = b.div_ceil(CLUSTER).saturating_mul(CLUSTER).min(self.size);
        if start >= end {
            return Ok(());
        }
        match &mut self.pending {
            Some(r) if start <= r.end => r.end = r.end.max(end),
            _ => {
                if let Some(r) = self.pending.take() {
                    self.queue_reads(r)?;
                }
                if start > self.cursor {
                    self.queue(Queued::Zero(self.cursor, start - self.cursor))?;
                }
                self.cursor = start;
                self.pending = Some(start..end);
            }
        }
        // Whole chunks go out at once; the rest may still grow.
        if let Some(r) = self.pending.clone() {
            let whole = (r.end - r.start) / READ_CHUNK * READ_CHUNK;
            if whole > 0 {
                self.queue_reads(r.start..r.start + whole)?;
                self.pending = (r.start + whole < r.end).then(|| r.start + whole..r.end);
            }
        }
        Ok(())
    }

    fn queue_reads(&mut self, r: Range<u64>) -> std::result::Result<(), Walk> {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(READ_CHUNK);
            let from_image = self.len.saturating_sub(at).min(n);
            let mut buf = self.spare.try_recv().unwrap_or_default();
            buf.resize(from_image as usize, 0);
            let read = self
                .client
                .submit_read_into(buf, at)
                .map_err(|e| Walk::Failed(source_error(at, e)))?;
            self.queue(Queued::Read(at, n, read))?;
            at += n;
        }
        self.cursor = r.end;
        Ok(())
    }

    fn queue(&mut self, q: Queued) -> std::result::Result<(), Walk> {
        if let Queued::Read(..) = q {
            self.reads += 1;
        }
        self.window.push_back(q);
        while self.reads >= WINDOW {
            self.send_oldest()?;
        }
        Ok(())
    }

    fn send_oldest(&mut self) -> std::result::Result<(), Walk> {
        let item = match self.window.pop_front() {
            None => return Ok(()),
            Some(Queued::Zero(at, len)) => Item::Zero(at, len),
            Some(Queued::Read(at, n, read)) => {
                self.reads -= 1;
                let mut buf = read.wait().map_err(|e| Walk::Failed(source_error(at, e)))?;
                buf.resize(n as usize, 0);
                Item::Data(at, buf)
            }
        };
        self.tx.send(Ok(item)).map_err(|_| Walk::Stopped)
    }
}

/// Why the reader stopped early.
enum Walk {
    /// The writer has gone (it failed, and says why).
    Stopped,
    Failed(vma_writer::Error),
}
