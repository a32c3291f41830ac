//! Declaring an archive: identity, config entries and devices, before any data.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use vma_format::{ArchiveHeader, BlockMask, DeviceId, Uuid, VMSTATE_DEVICE_NAME};

use crate::error::{Error, Result};
use crate::file::FileWriter;
use crate::identity::derived_uuid;
use crate::writer::Writer;

/// Tells the tokens of one builder from those of another.
static NEXT_ARCHIVE: AtomicU64 = AtomicU64::new(1);

/// A disk of the archive, as [`Builder::add_device`] hands it out; pass it to the write
/// calls. Cheap to copy and to send to other threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Device {
    pub(crate) id: DeviceId,
    pub(crate) archive: u64,
}

impl Device {
    /// The device's id in the archive (1, 2, ... in declaration order).
    pub fn id(&self) -> DeviceId {
        self.id
    }
}

/// The VM's RAM-state stream (the device `vmstate`), as [`Builder::add_vmstate`] hands it
/// out; pass it to [`WriterHandle::append_vmstate`](crate::WriterHandle::append_vmstate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VmState(pub(crate) Device);

impl VmState {
    /// The stream's device id in the archive.
    pub fn id(&self) -> DeviceId {
        self.0.id
    }
}

/// Declares an archive: its uuid and time, its config entries and its devices. Turning it
/// into a [`Writer`] with [`build`](Builder::build) (or [`create_file`](Builder::create_file))
/// consumes it, so nothing can be declared once data has started.
#[derive(Debug)]
pub struct Builder {
    pub(crate) archive: u64,
    pub(crate) header: ArchiveHeader,
    pub(crate) integrity: bool,
    pub(crate) extent_index: bool,
    pub(crate) fsync: bool,
    /// Whether `build` replaces the uuid with [`derived_uuid`] of the declarations.
    pub(crate) derive_uuid: bool,
    /// Whether clusters enter the archive in canonical order.
    pub(crate) canonical: bool,
    pub(crate) observer: Option<Observer>,
}

/// A cluster as the writer records it into the archive, handed to the observer set with
/// [`Builder::on_cluster`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordedCluster {
    /// The device.
    pub device: DeviceId,
    /// The cluster number.
    pub cluster: u32,
    /// Bytes of the cluster inside the device (65536 except for the last cluster).
    pub span: usize,
    /// The blocks stored; the others are zero (or past the device end).
    pub mask: BlockMask,
}

/// The observer of recorded clusters.
pub(crate) struct Observer(pub(crate) Box<dyn FnMut(&RecordedCluster) + Send>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl Default for Builder {
    fn default() -> Builder {
        Builder::new()
    }
}

impl Builder {
    /// An empty declaration with a random (v4) uuid, the current time, the integrity
    /// extension on and fsync on (for file output).
    pub fn new() -> Builder {
        let ctime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Builder {
            archive: NEXT_ARCHIVE.fetch_add(1, Ordering::Relaxed),
            header: ArchiveHeader {
                uuid: Uuid::new_v4(),
                ctime,
                configs: Vec::new(),
                devices: Vec::new(),
            },
            integrity: true,
            extent_index: true,
            fsync: true,
            derive_uuid: false,
            canonical: false,
            observer: None,
        }
    }

    /// Sets the archive's uuid (to reproduce an archive bit for bit, or to give a series
    /// of backups one uuid, e.g. [`uuid_from_name`](crate::uuid_from_name)). Undoes
    /// [`derive_uuid`](Builder::derive_uuid).
    pub fn uuid(&mut self, uuid: Uuid) -> &mut Builder {
        self.header.uuid = uuid;
        self.derive_uuid = false;
        self
    }

    /// Derives the uuid from the declarations when the writer starts:
    /// [`derived_uuid`](crate::derived_uuid) of the ctime, config entries and devices
    /// declared by then. Undone by a later [`uuid`](Builder::uuid).
    pub fn derive_uuid(&mut self) -> &mut Builder {
        self.derive_uuid = true;
        self
    }

    /// Makes the order of clusters in the archive independent of thread timing: the disks'
    /// clusters enter it device by device (in id order), each device's in ascending
    /// order, then the vmstate stream's; extents are cut every
    /// [`VMA_WRITER_CLUSTERS_PER_EXTENT`](vma_format::VMA_WRITER_CLUSTERS_PER_EXTENT)
    /// clusters as always, so the same data gives the same bytes. Default: off (clusters
    /// enter as they are written, as in a live backup).
    ///
    /// Write calls may still come from any number of threads and in any order: each
    /// packs its first clusters, then waits until every cluster before its range is
    /// recorded. Some thread must therefore write what comes first: one thread alone writes
    /// in canonical order, else its call waits until another thread's call fills the gap
    /// (or `finish` or `abort`, from another thread, ends the wait with
    /// [`Error::OutOfOrder`]). A write call that fails ends every wait the same way, since
    /// what it left unwritten blocks the order.
    pub fn canonical_order(&mut self, on: bool) -> &mut Builder {
        self.canonical = on;
        self
    }

    /// A reproducible archive: [`derive_uuid`](Builder::derive_uuid) and
    /// [`canonical_order`](Builder::canonical_order). With a fixed [`ctime`](Builder::ctime)
    /// the same declarations and data give a byte-identical archive (integrity extension
    /// on or off) on any machine, whatever the threads' timing.
    pub fn reproducible(&mut self) -> &mut Builder {
        self.derive_uuid().canonical_order(true)
    }

    /// Sets the creation time, in seconds since the Unix epoch.
    pub fn ctime(&mut self, secs: i64) -> &mut Builder {
        self.header.ctime = secs;
        self
    }

    /// Switches vma-rs's integrity extension (a CRC32C per extent and a seal at the end
    /// hashing every header, both invisible to other readers) on or off. Off, the
    /// archive's layout is exactly what Proxmox's own writer produces. Default: on.
    pub fn integrity(&mut self, on: bool) -> &mut Builder {
        self.integrity = on;
        self
    }

    /// With the integrity extension on: whether the archive ends with the extent index,
    /// copies of every data extent's header written between the last data extent and the
    /// seal (empty extents every VMA reader skips, covered by the seal), so that a reader
    /// with random access opens the archive in a constant number of reads (two or three
    /// from the end of the file) instead of one read per extent, which matters over a
    /// network (ranged GETs from a bucket). Without integrity there is no index whatever
    /// this says. Default: on.
    ///
    /// Cost: 657 bytes of archive per data extent (the copy, 512 bytes, in 399-byte
    /// pieces per 512-byte index extent), 0.017 % of a full extent; and memory: the writer
    /// keeps each data extent's 512-byte header until it finishes, 0.0135 % of the data
    /// in full extents (148 MB, 141 MiB, per TiB), at most 512 bytes per 58 clusters of
    /// disk whether they are stored or zero (so the same 141 MiB per TiB of disk for a
    /// sparse one). Switch it off for very large archives on small machines.
    pub fn extent_index(&mut self, on: bool) -> &mut Builder {
        self.extent_index = on;
        self
    }

    /// For [`create_file`](Builder::create_file) only: whether finishing fsyncs the
    /// archive before renaming it into place, and its directory after. Default: on.
    pub fn fsync(&mut self, on: bool) -> &mut Builder {
        self.fsync = on;
        self
    }

    /// Calls `observe` for every cluster of a disk as the writer records it, in the order
    /// clusters enter the archive: for progress that follows what is really stored (Proxmox's
    /// `vma create -v` counts zero blocks this way). It runs on whichever thread records the
    /// cluster, with the writer's state locked: keep it short, and never call the writer
    /// from it. Not called for the vmstate stream.
    pub fn on_cluster(
        &mut self,
        observe: impl FnMut(&RecordedCluster) + Send + 'static,
    ) -> &mut Builder {
        self.observer = Some(Observer(Box::new(observe)));
        self
    }

    /// The archive's uuid (random unless set or derived; a derived one is of the
    /// declarations so far).
    pub fn archive_uuid(&self) -> Uuid {
        if self.derive_uuid {
            derived_uuid(&self.header)
        } else {
            self.header.uuid
        }
    }

    /// Adds a config entry. Like Proxmox's `vma create`, only the basename of `name` is
    /// stored (`/etc/pve/qemu-server/100.conf` becomes `100.conf`).
    ///
    /// Fails with [`Error::Declaration`] for a name that is not a plain file name or is
    /// declared twice, data over 65535 bytes, or a 257th entry (vma-format's
    /// [`ArchiveHeader::add_config`] checks).
    pub fn add_config(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let name = name.rsplit('/').next().unwrap_or(name);
        self.header
            .add_config(name, data)
            .map_err(|source| Error::Declaration {
                kind: "config",
                name: name.to_owned(),
                source,
            })
    }

    /// Adds a disk of `size` bytes (recorded as given; see
    /// [`round_up_to_sector`](crate::round_up_to_sector) for Proxmox's rounding). Ids are
    /// handed out 1, 2, ... in the order of `add_device` and `add_vmstate` calls.
    ///
    /// Fails with [`Error::ReservedName`] for the name `vmstate`, and with
    /// [`Error::Declaration`] for a name that is not a plain file name or is declared
    /// twice, size 0, a size over 256 TiB, or a 255th device (vma-format's
    /// [`ArchiveHeader::add_device`] checks).
    pub fn add_device(&mut self, name: &str, size: u64) -> Result<Device> {
        if name == VMSTATE_DEVICE_NAME {
            return Err(Error::ReservedName);
        }
        let id = self.push_device(name, size)?;
        Ok(Device {
            id,
            archive: self.archive,
        })
    }

    /// Adds the VM's RAM-state stream (the device `vmstate`) of `size` bytes, written with
    /// [`append_vmstate`](crate::WriterHandle::append_vmstate).
    pub fn add_vmstate(&mut self, size: u64) -> Result<VmState> {
        let id = self.push_device(VMSTATE_DEVICE_NAME, size)?;
        Ok(VmState(Device {
            id,
            archive: self.archive,
        }))
    }

    fn push_device(&mut self, name: &str, size: u64) -> Result<DeviceId> {
        self.header
            .add_device(name, size)
            .map_err(|source| Error::Declaration {
                kind: "device",
                name: name.to_owned(),
                source,
            })
    }

    /// Fixes the uuid if it is to be derived.
    pub(crate) fn settle_uuid(&mut self) {
        if self.derive_uuid {
            self.header.uuid = derived_uuid(&self.header);
        }
    }

    /// Encodes the header (which also validates it as a whole).
    pub(crate) fn encode_header(&self) -> Result<Vec<u8>> {
        Ok(self.header.encode()?)
    }

    /// Starts writing the archive into `sink`, on a dedicated sink thread that owns it
    /// until [`Writer::finish`] hands it back.
    ///
    /// Fails with [`Error::Format`] when the header cannot be encoded, e.g.
    /// [`FormatError::EmptyHeader`](vma_format::FormatError::EmptyHeader) when nothing was
    /// declared.
    pub fn build<W: Write + Send + 'static>(self, sink: W) -> Result<Writer<W>> {
        Writer::start(self, sink)
    }

    /// Starts writing the archive to the file `path`, under a temporary name in the same
    /// directory; [`FileWriter::finish`] renames it into place. Fails with
    /// [`Error::TargetExists`] if `path` exists: an archive is never overwritten.
    pub fn create_file(self, path: impl AsRef<Path>) -> Result<FileWriter> {
        FileWriter::create(self, path.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_are_checked() {
        use vma_format::{FormatError as F, NameProblem, VMA_MAX_DEVICE_SIZE};
        let declared = |r: Result<()>| match r {
            Err(Error::Declaration { source, .. }) => source,
            other => panic!("{other:?}"),
        };
        let mut b = Builder::new();
        b.add_config("/etc/pve/qemu-server/100.conf", b"x").unwrap();
        assert_eq!(b.header.configs[0].name, "100.conf");
        assert!(matches!(
            declared(b.add_config("100.conf", b"y")),
            F::DuplicateConfigName { .. }
        ));
        assert!(matches!(
            declared(b.add_config("..", b"y")),
            F::BadName {
                problem: NameProblem::NotPlain,
                ..
            }
        ));
        assert!(matches!(
            declared(b.add_config("a\nb", b"y")),
            F::BadName {
                problem: NameProblem::ControlCharacter(b'\n'),
                ..
            }
        ));
        assert!(matches!(
            declared(b.add_config("big", &vec![0; 65536])),
            F::BlobTooLarge { .. }
        ));
        assert!(matches!(
            b.add_device("vmstate", 1),
            Err(Error::ReservedName)
        ));
        let device = |b: &mut Builder, name: &str, size| b.add_device(name, size).map(|_| ());
        assert!(matches!(
            declared(device(&mut b, "d", 0)),
            F::ZeroDeviceSize { .. }
        ));
        assert!(matches!(
            declared(device(&mut b, "d", VMA_MAX_DEVICE_SIZE + 1)),
            F::DeviceTooLarge { .. }
        ));
        assert!(matches!(
            declared(device(&mut b, "a/b", 1)),
            F::BadName {
                problem: NameProblem::Slash,
                ..
            }
        ));
        for i in 1..=254u32 {
            let d = b.add_device(&format!("d{i}"), 1).unwrap();
            assert_eq!(u32::from(d.id().get()), i);
        }
        assert!(matches!(
            declared(device(&mut b, "one-more", 1)),
            F::TooManyDevices { max: 254 }
        ));
        assert!(matches!(
            Builder::new().encode_header(),
            Err(Error::Format(F::EmptyHeader))
        ));
        assert_eq!(
            Builder::new().encode_header().unwrap_err().kind(),
            crate::ErrorKind::Usage
        );
    }
}
