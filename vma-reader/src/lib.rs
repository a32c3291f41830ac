#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod cache;
mod error;
mod extract;
mod frames;
mod index;
mod integrity;
pub mod lzop;
mod names;
mod options;
mod prefetch;
mod read_at;
mod seekable;
mod sink;
mod source;
mod stream;
mod validate;
mod verify;
mod walk;
pub mod zstd_index;

pub use error::{Error, ErrorKind, Result};
pub use extract::{DamagedRange, ExtractReport, ExtractedFile, Extractor, Zeroing};
pub use frames::ParallelZstdReader;
pub use integrity::{
    ClusterAddress, DamagedExtent, ExtentChecksum, ExtentIndexStatus, IntegrityReport, SealStatus,
};
pub use names::{
    config_file_name, device_file_name, device_temp_file_name, safe_file_name, MAX_FILE_NAME_LEN,
    VMSTATE_FILE_NAME,
};
pub use options::{OnDamage, ReadOptions, VerifyOptions};
pub use prefetch::{PrefetchingReader, PREFETCH_BUFFERS};
pub use read_at::ReadAt;
pub use seekable::{Allocation, DeviceReader, DeviceRef, SeekableArchive};
pub use sink::DeviceSink;
pub use source::{Packing, FRAME_CACHE_BYTES, MAX_FRAME_CONTENT};
pub use stream::{ArchiveStream, Cluster, Extent, IntoArchiveStream, ReadProgress, StreamReader};
pub use verify::{verify, DeviceReport, VerifyReport};
