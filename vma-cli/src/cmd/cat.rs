//! `vma cat`: one device's raw image to standard output.

use std::io::{self, Read, Write};
use std::path::Path;

use super::{open_seekable, stdout_error};
use crate::error::{CliError, Exit, Result};

pub(crate) fn run(file: &Path, device: &str, index: Option<&Path>) -> Result<()> {
    let archive = open_seekable(file, index)?;
    if archive.header().device_by_name(device).is_none() {
        let names: Vec<&str> = archive.devices().iter().map(|d| d.name.as_str()).collect();
        return Err(CliError::new(
            Exit::NotFound,
            format!(
                "no device named {device} in the archive (it has: {})",
                names.join(", ")
            ),
        ));
    }
    let mut reader = archive.device(device)?;
    let mut out = io::stdout().lock();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CliError::io(file.display(), e)),
        };
        out.write_all(&buf[..n]).map_err(stdout_error)?;
    }
    out.flush().map_err(stdout_error)
}
