//! The self-contained demonstration (`vma-live-backup --demo`) and the VM
//! fixture it shares with the integration tests.
//!
//! A throwaway VM gets two disks with known content: a 64 MiB qcow2 and a
//! raw image whose size is not a multiple of 64 KiB. A slowed-down backup
//! runs while guest writes land on areas the job has not copied yet; the
//! archive must still hold the disks as they were when the backup started,
//! and the disks must hold the new writes.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::backup::{job_index, run_backup, BackupOptions, BackupReport, DRIVES_CONFIG_NAME};
use crate::qemu::{self, Disk, Vm};
use crate::qmp::Qmp;

const MIB: u64 = 1 << 20;

/// A guest write injected during the backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestWrite {
    /// Index of the disk in the fixture.
    pub disk: usize,
    /// The byte written.
    pub pattern: u8,
    /// Where.
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
}

/// A running VM with two disks of known content.
#[derive(Debug)]
pub struct Fixture {
    /// The disks.
    pub disks: Vec<Disk>,
    /// Each disk's content before the backup, as QEMU sees it (its
    /// virtual size, rounded up to 512 bytes).
    pub before: Vec<Vec<u8>>,
    /// The VM (killed on drop).
    pub vm: Vm,
    dir: tempfile::TempDir,
    scale: u64,
}

impl Fixture {
    /// The demo's layout: a 64 MiB qcow2 and a raw image of 40 MiB + 12345
    /// bytes, which QEMU rounds up to 41955840 (not a multiple of 64 KiB).
    pub fn start() -> Result<Fixture, String> {
        Fixture::with_size(64)
    }

    /// Creates the two disks in a new temporary directory and starts the VM.
    /// `s` (a multiple of 16, at least 16) scales the layout, in MiB:
    ///
    /// Disk 0 (`d0`, device `vd0`): qcow2 of `s`, data in `0..s/4`,
    /// `5s/16..5s/8` and `3s/4..s`, the rest unallocated. Disk 1 (`d1`,
    /// `vd1`): a raw file of `5s/8` MiB + 12345 bytes, data in `0..s/8`,
    /// `3s/8..5s/8` and in the last, partial cluster; the rest a hole.
    pub fn with_size(s: u64) -> Result<Fixture, String> {
        if s < 16 || s % 16 != 0 {
            return Err(format!("fixture size {s} MiB: expected a multiple of 16"));
        }
        // Fail early and clearly without QEMU.
        qemu::run_tool(qemu::QEMU_SYSTEM, &["--version"])?;
        let dir = tempfile::Builder::new()
            .prefix("vma-live-demo-")
            .tempdir()
            .map_err(|e| format!("creating a temporary directory: {e}"))?;
        let qcow = dir.path().join("disk0.qcow2");
        let raw = dir.path().join("disk1.raw");
        let m = |n: u64| n * s / 16 * MIB;
        qemu::create_qcow2(
            &qcow,
            m(16),
            &[(0x11, 0, m(4)), (0x22, m(5), m(5)), (0x33, m(12), m(4))],
        )?;
        qemu::create_raw(
            &raw,
            m(10) + 12345,
            &[(0x44, 0, m(2)), (0x55, m(6), m(4)), (0x66, m(10), 12288)],
        )?;
        let disks = vec![
            Disk {
                path: qcow,
                format: "qcow2".into(),
                node_name: "d0".into(),
                qdev_id: "vd0".into(),
            },
            Disk {
                path: raw,
                format: "raw".into(),
                node_name: "d1".into(),
                qdev_id: "vd1".into(),
            },
        ];
        let before = disks
            .iter()
            .map(|d| qemu::read_image(&d.path, &d.format, dir.path()))
            .collect::<Result<Vec<_>, _>>()?;
        let vm = Vm::start(dir.path(), &disks)?;
        Ok(Fixture {
            disks,
            before,
            vm,
            dir,
            scale: s,
        })
    }

    /// Guest writes into areas a sequential backup reaches last: inside
    /// data near the end of each disk, and into a hole of the qcow2.
    pub fn late_writes(&self) -> Vec<GuestWrite> {
        let m = |n: u64| n * self.scale / 16 * MIB;
        vec![
            GuestWrite {
                disk: 0,
                pattern: 0xee,
                offset: m(15),
                len: m(1) / 4,
            },
            GuestWrite {
                disk: 0,
                pattern: 0xcc,
                offset: m(11),
                len: 64 * 1024,
            },
            GuestWrite {
                disk: 1,
                pattern: 0xdd,
                offset: m(9),
                len: m(1) / 4,
            },
        ]
    }

    /// The fixture's temporary directory (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes as the guest would (HMP `qemu-io` on the device's backend).
    pub fn guest_write(&self, qmp: &mut Qmp, w: GuestWrite) -> Result<Duration, String> {
        let disk = self
            .disks
            .get(w.disk)
            .ok_or_else(|| format!("no disk {}", w.disk))?;
        let cmd = format!(
            "qemu-io -d {} \"write -P {:#x} {} {}\"",
            disk.qdev_path(),
            w.pattern,
            w.offset,
            w.len
        );
        let start = Instant::now();
        // QEMU prints qemu-io's result on its own stdout, not in the
        // reply; the content checks after the backup tell what happened.
        qmp.hmp(&cmd).map_err(|e| format!("{cmd}: {e}"))?;
        Ok(start.elapsed())
    }

    /// The content each disk must have after `writes`.
    pub fn after(&self, writes: &[GuestWrite]) -> Vec<Vec<u8>> {
        let mut after = self.before.clone();
        for w in writes {
            if let Some(d) = after.get_mut(w.disk) {
                let start = usize::try_from(w.offset).unwrap_or(usize::MAX).min(d.len());
                let end = usize::try_from(w.offset + w.len)
                    .unwrap_or(usize::MAX)
                    .min(d.len());
                d[start..end].fill(w.pattern);
            }
        }
        after
    }

    /// Quits QEMU through `qmp` (so the images are closed and its output
    /// flushed) and reads the disks back. Fails if QEMU reported a failed
    /// guest write (HMP `qemu-io` reports on QEMU's stdout).
    pub fn quit_and_read(&mut self, qmp: &mut Qmp) -> Result<Vec<Vec<u8>>, String> {
        self.vm.quit(qmp);
        let log = self.vm.log_text();
        if log.contains("failed") {
            return Err(format!("QEMU reported a failure: {log}"));
        }
        self.disks
            .iter()
            .map(|d| qemu::read_image(&d.path, &d.format, self.dir.path()))
            .collect()
    }
}

/// Waits until `qmp`'s VM runs at least `count` block jobs; returns their
/// `query-block-jobs` entries.
pub fn wait_for_jobs(qmp: &mut Qmp, count: usize, timeout: Duration) -> Result<Vec<Value>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let jobs = qmp
            .execute("query-block-jobs", Value::Null)
            .map_err(|e| e.to_string())?;
        let list = jobs.as_array().cloned().unwrap_or_default();
        if list.len() >= count {
            return Ok(list);
        }
        if Instant::now() > deadline {
            return Err(format!("{count} backup jobs did not start in time"));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Bytes the backup job of drive number `index` (in backup order) has
/// copied so far, from `query-block-jobs`; 0 once it is gone.
pub fn job_offset(qmp: &mut Qmp, index: usize) -> Result<u64, String> {
    let jobs = qmp
        .execute("query-block-jobs", Value::Null)
        .map_err(|e| e.to_string())?;
    Ok(jobs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j.get("device").and_then(Value::as_str).and_then(job_index) == Some(index))
        .filter_map(|j| j.get("offset").and_then(Value::as_u64))
        .max()
        .unwrap_or(0))
}

/// SHA-256 of `data`, in hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn open_archive(path: &Path, zstd: bool) -> Result<Box<dyn Read>, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(if zstd {
        Box::new(zstd::stream::read::Decoder::new(file).map_err(|e| e.to_string())?)
    } else {
        Box::new(BufReader::new(file))
    })
}

/// What [`check_archive`] found about each device.
#[derive(Debug, Clone)]
pub struct ArchiveDevice {
    /// Device name.
    pub name: String,
    /// The extracted image's content.
    pub data: Vec<u8>,
    /// The extracted image file.
    pub extracted: PathBuf,
}

/// What the archive holds according to vma-reader.
#[derive(Debug, Clone)]
pub struct ArchiveCheck {
    /// Devices, in archive order.
    pub devices: Vec<ArchiveDevice>,
    /// Config entry names.
    pub configs: Vec<String>,
    /// The embedded drive list.
    pub drives_config: Value,
    /// Whether the integrity seal verified.
    pub sealed: bool,
}

/// Verifies the archive at `path` (every check, seal included) and extracts
/// it into `into` (which must exist and be empty), reading each device
/// image back. For plain archives the devices are also read in place with
/// the seekable reader and must be the same.
pub fn check_archive(path: &Path, zstd: bool, into: &Path) -> Result<ArchiveCheck, String> {
    let report = vma_reader::verify(open_archive(path, zstd)?, Default::default())
        .map_err(|e| format!("verify {}: {e}", path.display()))?;
    if !report.is_ok() {
        return Err(format!("verify {}: {report:?}", path.display()));
    }
    let sealed = matches!(report.integrity.seal, vma_reader::SealStatus::Sealed);
    let extracted = vma_reader::Extractor::new(into)
        .extract(open_archive(path, zstd)?)
        .map_err(|e| format!("extract {}: {e}", path.display()))?;
    let mut devices = Vec::new();
    let mut configs = Vec::new();
    let mut drives_config = Value::Null;
    for f in &extracted.files {
        if f.device.is_some() {
            let data = std::fs::read(&f.path).map_err(|e| format!("{}: {e}", f.path.display()))?;
            devices.push(ArchiveDevice {
                name: f.name.clone(),
                data,
                extracted: f.path.clone(),
            });
        } else {
            configs.push(f.name.clone());
            if f.name == DRIVES_CONFIG_NAME {
                let text = std::fs::read(&f.path).map_err(|e| e.to_string())?;
                drives_config = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
            }
        }
    }
    if !zstd {
        let vma = vma_reader::SeekableArchive::open(path).map_err(|e| e.to_string())?;
        for d in &devices {
            let mut reader = vma.device(d.name.as_str()).map_err(|e| e.to_string())?;
            let mut data = Vec::new();
            reader
                .read_to_end(&mut data)
                .map_err(|e| format!("{}: {e}", d.name))?;
            if data != d.data {
                return Err(format!(
                    "{}: the seekable reader disagrees with the extraction",
                    d.name
                ));
            }
        }
    }
    Ok(ArchiveCheck {
        devices,
        configs,
        drives_config,
        sealed,
    })
}

fn check_interrupt(cancel: &AtomicBool) -> Result<(), String> {
    if cancel.load(Ordering::SeqCst) {
        return Err("interrupted".into());
    }
    Ok(())
}

/// Runs the demo, printing what it proved. Needs `qemu-system-x86_64`,
/// `qemu-img` and `qemu-io`; installs nothing. Setting `cancel` (from a
/// signal handler) stops it at the next step, killing the VM and removing
/// its files.
#[allow(clippy::too_many_lines)] // reason: being split in a parallel change (issue 19)
pub fn run_demo(cancel: Arc<AtomicBool>) -> Result<(), String> {
    println!("vma-live-backup demo: live backup of a running QEMU into a VMA archive");
    let mut fx = Fixture::start()?;
    let out_dir = fx.dir().join("out");
    std::fs::create_dir(&out_dir).map_err(|e| e.to_string())?;
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
    let mut opts = BackupOptions::new(&fx.vm.qmp_path, &archive).throttle(Duration::from_millis(3));
    opts.progress = true;
    opts.cancel = Arc::clone(&cancel);
    let backup = thread::spawn(move || run_backup(&opts));
    let jobs = wait_for_jobs(&mut ctl, 2, Duration::from_secs(30))?;
    println!(
        "- backup started: {} jobs, throttled (x-perf max-workers=1, 64 KiB chunks, 3 ms per write)",
        jobs.len()
    );
    let writes = fx.late_writes();
    for w in &writes {
        let took = fx.guest_write(&mut ctl, *w)?;
        let done = job_offset(&mut ctl, w.disk)?;
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
    let report: BackupReport = backup
        .join()
        .map_err(|_| "the backup thread panicked".to_string())?
        .map_err(|e| e.to_string())?;
    println!("- backup finished (in a temporary directory, removed at the end):\n{report}");
    let status = ctl
        .execute("query-status", Value::Null)
        .map_err(|e| e.to_string())?;
    println!(
        "- the VM is still up (query-status: {})",
        status.get("status").unwrap_or(&json!("?"))
    );

    check_interrupt(&cancel)?;
    let extract_dir = fx.dir().join("extracted");
    std::fs::create_dir(&extract_dir).map_err(|e| e.to_string())?;
    let check = check_archive(&archive, false, &extract_dir)?;
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
    check_interrupt(&cancel)?;
    let after = fx.after(&writes);
    let now = fx.quit_and_read(&mut ctl)?;
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
    if !ok {
        return Err("the demo found a mismatch (see above)".into());
    }
    println!(
        "Proved: guest writes landing on not-yet-copied areas during the backup reached the\n\
         disks, while the archive holds every drive exactly as it was when the backup started."
    );
    Ok(())
}

fn qemu_version(q: &mut Qmp) -> Result<String, String> {
    let v = q
        .execute("query-version", Value::Null)
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "{}.{}.{}",
        v["qemu"]["major"], v["qemu"]["minor"], v["qemu"]["micro"]
    ))
}
