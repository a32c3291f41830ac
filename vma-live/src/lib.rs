#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod agent;
mod archive;
pub mod backup;
pub mod drives;
mod error;
pub mod export;
mod priority;
mod progress;
pub mod pve;
pub mod qmp;

pub use backup::{
    pauses_held, run_backup, BackupOptions, BackupReport, Consistency, DriveReport, XPerf,
    DEFAULT_CBW_BUFFER, DEFAULT_CBW_TIMEOUT, DEFAULT_X_PERF,
};
pub use drives::Drive;
pub use error::{Error, ErrorKind, JobFailure};
pub use priority::{lower_priority, DEFAULT_NICE};
pub use qmp::{Event, Qmp};
