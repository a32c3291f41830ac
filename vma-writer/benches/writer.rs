//! Writer throughput into an in-memory sink (`io::sink()`): 64 MiB images written in 1 MiB
//! ranges, dense (random), all zero, and mixed (alternating 1 MiB random / zero), with the
//! integrity extension on (CRC32C by the producers, the headers' SHA-256 on the sink
//! thread) and off.
//!
//! Quick run: `cargo bench -p vma-writer -- --warm-up-time 1 --measurement-time 3`

use std::io;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vma_writer::Builder;

const IMAGE: usize = 64 << 20;
const PIECE: usize = 1 << 20;

fn random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
    }
    out
}

fn images() -> Vec<(&'static str, Vec<u8>)> {
    let dense = random(IMAGE, 0x9e37_79b9_7f4a_7c15);
    // Touch every page, so the scan reads real memory rather than the kernel's zero page.
    let mut zero = vec![1u8; IMAGE];
    zero.fill(0);
    let mut mixed = dense.clone();
    for piece in mixed.chunks_mut(PIECE).skip(1).step_by(2) {
        piece.fill(0);
    }
    vec![("dense", dense), ("zero", zero), ("mixed", mixed)]
}

fn write_image(image: &[u8], integrity: bool) {
    let mut builder = Builder::new();
    builder.integrity(integrity);
    let dev = builder
        .add_device("drive-scsi0", image.len() as u64)
        .expect("device");
    let writer = builder.build(io::sink()).expect("writer");
    for (i, piece) in image.chunks(PIECE).enumerate() {
        writer
            .write_range(dev, (i * PIECE) as u64, piece)
            .expect("write");
    }
    writer.finish().expect("finish");
}

fn bench(c: &mut Criterion) {
    let images = images();
    let mut group = c.benchmark_group("writer-64MiB");
    group.throughput(Throughput::Bytes(IMAGE as u64));
    group.sample_size(10);
    for (name, image) in &images {
        for integrity in [true, false] {
            let id = BenchmarkId::new(
                *name,
                if integrity {
                    "integrity-on"
                } else {
                    "integrity-off"
                },
            );
            group.bench_with_input(id, image, |b, image| {
                b.iter(|| write_image(image, integrity))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
