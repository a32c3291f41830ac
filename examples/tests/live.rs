//! Live backups of a real QEMU (qemu-system-x86_64, TCG): a VM without guest OS, and a
//! real Linux guest (scripts/build-guest) writing while it is backed up, faults included.
//!
//! These tests never skip: without QEMU they fail, saying how to install it
//! (scripts/install-deps). Every VM is killed when its fixture drops.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vma_examples::fixture::{check_archive, job_offset, wait_for_jobs, Fixture, GuestWrite};
use vma_examples::guest::{self, BootOptions, Guest};
use vma_examples::guest_backup::{self, Outcome, Plan};
use vma_examples::guest_latency;
use vma_live::agent::{self, GuestAgent};
use vma_live::{run_backup, BackupOptions, Consistency, Error, ErrorKind, Qmp, XPerf};
use vma_testkit::dir_entries;
use vma_testkit::s3::S3Server;

/// Fixture layout scale (MiB): a 16 MiB qcow2 and a 10 MiB + 12345 raw.
const SCALE: u64 = 16;
/// Per-write delay of throttled backups.
const DELAY: Duration = Duration::from_millis(4);

fn fixture() -> Fixture {
    Fixture::with_size(SCALE).unwrap_or_else(|e| panic!("cannot start the test VM: {e}"))
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vma-live-backup")
}

/// The VM answers, runs no job, and holds none of our nodes (NBD targets, filters) and no
/// copy-before-write filter or NBD client node of any name.
fn assert_vm_clean(qmp: &mut Qmp) {
    let status = qmp.execute("query-status", Value::Null).unwrap();
    assert!(status.get("status").is_some(), "{status}");
    let jobs = qmp.execute("query-block-jobs", Value::Null).unwrap();
    assert_eq!(jobs, json!([]), "jobs left behind");
    let nodes = qmp.execute("query-named-block-nodes", Value::Null).unwrap();
    let left: Vec<(&str, &str)> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let name = n.get("node-name").and_then(Value::as_str).unwrap_or("");
            (name, n.get("drv").and_then(Value::as_str).unwrap_or(""))
        })
        .filter(|(name, drv)| {
            name.starts_with("vmalb") || matches!(*drv, "copy-before-write" | "nbd")
        })
        .collect();
    assert!(left.is_empty(), "nodes left behind: {left:?}");
}

fn run_bin(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Starts the binary backing up the VM of QMP socket `qmp` into `archive`, throttled to
/// 4 MiB/s so that its jobs are still running when the test acts, with `extra` arguments;
/// stderr piped.
fn start_throttled(qmp: &Path, archive: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(bin())
        .args(["--qmp", qmp.to_str().unwrap(), "--throttle", "4"])
        .args(extra)
        .arg("--output")
        .arg(archive)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
#[ignore = "boots QEMU (qemu-system-x86); scripts/test runs it with --include-ignored"]
fn archive_holds_disks_as_of_backup_start_despite_guest_writes() {
    let mut fx = fixture();
    let out_dir = fx.out_dir().unwrap();
    let archive = out_dir.join("vm.vma");
    let conf = fx.dir().join("100.conf");
    std::fs::write(&conf, b"memory: 128\nvirtio0: local:vm-100-disk-0\n").unwrap();

    let mut ctl = fx.vm.control().unwrap();
    let mut opts = BackupOptions::new(&fx.vm.qmp_path, &archive).throttle(DELAY);
    opts.configs.push(("qemu-server.conf".into(), conf));
    let backup = thread::spawn(move || run_backup(&opts));
    wait_for_jobs(&mut ctl, 2, Duration::from_secs(30)).unwrap();
    let writes = fx.late_writes();
    for w in &writes {
        fx.guest_write(&mut ctl, *w).unwrap();
        // The write returned, so its old data was pushed first; the job
        // itself had not reached the area.
        let done = job_offset(&mut ctl, w.disk).unwrap();
        assert!(
            done < w.offset,
            "job {} had copied {done} bytes, past the write at {}",
            w.disk,
            w.offset
        );
    }
    let report = backup.join().unwrap().unwrap();
    assert_eq!(report.drives.len(), 2);
    for (d, before) in report.drives.iter().zip(&fx.before) {
        assert_eq!(d.drive.size, before.len() as u64);
        // Every byte arrives at least once; with the copy-before-write filter (the
        // default) a pushed cluster arrives again from the copy, and is stored once.
        assert!(d.data_bytes + d.zero_request_bytes >= d.drive.size, "{d:?}");
    }
    assert_eq!(report.drives[1].drive.size % 65536, 12800);
    assert_eq!(report.drives[0].drive.device_name, "drive-vd0");
    // The pushes ahead of the sequential copy.
    assert!(report.drives[0].non_sequential >= 2, "{report:?}");
    assert_eq!(dir_entries(&out_dir), ["vm.vma"]);

    let into = fx.dir().join("extracted");
    std::fs::create_dir(&into).unwrap();
    let check = check_archive(&archive, false, &into).unwrap();
    assert!(check.sealed);
    assert_eq!(check.devices.len(), 2);
    for (i, dev) in check.devices.iter().enumerate() {
        assert_eq!(dev.name, format!("drive-vd{i}"));
        assert!(
            dev.data == fx.before[i],
            "device {i}: the archive differs from the disk at backup start"
        );
    }
    assert_eq!(
        check.configs,
        ["qemu-server.conf", "vma-live-backup.json"],
        "{check:?}"
    );
    assert_eq!(
        check.drives_config["qemu"]["version"]
            .as_str()
            .map(|v| v.starts_with(char::is_numeric)),
        Some(true)
    );
    assert_eq!(check.drives_config["drives"][1]["node-name"], "d1");
    assert_eq!(check.drives_config["drives"][1]["size"], fx.before[1].len());

    assert_vm_clean(&mut ctl);
    let after = fx.after(&writes);
    let now = fx.quit_and_read(&mut ctl).unwrap();
    for i in 0..2 {
        assert!(now[i] == after[i], "disk {i} lacks the guest's writes");
        assert!(now[i] != fx.before[i]);
    }
}

#[test]
#[ignore = "boots QEMU (qemu-system-x86); scripts/test runs it with --include-ignored"]
fn a_write_to_an_area_already_copied_is_not_pushed() {
    const KIB: u64 = 1024;
    let mut fx = fixture();
    let out_dir = fx.out_dir().unwrap();
    let archive = out_dir.join("vm.vma");
    let mut ctl = fx.vm.control().unwrap();
    let mut opts = BackupOptions::new(&fx.vm.qmp_path, &archive).throttle(DELAY);
    // One 64 KiB copy at a time, in order; pushes counted by their own export.
    opts.x_perf = Some(XPerf {
        max_workers: 1,
        max_chunk: 64 * KIB,
    });
    opts.cbw_buffer = 1 << 20;
    let backup = thread::spawn(move || run_backup(&opts));
    wait_for_jobs(&mut ctl, 2, Duration::from_secs(30)).unwrap();
    // Past 1 MiB, the copy of disk 0 has copied (and discarded from the snapshot)
    // its first cluster.
    let deadline = Instant::now() + Duration::from_secs(30);
    while job_offset(&mut ctl, 0).unwrap() < 1024 * KIB {
        assert!(Instant::now() < deadline, "the copy did not get past 1 MiB");
        thread::sleep(Duration::from_millis(5));
    }
    let copied = GuestWrite {
        disk: 0,
        pattern: 0x5a,
        offset: 4 * KIB,
        len: 4 * KIB,
    };
    // 64 KiB at 11 MiB: one cluster ahead of the copy.
    let ahead = fx.late_writes()[1];
    assert_eq!((ahead.disk, ahead.len), (0, 64 * KIB));
    for w in [copied, ahead] {
        fx.guest_write(&mut ctl, w).unwrap();
    }
    let done = job_offset(&mut ctl, 0).unwrap();
    assert!(
        done < ahead.offset,
        "the copy got to {done}, past the write ahead of it"
    );
    let report = backup.join().unwrap().unwrap();
    // The write ahead of the copy was pushed, the one behind it not (a snapshot-access
    // node without `discard: unmap` ignores discard-source's discards: every first
    // write was pushed).
    assert_eq!(report.drives[0].pushes, Some(1), "{report:?}");
    assert_eq!(report.drives[1].pushes, Some(0), "{report:?}");
    let into = fx.dir().join("extracted");
    std::fs::create_dir(&into).unwrap();
    let check = check_archive(&archive, false, &into).unwrap();
    for (i, dev) in check.devices.iter().enumerate() {
        assert!(
            dev.data == fx.before[i],
            "device {i}: not the disk at backup start"
        );
    }
    assert_vm_clean(&mut ctl);
    let after = fx.after(&[copied, ahead]);
    let now = fx.quit_and_read(&mut ctl).unwrap();
    assert!(now == after, "the disks lack the guest's writes");
}

#[test]
#[ignore = "boots a Linux guest under QEMU (qemu-system-x86); scripts/test runs it with --include-ignored"]
fn the_latency_split_finds_no_write_ahead_of_the_copy_that_was_not_pushed() {
    // The bench's split (guest_latency::Split::classify) against what QEMU did: a
    // write it finds ahead of the copy must have made the filter push its cluster,
    // and there are no more pushes than clusters the guest wrote from the copy's
    // instant on. 256 MiB at 100 MiB/s: a copy of about 2.5 s, a write every 2 ms.
    let c = guest_latency::check_split(256, 100 << 20).unwrap();
    eprintln!("{c:?}");
    assert!(
        c.ahead >= 100,
        "too few writes ahead of the copy to tell: {c:?}"
    );
    assert!(c.ahead <= c.pushes, "{c:?}");
    assert!(c.pushes <= c.clusters_written, "{c:?}");
}

#[test]
#[ignore = "boots QEMU (qemu-system-x86); scripts/test runs it with --include-ignored"]
fn binary_zstd_selected_drive_with_config() {
    let fx = fixture();
    let archive = fx.dir().join("vm.vma.zst");
    let conf = fx.dir().join("fw");
    std::fs::write(&conf, b"[OPTIONS]\nenable: 1\n").unwrap();
    let qmp = fx.vm.qmp_path.to_str().unwrap();
    let out = run_bin(&[
        "--qmp",
        qmp,
        "--output",
        archive.to_str().unwrap(),
        "--zstd",
        "--drive",
        "d1",
        "--config",
        &format!("qemu-server.fw={}", conf.display()),
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("drive-vd1") && !stdout.contains("drive-vd0"),
        "{stdout}"
    );
    assert!(stdout.contains("MiB/s"), "{stdout}");
    // zstd frame magic.
    assert_eq!(
        &std::fs::read(&archive).unwrap()[..4],
        &[0x28, 0xb5, 0x2f, 0xfd]
    );
    // Seekable: opened in place, as `vma create X.vma.zst` writes it, and stock zstd
    // reads it as one stream.
    let seekable = vma_reader::SeekableArchive::open(&archive).unwrap();
    assert!(
        matches!(seekable.packing(), vma_reader::Packing::SeekableZstd { .. }),
        "{:?}",
        seekable.packing()
    );
    let mut served = Vec::new();
    std::io::Read::read_to_end(&mut seekable.device("drive-vd1").unwrap(), &mut served).unwrap();
    assert!(
        served == fx.before[1],
        "the seekable reader reads the drive as it was"
    );
    let t = Command::new("zstd")
        .arg("-q")
        .arg("-t")
        .arg(&archive)
        .status()
        .unwrap();
    assert!(t.success(), "zstd -t");

    let into = fx.dir().join("x");
    std::fs::create_dir(&into).unwrap();
    let check = check_archive(&archive, true, &into).unwrap();
    assert_eq!(check.devices.len(), 1);
    assert!(check.devices[0].data == fx.before[1]);
    // A qemu-server.conf derived from the VM, for Proxmox's restore.
    assert_eq!(
        check.configs,
        ["qemu-server.fw", "qemu-server.conf", "vma-live-backup.json"]
    );

    // The archive is never overwritten: an I/O error, 4 as for vma.
    let again = run_bin(&["--qmp", qmp, "--output", archive.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(4), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let unknown = run_bin(&[
        "--qmp",
        qmp,
        "--output",
        "/nonexistent/x.vma",
        "--drive",
        "nope",
    ]);
    // A drive that is not there: 5, as vma's device not in the archive.
    assert_eq!(unknown.status.code(), Some(5), "{unknown:?}");
    assert_eq!(run_bin(&["--bogus"]).status.code(), Some(2));
}

/// The archive at `s3://BUCKET/KEY` of `server`, opened in place (ranged GETs).
fn open_in_bucket(server: &S3Server, url: &str) -> vma_reader::SeekableArchive {
    let env = server.env();
    let config =
        vma_s3::Config::from_vars(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
            .unwrap();
    let object = config.open(&vma_s3::Location::parse(url).unwrap()).unwrap();
    vma_reader::SeekableArchive::from_read_at(std::sync::Arc::new(object)).unwrap()
}

#[test]
#[ignore = "boots QEMU (qemu-system-x86); scripts/test runs it with --include-ignored"]
fn backups_into_a_bucket_read_in_place_and_faults_leave_no_object() {
    let fx = fixture();
    let mut server = S3Server::start();
    server.create_bucket("live");
    let qmp = fx.vm.qmp_path.to_str().unwrap();
    let backup = |url: &str, extra: &[&str]| {
        let mut c = Command::new(bin());
        c.envs(server.env())
            .args(["--qmp", qmp, "--output", url])
            .args(extra)
            .stdin(Stdio::null());
        c
    };
    for (url, extra) in [
        ("s3://live/vm.vma", &[][..]),
        ("s3://live/vm.vma.zst", &["--zstd"][..]),
    ] {
        let out = backup(url, extra).output().unwrap();
        assert!(out.status.success(), "{url}: {out:?}");
        let archive = open_in_bucket(&server, url);
        assert!(matches!(
            archive.integrity().seal,
            vma_reader::SealStatus::Sealed
        ));
        for (i, before) in fx.before.iter().enumerate() {
            let mut served = Vec::new();
            std::io::Read::read_to_end(
                &mut archive.device(format!("drive-vd{i}").as_str()).unwrap(),
                &mut served,
            )
            .unwrap();
            assert!(served == *before, "{url}: drive {i} differs from the disk");
        }
        // Never replaced: an I/O error, 4.
        let again = backup(url, extra).output().unwrap();
        assert_eq!(again.status.code(), Some(4), "{again:?}");
        assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    }
    let kept = |server: &S3Server| {
        server
            .objects("live")
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>()
    };
    assert_eq!(kept(&server), ["vm.vma", "vm.vma.zst"]);

    // Ctrl-C mid-backup: the upload is aborted, the VM left clean.
    let mut ctl = fx.vm.control().unwrap();
    let child = backup("s3://live/int.vma", &["--throttle", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_jobs(&mut ctl, 2, Duration::from_secs(30)).unwrap();
    signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    assert_eq!(kept(&server), ["vm.vma", "vm.vma.zst"]);
    assert_eq!(server.multipart_uploads("live"), Vec::<String>::new());
    assert_vm_clean(&mut ctl);

    // The bucket gone mid-backup: an I/O error, the jobs cancelled, the VM left clean.
    let child = backup("s3://live/gone.vma", &["--throttle", "4"])
        .env("AWS_MAX_ATTEMPTS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_jobs(&mut ctl, 2, Duration::from_secs(30)).unwrap();
    server.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("s3://live/gone.vma"),
        "{out:?}"
    );
    assert_vm_clean(&mut ctl);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting a tmpfs needs root (tests run as root)"
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The copy-before-write bound (`--cbw-timeout`) the tests that stall the archive writer
/// set, and the slack a guest write may take beyond it (TCG on a loaded host).
const CBW_BOUND: Duration = Duration::from_secs(1);
const WRITE_SLACK: Duration = Duration::from_secs(2);

/// Asserts that the backup left nothing in `dir`.
fn assert_nothing_left(dir: &Path) {
    let left = dir_entries(dir);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Asserts that a backup whose archive writer stalled past [`CBW_BOUND`] failed (exit 4,
/// naming `--cbw-timeout`) and left nothing in `out_dir`; returns its stderr.
fn assert_failed_at_the_bound(out: &Output, out_dir: &Path) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("--cbw-timeout"), "{stderr}");
    assert_nothing_left(out_dir);
    stderr
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let st = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{signal} {pid}");
}

/// The nice value of every thread of process `pid` (field 19 of /proc/PID/task/TID/stat).
fn thread_nices(pid: u32) -> Vec<i64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap();
            // After the command name in parentheses, fields 3 onwards.
            let after = &stat[stat.rfind(')').unwrap() + 1..];
            after
                .split_whitespace()
                .nth(19 - 3)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

#[test]
#[ignore = "boots QEMU (qemu-system-x86); scripts/test runs it with --include-ignored"]
fn stalled_archive_writer_fails_the_backup_not_the_guest() {
    // How long the archive writer stays stopped.
    const STALL: Duration = Duration::from_secs(6);
    let mut fx = fixture();
    let out_dir = fx.out_dir().unwrap();
    let archive = out_dir.join("vm.vma");
    let mut ctl = fx.vm.control().unwrap();
    let status =
        |ctl: &mut Qmp| ctl.execute("query-status", Value::Null).unwrap()["status"].clone();
    let before = status(&mut ctl);
    let bound = CBW_BOUND.as_secs().to_string();
    let child = start_throttled(
        &fx.vm.qmp_path,
        &archive,
        &["--cbw-timeout", &bound, "--no-progress"],
    );
    wait_for_jobs(&mut ctl, 2, Duration::from_secs(30)).unwrap();
    let pid = child.id();
    // Every thread of the backup (NBD server, archive writer, ...) runs at --nice's
    // default, below the QEMU it backs up.
    let nices = thread_nices(pid);
    assert!(
        nices.len() > 2
            && nices
                .iter()
                .all(|&n| n == i64::from(vma_live::DEFAULT_NICE)),
        "{nices:?}"
    );
    // The whole backup process stops: archive writer, NBD server and all.
    signal(pid, "STOP");
    let resume = thread::spawn(move || {
        thread::sleep(STALL);
        signal(pid, "CONT");
    });
    let writes = fx.late_writes();
    let took: Vec<Duration> = writes
        .iter()
        .map(|w| fx.guest_write(&mut ctl, *w).unwrap())
        .collect();
    resume.join().unwrap();
    let out = child.wait_with_output().unwrap();
    for (w, t) in writes.iter().zip(&took) {
        assert!(
            *t < CBW_BOUND + WRITE_SLACK,
            "a guest write stalled {t:?} with the archive stopped for {STALL:?}: {w:?}"
        );
    }
    let stderr = assert_failed_at_the_bound(&out, &out_dir);
    assert!(stderr.contains("the VM keeps running"), "{stderr}");
    assert_vm_clean(&mut ctl);
    assert_eq!(status(&mut ctl), before);
    // The guest's writes reached its disks, through the filter and after it.
    let after = fx.after(&writes);
    let now = fx.quit_and_read(&mut ctl).unwrap();
    for i in 0..2 {
        assert!(now[i] == after[i], "disk {i} lacks the guest's writes");
    }
}

#[test]
fn demo_without_qemu_says_what_is_missing() {
    let out = Command::new(bin())
        .arg("--demo")
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("qemu-system-x86_64 not found") && stderr.contains("install-deps"),
        "{stderr}"
    );
}

/// What the guest agent says of the guest's filesystems (`thawed`, `frozen`).
fn freeze_status(g: &Guest) -> String {
    let mut agent = GuestAgent::connect(&g.agent_socket, agent::SYNC_TIMEOUT).unwrap();
    let status = agent
        .execute("guest-fsfreeze-status", agent::THAW_TIMEOUT)
        .unwrap();
    status.as_str().unwrap_or_default().to_string()
}

/// After a backup of the real guest ended, failed or not: the VM runs, its filesystems
/// are thawed, no job and no node of ours is left, and its workload goes on.
fn assert_guest_unharmed(g: &mut Guest, ctl: &mut Qmp, after: &str) {
    assert_vm_clean(ctl);
    let status = ctl.execute("query-status", Value::Null).unwrap();
    assert_eq!(status["status"], "running", "after {after}: {status}");
    assert_eq!(freeze_status(g), "thawed", "after {after}");
    let meta = g.console.last_count("meta");
    g.console
        .wait_count("meta", meta, guest::COMMAND_TIMEOUT)
        .unwrap_or_else(|e| panic!("after {after} the guest's file workload stopped: {e}"));
}

/// A backup past an agent that does not answer ended within the agent's bound (and the
/// backup's own time) and left its archive, which is removed here.
fn assert_backed_up_within_the_agents_bound(took: Duration, archive: &Path) {
    assert!(
        took < agent::SYNC_TIMEOUT + Duration::from_secs(60),
        "{took:?}"
    );
    assert!(archive.is_file());
    std::fs::remove_file(archive).unwrap();
}

/// Sends `sig` (`STOP`, `CONT`) to the guest's qemu-ga, through the guest's console.
fn signal_guest_agent(g: &mut Guest, sig: &str) {
    g.console.send(&format!("agent {sig}")).unwrap();
    g.console
        .wait_for(&format!("agent {sig}"), guest::COMMAND_TIMEOUT)
        .unwrap();
}

/// Faults during live backups of one real Linux guest that writes all along (files on its
/// ext4 root, O_DIRECT writes on its data disk), each backup with its filesystems frozen
/// through the agent: a full filesystem under the archive, the archive writer stopped for
/// 10 s, an agent that does not answer (a socket that never answers, then the guest's own
/// qemu-ga stopped), the backup interrupted (cancel flag, SIGINT) and QEMU killed. After
/// each the guest runs on, thawed, with nothing of the backup left.
#[test]
#[ignore = "boots a Linux guest under QEMU (qemu-system-x86); scripts/test runs it with --include-ignored"]
fn faults_during_backups_of_a_real_writing_guest_leave_it_running_and_thawed() {
    // How long the archive writer stays stopped.
    const STALL: Duration = Duration::from_secs(10);
    let image = guest::image().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("vma-live-faults-")
        .tempdir()
        .unwrap();
    let disks = guest::make_disks(dir.path(), &image).unwrap();
    let opts = BootOptions {
        agent: true,
        work: true,
    };
    let mut g = Guest::boot(dir.path(), &image, disks, opts).unwrap();
    g.console.wait_for("probe", guest::COMMAND_TIMEOUT).unwrap();
    let qmp = g.vm.qmp_path.to_str().unwrap().to_string();
    let agent_path = g.agent_socket.to_str().unwrap().to_string();
    let mut ctl = g.vm.control().unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    // The binary backing up the guest into `archive`, freezing it through its agent.
    let back_up_through_the_agent = |archive: &Path| {
        run_bin(&[
            "--qmp",
            &qmp,
            "--guest-agent",
            &agent_path,
            "--no-progress",
            "--output",
            archive.to_str().unwrap(),
        ])
    };
    let start_through_the_agent = |archive: &Path, extra: &[&str]| {
        let agent = ["--guest-agent", agent_path.as_str(), "--no-progress"];
        start_throttled(Path::new(&qmp), archive, &[&agent[..], extra].concat())
    };

    // A full filesystem under the archive.
    let full = Tmpfs::mount(dir.path().join("small"), "8m");
    let archive = full.0.join("vm.vma");
    let out = back_up_through_the_agent(&archive);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("No space left"), "{stderr}");
    assert_nothing_left(&full.0);
    assert_guest_unharmed(&mut g, &mut ctl, "a full filesystem");
    drop(full);

    // The whole backup process stopped for 10 s: archive writer, NBD server and all.
    let archive = out_dir.join("stalled.vma");
    let bound = CBW_BOUND.as_secs().to_string();
    let child = start_through_the_agent(&archive, &["--cbw-timeout", &bound]);
    wait_for_jobs(&mut ctl, 2, Duration::from_secs(60)).unwrap();
    // What assert_vm_clean looks for is there while the backup runs: our filter on each
    // drive (named vmalb...), and the backup jobs' own copy-before-write nodes.
    let nodes = ctl.execute("query-named-block-nodes", Value::Null).unwrap();
    let filters: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n.get("drv").and_then(Value::as_str) == Some("copy-before-write"))
        .filter_map(|n| n.get("node-name").and_then(Value::as_str))
        .collect();
    let ours = filters.iter().filter(|n| n.starts_with("vmalb")).count();
    assert!(ours == 2 && filters.len() > ours, "{filters:?}");
    guest_latency::lat(&mut g).unwrap();
    let pid = child.id();
    signal(pid, "STOP");
    let probes = g.console.last_count("probe");
    thread::sleep(STALL);
    let probes_stalled = g.console.last_count("probe");
    signal(pid, "CONT");
    let lat = guest_latency::lat(&mut g).unwrap().latency;
    let out = child.wait_with_output().unwrap();
    eprintln!("guest writes while the archive writer was stopped: {probes} -> {probes_stalled} probes, {lat:?} (us)");
    assert!(
        probes_stalled > probes,
        "the guest's probe wrote nothing while the archive writer was stopped"
    );
    assert!(
        lat.max < u64::try_from((CBW_BOUND + WRITE_SLACK).as_micros()).unwrap(),
        "a guest write took {} us with the archive stopped for {STALL:?}: {lat:?}",
        lat.max
    );
    assert_failed_at_the_bound(&out, &out_dir);
    assert_guest_unharmed(&mut g, &mut ctl, "a stalled archive writer");

    // An agent that takes the connection and never answers: crash-consistent, said so,
    // within the agent's bound; not an error.
    let silent = dir.path().join("silent-agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let holder = thread::spawn(move || listener.accept().map(|(stream, _)| stream));
    let archive = out_dir.join("silent.vma");
    let mut opts = BackupOptions::new(&g.vm.qmp_path, &archive);
    opts.guest_agent = Some(silent.clone());
    let t = Instant::now();
    let report = run_backup(&opts).unwrap();
    let took = t.elapsed();
    drop(holder.join().unwrap());
    assert!(
        matches!(&report.consistency, Consistency::CrashConsistent { reason } if reason.contains("no freeze")),
        "{report}"
    );
    assert_backed_up_within_the_agents_bound(took, &archive);
    assert_guest_unharmed(&mut g, &mut ctl, "a silent agent");

    // The guest's own agent stopped inside the guest (SIGSTOP to qemu-ga): the binary
    // backs up crash-consistent and says so, exit 0, within the agent's bound.
    signal_guest_agent(&mut g, "STOP");
    let archive = out_dir.join("agent-stopped.vma");
    let t = Instant::now();
    let out = back_up_through_the_agent(&archive);
    let took = t.elapsed();
    signal_guest_agent(&mut g, "CONT");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("crash-consistent only") && said.contains("no freeze"),
        "{said}"
    );
    assert_backed_up_within_the_agents_bound(took, &archive);
    assert_guest_unharmed(&mut g, &mut ctl, "the guest's agent stopped");

    // Interrupted mid-backup, the guest frozen and thawed before: in process through the
    // cancel flag, then the binary on SIGINT (exit 130); the jobs cancelled, no archive.
    let mut opts =
        BackupOptions::new(&g.vm.qmp_path, out_dir.join("cancelled.vma")).throttle(DELAY);
    opts.guest_agent = Some(g.agent_socket.clone());
    let cancel = opts.cancel.clone();
    let backup = thread::spawn(move || run_backup(&opts));
    wait_for_jobs(&mut ctl, 2, Duration::from_secs(60)).unwrap();
    cancel.store(true, Ordering::SeqCst);
    let err = backup.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::Interrupted), "{err}");
    assert_nothing_left(&out_dir);
    assert_guest_unharmed(&mut g, &mut ctl, "a cancelled backup");
    let child = start_through_the_agent(&out_dir.join("interrupted.vma"), &[]);
    wait_for_jobs(&mut ctl, 2, Duration::from_secs(60)).unwrap();
    signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert_nothing_left(&out_dir);
    assert_guest_unharmed(&mut g, &mut ctl, "a backup interrupted by SIGINT");

    // QEMU killed mid-backup, the guest frozen and thawed before: a clean error, no archive.
    let mut opts = BackupOptions::new(&g.vm.qmp_path, out_dir.join("killed.vma")).throttle(DELAY);
    opts.guest_agent = Some(g.agent_socket.clone());
    let backup = thread::spawn(move || run_backup(&opts));
    wait_for_jobs(&mut ctl, 2, Duration::from_secs(60)).unwrap();
    thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    g.vm.kill();
    let err = backup.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::QmpClosed), "{err}");
    assert_eq!(err.kind(), ErrorKind::Qemu);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_nothing_left(&out_dir);
}

fn guest_plan(freeze: bool, restore: bool) -> Plan {
    Plan {
        agent_in_guest: freeze,
        freeze: true,
        throttle: Duration::from_millis(3),
        restore,
        interrupt: freeze,
        cancel: Default::default(),
    }
}

/// Prints what a guest run found (the test log keeps the figures).
fn show(label: &str, o: &Outcome) {
    eprintln!(
        "{label}: boot {:.1} s; backup: {}\n  work at jobs' start / backup end / power-off: {:?}\n  \
         archive markers {:?} (read unreplayed: {}); source markers {:?}\n  e2fsck -fn exit {}:\n{}",
        o.boot_time.as_secs_f64(),
        o.report,
        o.work,
        o.archive,
        o.archive_read_unreplayed,
        o.source,
        o.fsck.0,
        o.fsck.1
    );
    if let Some(i) = &o.interrupted {
        eprintln!("  interrupted second backup: {i:?}");
    }
    if let Some(r) = &o.restored {
        eprintln!(
            "  restored VM: boot {:.1} s, found {:?}",
            r.boot_time.as_secs_f64(),
            r.found
        );
    }
}

/// A real Linux guest writing (ext4 metadata churn, O_DIRECT data writes) is
/// backed up live with its filesystems frozen by qemu-guest-agent: the archive
/// holds both disks as of the backup's instant, its ext4 is clean without a
/// journal replay, the guest wrote on during the backup, and the restored disks boot.
/// A second backup, interrupted, leaves the guest thawed and writing.
#[test]
#[ignore = "boots a Linux guest in QEMU (scripts/build-guest); scripts/test runs it with --include-ignored"]
fn real_guest_frozen_backup_is_consistent_and_boots() {
    let o = guest_backup::run(&guest_plan(true, true)).unwrap_or_else(|e| panic!("{e}"));
    show("frozen", &o);
    assert!(
        matches!(
            o.report.consistency,
            Consistency::Frozen {
                filesystems: 1..,
                ..
            }
        ),
        "{:?}",
        o.report.consistency
    );
    assert!(o.archive.is_backup_instant(), "archive: {:?}", o.archive);
    assert!(o.source.has_all(), "source: {:?}", o.source);
    assert!(
        o.after_during_backup,
        "the backup ended before the guest wrote 'after'"
    );
    let [start, end, off] = o.work;
    // Data writes went on during the backup, file churn after its instant.
    assert!(end.probe > start.probe, "{:?}", o.work);
    assert!(
        off.meta > start.meta && off.probe >= end.probe,
        "{:?}",
        o.work
    );
    assert_eq!(
        o.fsck.0, 0,
        "e2fsck -fn of the frozen archive:\n{}",
        o.fsck.1
    );
    assert!(o.archive_read_unreplayed);
    let restored = o.restored.as_ref().unwrap();
    assert_eq!(restored.found, ["before"], "{restored:?}");
    // A second backup with the agent, interrupted once its jobs ran: the guest is
    // thawed and writes on.
    let i = o.interrupted.as_ref().unwrap();
    assert!(i.error.contains("interrupted"), "{i:?}");
    assert_eq!(i.freeze_status, "thawed", "{i:?}");
    assert!(i.marked, "{i:?}");
    proxmox_restores_byte_exact(&o);
}

/// Proxmox's restore, re-enacted (vma-cli/tests/proxmox/restore.pl, qemu-server's
/// `restore_vma_archive`), restores the live archive onto a directory storage through
/// the `qemu-server.conf` derived from the VM: raw volumes byte-exact with the
/// archive's devices, the VM config pointing at them.
fn proxmox_restores_byte_exact(o: &Outcome) {
    let work = o.dir().join("pve");
    let (etc, var_tmp, store) = (
        work.join("etc-pve"),
        work.join("var-tmp"),
        work.join("store"),
    );
    for d in [&etc, &var_tmp, &store] {
        std::fs::create_dir_all(d).unwrap();
    }
    // Proxmox's restore takes archives under vzdump's names.
    let archive = work.join("vzdump-qemu-100-2026_12_03-07_00_00.vma");
    std::fs::copy(&o.archive_path, &archive).unwrap();
    let vma = vma_examples::guest::vma_binary().unwrap();
    let mut path = vma.parent().unwrap().as_os_str().to_owned();
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../vma-cli/tests/proxmox/restore.pl");
    let out = Command::new("perl")
        .arg(&script)
        .arg("--etc-pve")
        .arg(&etc)
        .arg("--var-tmp")
        .arg(&var_tmp)
        .arg("--storage")
        .arg(format!("local=dir:{}", store.display()))
        .arg(&archive)
        .arg("100")
        .env("PATH", path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "restore.pl: {out:?}");
    let conf = std::fs::read_to_string(etc.join("qemu-server/100.conf")).unwrap();
    eprintln!("Proxmox restore: the new VM config:\n{conf}");
    for line in [
        "cores: 1\n",
        "memory: 256\n",
        "virtio0: local:100/vm-100-disk-0.raw,size=48M\n",
        "virtio1: local:100/vm-100-disk-1.raw,size=32M\n",
    ] {
        assert!(conf.contains(line), "{line:?} not in\n{conf}");
    }
    assert!(!conf.contains("#qmdump#"), "{conf}");
    for (i, extracted) in o.extracted.iter().enumerate() {
        let volume = store.join(format!("images/100/vm-100-disk-{i}.raw"));
        assert!(
            std::fs::read(&volume).unwrap() == std::fs::read(extracted).unwrap(),
            "{} differs from the archive's device {i}",
            volume.display()
        );
    }
}

/// The same without a running agent (the socket is given, nobody answers):
/// the backup goes on crash-consistent after the sync timeout and says so. The
/// markers hold after a journal replay; what `e2fsck -fn` says of the unreplayed
/// image is printed (recorded in the closing note), not asserted.
#[test]
#[ignore = "boots a Linux guest in QEMU (scripts/build-guest); scripts/test runs it with --include-ignored"]
fn real_guest_without_agent_is_crash_consistent_and_says_so() {
    let o = guest_backup::run(&guest_plan(false, false)).unwrap_or_else(|e| panic!("{e}"));
    show("no agent", &o);
    match &o.report.consistency {
        Consistency::CrashConsistent { reason } => {
            assert!(
                reason.contains("no answer to guest-sync-delimited"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(
        o.report.to_string().contains("crash-consistent"),
        "{}",
        o.report
    );
    assert!(o.archive.is_backup_instant(), "archive: {:?}", o.archive);
    assert!(o.source.has_all(), "source: {:?}", o.source);
    let [start, end, off] = o.work;
    assert!(end.probe > start.probe, "{:?}", o.work);
    assert!(off.meta > start.meta, "{:?}", o.work);
}
