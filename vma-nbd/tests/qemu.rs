//! Interoperability with QEMU's NBD client (qemu-io, qemu-img).

mod common;

use common::*;

const MIB: usize = 1 << 20;

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_io_write_then_read() {
    require_qemu_tools();
    let e = mem(vec![0; 4 * MIB], false);
    let (_d, sock, _h) = start(vec![("drive-scsi0", e.clone())]);
    let uri = nbd_uri("drive-scsi0", &sock);
    qemu_io(
        &["-f", "raw"],
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 1M 512k",
            "write -z 64k 64k",
            "read -P 0xab 0 64k",
            "read -P 0 64k 64k",
            "read -P 0xab 128k 896k",
            "read -P 0xcd 1M 512k",
            "flush",
        ],
    );
    let snap = e.snapshot();
    assert!(snap[..65536].iter().all(|&b| b == 0xab));
    assert!(snap[65536..131072].iter().all(|&b| b == 0));
    assert!(snap[131072..MIB].iter().all(|&b| b == 0xab));
    assert!(snap[MIB..MIB + MIB / 2].iter().all(|&b| b == 0xcd));
    assert!(snap[MIB + MIB / 2..].iter().all(|&b| b == 0));
    assert!(e.flushes() >= 1);
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_io_pipelined_aio() {
    require_qemu_tools();
    let e = mem(vec![0; 8 * MIB], false);
    let (_d, sock, _h) = start(vec![("d", e.clone())]);
    let uri = nbd_uri("d", &sock);
    let mut commands: Vec<String> = (0..8)
        .map(|i| format!("aio_write -P {} {}M 1M", 0x10 + i, i))
        .collect();
    commands.push("aio_flush".into());
    commands.extend((0..8).map(|i| format!("aio_read -P {} {}M 1M", 0x10 + i, i)));
    commands.push("aio_flush".into());
    qemu_io(&["-f", "raw"], &uri, &commands);
    let snap = e.snapshot();
    for i in 0..8 {
        assert!(snap[i * MIB..(i + 1) * MIB]
            .iter()
            .all(|&b| b == 0x10 + i as u8));
    }
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_img_info() {
    require_qemu_tools();
    let e = mem(vec![0; 3 * MIB], true);
    let (_d, sock, _h) = start(vec![("disk", e)]);
    let out = run_ok(
        "qemu-img",
        &["info", "--output=json", &nbd_uri("disk", &sock)],
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.contains(&format!("\"virtual-size\": {}", 3 * MIB)),
        "{json}"
    );
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_img_convert_raw_is_exact() {
    require_qemu_tools();
    let mut data = pattern(9 * MIB + 4096, 9);
    data[2 * MIB..3 * MIB].fill(0);
    let e = mem(data.clone(), true);
    let (dir, sock, _h) = start(vec![("drive-virtio0", e)]);
    let out = dir.path().join("out.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &nbd_uri("drive-virtio0", &sock),
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_img_convert_to_qcow2_keeps_holes() {
    require_qemu_tools();
    let g = HOLE_GRANULE as usize;
    let mut data = pattern(4 * MIB, 11);
    // Holes: [0, 1 MiB) and [2 MiB + 64 KiB, 3 MiB).
    data[..MIB].fill(0);
    data[2 * MIB + g..3 * MIB].fill(0);
    let e = mem_with(data.clone(), true, true, vma_nbd::BlockSize::default());
    let (dir, sock, _h) = start(vec![("disk", e.clone())]);
    let out = dir.path().join("out.qcow2");
    let raw = dir.path().join("ref.raw");
    std::fs::write(&raw, &data).unwrap();
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &nbd_uri("disk", &sock),
            out.to_str().unwrap(),
        ],
    );
    assert!(
        e.block_status_calls() > 0,
        "qemu-img did not query block status"
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            out.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    // The holes are unallocated in the qcow2.
    let map = run_ok(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", out.to_str().unwrap()],
    );
    let map = String::from_utf8_lossy(&map.stdout);
    let data_ranges: Vec<(u64, u64)> = map
        .lines()
        .filter(|l| l.contains("\"data\": true"))
        .map(|l| {
            (
                json_u64(l, "start").unwrap(),
                json_u64(l, "length").unwrap(),
            )
        })
        .collect();
    assert!(!data_ranges.is_empty(), "{map}");
    for (start, len) in &data_ranges {
        let (s, e) = (*start as usize, (*start + *len) as usize);
        assert!(s >= MIB, "hole at start allocated: {map}");
        assert!(
            e <= 2 * MIB + g || s >= 3 * MIB,
            "middle hole allocated: {map}"
        );
    }
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_img_convert_into_writable_export() {
    // Like a backup job: many pipelined 1 MiB writes and write-zeroes,
    // out of order, then a flush.
    require_qemu_tools();
    let mut src = pattern(16 * MIB, 13);
    src[3 * MIB..5 * MIB].fill(0);
    src[9 * MIB + 4096..10 * MIB].fill(0);
    let e = mem(vec![0xff; 16 * MIB], false);
    let (dir, sock, _h) = start(vec![("drive-scsi0", e.clone())]);
    let src_path = dir.path().join("src.raw");
    std::fs::write(&src_path, &src).unwrap();
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-W",
            "-m",
            "16",
            "-f",
            "raw",
            "-O",
            "raw",
            src_path.to_str().unwrap(),
            &nbd_uri("drive-scsi0", &sock),
        ],
    );
    assert!(e.snapshot() == src, "exported data differs from the source");
    assert!(e.flushes() >= 1);
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_io_write_to_read_only_export_fails() {
    require_qemu_tools();
    let e = mem(pattern(MIB, 1), true);
    let (_d, sock, _h) = start(vec![("ro", e.clone())]);
    let uri = nbd_uri("ro", &sock);
    // Opened read-write: QEMU refuses the read-only export.
    let out = run("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0xab 0 64k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "qemu-io write succeeded: {text}");
    // Opened read-only: the write command fails.
    let out = run(
        "qemu-io",
        &["-r", "-f", "raw", &uri, "-c", "write -P 0xab 0 64k"],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            || text.to_lowercase().contains("permission denied")
            || text.contains("read-only"),
        "qemu-io -r write did not fail: {text}"
    );
    assert_eq!(e.snapshot(), pattern(MIB, 1));
    // Reading works.
    run_ok("qemu-io", &["-r", "-f", "raw", &uri, "-c", "read 0 64k"]);
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_over_tcp() {
    require_qemu_tools();
    let e = mem(vec![0; 2 * MIB], false);
    let server = vma_nbd::Server::builder()
        .export("disk", e.clone())
        .build()
        .unwrap();
    let h = server.listen_tcp("127.0.0.1:0").unwrap();
    let vma_nbd::ListenAddr::Tcp(addr) = h.local_addr().clone() else {
        panic!("not TCP")
    };
    let uri = format!("nbd://{addr}/disk");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x42 4k 60k",
            "-c",
            "read -P 0x42 4k 60k",
        ],
    );
    assert!(e.snapshot()[4096..65536].iter().all(|&b| b == 0x42));
    h.shutdown().unwrap();
}

/// The real use case: QEMU's backup job writes a disk into our export.
#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_blockdev_backup_into_export() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    require_qemu_tools();
    let mut src = pattern(8 * MIB, 21);
    src[2 * MIB..3 * MIB].fill(0);
    src[5 * MIB + 4096..6 * MIB].fill(0);
    let e = mem(vec![0xff; 8 * MIB], false);
    let (dir, sock, _h) = start(vec![("drive-scsi0", e.clone())]);
    let src_path = dir.path().join("src.raw");
    std::fs::write(&src_path, &src).unwrap();

    let mut child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!(
                "driver=file,filename={},node-name=file0",
                src_path.display()
            ),
            "--blockdev",
            "driver=raw,file=file0,node-name=src",
            "--blockdev",
            &format!(
                "driver=nbd,server.type=unix,server.path={},export=drive-scsi0,node-name=tgt",
                sock.display()
            ),
            "--chardev",
            "stdio,id=qmp0",
            "--monitor",
            "chardev=qmp0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run qemu-storage-daemon (qemu-utils): {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str| -> String {
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("timeout waiting for {what}"));
            assert!(!line.contains("\"error\""), "QMP error: {line}");
            if line.contains(what) {
                return line;
            }
        }
    };
    wait_for("\"QMP\"");
    writeln!(stdin, r#"{{"execute": "qmp_capabilities"}}"#).unwrap();
    wait_for("\"return\"");
    writeln!(
        stdin,
        r#"{{"execute": "blockdev-backup", "arguments": {{"job-id": "backup0", "device": "src", "target": "tgt", "sync": "full"}}}}"#
    )
    .unwrap();
    wait_for("\"return\"");
    let done = wait_for("BLOCK_JOB_COMPLETED");
    assert!(done.contains(&format!("\"offset\": {}", 8 * MIB)), "{done}");
    writeln!(stdin, r#"{{"execute": "quit"}}"#).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(e.snapshot() == src, "backup data differs from the source");
}
