//! Reproducible archives: the same declarations and data give the same bytes whatever the
//! number of producer threads, the split of the data into calls and their timing.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use vma_format::cluster::is_zero;
use vma_format::{ArchiveHeader, Uuid, VMA_WRITER_CLUSTERS_PER_EXTENT};
use vma_writer::{derived_uuid, Builder, Device, Error, VmState, WriterHandle};

const CTIME: i64 = 1_700_000_000;

struct Input {
    disks: Vec<(&'static str, Vec<u8>)>,
    vmstate: Vec<u8>,
}

fn input() -> Input {
    let mut big = image((5 << 20) + 4100, 11);
    big[(1 << 20)..(3 << 20)].fill(0);
    Input {
        disks: vec![
            ("drive-scsi0", big),
            ("drive-scsi1", image(3 * CLUSTER + 512, 12)),
            ("drive-efidisk0", image(1000, 13)),
            ("drive-virtio2", vec![0u8; 2 * CLUSTER]),
        ],
        vmstate: image(200_000, 14),
    }
}

/// A unit of work: clusters `first..first + count` of disk `disk`, written by one call.
#[derive(Clone, Copy, Debug)]
struct Unit {
    disk: usize,
    first: u32,
    count: u32,
}

/// Cuts every disk into calls of 1 to 9 clusters.
fn units(input: &Input, rng: &mut Rng) -> Vec<Unit> {
    let mut out = Vec::new();
    for (disk, (_, img)) in input.disks.iter().enumerate() {
        let n = clusters(img.len());
        let mut c = 0;
        while c < n {
            let count = (1 + rng.below(9) as u32).min(n - c);
            out.push(Unit {
                disk,
                first: c,
                count,
            });
            c += count;
        }
    }
    out
}

/// Writes one unit, by range or cluster by cluster, with or without zero calls.
fn write_unit(h: &WriterHandle, devs: &[Device], input: &Input, u: Unit, style: u64) {
    let img = &input.disks[u.disk].1;
    let start = u.first as usize * CLUSTER;
    let end = (start + u.count as usize * CLUSTER).min(img.len());
    let bytes = &img[start..end];
    let dev = devs[u.disk];
    match style % 3 {
        0 if is_zero(bytes) => h
            .write_zero_range(dev, start as u64, bytes.len() as u64)
            .unwrap(),
        0 | 1 => h.write_range(dev, start as u64, bytes).unwrap(),
        _ => write_in_order(
            h,
            dev,
            img,
            &(u.first..u.first + u.count).collect::<Vec<_>>(),
        ),
    }
}

fn builder(input: &Input, integrity: bool) -> (Builder, Vec<Device>, VmState) {
    let mut b = Builder::new();
    b.reproducible().ctime(CTIME).integrity(integrity);
    b.add_config("qemu-server.conf", b"memory: 512\nscsi0: local:100/d.raw\n")
        .unwrap();
    b.add_config("qemu-server.fw", b"[OPTIONS]\nenable: 1\n")
        .unwrap();
    let devs = add_devices(&mut b, &input.disks);
    let vm = b.add_vmstate(input.vmstate.len() as u64).unwrap();
    (b, devs, vm)
}

/// Writes the archive with `threads` producers; the units (cut with `seed`) are dealt
/// to the threads at random, each writing its own in ascending order, then one of them
/// appends the vmstate stream in pieces.
fn archive(input: &Arc<Input>, threads: usize, seed: u64, integrity: bool) -> Vec<u8> {
    let (b, devs, vm) = builder(input, integrity);
    let writer = b.build(Vec::new()).unwrap();
    let mut rng = Rng(seed);
    let mut queues = vec![Vec::new(); threads];
    for u in units(input, &mut rng) {
        queues[rng.below(threads as u64) as usize].push((u, rng.next()));
    }
    let vmstate_thread = rng.below(threads as u64) as usize;
    let workers: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(t, queue)| {
            let (h, devs, input) = (writer.handle(), devs.clone(), input.clone());
            thread::spawn(move || {
                for (u, style) in queue {
                    write_unit(&h, &devs, &input, u, style);
                    if style % 7 == 0 {
                        thread::yield_now();
                    }
                }
                if t == vmstate_thread {
                    for piece in input.vmstate.chunks(30_000 + 777 * t) {
                        h.append_vmstate(vm, piece).unwrap();
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    writer.finish().unwrap().1
}

#[test]
fn same_bytes_with_one_thread_and_with_several() {
    let input = Arc::new(input());
    for integrity in [true, false] {
        let one = archive(&input, 1, 1, integrity);
        for (threads, seed) in [(1, 2), (2, 3), (4, 4), (7, 5)] {
            let other = archive(&input, threads, seed, integrity);
            assert_same(
                &other,
                &one,
                &format!("{threads} threads, seed {seed}, integrity {integrity}"),
            );
        }
        let d = decode(&one);
        assert_eq!(d.seal.is_some(), integrity);
        for (name, img) in &input.disks {
            assert_same(&d.devices[*name], img, name);
        }
        assert_same(&d.devices["vmstate"], &input.vmstate, "vmstate");
        // Canonical order: disk by disk ascending, then the vmstate stream.
        let mut want = Vec::new();
        for (i, (_, img)) in input.disks.iter().enumerate() {
            want.extend((0..clusters(img.len())).map(|c| (i as u8 + 1, c)));
        }
        let vm = input.disks.len() as u8 + 1;
        want.extend((0..clusters(input.vmstate.len())).map(|c| (vm, c)));
        assert_eq!(d.slots, want);
        // Extents cut every VMA_WRITER_CLUSTERS_PER_EXTENT clusters.
        assert_eq!(
            d.extents,
            want.len().div_ceil(VMA_WRITER_CLUSTERS_PER_EXTENT)
        );
        // The uuid is the documented derivation of the header.
        let mut header = d.header.clone();
        assert_eq!(header.ctime, CTIME);
        let uuid = header.uuid;
        header.uuid = Uuid::nil();
        assert_eq!(uuid, derived_uuid(&header));
        assert_eq!(uuid.get_version_num(), 8);
    }
}

#[test]
fn the_uuid_follows_the_declarations_and_a_pinned_one_wins() {
    let input = input();
    let uuid_of = |b: &Builder| b.archive_uuid();
    let (b, _, _) = builder(&input, true);
    let base = uuid_of(&b);
    let (mut later, _, _) = builder(&input, true);
    later.ctime(CTIME + 1);
    assert_ne!(uuid_of(&later), base);
    let (mut more, _, _) = builder(&input, true);
    more.add_device("drive-scsi9", 512).unwrap();
    assert_ne!(uuid_of(&more), base);
    let (mut pinned, devs, vm) = builder(&input, true);
    let series = vma_writer::uuid_from_name("vm-100");
    pinned.uuid(series);
    let w = pinned.build(Vec::new()).unwrap();
    assert_eq!(w.uuid(), series);
    for (dev, (_, img)) in devs.iter().zip(&input.disks) {
        w.write_range(*dev, 0, img).unwrap();
    }
    w.append_vmstate(vm, &input.vmstate).unwrap();
    let bytes = w.finish().unwrap().1;
    let d = decode(&bytes);
    assert_eq!(d.header.uuid, series);
    // The header without its uuid: still what the declarations derive.
    let mut h: ArchiveHeader = d.header.clone();
    h.uuid = Uuid::nil();
    assert_eq!(derived_uuid(&h), base);
}

/// A canonical-order writer of one 4-cluster device and a thread blocked writing
/// `cluster` (not the next one) into it, given 200 ms to start waiting.
fn waiting_on(
    cluster: u32,
) -> (
    vma_writer::Writer<Vec<u8>>,
    thread::JoinHandle<Result<(), Error>>,
) {
    let mut b = Builder::new();
    b.canonical_order(true);
    let dev = b.add_device("d", 4 * CLUSTER as u64).unwrap();
    let w = b.build(Vec::new()).unwrap();
    let h = w.handle();
    let waiter = thread::spawn(move || h.write_cluster(dev, cluster, &[1u8; CLUSTER]));
    thread::sleep(Duration::from_millis(200));
    (w, waiter)
}

#[test]
fn a_wait_that_cannot_end_ends_with_an_error() {
    // One thread writes a cluster that is not next; finish from another ends its wait.
    let (w, waiter) = waiting_on(2);
    match w.finish() {
        Err(Error::Incomplete { total: 4, .. }) => {}
        other => panic!("{other:?}"),
    }
    match waiter.join().unwrap() {
        Err(Error::OutOfOrder { cluster: 2, .. } | Error::Finished) => {}
        other => panic!("{other:?}"),
    }

    // The same wait ended by abort.
    let (w, waiter) = waiting_on(3);
    w.abort().unwrap();
    match waiter.join().unwrap() {
        Err(Error::Aborted) => {}
        other => panic!("{other:?}"),
    }

    // A producer whose source failed aborts through its handle: the waiting call ends.
    let (w, waiter) = waiting_on(1);
    w.handle().abort();
    match waiter.join().unwrap() {
        Err(Error::Aborted) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(w.finish(), Err(Error::Aborted)));

    // In order from one thread, nothing waits; out of order, a waiting call is released
    // once another thread writes what it waits for.
    let mut b = Builder::new();
    b.canonical_order(true);
    let dev = b.add_device("d", 3 * CLUSTER as u64).unwrap();
    let w = b.build(Vec::new()).unwrap();
    let h = w.handle();
    let waiter = thread::spawn(move || h.write_range(dev, CLUSTER as u64, &[2u8; 2 * CLUSTER]));
    thread::sleep(Duration::from_millis(100));
    w.write_cluster(dev, 0, &[1u8; CLUSTER]).unwrap();
    waiter.join().unwrap().unwrap();
    let d = decode(&w.finish().unwrap().1);
    assert_eq!(d.slots, vec![(1, 0), (1, 1), (1, 2)]);
}
