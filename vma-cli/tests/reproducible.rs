//! `vma create --reproducible`, `--uuid`, `--uuid-from` and `vma reorder`: the same inputs
//! give the same bytes, a series shares its unchanged extents, and any archive can be
//! brought into canonical order.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vma_format::{ArchiveHeader, ExtentHeader, Uuid, VMA_CLUSTER_SIZE, VMA_EXTENT_HEADER_SIZE};
use vma_testkit::{dir_entries, Rng};
use vma_writer::{derived_uuid, round_up_to_sector, Builder};

const CLUSTER: usize = VMA_CLUSTER_SIZE;

fn vma() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vma"));
    cmd.env("TZ", "UTC").env_remove("SOURCE_DATE_EPOCH");
    cmd
}

use vma_testkit::{run_fails as fails, run_fails_saying as fails_saying, run_ok as ok};

/// An image of random, zero and partly zero clusters (the last one partial).
fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut data = vec![0u8; size];
    for chunk in data.chunks_mut(CLUSTER) {
        match rng.below(4) {
            0 => {}
            1 => {
                let half = chunk.len() / 2;
                rng.fill(&mut chunk[..half]);
            }
            _ => rng.fill(chunk),
        }
    }
    data
}

struct Inputs {
    dir: PathBuf,
    configs: Vec<PathBuf>,
    disks: Vec<(String, PathBuf, Vec<u8>)>,
}

/// Configs and three disks (one not a multiple of 512 bytes) in `dir`.
fn inputs(dir: &Path) -> Inputs {
    fs::create_dir_all(dir).unwrap();
    let conf = dir.join("qemu-server.conf");
    fs::write(&conf, b"memory: 1024\nscsi0: local:100/vm-100-disk-0.raw\n").unwrap();
    let fw = dir.join("qemu-server.fw");
    fs::write(&fw, b"[OPTIONS]\nenable: 1\n").unwrap();
    let disks = [
        ("drive-scsi0", (3 << 20) + 3 * CLUSTER / 2, 1),
        ("drive-scsi1", 20 * CLUSTER, 2),
        ("drive-efidisk0", 131_000, 3),
    ]
    .into_iter()
    .map(|(name, size, seed)| {
        let path = dir.join(format!("{name}.raw"));
        let data = image(size, seed);
        fs::write(&path, &data).unwrap();
        (name.to_string(), path, data)
    })
    .collect();
    Inputs {
        dir: dir.to_owned(),
        configs: vec![conf, fw],
        disks,
    }
}

/// The same inputs under two directories of a new temporary folder ("two machines").
fn two_machines() -> (tempfile::TempDir, Inputs, Inputs) {
    let tmp = tempfile::tempdir().unwrap();
    let a = inputs(&tmp.path().join("a"));
    let b = inputs(&tmp.path().join("b"));
    (tmp, a, b)
}

fn create(inputs: &Inputs, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = vma();
    cmd.arg("create").arg(out).args(extra);
    for c in &inputs.configs {
        cmd.arg("-c").arg(c);
    }
    for (name, path, _) in &inputs.disks {
        cmd.arg("-d")
            .arg(format!("format=raw:{name}={}", path.display()));
    }
    cmd
}

/// An image padded with zeros to the size `vma create` records (a multiple of 512).
fn padded(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    out.resize(round_up_to_sector(data.len() as u64) as usize, 0);
    out
}

/// (dev_id, cluster) of every used slot, in archive order, and each extent's bytes.
fn layout(bytes: &[u8]) -> (Vec<(u8, u32)>, Vec<&[u8]>) {
    let mut pos = ArchiveHeader::header_size_from_prefix(bytes).unwrap();
    let (mut slots, mut extents) = (Vec::new(), Vec::new());
    while pos < bytes.len() {
        let e = ExtentHeader::decode(&bytes[pos..]).unwrap();
        slots.extend(e.clusters().map(|s| (s.device.get(), s.cluster)));
        let end = pos + VMA_EXTENT_HEADER_SIZE + e.data_len();
        extents.push(&bytes[pos..end]);
        pos = end;
    }
    (slots, extents)
}

/// Canonical order for disks of these sizes (then nothing else).
fn canonical(sizes: &[usize]) -> Vec<(u8, u32)> {
    let mut want = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        want.extend((0..size.div_ceil(CLUSTER) as u32).map(|c| (i as u8 + 1, c)));
    }
    want
}

/// Extracts `archive` into a fresh `dir` and checks each disk's bytes.
fn check_extract(archive: &Path, dir: &Path, disks: &[(String, PathBuf, Vec<u8>)]) {
    ok(vma().arg("extract").arg(archive).arg(dir));
    for (i, (name, _, data)) in disks.iter().enumerate() {
        let got = fs::read(dir.join(format!("disk-{name}.raw"))).unwrap_or_else(|e| {
            panic!("disk {i} ({name}) of {}: {e}", archive.display());
        });
        assert_eq!(got.len(), round_up_to_sector(data.len() as u64) as usize);
        assert!(
            got[..data.len()] == data[..],
            "{name} differs after extract"
        );
        assert!(got[data.len()..].iter().all(|&b| b == 0));
    }
}

#[test]
fn reproducible_create_gives_the_same_bytes_everywhere() {
    let (tmp, a, b) = two_machines();
    let out1 = tmp.path().join("1.vma");
    let out2 = tmp.path().join("2.vma");
    ok(create(&a, &out1, &["--reproducible"]).env("SOURCE_DATE_EPOCH", "1700000000"));
    ok(&mut create(
        &b,
        &out2,
        &["--reproducible", "--ctime", "1700000000"],
    ));
    let bytes = fs::read(&out1).unwrap();
    assert!(bytes == fs::read(&out2).unwrap(), "two runs differ");

    // The same archive as the writer makes from one thread writing in order (create uses
    // a thread per disk).
    let mut builder = Builder::new();
    builder.reproducible().ctime(1_700_000_000);
    let devs = declare(&mut builder, &a);
    let w = builder.build(Vec::new()).unwrap();
    for (dev, (_, _, data)) in devs.iter().zip(&a.disks) {
        for (i, chunk) in padded(data).chunks(7 * CLUSTER).enumerate() {
            w.write_range(*dev, (i * 7 * CLUSTER) as u64, chunk)
                .unwrap();
        }
    }
    let (_, single) = w.finish().unwrap();
    assert!(
        single == bytes,
        "one thread in order differs from vma create"
    );

    // What the header says, and that it reads back.
    let header = ArchiveHeader::decode(&bytes).unwrap();
    assert_eq!(header.ctime, 1_700_000_000);
    let mut nil = header.clone();
    nil.uuid = Uuid::nil();
    assert_eq!(header.uuid, derived_uuid(&nil));
    let sizes: Vec<usize> = a.disks.iter().map(|d| d.2.len()).collect();
    assert_eq!(layout(&bytes).0, canonical(&sizes));
    let v = ok(vma().args(["verify", "--summary"]).arg(&out1));
    assert!(String::from_utf8_lossy(&v.stdout).contains("sealed, seal verified"));
    check_extract(&out1, &tmp.path().join("x"), &a.disks);

    // Without SOURCE_DATE_EPOCH or --ctime, the ctime is 0: still reproducible.
    let out3 = tmp.path().join("3.vma");
    let out4 = tmp.path().join("4.vma");
    ok(&mut create(&a, &out3, &["--reproducible"]));
    ok(&mut create(&b, &out4, &["--reproducible"]));
    let three = fs::read(&out3).unwrap();
    assert!(three == fs::read(&out4).unwrap());
    assert_eq!(ArchiveHeader::decode(&three).unwrap().ctime, 0);
    // A changed config is another uuid.
    fs::write(&b.configs[0], b"memory: 2048\n").unwrap();
    let out5 = tmp.path().join("5.vma");
    ok(&mut create(&b, &out5, &["--reproducible"]));
    let five = ArchiveHeader::decode(&fs::read(&out5).unwrap()).unwrap();
    assert_ne!(five.uuid, ArchiveHeader::decode(&three).unwrap().uuid);
}

#[test]
fn a_pinned_uuid_keeps_unchanged_extents_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let mut inp = inputs(&tmp.path().join("in"));
    let first = tmp.path().join("first.vma");
    ok(&mut create(&inp, &first, &["--uuid-from", "vm-100"]));
    // One cluster of the first disk changes; the second backup is a day later.
    let (_, path, data) = &mut inp.disks[0];
    let changed = 30;
    data[changed * CLUSTER..(changed + 1) * CLUSTER].fill(0x77);
    fs::write(&*path, &*data).unwrap();
    let second = tmp.path().join("second.vma");
    ok(&mut create(
        &inp,
        &second,
        &["--uuid-from", "vm-100", "--ctime", "86400"],
    ));
    let (one, two) = (fs::read(&first).unwrap(), fs::read(&second).unwrap());
    let (h1, h2) = (
        ArchiveHeader::decode(&one).unwrap(),
        ArchiveHeader::decode(&two).unwrap(),
    );
    assert_eq!(h1.uuid, vma_writer::uuid_from_name("vm-100"));
    assert_eq!(h2.uuid, h1.uuid);
    assert_eq!(h2.ctime, 86400);
    let ((s1, e1), (s2, e2)) = (layout(&one), layout(&two));
    assert_eq!(s1, s2);
    let differing: Vec<usize> = (0..e1.len()).filter(|&i| e1[i] != e2[i]).collect();
    // Only the extent holding cluster 30 of device 1 differs (58 clusters an extent), the
    // extent index's extents holding its header's copy (406 bytes of it per index extent,
    // after the 8-byte count), and the seal, which hashes every extent header.
    let data = (0..e1.len())
        .find(|&n| {
            n as u64 + vma_format::extent_index::extents_for(n as u64) + 1 == e1.len() as u64
        })
        .unwrap();
    let k = changed / 58;
    let copy = 8 + 512 * k;
    let mut want = vec![k];
    want.extend(data + copy / 406..=data + (copy + 511) / 406);
    want.push(e1.len() - 1);
    assert_eq!(differing, want, "extents that differ");

    // --uuid takes a uuid; anything else is a usage error, as is a bad SOURCE_DATE_EPOCH.
    let pinned = "0f6d9c8e-3f0a-4a59-9a51-4bb2d0c8a001";
    let third = tmp.path().join("third.vma");
    ok(&mut create(&inp, &third, &["--uuid", pinned]));
    let h3 = ArchiveHeader::decode(&fs::read(&third).unwrap()).unwrap();
    assert_eq!(h3.uuid.to_string(), pinned);
    let bad = tmp.path().join("bad.vma");
    fails_saying(
        &mut create(&inp, &bad, &["--uuid", "vm-100"]),
        2,
        "not a uuid",
    );
    fails_saying(
        create(&inp, &bad, &["--reproducible"]).env("SOURCE_DATE_EPOCH", "yesterday"),
        2,
        "SOURCE_DATE_EPOCH",
    );
    fails(
        &mut create(&inp, &bad, &["--uuid", pinned, "--uuid-from", "x"]),
        2,
    );
    assert!(!bad.exists());
}

/// An archive as a live backup writes it: clusters of all disks shuffled, some zero
/// clusters written as data, with or without the integrity extension, and a vmstate.
/// Declares the inputs' configs and disks (in their order) to `builder`.
fn declare(builder: &mut Builder, inp: &Inputs) -> Vec<vma_writer::Device> {
    for c in &inp.configs {
        let name = c.file_name().unwrap().to_str().unwrap();
        builder.add_config(name, &fs::read(c).unwrap()).unwrap();
    }
    inp.disks
        .iter()
        .map(|(name, _, data)| {
            builder
                .add_device(name, round_up_to_sector(data.len() as u64))
                .unwrap()
        })
        .collect()
}

fn shuffled(inp: &Inputs, out: &Path, seed: u64, integrity: bool, vmstate: &[u8]) {
    let mut builder = Builder::new();
    builder
        .integrity(integrity)
        .uuid(Uuid::from_u128(0x1234))
        .ctime(1_700_000_000);
    let devs = declare(&mut builder, inp);
    let vm = (!vmstate.is_empty()).then(|| builder.add_vmstate(vmstate.len() as u64).unwrap());
    let w = builder.create_file(out).unwrap();
    let mut work: Vec<(usize, u32)> = Vec::new();
    for (i, (_, _, data)) in inp.disks.iter().enumerate() {
        work.extend((0..data.len().div_ceil(CLUSTER) as u32).map(|c| (i, c)));
    }
    let mut rng = Rng(seed);
    rng.shuffle(&mut work);
    for (k, (i, c)) in work.into_iter().enumerate() {
        let data = &padded(&inp.disks[i].2);
        let start = c as usize * CLUSTER;
        let chunk = &data[start..(start + CLUSTER).min(data.len())];
        w.write_cluster(devs[i], c, chunk).unwrap();
        if let (Some(vm), 0) = (vm, k % 20) {
            let at = (k / 20 * 10_000).min(vmstate.len());
            let end = (at + 10_000).min(vmstate.len());
            w.append_vmstate(vm, &vmstate[at..end]).unwrap();
        }
    }
    if let Some(vm) = vm {
        let done = layout_vmstate_done(vmstate.len(), inp);
        w.append_vmstate(vm, &vmstate[done..]).unwrap();
    }
    w.finish().unwrap();
}

/// How many vmstate bytes [`shuffled`] appended along the way.
fn layout_vmstate_done(len: usize, inp: &Inputs) -> usize {
    let clusters: usize = inp.disks.iter().map(|d| d.2.len().div_ceil(CLUSTER)).sum();
    (clusters.div_ceil(20) * 10_000).min(len)
}

#[test]
fn reorder_brings_a_shuffled_archive_into_canonical_order() {
    let tmp = tempfile::tempdir().unwrap();
    let inp = inputs(&tmp.path().join("in"));
    let sizes: Vec<usize> = inp
        .disks
        .iter()
        .map(|d| round_up_to_sector(d.2.len() as u64) as usize)
        .collect();
    for integrity in [false, true] {
        let dir = tmp.path().join(format!("integrity-{integrity}"));
        fs::create_dir(&dir).unwrap();
        let (a, b) = (dir.join("a.vma"), dir.join("b.vma"));
        shuffled(&inp, &a, 1, integrity, &[]);
        shuffled(&inp, &b, 2, integrity, &[]);
        assert_ne!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        assert_ne!(layout(&fs::read(&a).unwrap()).0, canonical(&sizes));
        let (ra, rb) = (dir.join("ra.vma"), dir.join("rb.vma"));
        ok(vma().arg("reorder").arg(&a).arg(&ra));
        ok(vma().arg("reorder").arg(&b).arg(&rb));
        let bytes = fs::read(&ra).unwrap();
        assert!(
            bytes == fs::read(&rb).unwrap(),
            "two shuffles reorder alike"
        );
        assert_eq!(layout(&bytes).0, canonical(&sizes));
        let header = ArchiveHeader::decode(&bytes).unwrap();
        assert_eq!(header.uuid, Uuid::from_u128(0x1234), "the uuid is kept");
        let v = ok(vma().args(["verify", "--summary"]).arg(&ra));
        assert!(
            String::from_utf8_lossy(&v.stdout).contains("sealed, seal verified"),
            "the integrity extension is added"
        );
        check_extract(&ra, &dir.join("x"), &inp.disks);
        // What create makes of the same images with the same uuid and ctime.
        let made = dir.join("made.vma");
        ok(&mut create(
            &inp,
            &made,
            &[
                "--uuid",
                &Uuid::from_u128(0x1234).to_string(),
                "--ctime",
                "1700000000",
            ],
        ));
        assert!(
            fs::read(&made).unwrap() == bytes,
            "reorder = create in canonical order"
        );
        // Reordering again changes nothing; --uuid-from gives the series uuid.
        let again = dir.join("again.vma");
        ok(vma().arg("reorder").arg(&ra).arg(&again));
        assert!(fs::read(&again).unwrap() == bytes);
        let series = dir.join("series.vma");
        ok(vma()
            .args(["reorder", "--uuid-from", "vm-100"])
            .arg(&a)
            .arg(&series));
        let h = ArchiveHeader::decode(&fs::read(&series).unwrap()).unwrap();
        assert_eq!(h.uuid, vma_writer::uuid_from_name("vm-100"));
    }
}

#[test]
fn reorder_keeps_the_vmstate_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let inp = inputs(&tmp.path().join("in"));
    let state = image(300_000, 9);
    let a = tmp.path().join("a.vma");
    shuffled(&inp, &a, 3, true, &state);
    let r = tmp.path().join("r.vma");
    ok(vma().arg("reorder").arg(&a).arg(&r));
    let bytes = fs::read(&r).unwrap();
    let (slots, _) = layout(&bytes);
    let sizes: Vec<usize> = inp
        .disks
        .iter()
        .map(|d| round_up_to_sector(d.2.len() as u64) as usize)
        .collect();
    let mut want = canonical(&sizes);
    want.extend((0..state.len().div_ceil(CLUSTER) as u32).map(|c| (4, c)));
    assert_eq!(slots, want);
    let x = tmp.path().join("x");
    check_extract(&r, &x, &inp.disks);
    let got = fs::read(x.join("vmstate.bin")).unwrap();
    assert!(got[..state.len()] == state[..], "vmstate differs");
}

#[test]
fn reorder_refuses_damaged_input_and_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let inp = inputs(&tmp.path().join("in"));
    let dir = tmp.path().join("work");
    fs::create_dir(&dir).unwrap();
    let good = dir.join("good.vma");
    shuffled(&inp, &good, 4, true, &[]);
    let bytes = fs::read(&good).unwrap();
    let out = dir.join("out.vma");

    // Truncated in the middle of an extent.
    let cut = dir.join("cut.vma");
    fs::write(&cut, &bytes[..bytes.len() / 2 + 1000]).unwrap();
    fails(vma().arg("reorder").arg(&cut).arg(&out), 3);
    // Truncated at an extent boundary (clusters missing, the seal gone).
    let (_, extents) = layout(&bytes);
    assert!(extents.len() > 2);
    let header_size = ArchiveHeader::header_size_from_prefix(&bytes).unwrap();
    let boundary = header_size + extents[0].len();
    let short = dir.join("short.vma");
    fs::write(&short, &bytes[..boundary]).unwrap();
    fails(vma().arg("reorder").arg(&short).arg(&out), 3);
    // A flipped data bit, which the extent's CRC32C catches.
    let mut flipped = bytes.clone();
    flipped[header_size + VMA_EXTENT_HEADER_SIZE + 5000] ^= 1;
    let bad = dir.join("bad.vma");
    fs::write(&bad, &flipped).unwrap();
    fails_saying(vma().arg("reorder").arg(&bad).arg(&out), 3, "damaged");
    // Not an archive at all.
    let junk = dir.join("junk.vma");
    fs::write(&junk, vec![7u8; 100_000]).unwrap();
    fails(vma().arg("reorder").arg(&junk).arg(&out), 3);
    // A missing input, and an existing output, which is left alone.
    fails(vma().arg("reorder").arg(dir.join("nope.vma")).arg(&out), 4);
    assert_eq!(
        dir_entries(&dir),
        ["bad.vma", "cut.vma", "good.vma", "junk.vma", "short.vma"],
        "no output, no temporary file"
    );
    fs::write(&out, b"keep me").unwrap();
    fails(vma().arg("reorder").arg(&good).arg(&out), 4);
    assert_eq!(fs::read(&out).unwrap(), b"keep me");
    let _ = &inp.dir;
}

#[test]
fn reproducible_vma_zst_gives_the_same_frames_and_seek_table() {
    let (tmp, a, b) = two_machines();
    let plain = tmp.path().join("plain.vma");
    ok(&mut create(&a, &plain, &["--reproducible", "--ctime", "1"]));
    let mut zst = Vec::new();
    for (inputs, name) in [(&a, "1.vma.zst"), (&b, "2.vma.zst")] {
        let out = tmp.path().join(name);
        ok(&mut create(
            inputs,
            &out,
            &["--reproducible", "--ctime", "1"],
        ));
        zst.push(fs::read(&out).unwrap());
    }
    assert!(zst[0] == zst[1], "two compressed runs differ");
    // Seekable zstd (a skippable frame ends it) holding the plain archive's bytes.
    let tail = &zst[0][zst[0].len() - 4..];
    assert_eq!(tail, &0x8F92_EAB1u32.to_le_bytes(), "no seek table footer");
    let decoded = zstd::stream::decode_all(&zst[0][..]).unwrap();
    assert!(
        decoded == fs::read(&plain).unwrap(),
        "the .vma.zst does not decompress to the plain reproducible archive"
    );
}
