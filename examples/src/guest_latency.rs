//! `--measure-guest`: what a backup does to a real guest's writes, measured
//! from inside the guest (`examples/benches/live-guest.sh` runs it).
//!
//! The guest ([`crate::guest`]) boots with a data disk fully written with
//! pseudo-random bytes and runs only its probe: a 4 KiB O_DIRECT write at a
//! random offset of the disk every 2 ms, each timed with CLOCK_MONOTONIC, so
//! writes land on areas a running backup has and has not copied yet. In one
//! run, phases back to back: no backup; QEMU's own `blockdev-backup` of the
//! data disk into a raw file on the same filesystem; QEMU's own
//! `blockdev-backup` into a raw file in memory (tmpfs), with QEMU's `x-perf`,
//! with ours, and with ours at the job `speed` of 0.9 × the raw file's
//! throughput (a target that costs nothing but a memory copy: what is left is
//! QEMU's backup job itself, its reads of the disk and its copy-before-write);
//! no backup while this process reads the disk's image at that rate (what
//! reading the data costs the guest, with no QEMU job); `vma-live-backup` of the
//! data disk (with its copy-before-write filter, `--cbw-timeout` 5 s) with
//! QEMU's `x-perf`, with and without its push buffer, at nice 0 and at its
//! default nice 10, and then with fewer and smaller background copy requests
//! (the `OURS` table of settings); no backup again. Each backup setting runs
//! `rounds` times and its writes are pooled.
//!
//! The probe reports every write (start, block, time). The writes made while
//! a copy ran are sorted by where they went ([`Split::classify`]): to a
//! cluster the copy had not reached (the write waits for copy-before-write),
//! or to one already copied. Where the copy stood comes from the job's
//! progress, polled on the control socket; when the copy started, in the
//! guest's writes, from the copy itself, which holds exactly the writes
//! before its instant ([`Probed::first_after`]). p50, p99 and max per phase
//! and per side. Figures, not asserts.

use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::FileExt;
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

/// The most bytes a backup job with `x_perf` copies at once.
fn in_flight(x_perf: Option<XPerf>) -> u64 {
    x_perf.map_or(QEMU_IN_FLIGHT, |x| u64::from(x.max_workers) * x.max_chunk)
}

/// How long each phase without a backup lasts.
const IDLE: Duration = Duration::from_secs(5);

/// How long a backup starts after the probe's report: so that the copy's
/// instant falls between two writes of the next report.
const SETTLE: Duration = Duration::from_millis(100);

/// How often the backup job's progress is polled while it runs.
const POLL: Duration = Duration::from_millis(10);

/// The granularity of copy-before-write: a guest write to a cluster the copy
/// has not reached waits until the cluster's old data is copied.
const CLUSTER: u64 = 64 << 10;

/// The probe's block size.
const BLOCK: u64 = 4096;

/// QEMU's own `x-perf`: up to 64 copy requests of 1 MiB in flight.
const QEMU_IN_FLIGHT: u64 = 64 << 20;

/// How long the probe may take to report: its writes go out over the serial
/// console, a 40 s phase's 20,000 of them as 400 KB.
const REPORT_TIMEOUT: Duration = Duration::from_secs(300);

/// The probe's figures over a set of writes, in microseconds.
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
    /// Parses the probe's `lat n=N first=F p50=A p99=B max=C`.
    pub fn parse(line: &str) -> Option<Latency> {
        let writes = field(line, "n")?;
        if writes == 0 {
            return Some(Latency::default());
        }
        Some(Latency {
            writes,
            p50: field(line, "p50")?,
            p99: field(line, "p99")?,
            max: field(line, "max")?,
        })
    }

    /// The figures of `times` (µs), computed as the probe computes its own.
    pub fn of(mut times: Vec<u64>) -> Latency {
        times.sort_unstable();
        let n = times.len();
        match times.last() {
            None => Latency::default(),
            Some(&max) => Latency {
                writes: n as u64,
                p50: times[n / 2],
                p99: times[n * 99 / 100],
                max,
            },
        }
    }
}

/// The number in `key=N` of a probe line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// One write the probe timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeWrite {
    /// When it started, in µs since the probe started (the guest's clock).
    pub start_us: u64,
    /// The 4 KiB block it wrote.
    pub block: u64,
    /// How long it took, in µs.
    pub time_us: u64,
}

/// What the probe reported of its writes since its previous report.
#[derive(Debug, Clone, Default)]
pub struct Probed {
    /// Its own figures over them.
    pub latency: Latency,
    /// The number of the first of them (the probe numbers its writes from 0,
    /// and writes "probe N" into write N's block).
    pub first: u64,
    /// Each write, in order.
    pub writes: Vec<ProbeWrite>,
}

impl Probed {
    /// Parses the probe's report: its `w T,B,L ...` lines (hex) and its `lat`
    /// line. The writes must be as many as the `lat` line counts.
    pub fn parse(lat_line: &str, write_lines: &[String]) -> Result<Probed> {
        let bad = |what: &str| format!("the probe's report: {what}");
        let latency = Latency::parse(lat_line).ok_or_else(|| bad(lat_line))?;
        let first = field(lat_line, "first").ok_or_else(|| bad(lat_line))?;
        let mut writes = Vec::with_capacity(write_lines.len() * 16);
        for line in write_lines {
            for record in line.split_whitespace().skip(1) {
                let mut f = record.split(',').map(|x| u64::from_str_radix(x, 16));
                match (f.next(), f.next(), f.next(), f.next()) {
                    (Some(Ok(start_us)), Some(Ok(block)), Some(Ok(time_us)), None) => {
                        writes.push(ProbeWrite {
                            start_us,
                            block,
                            time_us,
                        })
                    }
                    _ => return Err(bad(record).into()),
                }
            }
        }
        if writes.len() as u64 != latency.writes {
            return Err(bad(&format!(
                "{} writes listed, {} counted (console lines lost?)",
                writes.len(),
                latency.writes
            ))
            .into());
        }
        Ok(Probed {
            latency,
            first,
            writes,
        })
    }

    /// The index of the first write a copy of the disk taken meanwhile does
    /// not hold: the first after the copy's instant. `read` reads the copy
    /// (`buf.len()` bytes at an offset). Each write's block begins with its
    /// number, so the copy holds, of these writes, those up to its instant;
    /// the probe writes one block at a time.
    pub fn first_after(&self, read: impl Fn(&mut [u8], u64) -> Result<()>) -> Result<usize> {
        let mut blocks: Vec<u64> = self.writes.iter().map(|w| w.block).collect();
        blocks.sort_unstable();
        blocks.dedup();
        let ours = self.first..self.first + self.writes.len() as u64;
        let mut last = None;
        let mut head = [0u8; 32];
        for b in blocks {
            read(&mut head, b * BLOCK)?;
            if let Some(n) = write_number(&head).filter(|n| ours.contains(n)) {
                last = last.max(Some(n));
            }
        }
        // `last` is in `ours`, so the index fits.
        Ok(last.map_or(0, |n| (n - self.first + 1) as usize))
    }
}

/// The number in a probe block's `probe N`.
fn write_number(head: &[u8]) -> Option<u64> {
    let rest = head.strip_prefix(b"probe ")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// What the host saw of one backup's copy.
#[derive(Debug, Clone)]
pub struct CopyTrace {
    /// The instant the copy holds, on the host's clock: when
    /// `blockdev-backup` returned, or [`vma_live::BackupReport::snapshot`].
    pub start: Instant,
    /// From then to the job's end.
    pub time: Duration,
    /// The job's progress, polled every 10 ms while it ran.
    pub progress: Vec<Poll>,
    /// The disk's size.
    pub size: u64,
    /// The most bytes the job copies at once (parallel requests × their size).
    pub in_flight: u64,
    /// Whether the job's progress counts the copy-before-write copies, which
    /// its background copy then skips: so with QEMU's own filter, which shares
    /// the job's copy state. Not with ours: the job copies every cluster from
    /// the snapshot, pushed or not, and its progress is its own.
    pub counts_pushes: bool,
}

/// One look at a backup job's progress.
#[derive(Debug, Clone, Copy)]
pub struct Poll {
    /// When the query was sent.
    pub sent: Instant,
    /// When its answer came.
    pub answered: Instant,
    /// The bytes the job had copied, at some time between the two.
    pub bytes: u64,
}

/// The writes a guest made while a backup's copy ran, by where they went.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// Times (µs) of writes to clusters the copy had not reached yet: each
    /// waited until its cluster's old data was copied (copy-before-write), or
    /// for the copy of it already under way.
    pub ahead: Vec<u64>,
    /// Times of writes to clusters already copied (by the background copy,
    /// or by an earlier write's copy-before-write): nothing to wait for.
    pub behind: Vec<u64>,
    /// First writes to a cluster so near the copy's front that the polled
    /// progress cannot tell which side it was on.
    pub unsure: u64,
}

impl Split {
    /// Sorts the writes of `probed` from its `index`th (the first after the
    /// copy's instant: [`Probed::first_after`]) to the copy's end.
    ///
    /// A write to a cluster written before during the copy is behind it. For
    /// a first write, the polled progress P places the copy's front F. QEMU
    /// copies in ascending order with up to `in_flight` bytes under way. With
    /// our filter P is the bytes the job copied, so F ≤ P + `in_flight`: the
    /// cluster is ahead if its start is at or past P (the first poll after
    /// the write's start) + `in_flight`; behind if its end + `in_flight` is
    /// below P (the last poll before the write), on the assumption that
    /// copies end roughly in the order they start, so that none still under
    /// way is more than `in_flight` bytes behind the front. With QEMU's own
    /// filter P also counts the clusters copied before write, which the job
    /// skips: F ≤ P + `in_flight` − C(F), C(x) being the bytes copied before
    /// write at or past x; so the cluster's start x is ahead if x + C(x) ≥ P +
    /// `in_flight`, C counting the writes found ahead so far, and its end y is
    /// behind if y + C(y) + `in_flight` < P, C counting every first write not
    /// found behind (all that may have been copied before write). The rest:
    /// unsure. The host's clock is set against the guest's at the copy's
    /// instant, which fell between write `index - 1`'s end and write
    /// `index`'s start.
    pub fn classify(probed: &Probed, index: usize, trace: &CopyTrace) -> Split {
        let mut split = Split::default();
        let w = &probed.writes;
        let Some(next) = w.get(index) else {
            return split;
        };
        // The instant, by the guest's clock, within `slack` of `tx`. (The guest's
        // clock stands still while the VM is paused for our filters.)
        let (tx, slack) = match index.checked_sub(1).map(|i| &w[i]) {
            Some(prev) => {
                let prev_end = prev.start_us + prev.time_us;
                let gap = next.start_us.saturating_sub(prev_end);
                (prev_end + gap / 2, gap.div_ceil(2))
            }
            // Before the first write the probe reported: no telling how long before.
            None => (next.start_us, u64::MAX / 4),
        };
        let guest_us = |at: Instant| {
            let d = at.saturating_duration_since(trace.start).as_micros();
            tx.saturating_add(u64::try_from(d).unwrap_or(u64::MAX / 4))
        };
        let end = tx.saturating_add(u64::try_from(trace.time.as_micros()).unwrap_or(0));
        // (sent, answered, bytes) by the guest's clock.
        let polls: Vec<(u64, u64, u64)> = trace
            .progress
            .iter()
            .map(|p| (guest_us(p.sent), guest_us(p.answered), p.bytes))
            .collect();
        // Clusters copied before write: surely (ahead), and maybe (ahead or unsure);
        // counted only where the progress counts them.
        let clusters = if trace.counts_pushes {
            trace.size.div_ceil(CLUSTER) as usize
        } else {
            0
        };
        let (mut surely, mut maybe) = (Fenwick::new(clusters), Fenwick::new(clusters));
        let mut written = HashSet::new();
        for wr in w[index..].iter().take_while(|wr| wr.start_us < end) {
            let cluster = wr.block * BLOCK / CLUSTER;
            if !written.insert(cluster) {
                split.behind.push(wr.time_us);
                continue;
            }
            // Progress at the write's start: at least what a poll answered
            // before it, at most what one sent after it saw.
            let start = wr.start_us;
            let i = polls.partition_point(|p| p.1.saturating_add(slack) <= start);
            let before = i.checked_sub(1).map_or(0, |i| polls[i].2);
            let j = polls.partition_point(|p| p.0 < start.saturating_add(slack));
            let after = polls.get(j).map_or(trace.size, |p| p.2);
            let (from, to) = (cluster * CLUSTER, (cluster + 1) * CLUSTER);
            let at = cluster as usize;
            let (surely_past, maybe_past) = if trace.counts_pushes {
                (surely.from(at) * CLUSTER, maybe.from(at + 1) * CLUSTER)
            } else {
                (0, 0)
            };
            if from + surely_past >= after + trace.in_flight {
                split.ahead.push(wr.time_us);
                surely.add(at);
                maybe.add(at);
            } else if to + maybe_past + trace.in_flight < before {
                split.behind.push(wr.time_us);
            } else {
                split.unsure += 1;
                maybe.add(at);
            }
        }
        split
    }

    fn extend(&mut self, other: Split) {
        self.ahead.extend(other.ahead);
        self.behind.extend(other.behind);
        self.unsure += other.unsure;
    }
}

/// Counts per cluster, summed over every cluster from a given one on.
struct Fenwick(Vec<u64>);

impl Fenwick {
    fn new(len: usize) -> Fenwick {
        Fenwick(vec![0; len + 1])
    }

    /// Counts one for cluster `at` (clusters past the end are not counted).
    fn add(&mut self, at: usize) {
        let mut i = at + 1;
        while i < self.0.len() {
            self.0[i] += 1;
            i += i & i.wrapping_neg();
        }
    }

    /// The counts of clusters below `at`.
    fn below(&self, at: usize) -> u64 {
        let mut i = at.min(self.0.len() - 1);
        let mut sum = 0;
        while i > 0 {
            sum += self.0[i];
            i &= i - 1;
        }
        sum
    }

    /// The counts of clusters `at` and on.
    fn from(&self, at: usize) -> u64 {
        self.below(self.0.len() - 1) - self.below(at)
    }
}

/// One phase of the run.
#[derive(Debug, Clone)]
pub struct Phase {
    /// What ran.
    pub name: &'static str,
    /// How often (backups per setting).
    pub rounds: u32,
    /// How long it lasted (for backups: their copy times, summed).
    pub time: Duration,
    /// Whether it copied (or read) the whole disk, `rounds` times in `time`.
    pub copied: bool,
    /// Every write the guest made meanwhile.
    pub latency: Latency,
    /// Backups: the writes while the copy ran, by where they went.
    pub split: Option<SplitLatency>,
    /// Our backups: the most bytes of pushes their buffer held at once.
    pub push_peak: Option<u64>,
    /// Our backups with a push buffer: the copy-before-write pushes our
    /// export received (a check on the split: at least the writes found
    /// ahead of the copy, at most those and the unsure ones).
    pub pushes: Option<u64>,
    /// Our backups with our filter: the longest time from the start of the
    /// filters' attachment to the guest going on, which holds the VM's pause
    /// for it (`stop` to `cont`). The guest's clock stands still meanwhile, so
    /// the probe cannot see it.
    pub paused: Option<Duration>,
}

/// The figures of a [`Split`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SplitLatency {
    /// Writes to clusters not yet copied.
    pub ahead: Latency,
    /// Writes to clusters already copied.
    pub behind: Latency,
    /// First writes that could not be told.
    pub unsure: u64,
}

/// The figures `--measure-guest` prints.
#[derive(Debug, Clone)]
pub struct GuestLatency {
    /// The data disk's size in bytes.
    pub size: u64,
    /// The phases, in the order they ran.
    pub phases: Vec<Phase>,
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

impl fmt::Display for GuestLatency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = self.size as f64 / f64::from(1 << 20);
        let rounds = self.phases.iter().map(|p| p.rounds).max().unwrap_or(1);
        writeln!(
            f,
            "guest 4 KiB O_DIRECT write latency, {mib:.0} MiB data disk, TCG, one run, \
             {rounds} backup(s) per setting:"
        )?;
        writeln!(
            f,
            "| phase | time | backup MiB/s | writes | writes/s | p50 | p99 | max | pushes buffered, most MiB | VM paused, at most |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|")?;
        for p in &self.phases {
            let secs = p.time.as_secs_f64().max(1e-9);
            let rate = if !p.copied {
                "—".to_string()
            } else {
                format!("{:.1}", mib * f64::from(p.rounds) / secs)
            };
            let peak = p.push_peak.map_or("—".to_string(), |b| {
                format!("{:.1}", b as f64 / f64::from(1 << 20))
            });
            let paused = p.paused.map_or("—".to_string(), |d| {
                format!("{:.1} ms", d.as_secs_f64() * 1000.0)
            });
            writeln!(
                f,
                "| {} | {secs:.2} s | {rate} | {} | {:.0} | {} | {} | {} | {peak} | {paused} |",
                p.name,
                p.latency.writes,
                p.latency.writes as f64 / secs,
                ms(p.latency.p50),
                ms(p.latency.p99),
                ms(p.latency.max)
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "writes while the copy ran, to clusters it had not reached (each waits for a \
             copy-before-write) and to clusters already copied:"
        )?;
        writeln!(
            f,
            "| phase | not yet copied: writes | p50 | p99 | max | already copied: writes | p50 | p99 | max | could not tell | pushes our export received |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        for p in &self.phases {
            let Some(SplitLatency {
                ahead,
                behind,
                unsure,
            }) = &p.split
            else {
                continue;
            };
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {unsure} | {} |",
                p.name,
                ahead.writes,
                ms(ahead.p50),
                ms(ahead.p99),
                ms(ahead.max),
                behind.writes,
                ms(behind.p50),
                ms(behind.p99),
                ms(behind.max),
                p.pushes.map_or("—".to_string(), |n| n.to_string())
            )?;
        }
        Ok(())
    }
}

/// Runs the measurement with a data disk of `size_mib` MiB, `rounds`
/// backups per setting.
pub fn run(size_mib: u64, rounds: u32, cancel: Arc<AtomicBool>) -> Result<GuestLatency> {
    let size = size_mib << 20;
    let (dir, mut g, data) = boot_probing("vma-live-latency-", size)?;
    let mut phases = Vec::new();

    phases.push(idle(&mut g, "no backup")?);
    stop(&cancel)?;
    let stock = Stock {
        name: "stock blockdev-backup to a raw file",
        target: StockTarget::RawFile,
        x_perf: None,
        speed: None,
    }
    .rounds(&mut g, dir.path(), size, rounds, &cancel)?;
    // 0.9 x the raw file's throughput: the least ours must reach.
    let speed = 0.9 * (size * u64::from(rounds)) as f64 / stock.time.as_secs_f64();
    phases.push(stock.phase());
    let in_memory = [
        Stock {
            name: "stock blockdev-backup to tmpfs, QEMU's x-perf",
            target: StockTarget::Memory,
            x_perf: None,
            speed: None,
        },
        Stock {
            name: "stock blockdev-backup to tmpfs, x-perf 4 workers × 1 MiB",
            target: StockTarget::Memory,
            x_perf: Some(vma_live::DEFAULT_X_PERF),
            speed: None,
        },
        Stock {
            name: "stock blockdev-backup to tmpfs, 4 × 1 MiB, speed 0.9 × the raw file's MiB/s",
            target: StockTarget::Memory,
            x_perf: Some(vma_live::DEFAULT_X_PERF),
            speed: Some(speed as u64),
        },
    ];
    for stock in in_memory {
        phases.push(
            stock
                .rounds(&mut g, dir.path(), size, rounds, &cancel)?
                .phase(),
        );
    }
    phases.push(host_read(&mut g, &data, size, rounds, speed)?);
    stop(&cancel)?;
    for setting in OURS {
        let mut ours = Rounds::new(setting.name, rounds);
        for _ in 0..rounds {
            our_backup(&mut g, setting, &cancel, dir.path(), size, &mut ours)?;
            stop(&cancel)?;
        }
        phases.push(ours.phase());
    }
    phases.push(idle(&mut g, "no backup again")?);
    g.poweroff()?;
    Ok(GuestLatency { size, phases })
}

/// Ends the measurement if `cancel` is set (Ctrl-C).
fn stop(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::SeqCst) {
        return Err("interrupted".into());
    }
    Ok(())
}

/// Boots the guest in a new temporary directory named from `prefix`, with a
/// data disk (node `data`) of `size` bytes of noise, its probe writing;
/// returns the directory, the guest and the data disk's image.
fn boot_probing(prefix: &str, size: u64) -> Result<(tempfile::TempDir, Guest, std::path::PathBuf)> {
    crate::qemu::run_tool(crate::qemu::QEMU_SYSTEM, &["--version"])?;
    let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let dir = tmp.path();
    let image = guest::image()?;
    let mut disks = guest::make_disks(dir, &image)?;
    let data = dir.join("data.raw");
    fill_random(&data, size)?;
    disks[1] = Disk {
        path: data.clone(),
        format: "raw".into(),
        node_name: "data".into(),
        qdev_id: "vd1".into(),
    };
    let mut g = Guest::boot(dir, &image, disks, BootOptions::default())?;
    g.console.send("probe")?;
    g.console.wait_for("probing", guest::COMMAND_TIMEOUT)?;
    g.console.wait_for("probe ", guest::COMMAND_TIMEOUT)?;
    Ok((tmp, g, data))
}

/// What [`check_split`] saw of one backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitCheck {
    /// First writes to a cluster the split found not yet copied: each of
    /// them, by the split's reasoning, made QEMU push the cluster.
    pub ahead: u64,
    /// First writes the split could not place.
    pub unsure: u64,
    /// The copy-before-write pushes our export received.
    pub pushes: u64,
    /// The clusters the guest wrote from the copy's instant on: the most
    /// pushes there can have been.
    pub clusters_written: u64,
}

/// Boots a guest with a `size_mib` MiB data disk and backs it up once with
/// our filter, push buffer and 4 × 1 MiB copies, limited to `bwlimit` bytes
/// per second, its probe writing; returns the split's findings beside the
/// pushes QEMU really made, so that a test can hold one against the other.
pub fn check_split(size_mib: u64, bwlimit: u64) -> Result<SplitCheck> {
    let size = size_mib << 20;
    let (dir, mut g, _) = boot_probing("vma-live-split-", size)?;
    let setting = Setting {
        name: "our defaults with a bandwidth limit",
        own_filter: true,
        x_perf: Some(vma_live::DEFAULT_X_PERF),
        cbw_buffer_mib: vma_live::DEFAULT_CBW_BUFFER >> 20,
        bwlimit: Some(bwlimit),
        nice: 0,
    };
    let mut rounds = Rounds::new(setting.name, 1);
    let cancel = Arc::new(AtomicBool::new(false));
    let (probed, index) = our_backup(&mut g, &setting, &cancel, dir.path(), size, &mut rounds)?;
    g.poweroff()?;
    let clusters: HashSet<u64> = probed.writes[index..]
        .iter()
        .map(|w| w.block * BLOCK / CLUSTER)
        .collect();
    Ok(SplitCheck {
        ahead: rounds.split.ahead.len() as u64,
        unsure: rounds.split.unsure,
        pushes: rounds.pushes.ok_or("our export counted no pushes")?,
        clusters_written: clusters.len() as u64,
    })
}

/// The writes of one setting's backups, pooled.
struct Rounds {
    name: &'static str,
    rounds: u32,
    time: Duration,
    all: Vec<u64>,
    split: Split,
    push_peak: Option<u64>,
    pushes: Option<u64>,
    paused: Option<Duration>,
}

impl Rounds {
    fn new(name: &'static str, rounds: u32) -> Rounds {
        Rounds {
            name,
            rounds,
            time: Duration::ZERO,
            all: Vec::new(),
            split: Split::default(),
            push_peak: None,
            pushes: None,
            paused: None,
        }
    }

    /// One backup's writes; `copy_time` for its throughput.
    fn add(
        &mut self,
        probed: &Probed,
        index: usize,
        trace: &CopyTrace,
        copy_time: Duration,
        report: Option<&vma_live::BackupReport>,
    ) {
        self.time += copy_time;
        if let Some(r) = report {
            self.push_peak = self.push_peak.max(Some(r.push_buffer_peak));
            if let Some(n) = r.drives.iter().map(|d| d.pushes).sum::<Option<u64>>() {
                *self.pushes.get_or_insert(0) += n;
            }
        }
        self.all.extend(probed.writes.iter().map(|w| w.time_us));
        self.split.extend(Split::classify(probed, index, trace));
    }

    fn phase(self) -> Phase {
        Phase {
            name: self.name,
            rounds: self.rounds,
            time: self.time,
            copied: true,
            latency: Latency::of(self.all),
            split: Some(SplitLatency {
                ahead: Latency::of(self.split.ahead),
                behind: Latency::of(self.split.behind),
                unsure: self.split.unsure,
            }),
            push_peak: self.push_peak,
            pushes: self.pushes,
            paused: self.paused,
        }
    }
}

/// One backup of the data disk by [`run_backup`] with `setting`, its job's
/// progress polled on the control socket meanwhile, added to `rounds`;
/// returns the probe's report of it and the first write after the copy's
/// instant.
fn our_backup(
    g: &mut Guest,
    setting: &Setting,
    cancel: &Arc<AtomicBool>,
    dir: &Path,
    size: u64,
    rounds: &mut Rounds,
) -> Result<(Probed, usize)> {
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
    thread::sleep(SETTLE);
    let mut ctl = g.vm.control()?;
    let done = Arc::new(AtomicBool::new(false));
    let polling = Arc::clone(&done);
    let poller = thread::spawn(move || -> Result<Vec<Poll>> {
        let mut progress = Vec::new();
        while !polling.load(Ordering::SeqCst) {
            if let Some(p) = poll(&mut ctl, None)? {
                progress.push(p);
            }
            thread::sleep(POLL);
        }
        Ok(progress)
    });
    let nice = setting.nice;
    let backup = thread::spawn(move || -> Result<_> {
        // As vma-live-backup does before starting its threads: this thread starts them.
        vma_live::lower_priority(nice)?;
        Ok(run_backup(&opts)?)
    })
    .join();
    done.store(true, Ordering::SeqCst);
    let progress = poller.join().map_err(|_| "the progress poller panicked")?;
    let report = backup.map_err(|_| "the backup thread panicked")??;
    let progress = progress?;
    let probed = lat(g)?;
    let vma = vma_reader::SeekableArchive::open(&archive)?;
    let name = vma
        .devices()
        .first()
        .ok_or("the archive holds no device")?
        .name
        .clone();
    let device = vma.device(name.as_str())?;
    let index = probed.first_after(|buf, at| {
        if device.read_at(buf, at)? == buf.len() {
            Ok(())
        } else {
            Err(format!("{}: short read at {at}", archive.display()).into())
        }
    })?;
    let trace = CopyTrace {
        start: report.snapshot,
        time: (report.copy_start + report.copy_time).saturating_duration_since(report.snapshot),
        progress,
        size,
        in_flight: in_flight(setting.x_perf),
        counts_pushes: !setting.own_filter,
    };
    rounds.add(&probed, index, &trace, report.copy_time, Some(&report));
    if setting.own_filter {
        // From `query-status` before the `stop` to the `cont`'s answer.
        let paused = report.snapshot.saturating_duration_since(report.copy_start);
        rounds.paused = rounds.paused.max(Some(paused));
    }
    Ok((probed, index))
}

/// The progress of the backup job `id` (any backup job: `None`), or `None`
/// if there is no such job.
fn poll(ctl: &mut Qmp, id: Option<&str>) -> Result<Option<Poll>> {
    let sent = Instant::now();
    let jobs = ctl.execute("query-block-jobs", serde_json::Value::Null)?;
    let answered = Instant::now();
    let bytes = jobs.as_array().and_then(|jobs| {
        jobs.iter()
            .filter(|j| j.get("type").and_then(|t| t.as_str()) == Some("backup"))
            .find(|j| id.is_none() || j.get("device").and_then(|d| d.as_str()) == id)
            .and_then(|j| j.get("offset")?.as_u64())
    });
    Ok(bytes.map(|bytes| Poll {
        sent,
        answered,
        bytes,
    }))
}

/// Asks the guest's write probe for its writes since the last ask.
pub fn lat(g: &mut Guest) -> Result<Probed> {
    g.console.send("lat")?;
    let (line, writes) = g.console.wait_for_keeping("lat ", "w ", REPORT_TIMEOUT)?;
    Probed::parse(&line, &writes)
}

/// No backup, but this process reads the data disk's image file `rounds`
/// times, in 1 MiB requests at `speed` bytes per second, at the backup's
/// default nice value: what reading the disk at that rate costs the guest,
/// the least any backup of it does on this host.
fn host_read(g: &mut Guest, image: &Path, size: u64, rounds: u32, speed: f64) -> Result<Phase> {
    lat(g)?;
    thread::sleep(SETTLE);
    let image = image.to_path_buf();
    let reader = thread::spawn(move || -> Result<Duration> {
        vma_live::lower_priority(DEFAULT_NICE)?;
        let file = std::fs::File::open(&image)?;
        let mut buf = vec![0u8; 1 << 20];
        let start = Instant::now();
        let mut read = 0u64;
        for _ in 0..rounds {
            let mut at = 0;
            while at < size {
                let n = file.read_at(&mut buf, at)?;
                if n == 0 {
                    return Err(format!("{}: ends at {at}", image.display()).into());
                }
                at += n as u64;
                read += n as u64;
                let due = Duration::from_secs_f64(read as f64 / speed);
                thread::sleep(due.saturating_sub(start.elapsed()));
            }
        }
        Ok(start.elapsed())
    });
    let time = reader.join().map_err(|_| "the reader panicked")??;
    let probed = lat(g)?;
    Ok(Phase {
        name: "no backup, the host reads the disk's image at 0.9 × the raw file's MiB/s",
        rounds,
        time,
        copied: true,
        latency: probed.latency,
        split: None,
        push_peak: None,
        pushes: None,
        paused: None,
    })
}

fn idle(g: &mut Guest, name: &'static str) -> Result<Phase> {
    lat(g)?;
    let start = Instant::now();
    thread::sleep(IDLE);
    let probed = lat(g)?;
    Ok(Phase {
        name,
        rounds: 1,
        time: start.elapsed(),
        copied: false,
        latency: probed.latency,
        split: None,
        push_peak: None,
        pushes: None,
        paused: None,
    })
}

/// One setting of QEMU's own `blockdev-backup` ([`stock_backup`]).
struct Stock {
    name: &'static str,
    target: StockTarget,
    /// `None`: QEMU's own, 64 workers and 1 MiB requests.
    x_perf: Option<XPerf>,
    /// The job's `speed`, bytes per second.
    speed: Option<u64>,
}

impl Stock {
    /// `rounds` backups of the data disk with this setting.
    fn rounds(
        &self,
        g: &mut Guest,
        dir: &Path,
        size: u64,
        rounds: u32,
        cancel: &AtomicBool,
    ) -> Result<Rounds> {
        let mut pooled = Rounds::new(self.name, rounds);
        for _ in 0..rounds {
            lat(g)?;
            thread::sleep(SETTLE);
            let (trace, target) = stock_backup(g, dir, size, self)?;
            let probed = lat(g)?;
            let file = std::fs::File::open(&target)?;
            let index = probed.first_after(|buf, at| Ok(file.read_exact_at(buf, at)?))?;
            pooled.add(&probed, index, &trace, trace.time, None);
            stop(cancel)?;
        }
        Ok(pooled)
    }
}

/// Where [`stock_backup`] copies the data disk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StockTarget {
    /// A raw file beside the disk's image.
    RawFile,
    /// A raw file in memory (tmpfs, `/dev/shm`): storing costs QEMU a copy
    /// into the page cache and nothing else, so what the guest feels is
    /// QEMU's backup job itself, its reads of the disk and its
    /// copy-before-write (each waiting for that copy into memory).
    Memory,
}

/// QEMU's `blockdev-backup` of the node `data` into a raw file as `stock`
/// says, its progress polled; returns what was seen and the file (the disk
/// as of the backup), removed when dropped.
fn stock_backup(
    g: &Guest,
    dir: &Path,
    size: u64,
    stock: &Stock,
) -> Result<(CopyTrace, tempfile::TempPath)> {
    let mut ctl = g.vm.control()?;
    let file = match stock.target {
        StockTarget::RawFile => tempfile::Builder::new()
            .prefix("stock-target-")
            .tempfile_in(dir),
        StockTarget::Memory => tempfile::Builder::new()
            .prefix("vma-live-latency-")
            .tempfile_in("/dev/shm"),
    }?
    .into_temp_path();
    std::fs::File::options()
        .write(true)
        .open(&file)?
        .set_len(size)?;
    let node = json!({"driver": "raw", "node-name": "stocktarget",
                      "file": {"driver": "file", "filename": file.to_str().ok_or("path")?}});
    ctl.execute("blockdev-add", node)?;
    let mut args =
        json!({"device": "data", "target": "stocktarget", "sync": "full", "job-id": "stock"});
    if let Some(x) = stock.x_perf {
        args["x-perf"] = json!({"max-workers": x.max_workers, "max-chunk": x.max_chunk});
    }
    if let Some(speed) = stock.speed {
        args["speed"] = json!(speed);
    }
    ctl.execute("blockdev-backup", args)?;
    let start = Instant::now();
    let mut progress = Vec::new();
    while let Some(p) = poll(&mut ctl, Some("stock"))? {
        progress.push(p);
        if start.elapsed() > Duration::from_secs(600) {
            return Err("the stock backup did not end in 600 s".into());
        }
        thread::sleep(POLL);
    }
    let time = start.elapsed();
    crate::fixture::wait_for_job_end(
        &mut ctl,
        "stock",
        Duration::from_secs(60),
        "the stock backup",
    )?;
    ctl.execute("blockdev-del", json!({ "node-name": "stocktarget" }))?;
    let trace = CopyTrace {
        start,
        time,
        progress,
        size,
        in_flight: in_flight(stock.x_perf),
        counts_pushes: true,
    };
    Ok((trace, file))
}

/// Writes `size` bytes of xorshift noise (no zero blocks for the backup to skip),
/// and syncs them: QEMU's `stop` flushes the images, so dirty pages of the fill
/// would lengthen the first backup's pause.
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
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_lines() {
        assert_eq!(
            Latency::parse("lat n=10 first=7 p50=300 p99=900 max=1200"),
            Some(Latency {
                writes: 10,
                p50: 300,
                p99: 900,
                max: 1200
            })
        );
        assert_eq!(Latency::parse("lat n=0 first=3"), Some(Latency::default()));
        assert_eq!(Latency::parse("lat p50=1"), None);
        let p = Probed::parse(
            "lat n=3 first=40 p50=2 p99=3 max=3",
            &["w a,1f,2 7d0,3,3".into(), "w 1000,0,1".into()],
        )
        .unwrap();
        assert_eq!(p.first, 40);
        assert_eq!(
            p.writes,
            [(10, 31, 2), (2000, 3, 3), (4096, 0, 1)].map(|(start_us, block, time_us)| {
                ProbeWrite {
                    start_us,
                    block,
                    time_us,
                }
            })
        );
        assert_eq!(
            Latency::of(p.writes.iter().map(|w| w.time_us).collect()),
            p.latency
        );
        // A lost console line, a mangled record: errors.
        assert!(Probed::parse("lat n=3 first=0 p50=2 p99=3 max=3", &["w a,1f,2".into()]).is_err());
        assert!(Probed::parse("lat n=1 first=0 p50=2 p99=2 max=2", &["w a,1f".into()]).is_err());
        assert!(Probed::parse("lat n=1 p50=2 p99=2 max=2", &["w a,1f,2".into()]).is_err());
    }

    fn writes(list: &[(u64, u64, u64)]) -> Vec<ProbeWrite> {
        list.iter()
            .map(|&(start_us, block, time_us)| ProbeWrite {
                start_us,
                block,
                time_us,
            })
            .collect()
    }

    #[test]
    fn the_copy_tells_which_writes_came_before_its_instant() {
        // Writes 100..=104 to blocks 5, 6, 5, 7, 8; the copy was taken after 102.
        let p = Probed {
            latency: Latency::default(),
            first: 100,
            writes: writes(&[(0, 5, 1), (10, 6, 1), (20, 5, 1), (30, 7, 1), (40, 8, 1)]),
        };
        let mut copy = vec![0xa5u8; 16 * 4096];
        for (n, block) in [(102, 5), (101, 6), (7, 7)] {
            let text = format!("probe {n}");
            copy[block * 4096..][..text.len()].copy_from_slice(text.as_bytes());
        }
        let reader = |copy: &[u8]| {
            let copy = copy.to_vec();
            move |buf: &mut [u8], at: u64| {
                buf.copy_from_slice(&copy[at as usize..][..buf.len()]);
                Ok(())
            }
        };
        assert_eq!(p.first_after(reader(&copy)).unwrap(), 3);
        // A copy holding none of them (an earlier phase's write 7 only): all came after.
        copy[5 * 4096..][..9].copy_from_slice(b"probe 5\0\0");
        copy[6 * 4096..][..9].copy_from_slice(b"xrobe 101");
        assert_eq!(p.first_after(reader(&copy)).unwrap(), 0);
        // A copy that cannot be read: the error, not a guess.
        let err = p
            .first_after(|_, at| Err(format!("short read at {at}").into()))
            .unwrap_err();
        assert!(err.to_string().contains("short read at 20480"), "{err}");
    }

    #[test]
    fn cluster_counts_from_a_cluster_on() {
        let mut f = Fenwick::new(10);
        for at in [0, 3, 3, 9, 10, 12] {
            f.add(at);
        }
        let naive = |at: usize| [0, 3, 3, 9].iter().filter(|&&c| c >= at).count() as u64;
        for at in 0..=12 {
            assert_eq!(f.from(at), naive(at), "from {at}");
        }
    }

    #[test]
    fn writes_are_sorted_by_the_side_of_the_copy_they_went_to() {
        const MIB: u64 = 1 << 20;
        let blk = |offset: u64| offset / BLOCK;
        let start = Instant::now();
        // A 64 MiB disk copied at 1 MiB/ms from the copy's instant on, 1 MiB in flight;
        // polled every 10 ms; the copy took 64 ms.
        let trace = CopyTrace {
            start,
            time: Duration::from_millis(64),
            progress: (0..7)
                .map(|i| {
                    let at = start + Duration::from_millis(10 * i);
                    Poll {
                        sent: at,
                        answered: at,
                        bytes: 10 * i * MIB,
                    }
                })
                .collect(),
            size: 64 * MIB,
            in_flight: MIB,
            counts_pushes: true,
        };
        // Write 0 came before the copy's instant (at 1000 µs guest time, its end 1010);
        // the instant, by the guest's clock, at (1010 + 1030) / 2 = 1020.
        let p = Probed {
            latency: Latency::default(),
            first: 0,
            writes: writes(&[
                (1000, blk(0), 10),
                // Just after the instant: 40 MiB is far ahead of the front (the next
                // poll's 10 MiB + 1 MiB in flight at the most).
                (1030, blk(40 * MIB), 900),
                // At 25 ms: 2 MiB is far behind (20 MiB - 1 MiB - 64 KiB at the least).
                (1020 + 25_000, blk(2 * MIB), 20),
                // At 25 ms: 20 MiB is at the front: cannot tell.
                (1020 + 25_000, blk(20 * MIB + 4096), 30),
                // At 25.5 ms: the cluster at 18.875 MiB ends 1 MiB + 62.5 KiB behind
                // P = 20 MiB: behind, unless P counts the two clusters past it that
                // may have been copied before write (QEMU's own filter).
                (1020 + 25_500, blk(18 * MIB + 896 * 1024), 35),
                // A second write to the cluster at 40 MiB: already copied.
                (1020 + 26_000, blk(40 * MIB) + 1, 40),
                // After the copy's end: not counted.
                (1020 + 64_000, blk(63 * MIB), 50),
            ]),
        };
        let split = Split::classify(&p, 1, &trace);
        assert_eq!(split.ahead, [900]);
        assert_eq!(split.behind, [20, 40]);
        assert_eq!(split.unsure, 2);
        let ours = CopyTrace {
            counts_pushes: false,
            ..trace.clone()
        };
        let split = Split::classify(&p, 1, &ours);
        assert_eq!(split.ahead, [900]);
        assert_eq!(split.behind, [20, 35, 40]);
        assert_eq!(split.unsure, 1);
        // With the instant before every write reported, no telling how long before:
        // every first write is unsure, the repeat is behind.
        let split = Split::classify(&p, 0, &trace);
        assert!(split.ahead.is_empty());
        assert_eq!((split.behind, split.unsure), (vec![40], 5));
        // With the instant after every write, nothing was written during the copy.
        let none = Split::classify(&p, p.writes.len(), &trace);
        assert!(none.ahead.is_empty() && none.behind.is_empty() && none.unsure == 0);
    }
}
