//! Every constant of the VMA format, named as the format names it.

/// Magic bytes at the start of an archive: `VMA\0`.
pub const VMA_MAGIC: [u8; 4] = *b"VMA\0";
/// Magic bytes at the start of every extent header: `VMAE`.
pub const VMA_EXTENT_MAGIC: [u8; 4] = *b"VMAE";
/// The only archive version there is.
pub const VMA_VERSION: u32 = 1;

/// Size of a block, the unit of storage inside a cluster.
pub const VMA_BLOCK_SIZE: usize = 4096;
/// Blocks per cluster; one mask bit each.
pub const VMA_BLOCKS_PER_CLUSTER: usize = 16;
/// Size of a cluster, the unit of addressing (64 KiB).
pub const VMA_CLUSTER_SIZE: usize = VMA_BLOCK_SIZE * VMA_BLOCKS_PER_CLUSTER;
/// Size of an extent header.
pub const VMA_EXTENT_HEADER_SIZE: usize = 512;
/// Blockinfo slots per extent header (the format's `VMA_BLOCKS_PER_EXTENT`).
pub const VMA_BLOCKS_PER_EXTENT: usize = 59;
/// Clusters per extent that Proxmox's writer uses (it never fills the last slot).
pub const VMA_WRITER_CLUSTERS_PER_EXTENT: usize = VMA_BLOCKS_PER_EXTENT - 1;
/// Largest possible extent: header plus 59 full clusters.
pub const VMA_MAX_EXTENT_SIZE: usize =
    VMA_EXTENT_HEADER_SIZE + VMA_BLOCKS_PER_EXTENT * VMA_CLUSTER_SIZE;

/// Config slots in the archive header.
pub const VMA_MAX_CONFIGS: usize = 256;
/// Device slots in the archive header (slot 0 is reserved).
pub const VMA_MAX_DEVICES: usize = 256;
/// Highest device id a writer hands out (Proxmox keeps 255 in reserve).
pub const VMA_MAX_WRITER_DEVICE_ID: u8 = 254;
/// Longest blob (config data, or a name including its NUL), from the u16 length field.
pub const VMA_MAX_BLOB_SIZE: usize = u16::MAX as usize;
/// Name of the device that carries the VM's RAM state as a byte stream.
pub const VMSTATE_DEVICE_NAME: &str = "vmstate";

/// Size of the fixed part of the archive header; the blob buffer follows it.
pub const VMA_FIXED_HEADER_SIZE: usize = 12288;
/// Where Proxmox's writer puts the blob buffer (right after the fixed part).
pub const VMA_BLOB_BUFFER_OFFSET: usize = VMA_FIXED_HEADER_SIZE;
/// The blob buffer grows in units of this many bytes.
pub const VMA_BLOB_BUFFER_UNIT: usize = 512;
/// Largest header Proxmox's writer can produce (its header buffer is 8 clusters).
pub const VMA_REFERENCE_MAX_HEADER_SIZE: usize = 8 * VMA_CLUSTER_SIZE;
/// Largest header this crate accepts: 16 MiB. Bounds the memory a hostile header can
/// demand, and still 32 times what Proxmox's writer can produce.
pub const VMA_MAX_HEADER_SIZE: usize = 16 * 1024 * 1024;
/// Most clusters a device can have: cluster numbers are u32.
pub const VMA_MAX_CLUSTERS: u64 = 1 << 32;
/// Largest device size: 2^32 clusters of 64 KiB (256 TiB).
pub const VMA_MAX_DEVICE_SIZE: u64 = VMA_MAX_CLUSTERS * VMA_CLUSTER_SIZE as u64;

/// Byte offsets of the fields of the fixed archive header.
pub mod header_offsets {
    /// `magic`, 4 bytes.
    pub const MAGIC: usize = 0;
    /// `version`, u32.
    pub const VERSION: usize = 4;
    /// `uuid`, 16 bytes.
    pub const UUID: usize = 8;
    /// `ctime`, i64 seconds since the epoch.
    pub const CTIME: usize = 24;
    /// `md5sum`, 16 bytes.
    pub const MD5SUM: usize = 32;
    /// `blob_buffer_offset`, u32.
    pub const BLOB_BUFFER_OFFSET: usize = 48;
    /// `blob_buffer_size`, u32: bytes used in the blob buffer.
    pub const BLOB_BUFFER_SIZE: usize = 52;
    /// `header_size`, u32.
    pub const HEADER_SIZE: usize = 56;
    /// Start of the reserved area after `header_size`.
    pub const RESERVED: usize = 60;
    /// `config_names[256]`, u32 blob pointers.
    pub const CONFIG_NAMES: usize = 2044;
    /// `config_data[256]`, u32 blob pointers.
    pub const CONFIG_DATA: usize = 3068;
    /// Reserved u32 after `config_data`.
    pub const RESERVED2: usize = 4092;
    /// `dev_info[256]`, 32 bytes each.
    pub const DEV_INFO: usize = 4096;
    /// Size of one `dev_info` entry.
    pub const DEV_INFO_SIZE: usize = 32;
    /// Within a `dev_info` entry: the name pointer, u32.
    pub const DEV_NAME_PTR: usize = 0;
    /// Within a `dev_info` entry: reserved u32.
    pub const DEV_RESERVED: usize = 4;
    /// Within a `dev_info` entry: the device size, u64.
    pub const DEV_SIZE: usize = 8;
    /// Within a `dev_info` entry: 16 reserved bytes.
    pub const DEV_RESERVED2: usize = 16;
}

/// Byte offsets of the fields of an extent header.
pub mod extent_offsets {
    /// `magic`, 4 bytes.
    pub const MAGIC: usize = 0;
    /// `reserved1`, u16, must be zero.
    pub const RESERVED1: usize = 4;
    /// `block_count`, u16.
    pub const BLOCK_COUNT: usize = 6;
    /// `uuid`, 16 bytes.
    pub const UUID: usize = 8;
    /// `md5sum`, 16 bytes.
    pub const MD5SUM: usize = 24;
    /// `blockinfo[59]`, u64 each.
    pub const BLOCKINFO: usize = 40;
}
