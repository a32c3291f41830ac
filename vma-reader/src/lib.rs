#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod error;
mod extract;
mod index;
mod integrity;
mod names;
mod seekable;
mod sink;
mod stream;
mod validate;
mod verify;

pub use error::{Error, ErrorKind, Result};
pub use extract::{write_config_files, DamagedRange, ExtractReport, ExtractedFile, Extractor};
pub use integrity::{ClusterAddress, DamagedExtent, ExtentChecksum, IntegrityReport, SealStatus};
pub use names::{
    config_file_name, device_file_name, device_temp_file_name, safe_file_name, MAX_FILE_NAME_LEN,
    VMSTATE_FILE_NAME,
};
pub use seekable::{DeviceReader, DeviceRef, SeekableArchive};
pub use sink::DeviceSink;
pub use stream::{
    Cluster, Extent, PrefetchingReader, ReadOptions, ReadProgress, StreamReader, PREFETCH_BUFFERS,
};
pub use verify::{verify, DeviceReport, VerifyOptions, VerifyReport};
