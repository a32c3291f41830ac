//! `vma serve`: the archive's disks as read-only NBD exports, served from the seekable
//! reader's index with positional reads; nothing is extracted and nothing in the archive
//! can change (the exports are read-only and the file is opened read-only).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use vma_nbd::{BlockSize, BlockStatus, Export, Server};
use vma_reader::DeviceReader;

use super::open_seekable;
use crate::error::{CliError, Exit, Result};

/// Arguments of `vma serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The archive: a plain, seekable zstd (as `vma create X.vma.zst` writes it) or lzop
    /// (`.vma.lzo`) archive file, or a zstd one as vzdump writes it with its index (`vma
    /// index`); another compressed one must be decompressed first.
    file: PathBuf,
    /// The sidecar index of a zstd archive without a seek table (`vma index` writes it);
    /// default: ARCHIVE.idx when it exists.
    #[arg(long, value_name = "FILE")]
    index: Option<PathBuf>,
    /// Listen on this unix socket (removed again at exit).
    #[arg(long, conflicts_with = "listen", required_unless_present = "listen")]
    socket: Option<PathBuf>,
    /// Listen on this TCP address, e.g. 127.0.0.1:10809.
    #[arg(long)]
    listen: Option<String>,
    /// Export only these devices (by name). May be repeated. Default: every disk.
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Stop when the last client disconnects (after at least one connected).
    #[arg(long)]
    once: bool,
}

/// One device as a read-only NBD export.
struct DeviceExport(DeviceReader);

impl Export for DeviceExport {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.0.read_at(buf, offset)?;
        if n != buf.len() {
            // The server checks bounds before calling; a short read is a bug, not EOF.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the device end",
            ));
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<BlockStatus>> {
        let mut extents = Vec::new();
        let mut at = offset;
        let end = offset + len as u64;
        while at < end && extents.len() < 256 {
            let Some(run) = self.0.allocation(at, end - at) else {
                break;
            };
            let n = run.len;
            extents.push(if run.stored {
                BlockStatus::data(n)
            } else {
                BlockStatus::hole(n)
            });
            at += n;
        }
        Ok(extents)
    }

    fn block_size(&self) -> BlockSize {
        BlockSize {
            min: 1,
            preferred: vma_format::VMA_BLOCK_SIZE as u32,
            max: 32 << 20,
        }
    }
}

pub(crate) fn run(args: Args) -> Result<()> {
    let archive = open_seekable(&args.file, args.index.as_deref())?;
    let mut builder = Server::builder().stop_after_last_client(args.once);
    let mut names = Vec::new();
    for device in archive.devices() {
        if device.is_vmstate() || (!args.devices.is_empty() && !args.devices.contains(&device.name))
        {
            continue;
        }
        let reader = archive.device(device.name.as_str())?;
        builder = builder.export(device.name.clone(), Arc::new(DeviceExport(reader)));
        names.push(device.name.clone());
    }
    for wanted in &args.devices {
        if !names.contains(wanted) {
            return Err(CliError::new(
                Exit::NotFound,
                format!("no disk named {wanted} in the archive"),
            ));
        }
    }
    if names.is_empty() {
        return Err(CliError::new(
            Exit::NotFound,
            "the archive holds no disk to serve",
        ));
    }
    let server = builder
        .build()
        .map_err(|e| CliError::new(Exit::Internal, e.to_string()))?;
    let listen_err = |e: vma_nbd::Error| CliError::new(Exit::Io, e.to_string());
    let handle = match (&args.socket, &args.listen) {
        (Some(path), _) => server.listen_unix(path).map_err(listen_err)?,
        (None, Some(addr)) => server.listen_tcp(addr.as_str()).map_err(listen_err)?,
        (None, None) => return Err(CliError::usage("give --socket or --listen")),
    };
    let trigger = handle.shutdown_trigger();
    ctrlc::set_handler(move || trigger.trigger())
        .map_err(|e| CliError::new(Exit::Internal, format!("cannot handle Ctrl-C: {e}")))?;
    for name in &names {
        match (&args.socket, &args.listen) {
            (Some(path), _) => eprintln!("serving nbd+unix:///{name}?socket={}", path.display()),
            (_, Some(addr)) => eprintln!("serving nbd://{addr}/{name}"),
            _ => {}
        }
    }
    handle
        .wait()
        .map_err(|e| CliError::new(Exit::Io, e.to_string()))
}
