//! Live backup of a running, stock QEMU VM into a VMA archive.
//!
//! Proxmox VE backs VMs up through a private `backup` QMP command of its
//! patched QEMU. Stock QEMU has none, but its standard backup job can write
//! into any block node, including an NBD client. So this crate runs an NBD
//! server ([`vma_nbd`]) whose exports turn QEMU's writes into archive writes
//! ([`vma_writer`]), and drives QEMU over QMP:
//!
//! 1. `query-version`, `query-block` (drives with a medium; the archive
//!    device of a drive is `drive-<qdev id>`, as Proxmox names them);
//! 2. per drive, `blockdev-add` of a raw node over an NBD client connected
//!    to our export;
//! 3. one `transaction` of `blockdev-backup` actions (`sync: full`) with
//!    grouped completion, so every drive is copied as of the same instant;
//! 4. wait for each job's `BLOCK_JOB_COMPLETED` / `BLOCK_JOB_CANCELLED`;
//! 5. `blockdev-del` the targets and finish the archive.
//!
//! When the guest writes to an area not yet copied, QEMU first pushes the
//! old data to the target and the guest's write waits for that push, so the
//! exports only hand data to the writer and never answer with an error: if
//! the archive cannot be written, the exports keep acknowledging (and drop
//! the data) while the jobs are cancelled. The VM keeps running in every
//! case, and only a complete archive gets its final name.
//!
//! [`run_backup`] is the whole backup as a function; the `vma-live-backup`
//! binary is a thin command line around it, plus a self-contained demo
//! ([`demo`]) and a throughput/latency measurement ([`measure`]) on a
//! throwaway VM ([`qemu`]).
//!
//! ```no_run
//! use vma_examples::{run_backup, BackupOptions};
//!
//! let mut opts = BackupOptions::new("/run/qemu-server/100.qmp", "/backup/vm-100.vma");
//! opts.configs.push(("qemu-server.conf".into(), "/etc/pve/qemu-server/100.conf".into()));
//! match run_backup(&opts) {
//!     Ok(report) => println!("{report}"),
//!     Err(e) => {
//!         eprintln!("backup failed: {e}");
//!         std::process::exit(e.exit_code());
//!     }
//! }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]
#![allow(clippy::manual_is_multiple_of, clippy::unnecessary_map_or)] // reason: MSRV-1.89 lints; crate reworked in parallel

mod archive;
pub mod backup;
pub mod demo;
pub mod drives;
pub mod export;
pub mod measure;
mod progress;
pub mod qemu;
pub mod qmp;

pub use backup::{run_backup, BackupError, BackupOptions, BackupReport, DriveReport, XPerf};
pub use drives::Drive;
pub use qmp::{Event, Qmp, QmpError};
