#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod error;
mod export;
pub mod fuzz;
mod handshake;
pub mod proto;
mod server;
mod transmission;

pub use error::Error;
pub use export::{BlockSize, Errno, Export, Extent, MAX_PAYLOAD};
pub use server::{ListenAddr, Server, ServerBuilder, ServerHandle, ShutdownTrigger};
