//! The format codec: header and extent header decode/encode, the zero scan and cluster
//! packing, which both writer and reader run for every cluster.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use vma_format::*;

fn header_codec(c: &mut Criterion) {
    let header = ArchiveHeader {
        uuid: Uuid::from_u128(7),
        ctime: 1_700_000_000,
        configs: vec![ConfigEntry {
            name: "qemu-server.conf".into(),
            data: vec![b'x'; 600],
        }],
        devices: (1..=4)
            .map(|i| DeviceInfo {
                id: DeviceId::new(i).unwrap(),
                name: format!("drive-scsi{i}"),
                size: 32 << 30,
            })
            .collect(),
    };
    let bytes = header.encode().unwrap();
    c.bench_function("archive_header/decode", |b| {
        b.iter(|| ArchiveHeader::decode(black_box(&bytes)).unwrap())
    });
    c.bench_function("archive_header/encode", |b| {
        b.iter(|| black_box(&header).encode().unwrap())
    });

    let mut slots = [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT];
    for (i, s) in slots.iter_mut().take(58).enumerate() {
        *s = BlockInfo::new(DeviceId::new(1).unwrap(), i as u32, BlockMask::all());
    }
    let extent = ExtentHeader::new(header.uuid, slots).encode();
    c.bench_function("extent_header/decode", |b| {
        b.iter(|| ExtentHeader::decode(black_box(&extent)).unwrap())
    });
}

fn cluster_codec(c: &mut Criterion) {
    let zero = vec![0u8; VMA_CLUSTER_SIZE];
    let dense: Vec<u8> = (0..VMA_CLUSTER_SIZE)
        .map(|i| (i * 7 + 1) as u8 | 1)
        .collect();
    let mut half = dense.clone();
    for block in half.chunks_mut(VMA_BLOCK_SIZE).step_by(2) {
        block.fill(0);
    }
    let mut group = c.benchmark_group("cluster");
    group.throughput(Throughput::Bytes(VMA_CLUSTER_SIZE as u64));
    for (name, data) in [("zero", &zero), ("dense", &dense), ("half", &half)] {
        group.bench_with_input(BenchmarkId::new("scan", name), data, |b, d| {
            b.iter(|| cluster::scan_cluster(black_box(d), VMA_CLUSTER_SIZE))
        });
        let mut out = Vec::with_capacity(VMA_CLUSTER_SIZE);
        group.bench_with_input(BenchmarkId::new("scan+pack", name), data, |b, d| {
            b.iter(|| {
                out.clear();
                let mask = cluster::scan_cluster(black_box(d), VMA_CLUSTER_SIZE);
                cluster::pack_cluster(d, VMA_CLUSTER_SIZE, mask, &mut out);
                out.len()
            })
        });
        let mask = cluster::scan_cluster(data, VMA_CLUSTER_SIZE);
        let mut stored = Vec::new();
        cluster::pack_cluster(data, VMA_CLUSTER_SIZE, mask, &mut stored);
        let mut back = vec![0u8; VMA_CLUSTER_SIZE];
        group.bench_with_input(BenchmarkId::new("unpack", name), &stored, |b, s| {
            b.iter(|| cluster::unpack_cluster(mask, black_box(s), &mut back))
        });
    }
    group.bench_function("crc32c", |b| {
        b.iter(|| integrity::data_crc32c(black_box(&dense)))
    });
    group.finish();
}

criterion_group!(benches, header_codec, cluster_codec);
criterion_main!(benches);
