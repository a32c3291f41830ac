//! The live backup: QEMU's backup jobs write into our NBD exports, which
//! write into the archive.
//!
//! Flow: `query-version` and `query-block`; create the archive's temporary
//! file and start the NBD server (one export per drive, exactly QEMU's
//! virtual size); `blockdev-add` one NBD target node per drive; one
//! `transaction` of `blockdev-backup` actions with grouped completion (all
//! drives share one point in time); wait for each job's end event;
//! `blockdev-del` the targets; finish the archive.
//!
//! With a copy-before-write bound ([`BackupOptions::cbw_timeout`], the
//! default) the guest's writes go through a `copy-before-write` filter node of
//! our own, with `on-cbw-error=break-snapshot` and `cbw-timeout`: a push the
//! archive does not take within the bound drops the snapshot (the backup fails)
//! instead of stalling the guest. QEMU 10.0's `blockdev-backup` takes neither
//! option and its own filter cannot be reopened, so per drive: a second NBD
//! target node; `blockdev-add` the filter over the drive's node (its target the
//! first NBD node); `qom-set` the guest device's `drive` to the filter (with the
//! VM paused for these steps when it runs, so every drive's snapshot has the
//! same instant); `blockdev-add` a `snapshot-access` node over the filter; and
//! the transaction backs up from those nodes into the second NBD nodes, with
//! `discard-source` (areas already copied are no longer pushed). Afterwards the
//! device's `drive` is set back and the nodes are removed. With a guest agent, the
//! guest's filesystems are frozen right before the transaction and thawed
//! right after it, as Proxmox does ([`crate::agent`]). On any failure the jobs
//! are cancelled, the targets removed and the archive abandoned: the VM runs
//! on and no file appears under the archive's name.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use vma_nbd::{Export, Server};

use crate::agent::{self, GuestAgent};
use crate::archive::Archive;
use crate::drives::{self, Drive};
use crate::error::JobFailure;
use crate::export::{Counters, Drain, DriveExport, Latch, PushBuffer, RangeSink, RateLimited};
use crate::progress::Progress;
use crate::pve;
use crate::qmp::{Event, Qmp};
use crate::Error;

/// Name of the config entry describing the backed-up drives.
pub const DRIVES_CONFIG_NAME: &str = "vma-live-backup.json";

/// The default of [`BackupOptions::x_perf`]: 4 parallel copy requests of at
/// most 1 MiB, chosen by measurement (benches/RESULTS.md: with QEMU's 64 the
/// background copy queues ahead of the guest's writes).
pub const DEFAULT_X_PERF: XPerf = XPerf {
    max_workers: 4,
    max_chunk: 1 << 20,
};

/// The default of [`BackupOptions::cbw_timeout`], in seconds.
pub const DEFAULT_CBW_TIMEOUT: u32 = 5;
/// The default of [`BackupOptions::cbw_buffer`]: 64 MiB.
pub const DEFAULT_CBW_BUFFER: usize = 64 << 20;

/// How long to wait for the jobs' end events after cancelling them.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the event loop looks at the failure latch, the cancel flag and
/// the progress counters.
const POLL: Duration = Duration::from_millis(100);

/// The `x-perf` tuning of QEMU's backup job (unstable QEMU interface, used
/// to slow a backup down for demos and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XPerf {
    /// Parallel copy requests (QEMU's default is 64).
    pub max_workers: u32,
    /// Largest copy request in bytes (0 = QEMU's default).
    pub max_chunk: u64,
}

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// QEMU's QMP unix socket.
    pub qmp_socket: PathBuf,
    /// The archive to create (must not exist).
    pub output: PathBuf,
    /// Config files to embed, as (name in the archive, file to read).
    pub configs: Vec<(String, PathBuf)>,
    /// Node names of the drives to back up; empty for all.
    pub drives: Vec<String>,
    /// Compress the archive with zstd.
    pub zstd: bool,
    /// Show progress bars (only when stderr is a terminal).
    pub progress: bool,
    /// Sleep this long in the export before storing each data write.
    pub write_delay: Option<Duration>,
    /// Pass `x-perf` to the backup jobs ([`DEFAULT_X_PERF`] unless changed;
    /// `None`: QEMU's own, 64 requests).
    pub x_perf: Option<XPerf>,
    /// Set to cancel the backup (e.g. from a Ctrl-C handler).
    pub cancel: Arc<AtomicBool>,
    /// The host end of the guest agent's virtio-serial channel: freeze the
    /// guest's filesystems around the backup transaction. Without it (or
    /// when the agent does not answer) the backup is crash-consistent.
    pub guest_agent: Option<PathBuf>,
    /// The Proxmox storage the derived `qemu-server.conf` restores every
    /// drive to (as raw; [`crate::pve`]). No config is derived when
    /// [`configs`](Self::configs) has a `qemu-server.conf`.
    pub pve_storage: String,
    /// The copy-before-write bound in seconds: a guest write to an area not
    /// yet copied waits at most this long for the archive to take the old
    /// data; past it the backup fails ([`Error::SnapshotBroken`]) and the
    /// guest goes on. `None`: QEMU's own filter, which waits as long as it
    /// takes. Needs every drive attached to a guest device (`qdev`).
    pub cbw_timeout: Option<u32>,
    /// Bytes of memory that acknowledge the guest's copy-before-write pushes
    /// before the archive writer takes them ([`crate::export::PushBuffer`];
    /// default [`DEFAULT_CBW_BUFFER`]); 0: each push waits for the writer.
    /// Only with our own filter ([`cbw_timeout`](Self::cbw_timeout) set).
    pub cbw_buffer: usize,
    /// Store at most this many bytes of data per second into the archive, as
    /// vzdump's `bwlimit` ([`crate::export::RateLimited`]); `None`: no limit.
    /// Copy-before-write pushes beyond what the buffer holds wait for it.
    pub bwlimit: Option<u64>,
}

impl BackupOptions {
    /// Options to back up every drive of the VM at `qmp_socket` into
    /// `output`, uncompressed, without progress bars.
    pub fn new(qmp_socket: impl Into<PathBuf>, output: impl Into<PathBuf>) -> BackupOptions {
        BackupOptions {
            qmp_socket: qmp_socket.into(),
            output: output.into(),
            configs: Vec::new(),
            drives: Vec::new(),
            zstd: false,
            progress: false,
            write_delay: None,
            x_perf: Some(DEFAULT_X_PERF),
            cancel: Arc::new(AtomicBool::new(false)),
            guest_agent: None,
            pve_storage: "local".into(),
            cbw_timeout: Some(DEFAULT_CBW_TIMEOUT),
            cbw_buffer: DEFAULT_CBW_BUFFER,
            bwlimit: None,
        }
    }

    /// Slows the backup down: one 64 KiB copy request at a time
    /// (`x-perf`), each delayed by `delay` in the export.
    pub fn throttle(mut self, delay: Duration) -> BackupOptions {
        self.write_delay = Some(delay);
        self.x_perf = Some(XPerf {
            max_workers: 1,
            max_chunk: 65536,
        });
        self
    }
}

/// What one drive's backup moved.
#[derive(Debug, Clone)]
pub struct DriveReport {
    /// The drive.
    pub drive: Drive,
    /// Bytes QEMU sent as data.
    pub data_bytes: u64,
    /// Bytes QEMU sent as `WRITE_ZEROES`.
    pub zero_request_bytes: u64,
    /// Bytes stored in the archive (whole 4 KiB blocks).
    pub stored_bytes: u64,
    /// Bytes of the device recorded as zero (not stored).
    pub zero_bytes: u64,
    /// NBD write requests.
    pub requests: u64,
    /// Requests that did not start where the previous one ended (parallel
    /// copies overtaking each other, copy-before-write pushes).
    pub non_sequential: u64,
    /// Copy-before-write pushes (guest writes that waited for one), when they
    /// had an export of their own (with [`BackupOptions::cbw_buffer`]).
    pub pushes: Option<u64>,
}

/// How consistent the archive's filesystems are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consistency {
    /// The guest agent froze the guest's filesystems for the backup's
    /// instant: they are clean in the archive.
    Frozen {
        /// Filesystems the agent froze.
        filesystems: u64,
        /// From the freeze request to the thaw's answer.
        held: Duration,
    },
    /// No freeze: the disks are as after a power cut at the backup's instant
    /// (journaled filesystems recover on mount). The reason says why.
    CrashConsistent {
        /// No agent given, or what went wrong with it.
        reason: String,
    },
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Consistency::Frozen { filesystems, held } => write!(
                f,
                "filesystem-consistent: the guest agent froze {filesystems} filesystem(s) for {} ms",
                held.as_millis()
            ),
            Consistency::CrashConsistent { reason } => {
                write!(f, "crash-consistent only ({reason})")
            }
        }
    }
}

/// The result of a successful backup.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The archive.
    pub output: PathBuf,
    /// Its size in bytes (compressed, with `--zstd`).
    pub archive_bytes: u64,
    /// QEMU's version (`query-version`).
    pub qemu_version: String,
    /// One entry per drive, in archive order.
    pub drives: Vec<DriveReport>,
    /// The instant the archive holds: when the guest went on with our
    /// copy-before-write filters attached (it is paused while they are), or,
    /// with QEMU's own filter, when the transaction returned.
    pub snapshot: Instant,
    /// When the backup started the transaction (with our filters: when it
    /// started attaching them).
    pub copy_start: Instant,
    /// From `copy_start` to the last job's end.
    pub copy_time: Duration,
    /// From the transaction to the archive's final rename (fsynced).
    pub durable_time: Duration,
    /// From connecting to the archive's final rename.
    pub total_time: Duration,
    /// Whether the guest's filesystems were frozen.
    pub consistency: Consistency,
    /// The most bytes of copy-before-write pushes held in memory at once
    /// ([`BackupOptions::cbw_buffer`]; 0 without a buffer).
    pub push_buffer_peak: u64,
    /// Problems that did not affect the archive (e.g. a target node QEMU
    /// would not remove after the jobs completed, a thaw that failed).
    pub warnings: Vec<String>,
}

impl BackupReport {
    /// Bytes of all drives.
    pub fn total_size(&self) -> u64 {
        self.drives.iter().map(|d| d.drive.size).sum()
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for BackupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} drive(s), QEMU {}",
            self.output.display(),
            self.drives.len(),
            self.qemu_version
        )?;
        writeln!(
            f,
            "  {:<16} {:>11} {:>11} {:>11} {:>11} {:>9} {:>9}",
            "device", "size MiB", "copied MiB", "stored MiB", "zero MiB", "non-seq", "pushes"
        )?;
        for d in &self.drives {
            writeln!(
                f,
                "  {:<16} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>9} {:>9}",
                d.drive.device_name,
                mib(d.drive.size),
                mib(d.data_bytes + d.zero_request_bytes),
                mib(d.stored_bytes),
                mib(d.zero_bytes),
                d.non_sequential,
                d.pushes.map_or("-".to_string(), |n| n.to_string()),
            )?;
        }
        let secs = self.copy_time.as_secs_f64().max(1e-9);
        write!(
            f,
            "  copied {:.1} MiB in {:.2} s ({:.1} MiB/s); archive {:.1} MiB; total {:.2} s",
            mib(self.total_size()),
            secs,
            mib(self.total_size()) / secs,
            mib(self.archive_bytes),
            self.total_time.as_secs_f64()
        )?;
        if self.push_buffer_peak > 0 {
            write!(
                f,
                "; pushes buffered: {:.1} MiB at most",
                mib(self.push_buffer_peak)
            )?;
        }
        write!(f, "\n  {}", self.consistency)?;
        for w in &self.warnings {
            write!(f, "\n  warning: {w}")?;
        }
        Ok(())
    }
}

/// The drive index (in backup order) of one of our job ids: they are
/// `vmalb<pid>x<n>-job<index>`, the NBD target nodes `...-target<index>`.
pub fn job_index(job_id: &str) -> Option<usize> {
    let (tag, index) = job_id.rsplit_once("-job")?;
    if !tag.starts_with("vmalb") {
        return None;
    }
    index.parse().ok()
}

/// VMs this process has paused (`stop`) to insert its filters, right now.
static PAUSES: AtomicUsize = AtomicUsize::new(0);

/// How many VMs this process holds paused while it puts its copy-before-write
/// filters in (milliseconds each): a signal handler that would exit at once
/// should wait while this is not 0, so no VM is left paused.
pub fn pauses_held() -> usize {
    PAUSES.load(Ordering::SeqCst)
}

/// Counts one paused VM in [`PAUSES`] while it lives.
struct Paused;

impl Paused {
    fn new() -> Paused {
        PAUSES.fetch_add(1, Ordering::SeqCst);
        Paused
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        PAUSES.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Tells target nodes and jobs of concurrent backups apart.
static NEXT_BACKUP: AtomicU64 = AtomicU64::new(0);

/// The nodes and the job of one drive (the filter nodes only with a
/// copy-before-write bound).
struct Target {
    /// The NBD node the job writes to (and, with a bound, the filter pushes to).
    node: String,
    job: String,
    /// With a bound: the NBD node the job copies into.
    copy: String,
    /// With a bound: our `copy-before-write` node.
    filter: String,
    /// With a bound: the `snapshot-access` node the job reads.
    snapshot: String,
}

impl Target {
    fn new(tag: &str, i: usize) -> Target {
        Target {
            node: format!("{tag}-target{i}"),
            job: format!("{tag}-job{i}"),
            copy: format!("{tag}-copy{i}"),
            filter: format!("{tag}-cbw{i}"),
            snapshot: format!("{tag}-snap{i}"),
        }
    }
}

/// What has to be undone in QEMU, in reverse order.
#[derive(Debug)]
enum Undo {
    /// `blockdev-del` this node.
    Del(String),
    /// `qom-set` the device's `drive` back to this node.
    Attach { device: String, node: String },
}

/// Undoes `undo` from the last step to the first; returns the first error.
fn undo_all(qmp: &mut Qmp, undo: Vec<Undo>) -> Result<(), Error> {
    let mut first_err = None;
    for step in undo.into_iter().rev() {
        let done = match step {
            Undo::Del(node) => qmp.execute("blockdev-del", json!({ "node-name": node })),
            Undo::Attach { device, node } => qmp.execute(
                "qom-set",
                json!({ "path": device, "property": "drive", "value": node }),
            ),
        };
        if let Err(e) = done {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Runs a live backup as `opts` describes.
///
/// Whatever the error, the VM keeps running, every job and target node this started
/// is gone again, and no file exists under the archive's name.
pub fn run_backup(opts: &BackupOptions) -> Result<BackupReport, Error> {
    let started = Instant::now();
    let configs = read_configs(&opts.configs)?;
    let mut qmp = Qmp::connect(&opts.qmp_socket)?;
    let version = qmp.execute("query-version", Value::Null)?;
    let qemu_version = qemu_version_string(&version);
    let all = drives::parse_query_block(&qmp.execute("query-block", Value::Null)?)?;
    let drives = drives::select(all, &opts.drives)?;
    if drives.is_empty() {
        return Err(Error::NoDrives);
    }

    let mut all_configs = configs;
    if !all_configs.iter().any(|(n, _)| n == pve::CONFIG_NAME) {
        let facts = pve::query_facts(&mut qmp, &drives)?;
        let conf = pve::qemu_server_conf(&facts, &drives, &opts.pve_storage);
        all_configs.push((pve::CONFIG_NAME.to_string(), conf.into_bytes()));
    }
    all_configs.push((
        DRIVES_CONFIG_NAME.to_string(),
        drives_blob(&drives, &version).into_bytes(),
    ));
    let devices: Vec<(String, u64)> = drives
        .iter()
        .map(|d| (d.device_name.clone(), d.size))
        .collect();
    let archive = Archive::create(
        &opts.output,
        &opts.cancel,
        opts.zstd,
        &all_configs,
        &devices,
    )?;

    // From here on the archive must be finished or aborted.
    let latch = Arc::new(Latch::default());
    let copied = match serve_and_copy(opts, &mut qmp, &drives, &archive, &latch) {
        Ok(copied) => copied,
        Err(e) => {
            archive.abort();
            return Err(e);
        }
    };
    let (summary, archive_bytes) = archive.finish()?;
    let reports = drives
        .iter()
        .zip(&copied.counters)
        .zip(&summary.devices)
        .map(|((drive, c), dev)| DriveReport {
            drive: drive.clone(),
            data_bytes: c.data_bytes.load(Ordering::Relaxed),
            zero_request_bytes: c.zero_bytes.load(Ordering::Relaxed),
            stored_bytes: dev.stored_bytes,
            zero_bytes: dev.zero_bytes,
            requests: c.requests.load(Ordering::Relaxed),
            non_sequential: c.non_sequential.load(Ordering::Relaxed),
            pushes: copied.buffered.then(|| c.pushes.load(Ordering::Relaxed)),
        })
        .collect();
    Ok(BackupReport {
        output: opts.output.clone(),
        archive_bytes,
        qemu_version,
        drives: reports,
        snapshot: copied.snapshot,
        copy_start: copied.copy_start,
        copy_time: copied.copy_time,
        durable_time: copied.copy_start.elapsed(),
        total_time: started.elapsed(),
        consistency: copied.consistency,
        push_buffer_peak: copied.push_peak,
        warnings: copied.warnings,
    })
}

/// The NBD server of a backup, before it listens.
struct Exports {
    server: Server,
    counters: Vec<Arc<Counters>>,
    /// The push buffer and its drain thread, when pushes are buffered.
    pushes: Option<(Arc<PushBuffer>, Drain)>,
}

/// One export per drive into the archive (rate-limited with a `bwlimit`),
/// and with buffered pushes a push export per drive beside it.
fn exports(
    opts: &BackupOptions,
    drives: &[Drive],
    archive: &Archive,
    latch: &Arc<Latch>,
) -> Result<Exports, Error> {
    let sink = match opts.bwlimit {
        Some(rate) => Arc::new(RateLimited::new(archive.sink(), rate)) as Arc<dyn RangeSink>,
        None => archive.sink(),
    };
    let pushes = match (opts.cbw_timeout, opts.cbw_buffer) {
        (Some(_), bytes) if bytes > 0 => Some(
            PushBuffer::start(bytes, Arc::clone(&sink), Arc::clone(latch))
                .map_err(Error::PushThread)?,
        ),
        _ => None,
    };
    let mut builder = Server::builder();
    let mut counters = Vec::new();
    for (i, d) in drives.iter().enumerate() {
        let export = DriveExport::new(
            Arc::clone(&sink),
            Arc::clone(latch),
            i,
            d.size,
            opts.write_delay,
        );
        counters.push(export.counters());
        if let Some((buffer, _)) = &pushes {
            let push = export.pushes(Arc::clone(buffer));
            builder = builder.export(push_export(d), Arc::new(push) as Arc<dyn Export>);
        }
        builder = builder.export(d.node_name.clone(), Arc::new(export) as Arc<dyn Export>);
    }
    Ok(Exports {
        server: builder.build().map_err(Error::Nbd)?,
        counters,
        pushes,
    })
}

/// Serves the exports and runs the jobs; returns the exports' counters and
/// the copy time once every job succeeded, every target is removed and the
/// NBD server has stopped (so no write is still in flight).
fn serve_and_copy(
    opts: &BackupOptions,
    qmp: &mut Qmp,
    drives: &[Drive],
    archive: &Archive,
    latch: &Arc<Latch>,
) -> Result<Copied, Error> {
    let sock_dir = tempfile::Builder::new()
        .prefix("vma-live-backup-")
        .tempdir()
        .map_err(Error::SocketDir)?;
    let sock = sock_dir.path().join("nbd.sock");
    let Exports {
        server,
        counters,
        pushes,
    } = exports(opts, drives, archive, latch)?;
    let handle = server.listen_unix(&sock).map_err(Error::Nbd)?;

    let tag = format!(
        "vmalb{}x{}",
        std::process::id(),
        NEXT_BACKUP.fetch_add(1, Ordering::Relaxed)
    );
    let targets: Vec<Target> = (0..drives.len()).map(|i| Target::new(&tag, i)).collect();

    let mut undo = Vec::new();
    let mut result = add_targets(qmp, opts, drives, &targets, &sock, &mut undo);
    let mut copy_time = Duration::ZERO;
    let mut copy_start = Instant::now();
    let mut snapshot = copy_start;
    let mut warnings = Vec::new();
    let mut consistency = not_frozen(opts);
    if result.is_ok() {
        let progress_rows: Vec<(String, u64, Arc<Counters>)> = drives
            .iter()
            .zip(&counters)
            .map(|(d, c)| (d.device_name.clone(), d.size, Arc::clone(c)))
            .collect();
        let progress = Progress::new(opts.progress, &progress_rows);
        copy_start = Instant::now();
        let graph = Graph {
            drives,
            targets: &targets,
            undo: &mut undo,
        };
        result = run_jobs(opts, qmp, graph, latch, progress.as_ref()).map(|s| {
            // The copy starts with the transaction, not with the freeze before it.
            copy_start = s.at;
            snapshot = s.snapshot;
            consistency = s.consistency;
            warnings.extend(s.warnings);
        });
        copy_time = copy_start.elapsed();
        if let Some(p) = progress {
            p.finish(result.is_ok());
        }
    }
    let del = undo_all(qmp, undo);
    let stopped = handle.shutdown().map_err(Error::Nbd);
    let (buffer, drain) = pushes.unzip();
    if result.is_ok() && stopped.is_ok() {
        // No push can arrive any more: store what the buffer holds.
        if let Some(d) = drain {
            d.finish();
        }
    } else {
        drop(drain);
    }
    let buffered = buffer.is_some();
    let push_peak = buffer.map_or(0, |b| b.peak());
    result?;
    // Every job completed, so every byte was received and acknowledged: a
    // target QEMU would not remove does not spoil the archive.
    if let Err(e) = del {
        warnings.push(format!(
            "removing our block nodes: {e} (remove them by hand)"
        ));
    }
    stopped?;
    if let Some(e) = latch.take() {
        return Err(Error::ArchiveFailed {
            source: Box::new(e),
        });
    }
    Ok(Copied {
        counters,
        buffered,
        push_peak,
        snapshot,
        copy_start,
        copy_time,
        consistency,
        warnings,
    })
}

/// The export the copy-before-write filter of drive `d` pushes into, when
/// pushes are buffered.
fn push_export(d: &Drive) -> String {
    format!("{}.pushes", d.node_name)
}

/// What a successful copy leaves for the report.
struct Copied {
    counters: Vec<Arc<Counters>>,
    /// Whether pushes went through a buffer (and an export) of their own.
    buffered: bool,
    /// The most bytes of pushes the buffer held at once.
    push_peak: u64,
    snapshot: Instant,
    copy_start: Instant,
    copy_time: Duration,
    consistency: Consistency,
    warnings: Vec<String>,
}

/// The drives, their nodes and what to undo, as the jobs are started.
struct Graph<'a> {
    drives: &'a [Drive],
    targets: &'a [Target],
    undo: &'a mut Vec<Undo>,
}

/// `blockdev-add` the NBD target node(s) of each drive (two with a
/// copy-before-write bound: one connection each to the drive's export, the
/// filter's to the drive's push export when pushes are buffered).
fn add_targets(
    qmp: &mut Qmp,
    opts: &BackupOptions,
    drives: &[Drive],
    targets: &[Target],
    sock: &Path,
    undo: &mut Vec<Undo>,
) -> Result<(), Error> {
    let sock_str = sock
        .to_str()
        .ok_or_else(|| Error::SocketPath(sock.to_path_buf()))?;
    if opts.cbw_timeout.is_some() {
        // Before any node is added: every drive needs its device.
        for d in drives {
            device_path(d)?;
        }
    }
    for (d, t) in drives.iter().zip(targets) {
        let nodes = match opts.cbw_timeout {
            Some(_) if opts.cbw_buffer > 0 => {
                vec![(&t.node, push_export(d)), (&t.copy, d.node_name.clone())]
            }
            Some(_) => vec![
                (&t.node, d.node_name.clone()),
                (&t.copy, d.node_name.clone()),
            ],
            None => vec![(&t.node, d.node_name.clone())],
        };
        for (node, export) in nodes {
            let args = json!({
                "driver": "raw",
                "node-name": node,
                "file": {
                    "driver": "nbd",
                    "server": { "type": "unix", "path": sock_str },
                    "export": export,
                },
            });
            qmp.execute("blockdev-add", args)?;
            undo.push(Undo::Del(node.clone()));
        }
    }
    Ok(())
}

/// The QOM path of the guest device a drive is attached to.
fn device_path(d: &Drive) -> Result<String, Error> {
    match d.qdev.as_deref() {
        Some(q) if q.starts_with('/') => Ok(q.to_string()),
        Some(id) if !id.is_empty() => Ok(format!("/machine/peripheral/{id}")),
        _ => Err(Error::NoGuestDevice {
            node: d.node_name.clone(),
        }),
    }
}

/// Puts our `copy-before-write` filter between each guest device and its
/// drive, and a `snapshot-access` node over each filter. The snapshot of
/// every drive is taken as its filter is attached; a running VM is paused
/// for that (`stop` drains its I/O), and resumed whatever happened. Returns
/// when the guest went on with its filters attached.
fn insert_filters(qmp: &mut Qmp, graph: &mut Graph<'_>, secs: u32) -> Result<Instant, Error> {
    let status = qmp.execute("query-status", Value::Null)?;
    let running = status.get("running").and_then(Value::as_bool) == Some(true);
    // Counted before the `stop` is sent, uncounted after the `cont` answered.
    let paused = running.then(Paused::new);
    if running {
        qmp.execute("stop", Value::Null)?;
    }
    let mut attach = || -> Result<(), Error> {
        for (d, t) in graph.drives.iter().zip(graph.targets) {
            let device = device_path(d)?;
            let filter = json!({
                "driver": "copy-before-write",
                "node-name": t.filter,
                "file": d.node_name,
                "target": t.node,
                "on-cbw-error": "break-snapshot",
                "cbw-timeout": secs,
            });
            qmp.execute("blockdev-add", filter)?;
            graph.undo.push(Undo::Del(t.filter.clone()));
            let set = json!({ "path": device, "property": "drive", "value": t.filter });
            qmp.execute("qom-set", set)?;
            graph.undo.push(Undo::Attach {
                device,
                node: d.node_name.clone(),
            });
        }
        Ok(())
    };
    let attached = attach();
    let resumed = if running {
        qmp.execute("cont", Value::Null).map(drop)
    } else {
        Ok(())
    };
    let snapshot = Instant::now();
    drop(paused);
    attached?;
    resumed?;
    for t in graph.targets {
        // `discard: unmap`, or the job's `discard-source` discards nothing
        // (QEMU drops discards on a node without it) and the filter goes on
        // pushing every cluster the guest writes first, copied or not.
        let args = json!({ "driver": "snapshot-access", "node-name": t.snapshot,
                           "file": t.filter, "discard": "unmap" });
        qmp.execute("blockdev-add", args)?;
        graph.undo.push(Undo::Del(t.snapshot.clone()));
    }
    Ok(snapshot)
}

#[derive(Debug)]
enum JobEnd {
    Completed,
    Failed(JobFailure),
    Cancelled,
}

/// Starts the transaction and waits for every job's end, cancelling the
/// jobs when archiving fails or the user interrupts. Returns whether the
/// guest was frozen for the transaction, and warnings (a failed thaw).
fn run_jobs(
    opts: &BackupOptions,
    qmp: &mut Qmp,
    mut graph: Graph<'_>,
    latch: &Latch,
    progress: Option<&Progress>,
) -> Result<Started, Error> {
    if opts.cancel.load(Ordering::SeqCst) {
        return Err(Error::Interrupted);
    }
    let started = start_jobs_frozen(opts, qmp, &mut graph)?;
    let targets = graph.targets;
    let mut ends: BTreeMap<&str, JobEnd> = BTreeMap::new();
    let mut abort: Option<(Error, Instant)> = None;
    while ends.len() < targets.len() {
        if abort.is_none() {
            if let Some(reason) = abort_reason(opts, latch) {
                cancel_jobs(qmp, targets, &ends)?;
                abort = Some((reason, Instant::now()));
            }
        }
        let timed_out = abort
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() > CANCEL_TIMEOUT);
        if let Some((reason, _)) = abort.take_if(|_| timed_out) {
            return Err(Error::CancelTimeout {
                source: Box::new(reason),
                secs: CANCEL_TIMEOUT.as_secs(),
            });
        }
        let event = qmp.next_event(POLL)?;
        if let Some(p) = progress {
            p.update();
        }
        if let Some((job, end)) = event.and_then(|ev| job_end(&ev, targets)) {
            ends.insert(job, end);
        }
    }
    if let Some((e, _)) = abort {
        return Err(e);
    }
    if opts.cancel.load(Ordering::SeqCst) {
        // Interrupted as the jobs ended: keep the promise that an
        // interrupted backup leaves no archive.
        return Err(Error::Interrupted);
    }
    jobs_result(ends)
        .map_err(|e| snapshot_broken(e, opts.cbw_timeout))
        .map(|()| started)
}

/// A job failure that means our filter dropped the snapshot: a read of the
/// `snapshot-access` node after a push timed out fails with `EACCES`.
fn snapshot_broken(e: Error, cbw_timeout: Option<u32>) -> Error {
    match (e, cbw_timeout) {
        (Error::JobFailed { failures }, Some(secs))
            if failures
                .iter()
                .any(|f| f.error.contains("Permission denied")) =>
        {
            Error::SnapshotBroken { secs, failures }
        }
        (e, _) => e,
    }
}

/// How the jobs were started.
struct Started {
    /// Whether the guest was frozen for the transaction.
    consistency: Consistency,
    /// A failed thaw, say.
    warnings: Vec<String>,
    /// When the transaction was sent (with our filter: when it was being
    /// attached, before it).
    at: Instant,
    /// The instant the archive holds ([`BackupReport::snapshot`]).
    snapshot: Instant,
}

/// The consistency of a backup that froze nothing (yet).
fn not_frozen(opts: &BackupOptions) -> Consistency {
    Consistency::CrashConsistent {
        reason: match &opts.guest_agent {
            None => "no guest agent given (--guest-agent)".into(),
            Some(p) => format!("no freeze through the guest agent at {}", p.display()),
        },
    }
}

/// The transaction, between a freeze and a thaw of the guest's filesystems
/// when a guest agent is given and answers. The thaw is sent whether the
/// transaction succeeded or not, and whatever the freeze answered (a freeze
/// that failed or timed out may have frozen some filesystems).
fn start_jobs_frozen(
    opts: &BackupOptions,
    qmp: &mut Qmp,
    graph: &mut Graph<'_>,
) -> Result<Started, Error> {
    if opts.cbw_timeout.is_some() {
        flush_image_files(qmp);
    }
    let mut warnings = Vec::new();
    let Some(path) = &opts.guest_agent else {
        let (at, snapshot) = start_jobs(opts, qmp, graph)?;
        let consistency = not_frozen(opts);
        return Ok(Started {
            consistency,
            warnings,
            at,
            snapshot,
        });
    };
    let agent = match GuestAgent::connect(path, agent::SYNC_TIMEOUT) {
        Ok(a) => a,
        Err(e) => {
            let (at, snapshot) = start_jobs(opts, qmp, graph)?;
            let reason = format!("{e}; no freeze");
            let consistency = Consistency::CrashConsistent { reason };
            return Ok(Started {
                consistency,
                warnings,
                at,
                snapshot,
            });
        }
    };
    let since = Instant::now();
    let frozen = agent.freeze(agent::FREEZE_TIMEOUT);
    let (started, filesystems) = match frozen.frozen() {
        Ok(n) => (Some(start_jobs(opts, qmp, graph)), Ok(n)),
        // Thawed first: the transaction must not wait on a half-frozen guest.
        Err(e) => (None, Err(e.to_string())),
    };
    let thawed = frozen.thaw();
    if let Err(e) = &thawed {
        warnings.push(format!(
            "{e}: the guest's filesystems may still be frozen \
             (thaw them with guest-fsfreeze-thaw)"
        ));
    }
    let (at, snapshot) = match started {
        Some(times) => times?,
        None => start_jobs(opts, qmp, graph)?,
    };
    let consistency = match filesystems {
        // Frozen at the backup's instant even if the thaw failed; the warning says so.
        Ok(filesystems) => Consistency::Frozen {
            filesystems,
            held: thawed.unwrap_or_else(|_| since.elapsed()),
        },
        Err(e) => Consistency::CrashConsistent {
            reason: format!("{e}; thawed and backed up without a freeze"),
        },
    };
    Ok(Started {
        consistency,
        warnings,
        at,
        snapshot,
    })
}

/// Writes the host's dirty pages of the VM's image files out while the guest
/// runs (fdatasync, as far as this process may open them). QEMU's `stop`,
/// which attaching our filters needs, flushes every image with the VM paused:
/// with writeback caching that pause lasts as long as the host takes to write
/// what the guest wrote since. Best effort: what it cannot list, open or
/// sync is left to the `stop` (and a QMP connection gone fails the next
/// command).
fn flush_image_files(qmp: &mut Qmp) {
    let Ok(nodes) = qmp.execute("query-named-block-nodes", Value::Null) else {
        return;
    };
    for path in drives::image_files(&nodes) {
        if let Ok(f) = std::fs::File::open(&path) {
            let _ = f.sync_data();
        }
    }
}

/// One `transaction` of `blockdev-backup` actions with grouped completion.
/// Returns when it was started, and the instant of the snapshot.
fn start_jobs(
    opts: &BackupOptions,
    qmp: &mut Qmp,
    graph: &mut Graph<'_>,
) -> Result<(Instant, Instant), Error> {
    let at = Instant::now();
    let filtered = match opts.cbw_timeout {
        Some(secs) => Some(insert_filters(qmp, graph, secs)?),
        None => None,
    };
    let actions: Vec<Value> = graph
        .drives
        .iter()
        .zip(graph.targets)
        .map(|(d, t)| {
            let mut data = match opts.cbw_timeout {
                None => json!({
                    "device": d.node_name,
                    "target": t.node,
                    "sync": "full",
                    "job-id": t.job,
                }),
                Some(_) => json!({
                    "device": t.snapshot,
                    "target": t.copy,
                    "sync": "full",
                    "job-id": t.job,
                    "discard-source": true,
                }),
            };
            if let Some(x) = opts.x_perf {
                data["x-perf"] = json!({
                    "max-workers": x.max_workers,
                    "max-chunk": x.max_chunk,
                });
            }
            json!({ "type": "blockdev-backup", "data": data })
        })
        .collect();
    qmp.execute(
        "transaction",
        json!({
            "actions": actions,
            "properties": { "completion-mode": "grouped" },
        }),
    )?;
    Ok((at, filtered.unwrap_or_else(Instant::now)))
}

/// Why the running jobs must be cancelled now, if they must.
fn abort_reason(opts: &BackupOptions, latch: &Latch) -> Option<Error> {
    if let Some(e) = latch.take() {
        return Some(Error::ArchiveFailed {
            source: Box::new(e),
        });
    }
    opts.cancel
        .load(Ordering::SeqCst)
        .then_some(Error::Interrupted)
}

/// Cancels the jobs that have not ended (grouped completion cancels the
/// rest with the first). Only QEMU going away is an error: cancelling a job
/// that is already gone fails harmlessly.
fn cancel_jobs(
    qmp: &mut Qmp,
    targets: &[Target],
    ends: &BTreeMap<&str, JobEnd>,
) -> Result<(), Error> {
    for t in targets {
        if ends.contains_key(t.job.as_str()) {
            continue;
        }
        match qmp.execute("block-job-cancel", json!({ "device": t.job })) {
            Err(Error::QmpClosed) => return Err(Error::QmpClosed),
            _ => continue,
        }
    }
    Ok(())
}

/// The job of ours an event reports the end of, and how it ended.
fn job_end<'t>(event: &Event, targets: &'t [Target]) -> Option<(&'t str, JobEnd)> {
    let job = event.data.get("device").and_then(Value::as_str)?;
    let t = targets.iter().find(|t| t.job == job)?;
    let end = match event.name.as_str() {
        "BLOCK_JOB_COMPLETED" => match event.data.get("error").and_then(Value::as_str) {
            Some(err) => JobEnd::Failed(JobFailure {
                job: job.to_string(),
                error: err.to_string(),
            }),
            None => JobEnd::Completed,
        },
        "BLOCK_JOB_CANCELLED" => JobEnd::Cancelled,
        _ => return None,
    };
    Some((t.job.as_str(), end))
}

/// Success when every job completed without error.
fn jobs_result(ends: BTreeMap<&str, JobEnd>) -> Result<(), Error> {
    let mut failures = Vec::new();
    let mut cancelled = None;
    for (job, end) in ends {
        match end {
            JobEnd::Completed => {}
            JobEnd::Failed(f) => failures.push(f),
            JobEnd::Cancelled => {
                cancelled.get_or_insert_with(|| job.to_string());
            }
        }
    }
    if !failures.is_empty() {
        return Err(Error::JobFailed { failures });
    }
    match cancelled {
        Some(job) => Err(Error::JobCancelled { job }),
        None => Ok(()),
    }
}

fn qemu_version_string(v: &Value) -> String {
    let n = |k: &str| v.pointer(&format!("/qemu/{k}")).and_then(Value::as_u64);
    match (n("major"), n("minor"), n("micro")) {
        (Some(a), Some(b), Some(c)) => format!("{a}.{b}.{c}"),
        _ => "unknown".into(),
    }
}

fn drives_blob(drives: &[Drive], version: &Value) -> String {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let blob = json!({
        "program": "vma-live-backup",
        "program-version": env!("CARGO_PKG_VERSION"),
        "created": created,
        "qemu": {
            "version": qemu_version_string(version),
            "package": version.get("package").cloned().unwrap_or(Value::Null),
        },
        "drives": drives.iter().map(Drive::to_json).collect::<Vec<_>>(),
    });
    serde_json::to_string_pretty(&blob).unwrap_or_else(|_| blob.to_string())
}

fn read_configs(configs: &[(String, PathBuf)]) -> Result<Vec<(String, Vec<u8>)>, Error> {
    configs
        .iter()
        .map(|(name, path)| {
            if name == DRIVES_CONFIG_NAME {
                return Err(Error::ReservedConfigName);
            }
            std::fs::read(path)
                .map(|data| (name.clone(), data))
                .map_err(|source| Error::ReadConfig {
                    name: name.clone(),
                    path: path.clone(),
                    source,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids() {
        assert_eq!(job_index("vmalb12x0-job3"), Some(3));
        assert_eq!(job_index("other-job3"), None);
        assert_eq!(job_index("vmalb12x0-target3"), None);
    }

    #[test]
    fn version_and_blob() {
        let v = json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "p"});
        assert_eq!(qemu_version_string(&v), "10.0.2");
        assert_eq!(qemu_version_string(&json!({})), "unknown");
        let d = Drive {
            node_name: "d0".into(),
            qdev: Some("vd0".into()),
            device_name: "drive-vd0".into(),
            size: 512,
        };
        let blob: Value = serde_json::from_str(&drives_blob(&[d], &v)).unwrap();
        assert_eq!(blob["drives"][0]["device"], "drive-vd0");
        assert_eq!(blob["qemu"]["version"], "10.0.2");
    }

    #[test]
    fn configs_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("100.conf");
        std::fs::write(&p, b"memory: 512\n").unwrap();
        let got = read_configs(&[("qemu-server.conf".into(), p)]).unwrap();
        assert_eq!(got[0].1, b"memory: 512\n");
        assert!(matches!(
            read_configs(&[("x".into(), dir.path().join("missing"))]),
            Err(Error::ReadConfig { name, .. }) if name == "x"
        ));
        assert!(matches!(
            read_configs(&[(DRIVES_CONFIG_NAME.into(), dir.path().into())]),
            Err(Error::ReservedConfigName)
        ));
    }

    fn targets() -> Vec<Target> {
        (0..2).map(|i| Target::new("vmalb1x0", i)).collect()
    }

    fn event(name: &str, data: Value) -> Event {
        Event {
            name: name.into(),
            data,
        }
    }

    #[test]
    fn job_end_events() {
        let t = targets();
        let done = event("BLOCK_JOB_COMPLETED", json!({"device": "vmalb1x0-job1"}));
        assert!(matches!(
            job_end(&done, &t),
            Some(("vmalb1x0-job1", JobEnd::Completed))
        ));
        let failed = event(
            "BLOCK_JOB_COMPLETED",
            json!({"device": "vmalb1x0-job0", "error": "Input/output error"}),
        );
        match job_end(&failed, &t) {
            Some(("vmalb1x0-job0", JobEnd::Failed(f))) => {
                assert_eq!(f.to_string(), "vmalb1x0-job0: Input/output error")
            }
            other => panic!("{other:?}"),
        }
        let cancelled = event("BLOCK_JOB_CANCELLED", json!({"device": "vmalb1x0-job0"}));
        assert!(matches!(
            job_end(&cancelled, &t),
            Some((_, JobEnd::Cancelled))
        ));
        let other_job = event("BLOCK_JOB_COMPLETED", json!({"device": "theirs"}));
        assert!(job_end(&other_job, &t).is_none());
        let progress = event("BLOCK_JOB_READY", json!({"device": "vmalb1x0-job0"}));
        assert!(job_end(&progress, &t).is_none());
    }

    #[test]
    fn jobs_result_names_every_failure() {
        let ok = BTreeMap::from([("a", JobEnd::Completed), ("b", JobEnd::Completed)]);
        assert!(jobs_result(ok).is_ok());
        let failure = |job: &str| {
            JobEnd::Failed(JobFailure {
                job: job.into(),
                error: "Input/output error".into(),
            })
        };
        let ends = BTreeMap::from([
            ("a", failure("a")),
            ("b", JobEnd::Cancelled),
            ("c", failure("c")),
        ]);
        match jobs_result(ends) {
            Err(Error::JobFailed { failures }) => assert_eq!(failures.len(), 2),
            other => panic!("{other:?}"),
        }
        let ends = BTreeMap::from([("a", JobEnd::Completed), ("b", JobEnd::Cancelled)]);
        assert!(matches!(
            jobs_result(ends),
            Err(Error::JobCancelled { job }) if job == "b"
        ));
    }

    #[test]
    fn abort_reasons() {
        let opts = BackupOptions::new("/q", "/o");
        let latch = Latch::default();
        assert!(abort_reason(&opts, &latch).is_none());
        opts.cancel.store(true, Ordering::SeqCst);
        assert!(matches!(
            abort_reason(&opts, &latch),
            Some(Error::Interrupted)
        ));
        // An archive failure wins over the interrupt: it is what the user must fix.
        latch.fail(Error::NoDevice(7));
        match abort_reason(&opts, &latch) {
            Some(Error::ArchiveFailed { source }) => {
                assert!(matches!(*source, Error::NoDevice(7)))
            }
            other => panic!("{other:?}"),
        }
    }
}
