//! The `vma` command end to end: every subcommand on every reference vector, compressed
//! input through the real compressors, create/verify/extract round trips, and hostile
//! archives.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vma_format::{ArchiveHeader, VMA_FIXED_HEADER_SIZE};
use vma_testkit::require_tool;
use vma_testkit::{sha256_file, vectors, Vector};

fn vma() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vma"));
    cmd.env("TZ", "UTC");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("vma runs")
}

use vma_testkit::{run_fails as fails, run_fails_saying as fails_saying, run_ok as ok};

#[test]
fn list_matches_the_reference_output_line_by_line() {
    for v in vectors() {
        let out = ok(vma().arg("list").arg(v.path()));
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, v.list, "{}", v.file);
        assert!(text.ends_with('\n'));
    }
}

#[test]
fn list_json_describes_devices_configs_and_integrity() {
    let v = &vectors()[0];
    let out = ok(vma().args(["list", "--json"]).arg(v.path()));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["devices"][0]["name"], "drive-scsi0");
    assert_eq!(json["devices"][0]["size"], 5255680);
    assert_eq!(json["devices"][1]["id"], 2);
    assert_eq!(json["configs"][1]["name"], "qemu-server.fw");
    assert_eq!(json["configs"][1]["size"], 56);
    assert_eq!(json["ctime"], 1795828903);
    assert_eq!(json["uuid"], "6b79c81b-d8b0-4922-b96d-ba9e836c165d");
    assert_eq!(json["integrity"]["sealed"], false);
}

#[test]
fn config_prints_the_blob_or_fails_clearly() {
    let vs = vectors();
    let out = ok(vma().arg("config").arg(vs[0].path()));
    assert_eq!(
        vma_testkit::sha256_hex(&out.stdout),
        vs[0].file("qemu-server.conf").unwrap().sha256
    );
    let out = ok(vma()
        .arg("config")
        .arg(vs[0].path())
        .args(["-c", "qemu-server.fw"]));
    assert_eq!(
        out.stdout,
        fs::read(vma_testkit::vectors_dir().join("qemu-server.fw")).unwrap()
    );
    fails_saying(
        vma().arg("config").arg(vs[3].path()),
        5,
        "unable to find configuration data 'qemu-server.conf'",
    );
}

#[test]
fn extract_every_vector_byte_exact() {
    for v in vectors() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        let out = ok(vma().arg("extract").arg(v.path()).arg(&target));
        v.assert_extracted(&target);
        // The reference prints a DEVINFO line per device it creates.
        let text = String::from_utf8(out.stdout).unwrap();
        let devs = v.list.iter().filter(|l| l.starts_with("DEV:")).count();
        assert_eq!(
            text.lines().filter(|l| l.starts_with("DEVINFO ")).count(),
            devs
        );
    }
}

#[test]
fn extract_refuses_an_existing_target_dir() {
    let v = &vectors()[2];
    let tmp = tempfile::tempdir().unwrap();
    fails_saying(
        vma().arg("extract").arg(v.path()).arg(tmp.path()),
        4,
        "unable to create target directory",
    );
}

#[test]
fn extract_selected_drives_and_from_stdin() {
    let v = &vectors()[0];
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("sel");
    let archive = fs::File::open(v.path()).unwrap();
    ok(vma()
        .args(["extract", "-d", "drive-virtio1", "-"])
        .arg(&target)
        .stdin(archive));
    let raw = target.join("disk-drive-virtio1.raw");
    assert_eq!(
        sha256_file(&raw),
        v.file("disk-drive-virtio1.raw").unwrap().sha256
    );
    assert!(!target.join("disk-drive-scsi0.raw").exists());
    assert!(
        target.join("qemu-server.conf").exists(),
        "configs are always extracted"
    );
}

#[test]
fn extract_with_a_restore_map_into_existing_files() {
    let v = &vectors()[0];
    let tmp = tempfile::tempdir().unwrap();
    let scsi = tmp.path().join("scsi.img");
    let virtio = tmp.path().join("virtio.img");
    // Targets full of garbage: with write_zero=1 the zeros must be written.
    fs::write(&scsi, vec![0xa5u8; 5255680]).unwrap();
    fs::write(&virtio, vec![0u8; 2293760]).unwrap();
    let map = tmp.path().join("map");
    fs::write(
        &map,
        format!(
            "format=raw:1:drive-scsi0={}\nformat=raw:0:drive-virtio1={}\ndone\n",
            scsi.display(),
            virtio.display()
        ),
    )
    .unwrap();
    let out = ok(vma()
        .arg("extract")
        .arg("-r")
        .arg(&map)
        .arg(v.path())
        .arg(tmp.path().join("t")));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("CFG: size: 225 name: qemu-server.conf\n"),
        "{text}"
    );
    assert_eq!(
        sha256_file(&scsi),
        v.file("disk-drive-scsi0.raw").unwrap().sha256
    );
    assert_eq!(
        sha256_file(&virtio),
        v.file("disk-drive-virtio1.raw").unwrap().sha256
    );

    // skip= leaves a device alone; a device with no line is an error.
    fs::write(
        &map,
        format!("skip=drive-scsi0\n0:drive-virtio1={}\n", virtio.display()),
    )
    .unwrap();
    ok(vma()
        .arg("extract")
        .arg("-r")
        .arg(&map)
        .arg(v.path())
        .arg(tmp.path().join("t2")));
    fs::write(&map, format!("0:drive-virtio1={}\n", virtio.display())).unwrap();
    fails_saying(
        vma()
            .arg("extract")
            .arg("-r")
            .arg(&map)
            .arg(v.path())
            .arg(tmp.path().join("t3")),
        2,
        "no device name mapping for drive-scsi0",
    );
}

#[test]
fn verify_and_cat() {
    for v in vectors() {
        ok(vma().arg("verify").arg(v.path()));
        let out = ok(vma().args(["verify", "-v"]).arg(v.path()));
        assert!(String::from_utf8_lossy(&out.stdout).contains("CTIME: "));
    }
    let v = &vectors()[1];
    let out = ok(vma().arg("cat").arg(v.path()).arg("drive-efidisk0"));
    let f = v.file("disk-drive-efidisk0.raw").unwrap();
    assert_eq!(out.stdout.len() as u64, f.size);
    assert_eq!(vma_testkit::sha256_hex(&out.stdout), f.sha256);
    fails_saying(
        vma().arg("cat").arg(v.path()).arg("drive-nope"),
        5,
        "drive-nope",
    );
}

#[test]
fn verify_json_reports_devices_and_integrity() {
    let v = &vectors()[0];
    let out = ok(vma().args(["verify", "--json"]).arg(v.path()));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ok"], true);
    assert_eq!(json["devices"][0]["name"], "drive-scsi0");
    assert_eq!(json["integrity"]["sealed"], false);
    assert_eq!(json["integrity"]["checksummed_extents"], 0);
}

fn compressed(v: &Vector, tool: &str, args: &[&str], ext: &str, dir: &Path) -> PathBuf {
    require_tool(tool);
    let out = dir.join(format!("{}.{ext}", v.file));
    let status = Command::new(tool)
        .args(args)
        .arg(v.path())
        .stdout(fs::File::create(&out).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "{tool} failed");
    out
}

#[test]
fn compressed_archives_read_directly_from_files_and_stdin() {
    let tmp = tempfile::tempdir().unwrap();
    for v in vectors() {
        for (tool, args, ext) in [
            ("zstd", &["-q", "-c"][..], "zst"),
            ("gzip", &["-c"][..], "gz"),
            ("lzop", &["-c"][..], "lzo"),
        ] {
            let packed = compressed(&v, tool, args, ext, tmp.path());
            let from_file = tmp.path().join(format!("{}-{ext}-file", v.file));
            ok(vma().arg("extract").arg(&packed).arg(&from_file));
            v.assert_extracted(&from_file);
            let from_stdin = tmp.path().join(format!("{}-{ext}-stdin", v.file));
            ok(vma()
                .args(["extract", "-"])
                .arg(&from_stdin)
                .stdin(fs::File::open(&packed).unwrap()));
            v.assert_extracted(&from_stdin);
            let out = ok(vma().arg("list").arg(&packed));
            assert_eq!(
                String::from_utf8(out.stdout)
                    .unwrap()
                    .lines()
                    .collect::<Vec<_>>(),
                v.list
            );
            ok(vma().arg("verify").arg(&packed));
        }
    }
}

#[test]
fn lzop_level_9_with_crc32_data_checksums_and_a_broken_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let v = &vectors()[1];
    // -9 uses LZO1X-999; --crc32 switches the checksums.
    let packed = compressed(v, "lzop", &["-c", "-9", "--crc32"], "lzo", tmp.path());
    ok(vma().arg("extract").arg(&packed).arg(tmp.path().join("x")));
    v.assert_extracted(&tmp.path().join("x"));
    let mut bytes = fs::read(&packed).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    let bad = tmp.path().join("bad.lzo");
    fs::write(&bad, &bytes).unwrap();
    fails_saying(vma().arg("verify").arg(&bad), 3, "lzop");
}

#[test]
fn damaged_compressed_archives_are_damage_named_after_their_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let v = &vectors()[0];
    for (tool, args, ext) in [
        ("zstd", &["-q", "-c"][..], "zst"),
        ("gzip", &["-c"][..], "gz"),
        ("lzop", &["-c"][..], "lzo"),
    ] {
        let packed = fs::read(compressed(v, tool, args, ext, tmp.path())).unwrap();
        let n = packed.len();
        let mut flipped = packed.clone();
        flipped[n / 2] ^= 0x20;
        for (what, bytes) in [("cut", &packed[..n * 3 / 4]), ("flipped", &flipped[..])] {
            let bad = tmp.path().join(format!("bad.vma.{ext}"));
            fs::write(&bad, bytes).unwrap();
            let want = format!("the {tool} stream is damaged: ");
            let err = fails(vma().arg("verify").arg(&bad), 3);
            assert!(err.contains(&want), "{tool} {what}: {err}");
            let target = tmp.path().join("t");
            let err = fails(vma().arg("extract").arg(&bad).arg(&target), 3);
            assert!(err.contains(&want), "{tool} {what}: {err}");
            assert!(!target.exists(), "{tool} {what}: extract left its target");
            let err = fails(
                vma()
                    .args(["verify", "-"])
                    .stdin(fs::File::open(&bad).unwrap()),
                3,
            );
            assert!(err.contains(&want), "{tool} {what} from stdin: {err}");
        }
    }
}

fn write_image(path: &Path, size: usize, seed: u8) -> Vec<u8> {
    let mut data = vec![0u8; size];
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        if i % 3 != 1 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i as u8)
                    .wrapping_mul(31)
                    .wrapping_add(j as u8)
                    .wrapping_add(seed)
                    | 1;
            }
        }
    }
    fs::write(path, &data).unwrap();
    data
}

#[test]
fn create_verify_extract_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let sizes = [1usize, 1000, 4096 * 3 + 5, 65536, 65536 * 17 + 512, 300_001];
    let mut args = vec![];
    let mut images = vec![];
    for (i, size) in sizes.iter().enumerate() {
        let path = tmp.path().join(format!("img{i}.raw"));
        images.push(write_image(&path, *size, i as u8));
        args.push(format!("format=raw:drive-scsi{i}={}", path.display()));
    }
    let conf = tmp.path().join("qemu-server.conf");
    fs::write(&conf, "memory: 512\n").unwrap();
    let archive = tmp.path().join("a.vma");
    let mut cmd = vma();
    cmd.arg("create").arg(&archive).arg("-c").arg(&conf);
    for a in &args {
        cmd.arg("-d").arg(a);
    }
    ok(&mut cmd);
    ok(vma().arg("verify").arg(&archive));
    let out = ok(vma().arg("list").arg(&archive));
    let text = String::from_utf8(out.stdout).unwrap();
    for (i, size) in sizes.iter().enumerate() {
        // Sizes are recorded rounded up to 512, as the reference does.
        let rounded = size.div_ceil(512) * 512;
        assert!(
            text.contains(&format!(
                "DEV: dev_id={} size: {rounded} devname: drive-scsi{i}\n",
                i + 1
            )),
            "{text}"
        );
    }
    let target = tmp.path().join("x");
    ok(vma().arg("extract").arg(&archive).arg(&target));
    for (i, image) in images.iter().enumerate() {
        let got = fs::read(target.join(format!("disk-drive-scsi{i}.raw"))).unwrap();
        assert_eq!(got.len(), image.len().div_ceil(512) * 512);
        assert_eq!(&got[..image.len()], &image[..]);
        assert!(got[image.len()..].iter().all(|&b| b == 0));
    }
    assert_eq!(
        fs::read(target.join("qemu-server.conf")).unwrap(),
        b"memory: 512\n"
    );

    // The old positional form: unnamed paths become disk0, disk1, ...
    let archive2 = tmp.path().join("b.vma");
    ok(vma()
        .arg("create")
        .arg(&archive2)
        .arg(tmp.path().join("img0.raw"))
        .arg(tmp.path().join("img1.raw")));
    let text = String::from_utf8(ok(vma().arg("list").arg(&archive2)).stdout).unwrap();
    assert!(
        text.contains("devname: disk0\n") && text.contains("devname: disk1\n"),
        "{text}"
    );
}

#[test]
fn create_never_leaves_a_partial_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("a.vma");
    fails_saying(
        vma()
            .arg("create")
            .arg(&archive)
            .arg("-d")
            .arg("format=raw:drive-scsi0=/nonexistent/x.raw"),
        4,
        "/nonexistent/x.raw",
    );
    let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // An existing archive is never overwritten.
    fs::write(&archive, b"precious").unwrap();
    let img = tmp.path().join("i.raw");
    write_image(&img, 5000, 1);
    fails(
        vma()
            .arg("create")
            .arg(&archive)
            .arg("-d")
            .arg(format!("format=raw:d={}", img.display())),
        4,
    );
    assert_eq!(fs::read(&archive).unwrap(), b"precious");
    // A format name vma does not hand to QEMU is refused before anything runs (the
    // formats QEMU reads are tested in qemu_formats.rs).
    fails_saying(
        vma()
            .arg("create")
            .arg(tmp.path().join("q.vma"))
            .arg("-d")
            .arg(format!("format=qcow9:d={}", img.display())),
        2,
        "unknown image format 'qcow9'",
    );
    assert!(!tmp.path().join("q.vma").exists());
}

/// A copy of vector 3 (one config, no devices) whose config is renamed.
fn with_config_name(name: &str) -> Vec<u8> {
    let bytes = vectors()[2].bytes();
    let size = ArchiveHeader::header_size_from_prefix(&bytes[..VMA_FIXED_HEADER_SIZE]).unwrap();
    let mut header = ArchiveHeader::decode(&bytes).unwrap();
    header.configs[0].name = name.to_string();
    let mut out = header.encode().unwrap();
    out.extend_from_slice(&bytes[size..]);
    out
}

#[test]
fn hostile_names_never_escape_the_target_dir() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["../../x", "..", "a/b", "/etc/passwd"] {
        let archive = tmp.path().join("hostile.vma");
        fs::write(&archive, with_config_name(name)).unwrap();
        let root = tmp.path().join("deep/er");
        fs::create_dir_all(&root).unwrap();
        let target = root.join("target");
        let err = fails(vma().arg("extract").arg(&archive).arg(&target), 3);
        assert!(err.contains("name"), "{name}: {err}");
        assert!(!tmp.path().join("x").exists() && !root.join("x").exists());
        let stray: Vec<_> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        for p in &stray {
            assert!(p == &target, "{name}: {} appeared", p.display());
            assert_eq!(
                fs::read_dir(p).unwrap().count(),
                0,
                "{name}: files in target"
            );
        }
        fs::remove_dir_all(&root).unwrap();
    }
}

#[test]
fn damaged_and_truncated_archives_fail_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let v = &vectors()[0];
    let bytes = v.bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not an archive", b"hello world, not a vma".to_vec()),
        ("empty", vec![]),
        ("header cut", bytes[..5000].to_vec()),
        ("cut mid-extent", bytes[..bytes.len() - 1000].to_vec()),
        ("cut at an extent boundary", {
            let first = vma_format::ExtentHeader::decode(&bytes[12800..]).unwrap();
            bytes[..12800 + first.extent_len()].to_vec()
        }),
        ("flipped header bit", {
            let mut b = bytes.clone();
            b[200] ^= 1;
            b
        }),
        ("flipped extent header bit", {
            let mut b = bytes.clone();
            b[12800 + 100] ^= 1;
            b
        }),
    ];
    for (what, data) in cases {
        let archive = tmp.path().join("bad.vma");
        fs::write(&archive, &data).unwrap();
        let err = fails(vma().arg("verify").arg(&archive), 3);
        assert!(err.starts_with("vma: "), "{what}: {err}");
        if what == "not an archive" || what == "empty" {
            assert!(err.starts_with("vma: not a VMA archive: "), "{what}: {err}");
        }
        let target = tmp.path().join("t");
        fails(vma().arg("extract").arg(&archive).arg(&target), 3);
        for e in fs::read_dir(&target).into_iter().flatten() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(!name.starts_with("disk-"), "{what}: {name} looks complete");
        }
        let _ = fs::remove_dir_all(&target);
        // `list` reads the header only, as the reference does: damage past it shows in
        // verify and extract, not here.
        let header_intact = vma_format::ArchiveHeader::decode(&data).is_ok();
        let out = run(vma().arg("list").arg(&archive).stdout(Stdio::null()));
        assert_eq!(
            out.status.code(),
            Some(if header_intact { 0 } else { 3 }),
            "{what}"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    fails(vma().arg("frobnicate"), 2);
    fails(vma().arg("extract"), 2);
    fails(vma().args(["list", "a", "b"]), 2);
}

#[test]
fn stdin_pipe_is_read_in_one_pass() {
    let v = &vectors()[0];
    let mut child = vma()
        .args(["verify", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data = v.bytes();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for chunk in data.chunks(1000) {
            stdin.write_all(chunk).unwrap();
        }
    });
    writer.join().unwrap();
    let out = child.wait_with_output().unwrap();
    vma_testkit::assert_success(&out, "vma extract from stdin");
}

/// Proxmox's restore opens the map FIFO for writing right after starting `vma` and blocks
/// there until `vma` opens it: a restore of an archive that fails before the map is read
/// must not leave it waiting forever.
#[test]
fn a_failed_restore_releases_the_writer_of_the_map_fifo() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("map.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let bad = tmp.path().join("bad.vma");
    fs::write(&bad, b"not an archive at all").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            // Late, as a busy machine may schedule Proxmox's restore after vma failed.
            std::thread::sleep(std::time::Duration::from_millis(300));
            let opened = fs::OpenOptions::new().write(true).open(&fifo).is_ok();
            tx.send(opened).unwrap();
        })
    };
    fails_saying(
        vma()
            .args(["extract", "-v", "-r"])
            .arg(&fifo)
            .arg(&bad)
            .arg(tmp.path().join("t")),
        3,
        "not a VMA archive",
    );
    let opened = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the writer's open returned");
    assert!(opened);
    writer.join().unwrap();
}
