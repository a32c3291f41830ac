//! The integrity extension end to end: a flipped data bit is found and located with it and
//! goes unnoticed without it; a cut-off seal shows as unsealed.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use vma_format::{ArchiveHeader, ExtentHeader, VMA_EXTENT_HEADER_SIZE};

fn vma(args: &[&str], extra: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vma"))
        .args(args)
        .args(extra)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Creates an archive of a 1 MiB patterned disk, with or without the extension.
fn archive(dir: &Path, integrity: bool) -> (std::path::PathBuf, Vec<u8>) {
    let img = dir.join("disk.raw");
    let data: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect();
    fs::write(&img, &data).unwrap();
    let out = dir.join(if integrity { "with.vma" } else { "without.vma" });
    let spec = format!("format=raw:drive-scsi0={}", img.display());
    let mut args = vec!["create"];
    if !integrity {
        args.push("--no-integrity");
    }
    let o = vma(&args, &[&out, Path::new("-d"), Path::new(&spec)]);
    assert!(o.status.success(), "{}", stderr(&o));
    (out, data)
}

/// Flips one bit in the second block of the first extent's data.
fn flip_data_bit(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let at = ArchiveHeader::header_size_from_prefix(&bytes).unwrap();
    let extent = ExtentHeader::decode(&bytes[at..]).unwrap();
    assert!(extent.data_len() > 8192);
    bytes[at + VMA_EXTENT_HEADER_SIZE + 4096 + 77] ^= 0x10;
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_flipped_data_bit_is_located_and_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, data) = archive(tmp.path(), true);
    let o = vma(&["verify", "--summary"], &[&path]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("sealed, seal verified"), "{text}");

    flip_data_bit(&path);
    let o = vma(&["verify"], &[&path]);
    assert_eq!(o.status.code(), Some(3));
    let err = stderr(&o);
    assert!(
        err.contains("extent 0 at byte 12800: data checksum mismatch"),
        "{err}"
    );
    assert!(
        err.contains("drive-scsi0 cluster 0"),
        "names the device clusters: {err}"
    );

    let json = vma(&["verify", "--json"], &[&path]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["integrity"]["damaged_extents"][0]["index"], 0);

    let target = tmp.path().join("x");
    let o = vma(&["extract"], &[&path, &target]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        !target.exists(),
        "nothing left behind: {:?}",
        fs::read_dir(&target).map(|d| d.count())
    );

    let target = tmp.path().join("y");
    let o = vma(&["extract", "--continue-on-damage"], &[&path, &target]);
    assert_eq!(o.status.code(), Some(3));
    let err = stderr(&o);
    assert!(
        err.contains("damaged: drive-scsi0 bytes 0..1048576"),
        "{err}"
    );
    let got = fs::read(target.join("disk-drive-scsi0.raw")).unwrap();
    assert_eq!(got.len(), data.len());
    assert_ne!(got, data, "the damaged byte is extracted as stored");
}

#[test]
fn without_the_extension_the_same_flip_goes_unnoticed() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, data) = archive(tmp.path(), false);
    flip_data_bit(&path);
    let o = vma(&["verify", "--summary"], &[&path]);
    assert!(
        o.status.success(),
        "the gap the extension closes: {}",
        stderr(&o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("no data checksums"));
    let target = tmp.path().join("x");
    assert!(vma(&["extract"], &[&path, &target]).status.success());
    assert_ne!(
        fs::read(target.join("disk-drive-scsi0.raw")).unwrap(),
        data,
        "silently wrong"
    );
}

#[test]
fn a_cut_off_seal_reads_as_unsealed() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = archive(tmp.path(), true);
    let json = vma(&["list", "--json"], &[&path]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["integrity"]["sealed"], true);
    assert_eq!(
        v["integrity"]["checksummed_extents"],
        v["integrity"]["total_extents"]
    );

    let mut bytes = fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - VMA_EXTENT_HEADER_SIZE);
    fs::write(&path, &bytes).unwrap();
    let o = vma(&["verify", "--summary"], &[&path]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("not sealed"));
    let json = vma(&["verify", "--json"], &[&path]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["integrity"]["sealed"], false);
    assert_eq!(v["integrity"]["seal"], "unsealed");
}
