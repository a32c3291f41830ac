//! `vma list` and `vma config`.

use std::io::Write;
use std::path::Path;

use serde_json::json;
use vma_format::ArchiveHeader;
use vma_reader::{IntegrityReport, ReadOptions, SealStatus};

use super::{open_seekable, open_stream, stdout_error};
use crate::ctime::ctime;
use crate::error::{CliError, Exit, Result};
use crate::input::Compression;

/// The lines Proxmox's `vma list` prints, which its restore parses.
pub(crate) fn listing(header: &ArchiveHeader) -> String {
    let mut out = String::new();
    for c in &header.configs {
        out.push_str(&format!("CFG: size: {} name: {}\n", c.data.len(), c.name));
    }
    for d in &header.devices {
        // The reference lists ids 1..=254 only.
        if d.id.get() == 255 {
            continue;
        }
        if d.is_vmstate() {
            out.push_str(&format!("VMSTATE: dev_id={} memory: {}\n", d.id, d.size));
        } else {
            out.push_str(&format!(
                "DEV: dev_id={} size: {} devname: {}\n",
                d.id, d.size, d.name
            ));
        }
    }
    out.push_str(&format!("CTIME: {}\n", ctime(header.ctime)));
    out
}

pub(crate) fn print_listing(header: &ArchiveHeader) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(listing(header).as_bytes())
        .and_then(|_| out.flush())
        .map_err(stdout_error)
}

pub(crate) fn list(file: &Path, json: bool, index: Option<&Path>) -> Result<()> {
    let stream = open_stream(file, ReadOptions::default())?;
    let header = stream.header().clone();
    if !json {
        return print_listing(&header);
    }
    // Integrity is known from the extent headers of a plain, seekable zstd or lzop file; a
    // stream would have to be read to its end (that is `vma verify --json`).
    let integrity = match file.as_os_str() != "-" && is_random_access(file) {
        true => {
            drop(stream);
            match open_seekable(file, index) {
                Ok(archive) => Some(archive.integrity().clone()),
                // A zstd file as zstd writes it, without an index: listed all the same,
                // without integrity. An index given that does not fit is an error.
                Err(e) if e.exit == Exit::Usage && index.is_none() => None,
                Err(e) => return Err(e),
            }
        }
        false => None,
    };
    let value = json!({
        "uuid": header.uuid.to_string(),
        "ctime": header.ctime,
        "configs": header.configs.iter().map(|c| json!({"name": c.name, "size": c.data.len()})).collect::<Vec<_>>(),
        "devices": header.devices.iter().map(|d| json!({
            "id": d.id.get(), "name": d.name, "size": d.size, "vmstate": d.is_vmstate(),
        })).collect::<Vec<_>>(),
        "integrity": integrity.as_ref().map(integrity_json),
    });
    print_json(&value)
}

fn is_random_access(file: &Path) -> bool {
    super::detect(file).is_ok_and(Compression::is_random_access)
}

pub(crate) fn integrity_json(r: &IntegrityReport) -> serde_json::Value {
    let seal = match &r.seal {
        SealStatus::Unsealed => json!("unsealed"),
        SealStatus::Sealed => json!("sealed"),
        SealStatus::NotVerified => json!("sealed, not verified"),
        SealStatus::UnknownVersion(v) => json!(format!("unknown version {v}")),
        SealStatus::Mismatch { reason, .. } => json!(format!("mismatch: {reason}")),
        other => json!(other.to_string()),
    };
    json!({
        "sealed": !matches!(r.seal, SealStatus::Unsealed),
        "seal": seal,
        "total_extents": r.total_extents,
        "checksummed_extents": r.checksummed_extents,
        "unverifiable_extents": r.unverifiable_extents,
        "damaged_extents": r.damaged.iter().map(|d| json!({
            "index": d.index, "offset": d.offset,
            "clusters": d.clusters.iter().map(|c| json!({"device": c.device.get(), "cluster": c.cluster})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub(crate) fn print_json(value: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)
        .map_err(|e| CliError::io("standard output", e.into()))?;
    out.write_all(b"\n")
        .and_then(|_| out.flush())
        .map_err(stdout_error)
}

pub(crate) fn config(file: &Path, name: &str) -> Result<()> {
    let stream = open_stream(file, ReadOptions::default())?;
    let Some(entry) = stream.header().config(name) else {
        return Err(CliError::new(
            Exit::NotFound,
            format!("unable to find configuration data '{name}'"),
        ));
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&entry.data)
        .and_then(|_| out.flush())
        .map_err(stdout_error)
}
