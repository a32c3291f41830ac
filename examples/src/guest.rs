//! A real running Linux guest for the demo and the tests (issue 16).
//!
//! `scripts/build-guest` makes it from Debian packages at test time (cached
//! under `target/guest`): Debian's kernel booted directly (uncompressed, PVH
//! entry: the decompressor alone took 16 s under TCG), an initramfs that
//! loads the virtio and ext4 modules and switches to `/dev/vda`, an ext4
//! system disk holding busybox, qemu-guest-agent, a write probe and
//! `/sbin/init` (`scripts/guest-init`), which runs the workload and answers
//! commands on the serial console. The VM runs under TCG (`-cpu max -smp 1`):
//! KVM on this machine kind is nested without vmx and hangs.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::qemu::{self, Disk, Vm};
use crate::Result;

/// The prefix of every line the guest's init prints.
pub const PREFIX: &str = "vmalb: ";
/// How long a boot may take until the guest says `ready` (6 to 20 s under TCG here, 50 s
/// with the machine's two cores busy compiling besides).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one console command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The built guest: kernel, initramfs and the system disk's image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Debian's kernel, uncompressed (booted through its PVH entry).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The ext4 system disk (copy it before use).
    pub rootfs: PathBuf,
}

/// Builds the guest with `scripts/build-guest` (once per process; the
/// script caches across runs) and returns its files.
pub fn image() -> Result<GuestImage> {
    static BUILT: OnceLock<std::result::Result<GuestImage, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| e.to_string()))
        .clone()
        .map_err(Into::into)
}

/// Runs `cmd` to its end, stdin from /dev/null, and returns its output; an error if it
/// does not start (naming the program) or fails (what `failed` says of its output).
fn run_to_success(
    cmd: &mut Command,
    failed: impl FnOnce(&std::process::Output) -> String,
) -> Result<std::process::Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", Path::new(cmd.get_program()).display()))?;
    if !out.status.success() {
        return Err(failed(&out).into());
    }
    Ok(out)
}

fn build() -> Result<GuestImage> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-guest");
    let out = run_to_success(Command::new(&script).stderr(Stdio::inherit()), |out| {
        format!(
            "{} failed ({}): it builds the test guest from Debian packages",
            script.display(),
            out.status
        )
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default());
    let image = GuestImage {
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initrd.gz"),
        rootfs: dir.join("rootfs.ext4"),
    };
    for f in [&image.kernel, &image.initrd, &image.rootfs] {
        if !f.is_file() {
            return Err(format!("build-guest made no {}", f.display()).into());
        }
    }
    Ok(image)
}

/// What the guest does at boot.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootOptions {
    /// Start qemu-guest-agent (the VM always has the virtio-serial channel).
    pub agent: bool,
    /// Start the write workload at boot.
    pub work: bool,
}

/// The guest's serial console: lines it printed (with [`PREFIX`], which is
/// stripped), and commands to it.
#[derive(Debug)]
pub struct Console {
    stream: UnixStream,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
    cursor: usize,
}

impl Console {
    fn connect(path: &Path, log: &Path) -> Result<Console> {
        let stream =
            UnixStream::connect(path).map_err(|e| format!("serial {}: {e}", path.display()))?;
        let reader = stream.try_clone()?;
        let mut log = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let lines: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let shared = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(reader).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                let _ = writeln!(log, "{text}");
                if let Some(pos) = text.find(PREFIX) {
                    let (lock, cvar) = &*shared;
                    if let Ok(mut l) = lock.lock() {
                        l.push(text[pos + PREFIX.len()..].to_string());
                        cvar.notify_all();
                    }
                }
            }
        });
        Ok(Console {
            stream,
            lines,
            cursor: 0,
        })
    }

    /// Sends one command line.
    pub fn send(&mut self, command: &str) -> Result<()> {
        self.stream
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|e| format!("serial console: sending {command:?}: {e}").into())
    }

    /// Waits for the next line (after the previous one waited for) that
    /// starts with `start`, and returns it. A `FATAL` line is an error.
    pub fn wait_for(&mut self, start: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.lines;
        let mut lines = lock.lock().map_err(|_| "console lock poisoned")?;
        loop {
            while self.cursor < lines.len() {
                let line = &lines[self.cursor];
                self.cursor += 1;
                if line.starts_with("FATAL") {
                    return Err(format!("the guest failed: {line}").into());
                }
                if line.starts_with(start) {
                    return Ok(line.clone());
                }
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or_else(|| format!("the guest did not say {start:?} in {timeout:?}"))?;
            lines = cvar
                .wait_timeout(lines, left)
                .map_err(|_| "console lock poisoned")?
                .0;
        }
    }

    /// Like [`Console::wait_for`]; also returns the lines before that one
    /// (since the previous line waited for) that start with `keep`.
    pub fn wait_for_keeping(
        &mut self,
        start: &str,
        keep: &str,
        timeout: Duration,
    ) -> Result<(String, Vec<String>)> {
        let from = self.cursor;
        let line = self.wait_for(start, timeout)?;
        let lines = self.lines.0.lock().map_err(|_| "console lock poisoned")?;
        let kept = lines[from..self.cursor - 1]
            .iter()
            .filter(|l| l.starts_with(keep))
            .cloned()
            .collect();
        Ok((line, kept))
    }

    /// Waits until a `WORD N` line with N above `above` arrives; returns N.
    pub fn wait_count(&mut self, word: &str, above: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        let prefix = format!("{word} ");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.wait_for(&prefix, left)?;
            if let Some(n) = line[prefix.len()..]
                .trim()
                .parse()
                .ok()
                .filter(|&n| n > above)
            {
                return Ok(n);
            }
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The number in the last `WORD N` line so far (`meta`, `probe`).
    pub fn last_count(&self, word: &str) -> u64 {
        let prefix = format!("{word} ");
        self.lines()
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A running guest with its disks; QEMU is killed when dropped.
#[derive(Debug)]
pub struct Guest {
    /// The VM (QMP sockets for the backup and for control).
    pub vm: Vm,
    /// The serial console.
    pub console: Console,
    /// The disks: the ext4 system disk first (`/dev/vda`), then data disks.
    pub disks: Vec<Disk>,
    /// The host end of the guest agent's channel.
    pub agent_socket: PathBuf,
    /// Seconds from QEMU's start to the guest's `ready`.
    pub boot_time: Duration,
}

impl Guest {
    /// Boots `image` with `disks` (the first is the system disk) in `dir`
    /// and waits for `ready`.
    pub fn boot(
        dir: &Path,
        image: &GuestImage,
        disks: Vec<Disk>,
        opts: BootOptions,
    ) -> Result<Guest> {
        let serial = dir.join("serial.sock");
        let agent_socket = dir.join("qga.sock");
        let mut append = String::from("console=ttyS0 quiet");
        if opts.agent {
            append.push_str(" vmalb.qga");
        }
        if opts.work {
            append.push_str(" vmalb.work");
        }
        let chardev_serial = format!(
            "socket,id=ser0,path={},server=on,wait=off",
            serial.display()
        );
        let chardev_agent = format!(
            "socket,path={},server=on,wait=off,id=qga0",
            agent_socket.display()
        );
        let kernel = path_str(&image.kernel)?;
        let initrd = path_str(&image.initrd)?;
        let started = Instant::now();
        let vm = Vm::spawn(
            dir,
            &disks,
            &[
                "-cpu",
                "max",
                "-smp",
                "1",
                "-m",
                "256",
                "-kernel",
                kernel,
                "-initrd",
                initrd,
                "-append",
                &append,
                "-chardev",
                &chardev_serial,
                "-serial",
                "chardev:ser0",
                "-device",
                "virtio-serial",
                "-chardev",
                &chardev_agent,
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ],
        )?;
        let mut console = Console::connect(&serial, &dir.join("console.log"))?;
        console
            .wait_for("ready", BOOT_TIMEOUT)
            .map_err(|e| format!("{e}\nQEMU: {}", vm.log_text()))?;
        Ok(Guest {
            vm,
            console,
            disks,
            agent_socket,
            boot_time: started.elapsed(),
        })
    }

    /// Writes marker `name`: the file `/markers/NAME` on the system disk and
    /// `MARK:NAME` in 4 KiB block `block` of the first data disk, both synced.
    pub fn mark(&mut self, name: &str, block: u64) -> Result<()> {
        self.console.send(&format!("mark {name} {block}"))?;
        self.console
            .wait_for(&format!("marked {name}"), COMMAND_TIMEOUT)
            .map(drop)
    }

    /// The markers the guest found on its system disk at boot.
    pub fn found_markers(&self) -> Vec<String> {
        self.console
            .lines()
            .iter()
            .filter_map(|l| l.strip_prefix("found ").map(str::to_string))
            .collect()
    }

    /// Stops the workload, remounts read-only, powers off; waits for QEMU to exit.
    pub fn poweroff(&mut self) -> Result<()> {
        self.console.send("poweroff")?;
        self.console.wait_for("bye", COMMAND_TIMEOUT)?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while self.vm.is_running() {
            if Instant::now() > deadline {
                return Err("the guest did not power off".into());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// The system disk (a copy of the built ext4 image, raw, node `sys`,
/// device `vd0`) and a 32 MiB qcow2 data disk (node `data`, device `vd1`),
/// both in `dir`.
pub fn make_disks(dir: &Path, image: &GuestImage) -> Result<Vec<Disk>> {
    let sys = dir.join("sys.raw");
    std::fs::copy(&image.rootfs, &sys).map_err(|e| format!("{}: {e}", sys.display()))?;
    let data = dir.join("data.qcow2");
    qemu::create_qcow2(&data, 32 << 20, &[])?;
    Ok(vec![
        Disk {
            path: sys,
            format: "raw".into(),
            node_name: "sys".into(),
            qdev_id: "vd0".into(),
        },
        Disk {
            path: data,
            format: "qcow2".into(),
            node_name: "data".into(),
            qdev_id: "vd1".into(),
        },
    ])
}

/// `e2fsck ARGS IMAGE`: its exit code and its output.
pub fn e2fsck(image: &Path, args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new("e2fsck")
        .args(args)
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("e2fsck (e2fsprogs; scripts/install-deps installs it): {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

/// The content of `path` in the ext4 image (read with debugfs, without
/// replaying the journal); `None` if there is no such file.
pub fn ext4_file(image: &Path, path: &str) -> Result<Option<String>> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("debugfs (e2fsprogs; scripts/install-deps installs it): {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("not found") {
        return Ok(None);
    }
    if !out.status.success() || stderr.lines().count() > 1 {
        return Err(format!("debugfs cat {path} {}: {stderr}", image.display()).into());
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Whether 4 KiB block `block` of `data` starts with `MARK:NAME`.
pub fn has_block_marker(data: &[u8], block: u64, name: &str) -> bool {
    let start = usize::try_from(block * 4096).unwrap_or(usize::MAX);
    let want = format!("MARK:{name}");
    data.get(start..start + want.len()) == Some(want.as_bytes())
}

/// The `vma` command of this workspace (vma-cli): `$VMA_BIN`, or `vma` next
/// to the running executable's target directory (`cargo build -p vma-cli`
/// puts it there; `cargo test --workspace` builds it).
pub fn vma_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("vma"))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "the vma command (vma-cli) is not built next to {}: run cargo build -p vma-cli \
                 (same profile), or set VMA_BIN",
                exe.display()
            )
            .into()
        })
}

/// `vma extract ARCHIVE DIR` with the workspace's `vma`; returns the
/// extracted disk images, in archive order.
pub fn vma_extract(archive: &Path, into: &Path) -> Result<Vec<PathBuf>> {
    let vma = vma_binary()?;
    run_to_success(
        Command::new(&vma).arg("extract").arg(archive).arg(into),
        |out| {
            format!(
                "vma extract {}: {}\n{}",
                archive.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        },
    )?;
    let mut disks: Vec<PathBuf> = std::fs::read_dir(into)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "raw"))
        .collect();
    disks.sort();
    Ok(disks)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| format!("{}: path is not UTF-8", p.display()).into())
}
