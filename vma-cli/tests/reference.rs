//! `vma verify -v` and `vma extract -v` print, line for line, what Proxmox's own `vma`
//! printed for every vector (spec/vectors/REFERENCE-OUTPUT.txt): the listing, progress
//! lines with Proxmox's counting, and the closing statistics. `vma create -v` is checked
//! in create_outputs.rs: its intermediate lines follow Proxmox's main-loop timing.

use std::process::Command;

use vma_testkit::{reference_output, vectors_dir};

fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn verify_and_extract_print_what_proxmox_prints() {
    let runs: Vec<_> = reference_output()
        .into_iter()
        .filter(|r| r.args[0] == "verify" || r.args[0] == "extract")
        .collect();
    assert_eq!(runs.len(), 8, "a verify and an extract per vector");
    let dir = tempfile::tempdir().unwrap();
    for v in std::fs::read_dir(vectors_dir()).unwrap() {
        let v = v.unwrap().path();
        if v.extension().is_some_and(|e| e == "vma") {
            std::fs::copy(&v, dir.path().join(v.file_name().unwrap())).unwrap();
        }
    }
    for run in &runs {
        let out = Command::new(env!("CARGO_BIN_EXE_vma"))
            .args(&run.args)
            .current_dir(dir.path())
            .env("TZ", "UTC")
            .output()
            .unwrap();
        let what = run.args.join(" ");
        assert_eq!(lines(&out.stdout), run.stdout, "stdout of vma {what}");
        assert_eq!(lines(&out.stderr), run.stderr, "stderr of vma {what}");
        assert_eq!(out.status.code(), Some(run.exit), "exit code of vma {what}");
    }
}
