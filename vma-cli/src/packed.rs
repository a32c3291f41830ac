//! How `vma create` packs its output: plain, or seekable zstd compressed in process
//! (`--compress zstd[:LEVEL]`, or a file name ending in `.zst`). The compressed output
//! goes through the same [`Sink`] as a plain one, so a file still appears under its name
//! only once complete.

use std::io::{self, Write};

use vma_writer::{ZstdOptions, ZstdWriter};

use crate::error::{CliError, Exit, Result};
use crate::output::{Sink, Target};

/// What `--compress` or the output's name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Packing {
    /// A plain archive.
    Plain,
    /// Seekable zstd at this level.
    Zstd(i32),
}

/// zstd level when none is given: zstd's own default, and vzdump's.
pub(crate) const DEFAULT_LEVEL: i32 = 3;

impl Packing {
    /// The packing `--compress` names (`none`, `zstd`, `zstd:LEVEL`), else the one a new
    /// file's name implies (`.zst`: zstd). Pipes and commands are plain unless told: the
    /// name of an `exec:` command that compresses (`exec:zstd > x.vma.zst`) must not
    /// compress twice.
    pub(crate) fn choose(option: Option<&str>, target: &Target) -> Result<Packing> {
        let Some(option) = option else {
            return Ok(match target {
                Target::File(path) if path.extension().is_some_and(|e| e == "zst") => {
                    Packing::Zstd(DEFAULT_LEVEL)
                }
                Target::S3(at) if at.key().ends_with(".zst") => Packing::Zstd(DEFAULT_LEVEL),
                _ => Packing::Plain,
            });
        };
        let (name, level) = match option.split_once(':') {
            Some((name, level)) => (name, Some(level)),
            None => (option, None),
        };
        match (name, level) {
            ("none", None) => Ok(Packing::Plain),
            ("zstd", None) => Ok(Packing::Zstd(DEFAULT_LEVEL)),
            ("zstd", Some(level)) => {
                let range = zstd::compression_level_range();
                match level.parse::<i32>() {
                    Ok(l) if range.contains(&l) && l != 0 => Ok(Packing::Zstd(l)),
                    _ => Err(CliError::usage(format!(
                        "--compress {option}: the zstd level must be a number from {} to {}",
                        range.start(),
                        range.end()
                    ))),
                }
            }
            _ => Err(CliError::usage(format!(
                "--compress {option}: expected none, zstd or zstd:LEVEL"
            ))),
        }
    }

    /// Puts the compressor, if any, in front of the opened output.
    pub(crate) fn wrap(self, sink: Sink) -> Result<Packed> {
        match self {
            Packing::Plain => Ok(Packed::Plain(sink)),
            Packing::Zstd(level) => {
                let options = ZstdOptions {
                    level,
                    ..ZstdOptions::default()
                };
                ZstdWriter::new(sink, options)
                    .map(|w| Packed::Zstd(Box::new(w)))
                    .map_err(|e| CliError::new(Exit::Internal, format!("zstd workers: {e}")))
            }
        }
    }
}

/// The output as the writer sees it.
pub(crate) enum Packed {
    /// Straight into the sink.
    Plain(Sink),
    /// Through the compressor.
    Zstd(Box<ZstdWriter<Sink>>),
}

impl Packed {
    /// Once the whole archive was written into it: writes the last frames and the seek
    /// table, and returns the sink, to be completed next (see [`Sink::complete`]).
    pub(crate) fn finish(self, target: &Target) -> Result<Sink> {
        match self {
            Packed::Plain(sink) => Ok(sink),
            Packed::Zstd(writer) => writer
                .finish()
                .map(|(sink, _)| sink)
                .map_err(|e| CliError::io(target.describe(), e)),
        }
    }
}

impl Write for Packed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Packed::Plain(s) => s.write(buf),
            Packed::Zstd(z) => z.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Packed::Plain(s) => s.write_vectored(bufs),
            Packed::Zstd(z) => z.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Packed::Plain(s) => s.flush(),
            Packed::Zstd(z) => z.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn choose(option: Option<&str>, name: &str) -> Result<Packing> {
        Packing::choose(option, &Target::parse(Path::new(name))?)
    }

    #[test]
    fn names_and_options_choose_the_packing() {
        assert_eq!(choose(None, "/x/a.vma").unwrap(), Packing::Plain);
        assert_eq!(choose(None, "/x/a.vma.zst").unwrap(), Packing::Zstd(3));
        assert_eq!(
            choose(None, "exec:zstd > a.vma.zst").unwrap(),
            Packing::Plain
        );
        assert_eq!(choose(None, "-").unwrap(), Packing::Plain);
        assert_eq!(choose(Some("zstd"), "-").unwrap(), Packing::Zstd(3));
        assert_eq!(
            choose(Some("zstd:19"), "exec:cat").unwrap(),
            Packing::Zstd(19)
        );
        assert_eq!(
            choose(Some("none"), "/x/a.vma.zst").unwrap(),
            Packing::Plain
        );
        for bad in ["zstd:0", "zstd:99", "zstd:x", "gzip", "none:1", ""] {
            let e = choose(Some(bad), "a.vma").unwrap_err();
            assert_eq!(e.exit, Exit::Usage, "{bad}");
        }
    }
}
