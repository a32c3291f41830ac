//! Backing up a regular file or a block device into a disk of the archive.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vma_format::VMA_CLUSTER_SIZE;

use crate::builder::Device;
use crate::error::{Error, Result};
use crate::writer::WriterHandle;

/// Bytes read from the source per write call: 64 clusters.
const CHUNK: usize = 4 << 20;
const CLUSTER: u64 = VMA_CLUSTER_SIZE as u64;

/// The size of a source in bytes: a regular file's length, or a block device's size
/// (found by seeking to its end, which leaves the file position at 0).
pub fn source_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut file = file;
    let end = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(end)
}

fn source_error(offset: u64, e: io::Error) -> Error {
    Error::Source {
        offset,
        source: Arc::new(e),
    }
}

/// Where data lies in a sparse file, as the file system tells with `SEEK_DATA` and
/// `SEEK_HOLE`; `None` once it turns out not to know (the whole rest is then data).
struct Holes<'a> {
    file: Option<&'a File>,
}

impl Holes<'_> {
    /// The first data byte at or after `pos`; `len` if only a hole follows.
    fn data_from(&mut self, pos: u64, len: u64) -> Result<u64> {
        let Some(file) = self.file else {
            return Ok(pos);
        };
        match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(at) => Ok(at.clamp(pos, len)),
            Err(rustix::io::Errno::NXIO) => Ok(len),
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                self.file = None;
                Ok(pos)
            }
            Err(e) => Err(source_error(pos, e.into())),
        }
    }

    /// The first hole byte at or after `pos` (a data byte); `len` if data runs to the end.
    fn hole_from(&mut self, pos: u64, len: u64) -> Result<u64> {
        let Some(file) = self.file else {
            return Ok(len);
        };
        match rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(pos)) {
            Ok(at) => Ok(at.clamp(pos, len)),
            Err(
                rustix::io::Errno::NXIO | rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP,
            ) => {
                self.file = None;
                Ok(len)
            }
            Err(e) => Err(source_error(pos, e.into())),
        }
    }
}

/// Fills `buf` from `offset`; fails if the source ends first.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the source ended early (did it shrink?)",
                );
                return Err(source_error(at, e));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(source_error(at, e)),
        }
    }
    Ok(())
}

impl WriterHandle {
    /// Backs up a regular file or block device into a disk: reads it in 4 MiB pieces
    /// with positional reads and writes them with [`write_range`](Self::write_range). The
    /// source may be smaller than the device (the rest is recorded as zero), never larger.
    ///
    /// Holes of a sparse regular file are found with `SEEK_DATA`/`SEEK_HOLE` and recorded
    /// as zero clusters without being read (this moves the file position). `progress`, if
    /// given, is called after each piece with the number of device bytes done so far.
    /// Returns the number of bytes read from the source.
    ///
    /// The device must not have been written to before (its clusters would be written
    /// twice).
    pub fn write_file(
        &self,
        device: Device,
        source: &File,
        mut progress: Option<&mut dyn FnMut(u64)>,
    ) -> Result<u64> {
        let size = self.device_size(device)?;
        let len = source_size(source).map_err(|e| source_error(0, e))?;
        if len > size {
            return Err(Error::SourceTooLarge {
                device: self.device_name(device)?.to_owned(),
                source_size: len,
                size,
            });
        }
        let regular = source.metadata().map(|m| m.is_file()).unwrap_or(false);
        let mut holes = Holes {
            file: regular.then_some(source),
        };
        let mut report = |done: u64| {
            if let Some(f) = progress.as_mut() {
                f(done);
            }
        };
        // Page-aligned: reads at page-aligned file offsets into a buffer 16 bytes past a
        // page boundary (where a large Vec lands) hit a slow path of the kernel's copy.
        let mut buffer = vma_iobuf::AlignedBuf::default();
        let mut read = 0u64;
        let mut pos = 0u64;
        while pos < len {
            let data = holes.data_from(pos, len)?;
            if data >= len {
                break;
            }
            let data_cluster = data - data % CLUSTER;
            if data_cluster > pos {
                self.write_zero_range(device, pos, data_cluster - pos)?;
                pos = data_cluster;
                report(pos);
            }
            let hole = holes.hole_from(data, len)?;
            let region_end = hole.div_ceil(CLUSTER).saturating_mul(CLUSTER).min(size);
            while pos < region_end {
                let end = (pos + CHUNK as u64).min(region_end);
                let piece = (end - pos) as usize;
                if buffer.len() < piece {
                    buffer = vma_iobuf::AlignedBuf::new(CHUNK);
                }
                let from_source = (len.min(end) - pos) as usize;
                read_exact_at(source, &mut buffer[..from_source], pos)?;
                buffer[from_source..piece].fill(0);
                self.write_range(device, pos, &buffer[..piece])?;
                read += from_source as u64;
                pos = end;
                report(pos);
            }
        }
        if pos < size {
            self.write_zero_range(device, pos, size - pos)?;
        }
        report(size);
        Ok(read)
    }
}
