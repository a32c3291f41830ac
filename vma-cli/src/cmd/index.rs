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
        return Err(CliError::new(
            Exit::Io,
            format!("{} already exists (--force replaces it)", output.display()),
        ));
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
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp{}", std::process::id()));
    let temp = dir.join(temp_name);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)
        .map_err(|e| CliError::io(temp.display(), e))?;
    let result = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, &file);
        let summary =
            build(BufReader::with_capacity(1 << 20, input), &mut out).map_err(|e| match e {
                ZstdIndexError::Io { .. } => {
                    CliError::new(Exit::Io, format!("{}: {e}", args.file.display()))
                }
                ZstdIndexError::Write(e) => CliError::io(temp.display(), e),
                other => {
                    let mut c = index_error(other);
                    c.message = format!("{}: {}", args.file.display(), c.message);
                    c
                }
            })?;
        out.flush().map_err(|e| CliError::io(temp.display(), e))?;
        drop(out);
        // The archive's header reads, so that opening reads them from the index.
        let archive = File::open(&args.file).map_err(|e| CliError::io(args.file.display(), e))?;
        let mut summary = summary;
        summary.index_len = vma_reader::zstd_index::add_headers(archive, &file).map_err(|e| {
            let e = CliError::from(e);
            CliError::new(e.exit, format!("{}: {}", args.file.display(), e.message))
        })?;
        file.sync_all()
            .map_err(|e| CliError::io(temp.display(), e))?;
        fs::rename(&temp, &output).map_err(|e| CliError::io(output.display(), e))?;
        Ok(summary)
    })();
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
    };
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
