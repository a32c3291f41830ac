//! A client of QEMU's guest agent (`qemu-ga` in the guest, reached through a
//! virtio-serial chardev socket on the host), for the one thing a backup
//! needs from it: freezing the guest's filesystems around the backup
//! transaction, as Proxmox does, so the archive is filesystem-consistent.
//!
//! The agent protocol is QMP's JSON without greeting or capabilities; a
//! connection may hold stale replies of an earlier client, so every session
//! starts with `guest-sync-delimited` (a 0xFF byte resets the agent's parser
//! and precedes its answer). Every wait is bounded: an agent that does not
//! answer is an [`AgentError::Timeout`], never a hang.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long the agent may take to answer `guest-sync-delimited`; an agent
/// slower than this is taken as absent.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// The freeze bound: how long `guest-fsfreeze-freeze` may take. Past it the
/// backup sends a thaw and goes on crash-consistent. The filesystems then stay
/// frozen only for the backup transaction (one QMP round trip) and the thaw.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `guest-fsfreeze-thaw` may take.
pub const THAW_TIMEOUT: Duration = Duration::from_secs(10);

/// Freezes held by this process right now (see [`freezes_held`]).
static HELD: AtomicUsize = AtomicUsize::new(0);

/// How many [`FrozenGuest`]s exist in this process: a signal handler that
/// would exit at once should wait while this is not 0, so the guest is
/// thawed first (a freeze is held for milliseconds).
pub fn freezes_held() -> usize {
    HELD.load(Ordering::SeqCst)
}

/// What went wrong talking to the guest agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The agent's socket cannot be reached.
    #[error("connecting to the guest agent at {}: {source}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("guest agent: {command}: {source}")]
    Io {
        /// The command.
        command: String,
        /// The OS error.
        source: io::Error,
    },
    /// No answer in time (the agent is not running in the guest, or hangs).
    #[error("guest agent: no answer to {command} in {} s", .timeout.as_secs_f64())]
    Timeout {
        /// The command.
        command: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The agent refused the command.
    #[error("guest agent: {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// The error class, e.g. `GenericError`.
        class: String,
        /// The agent's description.
        desc: String,
    },
    /// A reply that is not what the command returns.
    #[error("guest agent: {command}: unexpected reply {reply}")]
    Reply {
        /// The command.
        command: String,
        /// What came.
        reply: String,
    },
    /// The socket was closed.
    #[error("guest agent: connection closed during {command}")]
    Closed {
        /// The command.
        command: String,
    },
}

/// A connection to a guest agent, synchronised.
#[derive(Debug)]
pub struct GuestAgent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl GuestAgent {
    /// Connects to the agent's chardev socket and synchronises with
    /// `guest-sync-delimited`, waiting at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<GuestAgent, AgentError> {
        let connect_err = |source| AgentError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let writer = UnixStream::connect(path).map_err(connect_err)?;
        let reader = BufReader::new(writer.try_clone().map_err(connect_err)?);
        let mut agent = GuestAgent { reader, writer };
        agent.sync(timeout)?;
        Ok(agent)
    }

    fn sync(&mut self, timeout: Duration) -> Result<(), AgentError> {
        const COMMAND: &str = "guest-sync-delimited";
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let id = u64::from(std::process::id()) << 24 | NEXT.fetch_add(1, Ordering::Relaxed) as u64;
        let msg = json!({ "execute": COMMAND, "arguments": { "id": id } });
        let mut bytes = vec![0xff];
        bytes.extend_from_slice(msg.to_string().as_bytes());
        bytes.push(b'\n');
        self.send(COMMAND, &bytes)?;
        let deadline = Instant::now() + timeout;
        // Skip everything up to the agent's 0xFF, then stale replies.
        loop {
            let mut byte = [0u8];
            self.read_with_deadline(COMMAND, deadline, timeout, |r| r.read(&mut byte))?;
            if byte[0] == 0xff {
                break;
            }
        }
        loop {
            let reply = self.read_reply(COMMAND, deadline, timeout)?;
            if reply.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(());
            }
        }
    }

    /// Runs `command` (no arguments) and returns its `return` value.
    pub fn execute(&mut self, command: &str, timeout: Duration) -> Result<Value, AgentError> {
        let mut line = json!({ "execute": command }).to_string();
        line.push('\n');
        self.send(command, line.as_bytes())?;
        let deadline = Instant::now() + timeout;
        let reply = self.read_reply(command, deadline, timeout)?;
        if let Some(ret) = reply.get("return") {
            return Ok(ret.clone());
        }
        if let Some(err) = reply.get("error") {
            let (class, desc) = crate::qmp::error_class_desc(err);
            return Err(AgentError::Command {
                command: command.to_string(),
                class,
                desc,
            });
        }
        Err(AgentError::Reply {
            command: command.to_string(),
            reply: reply.to_string(),
        })
    }

    /// Runs a command whose reply is a count (of filesystems frozen or thawed).
    fn count(&mut self, command: &str, timeout: Duration) -> Result<u64, AgentError> {
        let ret = self.execute(command, timeout)?;
        ret.as_u64().ok_or_else(|| AgentError::Reply {
            command: command.to_string(),
            reply: ret.to_string(),
        })
    }

    /// `guest-fsfreeze-freeze`: freezes the guest's filesystems, waiting at
    /// most `timeout`. The guard it returns thaws them, also when the freeze
    /// failed or timed out (the guest may then be partly frozen).
    pub fn freeze(mut self, timeout: Duration) -> FrozenGuest {
        let since = Instant::now();
        // Counted before the command: a signal arriving meanwhile must wait for the thaw.
        HELD.fetch_add(1, Ordering::SeqCst);
        let frozen = self.count("guest-fsfreeze-freeze", timeout);
        FrozenGuest {
            agent: Some(self),
            frozen,
            since,
        }
    }

    /// `guest-fsfreeze-thaw`; returns how many filesystems it thawed.
    pub fn thaw(&mut self, timeout: Duration) -> Result<u64, AgentError> {
        self.count("guest-fsfreeze-thaw", timeout)
    }

    fn send(&mut self, command: &str, bytes: &[u8]) -> Result<(), AgentError> {
        self.writer
            .write_all(bytes)
            .map_err(|source| AgentError::Io {
                command: command.to_string(),
                source,
            })
    }

    fn read_reply(
        &mut self,
        command: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        loop {
            let mut line = Vec::new();
            let n = self.read_with_deadline(command, deadline, timeout, |r| {
                r.read_until(b'\n', &mut line)
            })?;
            if n == 0 {
                return Err(AgentError::Closed {
                    command: command.to_string(),
                });
            }
            // Stray delimiters and blank lines between messages carry nothing.
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{fffd}');
            if text.is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(text) {
                Ok(v) if v.is_object() => return Ok(v),
                _ => {
                    return Err(AgentError::Reply {
                        command: command.to_string(),
                        reply: text.to_string(),
                    })
                }
            }
        }
    }

    /// Runs one read on the socket with the time left until `deadline`.
    fn read_with_deadline<T>(
        &mut self,
        command: &str,
        deadline: Instant,
        timeout: Duration,
        read: impl FnOnce(&mut BufReader<UnixStream>) -> io::Result<T>,
    ) -> Result<T, AgentError> {
        let timed_out = || AgentError::Timeout {
            command: command.to_string(),
            timeout,
        };
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)?;
        let io_err = |source| AgentError::Io {
            command: command.to_string(),
            source,
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(io_err)?;
        match read(&mut self.reader) {
            Ok(v) => Ok(v),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(timed_out())
            }
            Err(e) => Err(io_err(e)),
        }
    }
}

/// A guest whose filesystems were asked to freeze; thawed by
/// [`thaw`](Self::thaw) or, failing that, when dropped.
#[derive(Debug)]
pub struct FrozenGuest {
    agent: Option<GuestAgent>,
    frozen: Result<u64, AgentError>,
    since: Instant,
}

impl FrozenGuest {
    /// How many filesystems the agent froze, or why the freeze failed.
    pub fn frozen(&self) -> Result<u64, &AgentError> {
        self.frozen.as_ref().copied()
    }

    /// Thaws the guest; returns how long it was frozen (from the freeze request).
    pub fn thaw(mut self) -> Result<Duration, AgentError> {
        let result = self.thaw_now();
        result.map(|_| self.since.elapsed())
    }

    fn thaw_now(&mut self) -> Result<u64, AgentError> {
        let Some(mut agent) = self.agent.take() else {
            return Ok(0);
        };
        let result = agent.thaw(THAW_TIMEOUT);
        HELD.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

impl Drop for FrozenGuest {
    fn drop(&mut self) {
        let _ = self.thaw_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake agent answering each line with `answer(line)` (None: no answer).
    fn fake_agent(
        answer: impl Fn(&Value) -> Option<Vec<u8>> + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<Vec<String>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut out = stream;
            let mut seen = Vec::new();
            loop {
                let mut line = Vec::new();
                if reader.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                    return seen;
                }
                let text = String::from_utf8_lossy(&line)
                    .trim_start_matches('\u{fffd}')
                    .trim()
                    .to_string();
                let v: Value = serde_json::from_str(&text).unwrap();
                seen.push(v["execute"].as_str().unwrap_or("?").to_string());
                if let Some(a) = answer(&v) {
                    out.write_all(&a).unwrap();
                }
            }
        });
        (dir, path, handle)
    }

    fn standard(v: &Value) -> Option<Vec<u8>> {
        match v["execute"].as_str()? {
            // A stale reply first, as a previous client may have left.
            "guest-sync-delimited" => {
                let mut a = b"{\"return\": 7}\n\xff".to_vec();
                a.extend(format!("{{\"return\": {}}}\n", v["arguments"]["id"]).bytes());
                Some(a)
            }
            "guest-fsfreeze-freeze" => Some(b"{\"return\": 2}\n".to_vec()),
            "guest-fsfreeze-thaw" => Some(b"{\"return\": 2}\n".to_vec()),
            _ => {
                Some(b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no\"}}\n".to_vec())
            }
        }
    }

    /// What the agent hears in a freeze that is thawed.
    const SYNC_FREEZE_THAW: [&str; 3] = [
        "guest-sync-delimited",
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
    ];

    #[test]
    fn freeze_and_thaw() {
        let (_dir, path, agent) = fake_agent(standard);
        let ga = GuestAgent::connect(&path, SYNC_TIMEOUT).unwrap();
        let frozen = ga.freeze(FREEZE_TIMEOUT);
        assert_eq!(frozen.frozen().unwrap(), 2);
        // Other tests freeze in parallel: only a lower bound holds here.
        assert!(freezes_held() >= 1);
        frozen.thaw().unwrap();
        assert_eq!(agent.join().unwrap(), SYNC_FREEZE_THAW);
    }

    #[test]
    fn dropped_freeze_thaws() {
        let (_dir, path, agent) = fake_agent(standard);
        let frozen = GuestAgent::connect(&path, SYNC_TIMEOUT)
            .unwrap()
            .freeze(FREEZE_TIMEOUT);
        drop(frozen);
        assert_eq!(agent.join().unwrap().last().unwrap(), "guest-fsfreeze-thaw");
    }

    #[test]
    fn silent_agent_times_out() {
        let (_dir, path, _agent) = fake_agent(|_| None);
        let t = Instant::now();
        let err = GuestAgent::connect(&path, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, AgentError::Timeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn refused_freeze_is_an_error_and_still_thaws() {
        let (_dir, path, _agent) = fake_agent(|v| match v["execute"].as_str()? {
            "guest-fsfreeze-freeze" => {
                Some(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"busy\"}}\n".to_vec())
            }
            _ => standard(v),
        });
        let ga = GuestAgent::connect(&path, SYNC_TIMEOUT).unwrap();
        let frozen = ga.freeze(FREEZE_TIMEOUT);
        let err = frozen.frozen().unwrap_err();
        assert!(err.to_string().contains("busy"), "{err}");
        frozen.thaw().unwrap();
    }

    /// The freeze bound: a freeze that does not answer in time is given up, and the
    /// guard still thaws.
    #[test]
    fn hung_freeze_times_out_and_still_thaws() {
        let (_dir, path, agent) = fake_agent(|v| match v["execute"].as_str()? {
            "guest-fsfreeze-freeze" => None,
            _ => standard(v),
        });
        let ga = GuestAgent::connect(&path, SYNC_TIMEOUT).unwrap();
        let t = Instant::now();
        let frozen = ga.freeze(Duration::from_millis(300));
        assert!(
            matches!(frozen.frozen(), Err(AgentError::Timeout { .. })),
            "{frozen:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(3));
        frozen.thaw().unwrap();
        assert_eq!(agent.join().unwrap(), SYNC_FREEZE_THAW);
    }

    #[test]
    fn missing_socket() {
        let err =
            GuestAgent::connect(Path::new("/nonexistent/qga.sock"), SYNC_TIMEOUT).unwrap_err();
        assert!(matches!(err, AgentError::Connect { .. }), "{err}");
    }
}
