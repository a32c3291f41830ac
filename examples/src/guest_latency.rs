//! `--measure-guest`: what a backup does to a real guest's writes, measured
//! from inside the guest (`examples/benches/live-guest.sh` runs it).
//!
//! The guest ([`crate::guest`]) boots with a data disk fully written with
//! pseudo-random bytes and runs only its probe: a 4 KiB O_DIRECT write at a
//! random offset of the disk's first half every 2 ms, each timed with
//! CLOCK_MONOTONIC (so writes land on areas a running backup has and has not
//! copied yet). In one run, phases back to back: no backup; QEMU's own
//! `blockdev-backup` of the data disk into a raw file on the same filesystem;
//! `vma-live-backup` of the data disk (with its copy-before-write filter,
//! `--cbw-timeout` 5 s) with QEMU's `x-perf`, with and without its push
//! buffer, at nice 0 and at its default nice 10, and then with fewer and
//! smaller background copy requests (the `OURS` table of settings); no backup
//! again. The
//! probe reports p50, p99 and max per phase. Figures, not asserts.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use vma_live::{run_backup, BackupOptions, Qmp, XPerf, DEFAULT_NICE};

use crate::guest::{self, BootOptions, Guest};
use crate::qemu::Disk;
use crate::Result;

/// One of our backups the measurement runs.
struct Setting {
    name: &'static str,
    /// Our copy-before-write filter (the 5 s `--cbw-timeout` default), or
    /// QEMU's own (`--cbw-timeout 0`).
    own_filter: bool,
    /// `None`: QEMU's, 64 workers and 1 MiB requests.
    x_perf: Option<XPerf>,
    /// `--cbw-buffer`, MiB.
    cbw_buffer_mib: usize,
    /// `--bwlimit`, bytes per second.
    bwlimit: Option<u64>,
    /// `--nice`.
    nice: i32,
}

/// Our backups: QEMU's filter first, then ours; with and without the push
/// buffer; at nice 0 and nice 10; fewer and smaller background requests; a
/// bandwidth limit with and without the push buffer.
const OURS: &[Setting] = &[
    Setting {
        name: "vma-live-backup --cbw-timeout 0, QEMU's x-perf",
        own_filter: false,
        x_perf: None,
        cbw_buffer_mib: 0,
        bwlimit: None,
        nice: 0,
    },
    Setting {
        name: "vma-live-backup, QEMU's x-perf (64 × 1 MiB), --cbw-buffer 64",
        own_filter: true,
        x_perf: None,
        cbw_buffer_mib: 64,
        bwlimit: None,
        nice: 0,
    },
    Setting {
        name: "vma-live-backup, x-perf 4 workers × 1 MiB, --cbw-buffer 0",
        own_filter: true,
        x_perf: Some(xperf(4, 1 << 20)),
        cbw_buffer_mib: 0,
        bwlimit: None,
        nice: 0,
    },
    Setting {
        name: "vma-live-backup, x-perf 4 workers × 1 MiB, --cbw-buffer 64, --nice 0",
        own_filter: true,
        x_perf: Some(xperf(4, 1 << 20)),
        cbw_buffer_mib: 64,
        bwlimit: None,
        nice: 0,
    },
    Setting {
        name: "vma-live-backup, x-perf 4 workers × 1 MiB, --cbw-buffer 64, --nice 10 (defaults)",
        own_filter: true,
        x_perf: Some(xperf(4, 1 << 20)),
        cbw_buffer_mib: 64,
        bwlimit: None,
        nice: DEFAULT_NICE,
    },
    Setting {
        name: "vma-live-backup, x-perf 2 workers × 256 KiB, --cbw-buffer 64, --nice 10",
        own_filter: true,
        x_perf: Some(xperf(2, 256 << 10)),
        cbw_buffer_mib: 64,
        bwlimit: None,
        nice: DEFAULT_NICE,
    },
    Setting {
        name: "vma-live-backup, x-perf 1 worker × 64 KiB, --cbw-buffer 64, --nice 10",
        own_filter: true,
        x_perf: Some(xperf(1, 64 << 10)),
        cbw_buffer_mib: 64,
        bwlimit: None,
        nice: DEFAULT_NICE,
    },
    Setting {
        name: "vma-live-backup, defaults, --bwlimit 51200 (50 MiB/s), --cbw-buffer 0, --nice 10",
        own_filter: true,
        x_perf: Some(xperf(4, 1 << 20)),
        cbw_buffer_mib: 0,
        bwlimit: Some(50 << 20),
        nice: DEFAULT_NICE,
    },
    Setting {
        name: "vma-live-backup, defaults, --bwlimit 51200 (50 MiB/s), --cbw-buffer 64, --nice 10",
        own_filter: true,
        x_perf: Some(xperf(4, 1 << 20)),
        cbw_buffer_mib: 64,
        bwlimit: Some(50 << 20),
        nice: DEFAULT_NICE,
    },
];

const fn xperf(max_workers: u32, max_chunk: u64) -> XPerf {
    XPerf {
        max_workers,
        max_chunk,
    }
}

/// How long each phase without a backup lasts.
const IDLE: Duration = Duration::from_secs(5);

/// The probe's figures over one phase, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Latency {
    /// Writes timed.
    pub writes: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Slowest.
    pub max: u64,
}

impl Latency {
    /// Parses the probe's `lat n=N p50=A p99=B max=C`.
    pub fn parse(line: &str) -> Option<Latency> {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
        };
        let writes = field("n")?;
        if writes == 0 {
            return Some(Latency::default());
        }
        Some(Latency {
            writes,
            p50: field("p50")?,
            p99: field("p99")?,
            max: field("max")?,
        })
    }
}

/// One phase of the run.
#[derive(Debug, Clone)]
pub struct Phase {
    /// What ran.
    pub name: &'static str,
    /// How long the phase lasted (for a backup: transaction to job end).
    pub time: Duration,
    /// The guest's writes meanwhile.
    pub latency: Latency,
    /// Our backups: the most bytes of pushes their buffer held at once.
    pub push_peak: Option<u64>,
}

/// The figures `--measure-guest` prints.
#[derive(Debug, Clone)]
pub struct GuestLatency {
    /// The data disk's size in bytes.
    pub size: u64,
    /// The phases, in the order they ran.
    pub phases: Vec<Phase>,
}

impl fmt::Display for GuestLatency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = self.size as f64 / f64::from(1 << 20);
        writeln!(
            f,
            "guest 4 KiB O_DIRECT write latency, {mib:.0} MiB data disk, TCG, one run:"
        )?;
        writeln!(
            f,
            "| phase | time | backup MiB/s | writes | writes/s | p50 | p99 | max | pushes buffered, most MiB |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|")?;
        for p in &self.phases {
            let secs = p.time.as_secs_f64().max(1e-9);
            let rate = if p.name.starts_with("no backup") {
                "—".to_string()
            } else {
                format!("{:.1}", mib / secs)
            };
            let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
            let peak = p.push_peak.map_or("—".to_string(), |b| {
                format!("{:.1}", b as f64 / f64::from(1 << 20))
            });
            writeln!(
                f,
                "| {} | {secs:.2} s | {rate} | {} | {:.0} | {} | {} | {} | {peak} |",
                p.name,
                p.latency.writes,
                p.latency.writes as f64 / secs,
                ms(p.latency.p50),
                ms(p.latency.p99),
                ms(p.latency.max)
            )?;
        }
        Ok(())
    }
}

/// Runs the measurement with a data disk of `size_mib` MiB.
pub fn run(size_mib: u64, cancel: Arc<AtomicBool>) -> Result<GuestLatency> {
    crate::qemu::run_tool(crate::qemu::QEMU_SYSTEM, &["--version"])?;
    let image = guest::image()?;
    let dir = tempfile::Builder::new()
        .prefix("vma-live-latency-")
        .tempdir()?;
    let size = size_mib << 20;
    let mut disks = guest::make_disks(dir.path(), &image)?;
    let data = dir.path().join("data.raw");
    fill_random(&data, size)?;
    disks[1] = Disk {
        path: data,
        format: "raw".into(),
        node_name: "data".into(),
        qdev_id: "vd1".into(),
    };
    let mut g = Guest::boot(dir.path(), &image, disks, BootOptions::default())?;
    g.console.send("probe")?;
    g.console.wait_for("probing", guest::COMMAND_TIMEOUT)?;
    g.console.wait_for("probe ", guest::COMMAND_TIMEOUT)?;
    let mut ctl = g.vm.control()?;
    let mut phases = Vec::new();
    let stop = |c: &AtomicBool| -> Result<()> {
        if c.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        Ok(())
    };

    phases.push(idle(&mut g, "no backup")?);
    stop(&cancel)?;
    lat(&mut g)?;
    let time = stock_backup(&mut ctl, dir.path(), size)?;
    phases.push(Phase {
        name: "stock blockdev-backup to a raw file",
        time,
        latency: lat(&mut g)?,
        push_peak: None,
    });
    stop(&cancel)?;
    for setting in OURS {
        phases.push(ours(&mut g, setting, &cancel, dir.path())?);
        stop(&cancel)?;
    }
    phases.push(idle(&mut g, "no backup again")?);
    drop(ctl);
    g.poweroff()?;
    Ok(GuestLatency { size, phases })
}

/// One backup of the data disk by [`run_backup`] with `setting`.
fn ours(g: &mut Guest, setting: &Setting, cancel: &Arc<AtomicBool>, dir: &Path) -> Result<Phase> {
    let archive = dir.join("vm.vma");
    let _ = std::fs::remove_file(&archive);
    let mut opts = BackupOptions::new(&g.vm.qmp_path, &archive);
    opts.drives = vec!["data".into()];
    opts.x_perf = setting.x_perf;
    opts.cbw_timeout = setting.own_filter.then_some(vma_live::DEFAULT_CBW_TIMEOUT);
    opts.cbw_buffer = setting.cbw_buffer_mib << 20;
    opts.bwlimit = setting.bwlimit;
    opts.cancel = Arc::clone(cancel);
    lat(g)?;
    let nice = setting.nice;
    let report = thread::spawn(move || -> Result<_> {
        // As vma-live-backup does before starting its threads: this thread starts them.
        vma_live::lower_priority(nice)?;
        Ok(run_backup(&opts)?)
    })
    .join()
    .map_err(|_| "the backup thread panicked")??;
    Ok(Phase {
        name: setting.name,
        time: report.copy_time,
        latency: lat(g)?,
        push_peak: Some(report.push_buffer_peak),
    })
}

/// Asks the guest's write probe for its figures since the last ask.
pub fn lat(g: &mut Guest) -> Result<Latency> {
    g.console.send("lat")?;
    let line = g.console.wait_for("lat ", guest::COMMAND_TIMEOUT)?;
    Latency::parse(&line).ok_or_else(|| format!("the probe said {line:?}").into())
}

fn idle(g: &mut Guest, name: &'static str) -> Result<Phase> {
    lat(g)?;
    let start = Instant::now();
    thread::sleep(IDLE);
    let latency = lat(g)?;
    Ok(Phase {
        name,
        time: start.elapsed(),
        latency,
        push_peak: None,
    })
}

/// `blockdev-backup` of the node `data` into a raw file node; returns the
/// time from the command to the job's end.
fn stock_backup(ctl: &mut Qmp, dir: &Path, size: u64) -> Result<Duration> {
    let target = dir.join("stock-target.raw");
    std::fs::File::create(&target)?.set_len(size)?;
    ctl.execute(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "stocktarget",
               "file": {"driver": "file", "filename": target.to_str().ok_or("path")?}}),
    )?;
    let start = Instant::now();
    ctl.execute(
        "blockdev-backup",
        json!({"device": "data", "target": "stocktarget", "sync": "full", "job-id": "stock"}),
    )?;
    crate::fixture::wait_for_job_end(ctl, "stock", Duration::from_secs(600), "the stock backup")?;
    let time = start.elapsed();
    ctl.execute("blockdev-del", json!({ "node-name": "stocktarget" }))?;
    let _ = std::fs::remove_file(&target);
    Ok(time)
}

/// Writes `size` bytes of xorshift noise (no zero blocks for the backup to skip).
fn fill_random(path: &Path, size: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    f.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_lines() {
        assert_eq!(
            Latency::parse("lat n=10 p50=300 p99=900 max=1200"),
            Some(Latency {
                writes: 10,
                p50: 300,
                p99: 900,
                max: 1200
            })
        );
        assert_eq!(Latency::parse("lat n=0"), Some(Latency::default()));
        assert_eq!(Latency::parse("lat p50=1"), None);
    }
}
