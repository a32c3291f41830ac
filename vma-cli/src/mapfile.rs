//! The restore map that `vma extract -r <file>` reads, line by line, as Proxmox VE's
//! `qmrestore` writes it into a FIFO:
//!
//! ```text
//! format=raw:0:drive-scsi0=/dev/pve/vm-100-disk-0
//! format=raw:throttling.bps=1048576:cache=none:1:drive-virtio1=/path/disk.raw
//! skip=drive-efidisk0
//! done
//! ```
//!
//! `0:` means the target is known to be zero (skip writing zeros), `1:` that zeros must be
//! written. The map ends at `done`, an empty line or the end of the input.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

/// One device's line of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapTarget {
    /// Restore into this existing file or block device.
    Path {
        /// Where to write.
        path: PathBuf,
        /// Whether zeros must be written where the archive stores none.
        write_zero: bool,
        /// The image format given, if any (only `raw` can be written).
        format: Option<String>,
    },
    /// Do not restore this device (it is still validated).
    Skip,
}

/// Errors in a map, with the offending line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The line is not of any known form.
    #[error("read map failed - parse error ('{0}')")]
    Parse(String),
    /// An option given twice on one line.
    #[error("read map failed - duplicate value for option '{option}' ('{line}')")]
    Duplicate {
        /// The option.
        option: &'static str,
        /// The line.
        line: String,
    },
    /// A line with no device name.
    #[error("read map failed - no dev name specified ('{0}')")]
    NoDevName(String),
    /// `throttling.bps` that is not a number.
    #[error("read map failed - not a number: {0}")]
    NotANumber(String),
    /// A device named twice.
    #[error("read map failed - device '{0}' mapped twice")]
    DuplicateDevice(String),
    /// A line longer than the reference's 8 KiB buffer.
    #[error("read map failed - line longer than 8191 bytes")]
    LineTooLong,
    /// The map could not be read.
    #[error("read map failed - {0}")]
    Io(String),
}

/// Longest line the reference tool reads (its buffer is 8192 bytes with the NUL).
const MAX_LINE: usize = 8191;
/// Options that may stand before `0:`/`1:`, in any order.
const OPTIONS: [&str; 4] = ["format", "throttling.bps", "throttling.group", "cache"];

/// Parses a whole map into device name → target.
pub fn parse<R: BufRead>(mut input: R) -> Result<BTreeMap<String, MapTarget>, MapError> {
    let mut map = BTreeMap::new();
    let mut raw = Vec::new();
    loop {
        raw.clear();
        let n = std::io::Read::take(&mut input, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut raw)
            .map_err(|e| MapError::Io(e.to_string()))?;
        if n == 0 {
            break;
        }
        if raw.last() == Some(&b'\n') {
            raw.pop();
        } else if n > MAX_LINE {
            return Err(MapError::LineTooLong);
        }
        let line = String::from_utf8_lossy(&raw).into_owned();
        if line.is_empty() || line == "done" {
            break;
        }
        let (name, target) = parse_line(&line)?;
        if map.insert(name.clone(), target).is_some() {
            return Err(MapError::DuplicateDevice(name));
        }
    }
    Ok(map)
}

/// Parses one line into (device name, target).
pub fn parse_line(line: &str) -> Result<(String, MapTarget), MapError> {
    if let Some(rest) = line.strip_prefix("skip") {
        let name = rest
            .strip_prefix('=')
            .filter(|n| !n.is_empty())
            .ok_or_else(|| MapError::Parse(line.to_string()))?;
        return Ok((name.to_string(), MapTarget::Skip));
    }
    let mut values: [Option<&str>; 4] = [None; 4];
    let mut rest = line;
    'options: loop {
        for (i, option) in OPTIONS.iter().enumerate() {
            let Some(after) = rest.strip_prefix(option).and_then(|r| r.strip_prefix('=')) else {
                continue;
            };
            let (value, tail) = after
                .split_once(':')
                .ok_or_else(|| MapError::Parse(line.to_string()))?;
            if values[i].replace(value).is_some() {
                return Err(MapError::Duplicate {
                    option,
                    line: line.to_string(),
                });
            }
            rest = tail;
            continue 'options;
        }
        break;
    }
    if let Some(bps) = values[1] {
        bps.parse::<u64>()
            .map_err(|_| MapError::NotANumber(bps.to_string()))?;
    }
    let (write_zero, spec) = match rest.split_at_checked(2) {
        Some(("0:", spec)) => (false, spec),
        Some(("1:", spec)) => (true, spec),
        _ => return Err(MapError::Parse(line.to_string())),
    };
    let (name, path) = spec
        .split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| MapError::NoDevName(line.to_string()))?;
    Ok((
        name.to_string(),
        MapTarget::Path {
            path: PathBuf::from(path),
            write_zero,
            format: values[0].map(str::to_string),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_qmrestore_writes() {
        let text = "format=raw:0:drive-scsi0=/dev/pve/vm-100-disk-0\n\
                    format=raw:throttling.bps=1048576:cache=none:1:drive-virtio1=/tmp/a=b.raw\n\
                    skip=drive-efidisk0\n\
                    done\n\
                    format=raw:0:ignored=/after/done\n";
        let map = parse(text.as_bytes()).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(
            map["drive-scsi0"],
            MapTarget::Path {
                path: "/dev/pve/vm-100-disk-0".into(),
                write_zero: false,
                format: Some("raw".into())
            }
        );
        assert_eq!(
            map["drive-virtio1"],
            MapTarget::Path {
                path: "/tmp/a=b.raw".into(),
                write_zero: true,
                format: Some("raw".into())
            }
        );
        assert_eq!(map["drive-efidisk0"], MapTarget::Skip);
    }

    #[test]
    fn old_style_lines_and_end_of_input() {
        let map = parse("0:drive-scsi0=/x".as_bytes()).unwrap();
        assert!(matches!(
            &map["drive-scsi0"],
            MapTarget::Path {
                format: None,
                write_zero: false,
                ..
            }
        ));
        assert!(parse("".as_bytes()).unwrap().is_empty());
        assert!(
            parse("\nformat=raw:0:a=/b\n".as_bytes())
                .unwrap()
                .is_empty(),
            "an empty line ends the map"
        );
    }

    #[test]
    fn bad_lines_are_errors() {
        for (line, want) in [
            ("2:drive=/x", "parse error"),
            ("format=raw", "parse error"),
            ("format=raw:format=qcow2:0:a=/x", "duplicate value"),
            ("0:/no/name", "no dev name"),
            ("0:=/x", "no dev name"),
            ("throttling.bps=fast:0:a=/x", "not a number"),
            ("skip=", "parse error"),
            ("skip", "parse error"),
        ] {
            let err = parse_line(line).unwrap_err().to_string();
            assert!(err.contains(want), "{line}: {err}");
        }
        let twice = "0:a=/x\n1:a=/y\n";
        assert_eq!(
            parse(twice.as_bytes()),
            Err(MapError::DuplicateDevice("a".into()))
        );
        let long = format!("0:a={}\n", "x".repeat(9000));
        assert_eq!(parse(long.as_bytes()), Err(MapError::LineTooLong));
    }
}
