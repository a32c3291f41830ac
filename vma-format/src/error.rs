//! The one error type of this crate.

use std::fmt;

/// Which kind of blob a header pointer refers to; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobField {
    /// A config entry's name.
    ConfigName,
    /// A config entry's data.
    ConfigData,
    /// A device's name.
    DeviceName,
}

impl fmt::Display for BlobField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlobField::ConfigName => "config name",
            BlobField::ConfigData => "config data",
            BlobField::DeviceName => "device name",
        })
    }
}

/// What is wrong with a name stored in (or given for) the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameProblem {
    /// The blob's last byte is not NUL.
    NotTerminated,
    /// The name has no characters.
    Empty,
    /// A NUL byte before the end.
    InteriorNul,
    /// Not valid UTF-8.
    NotUtf8,
    /// A control character (a byte below 0x20, or 0x7f): it would break the one-line
    /// listing that Proxmox VE's restore parses.
    ControlCharacter(u8),
    /// `.` or `..`: not a plain file name.
    NotPlain,
    /// Contains `/`: not a plain file name.
    Slash,
    /// Longer than a file name may be (the length in bytes).
    TooLong(usize),
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameProblem::NotTerminated => "is not NUL-terminated",
            NameProblem::Empty => "is empty",
            NameProblem::InteriorNul => "contains a NUL byte",
            NameProblem::NotUtf8 => "is not valid UTF-8",
            NameProblem::ControlCharacter(b) => {
                return write!(f, "contains the control character 0x{b:02x}")
            }
            NameProblem::NotPlain => "names a folder ('.' or '..')",
            NameProblem::Slash => "contains '/'",
            NameProblem::TooLong(len) => {
                return write!(f, "is {len} bytes long, longer than 255 bytes")
            }
        })
    }
}

/// Bytes as lower-case hex digits, for checksums and magic numbers in messages.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `MD5 mismatch (stored …, computed …)`, in hex.
fn md5_mismatch(stored: &[u8; 16], computed: &[u8; 16]) -> String {
    format!(
        "MD5 mismatch (stored {}, computed {})",
        hex(stored),
        hex(computed)
    )
}

/// ` at byte N` for an offset, nothing without one.
fn at_byte(offset: Option<usize>) -> String {
    offset.map_or_else(String::new, |o| format!(" at byte {o}"))
}

/// Everything that can be wrong with VMA bytes, or with values given to an encoder.
///
/// Offsets in messages are byte offsets within the structure being decoded (the archive
/// header starts at archive byte 0; for extents, the reader adds the extent's position).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Fewer bytes than the structure needs.
    #[error("{what}: need {needed} bytes, got {got}")]
    TooShort {
        /// The structure being decoded.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// The archive does not start with `VMA\0`.
    #[error(
        "not a VMA archive: it starts with {}, not the magic 564d4100 (\"VMA\\0\")",
        hex(found)
    )]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// A version other than 1.
    #[error("archive header at byte 4: unsupported version {0} (only version 1 exists)")]
    UnsupportedVersion(u32),
    /// `header_size` is out of the accepted range.
    #[error("archive header at byte 56: header_size {size} is out of range ({min}..={max})")]
    HeaderSize {
        /// The stored value.
        size: u32,
        /// Smallest accepted value.
        min: usize,
        /// Largest accepted value.
        max: usize,
    },
    /// The blob buffer does not lie inside the header, after its fixed part.
    #[error(
        "archive header at byte 48: blob buffer (offset {offset}, {size} bytes used) \
         does not fit between byte {fixed} and header_size {header_size}"
    )]
    BlobBufferBounds {
        /// `blob_buffer_offset`.
        offset: u32,
        /// `blob_buffer_size`.
        size: u32,
        /// `header_size`.
        header_size: u32,
        /// Where the fixed header ends.
        fixed: usize,
    },
    /// The stored MD5 does not match the header bytes.
    #[error("archive header at byte 32: {}", md5_mismatch(stored, computed))]
    HeaderChecksum {
        /// MD5 stored in the header.
        stored: [u8; 16],
        /// MD5 computed over the header.
        computed: [u8; 16],
    },
    /// The blob sequence in the buffer is broken: a length runs past the used size.
    #[error(
        "archive header at byte {offset}: blob of {len} bytes runs past the end of the blob buffer"
    )]
    BlobChain {
        /// Archive byte offset of the blob's length field.
        offset: usize,
        /// The blob's stated length.
        len: usize,
    },
    /// A pointer that does not land on the start of a blob.
    #[error("archive header at byte {offset}: {field} pointer {ptr} of slot {slot} does not point at a blob")]
    BadPointer {
        /// What the pointer is for.
        field: BlobField,
        /// Config slot or device id.
        slot: usize,
        /// The pointer value.
        ptr: u32,
        /// Archive byte offset of the pointer field.
        offset: usize,
    },
    /// A name blob that is not a usable name.
    #[error("{field} of slot {slot} {problem}{}", at_byte(*offset))]
    BadName {
        /// Which name.
        field: BlobField,
        /// Config slot or device id.
        slot: usize,
        /// What is wrong.
        problem: NameProblem,
        /// Archive byte offset of the offending byte (of the blob when the whole name is
        /// at fault); `None` for a name given to the encoder.
        offset: Option<usize>,
    },
    /// A config slot with a name and no data, or data and no name.
    #[error("archive header: config slot {slot} has a name or data pointer but not both")]
    ConfigUnpaired {
        /// The config slot.
        slot: usize,
    },
    /// Two configs with the same name.
    #[error("config name {name:?} appears twice")]
    DuplicateConfigName {
        /// The name.
        name: String,
    },
    /// A device slot that is half filled in (a name and no size, or a size and no name),
    /// or the reserved slot 0 in use.
    #[error("archive header at byte {offset}: device slot {id} is inconsistent: {reason}")]
    BadDeviceSlot {
        /// The device id (slot index).
        id: usize,
        /// Archive byte offset of the slot.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A device larger than 2^32 clusters.
    #[error("device {id} has size {size}, more than the format's maximum of {max} bytes")]
    DeviceTooLarge {
        /// The device id.
        id: u8,
        /// The size given.
        size: u64,
        /// The largest possible size.
        max: u64,
    },
    /// Two devices with the same name.
    #[error("device name {name:?} appears twice")]
    DuplicateDeviceName {
        /// The name.
        name: String,
    },
    /// Device id 0 (reserved) given to an encoder.
    #[error("device id 0 is reserved")]
    ReservedDeviceId,
    /// Two devices with the same id given to an encoder.
    #[error("device id {0} is used twice")]
    DuplicateDeviceId(u8),
    /// A device of size zero given to an encoder.
    #[error("device {id} has size 0")]
    ZeroDeviceSize {
        /// The device id.
        id: u8,
    },
    /// A 255th device added to a header being authored (ids 1..=254, as Proxmox's
    /// writer hands them out).
    #[error("too many devices: at most {max} can be added")]
    TooManyDevices {
        /// The limit.
        max: usize,
    },
    /// More than 256 config entries.
    #[error("{count} config entries, at most {max} fit in the header")]
    TooManyConfigs {
        /// Entries given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A blob longer than its u16 length field can say.
    #[error("{field} of slot {slot} is {len} bytes, at most {max} fit in a blob")]
    BlobTooLarge {
        /// Which blob.
        field: BlobField,
        /// Config slot or device id.
        slot: usize,
        /// Its length (names: including the NUL).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The encoded header would exceed [`VMA_MAX_HEADER_SIZE`](crate::VMA_MAX_HEADER_SIZE).
    #[error("the header would be {size} bytes, more than the limit of {max}")]
    HeaderTooLarge {
        /// Size it would have.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A header with neither configs nor devices: its size would be the bare 12288
    /// bytes, which Proxmox's reader rejects.
    #[error("an archive needs at least one config entry or device")]
    EmptyHeader,
    /// An extent that does not start with `VMAE`.
    #[error("extent header: bad magic {}", hex(found))]
    ExtentBadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// `reserved1` of an extent header is not zero.
    #[error("extent header: reserved field is {0:#06x}, must be 0")]
    ExtentReserved(u16),
    /// The stored MD5 of an extent header does not match.
    #[error("extent header: {}", md5_mismatch(stored, computed))]
    ExtentChecksum {
        /// MD5 stored.
        stored: [u8; 16],
        /// MD5 computed.
        computed: [u8; 16],
    },
    /// `block_count` disagrees with the blocks the masks say are stored.
    #[error("extent header: block_count is {declared} but the masks store {counted} blocks")]
    ExtentBlockCount {
        /// `block_count` as stored.
        declared: u16,
        /// Sum of the set mask bits of used slots.
        counted: usize,
    },
    /// The extent belongs to another archive.
    #[error("extent header: uuid {found} differs from the archive's {expected}")]
    ExtentUuid {
        /// The archive's uuid.
        expected: uuid::Uuid,
        /// The extent's uuid.
        found: uuid::Uuid,
    },
}

/// Result alias of this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// The first `needed` bytes of `bytes`, or [`FormatError::TooShort`] naming `what`.
pub(crate) fn prefix<'a>(bytes: &'a [u8], needed: usize, what: &'static str) -> Result<&'a [u8]> {
    bytes.get(..needed).ok_or(FormatError::TooShort {
        what,
        needed,
        got: bytes.len(),
    })
}
