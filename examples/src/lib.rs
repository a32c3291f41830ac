//! Runnable programs around the live backup of [`vma_live`], and the support its
//! demonstration, measurements and tests share: a throwaway QEMU VM ([`qemu`]), the demo
//! ([`demo`]) and the measurement ([`measure`]). Not a published API.
//!
//! The `vma-live-backup` binary is a thin command line around
//! [`vma_live::run_backup`], plus `--demo` and `--measure`.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod demo;
pub mod measure;
pub mod qemu;
