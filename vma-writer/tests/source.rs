//! Backing up files: sparse files skip their holes, sizes round like Proxmox's.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use vma_writer::{round_up_to_sector, source_size, Builder, Error};

/// A sparse file of `len` bytes with data at a few places; returns its full contents.
fn sparse_file(path: &Path, len: u64, pieces: &[(u64, usize)]) -> Vec<u8> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    file.set_len(len).unwrap();
    let mut expect = vec![0u8; len as usize];
    let mut rng = Rng(len | 1);
    for &(at, n) in pieces {
        let mut data = vec![0u8; n];
        rng.fill(&mut data);
        file.write_all_at(&data, at).unwrap();
        expect[at as usize..at as usize + n].copy_from_slice(&data);
    }
    file.sync_all().unwrap();
    expect
}

/// Backs up `path` into a device of `size` bytes; returns (archive, bytes read, progress).
fn backup(path: &Path, size: u64) -> (Vec<u8>, u64, Vec<u64>) {
    let file = File::open(path).unwrap();
    let mut builder = Builder::new();
    let dev = builder.add_device("drive-scsi0", size).unwrap();
    let writer = builder.build(Vec::new()).unwrap();
    let mut seen = Vec::new();
    let mut progress = |done: u64| seen.push(done);
    let read = writer.write_file(dev, &file, Some(&mut progress)).unwrap();
    let (_, bytes) = writer.finish().unwrap();
    (bytes, read, seen)
}

fn check_progress(seen: &[u64], size: u64) {
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress never goes back"
    );
    assert_eq!(seen.last(), Some(&size));
}

#[test]
fn a_sparse_file_is_backed_up_without_reading_its_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let len = (10 << 20) + 777;
    let expect = sparse_file(
        &path,
        len,
        &[
            (0, 100),
            ((3 << 20) + 5000, 8192),
            ((7 << 20) - 10, 20), // straddles a cluster boundary
            (len - 50, 50),       // the very end
        ],
    );
    assert_eq!(source_size(&File::open(&path).unwrap()).unwrap(), len);
    for size in [round_up_to_sector(len), len, len + (3 << 20) + 5] {
        let (bytes, read, seen) = backup(&path, size);
        let d = decode(&bytes);
        let got = &d.devices["drive-scsi0"];
        assert_same(&got[..len as usize], &expect, "image");
        assert!(
            got[len as usize..].iter().all(|&b| b == 0),
            "zero past the source"
        );
        assert_eq!(got.len() as u64, size);
        assert!(
            read <= 1 << 20,
            "holes were not skipped: {read} of {len} bytes read"
        );
        assert!(read > 0);
        check_progress(&seen, size);
    }
}

#[test]
fn an_all_hole_file_reads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.raw");
    let len = 5 << 20;
    sparse_file(&path, len, &[]);
    let (bytes, read, seen) = backup(&path, len);
    assert_eq!(read, 0);
    assert!(decode(&bytes).devices["drive-scsi0"]
        .iter()
        .all(|&b| b == 0));
    check_progress(&seen, len);
}

#[test]
fn a_dense_file_of_odd_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dense.raw");
    let img = image((9 << 20) + 4321, 21);
    std::fs::write(&path, &img).unwrap();
    let size = round_up_to_sector(img.len() as u64);
    let (bytes, read, seen) = backup(&path, size);
    let got = &decode(&bytes).devices["drive-scsi0"];
    assert_same(&got[..img.len()], &img, "image");
    assert_eq!(got.len() as u64, size);
    assert_eq!(read, img.len() as u64);
    check_progress(&seen, size);
}

#[test]
fn a_source_larger_than_the_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.raw");
    std::fs::write(&path, vec![1u8; 70_000]).unwrap();
    let mut builder = Builder::new();
    let dev = builder.add_device("drive-scsi0", 65_536).unwrap();
    let writer = builder.build(Vec::new()).unwrap();
    let e = writer
        .write_file(dev, &File::open(&path).unwrap(), None)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::SourceTooLarge {
                source_size: 70_000,
                size: 65_536,
                ..
            }
        ),
        "{e}"
    );
}
