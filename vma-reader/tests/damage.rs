//! Every check, fed a damaged archive: the right error, from the streaming reader, the
//! extractor and the seekable reader alike, and nothing left on disk.

mod common;

use common::{
    extents, extract_refused, first_slot, mask, patch_extent, patch_header, Builder, Scratch,
};
use md5::{Digest, Md5};
use vma_format::{BlockInfo, DeviceId, FormatError, VMA_EXTENT_HEADER_SIZE};
use vma_reader::{
    verify, Error, ErrorKind, Extractor, PrefetchingReader, SeekableArchive, StreamReader,
    VerifyOptions,
};
use vma_testkit::vectors;

fn vec1() -> Vec<u8> {
    vectors()[0].bytes()
}

/// Runs the archive through verify, extraction and the seekable reader; each must fail
/// with an error `check` accepts, of kind `kind`, leaving no file behind. Returns the
/// streaming error's message.
fn assert_fails(bytes: &[u8], kind: ErrorKind, check: impl Fn(&Error) -> bool) -> String {
    let streamed = verify(bytes, VerifyOptions::default()).expect_err("verify must fail");
    assert!(check(&streamed), "verify: unexpected error {streamed:?}");
    assert_eq!(streamed.kind(), kind, "{streamed}");
    let prefetched = PrefetchingReader::new(std::io::Cursor::new(bytes.to_vec()))
        .and_then(|r| verify(r, VerifyOptions::default()))
        .expect_err("prefetching verify must fail");
    assert_eq!(
        prefetched.to_string(),
        streamed.to_string(),
        "prefetching reader"
    );

    let extracted = extract_refused(bytes);
    assert!(check(&extracted), "extract: unexpected error {extracted:?}");

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    match SeekableArchive::open(file.path()) {
        Ok(_) => panic!("seekable open must fail"),
        Err(e) => {
            assert!(check(&e), "seekable: unexpected error {e:?}");
            assert_eq!(e.kind(), kind);
            // Both readers find the same damage at the same place.
            assert_eq!(e.to_string(), streamed.to_string());
        }
    }
    streamed.to_string()
}

fn md5_with_zeroed(bytes: &mut [u8], md5_at: usize, len: usize) {
    bytes[md5_at..md5_at + 16].fill(0);
    let sum = Md5::digest(&bytes[..len]);
    bytes[md5_at..md5_at + 16].copy_from_slice(&sum);
}

#[test]
fn bad_header_md5() {
    let mut bytes = vec1();
    bytes[100] ^= 1;
    let msg = assert_fails(&bytes, ErrorKind::Damaged, |e| {
        matches!(e, Error::Header(FormatError::HeaderChecksum { .. }))
    });
    assert!(msg.contains("byte 32"), "{msg}");
}

#[test]
fn nonzero_reserved_header_byte() {
    let mut bytes = vec1();
    bytes[100] = 7;
    md5_with_zeroed(&mut bytes, 32, 12800);
    let msg = assert_fails(&bytes, ErrorKind::Damaged, |e| {
        matches!(
            e,
            Error::HeaderReserved {
                offset: 100,
                value: 7
            }
        )
    });
    assert!(msg.contains("byte 100"), "{msg}");
}

#[test]
fn not_a_vma_and_short_headers() {
    assert_fails(&[0x42; 20000], ErrorKind::Damaged, |e| {
        matches!(e, Error::Header(FormatError::BadMagic { .. }))
    });
    // Too short to hold even the magic: "not a VMA archive", not "ends inside its header".
    assert_fails(b"", ErrorKind::Damaged, |e| {
        matches!(e, Error::NotAnArchive { len: 0 })
    });
    let bytes = vec1();
    assert_fails(&bytes[..12500], ErrorKind::Damaged, |e| {
        matches!(
            e,
            Error::TruncatedHeader {
                got: 12500,
                needed: 12800
            }
        )
    });
}

#[test]
fn bad_extent_md5() {
    let mut bytes = vec1();
    let (off, _) = extents(&bytes)[1];
    bytes[off + 100] ^= 0x10;
    let msg = assert_fails(
        &bytes,
        ErrorKind::Damaged,
        |e| matches!(e, Error::Extent { offset, source: FormatError::ExtentChecksum { .. } } if *offset == off as u64),
    );
    assert!(msg.starts_with(&format!("extent at byte {off}: ")), "{msg}");
}

#[test]
fn extent_fields_checked_by_the_format() {
    let (off, _) = extents(&vec1())[0];
    // block_count disagreeing with the masks.
    let mut bytes = vec1();
    patch_extent(&mut bytes, off, |e| e.block_count -= 1);
    assert_fails(&bytes, ErrorKind::Damaged, |e| {
        matches!(
            e,
            Error::Extent {
                source: FormatError::ExtentBlockCount { .. },
                ..
            }
        )
    });
    // The reserved field after the magic.
    let mut bytes = vec1();
    bytes[off + 5] = 1;
    let mut header = bytes[off..off + 512].to_vec();
    md5_with_zeroed(&mut header, 24, 512);
    bytes[off..off + 512].copy_from_slice(&header);
    assert_fails(&bytes, ErrorKind::Damaged, |e| {
        matches!(
            e,
            Error::Extent {
                source: FormatError::ExtentReserved(1),
                ..
            }
        )
    });
    // Magic.
    let mut bytes = vec1();
    bytes[off] = b'X';
    assert_fails(&bytes, ErrorKind::Damaged, |e| {
        matches!(
            e,
            Error::Extent {
                source: FormatError::ExtentBadMagic { .. },
                ..
            }
        )
    });
}

#[test]
fn wrong_uuid() {
    let mut bytes = vec1();
    let (off, _) = extents(&bytes)[1];
    patch_extent(&mut bytes, off, |e| {
        e.uuid = vma_format::Uuid::from_u128(99)
    });
    assert_fails(
        &bytes,
        ErrorKind::Damaged,
        |e| matches!(e, Error::ExtentUuid { offset, .. } if *offset == off as u64),
    );
}

#[test]
fn duplicate_cluster() {
    let mut bytes = vec1();
    let (_, _, first) = first_slot(&bytes, 1, 0);
    let (off, slot, _) = first_slot(&bytes, 1, 20);
    patch_extent(&mut bytes, off, |e| {
        e.blockinfo[slot].cluster = first.cluster
    });
    let msg = assert_fails(
        &bytes,
        ErrorKind::Damaged,
        |e| matches!(e, Error::DuplicateCluster { cluster, .. } if *cluster == first.cluster),
    );
    assert_eq!(
        msg,
        format!(
            "extent at byte {off}: duplicate cluster {} of device drive-scsi0",
            first.cluster
        )
    );
}

#[test]
fn slot_reserved_bits() {
    let mut bytes = vec1();
    let (off, slot, _) = first_slot(&bytes, 2, 0);
    patch_extent(&mut bytes, off, |e| e.blockinfo[slot].reserved = 0x80);
    assert_fails(&bytes, ErrorKind::Damaged, |e| {
        matches!(e, Error::SlotReserved { value: 0x80, .. })
    });
}

/// The first cluster of each device not stored in the first `keep` extents.
fn first_missing(bytes: &[u8], keep: usize) -> (String, u64) {
    let header = vma_format::ArchiveHeader::decode(bytes).unwrap();
    for d in &header.devices {
        let mut seen = vec![false; d.cluster_count() as usize];
        for (_, e) in extents(bytes).into_iter().take(keep) {
            for s in e.clusters().filter(|s| s.device == d.id) {
                seen[s.cluster as usize] = true;
            }
        }
        if let Some(c) = seen.iter().position(|&s| !s) {
            return (d.name.clone(), c as u64);
        }
    }
    panic!("nothing missing");
}

#[test]
fn cut_at_an_extent_boundary_names_the_first_missing_cluster() {
    let bytes = vec1();
    let (off, _) = extents(&bytes)[1];
    let cut = &bytes[..off];
    let (device, cluster) = first_missing(&bytes, 1);
    let msg = assert_fails(cut, ErrorKind::Damaged, |e| {
        matches!(e, Error::MissingCluster { device: d, cluster: c, offset }
            if *d == device && *c == cluster && *offset == off as u64)
    });
    assert_eq!(
        msg,
        format!("archive ends at byte {off}: cluster {cluster} of device {device} is missing")
    );
}

#[test]
fn cut_mid_extent() {
    let bytes = vec1();
    let (off, e) = extents(&bytes).swap_remove(1);
    // Inside the data.
    let cut = &bytes[..off + 1000];
    let msg = assert_fails(cut, ErrorKind::Damaged, |err| {
        matches!(err, Error::TruncatedExtent { offset, got: 1000, needed }
            if *offset == off as u64 && *needed == e.extent_len() as u64)
    });
    assert!(msg.contains("cut mid-extent"), "{msg}");
    // Inside the header.
    assert_fails(&bytes[..off + 100], ErrorKind::Damaged, |err| {
        matches!(
            err,
            Error::TruncatedExtent {
                got: 100,
                needed: 512,
                ..
            }
        )
    });
}

#[test]
fn cluster_past_the_device_end() {
    let mut bytes = vec1();
    let (off, slot, _) = first_slot(&bytes, 2, 5);
    patch_extent(&mut bytes, off, |e| e.blockinfo[slot].cluster = 35);
    let msg = assert_fails(&bytes, ErrorKind::Damaged, |e| {
        matches!(
            e,
            Error::ClusterPastEnd {
                cluster: 35,
                clusters: 35,
                ..
            }
        )
    });
    assert!(msg.contains("drive-virtio1"), "{msg}");
}

#[test]
fn mask_storing_blocks_past_the_device_end() {
    // A 5000-byte device: blocks 0 and 1 may be stored, not block 2.
    let mut b = Builder::new(&[("small", 5000)], &[]);
    let d = DeviceId::new(1).unwrap();
    b.raw(BlockInfo::new(d, 0, mask(0b111)), &[1u8; 3 * 4096]);
    let bytes = b.finish();
    assert_fails(&bytes, ErrorKind::Damaged, |e| {
        matches!(
            e,
            Error::MaskPastEnd {
                mask: 0b111,
                allowed: 0b11,
                ..
            }
        )
    });
    // The straddling block itself is fine, and only its first bytes count.
    let mut b = Builder::new(&[("small", 5000)], &[]);
    b.raw(BlockInfo::new(d, 0, mask(0b10)), &[7u8; 4096]);
    let bytes = b.finish();
    let s = Scratch::new();
    Extractor::new(s.out()).extract(&bytes[..]).unwrap();
    let img = std::fs::read(s.out().join("disk-small.raw")).unwrap();
    assert_eq!(img.len(), 5000);
    assert!(img[..4096].iter().all(|&x| x == 0) && img[4096..].iter().all(|&x| x == 7));
}

#[test]
fn undeclared_device() {
    let mut bytes = vec1();
    let (off, slot, _) = first_slot(&bytes, 1, 0);
    patch_extent(&mut bytes, off, |e| e.blockinfo[slot].dev_id = 9);
    let msg = assert_fails(&bytes, ErrorKind::Damaged, |e| {
        matches!(e, Error::UnknownDevice { dev_id: 9, .. })
    });
    assert!(msg.contains("undeclared device id 9"), "{msg}");
}

#[test]
fn vmstate_must_run_in_order_but_may_stop_early() {
    let size = 3 * 65536;
    let mut b = Builder::new(&[("vmstate", size), ("drive-a", 65536)], &[]);
    b.cluster(2, 0, &[1u8; 65536]);
    b.cluster(1, 0, &[2u8; 100]);
    b.cluster(1, 2, &[3u8; 100]);
    let bytes = b.finish();
    assert_fails(&bytes, ErrorKind::Damaged, |e| {
        matches!(
            e,
            Error::VmstateOrder {
                expected: 1,
                found: 2,
                ..
            }
        )
    });

    // Clusters 0 and 1 of 3: complete enough.
    let mut b = Builder::new(&[("vmstate", size), ("drive-a", 65536)], &[]);
    b.cluster(1, 0, &[2u8; 100]);
    b.cluster(2, 0, &[1u8; 65536]);
    b.cluster(1, 1, &[3u8; 65536]);
    let bytes = b.finish();
    let report = verify(&bytes[..], VerifyOptions::default()).unwrap();
    assert!(report.is_ok());
    let s = Scratch::new();
    Extractor::new(s.out()).extract(&bytes[..]).unwrap();
    let state = std::fs::read(s.out().join("vmstate.bin")).unwrap();
    assert_eq!(state.len() as u64, size);
    assert!(state[..100].iter().all(|&x| x == 2));
    assert!(state[100..65536].iter().all(|&x| x == 0));
    assert!(state[65536..131072].iter().all(|&x| x == 3));
    assert!(state[131072..].iter().all(|&x| x == 0));

    // Into an existing target, the part never stored is zeroed.
    let target = s.root.path().join("state.img");
    std::fs::write(&target, vec![0xffu8; size as usize]).unwrap();
    Extractor::new(s.out())
        .configs(false)
        .devices(Vec::<String>::new())
        .target("vmstate", &target)
        .extract(&bytes[..])
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), state);
}

#[test]
fn hostile_names_never_become_paths() {
    let img = vec![9u8; 4096];
    let archive = |devices: &[(&str, u64)], configs: &[(&str, &[u8])]| {
        let mut b = Builder::new(devices, configs);
        for i in 0..devices.len() {
            b.device(i as u8 + 1, &img);
        }
        b.finish()
    };
    let cases: Vec<Vec<u8>> = vec![
        archive(&[("ok", 4096)], &[("../../x", b"evil")]),
        archive(&[("ok", 4096)], &[("/etc/passwd", b"evil")]),
        archive(&[("ok", 4096)], &[("..", b"evil")]),
        archive(&[("a/b", 4096)], &[("qemu-server.conf", b"ok")]),
        archive(&[("..", 4096)], &[]),
        archive(&[(&"y".repeat(252), 4096)], &[]),
    ];
    for bytes in &cases {
        // Verification does not care about names.
        assert!(verify(&bytes[..], VerifyOptions::default())
            .unwrap()
            .is_ok());
        let err = extract_refused(&bytes[..]);
        assert_eq!(err.kind(), ErrorKind::UnsafeName, "{err}");
        assert!(matches!(err, Error::UnsafeName { .. }));
    }
    // A bad name of something not extracted does not matter.
    let s = Scratch::new();
    Extractor::new(s.out())
        .configs(false)
        .extract(&cases[0][..])
        .unwrap();
    assert_eq!(
        common::tree(s.root.path()),
        ["a/", "a/b/", "a/b/out/", "a/b/out/disk-ok.raw"]
    );
    let s = Scratch::new();
    Extractor::new(s.out())
        .devices(Vec::<String>::new())
        .extract(&cases[3][..])
        .unwrap();
    assert_eq!(common::tree(&s.out()), ["qemu-server.conf"]);

    // Two outputs with one name.
    let bytes = archive(&[("d", 4096)], &[("disk-d.raw", b"clash")]);
    let err = extract_refused(&bytes[..]);
    assert!(matches!(err, Error::NameCollision { .. }), "{err}");
}

#[test]
fn a_failed_reader_stays_failed() {
    let mut bytes = vec1();
    let (off, slot, _) = first_slot(&bytes, 1, 0);
    patch_extent(&mut bytes, off, |e| e.blockinfo[slot].dev_id = 9);
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    assert!(r.next_extent().unwrap_err().is_damage());
    assert!(matches!(r.next_extent(), Err(Error::Failed)));
}

#[test]
fn hostile_device_sizes_cost_no_memory() {
    // 254 devices of 256 TiB each, no data at all.
    let devices: Vec<(String, u64)> = (1..=254)
        .map(|i| (format!("d{i}"), vma_format::VMA_MAX_DEVICE_SIZE))
        .collect();
    let refs: Vec<(&str, u64)> = devices.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let mut b = Builder::new(&refs, &[]);
    // One extent with the last cluster of 58 devices.
    for dev in 1..=58u8 {
        b.raw(
            BlockInfo::new(DeviceId::new(dev).unwrap(), u32::MAX, mask(0)),
            &[],
        );
    }
    let bytes = b.finish();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    assert!(r.next_extent().unwrap().is_some());
    assert!(r.memory() < 64 * 1024, "{} bytes", r.memory());
    let err = r.next_extent().unwrap_err();
    assert!(
        matches!(err, Error::MissingCluster { cluster: 0, .. }),
        "{err}"
    );

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &bytes).unwrap();
    let err = SeekableArchive::open(file.path()).unwrap_err();
    assert!(matches!(err, Error::TooSmallForDevices { .. }), "{err}");
    assert!(err.is_damage());
}

#[test]
fn arbitrary_damage_never_panics() {
    // Every byte of the first extent header and some of the archive header, flipped,
    // with and without a fresh MD5: an error or a clean read, never a panic.
    let clean = vectors()[1].bytes();
    let (off, _) = extents(&clean)[0];
    for at in (0..VMA_EXTENT_HEADER_SIZE).step_by(3) {
        for fix_md5 in [false, true] {
            let mut bytes = clean.clone();
            bytes[off + at] ^= 0xa5;
            if fix_md5 {
                let mut h = bytes[off..off + 512].to_vec();
                md5_with_zeroed(&mut h, 24, 512);
                bytes[off..off + 512].copy_from_slice(&h);
            }
            let _ = verify(&bytes[..], VerifyOptions::default());
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), &bytes).unwrap();
            if let Ok(vma) = SeekableArchive::open(file.path()) {
                for d in vma.devices() {
                    let mut dev = vma.device(d.id).unwrap();
                    std::io::copy(&mut dev, &mut std::io::sink()).unwrap();
                }
            }
        }
    }
    // Device sizes rewritten in the header.
    for size in [1u64, 4095, 65536, 65537, 1 << 40] {
        let bytes = patch_header(&clean, |h| h.devices[0].size = size);
        let _ = verify(&bytes[..], VerifyOptions::default());
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Random byte changes and cuts anywhere: an error or a clean read, never a panic,
    /// and both readers agree on whether the archive is readable.
    #[test]
    fn random_mutations_never_panic(
        edits in proptest::collection::vec((0usize..218_112, proptest::prelude::any::<u8>()), 1..4),
        cut in 0usize..230_000,
    ) {
        let mut bytes = vectors()[1].bytes();
        for (at, v) in edits {
            bytes[at] = v;
        }
        bytes.truncate(cut);
        let streamed = verify(&bytes[..], VerifyOptions::default());
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &bytes).unwrap();
        let seekable = SeekableArchive::open(file.path());
        proptest::prop_assert_eq!(streamed.is_ok(), seekable.is_ok());
        if let (Err(a), Err(b)) = (&streamed, &seekable) {
            if !matches!(b, Error::TooSmallForDevices { .. }) {
                proptest::prop_assert_eq!(a.to_string(), b.to_string());
            }
        }
    }
}
