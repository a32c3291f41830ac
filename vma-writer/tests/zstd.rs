//! Seekable zstd output: the frames decompress to the plain archive, each alone, and each
//! starts and ends at an extent boundary; the seek table describes them.

mod common;

use std::io::{self, Write};

use common::*;
use vma_format::seek_table::SeekIndex;
use vma_format::{ArchiveHeader, ExtentHeader};
use vma_writer::{Builder, ZstdOptions, ZstdWriter};

/// A plain archive of two devices, mixed data and zeros, several extents.
fn plain_archive() -> Vec<u8> {
    let mut b = image(3 << 20, 8);
    b[1 << 20..2 << 20].fill(0);
    let images = [
        ("drive-scsi0", image((9 << 20) + 4097, 7)),
        ("drive-scsi1", b),
    ];
    let mut builder = Builder::new();
    builder
        .add_config("qemu-server.conf", b"memory: 512\n")
        .unwrap();
    let devs = add_devices(&mut builder, &images);
    let writer = builder.build(Vec::new()).unwrap();
    let h = writer.handle();
    // The second device first.
    for (dev, (_, img)) in devs.iter().zip(&images).rev() {
        h.write_range(*dev, 0, img).unwrap();
    }
    writer.finish().unwrap().1
}

/// Offsets where the header and each extent end.
fn boundaries(archive: &[u8]) -> Vec<u64> {
    let mut at = ArchiveHeader::header_size_from_prefix(archive).unwrap();
    let mut out = vec![at as u64];
    while at < archive.len() {
        at += ExtentHeader::len_from_prefix(&archive[at..]).unwrap();
        out.push(at as u64);
    }
    assert_eq!(at, archive.len());
    out
}

/// Compresses `plain` in writes of `chunk` bytes.
fn compress(plain: &[u8], chunk: usize, options: ZstdOptions) -> Vec<u8> {
    let mut w = ZstdWriter::new(Vec::new(), options).unwrap();
    for part in plain.chunks(chunk) {
        w.write_all(part).unwrap();
    }
    let (out, summary) = w.finish().unwrap();
    assert_eq!(summary.content_bytes, plain.len() as u64);
    assert_eq!(summary.compressed_bytes, out.len() as u64);
    out
}

/// Checks the stream against the plain archive and returns where its frames start in
/// the content.
fn check_stream(stream: &[u8], plain: &[u8]) -> Vec<u64> {
    assert_eq!(zstd::stream::decode_all(stream).unwrap(), plain);
    let len = SeekIndex::table_len(stream, stream.len() as u64).unwrap();
    let index = SeekIndex::parse(&stream[stream.len() - len..], stream.len() as u64).unwrap();
    assert_eq!(index.content_len(), plain.len() as u64);
    let mut starts = Vec::new();
    for i in 0..index.frames() {
        let f = index.frame(i).unwrap();
        let bytes = &stream[f.compressed_offset as usize..][..f.compressed_len as usize];
        let content = zstd::bulk::decompress(bytes, f.len as usize).unwrap();
        assert_eq!(
            content,
            &plain[f.offset as usize..][..f.len as usize],
            "frame {i}"
        );
        starts.push(f.offset);
    }
    starts
}

#[test]
fn frames_are_whole_extents_and_decompress_alone() {
    let plain = plain_archive();
    let ends = boundaries(&plain);
    for (chunk, frame_size, threads) in [
        (plain.len(), 2 << 20, 2),
        (4096, 1, 3),
        (511, 1 << 20, 1),
        (1 << 20, 8 << 20, 2),
    ] {
        let options = ZstdOptions {
            level: 3,
            threads,
            frame_size,
        };
        let stream = compress(&plain, chunk, options);
        let starts = check_stream(&stream, &plain);
        assert_eq!(starts[0], 0);
        for s in &starts[1..] {
            assert!(
                ends.contains(s),
                "frame starts at {s}, not at an extent boundary"
            );
        }
        if frame_size == 1 {
            // Every unit is a frame of its own.
            assert_eq!(starts.len(), ends.len());
        } else {
            // Frames gather extents up to the target size.
            let mut bounds = starts.clone();
            bounds.push(plain.len() as u64);
            for w in bounds.windows(2).take(bounds.len() - 2) {
                assert!(w[1] - w[0] >= frame_size as u64, "{w:?}");
            }
        }
    }
}

#[test]
fn input_that_is_no_archive_is_cut_by_size() {
    let data = image(9 << 20, 3);
    let stream = compress(&data, 100_000, ZstdOptions::default());
    let starts = check_stream(&stream, &data);
    assert_eq!(starts, vec![0, 4 << 20, 8 << 20]);
}

#[test]
fn an_empty_stream_is_a_seek_table_alone() {
    let (out, summary) = ZstdWriter::new(Vec::new(), ZstdOptions::default())
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(summary.frames, 0);
    assert!(zstd::stream::decode_all(&out[..]).unwrap().is_empty());
}

/// Fails every write after `limit` bytes.
struct Full {
    limit: usize,
}

impl Write for Full {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.limit == 0 {
            return Err(io::Error::other("disk full (test)"));
        }
        let n = buf.len().min(self.limit);
        self.limit -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_output_fails_the_writes_and_the_finish() {
    let plain = plain_archive();
    for limit in [0, 1000, 1 << 20] {
        let options = ZstdOptions {
            frame_size: 1 << 20,
            ..ZstdOptions::default()
        };
        let mut w = ZstdWriter::new(Full { limit }, options).unwrap();
        let failed = plain
            .chunks(64 << 10)
            .map(|c| w.write_all(c))
            .find_map(Result::err);
        let e = match failed {
            Some(e) => e,
            None => w.finish().err().expect("the output is full"),
        };
        assert!(e.to_string().contains("disk full"), "{e}");
    }
}
