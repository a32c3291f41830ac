//! The extent index: a seekable reader opens an archive vma-rs wrote in a constant number
//! of reads, checks the copies as a scan checks headers, and the streaming reader checks
//! the copies against the headers it reads.

mod common;

use std::io::Write;

use common::{extents, patch_extent, CountingReadAt};
use vma_format::extent_index::{self, IndexExtent, IndexKind};
use vma_format::integrity::SealHasher;
use vma_format::{ArchiveHeader, ExtentHeader, Uuid, VMA_CLUSTER_SIZE, VMA_EXTENT_HEADER_SIZE};
use vma_reader::{verify, Error, ExtentIndexStatus, SealStatus, SeekableArchive, VerifyOptions};
use vma_writer::{Builder, ZstdOptions, ZstdWriter};

const H: usize = VMA_EXTENT_HEADER_SIZE;
const PER_EXTENT: u64 = 58;

/// An archive of one disk whose clusters make `n` data extents, each storing one cluster
/// and otherwise zero clusters (no data, fast to write); the last cluster partial.
fn archive(n: u64, index: bool) -> Vec<u8> {
    let mut builder = Builder::new();
    builder.extent_index(index);
    let cluster = VMA_CLUSTER_SIZE as u64;
    let size = n * PER_EXTENT * cluster - 1000;
    let dev = builder.add_device("drive-scsi0", size).unwrap();
    let w = builder.build(Vec::new()).unwrap();
    for k in 0..n {
        let start = k * PER_EXTENT * cluster;
        // One stored cluster (more than the scanner's window: a scan reads each header
        // alone), the others zero (not stored).
        let first: Vec<u8> = (0..cluster).map(|i| (i * 7 + k) as u8 | 1).collect();
        w.write_range(dev, start, &first).unwrap();
        let end = ((k + 1) * PER_EXTENT * cluster).min(size);
        w.write_zero_range(dev, start + cluster, end - start - cluster)
            .unwrap();
    }
    let (summary, bytes) = w.finish().unwrap();
    assert_eq!(summary.extents, n);
    let t = if index {
        extent_index::extents_for(n)
    } else {
        0
    };
    assert_eq!(summary.index_extents, t);
    bytes
}

/// Index extents of an archive with an index and where the first one is.
fn index_of(bytes: &[u8]) -> (u64, usize) {
    let last = ExtentHeader::decode(&bytes[bytes.len() - 2 * H..]).unwrap();
    let total = match IndexExtent::from_extent(&last) {
        IndexKind::Index(x) => x.total as u64,
        other => panic!("{other:?}"),
    };
    (total, bytes.len() - H - total as usize * H)
}

fn open_counted(bytes: &[u8]) -> (vma_reader::Result<SeekableArchive>, usize) {
    let source = CountingReadAt::new(bytes.to_vec());
    let opened = SeekableArchive::from_read_at(source.clone());
    (opened, source.reads())
}

/// The first bytes of each stored cluster, as a reader sees them.
fn sample(vma: &SeekableArchive, n: u64) -> Vec<Vec<u8>> {
    let dev = vma.device("drive-scsi0").unwrap();
    [
        0,
        n / 2 * PER_EXTENT,
        (n - 1) * PER_EXTENT,
        1,
        n * PER_EXTENT - 1,
    ]
    .iter()
    .map(|&c| {
        let mut buf = vec![0u8; 600];
        dev.read_at(&mut buf, c * VMA_CLUSTER_SIZE as u64).unwrap();
        buf
    })
    .collect()
}

#[test]
fn opening_takes_the_same_few_reads_whatever_the_number_of_extents() {
    for n in [1u64, 10, 2000] {
        let with = archive(n, true);
        let without = archive(n, false);
        let (a, reads_with) = open_counted(&with);
        let a = a.unwrap();
        let (b, reads_without) = open_counted(&without);
        let b = b.unwrap();
        eprintln!("{n} data extents: {reads_with} reads with the index, {reads_without} without");
        assert!(reads_with <= 4, "{n} extents: {reads_with} reads");
        assert!(
            reads_without as u64 >= n,
            "{n} extents: {reads_without} reads"
        );
        let (total, _) = index_of(&with);
        assert_eq!(
            a.integrity().extent_index,
            ExtentIndexStatus::Opened { extents: total }
        );
        assert_eq!(a.integrity().seal, SealStatus::Sealed);
        assert_eq!(a.integrity().total_extents, n);
        assert_eq!(a.integrity().checksummed_extents, n);
        assert_eq!(b.integrity().extent_index, ExtentIndexStatus::Absent);
        assert_eq!(b.integrity().seal, SealStatus::Sealed);
        assert_eq!(sample(&a, n), sample(&b, n));
        assert_eq!(a.index_memory(), b.index_memory());
        // A scan of the same archive (the streaming reader) checks the copies.
        let report = verify(&with[..], VerifyOptions::default()).unwrap();
        assert_eq!(
            report.integrity.extent_index,
            ExtentIndexStatus::Consistent { extents: total }
        );
        assert_eq!(report.integrity.seal, SealStatus::Sealed);
        assert_eq!(report.integrity.total_extents, n);
        assert!(
            report.integrity.is_fully_verified(),
            "{:?}",
            report.integrity
        );
        // And so does verify through the opened archive, which reads it all.
        let full = verify(&a, VerifyOptions::default()).unwrap();
        assert_eq!(full.integrity.extent_index, report.integrity.extent_index);
    }
}

#[test]
fn a_seekable_zstd_archive_opens_through_its_index_from_its_last_frames() {
    let plain = archive(2000, true);
    let plain_without = archive(2000, false);
    let zst = |plain: &[u8]| {
        let options = ZstdOptions {
            frame_size: 256 << 10,
            ..ZstdOptions::default()
        };
        let mut w = ZstdWriter::new(Vec::new(), options).unwrap();
        w.write_all(plain).unwrap();
        w.finish().unwrap().0
    };
    let (a, reads_with) = open_counted(&zst(&plain));
    let (b, reads_without) = open_counted(&zst(&plain_without));
    let (a, b) = (a.unwrap(), b.unwrap());
    eprintln!(
        "zstd, 2000 data extents: {reads_with} reads with the index, {reads_without} without"
    );
    assert!(matches!(
        a.integrity().extent_index,
        ExtentIndexStatus::Opened { .. }
    ));
    assert_eq!(a.integrity().seal, SealStatus::Sealed);
    assert_eq!(sample(&a, 2000), sample(&b, 2000));
    // The footer and table, the first frame (the header), and the frames the index is in
    // (2000 x 646 bytes in 256 KiB frames: 5 or 6), against every frame (9 MiB: 36).
    assert!(reads_with <= 12, "{reads_with} reads");
    assert!(reads_without > 3 * reads_with, "{reads_without} reads");
}

#[test]
fn a_copy_altered_with_its_index_extent_md5_is_an_error_at_open() {
    let mut bytes = archive(10, true);
    let (_, start) = index_of(&bytes);
    // Slot 3 of the first index extent holds bytes 14..21 of the payload: the first
    // copy's bytes 6..13 (block_count and uuid).
    patch_extent(&mut bytes, start, |e| e.blockinfo[3].cluster ^= 0x0100);
    let (opened, _) = open_counted(&bytes);
    let err = opened.unwrap_err();
    assert!(
        matches!(err, Error::IndexCopy { offset, copy: 0, .. } if offset == start as u64),
        "{err}"
    );
    // Without the MD5 fixed up, the index extent itself is damaged.
    let mut bytes = archive(10, true);
    bytes[start + 40 + 3 * 8 + 7] ^= 1;
    let err = open_counted(&bytes).0.unwrap_err();
    assert!(
        matches!(err, Error::Extent { offset, .. } if offset == start as u64),
        "{err}"
    );
    // The streaming reader meets it as a damaged extent too.
    assert!(matches!(
        verify(&bytes[..], VerifyOptions::default()).unwrap_err(),
        Error::Extent { offset, .. } if offset == start as u64
    ));
}

#[test]
fn an_altered_copy_with_a_valid_md5_fails_the_seal_at_open() {
    let mut bytes = archive(10, true);
    let (_, start) = index_of(&bytes);
    // The data checksum entry of copy 3, re-encoded with a valid MD5.
    alter_copy(&mut bytes, 3);
    let err = open_counted(&bytes).0.unwrap_err();
    assert!(matches!(err, Error::SealMismatch { .. }), "{err}");
    // The streaming reader sees both: the copies differ, and so does the seal.
    let report = verify(&bytes[..], VerifyOptions::default()).unwrap();
    assert!(
        matches!(&report.integrity.extent_index, ExtentIndexStatus::Mismatch { offset, reason }
            if *offset == start as u64 && reason.contains("differ")),
        "{:?}",
        report.integrity.extent_index
    );
    assert!(matches!(report.integrity.seal, SealStatus::Mismatch { .. }));
    assert!(!report.is_ok());
}

/// The copies the archive's index holds.
fn copies_of(bytes: &[u8]) -> Vec<[u8; 512]> {
    let (total, start) = index_of(bytes);
    let x: Vec<IndexExtent> = (0..total as usize)
        .map(|i| {
            match IndexExtent::from_extent(&ExtentHeader::decode(&bytes[start + i * H..]).unwrap())
            {
                IndexKind::Index(x) => *x,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    extent_index::decode(&x).unwrap()
}

/// Flips a cluster number in the data checksum entry of the index's copy `n`, re-encodes
/// the copy (a valid MD5) and writes the index back in place; the copies now held, and
/// the archive's uuid.
fn alter_copy(bytes: &mut [u8], n: usize) -> (Vec<[u8; 512]>, Uuid) {
    let (total, start) = index_of(bytes);
    let mut copies = copies_of(bytes);
    let mut e = ExtentHeader::decode(&copies[n]).unwrap();
    e.blockinfo[vma_format::integrity::CHECKSUM_SLOT].cluster ^= 1;
    copies[n] = e.encode();
    let index = extent_index::encode(e.uuid, &copies).unwrap();
    assert_eq!(index.len() as u64, total);
    for (i, x) in index.iter().enumerate() {
        bytes[start + i * H..start + (i + 1) * H].copy_from_slice(x);
    }
    (copies, e.uuid)
}

/// Rewrites the seal of `bytes` (the last 512) to hold for what precedes it.
fn reseal(bytes: &mut [u8]) {
    let header = ArchiveHeader::decode(bytes).unwrap();
    let header_size = ArchiveHeader::header_size_from_prefix(bytes).unwrap();
    let mut hasher = SealHasher::new(&bytes[..header_size]);
    let all = extents(bytes);
    for (off, _) in &all[..all.len() - 1] {
        hasher.extent(&bytes[*off..*off + H]);
    }
    let n = bytes.len();
    bytes[n - H..].copy_from_slice(&hasher.seal().to_extent(header.uuid).encode());
}

/// The trust limit: copies that differ from the headers, under a seal computed over the
/// copies, open (the seal holds for what opening hashes); the streaming reader, reading
/// the real headers, reports both the copies and the seal.
#[test]
fn copies_that_differ_from_the_headers_under_a_good_seal_are_found_by_verify() {
    let mut bytes = archive(10, true);
    let (_, start) = index_of(&bytes);
    let (copies, uuid) = alter_copy(&mut bytes, 4);
    // A seal computed over the copies in the place of the headers, as whoever rewrites
    // an archive can make one (a seal is not a signature).
    let header_size = ArchiveHeader::header_size_from_prefix(&bytes).unwrap();
    let mut hasher = SealHasher::new(&bytes[..header_size]);
    for c in &copies {
        hasher.extent(c);
    }
    let n = bytes.len();
    for x in bytes[start..n - H].chunks(H) {
        hasher.extent(x);
    }
    let seal = hasher.seal().to_extent(uuid).encode();
    bytes[n - H..].copy_from_slice(&seal);
    let vma = open_counted(&bytes).0.unwrap();
    assert!(matches!(
        vma.integrity().extent_index,
        ExtentIndexStatus::Opened { .. }
    ));
    assert_eq!(vma.integrity().seal, SealStatus::Sealed);
    let report = verify(&vma, VerifyOptions::default()).unwrap();
    assert!(
        matches!(&report.integrity.extent_index, ExtentIndexStatus::Mismatch { reason, .. }
            if reason.contains("copies differ")),
        "{:?}",
        report.integrity.extent_index
    );
    assert!(matches!(report.integrity.seal, SealStatus::Mismatch { .. }));
    assert!(!report.is_ok());
    assert!(!report.integrity.is_ok());
    // Stopping at damage, it is an error.
    let err = verify(
        &bytes[..],
        VerifyOptions::default().on_damage(vma_reader::OnDamage::Fail),
    )
    .unwrap_err();
    assert!(matches!(err, Error::ExtentIndexMismatch { .. }), "{err}");
}

#[test]
fn without_its_index_extents_an_archive_is_scanned() {
    let with = archive(10, true);
    let (_, start) = index_of(&with);
    let mut bytes = with[..start].to_vec();
    bytes.extend_from_slice(&with[with.len() - H..]);
    reseal(&mut bytes);
    let (vma, reads) = open_counted(&bytes);
    let vma = vma.unwrap();
    assert!(reads >= 10, "{reads} reads: scanned");
    assert_eq!(vma.integrity().extent_index, ExtentIndexStatus::Absent);
    assert_eq!(vma.integrity().seal, SealStatus::Sealed);
    // Not resealed: the tail has no index, the scan reports the seal as it is.
    let mut cut = with[..start].to_vec();
    cut.extend_from_slice(&with[with.len() - H..]);
    let vma = open_counted(&cut).0.unwrap();
    assert!(matches!(vma.integrity().seal, SealStatus::Mismatch { .. }));
    // Without a seal, index extents and all: an unsealed archive, scanned; the index is
    // checked like any other extents.
    let unsealed = &with[..with.len() - H];
    let (vma, reads) = open_counted(unsealed);
    let vma = vma.unwrap();
    assert!(reads >= 10, "{reads}");
    assert_eq!(vma.integrity().seal, SealStatus::Unsealed);
    assert!(matches!(
        vma.integrity().extent_index,
        ExtentIndexStatus::Consistent { .. }
    ));
}

#[test]
fn a_truncated_index_is_an_error_at_open() {
    let with = archive(10, true);
    let (total, start) = index_of(&with);
    // The first index extent gone, the seal redone: the last one still says `total`.
    let mut bytes = with[..start].to_vec();
    bytes.extend_from_slice(&with[start + H..]);
    reseal(&mut bytes);
    let err = open_counted(&bytes).0.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ExtentIndexLayout { .. } | Error::ExtentIndex { .. } | Error::Extent { .. }
        ),
        "{err}"
    );
    // Every index extent saying one more than there are.
    let mut bytes = with.clone();
    for i in 0..total as usize {
        patch_extent(&mut bytes, start + i * H, |e| e.blockinfo[0].cluster += 1);
    }
    reseal(&mut bytes);
    let err = open_counted(&bytes).0.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ExtentIndexLayout { .. } | Error::ExtentIndex { .. } | Error::Extent { .. }
        ),
        "{err}"
    );
    // The streaming reader reports the same index as not decoding.
    let report = verify(&bytes[..], VerifyOptions::default()).unwrap();
    assert!(
        matches!(
            report.integrity.extent_index,
            ExtentIndexStatus::Mismatch { .. }
        ),
        "{:?}",
        report.integrity.extent_index
    );
}

#[test]
fn a_data_extent_after_the_index_is_an_error() {
    let with = archive(10, true);
    let (total, start) = index_of(&with);
    // The last data extent, data and all, moved after the index.
    let (off, e) = extents(&with)
        .into_iter()
        .rfind(|(off, _)| *off < start)
        .unwrap();
    let len = e.extent_len();
    assert_eq!(off + len, start);
    let mut bytes = with[..off].to_vec();
    bytes.extend_from_slice(&with[start..with.len() - H]);
    bytes.extend_from_slice(&with[off..start]);
    bytes.extend_from_slice(&with[with.len() - H..]);
    let at = (off + total as usize * H) as u64;
    let err = verify(&bytes[..], VerifyOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::DataAfterIndex { offset } if offset == at),
        "{err}"
    );
    // Opening: the extent before the seal is not an index extent, so it is scanned, and
    // the scan finds the same.
    let err = open_counted(&bytes).0.unwrap_err();
    assert!(
        matches!(err, Error::DataAfterIndex { offset } if offset == at),
        "{err}"
    );
}
