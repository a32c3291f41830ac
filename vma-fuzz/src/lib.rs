//! Shared checks of the vma-rs fuzz targets (see `fuzz_targets/`), kept in a library so
//! that they can also be run on a corpus by ordinary tests or by hand.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use vma_reader::{verify, Extractor, SeekableArchive, VerifyOptions};

/// Most bytes of one device the seekable target reads from its start.
const SEEKABLE_READ_CAP: u64 = 4 << 20;
/// Most allocation runs walked per device.
const ALLOCATION_STEPS: usize = 4096;

/// Every path under `root`, recursively (symlinks not followed).
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            out.push(path.clone());
            if is_dir {
                stack.push(path);
            }
        }
    }
    out
}

/// Extracts `data` into `<tempdir>/out` and checks that nothing is created outside it,
/// that nothing but plain files directly inside it are created, that no temporary file
/// is left behind, and that a failed extraction leaves no file under a final name.
pub fn check_extract(data: &[u8]) {
    let root = tempfile::tempdir().expect("tempdir");
    let out = root.path().join("out");
    fs::create_dir(&out).expect("create out");
    let result = Extractor::new(&out).extract(data);
    for path in walk(root.path()) {
        assert!(
            path.starts_with(&out),
            "extract created {} outside its target directory",
            path.display()
        );
        if path == out {
            continue;
        }
        assert_eq!(
            path.parent(),
            Some(out.as_path()),
            "extract created {} below its target directory",
            path.display()
        );
        let meta = fs::symlink_metadata(&path).expect("metadata");
        assert!(meta.is_file(), "{} is not a plain file", path.display());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.ends_with(".partial"),
            "temporary file {name} left behind ({result:?})"
        );
        assert!(
            result.is_ok(),
            "failed extraction ({result:?}) left {name} under a final name"
        );
    }
}

/// Parses `data` as a whole zstd stream's seek table (its last bytes) and checks what a
/// table that parses promises: the frames fill the bytes before the table, each content
/// offset maps to the frame that holds it, and (with a zero descriptor) encoding the
/// frames again gives the same table.
pub fn check_seek_table(data: &[u8]) {
    use vma_format::seek_table::{self, FrameEntry, SeekIndex};
    let stream_len = data.len() as u64;
    let Ok(len) = SeekIndex::table_len(data, stream_len) else {
        return;
    };
    assert!(len <= data.len());
    let table = &data[data.len() - len..];
    let Ok(index) = SeekIndex::parse(table, stream_len) else {
        return;
    };
    assert_eq!(index.compressed_len(), stream_len - len as u64);
    let mut entries = Vec::new();
    let (mut compressed, mut content) = (0u64, 0u64);
    for i in 0..index.frames() {
        let f = index.frame(i).expect("a listed frame");
        assert_eq!((f.compressed_offset, f.offset), (compressed, content));
        assert!(f.len <= seek_table::MAX_FRAME_CONTENT && f.compressed_len > 0);
        if f.len > 0 {
            assert_eq!(index.frame_at(f.offset), Some(i));
            assert_eq!(index.frame_at(f.offset + f.len as u64 - 1), Some(i));
        }
        compressed += f.compressed_len as u64;
        content += f.len as u64;
        entries.push(FrameEntry {
            compressed: f.compressed_len,
            decompressed: f.len,
        });
    }
    assert_eq!(index.frame(index.frames()), None);
    assert_eq!(index.content_len(), content);
    assert_eq!(index.frame_at(content), None);
    // The descriptor's unused bits and its checksum flag are not re-encoded.
    if table[len - 5] == 0 {
        assert_eq!(seek_table::encode(&entries), table);
    }
}

/// Decodes `data` as a run of 512-byte extents taken as an extent index
/// ([`vma_format::extent_index`]) and checks what an index that decodes promises: the
/// streaming decoder agrees with [`decode`](vma_format::extent_index::decode), the number
/// of index extents is the fewest the copies need, and encoding the copies again with the
/// same uuid gives the same extents.
pub fn check_extent_index(data: &[u8]) {
    use vma_format::extent_index::{self, Decoder, IndexExtent, IndexKind};
    use vma_format::ExtentHeader;
    let mut extents = Vec::new();
    let mut uuid = None;
    for raw in data.chunks_exact(512) {
        let Ok(e) = ExtentHeader::decode(raw) else {
            return;
        };
        if *uuid.get_or_insert(e.uuid) != e.uuid {
            return;
        }
        match IndexExtent::from_extent(&e) {
            IndexKind::Index(x) => {
                assert_eq!(x.to_extent(e.uuid).encode()[..], raw[..]);
                extents.push(*x);
            }
            _ => return,
        }
    }
    let whole = extent_index::decode(&extents);
    let mut decoder = Decoder::new();
    let mut streamed = Vec::new();
    let pushed = extents
        .iter()
        .try_for_each(|x| decoder.push(x, |h| streamed.push(*h)));
    let finished = pushed.and_then(|()| decoder.finish());
    match (&whole, finished) {
        (Ok(copies), Ok(n)) => {
            assert_eq!(n, copies.len() as u64);
            assert_eq!(&streamed, copies);
            assert_eq!(extent_index::extents_for(n), extents.len() as u64);
            let again =
                extent_index::encode(uuid.expect("one extent at least"), copies).expect("encodes");
            let raw: Vec<u8> = again.iter().flatten().copied().collect();
            assert_eq!(raw[..], data[..raw.len()]);
        }
        (Err(a), Err(b)) => assert_eq!(*a, b),
        (a, b) => panic!("decode {a:?} but streaming {b:?}"),
    }
}

/// Indexes `data` as a whole lzop file ([`vma_reader::lzop::LzopIndex`]) and checks what
/// an index that scans promises: blocks follow each other in the file and in the content,
/// each within lzop's limits, every content offset maps to the block that holds it; and
/// it agrees with the streaming reader: decoding every block gives what
/// [`vma_reader::lzop::LzopReader`] gives, and the streaming reader fails exactly when a
/// block fails to decode or the index does not scan. At most 16 MiB of content is decoded.
pub fn check_lzop_index(data: &[u8]) {
    use std::io::{Cursor, Read};
    use vma_reader::lzop::{LzopIndex, LzopReader, MAX_BLOCK_SIZE};
    const CAP: u64 = 16 << 20;
    let streamed = LzopReader::new(data).and_then(|mut r| {
        let mut out = Vec::new();
        match (&mut r).take(CAP + 1).read_to_end(&mut out) {
            Ok(_) => Ok(out),
            Err(e) => Err(vma_reader::lzop::LzopError::Io {
                offset: 0,
                source: e,
            }),
        }
    });
    let index = match LzopIndex::scan(Cursor::new(data), data.len() as u64) {
        Ok(index) => index,
        Err(e) => {
            assert!(e.offset() <= data.len() as u64, "{e}");
            // What does not index does not stream either (the index reads the same
            // headers, and a stream ends where its data runs out).
            if let Ok(out) = &streamed {
                assert!(out.len() as u64 > CAP, "streams but does not index: {e}");
            }
            return;
        }
    };
    let (mut at, mut content) = (None, 0u64);
    for n in 0..index.blocks() {
        let b = *index.block(n).expect("a listed block");
        assert!(b.len > 0 && b.len <= MAX_BLOCK_SIZE);
        assert!(b.compressed_len > 0 && b.compressed_len <= b.len);
        assert!(b.header_offset + b.file_len() <= data.len() as u64);
        if let Some(next) = at {
            assert_eq!(b.header_offset, next);
        }
        assert_eq!(b.offset, content);
        assert_eq!(index.block_at(b.offset), Some(n));
        assert_eq!(index.block_at(b.offset + u64::from(b.len) - 1), Some(n));
        at = Some(b.header_offset + b.file_len());
        content += u64::from(b.len);
    }
    assert_eq!(index.block(index.blocks()), None);
    assert_eq!(index.content_len(), content);
    assert_eq!(index.block_at(content), None);
    if content > CAP {
        return;
    }
    let mut decoded = Vec::new();
    let mut failed = false;
    for n in 0..index.blocks() {
        let b = *index.block(n).expect("a listed block");
        let start = b.header_offset as usize;
        match index.decode(n, &data[start..start + b.file_len() as usize]) {
            Ok(block) => {
                assert_eq!(block.len(), b.len as usize);
                decoded.extend_from_slice(&block);
            }
            Err(e) => {
                assert_eq!(e.offset(), b.header_offset, "{e}");
                failed = true;
                break;
            }
        }
    }
    match (&streamed, failed) {
        (Ok(out), false) => assert!(*out == decoded, "the index and the stream differ"),
        (Err(_), true) => {}
        (Ok(_), true) => panic!("a block fails to decode but the stream reads"),
        (Err(e), false) => panic!("every block decodes but the stream fails: {e}"),
    }
}

/// Opens `data` as a [`SeekableArchive`] from a temporary file and reads every device
/// through `read_at` and `allocation`, checking that they agree.
pub fn check_seekable(data: &[u8]) {
    let mut file = tempfile::tempfile().expect("tempfile");
    std::io::Write::write_all(&mut file, data).expect("write tempfile");
    let Ok(archive) = SeekableArchive::from_file(file) else {
        return;
    };
    let devices = archive.devices().to_vec();
    for info in devices {
        let Ok(dev) = archive.device(info.id) else {
            continue;
        };
        let size = dev.size();
        assert_eq!(size, info.size);
        // From the start, in odd-sized reads.
        let limit = size.min(SEEKABLE_READ_CAP);
        let mut buf = vec![0u8; 65536 + 777];
        let mut pos = 0u64;
        while pos < limit {
            let n = dev
                .read_at(&mut buf, pos)
                .expect("read_at inside the device");
            assert!(n > 0, "short read at {pos} of {size}");
            assert!(n as u64 <= size - pos);
            // Where allocation says zero, the bytes are zero.
            let mut at = pos;
            let end = pos + n as u64;
            while at < end {
                let run = dev.allocation(at, end - at).expect("allocation inside");
                let (len, stored) = (run.len, run.stored);
                assert!(len > 0 && len <= end - at);
                if !stored {
                    let s = (at - pos) as usize;
                    let e = s + len as usize;
                    assert!(buf[s..e].iter().all(|&b| b == 0), "hole reads non-zero");
                }
                at += len;
            }
            pos = end;
        }
        // Around the end and past it.
        for off in [
            size.saturating_sub(4097),
            size.saturating_sub(1),
            size,
            size.saturating_add(1),
            u64::MAX,
        ] {
            let n = dev
                .read_at(&mut buf[..8192], off)
                .expect("read_at near the end");
            assert_eq!(n as u64, (size.saturating_sub(off)).min(8192));
        }
        // Allocation runs over the whole device, bounded.
        let mut at = 0u64;
        for _ in 0..ALLOCATION_STEPS {
            match dev.allocation(at, u64::MAX) {
                Some(run) => {
                    let len = run.len;
                    assert!(len > 0 && len <= size - at);
                    at += len;
                }
                None => {
                    assert!(at >= size);
                    break;
                }
            }
        }
        assert!(dev.allocation(size, 1).is_none());
        let _ = dev.is_allocated(u32::MAX);
        // The Read + Seek side, a little.
        let mut reader = dev;
        let mut small = [0u8; 4096];
        let _ = reader.read(&mut small);
    }
}

/// Number of bytes in a cluster.
const CLUSTER: u64 = 65536;

/// One device of a [`Plan`].
#[derive(Debug, Arbitrary)]
pub struct DevSpec {
    /// Size selector: 1 ..= 5 clusters.
    pub size: u32,
}

/// How to fill written data.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct Fill {
    /// Byte value of stored blocks (0 gives zero data).
    pub value: u8,
    /// Which 4 KiB blocks of each cluster carry data; the others are zero.
    pub blocks: u16,
}

impl Fill {
    fn bytes(self, start: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                let at = start + i;
                let block = (at % CLUSTER) / 4096;
                if self.blocks & (1 << block) != 0 {
                    self.value ^ (at / 4096) as u8
                } else {
                    0
                }
            })
            .collect()
    }
}

/// A length choice relative to the device.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Len {
    /// A whole cluster.
    Cluster,
    /// Up to the device end.
    ToEnd,
    /// Whole clusters.
    Clusters(u8),
    /// Any length (mostly invalid).
    Raw(u32),
}

/// One writer operation.
#[derive(Debug, Arbitrary)]
pub enum Op {
    /// `write_cluster`.
    Cluster {
        /// Device index (mod device count + 1: an out-of-range index uses a foreign device).
        dev: u8,
        /// Cluster number.
        cluster: u8,
        /// Data length.
        len: Len,
        /// Contents.
        fill: Fill,
    },
    /// `write_zero_cluster`.
    ZeroCluster {
        /// Device index.
        dev: u8,
        /// Cluster number.
        cluster: u32,
    },
    /// `write_range`.
    Range {
        /// Device index.
        dev: u8,
        /// Offset in clusters.
        cluster: u8,
        /// Added to the offset (misaligned unless 0).
        misalign: u16,
        /// Length.
        len: Len,
        /// Contents.
        fill: Fill,
    },
    /// `write_zero_range`.
    ZeroRange {
        /// Device index.
        dev: u8,
        /// Offset.
        offset: u64,
        /// Length.
        len: Len,
    },
    /// `append_vmstate`.
    Vmstate {
        /// Length.
        len: u16,
        /// Contents.
        fill: Fill,
    },
}

/// A whole archive: devices, optional vmstate, operations.
#[derive(Debug, Arbitrary)]
pub struct Plan {
    /// Up to 4 devices are used.
    pub devices: Vec<DevSpec>,
    /// Declared vmstate size (0..=3 clusters), if any.
    pub vmstate: Option<u32>,
    /// Integrity extension on or off.
    pub integrity: bool,
    /// The writes.
    pub ops: Vec<Op>,
    /// Fill every missing cluster with zeros before finishing.
    pub complete: bool,
}

struct Model {
    size: u64,
    bytes: Vec<u8>,
    written: Vec<bool>,
}

impl Model {
    fn clusters(&self) -> u64 {
        self.size.div_ceil(CLUSTER)
    }
    fn len(&self, offset: u64, len: Len) -> u64 {
        match len {
            Len::Cluster => CLUSTER,
            Len::ToEnd => self.size.saturating_sub(offset),
            Len::Clusters(n) => u64::from(n % 6) * CLUSTER,
            Len::Raw(n) => u64::from(n % (6 * CLUSTER as u32)),
        }
    }
    /// Records a successful write of `len` bytes (`data` or zeros) at `offset`.
    fn store(&mut self, offset: u64, len: u64, data: Option<&[u8]>) {
        let first = offset / CLUSTER;
        let last = (offset + len).div_ceil(CLUSTER);
        for c in first..last.min(self.clusters()) {
            assert!(
                !self.written[c as usize],
                "writer accepted cluster {c} twice"
            );
            self.written[c as usize] = true;
        }
        let end = (offset + len).min(self.size);
        if offset < end {
            let dst = &mut self.bytes[offset as usize..end as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[..dst.len()]),
                None => dst.fill(0),
            }
        }
    }
}

/// Runs a [`Plan`] against the writer; it must never panic, and whatever finishes must
/// verify and read back, streaming and seekable, exactly as written.
pub fn check_roundtrip(plan: &Plan) {
    let mut builder = vma_writer::Builder::new();
    builder.integrity(plan.integrity);
    builder.ctime(1_700_000_000);
    builder
        .add_config("qemu-server.conf", b"memory: 512\n")
        .expect("config");
    let mut devs = Vec::new();
    let mut models = Vec::new();
    for (i, spec) in plan.devices.iter().take(4).enumerate() {
        let size = u64::from(spec.size % (5 * CLUSTER as u32)) + 1;
        let dev = builder
            .add_device(&format!("d{i}"), size)
            .expect("add_device");
        devs.push(dev);
        models.push(Model {
            size,
            bytes: vec![0; size as usize],
            written: vec![false; size.div_ceil(CLUSTER) as usize],
        });
    }
    let vm_size = plan
        .vmstate
        .map(|s| u64::from(s % (3 * CLUSTER as u32)) + 1);
    let vmstate = vm_size.map(|s| builder.add_vmstate(s).expect("add_vmstate"));
    let mut vm_bytes = Vec::new();

    // A device of another archive, for misuse.
    let mut other = vma_writer::Builder::new();
    let foreign = other.add_device("x", CLUSTER).expect("foreign device");

    let writer = match builder.build(Vec::new()) {
        Ok(w) => w,
        Err(_) => {
            assert!(devs.is_empty() && vmstate.is_none());
            return;
        }
    };
    let pick = |dev: u8| -> (vma_writer::Device, Option<usize>) {
        let i = dev as usize % (devs.len() + 1);
        if i < devs.len() {
            (devs[i], Some(i))
        } else {
            (foreign, None)
        }
    };
    for op in plan.ops.iter().take(64) {
        match *op {
            Op::Cluster {
                dev,
                cluster,
                len,
                fill,
            } => {
                let (d, m) = pick(dev);
                let start = u64::from(cluster) * CLUSTER;
                let n = m
                    .map_or(CLUSTER, |m| models[m].len(start, len))
                    .min(CLUSTER + 10);
                let data = fill.bytes(start, n as usize);
                if writer.write_cluster(d, u32::from(cluster), &data).is_ok() {
                    let m = m.expect("foreign device accepted");
                    let model = &mut models[m];
                    assert!(u64::from(cluster) < model.clusters());
                    let span = (model.size - start).min(CLUSTER);
                    assert!(
                        n >= span && n <= CLUSTER,
                        "write_cluster accepted {n} bytes"
                    );
                    model.store(start, span, Some(&data));
                }
            }
            Op::ZeroCluster { dev, cluster } => {
                let (d, m) = pick(dev);
                if writer.write_zero_cluster(d, cluster).is_ok() {
                    let model = &mut models[m.expect("foreign device accepted")];
                    let start = u64::from(cluster) * CLUSTER;
                    assert!(start < model.size);
                    model.store(start, (model.size - start).min(CLUSTER), None);
                }
            }
            Op::Range {
                dev,
                cluster,
                misalign,
                len,
                fill,
            } => {
                let (d, m) = pick(dev);
                let offset = u64::from(cluster % 8) * CLUSTER + u64::from(misalign % 3);
                let n = m.map_or(CLUSTER, |m| models[m].len(offset, len));
                let data = fill.bytes(offset, n as usize);
                if writer.write_range(d, offset, &data).is_ok() {
                    let model = &mut models[m.expect("foreign device accepted")];
                    assert_eq!(offset % CLUSTER, 0, "misaligned range accepted");
                    assert!(offset + n <= model.clusters() * CLUSTER);
                    model.store(offset, n, Some(&data));
                }
            }
            Op::ZeroRange { dev, offset, len } => {
                let (d, m) = pick(dev);
                let offset = offset % (8 * CLUSTER + 3);
                let n = m.map_or(CLUSTER, |m| models[m].len(offset, len));
                if writer.write_zero_range(d, offset, n).is_ok() {
                    let model = &mut models[m.expect("foreign device accepted")];
                    assert_eq!(offset % CLUSTER, 0, "misaligned zero range accepted");
                    model.store(offset, n, None);
                }
            }
            Op::Vmstate { len, fill } => {
                let data = fill.bytes(vm_bytes.len() as u64, usize::from(len));
                if let Some(vm) = vmstate {
                    let ok = writer.append_vmstate(vm, &data).is_ok();
                    let fits = (vm_bytes.len() + data.len()) as u64 <= vm_size.unwrap_or(0);
                    assert_eq!(ok, fits, "append_vmstate of {len} bytes");
                    if ok {
                        vm_bytes.extend_from_slice(&data);
                    }
                }
            }
        }
    }
    if plan.complete {
        for (i, model) in models.iter_mut().enumerate() {
            for c in 0..model.clusters() {
                if !model.written[c as usize] {
                    writer
                        .write_zero_cluster(devs[i], c as u32)
                        .expect("zero fill");
                    let start = c * CLUSTER;
                    model.store(start, (model.size - start).min(CLUSTER), None);
                }
            }
        }
    }
    let complete = models.iter().all(|m| m.written.iter().all(|&w| w));
    let archive = match writer.finish() {
        Ok((_, archive)) => {
            assert!(complete, "finish succeeded with clusters missing");
            archive
        }
        Err(e) => {
            assert!(!complete, "finish failed on a complete archive: {e}");
            return;
        }
    };

    let report = verify(&archive[..], VerifyOptions::default()).expect("verify");
    assert!(report.is_ok(), "verify report not ok");

    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    fs::create_dir(&out).expect("create out");
    Extractor::new(&out).extract(&archive[..]).expect("extract");
    for (i, model) in models.iter().enumerate() {
        let got = fs::read(out.join(format!("disk-d{i}.raw"))).expect("read disk");
        assert!(got == model.bytes, "device d{i} differs after extract");
    }
    if vmstate.is_some() {
        let got = fs::read(out.join("vmstate.bin")).expect("read vmstate");
        assert!(got.len() >= vm_bytes.len(), "vmstate shorter than appended");
        assert!(got[..vm_bytes.len()] == vm_bytes[..], "vmstate differs");
        assert!(got[vm_bytes.len()..].iter().all(|&b| b == 0));
    }

    let path = dir.path().join("a.vma");
    fs::write(&path, &archive).expect("write archive");
    let seekable = SeekableArchive::open(&path).expect("seekable open");
    for (i, model) in models.iter().enumerate() {
        let dev = seekable.device(format!("d{i}").as_str()).expect("device");
        let mut got = vec![0u8; model.size as usize];
        let n = dev.read_at(&mut got, 0).expect("read_at");
        assert_eq!(n as u64, model.size);
        assert!(got == model.bytes, "device d{i} differs when read in place");
    }
}

/// The sidecar index of a stock `.vma.zst` over arbitrary bytes, two ways. As a sidecar
/// (checked against the archive its own trailer names, so the table's checks are reached):
/// one that parses describes contiguous segments, ascending and within the archive, every
/// content offset mapping to its segment, and header reads that parse are ascending and
/// within the archive. As a zstd stream: one that indexes has an index
/// that parses against it, and decoding every segment gives what zstd decodes of the
/// whole stream; a stream zstd decodes within 16 MiB either indexes or is refused as
/// `CannotIndex`, never as damage.
pub fn check_zstd_index(data: &[u8]) {
    use std::io::Read;
    use vma_reader::zstd_index::{build, ZstdIndex, ZstdIndexError, MAX_SEGMENT, TRAILER_SIZE};
    const CAP: u64 = 16 << 20;
    if data.len() as u64 >= TRAILER_SIZE {
        let t = &data[data.len() - TRAILER_SIZE as usize..];
        let archive_len = u64::from_le_bytes(t[..8].try_into().expect("8 bytes"));
        let tail: [u8; 4] = t[8..12].try_into().expect("4 bytes");
        if let Ok(index) = ZstdIndex::from_bytes(data, archive_len, tail) {
            let mut content = 0u64;
            let mut end = 0u64;
            for n in 0..index.segments() {
                let s = *index.segment(n).expect("a listed segment");
                assert_eq!(s.offset, content);
                assert!(s.len > 0 && u64::from(s.len) <= MAX_SEGMENT);
                assert!(s.compressed_offset >= end);
                end = s.compressed_offset + u64::from(s.compressed_len);
                assert!(end <= archive_len);
                assert!(s.prefix_offset + u64::from(s.prefix_stored_len) <= data.len() as u64);
                assert_eq!(index.segment_at(s.offset), Some(n));
                assert_eq!(index.segment_at(s.offset + u64::from(s.len) - 1), Some(n));
                content += u64::from(s.len);
            }
            assert_eq!(content, index.content_len());
            assert_eq!(index.segment_at(content), None);
            if let Some((at, len)) = index.header_section() {
                let stored = &data[at as usize..][..len as usize];
                if let Ok(reads) = vma_reader::zstd_index::parse_headers(stored, at, content) {
                    let mut end = 0;
                    for (offset, bytes) in reads {
                        assert!(offset >= end && !bytes.is_empty());
                        end = offset + bytes.len() as u64;
                        assert!(end <= content);
                    }
                }
            }
        }
    }
    // As a stream: bounded by what zstd decodes of it.
    let mut whole = Vec::new();
    let decoded = zstd::stream::read::Decoder::new(data)
        .map(|d| d.take(CAP + 1).read_to_end(&mut whole).is_ok())
        .unwrap_or(false);
    if whole.len() as u64 > CAP {
        return;
    }
    let mut idx = Vec::new();
    match build(data, &mut idx) {
        Ok(summary) => {
            assert!(decoded, "indexes but zstd does not decode it");
            assert_eq!(summary.content_len, whole.len() as u64);
            let tail: [u8; 4] = data[data.len() - 4..].try_into().expect("4 bytes");
            let index = ZstdIndex::from_bytes(&idx, data.len() as u64, tail).expect("its index");
            for n in 0..index.segments() {
                let s = *index.segment(n).expect("a listed segment");
                let c = &data[s.compressed_offset as usize..][..s.compressed_len as usize];
                let p = &idx[s.prefix_offset as usize..][..s.prefix_stored_len as usize];
                let out = index.decode(n, c, p).expect("a verified segment decodes");
                assert!(
                    out[..] == whole[s.offset as usize..][..s.len as usize],
                    "segment {n}"
                );
            }
        }
        Err(ZstdIndexError::CannotIndex { .. }) => {}
        Err(e) => {
            // zstd's own decoder tolerates what we refuse only at the edges we are
            // stricter about (trailing bytes, dictionaries, windows): never a panic.
            let _ = e;
        }
    }
}
