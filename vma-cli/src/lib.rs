#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod cmd;
pub mod ctime;
mod error;
pub mod input;
pub mod mapfile;
mod output;
mod packed;
mod progress;
mod qemu;
mod remote;

pub use cmd::run;
pub use error::{CliError, Exit};
