//! `vma recompress`: an archive in any packing `vma` reads (plain, zstd, gzip, lzop; a
//! file or stdin) rewritten as seekable zstd, the packing `serve`, `cat` and `verify
//! --quick` read in place and whose frames decompress on every core. The archive's bytes
//! are not changed: decompressed, the output is byte for byte the input's archive.
//!
//! One pass, bounded memory: the input is decompressed and verified in full (every header,
//! the data's CRC32Cs and the seal if it has them) while the same bytes go into the
//! compressor, so a damaged archive is refused, not recompressed; the output appears under
//! its name only once complete (a file), like `vma create`'s.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use vma_reader::VerifyOptions;

use super::verify::damage_message;
use crate::error::{CliError, Exit, Result};
use crate::output::{output_failure, Sink, Target};
use crate::packed::{Packed, Packing};

/// Arguments of `vma recompress`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The archive to read: plain, zstd (as vzdump writes it), gzip or lzop; `-` for
    /// standard input.
    input: PathBuf,
    /// Where to write: a new file (it must not exist, and appears only once complete),
    /// `-` for standard output, a FIFO or `exec:CMD`, as `vma create` takes them.
    output: PathBuf,
    /// `zstd` or `zstd:LEVEL` (default: zstd at level 3), or `none` to write the plain
    /// archive (a decompression that verifies what it decompresses).
    #[arg(long, value_name = "zstd[:LEVEL]|none")]
    compress: Option<String>,
    /// fsync the output file and its directory before reporting success.
    #[arg(long)]
    sync: bool,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let target = Target::parse(&args.output)?;
    let packing = match args.compress.as_deref() {
        None => Packing::Zstd(crate::packed::DEFAULT_LEVEL),
        option => Packing::choose(option, &target)?,
    };
    let input = super::open_bytes(&args.input)?;
    let (sink, mut command) = Sink::open(&target, None)?;
    let out = RefCell::new(packing.wrap(sink)?);
    let failed = RefCell::new(None);
    let tee = Tee {
        input,
        out: &out,
        failed: &failed,
    };
    let verified = vma_reader::verify(tee, VerifyOptions::new());
    // A failed write stops the verification with an error of its own: the output's error
    // is the one to report.
    if let Some(e) = failed.into_inner() {
        drop(out);
        let e = CliError::io(target.describe(), e);
        return Err(output_failure(&target, command.as_mut(), e));
    }
    let report = verified?;
    if !report.is_ok() {
        return Err(CliError::new(Exit::Damaged, damage_message(&report)));
    }
    let sink = out
        .into_inner()
        .finish(&target)
        .map_err(|e| output_failure(&target, command.as_mut(), e))?;
    sink.complete(command, &target, args.sync)
}

/// The input as the verifier reads it, every byte read written to the output too.
struct Tee<'a> {
    input: Box<dyn Read + Send>,
    out: &'a RefCell<Packed>,
    /// The output's first error; reads fail from then on.
    failed: &'a RefCell<Option<io::Error>>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed.borrow().is_some() {
            return Err(io::Error::other("the output failed"));
        }
        let n = self.input.read(buf)?;
        if let Err(e) = self.out.borrow_mut().write_all(&buf[..n]) {
            *self.failed.borrow_mut() = Some(e);
            return Err(io::Error::other("the output failed"));
        }
        Ok(n)
    }
}
