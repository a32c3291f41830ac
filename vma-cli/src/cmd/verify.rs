//! `vma verify`.

use std::path::PathBuf;

use serde_json::json;
use vma_reader::{
    ExtentIndexStatus, IntegrityReport, ReadOptions, SealStatus, VerifyOptions, VerifyReport,
};

use super::list::{integrity_json, print_json, print_listing};
use super::{open_seekable, open_stream};
use crate::error::{CliError, Exit, Result};
use crate::progress::{statistics, ReadingProgress};

/// Arguments of `vma verify`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The archive, or `-` for standard input.
    file: PathBuf,
    /// Print the listing, progress lines and statistics, as Proxmox's `vma verify -v`.
    #[arg(short = 'v')]
    verbose: bool,
    /// Print per-device figures and what the integrity extension says.
    #[arg(long)]
    summary: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Check the headers only (a plain, seekable zstd or lzop archive file): every structural check and the seal,
    /// but no data read, so data checksums are not checked.
    #[arg(long)]
    quick: bool,
    /// With --quick: the sidecar index of a zstd archive without a seek table (`vma index`
    /// writes it); default: ARCHIVE.idx when it exists.
    #[arg(long, value_name = "FILE", requires = "quick")]
    index: Option<PathBuf>,
}

pub(crate) fn run(args: Args) -> Result<()> {
    if args.quick {
        let archive = open_seekable(&args.file, args.index.as_deref())?;
        // Through a sidecar index the headers come from the index: the archive's own
        // bytes are checked against it (CRC32C, nothing decompressed).
        archive.check_unchanged()?;
        if args.verbose {
            print_listing(archive.header())?;
        }
        let integrity = archive.integrity().clone();
        if args.json {
            print_json(&json!({
                "ok": true,
                "mode": "quick",
                "devices": archive.devices().iter().map(|d| json!({"id": d.id.get(), "name": d.name, "size": d.size})).collect::<Vec<_>>(),
                "integrity": integrity_json(&integrity),
                "extent_index": extent_index_json(&integrity),
            }))?;
        } else if args.verbose || args.summary {
            println!("headers verified: {}", describe_integrity(&integrity, true));
        }
        return Ok(());
    }

    let stream = open_stream(&args.file, ReadOptions::default())?;
    if args.verbose {
        print_listing(stream.header())?;
    }
    let mut progress = ReadingProgress::new(args.verbose, stream.header(), "verify");
    let report = vma_reader::verify(
        stream,
        VerifyOptions::new().progress(|p| progress.update(p)),
    );
    progress.finish();
    let report = report?;
    if args.verbose {
        for line in statistics(&report) {
            println!("{line}");
        }
    }
    if args.json {
        print_json(&report_json(&report))?;
    } else if args.summary {
        for d in &report.devices {
            println!(
                "device {}: {} clusters, {} bytes stored, {} zero bytes",
                d.name, d.clusters, d.stored_bytes, d.zero_bytes
            );
        }
        println!(
            "integrity: {}",
            describe_integrity(&report.integrity, false)
        );
    }
    if !report.is_ok() {
        return Err(CliError::new(Exit::Damaged, damage_message(&report)));
    }
    Ok(())
}

fn report_json(r: &VerifyReport) -> serde_json::Value {
    json!({
        "ok": r.is_ok(),
        "mode": "full",
        "complete": r.complete,
        "archive_bytes": r.archive_bytes,
        "devices": r.devices.iter().map(|d| json!({
            "id": d.id.get(), "name": d.name, "size": d.size, "clusters": d.clusters,
            "stored_bytes": d.stored_bytes, "zero_bytes": d.zero_bytes,
        })).collect::<Vec<_>>(),
        "integrity": integrity_json(&r.integrity),
        "extent_index": extent_index_json(&r.integrity),
    })
}

/// One line on what the integrity extension says.
pub(crate) fn describe_integrity(r: &IntegrityReport, headers_only: bool) -> String {
    let checksums = if r.checksummed_extents == 0 && r.unverifiable_extents == 0 {
        "no data checksums (archive written without vma-rs's integrity extension)".to_string()
    } else if headers_only {
        format!(
            "{} of {} extents carry data checksums (not read)",
            r.checksummed_extents, r.total_extents
        )
    } else {
        format!(
            "{} of {} extents' data checksums verified{}",
            r.checksummed_extents - r.damaged.len() as u64,
            r.total_extents,
            if r.unverifiable_extents > 0 {
                format!(", {} of an unknown version", r.unverifiable_extents)
            } else {
                String::new()
            }
        )
    };
    let seal = match &r.seal {
        SealStatus::Unsealed => "not sealed".to_string(),
        SealStatus::Sealed => "sealed, seal verified".to_string(),
        SealStatus::NotVerified => "sealed (seal hash not checked)".to_string(),
        SealStatus::UnknownVersion(v) => format!("sealed with an unknown seal version {v}"),
        SealStatus::Mismatch { reason, .. } => format!("SEAL MISMATCH: {reason}"),
        other => other.to_string(),
    };
    // Said only when there is one: the line stays as it was for every other archive.
    let index = match &r.extent_index {
        ExtentIndexStatus::Absent => String::new(),
        ExtentIndexStatus::Consistent { .. } => "; extent index verified".to_string(),
        ExtentIndexStatus::Opened { .. } => "; extent index checked against the seal".to_string(),
        ExtentIndexStatus::UnknownVersion(v) => {
            format!("; extent index of an unknown version {v}")
        }
        ExtentIndexStatus::Mismatch { reason, .. } => {
            format!("; EXTENT INDEX MISMATCH: {reason}")
        }
        other => format!("; extent index {other}"),
    };
    format!("{checksums}; {seal}{index}")
}

/// The `extent_index` field of the JSON reports.
fn extent_index_json(r: &IntegrityReport) -> serde_json::Value {
    match &r.extent_index {
        ExtentIndexStatus::Absent => json!("absent"),
        ExtentIndexStatus::Consistent { extents } => {
            json!({"status": "consistent", "extents": extents})
        }
        ExtentIndexStatus::Opened { extents } => {
            json!({"status": "checked against the seal", "extents": extents})
        }
        ExtentIndexStatus::UnknownVersion(v) => json!(format!("unknown version {v}")),
        ExtentIndexStatus::Mismatch { offset, reason } => {
            json!({"status": "mismatch", "offset": offset, "reason": reason})
        }
        other => json!(other.to_string()),
    }
}

/// The error message of a verify or extract that found damaged data.
pub(crate) fn damage_message(r: &VerifyReport) -> String {
    let mut parts = Vec::new();
    for d in &r.integrity.damaged {
        let mut clusters: Vec<String> = d
            .clusters
            .iter()
            .take(8)
            .map(|c| {
                let name = r
                    .devices
                    .iter()
                    .find(|dev| dev.id == c.device)
                    .map(|dev| dev.name.as_str())
                    .unwrap_or("?");
                format!("{name} cluster {}", c.cluster)
            })
            .collect();
        if d.clusters.len() > 8 {
            clusters.push(format!("and {} more", d.clusters.len() - 8));
        }
        parts.push(format!(
            "extent {} at byte {}: data checksum mismatch (holds {})",
            d.index,
            d.offset,
            clusters.join(", ")
        ));
    }
    if let SealStatus::Mismatch { offset, reason } = &r.integrity.seal {
        parts.push(format!("seal at byte {offset}: {reason}"));
    }
    if let ExtentIndexStatus::Mismatch { offset, reason } = &r.integrity.extent_index {
        parts.push(format!("extent index at byte {offset}: {reason}"));
    }
    if !r.complete {
        parts.push("archive incomplete".into());
    }
    format!("archive damaged: {}", parts.join("; "))
}
