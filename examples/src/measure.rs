//! `--measure`: what the VMA target costs compared with QEMU writing the
//! same backup to a plain raw file, and what a backup adds to the latency of
//! a guest write.
//!
//! One VM with one fully written raw disk. Rounds alternate between the
//! baseline (`blockdev-backup` to a raw file node on the same filesystem)
//! and [`run_backup`]; the copy time is from the transaction to the job's
//! end, the durable time adds the target's flush (`blockdev-del`) or the
//! archive's fsync and rename. Guest write latency is the time of an HMP
//! `qemu-io` 64 KiB write: without a backup, and during each kind of backup
//! into an area the job has not copied yet (samples where the job had
//! already passed are dropped).

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use vma_live::{run_backup, BackupOptions, Qmp};

use crate::fixture::{job_offset, wait_for_job_end, wait_for_jobs};
use crate::qemu::{self, Disk, Vm};
use crate::Result;

const MIB: u64 = 1 << 20;
const ROUNDS: usize = 3;
const WRITE: u64 = 64 * 1024;

/// The figures `--measure` prints.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Disk size in bytes.
    pub size: u64,
    /// Baseline copy times (transaction to job end), one per round.
    pub raw_copy: Vec<Duration>,
    /// Baseline durable times (to the end of `blockdev-del`).
    pub raw_durable: Vec<Duration>,
    /// VMA copy times.
    pub vma_copy: Vec<Duration>,
    /// VMA durable times (to the archive's rename).
    pub vma_durable: Vec<Duration>,
    /// Guest write latencies without a backup.
    pub idle_latency: Vec<Duration>,
    /// Guest write latencies during the baseline backup (uncopied areas).
    pub raw_latency: Vec<Duration>,
    /// Guest write latencies during the VMA backup (uncopied areas).
    pub vma_latency: Vec<Duration>,
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

fn max(v: &[Duration]) -> Duration {
    v.iter().max().copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Measurement {
    fn rate(&self, d: Duration) -> f64 {
        self.size as f64 / MIB as f64 / d.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (rc, rd) = (median(&self.raw_copy), median(&self.raw_durable));
        let (vc, vd) = (median(&self.vma_copy), median(&self.vma_durable));
        writeln!(
            f,
            "live backup of a {} MiB raw disk (all data), median of {} rounds:",
            self.size / MIB,
            self.raw_copy.len()
        )?;
        writeln!(
            f,
            "  {:<28} {:>10} {:>10} {:>12}",
            "", "copy s", "MiB/s", "durable s"
        )?;
        writeln!(
            f,
            "  {:<28} {:>10.3} {:>10.1} {:>12.3}",
            "blockdev-backup -> raw file",
            rc.as_secs_f64(),
            self.rate(rc),
            rd.as_secs_f64()
        )?;
        writeln!(
            f,
            "  {:<28} {:>10.3} {:>10.1} {:>12.3}",
            "vma-live-backup -> .vma",
            vc.as_secs_f64(),
            self.rate(vc),
            vd.as_secs_f64()
        )?;
        writeln!(
            f,
            "  throughput ratio vma/raw: copy {:.2}, durable {:.2}",
            self.rate(vc) / self.rate(rc),
            rd.as_secs_f64() / vd.as_secs_f64().max(1e-9)
        )?;
        writeln!(
            f,
            "guest 64 KiB write latency (HMP qemu-io; median / max, samples):"
        )?;
        for (name, v) in [
            ("no backup", &self.idle_latency),
            ("during raw-file backup", &self.raw_latency),
            ("during vma backup", &self.vma_latency),
        ] {
            writeln!(
                f,
                "  {:<28} {:>8.2} ms / {:>8.2} ms  ({})",
                name,
                ms(median(v)),
                ms(max(v)),
                v.len()
            )?;
        }
        write!(
            f,
            "  added by a vma backup (medians): {:+.2} ms (raw-file backup: {:+.2} ms)",
            ms(median(&self.vma_latency)) - ms(median(&self.idle_latency)),
            ms(median(&self.raw_latency)) - ms(median(&self.idle_latency))
        )
    }
}

/// Runs the measurement on a disk of `size_mib` MiB. Setting `cancel`
/// stops it after the current step, killing the VM and removing its files.
pub fn run(size_mib: u64, cancel: Arc<AtomicBool>) -> Result<Measurement> {
    qemu::run_tool(qemu::QEMU_SYSTEM, &["--version"])?;
    let size = size_mib * MIB;
    let dir = tempfile::Builder::new()
        .prefix("vma-live-measure-")
        .tempdir()?;
    let disk_path = dir.path().join("disk.raw");
    qemu::create_raw(&disk_path, size, &[(0x5a, 0, size)])?;
    let disks = [Disk {
        path: disk_path,
        format: "raw".into(),
        node_name: "d0".into(),
        qdev_id: "vd0".into(),
    }];
    let vm = Vm::start(dir.path(), &disks)?;
    let mut ctl = vm.control()?;
    let mut m = Measurement {
        size,
        raw_copy: Vec::new(),
        raw_durable: Vec::new(),
        vma_copy: Vec::new(),
        vma_durable: Vec::new(),
        idle_latency: Vec::new(),
        raw_latency: Vec::new(),
        vma_latency: Vec::new(),
    };
    let qdev = disks[0].qdev_path();
    for round in 0..ROUNDS {
        if cancel.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        for i in 0..8u64 {
            m.idle_latency
                .push(guest_write(&mut ctl, &qdev, size / 2 + i * WRITE)?);
        }
        raw_round(&mut ctl, dir.path(), size, round, &qdev, &mut m)?;
        let mut opts = BackupOptions::new(&vm.qmp_path, dir.path().join(format!("b{round}.vma")));
        opts.cancel = Arc::clone(&cancel);
        vma_round(&mut ctl, opts, size, &qdev, &mut m)?;
    }
    Ok(m)
}

fn guest_write(qmp: &mut Qmp, qdev: &str, offset: u64) -> Result<Duration> {
    let cmd = format!("qemu-io -d {qdev} \"write -P 0xa5 {offset} {WRITE}\"");
    let start = Instant::now();
    // The result goes to QEMU's stdout, not into the reply.
    qmp.hmp(&cmd)?;
    Ok(start.elapsed())
}

/// Guest writes from the end of the disk downwards while the job of drive
/// 0 (or of `job_id`) runs; keeps the samples whose area was not copied.
fn writes_during_job(
    qmp: &mut Qmp,
    qdev: &str,
    size: u64,
    offset_of_job: &mut dyn FnMut(&mut Qmp) -> Result<Option<u64>>,
) -> Result<Vec<Duration>> {
    let mut samples = Vec::new();
    for k in 1..=16u64 {
        // 4 MiB apart so that each write hits a fresh, uncopied area.
        let Some(offset) = size.checked_sub(k * 4 * MIB) else {
            break;
        };
        let Some(done) = offset_of_job(qmp)? else {
            break;
        };
        if done + 4 * MIB >= offset {
            break;
        }
        let took = guest_write(qmp, qdev, offset)?;
        match offset_of_job(qmp)? {
            Some(after) if after < offset => samples.push(took),
            _ => break,
        }
    }
    Ok(samples)
}

fn raw_round(
    ctl: &mut Qmp,
    dir: &Path,
    size: u64,
    round: usize,
    qdev: &str,
    m: &mut Measurement,
) -> Result<()> {
    let target = dir.join(format!("target{round}.raw"));
    let f = std::fs::File::create(&target)?;
    f.set_len(size)?;
    drop(f);
    let node = format!("rawtarget{round}");
    let job = format!("rawjob{round}");
    ctl.execute(
        "blockdev-add",
        json!({"driver": "raw", "node-name": node,
               "file": {"driver": "file", "filename": target.to_str().ok_or("path")?}}),
    )?;
    let start = Instant::now();
    ctl.execute(
        "transaction",
        json!({"actions": [{"type": "blockdev-backup", "data": {
            "device": "d0", "target": node, "sync": "full", "job-id": job}}],
            "properties": {"completion-mode": "grouped"}}),
    )?;
    let job_for_offset = job.clone();
    let samples = writes_during_job(ctl, qdev, size, &mut |qmp| {
        let jobs = qmp.execute("query-block-jobs", Value::Null)?;
        Ok(jobs.as_array().into_iter().flatten().find_map(|j| {
            (j.get("device").and_then(Value::as_str) == Some(job_for_offset.as_str()))
                .then(|| j.get("offset").and_then(Value::as_u64).unwrap_or(0))
        }))
    })?;
    m.raw_latency.extend(samples);
    wait_for_job_end(ctl, &job, Duration::from_secs(120), "the raw-file backup")?;
    m.raw_copy.push(start.elapsed());
    ctl.execute("blockdev-del", json!({ "node-name": node }))?;
    m.raw_durable.push(start.elapsed());
    let _ = std::fs::remove_file(&target);
    Ok(())
}

fn vma_round(
    ctl: &mut Qmp,
    opts: BackupOptions,
    size: u64,
    qdev: &str,
    m: &mut Measurement,
) -> Result<()> {
    let out = opts.output.clone();
    let backup = thread::spawn(move || run_backup(&opts));
    wait_for_jobs(ctl, 1, Duration::from_secs(30))?;
    let samples = writes_during_job(ctl, qdev, size, &mut |qmp| {
        let jobs = qmp.execute("query-block-jobs", Value::Null)?;
        if jobs.as_array().is_none_or(|a| a.is_empty()) {
            return Ok(None);
        }
        job_offset(qmp, 0).map(Some)
    })?;
    m.vma_latency.extend(samples);
    let report = backup.join().map_err(|_| "backup thread panicked")??;
    m.vma_copy.push(report.copy_time);
    m.vma_durable.push(report.durable_time);
    let _ = std::fs::remove_file(&out);
    Ok(())
}
