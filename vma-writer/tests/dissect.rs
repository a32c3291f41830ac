//! An independent reader: dissect.archive (Python) reads what the writer wrote.
//!
//! Runs the Python interpreter named by `VMA_TEST_PYTHON` (scripts/test sets it) or, when
//! that is unset, the one in the workspace's `.venv/`, where scripts/install-deps installs
//! dissect.archive. The tests fail if that interpreter is missing or lacks dissect.archive:
//! never a silent skip.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use vma_writer::Builder;

const SCRIPT: &str = r#"
import hashlib, sys
from dissect.archive.vma import VMA
with open(sys.argv[1], "rb") as fh:
    vma = VMA(fh)
    for name, data in vma.configs().items():
        print("CFG", name, hashlib.sha256(data).hexdigest())
    for dev in vma.devices():
        data = dev.open().read()
        print("DEV", dev.name, dev.id, dev.size, len(data), hashlib.sha256(data).hexdigest())
"#;

/// The interpreter that has dissect.archive: `VMA_TEST_PYTHON`, else `<workspace>/.venv`.
/// Panics, naming scripts/install-deps, if it cannot import dissect.archive.
fn python() -> PathBuf {
    let (python, from) = match std::env::var_os("VMA_TEST_PYTHON") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), "VMA_TEST_PYTHON"),
        _ => (
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("vma-writer sits in the workspace")
                .join(".venv/bin/python3"),
            "the default, as VMA_TEST_PYTHON is unset",
        ),
    };
    let probe = Command::new(&python)
        .args(["-c", "import dissect.archive"])
        .output();
    match probe {
        Ok(out) if out.status.success() => python,
        Ok(out) => panic!(
            "{} ({from}) cannot import dissect.archive; run scripts/install-deps, which \
             installs it into .venv/: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => panic!(
            "cannot run {} ({from}): {e}; run scripts/install-deps, which creates .venv/ \
             with dissect.archive",
            python.display()
        ),
    }
}

/// What dissect.archive reads: configs (name → sha256) and devices (name → id, size, sha256).
#[allow(clippy::type_complexity)]
fn read_with_dissect(
    path: &Path,
) -> (
    BTreeMap<String, String>,
    BTreeMap<String, (u8, u64, String)>,
) {
    let python = python();
    let out = Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "dissect.archive ({}) failed to read the archive: {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut configs = BTreeMap::new();
    let mut devices = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["CFG", name, sha] => {
                configs.insert(name.to_string(), sha.to_string());
            }
            ["DEV", name, id, size, len, sha] => {
                assert_eq!(size, len, "{name}: dissect read the whole device");
                devices.insert(
                    name.to_string(),
                    (id.parse().unwrap(), size.parse().unwrap(), sha.to_string()),
                );
            }
            _ => panic!("unexpected output: {line}"),
        }
    }
    (configs, devices)
}

/// Each image is the device of its name that dissect read, numbered in order.
fn assert_devices(
    devices: &BTreeMap<String, (u8, u64, String)>,
    images: &[(&str, Vec<u8>)],
    what: &str,
) {
    for (i, (name, img)) in images.iter().enumerate() {
        let (id, size, sha) = &devices[*name];
        assert_eq!(usize::from(*id), i + 1, "{name} ({what})");
        assert_eq!(*size, img.len() as u64, "{name} ({what})");
        assert_eq!(*sha, sha256_hex(img), "{name} ({what})");
    }
}

fn check(integrity: bool) {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<(&str, Vec<u8>)> = vec![
        ("drive-scsi0", image((3 << 20) + 12345, 1)),
        ("drive-virtio1", {
            // Large zero regions in the middle.
            let mut i = image(2 << 20, 2);
            i[100_000..1_500_000].fill(0);
            i
        }),
        ("drive-sata0", image(1000, 3)),
        ("drive-efidisk0", image(65536 * 3 + 4100, 4)),
        ("drive-ide2", vec![0u8; 4096 * 5 + 1]),
    ];
    let state = image(300_000, 5);
    let mut builder = Builder::new();
    builder.integrity(integrity);
    builder
        .add_config("qemu-server.conf", b"memory: 2048\ncores: 2\n")
        .unwrap();
    builder
        .add_config("qemu-server.fw", b"[OPTIONS]\nenable: 1\n")
        .unwrap();
    let devs = add_devices(&mut builder, &images);
    let vm = builder.add_vmstate(state.len() as u64).unwrap();
    let path = dir.path().join("vzdump-qemu-100.vma");
    let writer = builder.create_file(&path).unwrap();
    // Interleave devices, descending and shuffled orders, ranges and zero clusters.
    let mut rng = Rng(77);
    let mut work: Vec<(usize, u32)> = Vec::new();
    for (i, (_, img)) in images.iter().enumerate() {
        work.extend((0..clusters(img.len())).map(|c| (i, c)));
    }
    rng.shuffle(&mut work);
    for (k, &(i, c)) in work.iter().enumerate() {
        let img = &images[i].1;
        let data = cluster_of(img, c);
        if k % 3 == 0 {
            let offset = u64::from(c) * CLUSTER as u64;
            writer.write_range(devs[i], offset, data).unwrap();
        } else if data.iter().all(|&b| b == 0) {
            writer.write_zero_cluster(devs[i], c).unwrap();
        } else {
            writer.write_cluster(devs[i], c, data).unwrap();
        }
        if k % 50 == 0 {
            let n = (state.len() / 10).min(state.len() - (k / 50) * (state.len() / 10));
            let at = (k / 50) * (state.len() / 10);
            if at < state.len() {
                writer.append_vmstate(vm, &state[at..at + n]).unwrap();
            }
        }
    }
    let appended = (work.len().div_ceil(50)).min(10) * (state.len() / 10);
    writer.append_vmstate(vm, &state[appended..]).unwrap();
    writer.finish().unwrap();

    let (configs, devices) = read_with_dissect(&path);
    assert_eq!(
        configs["qemu-server.conf"],
        sha256_hex(b"memory: 2048\ncores: 2\n")
    );
    assert_eq!(
        configs["qemu-server.fw"],
        sha256_hex(b"[OPTIONS]\nenable: 1\n")
    );
    assert_devices(&devices, &images, &format!("integrity {integrity}"));
    assert_eq!(devices["vmstate"].2, sha256_hex(&state), "vmstate");
    // And the strict decoder agrees.
    let d = decode(&std::fs::read(&path).unwrap());
    assert_eq!(d.seal.is_some(), integrity);
}

#[test]
#[ignore = "needs dissect.archive in .venv (scripts/install-deps); scripts/test runs it with --include-ignored"]
fn dissect_reads_every_device_with_integrity() {
    check(true);
}

#[test]
#[ignore = "needs dissect.archive in .venv (scripts/install-deps); scripts/test runs it with --include-ignored"]
fn dissect_reads_every_device_without_integrity() {
    check(false);
}

/// A reproducible archive (derived uuid, canonical order, written by a thread per disk)
/// reads in dissect.archive like any other.
#[test]
#[ignore = "needs dissect.archive in .venv (scripts/install-deps); scripts/test runs it with --include-ignored"]
fn dissect_reads_a_reproducible_archive() {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<(&str, Vec<u8>)> = vec![
        ("drive-scsi0", image((2 << 20) + 777, 21)),
        ("drive-scsi1", image(65536 * 5, 22)),
        ("drive-efidisk0", image(1000, 23)),
    ];
    let mut builder = Builder::new();
    builder.reproducible().ctime(1_700_000_000);
    builder
        .add_config("qemu-server.conf", b"memory: 512\n")
        .unwrap();
    let devs = add_devices(&mut builder, &images);
    let path = dir.path().join("reproducible.vma");
    let writer = builder.create_file(&path).unwrap();
    std::thread::scope(|s| {
        for (dev, (_, img)) in devs.iter().zip(&images).rev() {
            let h = writer.handle();
            s.spawn(move || {
                for (c, chunk) in img.chunks(3 * CLUSTER).enumerate() {
                    h.write_range(*dev, (c * 3 * CLUSTER) as u64, chunk)
                        .unwrap();
                }
            });
        }
    });
    writer.finish().unwrap();
    let (configs, devices) = read_with_dissect(&path);
    assert_eq!(configs["qemu-server.conf"], sha256_hex(b"memory: 512\n"));
    assert_devices(&devices, &images, "reproducible");
    let d = decode(&std::fs::read(&path).unwrap());
    assert!(d.seal.is_some());
    assert_eq!(d.header.uuid.get_version_num(), 8);
}
