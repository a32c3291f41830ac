//! Extraction: devices to sparse files or existing targets, configs to files, all under
//! temporary names until the whole archive has validated.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use vma_format::{cluster, DeviceId, DeviceInfo, VMA_BLOCK_SIZE};

use crate::error::{Error, Result};
use crate::integrity::ExtentChecksum;
use crate::names::{config_file_name, device_file_name, device_temp_file_name, MAX_FILE_NAME_LEN};
use crate::options::{OnDamage, ProgressFn, ReadOptions};
use crate::sink::{self, Output};
use crate::stream::{ArchiveStream, Cluster, IntoArchiveStream, ReadProgress};
use crate::verify::VerifyReport;

/// Extracts an archive read in one pass from any [`Read`](std::io::Read).
///
/// Every device (or only those chosen with [`devices`](Self::devices)) becomes a sparse
/// file `disk-<name>.raw` in the target folder (`vmstate.bin` for the RAM state), every
/// config entry a file of its own name, unless a device is given a [`target`](Self::target)
/// (an existing file or block device, written in place). Devices not chosen are read and
/// validated all the same.
///
/// Files in the folder are written under temporary names (`.<name>.partial`) and renamed
/// to their final names only once the whole archive has validated; on any failure the
/// temporary files are removed and no final name appears. Targets given with
/// [`target`](Self::target) cannot be renamed: they are written in place, and a failure
/// leaves them partly written.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let archive = std::fs::File::open("vzdump-qemu-100.vma")?;
/// let report = vma_reader::Extractor::new("restore")
///     .devices(["drive-scsi0"])
///     .progress(|p| eprintln!("{} archive bytes read", p.archive_bytes))
///     .extract(std::io::BufReader::new(archive))?;
/// assert!(report.damaged.is_empty());
/// # Ok(()) }
/// ```
pub struct Extractor<'a> {
    dir: PathBuf,
    devices: Option<Vec<String>>,
    configs: bool,
    /// Existing targets: device name, path, and its zeroing (`None`: as
    /// [`zeroing`](Extractor::zeroing) says).
    targets: Vec<(String, PathBuf, Option<Zeroing>)>,
    /// Devices written into sinks: device name, the path errors name, the sink, and its
    /// zeroing.
    sink_targets: Vec<SinkTarget>,
    zeroing: Zeroing,
    on_damage: OnDamage,
    verify_seal: bool,
    overwrite: bool,
    sync: bool,
    progress: Option<ProgressFn<'a>>,
}

/// Whether an existing target needs zeros written where the archive stores no data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Zeroing {
    /// Write zeros there: the target may hold anything (the default).
    WriteZeros,
    /// The target reads as zero already (a new or discarded volume): leave those blocks
    /// alone, and skip stored blocks that are all zero too.
    AssumeZeroed,
}

/// One file extraction wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExtractedFile {
    /// The device it holds, or `None` for a config entry.
    pub device: Option<DeviceId>,
    /// The device or config name from the archive.
    pub name: String,
    /// Where it is.
    pub path: PathBuf,
    /// Whether it was an existing target written in place.
    pub in_place: bool,
    /// Bytes written to it (zeros included).
    pub bytes_written: u64,
}

/// A byte range of a device whose data failed its integrity check.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DamagedRange {
    /// The device.
    pub device: DeviceId,
    /// Its name.
    pub name: String,
    /// Byte range within the device.
    pub range: Range<u64>,
}

/// What extraction did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExtractReport {
    /// The files written, devices first (in id order), then configs.
    pub files: Vec<ExtractedFile>,
    /// What reading found (per-device figures, integrity).
    pub verify: VerifyReport,
    /// Device ranges whose data failed its CRC32C, merged and in order (only non-empty
    /// with [`OnDamage::Report`]).
    pub damaged: Vec<DamagedRange>,
}

impl<'a> Extractor<'a> {
    /// Extraction into `dir`, which must exist: every device and config, sparse files,
    /// nothing overwritten, CRC32C and seal checked, damage refused.
    pub fn new(dir: impl Into<PathBuf>) -> Extractor<'a> {
        Extractor {
            dir: dir.into(),
            devices: None,
            configs: true,
            targets: Vec::new(),
            sink_targets: Vec::new(),
            zeroing: Zeroing::WriteZeros,
            on_damage: OnDamage::Fail,
            verify_seal: true,
            overwrite: false,
            sync: false,
            progress: None,
        }
    }

    /// Writes only these devices (by name; `vmstate` for the RAM state). The others are
    /// still read and validated. Devices given a [`target`](Self::target) are always
    /// written.
    pub fn devices<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.devices = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Whether to write the config entries (default true).
    pub fn configs(mut self, yes: bool) -> Self {
        self.configs = yes;
        self
    }

    /// Writes a device into an existing file or block device, in place, instead of a new
    /// file in the folder. Blocks not stored in the archive are written as zeros unless
    /// [`zeroing`](Self::zeroing) says the target reads as zero already. A
    /// regular file shorter than the device is extended; a block device must be at least
    /// as large as the device.
    pub fn target(mut self, device: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.targets.push((device.into(), path.into(), None));
        self
    }

    /// Like [`target`](Self::target), saying for this target alone whether zeros must be
    /// written where the archive stores none, as each line of Proxmox's restore map does.
    pub fn target_zeroing(
        mut self,
        device: impl Into<String>,
        path: impl Into<PathBuf>,
        zeroing: Zeroing,
    ) -> Self {
        self.targets
            .push((device.into(), path.into(), Some(zeroing)));
        self
    }

    /// Writes a device into `sink` instead of a file (an image opened by QEMU's block
    /// layer, say); `label` is what errors name (the image's path). `zeroing` says
    /// whether zeros must be written where the archive stores none, as for
    /// [`target_zeroing`](Self::target_zeroing); with [`Zeroing::AssumeZeroed`], stored
    /// blocks that are all zero are skipped too. The sink is
    /// [finished](sink::DeviceSink::finish) once the whole archive has validated, before
    /// `extract` returns; on failure it is dropped.
    pub fn target_sink(
        mut self,
        device: impl Into<String>,
        label: impl Into<PathBuf>,
        sink: Box<dyn sink::DeviceSink>,
        zeroing: Zeroing,
    ) -> Self {
        self.sink_targets.push(SinkTarget {
            device: device.into(),
            label: label.into(),
            sink,
            zeroed: zeroing == Zeroing::AssumeZeroed,
        });
        self
    }

    /// Whether existing targets need zeros written where the archive stores none
    /// (default [`Zeroing::WriteZeros`]), for targets given without their own.
    pub fn zeroing(mut self, zeroing: Zeroing) -> Self {
        self.zeroing = zeroing;
        self
    }

    /// What to do with a CRC32C or seal mismatch (default [`OnDamage::Fail`]: fail, and
    /// remove what was written). [`OnDamage::Report`]: finish the extraction anyway and
    /// list the damaged ranges in the report.
    pub fn on_damage(mut self, on_damage: OnDamage) -> Self {
        self.on_damage = on_damage;
        self
    }

    /// Whether to hash the headers to check the seal (default true). Without it a seal is
    /// reported as [`SealStatus::NotVerified`](crate::SealStatus::NotVerified).
    pub fn verify_seal(mut self, yes: bool) -> Self {
        self.verify_seal = yes;
        self
    }

    /// Whether existing files under the final names may be replaced (default false:
    /// [`Error::OutputExists`] before anything is written).
    pub fn overwrite(mut self, yes: bool) -> Self {
        self.overwrite = yes;
        self
    }

    /// Whether to fsync every output (and the folder) before reporting success
    /// (default false).
    pub fn sync(mut self, yes: bool) -> Self {
        self.sync = yes;
        self
    }

    /// Called after each extent with how far reading has come.
    pub fn progress(mut self, progress: impl FnMut(&ReadProgress) + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// Reads the archive and extracts it: from any [`Read`](std::io::Read), from an [`ArchiveStream`]
    /// whose header was read already (to print it, say, or to prepare targets from it;
    /// its own [`ReadOptions::verify_seal`] decides whether the seal is checked, damage
    /// is handled as this extractor says), or from a
    /// [`SeekableArchive`](crate::SeekableArchive)'s file (`&archive`).
    pub fn extract(self, input: impl IntoArchiveStream) -> Result<ExtractReport> {
        let options = ReadOptions::new()
            .verify_seal(self.verify_seal)
            .on_damage(self.on_damage);
        let mut stream = input.into_stream(options)?;
        self.extract_from(&mut stream)
    }

    fn extract_from(mut self, stream: &mut dyn ArchiveStream) -> Result<ExtractReport> {
        let header = stream.header().clone();
        let meta = fs::metadata(&self.dir).map_err(|e| Error::write(&self.dir, e))?;
        if !meta.is_dir() {
            return Err(Error::Usage(format!(
                "{} is not a folder",
                self.dir.display()
            )));
        }

        let mut outputs = Outputs::default();
        check_sink_devices(&self.sink_targets, &header.devices)?;
        let mut sinks = self.open_devices(&header.devices, &header.configs, &mut outputs)?;
        attach_sinks(
            std::mem::take(&mut self.sink_targets),
            &header.devices,
            &mut sinks,
        )?;
        let configs = if self.configs {
            self.write_configs(&header.configs, &mut outputs)?
        } else {
            Vec::new()
        };

        let mut damaged: BTreeMap<DeviceId, Vec<Range<u64>>> = BTreeMap::new();
        while let Some(extent) = stream.next_extent()? {
            let data = extent.data();
            for c in extent.clusters() {
                if let Some(sink) = sinks[c.device.index()].as_mut() {
                    sink.add(&c, data)?;
                }
                if let ExtentChecksum::Mismatch { .. } = extent.checksum() {
                    let start = c.device_offset();
                    damaged
                        .entry(c.device)
                        .or_default()
                        .push(start..start + c.span as u64);
                }
            }
            for sink in sinks.iter_mut().flatten() {
                sink.flush(data)?;
            }
            if let Some(p) = self.progress.as_mut() {
                p(&stream.progress());
            }
        }

        // vmstate need not be stored to its end; an existing target gets zeros there.
        let report = stream.report();
        for sink in sinks.iter_mut().flatten() {
            if sink.vmstate && sink.zero_fill {
                // vmstate clusters run 0, 1, 2, ...: the count is the next one.
                let arrived = report
                    .devices
                    .iter()
                    .find(|d| d.id == sink.id)
                    .map_or(0, |d| d.clusters);
                if let Ok(next) = u32::try_from(arrived) {
                    let from = cluster::cluster_offset(next);
                    if from < sink.size {
                        sink.write_zeros(from, sink.size - from)?;
                    }
                }
            }
            if self.sync {
                sink.file
                    .sync_all()
                    .map_err(|e| Error::write(&sink.path, e))?;
            }
            sink.file
                .finish()
                .map_err(|e| Error::write(&sink.path, e))?;
        }

        let mut files = Vec::new();
        for sink in sinks.into_iter().flatten() {
            files.push(ExtractedFile {
                device: Some(sink.id),
                name: sink.name,
                path: sink.final_path,
                in_place: sink.in_place,
                bytes_written: sink.written,
            });
        }
        files.extend(configs);
        outputs.commit(self.sync, &self.dir)?;

        let damaged = damaged
            .into_iter()
            .flat_map(|(id, ranges)| {
                let name = header
                    .device(id)
                    .map_or_else(String::new, |d| d.name.clone());
                merge(ranges).into_iter().map(move |range| DamagedRange {
                    device: id,
                    name: name.clone(),
                    range,
                })
            })
            .collect();
        Ok(ExtractReport {
            files,
            verify: report,
            damaged,
        })
    }

    /// Where each selected device goes, every name, selection and target checked (and
    /// every final name claimed) before anything is created.
    fn plan<'d>(
        &self,
        devices: &'d [DeviceInfo],
        configs: &[vma_format::ConfigEntry],
    ) -> Result<Vec<(&'d DeviceInfo, Plan)>> {
        let known = |name: &str| devices.iter().any(|d| d.name == name);
        for name in self.devices.iter().flatten() {
            if !known(name) {
                return Err(Error::NoSuchDevice(name.clone()));
            }
        }
        for (name, _, _) in &self.targets {
            if !known(name) {
                return Err(Error::NoSuchDevice(name.clone()));
            }
        }
        let target_of = |d: &DeviceInfo| {
            self.targets
                .iter()
                .find(|(n, _, _)| *n == d.name)
                .map(|(_, p, _)| p.clone())
        };
        let selected: Vec<&DeviceInfo> = devices
            .iter()
            .filter(|d| !self.sink_targets.iter().any(|t| t.device == d.name))
            .filter(|d| {
                target_of(d).is_some()
                    || self
                        .devices
                        .as_ref()
                        .is_none_or(|names| names.contains(&d.name))
            })
            .collect();

        // Every final name is checked before the first file is created.
        let mut names = HashSet::new();
        let mut planned = Vec::new();
        for d in &selected {
            match target_of(d) {
                Some(path) => planned.push((*d, Plan::Existing(path))),
                None => {
                    let file = device_file_name(d)?;
                    self.claim_name(&mut names, &file)?;
                    self.claim_name(&mut names, &device_temp_file_name(d))?;
                    planned.push((*d, Plan::New(file)));
                }
            }
        }
        if self.configs {
            // Checked here too, so that a bad config name fails before any file exists.
            for c in configs {
                let name = config_file_name(&c.name)?;
                self.claim_name(&mut names, name)?;
            }
        }
        Ok(planned)
    }

    /// Plans and opens every device output: checks names, selections and targets before
    /// creating anything.
    fn open_devices(
        &self,
        devices: &[DeviceInfo],
        configs: &[vma_format::ConfigEntry],
        outputs: &mut Outputs,
    ) -> Result<Vec<Option<DeviceSink>>> {
        let planned = self.plan(devices, configs)?;

        // Existing targets: open and size-check all before changing any.
        let mut opened = Vec::new();
        for (d, plan) in &planned {
            if let Plan::Existing(path) = plan {
                let (file, regular) = open_existing(path, d)?;
                opened.push((d.id, file, regular));
            }
        }

        let mut sinks: Vec<Option<DeviceSink>> = (0..256).map(|_| None).collect();
        for (d, plan) in planned {
            let sink = match plan {
                Plan::Existing(path) => {
                    let at = opened
                        .iter()
                        .position(|(id, _, _)| *id == d.id)
                        .expect("opened");
                    let (_, file, regular) = opened.swap_remove(at);
                    if regular {
                        let len = file.metadata().map_err(|e| Error::write(&path, e))?.len();
                        if len < d.size {
                            file.set_len(d.size).map_err(|e| Error::write(&path, e))?;
                        }
                    }
                    let zeroing = self
                        .targets
                        .iter()
                        .find(|(n, _, _)| *n == d.name)
                        .and_then(|(_, _, z)| *z)
                        .unwrap_or(self.zeroing);
                    let zeroed = zeroing == Zeroing::AssumeZeroed;
                    DeviceSink::new(d, file, path.clone(), path, true, zeroed)
                }
                Plan::New(name) => {
                    let final_path = self.dir.join(&name);
                    let temp_name = device_temp_file_name(d);
                    let (file, temp) = outputs.create(
                        &self.dir,
                        &name,
                        Some(&temp_name),
                        &final_path,
                        self.overwrite,
                    )?;
                    file.set_len(d.size).map_err(|e| Error::write(&temp, e))?;
                    DeviceSink::new(d, file, temp, final_path, false, true)
                }
            };
            sinks[d.id.index()] = Some(sink);
        }
        Ok(sinks)
    }

    /// Writes every config entry into the folder under its final name at once, each
    /// complete before it appears (written under a temporary name, then renamed), as
    /// Proxmox's restore needs them before it reads the listing and writes its map. Every
    /// name is checked before the first file is written; an existing file is
    /// [`Error::OutputExists`] unless [`overwrite`](Self::overwrite). Files are synced if
    /// [`sync`](Self::sync) says so.
    ///
    /// Use [`configs`](Self::configs)`(false)` for the extraction that follows.
    pub fn write_config_files(
        &self,
        configs: &[vma_format::ConfigEntry],
    ) -> Result<Vec<ExtractedFile>> {
        let mut names = HashSet::new();
        for c in configs {
            let name = config_file_name(&c.name)?;
            if !names.insert(name) {
                return Err(Error::NameCollision {
                    name: name.to_owned(),
                });
            }
        }
        let mut files = Vec::new();
        for c in configs {
            let mut outputs = Outputs::default();
            files.extend(self.write_configs(std::slice::from_ref(c), &mut outputs)?);
            outputs.commit(self.sync, &self.dir)?;
        }
        Ok(files)
    }

    fn claim_name(&self, names: &mut HashSet<String>, file: &str) -> Result<()> {
        if !names.insert(file.to_owned()) {
            return Err(Error::NameCollision {
                name: file.to_owned(),
            });
        }
        Ok(())
    }

    fn write_configs(
        &self,
        configs: &[vma_format::ConfigEntry],
        outputs: &mut Outputs,
    ) -> Result<Vec<ExtractedFile>> {
        let mut files = Vec::new();
        for c in configs {
            let name = config_file_name(&c.name)?;
            let final_path = self.dir.join(name);
            let (mut file, temp) =
                outputs.create(&self.dir, name, None, &final_path, self.overwrite)?;
            file.write_all(&c.data)
                .map_err(|e| Error::write(&temp, e))?;
            if self.sync {
                file.sync_all().map_err(|e| Error::write(&temp, e))?;
            }
            files.push(ExtractedFile {
                device: None,
                name: c.name.clone(),
                path: final_path,
                in_place: false,
                bytes_written: c.data.len() as u64,
            });
        }
        Ok(files)
    }
}

/// A device given a sink with [`Extractor::target_sink`].
struct SinkTarget {
    device: String,
    label: PathBuf,
    sink: Box<dyn sink::DeviceSink>,
    zeroed: bool,
}

/// Every sink target must name a device of the archive (checked before any file exists).
fn check_sink_devices(targets: &[SinkTarget], devices: &[DeviceInfo]) -> Result<()> {
    match targets
        .iter()
        .find(|t| !devices.iter().any(|d| d.name == t.device))
    {
        Some(t) => Err(Error::NoSuchDevice(t.device.clone())),
        None => Ok(()),
    }
}

/// Puts every sink target in its device's place.
fn attach_sinks(
    targets: Vec<SinkTarget>,
    devices: &[DeviceInfo],
    sinks: &mut [Option<DeviceSink>],
) -> Result<()> {
    for t in targets {
        let d = devices
            .iter()
            .find(|d| d.name == t.device)
            .expect("checked");
        let path = t.label;
        sinks[d.id.index()] = Some(DeviceSink::new(
            d,
            Output::Sink(t.sink),
            path.clone(),
            path,
            true,
            t.zeroed,
        ));
    }
    Ok(())
}

/// Opens an existing target for writing and checks that it can hold `d`: a block device
/// at least as large, or a regular file (any size; it grows). Returns the file and whether
/// it is a regular file.
fn open_existing(path: &Path, d: &DeviceInfo) -> Result<(File, bool)> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::write(path, e))?;
    let meta = file.metadata().map_err(|e| Error::write(path, e))?;
    let len = if meta.file_type().is_block_device() {
        (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::write(path, e))?
    } else if meta.is_file() {
        u64::MAX
    } else {
        return Err(Error::Usage(format!(
            "{}: a target must be a regular file or a block device",
            path.display()
        )));
    };
    if len < d.size {
        return Err(Error::TargetTooSmall {
            path: path.to_owned(),
            device: d.name.clone(),
            target_size: len,
            size: d.size,
        });
    }
    Ok((file, meta.is_file()))
}

enum Plan {
    Existing(PathBuf),
    New(String),
}

/// Files created under temporary names, renamed on commit, removed otherwise (also when
/// unwinding from a panic).
#[derive(Default)]
struct Outputs {
    /// (temporary, final) pairs.
    files: Vec<(PathBuf, PathBuf)>,
    finals: HashSet<PathBuf>,
    committed: bool,
}

impl Outputs {
    /// Creates a new, empty temporary file in `dir` for the final path, which must not
    /// exist unless `overwrite`, and must not be claimed twice. The temporary file is
    /// named `temp_name` if given and free, else `.<name>.partial`, else a unique name.
    fn create(
        &mut self,
        dir: &Path,
        name: &str,
        temp_name: Option<&str>,
        final_path: &Path,
        overwrite: bool,
    ) -> Result<(File, PathBuf)> {
        if !self.finals.insert(final_path.to_owned()) {
            return Err(Error::NameCollision {
                name: name.to_owned(),
            });
        }
        if !overwrite && fs::symlink_metadata(final_path).is_ok() {
            return Err(Error::OutputExists(final_path.to_owned()));
        }
        let base = temp_name.map_or_else(|| format!(".{name}.partial"), str::to_owned);
        for attempt in 0..1000u32 {
            let temp_name = if attempt == 0 && base.len() <= MAX_FILE_NAME_LEN {
                base.clone()
            } else {
                format!(
                    ".vma-{}-{}-{attempt}.partial",
                    std::process::id(),
                    self.files.len()
                )
            };
            let temp = dir.join(temp_name);
            // create_new: never follows or reuses whatever is already there.
            match OpenOptions::new().write(true).create_new(true).open(&temp) {
                Ok(file) => {
                    self.files.push((temp.clone(), final_path.to_owned()));
                    return Ok((file, temp));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::write(temp, e)),
            }
        }
        Err(Error::Usage(format!(
            "{}: no free temporary name",
            dir.display()
        )))
    }

    /// Renames every temporary file to its final name. If one rename fails, those already
    /// renamed are removed again.
    fn commit(&mut self, sync: bool, dir: &Path) -> Result<()> {
        for i in 0..self.files.len() {
            let (temp, fin) = self.files[i].clone();
            if let Err(e) = fs::rename(&temp, &fin) {
                for (_, done) in &self.files[..i] {
                    let _ = fs::remove_file(done);
                }
                // The ones not renamed are removed by drop.
                self.files.drain(..i);
                return Err(Error::write(fin, e));
            }
        }
        self.committed = true;
        if sync {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::write(dir, e))?;
        }
        Ok(())
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        if !self.committed {
            for (temp, _) in &self.files {
                let _ = fs::remove_file(temp);
            }
        }
    }
}

/// Writes one device's clusters, coalescing adjacent blocks into large writes.
struct DeviceSink {
    id: DeviceId,
    name: String,
    vmstate: bool,
    size: u64,
    file: Output,
    /// Where writes go now (the temporary path for a new file).
    path: PathBuf,
    final_path: PathBuf,
    in_place: bool,
    /// Skip stored blocks that are all zero: the target reads as zero there already.
    skip_zero_blocks: bool,
    /// Write zeros where blocks are not stored.
    zero_fill: bool,
    /// Pending data run: device offset, offset in the extent data, length.
    run: Option<(u64, usize, usize)>,
    /// Pending zero run: device offset, length.
    zeros: Option<(u64, u64)>,
    written: u64,
}

impl DeviceSink {
    fn new(
        d: &DeviceInfo,
        file: impl Into<Output>,
        path: PathBuf,
        final_path: PathBuf,
        in_place: bool,
        assume_zeroed: bool,
    ) -> DeviceSink {
        DeviceSink {
            id: d.id,
            name: d.name.clone(),
            vmstate: d.is_vmstate(),
            size: d.size,
            file: file.into(),
            path,
            final_path,
            in_place,
            skip_zero_blocks: assume_zeroed,
            zero_fill: !assume_zeroed,
            run: None,
            zeros: None,
            written: 0,
        }
    }

    /// Queues a cluster's blocks: stored ones as data, the others as zeros if needed.
    /// `data` is the extent's data, which runs queued earlier point into.
    fn add(&mut self, c: &Cluster<'_>, data: &[u8]) -> Result<()> {
        let base = c.device_offset();
        let blocks = c.span.div_ceil(VMA_BLOCK_SIZE);
        let mut stored = c.mask.stored_block_offsets().peekable();
        for j in 0..blocks {
            let at = base + (j * VMA_BLOCK_SIZE) as u64;
            let len = VMA_BLOCK_SIZE.min(c.span - j * VMA_BLOCK_SIZE);
            match stored.peek() {
                Some(&(sj, offset)) if sj == j => {
                    stored.next();
                    if self.skip_zero_blocks && cluster::is_zero(&c.data[offset..offset + len]) {
                        continue;
                    }
                    self.queue_data(at, c.data_offset() + offset, len, data)?;
                }
                _ if self.zero_fill => self.queue_zeros(at, len as u64)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn queue_data(&mut self, at: u64, pos: usize, len: usize, data: &[u8]) -> Result<()> {
        if let Some((start, p, l)) = &mut self.run {
            if *start + *l as u64 == at && *p + *l == pos {
                *l += len;
                return Ok(());
            }
        }
        self.flush_data(data)?;
        self.run = Some((at, pos, len));
        Ok(())
    }

    fn queue_zeros(&mut self, at: u64, len: u64) -> Result<()> {
        if let Some((start, l)) = &mut self.zeros {
            if *start + *l == at {
                *l += len;
                return Ok(());
            }
        }
        self.flush_zeros()?;
        self.zeros = Some((at, len));
        Ok(())
    }

    fn flush_data(&mut self, data: &[u8]) -> Result<()> {
        if let Some((at, pos, len)) = self.run.take() {
            self.file
                .write_all_at(&data[pos..pos + len], at)
                .map_err(|e| Error::write(&self.path, e))?;
            self.written += len as u64;
        }
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<()> {
        if let Some((at, len)) = self.zeros.take() {
            self.write_zeros(at, len)?;
        }
        Ok(())
    }

    /// Writes every queued run; `data` is the current extent's data, which the buffer
    /// reuse makes invalid after this call.
    fn flush(&mut self, data: &[u8]) -> Result<()> {
        self.flush_data(data)?;
        self.flush_zeros()
    }

    fn write_zeros(&mut self, at: u64, len: u64) -> Result<()> {
        self.file
            .write_zeroes(at, len)
            .map_err(|e| Error::write(&self.path, e))?;
        self.written += len;
        Ok(())
    }
}

/// Sorts and merges overlapping or touching ranges.
fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}
