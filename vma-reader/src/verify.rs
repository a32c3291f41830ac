//! Verification: every check, nothing written.

use vma_format::DeviceId;

use crate::error::Result;
use crate::integrity::IntegrityReport;
use crate::options::{ReadOptions, VerifyOptions};
use crate::stream::{ArchiveStream, IntoArchiveStream, ReadProgress};

/// What verification found for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceReport {
    /// Device id.
    pub id: DeviceId,
    /// Device name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Cluster slots read for it.
    pub clusters: u64,
    /// Cluster slots that store nothing (all-zero clusters).
    pub zero_clusters: u64,
    /// Device bytes covered by stored blocks.
    pub stored_bytes: u64,
    /// Device bytes not stored, which read as zero.
    pub zero_bytes: u64,
    /// Device bytes not stored, counted as Proxmox's `vma -v` counts its "sparse bytes":
    /// in whole 512-byte sectors, blocks past the last whole sector left out.
    pub sparse_bytes: u64,
    /// The part of [`sparse_bytes`](Self::sparse_bytes) in clusters that store some
    /// blocks: Proxmox's "4K zero blocks".
    pub partial_sparse_bytes: u64,
}

/// What reading an archive found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Per device, in id order.
    pub devices: Vec<DeviceReport>,
    /// What the integrity extension says.
    pub integrity: IntegrityReport,
    /// Archive bytes read.
    pub archive_bytes: u64,
    /// Whether the archive was read to its end and found complete.
    pub complete: bool,
}

impl VerifyReport {
    /// Complete, with no damaged extent and no seal mismatch.
    pub fn is_ok(&self) -> bool {
        self.complete && self.integrity.is_ok()
    }
}

/// Reads a whole archive and runs every check, writing nothing: from any [`Read`](std::io::Read)
/// (`&bytes[..]`, a file, a pipe, a decompressor), from an [`ArchiveStream`] whose header
/// was read already (a [`StreamReader`](crate::StreamReader) or a
/// [`PrefetchingReader`](crate::PrefetchingReader), read on with its own options but the
/// damage policy of these), or from a [`SeekableArchive`](crate::SeekableArchive)'s file
/// (`&archive`, read again from its start, the data's CRC32Cs checked).
///
/// Structural damage (checksums of headers, truncation, duplicate, missing or misplaced
/// clusters) is an `Err`. Data CRC32C and seal mismatches are listed in the report
/// ([`VerifyReport::is_ok`] is false), unless [`OnDamage::Fail`](crate::OnDamage::Fail) makes them errors too.
/// The seal is always checked (for a stream: if its options say so).
pub fn verify(
    input: impl IntoArchiveStream,
    mut options: VerifyOptions<'_>,
) -> Result<VerifyReport> {
    let read = ReadOptions::new().on_damage(options.damage_policy());
    let mut stream = input.into_stream(read)?;
    let mut progress = options.take_progress();
    verify_dyn(&mut stream, progress.as_deref_mut())
}

fn verify_dyn(
    stream: &mut dyn ArchiveStream,
    mut progress: Option<&mut (dyn FnMut(&ReadProgress) + '_)>,
) -> Result<VerifyReport> {
    while stream.next_extent()?.is_some() {
        // Progress is summed over the devices: only when someone asks.
        if let Some(p) = progress.as_mut() {
            p(&stream.progress());
        }
    }
    Ok(stream.report())
}
