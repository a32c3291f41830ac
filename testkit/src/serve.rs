//! A running `vma serve` for tests that read an archive's disks over NBD.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long `vma serve` may take to create its socket, and to exit when interrupted.
const SERVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A `vma serve ARCHIVE --socket SOCKET` started by a test; killed on drop.
#[derive(Debug)]
pub struct Serve {
    child: Child,
    socket: PathBuf,
}

impl Serve {
    /// Starts `vma` (the binary at `vma`) serving `archive` on the unix socket `socket`,
    /// with `extra` arguments, and waits until the socket exists.
    pub fn start(vma: &Path, archive: &Path, socket: &Path, extra: &[&str]) -> Serve {
        Self::start_with_env(vma, archive, socket, extra, &[])
    }

    /// [`start`](Self::start) with these environment variables set (an S3 server's
    /// credentials and endpoint, say).
    pub fn start_with_env(
        vma: &Path,
        archive: &Path,
        socket: &Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Serve {
        let child = Command::new(vma)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("serve")
            .arg(archive)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{} serve: {e}", vma.display()));
        let mut serve = Serve {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + SERVE_TIMEOUT;
        while !socket.exists() {
            if let Some(status) = serve.child.try_wait().expect("wait for vma serve") {
                panic!("vma serve exited ({status}) before creating its socket");
            }
            assert!(
                Instant::now() < deadline,
                "vma serve did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    /// The NBD URL of export `device`, as qemu-img and QEMU take it.
    pub fn url(&self, device: &str) -> String {
        format!("nbd+unix:///{device}?socket={}", self.socket.display())
    }

    /// The unix socket it serves on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends SIGINT (as Ctrl-C does) and waits for the exit, at most 20 s.
    pub fn interrupt(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill runs")
            .success());
        wait_with_timeout(&mut self.child)
    }

    /// The process, to wait for or read stderr from.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits at most 20 s for `child` to exit.
pub fn wait_with_timeout(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + SERVE_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not exit in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
