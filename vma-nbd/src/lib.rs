//! A small NBD (Network Block Device) server.
//!
//! `vma-nbd` serves block devices over the [NBD protocol] so that QEMU can
//! use them: as the target of a `blockdev-backup` job (`driver: nbd`), whose
//! writes a backend turns into VMA archive writes, and as a read-only source
//! for `qemu-img convert 'nbd+unix:///NAME?socket=PATH'`.
//!
//! Storage is provided by implementing [`Export`]; a [`Server`] holds any
//! number of named exports and is served on unix or TCP listeners
//! ([`Server::listen_unix`], [`Server::listen_tcp`]) or on a single stream
//! ([`Server::serve_stream`], [`Server::serve_split`]).
//!
//! # Protocol support
//!
//! * Fixed newstyle handshake only, no TLS. Options: `EXPORT_NAME`, `GO`,
//!   `INFO` (with `INFO_EXPORT`, `INFO_NAME`, `INFO_BLOCK_SIZE`), `LIST`,
//!   `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT`
//!   (`base:allocation`). Anything else gets `NBD_REP_ERR_UNSUP`; option
//!   data over 64 KiB is skipped unbuffered and refused with
//!   `NBD_REP_ERR_TOO_BIG`.
//! * Commands: `READ`, `WRITE`, `WRITE_ZEROES` (`NO_HOLE` accepted),
//!   `FLUSH`, `DISC`, `BLOCK_STATUS` (once negotiated); `FUA` is honoured by
//!   flushing after the write. `TRIM` and `CACHE` are not advertised; if sent
//!   anyway they are validated and answered with success without doing
//!   anything (the protocol lets a server ignore both).
//! * Simple replies, or structured replies when negotiated: a read is
//!   answered with one `OFFSET_DATA` chunk, or one `OFFSET_HOLE` chunk when
//!   the data is all zeroes; errors as `ERROR` chunks with a message.
//! * Every request is validated before the export sees it: bounds (`EINVAL`
//!   for reads, `ENOSPC` for writes past the end), minimum-block alignment
//!   and maximum length (`EINVAL`), command flags (`EINVAL`), writes to a
//!   read-only export (`EPERM`); the payload of a refused write is read and
//!   dropped through a fixed-size buffer, so the connection stays usable. A
//!   write announcing more than [`MAX_PAYLOAD`] (32 MiB) bytes, a bad
//!   request magic or unknown client flags close the connection.
//! * Requests on one connection run concurrently on a small worker pool and
//!   may be answered out of order; the number of requests and bytes in
//!   flight is bounded, after which the server stops reading the socket.
//!
//! # Example
//!
//! ```
//! use std::io;
//! use std::sync::{Arc, RwLock};
//! use vma_nbd::{Export, Server};
//!
//! /// A RAM disk.
//! struct MemDisk(RwLock<Vec<u8>>);
//!
//! impl Export for MemDisk {
//!     fn size(&self) -> u64 {
//!         self.0.read().unwrap().len() as u64
//!     }
//!     fn read_only(&self) -> bool {
//!         false
//!     }
//!     fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
//!         // The server has checked that the range is inside the export.
//!         let start = offset as usize;
//!         buf.copy_from_slice(&self.0.read().unwrap()[start..start + buf.len()]);
//!         Ok(())
//!     }
//!     fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
//!         let start = offset as usize;
//!         self.0.write().unwrap()[start..start + data.len()].copy_from_slice(data);
//!         Ok(())
//!     }
//! }
//!
//! fn main() -> Result<(), vma_nbd::Error> {
//!     let disk = Arc::new(MemDisk(RwLock::new(vec![0; 1 << 20])));
//!     let server = Server::builder().export("drive-scsi0", disk).build()?;
//!
//!     let dir = std::env::temp_dir().join(format!("vma-nbd-doc-{}", std::process::id()));
//!     std::fs::create_dir_all(&dir)?;
//!     let socket = dir.join("nbd.sock");
//!     let handle = server.listen_unix(&socket)?;
//!     // Clients can now connect, e.g.
//!     //   qemu-img convert -O raw 'nbd+unix:///drive-scsi0?socket=<socket>' out.raw
//!     println!("listening on {}", handle.local_addr());
//!
//!     // Stop accepting, disconnect clients, join threads, remove the socket.
//!     handle.shutdown()?;
//!     assert!(!socket.exists());
//!     std::fs::remove_dir(&dir)?;
//!     Ok(())
//! }
//! ```
//!
//! [NBD protocol]: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md

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
