//! `vma create` outputs as Proxmox's writer takes them (`exec:CMD`, an existing FIFO,
//! `-`, a new file with mode 0666 less the umask) and `create -v` against what Proxmox's
//! own `vma` printed for `spec/vectors/create-input.raw`.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vma_testkit::{reference_output, require_tool, sha256_file, sha256_hex, vectors_dir};

/// The device size Proxmox records for create-input.raw: its size rounded up to 512.
const DEVICE_SIZE: usize = 2626560;

fn vma() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vma"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("vma runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A scratch folder holding a copy of create-input.raw (as `in.raw`).
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.raw");
    fs::copy(vectors_dir().join("create-input.raw"), &input).unwrap();
    (dir, input)
}

/// The files in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Extracts `archive` (any form `vma extract` reads, `-` with `stdin`) into a new folder
/// and checks that the disk is the input, zero-padded to the device size.
fn assert_restores_input(archive: &Path, stdin: Option<fs::File>, into: &Path) {
    let mut cmd = vma();
    cmd.arg("extract").arg(archive).arg(into);
    if let Some(f) = stdin {
        cmd.stdin(f);
    }
    let o = run(&mut cmd);
    assert!(o.status.success(), "extract: {}", stderr(&o));
    let mut want = fs::read(vectors_dir().join("create-input.raw")).unwrap();
    want.resize(DEVICE_SIZE, 0);
    assert_eq!(
        sha256_file(&into.join("disk-drive-scsi0.raw")),
        sha256_hex(&want)
    );
}

#[test]
fn exec_writes_into_a_shell_command_as_vzdump_uses_it() {
    require_tool("zstd");
    let (dir, input) = scratch();
    let d = dir.path();
    let dump = d.join("vzdump-qemu-100.vma.dat");
    let o = run(vma()
        .current_dir(d)
        .arg("create")
        .arg("-v")
        .arg("-c")
        .arg(vectors_dir().join("qemu-server.conf"))
        .arg(format!("exec:zstd --threads=1 > {}", dump.display()))
        .arg(format!("drive-scsi0={}", input.display())));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        names(d),
        ["in.raw", "vzdump-qemu-100.vma.dat"],
        "no stray file"
    );
    assert_restores_input(&dump, None, &d.join("x"));
    // The integrity extension is there, through the pipe.
    let o = run(vma().arg("verify").arg("--summary").arg(&dump));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("sealed, seal verified"));
}

#[test]
fn a_failing_command_fails_the_create_and_leaves_nothing() {
    let (dir, input) = scratch();
    let d = dir.path();
    let disk = format!("drive-scsi0={}", input.display());
    for (command, says) in [
        ("exit 3", "the command failed (exit status: 3)"),
        (
            "head -c 100 > /dev/null",
            "the command stopped reading the archive before its end",
        ),
        (
            "cat > /nonexistent/dir/x",
            "the command failed (exit status: ",
        ),
    ] {
        let o = run(vma()
            .current_dir(d)
            .args(["create", &format!("exec:{command}"), &disk]));
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(4), "exec:{command}: {err}");
        assert!(err.contains(&format!("vma: exec:{command}: ")), "{err}");
        assert!(err.contains(says), "exec:{command}: {err}");
        assert_eq!(names(d), ["in.raw"], "exec:{command} left a file");
    }
}

#[test]
fn a_fifo_is_written_into() {
    let (dir, input) = scratch();
    let d = dir.path();
    let fifo = d.join("archive.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read(fifo).unwrap())
    };
    let o = run(vma()
        .arg("create")
        .arg(&fifo)
        .arg(format!("drive-scsi0={}", input.display())));
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = reader.join().unwrap();
    let archive = d.join("from-fifo.vma");
    fs::write(&archive, bytes).unwrap();
    assert_restores_input(&archive, None, &d.join("x"));
    assert!(
        fs::metadata(&fifo).unwrap().file_type().is_fifo(),
        "still the FIFO"
    );
}

#[test]
fn dash_is_standard_output() {
    let (dir, input) = scratch();
    let d = dir.path();
    let archive = d.join("stdout.vma");
    let o = run(vma()
        .current_dir(d)
        .args(["create", "-v", "-"])
        .arg(format!("drive-scsi0={}", input.display()))
        .stdout(fs::File::create(&archive).unwrap()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!d.join("-").exists(), "no file named -");
    assert!(
        stderr(&o).contains("image drive-scsi0: "),
        "-v goes to stderr"
    );
    assert_restores_input(
        Path::new("-"),
        Some(fs::File::open(&archive).unwrap()),
        &d.join("x"),
    );
    // And through a pipe straight into a reader.
    let mut create = vma()
        .args(["create", "-"])
        .arg(format!("drive-scsi0={}", input.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let o = run(vma()
        .args(["verify", "-"])
        .stdin(create.stdout.take().unwrap()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(create.wait().unwrap().success());
}

#[test]
fn archives_get_mode_0666_less_the_umask() {
    let (dir, input) = scratch();
    let d = dir.path();
    for (umask, mode) in [("022", 0o644), ("027", 0o640), ("077", 0o600)] {
        let archive = d.join(format!("u{umask}.vma"));
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask {umask} && exec \"$0\" create \"$1\" \"drive-scsi0=$2\""
            ))
            .arg(env!("CARGO_BIN_EXE_vma"))
            .arg(&archive)
            .arg(&input)
            .status()
            .unwrap();
        assert!(status.success());
        let got = fs::metadata(&archive).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, mode, "umask {umask}");
    }
}

#[test]
fn create_v_prints_what_proxmox_prints() {
    let reference = reference_output()
        .into_iter()
        .find(|r| r.args[0] == "create")
        .expect("a create in REFERENCE-OUTPUT.txt");
    assert_eq!(
        reference.args,
        ["create", "-v", "out.vma", "drive-scsi0=create-input.raw"]
    );
    let dir = tempfile::tempdir().unwrap();
    fs::copy(
        vectors_dir().join("create-input.raw"),
        dir.path().join("create-input.raw"),
    )
    .unwrap();
    let o = run(vma().args(&reference.args).current_dir(dir.path()));
    assert_eq!(o.status.code(), Some(reference.exit), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    let ours: Vec<String> = stderr(&o).lines().map(str::to_owned).collect();

    // The closing lines are the same, to the byte.
    let n = reference.stderr.len();
    assert_eq!(ours[ours.len() - 2..], reference.stderr[n - 2..]);
    // Proxmox samples its figures from its main loop; ours are every change of
    // percentage, so every line it printed is one of ours, in the same order.
    let mut at = 0;
    for line in &reference.stderr {
        at += ours[at..]
            .iter()
            .position(|l| l == line)
            .unwrap_or_else(|| panic!("{line:?} is not among ours: {ours:#?}"));
    }
    // Whole percentages, growing.
    let percents: Vec<u64> = ours
        .iter()
        .filter_map(|l| l.strip_prefix("progress "))
        .map(|l| l.split('%').next().unwrap().parse().unwrap())
        .collect();
    assert!(percents.windows(2).all(|w| w[0] < w[1]), "{percents:?}");
    assert_eq!(percents.last(), Some(&100));
}
