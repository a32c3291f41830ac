//! Archives in S3 buckets: an argument `s3://BUCKET/KEY` names an object, read by ranged
//! GETs through [`vma_s3`] (the seekable reader over a [`vma_reader::ReadAt`] source, or
//! one pass over the same positional reads) and written by a multipart upload that is
//! completed only once the archive is complete. Endpoint, region and credentials come
//! from the standard AWS environment variables and files; `--endpoint` overrides the
//! endpoint (for S3-compatible servers).

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use vma_s3::{Config, Location, S3Object, S3Upload};

use crate::error::{CliError, Exit, Result};

/// The endpoint `--endpoint` named, for every S3 access of this run.
static ENDPOINT: OnceLock<String> = OnceLock::new();

/// Records `--endpoint` (once, at start).
pub(crate) fn set_endpoint(endpoint: Option<String>) {
    if let Some(e) = endpoint {
        let _ = ENDPOINT.set(e);
    }
}

/// The object an argument names, if it is an `s3://` URL (a malformed one is a usage
/// error).
pub(crate) fn location(arg: &Path) -> Option<Result<Location>> {
    Location::is_s3(arg.as_os_str()).then(|| {
        let text = arg
            .to_str()
            .ok_or_else(|| CliError::usage(format!("{}: not a valid s3:// URL", arg.display())))?;
        Location::parse(text).map_err(|e| CliError::usage(format!("{text}: {e}")))
    })
}

/// The S3 configuration of this run: the AWS environment and files, `--endpoint`, and
/// `AWS_MAX_ATTEMPTS` (the AWS SDKs' variable: attempts per request, the first included).
fn config() -> Result<Config> {
    let mut config = Config::from_env().map_err(|e| CliError::usage(e.to_string()))?;
    if let Some(e) = ENDPOINT.get() {
        config = config.with_endpoint(e.clone());
    }
    if let Some(attempts) = std::env::var_os("AWS_MAX_ATTEMPTS") {
        let attempts = attempts
            .to_str()
            .and_then(|a| a.parse::<usize>().ok())
            .filter(|&a| a >= 1)
            .ok_or_else(|| CliError::usage("AWS_MAX_ATTEMPTS: not a number of at least 1"))?;
        let timeout = config.retry_timeout();
        config = config.with_retries(attempts - 1, timeout);
    }
    Ok(config)
}

/// Opens the object at `at` for positional reads (one HEAD request).
pub(crate) fn open(at: &Location) -> Result<Arc<S3Object>> {
    let object = config()?.open(at).map_err(error)?;
    Ok(Arc::new(object))
}

/// The command's error for an S3 error (whose message names the object).
pub(crate) fn error(e: vma_s3::Error) -> CliError {
    let exit = match e.io_kind() {
        io::ErrorKind::InvalidInput => Exit::Usage,
        _ => Exit::Io,
    };
    CliError::new(exit, e.to_string())
}

/// The command's error for a failed read of the object at `at`: an S3 error as itself,
/// anything else (a decompressor's) as an I/O error on `at`.
pub(crate) fn io_error(at: &Location, e: io::Error) -> CliError {
    match e.get_ref().and_then(|i| i.downcast_ref::<vma_s3::Error>()) {
        Some(s3) => error(s3.clone()),
        None => CliError::io(at, e),
    }
}

/// Starts a multipart upload to `at`, sized for at most `size_hint` bytes when known: the
/// object appears only when the upload is finished. An object already under the key is
/// an error, as an existing output file is (checked by a HEAD first: S3's multipart upload
/// has no create-only mode, so a writer racing this one can still replace it).
pub(crate) fn create(at: &Location, size_hint: Option<u64>) -> Result<S3Upload> {
    let config = config()?;
    match config.open(at) {
        Ok(_) => {
            return Err(CliError::new(
                Exit::Io,
                format!("{at}: the object already exists"),
            ))
        }
        Err(vma_s3::Error::NotFound { .. }) => {}
        Err(e) => return Err(error(e)),
    }
    match size_hint {
        Some(size) => config.create_sized(at, size),
        None => config.create(at),
    }
    .map_err(error)
}
