//! The `vma` command: list, config, create, extract and verify Proxmox VE's VMA backup
//! archives with the arguments and output lines of Proxmox's own `vma`, so that scripts
//! written for it keep working; plus what users ask for beyond it: compressed archives
//! read directly (zstd, gzip, lzop, recognised by their first bytes), `cat` of one device
//! to standard output, `--json` output, progress bars, `serve` over NBD, and exit codes
//! that tell usage errors, damaged archives and I/O failures apart.
//!
//! The binary is a thin `main` around [`run`]; the parsers of untrusted input
//! ([`lzop`], [`mapfile`]) are public so that the fuzz targets can reach them.
#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod cmd;
pub mod ctime;
mod error;
pub mod input;
pub mod lzop;
pub mod mapfile;
mod progress;

pub use cmd::run;
pub use error::{CliError, Exit};
