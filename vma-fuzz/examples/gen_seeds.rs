//! Writes the seed corpora: `gen_seeds <repo root> <corpus dir>`.
//!
//! Seeds are generated, not committed: the spec's test vectors and truncated copies,
//! small archives made with vma-writer, lzop files made with the `lzop` program (when it
//! is installed), restore-map lines and NBD sessions.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vma_format::ArchiveHeader;
use vma_nbd::proto::*;

/// Largest seed given to the whole-archive targets (bigger inputs slow libFuzzer down);
/// larger archives contribute their truncated copies below this size.
const MAX_SEED: usize = 256 * 1024;

fn put(dir: &Path, name: &str, data: &[u8]) {
    fs::create_dir_all(dir).expect("create corpus dir");
    fs::write(dir.join(name), data).expect("write seed");
}

fn writer_archives() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, (sizes, integrity)) in [
        (&[65536u64][..], false),
        (&[70_000, 4096][..], true),
        (&[1, 131072, 200_000][..], false),
    ]
    .iter()
    .enumerate()
    {
        let mut b = vma_writer::Builder::new();
        b.integrity(*integrity).ctime(1_700_000_000);
        b.add_config("qemu-server.conf", b"cores: 2\nmemory: 512\n")
            .unwrap();
        let devs: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(j, &s)| (b.add_device(&format!("drive-scsi{j}"), s).unwrap(), s))
            .collect();
        let vm = if i == 2 {
            Some(b.add_vmstate(5000).unwrap())
        } else {
            None
        };
        let w = b.build(Vec::new()).unwrap();
        for (j, &(d, size)) in devs.iter().enumerate().rev() {
            let clusters = size.div_ceil(65536);
            for c in (0..clusters).rev() {
                if (c + j as u64) & 1 == 0 {
                    w.write_zero_cluster(d, c as u32).unwrap();
                } else {
                    let mut data = vec![0u8; 65536];
                    data[..4096].fill(0xa5);
                    data[40000] = 7;
                    w.write_cluster(d, c as u32, &data).unwrap();
                }
            }
        }
        if let Some(vm) = vm {
            w.append_vmstate(vm, &[0x11; 5000]).unwrap();
        }
        let (_, bytes) = w.finish().unwrap();
        out.push((format!("writer{i}.vma"), bytes));
    }
    out
}

fn truncations(bytes: &[u8]) -> Vec<usize> {
    let mut cuts = vec![
        0,
        1,
        4,
        60,
        2044,
        4096,
        12288,
        bytes.len() / 2,
        bytes.len().saturating_sub(1),
    ];
    if let Ok(h) = ArchiveHeader::header_size_from_prefix(bytes) {
        cuts.extend([h, h + 1, h + 512, h + 512 + 4096]);
    }
    cuts.retain(|&c| c < bytes.len());
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn request(flags: u16, cmd: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&0x1234u64.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

fn nbd_sessions() -> Vec<Vec<u8>> {
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let go = |name: &[u8]| {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        opt(OPT_GO, &d)
    };
    let meta = {
        let mut d = 2u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"rw");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        d
    };
    let mut sessions = Vec::new();
    // Options only.
    let mut s = flags.clone();
    s.extend(opt(OPT_LIST, &[]));
    s.extend(opt(
        OPT_INFO,
        &[0, 0, 0, 5, b'r', b'o', b'5', b'1', b'2', 0, 0],
    ));
    s.extend(opt(OPT_LIST_META_CONTEXT, &meta));
    s.extend(opt(OPT_ABORT, &[]));
    sessions.push(s);
    // Export name, then simple replies.
    let mut s = flags.clone();
    s.extend(opt(OPT_EXPORT_NAME, b"rw"));
    s.extend(request(0, CMD_WRITE, 4096, 8));
    s.extend_from_slice(b"abcdefgh");
    s.extend(request(0, CMD_READ, 4090, 20));
    s.extend(request(0, 3, 0, 0)); // FLUSH
    s.extend(request(0, 6, 0, 8192)); // WRITE_ZEROES
    s.extend(request(0, 2, 0, 0)); // DISC
    sessions.push(s);
    // Structured replies, meta context, block status, reads past the end.
    let mut s = flags.clone();
    s.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    s.extend(opt(OPT_SET_META_CONTEXT, &meta));
    s.extend(go(b"rw"));
    s.extend(request(0, 7, 0, 65536)); // BLOCK_STATUS
    s.extend(request(0, CMD_READ, 0, 32768));
    s.extend(request(0, CMD_READ, 65536 - 10, 20));
    s.extend(request(1 << 0, CMD_WRITE, 100, 4)); // FUA
    s.extend_from_slice(b"wxyz");
    s.extend(request(0, 2, 0, 0));
    sessions.push(s);
    // Read-only export with a 512-byte minimum block.
    let mut s = flags.clone();
    s.extend(go(b"ro512"));
    s.extend(request(0, CMD_WRITE, 0, 512));
    s.extend_from_slice(&[1; 512]);
    s.extend(request(0, CMD_READ, 1, 511));
    s.extend(request(0, 4, 0, 512)); // TRIM
    sessions.push(s);
    sessions
}

/// Stock zstd streams (`zstd -T1`, as vzdump runs it, and single-threaded) of small
/// inputs, and each one's sidecar index as a seed of its own.
fn zstd_index_seeds(corpus: &Path) {
    let tmp = std::env::temp_dir().join(format!("vma-fuzz-zstd-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("text", b"hello zstd hello zstd hello zstd\n".repeat(3000)),
        ("zeros", vec![0; 300_000]),
        (
            "mixed",
            (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect(),
        ),
    ];
    for (name, data) in inputs {
        let src = tmp.join(name);
        fs::write(&src, &data).unwrap();
        for (tag, args) in [
            ("mt", &["-T1", "--rsyncable", "-3"][..]),
            ("st", &["--single-thread", "-1"][..]),
        ] {
            let Ok(out) = Command::new("zstd")
                .args(["-q", "-c"])
                .args(args)
                .arg(&src)
                .output()
            else {
                eprintln!("gen_seeds: no zstd, no zstd_index seeds");
                return;
            };
            assert!(out.status.success(), "zstd {args:?}");
            put(corpus, &format!("{name}.{tag}.zst"), &out.stdout);
            let mut idx = Vec::new();
            if vma_reader::zstd_index::build(&out.stdout[..], &mut idx).is_ok() {
                put(corpus, &format!("{name}.{tag}.idx"), &idx);
            }
        }
    }
    let _ = fs::remove_dir_all(&tmp);
}

fn lzop_seeds(corpus: &Path) {
    let tmp = std::env::temp_dir().join(format!("vma-fuzz-lzop-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("text", b"hello lzop hello lzop hello lzop\n".repeat(50)),
        ("zeros", vec![0; 300_000]),
        (
            "mixed",
            (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect(),
        ),
    ];
    for (name, data) in inputs {
        let src = tmp.join(name);
        fs::write(&src, &data).unwrap();
        for (level, extra) in [
            ("-1", &[][..]),
            ("-9", &["-F"][..]),
            ("-3", &["--crc32"][..]),
        ] {
            let out = Command::new("lzop")
                .arg(level)
                .args(extra)
                .arg("-c")
                .arg(&src)
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    put(
                        corpus,
                        &format!("{name}{level}{}.lzo", extra.join("")),
                        &o.stdout,
                    );
                }
                _ => {
                    eprintln!("gen_seeds: lzop not available, no lzop seeds");
                    let _ = fs::remove_dir_all(&tmp);
                    return;
                }
            }
        }
    }
    let _ = fs::remove_dir_all(&tmp);
}

/// The index extents of an archive that has them (before its seal, at its end).
fn index_extents_of(bytes: &[u8]) -> Option<&[u8]> {
    use vma_format::extent_index::{IndexExtent, IndexKind};
    let len = bytes.len();
    let before_seal =
        vma_format::ExtentHeader::decode(bytes.get(len.checked_sub(1024)?..len - 512)?).ok()?;
    match IndexExtent::from_extent(&before_seal) {
        IndexKind::Index(x) => {
            let start = len.checked_sub(512 * (x.total as usize + 1))?;
            Some(&bytes[start..len - 512])
        }
        _ => None,
    }
}

/// Seeds of the extent index decoder: the index extents of the archives that have them,
/// and one made of three arbitrary header copies.
fn extent_index_seeds(corpus: &Path, archives: &[(String, Vec<u8>)]) {
    let dir = corpus.join("extent_index");
    let made = vma_format::extent_index::encode(vma_format::Uuid::nil(), &[[7u8; 512]; 3])
        .expect("encode an index");
    put(&dir, "three-copies", &made.concat());
    for (name, bytes) in archives {
        if let Some(index) = index_extents_of(bytes) {
            put(&dir, name, index);
        }
    }
}

fn main() {
    let mut args = std::env::args_os().skip(1);
    let root = PathBuf::from(
        args.next()
            .expect("usage: gen_seeds <repo root> <corpus dir>"),
    );
    let corpus = PathBuf::from(
        args.next()
            .expect("usage: gen_seeds <repo root> <corpus dir>"),
    );

    let mut archives: Vec<(String, Vec<u8>)> = Vec::new();
    let mut vectors: Vec<_> = fs::read_dir(root.join("spec/vectors"))
        .expect("spec/vectors")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "vma"))
        .collect();
    vectors.sort();
    for p in vectors {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        archives.push((name, fs::read(&p).unwrap()));
    }
    archives.extend(writer_archives());
    extent_index_seeds(&corpus, &archives);
    // The same archives as `vma create X.vma.zst` writes them: seekable zstd, whose
    // last bytes are a seek table.
    let compressed: Vec<(String, Vec<u8>)> = archives
        .iter()
        .map(|(name, bytes)| {
            let options = vma_writer::ZstdOptions {
                frame_size: 1,
                ..Default::default()
            };
            let mut z = vma_writer::ZstdWriter::new(Vec::new(), options).expect("zstd");
            std::io::Write::write_all(&mut z, bytes).expect("compress");
            (format!("{name}.zst"), z.finish().expect("finish").0)
        })
        .collect();
    for (name, bytes) in &compressed {
        let table = vma_format::seek_table::SeekIndex::table_len(bytes, bytes.len() as u64)
            .expect("a seek table");
        // The table with a few bytes of frames in front (the sizes then lie), and whole.
        put(
            &corpus.join("seek_table"),
            name,
            &bytes[bytes.len() - table - 64.min(bytes.len() - table)..],
        );
        if bytes.len() <= MAX_SEED {
            put(&corpus.join("seek_table"), &format!("{name}.whole"), bytes);
        }
    }
    archives.extend(compressed);

    for (name, bytes) in &archives {
        for target in ["stream_verify", "stream_extract", "seekable"] {
            if bytes.len() <= MAX_SEED {
                put(&corpus.join(target), name, bytes);
            }
            for cut in truncations(bytes) {
                if cut <= MAX_SEED {
                    put(
                        &corpus.join(target),
                        &format!("{name}.cut{cut}"),
                        &bytes[..cut],
                    );
                }
            }
        }
        // The header target needs the header only (and a little past it).
        let header_len = ArchiveHeader::header_size_from_prefix(bytes)
            .map_or(bytes.len(), |h| h + 512)
            .min(bytes.len());
        put(&corpus.join("header_decode"), name, &bytes[..header_len]);
        for cut in truncations(&bytes[..header_len]) {
            put(
                &corpus.join("header_decode"),
                &format!("{name}.cut{cut}"),
                &bytes[..cut],
            );
        }
        if let Ok(h) = ArchiveHeader::header_size_from_prefix(bytes) {
            let mut at = h;
            let mut i = 0;
            while at + 512 <= bytes.len() && i < 8 {
                put(
                    &corpus.join("extent_decode"),
                    &format!("{name}.ext{i}"),
                    &bytes[at..at + 512],
                );
                match vma_format::ExtentHeader::decode(&bytes[at..at + 512]) {
                    Ok(e) => at += e.extent_len(),
                    Err(_) => break,
                }
                i += 1;
            }
        }
    }

    let maps: [&[u8]; 6] = [
        b"format=raw:0:drive-scsi0=/dev/pve/vm-100-disk-0\ndone\n",
        b"format=raw:throttling.bps=1048576:cache=none:1:drive-virtio1=/path/disk.raw\nskip=drive-efidisk0\ndone\n",
        b"skip=drive-scsi0\n\nformat=raw:0:drive-scsi1=/x\n",
        b"throttling.group=g:format=qcow2:1:drive-sata0=/tmp/a b\n",
        b"format=raw:format=raw:0:x=/y\n",
        b"0:drive-scsi0=/a\n0:drive-scsi0=/b\n",
    ];
    for (i, m) in maps.iter().enumerate() {
        put(&corpus.join("mapfile"), &format!("map{i}"), m);
    }

    lzop_seeds(&corpus.join("lzop"));
    lzop_seeds(&corpus.join("lzop_index"));
    zstd_index_seeds(&corpus.join("zstd_index"));

    for (i, s) in nbd_sessions().iter().enumerate() {
        put(&corpus.join("nbd_session"), &format!("session{i}"), s);
    }
    for (i, s) in vma_nbd::fuzz::client_session_seeds().iter().enumerate() {
        put(&corpus.join("nbd_client_replies"), &format!("server{i}"), s);
    }
    let roundtrip = corpus.join("roundtrip");
    put(&roundtrip, "zeros", &[0u8; 64]);
    put(&roundtrip, "ones", &[0xffu8; 256]);
    put(&roundtrip, "ramp", &(0..=255u8).collect::<Vec<_>>());
    println!("seeds written to {}", corpus.display());
}
