//! Random access through the seekable reader equals the extracted images.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::sync::OnceLock;

use common::{mixed_image, Builder, Scratch};
use proptest::prelude::*;
use vma_format::{BlockInfo, BlockMask, DeviceId};
use vma_reader::{DeviceReader, Extractor, SeekableArchive};
use vma_testkit::vectors;

struct Fixture {
    _dir: Scratch,
    vma: SeekableArchive,
    images: Vec<Vec<u8>>,
}

/// vec1 opened for random access, and its devices as the streaming extractor wrote them.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let v = &vectors()[0];
        let dir = Scratch::new();
        Extractor::new(dir.out()).extract(&v.bytes()[..]).unwrap();
        let vma = SeekableArchive::open(v.path()).unwrap();
        let images = vma
            .devices()
            .iter()
            .map(|d| {
                let name = vma_reader::device_file_name(d).unwrap();
                std::fs::read(dir.out().join(name)).unwrap()
            })
            .collect();
        Fixture {
            _dir: dir,
            vma,
            images,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_reads_equal_the_extracted_image(
        dev in 0usize..2,
        offset in 0u64..5_400_000,
        len in 0usize..300_000,
    ) {
        let f = fixture();
        let image = &f.images[dev];
        let reader = f.vma.device(f.vma.devices()[dev].id).unwrap();
        let mut buf = vec![0xccu8; len];
        let n = reader.read_at(&mut buf, offset).unwrap();
        let start = (offset as usize).min(image.len());
        let end = (start + len).min(image.len());
        prop_assert_eq!(n, end - start);
        prop_assert_eq!(&buf[..n], &image[start..end]);

        // The same through Seek + Read on a clone.
        let mut r = reader.clone();
        r.seek(SeekFrom::Start(offset)).unwrap();
        let mut via_read = Vec::new();
        r.by_ref().take(len as u64).read_to_end(&mut via_read).unwrap();
        prop_assert_eq!(&via_read[..], &image[start..end]);
    }

    #[test]
    fn small_aligned_reads_equal_the_extracted_image(block in 0u64..1283, dev in 0usize..2) {
        let f = fixture();
        let image = &f.images[dev];
        let reader = f.vma.device(f.vma.devices()[dev].id).unwrap();
        let mut buf = [0u8; 4096];
        let at = block * 4096;
        let n = reader.read_at(&mut buf, at).unwrap();
        let start = (at as usize).min(image.len());
        let end = (start + 4096).min(image.len());
        prop_assert_eq!(&buf[..n], &image[start..end]);
    }
}

#[test]
fn many_threads_read_one_device_at_once() {
    let f = fixture();
    let reader = f.vma.device("drive-scsi0").unwrap();
    let image = &f.images[0];
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let reader = &reader;
            s.spawn(move || {
                let mut buf = vec![0u8; 12345];
                for i in 0..200u64 {
                    let at = (i * 7919 + t * 104_729) * 13 % image.len() as u64;
                    let n = reader.read_at(&mut buf, at).unwrap();
                    assert_eq!(&buf[..n], &image[at as usize..at as usize + n]);
                }
            });
        }
    });
}

#[test]
fn seek_and_read_behave_like_a_file() {
    let f = fixture();
    let mut r = f.vma.device(DeviceId::new(2).unwrap()).unwrap();
    assert_eq!(r.size(), 2293760);
    assert_eq!(r.seek(SeekFrom::End(-10)).unwrap(), 2293750);
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, f.images[1][2293750..]);
    assert_eq!(r.seek(SeekFrom::Current(100)).unwrap(), 2293860);
    assert_eq!(
        r.read(&mut [0u8; 10]).unwrap(),
        0,
        "past the end reads nothing"
    );
    assert!(r.seek(SeekFrom::Current(-3_000_000)).is_err());
    assert!(f.vma.device("drive-nope").is_err());
    assert!(f.vma.device(DeviceId::new(9).unwrap()).is_err());
}

#[test]
fn block_status_reports_holes() {
    // Cluster 0: blocks 0 and 2; cluster 1: nothing; cluster 2: everything; 3: nothing.
    let size = 4 * 65536 - 1000;
    let mut b = Builder::new(&[("d", size)], &[]);
    let d = DeviceId::new(1).unwrap();
    b.raw(
        BlockInfo::new(d, 0, BlockMask::B0 | BlockMask::B2),
        &[1u8; 8192],
    );
    b.raw(BlockInfo::new(d, 1, BlockMask::empty()), &[]);
    b.raw(BlockInfo::new(d, 2, BlockMask::all()), &[2u8; 65536]);
    b.raw(BlockInfo::new(d, 3, BlockMask::empty()), &[]);
    let bytes = b.finish();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &bytes).unwrap();
    let vma = SeekableArchive::open(file.path()).unwrap();
    let r: DeviceReader = vma.device("d").unwrap();
    assert_eq!(r.mask(0), Some(BlockMask::B0 | BlockMask::B2));
    assert_eq!(r.mask(1), Some(BlockMask::empty()));
    assert_eq!(r.mask(4), None);
    assert!(r.is_allocated(0) && !r.is_allocated(1) && r.is_allocated(2) && !r.is_allocated(3));
    // (offset, max, the allocated run's length, stored)
    let runs = [
        (0, u64::MAX, 4096, true),
        (100, u64::MAX, 3996, true),
        (4096, u64::MAX, 4096, false),
        (8192, u64::MAX, 4096, true),
        // From block 3 of cluster 0 through all of cluster 1.
        (12288, u64::MAX, 131072 - 12288, false),
        (131072, u64::MAX, 65536, true),
        (131072, 10, 10, true),
        (196608, u64::MAX, size - 196608, false),
    ];
    for (offset, max, len, stored) in runs {
        assert_eq!(
            r.allocation(offset, max).map(|a| (a.len, a.stored)),
            Some((len, stored)),
            "allocation({offset}, {max})"
        );
    }
    assert_eq!(r.allocation(size, 1).map(|a| (a.len, a.stored)), None);
}

#[test]
fn a_large_zero_archive_indexes_in_little_memory() {
    // 16 GiB of zero clusters: 262144 slots, 4520 extent headers.
    let size = 16u64 << 30;
    let mut b = Builder::new(&[("big", size)], &[]);
    let d = DeviceId::new(1).unwrap();
    for c in 0..(size >> 16) as u32 {
        b.raw(BlockInfo::new(d, c, BlockMask::empty()), &[]);
    }
    b.raw(BlockInfo::EMPTY, &[]); // no-op slot, dev_id 0
    let bytes = b.finish();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &bytes).unwrap();
    let vma = SeekableArchive::open(file.path()).unwrap();
    // Nothing stored: no chunk, only the chunk table at most.
    assert!(vma.index_memory() <= 8 * 512, "{}", vma.index_memory());
    let r = vma.device("big").unwrap();
    let mut buf = vec![1u8; 100_000];
    assert_eq!(r.read_at(&mut buf, size - 50_000).unwrap(), 50_000);
    assert!(buf[..50_000].iter().all(|&x| x == 0));
    assert_eq!(
        r.allocation(0, u64::MAX).map(|a| (a.len, a.stored)),
        Some((size, false))
    );

    // One stored cluster costs one 4 KiB chunk.
    let mut b = Builder::new(&[("big", size)], &[]);
    for c in 0..(size >> 16) as u32 {
        if c == 100_000 {
            b.cluster(1, c, &[3u8; 65536]);
        } else {
            b.raw(BlockInfo::new(d, c, BlockMask::empty()), &[]);
        }
    }
    let bytes = b.finish();
    std::fs::write(file.path(), &bytes).unwrap();
    let vma = SeekableArchive::open(file.path()).unwrap();
    assert!(
        vma.index_memory() <= 4096 + 8 * 512,
        "{}",
        vma.index_memory()
    );
    let r = vma.device("big").unwrap();
    let mut buf = vec![0u8; 65536 * 2];
    r.read_at(&mut buf, 100_000 * 65536 - 65536).unwrap();
    assert!(buf[..65536].iter().all(|&x| x == 0) && buf[65536..].iter().all(|&x| x == 3));
}

#[test]
fn a_file_truncated_while_open_gives_io_errors_not_crashes() {
    let v = &vectors()[0];
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), v.bytes()).unwrap();
    let vma = SeekableArchive::open(file.path()).unwrap();
    let r = vma.device("drive-scsi0").unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(file.path())
        .unwrap()
        .set_len(20_000)
        .unwrap();
    let mut buf = vec![0u8; 5_000_000];
    let err = r.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    let _ = mixed_image(1, 1);
}
