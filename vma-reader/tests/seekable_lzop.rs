//! The seekable reader on lzop archives (`.vma.lzo`) as the real `lzop` tool writes them:
//! the same devices, headers and integrity as the plain archive, and typed errors with
//! the byte offset for every way a block can lie or be damaged.

mod common;

use std::io::{Cursor, Read};
use std::path::Path;

use common::{
    assert_same_and_verified, assert_same_devices, noise, open_in_tempdir, two_device_archive,
    write_file,
};
use vma_reader::lzop::{LzopBlock, LzopError, LzopIndex, LzopReader, MAX_BLOCK_SIZE};
use vma_reader::{Error, Packing, SeekableArchive};
use vma_testkit::{vectors, Rng};

/// `plain` compressed by the `lzop` tool with `args` (after `-c`).
fn lzop(plain: &[u8], args: &[&str]) -> Vec<u8> {
    let argv = [&["lzop", "-c"][..], args].concat();
    vma_testkit::pipe_through(&argv, plain)
}

fn adler32(data: &[u8]) -> u32 {
    let mut a = adler2::Adler32::new();
    a.write_slice(data);
    a.checksum()
}

/// `lzo` (from the `lzop` tool with Adler-32 data checksums, its default) rewritten with
/// the flag lzop has for Adler-32 checksums of the compressed data too, and those
/// checksums after every compressed block's header: the `lzop` tool reads such files but
/// does not write them.
fn with_compressed_sums(lzo: &[u8]) -> Vec<u8> {
    const F_ADLER32_D: u32 = 1;
    const F_ADLER32_C: u32 = 2;
    let version = u16::from_be_bytes([lzo[9], lzo[10]]);
    assert!(version >= 0x0940, "lzop header version {version:#x}");
    let flags = u32::from_be_bytes(lzo[17..21].try_into().unwrap());
    assert_eq!(
        flags & 0x1303,
        F_ADLER32_D,
        "{flags:#x}: Adler-32 of the data only"
    );
    let name_len = lzo[33] as usize;
    let sum_at = 34 + name_len;
    let mut out = lzo[..sum_at].to_vec();
    out[17..21].copy_from_slice(&(flags | F_ADLER32_C).to_be_bytes());
    let sum = adler32(&out[9..]);
    out.extend_from_slice(&sum.to_be_bytes());
    let index = LzopIndex::scan(Cursor::new(lzo), lzo.len() as u64).unwrap();
    for n in 0..index.blocks() {
        let b = *index.block(n).unwrap();
        let at = b.header_offset as usize;
        let data_at = at + b.header_len as usize;
        let data = &lzo[data_at..data_at + b.compressed_len as usize];
        out.extend_from_slice(&lzo[at..data_at]);
        if b.compressed_len < b.len {
            out.extend_from_slice(&adler32(data).to_be_bytes());
        }
        out.extend_from_slice(data);
    }
    out.extend_from_slice(&[0; 4]);
    out
}

/// `plain` through lzop with `args`, and rewritten with compressed-data checksums when
/// `args` is [`COMPRESSED_SUMS`].
fn packed(plain: &[u8], args: &[&str]) -> Vec<u8> {
    match args == COMPRESSED_SUMS {
        true => with_compressed_sums(&lzop(plain, &[])),
        false => lzop(plain, args),
    }
}

/// Not lzop's flags: the marker of [`with_compressed_sums`] in [`FLAVOURS`].
const COMPRESSED_SUMS: &[&str] = &["(compressed sums)"];

/// The flags lzop is run with: its default (Adler-32 of the data), -9 with CRC-32 (of
/// the header and the data), -1; and the default rewritten with checksums of the
/// compressed data.
const FLAVOURS: [&[&str]; 4] = [&[], &["-9", "--crc32"], &["-1"], COMPRESSED_SUMS];

#[test]
fn every_vector_compressed_by_lzop_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    for v in vectors() {
        let plain = SeekableArchive::open(v.path()).unwrap();
        for args in FLAVOURS {
            let lzo = packed(&v.bytes(), args);
            let path = write_file(dir.path(), &format!("{}.lzo", v.file), &lzo);
            let archive = SeekableArchive::open(&path).unwrap();
            let index = LzopIndex::scan(Cursor::new(&lzo), lzo.len() as u64).unwrap();
            assert_eq!(index.content_len(), v.bytes().len() as u64);
            assert!(
                matches!(
                    archive.packing(),
                    Packing::Lzop { blocks, compressed_len }
                        if compressed_len == lzo.len() as u64 && blocks == index.blocks() as u64
                ),
                "{:?}",
                archive.packing()
            );
            assert_same_and_verified(&plain, &archive, lzo.len() as u64, 600000, &v.file);
        }
    }
}

#[test]
fn many_blocks_stored_and_compressed_through_a_bounded_cache() {
    // 40 MiB in two devices, one of them noise lzop stores uncompressed, sealed.
    let (dir, plain_bytes, plain) =
        open_in_tempdir(two_device_archive(&noise((10 << 20) + 12345, 6)));
    for args in FLAVOURS {
        let lzo = packed(&plain_bytes, args);
        let index = LzopIndex::scan(Cursor::new(&lzo), lzo.len() as u64).unwrap();
        let stored = (0..index.blocks())
            .filter(|&n| {
                let b = index.block(n).unwrap();
                b.len == b.compressed_len
            })
            .count();
        assert!(index.blocks() > 50, "{} blocks", index.blocks());
        assert!(stored > 0 && stored < index.blocks(), "{stored} stored");
        let path = write_file(dir.path(), "a.vma.lzo", &lzo);
        let archive = SeekableArchive::open(&path).unwrap();
        assert_same_devices(&plain, &archive, 9, 600000);
        let cache_and_index = archive.index_memory() - plain.index_memory();
        assert!(
            cache_and_index <= vma_reader::FRAME_CACHE_BYTES + index.memory() + (1 << 20),
            "{cache_and_index} bytes held"
        );
        // The streaming reader decompresses the same file to the plain archive.
        let mut out = Vec::new();
        LzopReader::new(&lzo[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == plain_bytes);
    }
}

/// vec1 through `lzop`, with checksums of the data and of the compressed data, and its
/// index.
fn vec1_lzo() -> (Vec<u8>, LzopIndex) {
    let v = &vectors()[0];
    let lzo = with_compressed_sums(&lzop(&v.bytes(), &[]));
    let index = LzopIndex::scan(Cursor::new(&lzo), lzo.len() as u64).unwrap();
    assert!(index.blocks() >= 3, "{} blocks", index.blocks());
    (lzo, index)
}

fn put_u32(bytes: &mut [u8], at: u64, value: u32) {
    let at = at as usize;
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// Opens `bytes` and reads every device: the typed lzop error opening fails with, or
/// the text of the error a read fails with.
fn failure(dir: &Path, bytes: &[u8]) -> Result<LzopError, String> {
    let path = write_file(dir, "bad.vma.lzo", bytes);
    let archive = match SeekableArchive::open(&path) {
        Err(Error::Lzop(e)) => return Ok(e),
        Err(other) => panic!("not an lzop error: {other}"),
        Ok(archive) => archive,
    };
    let e = archive
        .devices()
        .iter()
        .map(|d| {
            let mut sink = Vec::new();
            archive.device(d.id).unwrap().read_to_end(&mut sink)
        })
        .find_map(Result::err)
        .expect("a damaged archive fails to read");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    Err(e.to_string())
}

/// Opens `bytes`: the typed lzop error that fails with.
fn open_and_read(dir: &Path, bytes: &[u8]) -> LzopError {
    let e = failure(dir, bytes).unwrap_or_else(|text| panic!("opened, then: {text}"));
    assert!(Error::Lzop(LzopError::BadMagic).is_damage());
    e
}

#[test]
fn hostile_block_lengths_are_typed_errors_with_their_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (lzo, index) = vec1_lzo();
    let b1 = *index.block(1).unwrap();
    // A compressed block whose data could run past the end of the file: the last one.
    let n = index.blocks() - 1;
    let last = *index.block(n).unwrap();
    let past_end = (lzo.len() as u64 - last.header_offset - u64::from(last.header_len)) as u32 + 1;
    assert!(past_end <= last.len, "the last block can claim the rest");
    let cases: Vec<(&str, usize, LzopBlock, u64, u32)> = vec![
        ("zero compressed length", 1, b1, 4, 0),
        ("compressed longer than uncompressed", 1, b1, 4, b1.len + 1),
        ("compressed length past the end", n, last, 4, past_end),
        (
            "uncompressed length over lzop's max",
            1,
            b1,
            0,
            MAX_BLOCK_SIZE + 1,
        ),
    ];
    for (what, n, block, field, value) in cases {
        let at = block.header_offset;
        let mut bad = lzo.clone();
        put_u32(&mut bad, at + field, value);
        let e = LzopIndex::scan(Cursor::new(&bad), bad.len() as u64).unwrap_err();
        assert!(
            matches!(e, LzopError::BadBlock { block, offset, .. } if offset == at && block == n as u64),
            "{what}: {e}"
        );
        assert!(
            e.to_string().contains(&format!("at byte {at}")),
            "{what}: {e}"
        );
        let e = open_and_read(dir.path(), &bad);
        assert!(matches!(e, LzopError::BadBlock { .. }), "{what}: {e}");
        assert_eq!(e.offset(), at, "{what}: {e}");
    }
}

#[test]
fn a_wrong_uncompressed_length_fails_when_the_block_is_decoded() {
    let (lzo, index) = vec1_lzo();
    // The last block, shorter than the first: one byte longer still follows lzop's
    // length rule, so the index takes it and the decoder finds it out.
    let n = index.blocks() - 1;
    let last = *index.block(n).unwrap();
    assert!(
        last.compressed_len < last.len,
        "the last block is compressed"
    );
    let mut bad = lzo.clone();
    assert!(
        last.len < index.block(0).unwrap().len,
        "the last block is short"
    );
    put_u32(&mut bad, last.header_offset, last.len + 1);
    let bad_index = LzopIndex::scan(Cursor::new(&bad), bad.len() as u64).unwrap();
    let start = last.header_offset as usize;
    let e = bad_index
        .decode(n, &bad[start..start + last.file_len() as usize])
        .unwrap_err();
    assert!(
        matches!(e, LzopError::BadBlock { block, offset, .. } if block == n as u64 && offset == last.header_offset),
        "{e}"
    );
    // (Through the seekable reader the archive's own grammar sees the extra byte first.)
}

#[test]
fn a_truncated_file_is_a_typed_error_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let (lzo, index) = vec1_lzo();
    let last = *index.block(index.blocks() - 1).unwrap();
    // Inside the last block's data: it runs past the end.
    let cut = &lzo[..(last.header_offset + last.file_len() - 1) as usize];
    let e = open_and_read(dir.path(), cut);
    assert!(
        matches!(e, LzopError::BadBlock { offset, .. } if offset == last.header_offset),
        "{e}"
    );
    // Inside a block header, and without the end marker.
    for cut_at in [last.header_offset + 6, last.header_offset + last.file_len()] {
        let e = open_and_read(dir.path(), &lzo[..cut_at as usize]);
        assert!(
            matches!(e, LzopError::Truncated { offset } if offset == cut_at),
            "{cut_at}: {e}"
        );
    }
}

#[test]
fn failing_checksums_are_typed_errors_with_their_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (lzo, index) = vec1_lzo();
    let b0 = *index.block(0).unwrap();
    // Header: dst len, src len, data Adler-32, compressed-data Adler-32.
    for (field, kind) in [(8, "Adler-32"), (12, "compressed Adler-32")] {
        let mut bad = lzo.clone();
        bad[(b0.header_offset + field) as usize] ^= 1;
        let e = open_and_read(dir.path(), &bad);
        assert!(
            matches!(e, LzopError::Checksum { block: 0, kind: k, offset }
                if k == kind && offset == b0.header_offset),
            "{e}"
        );
    }
    // Damaged data in a later block fails its check when that block is read: the
    // compressed-data checksum of a compressed block, the data checksum of a stored one.
    let first = |stored: bool| {
        (1..index.blocks())
            .find(|&n| {
                let b = index.block(n).unwrap();
                (b.compressed_len == b.len) == stored
            })
            .expect("vec1 has both kinds of blocks")
    };
    let mut rng = Rng(3);
    for (n, kind) in [
        (first(false), "compressed Adler-32"),
        (first(true), "Adler-32"),
    ] {
        let b = *index.block(n).unwrap();
        let mut bad = lzo.clone();
        let at = b.header_offset + u64::from(b.header_len) + rng.below(b.compressed_len.into());
        bad[at as usize] ^= 0x40;
        let text = match failure(dir.path(), &bad) {
            Ok(e) => {
                assert!(
                    matches!(e, LzopError::Checksum { block, .. } if block == n as u64),
                    "{e}"
                );
                e.to_string()
            }
            Err(text) => text,
        };
        let expected = format!(
            "lzop block {n} at byte {}: {kind} checksum",
            b.header_offset
        );
        assert!(text.contains(&expected), "{text}");
    }
}

#[test]
fn block_lengths_that_lzop_never_writes_are_refused_at_the_block() {
    let dir = tempfile::tempdir().unwrap();
    let (lzo, index) = vec1_lzo();
    assert!(index.blocks() >= 3, "vector 1 packs into several blocks");
    // A compressed middle block said to be shorter than the first: the block after it
    // follows a short one.
    let m = (1..index.blocks() - 1)
        .find(|&m| {
            let b = index.block(m).unwrap();
            b.compressed_len < b.len - 1
        })
        .expect("a compressed middle block");
    let short = *index.block(m).unwrap();
    let next = *index.block(m + 1).unwrap();
    let mut bad = lzo.clone();
    put_u32(&mut bad, short.header_offset, short.len - 1);
    let e = LzopIndex::scan(Cursor::new(&bad), bad.len() as u64).unwrap_err();
    assert!(
        matches!(&e, LzopError::BadBlock { block, offset, what }
            if *block == m as u64 + 1 && *offset == next.header_offset && what.contains("follows a short")),
        "{e}"
    );
    assert!(matches!(
        open_and_read(dir.path(), &bad),
        LzopError::BadBlock { .. }
    ));
    let streamed = std::io::copy(
        &mut vma_reader::lzop::LzopReader::new(&bad[..]).unwrap(),
        &mut std::io::sink(),
    )
    .unwrap_err();
    // The stream decodes the short block first and finds it does not hold what it says.
    assert!(streamed.to_string().contains("lzop block"), "{streamed}");
}
