//! Argument parsing and dispatch.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::error::{CliError, Exit, Result};

mod cat;
mod create;
mod extract;
mod index;
mod list;
mod recompress;
mod reorder;
mod serve;
mod verify;

/// Proxmox VE VMA backup archives: list, verify, extract, create, serve, reorder.
///
/// Archives may be plain or compressed with zstd, gzip or lzop, given as a file or `-`
/// for standard input. Exit codes: 0 success, 1 internal error, 2 usage error, 3 invalid
/// or damaged archive, 4 I/O error, 5 config or device not in the archive.
#[derive(Parser, Debug)]
#[command(name = "vma", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The S3-compatible server of `s3://BUCKET/KEY` archives (default: AWS_ENDPOINT_URL,
    /// else the profile's endpoint_url, else AWS).
    #[arg(long, global = true, value_name = "URL")]
    endpoint: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the configs and devices of an archive (Proxmox's format, or JSON).
    List {
        /// The archive, or `-` for standard input.
        file: PathBuf,
        /// Print JSON instead (with integrity information for plain, seekable zstd and lzop
        /// archive files, and zstd ones with an index).
        #[arg(long)]
        json: bool,
        /// The sidecar index of a zstd archive without a seek table (`vma index` writes
        /// it); default: ARCHIVE.idx when it exists.
        #[arg(long, value_name = "FILE")]
        index: Option<PathBuf>,
    },
    /// Write one config blob to standard output.
    Config {
        /// The archive, or `-` for standard input.
        file: PathBuf,
        /// The config's name.
        #[arg(short = 'c', default_value = "qemu-server.conf")]
        config: String,
    },
    /// Create an archive from raw images, block devices or images in any format QEMU reads.
    Create(create::Args),
    /// Extract every device and config into a new directory.
    Extract(extract::Args),
    /// Check an archive completely without writing anything.
    Verify(verify::Args),
    /// Write one device's raw image to standard output.
    Cat {
        /// The archive: a plain, seekable zstd or lzop archive file, or a zstd one
        /// indexed by `vma index`.
        file: PathBuf,
        /// The device's name, e.g. drive-scsi0.
        device: String,
        /// The sidecar index of a zstd archive without a seek table (`vma index` writes
        /// it); default: ARCHIVE.idx when it exists.
        #[arg(long, value_name = "FILE")]
        index: Option<PathBuf>,
    },
    /// Export the archive's disks read-only over NBD, without extracting.
    Serve(serve::Args),
    /// Index a .vma.zst as zstd (and Proxmox's vzdump) writes it, so that serve, cat,
    /// verify --quick and list --json read it at random (writes ARCHIVE.idx).
    Index(index::Args),
    /// Rewrite an archive in canonical order (device by device, ascending clusters), with
    /// the integrity extension: what a deduplicating store keeps once across backups.
    Reorder(reorder::Args),
    /// Rewrite an archive (plain, zstd, gzip or lzop; a file or stdin) as seekable zstd,
    /// verifying it on the way: the same archive bytes, readable in place and decompressed
    /// on every core.
    Recompress(recompress::Args),
}

/// Runs `vma` with these arguments (the first is the program name) and returns the exit
/// code. Errors are printed to stderr as one line starting with `vma: `.
pub fn run<I, T>(args: I) -> Exit
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    Exit::Ok
                }
                _ => Exit::Usage,
            };
        }
    };
    crate::remote::set_endpoint(cli.endpoint);
    let result = match cli.command {
        Command::List { file, json, index } => list::list(&file, json, index.as_deref()),
        Command::Config { file, config } => list::config(&file, &config),
        Command::Create(args) => create::run(args),
        Command::Extract(args) => extract::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Cat {
            file,
            device,
            index,
        } => cat::run(&file, &device, index.as_deref()),
        Command::Index(args) => index::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Reorder(args) => reorder::run(args),
        Command::Recompress(args) => recompress::run(args),
    };
    let _ = std::io::stdout().flush();
    match result {
        Ok(()) => Exit::Ok,
        Err(e) if e.exit == Exit::Ok => Exit::Ok,
        Err(e) => {
            eprintln!("vma: {}", e.message);
            e.exit
        }
    }
}

/// Writes to stdout; a closed pipe (`vma cat ... | head`) ends quietly.
pub(crate) fn stdout_error(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::new(Exit::Ok, "")
    } else {
        CliError::io("standard output", e)
    }
}

/// Opens an archive for one pass (decompressing as needed) and reads its header.
pub(crate) fn open_stream(
    file: &std::path::Path,
    options: vma_reader::ReadOptions,
) -> Result<vma_reader::PrefetchingReader> {
    let input = open_bytes(file)?;
    Ok(vma_reader::PrefetchingReader::with_options(input, options)?)
}

/// Opens an archive file, object or standard input for one pass, decompressed.
pub(crate) fn open_bytes(file: &std::path::Path) -> Result<Box<dyn std::io::Read + Send>> {
    let (input, _) = match crate::remote::location(file) {
        Some(at) => {
            let at = at?;
            crate::input::open_positional(crate::remote::open(&at)?)
                .map_err(|e| crate::remote::io_error(&at, e))?
        }
        None => crate::input::open(file).map_err(|e| CliError::io(file.display(), e))?,
    };
    Ok(input)
}

/// The packing of an archive file or object, from its first bytes.
pub(crate) fn detect(file: &std::path::Path) -> Result<crate::input::Compression> {
    match crate::remote::location(file) {
        Some(at) => {
            let at = at?;
            crate::input::detect_positional(&*crate::remote::open(&at)?)
                .map_err(|e| crate::remote::io_error(&at, e))
        }
        None => crate::input::detect_file(file).map_err(|e| CliError::io(file.display(), e)),
    }
}

/// Opens a plain, seekable zstd or lzop archive file for random access, explaining what to do
/// with another compressed one or with standard input. A zstd file without a seek table is
/// read through its sidecar index: `index`, else ARCHIVE.idx when it exists.
pub(crate) fn open_seekable(
    file: &std::path::Path,
    index: Option<&std::path::Path>,
) -> Result<vma_reader::SeekableArchive> {
    if file.as_os_str() == "-" {
        return Err(CliError::usage(
            "this needs an archive file, not standard input: save it to a file first",
        ));
    }
    let remote = crate::remote::location(file).transpose()?;
    let object = remote.as_ref().map(crate::remote::open).transpose()?;
    let compression = match (&object, &remote) {
        (Some(o), Some(at)) => {
            crate::input::detect_positional(&**o).map_err(|e| crate::remote::io_error(at, e))?
        }
        _ => crate::input::detect_file(file).map_err(|e| CliError::io(file.display(), e))?,
    };
    if let (Some(hint), false) = (
        compression.decompress_hint(),
        compression.is_random_access(),
    ) {
        return Err(CliError::usage(format!(
            "{} is compressed ({compression:?}); random access needs a plain, seekable zstd \
             or lzop archive: {hint}",
            file.display()
        )));
    }
    let with_index = |idx: &std::path::Path| {
        let opened = match &object {
            Some(o) => std::fs::File::open(idx)
                .map_err(|source| {
                    vma_reader::Error::ZstdIndex(vma_reader::zstd_index::ZstdIndexError::IndexIo {
                        index_offset: 0,
                        source,
                    })
                })
                .and_then(|i| vma_reader::SeekableArchive::from_read_at_with_index(o.clone(), i)),
            None => vma_reader::SeekableArchive::open_with_index(file, idx),
        };
        opened.map_err(|e| {
            let e = CliError::from(e);
            CliError::new(
                e.exit,
                format!(
                    "{} (index {}): {}",
                    file.display(),
                    idx.display(),
                    e.message
                ),
            )
        })
    };
    if let Some(idx) = index {
        return with_index(idx);
    }
    if let Some(o) = object {
        return match vma_reader::SeekableArchive::from_read_at(o) {
            Err(e @ vma_reader::Error::NotSeekable { .. }) => Err(CliError::usage(format!(
                "{}: {e} (index it once with `vma index`, from a local copy, and give the \
                 index with --index)",
                file.display()
            ))),
            other => Ok(other?),
        };
    }
    match vma_reader::SeekableArchive::open(file) {
        Err(vma_reader::Error::NotSeekable { .. }) if index::default_index(file).is_file() => {
            with_index(&index::default_index(file))
        }
        Err(e @ vma_reader::Error::NotSeekable { .. }) => {
            Err(CliError::usage(format!("{}: {e}", file.display())))
        }
        other => Ok(other?),
    }
}
