//! Property tests: valid structures round-trip, arbitrary bytes never panic a decoder, and
//! damaged vector headers are rejected with the right error.

use proptest::prelude::*;
use vma_format::*;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,40}"
}

fn header() -> impl Strategy<Value = ArchiveHeader> {
    (
        any::<u128>(),
        any::<i64>(),
        prop::collection::vec((name(), prop::collection::vec(any::<u8>(), 0..700)), 0..6),
        prop::collection::btree_map(1u8..=255, (name(), 1u64..=VMA_MAX_DEVICE_SIZE), 0..6),
    )
        .prop_filter("needs a config or a device", |(_, _, c, d)| {
            !c.is_empty() || !d.is_empty()
        })
        .prop_map(|(uuid, ctime, configs, devices)| {
            let mut seen = std::collections::HashSet::new();
            let configs = configs
                .into_iter()
                .filter(|(n, _)| seen.insert(n.clone()))
                .map(|(name, data)| ConfigEntry { name, data })
                .collect();
            let mut seen = std::collections::HashSet::new();
            let devices = devices
                .into_iter()
                .map(|(id, (n, size))| DeviceInfo {
                    id: DeviceId::new(id).unwrap(),
                    name: format!("{n}-{id}"),
                    size,
                })
                .filter(|d| seen.insert(d.name.clone()))
                .collect();
            ArchiveHeader {
                uuid: Uuid::from_u128(uuid),
                ctime,
                configs,
                devices,
            }
        })
}

fn blockinfo() -> impl Strategy<Value = BlockInfo> {
    any::<u64>().prop_map(BlockInfo::from_u64)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn headers_round_trip(h in header()) {
        let bytes = h.encode().unwrap();
        prop_assert_eq!(bytes.len() % 512, 0);
        prop_assert_eq!(ArchiveHeader::header_size_from_prefix(&bytes).unwrap(), bytes.len());
        prop_assert_eq!(ArchiveHeader::decode(&bytes).unwrap(), h);
    }

    #[test]
    fn extent_headers_round_trip(uuid in any::<u128>(), slots in prop::collection::vec(blockinfo(), 59)) {
        let e = ExtentHeader::new(Uuid::from_u128(uuid), slots.try_into().unwrap());
        let bytes = e.encode();
        let back = ExtentHeader::decode(&bytes).unwrap();
        prop_assert_eq!(&back, &e);
        prop_assert_eq!(back.clusters().map(|s| s.data.len()).sum::<usize>(), e.data_len());
    }

    #[test]
    fn blockinfo_round_trips(raw in any::<u64>()) {
        prop_assert_eq!(BlockInfo::from_u64(raw).to_u64(), raw);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..14000)) {
        let _ = ArchiveHeader::header_size_from_prefix(&bytes);
        let _ = ArchiveHeader::decode(&bytes);
        let _ = ExtentHeader::decode(&bytes);
    }

    #[test]
    fn arbitrary_header_fields_never_panic(
        fields in prop::collection::vec((0usize..12800, any::<u32>()), 1..12),
    ) {
        // A valid header with random 32-bit fields overwritten and the MD5 made right, so
        // that decoding gets past the checksum into the pointer and table checks.
        let mut bytes = vec1_header();
        for (at, value) in fields {
            let at = at.min(bytes.len() - 4);
            bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
        }
        fix_md5(&mut bytes);
        let _ = ArchiveHeader::decode(&bytes);
    }

    #[test]
    fn any_flipped_header_bit_is_caught(bit in 0usize..12800 * 8) {
        let mut bytes = vec1_header();
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(ArchiveHeader::decode(&bytes).is_err());
    }

    #[test]
    fn any_flipped_extent_header_bit_is_caught(bit in 0usize..512 * 8) {
        let v = vma_testkit::vectors().remove(0).bytes();
        let mut bytes = v[12800..12800 + 512].to_vec();
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(ExtentHeader::decode(&bytes).is_err());
    }

    #[test]
    fn cluster_codec_round_trips(
        blocks in prop::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 16),
        span in 1usize..=VMA_CLUSTER_SIZE,
    ) {
        let mut data = vec![0u8; VMA_CLUSTER_SIZE];
        for (j, &b) in blocks.iter().enumerate() {
            data[j * 4096 + (b as usize * 13) % 4096] = b;
        }
        let mask = cluster::scan_cluster(&data, span);
        prop_assert!(mask.difference(cluster::span_mask(span)).is_empty());
        let mut stored = Vec::new();
        cluster::pack_cluster(&data, span, mask, &mut stored);
        prop_assert_eq!(stored.len(), mask.stored_len());
        let mut back = vec![0x55u8; span];
        cluster::unpack_cluster(mask, &stored, &mut back);
        prop_assert_eq!(&back[..], &data[..span]);
    }
}

fn vec1_header() -> Vec<u8> {
    let v = vma_testkit::vectors().remove(0).bytes();
    v[..12800].to_vec()
}

fn fix_md5(bytes: &mut [u8]) {
    use md5::{Digest, Md5};
    bytes[32..48].fill(0);
    let sum: [u8; 16] = Md5::digest(&*bytes).into();
    bytes[32..48].copy_from_slice(&sum);
}

/// One mutation per check, each with the error it must produce.
#[test]
fn mutated_vector_headers_give_the_right_error() {
    type Mutation = (
        &'static str,
        fn(&mut Vec<u8>),
        fn(&FormatError) -> bool,
        bool,
    );
    let cases: &[Mutation] = &[
        (
            "magic",
            |b| b[0] = b'X',
            |e| matches!(e, FormatError::BadMagic { .. }),
            false,
        ),
        (
            "version",
            |b| b[7] = 2,
            |e| matches!(e, FormatError::UnsupportedVersion(2)),
            false,
        ),
        (
            "md5",
            |b| b[100] ^= 1,
            |e| matches!(e, FormatError::HeaderChecksum { .. }),
            false,
        ),
        (
            "header_size too small",
            |b| b[56..60].copy_from_slice(&12288u32.to_be_bytes()),
            |e| matches!(e, FormatError::HeaderSize { size: 12288, .. }),
            true,
        ),
        (
            "header_size 4 GiB",
            |b| b[56..60].copy_from_slice(&u32::MAX.to_be_bytes()),
            |e| matches!(e, FormatError::HeaderSize { .. }),
            true,
        ),
        (
            "blob buffer inside the fixed header",
            |b| b[48..52].copy_from_slice(&4096u32.to_be_bytes()),
            |e| matches!(e, FormatError::BlobBufferBounds { .. }),
            true,
        ),
        (
            "blob buffer past header_size",
            |b| b[52..56].copy_from_slice(&600u32.to_be_bytes()),
            |e| matches!(e, FormatError::BlobBufferBounds { .. }),
            true,
        ),
        (
            "blob chain broken",
            |b| b[12288 + 1] = 0xff,
            |e| matches!(e, FormatError::BlobChain { .. }),
            true,
        ),
        (
            "pointer into a blob",
            |b| b[2044..2048].copy_from_slice(&2u32.to_be_bytes()),
            |e| {
                matches!(
                    e,
                    FormatError::BadPointer {
                        field: BlobField::ConfigName,
                        ..
                    }
                )
            },
            true,
        ),
        (
            "device pointer past the buffer",
            |b| b[4096 + 32..4096 + 36].copy_from_slice(&9999u32.to_be_bytes()),
            |e| {
                matches!(
                    e,
                    FormatError::BadPointer {
                        field: BlobField::DeviceName,
                        ..
                    }
                )
            },
            true,
        ),
        (
            "config without data",
            |b| b[3068..3072].fill(0),
            |e| matches!(e, FormatError::ConfigUnpaired { slot: 0 }),
            true,
        ),
        (
            "name without NUL",
            |b| b[12288 + 3 + 16] = b'x',
            |e| {
                matches!(
                    e,
                    FormatError::BadName {
                        problem: NameProblem::NotTerminated,
                        ..
                    }
                )
            },
            true,
        ),
        (
            "device with size 0",
            |b| b[4096 + 32 + 8..4096 + 32 + 16].fill(0),
            |e| matches!(e, FormatError::BadDeviceSlot { id: 1, .. }),
            true,
        ),
        (
            "device slot 0 used",
            |b| b[4096 + 8..4096 + 16].copy_from_slice(&1u64.to_be_bytes()),
            |e| matches!(e, FormatError::BadDeviceSlot { id: 0, .. }),
            true,
        ),
        (
            "device too large",
            |b| b[4096 + 32 + 8..4096 + 32 + 16].copy_from_slice(&u64::MAX.to_be_bytes()),
            |e| matches!(e, FormatError::DeviceTooLarge { id: 1, .. }),
            true,
        ),
        (
            "duplicate device name",
            |b| {
                let p = b[4096 + 32..4096 + 36].to_vec();
                b[4096 + 64..4096 + 68].copy_from_slice(&p)
            },
            |e| matches!(e, FormatError::DuplicateDeviceName { .. }),
            true,
        ),
        (
            "cut short",
            |b| b.truncate(12700),
            |e| matches!(e, FormatError::TooShort { .. }),
            false,
        ),
    ];
    for (what, mutate, expect, fix) in cases {
        let mut bytes = vec1_header();
        mutate(&mut bytes);
        if *fix {
            fix_md5(&mut bytes);
        }
        let err = ArchiveHeader::decode(&bytes).expect_err(what);
        assert!(expect(&err), "{what}: got {err:?}");
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn encode_rejects_what_decode_would() {
    let dev = |id, name: &str, size| DeviceInfo {
        id: DeviceId::new(id).unwrap(),
        name: name.into(),
        size,
    };
    let base = ArchiveHeader {
        uuid: Uuid::nil(),
        ctime: 0,
        configs: vec![],
        devices: vec![],
    };
    let with = |configs: Vec<ConfigEntry>, devices| ArchiveHeader {
        configs,
        devices,
        ..base.clone()
    };
    assert_eq!(base.encode(), Err(FormatError::EmptyHeader));
    assert_eq!(
        with(vec![], vec![dev(1, "a", 0)]).encode(),
        Err(FormatError::ZeroDeviceSize { id: 1 })
    );
    assert_eq!(
        with(vec![], vec![dev(1, "a", 1), dev(1, "b", 1)]).encode(),
        Err(FormatError::DuplicateDeviceId(1))
    );
    assert!(matches!(
        with(vec![], vec![dev(1, "a", 1), dev(2, "a", 1)]).encode(),
        Err(FormatError::DuplicateDeviceName { .. })
    ));
    assert!(matches!(
        with(vec![], vec![dev(1, "", 1)]).encode(),
        Err(FormatError::BadName {
            problem: NameProblem::Empty,
            ..
        })
    ));
    assert!(matches!(
        with(vec![], vec![dev(1, "a\0b", 1)]).encode(),
        Err(FormatError::BadName {
            problem: NameProblem::InteriorNul,
            ..
        })
    ));
    assert!(matches!(
        with(vec![], vec![dev(1, "a", VMA_MAX_DEVICE_SIZE + 1)]).encode(),
        Err(FormatError::DeviceTooLarge { .. })
    ));
    let big = ConfigEntry {
        name: "x".into(),
        data: vec![1; 65536],
    };
    assert!(matches!(
        with(vec![big], vec![]).encode(),
        Err(FormatError::BlobTooLarge {
            field: BlobField::ConfigData,
            ..
        })
    ));
    let many = (0..257)
        .map(|i| ConfigEntry {
            name: format!("c{i}"),
            data: vec![],
        })
        .collect();
    assert!(matches!(
        with(many, vec![]).encode(),
        Err(FormatError::TooManyConfigs { count: 257, .. })
    ));
    // 256 configs of 65535 bytes exceed the 16 MiB header limit.
    let huge = (0..256)
        .map(|i| ConfigEntry {
            name: format!("c{i}"),
            data: vec![1; 65535],
        })
        .collect();
    assert!(matches!(
        with(huge, vec![]).encode(),
        Err(FormatError::HeaderTooLarge { .. })
    ));
}
