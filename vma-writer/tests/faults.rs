//! Misuse and failures: each gives its typed error, nothing panics, and the file helper
//! leaves neither a final-named archive nor a temporary file behind.

mod common;

use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use vma_testkit::dir_entries;
use vma_writer::{Builder, Device, Error, FileWriter};

/// A sink that accepts `limit` bytes, then fails every write.
#[derive(Debug)]
struct FailingSink {
    limit: usize,
    written: Arc<AtomicUsize>,
}

impl Write for FailingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let done = self.written.load(Ordering::Relaxed);
        if done >= self.limit {
            return Err(io::Error::other("disk full (test)"));
        }
        let n = buf.len().min(self.limit - done);
        self.written.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_sink_poisons_every_later_call() {
    for limit in [0, 100, 12288 + 1000, 3 << 20, 7 << 20] {
        let written = Arc::new(AtomicUsize::new(0));
        let img = image(40 << 20, 1);
        let mut builder = Builder::new();
        let dev = builder.add_device("drive-scsi0", img.len() as u64).unwrap();
        let other = builder.add_device("drive-scsi1", 1 << 20).unwrap();
        let sink = FailingSink {
            limit,
            written: written.clone(),
        };
        let writer = builder.build(sink).unwrap();
        let handle = writer.handle();
        let mut first = None;
        for c in 0..clusters(img.len()) {
            if let Err(e) = writer.write_cluster(dev, c, cluster_of(&img, c)) {
                first = Some(e);
                break;
            }
        }
        // 40 MiB of mostly random data cannot all be in flight (a few extents are):
        // backpressure makes the failure surface during the writes.
        let first = first.expect("the sink failure surfaces before all data is written");
        let Error::Sink { offset, .. } = &first else {
            panic!("expected a sink error, got {first}");
        };
        assert_eq!(*offset, limit as u64);
        assert!(first.is_poison());
        assert!(first.to_string().contains("disk full (test)"), "{first}");
        // Every later call, on any handle, of any kind, returns the same error.
        let again = [
            handle.write_zero_cluster(other, 0),
            handle.write_range(other, 0, &[1; 65536]),
            writer.write_zero_range(dev, 0, 65536),
            writer.write_cluster(dev, 99_999, &[]), // even a bad call
        ];
        for e in again {
            match e {
                Err(Error::Sink { offset: o, .. }) => assert_eq!(o, limit as u64),
                other => panic!("expected the poison, got {other:?}"),
            }
        }
        match writer.finish() {
            Err(Error::Sink { offset: o, .. }) => assert_eq!(o, limit as u64),
            other => panic!(
                "expected the poison from finish, got {:?}",
                other.map(|(s, _)| s)
            ),
        }
        assert!(matches!(
            handle.write_zero_cluster(other, 1),
            Err(Error::Sink { .. })
        ));
        assert_eq!(written.load(Ordering::Relaxed), limit);
    }
}

#[test]
fn misuse_gives_typed_errors() {
    let size = 20 * CLUSTER as u64 + 100;
    let mut builder = Builder::new();
    let dev = builder.add_device("drive-scsi0", size).unwrap();
    let vm = builder.add_vmstate(1000).unwrap();
    let mut stranger_builder = Builder::new();
    let stranger = stranger_builder.add_device("drive-scsi0", size).unwrap();
    let writer = builder.build(Vec::new()).unwrap();
    let full = vec![1u8; CLUSTER];

    writer.write_cluster(dev, 17, &full).unwrap();
    let e = writer.write_cluster(dev, 17, &full).unwrap_err();
    assert!(matches!(e, Error::DuplicateCluster { cluster: 17, .. }));
    assert_eq!(
        e.to_string(),
        "device drive-scsi0: cluster 17 written twice"
    );
    assert!(matches!(
        writer.write_zero_cluster(dev, 17),
        Err(Error::DuplicateCluster { .. })
    ));

    // A range containing a written cluster is refused as a whole: nothing of it is stored.
    let e = writer
        .write_range(dev, 16 * CLUSTER as u64, &vec![2u8; 3 * CLUSTER])
        .unwrap_err();
    assert!(
        matches!(e, Error::DuplicateCluster { cluster: 17, .. }),
        "{e}"
    );
    writer.write_cluster(dev, 16, &full).unwrap();

    let e = writer.write_cluster(dev, 21, &full).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ClusterPastEnd {
                cluster: 21,
                clusters: 21,
                ..
            }
        ),
        "{e}"
    );
    assert!(matches!(
        writer.write_zero_cluster(dev, u32::MAX),
        Err(Error::ClusterPastEnd { .. })
    ));

    let e = writer.write_cluster(dev, 3, &full[..1000]).unwrap_err();
    assert!(matches!(e, Error::ClusterLength { len: 1000, .. }), "{e}");
    let e = writer.write_cluster(dev, 20, &full[..99]).unwrap_err();
    assert!(matches!(e, Error::ClusterLength { span: 100, .. }), "{e}");

    let e = writer.write_cluster(stranger, 0, &full).unwrap_err();
    assert!(matches!(e, Error::UnknownDevice { id: 1 }), "{e}");
    assert!(matches!(
        writer.write_zero_range(stranger, 0, 65536),
        Err(Error::UnknownDevice { .. })
    ));

    let e = writer.write_range(dev, 4096, &full).unwrap_err();
    assert!(matches!(e, Error::Misaligned { offset: 4096, .. }), "{e}");
    let e = writer.write_range(dev, 0, &full[..4096]).unwrap_err();
    assert!(matches!(e, Error::Misaligned { len: 4096, .. }), "{e}");
    let e = writer.write_zero_range(dev, 0, 100).unwrap_err();
    assert!(matches!(e, Error::Misaligned { .. }), "{e}");
    let e = writer
        .write_zero_range(dev, 19 * CLUSTER as u64, 3 * CLUSTER as u64)
        .unwrap_err();
    assert!(matches!(e, Error::RangePastEnd { .. }), "{e}");
    let e = writer.write_zero_range(dev, 0, u64::MAX).unwrap_err();
    assert!(matches!(e, Error::RangePastEnd { .. }), "{e}");

    writer.append_vmstate(vm, &[5; 600]).unwrap();
    let e = writer.append_vmstate(vm, &[5; 401]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::VmstateOverflow {
                size: 1000,
                written: 600,
                len: 401
            }
        ),
        "{e}"
    );

    // Missing clusters: finish names them.
    writer
        .write_zero_range(dev, 0, 10 * CLUSTER as u64)
        .unwrap();
    let e = writer.finish().unwrap_err();
    let Error::Incomplete { total, missing } = &e else {
        panic!("expected Incomplete, got {e}");
    };
    assert_eq!(*total, 21 - 12);
    assert_eq!(missing[0].device, "drive-scsi0");
    assert_eq!(missing[0].clusters, vec![10, 11, 12, 13, 14, 15, 18, 19]);
    assert_eq!(
        e.to_string(),
        "archive incomplete: 9 clusters never written (drive-scsi0: 10, 11, 12, 13, 14, 15, 18, 19 and 1 more)"
    );
}

#[test]
fn declaring_nothing_is_refused() {
    assert!(matches!(
        Builder::new().build(Vec::new()),
        Err(Error::Format(vma_format::FormatError::EmptyHeader))
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.vma");
    assert!(matches!(
        Builder::new().create_file(&path),
        Err(Error::Format(vma_format::FormatError::EmptyHeader))
    ));
    assert_dir_empty(dir.path());
}

#[test]
fn calls_after_finish_or_abort_fail() {
    let mut builder = Builder::new();
    let dev = builder.add_device("d", 1).unwrap();
    let writer = builder.build(Vec::new()).unwrap();
    let h = writer.handle();
    h.write_zero_cluster(dev, 0).unwrap();
    writer.finish().unwrap();
    assert!(matches!(h.write_zero_cluster(dev, 0), Err(Error::Finished)));

    let mut builder = Builder::new();
    let dev = builder.add_device("d", 1 << 20).unwrap();
    let writer = builder.build(Vec::new()).unwrap();
    let h = writer.handle();
    h.write_range(dev, 0, &[3; 65536]).unwrap();
    let sink = writer.abort().unwrap();
    assert!(sink.len() <= 12288 + 512 + 65536);
    assert!(matches!(h.write_zero_cluster(dev, 1), Err(Error::Aborted)));

    // Dropping the writer aborts too.
    let mut builder = Builder::new();
    let dev = builder.add_device("d", 1 << 20).unwrap();
    let writer = builder.build(Vec::new()).unwrap();
    let h = writer.handle();
    drop(writer);
    assert!(matches!(h.write_zero_cluster(dev, 1), Err(Error::Aborted)));
}

fn assert_dir_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

/// A file writer at `path` for one disk `drive-scsi0` of `size` bytes.
fn one_disk_file(path: &Path, size: usize) -> (FileWriter, Device) {
    let mut builder = Builder::new();
    let dev = builder.add_device("drive-scsi0", size as u64).unwrap();
    (builder.create_file(path).unwrap(), dev)
}

#[test]
fn the_file_helper_leaves_nothing_behind_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vzdump-qemu-100.vma");
    let img = image(3 << 20, 9);

    // Misuse errors, then missing clusters at finish.
    let (w, dev) = one_disk_file(&path, img.len());
    assert_eq!(w.path(), path);
    let temp = dir_entries(dir.path());
    assert_eq!(temp.len(), 1);
    assert!(
        temp[0].starts_with(".vzdump-qemu-100.vma.partial-"),
        "{temp:?}"
    );
    w.write_range(dev, 0, &img[..1 << 20]).unwrap();
    assert!(matches!(
        w.write_zero_cluster(dev, 0),
        Err(Error::DuplicateCluster { .. })
    ));
    assert!(matches!(
        w.write_zero_cluster(dev, 9999),
        Err(Error::ClusterPastEnd { .. })
    ));
    assert!(matches!(
        w.write_range(dev, 1, &[]),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(w.finish(), Err(Error::Incomplete { .. })));
    assert_dir_empty(dir.path());

    // Explicit abort.
    let (w, dev) = one_disk_file(&path, img.len());
    w.write_range(dev, 0, &img).unwrap();
    w.abort().unwrap();
    assert_dir_empty(dir.path());

    // Dropped without finishing (a backup job that errored out).
    let (w, dev) = one_disk_file(&path, img.len());
    w.write_range(dev, 0, &img).unwrap();
    drop(w);
    assert_dir_empty(dir.path());
}

#[test]
fn the_file_helper_renames_only_a_complete_archive_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.vma");
    let img = image(1 << 20, 10);
    let mut builder = Builder::new();
    builder.fsync(true);
    let dev = builder.add_device("drive-scsi0", img.len() as u64).unwrap();
    let w = builder.create_file(&path).unwrap();
    w.write_range(dev, 0, &img).unwrap();
    let summary = w.finish().unwrap();
    assert_eq!(dir_entries(dir.path()), vec!["a.vma".to_string()]);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(summary.archive_bytes, bytes.len() as u64);
    assert_same(&decode(&bytes).devices["drive-scsi0"], &img, "image");

    // The target exists: refused at creation, the file untouched.
    let mut builder = Builder::new();
    builder.add_device("drive-scsi0", 1).unwrap();
    let e = builder.create_file(&path).unwrap_err();
    assert!(matches!(e, Error::TargetExists { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    // The target appears while the archive is written: finish refuses to replace it.
    let late = dir.path().join("b.vma");
    let mut builder = Builder::new();
    builder.fsync(false);
    let dev = builder.add_device("drive-scsi0", 1).unwrap();
    let w = builder.create_file(&late).unwrap();
    w.write_zero_cluster(dev, 0).unwrap();
    std::fs::write(&late, b"someone else's").unwrap();
    let e = w.finish().unwrap_err();
    assert!(matches!(e, Error::TargetExists { .. }), "{e}");
    assert_eq!(std::fs::read(&late).unwrap(), b"someone else's");
    assert_eq!(
        dir_entries(dir.path()),
        vec!["a.vma".to_string(), "b.vma".to_string()]
    );
}

#[test]
fn a_failed_rename_leaves_nothing() {
    // The temporary file vanishes under the writer (a cleanup job, say): the writes still
    // succeed, the rename fails with a typed error, and no final-named file appears.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone.vma");
    let mut builder = Builder::new();
    builder.fsync(false);
    let dev = builder.add_device("drive-scsi0", 4 << 20).unwrap();
    let w = builder.create_file(&path).unwrap();
    for name in dir_entries(dir.path()) {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }
    w.write_range(dev, 0, &image(4 << 20, 3)).unwrap();
    let e = w.finish().unwrap_err();
    assert!(matches!(e, Error::File { op: "rename", .. }), "{e}");
    assert_dir_empty(dir.path());
}
