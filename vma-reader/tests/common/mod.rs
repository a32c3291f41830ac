//! Building archives from vma-format pieces, patching the reference vectors, and looking
//! at what an extraction left on disk.
#![allow(dead_code)]

use std::path::Path;

use sha2::{Digest, Sha256};
use vma_format::integrity::{self, Seal};
use vma_format::{
    cluster, ArchiveHeader, BlockInfo, BlockMask, ConfigEntry, DeviceId, DeviceInfo, ExtentHeader,
    Uuid, VMA_BLOCKS_PER_EXTENT, VMA_CLUSTER_SIZE, VMA_EXTENT_HEADER_SIZE,
    VMA_WRITER_CLUSTERS_PER_EXTENT,
};

/// Assembles an archive: header, then clusters packed into extents as Proxmox's writer
/// does (58 per extent), optionally with CRC32Cs and a seal.
pub struct Builder {
    pub header: ArchiveHeader,
    out: Vec<u8>,
    slots: Vec<BlockInfo>,
    data: Vec<u8>,
    checksums: bool,
    per_extent: usize,
    extents: u64,
    /// The seal's hash so far: the archive header and each extent header.
    headers: Sha256,
}

impl Builder {
    pub fn new(devices: &[(&str, u64)], configs: &[(&str, &[u8])]) -> Builder {
        Builder::with_header(ArchiveHeader {
            uuid: Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0001),
            ctime: 1_700_000_000,
            configs: configs
                .iter()
                .map(|(n, d)| ConfigEntry {
                    name: n.to_string(),
                    data: d.to_vec(),
                })
                .collect(),
            devices: devices
                .iter()
                .enumerate()
                .map(|(i, (n, size))| DeviceInfo {
                    id: DeviceId::new(i as u8 + 1).unwrap(),
                    name: n.to_string(),
                    size: *size,
                })
                .collect(),
        })
    }

    pub fn with_header(header: ArchiveHeader) -> Builder {
        let out = header.encode().expect("header encodes");
        Builder {
            header,
            headers: Sha256::new_with_prefix(&out),
            out,
            slots: Vec::new(),
            data: Vec::new(),
            checksums: false,
            per_extent: VMA_WRITER_CLUSTERS_PER_EXTENT,
            extents: 0,
        }
    }

    pub fn checksums(mut self, yes: bool) -> Builder {
        self.checksums = yes;
        self
    }

    pub fn per_extent(mut self, n: usize) -> Builder {
        self.per_extent = n;
        self
    }

    fn size_of(&self, dev: u8) -> u64 {
        self.header
            .device(DeviceId::new(dev).unwrap())
            .expect("declared device")
            .size
    }

    /// Adds a cluster from its content (up to 64 KiB), storing its non-zero blocks.
    pub fn cluster(&mut self, dev: u8, number: u32, content: &[u8]) {
        let span = cluster::cluster_span(number, self.size_of(dev)).expect("inside device");
        let mask = cluster::scan_cluster(content, span);
        let mut stored = Vec::new();
        cluster::pack_cluster(content, span, mask, &mut stored);
        self.raw(
            BlockInfo::new(DeviceId::new(dev).unwrap(), number, mask),
            &stored,
        );
    }

    /// Adds a slot as given, with `stored` as its data.
    pub fn raw(&mut self, info: BlockInfo, stored: &[u8]) {
        self.slots.push(info);
        self.data.extend_from_slice(stored);
        if self.slots.len() == self.per_extent {
            self.flush();
        }
    }

    /// Adds every cluster of a device from its image.
    pub fn device(&mut self, dev: u8, image: &[u8]) {
        let count = cluster::cluster_count(self.size_of(dev));
        for c in 0..count {
            let start = (c as usize * VMA_CLUSTER_SIZE).min(image.len());
            let end = (start + VMA_CLUSTER_SIZE).min(image.len());
            self.cluster(dev, c as u32, &image[start..end]);
        }
    }

    /// Writes the pending slots as one extent (also an empty one).
    pub fn flush(&mut self) {
        let mut slots = [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT];
        slots[..self.slots.len()].copy_from_slice(&self.slots);
        let mut extent = ExtentHeader::new(self.header.uuid, slots);
        if self.checksums {
            assert!(extent.set_data_checksum(integrity::data_crc32c(&self.data)));
        }
        let encoded = extent.encode();
        self.headers.update(encoded);
        self.out.extend_from_slice(&encoded);
        self.out.extend_from_slice(&self.data);
        self.slots.clear();
        self.data.clear();
        self.extents += 1;
    }

    fn flush_pending(&mut self) {
        if !self.slots.is_empty() {
            self.flush();
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.flush_pending();
        self.out
    }

    pub fn finish_sealed(mut self) -> Vec<u8> {
        self.flush_pending();
        let seal = Seal {
            extents: self.extents,
            sha256: self.headers.finalize().into(),
        };
        self.out
            .extend_from_slice(&seal.to_extent(self.header.uuid).encode());
        self.out
    }
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An image with random, zero, partly-zero and single-byte regions.
pub fn mixed_image(len: usize, seed: u64) -> Vec<u8> {
    let mut img = noise(len, seed);
    let mut at = 0;
    let mut i = 0u64;
    while at < len {
        let chunk = (VMA_CLUSTER_SIZE * (1 + (i % 3) as usize)).min(len - at);
        match i % 4 {
            0 => img[at..at + chunk].fill(0),
            1 => {
                // Zero every other 4 KiB block.
                for b in (at..at + chunk).step_by(8192) {
                    img[b..(b + 4096).min(at + chunk)].fill(0);
                }
            }
            2 => {}
            _ => {
                img[at..at + chunk].fill(0);
                img[at + chunk / 2] = 0x5a;
            }
        }
        at += chunk;
        i += 1;
    }
    img
}

/// The extents of an archive: (offset, decoded header).
pub fn extents(bytes: &[u8]) -> Vec<(usize, ExtentHeader)> {
    let mut pos = ArchiveHeader::header_size_from_prefix(bytes).unwrap();
    let mut out = Vec::new();
    while pos + VMA_EXTENT_HEADER_SIZE <= bytes.len() {
        let e = ExtentHeader::decode(&bytes[pos..]).unwrap();
        let len = e.extent_len();
        out.push((pos, e));
        pos += len;
    }
    out
}

/// Decodes the extent at `offset`, lets `f` change it, and encodes it back with a fresh
/// MD5.
pub fn patch_extent(bytes: &mut [u8], offset: usize, f: impl FnOnce(&mut ExtentHeader)) {
    let mut e = ExtentHeader::decode(&bytes[offset..]).unwrap();
    f(&mut e);
    bytes[offset..offset + VMA_EXTENT_HEADER_SIZE].copy_from_slice(&e.encode());
}

/// Re-encodes the header with `f` applied; the extents keep working as long as the
/// uuid and the header size stay the same.
pub fn patch_header(bytes: &[u8], f: impl FnOnce(&mut ArchiveHeader)) -> Vec<u8> {
    let old = ArchiveHeader::header_size_from_prefix(bytes).unwrap();
    let mut h = ArchiveHeader::decode(bytes).unwrap();
    f(&mut h);
    let mut out = h.encode().unwrap();
    assert_eq!(out.len(), old, "patched header changed size");
    out.extend_from_slice(&bytes[old..]);
    out
}

/// The first extent slot (offset, slot index, blockinfo) of a device, in archive order.
pub fn first_slot(bytes: &[u8], dev: u8, skip: usize) -> (usize, usize, BlockInfo) {
    extents(bytes)
        .into_iter()
        .flat_map(|(off, e)| {
            e.blockinfo
                .iter()
                .enumerate()
                .filter(|(_, b)| b.dev_id == dev)
                .map(|(i, b)| (off, i, *b))
                .collect::<Vec<_>>()
        })
        .nth(skip)
        .expect("slot")
}

pub fn mask(bits: u16) -> BlockMask {
    BlockMask::from_bits_retain(bits)
}

/// Every path under `root`, relative, sorted (folders end in `/`).
pub fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                out.push(format!("{rel}/"));
                walk(root, &p, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// A scratch area: `root/a/b/out` is the extraction folder, so that names like `../../x`
/// would land inside `root` where `tree` sees them.
pub struct Scratch {
    pub root: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("a/b/out")).unwrap();
        Scratch { root }
    }

    pub fn out(&self) -> std::path::PathBuf {
        self.root.path().join("a/b/out")
    }

    /// Asserts that nothing but the empty folders exists.
    pub fn assert_untouched(&self) {
        assert_eq!(
            tree(self.root.path()),
            ["a/", "a/b/", "a/b/out/"],
            "a failed extraction left files behind"
        );
    }
}

/// Extracts `bytes` with the default options into a fresh [`Scratch`], which must fail and
/// leave nothing behind; returns the error.
pub fn extract_refused(bytes: &[u8]) -> vma_reader::Error {
    let s = Scratch::new();
    let err = vma_reader::Extractor::new(s.out())
        .extract(bytes)
        .expect_err("extract must fail");
    s.assert_untouched();
    err
}

#[allow(unused_imports)] // reason: each test crate that includes this module uses some of it
pub use vma_testkit::sha256_hex;

/// Writes `bytes` to `dir/name`; returns the path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Every device of both archives (a plain one and the same packed), read whole and in
/// random pieces of up to `max_piece` bytes, is the same.
pub fn assert_same_devices(
    plain: &vma_reader::SeekableArchive,
    packed: &vma_reader::SeekableArchive,
    seed: u64,
    max_piece: u64,
) {
    use std::io::Read;
    assert_eq!(plain.header(), packed.header());
    assert_eq!(plain.integrity(), packed.integrity());
    assert_eq!(plain.len(), packed.len());
    let mut rng = vma_testkit::Rng(seed);
    for d in plain.devices() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        plain.device(d.id).unwrap().read_to_end(&mut a).unwrap();
        packed.device(d.id).unwrap().read_to_end(&mut b).unwrap();
        assert!(a == b, "device {} differs", d.name);
        let reader = packed.device(d.id).unwrap();
        for _ in 0..50 {
            let offset = rng.below(d.size + 1);
            let len = rng.below(max_piece) as usize;
            let mut buf = vec![0xcc; len];
            let n = reader.read_at(&mut buf, offset).unwrap();
            let start = offset as usize;
            let end = (start + len).min(a.len());
            assert_eq!(n, end - start);
            assert!(buf[..n] == a[start..end], "{} at {offset}+{len}", d.name);
        }
    }
}

/// [`assert_same_devices`], and the packed archive verifies without a finding.
pub fn assert_same_and_verified(
    plain: &vma_reader::SeekableArchive,
    packed: &vma_reader::SeekableArchive,
    seed: u64,
    max_piece: u64,
    what: &str,
) {
    assert_same_devices(plain, packed, seed, max_piece);
    let report = vma_reader::verify(packed, vma_reader::VerifyOptions::new()).unwrap();
    assert!(report.is_ok(), "{what}: {report:?}");
}

/// 40 MiB in two devices, sealed: 30 MiB of mixed data (seed 5) and `second` (10 MiB and
/// a bit, say).
pub fn two_device_archive(second: &[u8]) -> Vec<u8> {
    archive_of(&mixed_image(30 << 20, 5), second)
}

/// A sealed archive with checksums of devices `drive-scsi0` (`first`) and `drive-scsi1`
/// (`second`), written in that order, and a config.
pub fn archive_of(first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut builder = Builder::new(
        &[
            ("drive-scsi0", first.len() as u64),
            ("drive-scsi1", second.len() as u64),
        ],
        &[("qemu-server.conf", b"memory: 512\n")],
    )
    .checksums(true);
    builder.device(1, first);
    builder.device(2, second);
    builder.finish_sealed()
}

/// `bytes` written to `a.vma` in a new temporary folder and opened: the folder (for packed
/// copies next to it), the bytes and the archive.
pub fn open_in_tempdir(
    bytes: Vec<u8>,
) -> (tempfile::TempDir, Vec<u8>, vma_reader::SeekableArchive) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "a.vma", &bytes);
    let archive = vma_reader::SeekableArchive::open(&path).unwrap();
    (dir, bytes, archive)
}

/// A byte source that counts its positional reads (what each costs over a network).
#[derive(Debug)]
pub struct CountingReadAt {
    pub bytes: Vec<u8>,
    pub reads: std::sync::atomic::AtomicUsize,
}

impl CountingReadAt {
    pub fn new(bytes: Vec<u8>) -> std::sync::Arc<CountingReadAt> {
        std::sync::Arc::new(CountingReadAt {
            bytes,
            reads: Default::default(),
        })
    }

    /// Reads so far.
    pub fn reads(&self) -> usize {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl vma_reader::ReadAt for CountingReadAt {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match self.bytes.get(start..).and_then(|b| b.get(..buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}
