//! `vma recompress`: every vector, packed as vzdump packs archives (zstd through a pipe,
//! gzip, lzop) and given as a file or on stdin, becomes a seekable `.vma.zst` that
//! decompresses with stock `zstd` to exactly the vector's bytes and reads in place; a
//! damaged or cut input is refused with exit 3 and leaves no output; an existing output is
//! never replaced.

use std::fs;
use std::path::Path;
use std::process::Command;

use vma_testkit::{
    dir_entries, pipe_through as pack, require_tool, run_fails, run_fails_saying, run_ok, vectors,
};

fn vma() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vma"))
}

/// The packings vzdump writes, as it runs them.
const PACKERS: [&[&str]; 3] = [
    &["zstd", "-q", "--rsyncable", "--threads=1"],
    &["gzip", "-c"],
    &["lzop", "-c"],
];

/// What stock zstd decompresses `path` to.
fn unzstd(path: &Path) -> Vec<u8> {
    run_ok(Command::new("zstd").args(["-q", "-d", "-c"]).arg(path)).stdout
}

#[test]
fn every_vector_in_every_packing_becomes_the_same_archive_in_seekable_zstd() {
    require_tool("zstd");
    let tmp = tempfile::tempdir().unwrap();
    for v in vectors() {
        let plain = v.bytes();
        for packer in PACKERS {
            let packed = tmp.path().join("in.vma.packed");
            fs::write(&packed, pack(packer, &plain)).unwrap();
            let from_file = tmp.path().join("file.vma.zst");
            let from_stdin = tmp.path().join("stdin.vma.zst");
            run_ok(vma().arg("recompress").arg(&packed).arg(&from_file));
            run_ok(
                vma()
                    .arg("recompress")
                    .arg("-")
                    .arg(&from_stdin)
                    .stdin(fs::File::open(&packed).unwrap()),
            );
            for out in [&from_file, &from_stdin] {
                let what = format!("{} through {packer:?}, {}", v.file, out.display());
                assert!(unzstd(out) == plain, "{what}: not the same archive");
                // Seekable: read in place, without decompressing it first.
                run_ok(vma().args(["verify", "--quick"]).arg(out));
                fs::remove_file(out).unwrap();
            }
        }
    }
}

#[test]
fn output_to_stdout_a_level_and_none() {
    require_tool("zstd");
    let tmp = tempfile::tempdir().unwrap();
    let v = &vectors()[0];
    let plain = v.bytes();
    let gz = tmp.path().join("a.vma.gz");
    fs::write(&gz, pack(&["gzip", "-c"], &plain)).unwrap();

    let stdout = run_ok(
        vma()
            .args(["recompress", "--compress", "zstd:19"])
            .arg(&gz)
            .arg("-"),
    )
    .stdout;
    let piped = tmp.path().join("piped.vma.zst");
    fs::write(&piped, &stdout).unwrap();
    assert!(unzstd(&piped) == plain);
    run_ok(vma().args(["verify", "--quick"]).arg(&piped));

    let none = tmp.path().join("plain.vma");
    run_ok(
        vma()
            .args(["recompress", "--compress", "none"])
            .arg(&gz)
            .arg(&none),
    );
    assert!(fs::read(&none).unwrap() == plain);

    run_fails(
        vma()
            .args(["recompress", "--compress", "xz"])
            .arg(&gz)
            .arg(tmp.path().join("x")),
        2,
    );
}

/// Runs `vma recompress IN OUT` where OUT is in an empty directory: exit code, stderr
/// and what the directory holds afterwards.
fn recompress_into_empty_dir(input: &Path) -> (Option<i32>, String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let o = vma()
        .arg("recompress")
        .arg(input)
        .arg(dir.path().join("out.vma.zst"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    (o.status.code(), stderr, dir_entries(dir.path()))
}

#[test]
fn damaged_and_cut_archives_are_refused_and_leave_nothing() {
    require_tool("zstd");
    let tmp = tempfile::tempdir().unwrap();
    // An archive with the integrity extension (data CRC32Cs, seal): vma create's.
    let image = tmp.path().join("disk.raw");
    let mut rng = vma_testkit::Rng(7);
    let mut data = vec![0u8; 3 << 20];
    rng.fill(&mut data);
    fs::write(&image, &data).unwrap();
    let archive = tmp.path().join("a.vma");
    run_ok(
        vma()
            .arg("create")
            .arg(&archive)
            .arg(format!("drive-scsi0={}", image.display())),
    );
    let plain = fs::read(&archive).unwrap();
    let (code, err, left) = recompress_into_empty_dir(&archive);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(left, ["out.vma.zst"]);

    // A flipped data byte: its extent's CRC32C fails.
    let mut flipped = plain.clone();
    let at = plain.len() / 2;
    flipped[at] ^= 0x01;
    // Cut: the seal and the last extents are missing.
    let cut = plain[..plain.len() - 100_000].to_vec();
    for (what, bytes) in [("flipped", flipped), ("cut", cut)] {
        let zst = tmp.path().join(format!("{what}.vma.zst"));
        fs::write(&zst, pack(PACKERS[0], &bytes)).unwrap();
        let (code, err, left) = recompress_into_empty_dir(&zst);
        assert_eq!(code, Some(3), "{what}: {err}");
        assert!(left.is_empty(), "{what}: left {left:?}");
    }

    // A damaged compressed stream.
    let mut bad = pack(PACKERS[1], &plain);
    let n = bad.len();
    bad[n / 2] ^= 0xff;
    let gz = tmp.path().join("bad.vma.gz");
    fs::write(&gz, bad).unwrap();
    let (code, err, left) = recompress_into_empty_dir(&gz);
    assert_eq!(code, Some(3), "{err}");
    assert!(left.is_empty(), "left {left:?}");
}

#[test]
fn an_existing_output_is_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let v = &vectors()[0];
    let out = tmp.path().join("out.vma.zst");
    fs::write(&out, b"precious").unwrap();
    run_fails_saying(vma().arg("recompress").arg(v.path()).arg(&out), 4, "exists");
    assert_eq!(fs::read(&out).unwrap(), b"precious");
}

#[test]
fn an_output_command_that_fails_or_stops_reading_is_an_io_error() {
    let v = &vectors()[0];
    // The command stops reading after 100 bytes; the command cannot write what it reads.
    for (exec, words) in [
        ("exec:head -c 100 > /dev/null", "stopped reading"),
        ("exec:cat > /dev/full", "failed"),
    ] {
        run_fails_saying(vma().arg("recompress").arg(v.path()).arg(exec), 4, words);
    }
}
