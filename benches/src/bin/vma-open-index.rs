//! `vma-open-index DIR [GIB] [RUNS]`: how long `SeekableArchive::open` takes with and
//! without the extent index, on two archives of one disk of GIB GiB (default 256) that
//! differ only in it, written into DIR as sparse files.
//!
//! Every cluster is stored (mask 0xffff, 58 per extent, as vma-rs's writer cuts them) and
//! all-zero, so the data regions can be holes: the extent headers (with the CRC32C of the
//! zero data), the index and the seal are written with `pwrite` at their offsets, built
//! with vma-format, and the files read back exactly as if the zeros were there. Each open
//! is timed RUNS times (default 5, warm page cache: dropping it needs root) and through a
//! byte source that counts its reads, which is what each open would cost in round trips
//! from a bucket.
#![warn(clippy::too_many_lines)]

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vma_format::extent_index;
use vma_format::integrity::{data_crc32c, SealHasher};
use vma_format::{
    ArchiveHeader, BlockInfo, BlockMask, ConfigEntry, DeviceId, DeviceInfo, ExtentHeader, Uuid,
    VMA_BLOCKS_PER_EXTENT, VMA_CLUSTER_SIZE, VMA_EXTENT_HEADER_SIZE,
    VMA_WRITER_CLUSTERS_PER_EXTENT,
};
use vma_reader::{ReadAt, SeekableArchive};

/// A file that counts its positional reads.
#[derive(Debug)]
struct Counted {
    file: File,
    reads: AtomicUsize,
}

impl ReadAt for Counted {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        FileExt::read_exact_at(&self.file, buf, offset)
    }
}

/// Writes the two archives; returns the number of data extents.
fn write_archives(dir: &Path, gib: u64) -> Result<u64, Box<dyn std::error::Error>> {
    let size = gib << 30;
    let id = DeviceId::new(1).ok_or("device id")?;
    let header = ArchiveHeader {
        uuid: Uuid::from_u128(0x0123_4567_89ab_cdef),
        ctime: 1_700_000_000,
        configs: vec![ConfigEntry {
            name: "qemu-server.conf".into(),
            data: b"memory: 512\n".to_vec(),
        }],
        devices: vec![DeviceInfo {
            id,
            name: "drive-scsi0".into(),
            size,
        }],
    };
    let head = header.encode()?;
    let clusters = size / VMA_CLUSTER_SIZE as u64;
    let per = VMA_WRITER_CLUSTERS_PER_EXTENT as u64;
    let zeros = vec![0u8; VMA_WRITER_CLUSTERS_PER_EXTENT * VMA_CLUSTER_SIZE];
    let full_crc = data_crc32c(&zeros);
    let mut headers = Vec::with_capacity(clusters.div_ceil(per) as usize);
    let mut first = 0u64;
    while first < clusters {
        let n = per.min(clusters - first);
        let mut slots = [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT];
        for (k, slot) in slots.iter_mut().take(n as usize).enumerate() {
            *slot = BlockInfo::new(id, (first + k as u64) as u32, BlockMask::all());
        }
        let mut e = ExtentHeader::new(header.uuid, slots);
        let crc = if n == per {
            full_crc
        } else {
            data_crc32c(&zeros[..n as usize * VMA_CLUSTER_SIZE])
        };
        e.set_data_checksum(crc);
        headers.push(e.encode());
        first += n;
    }
    for (name, with_index) in [("with-index.vma", true), ("without-index.vma", false)] {
        let file = File::create(dir.join(name))?;
        file.write_all_at(&head, 0)?;
        let mut seal = SealHasher::new(&head);
        let mut pos = head.len() as u64;
        for (h, raw) in headers.iter().enumerate() {
            file.write_all_at(raw, pos)?;
            seal.extent(raw);
            let n = per.min(clusters - h as u64 * per);
            pos += (VMA_EXTENT_HEADER_SIZE + n as usize * VMA_CLUSTER_SIZE) as u64;
        }
        if with_index {
            let index = extent_index::encode(header.uuid, &headers)?;
            let bytes: Vec<u8> = index.iter().flatten().copied().collect();
            file.write_all_at(&bytes, pos)?;
            index.iter().for_each(|x| seal.extent(x));
            pos += bytes.len() as u64;
        }
        file.write_all_at(&seal.seal().to_extent(header.uuid).encode(), pos)?;
        file.sync_all()?;
    }
    Ok(headers.len() as u64)
}

/// Median open time and reads of one open of `path`.
fn time_open(path: &Path, runs: usize) -> Result<(Duration, usize), Box<dyn std::error::Error>> {
    let mut times = Vec::with_capacity(runs);
    let mut reads = 0;
    for _ in 0..runs {
        let source = Arc::new(Counted {
            file: File::open(path)?,
            reads: AtomicUsize::new(0),
        });
        let start = Instant::now();
        let archive = SeekableArchive::from_read_at(source.clone())?;
        times.push(start.elapsed());
        reads = source.reads.load(Ordering::Relaxed);
        assert!(archive.integrity().is_ok());
    }
    times.sort();
    Ok((times[runs / 2], reads))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 || args.len() > 4 {
        return Err("usage: vma-open-index DIR [GIB] [RUNS]".into());
    }
    let dir = Path::new(&args[1]);
    let gib: u64 = args.get(2).map_or(Ok(256), |a| a.parse())?;
    let runs: usize = args.get(3).map_or(Ok(5), |a| a.parse())?;
    let start = Instant::now();
    let extents = write_archives(dir, gib)?;
    eprintln!(
        "wrote two {gib} GiB archives of {extents} data extents in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let (with, with_reads) = time_open(&dir.join("with-index.vma"), runs)?;
    let (without, without_reads) = time_open(&dir.join("without-index.vma"), runs)?;
    let index_bytes = extent_index::extents_for(extents) * VMA_EXTENT_HEADER_SIZE as u64;
    println!("device {gib} GiB, {extents} data extents, extent index {index_bytes} bytes");
    println!(
        "open with index:    {:>9.2} ms, {with_reads} reads",
        with.as_secs_f64() * 1e3
    );
    println!(
        "open without index: {:>9.2} ms, {without_reads} reads",
        without.as_secs_f64() * 1e3
    );
    println!(
        "ratio (without / with): {:.1}x time, {:.0}x reads",
        without.as_secs_f64() / with.as_secs_f64(),
        without_reads as f64 / with_reads as f64
    );
    Ok(())
}
