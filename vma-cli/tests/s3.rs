//! `vma` with archives in a bucket (`s3://BUCKET/KEY`), against a real S3 server on
//! loopback (moto's server mode, started by each test: `vma_testkit::s3`): every vector
//! round-trips byte-exact, `qemu-img convert` through `vma serve s3://...` is byte-exact,
//! requests are counted from the server's log, and the faults of a remote store (the
//! server gone mid-upload or mid-read, wrong credentials, a missing key or bucket, a slow
//! bucket, Ctrl-C) end in a clear error, a non-zero exit and no object under the key.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vma_testkit::s3::{Request, S3Server, SlowProxy};
use vma_testkit::serve::Serve;
use vma_testkit::{assert_success, sha256_file, vectors, Rng};

const VMA: &str = env!("CARGO_BIN_EXE_vma");
const BUCKET: &str = "backups";

/// A server with the bucket made.
fn server() -> S3Server {
    let s = S3Server::start();
    s.create_bucket(BUCKET);
    s
}

/// `vma ARGS` as a client of `s` (its credentials and endpoint in the environment).
fn vma(s: &S3Server, args: &[&str]) -> Command {
    let mut c = Command::new(VMA);
    c.envs(s.env()).args(args).stdin(Stdio::null());
    c
}

fn ok(mut c: Command) -> Output {
    let out = c.output().expect("vma runs");
    assert_success(&out, &format!("{c:?}"));
    out
}

/// Runs `c`, which must fail with exit code `code` saying `words`; returns stderr.
fn fails(mut c: Command, code: i32, words: &str) -> String {
    let out = c.output().expect("vma runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{c:?}: {stderr}");
    assert!(stderr.contains(words), "{c:?}: {stderr:?} lacks {words:?}");
    stderr
}

fn url(key: &str) -> String {
    format!("s3://{BUCKET}/{key}")
}

/// The whole object at `key`, read through vma-s3.
fn download(s: &S3Server, key: &str) -> Vec<u8> {
    let env = s.env();
    let config =
        vma_s3::Config::from_vars(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
            .expect("config");
    let object = config
        .open(&vma_s3::Location::parse(&url(key)).unwrap())
        .expect("object there");
    let mut bytes = vec![0u8; object.len() as usize];
    object.read_at(&mut bytes, 0).expect("read");
    bytes
}

/// Requests the server logged after the first `from`.
fn since(s: &S3Server, from: usize) -> Vec<Request> {
    s.requests().split_off(from)
}

#[test]
fn every_vector_round_trips_through_a_bucket_byte_exact() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    for v in vectors() {
        let key = v.file.clone();
        s.put_object(BUCKET, &key, &v.bytes());
        // list: the same lines as of the file.
        let listed = ok(vma(&s, &["list", &url(&key)]));
        let local = ok(vma(&s, &["list", v.path().to_str().unwrap()]));
        assert_eq!(listed.stdout, local.stdout, "{}", v.file);
        ok(vma(&s, &["verify", &url(&key)]));
        ok(vma(&s, &["verify", "--quick", &url(&key)]));
        // extract (one pass over ranged GETs) gives exactly the vector's files.
        let into = dir.path().join(format!("{key}.x"));
        ok(vma(&s, &["extract", &url(&key), into.to_str().unwrap()]));
        v.assert_extracted(&into);
        // Into a seekable .vma.zst in the bucket and out again, read at random.
        let zst = format!("{key}.zst");
        ok(vma(&s, &["recompress", &url(&key), &url(&zst)]));
        let into = dir.path().join(format!("{zst}.x"));
        ok(vma(&s, &["extract", &url(&zst), into.to_str().unwrap()]));
        v.assert_extracted(&into);
        for f in v.files.iter().filter(|f| f.name.starts_with("disk-")) {
            let dev = &f.name["disk-".len()..f.name.len() - ".raw".len()];
            let cat = ok(vma(&s, &["cat", &url(&zst), dev]));
            assert_eq!(
                vma_testkit::sha256_hex(&cat.stdout),
                f.sha256,
                "{zst} {dev}"
            );
        }
    }
    // No upload was left open.
    assert_eq!(s.multipart_uploads(BUCKET), Vec::<String>::new());
}

/// A raw image of `mib` MiB: random data with zero holes (so some clusters are sparse).
fn image(dir: &Path, name: &str, mib: usize, seed: u64) -> std::path::PathBuf {
    let mut data = vec![0u8; mib << 20];
    let mut rng = Rng(seed);
    for chunk in data.chunks_mut(1 << 20).step_by(3) {
        rng.fill(chunk);
    }
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    path
}

#[test]
fn create_into_a_bucket_is_the_same_archive_as_into_a_file() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "d.raw", 24, 7);
    for name in ["vm.vma", "vm.vma.zst"] {
        let local = dir.path().join(name);
        let spec = format!("drive-scsi0={}", disk.display());
        let args = |out: &str| {
            let mut c = vma(&s, &["create", "--reproducible", out, &spec]);
            c.env("SOURCE_DATE_EPOCH", "1700000000");
            c
        };
        ok(args(local.to_str().unwrap()));
        ok(args(&url(name)));
        assert!(
            download(&s, name) == std::fs::read(&local).unwrap(),
            "{name}: the object differs from the file"
        );
        // Never replaced.
        fails(args(&url(name)), 4, "already exists");
    }
    assert_eq!(s.multipart_uploads(BUCKET), Vec::<String>::new());
}

#[test]
fn qemu_img_convert_through_serve_of_a_bucket_is_byte_exact() {
    vma_testkit::require_tool("qemu-img");
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "d.raw", 16, 11);
    let want = sha256_file(&disk);
    for name in ["serve.vma", "serve.vma.zst"] {
        let spec = format!("drive-scsi0={}", disk.display());
        ok(vma(&s, &["create", &url(name), &spec]));
        let sock = dir.path().join(format!("{name}.sock"));
        let mut serve =
            Serve::start_with_env(Path::new(VMA), Path::new(&url(name)), &sock, &[], &s.env());
        let raw = dir.path().join(format!("{name}.raw"));
        let st = Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                &serve.url("drive-scsi0"),
                "-O",
                "raw",
            ])
            .arg(&raw)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img convert from {name}");
        assert_eq!(sha256_file(&raw), want, "{name}");
        assert!(serve.interrupt().success());
    }
}

#[test]
fn opening_an_archive_in_a_bucket_costs_a_constant_number_of_requests() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let mut counts = Vec::new();
    for (mib, seed) in [(4usize, 1u64), (64, 2)] {
        let disk = image(dir.path(), &format!("{mib}.raw"), mib, seed);
        let name = format!("{mib}.vma");
        ok(vma(
            &s,
            &[
                "create",
                &url(&name),
                &format!("drive-scsi0={}", disk.display()),
            ],
        ));
        let before = s.requests().len();
        ok(vma(&s, &["verify", "--quick", &url(&name)]));
        let made = since(&s, before);
        assert!(
            made.len() <= 5,
            "verify --quick of {mib} MiB: {} requests: {made:?}",
            made.len()
        );
        counts.push(made.len());
    }
    assert_eq!(counts[0], counts[1], "the same count for 4 and 64 MiB");
}

#[test]
fn missing_keys_and_buckets_and_wrong_credentials_are_clear_errors() {
    let s = server();
    fails(vma(&s, &["list", &url("nope.vma")]), 4, "no such object");
    fails(
        vma(&s, &["verify", "--quick", "s3://nobucket/x.vma"]),
        4,
        "nobucket",
    );
    fails(vma(&s, &["list", "s3://"]), 2, "s3://");
    let mut wrong = vma(&s, &["list", &url("nope.vma")]);
    wrong.env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let said = fails(wrong, 4, "denied");
    assert!(
        !said.contains("not-the-secret"),
        "the secret is never printed: {said}"
    );
    assert!(
        said.contains("AWS_ACCESS_KEY_ID"),
        "says which credentials: {said}"
    );
}

#[test]
fn a_slow_bucket_is_read_and_written_correctly() {
    let s = server();
    let proxy = SlowProxy::start(s.addr(), Duration::from_millis(100));
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "d.raw", 8, 5);
    let slow = |args: &[&str]| {
        let mut c = vma(&s, args);
        c.env("AWS_ENDPOINT_URL", proxy.endpoint());
        c
    };
    ok(slow(&[
        "create",
        &url("slow.vma.zst"),
        &format!("drive-scsi0={}", disk.display()),
    ]));
    let cat = ok(slow(&["cat", &url("slow.vma.zst"), "drive-scsi0"]));
    assert_eq!(vma_testkit::sha256_hex(&cat.stdout), sha256_file(&disk));
}

/// Starts `vma ARGS` as a client of `s` through `proxy` (which slows every request, so
/// that it is still working when the test acts), with stderr piped, at most 2 attempts per
/// request; waits until the server has logged a request for which `started` holds.
fn start_slowly(
    s: &S3Server,
    proxy: &SlowProxy,
    args: &[&str],
    started: impl Fn(&Request) -> bool,
) -> std::process::Child {
    let before = s.requests().len();
    let child = Command::new(VMA)
        .envs(s.env())
        .env("AWS_ENDPOINT_URL", proxy.endpoint())
        .env("AWS_MAX_ATTEMPTS", "2")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !since(s, before).iter().any(&started) {
        assert!(Instant::now() < deadline, "{args:?} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A request that starts a multipart upload.
fn starts_upload(r: &Request) -> bool {
    r.method == "POST" && r.query.starts_with("uploads")
}

/// Waits at most 120 s for `child` to exit; its exit code and stderr.
fn ended(child: std::process::Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ctrl_c_mid_upload_aborts_it_and_leaves_no_object() {
    let s = server();
    // 2 s per request: the signal, sent once the upload has started, comes long before
    // its parts are up, so before it could be completed.
    let proxy = SlowProxy::start(s.addr(), Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "d.raw", 160, 3);
    let spec = format!("drive-scsi0={}", disk.display());
    let child = start_slowly(
        &s,
        &proxy,
        &["create", &url("int.vma"), &spec],
        starts_upload,
    );
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let (code, stderr) = ended(child);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(s.objects(BUCKET), Vec::<(String, u64)>::new());
    assert_eq!(
        s.multipart_uploads(BUCKET),
        Vec::<String>::new(),
        "the upload was aborted"
    );
}

#[test]
fn the_server_gone_mid_upload_fails_the_create_and_never_completes_it() {
    let mut s = server();
    let proxy = SlowProxy::start(s.addr(), Duration::from_millis(200));
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "d.raw", 160, 4);
    let spec = format!("drive-scsi0={}", disk.display());
    let child = start_slowly(
        &s,
        &proxy,
        &["create", &url("gone.vma"), &spec],
        starts_upload,
    );
    s.kill();
    let (code, stderr) = ended(child);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains("s3://backups/gone.vma"),
        "names the object: {stderr}"
    );
    // moto keeps its objects in memory, so what it holds dies with it: the log shows
    // that the upload was never completed (a POST with uploadId) and nothing was PUT
    // whole under the key.
    let completed: Vec<Request> = s
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/gone.vma"))
        .filter(|r| {
            (r.method == "POST" && r.query.starts_with("uploadId="))
                || (r.method == "PUT" && r.query.is_empty())
        })
        .collect();
    assert_eq!(completed, Vec::<Request>::new());
}

#[test]
fn the_server_gone_mid_read_is_retried_then_a_clear_error() {
    let mut s = server();
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "d.raw", 64, 6);
    ok(vma(
        &s,
        &[
            "create",
            &url("read.vma"),
            &format!("drive-scsi0={}", disk.display()),
        ],
    ));
    let proxy = SlowProxy::start(s.addr(), Duration::from_millis(200));
    let child = start_slowly(&s, &proxy, &["cat", &url("read.vma"), "drive-scsi0"], |r| {
        r.method == "GET"
    });
    let started = Instant::now();
    s.kill();
    let (code, stderr) = ended(child);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains("s3://backups/read.vma"),
        "names the object: {stderr}"
    );
    assert!(stderr.contains("retr"), "says it retried: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "bounded by the retries"
    );
}

#[test]
fn throttling_is_retried_with_backoff_and_persistent_throttling_is_a_clear_error() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "d.raw", 8, 9);
    let spec = format!("drive-scsi0={}", disk.display());
    let through = |proxy: &SlowProxy, args: &[&str]| {
        let mut c = vma(&s, args);
        c.env("AWS_ENDPOINT_URL", proxy.endpoint());
        c
    };
    // The first three requests of a backup into the bucket and of a restore from it are
    // answered 503 Slow Down: both retry and succeed, and the bytes are right.
    let proxy = SlowProxy::throttling(s.addr(), 3);
    ok(through(&proxy, &["create", &url("t.vma.zst"), &spec]));
    assert_eq!(proxy.throttled(), 3, "the backup met the throttling");
    let proxy = SlowProxy::throttling(s.addr(), 3);
    let cat = ok(through(&proxy, &["cat", &url("t.vma.zst"), "drive-scsi0"]));
    assert_eq!(proxy.throttled(), 3, "the restore met the throttling");
    assert_eq!(vma_testkit::sha256_hex(&cat.stdout), sha256_file(&disk));
    // A bucket that throttles every request: the retries give out, exit 4, and the error
    // names the object and what the server said.
    let proxy = SlowProxy::throttling(s.addr(), usize::MAX);
    let mut c = through(&proxy, &["list", &url("t.vma.zst")]);
    c.env("AWS_MAX_ATTEMPTS", "3");
    let said = fails(c, 4, "s3://backups/t.vma.zst");
    assert!(said.contains("503"), "says the server's answer: {said}");
    assert_eq!(
        proxy.throttled(),
        3,
        "tried as often as AWS_MAX_ATTEMPTS says"
    );
    let mut c = through(&proxy, &["create", &url("never.vma"), &spec]);
    c.env("AWS_MAX_ATTEMPTS", "2");
    fails(c, 4, "s3://backups/never.vma");
    assert_eq!(s.multipart_uploads(BUCKET), Vec::<String>::new());
    assert!(!s.objects(BUCKET).iter().any(|(k, _)| k == "never.vma"));
}

#[test]
fn config_and_reorder_read_from_a_bucket() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    for v in vectors() {
        s.put_object(BUCKET, &v.file, &v.bytes());
        let local = v.path();
        let local = local.to_str().unwrap();
        let remote = url(&v.file);
        // config: the same bytes (or the same refusal) as of the file.
        let from_file = vma(&s, &["config", local]).output().unwrap();
        let from_bucket = vma(&s, &["config", &remote]).output().unwrap();
        assert_eq!(
            from_bucket.status.code(),
            from_file.status.code(),
            "{}",
            v.file
        );
        assert_eq!(from_bucket.stdout, from_file.stdout, "{}", v.file);
        // reorder: the same archive as from the file.
        let a = dir.path().join(format!("{}.file.vma", v.file));
        let b = dir.path().join(format!("{}.s3.vma", v.file));
        ok(vma(&s, &["reorder", local, a.to_str().unwrap()]));
        ok(vma(&s, &["reorder", &remote, b.to_str().unwrap()]));
        let into = dir.path().join(format!("{}.x", v.file));
        ok(vma(
            &s,
            &["extract", b.to_str().unwrap(), into.to_str().unwrap()],
        ));
        v.assert_extracted(&into);
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{}: reordered from the bucket differs from reordered from the file",
            v.file
        );
    }
}
