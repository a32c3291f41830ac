//! Runnable programs around the live backup of [`vma_live`], and the support its
//! demonstration, measurements and tests share. Not a published API.
//!
//! - [`qemu`]: a throwaway QEMU VM (no guest OS) and the QEMU tools that make its images;
//! - [`fixture`]: that VM with two disks of known content, guest writes injected during a
//!   backup, and the checks of an archive against the disks;
//! - [`guest`]: a real Linux guest (Debian's kernel, busybox, qemu-guest-agent, built by
//!   `scripts/build-guest`) with an ext4 system disk and a write workload;
//! - [`guest_backup`]: a live backup of that running guest and what it proves;
//! - [`guest_latency`]: `vma-live-backup --measure-guest`, that guest's write latency
//!   without a backup, during a stock backup and during ours;
//! - [`demo`]: `vma-live-backup --demo` (what `scripts/demo` runs);
//! - [`measure`]: `vma-live-backup --measure` (what `examples/benches/live.sh` runs).
//!
//! The `vma-live-backup` binary is a thin command line around
//! [`vma_live::run_backup`], plus `--demo` and `--measure`.

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod demo;
pub mod fixture;
pub mod guest;
pub mod guest_backup;
pub mod guest_latency;
pub mod measure;
pub mod qemu;

/// The error of this test support: whatever failed, with its sources. One boxed type is
/// enough here; the library's errors are typed ([`vma_live::Error`]).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
