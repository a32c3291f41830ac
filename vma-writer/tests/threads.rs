//! Several producer threads writing into one archive at once.

mod common;

use std::sync::Barrier;

use common::*;
use vma_writer::{Builder, Error};

#[test]
fn four_threads_interleave_clusters_of_two_devices() {
    for integrity in [true, false] {
        let a = image((6 << 20) + 1234, 11);
        let b = {
            let mut i = image(4 << 20, 12);
            i[(1 << 20)..(2 << 20)].fill(0);
            i
        };
        let mut builder = Builder::new();
        builder.integrity(integrity);
        let da = builder.add_device("drive-scsi0", a.len() as u64).unwrap();
        let db = builder.add_device("drive-scsi1", b.len() as u64).unwrap();
        let writer = builder.build(Vec::new()).unwrap();
        let threads = 4u32;
        let barrier = Barrier::new(threads as usize);
        std::thread::scope(|s| {
            for t in 0..threads {
                let h = writer.handle();
                let (a, b, barrier) = (&a, &b, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    // Thread t writes every cluster c with c % 4 == t of both devices,
                    // alternating devices, in descending order for odd threads.
                    let n = clusters(a.len()).max(clusters(b.len()));
                    let mut mine: Vec<u32> = (0..n).filter(|c| c % threads == t).collect();
                    if t % 2 == 1 {
                        mine.reverse();
                    }
                    for c in mine {
                        if c < clusters(a.len()) {
                            write_in_order(&h, da, a, &[c]);
                        }
                        if c < clusters(b.len()) {
                            let offset = u64::from(c) * CLUSTER as u64;
                            h.write_range(db, offset, cluster_of(b, c)).unwrap();
                        }
                    }
                });
            }
        });
        let (summary, bytes) = writer.finish().unwrap();
        let d = decode(&bytes);
        assert_same(&d.devices["drive-scsi0"], &a, "drive-scsi0");
        assert_same(&d.devices["drive-scsi1"], &b, "drive-scsi1");
        assert_eq!(summary.devices[0].clusters, u64::from(clusters(a.len())));
        assert_eq!(d.seal.is_some(), integrity);
    }
}

#[test]
fn racing_writes_of_the_same_cluster_store_it_once() {
    let img = image(64 * CLUSTER, 3);
    let mut builder = Builder::new();
    let dev = builder.add_device("d", img.len() as u64).unwrap();
    let writer = builder.build(Vec::new()).unwrap();
    let duplicates = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            let h = writer.handle();
            let (img, duplicates) = (&img, &duplicates);
            s.spawn(move || {
                for c in 0..64 {
                    match h.write_cluster(dev, c, cluster_of(img, c)) {
                        Ok(()) => {}
                        Err(Error::DuplicateCluster { cluster, .. }) => {
                            assert_eq!(cluster, c);
                            duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
    });
    assert_eq!(duplicates.into_inner(), 3 * 64);
    let (_, bytes) = writer.finish().unwrap();
    assert_same(&decode(&bytes).devices["d"], &img, "image");
}

#[test]
fn finish_waits_for_writes_in_progress_on_other_threads() {
    let img = image(32 << 20, 4);
    let mut builder = Builder::new();
    let dev = builder.add_device("d", img.len() as u64).unwrap();
    let writer = builder.build(Vec::new()).unwrap();
    let h = writer.handle();
    let started = Barrier::new(2);
    std::thread::scope(|s| {
        let (img, started) = (&img, &started);
        let t = s.spawn(move || {
            h.write_range(dev, 0, &img[..CLUSTER]).unwrap();
            started.wait();
            // One big call; finish must wait for it rather than report it missing.
            h.write_range(dev, CLUSTER as u64, &img[CLUSTER..])
        });
        started.wait();
        let result = writer.finish();
        let late = t.join().unwrap();
        match (result, late) {
            // finish came after the call had started: it waited, and all is there.
            (Ok((_, bytes)), Ok(())) => assert_same(&decode(&bytes).devices["d"], img, "image"),
            // finish came first: the archive is incomplete and the call refused (while
            // finishing: Finished; once the failed archive is abandoned: Aborted).
            (Err(Error::Incomplete { .. }), Err(Error::Finished | Error::Aborted)) => {}
            other => panic!("unexpected outcome: {other:?}"),
        }
    });
}
