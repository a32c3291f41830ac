#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod client;
mod daemon;
mod error;
mod export;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod handshake;
mod mem;
pub mod proto;
mod server;
mod transmission;

pub use client::{
    Client, ClientBuilder, ExportInfo, Pending, PendingRead, PendingStatus, ZeroMode,
};
pub use daemon::{
    create_image, StorageDaemon, StorageDaemonBuilder, QEMU_IMG, SETPRIV, STORAGE_DAEMON,
};
pub use error::{Error, Violation};
pub use export::{BlockSize, BlockStatus, Errno, Export, MAX_PAYLOAD};
pub use mem::MemExport;
pub use server::{ListenAddr, Server, ServerBuilder, ServerHandle, ShutdownTrigger};
