//! A Proxmox VE `qemu-server.conf` derived from the running VM, so that
//! Proxmox's restore (`qmrestore`, qemu-server's `restore_vma_archive`) can
//! restore a live backup of a stock QEMU VM.
//!
//! Proxmox's restore reads the archive's `qemu-server.conf` for its
//! `#qmdump#map:VIRTDEV:DEVNAME:STOREID:FORMAT:` lines (one per drive: which
//! config key the archive's device restores to, on which storage, in which
//! format) and writes the rest, with the drive lines pointing at the new
//! volumes, as the new VM's config. What QEMU tells over QMP fills it:
//! memory (`query-memory-size-summary`), vCPUs (`query-cpus-fast`), the name
//! (`query-name`) and one drive line per backed-up drive, keyed by its bus
//! (`qom-get` of the device's type: virtio-blk, SCSI or IDE).

use serde_json::{json, Value};

use crate::drives::Drive;
use crate::qmp::Qmp;
use crate::Error;

/// The config entry Proxmox's restore reads.
pub const CONFIG_NAME: &str = "qemu-server.conf";

/// The Proxmox config key prefix for a QEMU device type.
pub fn bus_of(device_type: &str) -> &'static str {
    if device_type.starts_with("scsi-") {
        "scsi"
    } else if device_type.starts_with("ide-") {
        "ide"
    } else {
        // virtio-blk-pci and anything this does not know: a virtio disk in Proxmox.
        "virtio"
    }
}

/// A size as Proxmox writes `size=` (`32M`, `4G`, bytes when not whole KiB).
pub fn format_size(bytes: u64) -> String {
    const K: u64 = 1024;
    for (unit, suffix) in [
        (K * K * K * K, "T"),
        (K * K * K, "G"),
        (K * K, "M"),
        (K, "K"),
    ] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// The VM's facts a config needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFacts {
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub cores: usize,
    /// QEMU's `-name`, if one was given and Proxmox can take it.
    pub name: Option<String>,
    /// One QEMU device type per drive (empty when the drive has no device).
    pub device_types: Vec<String>,
}

/// Asks QEMU what [`VmFacts`] holds, for `drives`.
pub fn query_facts(qmp: &mut Qmp, drives: &[Drive]) -> Result<VmFacts, Error> {
    let mem = qmp.execute("query-memory-size-summary", Value::Null)?;
    let memory_mib = mem.get("base-memory").and_then(Value::as_u64).unwrap_or(0) >> 20;
    let cpus = qmp.execute("query-cpus-fast", Value::Null)?;
    let cores = cpus.as_array().map_or(1, Vec::len).max(1);
    let name = qmp
        .execute("query-name", Value::Null)?
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| is_dns_name(n))
        .map(str::to_string);
    let mut device_types = Vec::new();
    for d in drives {
        let ty = match d.qdev_id() {
            Some(id) => qmp
                .execute(
                    "qom-get",
                    json!({ "path": format!("/machine/peripheral/{id}"), "property": "type" }),
                )
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            None => String::new(),
        };
        device_types.push(ty);
    }
    Ok(VmFacts {
        memory_mib,
        cores,
        name,
        device_types,
    })
}

/// Proxmox takes a VM name that is a DNS name.
fn is_dns_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.split('.').all(|part| {
            !part.is_empty()
                && !part.starts_with('-')
                && !part.ends_with('-')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The config for `drives` (in archive order) of a VM with `facts`, every
/// drive restored to storage `storage` as raw.
pub fn qemu_server_conf(facts: &VmFacts, drives: &[Drive], storage: &str) -> String {
    let mut keys = Vec::new();
    let mut next = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..drives.len() {
        let bus = bus_of(facts.device_types.get(i).map_or("", String::as_str));
        let n = next.entry(bus).or_insert(0);
        keys.push(format!("{bus}{n}"));
        *n += 1;
    }
    let mut conf = String::new();
    if let Some(first) = keys.first() {
        conf.push_str(&format!("boot: order={first}\n"));
    }
    conf.push_str(&format!("cores: {}\n", facts.cores));
    conf.push_str(&format!("memory: {}\n", facts.memory_mib.max(16)));
    if let Some(name) = &facts.name {
        conf.push_str(&format!("name: {name}\n"));
    }
    // Sorted by key, as Proxmox writes a config.
    let mut lines: Vec<(String, String)> = keys
        .iter()
        .zip(drives)
        .enumerate()
        .map(|(i, (key, d))| {
            (
                key.clone(),
                format!(
                    "{key}: {storage}:vma-live-backup-disk-{i},size={}\n",
                    format_size(d.size)
                ),
            )
        })
        .collect();
    lines.sort();
    for (_, line) in &lines {
        conf.push_str(line);
    }
    for (key, d) in keys.iter().zip(drives) {
        conf.push_str(&format!(
            "#qmdump#map:{key}:{}:{storage}:raw:\n",
            d.device_name
        ));
    }
    conf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, size: u64) -> Drive {
        Drive {
            node_name: format!("n{id}"),
            qdev: Some(format!("/machine/peripheral/{id}/virtio-backend")),
            device_name: format!("drive-{id}"),
            size,
        }
    }

    #[test]
    fn sizes_as_proxmox_writes_them() {
        assert_eq!(format_size(32 << 20), "32M");
        assert_eq!(format_size(4 << 30), "4G");
        assert_eq!(format_size(40973 * 1024), "40973K");
        assert_eq!(format_size(41955840), "41955840");
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn config_with_hints() {
        let facts = VmFacts {
            memory_mib: 256,
            cores: 1,
            name: Some("guest".into()),
            device_types: vec!["virtio-blk-pci".into(), "scsi-hd".into(), String::new()],
        };
        let drives = [
            drive("vd0", 48 << 20),
            drive("sd0", 1 << 30),
            drive("x", 4096),
        ];
        let conf = qemu_server_conf(&facts, &drives, "local");
        assert_eq!(
            conf,
            "boot: order=virtio0\ncores: 1\nmemory: 256\nname: guest\n\
             scsi0: local:vma-live-backup-disk-1,size=1G\n\
             virtio0: local:vma-live-backup-disk-0,size=48M\n\
             virtio1: local:vma-live-backup-disk-2,size=4K\n\
             #qmdump#map:virtio0:drive-vd0:local:raw:\n\
             #qmdump#map:scsi0:drive-sd0:local:raw:\n\
             #qmdump#map:virtio1:drive-x:local:raw:\n"
        );
    }

    #[test]
    fn names_proxmox_takes() {
        assert!(is_dns_name("web-1.example"));
        assert!(!is_dns_name("has space"));
        assert!(!is_dns_name("-x"));
        assert!(!is_dns_name(""));
    }
}
