//! The archives Proxmox's own `vma` made decode to what it says they hold, and re-encode
//! to the same bytes.

use vma_format::{
    cluster, ArchiveHeader, ExtentHeader, VMA_EXTENT_HEADER_SIZE, VMA_WRITER_CLUSTERS_PER_EXTENT,
};
use vma_testkit::{parse_list_line, vectors};

#[test]
fn every_vector_header_matches_the_reference_listing() {
    for v in vectors() {
        let bytes = v.bytes();
        let header = ArchiveHeader::decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", v.file));
        let mut cfgs = header.configs.iter();
        let mut devs = header.devices.iter();
        for line in &v.list {
            match parse_list_line(line) {
                Some(("CFG", size, name)) => {
                    let c = cfgs.next().expect("config in listing order");
                    assert_eq!(
                        (c.name.as_str(), c.data.len() as u64),
                        (name, size),
                        "{}",
                        v.file
                    );
                    let expected = v.file(name).expect("config extracted");
                    assert_eq!(vma_testkit::sha256_hex(&c.data), expected.sha256);
                }
                Some(("DEV", size, name)) => {
                    let d = devs.next().expect("device in listing order");
                    assert_eq!((d.name.as_str(), d.size), (name, size), "{}", v.file);
                    assert!(line.starts_with(&format!("DEV: dev_id={} ", d.id)));
                }
                _ => assert!(line.starts_with("CTIME: "), "unexpected line {line}"),
            }
        }
        assert!(cfgs.next().is_none() && devs.next().is_none(), "{}", v.file);
    }
}

#[test]
fn every_vector_header_reencodes_byte_exact() {
    for v in vectors() {
        let bytes = v.bytes();
        let size = ArchiveHeader::header_size_from_prefix(&bytes[..12288]).unwrap();
        let header = ArchiveHeader::decode(&bytes).unwrap();
        assert_eq!(header.encode().unwrap(), bytes[..size], "{}", v.file);
    }
}

#[test]
fn every_extent_decodes_reencodes_and_covers_each_cluster_once() {
    for v in vectors() {
        let bytes = v.bytes();
        let header = ArchiveHeader::decode(&bytes).unwrap();
        let mut pos = ArchiveHeader::header_size_from_prefix(&bytes).unwrap();
        let mut seen: Vec<Vec<bool>> = header
            .devices
            .iter()
            .map(|d| vec![false; d.cluster_count() as usize])
            .collect();
        let mut extents = 0;
        while pos < bytes.len() {
            let raw = &bytes[pos..pos + VMA_EXTENT_HEADER_SIZE];
            let extent =
                ExtentHeader::decode(raw).unwrap_or_else(|e| panic!("{} @{pos}: {e}", v.file));
            extent.check_uuid(&header.uuid).unwrap();
            assert_eq!(extent.encode()[..], raw[..], "{} extent at {pos}", v.file);
            assert!(extent.clusters().count() <= VMA_WRITER_CLUSTERS_PER_EXTENT);
            let data = &bytes[pos + VMA_EXTENT_HEADER_SIZE..pos + extent.extent_len()];
            for slot in extent.clusters() {
                let dev = header
                    .devices
                    .iter()
                    .position(|d| d.id == slot.device)
                    .unwrap();
                let span = cluster::cluster_span(slot.cluster, header.devices[dev].size).unwrap();
                assert!(slot.mask.difference(cluster::span_mask(span)).is_empty());
                // The reference writer never stores an all-zero block.
                for (_, at) in slot.mask.stored_block_offsets() {
                    let block = &data[slot.data.start + at..slot.data.start + at + 4096];
                    assert!(!cluster::is_zero(block));
                }
                let seen = &mut seen[dev][slot.cluster as usize];
                assert!(!*seen, "duplicate cluster");
                *seen = true;
            }
            pos += extent.extent_len();
            extents += 1;
        }
        assert_eq!(pos, bytes.len());
        assert!(
            extents >= 1,
            "the reference always writes at least one extent"
        );
        assert!(
            seen.iter().all(|d| d.iter().all(|&s| s)),
            "{}: missing cluster",
            v.file
        );
    }
}
