//! `vma extract`.

use std::fs;
use std::io::BufReader;
use std::path::PathBuf;

use vma_reader::{Extractor, ReadOptions};

use super::list::print_listing;
use super::open_stream;
use super::verify::damage_message;
use crate::error::{CliError, Exit, Result};
use crate::mapfile::{self, MapTarget};
use crate::progress::{LineStyle, Progress};

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
}

pub(crate) fn run(args: Args) -> Result<()> {
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
    let result = extract(&args, stream, &header);
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
    let mut selected: Option<Vec<String>> = (!args.drives.is_empty()).then(|| args.drives.clone());

    if let Some(map_path) = &args.map {
        // Proxmox reads the listing, prepares the volumes, then writes the map.
        print_listing(header)?;
        let file = fs::File::open(map_path).map_err(|e| {
            CliError::new(
                Exit::Io,
                format!("unable to open fifo {} - {e}", map_path.display()),
            )
        })?;
        let map =
            mapfile::parse(BufReader::new(file)).map_err(|e| CliError::usage(e.to_string()))?;
        let mut wanted = Vec::new();
        for device in header.devices.iter().filter(|d| !d.is_vmstate()) {
            if selected.as_ref().is_some_and(|s| !s.contains(&device.name)) {
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
                    if let Some(f) = format.as_deref().filter(|f| *f != "raw") {
                        return Err(CliError::usage(format!(
                            "{}: format '{f}' is not supported, only raw",
                            device.name
                        )));
                    }
                    extractor = extractor.target_zeroing(&device.name, path, *write_zero);
                    wanted.push(device.name.clone());
                }
            }
        }
        if header.devices.iter().any(|d| d.is_vmstate()) {
            wanted.push(vma_format::VMSTATE_DEVICE_NAME.to_string());
        }
        selected = Some(wanted);
    } else {
        for device in &header.devices {
            if device.is_vmstate() || selected.as_ref().is_some_and(|s| !s.contains(&device.name)) {
                continue;
            }
            let name = vma_reader::device_file_name(device)?;
            println!(
                "DEVINFO {} {}",
                args.targetdir.join(name).display(),
                device.size
            );
        }
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

    let total = stream_total(header);
    let header_size = stream.header_size();
    let mut progress = Progress::new(args.verbose, total, LineStyle::Read, "extract");
    let report = extractor
        .continue_on_damage(args.continue_on_damage)
        .progress(|pos| progress.update(pos.saturating_sub(header_size)))
        .extract_stream(stream);
    progress.finish();
    let report = report?;

    if args.verbose {
        print_statistics(&report.verify);
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

fn stream_total(header: &vma_format::ArchiveHeader) -> u64 {
    header.devices.iter().map(|d| d.size).sum()
}

/// The statistics Proxmox's `vma extract -v` ends with.
fn print_statistics(r: &vma_reader::VerifyReport) {
    let read: u64 = r
        .devices
        .iter()
        .map(|d| d.clusters * vma_format::VMA_CLUSTER_SIZE as u64)
        .sum();
    if read == 0 {
        println!("vma archive contains no image data");
        return;
    }
    // As the reference counts: whole zero clusters are "sparse"; zero blocks inside
    // stored clusters (and blocks past a device's end) are the "4K zero blocks".
    let sparse: u64 = r
        .devices
        .iter()
        .map(|d| d.zero_clusters * vma_format::VMA_CLUSTER_SIZE as u64)
        .sum();
    println!(
        "total bytes read {read}, sparse bytes {sparse} ({}%)",
        format_g3(100.0 * sparse as f64 / read as f64)
    );
    let data = read.saturating_sub(sparse);
    if data > 0 {
        let stored: u64 = r.devices.iter().map(|d| d.stored_bytes).sum();
        let partial_zero = data.saturating_sub(stored);
        println!(
            "space reduction due to 4K zero blocks {}%",
            format_g3(100.0 * partial_zero as f64 / data as f64)
        );
    }
}

/// C's `%.3g`: three significant digits, trailing zeros dropped.
fn format_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let exp = x.abs().log10().floor() as i32;
    if !(-5..3).contains(&exp) {
        let s = format!("{x:.2e}");
        return s;
    }
    let decimals = (2 - exp).max(0) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::format_g3;

    #[test]
    fn percent_like_printf_g3() {
        assert_eq!(format_g3(98.5123), "98.5");
        assert_eq!(format_g3(5.08), "5.08");
        assert_eq!(format_g3(0.818), "0.818");
        assert_eq!(format_g3(100.0), "100");
        assert_eq!(format_g3(3.72), "3.72");
        assert_eq!(format_g3(54.2), "54.2");
        assert_eq!(format_g3(0.0), "0");
    }
}
