//! `vma-randread ARCHIVE RAW COUNT [INDEX]`: COUNT random 4 KiB reads of the archive's first
//! disk through the seekable reader (a stock `.vma.zst` through its sidecar INDEX), then the same offsets with `pread` on the raw image;
//! prints both rates and their ratio, and checks that the bytes agree.
#![warn(clippy::too_many_lines)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use vma_benches::Offsets;
use vma_reader::SeekableArchive;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 && args.len() != 5 {
        return Err("usage: vma-randread ARCHIVE RAW COUNT [INDEX]".into());
    }
    let count: u64 = args[3].parse()?;
    let open_start = Instant::now();
    let archive = match args.get(4) {
        Some(index) => SeekableArchive::open_with_index(&args[1], index)?,
        None => SeekableArchive::open(&args[1])?,
    };
    let open_time = open_start.elapsed();
    let device = archive
        .devices()
        .iter()
        .find(|d| !d.is_vmstate())
        .ok_or("no disk in the archive")?
        .name
        .clone();
    let reader = archive.device(device.as_str())?;
    let raw = File::open(&args[2])?;
    let size = reader.size().min(raw.metadata()?.len());

    let mut a = vec![0u8; 4096];
    let mut b = vec![0u8; 4096];
    let mut offsets = Offsets::new(42);
    let start = Instant::now();
    for _ in 0..count {
        reader.read_at(&mut a, offsets.next_block(size))?;
    }
    let vma = start.elapsed();
    let mut offsets = Offsets::new(42);
    let start = Instant::now();
    for _ in 0..count {
        raw.read_exact_at(&mut b, offsets.next_block(size))?;
    }
    let pread = start.elapsed();

    let mut offsets = Offsets::new(7);
    for _ in 0..1000 {
        let at = offsets.next_block(size);
        reader.read_at(&mut a, at)?;
        raw.read_exact_at(&mut b, at)?;
        if a != b {
            return Err(format!("bytes differ at offset {at}").into());
        }
    }
    let rate = |d: std::time::Duration| count as f64 / d.as_secs_f64();
    println!(
        "Random 4 KiB reads ({count}, same offsets): seekable reader {:.0}/s, pread on the raw \
         image {:.0}/s, ratio {:.2} (time vma / time pread). Index: {} KiB, opened in {:.1} ms.",
        rate(vma),
        rate(pread),
        vma.as_secs_f64() / pread.as_secs_f64(),
        archive.index_memory() / 1024,
        open_time.as_secs_f64() * 1000.0
    );
    Ok(())
}
