//! A live backup of the real running guest ([`crate::guest`]) and what it
//! proves, for the demo and the tests.
//!
//! The guest boots with its workload (file create/rename/delete on the ext4
//! system disk, random 4 KiB O_DIRECT writes on the data disk), writes the
//! marker `before`, is backed up (throttled, so the backup lasts seconds)
//! and, once the jobs run, writes the marker `after`. Then it powers off and
//! the archive is extracted with the workspace's `vma`: the archive must hold
//! `before` and not `after` on both disks, the disks both. Optionally a
//! fresh VM boots the restored disks and lists the markers it finds.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::Value;
use vma_live::{run_backup, BackupOptions, BackupReport};

use crate::fixture::wait_for_jobs;
use crate::guest::{self, BootOptions, Guest, GuestImage};
use crate::qemu::{self, Disk};
use crate::Result;

/// 4 KiB block of the data disk that the marker `before` goes to.
pub const BLOCK_BEFORE: u64 = 6000;
/// 4 KiB block of the data disk that the marker `after` goes to (near the
/// end: the job has not copied it yet when the guest writes it).
pub const BLOCK_AFTER: u64 = 8000;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Start the guest agent in the guest.
    pub agent_in_guest: bool,
    /// Give the backup the agent's socket (`--guest-agent`).
    pub freeze: bool,
    /// Per-write delay of the throttled backup.
    pub throttle: Duration,
    /// Boot a fresh VM on the restored disks.
    pub restore: bool,
    /// After the backup, start a second one with the agent and interrupt it once its
    /// jobs run: the guest must be thawed and writing.
    pub interrupt: bool,
    /// Set to stop (from a signal handler).
    pub cancel: Arc<AtomicBool>,
}

/// Which markers a pair of disk images holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Markers {
    /// `/markers/before` on the ext4 system disk.
    pub file_before: bool,
    /// `/markers/after` on the ext4 system disk.
    pub file_after: bool,
    /// `MARK:before` in [`BLOCK_BEFORE`] of the data disk.
    pub block_before: bool,
    /// `MARK:after` in [`BLOCK_AFTER`] of the data disk.
    pub block_after: bool,
}

impl Markers {
    /// `before` on both disks, `after` on neither: the disks as of a
    /// backup's instant between the two.
    pub fn is_backup_instant(&self) -> bool {
        self.file_before && self.block_before && !self.file_after && !self.block_after
    }

    /// Both markers on both disks.
    pub fn has_all(&self) -> bool {
        self.file_before && self.block_before && self.file_after && self.block_after
    }
}

/// The guest's workload counters (`meta N`, `probe N` on its console).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Work {
    /// File create/rename/delete rounds on ext4.
    pub meta: u64,
    /// O_DIRECT writes on the data disk.
    pub probe: u64,
}

/// A fresh VM on the restored disks.
#[derive(Debug, Clone)]
pub struct Restored {
    /// QEMU start to `ready`.
    pub boot_time: Duration,
    /// The markers its init found on the system disk.
    pub found: Vec<String>,
}

/// An interrupted backup, and the guest afterwards.
#[derive(Debug, Clone)]
pub struct Interrupted {
    /// What the backup returned.
    pub error: String,
    /// `guest-fsfreeze-status` afterwards (`thawed`).
    pub freeze_status: String,
    /// The guest wrote and synced a marker afterwards.
    pub marked: bool,
}

/// What the run found.
#[derive(Debug)]
pub struct Outcome {
    /// QEMU start to the guest's `ready`.
    pub boot_time: Duration,
    /// The backup's report.
    pub report: BackupReport,
    /// Whether the backup jobs still ran when `after` was written.
    pub after_during_backup: bool,
    /// Workload counters when the jobs started, when the backup ended, at power-off.
    pub work: [Work; 3],
    /// `e2fsck -fn` of the system disk extracted from the archive (exit code, output).
    pub fsck: (i32, String),
    /// Markers in the archive (the ext4 read after a journal replay on a copy when
    /// `e2fsck -fn` was not clean).
    pub archive: Markers,
    /// Whether the archive's ext4 markers were read without a journal replay.
    pub archive_read_unreplayed: bool,
    /// Markers on the source disks after the guest powered off.
    pub source: Markers,
    /// The restore, when planned.
    pub restored: Option<Restored>,
    /// The interrupted second backup, when planned.
    pub interrupted: Option<Interrupted>,
    /// The extracted disk images, in archive order.
    pub extracted: Vec<PathBuf>,
    /// The archive.
    pub archive_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Outcome {
    /// The run's temporary directory (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn work(g: &Guest) -> Work {
    Work {
        meta: g.console.last_count("meta"),
        probe: g.console.last_count("probe"),
    }
}

fn check_cancel(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(std::sync::atomic::Ordering::SeqCst) {
        return Err("interrupted".into());
    }
    Ok(())
}

/// Runs `plan`: boot, back up while the guest writes, power off, extract,
/// check, and maybe boot the restored disks.
pub fn run(plan: &Plan) -> Result<Outcome> {
    qemu::run_tool(qemu::QEMU_SYSTEM, &["--version"])?;
    let image = guest::image()?;
    let dir = tempfile::Builder::new()
        .prefix("vma-live-guest-")
        .tempdir()
        .map_err(|e| format!("creating a temporary directory: {e}"))?;
    let disks = guest::make_disks(dir.path(), &image)?;
    let opts = BootOptions {
        agent: plan.agent_in_guest,
        work: true,
    };
    let mut g = Guest::boot(dir.path(), &image, disks, opts)?;
    let boot_time = g.boot_time;
    check_cancel(&plan.cancel)?;
    g.mark("before", BLOCK_BEFORE)?;
    // Let the workload get going: some file rounds and probe writes.
    g.console.wait_for("meta", guest::COMMAND_TIMEOUT)?;
    g.console.wait_for("probe", guest::COMMAND_TIMEOUT)?;

    let archive_path = dir.path().join("vm.vma");
    let mut backup = BackupOptions::new(&g.vm.qmp_path, &archive_path).throttle(plan.throttle);
    if plan.freeze {
        backup.guest_agent = Some(g.agent_socket.clone());
    }
    backup.cancel = Arc::clone(&plan.cancel);
    let mut ctl = g.vm.control()?;
    let job = thread::spawn(move || run_backup(&backup));
    wait_for_jobs(&mut ctl, 2, Duration::from_secs(60))?;
    let at_start = work(&g);
    g.mark("after", BLOCK_AFTER)?;
    let jobs = ctl.execute("query-block-jobs", Value::Null)?;
    let after_during_backup = jobs.as_array().is_some_and(|j| !j.is_empty());
    let report = job.join().map_err(|_| "the backup thread panicked")??;
    let at_end = work(&g);
    let interrupted = if plan.interrupt {
        Some(interrupt_backup(&mut g, &mut ctl, plan, dir.path())?)
    } else {
        None
    };
    drop(ctl);
    // The guest writes on after the backup: one more round of file churn.
    g.console
        .wait_count("meta", at_end.meta, guest::COMMAND_TIMEOUT)?;
    g.poweroff()?;
    let at_off = work(&g);
    let source = markers(
        &g.disks[0].path,
        &source_data(&g.disks[1], dir.path())?,
        None,
    )?;

    let into = dir.path().join("extracted");
    let extracted = guest::vma_extract(&archive_path, &into)?;
    if extracted.len() != 2 {
        return Err(format!(
            "vma extract gave {} disks, not 2: {extracted:?}",
            extracted.len()
        )
        .into());
    }
    let fsck = guest::e2fsck(&extracted[0], &["-fn"])?;
    let data = std::fs::read(&extracted[1])?;
    let replay = (fsck.0 != 0).then(|| dir.path().join("replayed.raw"));
    let archive = markers(&extracted[0], &data, replay.as_deref())?;
    drop(data);
    check_cancel(&plan.cancel)?;
    let restored = if plan.restore {
        Some(boot_restored(dir.path(), &image, &extracted)?)
    } else {
        None
    };
    Ok(Outcome {
        boot_time,
        report,
        after_during_backup,
        work: [at_start, at_end, at_off],
        fsck,
        archive,
        archive_read_unreplayed: replay.is_none(),
        source,
        restored,
        interrupted,
        extracted,
        archive_path,
        dir,
    })
}

/// A second, throttled backup with the agent, cancelled (as Ctrl-C does) once its
/// jobs run; then the agent's view of the freeze, and a marker written.
fn interrupt_backup(
    g: &mut Guest,
    ctl: &mut vma_live::Qmp,
    plan: &Plan,
    dir: &Path,
) -> Result<Interrupted> {
    let mut opts =
        BackupOptions::new(&g.vm.qmp_path, dir.join("interrupted.vma")).throttle(plan.throttle);
    opts.guest_agent = Some(g.agent_socket.clone());
    let cancel = Arc::clone(&opts.cancel);
    let job = thread::spawn(move || run_backup(&opts));
    wait_for_jobs(ctl, 2, Duration::from_secs(60))?;
    cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    let error = match job.join().map_err(|_| "the backup thread panicked")? {
        Ok(r) => return Err(format!("the interrupted backup succeeded: {r}").into()),
        Err(e) => e.to_string(),
    };
    let mut agent =
        vma_live::agent::GuestAgent::connect(&g.agent_socket, vma_live::agent::SYNC_TIMEOUT)?;
    let status = agent.execute("guest-fsfreeze-status", vma_live::agent::THAW_TIMEOUT)?;
    drop(agent);
    let marked = g.mark("interrupted", BLOCK_AFTER - 1).is_ok();
    Ok(Interrupted {
        error,
        freeze_status: status.as_str().unwrap_or_default().to_string(),
        marked,
    })
}

fn source_data(disk: &Disk, scratch: &Path) -> Result<Vec<u8>> {
    qemu::read_image(&disk.path, &disk.format, scratch)
}

/// The markers of a system disk image and a data disk's bytes. With
/// `replay_copy`, the ext4 is read from a copy there after `e2fsck -fy`
/// replayed its journal and repaired it (what a mount would do first).
fn markers(system: &Path, data: &[u8], replay_copy: Option<&Path>) -> Result<Markers> {
    let fs = match replay_copy {
        Some(copy) => {
            std::fs::copy(system, copy)?;
            let (code, out) = guest::e2fsck(copy, &["-fy"])?;
            // 0: clean, 1: errors corrected; anything else leaves no filesystem to read.
            if code > 1 {
                return Err(
                    format!("e2fsck -fy of the archive's system disk: {code}\n{out}").into(),
                );
            }
            copy
        }
        None => system,
    };
    Ok(Markers {
        file_before: guest::ext4_file(fs, "/markers/before")?.is_some(),
        file_after: guest::ext4_file(fs, "/markers/after")?.is_some(),
        block_before: guest::has_block_marker(data, BLOCK_BEFORE, "before"),
        block_after: guest::has_block_marker(data, BLOCK_AFTER, "after"),
    })
}

/// Boots a fresh VM on copies of the restored images and lists the markers
/// its init finds.
fn boot_restored(dir: &Path, image: &GuestImage, extracted: &[PathBuf]) -> Result<Restored> {
    let rdir = dir.join("restored-vm");
    std::fs::create_dir(&rdir)?;
    let mut disks = Vec::new();
    for (i, p) in extracted.iter().enumerate() {
        // A copy: booting writes to the disks, the extracted images stay the archive's.
        let copy = rdir.join(format!("restored{i}.raw"));
        std::fs::copy(p, &copy)?;
        disks.push(Disk {
            path: copy,
            format: "raw".into(),
            node_name: format!("restored{i}"),
            qdev_id: format!("vd{i}"),
        });
    }
    let mut g = Guest::boot(&rdir, image, disks, BootOptions::default())?;
    let found = g.found_markers();
    g.poweroff()?;
    Ok(Restored {
        boot_time: g.boot_time,
        found,
    })
}
