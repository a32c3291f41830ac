//! `vma index`: the sidecar index that lets `serve`, `cat`, `verify --quick` and `list
//! --json` read a `.vma.zst` as zstd (and so Proxmox's vzdump) writes it, one stream
//! without a seek table, at random (spec/FORMAT.md, "Sidecar index of a stock .vma.zst").
//! One pass over the compressed file; the index is written under a temporary name in its
//! directory and takes its name only once complete.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use vma_reader::zstd_index::{build, ZstdIndexError};

use crate::error::{CliError, Exit, Result};

/// Arguments of `vma index`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The zstd-compressed archive (one stream, as `zstd --rsyncable --threads=N` and so
    /// vzdump write it).
    file: PathBuf,
    /// Write the index here instead of ARCHIVE.idx (e.g. ARCHIVE.vma.zst.idx, where the
    /// other commands look for it). It must not exist, unless --force.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Replace an existing index.
    #[arg(long)]
    force: bool,
}

/// Where the index of `archive` is looked for by default: its name with `.idx` added.
pub(crate) fn default_index(archive: &Path) -> PathBuf {
    let mut name = archive.as_os_str().to_owned();
    name.push(".idx");
    PathBuf::from(name)
}

/// The error of an output that exists (without `--force`).
fn exists(output: &Path) -> CliError {
    CliError::new(
        Exit::Io,
        format!("{} already exists (--force replaces it)", output.display()),
    )
}

/// The CLI error of an index error.
pub(crate) fn index_error(e: ZstdIndexError) -> CliError {
    let exit = if e.is_usage() {
        Exit::Usage
    } else if e.is_io() {
        Exit::Io
    } else {
        Exit::Damaged
    };
    CliError::new(exit, e.to_string())
}

pub(crate) fn run(args: Args) -> Result<()> {
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_index(&args.file));
    if !args.force && fs::symlink_metadata(&output).is_ok() {
        return Err(exists(&output));
    }
    let started = Instant::now();
    let input = File::open(&args.file).map_err(|e| CliError::io(args.file.display(), e))?;
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = output
        .file_name()
        .ok_or_else(|| CliError::usage(format!("{}: not a file name", output.display())))?;
    // A temporary file beside the output, removed if anything fails (or dropped).
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let temp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".partial")
        .tempfile_in(&dir)
        .map_err(|e| CliError::io(dir.display(), e))?;
    let temp_name = temp.path().display().to_string();
    let mut out = BufWriter::with_capacity(1 << 20, temp.as_file());
    let summary =
        build(BufReader::with_capacity(1 << 20, input), &mut out).map_err(|e| match e {
            ZstdIndexError::Io { .. } => {
                CliError::new(Exit::Io, format!("{}: {e}", args.file.display()))
            }
            ZstdIndexError::Write(e) => CliError::io(&temp_name, e),
            other => {
                let mut c = index_error(other);
                c.message = format!("{}: {}", args.file.display(), c.message);
                c
            }
        })?;
    out.flush().map_err(|e| CliError::io(&temp_name, e))?;
    drop(out);
    // The archive's header reads, so that opening reads them from the index.
    let archive = File::open(&args.file).map_err(|e| CliError::io(args.file.display(), e))?;
    let mut summary = summary;
    summary.index_len =
        vma_reader::zstd_index::add_headers(archive, temp.as_file()).map_err(|e| {
            let e = CliError::from(e);
            CliError::new(e.exit, format!("{}: {}", args.file.display(), e.message))
        })?;
    temp.as_file()
        .sync_all()
        .map_err(|e| CliError::io(&temp_name, e))?;
    // Without --force, an index that appeared meanwhile is not replaced either.
    let persisted = match args.force {
        true => temp.persist(&output),
        false => temp.persist_noclobber(&output),
    };
    persisted.map_err(|e| match e.error.kind() {
        std::io::ErrorKind::AlreadyExists => exists(&output),
        _ => CliError::io(output.display(), e.error),
    })?;
    let mut lens = summary.segment_lens.clone();
    lens.sort_unstable();
    let median = lens.get(lens.len() / 2).copied().unwrap_or(0);
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{}: {} segments (median {:.1} MiB) of {} bytes of archive, {} index bytes ({:.2} % of the \
         {} compressed), in {:.1} s",
        output.display(),
        summary.segments,
        median as f64 / 1048576.0,
        summary.content_len,
        summary.index_len,
        summary.index_len as f64 * 100.0 / summary.compressed_len.max(1) as f64,
        summary.compressed_len,
        started.elapsed().as_secs_f64()
    )
    .map_err(super::stdout_error)
}
