//! The archive header: identity, config entries and the device table.

use std::collections::HashSet;
use std::fmt;

use byteorder::{BigEndian, ByteOrder, LittleEndian};
use md5::{Digest, Md5};
use uuid::Uuid;

use crate::consts::header_offsets as off;
use crate::consts::*;
use crate::error::{BlobField, FormatError, NameProblem, Result};

/// A device id: the index of a device in the header's device table, 1 to 255.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(u8);

impl DeviceId {
    /// The id, or `None` for 0 (which means "no device").
    pub const fn new(id: u8) -> Option<DeviceId> {
        if id == 0 {
            None
        } else {
            Some(DeviceId(id))
        }
    }

    /// The raw id.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The id as an index into per-device tables of 256 entries.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One config entry: a file name (`qemu-server.conf`, `qemu-server.fw`) and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEntry {
    /// File name, stored NUL-terminated.
    pub name: String,
    /// Contents, at most 65535 bytes.
    pub data: Vec<u8>,
}

/// One device of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its id, which extents use to refer to it.
    pub id: DeviceId,
    /// Its name (`drive-scsi0`, or `vmstate` for RAM state).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

impl DeviceInfo {
    /// Whether this is the RAM-state byte stream rather than a disk.
    pub fn is_vmstate(&self) -> bool {
        self.name == VMSTATE_DEVICE_NAME
    }

    /// Number of clusters the device spans.
    pub fn cluster_count(&self) -> u64 {
        crate::cluster::cluster_count(self.size)
    }
}

/// The archive header: the first `header_size` bytes of every archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveHeader {
    /// Identifies the archive; every extent header repeats it.
    pub uuid: Uuid,
    /// Creation time, seconds since the Unix epoch.
    pub ctime: i64,
    /// Config entries in slot order.
    pub configs: Vec<ConfigEntry>,
    /// Devices in id order.
    pub devices: Vec<DeviceInfo>,
}

impl ArchiveHeader {
    /// Reads `header_size` from the start of an archive, checking magic, version, the
    /// size's range and the blob buffer's bounds, so that a streaming reader knows how
    /// many bytes to read (and that the number is sane) before it allocates them.
    ///
    /// `prefix` must hold at least the first 60 bytes; the fixed header is 12288.
    pub fn header_size_from_prefix(prefix: &[u8]) -> Result<usize> {
        let prefix = crate::error::prefix(prefix, off::RESERVED, "archive header")?;
        let magic: [u8; 4] = prefix[off::MAGIC..off::MAGIC + 4].try_into().unwrap();
        if magic != VMA_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = BigEndian::read_u32(&prefix[off::VERSION..]);
        if version != VMA_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let header_size = BigEndian::read_u32(&prefix[off::HEADER_SIZE..]);
        let hs = header_size as usize;
        if hs <= VMA_FIXED_HEADER_SIZE || hs > VMA_MAX_HEADER_SIZE {
            return Err(FormatError::HeaderSize {
                size: header_size,
                min: VMA_FIXED_HEADER_SIZE + 1,
                max: VMA_MAX_HEADER_SIZE,
            });
        }
        let offset = BigEndian::read_u32(&prefix[off::BLOB_BUFFER_OFFSET..]);
        let size = BigEndian::read_u32(&prefix[off::BLOB_BUFFER_SIZE..]);
        let end = offset as u64 + size as u64;
        if (offset as usize) < VMA_FIXED_HEADER_SIZE || size == 0 || end > header_size as u64 {
            return Err(FormatError::BlobBufferBounds {
                offset,
                size,
                header_size,
                fixed: VMA_FIXED_HEADER_SIZE,
            });
        }
        Ok(hs)
    }

    /// Decodes and validates a whole header. `bytes` must hold at least `header_size`
    /// bytes (see [`header_size_from_prefix`](Self::header_size_from_prefix)); bytes past
    /// it are ignored.
    pub fn decode(bytes: &[u8]) -> Result<ArchiveHeader> {
        let header_size = Self::header_size_from_prefix(bytes)?;
        let bytes = crate::error::prefix(bytes, header_size, "archive header")?;

        let stored: [u8; 16] = bytes[off::MD5SUM..off::MD5SUM + 16].try_into().unwrap();
        let computed = header_md5(bytes);
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }

        let blob_offset = BigEndian::read_u32(&bytes[off::BLOB_BUFFER_OFFSET..]) as usize;
        let blob_used = BigEndian::read_u32(&bytes[off::BLOB_BUFFER_SIZE..]) as usize;
        let blobs = BlobTable::parse(&bytes[blob_offset..blob_offset + blob_used], blob_offset)?;

        let uuid = Uuid::from_bytes(bytes[off::UUID..off::UUID + 16].try_into().unwrap());
        let ctime = BigEndian::read_i64(&bytes[off::CTIME..]);

        let mut configs = Vec::new();
        let mut config_names = HashSet::new();
        for slot in 0..VMA_MAX_CONFIGS {
            let name_at = off::CONFIG_NAMES + 4 * slot;
            let data_at = off::CONFIG_DATA + 4 * slot;
            let name_ptr = BigEndian::read_u32(&bytes[name_at..]);
            let data_ptr = BigEndian::read_u32(&bytes[data_at..]);
            match (name_ptr, data_ptr) {
                (0, 0) => continue,
                (0, _) | (_, 0) => return Err(FormatError::ConfigUnpaired { slot }),
                _ => {}
            }
            let name_blob = blobs.get(BlobField::ConfigName, slot, name_ptr, name_at)?;
            let name = decode_name(
                name_blob,
                blobs.archive_offset(name_ptr),
                BlobField::ConfigName,
                slot,
            )?;
            let data = blobs
                .get(BlobField::ConfigData, slot, data_ptr, data_at)?
                .to_vec();
            if !config_names.insert(name.clone()) {
                return Err(FormatError::DuplicateConfigName { name });
            }
            configs.push(ConfigEntry { name, data });
        }

        let mut devices = Vec::new();
        let mut device_names = HashSet::new();
        for id in 0..VMA_MAX_DEVICES {
            let at = off::DEV_INFO + off::DEV_INFO_SIZE * id;
            let name_ptr = BigEndian::read_u32(&bytes[at + off::DEV_NAME_PTR..]);
            let size = BigEndian::read_u64(&bytes[at + off::DEV_SIZE..]);
            let bad = |reason| FormatError::BadDeviceSlot {
                id,
                offset: at,
                reason,
            };
            match (name_ptr, size) {
                (0, 0) => continue,
                _ if id == 0 => return Err(bad("slot 0 is reserved and must be empty")),
                (0, _) => return Err(bad("it has a size but no name")),
                (_, 0) => return Err(bad("it has a name but size 0")),
                _ => {}
            }
            let id8 = id as u8;
            if size > VMA_MAX_DEVICE_SIZE {
                return Err(FormatError::DeviceTooLarge {
                    id: id8,
                    size,
                    max: VMA_MAX_DEVICE_SIZE,
                });
            }
            let blob = blobs.get(BlobField::DeviceName, id, name_ptr, at + off::DEV_NAME_PTR)?;
            let name = decode_name(
                blob,
                blobs.archive_offset(name_ptr),
                BlobField::DeviceName,
                id,
            )?;
            if !device_names.insert(name.clone()) {
                return Err(FormatError::DuplicateDeviceName { name });
            }
            devices.push(DeviceInfo {
                id: DeviceId(id8),
                name,
                size,
            });
        }

        Ok(ArchiveHeader {
            uuid,
            ctime,
            configs,
            devices,
        })
    }

    /// Adds a config entry to a header being authored, checking everything
    /// [`encode`](Self::encode) checks for it now, plus that `name` is a plain file name
    /// ([`names::check_file_name`](crate::names::check_file_name)), so that it can be
    /// extracted.
    pub fn add_config(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let slot = self.configs.len();
        if slot >= VMA_MAX_CONFIGS {
            return Err(FormatError::TooManyConfigs {
                count: slot + 1,
                max: VMA_MAX_CONFIGS,
            });
        }
        check_file_name(name, BlobField::ConfigName, slot)?;
        if self.config(name).is_some() {
            return Err(FormatError::DuplicateConfigName { name: name.into() });
        }
        check_blob_len(data.len(), BlobField::ConfigData, slot)?;
        self.configs.push(ConfigEntry {
            name: name.into(),
            data: data.to_vec(),
        });
        Ok(())
    }

    /// Adds a device of `size` bytes to a header being authored, with the next id
    /// (1, 2, ... up to [`VMA_MAX_WRITER_DEVICE_ID`], as Proxmox's writer hands them out),
    /// checking everything [`encode`](Self::encode) checks for it now, plus that `name`
    /// is a plain file name.
    pub fn add_device(&mut self, name: &str, size: u64) -> Result<DeviceId> {
        let next = self.devices.iter().map(|d| d.id.0).max().unwrap_or(0) as usize + 1;
        let id = u8::try_from(next)
            .ok()
            .filter(|&id| id <= VMA_MAX_WRITER_DEVICE_ID)
            .ok_or(FormatError::TooManyDevices {
                max: VMA_MAX_WRITER_DEVICE_ID as usize,
            })?;
        check_file_name(name, BlobField::DeviceName, next)?;
        if self.device_by_name(name).is_some() {
            return Err(FormatError::DuplicateDeviceName { name: name.into() });
        }
        check_device_size(id, size)?;
        self.devices.push(DeviceInfo {
            id: DeviceId(id),
            name: name.into(),
            size,
        });
        Ok(DeviceId(id))
    }

    /// Encodes the header exactly as Proxmox's writer lays it out: blobs from position 1,
    /// each config's name then its data, then the device names in id order; the buffer
    /// grown in whole 512-byte units whenever the next blob does not fit; MD5 last.
    ///
    /// Validates what it encodes as [`decode`](Self::decode) would, so that whatever it
    /// returns decodes again to `self`.
    pub fn encode(&self) -> Result<Vec<u8>> {
        if self.configs.len() > VMA_MAX_CONFIGS {
            return Err(FormatError::TooManyConfigs {
                count: self.configs.len(),
                max: VMA_MAX_CONFIGS,
            });
        }
        let mut devices: Vec<&DeviceInfo> = self.devices.iter().collect();
        devices.sort_by_key(|d| d.id);

        let mut blobs = BlobBuilder::new();
        let mut config_ptrs = Vec::with_capacity(self.configs.len());
        let mut config_names = HashSet::new();
        for (slot, config) in self.configs.iter().enumerate() {
            check_name(&config.name, BlobField::ConfigName, slot)?;
            if !config_names.insert(config.name.as_str()) {
                return Err(FormatError::DuplicateConfigName {
                    name: config.name.clone(),
                });
            }
            let name_ptr = blobs.push_name(&config.name, BlobField::ConfigName, slot)?;
            let data_ptr = blobs.push(&config.data, BlobField::ConfigData, slot)?;
            config_ptrs.push((name_ptr, data_ptr));
        }
        let mut device_ptrs = Vec::with_capacity(devices.len());
        let mut device_names = HashSet::new();
        let mut last_id = 0u8;
        for device in &devices {
            let id = device.id.get();
            if id == last_id {
                return Err(FormatError::DuplicateDeviceId(id));
            }
            last_id = id;
            check_device_size(id, device.size)?;
            check_name(&device.name, BlobField::DeviceName, id.into())?;
            if !device_names.insert(device.name.as_str()) {
                return Err(FormatError::DuplicateDeviceName {
                    name: device.name.clone(),
                });
            }
            device_ptrs.push(blobs.push_name(&device.name, BlobField::DeviceName, id.into())?);
        }

        if config_ptrs.is_empty() && device_ptrs.is_empty() {
            return Err(FormatError::EmptyHeader);
        }
        let header_size = VMA_FIXED_HEADER_SIZE + blobs.allocated();
        if header_size > VMA_MAX_HEADER_SIZE {
            return Err(FormatError::HeaderTooLarge {
                size: header_size,
                max: VMA_MAX_HEADER_SIZE,
            });
        }
        let mut out = vec![0u8; header_size];
        out[off::MAGIC..off::MAGIC + 4].copy_from_slice(&VMA_MAGIC);
        BigEndian::write_u32(&mut out[off::VERSION..], VMA_VERSION);
        out[off::UUID..off::UUID + 16].copy_from_slice(self.uuid.as_bytes());
        BigEndian::write_i64(&mut out[off::CTIME..], self.ctime);
        BigEndian::write_u32(
            &mut out[off::BLOB_BUFFER_OFFSET..],
            VMA_BLOB_BUFFER_OFFSET as u32,
        );
        BigEndian::write_u32(&mut out[off::BLOB_BUFFER_SIZE..], blobs.used() as u32);
        BigEndian::write_u32(&mut out[off::HEADER_SIZE..], header_size as u32);
        for (slot, (name_ptr, data_ptr)) in config_ptrs.into_iter().enumerate() {
            BigEndian::write_u32(&mut out[off::CONFIG_NAMES + 4 * slot..], name_ptr);
            BigEndian::write_u32(&mut out[off::CONFIG_DATA + 4 * slot..], data_ptr);
        }
        for (device, name_ptr) in devices.iter().zip(device_ptrs) {
            let at = off::DEV_INFO + off::DEV_INFO_SIZE * device.id.index();
            BigEndian::write_u32(&mut out[at + off::DEV_NAME_PTR..], name_ptr);
            BigEndian::write_u64(&mut out[at + off::DEV_SIZE..], device.size);
        }
        out[VMA_BLOB_BUFFER_OFFSET..VMA_BLOB_BUFFER_OFFSET + blobs.used()]
            .copy_from_slice(blobs.bytes());
        let md5 = header_md5(&out);
        out[off::MD5SUM..off::MD5SUM + 16].copy_from_slice(&md5);
        Ok(out)
    }

    /// The archive offset of the first non-zero byte in the header's reserved fields (the
    /// area after `header_size`, the word after `config_data`, and the reserved parts of every
    /// `dev_info` entry), or `None` when they are all zero, as Proxmox's writer leaves them.
    ///
    /// [`decode`](Self::decode) does not look at them (Proxmox's reader does not either); a
    /// strict reader calls this too. `bytes` shorter than the fixed header are checked as
    /// far as they go.
    pub fn first_nonzero_reserved(bytes: &[u8]) -> Option<usize> {
        let mut ranges = vec![
            off::RESERVED..off::CONFIG_NAMES,
            off::RESERVED2..off::DEV_INFO,
        ];
        for id in 0..VMA_MAX_DEVICES {
            let at = off::DEV_INFO + off::DEV_INFO_SIZE * id;
            ranges.push(at + off::DEV_RESERVED..at + off::DEV_SIZE);
            ranges.push(at + off::DEV_RESERVED2..at + off::DEV_INFO_SIZE);
        }
        ranges.into_iter().find_map(|r| {
            let end = r.end.min(bytes.len());
            let start = r.start.min(end);
            bytes[start..end]
                .iter()
                .position(|&b| b != 0)
                .map(|p| start + p)
        })
    }

    /// The device with this id.
    pub fn device(&self, id: DeviceId) -> Option<&DeviceInfo> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// The device with this name.
    pub fn device_by_name(&self, name: &str) -> Option<&DeviceInfo> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The config entry with this name.
    pub fn config(&self, name: &str) -> Option<&ConfigEntry> {
        self.configs.iter().find(|c| c.name == name)
    }
}

/// MD5 over the header bytes with the MD5 field taken as zero.
fn header_md5(header: &[u8]) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update(&header[..off::MD5SUM]);
    md5.update([0u8; 16]);
    md5.update(&header[off::MD5SUM + 16..]);
    md5.finalize().into()
}

/// Validates a name for storage (see [`crate::names::check_printable`]).
fn check_name(name: &str, field: BlobField, slot: usize) -> Result<()> {
    crate::names::check_printable(name).map_err(|(problem, _)| FormatError::BadName {
        field,
        slot,
        problem,
        offset: None,
    })
}

/// Validates a name for a new archive: printable and a plain file name.
fn check_file_name(name: &str, field: BlobField, slot: usize) -> Result<()> {
    crate::names::check_file_name(name).map_err(|problem| FormatError::BadName {
        field,
        slot,
        problem,
        offset: None,
    })
}

/// Checks that a blob of `len` bytes fits its u16 length field.
fn check_blob_len(len: usize, field: BlobField, slot: usize) -> Result<()> {
    if len > VMA_MAX_BLOB_SIZE {
        return Err(FormatError::BlobTooLarge {
            field,
            slot,
            len,
            max: VMA_MAX_BLOB_SIZE,
        });
    }
    Ok(())
}

/// Checks a device size: at least one byte, at most 2^32 clusters.
fn check_device_size(id: u8, size: u64) -> Result<()> {
    if size == 0 {
        return Err(FormatError::ZeroDeviceSize { id });
    }
    if size > VMA_MAX_DEVICE_SIZE {
        return Err(FormatError::DeviceTooLarge {
            id,
            size,
            max: VMA_MAX_DEVICE_SIZE,
        });
    }
    Ok(())
}

/// Turns a stored name blob (with its NUL), found at archive byte `at`, into a name.
fn decode_name(blob: &[u8], at: usize, field: BlobField, slot: usize) -> Result<String> {
    let bad = |problem, offset| FormatError::BadName {
        field,
        slot,
        problem,
        offset: Some(offset),
    };
    let Some((&0, text)) = blob.split_last() else {
        return Err(bad(
            NameProblem::NotTerminated,
            at + blob.len().saturating_sub(1),
        ));
    };
    let name =
        std::str::from_utf8(text).map_err(|e| bad(NameProblem::NotUtf8, at + e.valid_up_to()))?;
    crate::names::check_printable(name).map_err(|(problem, i)| bad(problem, at + i))?;
    Ok(name.to_owned())
}

/// The parsed blob buffer: the blob starts found by walking the length fields from 1.
struct BlobTable<'a> {
    buffer: &'a [u8],
    /// Archive offset of the buffer.
    archive_offset: usize,
    /// Blob start positions in ascending order.
    starts: Vec<u32>,
}

impl<'a> BlobTable<'a> {
    fn parse(buffer: &'a [u8], archive_offset: usize) -> Result<BlobTable<'a>> {
        let mut starts = Vec::new();
        let mut pos = 1usize;
        while pos < buffer.len() {
            let len = if pos + 2 <= buffer.len() {
                LittleEndian::read_u16(&buffer[pos..]) as usize
            } else {
                usize::MAX
            };
            if len == usize::MAX || pos + 2 + len > buffer.len() {
                return Err(FormatError::BlobChain {
                    offset: archive_offset + pos,
                    len: if len == usize::MAX { 0 } else { len },
                });
            }
            starts.push(pos as u32);
            pos += 2 + len;
        }
        Ok(BlobTable {
            buffer,
            archive_offset,
            starts,
        })
    }

    /// Archive offset of the contents of the blob at `ptr` (past its length field).
    fn archive_offset(&self, ptr: u32) -> usize {
        self.archive_offset + ptr as usize + 2
    }

    /// The blob a pointer refers to; `at` is the pointer's own header offset.
    fn get(&self, field: BlobField, slot: usize, ptr: u32, at: usize) -> Result<&'a [u8]> {
        if self.starts.binary_search(&ptr).is_err() {
            return Err(FormatError::BadPointer {
                field,
                slot,
                ptr,
                offset: at,
            });
        }
        let pos = ptr as usize;
        let len = LittleEndian::read_u16(&self.buffer[pos..]) as usize;
        Ok(&self.buffer[pos + 2..pos + 2 + len])
    }
}

/// Builds a blob buffer the way Proxmox's writer does.
struct BlobBuilder {
    buffer: Vec<u8>,
    allocated: usize,
}

impl BlobBuilder {
    fn new() -> BlobBuilder {
        // Position 0 is never used, so that pointer 0 can mean "none".
        BlobBuilder {
            buffer: vec![0],
            allocated: 0,
        }
    }

    fn push(&mut self, data: &[u8], field: BlobField, slot: usize) -> Result<u32> {
        check_blob_len(data.len(), field, slot)?;
        let need = data.len() + 2;
        if self.allocated < self.buffer.len() + need {
            self.allocated += need.div_ceil(VMA_BLOB_BUFFER_UNIT) * VMA_BLOB_BUFFER_UNIT;
        }
        let ptr = self.buffer.len();
        if VMA_FIXED_HEADER_SIZE + self.allocated > VMA_MAX_HEADER_SIZE {
            return Err(FormatError::HeaderTooLarge {
                size: VMA_FIXED_HEADER_SIZE + self.allocated,
                max: VMA_MAX_HEADER_SIZE,
            });
        }
        // The one little-endian field of the format (spec/FORMAT.md).
        let mut len = [0u8; 2];
        LittleEndian::write_u16(&mut len, data.len() as u16);
        self.buffer.extend_from_slice(&len);
        self.buffer.extend_from_slice(data);
        Ok(ptr as u32)
    }

    fn push_name(&mut self, name: &str, field: BlobField, slot: usize) -> Result<u32> {
        let mut blob = Vec::with_capacity(name.len() + 1);
        blob.extend_from_slice(name.as_bytes());
        blob.push(0);
        self.push(&blob, field, slot)
    }

    fn used(&self) -> usize {
        self.buffer.len()
    }

    fn allocated(&self) -> usize {
        self.allocated
    }

    fn bytes(&self) -> &[u8] {
        &self.buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_fields_are_found_wherever_they_are_set() {
        let header = ArchiveHeader {
            uuid: Uuid::from_u128(1),
            ctime: 0,
            configs: vec![],
            devices: vec![DeviceInfo {
                id: DeviceId(3),
                name: "d".into(),
                size: 4096,
            }],
        };
        let bytes = header.encode().unwrap();
        assert_eq!(ArchiveHeader::first_nonzero_reserved(&bytes), None);
        let dev3 = off::DEV_INFO + 3 * off::DEV_INFO_SIZE;
        for at in [
            off::RESERVED,
            off::CONFIG_NAMES - 1,
            off::RESERVED2 + 3,
            dev3 + off::DEV_RESERVED,
            dev3 + off::DEV_INFO_SIZE - 1,
        ] {
            let mut b = bytes.clone();
            b[at] = 1;
            assert_eq!(ArchiveHeader::first_nonzero_reserved(&b), Some(at));
        }
        // Short input is checked as far as it goes.
        assert_eq!(ArchiveHeader::first_nonzero_reserved(&bytes[..100]), None);
    }
}
