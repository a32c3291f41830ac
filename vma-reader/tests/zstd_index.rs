//! Random access into `.vma.zst` files as Proxmox writes them (`zstd --rsyncable -T1`,
//! one frame, through a pipe) with a sidecar index: the same bytes as the plain archive
//! at random offsets, several verified segments, and typed errors for every way an index
//! can lie or an archive can change under it.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{archive_of, assert_same_devices, mixed_image, write_file};
use vma_reader::zstd_index::{
    add_headers, build, ZstdIndex, ZstdIndexError, ENTRY_SIZE, MAX_SEGMENT, TRAILER_SIZE,
};
use vma_reader::{Error, ErrorKind, Packing, SeekableArchive};
use vma_testkit::{require_tool, Rng};

/// `plain` through `zstd -q -c ARGS` on a pipe, as vzdump compresses.
fn zstd(plain: &[u8], args: &[&str]) -> Vec<u8> {
    require_tool("zstd");
    let mut child = Command::new("zstd")
        .args(["-q", "-c"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = plain.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "zstd {args:?} failed");
    out.stdout
}

/// Compressible text-like data: words of a small vocabulary, chosen at random.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let words: Vec<Vec<u8>> = (0..512)
        .map(|i| format!("w{}x{} ", i * 7919 % 1000, i % 13).into_bytes())
        .collect();
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(&words[rng.below(words.len() as u64) as usize]);
        if rng.below(40) == 0 {
            let n = out.len();
            out.extend_from_slice(&(n as u64).to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// About 40 MiB of archive: 32 MiB of text and 8 MiB of mixed data.
fn big_archive() -> Vec<u8> {
    archive_of(&text(32 << 20, 1), &mixed_image(8 << 20, 2))
}

struct Indexed {
    _dir: tempfile::TempDir,
    plain: PathBuf,
    zst: PathBuf,
    idx: PathBuf,
}

fn indexed(plain: &[u8], args: &[&str]) -> (Indexed, vma_reader::zstd_index::BuildSummary) {
    let dir = tempfile::tempdir().unwrap();
    let zst_bytes = zstd(plain, args);
    let mut idx_bytes = Vec::new();
    let summary = build(&zst_bytes[..], &mut idx_bytes).unwrap();
    assert_eq!(summary.content_len, plain.len() as u64);
    assert_eq!(summary.compressed_len, zst_bytes.len() as u64);
    assert_eq!(summary.index_len, idx_bytes.len() as u64);
    let files = Indexed {
        plain: write_file(dir.path(), "a.vma", plain),
        zst: write_file(dir.path(), "a.vma.zst", &zst_bytes),
        idx: write_file(dir.path(), "a.vma.zst.idx", &idx_bytes),
        _dir: dir,
    };
    (files, summary)
}

fn open(f: &Indexed) -> Result<SeekableArchive, Error> {
    SeekableArchive::open_with_index(&f.zst, &f.idx)
}

#[test]
fn stock_rsyncable_zstd_reads_like_the_plain_archive() {
    let plain = big_archive();
    let (f, summary) = indexed(&plain, &["--rsyncable", "-T1", "-3"]);
    // 40 MiB in 8 MiB jobs: a segment per job, every one verified.
    assert!(summary.segments >= 4, "{summary:?}");
    assert!(summary
        .segment_lens
        .iter()
        .all(|&l| u64::from(l) <= MAX_SEGMENT));
    let packed = open(&f).unwrap();
    match packed.packing() {
        Packing::IndexedZstd {
            segments,
            compressed_len,
            index_len,
        } => {
            assert_eq!(segments, summary.segments);
            assert_eq!(compressed_len, summary.compressed_len);
            assert_eq!(index_len, summary.index_len);
        }
        other => panic!("{other:?}"),
    }
    let plain_archive = SeekableArchive::open(&f.plain).unwrap();
    assert_same_devices(&plain_archive, &packed, 7, 3 << 20);
    // The archive's bytes themselves, at random offsets across segment boundaries.
    let mut rng = Rng(11);
    let report = vma_reader::verify(&packed, vma_reader::VerifyOptions::default()).unwrap();
    assert!(report.is_ok(), "{report:?}");
    for _ in 0..20 {
        let d = &packed.devices()[rng.below(2) as usize];
        let r = packed.device(d.id).unwrap();
        let p = plain_archive.device(d.id).unwrap();
        let at = rng.below(d.size);
        let mut a = vec![0u8; 65536];
        let mut b = vec![0u8; 65536];
        let n = r.read_at(&mut a, at).unwrap();
        assert_eq!(n, p.read_at(&mut b, at).unwrap());
        assert!(a[..n] == b[..n]);
    }
}

#[test]
fn two_threads_and_the_plain_default_index_too() {
    let plain = big_archive();
    for args in [&["--rsyncable", "-T2", "-3"][..], &["-T2", "-1"][..]] {
        let (f, summary) = indexed(&plain, args);
        assert!(summary.segments >= 2, "{args:?}: {summary:?}");
        let plain_archive = SeekableArchive::open(&f.plain).unwrap();
        assert_same_devices(&plain_archive, &open(&f).unwrap(), 3, 1 << 20);
    }
}

#[test]
fn single_thread_output_without_restart_points_cannot_be_indexed() {
    // zstd --single-thread compresses in one job: a block starts with the repeat offsets
    // and entropy tables of the block before, so a fresh decoder cannot start there. On
    // periodic data every block starts with a repeat-offset match: no point verifies, and
    // more than MAX_SEGMENT of content without one is refused, saying why. Text and
    // archive data often do restart at a block with the whole window as prefix (verified,
    // so indexed, at a cost: spec/FORMAT.md).
    let period = common::noise(1000, 3);
    let plain: Vec<u8> = period
        .iter()
        .copied()
        .cycle()
        .take((MAX_SEGMENT + (4 << 20)) as usize)
        .collect();
    let zst = zstd(&plain, &["--single-thread", "-3"]);
    let err = build(&zst[..], &mut Vec::new()).unwrap_err();
    assert!(
        matches!(err, ZstdIndexError::CannotIndex { offset, .. } if offset < 64),
        "{err}"
    );
    assert!(err.is_usage());
    assert!(err.to_string().contains("zstd -d"), "{err}");
    // The same data compressed in jobs restarts at every job.
    let zst = zstd(&plain, &["--rsyncable", "-T1", "-3"]);
    let mut idx = Vec::new();
    let s = build(&zst[..], &mut idx).unwrap();
    assert!(s.segments >= 8, "{s:?}");
}

#[test]
fn concatenated_frames_and_skippable_frames_are_indexed() {
    let a = text(3 << 20, 4);
    let b = text(5 << 20, 5);
    let mut zst = zstd(&a, &["-T1", "-3"]);
    // A skippable frame between and after.
    for _ in 0..2 {
        zst.extend_from_slice(&[0x5e, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        zst.extend_from_slice(&zstd(&b, &["-T1", "-3"]));
    }
    zst.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 0, 0, 0, 0]);
    let mut idx = Vec::new();
    let summary = build(&zst[..], &mut idx).unwrap();
    assert_eq!(summary.frames, 3);
    assert_eq!(summary.content_len, (a.len() + 2 * b.len()) as u64);
    let tail: [u8; 4] = zst[zst.len() - 4..].try_into().unwrap();
    let index = ZstdIndex::from_bytes(&idx, zst.len() as u64, tail).unwrap();
    let mut all = a.clone();
    all.extend_from_slice(&b);
    all.extend_from_slice(&b);
    let dir = tempfile::tempdir().unwrap();
    let zpath = write_file(dir.path(), "x.zst", &zst);
    let ipath = write_file(dir.path(), "x.idx", &idx);
    let _ = (zpath, ipath);
    for n in 0..index.segments() {
        let s = *index.segment(n).unwrap();
        let c = &zst[s.compressed_offset as usize..][..s.compressed_len as usize];
        let p = &idx[s.prefix_offset as usize..][..s.prefix_stored_len as usize];
        let out = index.decode(n, c, p).unwrap();
        assert!(
            out[..] == all[s.offset as usize..][..s.len as usize],
            "segment {n}"
        );
    }
}

#[test]
fn rle_and_raw_blocks_of_a_sparse_archive() {
    // Mostly zeros and noise: RLE and raw blocks, restartable without a prefix.
    let plain = mixed_image(24 << 20, 9);
    let (f, _) = indexed(&plain, &["--rsyncable", "-T1", "-3"]);
    let index = ZstdIndex::from_file(
        &std::fs::File::open(&f.idx).unwrap(),
        &std::fs::File::open(&f.zst).unwrap(),
    )
    .unwrap();
    let zst = std::fs::read(&f.zst).unwrap();
    let idx = std::fs::read(&f.idx).unwrap();
    for n in 0..index.segments() {
        let s = *index.segment(n).unwrap();
        let c = &zst[s.compressed_offset as usize..][..s.compressed_len as usize];
        let p = &idx[s.prefix_offset as usize..][..s.prefix_stored_len as usize];
        assert!(index.decode(n, c, p).unwrap()[..] == plain[s.offset as usize..][..s.len as usize]);
    }
}

#[test]
fn stored_header_reads_open_without_decoding_and_read_the_same() {
    let plain = big_archive();
    let (f, summary) = indexed(&plain, &["--rsyncable", "-T1", "-3"]);
    let idx = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.idx)
        .unwrap();
    let len = add_headers(std::fs::File::open(&f.zst).unwrap(), &idx).unwrap();
    assert!(
        len > summary.index_len && len < summary.index_len + (64 << 10),
        "{len}"
    );
    drop(idx);
    let plain_archive = SeekableArchive::open(&f.plain).unwrap();
    assert_same_devices(&plain_archive, &open(&f).unwrap(), 5, 1 << 20);
    // Opening reads no segment now: a changed segment shows when its data is read.
    let index = ZstdIndex::from_file(
        &std::fs::File::open(&f.idx).unwrap(),
        &std::fs::File::open(&f.zst).unwrap(),
    )
    .unwrap();
    assert!(index.header_section().is_some());
    let s = *index.segment(2).unwrap();
    let mut zst = std::fs::read(&f.zst).unwrap();
    zst[s.compressed_offset as usize + 500] ^= 0x08;
    std::fs::write(&f.zst, &zst).unwrap();
    let archive = open(&f).unwrap();
    let mut sink = Vec::new();
    let e = archive
        .device("drive-scsi0")
        .unwrap()
        .read_to_end(&mut sink)
        .unwrap_err();
    let e = *e.into_inner().unwrap().downcast::<Error>().unwrap();
    assert!(
        matches!(
            e,
            Error::ZstdIndex(ZstdIndexError::Segment { segment: 2, .. })
        ),
        "{e}"
    );
    // A header section that lies about where it is: a typed error at the trailer.
    let idx = std::fs::read(&f.idx).unwrap();
    let t = idx.len() as u64 - TRAILER_SIZE;
    let bad = patched(&idx, |_, tr| {
        tr[44..52].copy_from_slice(&17u64.to_le_bytes())
    });
    let tail: [u8; 4] = zst[zst.len() - 4..].try_into().unwrap();
    let e = ZstdIndex::from_bytes(&bad, zst.len() as u64, tail).unwrap_err();
    assert_eq!(bad_index_at(e), t + 44);
}

// --- hostile -----------------------------------------------------------------------

/// A small indexed archive (12 MiB of text: two segments at least) in memory.
fn small() -> (Vec<u8>, Vec<u8>) {
    let plain = text(12 << 20, 8);
    let zst = zstd(&plain, &["--rsyncable", "-T1", "-3"]);
    let mut idx = Vec::new();
    let s = build(&zst[..], &mut idx).unwrap();
    assert!(s.segments >= 2, "{s:?}");
    (zst, idx)
}

fn parse(zst: &[u8], idx: &[u8]) -> Result<ZstdIndex, ZstdIndexError> {
    ZstdIndex::from_bytes(
        idx,
        zst.len() as u64,
        zst[zst.len() - 4..].try_into().unwrap(),
    )
}

/// The index with its table rewritten by `f` (entry bytes), CRCs fixed up so only the
/// lie is left.
fn patched(idx: &[u8], f: impl FnOnce(&mut [u8], &mut [u8])) -> Vec<u8> {
    let mut idx = idx.to_vec();
    let t = idx.len() - TRAILER_SIZE as usize;
    let table_offset = u64::from_le_bytes(idx[t + 32..t + 40].try_into().unwrap()) as usize;
    let (head, trailer) = idx.split_at_mut(t);
    f(&mut head[table_offset..], trailer);
    let table_crc = crc32c::crc32c(&head[table_offset..]);
    trailer[40..44].copy_from_slice(&table_crc.to_le_bytes());
    let crc = crc32c::crc32c(&trailer[..56]);
    trailer[56..60].copy_from_slice(&crc.to_le_bytes());
    idx
}

fn bad_index_at(e: ZstdIndexError) -> u64 {
    match e {
        ZstdIndexError::BadIndex { index_offset, .. } => index_offset,
        other => panic!("not a bad index: {other}"),
    }
}

#[test]
fn an_index_of_another_archive_or_a_changed_one_is_refused() {
    let (zst, idx) = small();
    let mut other = zst.clone();
    other.push(0);
    let e = parse(&other, &idx).unwrap_err();
    assert!(
        matches!(e, ZstdIndexError::OtherArchive { .. }) && e.is_usage(),
        "{e}"
    );
    let mut other = zst.clone();
    let n = other.len();
    other[n - 1] ^= 1;
    assert!(matches!(
        parse(&other, &idx),
        Err(ZstdIndexError::OtherArchive { .. })
    ));
    // Through the archive API: a usage error, which names vma index.
    let dir = tempfile::tempdir().unwrap();
    let z = write_file(dir.path(), "a.zst", &other);
    let i = write_file(dir.path(), "a.idx", &idx);
    let e = SeekableArchive::open_with_index(&z, &i).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage);
    assert!(e.to_string().contains("vma index"), "{e}");
}

#[test]
fn a_byte_changed_inside_a_segment_is_a_crc_error_with_its_offset() {
    let plain = big_archive();
    let (f, _) = indexed(&plain, &["--rsyncable", "-T1", "-3"]);
    let index = ZstdIndex::from_file(
        &std::fs::File::open(&f.idx).unwrap(),
        &std::fs::File::open(&f.zst).unwrap(),
    )
    .unwrap();
    let s = *index.segment(1).unwrap();
    let mut zst = std::fs::read(&f.zst).unwrap();
    zst[s.compressed_offset as usize + 1000] ^= 0x40;
    std::fs::write(&f.zst, &zst).unwrap();
    // Same length and last bytes: the index opens; reading that segment (while opening:
    // extent headers are in every segment) fails, typed.
    let e = match open(&f) {
        Err(e) => e,
        Ok(archive) => {
            let mut failed = None;
            for d in archive.devices() {
                let mut sink = Vec::new();
                if let Err(e) = archive.device(d.id).unwrap().read_to_end(&mut sink) {
                    failed = Some(e);
                }
            }
            let e = failed.expect("the changed segment is read");
            *e.into_inner()
                .expect("typed")
                .downcast::<Error>()
                .expect("typed")
        }
    };
    let inner = &e;
    match inner {
        Error::ZstdIndex(ZstdIndexError::Segment {
            segment,
            offset,
            what,
        }) => {
            assert_eq!((*segment, *offset), (1, s.compressed_offset));
            assert!(what.contains("CRC32C"), "{what}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(inner.kind(), ErrorKind::Damaged);
}

#[test]
fn truncated_indexes_are_refused() {
    let (zst, idx) = small();
    for len in [0, 10, 16, 79, idx.len() - 64, idx.len() - 1] {
        let e = parse(&zst, &idx[..len]).unwrap_err();
        assert!(matches!(e, ZstdIndexError::BadIndex { .. }), "{len}: {e}");
    }
    let mut bad = idx.clone();
    bad[0] ^= 1;
    assert_eq!(bad_index_at(parse(&zst, &bad).unwrap_err()), 0);
    let mut bad = idx.clone();
    let n = bad.len();
    bad[n - 20] ^= 1; // trailer CRC
    assert_eq!(
        bad_index_at(parse(&zst, &bad).unwrap_err()),
        n as u64 - 64 + 40 + 16
    );
    let mut bad = idx.clone();
    let t = n - 64;
    let table = u64::from_le_bytes(bad[t + 32..t + 40].try_into().unwrap()) as usize;
    bad[table + 5] ^= 1; // table CRC
    assert_eq!(bad_index_at(parse(&zst, &bad).unwrap_err()), t as u64 + 40);
}

#[test]
fn lying_tables_are_typed_errors_at_the_entry() {
    let (zst, idx) = small();
    let t = idx.len() as u64 - TRAILER_SIZE;
    let table = u64::from_le_bytes(idx[t as usize + 32..t as usize + 40].try_into().unwrap());
    let entry1 = table + ENTRY_SIZE;
    type Patch = Box<dyn Fn(&mut [u8], &mut [u8])>;
    let cases: Vec<(&str, Patch, u64)> = vec![
        (
            "compressed bytes past the end",
            Box::new(|tb, _| tb[48..56].copy_from_slice(&(u64::MAX / 2).to_le_bytes())),
            entry1,
        ),
        (
            "compressed length past the end",
            Box::new(|tb, _| tb[48 + 24..48 + 28].copy_from_slice(&u32::MAX.to_le_bytes())),
            entry1,
        ),
        (
            "non-ascending segments",
            Box::new(|tb, _| tb[48..56].copy_from_slice(&10u64.to_le_bytes())),
            entry1,
        ),
        (
            "content not contiguous",
            Box::new(|tb, _| {
                let v = u64::from_le_bytes(tb[56..64].try_into().unwrap()) + 1;
                tb[56..64].copy_from_slice(&v.to_le_bytes())
            }),
            entry1,
        ),
        (
            "a prefix past the table",
            Box::new(|tb, _| tb[48 + 16..48 + 24].copy_from_slice(&u64::MAX.to_le_bytes())),
            entry1,
        ),
        (
            "a huge prefix",
            Box::new(|tb, _| tb[48 + 32..48 + 36].copy_from_slice(&u32::MAX.to_le_bytes())),
            entry1,
        ),
        (
            "compressed bytes over the bound",
            Box::new(|tb, _| tb[48 + 24..48 + 28].copy_from_slice(&(200u32 << 20).to_le_bytes())),
            entry1,
        ),
        (
            "a segment over the bound",
            Box::new(|tb, _| tb[28..32].copy_from_slice(&u32::MAX.to_le_bytes())),
            table,
        ),
        (
            "a huge count",
            Box::new(|_, tr| tr[24..32].copy_from_slice(&(u64::MAX / 48).to_le_bytes())),
            t + 24,
        ),
        (
            "a table elsewhere",
            Box::new(|_, tr| tr[32..40].copy_from_slice(&16u64.to_le_bytes())),
            t + 32,
        ),
    ];
    for (what, f, at) in cases {
        let bad = patched(&idx, |tb, tr| f(tb, tr));
        let e = parse(&zst, &bad).unwrap_err();
        assert_eq!(bad_index_at(e), at, "{what}");
    }
    assert!(parse(&zst, &idx).is_ok());
}

#[test]
fn a_lying_prefix_is_an_error_when_read() {
    let (zst, idx) = small();
    let index = parse(&zst, &idx).unwrap();
    let n = (0..index.segments())
        .find(|&n| index.segment(n).unwrap().prefix_len > 0)
        .expect("a segment with a prefix");
    let s = *index.segment(n).unwrap();
    let c = &zst[s.compressed_offset as usize..][..s.compressed_len as usize];
    let mut p = idx[s.prefix_offset as usize..][..s.prefix_stored_len as usize].to_vec();
    let last = p.len() - 1;
    p[last / 2] ^= 0xff;
    assert!(index.decode(n, c, &p).is_err());
    assert!(index.decode(n, c, &[]).is_err());
    assert!(index.decode(index.segments(), c, &p).is_err());
}

#[test]
fn a_stream_that_is_not_zstd_or_damaged_does_not_index() {
    let (zst, _) = small();
    let e = build(&b"not zstd"[..], &mut Vec::new()).unwrap_err();
    assert!(matches!(e, ZstdIndexError::Stream { offset: 0, .. }), "{e}");
    let e = build(&zst[..zst.len() / 2], &mut Vec::new()).unwrap_err();
    assert!(matches!(e, ZstdIndexError::Truncated { .. }), "{e}");
    let mut bad = zst.clone();
    let n = bad.len();
    bad[n - 2] ^= 1; // the content checksum
    let e = build(&bad[..], &mut Vec::new()).unwrap_err();
    assert!(
        matches!(e, ZstdIndexError::Decode { offset, .. } if offset == n as u64 - 4),
        "{e}"
    );
}

/// Found by the zstd_index fuzz target: a frame whose header declares 35 bytes and whose
/// only block is an empty last raw block. zstd's streaming decoder, fed block by block,
/// lets it through; `zstd -t` and the one-shot decoder call it corrupt, and so must the
/// indexer.
#[test]
fn a_frame_holding_less_than_its_declared_content_size_does_not_index() {
    let (zst, _) = small();
    // Magic, single-segment with a 1-byte content size of 35, then an empty last raw
    // block (block header 0x000001).
    let lying = [0x28, 0xb5, 0x2f, 0xfd, 0x20, 35, 0x01, 0x00, 0x00];
    let one_shot = zstd::bulk::decompress(&lying, 1 << 10);
    assert!(one_shot.is_err(), "zstd itself refuses it: {one_shot:?}");
    let mut data = zst.clone();
    data.extend_from_slice(&lying);
    let e = build(&data[..], &mut Vec::new()).unwrap_err();
    assert!(
        matches!(e, ZstdIndexError::Decode { offset, ref what }
            if offset == data.len() as u64 && what.contains("declares 35 bytes")),
        "{e}"
    );
    // The same size, honestly held (a raw block of 35 bytes), indexes.
    let mut honest = vec![0x28, 0xb5, 0x2f, 0xfd, 0x20, 35, 0x19, 0x01, 0x00];
    honest.extend_from_slice(&[7u8; 35]);
    assert_eq!(zstd::bulk::decompress(&honest, 1 << 10).unwrap(), [7u8; 35]);
    let mut data = zst;
    data.extend_from_slice(&honest);
    build(&data[..], &mut Vec::new()).expect("a frame that holds what it declares");
}

/// Found by the zstd_index fuzz target: a frame whose only block is an empty compressed
/// last block. zstd's streaming decoder, fed block by block, takes it for the frame's end;
/// `zstd -t` and the one-shot decoder call it corrupt, and so must the indexer.
#[test]
fn an_empty_compressed_block_does_not_index() {
    let (zst, _) = small();
    // Magic; a 4-byte content size of 0, a window descriptor and a 4-byte dictionary ID
    // of 0; then a last compressed block of 0 bytes (block header 0x000005).
    let empty = [
        0x28, 0xb5, 0x2f, 0xfd, 0x93, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x05, 0x00, 0x00,
    ];
    let one_shot = zstd::bulk::decompress(&empty, 1 << 10);
    assert!(one_shot.is_err(), "zstd itself refuses it: {one_shot:?}");
    let mut data = zst.clone();
    data.extend_from_slice(&empty);
    let e = build(&data[..], &mut Vec::new()).unwrap_err();
    let block = (zst.len() + 14) as u64;
    assert!(
        matches!(e, ZstdIndexError::Stream { offset, ref what }
            if offset == block && what.contains("compressed block of 0 bytes")),
        "{e}"
    );
    // Not last, followed by a raw last block: refused the same way.
    let mut data = zst;
    data.extend_from_slice(&empty[..14]);
    data.extend_from_slice(&[0x04, 0x00, 0x00, 0x01, 0x00, 0x00]);
    let e = build(&data[..], &mut Vec::new()).unwrap_err();
    assert!(
        matches!(e, ZstdIndexError::Stream { offset, .. } if offset == block),
        "{e}"
    );
}
