//! Hostile archives, one per check the readers make: each must fail with its exact error
//! variant in the library (`verify`, `Extractor`, and `SeekableArchive` failing too), and
//! `vma verify` / `vma extract` must exit 3 with that error's message on stderr, never
//! panic, write nothing outside the target directory and leave no file that looks
//! complete. Also: a header declaring 255 devices of 256 TiB costs no memory.
//!
//! `cli.rs` checks a few damaged files for the exit code only and `vma-reader`'s
//! `damage.rs` checks the reader's data-path errors on patched vectors; this table
//! covers every check, header field by header field, through both.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use vma_format::{
    ArchiveHeader, BlobField, BlockInfo, BlockMask, ConfigEntry, DeviceId, DeviceInfo,
    ExtentHeader, FormatError, NameProblem, Uuid, VMA_BLOCKS_PER_EXTENT, VMA_MAX_DEVICE_SIZE,
};
use vma_reader::{verify, Error, ErrorKind, Extractor, SeekableArchive, VerifyOptions};
use vma_testkit::{assert_success, run_ok, vectors};

fn vma() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vma"));
    cmd.env("TZ", "UTC");
    cmd
}

// ---------------------------------------------------------------------------------------
// Building archives byte by byte.

fn md5(data: &[u8]) -> [u8; 16] {
    use md5::{Digest, Md5};
    Md5::digest(data).into()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Recomputes the header MD5 (bytes 32..48) over the header's `header_size` bytes.
fn reseal_header(b: &mut [u8]) {
    let size = be32(b, 56) as usize;
    b[32..48].fill(0);
    let sum = md5(&b[..size]);
    b[32..48].copy_from_slice(&sum);
}

/// Recomputes the MD5 (bytes 24..40) of the extent header at `at`.
fn reseal_extent(b: &mut [u8], at: usize) {
    b[at + 24..at + 40].fill(0);
    let sum = md5(&b[at..at + 512]);
    b[at + 24..at + 40].copy_from_slice(&sum);
}

const UUID: Uuid = Uuid::from_u128(0x0bad_0bad_0bad_0bad_0bad_0bad_0bad_0bad);
const DEV_INFO: usize = 4096;

fn dev(id: u8) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn header(devices: &[(&str, u64)], config_name: &str) -> ArchiveHeader {
    ArchiveHeader {
        uuid: UUID,
        ctime: 1_700_000_000,
        configs: vec![ConfigEntry {
            name: config_name.into(),
            data: b"cores: 1\n".to_vec(),
        }],
        devices: devices
            .iter()
            .enumerate()
            .map(|(i, &(name, size))| DeviceInfo {
                id: dev(i as u8 + 1),
                name: name.into(),
                size,
            })
            .collect(),
    }
}

/// One extent holding these slots; each stored block is filled with 0xab.
fn extent(uuid: Uuid, slots: &[BlockInfo]) -> Vec<u8> {
    let mut all = [BlockInfo::EMPTY; VMA_BLOCKS_PER_EXTENT];
    all[..slots.len()].copy_from_slice(slots);
    let ext = ExtentHeader::new(uuid, all);
    let mut out = ext.encode().to_vec();
    out.resize(512 + ext.data_len(), 0xab);
    out
}

/// The archive the table damages: a config and one 128 KiB device whose cluster 0
/// stores one block and whose cluster 1 is zero; one extent.
fn good() -> Vec<u8> {
    let mut b = header(&[("drive-scsi0", 131072)], "qemu-server.conf")
        .encode()
        .unwrap();
    b.extend(extent(
        UUID,
        &[
            BlockInfo::new(dev(1), 0, BlockMask::B0),
            BlockInfo::new(dev(1), 1, BlockMask::empty()),
        ],
    ));
    b
}

/// `good()` with a different archive body after its header.
fn with_extents(h: &ArchiveHeader, extents: &[Vec<u8>]) -> Vec<u8> {
    let mut b = h.encode().unwrap();
    for e in extents {
        b.extend_from_slice(e);
    }
    b
}

fn header_len(b: &[u8]) -> usize {
    be32(b, 56) as usize
}

/// Position in the archive of the blob a pointer points to.
fn blob_at(b: &[u8], ptr: u32) -> usize {
    be32(b, 48) as usize + ptr as usize
}

// ---------------------------------------------------------------------------------------
// The table.

type Check = fn(&Error) -> bool;

struct Case {
    what: &'static str,
    bytes: Vec<u8>,
    kind: ErrorKind,
    check: Check,
    /// Whether `verify` (and `vma verify`) must fail too; names are an extraction matter.
    verify_fails: bool,
}

fn case(what: &'static str, bytes: Vec<u8>, check: Check) -> Case {
    Case {
        what,
        bytes,
        kind: ErrorKind::Damaged,
        check,
        verify_fails: true,
    }
}

fn fmt_err(e: &Error) -> Option<&FormatError> {
    match e {
        Error::Header(f) => Some(f),
        Error::Extent { source, .. } => Some(source),
        _ => None,
    }
}

fn cases() -> Vec<Case> {
    let g = good();
    let hs = header_len(&g);
    let ext_at = hs;
    let patch = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = g.clone();
        f(&mut b);
        b
    };
    let h1 = header(&[("drive-scsi0", 131072)], "qemu-server.conf");
    let slot = |c: u32, m: BlockMask| BlockInfo::new(dev(1), c, m);
    let mut v = vec![
        case("bad magic", patch(&|b| b[0] = b'X'), |e| {
            matches!(fmt_err(e), Some(FormatError::BadMagic { .. }))
        }),
        case("version 2", patch(&|b| put32(b, 4, 2)), |e| {
            matches!(fmt_err(e), Some(FormatError::UnsupportedVersion(2)))
        }),
        case("header MD5", patch(&|b| b[24] ^= 1), |e| {
            matches!(fmt_err(e), Some(FormatError::HeaderChecksum { .. }))
        }),
        case(
            "header_size huge",
            patch(&|b| put32(b, 56, 0x7fff_fe00)),
            |e| {
                matches!(
                    fmt_err(e),
                    Some(FormatError::HeaderSize {
                        size: 0x7fff_fe00,
                        ..
                    })
                )
            },
        ),
        case(
            "header_size u32::MAX",
            patch(&|b| put32(b, 56, u32::MAX)),
            |e| matches!(fmt_err(e), Some(FormatError::HeaderSize { .. })),
        ),
        case(
            "header_size = fixed header",
            patch(&|b| put32(b, 56, 12288)),
            |e| {
                matches!(
                    fmt_err(e),
                    Some(FormatError::HeaderSize { size: 12288, .. })
                )
            },
        ),
        case("header_size small", patch(&|b| put32(b, 56, 512)), |e| {
            matches!(fmt_err(e), Some(FormatError::HeaderSize { size: 512, .. }))
        }),
        case(
            "blob buffer ends past header_size",
            patch(&|b| {
                let hs = be32(b, 56);
                put32(b, 52, hs);
            }),
            |e| matches!(fmt_err(e), Some(FormatError::BlobBufferBounds { .. })),
        ),
        case(
            "blob buffer inside the fixed header",
            patch(&|b| put32(b, 48, 4096)),
            |e| {
                matches!(
                    fmt_err(e),
                    Some(FormatError::BlobBufferBounds { offset: 4096, .. })
                )
            },
        ),
        case("blob buffer empty", patch(&|b| put32(b, 52, 0)), |e| {
            matches!(
                fmt_err(e),
                Some(FormatError::BlobBufferBounds { size: 0, .. })
            )
        }),
        case(
            "device name pointer past the used blobs",
            patch(&|b| {
                let used = be32(b, 52);
                put32(b, DEV_INFO + 32, used + 10);
                reseal_header(b);
            }),
            |e| {
                matches!(
                    fmt_err(e),
                    Some(FormatError::BadPointer {
                        field: BlobField::DeviceName,
                        ..
                    })
                )
            },
        ),
        case(
            "config name pointer into the middle of a blob",
            patch(&|b| {
                let p = be32(b, 2044);
                put32(b, 2044, p + 3);
                reseal_header(b);
            }),
            |e| {
                matches!(
                    fmt_err(e),
                    Some(FormatError::BadPointer {
                        field: BlobField::ConfigName,
                        ..
                    })
                )
            },
        ),
        case(
            "device name without NUL",
            patch(&|b| {
                let at = blob_at(b, be32(b, DEV_INFO + 32));
                let len = u16::from_le_bytes([b[at], b[at + 1]]) as usize;
                b[at + 2 + len - 1] = b'x';
                reseal_header(b);
            }),
            |e| {
                matches!(
                    fmt_err(e),
                    Some(FormatError::BadName {
                        problem: NameProblem::NotTerminated,
                        ..
                    })
                )
            },
        ),
        case(
            "config name without data",
            patch(&|b| {
                put32(b, 3068, 0);
                reseal_header(b);
            }),
            |e| matches!(fmt_err(e), Some(FormatError::ConfigUnpaired { slot: 0 })),
        ),
        case(
            "device slot with a size but no name",
            patch(&|b| {
                b[DEV_INFO + 2 * 32 + 8..DEV_INFO + 2 * 32 + 16]
                    .copy_from_slice(&65536u64.to_be_bytes());
                reseal_header(b);
            }),
            |e| matches!(fmt_err(e), Some(FormatError::BadDeviceSlot { id: 2, .. })),
        ),
        case(
            "device slot with a name but size 0",
            patch(&|b| {
                b[DEV_INFO + 32 + 8..DEV_INFO + 32 + 16].fill(0);
                reseal_header(b);
            }),
            |e| matches!(fmt_err(e), Some(FormatError::BadDeviceSlot { id: 1, .. })),
        ),
        case(
            "device in reserved slot 0",
            patch(&|b| {
                let (name, size) = (be32(b, DEV_INFO + 32), 65536u64);
                put32(b, DEV_INFO, name);
                b[DEV_INFO + 8..DEV_INFO + 16].copy_from_slice(&size.to_be_bytes());
                reseal_header(b);
            }),
            |e| matches!(fmt_err(e), Some(FormatError::BadDeviceSlot { id: 0, .. })),
        ),
        case(
            "device over 256 TiB",
            patch(&|b| {
                b[DEV_INFO + 32 + 8..DEV_INFO + 32 + 16]
                    .copy_from_slice(&(VMA_MAX_DEVICE_SIZE + 1).to_be_bytes());
                reseal_header(b);
            }),
            |e| matches!(fmt_err(e), Some(FormatError::DeviceTooLarge { id: 1, .. })),
        ),
        case(
            "nonzero reserved header byte",
            patch(&|b| {
                b[100] = 1;
                reseal_header(b);
            }),
            |e| {
                matches!(
                    e,
                    Error::HeaderReserved {
                        offset: 100,
                        value: 1
                    }
                )
            },
        ),
        case("header cut", g[..hs - 1].to_vec(), |e| {
            matches!(e, Error::TruncatedHeader { .. })
        }),
        case("extent magic", patch(&|b| b[ext_at] = b'X'), |e| {
            matches!(fmt_err(e), Some(FormatError::ExtentBadMagic { .. }))
        }),
        case(
            "extent reserved field",
            patch(&|b| {
                b[ext_at + 5] = 1;
                reseal_extent(b, ext_at);
            }),
            |e| matches!(fmt_err(e), Some(FormatError::ExtentReserved(1))),
        ),
        case("extent MD5", patch(&|b| b[ext_at + 100] ^= 1), |e| {
            matches!(fmt_err(e), Some(FormatError::ExtentChecksum { .. }))
        }),
        case(
            "extent of another archive",
            with_extents(
                &h1,
                &[extent(
                    Uuid::from_u128(1),
                    &[slot(0, BlockMask::B0), slot(1, BlockMask::empty())],
                )],
            ),
            |e| matches!(e, Error::ExtentUuid { .. }),
        ),
        case(
            "block_count larger than the masks",
            patch(&|b| {
                b[ext_at + 6..ext_at + 8].copy_from_slice(&2u16.to_be_bytes());
                reseal_extent(b, ext_at);
            }),
            |e| matches!(fmt_err(e), Some(FormatError::ExtentBlockCount { .. })),
        ),
        case(
            "block_count 0xffff",
            patch(&|b| {
                b[ext_at + 6..ext_at + 8].copy_from_slice(&u16::MAX.to_be_bytes());
                reseal_extent(b, ext_at);
            }),
            |e| matches!(fmt_err(e), Some(FormatError::ExtentBlockCount { .. })),
        ),
        case("cut mid extent header", g[..ext_at + 100].to_vec(), |e| {
            matches!(e, Error::TruncatedExtent { needed: 512, .. })
        }),
        case("cut mid extent data", g[..g.len() - 1].to_vec(), |e| {
            matches!(e, Error::TruncatedExtent { .. })
        }),
        case(
            "duplicate cluster",
            with_extents(
                &h1,
                &[
                    extent(UUID, &[slot(0, BlockMask::B0), slot(1, BlockMask::empty())]),
                    extent(UUID, &[slot(1, BlockMask::B0)]),
                ],
            ),
            |e| matches!(e, Error::DuplicateCluster { cluster: 1, .. }),
        ),
        case(
            "missing cluster",
            with_extents(&h1, &[extent(UUID, &[slot(0, BlockMask::B0)])]),
            |e| matches!(e, Error::MissingCluster { cluster: 1, .. }),
        ),
        case("no extent at all", with_extents(&h1, &[]), |e| {
            matches!(e, Error::MissingCluster { cluster: 0, .. })
        }),
        case(
            "cluster past the device end",
            with_extents(
                &h1,
                &[extent(
                    UUID,
                    &[
                        slot(0, BlockMask::B0),
                        slot(1, BlockMask::empty()),
                        slot(2, BlockMask::empty()),
                    ],
                )],
            ),
            |e| {
                matches!(
                    e,
                    Error::ClusterPastEnd {
                        cluster: 2,
                        clusters: 2,
                        ..
                    }
                )
            },
        ),
        case(
            "mask storing blocks past the device end",
            with_extents(
                &header(&[("drive-scsi0", 70_000)], "qemu-server.conf"),
                &[extent(
                    UUID,
                    &[
                        slot(0, BlockMask::empty()),
                        slot(1, BlockMask::from_bits_retain(1 << 5)),
                    ],
                )],
            ),
            |e| matches!(e, Error::MaskPastEnd { cluster: 1, .. }),
        ),
        case(
            "undeclared device",
            with_extents(
                &h1,
                &[extent(
                    UUID,
                    &[
                        slot(0, BlockMask::B0),
                        BlockInfo::new(dev(9), 0, BlockMask::empty()),
                    ],
                )],
            ),
            |e| matches!(e, Error::UnknownDevice { dev_id: 9, .. }),
        ),
        case(
            "vmstate out of order",
            with_extents(
                &header(&[("vmstate", 3 * 65536)], "qemu-server.conf"),
                &[extent(
                    UUID,
                    &[slot(1, BlockMask::B0), slot(0, BlockMask::B0)],
                )],
            ),
            |e| {
                matches!(
                    e,
                    Error::VmstateOrder {
                        expected: 0,
                        found: 1,
                        ..
                    }
                )
            },
        ),
        case(
            "slot reserved bits",
            patch(&|b| {
                // blockinfo[0] at 40: mask(16) reserved(8) dev(8) cluster(32).
                b[ext_at + 40 + 2] = 0x80;
                reseal_extent(b, ext_at);
            }),
            |e| {
                matches!(
                    e,
                    Error::SlotReserved {
                        slot: 0,
                        value: 0x80,
                        ..
                    }
                )
            },
        ),
    ];
    for name in ["../../x", "..", "a/b", "/etc/passwd", "."] {
        let h = header(&[("drive-scsi0", 131072)], name);
        let mut c = case(
            "hostile config name",
            with_extents(
                &h,
                &[extent(
                    UUID,
                    &[slot(0, BlockMask::B0), slot(1, BlockMask::empty())],
                )],
            ),
            |e| matches!(e, Error::UnsafeName { .. }),
        );
        c.kind = ErrorKind::UnsafeName;
        c.verify_fails = false;
        v.push(c);
    }
    for name in ["../x", "a/b", &"n".repeat(300)] {
        let h = header(&[(name, 131072)], "qemu-server.conf");
        let mut c = case(
            "hostile device name",
            with_extents(
                &h,
                &[extent(
                    UUID,
                    &[slot(0, BlockMask::B0), slot(1, BlockMask::empty())],
                )],
            ),
            |e| matches!(e, Error::UnsafeName { .. }),
        );
        c.kind = ErrorKind::UnsafeName;
        c.verify_fails = false;
        v.push(c);
    }
    v
}

#[test]
fn the_base_archive_is_good() {
    let g = good();
    assert!(verify(&g[..], VerifyOptions::default()).unwrap().is_ok());
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("out")).unwrap();
    Extractor::new(dir.path().join("out"))
        .extract(&g[..])
        .unwrap();
    run_ok(vma().arg("verify").arg(write_tmp(&dir, &g)));
}

fn write_tmp(dir: &tempfile::TempDir, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.path().join("hostile.vma");
    fs::write(&p, bytes).unwrap();
    p
}

/// Every path under `root`, relative to it.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_check_fails_with_its_own_error_in_the_library() {
    for c in cases() {
        let what = c.what;
        let verified = verify(&c.bytes[..], VerifyOptions::default());
        if c.verify_fails {
            let e = verified
                .err()
                .unwrap_or_else(|| panic!("{what}: verify passed"));
            assert!((c.check)(&e), "{what}: verify gave {e:?}");
            assert_eq!(e.kind(), c.kind, "{what}: {e}");
        }

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let e = Extractor::new(&out)
            .extract(&c.bytes[..])
            .err()
            .unwrap_or_else(|| panic!("{what}: extract passed"));
        assert!((c.check)(&e), "{what}: extract gave {e:?}");
        assert_eq!(e.kind(), c.kind, "{what}: {e}");
        let left: Vec<_> = tree(dir.path())
            .into_iter()
            .filter(|p| p != "out")
            .collect();
        assert!(left.is_empty(), "{what}: extract left {left:?}");

        if c.verify_fails {
            let path = write_tmp(&dir, &c.bytes);
            assert!(
                SeekableArchive::open(&path).is_err(),
                "{what}: seekable opened"
            );
        }
    }
}

fn cli(args: &[&str], archive: &Path, target: Option<&Path>) -> (Output, String) {
    let mut cmd = vma();
    cmd.args(args).arg(archive);
    if let Some(t) = target {
        cmd.arg(t);
    }
    let out = cmd.output().expect("vma runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

#[test]
fn every_check_fails_cleanly_in_the_command() {
    for c in cases() {
        let what = c.what;
        let dir = tempfile::tempdir().unwrap();
        let archive = write_tmp(&dir, &c.bytes);
        let lib = tempfile::tempdir().unwrap();
        let lib_err = Extractor::new(lib.path())
            .extract(&c.bytes[..])
            .unwrap_err();
        let message = lib_err.to_string();

        let (out, stderr) = cli(&["verify"], &archive, None);
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        if c.verify_fails {
            assert_eq!(out.status.code(), Some(3), "{what}: verify: {stderr}");
            assert!(stderr.starts_with("vma: "), "{what}: {stderr}");
            assert!(
                stderr.contains(&message),
                "{what}: {stderr:?} lacks {message:?}"
            );
        } else {
            assert_eq!(out.status.code(), Some(0), "{what}: verify: {stderr}");
        }

        let target = dir.path().join("target");
        let (out, stderr) = cli(&["extract"], &archive, Some(&target));
        assert_eq!(out.status.code(), Some(3), "{what}: extract: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert!(
            stderr.contains(&message),
            "{what}: {stderr:?} lacks {message:?}"
        );
        for p in tree(dir.path()) {
            assert!(
                p == "hostile.vma" || p == "target",
                "{what}: extract left {p}"
            );
        }
    }
}

/// A header declaring 255 devices of 256 TiB, then an extent naming the last cluster of
/// the last device and lying about its block count, or telling the truth and ending:
/// neither may make `vma verify` allocate in proportion to the declared sizes.
#[test]
fn huge_declared_devices_cost_no_memory() {
    let names: Vec<String> = (1..=255).map(|i| format!("drive-{i}")).collect();
    let h = ArchiveHeader {
        uuid: UUID,
        ctime: 0,
        configs: vec![],
        devices: names
            .iter()
            .enumerate()
            .map(|(i, n)| DeviceInfo {
                id: dev(i as u8 + 1),
                name: n.clone(),
                size: VMA_MAX_DEVICE_SIZE,
            })
            .collect(),
    };
    let last = u32::MAX;
    let slots: Vec<BlockInfo> = (1..=255u8)
        .take(VMA_BLOCKS_PER_EXTENT)
        .map(|d| BlockInfo::new(dev(d), last - u32::from(d) * 100_000, BlockMask::empty()))
        .collect();
    let honest = with_extents(&h, &[extent(UUID, &slots)]);
    let mut lying = honest.clone();
    let at = header_len(&lying);
    lying[at + 6..at + 8].copy_from_slice(&u16::MAX.to_be_bytes());
    reseal_extent(&mut lying, at);

    let dir = tempfile::tempdir().unwrap();
    let limited = |archive: &Path, args: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -v 524288 && exec \"$0\" {args} \"$1\" 2>&1"
            ))
            .arg(env!("CARGO_BIN_EXE_vma"))
            .arg(archive)
            .output()
            .expect("sh runs")
    };
    // The limit leaves room for an ordinary run.
    let v = &vectors()[0];
    assert_success(&limited(&v.path(), "verify"), "verify under the limit");

    for (what, bytes, check) in [
        (
            "lying block_count",
            &lying,
            (|e: &Error| {
                matches!(
                    e,
                    Error::Extent {
                        source: FormatError::ExtentBlockCount { .. },
                        ..
                    }
                )
            }) as Check,
        ),
        ("honest, clusters missing", &honest, |e: &Error| {
            matches!(e, Error::MissingCluster { .. })
        }),
    ] {
        let e = verify(&bytes[..], VerifyOptions::default()).unwrap_err();
        assert!(check(&e), "{what}: {e:?}");
        let path = dir.path().join("huge.vma");
        fs::write(&path, bytes).unwrap();
        let out = limited(&path, "verify");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(3), "{what}: {text}");
        assert!(text.contains(&e.to_string()), "{what}: {text}");
        assert!(
            !text.contains("panicked") && !text.contains("alloc"),
            "{what}: {text}"
        );
        assert_success(&limited(&path, "list"), &format!("{what}: list"));
    }
}

/// A name with a control character would inject lines into the listing that Proxmox's
/// restore parses (a device name "x\nCTIME: ..." ends the listing early): every reader
/// and every command refuses the archive, naming the field and the byte.
#[test]
fn control_characters_in_names_are_refused_everywhere() {
    // (what, pointer field, byte index in the name, byte written, field)
    let patches: [(&str, usize, usize, u8, BlobField); 4] = [
        (
            "newline in a device name",
            DEV_INFO + 32,
            5,
            b'\n',
            BlobField::DeviceName,
        ),
        (
            "tab in a device name",
            DEV_INFO + 32,
            0,
            b'\t',
            BlobField::DeviceName,
        ),
        ("DEL in a config name", 2044, 3, 0x7f, BlobField::ConfigName),
        (
            "escape in a config name",
            2044,
            0,
            0x1b,
            BlobField::ConfigName,
        ),
    ];
    for (what, ptr_field, index, byte, field) in patches {
        let mut b = good();
        let at = blob_at(&b, be32(&b, ptr_field)) + 2 + index;
        b[at] = byte;
        reseal_header(&mut b);

        let expect = |e: &Error| match fmt_err(e) {
            Some(FormatError::BadName {
                field: f,
                problem: NameProblem::ControlCharacter(c),
                offset: Some(o),
                ..
            }) => *f == field && *c == byte && *o == at,
            _ => false,
        };
        let e = verify(&b[..], VerifyOptions::default()).unwrap_err();
        assert!(expect(&e), "{what}: verify gave {e:?}");
        assert_eq!(e.kind(), ErrorKind::Damaged);
        let dir = tempfile::tempdir().unwrap();
        let path = write_tmp(&dir, &b);
        let Err(e) = SeekableArchive::open(&path) else {
            panic!("{what}: the seekable reader opened it");
        };
        assert!(expect(&e), "{what}: seekable gave {e:?}");

        let message = format!("contains the control character 0x{byte:02x} at byte {at}");
        let target = dir.path().join("target");
        for args in [
            vec!["list"],
            vec!["list", "--json"],
            vec!["verify"],
            vec!["verify", "--quick"],
            vec!["config"],
            vec!["cat"],
        ] {
            let mut cmd = vma();
            cmd.args(&args).arg(&path);
            if args == ["cat"] {
                cmd.arg("drive-scsi0");
            }
            let out = cmd.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(3), "{what}: vma {args:?}: {err}");
            assert!(err.contains(&message), "{what}: vma {args:?}: {err}");
            assert!(
                out.stdout.is_empty(),
                "{what}: vma {args:?} printed something"
            );
        }
        let (out, err) = cli(&["extract"], &path, Some(&target));
        assert_eq!(out.status.code(), Some(3), "{what}: extract: {err}");
        assert!(err.contains(&message), "{what}: extract: {err}");
        assert!(!target.exists(), "{what}: extract left its target");
        // From standard input, as Proxmox's restore reads compressed archives.
        let out = vma()
            .args(["extract", "-v", "-r", "/nonexistent-map", "-"])
            .arg(&target)
            .stdin(fs::File::open(&path).unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{what}: extract -r: {err}");
        assert!(out.stdout.is_empty(), "{what}: no listing line printed");
    }
}
