//! A throwaway QEMU VM for the demo, the measurements and the tests.
//!
//! The VM has no guest OS: `-machine q35 -accel tcg -nodefaults -S` with
//! virtio-blk disks is enough for QEMU's backup job. It gets two QMP
//! sockets: one for the backup, one to control the VM meanwhile (QEMU
//! serves one client per QMP socket). The process is killed when the
//! [`Vm`] is dropped, so a failing test never leaves a QEMU behind.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vma_live::Qmp;

use crate::Result;

/// The emulator the VM runs in.
pub const QEMU_SYSTEM: &str = "qemu-system-x86_64";

/// The message for a missing QEMU tool.
pub fn missing_tool(tool: &str) -> String {
    format!(
        "{tool} not found: install QEMU first (scripts/install-deps does, as root on Debian: \
         qemu-system-x86 from bookworm-backports and qemu-utils)"
    )
}

/// Runs a QEMU tool (`qemu-img`, `qemu-io`, ...) and returns its stdout;
/// a missing tool, a non-zero exit or an error message on stdout (qemu-io
/// reports failures there and still exits 0) is an error.
pub fn run_tool(tool: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => missing_tool(tool),
            _ => format!("running {tool}: {e}"),
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        || stdout.contains("failed")
        || stdout.contains("error")
        || stdout.contains("Pattern verification")
    {
        return Err(format!(
            "{tool} {}: {}\n{stdout}{stderr}",
            args.join(" "),
            out.status
        )
        .into());
    }
    Ok(stdout)
}

/// A disk image file to attach to the VM.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The image file.
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// The format node's name (what a backup addresses).
    pub node_name: String,
    /// The virtio-blk device's id; the qdev path of its backend is
    /// `/machine/peripheral/<id>/virtio-backend`.
    pub qdev_id: String,
}

impl Disk {
    /// The path HMP's `qemu-io -d` takes to write as the guest would.
    pub fn qdev_path(&self) -> String {
        format!("/machine/peripheral/{}/virtio-backend", self.qdev_id)
    }
}

/// A running QEMU, killed when dropped.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    /// The QMP socket meant for the backup.
    pub qmp_path: PathBuf,
    /// A second QMP socket for controlling the VM during the backup.
    pub control_path: PathBuf,
}

impl Vm {
    /// Starts QEMU with `disks`, its sockets and log in `dir` (which must
    /// exist and stay while the VM runs), stopped (`-S`, no guest OS). Waits
    /// until both QMP sockets accept connections.
    ///
    /// QEMU runs in its own process group, so a Ctrl-C meant for this
    /// program does not kill it.
    pub fn start(dir: &Path, disks: &[Disk]) -> Result<Vm> {
        Vm::spawn(dir, disks, &["-S", "-m", "128"])
    }

    /// [`start`](Self::start) with `extra` arguments instead of `-S -m 128`
    /// (a kernel to boot, memory, more devices).
    pub fn spawn(dir: &Path, disks: &[Disk], extra: &[&str]) -> Result<Vm> {
        let qmp_path = dir.join("qmp-backup.sock");
        let control_path = dir.join("qmp-control.sock");
        let log = dir.join("qemu.log");
        let log_file = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new(QEMU_SYSTEM);
        cmd.args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
        ]);
        cmd.args(extra);
        for sock in [&qmp_path, &control_path] {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", sock.display()));
        }
        for (i, d) in disks.iter().enumerate() {
            cmd.arg("-blockdev").arg(format!(
                "driver=file,filename={},node-name=file{i}",
                d.path.display()
            ));
            cmd.arg("-blockdev").arg(format!(
                "driver={},file=file{i},node-name={}",
                d.format, d.node_name
            ));
            cmd.arg("-device").arg(format!(
                "virtio-blk-pci,drive={},id={}",
                d.node_name, d.qdev_id
            ));
        }
        cmd.stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(0);
        let child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => missing_tool(QEMU_SYSTEM),
            _ => format!("starting {QEMU_SYSTEM}: {e}"),
        })?;
        let mut vm = Vm {
            child,
            dir: dir.to_path_buf(),
            log,
            qmp_path,
            control_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(vm.qmp_path.exists() && vm.control_path.exists()) {
            if let Ok(Some(status)) = vm.child.try_wait() {
                return Err(format!("QEMU exited at start ({status}): {}", vm.log_text()).into());
            }
            if Instant::now() > deadline {
                return Err(format!("QEMU did not open its QMP sockets: {}", vm.log_text()).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(vm)
    }

    /// Connects to the control socket.
    pub fn control(&self) -> Result<Qmp> {
        Ok(Qmp::connect(&self.control_path)?)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks QEMU to quit over `qmp` and waits for it to exit (killing it
    /// after 10 s), so its image files are complete and closed.
    pub fn quit(&mut self, qmp: &mut Qmp) {
        let _ = qmp.execute("quit", serde_json::Value::Null);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// QEMU's output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The directory holding the sockets and the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates a qcow2 image of `size` bytes and writes `writes` into it with
/// qemu-io (each `(pattern byte, offset, length)`), before any VM uses it.
pub fn create_qcow2(path: &Path, size: u64, writes: &[(u8, u64, u64)]) -> Result<()> {
    let p = path_str(path)?;
    run_tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p, &size.to_string()],
    )?;
    qemu_io_writes(p, "qcow2", writes)
}

/// Creates a raw image of exactly `len` bytes (sparse) and writes `writes`
/// into it with qemu-io.
pub fn create_raw(path: &Path, len: u64, writes: &[(u8, u64, u64)]) -> Result<()> {
    let p = path_str(path)?;
    let f = File::create(path).map_err(|e| format!("{p}: {e}"))?;
    f.set_len(len).map_err(|e| format!("{p}: {e}"))?;
    drop(f);
    qemu_io_writes(p, "raw", writes)
}

fn qemu_io_writes(path: &str, format: &str, writes: &[(u8, u64, u64)]) -> Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let cmds: Vec<String> = writes
        .iter()
        .map(|(pat, off, len)| format!("write -P {pat:#x} {off} {len}"))
        .collect();
    let mut args = vec!["-f", format];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(path);
    run_tool("qemu-io", &args).map(drop)
}

/// Reads a whole image as QEMU sees it (qcow2 or raw) through
/// `qemu-img convert` to a raw file in `scratch`, and returns the bytes.
pub fn read_image(path: &Path, format: &str, scratch: &Path) -> Result<Vec<u8>> {
    let out = scratch.join("read-image.raw");
    let _ = std::fs::remove_file(&out);
    run_tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            format,
            "-O",
            "raw",
            path_str(path)?,
            path_str(&out)?,
        ],
    )?;
    let data = std::fs::read(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let _ = std::fs::remove_file(&out);
    Ok(data)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| format!("{}: path is not UTF-8", p.display()).into())
}
