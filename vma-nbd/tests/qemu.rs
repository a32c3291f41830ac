//! Interoperability with QEMU's NBD client (qemu-io, qemu-img).

mod common;

use common::*;

const MIB: usize = 1 << 20;

/// `qemu-img convert` of export `name` of the server on `sock` into a new `out` in
/// `format`.
fn convert_export(name: &str, sock: &std::path::Path, out: &std::path::Path, format: &str) {
    let uri = nbd_uri(name, sock);
    let out = out.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", format, &uri, out],
    );
}

/// One RAM disk holding `data` served as `name` (QEMU's tools required): the export, its
/// NBD URI, and what keeps the server running.
fn serve_one(
    name: &str,
    data: Vec<u8>,
    read_only: bool,
) -> (
    std::sync::Arc<vma_nbd::MemExport>,
    String,
    (tempfile::TempDir, vma_nbd::ServerHandle),
) {
    require_qemu_tools();
    let e = mem(data, read_only);
    let (dir, sock, h) = start(vec![(name, e.clone())]);
    (e, nbd_uri(name, &sock), (dir, h))
}

/// What a copy into an export starts from (QEMU's tools required): a source image of
/// `len` bytes with `holes` zeroed, written to `src.raw` in the server's folder, and a
/// writable export of the same size full of 0xff, served as `drive-scsi0`.
struct CopyCase {
    src: Vec<u8>,
    src_path: std::path::PathBuf,
    export: std::sync::Arc<vma_nbd::MemExport>,
    sock: std::path::PathBuf,
    _server: (tempfile::TempDir, vma_nbd::ServerHandle),
}

fn copy_case(len: usize, seed: u8, holes: [std::ops::Range<usize>; 2]) -> CopyCase {
    require_qemu_tools();
    let mut src = pattern(len, seed);
    for h in holes {
        src[h].fill(0);
    }
    let export = mem(vec![0xff; len], false);
    let (dir, sock, h) = start(vec![("drive-scsi0", export.clone())]);
    let src_path = dir.path().join("src.raw");
    std::fs::write(&src_path, &src).unwrap();
    CopyCase {
        src,
        src_path,
        export,
        sock,
        _server: (dir, h),
    }
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_io_write_then_read() {
    let (e, uri, _server) = serve_one("drive-scsi0", vec![0; 4 * MIB], false);
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
    let (e, uri, _server) = serve_one("d", vec![0; 8 * MIB], false);
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
    convert_export("drive-virtio0", &sock, &out, "raw");
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
    convert_export("disk", &sock, &out, "qcow2");
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
    let c = copy_case(16 * MIB, 13, [3 * MIB..5 * MIB, 9 * MIB + 4096..10 * MIB]);
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
            c.src_path.to_str().unwrap(),
            &nbd_uri("drive-scsi0", &c.sock),
        ],
    );
    assert!(
        c.export.snapshot() == c.src,
        "exported data differs from the source"
    );
    assert!(c.export.flushes() >= 1);
}

#[test]
#[ignore = "needs QEMU (qemu-utils); scripts/test runs it with --include-ignored"]
fn qemu_io_write_to_read_only_export_fails() {
    let (e, uri, _server) = serve_one("ro", pattern(MIB, 1), true);
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

    let c = copy_case(8 * MIB, 21, [2 * MIB..3 * MIB, 5 * MIB + 4096..6 * MIB]);

    let mut child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!(
                "driver=file,filename={},node-name=file0",
                c.src_path.display()
            ),
            "--blockdev",
            "driver=raw,file=file0,node-name=src",
            "--blockdev",
            &format!(
                "driver=nbd,server.type=unix,server.path={},export=drive-scsi0,node-name=tgt",
                c.sock.display()
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
    assert!(
        c.export.snapshot() == c.src,
        "backup data differs from the source"
    );
}
