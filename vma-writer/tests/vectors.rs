//! The writer against archives made by Proxmox's own `vma create` (spec/vectors).

mod common;

use common::*;
use vma_testkit::{parse_list_line, vectors, vectors_dir};
use vma_writer::Builder;

/// Rebuilds a reference vector: same uuid, ctime, configs (given as paths, like
/// `vma create -c`), devices, and the reference's cluster order.
fn rebuild(reference: &[u8], integrity: bool) -> (Vec<u8>, Decoded) {
    let r = decode(reference);
    let mut builder = Builder::new();
    builder
        .uuid(r.header.uuid)
        .ctime(r.header.ctime)
        .integrity(integrity);
    for config in &r.header.configs {
        let path = vectors_dir().join(&config.name);
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            data, config.data,
            "spec/vectors/{} is what the vector holds",
            config.name
        );
        builder.add_config(path.to_str().unwrap(), &data).unwrap();
    }
    let mut devices = Vec::new();
    for d in &r.header.devices {
        let dev = builder.add_device(&d.name, d.size).unwrap();
        assert_eq!(dev.id(), d.id, "ids are handed out in registration order");
        devices.push(dev);
    }
    let writer = builder.build(Vec::new()).unwrap();
    for &(id, cluster) in &r.slots {
        let dev = devices[usize::from(id) - 1];
        let name = &r.header.devices[usize::from(id) - 1].name;
        write_in_order(&writer.handle(), dev, &r.devices[name], &[cluster]);
    }
    let (summary, bytes) = writer.finish().unwrap();
    assert_eq!(summary.archive_bytes, bytes.len() as u64);
    (bytes, r)
}

#[test]
fn headers_equal_the_reference() {
    for v in vectors() {
        let reference = v.bytes();
        for integrity in [false, true] {
            let (ours, r) = rebuild(&reference, integrity);
            assert_same(&ours[..r.header_size], &reference[..r.header_size], &v.file);
        }
    }
}

#[test]
fn without_integrity_archives_equal_the_reference_byte_for_byte() {
    for v in vectors() {
        let reference = v.bytes();
        let (ours, _) = rebuild(&reference, false);
        assert_same(&ours, &reference, &v.file);
    }
}

#[test]
fn with_integrity_the_data_is_the_same_and_sealed() {
    for v in vectors() {
        let reference = v.bytes();
        let (ours, r) = rebuild(&reference, true);
        let d = decode(&ours);
        assert!(d.seal.is_some(), "{}", v.file);
        assert_eq!(d.checksummed, d.extents);
        assert_eq!(d.extents, r.extents, "{}: same extents", v.file);
        assert_eq!(d.slots, r.slots);
        for (name, data) in &r.devices {
            assert_same(&d.devices[name], data, name);
        }
        // Only the extent index and the seal were added.
        let index = vma_format::extent_index::extents_for(d.extents as u64) as usize;
        assert_eq!(d.index_extents, index, "{}", v.file);
        assert_eq!(
            ours.len(),
            reference.len() + 512 * index + 512,
            "{}",
            v.file
        );
    }
}

#[test]
fn vectors_hold_what_expected_txt_lists() {
    // The decoder these tests rely on agrees with the reference tool's own listing.
    for v in vectors() {
        let r = decode(&v.bytes());
        for line in &v.list {
            match parse_list_line(line) {
                Some(("CFG", size, name)) => {
                    assert_eq!(
                        r.header.config(name).map(|c| c.data.len() as u64),
                        Some(size)
                    )
                }
                Some(("DEV", size, name)) => {
                    assert_eq!(r.header.device_by_name(name).map(|d| d.size), Some(size));
                    let file = v.file(&format!("disk-{name}.raw")).unwrap();
                    assert_eq!(sha256_hex(&r.devices[name]), file.sha256, "{name}");
                }
                _ => {}
            }
        }
    }
}
