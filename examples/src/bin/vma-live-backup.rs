//! `vma-live-backup`: back a running QEMU VM up into a VMA archive.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use vma_live::{run_backup, BackupOptions, Error, ErrorKind};

const USAGE: &str = "\
usage: vma-live-backup --qmp SOCKET --output FILE.vma [--config NAME=FILE]...
                       [--drive NODE]... [--zstd] [--throttle MS] [--no-progress]
       vma-live-backup --demo
       vma-live-backup --measure [--size-mib N]

Backs up the disks of a running QEMU VM (stock QEMU, QMP on a unix socket)
into a VMA archive, through QEMU's backup job writing into an NBD server run
by this program. The VM keeps running; all disks are copied as of the same
instant.

  --qmp SOCKET        QEMU's QMP unix socket (-qmp unix:SOCKET,server=on,wait=off)
  --output FILE       the archive to create; never overwritten; it appears only
                      once complete
  --config NAME=FILE  embed FILE as config entry NAME (repeatable)
  --drive NODE        back up only this block node (repeatable; default: every
                      drive that query-block lists with a medium)
  --zstd              compress the archive with zstd (name it .vma.zst)
  --throttle MS       slow the backup: one 64 KiB copy at a time, MS ms each
  --no-progress       no progress bars (they show only on a terminal anyway)
  --demo              run a self-contained demonstration on a throwaway VM
  --measure           measure throughput against a plain raw-file backup and
                      the guest write latency added during a backup

Exit codes (0 to 5 mean what they mean for the vma command):
  0    done
  1    internal error (a bug: please report it); --demo or --measure failed
  2    usage: the command line or the options cannot work
  3    (not used: vma's code for an invalid or damaged archive)
  4    I/O error: a config file cannot be read; the archive already exists or
       cannot be created, written or finished (a full filesystem included)
  5    a drive asked for with --drive is not in the VM, or it has no drive
  6    QEMU or QMP failed: the QMP socket cannot be reached, QEMU refused a
       command or sent something that is not QMP, a backup job failed, QEMU
       went away
  130  interrupted (SIGINT or SIGTERM; a second one exits at once)
On failure the jobs are cancelled, the VM keeps running and no archive is
left under FILE.
";

enum Mode {
    Backup(Box<BackupOptions>),
    Demo,
    Measure { size_mib: u64 },
    Help,
}

fn parse(args: Vec<String>) -> Result<Mode, String> {
    let mut qmp = None;
    let mut output = None;
    let mut configs = Vec::new();
    let mut drives = Vec::new();
    let mut zstd = false;
    let mut throttle = None;
    let mut progress = true;
    let mut demo = false;
    let mut measure = false;
    let mut size_mib = 256;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--qmp" => qmp = Some(PathBuf::from(value("--qmp")?)),
            "--output" | "-o" => output = Some(PathBuf::from(value("--output")?)),
            "--config" => {
                let v = value("--config")?;
                let (name, file) = v
                    .split_once('=')
                    .filter(|(n, f)| !n.is_empty() && !f.is_empty())
                    .ok_or_else(|| format!("--config {v}: expected NAME=FILE"))?;
                configs.push((name.to_string(), PathBuf::from(file)));
            }
            "--drive" => drives.push(value("--drive")?),
            "--zstd" => zstd = true,
            "--throttle" => {
                let v = value("--throttle")?;
                let ms: u64 = v
                    .parse()
                    .map_err(|_| format!("--throttle {v}: expected milliseconds"))?;
                throttle = Some(Duration::from_millis(ms));
            }
            "--no-progress" => progress = false,
            "--demo" => demo = true,
            "--measure" => measure = true,
            "--size-mib" => {
                let v = value("--size-mib")?;
                size_mib = v
                    .parse()
                    .ok()
                    .filter(|&n| (16..=65536).contains(&n))
                    .ok_or_else(|| format!("--size-mib {v}: expected 16..=65536"))?;
            }
            "--help" | "-h" => return Ok(Mode::Help),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if demo {
        return Ok(Mode::Demo);
    }
    if measure {
        return Ok(Mode::Measure { size_mib });
    }
    let qmp = qmp.ok_or("--qmp is required")?;
    let output = output.ok_or("--output is required")?;
    let mut opts = BackupOptions::new(qmp, output);
    if let Some(ms) = throttle {
        opts = opts.throttle(ms);
    }
    opts.configs = configs;
    opts.drives = drives;
    opts.zstd = zstd;
    opts.progress = progress;
    Ok(Mode::Backup(Box::new(opts)))
}

fn main() -> ExitCode {
    let mode = match parse(std::env::args().skip(1).collect()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("vma-live-backup: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // SIGINT/SIGTERM set `cancel`: the backup cancels its jobs, removes its
    // target nodes and temporary file, and exits 130. A second signal while
    // that runs exits at once (a `.partial` file may then be left, never an
    // archive under its final name).
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let registered =
            signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&cancel))
                .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&cancel)));
        if let Err(e) = registered {
            eprintln!("vma-live-backup: cannot handle signal {sig}: {e}");
            return ExitCode::FAILURE;
        }
    }
    match mode {
        Mode::Help => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Mode::Demo => match vma_examples::demo::run_demo(cancel) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vma-live-backup --demo: {e}");
                ExitCode::FAILURE
            }
        },
        Mode::Measure { size_mib } => match vma_examples::measure::run(size_mib, cancel) {
            Ok(m) => {
                println!("{m}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vma-live-backup --measure: {e}");
                ExitCode::FAILURE
            }
        },
        Mode::Backup(mut opts) => {
            opts.cancel = cancel;
            match run_backup(&opts) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    report_failure(&e, &opts);
                    ExitCode::from(exit_code(e.kind()))
                }
            }
        }
    }
}

/// Prints `e`; once the backup may have started, also what was left behind.
fn report_failure(e: &Error, opts: &BackupOptions) {
    let before_start = matches!(e.kind(), ErrorKind::Usage | ErrorKind::NotFound)
        || matches!(
            e,
            Error::Writer(vma_writer::Error::TargetExists { .. }) | Error::ReadConfig { .. }
        );
    if before_start {
        eprintln!("vma-live-backup: {e}");
    } else {
        eprintln!(
            "vma-live-backup: {e}\n\
             (the VM keeps running; no archive was written to {})",
            opts.output.display()
        );
    }
}

/// The exit code for a failed backup; the codes 0 to 5 mean what they mean for `vma`
/// (spec/CLI.md).
fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Usage => 2,
        ErrorKind::Io => 4,
        ErrorKind::NotFound => 5,
        ErrorKind::Qemu => 6,
        ErrorKind::Interrupted => 130,
        // Internal, and kinds a newer vma-live may add.
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_exit_code() {
        let table = [
            (ErrorKind::Usage, 2),
            (ErrorKind::Io, 4),
            (ErrorKind::NotFound, 5),
            (ErrorKind::Qemu, 6),
            (ErrorKind::Interrupted, 130),
            (ErrorKind::Internal, 1),
        ];
        for (kind, code) in table {
            assert_eq!(exit_code(kind), code, "{kind:?}");
        }
    }

    #[test]
    fn errors_map_to_vma_exit_codes() {
        use std::io;
        let os = io::Error::from_raw_os_error;
        let cases: Vec<(Error, u8)> = vec![
            (
                Error::ReadConfig {
                    name: "c".into(),
                    path: "/c".into(),
                    source: os(libc::ENOENT),
                },
                4,
            ),
            (Error::ReservedConfigName, 2),
            (
                Error::NoSuchDrive {
                    name: "d9".into(),
                    known: vec![],
                },
                5,
            ),
            (Error::DuplicateDrive { name: "d0".into() }, 2),
            (Error::NoDrives, 5),
            (
                Error::QmpConnect {
                    path: "/q".into(),
                    source: os(libc::ENOENT),
                },
                6,
            ),
            (
                Error::QmpSend {
                    command: "x".into(),
                    source: os(libc::EPIPE),
                },
                6,
            ),
            (Error::QmpClosed, 6),
            (Error::QmpNoGreeting, 6),
            (
                Error::QmpTimeout {
                    command: "x".into(),
                },
                6,
            ),
            (
                Error::QmpGreeting {
                    got: serde_json::Value::Null,
                },
                6,
            ),
            (Error::QmpNotJson { line: "x".into() }, 6),
            (
                Error::QmpReply {
                    reply: serde_json::Value::Null,
                },
                6,
            ),
            (
                Error::QmpCommand {
                    command: "x".into(),
                    class: "GenericError".into(),
                    desc: "no".into(),
                },
                6,
            ),
            (
                Error::QueryBlock {
                    reason: "expected a list",
                    reply: serde_json::Value::Null,
                },
                6,
            ),
            (
                Error::Unaligned {
                    device: 1,
                    offset: 1,
                    len: 1,
                },
                6,
            ),
            (Error::JobFailed { failures: vec![] }, 6),
            (Error::JobCancelled { job: "j".into() }, 6),
            (
                Error::CancelTimeout {
                    source: Box::new(Error::Interrupted),
                    secs: 60,
                },
                6,
            ),
            (
                Error::ArchiveFailed {
                    source: Box::new(Error::Writer(vma_writer::Error::Sink {
                        offset: 0,
                        source: std::sync::Arc::new(os(libc::ENOSPC)),
                    })),
                },
                4,
            ),
            (
                Error::Writer(vma_writer::Error::TargetExists { path: "/a".into() }),
                4,
            ),
            (Error::Writer(vma_writer::Error::EmptyArchive), 2),
            (Error::Writer(vma_writer::Error::SinkPanicked), 1),
            (
                Error::Compress {
                    path: "/a".into(),
                    op: "zstd finish",
                    source: os(libc::EIO),
                },
                4,
            ),
            (Error::NoDevice(1), 1),
            (Error::SocketDir(os(libc::EACCES)), 4),
            (Error::SocketPath("/s".into()), 2),
            (Error::Nbd(vma_nbd::Error::ThreadPanicked), 1),
            (Error::Interrupted, 130),
        ];
        for (e, code) in cases {
            assert_eq!(exit_code(e.kind()), code, "{e:?}");
        }
    }
}
