//! The integrity extension: per-extent CRC32C and the seal.

mod common;

use common::{extents, extract_refused, mixed_image, patch_extent, Builder, Scratch};
use vma_format::integrity::{Seal, CHECKSUM_SLOT, CHECKSUM_TAG, SEAL_TAG};
use vma_format::{BlockMask, VMA_EXTENT_HEADER_SIZE};
use vma_reader::{
    verify, ClusterAddress, Error, ErrorKind, ExtentChecksum, Extractor, OnDamage, SealStatus,
    SeekableArchive, StreamReader, VerifyOptions,
};

const A: usize = 3_000_000; // not a multiple of 64 KiB
const B: usize = 700_000;

fn images() -> (Vec<u8>, Vec<u8>) {
    (mixed_image(A, 1), mixed_image(B, 2))
}

fn sealed() -> Vec<u8> {
    let (a, b) = images();
    let mut builder = Builder::new(&[("drive-a", A as u64), ("drive-b", B as u64)], &[])
        .checksums(true)
        .per_extent(7);
    builder.device(1, &a);
    builder.device(2, &b);
    builder.finish_sealed()
}

fn open(bytes: &[u8]) -> (tempfile::NamedTempFile, vma_reader::Result<SeekableArchive>) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    let vma = SeekableArchive::open(file.path());
    (file, vma)
}

/// Flips a bit in the data of extent `k`; returns its offset and device clusters.
fn damage(bytes: &mut [u8], k: usize) -> (u64, Vec<ClusterAddress>) {
    let (off, e) = extents(bytes).swap_remove(k);
    assert!(e.data_len() > 0);
    bytes[off + VMA_EXTENT_HEADER_SIZE + e.data_len() / 2] ^= 0x04;
    let clusters = e
        .clusters()
        .map(|s| ClusterAddress {
            device: s.device,
            cluster: s.cluster,
        })
        .collect();
    (off as u64, clusters)
}

#[test]
fn a_checksummed_sealed_archive_verifies_sealed() {
    let bytes = sealed();
    let total = extents(&bytes).len() as u64 - 1;
    let report = verify(&bytes[..], VerifyOptions::default()).unwrap();
    assert_eq!(report.integrity.seal, SealStatus::Sealed);
    assert_eq!(report.integrity.total_extents, total);
    assert_eq!(report.integrity.checksummed_extents, total);
    assert!(report.integrity.is_fully_verified() && report.is_ok());

    let mut r = StreamReader::new(&bytes[..]).unwrap();
    while let Some(e) = r.next_extent().unwrap() {
        assert_eq!(e.checksum(), ExtentChecksum::Verified);
    }

    let (_f, vma) = open(&bytes);
    let vma = vma.unwrap();
    assert_eq!(
        vma.integrity().seal,
        SealStatus::Sealed,
        "checked from the headers alone"
    );
    assert_eq!(vma.integrity().checksummed_extents, total);
    let full = verify(&vma, VerifyOptions::default()).unwrap();
    assert_eq!(full.integrity.seal, SealStatus::Sealed);
    assert!(full.integrity.is_fully_verified());

    let (a, b) = images();
    let s = Scratch::new();
    let report = Extractor::new(s.out()).extract(&bytes[..]).unwrap();
    assert_eq!(report.verify.integrity.seal, SealStatus::Sealed);
    assert_eq!(std::fs::read(s.out().join("disk-drive-a.raw")).unwrap(), a);
    assert_eq!(std::fs::read(s.out().join("disk-drive-b.raw")).unwrap(), b);
    let s = Scratch::new();
    let report = Extractor::new(s.out())
        .verify_seal(false)
        .extract(&bytes[..])
        .unwrap();
    assert_eq!(report.verify.integrity.seal, SealStatus::NotVerified);
}

#[test]
fn a_flipped_data_bit_names_the_extent_and_its_clusters() {
    let mut bytes = sealed();
    let k = 3;
    let (off, clusters) = damage(&mut bytes, k);

    let report = verify(&bytes[..], VerifyOptions::default()).unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.integrity.damaged.len(), 1);
    let d = &report.integrity.damaged[0];
    assert_eq!((d.index, d.offset), (k as u64, off));
    assert_eq!(d.clusters, clusters);
    assert_ne!(d.stored, d.computed);
    // The headers are intact, so is the seal: the CRC32C is what catches data damage.
    assert_eq!(report.integrity.seal, SealStatus::Sealed);

    let err = verify(&bytes[..], VerifyOptions::new().on_damage(OnDamage::Fail)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Damaged);
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("extent {k} at byte {off}: data CRC32C mismatch")),
        "{msg}"
    );
    assert!(msg.contains("drive-a clusters 21-27"), "{msg}");

    let (_f, vma) = open(&bytes);
    let vma = vma.expect("headers are fine");
    let full = verify(&vma, VerifyOptions::default()).unwrap();
    assert_eq!(full.integrity.damaged, report.integrity.damaged);
}

#[test]
fn extraction_refuses_damage_unless_told_to_continue() {
    let mut bytes = sealed();
    let (_, clusters) = damage(&mut bytes, 3);
    let err = extract_refused(&bytes[..]);
    assert!(matches!(err, Error::DataChecksum { index: 3, .. }), "{err}");

    let s = Scratch::new();
    let report = Extractor::new(s.out())
        .on_damage(OnDamage::Report)
        .extract(&bytes[..])
        .unwrap();
    assert_eq!(report.damaged.len(), 1);
    let r = &report.damaged[0];
    assert_eq!(r.name, "drive-a");
    let first = clusters.first().unwrap().cluster as u64;
    let last = clusters.last().unwrap().cluster as u64;
    assert_eq!(r.range, first * 65536..(last + 1) * 65536);
    assert_eq!(report.verify.integrity.seal, SealStatus::Sealed);
    // Everything outside the range is intact.
    let (a, _) = images();
    let got = std::fs::read(s.out().join("disk-drive-a.raw")).unwrap();
    assert_eq!(got.len(), A);
    let (s0, e0) = (r.range.start as usize, r.range.end as usize);
    assert_eq!(got[..s0], a[..s0]);
    assert_eq!(got[e0..], a[e0..]);
    assert_ne!(got[s0..e0], a[s0..e0]);
}

/// Data altered together with its CRC32C (and the header's MD5, recomputed by
/// `patch_extent`) passes the extent's own checks; the seal, which hashed the original
/// header with its CRC32C, does not.
#[test]
fn data_rewritten_with_a_matching_checksum_breaks_the_seal() {
    let mut bytes = sealed();
    let (off, e) = extents(&bytes).swap_remove(2);
    let data = off + VMA_EXTENT_HEADER_SIZE..off + VMA_EXTENT_HEADER_SIZE + e.data_len();
    bytes[data.start + 100] ^= 0xff;
    let crc = vma_format::integrity::data_crc32c(&bytes[data]);
    patch_extent(&mut bytes, off, |e| assert!(e.set_data_checksum(crc)));

    let report = verify(&bytes[..], VerifyOptions::default()).unwrap();
    assert!(report.integrity.damaged.is_empty(), "the CRC32C matches");
    assert!(
        matches!(&report.integrity.seal, SealStatus::Mismatch { reason, .. }
            if reason.contains("SHA-256 of the headers")),
        "{:?}",
        report.integrity.seal
    );
    assert!(!report.is_ok());
    let (_f, vma) = open(&bytes);
    assert!(matches!(
        vma.unwrap().integrity().seal,
        SealStatus::Mismatch { .. }
    ));
}

#[test]
fn a_damaged_range_at_the_device_end_stops_at_the_end() {
    let (a, b) = images();
    let mut builder =
        Builder::new(&[("drive-a", A as u64), ("drive-b", B as u64)], &[]).checksums(true);
    builder.device(1, &a);
    builder.device(2, &b);
    let mut bytes = builder.finish();
    let n = extents(&bytes).len();
    damage(&mut bytes, n - 1);
    let s = Scratch::new();
    let report = Extractor::new(s.out())
        .on_damage(OnDamage::Report)
        .extract(&bytes[..])
        .unwrap();
    let last = report.damaged.last().unwrap();
    assert_eq!(last.name, "drive-b");
    assert_eq!(last.range.end, B as u64);
}

#[test]
fn a_cut_off_seal_leaves_an_unsealed_archive() {
    let bytes = sealed();
    let cut = &bytes[..bytes.len() - 512];
    let report = verify(cut, VerifyOptions::default()).unwrap();
    assert_eq!(report.integrity.seal, SealStatus::Unsealed);
    assert!(report.is_ok());
    let (_f, vma) = open(cut);
    assert_eq!(vma.unwrap().integrity().seal, SealStatus::Unsealed);
}

#[test]
fn nothing_may_follow_a_seal() {
    let sealed = sealed();
    let n = sealed.len() as u64;
    let mut trailing = sealed.clone();
    trailing.push(0);
    let mut twice = sealed.clone();
    twice.extend_from_slice(&sealed[sealed.len() - 512..]);
    for bytes in [trailing, twice] {
        let err = verify(&bytes[..], VerifyOptions::default()).unwrap_err();
        assert!(
            matches!(err, Error::DataAfterSeal { offset } if offset == n),
            "{err}"
        );
        extract_refused(&bytes[..]);
        let (_f, vma) = open(&bytes);
        assert!(matches!(vma.unwrap_err(), Error::DataAfterSeal { offset } if offset == n));
    }
}

#[test]
fn a_seal_counting_other_extents_is_a_mismatch() {
    let mut bytes = sealed();
    let (off, _) = *extents(&bytes).last().unwrap();
    let total = extents(&bytes).len() as u64 - 1;
    let uuid = vma_format::ArchiveHeader::decode(&bytes).unwrap().uuid;
    let seal = match Seal::from_extent(&vma_format::ExtentHeader::decode(&bytes[off..]).unwrap()) {
        vma_format::integrity::SealKind::Seal(s) => s,
        other => panic!("{other:?}"),
    };
    let wrong = Seal {
        extents: total + 1,
        ..seal
    };
    bytes[off..].copy_from_slice(&wrong.to_extent(uuid).encode());
    let report = verify(&bytes[..], VerifyOptions::default()).unwrap();
    assert!(
        matches!(report.integrity.seal, SealStatus::Mismatch { offset, .. } if offset == off as u64)
    );
    assert!(!report.is_ok());
    let (_f, vma) = open(&bytes);
    assert!(matches!(
        vma.unwrap().integrity().seal,
        SealStatus::Mismatch { .. }
    ));
    let err = extract_refused(&bytes[..]);
    assert!(matches!(err, Error::SealMismatch { .. }), "{err}");
}

#[test]
fn malformed_seals_are_errors_and_unknown_versions_are_reported() {
    let bytes = sealed();
    let (off, _) = *extents(&bytes).last().unwrap();

    let mut malformed = bytes.clone();
    patch_extent(&mut malformed, off, |e| e.blockinfo[0].cluster = 3);
    let err = verify(&malformed[..], VerifyOptions::default()).unwrap_err();
    assert!(matches!(err, Error::MalformedSeal { .. }), "{err}");
    assert!(err.is_damage());

    let mut unknown = bytes.clone();
    patch_extent(&mut unknown, off, |e| e.blockinfo[0].reserved = 9);
    let report = verify(&unknown[..], VerifyOptions::default()).unwrap();
    assert_eq!(report.integrity.seal, SealStatus::UnknownVersion(9));
    assert!(report.is_ok());
    let (_f, vma) = open(&unknown);
    assert_eq!(vma.unwrap().integrity().seal, SealStatus::UnknownVersion(9));

    // A checksum entry of an unknown version: unverifiable, not damage.
    let mut b = Builder::new(&[("d", 65536)], &[]);
    b.cluster(1, 0, &[1u8; 65536]);
    let mut plain = b.finish();
    let (first, _) = extents(&plain)[0];
    patch_extent(&mut plain, first, |e| {
        e.blockinfo[CHECKSUM_SLOT].mask = BlockMask::from_bits_retain(CHECKSUM_TAG);
        e.blockinfo[CHECKSUM_SLOT].reserved = 7;
    });
    let report = verify(&plain[..], VerifyOptions::default()).unwrap();
    assert_eq!(report.integrity.unverifiable_extents, 1);
    assert_eq!(report.integrity.checksummed_extents, 0);
    assert!(report.is_ok());
    let mut r = StreamReader::new(&plain[..]).unwrap();
    assert_eq!(
        r.next_extent().unwrap().unwrap().checksum(),
        ExtentChecksum::UnknownVersion(7)
    );
    let _ = SEAL_TAG;
}

#[test]
fn missing_clusters_before_a_seal_are_caught_at_the_seal() {
    let (a, _) = images();
    let mut b = Builder::new(&[("drive-a", A as u64)], &[]).checksums(true);
    for c in 0..10u32 {
        b.cluster(1, c, &a[c as usize * 65536..][..65536]);
    }
    let bytes = b.finish_sealed();
    let err = verify(&bytes[..], VerifyOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::MissingCluster { cluster: 10, .. }),
        "{err}"
    );
}
