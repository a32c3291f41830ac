//! vma-s3 against a real S3 server: moto's server mode (vma_testkit::S3Server), with IAM
//! authentication on. A missing moto is a loud failure (run scripts/install-deps).

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vma_reader::ReadAt;
use vma_s3::{Config, Error, Location, S3Object};
use vma_testkit::{Rng, S3Server, SlowProxy};

const MIB: usize = 1 << 20;

fn config_of(env: &[(String, String)]) -> Config {
    Config::from_vars(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        .expect("config from the server's env")
}

/// A server with bucket `b`, and a config for it with short retries.
fn server() -> (S3Server, Config) {
    let s3 = S3Server::start();
    s3.create_bucket("bkt");
    let config = config_of(&s3.env()).with_retries(2, Duration::from_secs(3));
    (s3, config)
}

fn at(key: &str) -> Location {
    Location::parse(&format!("s3://bkt/{key}")).unwrap()
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng(seed).fill(&mut v);
    v
}

/// Uploads in writes of uneven sizes; returns what `finish` said.
fn upload(config: &Config, key: &str, bytes: &[u8]) -> u64 {
    let mut up = config.create(&at(key)).expect("create");
    let mut rng = Rng(7);
    let mut pos = 0;
    while pos < bytes.len() {
        let n = (rng.below(3 * MIB as u64) as usize + 1).min(bytes.len() - pos);
        up.write_all(&bytes[pos..pos + n]).expect("write");
        pos += n;
    }
    up.finish().expect("finish")
}

fn gets(s3: &S3Server, key: &str) -> usize {
    let path = format!("/bkt/{key}");
    s3.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == path)
        .count()
}

#[test]
fn round_trip_of_several_sizes_read_from_four_threads() {
    let (s3, config) = server();
    let config = config.with_part_size(5 * MIB);
    for (i, len) in [0, 1, 5 * MIB - 1, 17 * MIB + 3].into_iter().enumerate() {
        let key = format!("rt/{len}.vma");
        let bytes = Arc::new(data(len, i as u64 + 1));
        assert_eq!(upload(&config, &key, &bytes), len as u64);
        assert!(s3.objects("bkt").contains(&(key.clone(), len as u64)));
        let obj = Arc::new(config.open(&at(&key)).expect("open"));
        assert_eq!(obj.size().unwrap(), len as u64);
        let mut whole = vec![0u8; len];
        obj.read_exact_at(&mut whole, 0).unwrap();
        assert!(whole == *bytes, "{key}: whole read differs");
        let past = obj.read_exact_at(&mut [0u8; 1], len as u64).unwrap_err();
        assert_eq!(past.kind(), io::ErrorKind::UnexpectedEof);
        if len == 0 {
            continue;
        }
        // A fresh reader, four threads at random offsets.
        let obj = Arc::new(config.open(&at(&key)).expect("open"));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (obj, bytes) = (obj.clone(), bytes.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng(100 + t);
                    for _ in 0..50 {
                        let off = rng.below(len as u64) as usize;
                        let n = (rng.below(300_000) as usize + 1).min(len - off);
                        let mut buf = vec![0u8; n];
                        obj.read_exact_at(&mut buf, off as u64).unwrap();
                        assert!(buf == bytes[off..off + n], "bytes {off}+{n}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
    assert!(s3.multipart_uploads("bkt").is_empty());
}

#[test]
fn headers_cost_windows_and_sequential_reads_cost_units() {
    let (s3, config) = server();
    let len = 64 * MIB;
    let bytes = data(len, 3);
    upload(&config.clone().with_part_size(16 * MIB), "big.vma", &bytes);

    // 100 small reads spread over the object: 64 KiB windows, not 4 MiB units.
    let obj = config.open(&at("big.vma")).unwrap();
    let before = gets(&s3, "big.vma");
    for i in 0..100 {
        let off = (i * (len / 100)) & !511;
        let mut hdr = [0u8; 512];
        obj.read_exact_at(&mut hdr, off as u64).unwrap();
        assert!(hdr[..] == bytes[off..off + 512]);
    }
    println!(
        "100 headers: {} requests, {} bytes fetched",
        obj.requests(),
        obj.bytes_fetched()
    );
    assert_eq!(obj.requests(), 101, "a HEAD and a GET per header");
    assert!(obj.bytes_fetched() <= 100 * 64 * 1024);
    assert!(obj.bytes_fetched() < len as u64 / 10);
    assert_eq!(gets(&s3, "big.vma") - before, 100, "the server saw them");

    // A sequential read in 1 MiB pieces: 16 GETs of 4 MiB units.
    let obj = config.open(&at("big.vma")).unwrap();
    let before = gets(&s3, "big.vma");
    let mut got = vec![0u8; len];
    for (i, chunk) in got.chunks_mut(MIB).enumerate() {
        obj.read_exact_at(chunk, (i * MIB) as u64).unwrap();
    }
    assert!(got == bytes);
    println!(
        "sequential 64 MiB: {} requests, {} bytes fetched",
        obj.requests(),
        obj.bytes_fetched()
    );
    assert_eq!(obj.requests(), 17, "a HEAD and 16 GETs");
    assert_eq!(obj.bytes_fetched(), len as u64);
    assert_eq!(gets(&s3, "big.vma") - before, 16);
}

#[test]
fn will_read_fetches_in_parallel_and_a_slow_proxy_is_still_correct() {
    let (s3, config) = server();
    let proxy = SlowProxy::start(s3.addr(), Duration::from_millis(200));
    let slow = config
        .with_endpoint(proxy.endpoint())
        .with_part_size(5 * MIB);
    let len = 32 * MIB + 12345;
    let bytes = data(len, 5);
    assert_eq!(upload(&slow, "slow.vma", &bytes), len as u64);

    let obj = slow.open(&at("slow.vma")).unwrap();
    let ranges: Vec<_> = (0..8u64)
        .map(|i| i * 4 * MIB as u64 + 1000..i * 4 * MIB as u64 + 1000 + MIB as u64)
        .collect();
    let t = Instant::now();
    obj.will_read(&ranges);
    for r in &ranges {
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        obj.read_exact_at(&mut buf, r.start).unwrap();
        assert!(buf == bytes[r.start as usize..r.end as usize]);
    }
    let took = t.elapsed();
    println!("will_read of 8 units through a 200 ms proxy: {took:?}");
    assert_eq!(obj.requests(), 9, "a HEAD and one GET per unit");
    assert!(
        took < Duration::from_millis(8 * 200 / 2),
        "8 GETs of 200 ms each took {took:?}: not in parallel"
    );

    // The whole object through the proxy.
    let mut got = vec![0u8; len];
    obj.read_exact_at(&mut got, 0).unwrap();
    assert!(got == bytes);
}

#[test]
fn a_server_killed_mid_upload_fails_the_upload() {
    let (mut s3, config) = server();
    let config = config.with_part_size(5 * MIB);
    let mut up = config.create(&at("killed.vma")).unwrap();
    up.write_all(&data(6 * MIB, 9)).unwrap();
    s3.kill();
    let t = Instant::now();
    let mut failed = None;
    for _ in 0..8 {
        if let Err(e) = up.write_all(&data(MIB, 10)) {
            failed = Some(e);
            break;
        }
    }
    match failed {
        Some(e) => {
            println!("write after kill: {e}");
            assert_eq!(e.kind(), io::ErrorKind::Other);
            let e = up.finish().unwrap_err();
            println!("finish after a failed write: {e}");
        }
        None => {
            let e = up.finish().unwrap_err();
            println!("finish after kill: {e}");
            assert!(matches!(e, Error::Request { .. }), "{e:?}");
            assert!(e.to_string().contains("s3://bkt/killed.vma"), "{e}");
        }
    }
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
}

#[test]
fn abort_and_drop_leave_neither_object_nor_parts() {
    let (s3, config) = server();
    let config = config.with_part_size(5 * MIB);
    let mut up = config.create(&at("aborted.vma")).unwrap();
    up.write_all(&data(12 * MIB, 11)).unwrap();
    assert_eq!(s3.multipart_uploads("bkt"), vec!["aborted.vma".to_string()]);
    up.abort().unwrap();
    assert!(s3.objects("bkt").is_empty());
    assert!(s3.multipart_uploads("bkt").is_empty());

    let mut up = config.create(&at("dropped.vma")).unwrap();
    up.write_all(&data(7 * MIB, 12)).unwrap();
    drop(up);
    assert!(s3.objects("bkt").is_empty());
    assert!(s3.multipart_uploads("bkt").is_empty());
    let aborts = s3
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE" && r.query.contains("uploadId") && r.status == 204)
        .count();
    assert_eq!(aborts, 2, "two AbortMultipartUpload: {:?}", s3.requests());
}

#[test]
fn a_server_killed_mid_read_fails_the_read_after_retries() {
    let (mut s3, config) = server();
    let bytes = data(9 * MIB, 13);
    upload(&config, "read.vma", &bytes);
    let obj: S3Object = config.open(&at("read.vma")).unwrap();
    let mut buf = vec![0u8; MIB];
    obj.read_exact_at(&mut buf, 0).unwrap();
    s3.kill();
    let t = Instant::now();
    let e = obj.read_exact_at(&mut buf, 8 * MIB as u64).unwrap_err();
    let took = t.elapsed();
    println!("read after kill ({took:?}): {e}");
    assert_eq!(e.kind(), io::ErrorKind::Other);
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<Error>())
        .expect("an Error inside");
    assert!(
        matches!(inner, Error::Request { op: "GET", .. }),
        "{inner:?}"
    );
    assert!(e.to_string().contains("s3://bkt/read.vma"), "{e}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    // What was cached still reads.
    obj.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == bytes[..MIB]);
}

#[test]
fn missing_key_bucket_and_wrong_credentials_are_typed() {
    let (s3, config) = server();
    let e = config.open(&at("nope.vma")).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert_eq!(e.to_string(), "s3://bkt/nope.vma: no such object");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotFound);

    let nb = Location::parse("s3://nobucket/x.vma").unwrap();
    let e = config.open(&nb).unwrap_err();
    assert!(matches!(e, Error::NoSuchBucket { .. }), "{e:?}");
    println!("{e}");
    let e = config.create(&nb).unwrap_err();
    assert!(matches!(e, Error::NoSuchBucket { .. }), "{e:?}");

    upload(&config, "x.vma", b"x");
    let mut env = s3.env();
    for (k, v) in &mut env {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = "wrong-secret-value".into();
        }
    }
    let wrong = config_of(&env);
    let (key_id, _) = s3.credentials();
    for e in [
        wrong.open(&at("x.vma")).unwrap_err(),
        wrong.create(&at("y.vma")).unwrap_err(),
    ] {
        let msg = e.to_string();
        println!("{msg}");
        assert!(matches!(e, Error::AccessDenied { .. }), "{e:?}");
        assert!(
            msg.contains(&key_id) && msg.contains("AWS_ACCESS_KEY_ID"),
            "{msg}"
        );
        assert!(!msg.contains("wrong-secret-value"), "{msg}");
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::PermissionDenied);
    }
    env.retain(|(k, _)| k != "AWS_ACCESS_KEY_ID");
    env.push(("AWS_ACCESS_KEY_ID".into(), "AKIAUNKNOWNUNKNOWN00".into()));
    let e = config_of(&env).open(&at("x.vma")).unwrap_err();
    assert!(matches!(e, Error::AccessDenied { .. }), "{e:?}");
}

#[test]
fn an_object_replaced_under_a_reader_is_changed() {
    let (s3, config) = server();
    upload(&config, "r.vma", &data(8 * MIB, 14));
    let obj = config.open(&at("r.vma")).unwrap();
    let mut buf = vec![0u8; MIB];
    obj.read_exact_at(&mut buf, 0).unwrap();
    s3.put_object("bkt", "r.vma", &data(8 * MIB, 15));
    let e = obj.read_exact_at(&mut buf, 6 * MIB as u64).unwrap_err();
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<Error>())
        .expect("an Error inside");
    assert!(matches!(inner, Error::Changed { .. }), "{inner:?}");
    println!("{e}");
}

#[test]
fn locations_parse() {
    let l = Location::parse("s3://bkt/a/b.vma").unwrap();
    assert_eq!((l.bucket(), l.key()), ("bkt", "a/b.vma"));
    assert_eq!(l.to_string(), "s3://bkt/a/b.vma");
    for bad in [
        "s3://bkt",
        "s3://bkt/",
        "s3:///key",
        "/tmp/x.vma",
        "s3://bkt/a//c",
    ] {
        let e = Location::parse(bad).unwrap_err();
        assert!(matches!(e, Error::InvalidLocation { .. }), "{bad}: {e:?}");
    }
    assert!(Location::is_s3("s3://bkt/k".as_ref()));
    assert!(!Location::is_s3("./s3:/b".as_ref()));
}

#[test]
fn a_profile_of_the_shared_files_reaches_the_server() {
    let (s3, _) = server();
    let dir = tempfile::tempdir().unwrap();
    let (key_id, secret) = s3.credentials();
    let creds = dir.path().join("credentials");
    let conf = dir.path().join("config");
    std::fs::write(
        &creds,
        format!("[default]\naws_access_key_id = AKIAWRONGWRONGWRONG0\naws_secret_access_key = nope\n\n[moto]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"),
    )
    .unwrap();
    std::fs::write(
        &conf,
        format!(
            "[profile moto]\nregion = us-east-1\nendpoint_url = {}\n",
            s3.endpoint()
        ),
    )
    .unwrap();
    let env: Vec<(String, String)> = [
        ("HOME", "/nonexistent".to_string()),
        ("AWS_PROFILE", "moto".to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
        ("AWS_CONFIG_FILE", conf.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = config_of(&env);
    assert_eq!(config.endpoint(), Some(s3.endpoint().as_str()));
    assert_eq!(upload(&config, "p.vma", b"profile"), 7);
    let obj = config.open(&at("p.vma")).unwrap();
    let mut buf = [0u8; 7];
    obj.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"profile");

    // The default profile's wrong key: denied, and the message says which profile.
    let env: Vec<_> = env
        .into_iter()
        .filter(|(k, _)| k != "AWS_PROFILE")
        .collect();
    let e = config_of(&env)
        .with_endpoint(s3.endpoint())
        .open(&at("p.vma"))
        .unwrap_err();
    assert!(matches!(e, Error::AccessDenied { .. }), "{e:?}");
    assert!(e.to_string().contains("profile [default]"), "{e}");
    assert!(!e.to_string().contains("nope"), "{e}");
}

#[test]
fn writes_after_a_failed_part_fail_and_drop_is_bounded() {
    let (mut s3, config) = server();
    let config = config.with_part_size(5 * MIB);
    let mut up = config.create(&at("p.vma")).unwrap();
    s3.kill();
    let t = Instant::now();
    let mut first = None;
    for _ in 0..40 {
        match up.write_all(&data(MIB, 1)) {
            Err(e) => {
                first = Some(e.to_string());
                break;
            }
            Ok(()) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let first = first.expect("a write fails once a part has failed");
    let again = up.write_all(b"x").unwrap_err();
    assert_eq!(again.to_string(), first, "poisoned with the first error");
    assert!(up.flush().is_err());
    drop(up);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

/// Every device of an archive, read whole through `read_at` in 1 MiB pieces.
fn devices_of(archive: &vma_reader::SeekableArchive) -> Vec<(String, Vec<u8>)> {
    archive
        .devices()
        .iter()
        .map(|info| {
            let dev = archive.device(info.id).expect("device");
            let mut out = vec![0u8; dev.size() as usize];
            let mut pos = 0;
            while pos < out.len() {
                let end = (pos + MIB).min(out.len());
                let n = dev
                    .read_at(&mut out[pos..end], pos as u64)
                    .expect("read_at");
                assert!(n > 0, "{}: no progress at {pos}", info.name);
                pos += n;
            }
            (info.name.clone(), out)
        })
        .collect()
}

#[test]
fn the_seekable_reader_reads_the_vectors_from_a_bucket() {
    let (_s3, config) = server();
    for v in vma_testkit::vectors() {
        let bytes = v.bytes();
        let key = format!("vectors/{}", v.file);
        upload(&config, &key, &bytes);
        let object = Arc::new(config.open(&at(&key)).unwrap());
        let remote =
            vma_reader::SeekableArchive::from_read_at(object.clone()).expect("open from S3");
        let local = vma_reader::SeekableArchive::open(v.path()).expect("open the file");
        assert_eq!(remote.len(), local.len(), "{}", v.file);
        assert!(
            devices_of(&remote) == devices_of(&local),
            "{}: devices differ",
            v.file
        );
        println!(
            "{}: {} bytes, {} requests, {} bytes fetched",
            v.file,
            bytes.len(),
            object.requests(),
            object.bytes_fetched()
        );
    }
}
