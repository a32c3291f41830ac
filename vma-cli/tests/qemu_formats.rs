//! `vma` with images in QEMU's formats, through `qemu-storage-daemon`: restores into
//! existing images (`extract -r` with `format=FMT` map lines), `extract --format`, and
//! `create -d format=FMT:...`; and what happens when QEMU cannot do what is asked.
//!
//! Every run gets a `TMPDIR` of its own (the daemon's private socket directory is made
//! there), so that after it the test can check that no socket and no daemon is left.
//!
//! These tests need QEMU's tools and are `#[ignore]`d; `scripts/test` runs them
//! (`--include-ignored`), and a missing tool fails them loudly.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vma_testkit::{require_tool, run_ok, Rng};

const VMA: &str = env!("CARGO_BIN_EXE_vma");
const MIB: usize = 1 << 20;
/// Formats `qemu-img` creates and QEMU writes.
const WRITABLE: [&str; 5] = ["qcow2", "vmdk", "vdi", "vhdx", "qed"];

fn require_qemu() {
    for tool in ["qemu-img", "qemu-io", "qemu-storage-daemon"] {
        require_tool(tool);
    }
}

/// A scratch directory, with `tmp/` as every run's `TMPDIR`.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        require_qemu();
        let dir = tempfile::Builder::new()
            .prefix("vma-qemu-")
            .tempdir()
            .unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn tmp(&self) -> PathBuf {
        self.path("tmp")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(VMA);
        cmd.args(args)
            .env("TMPDIR", self.tmp())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `vma ARGS`, then checks that it left no daemon and no socket.
    fn vma(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
        self.assert_clean(args);
        out
    }

    /// `vma ARGS`, which must succeed and leave no daemon and no socket.
    fn vma_ok(&self, args: &[&str]) -> Output {
        let out = vma_testkit::run_ok(&mut self.command(args));
        self.assert_clean(args);
        out
    }

    /// `vma ARGS` started with its standard input, output and error piped.
    fn spawn_piped(&self, args: &[&str]) -> std::process::Child {
        self.command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `vma ARGS` with `input` on its standard input.
    fn vma_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self.spawn_piped(args);
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        self.assert_clean(args);
        out
    }

    /// No socket directory in our TMPDIR, no daemon serving from it.
    fn assert_clean(&self, what: &[&str]) {
        let left: Vec<_> = fs::read_dir(self.tmp())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "vma {what:?} left {left:?} in TMPDIR");
        let daemons = daemons_under(&self.tmp());
        assert!(daemons.is_empty(), "vma {what:?} left daemons {daemons:?}");
    }
}

/// Process ids of the qemu-storage-daemons whose command line names `dir`.
fn daemons_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("qemu-storage-daemon") && cmdline.contains(&needle) {
            found.push(pid);
        }
    }
    found
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_fails(out: &Output, code: i32, wants: &[&str]) {
    let err = stderr(out);
    eprintln!("as expected: {}", err.trim());
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {err}");
    for want in wants {
        assert!(err.contains(want), "stderr lacks {want:?}: {err}");
    }
}

fn qemu_img(args: &[&str]) -> String {
    let out = run_ok(Command::new("qemu-img").args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create` of a new, empty `path` in `format`, `size` as qemu-img reads it
/// (bytes, or with a suffix such as `K`).
fn create(path: &Path, format: &str, size: &str) {
    qemu_img(&["create", "-q", "-f", format, path.to_str().unwrap(), size]);
}

/// `qemu-img convert` of `from` (in `from_format`) into a new `to` (in `to_format`).
fn convert(from: &Path, from_format: &str, to: &Path, to_format: &str) {
    let (from, to) = (from.to_str().unwrap(), to.to_str().unwrap());
    qemu_img(&["convert", "-f", from_format, "-O", to_format, from, to]);
}

fn qemu_io(image: &str, format: &str, commands: &[&str]) {
    let mut args = vec!["-f", format];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(image);
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    assert!(out.status.success(), "qemu-io {args:?}: {out:?}");
}

/// `qemu-img compare` of a raw image with an image in `format`: guest-visible content.
fn assert_same(raw: &Path, image: &Path, format: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", format])
        .arg(raw)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} differs from {}: {}{}",
        image.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A device image: 1 MiB runs of data and zeros, a few scattered 4 KiB blocks, and a
/// size that is a multiple of 512 but not of 64 KiB (the last cluster is partial).
fn device_image(path: &Path, mib: usize) -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut bytes = vec![0u8; mib * MIB + 7 * 4096 + 512];
    for (i, chunk) in bytes.chunks_mut(MIB).enumerate() {
        if i % 3 != 1 {
            rng.fill(chunk);
        }
    }
    // Lone blocks in the first zero run (which zero_runs leaves out).
    for i in 0..8 {
        let at = MIB + i * 64 * 1024 + 4096;
        if at + 4096 <= bytes.len() {
            bytes[at..at + 4096].fill(0x5a);
        }
    }
    fs::write(path, &bytes).unwrap();
    bytes
}

/// Zero 1 MiB runs of [`device_image`] (whole MiB offsets), for sparseness checks.
fn zero_runs(mib: usize) -> Vec<u64> {
    (2..mib)
        .filter(|i| i % 3 == 1)
        .map(|i| (i * MIB) as u64)
        .collect()
}

/// An archive with the device as drive-scsi0, made from the raw image.
/// A scratch folder holding `dev.raw`, a device image of about `mib` MiB.
fn with_device(mib: usize) -> (Scratch, PathBuf) {
    let s = Scratch::new();
    let raw = s.path("dev.raw");
    device_image(&raw, mib);
    (s, raw)
}

/// A scratch folder holding `dev.raw`, a device image of about `mib` MiB (whose bytes are
/// returned too), and its archive.
fn with_archive(mib: usize) -> (Scratch, PathBuf, Vec<u8>, PathBuf) {
    let s = Scratch::new();
    let raw = s.path("dev.raw");
    let dev = device_image(&raw, mib);
    let a = archive(&s, &raw);
    (s, raw, dev, a)
}

fn archive(s: &Scratch, raw: &Path) -> PathBuf {
    let a = s.path("disk.vma");
    if !a.exists() {
        s.vma_ok(&[
            "create",
            a.to_str().unwrap(),
            "-d",
            &format!("format=raw:drive-scsi0={}", raw.display()),
        ]);
    }
    a
}

/// The ranges `qemu-img map` reports as holding data (allocated in the top image).
fn allocated(image: &Path, format: &str) -> Vec<(u64, u64)> {
    let json = qemu_img(&[
        "map",
        "--output=json",
        "-f",
        format,
        image.to_str().unwrap(),
    ]);
    let map: serde_json::Value = serde_json::from_str(&json).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true) && e["depth"].as_u64() == Some(0))
        .map(|e| {
            let start = e["start"].as_u64().unwrap();
            (start, start + e["length"].as_u64().unwrap())
        })
        .collect()
}

fn assert_zeros_unallocated(image: &Path, format: &str, mib: usize) {
    let data = allocated(image, format);
    for z in zero_runs(mib) {
        let end = z + MIB as u64;
        assert!(
            !data.iter().any(|&(a, b)| a < end && z < b),
            "{}: the zero MiB at {z} is allocated: {data:?}",
            image.display()
        );
    }
}

fn info(image: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        image.to_str().unwrap(),
    ]))
    .unwrap()
}

/// A new qcow2 `target` of `raw`'s size and a map restoring `drive-scsi0` into it with
/// write-zero flag `w`.
fn qcow2_target(s: &Scratch, target: &Path, raw: &Path, w: u8) -> PathBuf {
    let size = fs::metadata(raw).unwrap().len();
    create(target, "qcow2", &size.to_string());
    let t = target.display();
    map_file(s, &[format!("format=qcow2:{w}:drive-scsi0={t}")])
}

/// A 48 MiB archive to restore from stdin into a new qcow2 `t.qcow2`: the scratch, the raw
/// device, the archive's bytes, the target and the map.
fn qcow2_restore_from_stdin() -> (Scratch, PathBuf, Vec<u8>, PathBuf, PathBuf) {
    let (s, raw, _, a) = with_archive(48);
    let bytes = fs::read(&a).unwrap();
    let target = s.path("t.qcow2");
    let map = qcow2_target(&s, &target, &raw, 1);
    (s, raw, bytes, target, map)
}

/// `extract -r MAP - INTO`: the arguments of a restore of the archive on stdin.
fn restore_from_stdin<'a>(map: &'a Path, into: &'a Path) -> [&'a str; 5] {
    [
        "extract",
        "-r",
        map.to_str().unwrap(),
        "-",
        into.to_str().unwrap(),
    ]
}

fn map_file(s: &Scratch, lines: &[String]) -> PathBuf {
    let map = s.path("map");
    let mut text = lines.join("\n");
    text.push_str("\ndone\n");
    fs::write(&map, text).unwrap();
    map
}

fn restore(s: &Scratch, map: &Path, archive: &Path, dir: &str) -> Output {
    s.vma(&[
        "extract",
        "-r",
        map.to_str().unwrap(),
        archive.to_str().unwrap(),
        s.path(dir).to_str().unwrap(),
    ])
}

// ---------------------------------------------------------------------------------------
// 1. Restore into existing images

/// Fresh images of every writable format (and raw) with `0:`: the content is the
/// device's, and a fresh qcow2 stays unallocated where the device is zero.
#[test]
#[ignore = "needs qemu-utils"]
fn restore_into_fresh_images_of_every_format() {
    let (s, raw, dev, a) = with_archive(6);
    for format in WRITABLE.iter().chain(&["raw"]) {
        let target = s.path(&format!("target.{format}"));
        // As Proxmox allocates: the device size rounded up to KiB.
        let kib = dev.len().div_ceil(1024);
        create(&target, format, &format!("{kib}K"));
        let map = map_file(
            &s,
            &[format!(
                "format={format}:0:drive-scsi0={}",
                target.display()
            )],
        );
        let out = restore(&s, &map, &a, &format!("out-{format}"));
        assert!(out.status.success(), "{format}: {}", stderr(&out));
        assert_same(&raw, &target, format);
        if *format == "qcow2" {
            assert_zeros_unallocated(&target, format, 6);
        }
        fs::remove_file(&target).unwrap();
    }
}

/// `1:` into images full of old data: every zero is written (as WRITE_ZEROES), the
/// target's size, cluster size and backing file stay as they were, and the bytes past
/// the device end are left alone.
#[test]
#[ignore = "needs qemu-utils"]
fn restore_with_write_zeros_over_old_data_keeps_the_image_as_it_was() {
    let (s, _, dev, a) = with_archive(5);
    let size = dev.len() + 3 * MIB;
    let base = s.path("base.qcow2");
    create(&base, "qcow2", &size.to_string());
    qemu_io(
        base.to_str().unwrap(),
        "qcow2",
        &[&format!("write -P 0xee 0 {size}")],
    );
    for format in WRITABLE {
        let target = s.path(&format!("old.{format}"));
        let t = target.to_str().unwrap();
        if format == "qcow2" {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=131072",
                "-b",
                base.to_str().unwrap(),
                "-F",
                "qcow2",
                t,
            ]);
        } else {
            create(&target, format, &size.to_string());
            qemu_io(t, format, &[&format!("write -P 0xee 0 {size}")]);
        }
        let before = info(&target);
        let map = map_file(&s, &[format!("format={format}:1:drive-scsi0={t}")]);
        let out = restore(&s, &map, &a, &format!("out-{format}"));
        assert!(out.status.success(), "{format}: {}", stderr(&out));
        let after = info(&target);
        for key in ["virtual-size", "cluster-size", "backing-filename", "format"] {
            assert_eq!(before[key], after[key], "{format}: {key}");
        }
        let back = s.path("back.raw");
        let _ = fs::remove_file(&back);
        convert(&target, format, &back, "raw");
        let got = fs::read(&back).unwrap();
        assert!(got[..dev.len()] == dev[..], "{format}: the device's bytes");
        assert!(
            got[dev.len()..].iter().all(|&b| b == 0xee),
            "{format}: the bytes past the device end were changed"
        );
    }
}

/// Two devices, one into qcow2 and one into vhdx (512-byte requests), from a pipe.
#[test]
#[ignore = "needs qemu-utils"]
fn restore_two_devices_into_two_formats_from_a_pipe() {
    let s = Scratch::new();
    let v = vma_testkit::vectors()
        .into_iter()
        .find(|v| v.file == "vec2-small-odd.vma")
        .unwrap();
    let plain = s.path("plain");
    s.vma_ok(&[
        "extract",
        v.path().to_str().unwrap(),
        plain.to_str().unwrap(),
    ]);
    let mut lines = Vec::new();
    let mut targets = Vec::new();
    for (name, format) in [
        ("drive-sata0", "vhdx"),
        ("drive-scsi1", "qcow2"),
        ("drive-efidisk0", "vhdx"),
    ] {
        let size = fs::metadata(plain.join(format!("disk-{name}.raw")))
            .unwrap()
            .len();
        let target = s.path(&format!("{name}.{format}"));
        create(&target, format, &size.to_string());
        lines.push(format!("format={format}:1:{name}={}", target.display()));
        targets.push((name, format, target));
    }
    let map = map_file(&s, &lines);
    let out = s.vma_stdin(
        &[
            "extract",
            "-r",
            map.to_str().unwrap(),
            "-",
            s.path("out").to_str().unwrap(),
        ],
        &v.bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    for (name, format, target) in targets {
        assert_same(&plain.join(format!("disk-{name}.raw")), &target, format);
    }
}

// ---------------------------------------------------------------------------------------
// 2. extract --format

#[test]
#[ignore = "needs qemu-utils"]
fn extract_straight_to_every_format_from_a_file_and_a_pipe() {
    let (s, raw, _, a) = with_archive(4);
    let bytes = fs::read(&a).unwrap();
    for format in WRITABLE {
        for pipe in [false, true] {
            let dir = s.path(&format!("x-{format}-{pipe}"));
            let d = dir.to_str().unwrap();
            let out = if pipe {
                s.vma_stdin(&["extract", "--format", format, "-", d], &bytes)
            } else {
                s.vma(&["extract", "--format", format, a.to_str().unwrap(), d])
            };
            assert!(out.status.success(), "{format}: {}", stderr(&out));
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout.contains(&format!("DEVINFO {d}/tmp-disk-drive-scsi0.{format} ")),
                "{stdout}"
            );
            let mut names: Vec<String> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, [format!("disk-drive-scsi0.{format}")], "{format}");
            let image = dir.join(&names[0]);
            assert_eq!(info(&image)["format"], format);
            assert_same(&raw, &image, format);
            if format == "qcow2" {
                assert_zeros_unallocated(&image, format, 4);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. create from images in any format

/// The listing's size of drive-scsi0.
fn listed_size(s: &Scratch, archive: &Path) -> u64 {
    let out = s.vma_ok(&["list", archive.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| vma_testkit::parse_list_line(l).filter(|(k, _, _)| *k == "DEV"))
        .map(|(_, size, _)| size)
        .unwrap()
}

fn assert_backs_up(s: &Scratch, image: &Path, format: &str, label: &str) {
    let a = s.path(&format!("{label}.vma"));
    s.vma_ok(&[
        "create",
        a.to_str().unwrap(),
        "-d",
        &format!("format={format}:drive-scsi0={}", image.display()),
    ]);
    let virtual_size = info(image)["virtual-size"].as_u64().unwrap();
    assert_eq!(
        listed_size(s, &a),
        virtual_size.div_ceil(512) * 512,
        "{label}"
    );
    let dir = s.path(&format!("{label}-out"));
    s.vma_ok(&["extract", a.to_str().unwrap(), dir.to_str().unwrap()]);
    assert_same(&dir.join("disk-drive-scsi0.raw"), image, format);
}

#[test]
#[ignore = "needs qemu-utils"]
fn create_from_every_format_and_a_backing_chain() {
    let (s, raw) = with_device(5);
    for format in ["qcow2", "vmdk", "vdi", "vhdx", "qed", "vpc"] {
        let image = s.path(&format!("src.{format}"));
        convert(&raw, "raw", &image, format);
        assert_backs_up(&s, &image, format, format);
    }
    // format=raw: read directly (not through the daemon), the same content.
    assert_backs_up(&s, &raw, "raw", "raw");

    // A chain: the overlay changes data, zeroes a data cluster, writes into a hole.
    let base = s.path("src.qcow2");
    let top = s.path("top.qcow2");
    let t = top.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        t,
    ]);
    qemu_io(
        t,
        "qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -z 2M 128k",
            "write -P 0x22 1M 8k",
        ],
    );
    assert_backs_up(&s, &top, "qcow2", "chain");
}

// ---------------------------------------------------------------------------------------
// 4. Faults

#[test]
#[ignore = "needs qemu-utils"]
fn images_qemu_cannot_open_and_wrong_format_names() {
    let (s, raw, _, a) = with_archive(1);
    let out_vma = s.path("out.vma");
    let o = out_vma.to_str().unwrap();
    let r = raw.to_str().unwrap();

    // A raw file given as qcow2: QEMU's words, naming the image.
    let out = s.vma(&["create", o, "-d", &format!("format=qcow2:drive-scsi0={r}")]);
    assert_fails(&out, 4, &[r, "Image is not in qcow2 format"]);
    let out = s.vma(&[
        "create",
        o,
        "-d",
        &format!("format=qcow2:drive-scsi0={r}.missing"),
    ]);
    assert_fails(&out, 4, &[&format!("{r}.missing"), "No such file"]);
    let out = s.vma(&["create", o, "-d", &format!("format=qcow7:drive-scsi0={r}")]);
    assert_fails(&out, 2, &["unknown image format 'qcow7'"]);
    assert!(!out_vma.exists() && !s.path(".out.vma.partial").exists());

    // The same for restore targets.
    let target = s.path("t.qcow2");
    fs::write(&target, vec![0u8; 2 * MIB]).unwrap();
    let t = target.to_str().unwrap();
    for (line, code, want) in [
        (
            format!("format=qcow2:0:drive-scsi0={t}"),
            4,
            "Image is not in qcow2 format",
        ),
        (
            format!("format=qcow7:0:drive-scsi0={t}"),
            2,
            "unknown image format 'qcow7'",
        ),
    ] {
        let map = map_file(&s, &[line]);
        let out = restore(&s, &map, &a, "restored");
        assert_fails(&out, code, &[t, want]);
    }
    let out = s.vma(&[
        "extract",
        "--format",
        "qcow7",
        a.to_str().unwrap(),
        s.path("x").to_str().unwrap(),
    ]);
    assert_fails(&out, 2, &["unknown image format 'qcow7'"]);
    assert!(!s.path("x").exists());
}

#[test]
#[ignore = "needs qemu-utils"]
fn a_target_smaller_than_the_device_is_refused_before_writing() {
    let (s, _, dev, a) = with_archive(2);
    let target = s.path("small.qcow2");
    let t = target.to_str().unwrap();
    create(&target, "qcow2", &(dev.len() - 512).to_string());
    let map = map_file(&s, &[format!("format=qcow2:0:drive-scsi0={t}")]);
    let out = restore(&s, &map, &a, "restored");
    assert_fails(&out, 2, &[t, "target holds", "drive-scsi0"]);
    assert!(allocated(&target, "qcow2").is_empty(), "nothing written");
}

/// A PATH with qemu-img but no qemu-storage-daemon (and one with neither).
#[test]
#[ignore = "needs qemu-utils"]
fn qemu_storage_daemon_missing() {
    let (s, raw, _, a) = with_archive(1);
    let bin = s.path("bin");
    fs::create_dir(&bin).unwrap();
    let qemu_img_path = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v qemu-img"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    std::os::unix::fs::symlink(qemu_img_path.trim(), bin.join("qemu-img")).unwrap();
    let path = bin.to_str().unwrap();
    let qcow = s.path("src.qcow2");
    convert(&raw, "raw", &qcow, "qcow2");

    let run = |args: &[&str]| {
        let out = s.command(args).env("PATH", path).output().unwrap();
        s.assert_clean(args);
        out
    };
    let o = s.path("out.vma");
    let out = run(&[
        "create",
        o.to_str().unwrap(),
        "-d",
        &format!("format=qcow2:drive-scsi0={}", qcow.display()),
    ]);
    assert_fails(
        &out,
        4,
        &[
            "qemu-storage-daemon not found",
            "qemu-utils",
            qcow.to_str().unwrap(),
        ],
    );
    assert!(!o.exists());

    let x = s.path("x");
    let out = run(&[
        "extract",
        "--format",
        "qcow2",
        a.to_str().unwrap(),
        x.to_str().unwrap(),
    ]);
    assert_fails(&out, 4, &["qemu-storage-daemon not found"]);
    assert!(!x.exists(), "no target directory left");

    let out = s
        .command(&[
            "extract",
            "--format",
            "qcow2",
            a.to_str().unwrap(),
            x.to_str().unwrap(),
        ])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_fails(&out, 4, &["qemu-img not found"]);
    assert!(!x.exists());
}

/// Waits until a daemon serves from our TMPDIR; returns its pid.
fn wait_for_daemon(s: &Scratch) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(&pid) = daemons_under(&s.tmp()).first() {
            return pid;
        }
        assert!(Instant::now() < deadline, "no daemon came up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a daemon serves from our TMPDIR and kills it (by its pid).
fn kill_daemon(s: &Scratch) {
    let pid = wait_for_daemon(s);
    // SAFETY: kill(2) on the pid of a daemon this test's vma started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

/// Starts `vma ARGS`, a create into `fifo` (made here), reads the archive's first 64 KiB
/// from the FIFO, then kills the daemon; returns the running `vma` (stderr piped) and
/// the FIFO's read end.
fn create_then_kill_daemon(
    s: &Scratch,
    fifo: &Path,
    args: &[&str],
) -> (std::process::Child, fs::File) {
    let status = Command::new("mkfifo").arg(fifo).status().unwrap();
    assert!(status.success());
    let child = s.command(args).stderr(Stdio::piped()).spawn().unwrap();
    let mut reader = fs::File::open(fifo).unwrap();
    let mut first = vec![0u8; 64 * 1024];
    std::io::Read::read_exact(&mut reader, &mut first).unwrap();
    kill_daemon(s);
    (child, reader)
}

/// `vma ARGS` fed `input` from a pipe, the daemon killed when half of it went in.
fn kill_midway(s: &Scratch, args: &[&str], input: &[u8]) -> Output {
    let mut child = s.spawn_piped(args);
    let mut stdin = child.stdin.take().unwrap();
    let half = input.len() / 2;
    stdin.write_all(&input[..half]).unwrap();
    kill_daemon(s);
    let _ = stdin.write_all(&input[half..]);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    s.assert_clean(args);
    out
}

#[test]
#[ignore = "needs qemu-utils"]
fn the_daemon_killed_midway() {
    // A restore into an existing qcow2.
    let (s, raw, bytes, target, map) = qcow2_restore_from_stdin();
    let into = s.path("r");
    let out = kill_midway(&s, &restore_from_stdin(&map, &into), &bytes);
    assert_fails(&out, 4, &[target.to_str().unwrap(), "qemu-storage-daemon"]);

    // extract --format: no image left, under any name, nor the directory.
    let x = s.path("x");
    let out = kill_midway(
        &s,
        &["extract", "--format", "qcow2", "-", x.to_str().unwrap()],
        &bytes,
    );
    assert_fails(
        &out,
        4,
        &["tmp-disk-drive-scsi0.qcow2", "qemu-storage-daemon"],
    );
    assert!(!x.exists(), "{}", x.display());

    // create: the reader fails, no archive appears.
    let qcow = s.path("src.qcow2");
    convert(&raw, "raw", &qcow, "qcow2");
    let fifo = s.path("out.fifo");
    let f = fifo.to_str().unwrap();
    let disk = format!("format=qcow2:drive-scsi0={}", qcow.display());
    // Take a little of the archive, kill the daemon, then drain the rest.
    let (child, mut reader) = create_then_kill_daemon(&s, &fifo, &["create", f, "-d", &disk]);
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut reader, &mut rest);
    let out = child.wait_with_output().unwrap();
    s.assert_clean(&["create"]);
    assert!(!out.status.success(), "create went on without its source");
    let err = stderr(&out);
    assert!(err.contains(qcow.to_str().unwrap()), "{err}");
}

/// A device whose size is not a multiple of 512 (archives from other writers have them):
/// its last bytes fall inside a 512-byte block of the target, which vhdx and qed export
/// with a 512-byte minimum request. They are read, patched and written back, and the
/// target's bytes after the device end stay as they were.
#[test]
#[ignore = "needs qemu-utils"]
fn a_device_size_off_the_512_byte_grid() {
    let s = Scratch::new();
    let size = 2 * 65536 + 1000;
    let mut data = vec![0u8; size];
    Rng(7).fill(&mut data);
    let mut builder = vma_writer::Builder::new();
    let device = builder.add_device("drive-scsi0", size as u64).unwrap();
    let writer = builder.build(Vec::new()).unwrap();
    writer.write_range(device, 0, &data).unwrap();
    let (_, bytes) = writer.finish().unwrap();
    let a = s.path("odd.vma");
    fs::write(&a, bytes).unwrap();
    let target_size = 4 * 65536;
    for format in WRITABLE {
        for w in [0, 1] {
            let target = s.path(&format!("odd-{w}.{format}"));
            let t = target.to_str().unwrap();
            create(&target, format, &target_size.to_string());
            qemu_io(t, format, &[&format!("write -P 0xee 0 {target_size}")]);
            let map = map_file(&s, &[format!("format={format}:{w}:drive-scsi0={t}")]);
            let out = restore(&s, &map, &a, &format!("out-{format}-{w}"));
            assert!(out.status.success(), "{format}: {}", stderr(&out));
            let back = s.path("back.raw");
            let _ = fs::remove_file(&back);
            convert(&target, format, &back, "raw");
            let got = fs::read(&back).unwrap();
            assert!(got[..size] == data[..], "{format} {w}: the device's bytes");
            assert!(
                got[size..target_size].iter().all(|&b| b == 0xee),
                "{format} {w}: bytes past the device end were changed"
            );
        }
    }
}

/// Unmounts a tmpfs when dropped, whatever happened.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(&self.0).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: umount {} failed", self.0.display());
        }
    }
}

/// A target on a full file system: QEMU's ENOSPC reaches the user, naming the image;
/// `extract --format` leaves no image and no directory.
#[test]
#[ignore = "needs qemu-utils and root (mounts a 3 MiB tmpfs); scripts/test runs it as root"]
fn a_full_disk_under_the_target() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test must run as root");
    let (s, raw, _, a) = with_archive(8);
    let full = s.path("full");
    fs::create_dir(&full).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&full)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs");
    let _mounted = Tmpfs(full.clone());

    let x = full.join("x");
    let out = s.vma(&[
        "extract",
        "--format",
        "qcow2",
        a.to_str().unwrap(),
        x.to_str().unwrap(),
    ]);
    assert_fails(&out, 4, &["tmp-disk-drive-scsi0.qcow2", "ENOSPC"]);
    assert!(!x.exists(), "nothing left on the full disk");

    let target = full.join("t.qcow2");
    let t = target.to_str().unwrap();
    let map = qcow2_target(&s, &target, &raw, 0);
    let out = restore(&s, &map, &a, "restored");
    assert_fails(&out, 4, &[t, "ENOSPC"]);
}

/// `create --reproducible` records disk after disk, so the second disk's thread waits for
/// the first; when the first disk's daemon dies, the create must fail, not wait for ever.
#[test]
#[ignore = "needs qemu-utils"]
fn reproducible_create_whose_first_source_dies_fails_without_hanging() {
    let (s, raw) = with_device(48);
    let qcow = s.path("src.qcow2");
    convert(&raw, "raw", &qcow, "qcow2");
    let second = s.path("second.raw");
    device_image(&second, 8);
    let fifo = s.path("out.fifo");
    let f = fifo.to_str().unwrap();
    let first = format!("format=qcow2:drive-scsi0={}", qcow.display());
    let other = format!("format=raw:drive-scsi1={}", second.display());
    let (mut child, mut reader) = create_then_kill_daemon(
        &s,
        &fifo,
        &["create", "--reproducible", f, "-d", &first, "-d", &other],
    );
    let drain = std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut reader, &mut rest);
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("create --reproducible still runs 60 s after its first source died");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drain.join().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    s.assert_clean(&["create", "--reproducible"]);
    assert!(!status.success(), "create went on without its source");
    assert!(err.contains(qcow.to_str().unwrap()), "{err}");
    assert!(!err.contains("aborted"), "the abort, not its cause: {err}");
}

/// `vma` killed with SIGKILL (no cleanup of its own can run) takes its daemon with it:
/// the daemon is started with a parent-death signal.
#[test]
#[ignore = "needs qemu-utils"]
fn vma_killed_takes_its_daemon_with_it() {
    let (s, _, bytes, _, map) = qcow2_restore_from_stdin();
    let into = s.path("r");
    let mut child = s.spawn_piped(&restore_from_stdin(&map, &into));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&bytes[..bytes.len() / 2]).unwrap();
    wait_for_daemon(&s);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = daemons_under(&s.tmp());
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "vma was killed and its daemons {left:?} live on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
