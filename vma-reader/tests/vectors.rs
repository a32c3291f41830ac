//! The archives Proxmox's own `vma` made read back to exactly what its `vma extract`
//! produced, through every way in.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use common::{sha256_hex, Scratch};
use vma_reader::{
    verify, Extractor, SealStatus, SeekableArchive, StreamReader, VerifyOptions, Zeroing,
};
use vma_testkit::{sha256_file, vectors};

#[test]
fn every_vector_extracts_exactly_through_the_streaming_reader() {
    for v in vectors() {
        let s = Scratch::new();
        let mut seen = Vec::new();
        let file = std::fs::File::open(v.path()).unwrap();
        let report = Extractor::new(s.out())
            .progress(|p| seen.push(*p))
            .extract(std::io::BufReader::new(file))
            .unwrap_or_else(|e| panic!("{}: {e}", v.file));
        v.assert_extracted(&s.out());
        assert!(report.verify.is_ok() && report.damaged.is_empty());
        assert_eq!(report.files.len(), v.files.len());
        let last = seen.last().copied().unwrap();
        assert_eq!(last.archive_bytes, v.bytes().len() as u64);
        let clusters: u64 = report.verify.devices.iter().map(|d| d.clusters).sum();
        assert_eq!(last.clusters, clusters);
        let sizes: u64 = report.verify.devices.iter().map(|d| d.size).sum();
        assert_eq!(last.device_bytes, sizes, "every device byte counted once");
        assert!(
            seen.windows(2)
                .all(|w| w[0].archive_bytes <= w[1].archive_bytes
                    && w[0].clusters <= w[1].clusters
                    && w[0].device_bytes <= w[1].device_bytes),
            "progress only grows"
        );
    }
}

#[test]
fn every_vector_reads_exactly_through_the_seekable_reader() {
    for v in vectors() {
        let vma = SeekableArchive::open(v.path()).unwrap_or_else(|e| panic!("{}: {e}", v.file));
        assert_eq!(vma.integrity().seal, SealStatus::Unsealed);
        assert_eq!(vma.integrity().checksummed_extents, 0);
        let mut checked = 0;
        for d in vma.devices() {
            let name = vma_reader::device_file_name(d).unwrap();
            let expected = v.file(&name).expect("device in EXPECTED.txt");
            let mut dev = vma.device(d.name.as_str()).unwrap();
            let mut bytes = Vec::new();
            dev.read_to_end(&mut bytes).unwrap();
            assert_eq!(bytes.len() as u64, expected.size, "{} {name}", v.file);
            assert_eq!(sha256_hex(&bytes), expected.sha256, "{} {name}", v.file);
            checked += 1;
        }
        for c in &vma.header().configs {
            let expected = v.file(&c.name).unwrap();
            assert_eq!(sha256_hex(vma.config(&c.name).unwrap()), expected.sha256);
            checked += 1;
        }
        assert_eq!(checked, v.files.len(), "{}", v.file);
        let report = verify(&vma, VerifyOptions::default()).unwrap();
        assert!(report.is_ok());
    }
}

#[test]
fn verify_reports_every_device_of_every_vector() {
    for v in vectors() {
        let bytes = v.bytes();
        let report = verify(&bytes[..], VerifyOptions::default()).unwrap();
        assert!(report.is_ok() && report.complete, "{}", v.file);
        assert_eq!(report.archive_bytes, bytes.len() as u64);
        assert_eq!(report.integrity.seal, SealStatus::Unsealed);
        assert_eq!(report.integrity.checksummed_extents, 0);
        assert!(
            report.integrity.total_extents >= 1,
            "Proxmox always writes an extent"
        );
        for d in &report.devices {
            assert_eq!(d.clusters, vma_format::cluster::cluster_count(d.size));
            assert_eq!(d.stored_bytes + d.zero_bytes, d.size);
        }
    }
    // vec2's drive-scsi1 is all zeros: nothing stored.
    let v = &vectors()[1];
    let report = verify(&v.bytes()[..], VerifyOptions::default()).unwrap();
    let scsi1 = report
        .devices
        .iter()
        .find(|d| d.name == "drive-scsi1")
        .unwrap();
    assert_eq!((scsi1.stored_bytes, scsi1.zero_bytes), (0, 262144));
}

#[test]
fn a_pipe_is_enough() {
    for v in vectors() {
        let mut child = Command::new("cat")
            .arg(v.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cat runs");
        let s = Scratch::new();
        Extractor::new(s.out())
            .extract(child.stdout.take().unwrap())
            .unwrap();
        assert!(child.wait().unwrap().success());
        v.assert_extracted(&s.out());
    }
    // And through an OS pipe fed by a thread, in odd-sized writes: `cat` copies its
    // stdin pipe to its stdout pipe.
    let v = &vectors()[0];
    let bytes = v.bytes();
    let mut child = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cat runs");
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        for chunk in bytes.chunks(777) {
            stdin.write_all(chunk).unwrap();
        }
    });
    let report = verify(child.stdout.take().unwrap(), VerifyOptions::default()).unwrap();
    feeder.join().unwrap();
    assert!(child.wait().unwrap().success());
    assert!(report.is_ok());
}

#[test]
fn extents_hand_out_clusters_without_copies() {
    let v = &vectors()[0];
    let bytes = v.bytes();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let mut clusters = 0;
    let mut image = vec![0u8; 5255680];
    while let Some(e) = r.next_extent().unwrap() {
        for c in e.clusters() {
            // The slice is a view into the extent data.
            let data = e.data();
            assert!(std::ptr::eq(
                c.data.as_ptr(),
                data[c.data_offset()..].as_ptr()
            ));
            if c.device.get() == 1 {
                for (j, block) in c.blocks() {
                    let at = c.device_offset() as usize + j * 4096;
                    image[at..at + block.len()].copy_from_slice(block);
                }
            }
            clusters += 1;
        }
    }
    assert!(r.is_finished());
    assert!(r.next_extent().unwrap().is_none());
    assert_eq!(clusters, 81 + 35);
    assert_eq!(
        sha256_hex(&image),
        v.file("disk-drive-scsi0.raw").unwrap().sha256
    );
}

#[test]
fn only_selected_devices_are_written_but_all_are_checked() {
    let v = &vectors()[0];
    let s = Scratch::new();
    let report = Extractor::new(s.out())
        .devices(["drive-virtio1"])
        .configs(false)
        .extract(&v.bytes()[..])
        .unwrap();
    assert_eq!(common::tree(&s.out()), ["disk-drive-virtio1.raw"]);
    assert_eq!(report.verify.devices.len(), 2);
    let f = v.file("disk-drive-virtio1.raw").unwrap();
    assert_eq!(
        sha256_file(&s.out().join("disk-drive-virtio1.raw")),
        f.sha256
    );

    // Damage in the device not written still fails the extraction.
    let mut bytes = v.bytes();
    let (off, slot, _) = common::first_slot(&bytes, 1, 3);
    common::patch_extent(&mut bytes, off, |e| e.blockinfo[slot].cluster = 0);
    let s = Scratch::new();
    let err = Extractor::new(s.out())
        .devices(["drive-virtio1"])
        .extract(&bytes[..])
        .unwrap_err();
    assert!(err.is_damage(), "{err}");
    s.assert_untouched();

    let s = Scratch::new();
    let err = Extractor::new(s.out())
        .devices(["nope"])
        .extract(&v.bytes()[..])
        .unwrap_err();
    assert_eq!(err.kind(), vma_reader::ErrorKind::Usage);
    s.assert_untouched();
}

#[test]
fn existing_targets_are_written_in_place() {
    let v = &vectors()[0];
    let expected = v.file("disk-drive-scsi0.raw").unwrap();
    for assume_zeroed in [false, true] {
        let s = Scratch::new();
        let target = s.root.path().join("target.img");
        // A target full of garbage, larger than the device.
        std::fs::write(&target, vec![0xeeu8; expected.size as usize + 8192]).unwrap();
        let report = Extractor::new(s.out())
            .devices(Vec::<String>::new())
            .configs(false)
            .target("drive-scsi0", &target)
            .zeroing(if assume_zeroed {
                Zeroing::AssumeZeroed
            } else {
                Zeroing::WriteZeros
            })
            .extract(&v.bytes()[..])
            .unwrap();
        assert_eq!(report.files.len(), 1);
        assert!(report.files[0].in_place);
        let bytes = std::fs::read(&target).unwrap();
        let device = &bytes[..expected.size as usize];
        assert!(
            bytes[expected.size as usize..].iter().all(|&b| b == 0xee),
            "nothing past the device"
        );
        if assume_zeroed {
            // Holes were left alone: the garbage shows through.
            assert_ne!(sha256_hex(device), expected.sha256);
            assert!(device.contains(&0xee));
        } else {
            assert_eq!(sha256_hex(device), expected.sha256);
        }
        assert!(common::tree(&s.out()).is_empty(), "nothing in the folder");
    }
    // A zeroed target with assume_zeroed gets exactly the device, with fewer writes.
    let s = Scratch::new();
    let target = s.root.path().join("zero.img");
    std::fs::write(&target, vec![0u8; expected.size as usize]).unwrap();
    let lazy = Extractor::new(s.out())
        .devices(Vec::<String>::new())
        .configs(false)
        .target("drive-scsi0", &target)
        .zeroing(Zeroing::AssumeZeroed)
        .extract(&v.bytes()[..])
        .unwrap();
    assert_eq!(sha256_file(&target), expected.sha256);
    assert!(lazy.files[0].bytes_written < expected.size);

    // A shorter target file is extended to the device size.
    let short = s.root.path().join("short.img");
    std::fs::write(&short, b"x").unwrap();
    Extractor::new(s.out())
        .devices(Vec::<String>::new())
        .configs(false)
        .target("drive-scsi0", &short)
        .extract(&v.bytes()[..])
        .unwrap();
    assert_eq!(sha256_file(&short), expected.sha256);
}

#[test]
fn fresh_files_are_sparse() {
    // vec2's drive-scsi1 is 256 KiB of zeros: not a byte written, no block allocated.
    let v = &vectors()[1];
    let s = Scratch::new();
    let report = Extractor::new(s.out()).extract(&v.bytes()[..]).unwrap();
    let scsi1 = report
        .files
        .iter()
        .find(|f| f.name == "drive-scsi1")
        .unwrap();
    assert_eq!(scsi1.bytes_written, 0);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&scsi1.path).unwrap();
    assert_eq!(meta.len(), 262144);
    assert_eq!(meta.blocks(), 0, "no data blocks allocated");
}

#[test]
fn existing_outputs_are_not_overwritten_unless_asked() {
    let v = &vectors()[2];
    let s = Scratch::new();
    std::fs::write(s.out().join("qemu-server.conf"), b"mine").unwrap();
    let err = Extractor::new(s.out()).extract(&v.bytes()[..]).unwrap_err();
    assert!(matches!(err, vma_reader::Error::OutputExists(_)), "{err}");
    assert_eq!(
        std::fs::read(s.out().join("qemu-server.conf")).unwrap(),
        b"mine"
    );
    assert_eq!(common::tree(&s.out()), ["qemu-server.conf"]);
    Extractor::new(s.out())
        .overwrite(true)
        .sync(true)
        .extract(&v.bytes()[..])
        .unwrap();
    v.assert_extracted(&s.out());
}
