//! `vma` driven exactly the way Proxmox VE drives it.
//!
//! The Perl scripts in `tests/proxmox/` re-enact Proxmox's own code (each step names the
//! function it stands for): `restore.pl` is qemu-server's `restore_vma_archive` (what
//! `qmrestore` and the GUI's restore run), `config.pl` pve-storage's
//! `extract_vzdump_config_vma`, `diskless-backup.pl` vzdump's backup of a VM without
//! disks. The `vma` under test is found on `PATH` as `vma`, as Proxmox finds it.
//!
//! What Proxmox's restore really does with the vectors, read off its code:
//! - A device needs a `#qmdump#map:VIRTDEV:DEVNAME:STOREID:FORMAT:` line in the archived
//!   config (vzdump's `assemble` writes one per disk), or the restore dies at the CTIME
//!   line with "found no device mapping information for device '...'". The vectors were
//!   made with `vma create` by hand and have none, so vec1 and vec2 are restored twice:
//!   as they are (the restore must die exactly so, after reading the config) and with the
//!   hint lines vzdump would have written, put into the header (re-encoded as Proxmox's
//!   writer lays it out) in front of the vectors' own extents, unchanged.
//! - vec3 (a config, no devices) restores: no volume, the map is just `done`.
//! - vec4 (no config) dies at the CTIME line: "unable to read qemu-server.conf - No such
//!   file or directory", wrapped by run_command as "command '...' failed: ...".
//!
//! Loop-device tests need root and are `#[ignore]`d; `scripts/test` runs them.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use vma_format::ArchiveHeader;
use vma_testkit::{parse_list_line, require_tool, sha256_hex, vectors, Vector};

/// The VM the tests restore to.
const VMID: &str = "100";
/// vzdump's name for an archive; the restore and config extraction read the compression
/// off it, and refuse other names.
const STEM: &str = "vzdump-qemu-100-2026_11_28-01_21_43";
/// LVM's default extent: thick volumes are rounded up to it.
const LVM_EXTENT: u64 = 4 << 20;
/// The restore's bandwidth limit in KiB/s where a test sets one (1 GiB/s: no slowdown).
const BWLIMIT_KIB: u64 = 1 << 20;
/// Longest a script may run (the restore's own header timeout is 60 s).
const SCRIPT_DEADLINE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Environment

/// A scratch directory with `bin/vma` (the binary under test) first on `PATH`.
struct Env {
    dir: tempfile::TempDir,
    path: OsString,
}

impl Env {
    fn new() -> Env {
        // A missing tool fails loudly: the suite must not pass by skipping.
        ["perl", "bash", "zstd", "gzip", "zcat", "lzop", "qemu-img"]
            .into_iter()
            .for_each(require_tool);
        let modules = Command::new("perl")
            .args([
                "-MFile::Copy",
                "-MFindBin",
                "-MIPC::Open3",
                "-MIO::Select",
                "-e",
                "1",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            modules,
            "perl lacks core modules (only perl-base?): run scripts/install-deps (as root)"
        );
        let dir = tempfile::Builder::new()
            .prefix("vma-proxmox-")
            .tempdir()
            .expect("temp dir");
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vma"), bin.join("vma")).unwrap();
        let mut path = bin.into_os_string();
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/bin".into()));
        Env { dir, path }
    }

    /// A new, empty directory for one run.
    fn fresh(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        assert!(!dir.exists(), "{} used twice", dir.display());
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn vma(&self) -> PathBuf {
        self.dir.path().join("bin/vma")
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test attaches loop devices and must run as root (scripts/test runs it as root)"
    );
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/proxmox")
        .join(name)
}

/// What a script's standard input is.
enum Stdin {
    Null,
    /// Bytes written into a pipe.
    Pipe(Vec<u8>),
    /// A file, redirected.
    File(PathBuf),
}

/// How a script ended.
struct Run {
    what: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn stdout_lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// What stands between `prefix` (which ends with an opening `'`) and a closing `'`
    /// ending the line, on each line of stderr that starts so.
    fn quoted_in_stderr<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> {
        self.stderr
            .lines()
            .filter_map(move |l| l.strip_prefix(prefix)?.strip_suffix('\''))
    }

    fn assert_ok(&self) {
        assert!(
            self.status.success(),
            "{} failed ({}):\n--- stdout\n{}--- stderr\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
    }

    /// The message a dying Perl script leaves: its last non-empty stderr line.
    fn last_error(&self) -> &str {
        self.stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
    }

    fn assert_dies_with(&self, check: impl Fn(&str) -> bool, want: &str) {
        assert!(
            !self.status.success() && check(self.last_error()),
            "{}: wanted failure with {want}, got {}:\n--- stdout\n{}--- stderr\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

/// Runs `perl SCRIPT ARGS` in its own process group. Returns once the script and every
/// process that inherited its output (the `vma` a failed restore leaves behind, after
/// Proxmox killed only its bash) have ended; panics past the deadline.
fn run_script(env: &Env, name: &str, args: &[OsString], stdin: Stdin, what: &str) -> Run {
    let mut cmd = Command::new("perl");
    cmd.arg(script(name))
        .args(args)
        .env("PATH", &env.path)
        .current_dir(env.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut feed = None;
    match stdin {
        Stdin::Null => {
            cmd.stdin(Stdio::null());
        }
        Stdin::File(path) => {
            cmd.stdin(fs::File::open(&path).unwrap());
        }
        Stdin::Pipe(bytes) => {
            cmd.stdin(Stdio::piped());
            feed = Some(bytes);
        }
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("perl {name}: {e}"));
    let pgid = child.id() as libc::pid_t;
    if let Some(bytes) = feed {
        let mut input = child.stdin.take().unwrap();
        // A restore that dies early closes the pipe: the error is the restore's to report.
        std::thread::spawn(move || {
            let _ = input.write_all(&bytes);
        });
    }
    let (tx, rx) = mpsc::channel();
    for (index, mut pipe) in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .enumerate()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            let _ = tx.send((index, String::from_utf8_lossy(&text).into_owned()));
        });
    }
    let mut outputs = [None, None];
    let started = std::time::Instant::now();
    while outputs.iter().any(Option::is_none) {
        let left = SCRIPT_DEADLINE.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok((index, text)) => outputs[index] = Some(text),
            Err(_) => {
                // SAFETY: signals the process group this test created, by its id.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait();
                panic!(
                    "{what}: still running (or its output still held open) after {SCRIPT_DEADLINE:?}"
                );
            }
        }
    }
    let status = child.wait().unwrap();
    let [stdout, stderr] = outputs.map(Option::unwrap);
    Run {
        what: what.to_string(),
        status,
        stdout,
        stderr,
    }
}

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

// ---------------------------------------------------------------------------------------
// Archives and how they reach the restore

/// How the archive reaches the restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Input {
    /// `vzdump-....vma`: vma reads the file itself.
    File,
    /// `vzdump-....vma.zst`: `zstd -q -d -c FILE | vma ... -`.
    Zst,
    /// The same, the file in the seekable format `vma create X.vma.zst` writes
    /// (independent frames, a seek table in a skippable frame), which stock `zstd` reads.
    SeekableZst,
    /// `vzdump-....vma.gz`: `zcat FILE | vma ... -`.
    Gz,
    /// `vzdump-....vma.lzo`: `lzop -d -c FILE | vma ... -`.
    Lzo,
    /// `qmrestore - VMID` with the archive piped in: Proxmox hands its stdin to vma,
    /// uncompressed (it never decompresses standard input).
    StdinPipe,
    /// The same with standard input redirected from the archive file.
    StdinFile,
}

impl Input {
    const ALL: [Input; 7] = [
        Input::File,
        Input::Zst,
        Input::SeekableZst,
        Input::Gz,
        Input::Lzo,
        Input::StdinPipe,
        Input::StdinFile,
    ];
    const FILES: [Input; 4] = [Input::File, Input::Zst, Input::Gz, Input::Lzo];

    /// The decompressor Proxmox puts in front of vma (pve-storage's decompressor_info),
    /// as it appears in the restore's "restore vma archive:" line.
    fn decompressor(self) -> Option<&'static str> {
        match self {
            Input::Zst | Input::SeekableZst => Some("zstd -q -d -c"),
            Input::Gz => Some("zcat"),
            Input::Lzo => Some("lzop -d -c"),
            _ => None,
        }
    }
}

/// An archive staged for one input kind: the script's ARCHIVE argument and its stdin.
struct Staged {
    arg: PathBuf,
    stdin: Stdin,
}

/// Writes `archive` into `dir` under vzdump's name, compressed for `input` with the
/// compressor command vzdump uses for it.
fn stage(dir: &Path, archive: &[u8], input: Input) -> Staged {
    let plain = dir.join(format!("{STEM}.vma"));
    fs::write(&plain, archive).unwrap();
    let compress = |ext: &str, program: &str, args: &[&str]| {
        let out = dir.join(format!("{STEM}.vma.{ext}"));
        let status = Command::new(program)
            .args(args)
            .stdin(fs::File::open(&plain).unwrap())
            .stdout(fs::File::create(&out).unwrap())
            .status()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(status.success(), "{program} {args:?}: {status}");
        Staged {
            arg: out,
            stdin: Stdin::Null,
        }
    };
    match input {
        Input::File => Staged {
            arg: plain,
            stdin: Stdin::Null,
        },
        Input::Zst => compress("zst", "zstd", &["-q", "--threads=1", "-c"]),
        Input::SeekableZst => {
            use std::io::Write as _;
            let out = dir.join(format!("{STEM}.vma.zst"));
            let mut z = vma_writer::ZstdWriter::new(Vec::new(), Default::default()).unwrap();
            z.write_all(archive).unwrap();
            fs::write(&out, z.finish().unwrap().0).unwrap();
            Staged {
                arg: out,
                stdin: Stdin::Null,
            }
        }
        Input::Gz => compress("gz", "gzip", &["--rsyncable", "-c"]),
        Input::Lzo => compress("lzo", "lzop", &["-c"]),
        Input::StdinPipe => Staged {
            arg: "-".into(),
            stdin: Stdin::Pipe(archive.to_vec()),
        },
        Input::StdinFile => Staged {
            arg: "-".into(),
            stdin: Stdin::File(plain),
        },
    }
}

/// One `#qmdump#map` line, as vzdump's assemble() writes it.
#[derive(Clone, Debug)]
struct Hint {
    virtdev: &'static str,
    devname: &'static str,
    /// Empty means 'local' to the restore.
    storeid: &'static str,
    /// Empty means raw.
    format: &'static str,
}

impl Hint {
    fn line(&self) -> String {
        format!(
            "#qmdump#map:{}:{}:{}:{}:\n",
            self.virtdev, self.devname, self.storeid, self.format
        )
    }

    fn storage(&self) -> &'static str {
        if self.storeid.is_empty() {
            "local"
        } else {
            self.storeid
        }
    }
}

/// A device of the archive and what it must restore to.
#[derive(Clone, Debug)]
struct Dev {
    name: String,
    size: u64,
    sha256: String,
}

/// A restore case: an archive and what it holds.
struct Case {
    label: String,
    vector: Vector,
    archive: Vec<u8>,
    /// qemu-server.conf as the archive holds it.
    conf: Option<Vec<u8>>,
    fw: Option<Vec<u8>>,
    hints: Vec<Hint>,
    devices: Vec<Dev>,
}

fn vector(stem: &str) -> Vector {
    vectors()
        .into_iter()
        .find(|v| v.file == format!("{stem}.vma"))
        .unwrap_or_else(|| panic!("no vector {stem} in EXPECTED.txt"))
}

fn config_of(v: &Vector, name: &str) -> Option<Vec<u8>> {
    let expected = v.file(name)?;
    let bytes = fs::read(vma_testkit::vectors_dir().join(name)).unwrap();
    // The vectors' configs are the ones shipped beside them; check that it is this one.
    assert_eq!(sha256_hex(&bytes), expected.sha256, "spec/vectors/{name}");
    Some(bytes)
}

fn devices_of(v: &Vector) -> Vec<Dev> {
    v.list
        .iter()
        .filter_map(|l| parse_list_line(l))
        .filter(|(kind, _, _)| *kind == "DEV")
        .map(|(_, size, name)| {
            let file = v
                .file(&format!("disk-{name}.raw"))
                .unwrap_or_else(|| panic!("{}: no expected image for {name}", v.file));
            assert_eq!(file.size, size);
            Dev {
                name: name.to_string(),
                size,
                sha256: file.sha256.clone(),
            }
        })
        .collect()
}

/// A vector as it is.
fn plain_case(stem: &str) -> Case {
    let v = vector(stem);
    let archive = v.bytes();
    let header = ArchiveHeader::decode(&archive).unwrap();
    let conf = header.config("qemu-server.conf").map(|c| c.data.clone());
    let fw = header.config("qemu-server.fw").map(|c| c.data.clone());
    if let Some(conf) = &conf {
        assert_eq!(Some(conf.clone()), config_of(&v, "qemu-server.conf"));
        assert!(
            !String::from_utf8_lossy(conf).contains("#qmdump#"),
            "{stem}: the vectors have no map hints"
        );
    }
    if let Some(fw) = &fw {
        assert_eq!(Some(fw.clone()), config_of(&v, "qemu-server.fw"));
    }
    Case {
        label: stem.to_string(),
        devices: devices_of(&v),
        vector: v,
        archive,
        conf,
        fw,
        hints: Vec::new(),
    }
}

/// A vector with the `#qmdump#map` lines vzdump would have written appended to its
/// qemu-server.conf: the header re-encoded as Proxmox's writer lays it out, followed by
/// the vector's own extents, byte for byte.
fn hinted_case(stem: &str, hints: Vec<Hint>) -> Case {
    let mut case = plain_case(stem);
    let size = ArchiveHeader::header_size_from_prefix(&case.archive).unwrap();
    let mut header = ArchiveHeader::decode(&case.archive).unwrap();
    assert_eq!(
        header.encode().unwrap(),
        case.archive[..size],
        "{stem}: re-encoding the header must give Proxmox's bytes back"
    );
    let conf = header
        .configs
        .iter_mut()
        .find(|c| c.name == "qemu-server.conf")
        .expect("qemu-server.conf");
    for hint in &hints {
        conf.data.extend_from_slice(hint.line().as_bytes());
    }
    case.conf = Some(conf.data.clone());
    let mut archive = header.encode().unwrap();
    archive.extend_from_slice(&case.archive[size..]);
    case.archive = archive;
    case.label = format!("{stem}+hints");
    for dev in &case.devices {
        assert!(
            hints.iter().any(|h| h.devname == dev.name),
            "{stem}: no hint for {}",
            dev.name
        );
    }
    case.hints = hints;
    case
}

fn vec1_hinted() -> Case {
    hinted_case(
        "vec1-two-drives",
        vec![
            Hint {
                virtdev: "scsi0",
                devname: "drive-scsi0",
                storeid: "local-lvm",
                format: "raw",
            },
            Hint {
                virtdev: "virtio1",
                devname: "drive-virtio1",
                storeid: "local-lvm",
                format: "raw",
            },
        ],
    )
}

/// vec2's hints also take the two short forms: no format (raw) and no storage (local).
fn vec2_hinted() -> Case {
    hinted_case(
        "vec2-small-odd",
        vec![
            Hint {
                virtdev: "sata0",
                devname: "drive-sata0",
                storeid: "local-lvm",
                format: "raw",
            },
            Hint {
                virtdev: "scsi1",
                devname: "drive-scsi1",
                storeid: "local-lvm",
                format: "",
            },
            Hint {
                virtdev: "efidisk0",
                devname: "drive-efidisk0",
                storeid: "",
                format: "raw",
            },
        ],
    )
}

/// Every vector that Proxmox's restore restores: vec1 and vec2 with their hints, vec3.
fn restorable_cases() -> Vec<Case> {
    vec![vec1_hinted(), vec2_hinted(), plain_case("vec3-config-only")]
}

/// The restorable vectors as backups of qcow2 disks on a directory storage (the hints
/// vzdump writes for them name the format `qcow2` and the storage `local`).
fn qcow2_cases() -> Vec<Case> {
    let qcow2 = |case: Case| {
        let stem = case.label.trim_end_matches("+hints").to_string();
        let hints = case
            .hints
            .iter()
            .map(|h| Hint {
                storeid: "local",
                format: "qcow2",
                ..h.clone()
            })
            .collect();
        hinted_case(&stem, hints)
    };
    vec![
        qcow2(vec1_hinted()),
        qcow2(vec2_hinted()),
        plain_case("vec3-config-only"),
    ]
}

// ---------------------------------------------------------------------------------------
// Targets

/// What the restore's volumes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TargetKind {
    /// A directory storage: fresh sparse raw files from `qemu-img create`, exactly the
    /// size asked for (the device size rounded up to KiB); map lines say write-zeros 0.
    SparseRaw,
    /// Thick LVM, played by files: made beforehand, larger than the device (rounded up to
    /// 4 MiB extents) and full of non-zero garbage, as LVM does not zero; write-zeros 1.
    ThickFile,
    /// Block devices: loop devices over garbage-filled files, rounded to 4 MiB;
    /// write-zeros 1. Needs root.
    LoopDevice,
    /// qcow2 volumes on a directory storage (Proxmox's choice for dir, NFS and CIFS
    /// storages): `qemu-img create -o preallocation=metadata -f qcow2 PATH SIZEK`, as
    /// Proxmox allocates them; the map says `format=qcow2` and write-zeros 0.
    Qcow2,
}

/// Non-zero garbage that differs from offset to offset, as a pre-used disk might hold.
fn garbage(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 13) as u8) | 1)
        .collect()
}

/// Detaches a loop device when dropped, whatever happened.
struct Loop {
    device: PathBuf,
}

impl Loop {
    fn attach(backing: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup --find --show {}: {}",
            backing.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Loop { device }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let status = Command::new("losetup").arg("-d").arg(&self.device).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: losetup -d {} failed", self.device.display());
        }
    }
}

/// The storages of one restore (`--storage` options) and the loop devices behind them.
struct Targets {
    storages: Vec<String>,
    /// Loop devices to detach after the restore.
    _loops: Vec<Loop>,
}

fn round_up(x: u64, unit: u64) -> u64 {
    x.div_ceil(unit) * unit
}

fn prepare_targets(kind: TargetKind, case: &Case, work: &Path) -> Targets {
    let mut storeids: Vec<&str> = case.hints.iter().map(Hint::storage).collect();
    storeids.extend(["local", "local-lvm"]);
    storeids.sort();
    storeids.dedup();
    let mut loops = Vec::new();
    let mut storages = Vec::new();
    for storeid in storeids {
        match kind {
            TargetKind::SparseRaw | TargetKind::Qcow2 => {
                storages.push(format!("{storeid}=dir:{}/dir-{storeid}", work.display()));
            }
            TargetKind::ThickFile | TargetKind::LoopDevice => {
                // The restore allocates in the order of the drive names; each storage
                // hands out its volumes in that order.
                let mut hints: Vec<&Hint> = case
                    .hints
                    .iter()
                    .filter(|h| h.storage() == storeid)
                    .collect();
                hints.sort_by_key(|h| h.virtdev);
                let mut volumes = Vec::new();
                for hint in hints {
                    let dev = case
                        .devices
                        .iter()
                        .find(|d| d.name == hint.devname)
                        .unwrap();
                    let len = round_up(round_up(dev.size, 1024), LVM_EXTENT);
                    let file = work.join(format!("{storeid}-{}.lv", hint.virtdev));
                    fs::write(&file, garbage(0, len as usize)).unwrap();
                    if kind == TargetKind::LoopDevice {
                        let lo = Loop::attach(&file);
                        volumes.push(lo.device.display().to_string());
                        loops.push(lo);
                    } else {
                        volumes.push(file.display().to_string());
                    }
                }
                if volumes.is_empty() {
                    // A storage nobody uses still needs a (never used) volume list.
                    volumes.push(work.join("unused.lv").display().to_string());
                }
                storages.push(format!("{storeid}=pool:{}", volumes.join(",")));
            }
        }
    }
    Targets {
        storages,
        _loops: loops,
    }
}

// ---------------------------------------------------------------------------------------
// The restore

struct Restore {
    run: Run,
    etc_pve: PathBuf,
    var_tmp: PathBuf,
}

fn restore(
    env: &Env,
    work: &Path,
    staged: Staged,
    storages: &[String],
    bwlimit: Option<u64>,
    what: &str,
) -> Restore {
    let etc_pve = work.join("etc-pve");
    let var_tmp = work.join("var-tmp");
    fs::create_dir_all(&etc_pve).unwrap();
    fs::create_dir_all(&var_tmp).unwrap();
    let mut args = vec![os("--etc-pve"), os(&etc_pve), os("--var-tmp"), os(&var_tmp)];
    for s in storages {
        args.extend([os("--storage"), os(s)]);
    }
    if let Some(limit) = bwlimit {
        args.extend([os("--bwlimit"), os(limit.to_string())]);
    }
    args.extend([os(&staged.arg), os(VMID)]);
    let run = run_script(env, "restore.pl", &args, staged.stdin, what);
    Restore {
        run,
        etc_pve,
        var_tmp,
    }
}

/// The pipeline the restore announced must be the one Proxmox builds for this input.
fn check_pipeline(r: &Restore, input: Input, archive: &Path) {
    let line = r
        .run
        .stdout_lines()
        .into_iter()
        .find(|l| l.starts_with("restore vma archive: "))
        .unwrap_or_else(|| panic!("{}: no 'restore vma archive:' line", r.run.what))
        .to_string();
    let tmp = format!("{}/vzdumptmp", r.var_tmp.display());
    let (prefix, readfrom) = match input.decompressor() {
        Some(d) => (format!("{d} {} | ", archive.display()), "-".to_string()),
        None => (String::new(), archive.display().to_string()),
    };
    let head = format!("restore vma archive: {prefix}vma extract -v -r {tmp}");
    let rest = line
        .strip_prefix(&head)
        .unwrap_or_else(|| panic!("{}: pipeline {line:?}, wanted {head:?}...", r.run.what));
    // PID.fifo READFROM TMPDIR/vzdumptmpPID
    let (pid, rest) = rest.split_once(".fifo ").expect("fifo");
    assert!(pid.chars().all(|c| c.is_ascii_digit()), "{line}");
    assert_eq!(rest, format!("{readfrom} {tmp}{pid}"), "{line}");
}

/// The listing vma printed (echoed by the restore) must be the archive's, complete.
fn check_listing(r: &Restore, case: &Case) {
    let header = ArchiveHeader::decode(&case.archive).unwrap();
    let mut want: Vec<String> = header
        .configs
        .iter()
        .map(|c| format!("CFG: size: {} name: {}", c.data.len(), c.name))
        .collect();
    want.extend(
        case.vector
            .list
            .iter()
            .filter(|l| l.starts_with("DEV: ") || l.starts_with("CTIME: "))
            .cloned(),
    );
    let got: Vec<&str> = r
        .run
        .stdout_lines()
        .into_iter()
        .filter(|l| l.starts_with("CFG: ") || l.starts_with("DEV: ") || l.starts_with("CTIME: "))
        .collect();
    assert_eq!(got, want, "{}: the listing", r.run.what);
}

/// The `map 'DEV' to 'PATH' (write zeros = W)` lines the restore printed.
fn map_lines(r: &Restore) -> Vec<(String, PathBuf, u8)> {
    r.run
        .stdout_lines()
        .into_iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("map '")?;
            let (dev, rest) = rest.split_once("' to '")?;
            let (path, rest) = rest.split_once("' (write zeros = ")?;
            let w = rest.strip_suffix(')')?.parse().ok()?;
            Some((dev.to_string(), PathBuf::from(path), w))
        })
        .collect()
}

/// The volume IDs the restore allocated, in allocation order.
fn volids(r: &Restore) -> Vec<String> {
    r.run
        .quoted_in_stderr("new volume ID is '")
        .map(str::to_string)
        .collect()
}

/// One restored device: the first `size` bytes must be the image; whatever follows
/// must be what the volume held before.
fn check_volume(what: &str, dev: &Dev, path: &Path, kind: TargetKind) {
    let bytes = match kind {
        TargetKind::Qcow2 => qcow2_guest_bytes(what, path),
        _ => fs::read(path).unwrap_or_else(|e| panic!("{what}: {}: {e}", path.display())),
    };
    let len = bytes.len() as u64;
    let want_len = match kind {
        TargetKind::SparseRaw | TargetKind::Qcow2 => round_up(dev.size, 1024),
        _ => round_up(round_up(dev.size, 1024), LVM_EXTENT),
    };
    assert_eq!(len, want_len, "{what}: {} is {len} bytes", path.display());
    assert_eq!(
        sha256_hex(&bytes[..dev.size as usize]),
        dev.sha256,
        "{what}: {} restored into {} differs from the image",
        dev.name,
        path.display()
    );
    let tail = &bytes[dev.size as usize..];
    let before = match kind {
        TargetKind::SparseRaw | TargetKind::Qcow2 => vec![0; tail.len()],
        _ => garbage(dev.size, tail.len()),
    };
    if let Some(i) = tail.iter().zip(&before).position(|(a, b)| a != b) {
        panic!(
            "{what}: {} was changed past the end of {} (at byte {})",
            path.display(),
            dev.name,
            dev.size + i as u64
        );
    }
}

/// What a qcow2 volume holds as the guest sees it (`qemu-img convert -O raw`), after
/// checking it is a qcow2 image.
fn qcow2_guest_bytes(what: &str, path: &Path) -> Vec<u8> {
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("\"format\": \"qcow2\""),
        "{what}: {} is not a qcow2 image: {info}",
        path.display()
    );
    let raw = path.with_extension("guest.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(out.status.success(), "{what}: qemu-img convert: {out:?}");
    let bytes = fs::read(&raw).unwrap();
    fs::remove_file(&raw).unwrap();
    bytes
}

/// What Proxmox writes as the new VM config: the archived config without vzdump's lines,
/// each restored drive pointing at its new volume.
fn expected_vm_conf(case: &Case, volids: &[String]) -> String {
    let mut hints: Vec<&Hint> = case.hints.iter().collect();
    hints.sort_by_key(|h| h.virtdev);
    assert_eq!(hints.len(), volids.len(), "one volume per hinted drive");
    let conf = String::from_utf8(case.conf.clone().unwrap()).unwrap();
    let mut out = String::new();
    for line in conf.split_inclusive('\n') {
        if line.starts_with("#qmdump#") {
            continue;
        }
        let mapped = line.split_once(": ").and_then(|(key, value)| {
            let i = hints.iter().position(|h| h.virtdev == key)?;
            let mut fields: Vec<&str> = value.trim_end().split(',').collect();
            fields[0] = &volids[i];
            Some(format!("{key}: {}\n", fields.join(",")))
        });
        out.push_str(mapped.as_deref().unwrap_or(line));
    }
    out
}

/// Everything a successful restore must have done.
fn check_restored(r: &Restore, case: &Case, kind: TargetKind, bwlimit: bool) {
    let what = &r.run.what;
    r.run.assert_ok();
    check_listing(r, case);

    let maps = map_lines(r);
    let mut mapped: Vec<&str> = maps.iter().map(|(d, _, _)| d.as_str()).collect();
    mapped.sort();
    let mut devs: Vec<&str> = case.devices.iter().map(|d| d.name.as_str()).collect();
    devs.sort();
    assert_eq!(mapped, devs, "{what}: the devices mapped");
    let want_w = u8::from(!matches!(kind, TargetKind::SparseRaw | TargetKind::Qcow2));
    for (name, path, w) in &maps {
        assert_eq!(*w, want_w, "{what}: write zeros for {name}");
        let dev = case.devices.iter().find(|d| &d.name == name).unwrap();
        check_volume(what, dev, path, kind);
    }
    if bwlimit && !case.hints.is_empty() {
        assert!(
            r.run.stderr.contains(&format!(
                "rate limit for storage local-lvm: {BWLIMIT_KIB} KiB/s"
            )),
            "{what}: the map lines were to carry a throttling limit"
        );
    }
    // The progress lines and statistics that follow go to the task log; Proxmox does
    // not parse them (their exact form is checked against REFERENCE-OUTPUT.txt elsewhere).

    let conf = fs::read_to_string(r.etc_pve.join(format!("qemu-server/{VMID}.conf")))
        .unwrap_or_else(|e| panic!("{what}: the restored VM config: {e}"));
    assert_eq!(
        conf,
        expected_vm_conf(case, &volids(r)),
        "{what}: VM config"
    );
    check_firewall(r, case);
    assert!(
        fs::read_dir(&r.var_tmp).unwrap().next().is_none(),
        "{what}: the restore leaves nothing in /var/tmp"
    );
}

/// The restore copies qemu-server.fw to /etc/pve/firewall/VMID.fw when the archive has it.
fn check_firewall(r: &Restore, case: &Case) {
    let fw = r.etc_pve.join(format!("firewall/{VMID}.fw"));
    match &case.fw {
        Some(want) => assert_eq!(
            fs::read(&fw).unwrap_or_else(|e| panic!("{}: {}: {e}", r.run.what, fw.display())),
            *want,
            "{}: firewall config",
            r.run.what
        ),
        None => assert!(!fw.exists(), "{}: no firewall config to copy", r.run.what),
    }
}

/// Restores `case` from `input` into sparse raw files, in a fresh work folder `name`.
fn restore_into_sparse_raw(
    env: &Env,
    case: &Case,
    input: Input,
    name: &str,
    what: &str,
) -> Restore {
    let work = env.fresh(name);
    let staged = stage(&work, &case.archive, input);
    let targets = prepare_targets(TargetKind::SparseRaw, case, &work);
    restore(env, &work, staged, &targets.storages, None, what)
}

/// Restores every restorable vector, from every kind of input, into `kind` volumes.
fn restore_all(kind: TargetKind, bwlimit: Option<u64>) {
    let env = Env::new();
    let cases = match kind {
        TargetKind::Qcow2 => qcow2_cases(),
        _ => restorable_cases(),
    };
    for case in cases {
        for input in Input::ALL {
            let what = format!("restore of {} from {input:?} into {kind:?}", case.label);
            let work = env.fresh(&format!("{}-{input:?}", case.label));
            let staged = stage(&work, &case.archive, input);
            let archive = staged.arg.clone();
            let targets = prepare_targets(kind, &case, &work);
            let r = restore(&env, &work, staged, &targets.storages, bwlimit, &what);
            check_pipeline(&r, input, &archive);
            check_restored(&r, &case, kind, bwlimit.is_some());
            drop(targets);
        }
    }
}

#[test]
fn restore_into_fresh_sparse_raw_files() {
    restore_all(TargetKind::SparseRaw, None);
}

/// Through `qemu-storage-daemon`: the volumes are qcow2 images on a directory storage.
#[test]
#[ignore = "needs qemu-utils (qemu-storage-daemon); scripts/test runs it"]
fn restore_into_qcow2_volumes_on_a_directory_storage() {
    vma_testkit::require_tool("qemu-storage-daemon");
    restore_all(TargetKind::Qcow2, None);
}

#[test]
fn restore_into_thick_volumes_full_of_garbage_with_a_bandwidth_limit() {
    restore_all(TargetKind::ThickFile, Some(BWLIMIT_KIB));
}

#[test]
#[ignore = "needs root and loop devices; scripts/test runs it"]
fn restore_into_loop_devices() {
    require_root();
    require_tool("losetup");
    restore_all(TargetKind::LoopDevice, None);
}

/// vec1 and vec2 as they are: the config has no #qmdump#map lines, so Proxmox's restore
/// reads it at the CTIME line, copies the firewall config, and then dies before it
/// allocates anything. (Which device it names depends on Perl's hash order.)
#[test]
fn restore_without_map_hints_dies_after_reading_the_config() {
    let env = Env::new();
    for stem in ["vec1-two-drives", "vec2-small-odd"] {
        let case = plain_case(stem);
        for input in Input::ALL {
            let what = format!("restore of {stem} (no hints) from {input:?}");
            let r =
                restore_into_sparse_raw(&env, &case, input, &format!("{stem}-{input:?}"), &what);
            let names: Vec<String> = case
                .devices
                .iter()
                .map(|d| {
                    format!(
                        "found no device mapping information for device '{}'",
                        d.name
                    )
                })
                .collect();
            r.run.assert_dies_with(
                |msg| {
                    msg.starts_with("command 'set -o pipefail && ")
                        && names
                            .iter()
                            .any(|n| msg.ends_with(&format!("' failed: {n}")))
                },
                "found no device mapping information for device '...'",
            );
            check_listing(&r, &case);
            check_firewall(&r, &case);
            assert!(map_lines(&r).is_empty(), "{what}: nothing mapped");
            assert!(
                !r.etc_pve.join("qemu-server").exists(),
                "{what}: no VM config written"
            );
        }
    }
}

/// vec4 has no config: Proxmox's restore dies at the CTIME line, as it cannot open
/// TMPDIR/qemu-server.conf. (The same message is what a `vma` that prints the listing
/// before writing the config files causes for every archive.)
#[test]
fn restore_of_an_archive_without_config_dies_unable_to_read_it() {
    let env = Env::new();
    let case = plain_case("vec4-nocfg-single");
    assert!(case.conf.is_none());
    for input in Input::ALL {
        let what = format!("restore of vec4 from {input:?}");
        let r = restore_into_sparse_raw(&env, &case, input, &format!("vec4-{input:?}"), &what);
        r.run.assert_dies_with(
            |msg| {
                msg.starts_with("command 'set -o pipefail && ")
                    && msg.ends_with(
                        "' failed: unable to read qemu-server.conf - No such file or directory",
                    )
            },
            "command '...' failed: unable to read qemu-server.conf - No such file or directory",
        );
        check_listing(&r, &case);
        assert!(map_lines(&r).is_empty(), "{what}: nothing mapped");
        assert!(!r.etc_pve.join("qemu-server").exists());
    }
}

// ---------------------------------------------------------------------------------------
// Reading the config: pve-storage's extract_vzdump_config_vma

fn config_pl(env: &Env, archive: &Path, what: &str) -> Run {
    run_script(env, "config.pl", &[os(archive)], Stdin::Null, what)
}

/// `vma config -` behind each decompressor, `vma config FILE` for a plain archive; the
/// decompressor's SIGPIPE (exit 141) or broken-pipe message is tolerated, any other
/// stderr line is an error.
#[test]
fn config_extraction_like_pve_storage() {
    let env = Env::new();
    for v in vectors() {
        let stem = v.file.trim_end_matches(".vma").to_string();
        let conf = config_of(&v, "qemu-server.conf");
        for input in Input::FILES {
            let what = format!("config of {stem} from {input:?}");
            let work = env.fresh(&format!("config-{stem}-{input:?}"));
            let staged = stage(&work, &v.bytes(), input);
            let r = config_pl(&env, &staged.arg, &what);
            match &conf {
                Some(conf) => {
                    r.assert_ok();
                    assert_eq!(r.stdout.as_bytes(), &conf[..], "{what}");
                }
                None if input == Input::File => r.assert_dies_with(
                    |msg| {
                        msg.starts_with("command 'vma config ")
                            && msg.contains("' failed: exit code ")
                    },
                    "command 'vma config FILE' failed: exit code N",
                ),
                None => r.assert_dies_with(
                    |msg| msg.starts_with("Failed to extract config from VMA archive: "),
                    "Failed to extract config from VMA archive: ...",
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The backup of a VM without disks: `vma create ... 'exec:COMPRESSOR > FILE'`

/// The VM's config as /etc/pve holds it: what vzdump leaves out (lock, unused disks,
/// parent, snapshot sections) around the vectors' config.
fn live_vm_conf(conf: &[u8]) -> Vec<u8> {
    let mut out = b"lock: backup\n".to_vec();
    out.extend_from_slice(conf);
    out.extend_from_slice(b"unused0: local-lvm:vm-100-disk-9\nparent: before\n\n[before]\n");
    out.extend_from_slice(b"memory: 1024\nsnaptime: 1700000000\n");
    out
}

fn diskless_backup(env: &Env, work: &Path, compress: &str, stdout: bool) -> (Run, PathBuf) {
    let v = vector("vec1-two-drives");
    let conf = config_of(&v, "qemu-server.conf").unwrap();
    let fw = config_of(&v, "qemu-server.fw").unwrap();
    let vm_conf = work.join(format!("{VMID}.conf"));
    let vm_fw = work.join(format!("{VMID}.fw"));
    fs::write(&vm_conf, live_vm_conf(&conf)).unwrap();
    fs::write(&vm_fw, &fw).unwrap();
    let tmpdir = work.join("task-tmp");
    let dumpdir = work.join("dump");
    fs::create_dir_all(&tmpdir).unwrap();
    fs::create_dir_all(&dumpdir).unwrap();
    let mut args = vec![
        os("--vma"),
        os(env.vma()),
        os("--conf"),
        os(&vm_conf),
        os("--fw"),
        os(&vm_fw),
        os("--tmpdir"),
        os(&tmpdir),
        os("--compress"),
        os(compress),
    ];
    if stdout {
        args.push(os("--stdout"));
    } else {
        args.extend([os("--dumpdir"), os(&dumpdir)]);
    }
    args.push(os(VMID));
    let what = format!("diskless backup, compress {compress}, stdout {stdout}");
    if stdout {
        // The archive comes out on the script's stdout: take it into a file under
        // vzdump's name, as `vzdump --stdout > FILE` would.
        let ext = match compress {
            "zstd" => ".zst",
            "gzip" => ".gz",
            "lzo" => ".lzo",
            _ => "",
        };
        let target = dumpdir.join(format!("{STEM}.vma{ext}"));
        let out = Command::new("perl")
            .arg(script("diskless-backup.pl"))
            .args(&args)
            .env("PATH", &env.path)
            .current_dir(env.dir.path())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&target).unwrap())
            .output()
            .expect("perl runs");
        let run = Run {
            what,
            status: out.status,
            stdout: String::new(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        return (run, target);
    }
    let run = run_script(env, "diskless-backup.pl", &args, Stdin::Null, &what);
    let target = run
        .quoted_in_stderr("INFO: creating vzdump archive '")
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| dumpdir.join("no-archive-announced"));
    (run, target)
}

/// vzdump's diskless backup (`vma create -v -c CONF -c FW 'exec:zstd --threads=1 > ...dat'`,
/// and the gzip, lzop, uncompressed and --stdout forms), then Proxmox's config
/// extraction and restore of what it wrote.
#[test]
fn diskless_backup_like_vzdump_then_restore() {
    let env = Env::new();
    let v = vector("vec1-two-drives");
    let conf = config_of(&v, "qemu-server.conf").unwrap();
    let fw = config_of(&v, "qemu-server.fw").unwrap();
    // What vzdump stores: the live config without lock, unused, parent and snapshots.
    let mut stored = conf.clone();
    stored.push(b'\n');
    for (compress, stdout) in [
        ("zstd", false),
        ("gzip", false),
        ("lzo", false),
        ("0", false),
        ("zstd", true),
    ] {
        let work = env.fresh(&format!("diskless-{compress}-{stdout}"));
        let (run, target) = diskless_backup(&env, &work, compress, stdout);
        run.assert_ok();
        assert!(
            run.stderr.contains(&format!(
                "INFO: {} create -v -c {}/task-tmp/qemu-server.conf -c {}/task-tmp/qemu-server.fw exec:",
                env.vma().display(),
                work.display(),
                work.display()
            )),
            "{}: the vma command vzdump logs:\n{}",
            run.what,
            run.stderr
        );
        assert!(
            target.is_file(),
            "{}: {} missing",
            run.what,
            target.display()
        );
        let dat: Vec<_> = fs::read_dir(target.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".dat"))
            .collect();
        assert!(dat.is_empty(), "{}: left {dat:?}", run.what);

        let r = config_pl(&env, &target, &format!("config of {}", target.display()));
        r.assert_ok();
        assert_eq!(r.stdout.as_bytes(), &stored[..], "{}", r.what);

        let what = format!("restore of the diskless backup {}", target.display());
        let rwork = work.join("restore");
        fs::create_dir(&rwork).unwrap();
        let storages = [format!("local-lvm=dir:{}/dir", rwork.display())];
        let staged = Staged {
            arg: target.clone(),
            stdin: Stdin::Null,
        };
        let r = restore(&env, &rwork, staged, &storages, None, &what);
        r.run.assert_ok();
        assert!(map_lines(&r).is_empty(), "{what}: no disks");
        let got = fs::read(r.etc_pve.join(format!("qemu-server/{VMID}.conf"))).unwrap();
        assert_eq!(got, stored, "{what}: VM config");
        let got_fw = fs::read(r.etc_pve.join(format!("firewall/{VMID}.fw"))).unwrap();
        assert_eq!(got_fw, fw, "{what}: firewall config");
    }
}
