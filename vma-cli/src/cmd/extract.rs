//! `vma extract`.

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use vma_reader::{Extractor, OnDamage, ReadOptions, Zeroing};

use super::list::print_listing;
use super::open_stream;
use super::verify::damage_message;
use crate::error::{CliError, Exit, Result};
use crate::mapfile::{self, MapTarget};
use crate::progress::{statistics, ReadingProgress};
use crate::qemu::{self, NbdSink};

/// Arguments of `vma extract`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The archive, or `-` for standard input.
    file: PathBuf,
    /// The directory to create and extract into; it must not exist.
    targetdir: PathBuf,
    /// Extract only these drives (comma-separated device names); the rest is still
    /// validated. May be given more than once.
    #[arg(short = 'd', value_delimiter = ',')]
    drives: Vec<String>,
    /// Read a restore map (e.g. a FIFO that Proxmox's qmrestore writes) that maps devices
    /// to existing files or block devices; the listing is printed before it is read.
    #[arg(short = 'r')]
    map: Option<PathBuf>,
    /// Print Proxmox's progress lines and statistics.
    #[arg(short = 'v')]
    verbose: bool,
    /// On data that fails its checksum, extract anyway and list the damaged ranges.
    #[arg(long)]
    continue_on_damage: bool,
    /// fsync every output before reporting success.
    #[arg(long)]
    sync: bool,
    /// Write each disk as a new image in this format (qcow2, vmdk, vdi, vhdx, qed, ...;
    /// default raw) through `qemu-img create` and `qemu-storage-daemon`:
    /// `disk-<name>.<format>`, sparse, under a temporary name until the archive validated.
    #[arg(long, conflicts_with = "map", value_name = "FORMAT")]
    format: Option<String>,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let result = open_and_extract(&args);
    if result.is_err() {
        if let Some(map) = &args.map {
            release_map_writer(map);
        }
    }
    result
}

/// Proxmox's restore opens the map FIFO for writing right after starting `vma`, which
/// blocks until `vma` opens it for reading. An extraction that fails before it reads the
/// map (a damaged archive, a missing target directory) opens it without blocking and holds
/// it until a writer has opened it too (at most [`RELEASE_WAIT`]), so that the restore
/// sees the failure instead of waiting forever, however the two processes are scheduled.
fn release_map_writer(map: &Path) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    if !fs::metadata(map).is_ok_and(|m| m.file_type().is_fifo()) {
        return;
    }
    let Ok(mut fifo) = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(map)
    else {
        return;
    };
    let start = std::time::Instant::now();
    let tick = Timespec {
        tv_sec: 0,
        tv_nsec: 10_000_000,
    };
    while start.elapsed() < RELEASE_WAIT {
        // Data, or a writer that came and went (Linux reports no hang-up for a FIFO
        // that never had a writer since it was opened).
        let mut fds = [PollFd::new(&fifo, PollFlags::IN)];
        if poll(&mut fds, Some(&tick)).is_ok_and(|n| n > 0) {
            return;
        }
        let mut buf = [0u8; 512];
        match fifo.read(&mut buf) {
            // No writer yet: end of file.
            Ok(0) => {}
            // A writer is there (no data yet), or something else: done either way.
            _ => return,
        }
    }
}

/// How long a failed `extract -r` waits for the restore to open the map FIFO.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn open_and_extract(args: &Args) -> Result<()> {
    let stream = open_stream(&args.file, ReadOptions::default())?;
    let header = stream.header().clone();

    fs::create_dir(&args.targetdir).map_err(|e| {
        CliError::new(
            Exit::Io,
            format!(
                "unable to create target directory {} - {e}",
                args.targetdir.display()
            ),
        )
    })?;
    let result = extract(args, stream, &header);
    if result.is_err() {
        // Leave nothing that looks like a result: the extractor removed its files; the
        // directory we made goes too if it is empty.
        let _ = fs::remove_dir(&args.targetdir);
    }
    result
}

fn extract(
    args: &Args,
    stream: vma_reader::PrefetchingReader,
    header: &vma_format::ArchiveHeader,
) -> Result<()> {
    let mut extractor = Extractor::new(&args.targetdir).sync(args.sync);
    let mut images = NewImages::default();
    let mut selected: Option<Vec<String>> = (!args.drives.is_empty()).then(|| args.drives.clone());

    if let Some(map_path) = &args.map {
        // Proxmox's restore reads qemu-server.conf from the target directory the moment
        // it sees the listing's CTIME line, then writes the map: so the config files
        // first, under their final names, then the listing, then the map.
        extractor.write_config_files(&header.configs)?;
        extractor = extractor.configs(false);
        print_listing(header)?;
        let (map_extractor, wanted) = apply_map(extractor, map_path, header, selected.as_deref())?;
        extractor = map_extractor;
        selected = Some(wanted);
    } else {
        extractor = announce_devices(args, header, selected.as_deref(), extractor, &mut images)?;
    }
    if let Some(names) = &selected {
        for name in &args.drives {
            if !header.devices.iter().any(|d| &d.name == name) {
                return Err(CliError::new(
                    Exit::NotFound,
                    format!("no device named {name} in the archive"),
                ));
            }
        }
        extractor = extractor.devices(names.clone());
    }

    let mut progress = ReadingProgress::new(args.verbose, header, "extract");
    let report = extractor
        .on_damage(if args.continue_on_damage {
            OnDamage::Report
        } else {
            OnDamage::Fail
        })
        .progress(|p| progress.update(p))
        .extract(stream);
    progress.finish();
    let report = report?;
    images.commit()?;

    if args.verbose {
        for line in statistics(&report.verify) {
            println!("{line}");
        }
    }
    if !report.damaged.is_empty() {
        eprintln!("vma: {}", damage_message(&report.verify));
        for r in &report.damaged {
            eprintln!(
                "vma: damaged: {} bytes {}..{}",
                r.name, r.range.start, r.range.end
            );
        }
        return Err(CliError::new(
            Exit::Damaged,
            format!(
                "extracted with {} damaged ranges (listed above)",
                report.damaged.len()
            ),
        ));
    }
    Ok(())
}

/// Prints a `DEVINFO` line per device to write, with the temporary name it is written
/// under; with `--format`, creates the new images and gives them to the extractor.
fn announce_devices<'a>(
    args: &Args,
    header: &vma_format::ArchiveHeader,
    selected: Option<&[String]>,
    mut extractor: Extractor<'a>,
    images: &mut NewImages,
) -> Result<Extractor<'a>> {
    let format = args.format.as_deref().filter(|f| *f != "raw");
    if let Some(f) = format {
        qemu::check_format(f, "--format")?;
    }
    for device in &header.devices {
        if device.is_vmstate() || selected.is_some_and(|s| !s.contains(&device.name)) {
            continue;
        }
        // The name Proxmox prints: the temporary one, renamed once all validated.
        let file = vma_reader::device_file_name(device)?;
        let temp = args
            .targetdir
            .join(vma_reader::device_temp_file_name(device));
        match format {
            None => println!("DEVINFO {} {}", temp.display(), device.size),
            Some(f) => {
                let (sink, temp) = images.create(&args.targetdir, &file, &temp, device, f)?;
                println!("DEVINFO {} {}", temp.display(), device.size);
                // A new image reads as zero: zeros need not be written.
                extractor = extractor.target_sink(
                    &device.name,
                    &temp,
                    Box::new(sink),
                    Zeroing::AssumeZeroed,
                );
            }
        }
    }
    Ok(extractor)
}

/// Images made for `--format`: created under temporary names, renamed once the archive
/// validated, removed otherwise.
#[derive(Default)]
struct NewImages {
    /// (temporary, final) pairs.
    files: Vec<(PathBuf, PathBuf)>,
}

impl NewImages {
    /// Creates `tmp-disk-<name>.<format>` of the device's size and opens it; `file` and
    /// `temp` are the raw names (`disk-<name>.raw`, `.../tmp-disk-<name>.raw`).
    fn create(
        &mut self,
        dir: &Path,
        file: &str,
        temp: &Path,
        device: &vma_format::DeviceInfo,
        format: &str,
    ) -> Result<(NbdSink, PathBuf)> {
        let rename = |name: &str| {
            let stem = name.strip_suffix(".raw").unwrap_or(name);
            let name = format!("{stem}.{format}");
            if name.len() > vma_reader::MAX_FILE_NAME_LEN {
                return Err(CliError::usage(format!(
                    "{name}: the file name is too long for the device {}",
                    device.name
                )));
            }
            Ok(name)
        };
        let final_path = dir.join(rename(file)?);
        let temp_name = rename(&temp.file_name().unwrap_or_default().to_string_lossy())?;
        let temp = dir.join(temp_name);
        qemu::create_image(&temp, format, device.size)?;
        self.files.push((temp.clone(), final_path));
        Ok((NbdSink::open(&temp, format)?, temp))
    }

    /// Gives every image its final name.
    fn commit(&mut self) -> Result<()> {
        for (temp, fin) in &self.files {
            if fs::symlink_metadata(fin).is_ok() {
                return Err(CliError::new(
                    Exit::Io,
                    format!("{}: already exists", fin.display()),
                ));
            }
            fs::rename(temp, fin).map_err(|e| CliError::io(fin.display(), e))?;
        }
        self.files.clear();
        Ok(())
    }
}

impl Drop for NewImages {
    fn drop(&mut self) {
        for (temp, _) in &self.files {
            let _ = fs::remove_file(temp);
        }
    }
}

/// Opens an existing image as `format` through QEMU to restore `device` into; it must be
/// at least as large as the device.
fn open_target(device: &vma_format::DeviceInfo, path: &Path, format: &str) -> Result<NbdSink> {
    qemu::check_format(format, &path.display().to_string())?;
    let sink = NbdSink::open(path, format)?;
    if sink.size() < device.size {
        return Err(vma_reader::Error::TargetTooSmall {
            path: path.to_owned(),
            device: device.name.clone(),
            target_size: sink.size(),
            size: device.size,
        }
        .into());
    }
    Ok(sink)
}

/// Reads the restore map (a FIFO Proxmox's restore writes once it has read the listing)
/// and gives each mapped device its target. Returns the extractor and the devices to
/// write.
fn apply_map<'a>(
    mut extractor: Extractor<'a>,
    map_path: &Path,
    header: &vma_format::ArchiveHeader,
    selected: Option<&[String]>,
) -> Result<(Extractor<'a>, Vec<String>)> {
    let file = fs::File::open(map_path).map_err(|e| {
        CliError::new(
            Exit::Io,
            format!("unable to open fifo {} - {e}", map_path.display()),
        )
    })?;
    let map = mapfile::parse(BufReader::new(file)).map_err(|e| CliError::usage(e.to_string()))?;
    if let Some(name) = map
        .keys()
        .find(|name| header.device_by_name(name).is_none())
    {
        return Err(CliError::new(
            Exit::NotFound,
            format!("the map names device {name}, which the archive does not have"),
        ));
    }
    let mut wanted = Vec::new();
    for device in header.devices.iter().filter(|d| !d.is_vmstate()) {
        if selected.is_some_and(|s| !s.contains(&device.name)) {
            continue;
        }
        match map.get(&device.name) {
            None => {
                return Err(CliError::usage(format!(
                    "no device name mapping for {}",
                    device.name
                )))
            }
            Some(MapTarget::Skip) => {}
            Some(MapTarget::Path {
                path,
                write_zero,
                format,
            }) => {
                let zeroing = if *write_zero {
                    Zeroing::WriteZeros
                } else {
                    Zeroing::AssumeZeroed
                };
                extractor = match format.as_deref().filter(|f| *f != "raw") {
                    // Any other format through QEMU's block layer.
                    Some(f) => {
                        let sink = open_target(device, path, f)?;
                        extractor.target_sink(&device.name, path, Box::new(sink), zeroing)
                    }
                    None => extractor.target_zeroing(&device.name, path, zeroing),
                };
                wanted.push(device.name.clone());
            }
        }
    }
    if header.devices.iter().any(|d| d.is_vmstate()) {
        wanted.push(vma_format::VMSTATE_DEVICE_NAME.to_string());
    }
    Ok((extractor, wanted))
}
