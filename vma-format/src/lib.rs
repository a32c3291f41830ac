#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod cluster;
mod consts;
mod copies;
mod error;
mod extent;
pub mod extent_index;
mod header;
pub mod integrity;
pub mod names;
pub mod seek_table;

pub use consts::*;
pub use error::{BlobField, FormatError, NameProblem, Result};
pub use extent::{BlockInfo, BlockMask, ClusterSlot, ExtentHeader};
pub use header::{ArchiveHeader, ConfigEntry, DeviceId, DeviceInfo};
pub use uuid::Uuid;
