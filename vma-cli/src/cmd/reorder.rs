//! `vma reorder`: an archive rewritten in canonical order, with the integrity extension.
//!
//! The input is a plain archive file, opened with the seekable reader (its index: 8 bytes
//! per stored cluster) and checked in full first (every header, and the data's CRC32Cs if
//! it has them), so damage is refused rather than sealed into a new archive. The output is
//! written device by device in ascending cluster order, under a temporary name that takes
//! the final one only once complete.

use std::path::PathBuf;

use vma_format::VMA_CLUSTER_SIZE;
use vma_reader::{DeviceReader, SeekableArchive, VerifyOptions};
use vma_writer::{Builder, FileWriter};

use super::open_seekable;
use crate::error::{CliError, Exit, Result};
use crate::progress::Progress;

/// Bytes copied per write call: 64 clusters.
const CHUNK: usize = 64 * VMA_CLUSTER_SIZE;

/// Arguments of `vma reorder`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The archive to read (a plain archive file, in any cluster order).
    input: PathBuf,
    /// The archive to write; it must not exist. It appears under this name only once
    /// complete.
    output: PathBuf,
    /// Give the output this uuid instead of the input's (see `vma create --uuid`).
    #[arg(long, value_name = "UUID", conflicts_with = "uuid_from")]
    uuid: Option<String>,
    /// Give the output the uuid derived from NAME (see `vma create --uuid-from`).
    #[arg(long, value_name = "NAME")]
    uuid_from: Option<String>,
    /// fsync the archive and its directory before reporting success.
    #[arg(long)]
    sync: bool,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let uuid = super::create::pinned_uuid(args.uuid.as_deref(), args.uuid_from.as_deref())?;
    let archive = open_seekable(&args.input, None)?;
    check_input(&archive, &args)?;
    let header = archive.header();
    let mut builder = Builder::new();
    builder
        .uuid(uuid.unwrap_or(header.uuid))
        .ctime(header.ctime)
        .integrity(true)
        .canonical_order(true)
        .fsync(args.sync);
    for c in &header.configs {
        builder.add_config(&c.name, &c.data)?;
    }
    let mut devices = Vec::new();
    for d in &header.devices {
        let reader = archive.device(d.id)?;
        let target = if d.is_vmstate() {
            Target::Vmstate(builder.add_vmstate(d.size)?)
        } else {
            Target::Disk(builder.add_device(&d.name, d.size)?)
        };
        devices.push((reader, target));
    }
    let total = devices.iter().map(|(r, _)| r.size()).sum();
    let writer = builder.create_file(&args.output)?;
    let mut progress = Progress::bar(true, total, "reorder");
    let mut done = 0;
    for (reader, target) in &devices {
        if let Err(e) = copy(&writer, reader, target, &mut |n| {
            progress.update(done + n);
        }) {
            progress.finish();
            let _ = writer.abort();
            return Err(e);
        }
        done += reader.size();
    }
    progress.finish();
    writer.finish()?;
    Ok(())
}

/// Where a device of the input goes.
enum Target {
    Disk(vma_writer::Device),
    Vmstate(vma_writer::VmState),
}

/// Refuses an input whose data does not check out (the extension's CRC32Cs, the seal).
fn check_input(archive: &SeekableArchive, args: &Args) -> Result<()> {
    let report = vma_reader::verify(archive, VerifyOptions::new())?;
    if report.is_ok() {
        return Ok(());
    }
    let damaged = report.integrity.damaged.len();
    Err(CliError::new(
        Exit::Damaged,
        format!(
            "{}: the archive is damaged ({damaged} extents fail their data checksum, \
             seal {:?}); not reordered",
            args.input.display(),
            report.integrity.seal
        ),
    ))
}

/// Copies one device in ascending order, whole chunks of zero clusters without reading.
fn copy(
    writer: &FileWriter,
    reader: &DeviceReader,
    target: &Target,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let size = reader.size();
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(CHUNK as u64) as usize;
        let first = (offset / VMA_CLUSTER_SIZE as u64) as u32;
        let last = ((offset + len as u64 - 1) / VMA_CLUSTER_SIZE as u64) as u32;
        match target {
            Target::Disk(dev) if !(first..=last).any(|c| reader.is_allocated(c)) => {
                writer.write_zero_range(*dev, offset, len as u64)?;
            }
            _ => {
                let data = &mut buf[..len];
                let n = reader
                    .read_at(data, offset)
                    .map_err(|e| CliError::io(format!("device {}", reader.info().name), e))?;
                if n != len {
                    return Err(CliError::new(
                        Exit::Damaged,
                        format!("device {}: short read at byte {offset}", reader.info().name),
                    ));
                }
                match target {
                    Target::Disk(dev) => writer.write_range(*dev, offset, data)?,
                    Target::Vmstate(vm) => writer.append_vmstate(*vm, data)?,
                }
            }
        }
        offset += len as u64;
        progress(offset);
    }
    Ok(())
}
