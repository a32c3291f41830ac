//! The seekable reader on seekable zstd archives: the same devices, headers and integrity
//! as the plain archive, and typed errors (with offsets) for every way the compressed
//! file can lie or be damaged.

mod common;

use std::io::{Read, Write};
use std::path::Path;

use common::{
    assert_same_and_verified, assert_same_devices, mixed_image, open_in_tempdir,
    two_device_archive, write_file,
};
use vma_format::seek_table::{self, FrameEntry, SeekIndex};
use vma_reader::{Error, Packing, ParallelZstdReader, SeekableArchive};
use vma_testkit::vectors;
use vma_writer::{ZstdOptions, ZstdWriter};

/// `plain` compressed as `vma create` does, with frames of at least `frame_size`.
fn compress(plain: &[u8], frame_size: usize) -> Vec<u8> {
    let options = ZstdOptions {
        frame_size,
        ..ZstdOptions::default()
    };
    let mut w = ZstdWriter::new(Vec::new(), options).unwrap();
    w.write_all(plain).unwrap();
    w.finish().unwrap().0
}

#[test]
fn every_vector_reads_the_same_compressed() {
    let dir = tempfile::tempdir().unwrap();
    for v in vectors() {
        let plain = SeekableArchive::open(v.path()).unwrap();
        for frame_size in [1, 64 << 10, 2 << 20] {
            let zst = compress(&v.bytes(), frame_size);
            let path = write_file(dir.path(), &format!("{}.zst", v.file), &zst);
            let archive = SeekableArchive::open(&path).unwrap();
            assert!(matches!(
                archive.packing(),
                Packing::SeekableZstd { compressed_len, .. } if compressed_len == zst.len() as u64
            ));
            assert_same_and_verified(&plain, &archive, frame_size as u64, 300000, &v.file);
        }
    }
}

/// An archive of several extents per frame and frames larger than the prefix that
/// indexing decompresses: 40 MiB of mixed data in two devices, sealed.
fn large_archive() -> Vec<u8> {
    two_device_archive(&mixed_image((10 << 20) + 12345, 6))
}

#[test]
fn large_frames_and_a_bounded_cache() {
    let (dir, plain_bytes, plain) = open_in_tempdir(large_archive());
    for frame_size in [2 << 20, 9 << 20] {
        let zst = compress(&plain_bytes, frame_size);
        let path = write_file(dir.path(), "a.vma.zst", &zst);
        let archive = SeekableArchive::open(&path).unwrap();
        assert_same_devices(&plain, &archive, 7, 300000);
        let cache_and_index = archive.index_memory() - plain.index_memory();
        assert!(
            cache_and_index <= vma_reader::FRAME_CACHE_BYTES + (16 << 20),
            "{cache_and_index} bytes held"
        );
    }
}

#[test]
fn a_stock_zstd_stream_is_not_seekable() {
    let dir = tempfile::tempdir().unwrap();
    let v = &vectors()[0];
    let stock = zstd::stream::encode_all(&v.bytes()[..], 3).unwrap();
    let path = write_file(dir.path(), "stock.vma.zst", &stock);
    let e = SeekableArchive::open(&path).unwrap_err();
    assert!(
        matches!(e, Error::NotSeekable { stream_len } if stream_len == stock.len() as u64),
        "{e}"
    );
    assert_eq!(e.kind(), vma_reader::ErrorKind::Usage);
    assert!(e.to_string().contains("zstd -d"), "{e}");
}

/// The seek table of a compressed stream: where it starts and its entries.
fn table_of(zst: &[u8]) -> (usize, Vec<FrameEntry>) {
    let len = SeekIndex::table_len(zst, zst.len() as u64).unwrap();
    let at = zst.len() - len;
    let entries = zst[at + 8..zst.len() - 9]
        .chunks_exact(8)
        .map(|e| FrameEntry {
            compressed: u32::from_le_bytes(e[..4].try_into().unwrap()),
            decompressed: u32::from_le_bytes(e[4..].try_into().unwrap()),
        })
        .collect();
    (at, entries)
}

/// `zst` with its seek table replaced by one for `entries`.
fn with_table(zst: &[u8], entries: &[FrameEntry]) -> Vec<u8> {
    let (at, _) = table_of(zst);
    let mut out = zst[..at].to_vec();
    out.extend_from_slice(&seek_table::encode(entries));
    out
}

/// Opens `bytes` and reads every device whole: the first error.
fn open_and_read(dir: &Path, bytes: &[u8]) -> Result<(), String> {
    let path = write_file(dir, "bad.vma.zst", bytes);
    let archive = SeekableArchive::open(&path).map_err(|e| e.to_string())?;
    for d in archive.devices() {
        let mut sink = Vec::new();
        archive
            .device(d.id)
            .unwrap()
            .read_to_end(&mut sink)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[test]
fn lying_tables_and_damaged_frames_are_typed_errors_with_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let zst = compress(&large_archive(), 1);
    let (table_at, entries) = table_of(&zst);
    assert!(entries.len() > 3);
    assert!(open_and_read(dir.path(), &zst).is_ok());

    // A frame size that does not add up: the frames no longer fill what precedes the table.
    let mut lie = entries.clone();
    lie[1].compressed += 1;
    let e = open_and_read(dir.path(), &with_table(&zst, &lie)).unwrap_err();
    assert!(
        e.contains(&format!("at byte {table_at}")) && e.contains("add up"),
        "{e}"
    );

    // Sizes that add up but cut frames in the wrong places.
    let mut lie = entries.clone();
    lie[1].compressed += 1;
    lie[2].compressed -= 1;
    let e = open_and_read(dir.path(), &with_table(&zst, &lie)).unwrap_err();
    assert!(e.contains("zstd frame"), "{e}");

    // Content sizes that lie: more, or fewer, than a frame holds.
    for delta in [4096i64, -4096] {
        let mut lie = entries.clone();
        lie[2].decompressed = (lie[2].decompressed as i64 + delta) as u32;
        let e = open_and_read(dir.path(), &with_table(&zst, &lie)).unwrap_err();
        assert!(
            e.contains("zstd frame") || e.contains("extent at byte"),
            "{e}"
        );
    }

    // A table for another stream: more frames than are there.
    let mut lie = entries.clone();
    lie.push(lie[0]);
    let e = open_and_read(dir.path(), &with_table(&zst, &lie)).unwrap_err();
    assert!(e.contains("add up"), "{e}");

    // A frame count past the start of the file.
    let mut lie = zst.clone();
    let f = lie.len() - 9;
    lie[f..f + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = open_and_read(dir.path(), &lie).unwrap_err();
    assert!(e.contains("frames"), "{e}");

    // Cut short: the table is gone, which is what the error says.
    let e = open_and_read(dir.path(), &zst[..zst.len() - 100]).unwrap_err();
    assert!(e.contains("no seek table"), "{e}");
}

/// `zst` with a byte flipped in the middle of frame `frame`, the frame's compressed
/// offset, and the content bytes of the frames before it.
fn damage_frame(zst: &[u8], frame: usize) -> (Vec<u8>, u64, usize) {
    let (_, entries) = table_of(zst);
    let start: u64 = entries[..frame].iter().map(|e| e.compressed as u64).sum();
    let before = entries[..frame]
        .iter()
        .map(|e| e.decompressed as usize)
        .sum();
    let mut bad = zst.to_vec();
    bad[start as usize + entries[frame].compressed as usize / 2] ^= 0x55;
    (bad, start, before)
}

#[test]
fn a_damaged_frame_fails_its_checksum_with_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let plain_bytes = large_archive();
    let zst = compress(&plain_bytes, 2 << 20);
    // Flip a byte in the middle of the last data frame: the prefix read at open may not
    // see it; reading the data must.
    let frame = table_of(&zst).1.len() - 2;
    let (bad, start, _) = damage_frame(&zst, frame);
    let e = open_and_read(dir.path(), &bad).unwrap_err();
    assert!(
        e.contains(&format!("zstd frame {frame} at compressed byte {start}")),
        "{e}"
    );
}

/// All a [`ParallelZstdReader`] over `path` gives, and the error it ends with, if any.
fn read_parallel(path: &Path, threads: usize) -> (Vec<u8>, Option<std::io::Error>) {
    let mut reader = ParallelZstdReader::open(std::fs::File::open(path).unwrap(), threads).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 100_003];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e)),
        }
    }
}

#[test]
fn the_parallel_reader_gives_the_archive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let plain = large_archive();
    // One frame per extent (hundreds of frames, more than are ever in flight), frames of
    // 2 MiB, and one frame larger than the in-flight bound.
    for frame_size in [1, 2 << 20, 40 << 20] {
        let path = write_file(dir.path(), "a.vma.zst", &compress(&plain, frame_size));
        for threads in [1, 2, 3] {
            let (out, err) = read_parallel(&path, threads);
            assert!(err.is_none(), "{err:?}");
            assert!(out == plain, "frame size {frame_size}, {threads} threads");
        }
    }
    let stock = write_file(
        dir.path(),
        "stock.vma.zst",
        &zstd::stream::encode_all(&plain[..], 3).unwrap(),
    );
    let e = ParallelZstdReader::open(std::fs::File::open(stock).unwrap(), 2).unwrap_err();
    assert!(matches!(e, Error::NotSeekable { .. }), "{e}");
}

#[test]
fn the_parallel_reader_stops_at_a_damaged_frame_after_the_frames_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let plain = large_archive();
    let zst = compress(&plain, 64 << 10);
    let frame = table_of(&zst).1.len() / 2;
    let (bad, start, content) = damage_frame(&zst, frame);
    let path = write_file(dir.path(), "bad.vma.zst", &bad);
    let (out, err) = read_parallel(&path, 2);
    let err = err.expect("the damaged frame is an error");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
    assert!(
        matches!(inner, Some(Error::Frame { frame: f, offset, .. }) if *f == frame as u64 && *offset == start),
        "{err}"
    );
    assert!(
        out == plain[..content],
        "{} bytes before the error",
        out.len()
    );
}
