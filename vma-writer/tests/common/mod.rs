//! Test support: a small, strict VMA decoder built on vma-format only (vma-reader is a
//! separate crate), deterministic test images and helpers to write them.
#![allow(dead_code)]

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use vma_format::cluster::{cluster_count, cluster_span, is_zero, span_mask, unpack_cluster};
use vma_format::extent_index::{self, IndexExtent, IndexKind};
use vma_format::integrity::{data_crc32c, DataChecksum, Seal, SealKind};
use vma_format::{
    ArchiveHeader, ExtentHeader, VMA_BLOCK_SIZE, VMA_CLUSTER_SIZE, VMA_WRITER_CLUSTERS_PER_EXTENT,
};
use vma_writer::{Builder, Device, WriterHandle};

pub const CLUSTER: usize = VMA_CLUSTER_SIZE;

/// Everything a decoded archive holds.
#[derive(Debug)]
pub struct Decoded {
    pub header: ArchiveHeader,
    pub header_size: usize,
    /// Device name → its bytes (declared size; vmstate: the clusters present, trimmed to
    /// the declared size).
    pub devices: BTreeMap<String, Vec<u8>>,
    /// (dev_id, cluster) of every used slot, in archive order.
    pub slots: Vec<(u8, u32)>,
    /// Data extents (the seal and the index extents not counted).
    pub extents: usize,
    /// Index extents (between the last data extent and the seal), checked to copy the
    /// data extents' headers.
    pub index_extents: usize,
    /// Extents whose CRC32C was present and verified.
    pub checksummed: usize,
    /// The seal, if the archive has one.
    pub seal: Option<Seal>,
}

/// Decodes and checks an archive strictly; panics (this is a test) on anything wrong.
pub fn decode(bytes: &[u8]) -> Decoded {
    let header = ArchiveHeader::decode(bytes).expect("archive header decodes");
    let header_size = ArchiveHeader::header_size_from_prefix(bytes).unwrap();
    let mut images: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    let mut seen: BTreeMap<u8, Vec<bool>> = BTreeMap::new();
    let mut vmstate_next = 0u32;
    for d in &header.devices {
        let len = if d.is_vmstate() { 0 } else { d.size as usize };
        images.insert(d.id.get(), vec![0u8; len]);
        seen.insert(d.id.get(), vec![false; cluster_count(d.size) as usize]);
    }
    let mut pos = header_size;
    let mut slots = Vec::new();
    let mut extents = 0;
    let mut checksummed = 0;
    let mut seal = None;
    let mut index: Vec<IndexExtent> = Vec::new();
    let mut data_headers: Vec<[u8; 512]> = Vec::new();
    // The seal's hash, computed here independently of vma-format: the archive header,
    // then each extent header as stored.
    let mut headers = Sha256::new_with_prefix(&bytes[..header_size]);
    while pos < bytes.len() {
        assert!(seal.is_none(), "bytes after the seal at {pos}");
        let extent =
            ExtentHeader::decode(&bytes[pos..]).unwrap_or_else(|e| panic!("extent at {pos}: {e}"));
        extent.check_uuid(&header.uuid).expect("extent uuid");
        let data_start = pos + vma_format::VMA_EXTENT_HEADER_SIZE;
        let data_end = data_start + extent.data_len();
        assert!(data_end <= bytes.len(), "extent at {pos} cut short");
        let data = &bytes[data_start..data_end];
        match Seal::from_extent(&extent) {
            SealKind::Seal(s) => {
                let digest: [u8; 32] = headers.clone().finalize().into();
                assert_eq!(s.sha256, digest, "seal SHA-256");
                assert_eq!(
                    s.extents,
                    (extents + index.len()) as u64,
                    "seal extent count"
                );
                seal = Some(s);
                pos = data_end;
                continue;
            }
            SealKind::NotASeal => {}
            other => panic!("bad seal at {pos}: {other:?}"),
        }
        headers.update(&bytes[pos..data_start]);
        match IndexExtent::from_extent(&extent) {
            IndexKind::Index(x) => {
                index.push(*x);
                pos = data_end;
                continue;
            }
            IndexKind::NotIndex => {}
            other => panic!("bad index extent at {pos}: {other:?}"),
        }
        assert!(index.is_empty(), "data extent after the index at {pos}");
        data_headers.push(bytes[pos..data_start].try_into().unwrap());
        extents += 1;
        match extent.data_checksum() {
            DataChecksum::Crc32c(crc) => {
                assert_eq!(crc, data_crc32c(data), "extent at {pos}: data CRC32C");
                checksummed += 1;
            }
            DataChecksum::Absent => {}
            other => panic!("extent at {pos}: {other:?}"),
        }
        let used = extent.clusters().count();
        assert!(
            used <= VMA_WRITER_CLUSTERS_PER_EXTENT,
            "extent at {pos}: {used} clusters"
        );
        for slot in extent.clusters() {
            let id = slot.device.get();
            let dev = header
                .device(slot.device)
                .unwrap_or_else(|| panic!("extent at {pos}: undeclared dev_id {id}"));
            let span = cluster_span(slot.cluster, dev.size)
                .unwrap_or_else(|| panic!("{}: cluster {} past the end", dev.name, slot.cluster));
            assert!(
                slot.mask.difference(span_mask(span)).is_empty(),
                "{}: cluster {} stores blocks past the end",
                dev.name,
                slot.cluster
            );
            let stored = &data[slot.data.clone()];
            let seen_bit = &mut seen.get_mut(&id).unwrap()[slot.cluster as usize];
            assert!(!*seen_bit, "{}: cluster {} twice", dev.name, slot.cluster);
            *seen_bit = true;
            // The straddling block is zero past the end.
            if slot.mask.has_block((span - 1) / VMA_BLOCK_SIZE)
                && !span.is_multiple_of(VMA_BLOCK_SIZE)
            {
                let tail_len = VMA_BLOCK_SIZE - span % VMA_BLOCK_SIZE;
                assert!(
                    is_zero(&stored[stored.len() - tail_len..]),
                    "{}: bytes past the end",
                    dev.name
                );
            }
            let image = images.get_mut(&id).unwrap();
            if dev.is_vmstate() {
                assert_eq!(slot.cluster, vmstate_next, "vmstate clusters out of order");
                vmstate_next += 1;
                let start = image.len();
                image.resize(start + span, 0);
                unpack_cluster(slot.mask, stored, &mut image[start..]);
            } else {
                let start = slot.cluster as usize * CLUSTER;
                unpack_cluster(slot.mask, stored, &mut image[start..start + span]);
            }
            slots.push((id, slot.cluster));
        }
        pos = data_end;
    }
    assert!(extents >= 1, "at least one extent");
    if !index.is_empty() {
        assert!(seal.is_some(), "an extent index without a seal");
        let copies = extent_index::decode(&index).expect("the extent index decodes");
        assert!(
            copies == data_headers,
            "the index copies the data extent headers"
        );
    }
    for d in &header.devices {
        if d.is_vmstate() {
            continue;
        }
        let missing: Vec<usize> = seen[&d.id.get()]
            .iter()
            .enumerate()
            .filter(|(_, s)| !**s)
            .map(|(i, _)| i)
            .take(5)
            .collect();
        assert!(
            missing.is_empty(),
            "{}: missing clusters {missing:?}",
            d.name
        );
    }
    let devices = header
        .devices
        .iter()
        .map(|d| (d.name.clone(), images.remove(&d.id.get()).unwrap()))
        .collect();
    Decoded {
        header,
        header_size,
        devices,
        slots,
        extents,
        index_extents: index.len(),
        checksummed,
        seal,
    }
}

#[allow(unused_imports)] // reason: each test crate that includes this module uses some of it
pub use vma_testkit::Rng;

/// An image of `size` bytes mixing random, zero, partly zero and single-byte 4 KiB blocks.
pub fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut out = vec![0u8; size];
    for (i, block) in out.chunks_mut(VMA_BLOCK_SIZE).enumerate() {
        match rng.below(5) {
            0 | 1 => rng.fill(block),
            2 => {}
            3 => {
                let at = rng.below(block.len() as u64) as usize;
                block[at] = (i as u8) | 1;
            }
            _ => {
                let half = block.len() / 2;
                rng.fill(&mut block[..half]);
            }
        }
    }
    if size > 0 {
        out[size - 1] = 0x5a; // the straddling block holds data
    }
    out
}

/// Number of clusters of a `size`-byte device.
pub fn clusters(size: usize) -> u32 {
    size.div_ceil(CLUSTER) as u32
}

/// The bytes of cluster `c` of an image (short for the last one).
pub fn cluster_of(image: &[u8], c: u32) -> &[u8] {
    let start = c as usize * CLUSTER;
    &image[start..(start + CLUSTER).min(image.len())]
}

/// Writes every cluster of an image in the given order, zero clusters without data.
pub fn write_in_order(handle: &WriterHandle, dev: Device, image: &[u8], order: &[u32]) {
    for &c in order {
        let data = cluster_of(image, c);
        if is_zero(data) {
            handle.write_zero_cluster(dev, c).unwrap();
        } else {
            handle.write_cluster(dev, c, data).unwrap();
        }
    }
}

#[allow(unused_imports)] // reason: each test crate that includes this module uses some of it
pub use vma_testkit::sha256_hex;

/// Asserts two byte strings are equal, reporting the first difference (not the bytes).
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    panic!(
        "{what}: differs (lengths {} vs {}, first difference at {:?})",
        got.len(),
        want.len(),
        first
    );
}

/// Declares a device of each (name, image) with the image's size, in order; returns them.
pub fn add_devices(builder: &mut Builder, images: &[(&str, Vec<u8>)]) -> Vec<Device> {
    images
        .iter()
        .map(|(name, img)| builder.add_device(name, img.len() as u64).unwrap())
        .collect()
}
