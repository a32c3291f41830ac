//! A thin QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! QMP is one JSON object per line. After the greeting and
//! `qmp_capabilities`, every command carries an `id` that its reply echoes;
//! asynchronous events arrive interleaved with replies at any time. A reader
//! thread parses every message; [`Qmp::execute`] picks out the reply with its
//! id and buffers the events it passes, which [`Qmp::next_event`] hands out
//! in arrival order.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::Error;

/// Longest wait for the reply to a command (QEMU answers in milliseconds;
/// `blockdev-add` of an NBD node connects synchronously).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// One asynchronous QMP event.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event name, e.g. `BLOCK_JOB_COMPLETED`.
    pub name: String,
    /// The event's `data` member (`null` when absent).
    pub data: Value,
}

enum Incoming {
    Message(Value),
    Closed,
    Garbage(String),
}

/// A connected QMP session in command mode.
pub struct Qmp {
    stream: UnixStream,
    rx: Receiver<Incoming>,
    events: VecDeque<Event>,
    next_id: u64,
    greeting: Value,
    closed: bool,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("next_id", &self.next_id)
            .field("buffered_events", &self.events.len())
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode
    /// (`qmp_capabilities`).
    pub fn connect(path: impl AsRef<Path>) -> Result<Qmp, Error> {
        let path = path.as_ref();
        let connect_err = |source| Error::QmpConnect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        let read_half = stream.try_clone().map_err(connect_err)?;
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_loop(read_half, &tx))
            .map_err(connect_err)?;
        let mut qmp = Qmp {
            stream,
            rx,
            events: VecDeque::new(),
            next_id: 1,
            greeting: Value::Null,
            closed: false,
        };
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let greeting = qmp.recv(deadline)?.ok_or(Error::QmpNoGreeting)?;
        if greeting.get("QMP").is_none() {
            return Err(Error::QmpGreeting { got: greeting });
        }
        qmp.greeting = greeting;
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// The greeting QEMU sent (`{"QMP": {"version": ..., ...}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs `command` with `arguments` (an object, or `null` for none) and
    /// returns its `return` value. Events arriving meanwhile are buffered.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Error> {
        self.execute_timeout(command, arguments, DEFAULT_TIMEOUT)
    }

    /// [`execute`](Self::execute) with an explicit reply timeout.
    pub fn execute_timeout(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        if self.closed {
            return Err(Error::QmpClosed);
        }
        if let Err(source) = self.stream.write_all(line.as_bytes()) {
            return Err(match source.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    self.closed = true;
                    Error::QmpClosed
                }
                _ => Error::QmpSend {
                    command: command.to_string(),
                    source,
                },
            });
        }
        let deadline = Instant::now() + timeout;
        loop {
            let msg = self.recv(deadline)?.ok_or_else(|| Error::QmpTimeout {
                command: command.to_string(),
            })?;
            if let Some(ev) = as_event(&msg) {
                self.events.push_back(ev);
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply without our id cannot happen in command mode
                // (we send one command at a time); ignore it.
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let (class, desc) = error_class_desc(err);
                return Err(Error::QmpCommand {
                    command: command.to_string(),
                    class,
                    desc,
                });
            }
            return Err(Error::QmpReply { reply: msg });
        }
    }

    /// Runs an HMP command line through `human-monitor-command` and returns
    /// its output text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, Error> {
        let out = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        Ok(out.as_str().unwrap_or_default().to_string())
    }

    /// The next event, waiting up to `timeout`; `Ok(None)` on timeout.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, Error> {
        if let Some(ev) = self.events.pop_front() {
            return Ok(Some(ev));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let Some(msg) = self.recv(deadline)? else {
                return Ok(None);
            };
            if let Some(ev) = as_event(&msg) {
                return Ok(Some(ev));
            }
            // A stray reply (none can be pending here): ignore it.
        }
    }

    /// The next message, or `None` once the deadline passed.
    fn recv(&mut self, deadline: Instant) -> Result<Option<Value>, Error> {
        if self.closed {
            return Err(Error::QmpClosed);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(Incoming::Message(msg)) => Ok(Some(msg)),
            Ok(Incoming::Closed) | Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Err(Error::QmpClosed)
            }
            Ok(Incoming::Garbage(line)) => Err(Error::QmpNotJson { line }),
            Err(RecvTimeoutError::Timeout) => Ok(None),
        }
    }
}

/// The `class` and `desc` of an `error` reply's object, as QMP and the guest agent both
/// send it (`?` for one that is missing).
pub(crate) fn error_class_desc(err: &Value) -> (String, String) {
    let field = |k: &str| {
        err.get(k)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    (field("class"), field("desc"))
}

fn as_event(msg: &Value) -> Option<Event> {
    let name = msg.get("event")?.as_str()?;
    Some(Event {
        name: name.to_string(),
        data: msg.get("data").cloned().unwrap_or(Value::Null),
    })
}

impl Drop for Qmp {
    fn drop(&mut self) {
        // Ends the reader thread.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn read_loop(stream: UnixStream, tx: &mpsc::Sender<Incoming>) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        // A line the connection's end cut short (QEMU killed mid-message) is
        // the connection closing, not garbage.
        match reader.read_until(b'\n', &mut line) {
            Ok(_) if line.ends_with(b"\n") => {}
            _ => {
                let _ = tx.send(Incoming::Closed);
                return;
            }
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let msg = match serde_json::from_str::<Value>(text) {
            Ok(v) if v.is_object() => Incoming::Message(v),
            _ => Incoming::Garbage(text.chars().take(200).collect()),
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A QMP server on a fresh socket: greets, then runs `session` on the
    /// connection's writer and buffered reader.
    fn fake_server(
        session: impl FnOnce(&mut UnixStream, &mut BufReader<UnixStream>) + Send + 'static,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            session(&mut w, &mut r);
        });
        (dir, path)
    }

    /// A scripted QMP server: greets, then answers each command line by
    /// line with whatever `script` returns (possibly several lines).
    fn fake_qmp(script: fn(&Value) -> Vec<String>) -> (tempfile::TempDir, std::path::PathBuf) {
        fake_server(move |w, r| {
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let cmd: Value = serde_json::from_str(&line).unwrap();
                for out in script(&cmd) {
                    writeln!(w, "{out}").unwrap();
                }
                line.clear();
            }
        })
    }

    #[test]
    fn replies_and_interleaved_events() {
        let (_d, path) = fake_qmp(|cmd| {
            let id = cmd["id"].clone();
            match cmd["execute"].as_str().unwrap() {
                "qmp_capabilities" => vec![json!({"return": {}, "id": id}).to_string()],
                "go" => vec![
                    r#"{"event": "A", "data": {"n": 1}, "timestamp": {}}"#.into(),
                    json!({"return": {"ok": true}, "id": id}).to_string(),
                    r#"{"event": "B", "timestamp": {}}"#.into(),
                ],
                _ => vec![
                    json!({"error": {"class": "GenericError", "desc": "nope"}, "id": id})
                        .to_string(),
                ],
            }
        });
        let mut q = Qmp::connect(&path).unwrap();
        assert_eq!(q.execute("go", Value::Null).unwrap(), json!({"ok": true}));
        let a = q.next_event(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!((a.name.as_str(), &a.data), ("A", &json!({"n": 1})));
        let b = q.next_event(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(b.name, "B");
        assert!(q.next_event(Duration::from_millis(50)).unwrap().is_none());
        match q.execute("bad", json!({})) {
            Err(Error::QmpCommand { class, desc, .. }) => {
                assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "nope"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn closed_connection_is_reported() {
        let (_d, path) = fake_qmp(|cmd| match cmd["execute"].as_str().unwrap() {
            "qmp_capabilities" => vec![json!({"return": {}, "id": cmd["id"]}).to_string()],
            _ => panic!("server goes away"),
        });
        let mut q = Qmp::connect(&path).unwrap();
        assert!(matches!(q.execute("x", Value::Null), Err(Error::QmpClosed)));
        assert!(matches!(
            q.next_event(Duration::from_secs(1)),
            Err(Error::QmpClosed)
        ));
    }

    #[test]
    fn connection_cut_mid_message_is_closed() {
        let (_d, path) = fake_server(|w, r| {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let id = serde_json::from_str::<Value>(&line).unwrap()["id"].clone();
            writeln!(w, "{}", json!({"return": {}, "id": id})).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            // QEMU killed while writing an event: no newline, then the end.
            write!(w, r#"{{"event": "BLOCK_JOB_COMPL"#).unwrap();
        });
        let mut q = Qmp::connect(&path).unwrap();
        assert!(matches!(q.execute("x", Value::Null), Err(Error::QmpClosed)));
    }

    #[test]
    fn not_a_qmp_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            writeln!(s, "hello").unwrap();
            thread::sleep(Duration::from_millis(200));
        });
        assert!(matches!(Qmp::connect(&path), Err(Error::QmpNotJson { .. })));
    }
}
