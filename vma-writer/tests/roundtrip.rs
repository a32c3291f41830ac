//! Write archives and read them back with the strict test decoder.

mod common;

use common::*;
use proptest::prelude::*;
use vma_format::Uuid;
use vma_writer::{Builder, Summary};

const SIZES: &[usize] = &[
    1,
    4095,
    4096,
    4097,
    1000,
    65535,
    65536,
    65537,
    5 << 20,
    (5 << 20) + 333,
    (3 << 20) + 65536 * 7 + 4096 * 3 + 17,
];

#[derive(Clone, Copy, Debug)]
enum Order {
    Ascending,
    Descending,
    Random(u64),
}

fn order(n: u32, how: Order) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n).collect();
    match how {
        Order::Ascending => {}
        Order::Descending => v.reverse(),
        Order::Random(seed) => Rng(seed).shuffle(&mut v),
    }
    v
}

/// Two devices written cluster by cluster, interleaved, in the given order.
fn roundtrip(size: usize, how: Order, integrity: bool) -> (Summary, Vec<u8>) {
    let a = image(size, size as u64 + 1);
    let b = image(size / 2 + 1, size as u64 + 2);
    let mut builder = Builder::new();
    builder.integrity(integrity);
    builder
        .add_config("/etc/pve/qemu-server/100.conf", b"memory: 512\n")
        .unwrap();
    let da = builder.add_device("drive-scsi0", a.len() as u64).unwrap();
    let db = builder.add_device("drive-virtio1", b.len() as u64).unwrap();
    let writer = builder.build(Vec::new()).unwrap();
    let h = writer.handle();
    let oa = order(clusters(a.len()), how);
    let ob = order(clusters(b.len()), how);
    for i in 0..oa.len().max(ob.len()) {
        if let Some(&c) = oa.get(i) {
            write_in_order(&h, da, &a, &[c]);
        }
        if let Some(&c) = ob.get(i) {
            write_in_order(&h, db, &b, &[c]);
        }
    }
    let (summary, bytes) = writer.finish().unwrap();
    let d = decode(&bytes);
    assert_same(
        &d.devices["drive-scsi0"],
        &a,
        &format!("size {size} {how:?}"),
    );
    assert_same(
        &d.devices["drive-virtio1"],
        &b,
        &format!("size {size} {how:?}"),
    );
    assert_eq!(d.header.configs[0].name, "100.conf");
    assert_eq!(summary.archive_bytes, bytes.len() as u64);
    assert_eq!(summary.extents, d.extents as u64);
    assert_eq!(summary.devices[0].clusters, u64::from(clusters(a.len())));
    assert_eq!(d.seal.is_some(), integrity);
    assert_eq!(d.checksummed, if integrity { d.extents } else { 0 });
    let slots = d.slots.len();
    assert_eq!(
        d.extents,
        slots.div_ceil(58),
        "extents are filled to 58 clusters"
    );
    (summary, bytes)
}

#[test]
fn every_size_in_every_order() {
    for &size in SIZES {
        for how in [
            Order::Ascending,
            Order::Descending,
            Order::Random(size as u64 * 31 + 7),
        ] {
            for integrity in [true, false] {
                roundtrip(size, how, integrity);
            }
        }
    }
}

#[test]
fn summary_counts_stored_and_zero_bytes() {
    // Cluster 0: one stored block; cluster 1: zero; cluster 2 (last, 1000 bytes): stored.
    let size = 2 * CLUSTER + 1000;
    let mut img = vec![0u8; size];
    img[5] = 1;
    img[size - 1] = 2;
    let mut builder = Builder::new();
    let dev = builder.add_device("d", size as u64).unwrap();
    let w = builder.build(Vec::new()).unwrap();
    w.write_range(dev, 0, &img).unwrap();
    let (summary, bytes) = w.finish().unwrap();
    let s = &summary.devices[0];
    assert_eq!((s.size, s.clusters), (size as u64, 3));
    assert_eq!(s.stored_bytes, 2 * 4096);
    assert_eq!(s.zero_bytes, (size - 4096 - 1000) as u64);
    assert_same(&decode(&bytes).devices["d"], &img, "image");
}

#[test]
fn ranges_of_one_mib_out_of_order_with_zero_ranges() {
    let size = (9 << 20) + 12345;
    let img = {
        let mut i = image(size, 99);
        i[(2 << 20)..(4 << 20)].fill(0);
        i
    };
    for integrity in [true, false] {
        let mut builder = Builder::new();
        builder.integrity(integrity);
        let dev = builder.add_device("drive-scsi0", size as u64).unwrap();
        let w = builder.build(Vec::new()).unwrap();
        let mut pieces: Vec<usize> = (0..size.div_ceil(1 << 20)).collect();
        Rng(5).shuffle(&mut pieces);
        for p in pieces {
            let start = p << 20;
            let end = (start + (1 << 20)).min(size);
            if (2..4).contains(&p) {
                w.write_zero_range(dev, start as u64, (end - start) as u64)
                    .unwrap();
            } else {
                w.write_range(dev, start as u64, &img[start..end]).unwrap();
            }
        }
        let (_, bytes) = w.finish().unwrap();
        assert_same(&decode(&bytes).devices["drive-scsi0"], &img, "image");
    }
}

#[test]
fn last_cluster_given_in_full_stores_nothing_past_the_end() {
    let size = CLUSTER + 100;
    let mut builder = Builder::new();
    let dev = builder.add_device("d", size as u64).unwrap();
    let w = builder.build(Vec::new()).unwrap();
    w.write_zero_cluster(dev, 0).unwrap();
    // 64 KiB of 0xff for a cluster with 100 bytes inside the device.
    w.write_cluster(dev, 1, &[0xff; CLUSTER]).unwrap();
    let (summary, bytes) = w.finish().unwrap();
    let d = decode(&bytes);
    let mut expect = vec![0u8; size];
    expect[CLUSTER..].fill(0xff);
    assert_same(&d.devices["d"], &expect, "image");
    assert_eq!(summary.devices[0].stored_bytes, 4096);
    // A range whose length is a multiple of 64 KiB may run into the last cluster's padding.
    let mut builder = Builder::new();
    let dev = builder.add_device("d", size as u64).unwrap();
    let w = builder.build(Vec::new()).unwrap();
    w.write_range(dev, 0, &vec![7u8; 2 * CLUSTER]).unwrap();
    let (_, bytes) = w.finish().unwrap();
    assert_same(&decode(&bytes).devices["d"], &vec![7u8; size], "image");
}

#[test]
fn vmstate_is_a_stream_of_appends() {
    let disk = image(3 * CLUSTER, 1);
    let state = image(5 * CLUSTER + 777, 2);
    for declared in [state.len(), state.len() + 3 * CLUSTER] {
        let mut builder = Builder::new();
        let dev = builder
            .add_device("drive-scsi0", disk.len() as u64)
            .unwrap();
        let vm = builder.add_vmstate(declared as u64).unwrap();
        let w = builder.build(Vec::new()).unwrap();
        let mut rng = Rng(3);
        let mut at = 0;
        while at < state.len() {
            let n = (rng.below(3 * CLUSTER as u64) as usize + 1).min(state.len() - at);
            w.append_vmstate(vm, &state[at..at + n]).unwrap();
            at += n;
            if rng.below(2) == 0 {
                w.write_zero_range(dev, 0, 0).unwrap(); // a no-op in between
            }
        }
        w.write_range(dev, 0, &disk).unwrap();
        let (summary, bytes) = w.finish().unwrap();
        let d = decode(&bytes);
        assert_same(&d.devices["drive-scsi0"], &disk, "disk");
        // The stream is stored up to the end of its last cluster (within the declared size).
        let got = &d.devices["vmstate"];
        assert_same(
            &got[..state.len()],
            &state,
            &format!("vmstate, declared {declared}"),
        );
        assert_eq!(
            got.len(),
            (state.len().div_ceil(CLUSTER) * CLUSTER).min(declared)
        );
        assert!(got[state.len()..].iter().all(|&b| b == 0));
        assert_eq!(summary.devices[1].name, "vmstate");
        assert_eq!(summary.devices[1].clusters, 6);
    }
}

#[test]
fn config_only_archive_has_one_empty_extent() {
    for integrity in [true, false] {
        let mut builder = Builder::new();
        builder.integrity(integrity);
        builder
            .add_config("qemu-server.conf", b"cores: 1\n")
            .unwrap();
        let (summary, bytes) = builder.build(Vec::new()).unwrap().finish().unwrap();
        let d = decode(&bytes);
        assert_eq!(d.extents, 1);
        assert_eq!(summary.extents, 1);
        // With integrity: the extent index (8 + 512 bytes of payload, 406 per index
        // extent: 2 extents) and the seal.
        let index = if integrity { 2 } else { 0 };
        assert_eq!(d.index_extents, index);
        assert_eq!(summary.index_extents, index as u64);
        let extra = if integrity { 512 + index * 512 } else { 0 };
        assert_eq!(bytes.len(), 12288 + 512 + 512 + extra);
    }
}

#[test]
fn same_uuid_and_ctime_reproduce_an_archive() {
    let img = image(300_000, 8);
    let make = || {
        let mut builder = Builder::new();
        builder.uuid(Uuid::from_u128(42)).ctime(1_700_000_000);
        let dev = builder.add_device("d", img.len() as u64).unwrap();
        let w = builder.build(Vec::new()).unwrap();
        w.write_range(dev, 0, &img).unwrap();
        w.finish().unwrap().1
    };
    assert_eq!(make(), make());
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync + Clone>() {}
    check::<vma_writer::WriterHandle>();
    fn send<T: Send>() {}
    send::<vma_writer::Writer<Vec<u8>>>();
    send::<vma_writer::FileWriter>();
}

fn plan() -> impl Strategy<Value = (usize, Vec<u32>, Vec<u8>, u64)> {
    (1usize..700_000).prop_flat_map(|size| {
        let n = clusters(size);
        (
            Just(size),
            Just((0..n).collect::<Vec<u32>>()).prop_shuffle(),
            prop::collection::vec(0u8..4, n as usize),
            any::<u64>(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any cluster order, each cluster written by a random kind of call.
    #[test]
    fn random_orders_and_call_kinds((size, order, kinds, seed) in plan(), integrity: bool) {
        let mut img = image(size, seed);
        let mut builder = Builder::new();
        builder.integrity(integrity);
        let dev = builder.add_device("drive-scsi0", size as u64).unwrap();
        let w = builder.build(Vec::new()).unwrap();
        for (&c, &kind) in order.iter().zip(&kinds) {
            let start = c as usize * CLUSTER;
            let end = (start + CLUSTER).min(size);
            match kind {
                0 => w.write_cluster(dev, c, &img[start..end]).unwrap(),
                1 => w.write_range(dev, start as u64, &img[start..end]).unwrap(),
                2 => {
                    img[start..end].fill(0);
                    w.write_zero_range(dev, start as u64, (end - start) as u64).unwrap()
                }
                _ => {
                    img[start..end].fill(0);
                    w.write_zero_cluster(dev, c).unwrap()
                }
            }
        }
        let (_, bytes) = w.finish().unwrap();
        let d = decode(&bytes);
        prop_assert!(d.devices["drive-scsi0"] == img, "image differs");
        prop_assert_eq!(d.seal.is_some(), integrity);
    }
}

#[test]
fn the_extent_index_can_be_left_out() {
    let img = image(300_000, 3);
    for index in [true, false] {
        let mut builder = Builder::new();
        builder.extent_index(index);
        let dev = builder.add_device("d", img.len() as u64).unwrap();
        let w = builder.build(Vec::new()).unwrap();
        w.write_range(dev, 0, &img).unwrap();
        let (summary, bytes) = w.finish().unwrap();
        let d = decode(&bytes);
        assert!(d.seal.is_some(), "sealed either way");
        assert_eq!(d.extents as u64, summary.extents);
        let want = if index {
            vma_format::extent_index::extents_for(summary.extents)
        } else {
            0
        };
        assert_eq!(summary.index_extents, want);
        assert_eq!(d.index_extents as u64, want);
        assert_eq!(summary.archive_bytes, bytes.len() as u64);
    }
}

/// `max_archive_len` bounds what the writer writes, for one device and for several, of
/// data that does not compress away (no zero clusters).
#[test]
fn max_archive_len_bounds_real_archives() {
    for sizes in [
        &[1u64][..],
        &[5 << 20, 70_000],
        &[64 << 20],
        &[3 << 20, 4096, 1 << 20],
    ] {
        let mut builder = vma_writer::Builder::new();
        let devs: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| builder.add_device(&format!("d{i}"), s).unwrap())
            .collect();
        let w = builder.build(Vec::new()).unwrap();
        for (&dev, &size) in devs.iter().zip(sizes) {
            let img: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
            w.write_range(dev, 0, &img).unwrap();
        }
        let (_, bytes) = w.finish().unwrap();
        let total: u64 = sizes.iter().sum();
        assert!(
            bytes.len() as u64 <= vma_writer::max_archive_len(total),
            "{sizes:?}: {} > {}",
            bytes.len(),
            vma_writer::max_archive_len(total)
        );
    }
}
