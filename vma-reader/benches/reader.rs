//! Throughput of the streaming extractor, random reads through the seekable reader, and
//! the seekable reader's index build on a large, mostly-zero archive.
//!
//! Quick run: `cargo bench -p vma-reader --bench reader -- --warm-up-time 1 --measurement-time 3`

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use common::{mixed_image, Builder};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use vma_format::{BlockInfo, BlockMask, DeviceId};
use vma_reader::{verify, Extractor, SeekableArchive, VerifyOptions};

const MIB: usize = 1 << 20;

/// 256 MiB of mixed data in two devices, as Proxmox lays it out (58 clusters per extent),
/// with the integrity extension or without.
fn mixed_archive(checksums: bool) -> Vec<u8> {
    let a = mixed_image(192 * MIB, 11);
    let b = mixed_image(64 * MIB, 12);
    let mut builder = Builder::new(
        &[
            ("drive-scsi0", a.len() as u64),
            ("drive-scsi1", b.len() as u64),
        ],
        &[("qemu-server.conf", b"memory: 2048\n")],
    )
    .checksums(checksums);
    builder.device(1, &a);
    builder.device(2, &b);
    if checksums {
        builder.finish_sealed()
    } else {
        builder.finish()
    }
}

fn streaming(c: &mut Criterion) {
    let mut group = c.benchmark_group("stream");
    group.sample_size(10);
    for (label, checksums) in [("plain", false), ("sealed", true)] {
        let archive = mixed_archive(checksums);
        group.throughput(Throughput::Bytes(archive.len() as u64));
        group.bench_function(format!("extract_256MiB_{label}"), |bench| {
            bench.iter_batched(
                || tempfile::tempdir().unwrap(),
                |dir| {
                    let report = Extractor::new(dir.path()).extract(&archive[..]).unwrap();
                    black_box(report);
                    dir
                },
                BatchSize::PerIteration,
            )
        });
        group.bench_function(format!("verify_256MiB_{label}"), |bench| {
            bench.iter(|| black_box(verify(&archive[..], VerifyOptions::default()).unwrap()))
        });
    }
    group.finish();
}

fn random_reads(c: &mut Criterion) {
    let archive = mixed_archive(false);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &archive).unwrap();
    drop(archive);
    let vma = SeekableArchive::open(file.path()).unwrap();
    let dev = vma.device("drive-scsi0").unwrap();
    let blocks = dev.size() / 4096;
    let mut group = c.benchmark_group("seekable");
    group.throughput(Throughput::Bytes(4096));
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut buf = [0u8; 4096];
    group.bench_function("random_4KiB_read", |bench| {
        bench.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % blocks) * 4096;
            black_box(dev.read_at(&mut buf, at).unwrap());
        })
    });
    group.finish();
}

fn index_build(c: &mut Criterion) {
    // One 256 GiB device of zero clusters: 4 Mi slots in ~72k extent headers (~37 MiB).
    let size = 256u64 << 30;
    let mut builder = Builder::new(&[("drive-scsi0", size)], &[]);
    let d = DeviceId::new(1).unwrap();
    for cluster in 0..(size >> 16) as u32 {
        builder.raw(BlockInfo::new(d, cluster, BlockMask::empty()), &[]);
    }
    let archive = builder.finish();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &archive).unwrap();
    let len = archive.len() as u64;
    drop(archive);
    let mut group = c.benchmark_group("seekable");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(len));
    group.bench_function("open_256GiB_zero_device", |bench| {
        bench.iter(|| {
            let vma = SeekableArchive::open(file.path()).unwrap();
            black_box(vma.index_memory())
        })
    });
    group.finish();
}

criterion_group!(benches, streaming, random_reads, index_build);
criterion_main!(benches);
