//! `vma create`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use vma_writer::{round_up_to_sector, source_size, uuid_from_name, Builder, Uuid, Writer};

use crate::error::{CliError, Exit, Result};
use crate::output::{self, Sink, Target};
use crate::packed::Packing;
use crate::progress::{CreateLines, Progress};
use crate::qemu;

/// Arguments of `vma create`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The archive to create; it must not exist. It appears under this name only once
    /// complete.
    file: PathBuf,
    /// A config file to embed (stored under its base name). May be repeated.
    #[arg(short = 'c')]
    configs: Vec<PathBuf>,
    /// A disk: `format=<format>:<device name>=<path>`. `raw`: a file or block device, read
    /// directly; any other format QEMU reads (qcow2, vmdk, vdi, vhdx, ...) is read through
    /// `qemu-storage-daemon`, as the guest sees it (backing files included). May be repeated.
    #[arg(short = 'd')]
    disks: Vec<String>,
    /// Older form: `[<device name>=]<path>`; a path without a name becomes disk0, disk1, ...
    #[arg(conflicts_with = "disks")]
    paths: Vec<String>,
    /// Print progress and per-image statistics on stderr, like Proxmox's tool.
    #[arg(short = 'v')]
    verbose: bool,
    /// Compress in process on every core: `zstd` or `zstd:LEVEL` (seekable zstd, which
    /// `zstd -d` reads as usual and `vma serve`/`cat` read in place), or `none`. Default:
    /// zstd level 3 for a file name ending in `.zst`, else none.
    #[arg(long, value_name = "zstd[:LEVEL]|none")]
    compress: Option<String>,
    /// Leave out vma-rs's data checksums and seal (the archive is then laid out exactly
    /// as Proxmox's writer lays it out).
    #[arg(long)]
    no_integrity: bool,
    /// fsync the archive and its directory before reporting success.
    #[arg(long)]
    sync: bool,
    /// Make a reproducible archive: clusters in canonical order (device by device,
    /// ascending), the uuid derived from the header's declarations (spec/FORMAT.md,
    /// "Derived uuids") and the ctime from --ctime, else SOURCE_DATE_EPOCH, else 0. The same
    /// configs and images give the same bytes on any machine.
    #[arg(long)]
    reproducible: bool,
    /// The archive's creation time, seconds since the epoch (default: SOURCE_DATE_EPOCH if
    /// set, else 0 with --reproducible, else now).
    #[arg(long, value_name = "SECS", allow_hyphen_values = true)]
    ctime: Option<i64>,
    /// Give the archive this uuid (say, the same for every backup of one VM), with the
    /// clusters in canonical order: unchanged regions of two such archives are the same
    /// bytes, which deduplicating stores keep once.
    #[arg(long, value_name = "UUID", conflicts_with = "uuid_from")]
    uuid: Option<String>,
    /// Like --uuid, with the uuid derived from NAME (spec/FORMAT.md, "Derived uuids"):
    /// `--uuid-from vm-100` gives the same uuid on every machine.
    #[arg(long, value_name = "NAME")]
    uuid_from: Option<String>,
}

/// The uuid that `--uuid TEXT` or `--uuid-from NAME` pins (`--uuid` wins), if any.
pub(crate) fn pinned_uuid(uuid: Option<&str>, uuid_from: Option<&str>) -> Result<Option<Uuid>> {
    Ok(match (uuid, uuid_from) {
        (Some(text), _) => Some(
            Uuid::parse_str(text)
                .map_err(|e| CliError::usage(format!("--uuid {text:?}: not a uuid ({e})")))?,
        ),
        (None, Some(name)) => Some(uuid_from_name(name)),
        (None, None) => None,
    })
}

/// The uuid and ctime options applied to a builder.
fn identity(args: &Args, builder: &mut Builder) -> Result<()> {
    if args.reproducible {
        builder.reproducible();
    }
    let pinned = pinned_uuid(args.uuid.as_deref(), args.uuid_from.as_deref())?;
    if let Some(uuid) = pinned {
        builder.uuid(uuid).canonical_order(true);
    }
    let ctime = match args.ctime {
        Some(t) => Some(t),
        None => source_date_epoch()?,
    };
    match ctime {
        Some(t) => {
            builder.ctime(t);
        }
        None if args.reproducible => {
            builder.ctime(0);
        }
        None => {}
    }
    Ok(())
}

/// `SOURCE_DATE_EPOCH` (reproducible-builds.org's convention), if set and not empty.
fn source_date_epoch() -> Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => v.trim().parse().map(Some).map_err(|_| {
            CliError::usage(format!(
                "SOURCE_DATE_EPOCH={v:?}: not a number of seconds since the epoch"
            ))
        }),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(CliError::usage(
            "SOURCE_DATE_EPOCH: not a number of seconds since the epoch",
        )),
    }
}

/// One disk to back up.
struct Disk {
    name: String,
    path: PathBuf,
    source: Source,
    size: u64,
}

/// Where a disk's data comes from.
enum Source {
    /// A raw image or block device.
    File(File),
    /// An image in another format, through QEMU.
    Qemu(Box<qemu::NbdSource>),
}

/// A disk spec: its name, path and format (`None`: raw).
type DiskSpec = (String, PathBuf, Option<String>);

fn parse_disk(spec: &str, index: usize, need_format: bool) -> Result<DiskSpec> {
    let mut format = None;
    let rest = match spec.strip_prefix("format=") {
        Some(rest) => {
            let (f, rest) = rest.split_once(':').ok_or_else(|| {
                CliError::usage(format!("option 'format' not terminated ('{spec}')"))
            })?;
            qemu::check_format(f, spec)?;
            format = (f != "raw").then(|| f.to_string());
            rest
        }
        None if need_format => {
            return Err(CliError::usage(format!(
                "No format specified for device: '{spec}'"
            )))
        }
        None => spec,
    };
    let (name, path) = match rest.split_once('=') {
        Some((name, path)) if !name.is_empty() => (name.to_string(), PathBuf::from(path)),
        Some(_) => return Err(CliError::usage(format!("empty device name in '{spec}'"))),
        None => (format!("disk{index}"), PathBuf::from(rest)),
    };
    Ok((name, path, format))
}

/// Opens a disk's source and learns its size.
fn open_disk(name: String, path: PathBuf, format: Option<&str>) -> Result<Disk> {
    let (source, len) = match format {
        None => {
            let file = File::open(&path).map_err(|e| CliError::io(path.display(), e))?;
            let len = source_size(&file).map_err(|e| CliError::io(path.display(), e))?;
            (Source::File(file), len)
        }
        Some(f) => {
            let source = qemu::NbdSource::open(&path, f)?;
            let len = source.len;
            (Source::Qemu(Box::new(source)), len)
        }
    };
    if len == 0 {
        return Err(CliError::usage(format!(
            "{}: the image is empty",
            path.display()
        )));
    }
    Ok(Disk {
        name,
        path,
        source,
        size: round_up_to_sector(len),
    })
}

pub(crate) fn run(args: Args) -> Result<()> {
    let specs: Vec<(String, bool)> = if args.disks.is_empty() {
        args.paths.iter().map(|p| (p.clone(), false)).collect()
    } else {
        args.disks.iter().map(|d| (d.clone(), true)).collect()
    };
    let mut builder = Builder::new();
    builder.integrity(!args.no_integrity).fsync(args.sync);
    identity(&args, &mut builder)?;
    // Open every source before creating anything.
    let mut disks = Vec::new();
    for (index, (spec, need_format)) in specs.iter().enumerate() {
        let (name, path, format) = parse_disk(spec, index, *need_format)?;
        disks.push(open_disk(name, path, format.as_deref())?);
    }

    for config in &args.configs {
        let data = std::fs::read(config).map_err(|e| CliError::io(config.display(), e))?;
        builder.add_config(&config_name(config), &data)?;
    }
    let mut devices = Vec::new();
    for disk in &disks {
        devices.push(builder.add_device(&disk.name, disk.size)?);
    }
    let total: u64 = disks.iter().map(|d| d.size).sum();
    let lines = Arc::new(Mutex::new(CreateLines::new(args.verbose, total)));
    let observed = lines.clone();
    builder.on_cluster(move |c| {
        let line = lock(&observed).record(c);
        if let Some(line) = line {
            eprintln!("{line}");
        }
    });

    let target = Target::parse(&args.file)?;
    let packing = Packing::choose(args.compress.as_deref(), &target)?;
    let bound = vma_writer::max_archive_len(total);
    // The handler goes in before anything is opened: a signal that comes while the
    // output is being set up (an upload being initiated) is then an interrupt like any
    // other, not the end of a process that leaves an upload behind.
    let interrupted = &*output::interrupt_flag();
    let was_interrupted = || {
        CliError::new(
            Exit::Io,
            format!("{}: interrupted: no archive was written", target.describe()),
        )
    };
    let or_interrupted = |e: CliError| {
        if interrupted.load(Ordering::Relaxed) {
            was_interrupted()
        } else {
            e
        }
    };
    let (sink, mut command) = Sink::open(&target, Some(bound)).map_err(or_interrupted)?;
    let sink = packing.wrap(sink).map_err(or_interrupted)?;
    let writer = builder
        .build(sink)
        .map_err(CliError::from)
        .map_err(or_interrupted)?;
    let failed = write_disks(&writer, &disks, &devices, !args.verbose, interrupted);
    if let Some((path, e)) = failed {
        let _ = writer.abort();
        if interrupted.load(Ordering::Relaxed) {
            command.as_mut().and_then(output::Running::stop);
            return Err(was_interrupted());
        }
        return Err(failure(&target, command.as_mut(), Some(path), e));
    }
    let (summary, sink) = match writer.finish() {
        Ok(done) => done,
        Err(e) => return Err(failure(&target, command.as_mut(), None, e)),
    };
    close_sources(disks)?;
    sink.finish(&target)?
        .complete(command, &target, args.sync)?;
    if args.verbose {
        let lines = lock(&lines);
        for d in &summary.devices {
            eprintln!("{}", lines.image_line(d));
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Backs up every disk on a thread of its own, with a bar on a terminal (unless `bar`
/// is false). Returns the first failure, with the path of the disk it happened on; once
/// `interrupted` is set, the archive is aborted.
fn write_disks<W: std::io::Write + Send + 'static>(
    writer: &Writer<W>,
    disks: &[Disk],
    devices: &[vma_writer::Device],
    bar: bool,
    interrupted: &AtomicBool,
) -> Option<(PathBuf, vma_writer::Error)> {
    let total: u64 = disks.iter().map(|d| d.size).sum();
    let done: Vec<AtomicU64> = disks.iter().map(|_| AtomicU64::new(0)).collect();
    let mut progress = Progress::bar(bar, total, "create");
    let result = std::thread::scope(|scope| {
        // Each worker says when it is done, so that the wait ends at once rather than at
        // the next progress tick.
        let (finished_tx, finished) = mpsc::channel::<()>();
        let workers: Vec<_> = disks
            .iter()
            .zip(devices)
            .zip(&done)
            .map(|((disk, device), done)| {
                let handle = writer.handle();
                let finished_tx = finished_tx.clone();
                scope.spawn(move || {
                    let mut report = |n: u64| done.store(n, Ordering::Relaxed);
                    let outcome = match &disk.source {
                        Source::File(file) => handle
                            .write_file(*device, file, Some(&mut report))
                            .map(drop),
                        Source::Qemu(source) => {
                            qemu::write_source(&handle, *device, source, &mut report)
                        }
                    }
                    .map_err(|e| (disk.path.clone(), e));
                    if outcome.is_err() {
                        // The others stop at once; in canonical order they may be waiting
                        // for clusters of this disk that will never come.
                        handle.abort();
                    }
                    let _ = finished_tx.send(());
                    outcome
                })
            })
            .collect();
        drop(finished_tx);
        let mut running = workers.len();
        while running > 0 {
            if interrupted.load(Ordering::Relaxed) {
                writer.handle().abort();
            }
            progress.update(done.iter().map(|d| d.load(Ordering::Relaxed)).sum());
            match finished.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => running -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // A worker panicked: joining it reports that below.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut first_error = None;
        for w in workers {
            let outcome = w
                .join()
                .unwrap_or_else(|_| Err((PathBuf::new(), vma_writer::Error::SinkPanicked)));
            if let Err(e) = outcome {
                // Report what made a worker abort the archive, not the abort itself.
                let aborted = |e: &vma_writer::Error| matches!(e, vma_writer::Error::Aborted);
                let better = match &first_error {
                    None => true,
                    Some((_, f)) => aborted(f) && !aborted(&e.1),
                };
                if better {
                    first_error = Some(e);
                }
            }
        }
        first_error
    });
    progress.update(total);
    progress.finish();
    result
}

/// The error of a create that failed on a disk (`path`) or on the output (a write error
/// of the sink): a command the archive went into is stopped (unless it has ended) and,
/// when the output failed, how it ended is the message.
fn failure(
    target: &Target,
    command: Option<&mut output::Running>,
    path: Option<PathBuf>,
    e: vma_writer::Error,
) -> CliError {
    let output_failed = matches!(e, vma_writer::Error::Sink { .. });
    let mut err = CliError::from(e);
    let what = match path.filter(|p| !output_failed && !p.as_os_str().is_empty()) {
        Some(p) => p.display().to_string(),
        None => target.describe(),
    };
    err.message = format!("{what}: {}", err.message);
    if output_failed {
        return output::output_failure(target, command, err);
    }
    command.and_then(output::Running::stop);
    err
}

/// Stops the daemons that served images: one that died along the way fails the create
/// (what it served may be incomplete).
fn close_sources(disks: Vec<Disk>) -> Result<()> {
    for disk in disks {
        if let Source::Qemu(source) = disk.source {
            let source = *source;
            source.close().map_err(|e| {
                CliError::new(
                    crate::error::Exit::Io,
                    format!("{}: {e}", disk.path.display()),
                )
            })?;
        }
    }
    Ok(())
}

/// The name a config file is stored under: its base name, as the reference stores it.
fn config_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::parse_disk;

    #[test]
    fn disk_specs() {
        assert_eq!(
            parse_disk("format=raw:drive-scsi0=/a=b", 0, true).unwrap(),
            ("drive-scsi0".into(), "/a=b".into(), None)
        );
        assert_eq!(
            parse_disk("/x.raw", 3, false).unwrap(),
            ("disk3".into(), "/x.raw".into(), None)
        );
        assert_eq!(
            parse_disk("n=/x.raw", 3, false).unwrap(),
            ("n".into(), "/x.raw".into(), None)
        );
        assert!(parse_disk("/x.raw", 0, true)
            .unwrap_err()
            .message
            .contains("No format"));
        assert_eq!(
            parse_disk("format=qcow2:a=/x", 0, true).unwrap(),
            ("a".into(), "/x".into(), Some("qcow2".into()))
        );
        assert!(parse_disk("format=qcow3:a=/x", 0, true)
            .unwrap_err()
            .message
            .contains("unknown image format 'qcow3'"));
        assert!(parse_disk("format=raw", 0, true).is_err());
        assert!(parse_disk("format=raw:=/x", 0, true).is_err());
    }
}
