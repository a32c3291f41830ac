//! `.vma.lzo` archives (as vzdump writes them, with the real `lzop`) read in place by the
//! commands built on the seekable reader: `cat`, `verify --quick` and `list --json` give
//! what they give on the plain archive, and a damaged lzop block is exit 3 with the byte
//! offset of the block.

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;

use vma_reader::lzop::LzopIndex;
use vma_testkit::{require_tool, run_ok, vectors};

fn vma() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vma"))
}

/// `archive` compressed with `lzop -c ARGS` into `dir`.
fn lzop(archive: &Path, args: &[&str], dir: &Path) -> PathBuf {
    require_tool("lzop");
    let name = archive.file_name().unwrap().to_str().unwrap();
    let out = dir.join(format!("{name}{}.lzo", args.concat()));
    let o = Command::new("lzop")
        .arg("-c")
        .args(args)
        .arg(archive)
        .output()
        .unwrap();
    assert!(o.status.success(), "lzop {args:?} {}", archive.display());
    fs::write(&out, o.stdout).unwrap();
    out
}

/// Device names of a vector, from its listing.
fn device_names(v: &vma_testkit::Vector) -> Vec<String> {
    (v.list.iter())
        .filter_map(|l| l.rsplit_once(" devname: ").map(|(_, n)| n.to_string()))
        .collect()
}

#[test]
fn cat_verify_quick_and_list_json_of_a_vma_lzo_match_the_plain_archive() {
    let tmp = tempfile::tempdir().unwrap();
    for v in vectors() {
        for args in [&[][..], &["-9", "--crc32"][..]] {
            let lzo = lzop(&v.path(), args, tmp.path());
            for cmd in [
                &["verify", "--quick"][..],
                &["verify", "--quick", "--json"][..],
                &["list", "--json"][..],
            ] {
                let plain = run_ok(vma().args(cmd).arg(v.path()));
                let packed = run_ok(vma().args(cmd).arg(&lzo));
                assert_eq!(
                    String::from_utf8_lossy(&packed.stdout),
                    String::from_utf8_lossy(&plain.stdout),
                    "{cmd:?} {}",
                    lzo.display()
                );
            }
            let json = run_ok(vma().args(["list", "--json"]).arg(&lzo));
            let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
            assert!(json["integrity"].is_object(), "{}: {json}", v.file);
            for name in device_names(&v) {
                let plain = run_ok(vma().arg("cat").arg(v.path()).arg(&name));
                let packed = run_ok(vma().arg("cat").arg(&lzo).arg(&name));
                assert!(plain.stdout == packed.stdout, "{} {name}", lzo.display());
            }
        }
    }
}

/// Runs `vma ARGS FILE [DEVICE]` on `bytes` and returns its exit code and stderr.
fn run_on(dir: &Path, bytes: &[u8], args: &[&str], device: Option<&str>) -> (i32, String) {
    let path = dir.join("hostile.vma.lzo");
    fs::write(&path, bytes).unwrap();
    let o = vma().args(args).arg(&path).args(device).output().unwrap();
    let code = o.status.code().expect("an exit code, not a signal");
    (code, String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn hostile_lzop_blocks_exit_3_with_their_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let v = &vectors()[0];
    let good = fs::read(lzop(&v.path(), &[], tmp.path())).unwrap();
    let index = LzopIndex::scan(Cursor::new(&good), good.len() as u64).unwrap();
    assert!(index.blocks() >= 3, "{} blocks", index.blocks());
    let device = "drive-scsi0";
    assert_eq!(run_on(tmp.path(), &good, &["cat"], Some(device)).0, 0);
    let b1 = *index.block(1).unwrap();
    let at = b1.header_offset as usize;
    let last = *index.block(index.blocks() - 1).unwrap();
    let at0 = index.block(0).unwrap().header_offset as usize;
    let put = |field: usize, value: u32| {
        let mut bad = good.clone();
        bad[at + field..at + field + 4].copy_from_slice(&value.to_be_bytes());
        bad
    };
    let cases: Vec<(&str, Vec<u8>, usize, &str)> = vec![
        (
            "zero compressed length",
            put(4, 0),
            at,
            "compressed length 0",
        ),
        (
            "compressed length over the uncompressed",
            put(4, b1.len + 1),
            at,
            "compressed length",
        ),
        (
            "uncompressed length over lzop's max",
            put(0, (64 << 20) + 1),
            at,
            "exceeds lzop's limit",
        ),
        (
            "truncated in a block",
            good[..(last.header_offset + last.file_len() - 1) as usize].to_vec(),
            last.header_offset as usize,
            "run past the end",
        ),
        // Block 0 holds the archive header, which every command reads.
        (
            "data checksum",
            {
                let mut bad = good.clone();
                bad[at0 + 8] ^= 1;
                bad
            },
            at0,
            "Adler-32 checksum mismatch",
        ),
    ];
    for (what, bad, offset, text) in cases {
        for args in [
            &["verify", "--quick"][..],
            &["cat"][..],
            &["list", "--json"][..],
        ] {
            let device = (args[0] == "cat").then_some(device);
            let (code, err) = run_on(tmp.path(), &bad, args, device);
            assert_eq!(code, 3, "{what} {args:?}: {err}");
            assert!(
                err.contains(&format!("at byte {offset}")) && err.contains(text),
                "{what} {args:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
        // The streaming reader fails on it too.
        let (code, err) = run_on(tmp.path(), &bad, &["verify"], None);
        assert_eq!(code, 3, "{what} verify: {err}");
    }
}
