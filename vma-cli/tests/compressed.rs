//! `vma create` with in-process zstd: every vector's disks and configs created as
//! `.vma.zst` decompress with stock `zstd` to an archive that verifies and extracts to
//! the same files as the plain create, the same file reads in place (`cat`, `verify
//! --quick`, `list --json`), compressed output also goes to `-` and `exec:`, and a create
//! that does not finish never leaves its final name.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vma_testkit::{dir_entries, require_tool, run_ok, sha256_file, vectors, Rng, Vector};

fn vma() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vma"))
}

/// The vector's devices (name, extracted file) and configs, extracted into `dir`.
fn sources(v: &Vector, dir: &Path) -> (Vec<(String, PathBuf)>, Vec<PathBuf>) {
    run_ok(vma().arg("extract").arg(v.path()).arg(dir));
    let devices = v
        .list
        .iter()
        .filter_map(|l| l.rsplit_once(" devname: ").map(|(_, n)| n.to_string()))
        .map(|n| {
            let path = dir.join(format!("disk-{n}.raw"));
            (n, path)
        })
        .collect();
    let configs = dir_entries(dir)
        .into_iter()
        .filter(|n| !n.starts_with("disk-"))
        .map(|n| dir.join(n))
        .collect();
    (devices, configs)
}

fn create(out: &Path, extra: &[&str], devices: &[(String, PathBuf)], configs: &[PathBuf]) {
    let mut cmd = vma();
    cmd.arg("create").arg(out).args(extra);
    for c in configs {
        cmd.arg("-c").arg(c);
    }
    for (name, path) in devices {
        cmd.arg(format!("{name}={}", path.display()));
    }
    run_ok(&mut cmd);
}

/// Every file of an extraction, by name, with its SHA-256.
fn extracted(archive: &Path, into: &Path) -> Vec<(String, String)> {
    run_ok(vma().arg("extract").arg(archive).arg(into));
    dir_entries(into)
        .into_iter()
        .map(|n| {
            let sha = sha256_file(&into.join(&n));
            (n, sha)
        })
        .collect()
}

#[test]
fn every_vector_created_as_vma_zst_reads_with_stock_zstd_and_in_place() {
    require_tool("zstd");
    let tmp = tempfile::tempdir().unwrap();
    for v in vectors() {
        let work = tmp.path().join(&v.file);
        fs::create_dir_all(&work).unwrap();
        let src = work.join("src");
        let (devices, configs) = sources(&v, &src);
        if devices.is_empty() {
            continue;
        }
        let plain = work.join("plain.vma");
        let zst = work.join("out.vma.zst");
        create(&plain, &[], &devices, &configs);
        create(&zst, &[], &devices, &configs);
        run_ok(Command::new("zstd").arg("-q").arg("-t").arg(&zst));
        let decompressed = work.join("decompressed.vma");
        run_ok(
            Command::new("zstd")
                .args(["-q", "-d", "-o"])
                .arg(&decompressed)
                .arg(&zst),
        );
        run_ok(vma().arg("verify").arg(&decompressed));
        let want = extracted(&plain, &work.join("x-plain"));
        assert_eq!(
            extracted(&decompressed, &work.join("x-dec")),
            want,
            "{}",
            v.file
        );
        // The workspace's own streaming reader reads it as a zstd stream.
        assert_eq!(extracted(&zst, &work.join("x-zst")), want, "{}", v.file);
        // And the seekable reader reads it in place.
        run_ok(vma().args(["verify", "--quick"]).arg(&zst));
        for (name, _) in &devices {
            let out = run_ok(vma().arg("cat").arg(&zst).arg(name));
            let file = format!("disk-{name}.raw");
            let expected = want.iter().find(|(n, _)| *n == file).unwrap();
            assert_eq!(vma_testkit::sha256_hex(&out.stdout), expected.1, "{name}");
        }
        let json = run_ok(vma().args(["list", "--json"]).arg(&zst));
        let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(json["integrity"]["seal"], "sealed", "{}", v.file);
    }
}

/// A disk of `len` bytes of mixed data and zeros, at `path`.
fn image(path: &Path, len: usize, seed: u64) {
    let mut rng = Rng(seed);
    let mut data = vec![0u8; len];
    for block in data.chunks_mut(4096) {
        if rng.below(3) != 0 {
            rng.fill(&mut block[..2048]);
        }
    }
    fs::write(path, data).unwrap();
}

#[test]
fn compressed_output_goes_to_standard_output_and_commands() {
    require_tool("zstd");
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("d.raw");
    image(&disk, 5 << 20, 1);
    let spec = format!("drive-scsi0={}", disk.display());
    let to_stdout = tmp.path().join("stdout.vma.zst");
    run_ok(
        vma()
            .args(["create", "--compress", "zstd:9", "-", &spec])
            .stdout(fs::File::create(&to_stdout).unwrap()),
    );
    let to_exec = tmp.path().join("exec.vma.zst");
    let exec = format!("exec:cat > {}", to_exec.display());
    run_ok(vma().args(["create", "--compress", "zstd", &exec, &spec]));
    for f in [&to_stdout, &to_exec] {
        run_ok(Command::new("zstd").arg("-q").arg("-t").arg(f));
        run_ok(vma().args(["verify", "--quick"]).arg(f));
        let out = run_ok(vma().arg("cat").arg(f).arg("drive-scsi0"));
        assert!(out.stdout == fs::read(&disk).unwrap(), "{}", f.display());
    }
    // `--compress none` keeps a .zst name plain; an exec: command named .zst is not
    // compressed twice.
    let plain = tmp.path().join("plain.vma.zst");
    run_ok(
        vma()
            .args(["create", "--compress", "none"])
            .arg(&plain)
            .arg(&spec),
    );
    assert_eq!(&fs::read(&plain).unwrap()[..4], b"VMA\0");
    let piped = tmp.path().join("piped.vma.zst");
    let exec = format!("exec:zstd -q > {}", piped.display());
    run_ok(vma().args(["create", &exec, &spec]));
    let dec = run_ok(Command::new("zstd").args(["-q", "-d", "-c"]).arg(&piped));
    assert_eq!(&dec.stdout[..4], b"VMA\0", "one layer of zstd");
}

#[test]
fn bad_compress_options_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("d.raw");
    image(&disk, 1 << 20, 2);
    for bad in ["zstd:0", "zstd:100", "zstd:x", "xz"] {
        let out = tmp.path().join("x.vma");
        let o = vma()
            .args(["create", "--compress", bad])
            .arg(&out)
            .arg(&disk)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad}");
        assert!(!out.exists());
    }
    assert_eq!(dir_entries(tmp.path()), vec!["d.raw".to_string()]);
}

#[test]
fn a_killed_compressed_create_never_leaves_the_final_name() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("d.raw");
    image(&disk, 256 << 20, 3);
    let out_dir = tmp.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("a.vma.zst");
    let mut child = vma()
        .arg("create")
        .arg(&out)
        .arg(&disk)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Wait until the temporary file holds some compressed frames, then kill.
    loop {
        assert!(!out.exists(), "the final name appeared before the end");
        assert!(
            child.try_wait().unwrap().is_none(),
            "create finished before it could be killed: use a larger image"
        );
        let partial = dir_entries(&out_dir);
        let written = partial
            .first()
            .map_or(0, |n| fs::metadata(out_dir.join(n)).map_or(0, |m| m.len()));
        if written > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no output appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists());
    let left = dir_entries(&out_dir);
    assert_eq!(left.len(), 1);
    assert!(left[0].starts_with(".a.vma.zst.partial-"), "{left:?}");
}

/// vec1 in seekable zstd, one frame per extent.
fn seekable_vec1() -> Vec<u8> {
    use std::io::Write as _;
    let options = vma_writer::ZstdOptions {
        frame_size: 1,
        ..Default::default()
    };
    let mut z = vma_writer::ZstdWriter::new(Vec::new(), options).unwrap();
    z.write_all(&vectors()[0].bytes()).unwrap();
    z.finish().unwrap().0
}

/// Runs `vma ARGS FILE [DEVICE]` on `bytes` and returns its exit code and stderr.
fn run_on(dir: &Path, bytes: &[u8], args: &[&str], device: Option<&str>) -> (i32, String) {
    let path = dir.join("hostile.vma.zst");
    fs::write(&path, bytes).unwrap();
    let mut cmd = vma();
    cmd.args(args).arg(&path).args(device);
    let o = cmd.output().unwrap();
    let code = o.status.code().expect("an exit code, not a signal");
    (code, String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn hostile_seekable_zstd_files_exit_with_their_error_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let good = seekable_vec1();
    let stream_len = good.len() as u64;
    let table = vma_format::seek_table::SeekIndex::table_len(&good, stream_len).unwrap();
    let table_at = good.len() - table;
    let index = vma_format::seek_table::SeekIndex::parse(&good[table_at..], stream_len).unwrap();
    let device = "drive-scsi0";
    assert_eq!(run_on(tmp.path(), &good, &["cat"], Some(device)).0, 0);

    // A frame whose bytes were changed: its checksum fails where its data is read.
    let last_data = index.frame(index.frames() - 2).unwrap();
    let mut bad = good.clone();
    bad[(last_data.compressed_offset + last_data.compressed_len as u64 / 2) as usize] ^= 0x40;
    let (code, err) = run_on(tmp.path(), &bad, &["cat"], Some(device));
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!(
            "at compressed byte {}",
            last_data.compressed_offset
        )),
        "{err}"
    );

    // The streaming commands decompress a seekable file's frames on every core: the same
    // damage stops them with the same offset, and extract leaves no file behind.
    let (code, err) = run_on(tmp.path(), &bad, &["verify"], None);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!(
            "zstd frame {} at compressed byte {}",
            index.frames() - 2,
            last_data.compressed_offset
        )),
        "{err}"
    );
    let out = tmp.path().join("out");
    let (code, err) = run_on(tmp.path(), &bad, &["extract"], out.to_str());
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("at compressed byte"), "{err}");
    assert!(!out.exists(), "extract left {out:?}");

    // A table whose frames do not add up to the bytes before it.
    let mut lie = good.clone();
    let first = table_at + 8;
    let size = u32::from_le_bytes(lie[first..first + 4].try_into().unwrap());
    lie[first..first + 4].copy_from_slice(&(size + 1).to_le_bytes());
    for args in [&["verify", "--quick"][..], &["cat"][..]] {
        let device = (args[0] == "cat").then_some(device);
        let (code, err) = run_on(tmp.path(), &lie, args, device);
        assert_eq!(code, 3, "{args:?}: {err}");
        assert!(err.contains(&format!("at byte {table_at}")), "{err}");
    }
    // Stock zstd still reads that file: the table is a skippable frame to it.
    run_ok(vma().arg("verify").arg(tmp.path().join("hostile.vma.zst")));

    // Cut short: no table, and so not seekable (a usage error naming what to do); the
    // streaming reader says the stream is damaged.
    let cut = &good[..good.len() - 40];
    let (code, err) = run_on(tmp.path(), cut, &["cat"], Some(device));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no seek table") && err.contains("zstd -d"),
        "{err}"
    );
    let (code, err) = run_on(tmp.path(), cut, &["verify"], None);
    assert_eq!(code, 3, "{err}");
}

/// A `.vma.zst` as Proxmox's vzdump makes it (`zstd --rsyncable --threads=N`, one frame,
/// no seek table): the in-place commands refuse it as not seekable (exit 2, saying what
/// to do), while extract and verify stream it.
#[test]
fn a_vzdump_made_vma_zst_is_refused_in_place_and_streamed() {
    require_tool("zstd");
    let tmp = tempfile::tempdir().unwrap();
    let v = vectors()
        .into_iter()
        .find(|v| v.file.starts_with("vec1"))
        .unwrap();
    let zst = tmp.path().join("vzdump-qemu-100.vma.zst");
    run_ok(
        Command::new("zstd")
            .args(["-q", "--rsyncable", "--threads=2", "-o"])
            .arg(&zst)
            .arg(v.path()),
    );
    let bytes = fs::read(&zst).unwrap();
    let sock = tmp.path().join("nbd.sock");
    let serve = ["serve", "--once", "--socket", sock.to_str().unwrap()];
    for args in [&["cat"][..], &["verify", "--quick"][..], &serve[..]] {
        let device = (args[0] == "cat").then_some("drive-scsi0");
        let (code, err) = run_on(tmp.path(), &bytes, args, device);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("no seek table") && err.contains("zstd -d"),
            "{args:?}: {err}"
        );
    }
    run_ok(vma().arg("verify").arg(&zst));
    let out = tmp.path().join("out");
    run_ok(vma().arg("extract").arg(&zst).arg(&out));
    let files = dir_entries(&out);
    assert!(
        files.iter().any(|f| f == "disk-drive-scsi0.raw"),
        "{files:?}"
    );
}
