//! The seek table of zstd's seekable format (zstd's `contrib/seekable_format`), the index
//! a compressed archive carries at its end so that a reader can decompress any part of
//! it without decompressing what comes before.
//!
//! A seekable zstd stream is a sequence of independent zstd frames followed by one
//! skippable frame, which every zstd decoder steps over (so `zstd -d` reads the stream as
//! the concatenation of the frames' contents):
//!
//! ```text
//! skippable frame header   magic 0x184D2A5E (u32 LE), frame size (u32 LE) = 8 * n (+ 4 * n) + 9
//! n entries                compressed size (u32 LE), decompressed size (u32 LE),
//!                          [checksum (u32 LE), when the descriptor says so]
//! footer (9 bytes)         number of frames n (u32 LE), descriptor (u8), magic 0x8F92EAB1 (u32 LE)
//! ```
//!
//! Descriptor: bit 7 says whether entries carry a checksum (the low 32 bits of the XXH64
//! of the frame's content); bits 6..2 are reserved and must be zero. Unlike VMA, every
//! number here is little-endian.
//!
//! This module encodes a table ([`encode`]) and decodes and checks one
//! ([`SeekIndex::parse`]) against the stream it ends: a table whose frames do not add up
//! to the bytes before it, or that claims more frames or larger frames than a reader
//! should allocate for, is a [`SeekTableError`] naming the byte offset.

use std::fmt;

use byteorder::{ByteOrder, LittleEndian};

/// The four bytes every zstd frame starts with (0xFD2FB528, little-endian).
pub const ZSTD_FRAME_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Magic of the skippable frame that holds the seek table.
pub const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// Magic at the very end of a seekable stream.
pub const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
/// Bytes of the footer: frame count, descriptor, magic.
pub const FOOTER_SIZE: usize = 9;
/// Bytes of a skippable frame's header: magic and frame size.
pub const SKIPPABLE_HEADER_SIZE: usize = 8;
/// The descriptor bit that says entries carry checksums.
const CHECKSUM_FLAG: u8 = 0x80;
/// Descriptor bits that must be zero.
const RESERVED_BITS: u8 = 0x7c;
/// Most frames a table may list: the index of the frames costs 16 bytes each, so this
/// caps it at 128 MiB (at the 2 MiB or more of content per frame that `vma create`
/// writes, enough for 16 TiB).
pub const MAX_FRAMES: u32 = 1 << 23;
/// Largest decompressed frame accepted: what a reader holds in memory per frame.
pub const MAX_FRAME_CONTENT: u32 = 64 << 20;

/// One frame as the table describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameEntry {
    /// Bytes of the compressed frame.
    pub compressed: u32,
    /// Bytes of its content.
    pub decompressed: u32,
}

/// What is wrong with a seek table. Offsets are bytes into the compressed stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SeekTableError {
    /// The stream does not end with the seekable footer: it carries no seek table (a zstd
    /// stream as `zstd` writes it, or one cut short).
    NoFooter {
        /// Bytes in the stream.
        stream_len: u64,
    },
    /// Reserved descriptor bits are set.
    ReservedBits {
        /// Offset of the descriptor byte.
        offset: u64,
        /// The descriptor.
        descriptor: u8,
    },
    /// The table claims more frames than the stream can hold or a reader accepts.
    TooManyFrames {
        /// Offset of the footer.
        offset: u64,
        /// Frames claimed.
        frames: u32,
    },
    /// The skippable frame in front of the entries is not there or has another size.
    SkippableHeader {
        /// Offset where it should start.
        offset: u64,
        /// Magic found.
        magic: u32,
        /// Frame size found.
        size: u32,
        /// Frame size the footer implies.
        expected: u32,
    },
    /// A frame's sizes are impossible (an empty frame, content larger than
    /// [`MAX_FRAME_CONTENT`], or a compressed size far beyond what zstd makes of the
    /// content).
    FrameSize {
        /// Index of the frame.
        frame: u32,
        /// Offset of its entry.
        offset: u64,
        /// Its compressed size.
        compressed: u32,
        /// Its decompressed size.
        decompressed: u32,
    },
    /// The frames' compressed sizes do not add up to the bytes before the table (a table
    /// for another stream, or one that lies).
    SizesDisagree {
        /// Offset of the table.
        offset: u64,
        /// What the entries add up to.
        frames_total: u64,
    },
}

impl fmt::Display for SeekTableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SeekTableError::NoFooter { stream_len } => write!(
                f,
                "no seek table at the end of the {stream_len}-byte zstd stream (not in the \
                 seekable format)"
            ),
            SeekTableError::ReservedBits { offset, descriptor } => write!(
                f,
                "seek table descriptor at byte {offset}: reserved bits set ({descriptor:#04x})"
            ),
            SeekTableError::TooManyFrames { offset, frames } => write!(
                f,
                "seek table footer at byte {offset}: {frames} frames, more than the stream \
                 can hold or the reader accepts ({MAX_FRAMES})"
            ),
            SeekTableError::SkippableHeader {
                offset,
                magic,
                size,
                expected,
            } => write!(
                f,
                "seek table at byte {offset}: skippable frame header has magic {magic:#010x} \
                 and size {size}, expected {SKIPPABLE_MAGIC:#010x} and {expected}"
            ),
            SeekTableError::FrameSize {
                frame,
                offset,
                compressed,
                decompressed,
            } => write!(
                f,
                "seek table entry at byte {offset}: frame {frame} of {compressed} bytes \
                 holding {decompressed} bytes is impossible (content is at most \
                 {MAX_FRAME_CONTENT} bytes, and zstd never makes it much larger)"
            ),
            SeekTableError::SizesDisagree {
                offset,
                frames_total,
            } => write!(
                f,
                "seek table at byte {offset}: its frames add up to {frames_total} bytes, \
                 but {offset} bytes come before it"
            ),
        }
    }
}

impl std::error::Error for SeekTableError {}

/// Encodes the skippable frame holding a seek table (without entry checksums) for these
/// frames, to be written after the last of them.
pub fn encode(frames: &[FrameEntry]) -> Vec<u8> {
    let len = SKIPPABLE_HEADER_SIZE + 8 * frames.len() + FOOTER_SIZE;
    let mut out = vec![0u8; len];
    LittleEndian::write_u32(&mut out[0..], SKIPPABLE_MAGIC);
    LittleEndian::write_u32(&mut out[4..], (len - SKIPPABLE_HEADER_SIZE) as u32);
    for (i, frame) in frames.iter().enumerate() {
        let at = SKIPPABLE_HEADER_SIZE + 8 * i;
        LittleEndian::write_u32(&mut out[at..], frame.compressed);
        LittleEndian::write_u32(&mut out[at + 4..], frame.decompressed);
    }
    let footer = len - FOOTER_SIZE;
    LittleEndian::write_u32(&mut out[footer..], frames.len() as u32);
    out[footer + 4] = 0;
    LittleEndian::write_u32(&mut out[footer + 5..], SEEKABLE_MAGIC);
    out
}

/// Where a frame is, in the compressed stream and in its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSpan {
    /// Offset of the frame in the compressed stream.
    pub compressed_offset: u64,
    /// Its compressed length.
    pub compressed_len: u32,
    /// Offset of its content in the decompressed stream.
    pub offset: u64,
    /// Its content's length.
    pub len: u32,
}

/// A checked seek table: the frames with their offsets both ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeekIndex {
    /// Start offsets: compressed, decompressed; one more entry than frames (the ends).
    starts: Vec<(u64, u64)>,
}

impl SeekIndex {
    /// How many bytes at the end of a stream of `stream_len` bytes hold its seek table,
    /// from the stream's last [`FOOTER_SIZE`] bytes: the length [`parse`](Self::parse)
    /// wants to see.
    pub fn table_len(footer: &[u8], stream_len: u64) -> Result<usize, SeekTableError> {
        if footer.len() < FOOTER_SIZE || stream_len < FOOTER_SIZE as u64 {
            return Err(SeekTableError::NoFooter { stream_len });
        }
        let footer = &footer[footer.len() - FOOTER_SIZE..];
        if LittleEndian::read_u32(&footer[5..]) != SEEKABLE_MAGIC {
            return Err(SeekTableError::NoFooter { stream_len });
        }
        let footer_at = stream_len - FOOTER_SIZE as u64;
        let descriptor = footer[4];
        if descriptor & RESERVED_BITS != 0 {
            return Err(SeekTableError::ReservedBits {
                offset: footer_at + 4,
                descriptor,
            });
        }
        let frames = LittleEndian::read_u32(footer);
        let entry = entry_size(descriptor) as u64;
        let len = SKIPPABLE_HEADER_SIZE as u64 + frames as u64 * entry + FOOTER_SIZE as u64;
        if frames > MAX_FRAMES || len > stream_len {
            return Err(SeekTableError::TooManyFrames {
                offset: footer_at,
                frames,
            });
        }
        Ok(len as usize)
    }

    /// Decodes and checks the seek table `table`, the last [`table_len`](Self::table_len)
    /// bytes of a stream of `stream_len` bytes: the skippable frame's header, each
    /// frame's sizes, and that the frames fill exactly the bytes before the table.
    pub fn parse(table: &[u8], stream_len: u64) -> Result<SeekIndex, SeekTableError> {
        let len = Self::table_len(table, stream_len)?;
        if table.len() != len {
            return Err(SeekTableError::NoFooter { stream_len });
        }
        let table_at = stream_len - len as u64;
        let descriptor = table[len - FOOTER_SIZE + 4];
        let entry = entry_size(descriptor);
        let (magic, size) = (
            LittleEndian::read_u32(table),
            LittleEndian::read_u32(&table[4..]),
        );
        let expected = (len - SKIPPABLE_HEADER_SIZE) as u32;
        if magic != SKIPPABLE_MAGIC || size != expected {
            return Err(SeekTableError::SkippableHeader {
                offset: table_at,
                magic,
                size,
                expected,
            });
        }
        let entries = &table[SKIPPABLE_HEADER_SIZE..len - FOOTER_SIZE];
        let mut starts = Vec::with_capacity(entries.len() / entry + 1);
        let (mut compressed, mut decompressed) = (0u64, 0u64);
        for (i, raw) in entries.chunks_exact(entry).enumerate() {
            let frame = FrameEntry {
                compressed: LittleEndian::read_u32(raw),
                decompressed: LittleEndian::read_u32(&raw[4..]),
            };
            if frame.compressed == 0
                || frame.decompressed > MAX_FRAME_CONTENT
                || frame.compressed as u64 > compressed_bound(frame.decompressed)
            {
                return Err(SeekTableError::FrameSize {
                    frame: i as u32,
                    offset: table_at + (SKIPPABLE_HEADER_SIZE + i * entry) as u64,
                    compressed: frame.compressed,
                    decompressed: frame.decompressed,
                });
            }
            starts.push((compressed, decompressed));
            compressed += frame.compressed as u64;
            decompressed += frame.decompressed as u64;
        }
        if compressed != table_at {
            return Err(SeekTableError::SizesDisagree {
                offset: table_at,
                frames_total: compressed,
            });
        }
        starts.push((compressed, decompressed));
        Ok(SeekIndex { starts })
    }

    /// Number of frames.
    pub fn frames(&self) -> usize {
        self.starts.len() - 1
    }

    /// Bytes of the decompressed stream.
    pub fn content_len(&self) -> u64 {
        self.starts.last().map_or(0, |s| s.1)
    }

    /// Bytes of the compressed frames (the stream less its seek table).
    pub fn compressed_len(&self) -> u64 {
        self.starts.last().map_or(0, |s| s.0)
    }

    /// Where frame `index` is, if there is such a frame.
    pub fn frame(&self, index: usize) -> Option<FrameSpan> {
        let (start, end) = (self.starts.get(index)?, self.starts.get(index + 1)?);
        Some(FrameSpan {
            compressed_offset: start.0,
            compressed_len: (end.0 - start.0) as u32,
            offset: start.1,
            len: (end.1 - start.1) as u32,
        })
    }

    /// The frame whose content holds decompressed byte `offset` (frames of no content
    /// never do), or `None` at or past the end.
    pub fn frame_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.content_len() {
            return None;
        }
        // The last start at or before `offset`: empty frames share a start with the next
        // frame, and this picks the last of them, the one with content.
        Some(self.starts.partition_point(|s| s.1 <= offset) - 1)
    }

    /// Bytes of memory the index holds.
    pub fn memory(&self) -> usize {
        self.starts.capacity() * std::mem::size_of::<(u64, u64)>()
    }
}

/// More than any zstd frame of `content` bytes takes: zstd's own bound is the content
/// plus 1/256 of it plus a few hundred bytes; this leaves room for frames that other
/// tools write less tightly.
fn compressed_bound(content: u32) -> u64 {
    content as u64 + content as u64 / 128 + 4096
}

fn entry_size(descriptor: u8) -> usize {
    if descriptor & CHECKSUM_FLAG != 0 {
        12
    } else {
        8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<FrameEntry> {
        vec![
            FrameEntry {
                compressed: 100,
                decompressed: 4096,
            },
            FrameEntry {
                compressed: 9,
                decompressed: 0,
            },
            FrameEntry {
                compressed: 50,
                decompressed: 1000,
            },
        ]
    }

    /// A stream of `prefix` bytes of frames then the table.
    fn stream_len(table: &[u8], prefix: u64) -> u64 {
        prefix + table.len() as u64
    }

    #[test]
    fn round_trip_and_lookup() {
        let table = encode(&entries());
        assert_eq!(table.len(), 8 + 3 * 8 + 9);
        let len = stream_len(&table, 159);
        assert_eq!(SeekIndex::table_len(&table, len).unwrap(), table.len());
        let ix = SeekIndex::parse(&table, len).unwrap();
        assert_eq!(ix.frames(), 3);
        assert_eq!(ix.content_len(), 5096);
        assert_eq!(ix.compressed_len(), 159);
        assert_eq!(ix.frame_at(0), Some(0));
        assert_eq!(ix.frame_at(4095), Some(0));
        assert_eq!(ix.frame_at(4096), Some(2), "the empty frame holds no byte");
        assert_eq!(ix.frame_at(5095), Some(2));
        assert_eq!(ix.frame_at(5096), None);
        assert_eq!(
            ix.frame(2),
            Some(FrameSpan {
                compressed_offset: 109,
                compressed_len: 50,
                offset: 4096,
                len: 1000
            })
        );
        assert_eq!(ix.frame(3), None);
    }

    #[test]
    fn an_empty_table_is_an_empty_stream() {
        let table = encode(&[]);
        let ix = SeekIndex::parse(&table, table.len() as u64).unwrap();
        assert_eq!((ix.frames(), ix.content_len()), (0, 0));
        assert_eq!(ix.frame_at(0), None);
    }

    #[test]
    fn checksummed_entries_are_read() {
        let mut table = vec![0u8; 8 + 12 + 9];
        LittleEndian::write_u32(&mut table[0..], SKIPPABLE_MAGIC);
        LittleEndian::write_u32(&mut table[4..], 12 + 9);
        LittleEndian::write_u32(&mut table[8..], 77);
        LittleEndian::write_u32(&mut table[12..], 300);
        LittleEndian::write_u32(&mut table[16..], 0xdead_beef);
        LittleEndian::write_u32(&mut table[20..], 1);
        table[24] = CHECKSUM_FLAG;
        LittleEndian::write_u32(&mut table[25..], SEEKABLE_MAGIC);
        let ix = SeekIndex::parse(&table, 77 + table.len() as u64).unwrap();
        assert_eq!((ix.frames(), ix.content_len()), (1, 300));
    }

    #[test]
    fn lying_tables_are_errors_with_offsets() {
        let table = encode(&entries());
        let len = stream_len(&table, 159);
        // A stream without a table.
        assert_eq!(
            SeekIndex::table_len(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0, 0], 1000),
            Err(SeekTableError::NoFooter { stream_len: 1000 })
        );
        // Frames that add up to more, or less, than what precedes the table.
        for prefix in [158, 160, 0] {
            let err = SeekIndex::parse(&table, stream_len(&table, prefix)).unwrap_err();
            assert_eq!(
                err,
                SeekTableError::SizesDisagree {
                    offset: prefix,
                    frames_total: 159
                }
            );
            assert!(err.to_string().contains(&format!("at byte {prefix}")));
        }
        // A frame count the stream cannot hold.
        let mut bad = table.clone();
        let f = bad.len() - FOOTER_SIZE;
        LittleEndian::write_u32(&mut bad[f..], 1_000_000);
        assert!(matches!(
            SeekIndex::table_len(&bad, len),
            Err(SeekTableError::TooManyFrames {
                frames: 1_000_000,
                ..
            })
        ));
        // A frame count that does not match the skippable frame's size.
        LittleEndian::write_u32(&mut bad[f..], 2);
        assert!(matches!(
            SeekIndex::parse(&bad[8..], len),
            Err(SeekTableError::SkippableHeader { .. })
        ));
        // Reserved bits.
        let mut bad = table.clone();
        bad[f + 4] = 0x04;
        assert_eq!(
            SeekIndex::parse(&bad, len),
            Err(SeekTableError::ReservedBits {
                offset: len - 5,
                descriptor: 4
            })
        );
        // An impossible frame.
        let mut bad = table.clone();
        LittleEndian::write_u32(&mut bad[8 + 8 + 4..], MAX_FRAME_CONTENT + 1);
        assert!(matches!(
            SeekIndex::parse(&bad, len),
            Err(SeekTableError::FrameSize { frame: 1, offset, .. }) if offset == 159 + 16
        ));
        // A frame far larger than its content could compress to.
        let big = encode(&[FrameEntry {
            compressed: 1 << 20,
            decompressed: 100,
        }]);
        assert!(matches!(
            SeekIndex::parse(&big, (1 << 20) + big.len() as u64),
            Err(SeekTableError::FrameSize { frame: 0, .. })
        ));
        // A table longer than the stream.
        assert!(SeekIndex::table_len(&table, 20).is_err());
    }
}
