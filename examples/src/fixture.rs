//! The VM fixture of the demo and the integration tests: a throwaway VM with
//! two disks of known content (a qcow2 and a raw image whose size is not a
//! multiple of 64 KiB), guest writes injected while a backup runs, and the
//! checks of an archive against what the disks held.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use vma_live::backup::{job_index, DRIVES_CONFIG_NAME};
use vma_live::Qmp;

use crate::qemu::{self, Disk, Vm};
use crate::Result;

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
    pub fn start() -> Result<Fixture> {
        Fixture::with_size(64)
    }

    /// Creates the two disks in a new temporary directory and starts the VM.
    /// `s` (a multiple of 16, at least 16) scales the layout, in MiB:
    ///
    /// Disk 0 (`d0`, device `vd0`): qcow2 of `s`, data in `0..s/4`,
    /// `5s/16..5s/8` and `3s/4..s`, the rest unallocated. Disk 1 (`d1`,
    /// `vd1`): a raw file of `5s/8` MiB + 12345 bytes, data in `0..s/8`,
    /// `3s/8..5s/8` and in the last, partial cluster; the rest a hole.
    pub fn with_size(s: u64) -> Result<Fixture> {
        if s < 16 || !s.is_multiple_of(16) {
            return Err(format!("fixture size {s} MiB: expected a multiple of 16").into());
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

    /// Creates the directory `out` in [`dir`](Self::dir) for an archive to go to.
    pub fn out_dir(&self) -> std::io::Result<PathBuf> {
        let dir = self.dir().join("out");
        std::fs::create_dir(&dir)?;
        Ok(dir)
    }

    /// Writes as the guest would (HMP `qemu-io` on the device's backend).
    pub fn guest_write(&self, qmp: &mut Qmp, w: GuestWrite) -> Result<Duration> {
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
    pub fn quit_and_read(&mut self, qmp: &mut Qmp) -> Result<Vec<Vec<u8>>> {
        self.vm.quit(qmp);
        let log = self.vm.log_text();
        if log.contains("failed") {
            return Err(format!("QEMU reported a failure: {log}").into());
        }
        self.disks
            .iter()
            .map(|d| qemu::read_image(&d.path, &d.format, self.dir.path()))
            .collect()
    }
}

/// Waits until `qmp`'s VM runs at least `count` block jobs; returns their
/// `query-block-jobs` entries.
pub fn wait_for_jobs(qmp: &mut Qmp, count: usize, timeout: Duration) -> Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    loop {
        let jobs = qmp.execute("query-block-jobs", Value::Null)?;
        let list = jobs.as_array().cloned().unwrap_or_default();
        if list.len() >= count {
            return Ok(list);
        }
        if Instant::now() > deadline {
            return Err(format!("{count} backup jobs did not start in time").into());
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Bytes the backup job of drive number `index` (in backup order) has
/// copied so far, from `query-block-jobs`; 0 once it is gone.
pub fn job_offset(qmp: &mut Qmp, index: usize) -> Result<u64> {
    let jobs = qmp.execute("query-block-jobs", Value::Null)?;
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

fn open_archive(path: &Path, zstd: bool) -> Result<Box<dyn Read>> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(if zstd {
        Box::new(zstd::stream::read::Decoder::new(file)?)
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
pub fn check_archive(path: &Path, zstd: bool, into: &Path) -> Result<ArchiveCheck> {
    let report = vma_reader::verify(open_archive(path, zstd)?, Default::default())
        .map_err(|e| format!("verify {}: {e}", path.display()))?;
    if !report.is_ok() {
        return Err(format!("verify {}: {report:?}", path.display()).into());
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
                let text = std::fs::read(&f.path)?;
                drives_config = serde_json::from_slice(&text)?;
            }
        }
    }
    {
        // Plain or seekable zstd (`--zstd`): both open in place.
        let vma = vma_reader::SeekableArchive::open(path)?;
        for d in &devices {
            let mut reader = vma.device(d.name.as_str())?;
            let mut data = Vec::new();
            reader
                .read_to_end(&mut data)
                .map_err(|e| format!("{}: {e}", d.name))?;
            if data != d.data {
                return Err(format!(
                    "{}: the seekable reader disagrees with the extraction",
                    d.name
                )
                .into());
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

/// Waits (up to `timeout` for each event) until block job `job` ends: `Ok` when it
/// completed without error, an error naming `what` when it failed, was cancelled or did
/// not end.
pub fn wait_for_job_end(ctl: &mut Qmp, job: &str, timeout: Duration, what: &str) -> Result<()> {
    loop {
        let Some(ev) = ctl.next_event(timeout)? else {
            return Err(format!("{what} did not end").into());
        };
        if ev.data.get("device").and_then(Value::as_str) != Some(job) {
            continue;
        }
        match ev.name.as_str() {
            "BLOCK_JOB_COMPLETED" if ev.data.get("error").is_none() => return Ok(()),
            "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => {
                return Err(format!("{what} failed: {}", ev.data).into())
            }
            _ => {}
        }
    }
}
