#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod error;
mod export;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod handshake;
mod mem;
pub mod proto;
mod server;
mod transmission;

pub use error::Error;
pub use export::{BlockSize, BlockStatus, Errno, Export, MAX_PAYLOAD};
pub use mem::MemExport;
pub use server::{ListenAddr, Server, ServerBuilder, ServerHandle, ShutdownTrigger};
