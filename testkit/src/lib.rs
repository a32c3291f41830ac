//! Test support shared by the vma-rs crates: where the reference vectors live and what
//! Proxmox's own `vma` tool says they hold (parsed from `spec/vectors/EXPECTED.txt`).
#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

use std::collections::BTreeMap;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

pub mod s3;
pub mod serve;
pub use s3::{S3Server, SlowProxy};
pub use serve::Serve;

/// The vectors' folder, `spec/vectors` at the repository root.
pub fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives in the workspace")
        .join("spec/vectors")
}

/// One file that `vma extract` of a vector produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedFile {
    /// File name inside the extraction folder (`disk-drive-scsi0.raw`, `qemu-server.conf`).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its sha256, lower-case hex.
    pub sha256: String,
}

/// What one vector holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vector {
    /// The archive's file name, e.g. `vec1-two-drives.vma`.
    pub file: String,
    /// The lines `vma list` prints for it, in order.
    pub list: Vec<String>,
    /// The files `vma extract` produces.
    pub files: Vec<ExpectedFile>,
}

impl Vector {
    /// Path of the archive.
    pub fn path(&self) -> PathBuf {
        vectors_dir().join(&self.file)
    }

    /// Reads the whole archive.
    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(self.path()).expect("vector readable")
    }

    /// The expected extracted file of this name.
    pub fn file(&self, name: &str) -> Option<&ExpectedFile> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Asserts that `dir` holds exactly the files `vma extract` produces of this vector,
    /// each of the expected size and sha256.
    pub fn assert_extracted(&self, dir: &std::path::Path) {
        let mut want: Vec<String> = self.files.iter().map(|f| f.name.clone()).collect();
        want.sort();
        assert_eq!(
            dir_entries(dir),
            want,
            "{}: files in {}",
            self.file,
            dir.display()
        );
        for f in &self.files {
            let path = dir.join(&f.name);
            let len = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .len();
            assert_eq!(len, f.size, "{}: size", path.display());
            assert_eq!(sha256_file(&path), f.sha256, "{}: sha256", path.display());
        }
    }
}

/// Every vector with its expected contents, in the order EXPECTED.txt names them.
pub fn vectors() -> Vec<Vector> {
    let text = std::fs::read_to_string(vectors_dir().join("EXPECTED.txt"))
        .expect("spec/vectors/EXPECTED.txt readable");
    let mut by_stem: BTreeMap<String, Vector> = BTreeMap::new();
    let mut order = Vec::new();
    let mut listing: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("## ") {
            let file = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            listing = Some(file.trim_end_matches(".vma").to_string());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            if line.starts_with("# Other") {
                listing = None;
            }
            continue;
        }
        if let Some(stem) = &listing {
            let v = by_stem.entry(stem.clone()).or_default();
            v.list.push(line.to_string());
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(sha), Some(size), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            panic!("unparsed EXPECTED.txt line: {line}");
        };
        let (stem, name) = path.split_once('/').expect("archive/file");
        if !by_stem.contains_key(stem) {
            order.push(stem.to_string());
        }
        let v = by_stem.entry(stem.to_string()).or_default();
        v.file = format!("{stem}.vma");
        v.files.push(ExpectedFile {
            name: name.to_string(),
            size: size.parse().expect("size"),
            sha256: sha.to_string(),
        });
    }
    let vectors: Vec<Vector> = order
        .into_iter()
        .map(|stem| by_stem.remove(&stem).unwrap())
        .collect();
    assert_eq!(vectors.len(), 4, "EXPECTED.txt names four vectors");
    for v in &vectors {
        assert!(!v.list.is_empty(), "{}: no `vma list` lines parsed", v.file);
    }
    vectors
}

/// Lower-case hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &std::path::Path) -> String {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::copy(&mut file, &mut hasher).expect("read");
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Parses a `CFG:`/`DEV:` line of `vma list` into (kind, size, name), for tests that
/// compare decoded headers with the reference listing.
pub fn parse_list_line(line: &str) -> Option<(&str, u64, &str)> {
    if let Some(rest) = line.strip_prefix("CFG: size: ") {
        let (size, name) = rest.split_once(" name: ")?;
        return Some(("CFG", size.parse().ok()?, name));
    }
    if let Some(rest) = line.strip_prefix("DEV: dev_id=") {
        let (_, rest) = rest.split_once(" size: ")?;
        let (size, name) = rest.split_once(" devname: ")?;
        return Some(("DEV", size.parse().ok()?, name));
    }
    None
}

/// One command of `spec/vectors/REFERENCE-OUTPUT.txt`: what Proxmox's own `vma` printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceRun {
    /// The arguments after `vma`, e.g. `["verify", "-v", "vec1-two-drives.vma"]`.
    pub args: Vec<String>,
    /// Its standard output, line by line.
    pub stdout: Vec<String>,
    /// Its standard error, line by line.
    pub stderr: Vec<String>,
    /// Its exit code.
    pub exit: i32,
}

/// Every command of `spec/vectors/REFERENCE-OUTPUT.txt`, in order (run there with
/// `TZ=UTC`, in a folder holding the vectors, each target directory fresh).
pub fn reference_output() -> Vec<ReferenceRun> {
    let text = std::fs::read_to_string(vectors_dir().join("REFERENCE-OUTPUT.txt"))
        .expect("spec/vectors/REFERENCE-OUTPUT.txt readable");
    let mut runs: Vec<ReferenceRun> = Vec::new();
    for line in text.lines() {
        if let Some(cmd) = line.strip_prefix("$ vma ") {
            runs.push(ReferenceRun {
                args: cmd.split_whitespace().map(str::to_owned).collect(),
                stdout: Vec::new(),
                stderr: Vec::new(),
                exit: -1,
            });
            continue;
        }
        let Some(run) = runs.last_mut() else { continue };
        if let Some(out) = line.strip_prefix("OUT: ") {
            run.stdout.push(out.to_owned());
        } else if let Some(err) = line.strip_prefix("ERR: ") {
            run.stderr.push(err.to_owned());
        } else if let Some(code) = line.strip_prefix("exit: ") {
            run.exit = code.trim().parse().expect("exit code");
        }
    }
    assert!(
        runs.len() >= 9,
        "REFERENCE-OUTPUT.txt: too few commands parsed"
    );
    assert!(
        runs.iter().all(|r| r.exit >= 0),
        "every command has its exit code"
    );
    runs
}

/// Deterministic xorshift64 numbers and bytes, so that tests see the same data each run.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next number (the seed must not be 0).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// Shuffles `items` (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Panics unless `tool` can be found on the PATH, naming the script that installs it: a
/// missing tool is a loud failure, never a silent skip.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(tool))
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
                .unwrap_or(false)
        })
    });
    assert!(
        found,
        "{tool} is not installed: run scripts/install-deps (the test suite needs it)"
    );
}

/// The names of the entries of `dir`, sorted: what a test that must leave nothing behind
/// (or exactly one archive) compares.
pub fn dir_entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Asserts that a finished command succeeded; the message names it (`what`) and shows its
/// status, stderr and stdout.
#[track_caller]
pub fn assert_success(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstderr: {}\nstdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Runs `cmd` and asserts that it succeeded (see [`assert_success`]).
#[track_caller]
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().expect("the command runs");
    assert_success(&out, &format!("{cmd:?}"));
    out
}

/// `input` piped through the command `argv` (a compressor reading stdin, as vzdump runs
/// one): its standard output. The tool must be installed ([`require_tool`]) and succeed.
pub fn pipe_through(argv: &[&str], input: &[u8]) -> Vec<u8> {
    use std::process::{Command, Stdio};
    require_tool(argv[0]);
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
    let out = child.wait_with_output().expect("the command runs");
    writer
        .join()
        .expect("the writer thread")
        .expect("the command reads its input");
    assert_success(&out, &format!("{argv:?}"));
    out.stdout
}

/// Runs `cmd` expecting failure with exit `code`, a message and no panic; returns stderr.
pub fn run_fails(cmd: &mut std::process::Command, code: i32) -> String {
    let out = cmd.output().expect("the command runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{cmd:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{cmd:?} panicked: {stderr}");
    assert!(!stderr.trim().is_empty(), "{cmd:?}: no message");
    stderr
}

/// Runs `cmd` expecting failure as [`run_fails`] does, with a message that mentions `words`;
/// returns stderr.
pub fn run_fails_saying(cmd: &mut std::process::Command, code: i32, words: &str) -> String {
    let stderr = run_fails(cmd, code);
    assert!(
        stderr.contains(words),
        "{cmd:?}: the message lacks {words:?}: {stderr}"
    );
    stderr
}
