//! `vma-shuffled OUT IMAGE SEED`: an archive of one raw image (the disk `drive-scsi0`) as a
//! vzdump of a running VM lays it out: a random uuid, the current time, Proxmox's layout
//! (no integrity extension) and the clusters in an order that changes with every backup
//! (a shuffle seeded with SEED), as a live backup writes the clusters a guest overwrites
//! first. The baseline of `benches/dedup.sh`.
#![warn(clippy::too_many_lines)]

use std::fs::File;
use std::os::unix::fs::FileExt;

use vma_benches::Offsets;
use vma_writer::{round_up_to_sector, Builder};

const CLUSTER: u64 = 65536;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        return Err("usage: vma-shuffled OUT IMAGE SEED".into());
    }
    let seed: u64 = args[3].parse()?;
    let image = File::open(&args[2])?;
    let len = image.metadata()?.len();
    let size = round_up_to_sector(len);
    let mut builder = Builder::new();
    builder.integrity(false);
    let dev = builder.add_device("drive-scsi0", size)?;
    let writer = builder.create_file(&args[1])?;
    let clusters = size.div_ceil(CLUSTER) as u32;
    let mut order: Vec<u32> = (0..clusters).collect();
    // Fisher-Yates with the benches' generator (its draws are 4 KiB multiples).
    let mut rng = Offsets::new(seed);
    for i in (1..order.len()).rev() {
        let j = (rng.next_block(u64::MAX) / 4096 % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let mut buf = vec![0u8; CLUSTER as usize];
    for c in order {
        let at = u64::from(c) * CLUSTER;
        let n = (size - at).min(CLUSTER) as usize;
        buf[..n].fill(0);
        let have = len.saturating_sub(at).min(n as u64) as usize;
        image.read_exact_at(&mut buf[..have], at)?;
        writer.write_cluster(dev, c, &buf[..n])?;
    }
    writer.finish()?;
    Ok(())
}
