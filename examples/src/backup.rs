//! The live backup: QEMU's backup jobs write into our NBD exports, which
//! write into the archive.
//!
//! Flow: `query-version` and `query-block`; create the archive's temporary
//! file and start the NBD server (one export per drive, exactly QEMU's
//! virtual size); `blockdev-add` one NBD target node per drive; one
//! `transaction` of `blockdev-backup` actions with grouped completion (all
//! drives share one point in time); wait for each job's end event;
//! `blockdev-del` the targets; finish the archive. On any failure the jobs
//! are cancelled, the targets removed and the archive abandoned: the VM runs
//! on and no file appears under the archive's name.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use vma_nbd::{Export, Server, ServerHandle};

use crate::archive::Archive;
use crate::drives::{self, Drive};
use crate::export::{Counters, DriveExport, Latch, SinkError};
use crate::progress::Progress;
use crate::qmp::{Qmp, QmpError};

/// Name of the config entry describing the backed-up drives.
pub const DRIVES_CONFIG_NAME: &str = "vma-live-backup.json";

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
    /// Pass `x-perf` to the backup jobs.
    pub x_perf: Option<XPerf>,
    /// Set to cancel the backup (e.g. from a Ctrl-C handler).
    pub cancel: Arc<AtomicBool>,
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
            x_perf: None,
            cancel: Arc::new(AtomicBool::new(false)),
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

/// Why a backup failed. In every case the VM was left running and no file
/// exists under the archive's name.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The options cannot work (unreadable config, unknown drive, ...).
    #[error("{0}")]
    Usage(String),
    /// Talking to QEMU or setting the backup up failed before any data.
    #[error("{0}")]
    Setup(String),
    /// Writing the archive failed; the backup jobs were cancelled.
    #[error("writing the archive failed, backup cancelled: {0}")]
    Archive(SinkError),
    /// QEMU's backup job failed.
    #[error("QEMU's backup job failed: {0}")]
    JobFailed(String),
    /// QEMU went away during the backup.
    #[error("QEMU went away during the backup: {0}")]
    QemuGone(String),
    /// The backup was cancelled by the user.
    #[error("backup interrupted; the jobs were cancelled")]
    Interrupted,
}

impl BackupError {
    /// The process exit code for this error: 2 usage, 1 setup, 3 archive
    /// write failure (4 when the archive's filesystem is full), 5 QEMU's job
    /// failed, 6 QEMU went away, 130 interrupted.
    pub fn exit_code(&self) -> i32 {
        match self {
            BackupError::Usage(_) => 2,
            BackupError::Setup(_) => 1,
            BackupError::Archive(e) if e.no_space => 4,
            BackupError::Archive(_) => 3,
            BackupError::JobFailed(_) => 5,
            BackupError::QemuGone(_) => 6,
            BackupError::Interrupted => 130,
        }
    }
}

fn setup(what: &str) -> impl Fn(QmpError) -> BackupError + '_ {
    move |e| match e {
        QmpError::Closed => BackupError::QemuGone(format!("{what}: {e}")),
        e => BackupError::Setup(format!("{what}: {e}")),
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
    /// From the transaction to the last job's end.
    pub copy_time: Duration,
    /// From the transaction to the archive's final rename (fsynced).
    pub durable_time: Duration,
    /// From connecting to the archive's final rename.
    pub total_time: Duration,
    /// Problems that did not affect the archive (e.g. a target node QEMU
    /// would not remove after the jobs completed).
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
            "  {:<16} {:>11} {:>11} {:>11} {:>11} {:>9}",
            "device", "size MiB", "copied MiB", "stored MiB", "zero MiB", "non-seq"
        )?;
        for d in &self.drives {
            writeln!(
                f,
                "  {:<16} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>9}",
                d.drive.device_name,
                mib(d.drive.size),
                mib(d.data_bytes + d.zero_request_bytes),
                mib(d.stored_bytes),
                mib(d.zero_bytes),
                d.non_sequential,
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

/// Tells target nodes and jobs of concurrent backups apart.
static NEXT_BACKUP: AtomicU64 = AtomicU64::new(0);

struct Target {
    node: String,
    job: String,
}

/// Runs a live backup as `opts` describes.
pub fn run_backup(opts: &BackupOptions) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let configs = read_configs(&opts.configs)?;
    let mut qmp = Qmp::connect(&opts.qmp_socket).map_err(|e| {
        BackupError::Setup(format!(
            "connecting to QEMU at {}: {e}",
            opts.qmp_socket.display()
        ))
    })?;
    let version = qmp
        .execute("query-version", Value::Null)
        .map_err(setup("query-version"))?;
    let qemu_version = qemu_version_string(&version);
    let all = drives::parse_query_block(
        &qmp.execute("query-block", Value::Null)
            .map_err(setup("query-block"))?,
    )
    .map_err(BackupError::Setup)?;
    let drives = drives::select(all, &opts.drives).map_err(BackupError::Usage)?;
    if drives.is_empty() {
        return Err(BackupError::Usage(
            "the VM has no drive to back up (query-block lists none with a medium)".into(),
        ));
    }

    let mut all_configs = configs;
    all_configs.push((
        DRIVES_CONFIG_NAME.to_string(),
        drives_blob(&drives, &version).into_bytes(),
    ));
    let devices: Vec<(String, u64)> = drives
        .iter()
        .map(|d| (d.device_name.clone(), d.size))
        .collect();
    let archive =
        Archive::create(&opts.output, opts.zstd, &all_configs, &devices).map_err(|e| {
            match e.message.contains("already exists") {
                true => BackupError::Usage(e.message),
                false => BackupError::Archive(e),
            }
        })?;

    // From here on the archive must be finished or aborted.
    let latch = Arc::new(Latch::default());
    let result = serve_and_copy(opts, &mut qmp, &drives, &archive, &latch);
    match result {
        Ok(Copied {
            counters,
            copy_start,
            copy_time,
            warnings,
        }) => {
            let summary = archive.finish().map_err(BackupError::Archive)?;
            let archive_bytes = std::fs::metadata(&opts.output)
                .map(|m| m.len())
                .unwrap_or(summary.archive_bytes);
            let reports = drives
                .iter()
                .zip(&counters)
                .zip(&summary.devices)
                .map(|((drive, c), dev)| DriveReport {
                    drive: drive.clone(),
                    data_bytes: c.data_bytes.load(Ordering::Relaxed),
                    zero_request_bytes: c.zero_bytes.load(Ordering::Relaxed),
                    stored_bytes: dev.stored_bytes,
                    zero_bytes: dev.zero_bytes,
                    requests: c.requests.load(Ordering::Relaxed),
                    non_sequential: c.non_sequential.load(Ordering::Relaxed),
                })
                .collect();
            Ok(BackupReport {
                output: opts.output.clone(),
                archive_bytes,
                qemu_version,
                drives: reports,
                copy_time,
                durable_time: copy_start.elapsed(),
                total_time: started.elapsed(),
                warnings,
            })
        }
        Err(e) => {
            archive.abort();
            Err(e)
        }
    }
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
) -> Result<Copied, BackupError> {
    let sock_dir = tempfile::Builder::new()
        .prefix("vma-live-backup-")
        .tempdir()
        .map_err(|e| BackupError::Setup(format!("creating a socket directory: {e}")))?;
    let sock = sock_dir.path().join("nbd.sock");
    let sink = archive.sink();
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
        builder = builder.export(d.node_name.clone(), Arc::new(export) as Arc<dyn Export>);
    }
    let server = builder
        .build()
        .map_err(|e| BackupError::Setup(format!("NBD server: {e}")))?;
    let handle = server
        .listen_unix(&sock)
        .map_err(|e| BackupError::Setup(format!("NBD server: {e}")))?;

    let tag = format!(
        "vmalb{}x{}",
        std::process::id(),
        NEXT_BACKUP.fetch_add(1, Ordering::Relaxed)
    );
    let targets: Vec<Target> = (0..drives.len())
        .map(|i| Target {
            node: format!("{tag}-target{i}"),
            job: format!("{tag}-job{i}"),
        })
        .collect();

    let mut added = 0;
    let mut result = add_targets(qmp, drives, &targets, &sock, &mut added);
    let mut copy_time = Duration::ZERO;
    let mut copy_start = Instant::now();
    if result.is_ok() {
        let progress_rows: Vec<(String, u64, Arc<Counters>)> = drives
            .iter()
            .zip(&counters)
            .map(|(d, c)| (d.device_name.clone(), d.size, Arc::clone(c)))
            .collect();
        let progress = Progress::new(opts.progress, &progress_rows);
        copy_start = Instant::now();
        result = run_jobs(opts, qmp, drives, &targets, latch, progress.as_ref());
        copy_time = copy_start.elapsed();
        if let Some(p) = progress {
            p.finish(result.is_ok());
        }
    }
    let del = del_targets(qmp, &targets[..added]);
    let stopped = stop_server(handle);
    result?;
    // Every job completed, so every byte was received and acknowledged: a
    // target QEMU would not remove does not spoil the archive.
    let mut warnings = Vec::new();
    if let Err(e) = del {
        warnings.push(format!("{e} (remove the node by hand)"));
    }
    stopped?;
    if let Some(e) = latch.take() {
        return Err(BackupError::Archive(e));
    }
    Ok(Copied {
        counters,
        copy_start,
        copy_time,
        warnings,
    })
}

/// What a successful copy leaves for the report.
struct Copied {
    counters: Vec<Arc<Counters>>,
    copy_start: Instant,
    copy_time: Duration,
    warnings: Vec<String>,
}

fn add_targets(
    qmp: &mut Qmp,
    drives: &[Drive],
    targets: &[Target],
    sock: &Path,
    added: &mut usize,
) -> Result<(), BackupError> {
    let sock = sock
        .to_str()
        .ok_or_else(|| BackupError::Setup("socket path is not UTF-8".into()))?;
    for (d, t) in drives.iter().zip(targets) {
        let args = json!({
            "driver": "raw",
            "node-name": t.node,
            "file": {
                "driver": "nbd",
                "server": { "type": "unix", "path": sock },
                "export": d.node_name,
            },
        });
        qmp.execute("blockdev-add", args)
            .map_err(setup("blockdev-add of the NBD target"))?;
        *added += 1;
    }
    Ok(())
}

fn del_targets(qmp: &mut Qmp, targets: &[Target]) -> Result<(), BackupError> {
    let mut first_err = None;
    for t in targets {
        if let Err(e) = qmp.execute("blockdev-del", json!({ "node-name": t.node })) {
            first_err.get_or_insert_with(|| setup("blockdev-del of the NBD target")(e));
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn stop_server(handle: ServerHandle) -> Result<(), BackupError> {
    handle
        .shutdown()
        .map_err(|e| BackupError::Setup(format!("NBD server: {e}")))
}

#[derive(Debug)]
enum JobEnd {
    Completed,
    Failed(String),
    Cancelled,
}

/// Starts the transaction and waits for every job's end, cancelling the
/// jobs when archiving fails or the user interrupts.
#[allow(clippy::too_many_lines)] // reason: being split in a parallel change (issue 19)
fn run_jobs(
    opts: &BackupOptions,
    qmp: &mut Qmp,
    drives: &[Drive],
    targets: &[Target],
    latch: &Latch,
    progress: Option<&Progress>,
) -> Result<(), BackupError> {
    if opts.cancel.load(Ordering::SeqCst) {
        return Err(BackupError::Interrupted);
    }
    let actions: Vec<Value> = drives
        .iter()
        .zip(targets)
        .map(|(d, t)| {
            let mut data = json!({
                "device": d.node_name,
                "target": t.node,
                "sync": "full",
                "job-id": t.job,
            });
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
    )
    .map_err(setup("starting the backup jobs (transaction)"))?;

    let mut ends: BTreeMap<&str, JobEnd> = BTreeMap::new();
    let mut abort: Option<BackupError> = None;
    let mut cancelled_at: Option<Instant> = None;
    while ends.len() < targets.len() {
        if abort.is_none() {
            if latch.failed() {
                let err = latch
                    .take()
                    .unwrap_or_else(|| SinkError::new("unknown archive failure"));
                abort = Some(BackupError::Archive(err));
            } else if opts.cancel.load(Ordering::SeqCst) {
                abort = Some(BackupError::Interrupted);
            }
            if abort.is_some() {
                cancelled_at = Some(Instant::now());
                for t in targets {
                    if !ends.contains_key(t.job.as_str()) {
                        // Fails harmlessly for jobs already gone.
                        match qmp.execute("block-job-cancel", json!({ "device": t.job })) {
                            Err(QmpError::Closed) => {
                                return Err(BackupError::QemuGone(QmpError::Closed.to_string()))
                            }
                            _ => continue,
                        }
                    }
                }
            }
        }
        if let Some(at) = cancelled_at {
            if at.elapsed() > CANCEL_TIMEOUT {
                return Err(BackupError::Setup(format!(
                    "{}; and the jobs did not end within {} s of being cancelled",
                    abort.map(|e| e.to_string()).unwrap_or_default(),
                    CANCEL_TIMEOUT.as_secs()
                )));
            }
        }
        let event = qmp
            .next_event(POLL)
            .map_err(|e| BackupError::QemuGone(e.to_string()))?;
        if let Some(p) = progress {
            p.update();
        }
        let Some(event) = event else { continue };
        let Some(job) = event.data.get("device").and_then(Value::as_str) else {
            continue;
        };
        let Some(t) = targets.iter().find(|t| t.job == job) else {
            continue;
        };
        let end = match event.name.as_str() {
            "BLOCK_JOB_COMPLETED" => match event.data.get("error").and_then(Value::as_str) {
                Some(err) => JobEnd::Failed(format!("{job}: {err}")),
                None => JobEnd::Completed,
            },
            "BLOCK_JOB_CANCELLED" => JobEnd::Cancelled,
            _ => continue,
        };
        ends.insert(t.job.as_str(), end);
    }
    if let Some(e) = abort {
        return Err(e);
    }
    if opts.cancel.load(Ordering::SeqCst) {
        // Interrupted as the jobs ended: keep the promise that an
        // interrupted backup leaves no archive.
        return Err(BackupError::Interrupted);
    }
    let failures: Vec<&str> = ends
        .values()
        .filter_map(|e| match e {
            JobEnd::Failed(m) => Some(m.as_str()),
            _ => None,
        })
        .collect();
    if !failures.is_empty() {
        return Err(BackupError::JobFailed(failures.join("; ")));
    }
    if ends.values().any(|e| matches!(e, JobEnd::Cancelled)) {
        return Err(BackupError::JobFailed(
            "a job was cancelled outside this program".into(),
        ));
    }
    Ok(())
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

fn read_configs(configs: &[(String, PathBuf)]) -> Result<Vec<(String, Vec<u8>)>, BackupError> {
    configs
        .iter()
        .map(|(name, path)| {
            if name == DRIVES_CONFIG_NAME {
                return Err(BackupError::Usage(format!(
                    "config name {DRIVES_CONFIG_NAME} is reserved for the drive list"
                )));
            }
            std::fs::read(path)
                .map(|data| (name.clone(), data))
                .map_err(|e| BackupError::Usage(format!("config {name}: {}: {e}", path.display())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_differ() {
        let codes = [
            BackupError::Usage(String::new()).exit_code(),
            BackupError::Setup(String::new()).exit_code(),
            BackupError::Archive(SinkError::new("x")).exit_code(),
            BackupError::Archive(SinkError {
                message: "x".into(),
                no_space: true,
            })
            .exit_code(),
            BackupError::JobFailed(String::new()).exit_code(),
            BackupError::QemuGone(String::new()).exit_code(),
            BackupError::Interrupted.exit_code(),
        ];
        let mut sorted = codes.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), codes.len());
    }

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
            Err(BackupError::Usage(_))
        ));
        assert!(matches!(
            read_configs(&[(DRIVES_CONFIG_NAME.into(), dir.path().into())]),
            Err(BackupError::Usage(_))
        ));
    }
}
