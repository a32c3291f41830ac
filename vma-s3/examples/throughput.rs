//! Throughput of a 256 MiB sequential read and a 256 MiB upload against moto's server on
//! loopback (vma_testkit::S3Server), next to writing and reading a local file. Timings
//! are printed, not asserted. Run with
//! `cargo run --release -p vma-s3 --example throughput [MiB]`.

use std::io::Write;
use std::time::Instant;

use vma_reader::ReadAt;
use vma_s3::{Config, Location};
use vma_testkit::{Rng, S3Server};

const MIB: usize = 1 << 20;

fn rate(what: &str, bytes: usize, t: Instant) {
    let s = t.elapsed().as_secs_f64();
    println!(
        "{what:<40} {:>8.2} s {:>9.1} MiB/s",
        s,
        bytes as f64 / MIB as f64 / s
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(256);
    let len = mib * MIB;
    let mut data = vec![0u8; len];
    Rng(1).fill(&mut data);

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("local.vma");
    let t = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    for chunk in data.chunks(MIB) {
        f.write_all(chunk)?;
    }
    f.sync_all()?;
    rate(&format!("local file: write {mib} MiB (+fsync)"), len, t);
    let f = std::fs::File::open(&path)?;
    let mut buf = vec![0u8; MIB];
    let t = Instant::now();
    for i in 0..mib {
        ReadAt::read_exact_at(&f, &mut buf, (i * MIB) as u64)?;
    }
    rate(&format!("local file: read {mib} MiB (page cache)"), len, t);

    let s3 = S3Server::start();
    s3.create_bucket("bench");
    let env = s3.env();
    let config = Config::from_vars(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))?;
    let at = Location::parse("s3://bench/throughput.vma")?;
    let t = Instant::now();
    let mut up = config.create(&at)?;
    for chunk in data.chunks(MIB) {
        up.write_all(chunk)?;
    }
    up.finish()?;
    rate(
        &format!(
            "moto: upload {mib} MiB ({} MiB parts)",
            config.part_size() / MIB
        ),
        len,
        t,
    );
    let obj = config.open(&at)?;
    let t = Instant::now();
    for i in 0..mib {
        obj.read_exact_at(&mut buf, (i * MIB) as u64)?;
        assert!(buf[..] == data[i * MIB..(i + 1) * MIB]);
    }
    rate(&format!("moto: sequential read {mib} MiB"), len, t);
    println!(
        "  {} requests, {} MiB fetched",
        obj.requests(),
        obj.bytes_fetched() / MIB as u64
    );
    Ok(())
}
