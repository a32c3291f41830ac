//! The self-contained demonstration (`vma-live-backup --demo`, which
//! `scripts/demo` runs).
//!
//! A throwaway VM gets two disks with known content: a 64 MiB qcow2 and a
//! raw image whose size is not a multiple of 64 KiB. A slowed-down backup
//! runs while guest writes land on areas the job has not copied yet; the
//! archive must still hold the disks as they were when the backup started,
//! and the disks must hold the new writes.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use vma_live::{run_backup, BackupOptions, BackupReport, Qmp};

use crate::fixture::{check_archive, job_offset, sha256_hex, wait_for_jobs, Fixture, GuestWrite};
use crate::Result;

const MIB: u64 = 1 << 20;

fn check_interrupt(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::SeqCst) {
        return Err("interrupted".into());
    }
    Ok(())
}

/// Runs the demo, printing what it proved. Needs `qemu-system-x86_64`,
/// `qemu-img` and `qemu-io`; installs nothing. Setting `cancel` (from a
/// signal handler) stops it at the next step, killing the VM and removing
/// its files.
pub fn run_demo(cancel: Arc<AtomicBool>) -> Result<()> {
    println!("vma-live-backup demo: live backup of a running QEMU into a VMA archive");
    let mut fx = Fixture::start()?;
    let out_dir = fx.dir().join("out");
    std::fs::create_dir(&out_dir)?;
    let archive = out_dir.join("vm.vma");
    let mut ctl = fx.vm.control()?;
    println!(
        "- VM: QEMU {} with a 64 MiB qcow2 (vd0) and a raw disk of {} bytes (vd1)",
        qemu_version(&mut ctl)?,
        fx.before[1].len()
    );
    for (d, data) in fx.disks.iter().zip(&fx.before) {
        println!(
            "  before: {:<10} sha256 {}",
            d.qdev_id,
            &sha256_hex(data)[..16]
        );
    }

    check_interrupt(&cancel)?;
    let writes = backup_during_writes(&fx, &mut ctl, &archive, &cancel)?;
    check_interrupt(&cancel)?;
    let mut ok = show_archive(&fx, &archive)?;
    check_interrupt(&cancel)?;
    ok &= show_sources(&mut fx, &mut ctl, &writes)?;
    if !ok {
        return Err("the demo found a mismatch (see above)".into());
    }
    println!(
        "Proved: guest writes landing on not-yet-copied areas during the backup reached the\n\
         disks, while the archive holds every drive exactly as it was when the backup started."
    );
    Ok(())
}

/// Runs a throttled backup into `archive` and, while it runs, the fixture's
/// late guest writes; returns the writes once the backup finished.
fn backup_during_writes(
    fx: &Fixture,
    ctl: &mut Qmp,
    archive: &Path,
    cancel: &Arc<AtomicBool>,
) -> Result<Vec<GuestWrite>> {
    let mut opts = BackupOptions::new(&fx.vm.qmp_path, archive).throttle(Duration::from_millis(3));
    opts.progress = true;
    opts.cancel = Arc::clone(cancel);
    let backup = thread::spawn(move || run_backup(&opts));
    let jobs = wait_for_jobs(ctl, 2, Duration::from_secs(30))?;
    println!(
        "- backup started: {} jobs, throttled (x-perf max-workers=1, 64 KiB chunks, 3 ms per write)",
        jobs.len()
    );
    let writes = fx.late_writes();
    for w in &writes {
        let took = fx.guest_write(ctl, *w)?;
        let done = job_offset(ctl, w.disk)?;
        println!(
            "- guest write: {} bytes of {:#04x} at {} MiB on {} ({} ms; its job had copied {:.1} MiB)",
            w.len,
            w.pattern,
            w.offset / MIB,
            fx.disks[w.disk].qdev_id,
            took.as_millis(),
            done as f64 / MIB as f64
        );
    }
    let report: BackupReport = backup.join().map_err(|_| "the backup thread panicked")??;
    println!("- backup finished (in a temporary directory, removed at the end):\n{report}");
    let status = ctl.execute("query-status", Value::Null)?;
    println!(
        "- the VM is still up (query-status: {})",
        status.get("status").unwrap_or(&json!("?"))
    );
    Ok(writes)
}

/// Verifies and extracts the archive and prints whether each device holds
/// its disk as of the backup's start.
fn show_archive(fx: &Fixture, archive: &Path) -> Result<bool> {
    let extract_dir = fx.dir().join("extracted");
    std::fs::create_dir(&extract_dir)?;
    let check = check_archive(archive, false, &extract_dir)?;
    let mut ok = true;
    for (i, d) in check.devices.iter().enumerate() {
        let same = fx.before.get(i) == Some(&d.data);
        ok &= same;
        println!(
            "- archive {:<10} {} bytes sha256 {} {}",
            d.name,
            d.data.len(),
            &sha256_hex(&d.data)[..16],
            if same {
                "= the disk when the backup started"
            } else {
                "DIFFERS from the disk when the backup started"
            }
        );
    }
    println!(
        "- archive verified by vma-reader (headers, completeness{}), extracted and read in place; configs: {}",
        if check.sealed { ", checksums, seal" } else { "" },
        check.configs.join(", ")
    );
    ok &= check.devices.len() == fx.before.len();
    ok &= check.drives_config["drives"].as_array().map(Vec::len) == Some(fx.disks.len());
    Ok(ok)
}

/// Quits the VM and prints whether each disk holds the guest's writes.
fn show_sources(fx: &mut Fixture, ctl: &mut Qmp, writes: &[GuestWrite]) -> Result<bool> {
    let after = fx.after(writes);
    let now = fx.quit_and_read(ctl)?;
    let mut ok = true;
    for (i, d) in fx.disks.iter().enumerate() {
        let holds = now[i] == after[i];
        ok &= holds && now[i] != fx.before[i];
        println!(
            "- source {:<10} sha256 {} {}",
            d.qdev_id,
            &sha256_hex(&now[i])[..16],
            if holds {
                "holds the guest's new writes"
            } else {
                "does NOT hold the expected writes"
            }
        );
    }
    Ok(ok)
}

fn qemu_version(q: &mut Qmp) -> Result<String> {
    let v = q.execute("query-version", Value::Null)?;
    Ok(format!(
        "{}.{}.{}",
        v["qemu"]["major"], v["qemu"]["minor"], v["qemu"]["micro"]
    ))
}
