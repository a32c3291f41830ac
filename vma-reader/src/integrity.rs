//! What the integrity extension (per-extent CRC32C and the archive seal, see
//! [`vma_format::integrity`]) says about an archive, as the readers report it.

use std::fmt;

use vma_format::integrity::{Seal, SealHasher};
use vma_format::DeviceId;

/// The integrity check of one extent's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtentChecksum {
    /// The extent carries no checksum (archives from Proxmox's writer never do).
    Absent,
    /// The CRC32C matched.
    Verified,
    /// The CRC32C did not match: the data is damaged.
    Mismatch {
        /// CRC32C recorded in the extent header.
        stored: u32,
        /// CRC32C of the data read.
        computed: u32,
    },
    /// A checksum of an extension version this crate does not know.
    UnknownVersion(u8),
    /// The reader was told not to check checksums.
    NotChecked,
}

/// Whether the archive is sealed, and whether the seal holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealStatus {
    /// No seal: an archive from Proxmox's writer, or one whose seal was cut off.
    Unsealed,
    /// Sealed, and extent count and SHA-256 match the headers that precede the seal.
    Sealed,
    /// Sealed, but extent count or SHA-256 differ: the archive was altered.
    Mismatch {
        /// Archive offset of the seal.
        offset: u64,
        /// What differs.
        reason: String,
    },
    /// A seal of an extension version this crate does not know.
    UnknownVersion(u8),
    /// Sealed, extent count matches, but the SHA-256 was not computed (turned off).
    NotVerified,
}

/// Whether the archive carries an extent index (see
/// [`vma_format::extent_index`]), and whether its copies are the headers they copy.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtentIndexStatus {
    /// No extent index: an archive from Proxmox's writer, without the integrity extension,
    /// or written with `Builder::extent_index(false)`.
    Absent,
    /// Present, and its copies equal the data extent headers read.
    Consistent {
        /// Index extents.
        extents: u64,
    },
    /// The seekable reader opened the archive through it: the copies passed every check a
    /// scan of the headers makes and the seal (which covers the copies), but the headers
    /// they copy were not read. A full verify (the streaming reader) compares them.
    Opened {
        /// Index extents.
        extents: u64,
    },
    /// Present, but it does not decode or its copies differ from the headers read.
    Mismatch {
        /// Archive offset of the first index extent.
        offset: u64,
        /// What differs.
        reason: String,
    },
    /// An extent index of a version this crate does not know.
    UnknownVersion(u8),
}

impl fmt::Display for ExtentIndexStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtentIndexStatus::Absent => f.write_str("absent"),
            ExtentIndexStatus::Consistent { extents } => {
                write!(
                    f,
                    "present ({extents} extents), consistent with the headers"
                )
            }
            ExtentIndexStatus::Opened { extents } => {
                write!(f, "present ({extents} extents), used to open the archive")
            }
            ExtentIndexStatus::Mismatch { offset, reason } => {
                write!(f, "extent index mismatch at byte {offset}: {reason}")
            }
            ExtentIndexStatus::UnknownVersion(v) => {
                write!(f, "present with unknown version {v}")
            }
        }
    }
}

/// Checks a seal found at `offset` after `extents` data extents against the headers
/// hashed so far (`None`: hashing was turned off).
pub(crate) fn check_seal(
    offset: u64,
    seal: &Seal,
    extents: u64,
    hashed: Option<&SealHasher>,
) -> SealStatus {
    let mismatch = |reason: String| SealStatus::Mismatch { offset, reason };
    if seal.extents != extents {
        return mismatch(format!(
            "it counts {} extents before it, the archive has {extents}",
            seal.extents
        ));
    }
    match hashed {
        None => SealStatus::NotVerified,
        Some(h) if h.seal().sha256 == seal.sha256 => SealStatus::Sealed,
        Some(_) => mismatch("the SHA-256 of the headers before it differs".into()),
    }
}

/// A cluster of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterAddress {
    /// The device.
    pub device: DeviceId,
    /// The cluster number.
    pub cluster: u32,
}

/// An extent whose data failed its CRC32C.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DamagedExtent {
    /// Extent index, 0 for the first extent after the header.
    pub index: u64,
    /// Archive offset of the extent.
    pub offset: u64,
    /// CRC32C recorded.
    pub stored: u32,
    /// CRC32C computed.
    pub computed: u32,
    /// The device clusters it holds: each may be damaged.
    pub clusters: Vec<ClusterAddress>,
}

/// The integrity of a whole archive.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IntegrityReport {
    /// The seal.
    pub seal: SealStatus,
    /// The extent index.
    pub extent_index: ExtentIndexStatus,
    /// Data extents (the seal and the index extents not counted).
    pub total_extents: u64,
    /// Extents whose CRC32C was checked (matching or not).
    pub checksummed_extents: u64,
    /// Extents with a checksum of an unknown version: not verifiable.
    pub unverifiable_extents: u64,
    /// Extents whose CRC32C did not match.
    pub damaged: Vec<DamagedExtent>,
}

impl Default for IntegrityReport {
    fn default() -> Self {
        IntegrityReport {
            seal: SealStatus::Unsealed,
            extent_index: ExtentIndexStatus::Absent,
            total_extents: 0,
            checksummed_extents: 0,
            unverifiable_extents: 0,
            damaged: Vec::new(),
        }
    }
}

impl IntegrityReport {
    /// No damaged extent, no seal mismatch and no extent index mismatch. (An unsealed or
    /// unchecksummed archive is "ok": nothing says it is damaged.)
    pub fn is_ok(&self) -> bool {
        self.damaged.is_empty()
            && !matches!(self.seal, SealStatus::Mismatch { .. })
            && !matches!(self.extent_index, ExtentIndexStatus::Mismatch { .. })
    }

    /// Every extent carries a verified-format checksum and the seal holds.
    pub fn is_fully_verified(&self) -> bool {
        self.is_ok()
            && self.seal == SealStatus::Sealed
            && self.checksummed_extents == self.total_extents
    }
}

/// Writes "drive-scsi0 clusters 3-5, 9; drive-virtio1 cluster 0" from addresses.
pub(crate) fn describe_clusters(
    clusters: &[ClusterAddress],
    name: impl Fn(DeviceId) -> String,
) -> String {
    if clusters.is_empty() {
        return "no device clusters".into();
    }
    let mut sorted = clusters.to_vec();
    sorted.sort();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let dev = sorted[i].device;
        if !out.is_empty() {
            out.push_str("; ");
        }
        let mut runs: Vec<(u32, u32)> = Vec::new();
        while i < sorted.len() && sorted[i].device == dev {
            let c = sorted[i].cluster;
            match runs.last_mut() {
                Some((_, end)) if end.checked_add(1) == Some(c) => *end = c,
                _ => runs.push((c, c)),
            }
            i += 1;
        }
        let many = runs.len() > 1 || runs[0].0 != runs[0].1;
        out.push_str(&format!(
            "{} cluster{} ",
            name(dev),
            if many { "s" } else { "" }
        ));
        let parts: Vec<String> = runs
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        out.push_str(&parts.join(", "));
    }
    out
}

impl fmt::Display for SealStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealStatus::Unsealed => f.write_str("unsealed"),
            SealStatus::Sealed => f.write_str("sealed"),
            SealStatus::Mismatch { offset, reason } => {
                write!(f, "seal mismatch at byte {offset}: {reason}")
            }
            SealStatus::UnknownVersion(v) => write!(f, "sealed with unknown version {v}"),
            SealStatus::NotVerified => f.write_str("sealed (not verified)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_lists_read_as_runs() {
        let d = |id| DeviceId::new(id).unwrap();
        let a = |dev, cluster| ClusterAddress {
            device: d(dev),
            cluster,
        };
        let list = [a(1, 5), a(1, 3), a(1, 4), a(1, 9), a(2, 0)];
        assert_eq!(
            describe_clusters(&list, |id| format!("dev{id}")),
            "dev1 clusters 3-5, 9; dev2 cluster 0"
        );
    }
}
