//! The prefetching reader (input read on a thread of its own, several small extents per
//! buffer) against the direct one: the same extents, the same data, the same report, the
//! same error at the same byte, whatever the input holds.

mod common;

use std::io::{self, Cursor, Read};

use common::{extents, mixed_image, noise, Builder};
use vma_format::integrity::data_crc32c;
use vma_format::{VMA_CLUSTER_SIZE, VMA_EXTENT_HEADER_SIZE};
use vma_reader::{ArchiveStream, PrefetchingReader, ReadOptions, StreamReader, PREFETCH_BUFFERS};

/// Everything a reader hands out, as text: each extent's place, size, checksum state and
/// data CRC, then the report or the error (and that a further call fails).
fn transcript<S: ArchiveStream>(opened: vma_reader::Result<S>) -> String {
    let mut r = match opened {
        Ok(r) => r,
        Err(e) => return format!("open: {e}"),
    };
    let mut out = String::new();
    loop {
        match r.next_extent() {
            Ok(Some(e)) => {
                out += &format!(
                    "{} {} {} {:?} {:08x}\n",
                    e.index(),
                    e.offset(),
                    e.len(),
                    e.checksum(),
                    data_crc32c(e.data())
                )
            }
            Ok(None) => {
                out += &format!("end at {}: {:?}\n", r.position(), r.report());
                break;
            }
            Err(e) => {
                out += &format!("error: {e}\n");
                out += &format!("then: {:?}\n", r.next_extent().map(|x| x.is_some()));
                break;
            }
        }
    }
    out
}

fn both<R: Read + Send + 'static>(make: impl Fn() -> R) -> (String, String) {
    let direct = transcript(StreamReader::with_options(make(), ReadOptions::default()));
    let prefetched = transcript(PrefetchingReader::with_options(
        make(),
        ReadOptions::default(),
    ));
    (direct, prefetched)
}

/// A sealed archive whose extents vary in size: single small ones, then full ones of
/// dense data that do not fit after them in a prefetch buffer (so a read header is
/// carried over to the next buffer), then runs of header-only extents.
fn varied() -> Vec<u8> {
    let dense = noise(80 * VMA_CLUSTER_SIZE, 7);
    let mixed = mixed_image(40 * VMA_CLUSTER_SIZE + 1234, 8);
    let zeros = 3000 * VMA_CLUSTER_SIZE as u64;
    let mut b = Builder::new(
        &[
            ("drive-dense", dense.len() as u64),
            ("drive-mixed", mixed.len() as u64),
            ("drive-zero", zeros),
        ],
        &[("qemu-server.conf", b"memory: 512\n")],
    )
    .checksums(true);
    for c in 0..12u32 {
        let at = c as usize * VMA_CLUSTER_SIZE;
        b.cluster(1, c, &dense[at..at + VMA_CLUSTER_SIZE]);
        b.flush();
    }
    for c in 12..80u32 {
        let at = c as usize * VMA_CLUSTER_SIZE;
        b.cluster(1, c, &dense[at..at + VMA_CLUSTER_SIZE]);
    }
    b.flush();
    b.device(2, &mixed);
    b.flush();
    // 3000 header-only extents: three times what one buffer gathers.
    for c in 0..3000u32 {
        b.cluster(3, c, &[]);
        b.flush();
    }
    b.finish_sealed()
}

#[test]
fn a_whole_archive_reads_the_same() {
    let bytes = varied();
    let n = extents(&bytes).len();
    assert!(n > 3000, "{n} extents");
    let (direct, prefetched) = both(|| Cursor::new(bytes.clone()));
    assert!(direct.contains("Sealed"), "{direct}");
    assert_eq!(direct, prefetched);
}

#[test]
fn cut_anywhere_reads_the_same() {
    let bytes = varied();
    let mut cuts: Vec<usize> = (0..bytes.len()).step_by(200_003).collect();
    // Around every boundary of the first extents: inside, at, and just past a header.
    for (off, _) in extents(&bytes).into_iter().take(30) {
        for d in [0, 1, 511, 512, 513, 4096 + 512] {
            cuts.push(off + d);
        }
    }
    cuts.push(bytes.len() - 1);
    // Without its seal the archive is complete, and unsealed.
    let unsealed = bytes[..bytes.len() - VMA_EXTENT_HEADER_SIZE].to_vec();
    let (direct, prefetched) = both(|| Cursor::new(unsealed.clone()));
    assert!(direct.contains("Unsealed"), "{direct}");
    assert_eq!(direct, prefetched);
    for cut in cuts.into_iter().filter(|&c| c <= bytes.len()) {
        let part = bytes[..cut].to_vec();
        let (direct, prefetched) = both(|| Cursor::new(part.clone()));
        assert_eq!(direct, prefetched, "cut at {cut}");
        assert!(
            direct.contains("error: ") || direct.starts_with("open: "),
            "cut at {cut}: {direct}"
        );
    }
}

#[test]
fn damaged_bytes_read_the_same() {
    let bytes = varied();
    let mut at: Vec<usize> = extents(&bytes)
        .into_iter()
        .take(20)
        .flat_map(|(off, _)| [off, off + 40, off + 100, off + 600])
        .collect();
    at.push(bytes.len() - 100); // the seal
    for at in at {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x10;
        let (direct, prefetched) = both(|| Cursor::new(damaged.clone()));
        assert_eq!(direct, prefetched, "byte {at} flipped");
    }
    let mut trailing = bytes.clone();
    trailing.extend_from_slice(&[0u8; 700]);
    let (direct, prefetched) = both(|| Cursor::new(trailing.clone()));
    assert!(direct.contains("after its seal"), "{direct}");
    assert_eq!(direct, prefetched);
}

/// A `Read` that fails once it reaches byte `at`.
struct FailAt {
    inner: Cursor<Vec<u8>>,
    at: u64,
}

impl Read for FailAt {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let pos = self.inner.position();
        if pos >= self.at {
            return Err(io::Error::other("the disk is on fire"));
        }
        let room = ((self.at - pos) as usize).min(buf.len());
        self.inner.read(&mut buf[..room])
    }
}

#[test]
fn read_errors_are_reported_at_the_same_byte() {
    let bytes = varied();
    let ext = extents(&bytes);
    let mut ats = vec![100u64, 20_000];
    for (off, _) in ext.iter().skip(10).take(5) {
        ats.extend([*off as u64, *off as u64 + 300, *off as u64 + 5000]);
    }
    ats.push(bytes.len() as u64 - 10);
    for at in ats {
        let (direct, prefetched) = both(|| FailAt {
            inner: Cursor::new(bytes.clone()),
            at,
        });
        assert!(direct.contains("the disk is on fire"), "at {at}: {direct}");
        assert_eq!(direct, prefetched, "failing at {at}");
    }
}

/// The buffers the reading thread allocates stay within [`PREFETCH_BUFFERS`] extents
/// however long the archive, and grow only as far as its extents need.
#[test]
fn memory_is_bounded_by_the_buffers() {
    let most = |bytes: Vec<u8>| {
        let mut r =
            PrefetchingReader::with_options(Cursor::new(bytes), ReadOptions::default()).unwrap();
        let mut most = 0;
        while r.next_extent().unwrap().is_some() {
            most = most.max(r.memory());
        }
        most
    };
    let page = vma_iobuf::PAGE;
    let varied = most(varied());
    let ceiling = PREFETCH_BUFFERS * (vma_format::VMA_MAX_EXTENT_SIZE + page) + (1 << 20);
    assert!(varied <= ceiling, "{varied} > {ceiling}");
    assert!(
        varied > vma_format::VMA_MAX_EXTENT_SIZE,
        "{varied}: a full-size extent is counted"
    );

    // Header-only extents: small buffers, however many.
    let mut b = Builder::new(&[("drive-zero", 5000 * VMA_CLUSTER_SIZE as u64)], &[]);
    for c in 0..5000u32 {
        b.cluster(1, c, &[]);
        b.flush();
    }
    let small = most(b.finish());
    assert!(small <= PREFETCH_BUFFERS * (2 << 20), "{small}");
}

/// Dropping a reader in the middle stops its thread (which would otherwise hold the
/// input): the input is dropped soon after.
#[test]
fn dropping_the_reader_releases_the_input() {
    struct Flag(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        Cursor<Vec<u8>>,
    );
    impl Read for Flag {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1.read(buf)
        }
    }
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut r = PrefetchingReader::with_options(
        Flag(dropped.clone(), Cursor::new(varied())),
        ReadOptions::default(),
    )
    .unwrap();
    assert!(r.next_extent().unwrap().is_some());
    drop(r);
    for _ in 0..500 {
        if dropped.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the reading thread still holds the input after 5 s");
}

/// A `Read` that panics in the reading thread: the reader reports an I/O error at the
/// byte it had reached instead of hanging or panicking itself.
#[test]
fn a_panicking_input_is_an_error() {
    struct Panics(Cursor<Vec<u8>>, u64);
    impl Read for Panics {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            assert!(self.0.position() < self.1, "input exploded (on purpose)");
            let room = ((self.1 - self.0.position()) as usize).min(buf.len());
            self.0.read(&mut buf[..room])
        }
    }
    let bytes = varied();
    let mut r =
        PrefetchingReader::with_options(Panics(Cursor::new(bytes), 50_000), ReadOptions::default())
            .unwrap();
    let err = loop {
        match r.next_extent() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the archive cannot end"),
            Err(e) => break e,
        }
    };
    assert!(
        err.to_string().contains("the reading thread stopped"),
        "{err}"
    );
    assert_eq!(err.kind(), vma_reader::ErrorKind::Io);
}
