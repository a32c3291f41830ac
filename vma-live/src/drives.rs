//! The VM's disks as `query-block` reports them, and their archive names.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::Error;

/// One disk of the VM that can be backed up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    /// The block node the backup job reads (`inserted.node-name`).
    pub node_name: String,
    /// The guest device's qdev id or path (`qdev`), when there is one.
    pub qdev: Option<String>,
    /// The device name in the archive: `drive-<qdev id>`, following
    /// Proxmox VE's naming (e.g. `drive-scsi0`), else `drive-<node name>`.
    pub device_name: String,
    /// Size in bytes as QEMU sees it (`inserted.image.virtual-size`,
    /// already rounded up to 512 by QEMU).
    pub size: u64,
}

impl Drive {
    /// The qdev path whose block backend HMP's `qemu-io -d` writes to
    /// (`/machine/peripheral/<id>/virtio-backend` for virtio-blk).
    pub fn qdev_id(&self) -> Option<&str> {
        self.qdev.as_deref().and_then(qdev_id)
    }

    /// A JSON description of the drive (for the embedded config blob).
    pub fn to_json(&self) -> Value {
        json!({
            "node-name": self.node_name,
            "qdev": self.qdev,
            "device": self.device_name,
            "size": self.size,
        })
    }
}

/// The user-given id in a qdev reference: `vd0` for `vd0` or for
/// `/machine/peripheral/vd0/virtio-backend`; `None` for devices without an
/// id (`/machine/peripheral-anon/...`).
pub fn qdev_id(qdev: &str) -> Option<&str> {
    let id = match qdev.strip_prefix("/machine/peripheral/") {
        Some(rest) => rest.split('/').next().unwrap_or(""),
        None if qdev.starts_with('/') => return None,
        None => qdev,
    };
    (!id.is_empty()).then_some(id)
}

/// The archive device name for a node and its qdev reference.
pub fn device_name(node_name: &str, qdev: Option<&str>) -> String {
    match qdev.and_then(qdev_id) {
        Some(id) => format!("drive-{id}"),
        None => format!("drive-{node_name}"),
    }
}

/// The disks in a `query-block` reply: entries with a medium inserted, in
/// QEMU's order. Entries without a node name or size are reported as errors
/// since a backup could not address them.
pub fn parse_query_block(reply: &Value) -> Result<Vec<Drive>, Error> {
    let bad = |reason, reply: &Value| Error::QueryBlock {
        reason,
        reply: reply.clone(),
    };
    let entries = reply
        .as_array()
        .ok_or_else(|| bad("expected a list", reply))?;
    let mut drives = Vec::new();
    for entry in entries {
        let Some(inserted) = entry.get("inserted") else {
            continue;
        };
        let node_name = inserted
            .get("node-name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a drive without node-name", entry))?;
        let size = inserted
            .pointer("/image/virtual-size")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("a drive without virtual-size", entry))?;
        let qdev = entry
            .get("qdev")
            .and_then(Value::as_str)
            .filter(|q| !q.is_empty())
            .map(str::to_string);
        drives.push(Drive {
            node_name: node_name.to_string(),
            device_name: device_name(node_name, qdev.as_deref()),
            qdev,
            size,
        });
    }
    Ok(drives)
}

/// Keeps the drives whose node names are in `wanted` (all when empty), in
/// the order given; an unknown name is an error listing the known ones.
pub fn select(drives: Vec<Drive>, wanted: &[String]) -> Result<Vec<Drive>, Error> {
    if wanted.is_empty() {
        return Ok(drives);
    }
    let mut out = Vec::new();
    for name in wanted {
        let Some(d) = drives.iter().find(|d| &d.node_name == name) else {
            return Err(Error::NoSuchDrive {
                name: name.clone(),
                known: drives.iter().map(|d| d.node_name.clone()).collect(),
            });
        };
        if out.iter().any(|o: &Drive| &o.node_name == name) {
            return Err(Error::DuplicateDrive { name: name.clone() });
        }
        out.push(d.clone());
    }
    Ok(out)
}

/// The host files and devices under the VM's block nodes, from a
/// `query-named-block-nodes` reply: each `file` or `host_device` node's
/// absolute path, once.
pub fn image_files(named_nodes: &Value) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = named_nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| matches!(n["drv"].as_str(), Some("file" | "host_device")))
        .filter_map(|n| n["file"].as_str())
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .collect();
    files.sort();
    files.dedup();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(device_name("d0", Some("vd0")), "drive-vd0");
        assert_eq!(
            device_name("d0", Some("/machine/peripheral/scsi0/virtio-backend")),
            "drive-scsi0"
        );
        assert_eq!(
            device_name(
                "d0",
                Some("/machine/peripheral-anon/device[0]/virtio-backend")
            ),
            "drive-d0"
        );
        assert_eq!(device_name("#block123", None), "drive-#block123");
        assert_eq!(device_name("d0", Some("")), "drive-d0");
    }

    #[test]
    fn query_block() {
        let reply = json!([
            {"device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
             "inserted": {"node-name": "d0", "image": {"virtual-size": 67108864}}},
            {"device": "ide1-cd0", "qdev": "/machine/unattached/device[22]"},
            {"device": "", "qdev": "vd1",
             "inserted": {"node-name": "d1", "image": {"virtual-size": 41955840}}},
        ]);
        let drives = parse_query_block(&reply).unwrap();
        assert_eq!(drives.len(), 2);
        assert_eq!(drives[0].device_name, "drive-vd0");
        assert_eq!(drives[0].qdev_id(), Some("vd0"));
        assert_eq!(drives[1].size, 41955840);
        assert_eq!(drives[1].device_name, "drive-vd1");

        let sel = select(drives.clone(), &["d1".into()]).unwrap();
        assert_eq!(sel.len(), 1);
        match select(drives.clone(), &["nope".into()]) {
            Err(Error::NoSuchDrive { name, known }) => {
                assert_eq!(
                    (name.as_str(), known),
                    ("nope", vec!["d0".into(), "d1".into()])
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            select(drives, &["d0".into(), "d0".into()]),
            Err(Error::DuplicateDrive { name }) if name == "d0"
        ));

        assert!(matches!(
            parse_query_block(&json!({})),
            Err(Error::QueryBlock {
                reason: "expected a list",
                ..
            })
        ));
        assert!(matches!(
            parse_query_block(&json!([{"inserted": {"node-name": "x"}}])),
            Err(Error::QueryBlock {
                reason: "a drive without virtual-size",
                ..
            })
        ));
        assert!(matches!(
            parse_query_block(&json!([{"inserted": {}}])),
            Err(Error::QueryBlock {
                reason: "a drive without node-name",
                ..
            })
        ));
    }

    #[test]
    fn image_files_of_the_vm() {
        let nodes = json!([
            {"node-name": "d0", "drv": "qcow2", "file": "/var/lib/vz/vm-100-disk-0.qcow2"},
            {"node-name": "#block123", "drv": "file", "file": "/var/lib/vz/vm-100-disk-0.qcow2"},
            {"node-name": "d1", "drv": "raw", "file": "/dev/pve/vm-100-disk-1"},
            {"node-name": "#block456", "drv": "host_device", "file": "/dev/pve/vm-100-disk-1"},
            {"node-name": "t", "drv": "nbd", "file": "nbd+unix:///x?socket=/run/x.sock"},
            {"node-name": "r", "drv": "file", "file": "relative.raw"},
            {"node-name": "again", "drv": "file", "file": "/var/lib/vz/vm-100-disk-0.qcow2"}
        ]);
        assert_eq!(
            image_files(&nodes),
            [
                PathBuf::from("/dev/pve/vm-100-disk-1"),
                PathBuf::from("/var/lib/vz/vm-100-disk-0.qcow2")
            ]
        );
        assert!(image_files(&json!({"error": 1})).is_empty());
    }
}
