//! `vma serve` with the real qemu-utils: every device of every vector converted through the
//! export (raw and qcow2) to exactly the expected image, random reads through `qemu-io`,
//! protocol edge cases, and clean shutdown.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use vma_testkit::serve::wait_with_timeout;
use vma_testkit::{require_tool as require, run_ok, sha256_file, vectors, Serve, Vector};

const VMA: &str = env!("CARGO_BIN_EXE_vma");

/// `vma serve ARCHIVE --socket SOCKET EXTRA...`, killed on drop.
fn start_serve(archive: &Path, socket: &Path, extra: &[&str]) -> Serve {
    Serve::start(Path::new(VMA), archive, socket, extra)
}

/// `qemu-img convert` of export `dev` to the raw file `raw` gives exactly `want`.
fn assert_converts_to(
    serve: &Serve,
    dev: &str,
    raw: &Path,
    want: &vma_testkit::ExpectedFile,
    what: &str,
) {
    let _ = fs::remove_file(raw);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        &serve.url(dev),
        "-O",
        "raw",
        raw.to_str().unwrap(),
    ]);
    assert_eq!(fs::metadata(raw).unwrap().len(), want.size, "{what} {dev}");
    assert_eq!(sha256_file(raw), want.sha256, "{what} {dev}");
}

/// Serves `archive` (a packed copy of `v`, on the socket `ARCHIVE.sock`): each of
/// `devices` converts to a raw file (`ARCHIVE.DEV.raw`) of exactly the vector's bytes.
fn assert_every_device_converts(archive: &Path, v: &Vector, devices: &[String]) {
    let next_to = |suffix: String| {
        let mut path = archive.as_os_str().to_owned();
        path.push(suffix);
        PathBuf::from(path)
    };
    let sock = next_to(".sock".to_string());
    let mut serve = start_serve(archive, &sock, &[]);
    for dev in devices {
        let want = v.file(&format!("disk-{dev}.raw")).unwrap();
        assert_converts_to(&serve, dev, &next_to(format!(".{dev}.raw")), want, &v.file);
    }
    assert!(serve.interrupt().success());
}

/// `vma serve` of vector `n` on `s.sock` in a new temporary folder, with `extra`
/// arguments: the folder, the vector, the socket and the server.
fn serve_vector(n: usize, extra: &[&str]) -> (tempfile::TempDir, Vector, PathBuf, Serve) {
    let tmp = tempfile::tempdir().unwrap();
    let v = vectors().swap_remove(n);
    let sock = tmp.path().join("s.sock");
    let serve = start_serve(&v.path(), &sock, extra);
    (tmp, v, sock, serve)
}

/// `qemu-img info` of the NBD `url` fails (`why` says why it must).
fn assert_does_not_open(url: &str, why: &str) {
    let out = Command::new("qemu-img")
        .args(["info", url])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{why}");
}

fn qemu_img(args: &[&str]) {
    run_ok(Command::new("qemu-img").args(args));
}

/// The vectors with devices (QEMU's qemu-img required), each with the device names
/// Proxmox's `vma list` printed for it.
fn vectors_with_devices() -> Vec<(Vector, Vec<String>)> {
    require("qemu-img");
    vectors()
        .into_iter()
        .map(|v| {
            let names = (v.list.iter())
                .filter_map(|l| l.rsplit_once(" devname: ").map(|(_, n)| n.to_string()))
                .collect();
            (v, names)
        })
        .filter(|(_, names): &(_, Vec<String>)| !names.is_empty())
        .collect()
}

/// `qemu-img convert -f FROM_FORMAT FROM -O TO_FORMAT TO`.
fn convert(from_format: &str, from: &str, to_format: &str, to: &str) {
    qemu_img(&["convert", "-f", from_format, from, "-O", to_format, to]);
}

#[test]
#[ignore = "needs QEMU's tools (qemu-img, qemu-io); scripts/test runs it with --include-ignored"]
fn every_device_converts_to_raw_and_qcow2_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    for (v, devices) in vectors_with_devices() {
        let sock = tmp.path().join(format!("{}.sock", v.file));
        let mut serve = start_serve(&v.path(), &sock, &[]);
        for dev in &devices {
            let want = v.file(&format!("disk-{dev}.raw")).unwrap();
            let raw = tmp.path().join(format!("{dev}.raw"));
            assert_converts_to(&serve, dev, &raw, want, &format!("{} raw", v.file));
            let qcow = tmp.path().join(format!("{dev}.qcow2"));
            let back = tmp.path().join(format!("{dev}.back.raw"));
            convert("raw", &serve.url(dev), "qcow2", qcow.to_str().unwrap());
            convert(
                "qcow2",
                qcow.to_str().unwrap(),
                "raw",
                back.to_str().unwrap(),
            );
            assert_eq!(
                sha256_file(&back),
                want.sha256,
                "{} {dev} via qcow2",
                v.file
            );
        }
        assert!(serve.interrupt().success());
        assert!(!sock.exists(), "socket removed at exit");
    }
}

/// Every vector compressed as `vma create X.vma.zst` compresses it (frames of one extent,
/// and of the default size), served in place: `qemu-img convert` gives every device
/// byte-exact.
#[test]
#[ignore = "needs QEMU's tools (qemu-img); scripts/test runs it with --include-ignored"]
fn every_device_of_a_seekable_vma_zst_converts_byte_exact() {
    use std::io::Write as _;
    let tmp = tempfile::tempdir().unwrap();
    for (v, devices) in vectors_with_devices() {
        for frame_size in [1, vma_writer::DEFAULT_FRAME_SIZE] {
            let options = vma_writer::ZstdOptions {
                frame_size,
                ..Default::default()
            };
            let mut z = vma_writer::ZstdWriter::new(Vec::new(), options).unwrap();
            z.write_all(&v.bytes()).unwrap();
            let zst = tmp.path().join(format!("{}.{frame_size}.zst", v.file));
            fs::write(&zst, z.finish().unwrap().0).unwrap();
            assert_every_device_converts(&zst, &v, &devices);
        }
    }
}

/// Every vector as vzdump's `.vma.lzo` (the real `lzop -c`), served in place:
/// `qemu-img convert` gives every device byte-exact.
#[test]
#[ignore = "needs QEMU's tools (qemu-img); scripts/test runs it with --include-ignored"]
fn every_device_of_a_vma_lzo_converts_byte_exact() {
    require("lzop");
    let tmp = tempfile::tempdir().unwrap();
    for (v, devices) in vectors_with_devices() {
        let lzo = tmp.path().join(format!("{}.lzo", v.file));
        let out = run_ok(Command::new("lzop").arg("-c").arg(v.path()));
        fs::write(&lzo, out.stdout).unwrap();
        assert_every_device_converts(&lzo, &v, &devices);
    }
}

/// Parses `qemu-io -c 'read -v ...'` hex dumps into bytes.
fn parse_dump(text: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for line in text.lines() {
        let Some((addr, rest)) = line.split_once(":  ") else {
            continue;
        };
        if u64::from_str_radix(addr, 16).is_err() {
            continue;
        }
        for tok in rest.split(' ').take_while(|t| !t.is_empty()).take(16) {
            bytes.push(u8::from_str_radix(tok, 16).unwrap());
        }
    }
    bytes
}

#[test]
#[ignore = "needs QEMU's tools (qemu-img, qemu-io); scripts/test runs it with --include-ignored"]
fn random_reads_through_qemu_io_equal_the_image() {
    require("qemu-io");
    let (tmp, v, _, serve) = serve_vector(0, &[]);
    // The reference image, from our own extraction (tested against EXPECTED.txt elsewhere).
    let out = tmp.path().join("x");
    let st = Command::new(env!("CARGO_BIN_EXE_vma"))
        .arg("extract")
        .arg(v.path())
        .arg(&out)
        .output()
        .unwrap();
    assert!(st.status.success());
    let image = fs::read(out.join("disk-drive-scsi0.raw")).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-r", &serve.url("drive-scsi0")]);
    let mut expected = Vec::new();
    for _ in 0..40 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = 1 + (seed % 9000) as usize;
        let off = (seed >> 20) as usize % (image.len() - len);
        cmd.arg("-c").arg(format!("read -v {off} {len}"));
        expected.extend_from_slice(&image[off..off + len]);
    }
    let out = run_ok(&mut cmd);
    let got = parse_dump(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(got.len(), expected.len());
    assert!(
        got == expected,
        "bytes read through the export differ from the image"
    );
}

#[test]
#[ignore = "needs QEMU's tools (qemu-img, qemu-io); scripts/test runs it with --include-ignored"]
fn writes_unknown_exports_and_broken_clients_do_not_hurt_the_server() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let v = &vectors()[1];
    let before = fs::read(v.path()).unwrap();
    let sock = tmp.path().join("s.sock");
    let mut serve = start_serve(&v.path(), &sock, &[]);

    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &serve.url("drive-sata0"),
            "-c",
            "write -P 0x55 0 512",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("Permission denied"),
        "write accepted: {text}"
    );

    assert_does_not_open(
        &serve.url("no-such-disk"),
        "an unknown export must not open",
    );

    // A client that sends garbage, one that hangs up mid-handshake, one mid-request.
    for garbage in [&b"\xff\xff\xff\xff\xff\xff\xff\xff"[..], b"", b"IHAVEOPT"] {
        let mut s = UnixStream::connect(&sock).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        let _ = s.write_all(garbage);
    }

    // Still serving, still byte-exact.
    let raw = tmp.path().join("sata0.raw");
    convert(
        "raw",
        &serve.url("drive-sata0"),
        "raw",
        raw.to_str().unwrap(),
    );
    assert_eq!(
        sha256_file(&raw),
        v.file("disk-drive-sata0.raw").unwrap().sha256
    );
    assert!(serve.interrupt().success());
    assert_eq!(
        fs::read(v.path()).unwrap(),
        before,
        "the archive never changes"
    );
}

#[test]
#[ignore = "needs QEMU's tools (qemu-img, qemu-io); scripts/test runs it with --include-ignored"]
fn once_stops_after_the_last_client_and_device_filter_applies() {
    require("qemu-img");
    let (_tmp, v, sock, mut serve) = serve_vector(0, &["--device", "drive-virtio1"]);
    assert_does_not_open(&serve.url("drive-scsi0"), "drive-scsi0 was not selected");
    qemu_img(&["info", &serve.url("drive-virtio1")]);
    assert!(serve.interrupt().success());

    let mut serve = start_serve(&v.path(), &sock, &["--once"]);
    qemu_img(&["info", &serve.url("drive-virtio1")]);
    let status = wait_with_timeout(serve.child());
    assert!(status.success());
    assert!(!sock.exists());
}

#[test]
fn compressed_archives_and_unknown_devices_are_refused_clearly() {
    require("zstd");
    let tmp = tempfile::tempdir().unwrap();
    let v = &vectors()[0];
    let zst = tmp.path().join("a.vma.zst");
    assert!(Command::new("zstd")
        .args(["-q", "-o"])
        .arg(&zst)
        .arg(v.path())
        .status()
        .unwrap()
        .success());
    let out = Command::new(env!("CARGO_BIN_EXE_vma"))
        .arg("serve")
        .arg(&zst)
        .arg("--socket")
        .arg(tmp.path().join("s"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("zstd -d -o"),
        "tells the command that prepares a plain file: {err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_vma"))
        .arg("serve")
        .arg(v.path())
        .args(["--device", "drive-nope", "--socket"])
        .arg(tmp.path().join("s"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(!tmp.path().join("s").exists());
}
