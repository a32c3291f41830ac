//! `vma-live-backup`: back a running QEMU VM up into a VMA archive.
//!
//! A thin command line around [`vma_live::run_backup`], plus the demonstration and
//! the measurement of the `examples` crate (`--demo`, `--measure`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use vma_live::{run_backup, BackupOptions, Error, ErrorKind, XPerf};

const USAGE: &str = "vma-live-backup --qmp SOCKET --output FILE [OPTIONS]
       vma-live-backup --demo
       vma-live-backup --measure [--size-mib N]
       vma-live-backup --measure-guest [--size-mib N] [--rounds N]";

const EXIT_CODES: &str = "\
Exit codes (0 to 5 mean what they mean for the vma command):
  0    done
  1    internal error (a bug: please report it); --demo, --measure or
       --measure-guest failed
  2    usage: the command line or the options cannot work
  3    (not used: vma's code for an invalid or damaged archive)
  4    I/O error: a config file cannot be read; the archive already exists or
       cannot be created, written or finished (a full filesystem included); the
       archive did not take a guest write's old data within --cbw-timeout
  5    a drive asked for with --drive is not in the VM, or it has no drive
  6    QEMU or QMP failed: the QMP socket cannot be reached, QEMU refused a
       command or sent something that is not QMP, a backup job failed, QEMU
       went away
  130  interrupted (SIGINT, SIGTERM or SIGHUP; a second one exits at once)
On failure the jobs are cancelled, the VM keeps running (its filesystems
thawed, with --guest-agent) and no archive is left under FILE (an s3://
upload is aborted).";

/// Back up a running QEMU VM into a VMA archive, live.
///
/// Backs up the disks of a running QEMU VM (stock QEMU, QMP on a unix socket) into a
/// VMA archive, through QEMU's backup job writing into an NBD server run by this
/// program. The VM keeps running; all disks are copied as of the same instant.
#[derive(Debug, Parser)]
#[command(name = "vma-live-backup", version, override_usage = USAGE, after_help = EXIT_CODES)]
struct Cli {
    /// QEMU's QMP unix socket (-qmp unix:SOCKET,server=on,wait=off)
    #[arg(long, value_name = "SOCKET", required_unless_present_any = ["demo", "measure", "measure_guest"])]
    qmp: Option<PathBuf>,
    /// The archive to create: a file, or s3://BUCKET/KEY (a multipart upload; endpoint,
    /// region and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... or the AWS
    /// config files); never overwritten; it appears only once complete
    #[arg(
        short,
        long,
        value_name = "FILE",
        required_unless_present_any = ["demo", "measure", "measure_guest"]
    )]
    output: Option<PathBuf>,
    /// Embed FILE as config entry NAME (repeatable)
    #[arg(long = "config", value_name = "NAME=FILE", value_parser = parse_config)]
    configs: Vec<(String, PathBuf)>,
    /// Back up only this block node (repeatable; default: every drive that query-block
    /// lists with a medium)
    #[arg(long = "drive", value_name = "NODE")]
    drives: Vec<String>,
    /// The guest agent's socket (-chardev socket,path=SOCKET,server=on,wait=off with a
    /// virtserialport named org.qemu.guest_agent.0): freeze the guest's filesystems
    /// right before the backup's instant and thaw them right after, as Proxmox does.
    /// A freeze taking over 10 s, an agent not answering in 5 s or any agent error:
    /// thawed, and the backup goes on crash-consistent, saying so. Without it the
    /// backup is crash-consistent
    #[arg(long, value_name = "SOCKET")]
    guest_agent: Option<PathBuf>,
    /// The Proxmox storage id the archive's derived qemu-server.conf restores every
    /// drive to, as raw (its #qmdump#map lines); no config is derived when --config
    /// gives a qemu-server.conf
    #[arg(long, value_name = "ID", default_value = "local")]
    pve_storage: String,
    /// Bound, in seconds, on how long a guest write waits for the archive to take the
    /// old data of the area it overwrites (copy-before-write): the guest's writes go
    /// through a copy-before-write filter of this program's (on-cbw-error=break-snapshot,
    /// cbw-timeout=SECS), so an archive writer that stalls longer makes the backup fail
    /// (exit 4) instead of stalling the guest. 0: QEMU's own filter, which waits as long
    /// as the archive takes. Needs every drive attached to a guest device
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = vma_live::DEFAULT_CBW_TIMEOUT,
        value_parser = clap::value_parser!(u32).range(0..=3600)
    )]
    cbw_timeout: u32,
    /// MiB of memory that acknowledge the guest's copy-before-write pushes before the
    /// archive writer takes them (the writer stores them behind the background copy; when
    /// the buffer is full a guest write waits, as with 0). 0: every push waits for the
    /// archive writer. Only with our filter (--cbw-timeout above 0)
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = (vma_live::DEFAULT_CBW_BUFFER >> 20) as u32,
        value_parser = clap::value_parser!(u32).range(0..=65536)
    )]
    cbw_buffer: u32,
    /// Store at most KIB KiB of data per second into the archive (as vzdump's --bwlimit);
    /// guest writes to areas not yet copied then wait for the archive once the
    /// --cbw-buffer is full. 0: no limit
    #[arg(long, value_name = "KIB", default_value_t = 0)]
    bwlimit: u64,
    /// QEMU's x-perf for the background copy: at most WORKERS parallel requests of at
    /// most CHUNK_KIB KiB each, or `qemu` for QEMU's own (64 requests). Fewer requests
    /// queue less ahead of the guest's writes
    #[arg(long, value_name = "WORKERS,CHUNK_KIB", default_value = "4,1024", value_parser = parse_x_perf)]
    x_perf: XPerfArg,
    /// Run the backup at this nice value (0 to 19; 0 keeps the priority it was started
    /// with): below the guest, so that on contended cores QEMU's vCPUs and the guest's
    /// copy-before-write pushes run first (which may cost the backup speed when the
    /// cores are contended). Never raises the priority
    #[arg(
        long,
        value_name = "N",
        default_value_t = vma_live::DEFAULT_NICE,
        value_parser = clap::value_parser!(i32).range(0..=19)
    )]
    nice: i32,
    /// Compress the archive into seekable zstd, on half the cores (name it .vma.zst)
    #[arg(long)]
    zstd: bool,
    /// Slow the backup: one 64 KiB copy at a time, MS milliseconds each
    #[arg(long, value_name = "MS")]
    throttle: Option<u64>,
    /// No progress bars (they show only on a terminal anyway)
    #[arg(long)]
    no_progress: bool,
    /// Run a self-contained demonstration on a throwaway VM
    #[arg(long)]
    demo: bool,
    /// Measure throughput against a plain raw-file backup and the guest write latency
    /// added during a backup
    #[arg(long)]
    measure: bool,
    /// Measure a real guest's write latency (from inside it) without a backup, during
    /// QEMU's blockdev-backup to a raw file and during this program's backup
    #[arg(long)]
    measure_guest: bool,
    /// The disk size of --measure and --measure-guest, in MiB
    #[arg(
        long,
        value_name = "N",
        default_value_t = 256,
        value_parser = clap::value_parser!(u64).range(16..=65536)
    )]
    size_mib: u64,
    /// --measure-guest: backups per setting (their writes are pooled)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=20)
    )]
    rounds: u32,
}

/// `--x-perf`: `qemu`, or `WORKERS,CHUNK_KIB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct XPerfArg(Option<XPerf>);

fn parse_x_perf(v: &str) -> Result<XPerfArg, String> {
    if v == "qemu" {
        return Ok(XPerfArg(None));
    }
    let bad = || format!("expected `qemu` or WORKERS,CHUNK_KIB (e.g. 4,1024), not {v:?}");
    let (w, k) = v.split_once(',').ok_or_else(bad)?;
    let max_workers: u32 = w.parse().map_err(|_| bad())?;
    let kib: u64 = k.parse().map_err(|_| bad())?;
    if !(1..=256).contains(&max_workers) || !(64..=65536).contains(&kib) || !kib.is_multiple_of(64)
    {
        return Err(format!(
            "{v:?}: WORKERS must be 1 to 256, CHUNK_KIB a multiple of 64 from 64 to 65536"
        ));
    }
    Ok(XPerfArg(Some(XPerf {
        max_workers,
        max_chunk: kib << 10,
    })))
}

/// `NAME=FILE`, both non-empty.
fn parse_config(v: &str) -> Result<(String, PathBuf), String> {
    v.split_once('=')
        .filter(|(n, f)| !n.is_empty() && !f.is_empty())
        .map(|(n, f)| (n.to_string(), PathBuf::from(f)))
        .ok_or_else(|| "expected NAME=FILE".to_string())
}

/// What the command line asks for.
#[derive(Debug)]
enum Mode {
    Backup(Box<BackupOptions>, i32),
    Demo,
    Measure { size_mib: u64 },
    MeasureGuest { size_mib: u64, rounds: u32 },
}

impl Cli {
    fn mode(self) -> Mode {
        if self.demo {
            return Mode::Demo;
        }
        if self.measure_guest {
            return Mode::MeasureGuest {
                size_mib: self.size_mib,
                rounds: self.rounds,
            };
        }
        if self.measure {
            return Mode::Measure {
                size_mib: self.size_mib,
            };
        }
        // clap requires both unless --demo or --measure is given.
        let (Some(qmp), Some(output)) = (self.qmp, self.output) else {
            unreachable!("clap checks --qmp and --output")
        };
        let mut opts = BackupOptions::new(qmp, output);
        opts.x_perf = self.x_perf.0;
        if let Some(ms) = self.throttle {
            opts = opts.throttle(Duration::from_millis(ms));
        }
        opts.configs = self.configs;
        opts.drives = self.drives;
        opts.zstd = self.zstd;
        opts.progress = !self.no_progress;
        opts.guest_agent = self.guest_agent;
        opts.pve_storage = self.pve_storage;
        opts.cbw_timeout = (self.cbw_timeout > 0).then_some(self.cbw_timeout);
        opts.cbw_buffer = (self.cbw_buffer as usize) << 20;
        opts.bwlimit = (self.bwlimit > 0).then(|| self.bwlimit.saturating_mul(1024));
        Mode::Backup(Box::new(opts), self.nice)
    }
}

/// SIGINT, SIGTERM and SIGHUP set the returned flag: the backup cancels its jobs,
/// removes its target nodes and temporary file, and exits 130. A second signal while
/// that runs exits at once (a `.partial` file may then be left, never an archive under
/// its final name), but not while the guest's filesystems are frozen or the VM is paused
/// for the filters' insertion: it waits for the thaw (bounded, see vma_live::agent) and
/// the resume, so no signal leaves a guest frozen or paused.
fn cancel_on_signals() -> Result<Arc<AtomicBool>, ctrlc::Error> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&cancel);
    // ctrlc runs this on a thread of its own, not in the signal handler.
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            while vma_live::agent::freezes_held() > 0 || vma_live::pauses_held() > 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
            std::process::exit(130);
        }
    })?;
    Ok(cancel)
}

fn main() -> ExitCode {
    let mode = Cli::parse().mode();
    // Before any thread starts, so that every one of the backup's inherits it. (The demo
    // and the measurements start QEMU, which must not inherit it; the measurements set it
    // per backup.)
    if let Mode::Backup(_, nice) = &mode {
        if let Err(e) = vma_live::lower_priority(*nice) {
            eprintln!("vma-live-backup: cannot lower the priority to nice {nice}: {e}");
        }
    }
    let cancel = match cancel_on_signals() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vma-live-backup: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    match mode {
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
        Mode::MeasureGuest { size_mib, rounds } => {
            match vma_examples::guest_latency::run(size_mib, rounds, cancel) {
                Ok(m) => {
                    println!("{m}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vma-live-backup --measure-guest: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Mode::Backup(mut opts, _) => {
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

    fn mode(args: &[&str]) -> Result<Mode, clap::Error> {
        let argv = std::iter::once("vma-live-backup").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(Cli::mode)
    }

    fn backup(args: &[&str]) -> BackupOptions {
        match mode(args) {
            Ok(Mode::Backup(opts, _)) => *opts,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn the_backup_runs_at_nice_10_unless_told() {
        let nice = |extra: &[&str]| {
            let args = [&["--qmp", "/q", "-o", "/o"][..], extra].concat();
            match mode(&args) {
                Ok(Mode::Backup(_, nice)) => Ok(nice),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.kind()),
            }
        };
        assert_eq!(nice(&[]), Ok(vma_live::DEFAULT_NICE));
        assert_eq!(nice(&["--nice", "0"]), Ok(0));
        assert_eq!(nice(&["--nice", "19"]), Ok(19));
        for bad in ["20", "-1", "x"] {
            assert!(nice(&["--nice", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn backup_arguments() {
        let o = backup(&["--qmp", "/run/q", "--output", "/b/vm.vma"]);
        assert_eq!(o.qmp_socket, PathBuf::from("/run/q"));
        assert_eq!(o.output, PathBuf::from("/b/vm.vma"));
        assert!(o.configs.is_empty() && o.drives.is_empty());
        assert!(!o.zstd && o.progress);
        assert!(o.write_delay.is_none());
        assert_eq!(o.x_perf, Some(vma_live::DEFAULT_X_PERF));
        assert!(o.guest_agent.is_none());
        assert_eq!(o.pve_storage, "local");
        assert_eq!(o.cbw_timeout, Some(vma_live::DEFAULT_CBW_TIMEOUT));
        let o = backup(&["--qmp", "/q", "-o", "/o", "--cbw-timeout", "0"]);
        assert_eq!(o.cbw_timeout, None);
        let o = backup(&["--qmp", "/q", "-o", "/o", "--cbw-timeout=2"]);
        assert_eq!(o.cbw_timeout, Some(2));
        assert_eq!(o.cbw_buffer, vma_live::DEFAULT_CBW_BUFFER);
        let o = backup(&["--qmp", "/q", "-o", "/o", "--cbw-buffer", "0"]);
        assert_eq!(o.cbw_buffer, 0);
        let o = backup(&["--qmp", "/q", "-o", "/o", "--cbw-buffer=256"]);
        assert_eq!(o.cbw_buffer, 256 << 20);
        assert_eq!(o.bwlimit, None);
        let o = backup(&["--qmp", "/q", "-o", "/o", "--bwlimit", "51200"]);
        assert_eq!(o.bwlimit, Some(50 << 20));
        let o = backup(&["--qmp", "/q", "-o", "/o", "--x-perf", "qemu"]);
        assert_eq!(o.x_perf, None);
        let o = backup(&["--qmp", "/q", "-o", "/o", "--x-perf=2,256"]);
        assert_eq!(
            o.x_perf,
            Some(XPerf {
                max_workers: 2,
                max_chunk: 256 << 10
            })
        );

        let o = backup(&[
            "--qmp=/run/q",
            "-o",
            "/b/vm.vma.zst",
            "--config",
            "qemu-server.conf=/etc/100.conf",
            "--config=qemu-server.fw=a=b",
            "--drive",
            "d1",
            "--drive=d0",
            "--zstd",
            "--throttle",
            "3",
            "--no-progress",
            "--guest-agent",
            "/run/qga.sock",
            "--pve-storage",
            "local-lvm",
        ]);
        assert_eq!(
            o.configs,
            [
                ("qemu-server.conf".into(), PathBuf::from("/etc/100.conf")),
                ("qemu-server.fw".into(), PathBuf::from("a=b")),
            ]
        );
        assert_eq!(o.drives, ["d1", "d0"]);
        assert!(o.zstd && !o.progress);
        assert_eq!(o.write_delay, Some(Duration::from_millis(3)));
        assert_eq!(o.x_perf.map(|x| x.max_workers), Some(1));
        assert_eq!(o.guest_agent, Some(PathBuf::from("/run/qga.sock")));
        assert_eq!(o.pve_storage, "local-lvm");
    }

    #[test]
    fn demo_and_measure() {
        assert!(matches!(mode(&["--demo"]), Ok(Mode::Demo)));
        // --demo wins, and needs neither --qmp nor --output.
        assert!(matches!(mode(&["--demo", "--measure"]), Ok(Mode::Demo)));
        assert!(matches!(
            mode(&["--measure"]),
            Ok(Mode::Measure { size_mib: 256 })
        ));
        assert!(matches!(
            mode(&["--measure", "--size-mib", "16"]),
            Ok(Mode::Measure { size_mib: 16 })
        ));
        assert!(matches!(
            mode(&["--measure-guest", "--size-mib", "64"]),
            Ok(Mode::MeasureGuest {
                size_mib: 64,
                rounds: 1
            })
        ));
        assert!(matches!(
            mode(&["--measure-guest", "--rounds", "3"]),
            Ok(Mode::MeasureGuest {
                size_mib: 256,
                rounds: 3
            })
        ));
    }

    #[test]
    fn usage_errors_exit_2() {
        use clap::error::ErrorKind as K;
        // Each option with the bad values it refuses, after a backup's required options.
        let bad_values = [
            ("--config", &["noequals", "=f", "n="][..]),
            ("--throttle", &["soon"]),
            ("--cbw-timeout", &["-1", "3601"]),
            ("--cbw-buffer", &["-1", "65537"]),
            ("--bwlimit", &["-5"]),
            ("--x-perf", &["4", "0,1024", "4,100", "4,x"]),
        ];
        let bad_backup_options: Vec<Vec<&str>> = bad_values
            .iter()
            .flat_map(|&(option, values)| {
                values
                    .iter()
                    .map(move |&value| vec!["--qmp", "/q", "-o", "/o", option, value])
            })
            .collect();
        let others = [
            &["--bogus"][..],
            &["--qmp", "/q"],
            &["--output", "/o"],
            &["--measure", "--size-mib", "15"],
            &["--measure", "--size-mib", "65537"],
            &["--measure-guest", "--rounds", "0"],
            &["--measure-guest", "--rounds", "21"],
            &["--qmp"],
        ];
        for args in others
            .into_iter()
            .chain(bad_backup_options.iter().map(Vec::as_slice))
        {
            let e = mode(args).unwrap_err();
            assert_ne!(e.kind(), K::DisplayHelp, "{args:?}");
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
        let help = mode(&["--help"]).unwrap_err();
        assert_eq!((help.kind(), help.exit_code()), (K::DisplayHelp, 0));
        let text = help.to_string();
        for code in ["0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "6 ", "130 "] {
            assert!(text.contains(&format!("\n  {code}")), "{code}: {text}");
        }
    }

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

    /// vma-live checks every variant's kind; these are the errors whose code a user
    /// meets most, and the ones whose kind comes from a wrapped error.
    #[test]
    fn errors_map_to_vma_exit_codes() {
        use std::io;
        use std::sync::Arc;
        let os = io::Error::from_raw_os_error;
        let full = || {
            Error::Writer(vma_writer::Error::Sink {
                offset: 0,
                source: Arc::new(os(libc::ENOSPC)),
            })
        };
        let cases: Vec<(Error, u8)> = vec![
            (Error::DuplicateDrive { name: "d0".into() }, 2),
            (Error::Writer(vma_writer::Error::ReservedName), 2),
            (
                Error::Writer(vma_writer::Error::TargetExists { path: "/a".into() }),
                4,
            ),
            (full(), 4),
            (
                Error::ArchiveFailed {
                    source: Box::new(full()),
                },
                4,
            ),
            (
                Error::Nbd(vma_nbd::Error::Bind {
                    addr: "/s".into(),
                    source: os(libc::EACCES),
                }),
                4,
            ),
            (
                Error::NoSuchDrive {
                    name: "d9".into(),
                    known: vec![],
                },
                5,
            ),
            (Error::NoDrives, 5),
            (Error::QmpClosed, 6),
            (Error::JobFailed { failures: vec![] }, 6),
            (
                Error::ArchiveFailed {
                    source: Box::new(Error::Unaligned {
                        device: 1,
                        offset: 1,
                        len: 1,
                    }),
                },
                6,
            ),
            (Error::Interrupted, 130),
            (Error::Nbd(vma_nbd::Error::ThreadPanicked), 1),
            (Error::Writer(vma_writer::Error::SinkPanicked), 1),
        ];
        for (e, code) in cases {
            assert_eq!(exit_code(e.kind()), code, "{e:?}");
        }
    }
}
