//! A real guest boots straight from a compressed backup, without extracting it: `vma
//! serve` exports the system disk of a seekable `.vma.zst` over NBD, a qcow2 overlay
//! takes the guest's writes, and the guest's own kernel mounts the archived ext4 as its
//! root and finds the file written before the backup. The archive is not changed.

use std::fs;
use std::path::Path;
use std::process::Command;

use vma_examples::guest::{self, BootOptions, Guest};
use vma_examples::qemu::Disk;
use vma_testkit::{require_tool, run_ok, sha256_file, Serve};

/// Writes the file `/markers/NAME` into the ext4 image `image` with debugfs.
fn write_marker(image: &Path, name: &str) {
    let content = image.with_extension("marker");
    fs::write(&content, format!("{name}\n")).unwrap();
    run_ok(
        Command::new("debugfs")
            .arg("-w")
            .arg("-R")
            .arg(format!("write {} /markers/{name}", content.display()))
            .arg(image),
    );
    assert_eq!(
        guest::ext4_file(image, &format!("/markers/{name}")).unwrap(),
        Some(format!("{name}\n")),
        "debugfs wrote the marker"
    );
}

#[test]
#[ignore = "boots a Linux guest under QEMU (scripts/test runs it)"]
fn a_guest_boots_from_a_seekable_vma_zst_served_over_nbd_without_extracting() {
    for tool in ["qemu-system-x86_64", "qemu-img", "debugfs", "zstd"] {
        require_tool(tool);
    }
    let image = guest::image().unwrap();
    let vma = guest::vma_binary().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();

    // The system disk as of the backup: the guest's ext4 with a marker file in it.
    let sys = dir.join("sys.raw");
    fs::copy(&image.rootfs, &sys).unwrap();
    write_marker(&sys, "in-backup");
    let archive = dir.join("backup.vma.zst");
    run_ok(
        Command::new(&vma)
            .arg("create")
            .arg(&archive)
            .arg(format!("drive-virtio0={}", sys.display())),
    );
    run_ok(Command::new("zstd").arg("-q").arg("-t").arg(&archive));
    // Nothing but the archive holds the disk from here on.
    fs::remove_file(&sys).unwrap();
    let digest = sha256_file(&archive);

    let serve = Serve::start(&vma, &archive, &dir.join("vma.sock"), &[]);
    let overlay = dir.join("overlay.qcow2");
    let backing = serve.url("drive-virtio0");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&backing)
            .arg(&overlay),
    );
    let empty_overlay = fs::metadata(&overlay).unwrap().len();

    let disks = vec![Disk {
        path: overlay.clone(),
        format: "qcow2".into(),
        node_name: "sys".into(),
        qdev_id: "vd0".into(),
    }];
    let mut g = Guest::boot(dir, &image, disks, BootOptions::default()).unwrap();
    assert_eq!(
        g.found_markers(),
        vec!["in-backup".to_string()],
        "the guest mounted the archived filesystem as its root"
    );
    g.poweroff().unwrap();
    drop(g);

    assert_eq!(sha256_file(&archive), digest, "the archive is unchanged");
    assert!(
        fs::metadata(&overlay).unwrap().len() > empty_overlay,
        "the guest's writes (its root mounted read-write) went into the overlay"
    );
    let entries = vma_testkit::dir_entries(dir);
    assert!(
        !entries.iter().any(|e| e.ends_with(".raw")),
        "nothing was extracted: {entries:?}"
    );
    drop(serve);
}
