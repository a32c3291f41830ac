//! A real S3 server for tests: moto's server mode (`moto_server`, installed into the
//! repository's `.venv` by `scripts/install-deps`), with IAM authentication on, so that
//! wrong credentials are refused as by AWS; and [`SlowProxy`], a TCP proxy that delays
//! every request, for a slow bucket.
//!
//! The server's own calls (bucket creation, listings) are signed here with AWS
//! Signature V4 (sha2 only), so that the tests do not trust the client under test.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

/// How long moto may take to answer after its start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The region moto is addressed in.
const REGION: &str = "us-east-1";

/// One request the server logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, `PUT`, `POST`, `DELETE`.
    pub method: String,
    /// The path, e.g. `/bucket/key`, percent-encoded as sent.
    pub path: String,
    /// The query string without `?` (empty if none), e.g. `uploads` or `partNumber=1&uploadId=…`.
    pub query: String,
    /// The HTTP status answered.
    pub status: u16,
}

/// A `moto_server` on a free loopback port, its request log captured to a file; killed on
/// drop. IAM authentication is on: only the access key it made at its start (see
/// [`S3Server::env`]) is accepted.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
    key_id: String,
    secret: String,
}

/// The `moto_server` of the repository's `.venv`; panics, naming `scripts/install-deps`,
/// when it is missing.
pub fn moto_server_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives in the workspace")
        .join(".venv/bin/moto_server");
    assert!(
        path.exists(),
        "{} is not installed: run scripts/install-deps (the S3 tests need moto's server)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .into()
}

/// `YYYYMMDDTHHMMSSZ` of now.
fn amz_date() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An HTTP/1.1 answer.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// One request on a fresh connection (`Connection: close`).
fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 2 + n + 2..];
        }
        body = out;
    }
    Ok(Answer { status, body })
}

/// The texts of every `<tag>…</tag>` of `xml`, in order.
fn tags(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(after[..j].to_string());
        rest = &after[j + close.len()..];
    }
    out
}

fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl S3Server {
    /// Starts moto on a free loopback port, waits until it answers, and makes an IAM user
    /// with an access key allowed everything (the only unauthenticated requests it takes).
    pub fn start() -> S3Server {
        let bin = moto_server_path();
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("moto.log");
        let port = free_port();
        let out = File::create(&log).expect("create moto log");
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut server = S3Server {
            child,
            addr,
            log,
            _dir: dir,
            key_id: String::new(),
            secret: String::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait().expect("wait for moto_server") {
                panic!(
                    "moto_server exited ({status}) at its start:\n{}",
                    server.log_text()
                );
            }
            if http(addr, "GET", "/moto-api/", &[], b"").is_ok_and(|a| a.status == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer within {START_TIMEOUT:?}:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server.make_user();
        server
    }

    /// IAM: CreateUser, PutUserPolicy (allow all), CreateAccessKey: the three requests
    /// moto takes unauthenticated (`INITIAL_NO_AUTH_ACTION_COUNT=3`).
    fn make_user(&mut self) {
        let auth = vec![(
            "Authorization".to_string(),
            format!("AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20260101/{REGION}/iam/aws4_request, SignedHeaders=host, Signature=00"),
        ), ("Content-Type".to_string(), "application/x-www-form-urlencoded".to_string())];
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
        let forms = [
            "Action=CreateUser&UserName=vma-tests&Version=2010-05-08".to_string(),
            format!(
                "Action=PutUserPolicy&UserName=vma-tests&PolicyName=all&Version=2010-05-08&PolicyDocument={}",
                uri_encode(policy, true)
            ),
            "Action=CreateAccessKey&UserName=vma-tests&Version=2010-05-08".to_string(),
        ];
        let mut last = String::new();
        for form in &forms {
            let a =
                http(self.addr, "POST", "/", &auth, form.as_bytes()).expect("IAM request to moto");
            last = String::from_utf8_lossy(&a.body).to_string();
            assert_eq!(a.status, 200, "moto IAM {form}: {last}");
        }
        self.key_id = tags(&last, "AccessKeyId")
            .pop()
            .expect("AccessKeyId in CreateAccessKey");
        self.secret = tags(&last, "SecretAccessKey")
            .pop()
            .expect("SecretAccessKey in CreateAccessKey");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The access key ID and secret the server accepts.
    pub fn credentials(&self) -> (String, String) {
        (self.key_id.clone(), self.secret.clone())
    }

    /// The environment for a client of this server (a `vma` command, or
    /// `vma_s3::Config::from_vars`): credentials, region, endpoint; and the profile
    /// files pointed at files that do not exist, so that the user's own are not read.
    pub fn env(&self) -> Vec<(String, String)> {
        let none = self._dir.path().join("no-such-aws-file");
        [
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("HOME", none.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A request signed with the server's access key (Signature V4, path style).
    fn signed(&self, method: &str, path: &str, query: &[(&str, &str)], body: &[u8]) -> Answer {
        let date = amz_date();
        let day = &date[..8];
        let payload = hex(&Sha256::digest(body));
        let mut q: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k, true), uri_encode(v, true)))
            .collect();
        q.sort();
        let query_string = q
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let path = uri_encode(path, false);
        let host = self.addr.to_string();
        let canonical = format!(
            "{method}\n{path}\n{query_string}\nhost:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{date}\n\nhost;x-amz-content-sha256;x-amz-date\n{payload}"
        );
        let scope = format!("{day}/{REGION}/s3/aws4_request");
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
            hex(&Sha256::digest(canonical.as_bytes()))
        );
        let mut key = hmac(format!("AWS4{}", self.secret).as_bytes(), day.as_bytes());
        for part in [REGION, "s3", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex(&hmac(&key, to_sign.as_bytes()));
        let headers = vec![
            ("x-amz-date".to_string(), date.clone()),
            ("x-amz-content-sha256".to_string(), payload),
            (
                "Authorization".to_string(),
                format!("AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}", self.key_id),
            ),
        ];
        let target = if query_string.is_empty() {
            path
        } else {
            format!("{path}?{query_string}")
        };
        http(self.addr, method, &target, &headers, body)
            .unwrap_or_else(|e| panic!("moto {method} {target}: {e}"))
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, name: &str) {
        let a = self.signed("PUT", &format!("/{name}"), &[], b"");
        assert_eq!(
            a.status,
            200,
            "create bucket {name}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }

    /// Puts an object in one PUT (to replace one under a reader, say).
    pub fn put_object(&self, bucket: &str, key: &str, data: &[u8]) {
        let a = self.signed("PUT", &format!("/{bucket}/{key}"), &[], data);
        assert_eq!(
            a.status,
            200,
            "put s3://{bucket}/{key}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }

    /// The objects of a bucket: (key, size), by key.
    pub fn objects(&self, bucket: &str) -> Vec<(String, u64)> {
        let a = self.signed("GET", &format!("/{bucket}"), &[("list-type", "2")], b"");
        let xml = String::from_utf8_lossy(&a.body).to_string();
        assert_eq!(a.status, 200, "list s3://{bucket}: {xml}");
        tags(&xml, "Contents")
            .iter()
            .map(|c| {
                let key = tags(c, "Key").pop().unwrap_or_default();
                let size = tags(c, "Size")
                    .pop()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                (key, size)
            })
            .collect()
    }

    /// The keys of the multipart uploads under way (started, neither completed nor
    /// aborted) in a bucket.
    pub fn multipart_uploads(&self, bucket: &str) -> Vec<String> {
        let a = self.signed("GET", &format!("/{bucket}"), &[("uploads", "")], b"");
        let xml = String::from_utf8_lossy(&a.body).to_string();
        assert_eq!(a.status, 200, "list uploads of s3://{bucket}: {xml}");
        tags(&xml, "Upload")
            .iter()
            .filter_map(|u| tags(u, "Key").pop())
            .collect()
    }

    /// Every request the server logged so far (werkzeug's one line per request, written
    /// just after its answer), in order. A marker request is sent first and awaited in
    /// the log, so that the lines of requests already answered are there; markers are
    /// left out.
    pub fn requests(&self) -> Vec<Request> {
        static MARKS: AtomicU64 = AtomicU64::new(0);
        let mark = format!("vma-testkit-mark={}", MARKS.fetch_add(1, Ordering::SeqCst));
        let alive = http(self.addr, "GET", &format!("/moto-api/?{mark}"), &[], b"").is_ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.log_text();
            if !alive || text.contains(&mark) || Instant::now() > deadline {
                return text
                    .lines()
                    .filter_map(parse_log_line)
                    .filter(|r| !r.query.starts_with("vma-testkit-mark="))
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server (SIGKILL), for fault tests; later requests find no server.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `127.0.0.1 - - [date] "GET /b/k?x=1 HTTP/1.1" 206 -`, perhaps with ANSI colours.
fn parse_log_line(line: &str) -> Option<Request> {
    let mut clean = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            clean.push(c);
        }
    }
    let start = clean.find("] \"")? + 3;
    let rest = &clean[start..];
    let end = rest.find('"')?;
    let mut req = rest[..end].split_whitespace();
    let method = req.next()?.to_string();
    let target = req.next()?;
    if !req.next()?.starts_with("HTTP/") {
        return None;
    }
    let status = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        status,
    })
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy on a free loopback port that holds back each request `delay` before
/// passing it upstream (the first bytes a client sends after the last answer, so one
/// delay per request of a kept-alive connection), or that answers the first requests
/// itself with `503 Slow Down` as S3 does when throttling ([`SlowProxy::throttling`]);
/// threads, no async. Stops on drop.
#[derive(Debug)]
pub struct SlowProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    throttled: Arc<AtomicUsize>,
}

impl SlowProxy {
    /// Starts proxying to `upstream` with `delay` per request.
    pub fn start(upstream: SocketAddr, delay: Duration) -> SlowProxy {
        Self::spawn(upstream, delay, 0)
    }

    /// Starts proxying to `upstream`, answering the first request of each of the first
    /// `connections` connections with `503 Slow Down` (S3's throttling answer, which
    /// clients are to retry with backoff) and closing it; later connections are passed
    /// through untouched. [`SlowProxy::throttled`] counts the answers given.
    pub fn throttling(upstream: SocketAddr, connections: usize) -> SlowProxy {
        Self::spawn(upstream, Duration::ZERO, connections)
    }

    /// How many requests were answered `503 Slow Down` so far.
    pub fn throttled(&self) -> usize {
        self.throttled.load(Ordering::SeqCst)
    }

    fn spawn(upstream: SocketAddr, delay: Duration, throttle: usize) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let throttled = Arc::new(AtomicUsize::new(0));
        let (stop2, conns, answered) = (stop.clone(), connections.clone(), throttled.clone());
        std::thread::spawn(move || {
            let mut to_throttle = throttle;
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if to_throttle > 0 {
                    to_throttle -= 1;
                    let answered = answered.clone();
                    std::thread::spawn(move || {
                        if slow_down(client) {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                {
                    let mut c = conns.lock().unwrap();
                    c.push(client.try_clone().expect("dup"));
                    c.push(server.try_clone().expect("dup"));
                }
                let waiting = Arc::new(AtomicBool::new(true));
                let (c2, s2, w2) = (
                    client.try_clone().expect("dup"),
                    server.try_clone().expect("dup"),
                    waiting.clone(),
                );
                std::thread::spawn(move || pipe(client, server, Some((waiting, delay))));
                std::thread::spawn(move || {
                    pipe_answers(s2, c2, &w2);
                });
            }
        });
        SlowProxy {
            addr,
            stop,
            connections,
            throttled,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Reads one request (its head, and its body as long as `Content-Length` says) and
/// answers it as a throttling S3 does, then closes the connection; whether it answered.
fn slow_down(mut client: TcpStream) -> bool {
    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut buf = [0u8; 64 << 10];
    let end = loop {
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
    let length: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut left = length.saturating_sub(head.len() - end);
    while left > 0 {
        match client.read(&mut buf[..left.min(64 << 10)]) {
            Ok(0) | Err(_) => break,
            Ok(n) => left -= n,
        }
    }
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                <Message>Please reduce your request rate.</Message></Error>";
    let answer = format!(
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let sent = client.write_all(answer.as_bytes()).is_ok();
    let _ = client.shutdown(Shutdown::Both);
    sent
}

/// Client to server: sleeps before the first bytes of each request.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Option<(Arc<AtomicBool>, Duration)>) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((waiting, d)) = &delay {
            if waiting.swap(false, Ordering::SeqCst) {
                std::thread::sleep(*d);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Server to client: marks the connection as awaiting its next request.
fn pipe_answers(mut from: TcpStream, mut to: TcpStream, waiting: &AtomicBool) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        waiting.store(true, Ordering::SeqCst);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        for c in self.connections.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_werkzeug_lines() {
        let r = parse_log_line("127.0.0.1 - - [07/Dec/2026 16:42:01] \"\u{1b}[35m\u{1b}[1mPUT /bkt/a%20b?uploads HTTP/1.1\u{1b}[0m\" 500 -").unwrap();
        assert_eq!(
            r,
            Request {
                method: "PUT".into(),
                path: "/bkt/a%20b".into(),
                query: "uploads".into(),
                status: 500
            }
        );
        assert!(parse_log_line(" * Running on http://127.0.0.1:5000").is_none());
    }

    #[test]
    fn hmac_matches_rfc4231() {
        // RFC 4231 test case 2.
        assert_eq!(
            hex(&hmac(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn moto_server_lists_what_it_holds() {
        let s3 = S3Server::start();
        s3.create_bucket("kit");
        assert!(s3.objects("kit").is_empty());
        s3.put_object("kit", "a/b.vma", b"hello");
        assert_eq!(s3.objects("kit"), vec![("a/b.vma".to_string(), 5)]);
        assert!(s3.multipart_uploads("kit").is_empty());
        let reqs = s3.requests();
        assert!(
            reqs.iter()
                .any(|r| r.method == "PUT" && r.path == "/kit/a/b.vma" && r.status == 200),
            "{reqs:?}"
        );
        // Through a slow proxy: one request takes at least the delay.
        let proxy = SlowProxy::start(s3.addr(), Duration::from_millis(200));
        let t = Instant::now();
        let a = http(proxy.addr(), "GET", "/moto-api/", &[], b"").unwrap();
        assert_eq!(a.status, 200);
        assert!(t.elapsed() >= Duration::from_millis(200));
    }
}
