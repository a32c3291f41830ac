#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

use std::ffi::OsStr;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::{Arc, OnceLock};

mod config;
mod object;
mod upload;

pub use config::Config;
pub use object::S3Object;
pub use upload::S3Upload;

/// Bytes of one part of a multipart upload (64 MiB), unless [`Config::with_part_size`] or
/// [`Config::create_sized`] chose another. S3 allows at most 10,000 parts, so this default
/// caps one object at 10,000 × 64 MiB = 625 GiB (16 MiB parts would cap it at 156 GiB,
/// too small for the disks of a large VM); [`Config::create_sized`] grows the part so that
/// an archive of a known size fits.
pub const PART_SIZE: usize = 64 << 20;

/// Parts of an upload being sent at once. An [`S3Upload`] holds at most
/// `part_size * (MAX_PARTS_IN_FLIGHT + 1)` bytes: the part being filled and the parts in
/// flight (320 MiB with the default [`PART_SIZE`]).
pub const MAX_PARTS_IN_FLIGHT: usize = 4;

/// Bytes an [`S3Object`] keeps of what it fetched (64 MiB), in aligned units of
/// [`UNIT_SIZE`] and small windows of [`WINDOW_SIZE`], least recently used evicted first.
pub const CACHE_BYTES: usize = 64 << 20;

/// The aligned unit an [`S3Object`] fetches for large or sequential reads (4 MiB).
pub const UNIT_SIZE: usize = 4 << 20;

/// The aligned window an [`S3Object`] fetches for a small read (below this size, and not
/// continuing a previous read), such as an extent header: 64 KiB.
pub const WINDOW_SIZE: usize = 64 << 10;

/// Units read ahead, in parallel, once reads are sequential (4, so 16 MiB).
pub const READ_AHEAD_UNITS: usize = 4;

/// GETs an [`S3Object`] has in flight at once for read-ahead and [`vma_reader::ReadAt::will_read`].
pub const MAX_FETCHES_IN_FLIGHT: usize = 8;

/// The result of this crate's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where an object lives: `s3://BUCKET/KEY`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    bucket: String,
    key: String,
}

impl Location {
    /// Parses `s3://BUCKET/KEY`. The bucket must be non-empty and the key a non-empty
    /// object path without empty, `.` or `..` segments.
    pub fn parse(url: &str) -> Result<Location> {
        let bad = |reason: &'static str| Error::InvalidLocation {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("does not start with s3://"))?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| bad("has no key: expected s3://BUCKET/KEY"))?;
        if bucket.is_empty() {
            return Err(bad("has no bucket: expected s3://BUCKET/KEY"));
        }
        if key.is_empty() {
            return Err(bad("has an empty key: expected s3://BUCKET/KEY"));
        }
        if object_store::path::Path::parse(key).is_err() || key.ends_with('/') {
            return Err(bad(
                "has a key with an empty, `.` or `..` segment or a trailing `/`",
            ));
        }
        Ok(Location {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// Whether a command-line argument names an object (`s3://…`) rather than a file.
    pub fn is_s3(arg: &OsStr) -> bool {
        arg.as_encoded_bytes().starts_with(b"s3://")
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The object's key in its bucket.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn path(&self) -> object_store::path::Path {
        object_store::path::Path::parse(&self.key).expect("checked by Location::parse")
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

impl std::str::FromStr for Location {
    type Err = Error;
    fn from_str(s: &str) -> Result<Location> {
        Location::parse(s)
    }
}

/// What went wrong. Every message names the object (`s3://bucket/key`); none holds a
/// secret.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not an `s3://BUCKET/KEY` URL.
    #[error("{url}: not an S3 location: it {reason}")]
    InvalidLocation {
        /// What was given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No such object (HEAD answered 404 and the bucket exists).
    #[error("{location}: no such object")]
    NotFound {
        /// The object.
        location: Location,
    },
    /// No such bucket.
    #[error("{location}: no such bucket `{}`", location.bucket())]
    NoSuchBucket {
        /// The object asked for.
        location: Location,
    },
    /// The server refused the credentials or the request (HTTP 401/403).
    #[error("{location}: access denied with {credentials}: {cause}")]
    AccessDenied {
        /// The object.
        location: Location,
        /// Where the credentials came from and the access key ID (never the secret).
        credentials: String,
        /// The server's answer.
        cause: String,
    },
    /// The configuration is incomplete or unreadable (no credentials, a bad profile file).
    #[error("S3 configuration: {0}")]
    Config(String),
    /// A request failed, after the retries of the [`Config`] (see
    /// [`Config::with_retries`]).
    #[error("{location}: {op} failed: {cause}")]
    Request {
        /// The object.
        location: Location,
        /// The S3 operation (`GET`, `HEAD`, `UploadPart`, …).
        op: &'static str,
        /// The last cause, with its chain.
        cause: String,
    },
    /// The object changed since [`Config::open`] (its ETag differs, or it holds fewer
    /// bytes than its HEAD said).
    #[error("{location}: the object changed while it was being read: {detail}")]
    Changed {
        /// The object.
        location: Location,
        /// What was seen.
        detail: String,
    },
    /// The upload's cancel flag ([`S3Upload::cancel_when`]) was set before it completed:
    /// it was aborted.
    #[error("{location}: interrupted: the upload was aborted, no object was written")]
    Cancelled {
        /// The object.
        location: Location,
    },
    /// A local I/O error, or an upload that failed before (poisoned).
    #[error("{location}: {source}")]
    Io {
        /// The object.
        location: Location,
        /// The cause.
        #[source]
        source: Arc<io::Error>,
    },
}

impl Error {
    /// The [`io::ErrorKind`] this error maps to.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            Error::NotFound { .. } | Error::NoSuchBucket { .. } => io::ErrorKind::NotFound,
            Error::AccessDenied { .. } => io::ErrorKind::PermissionDenied,
            Error::InvalidLocation { .. } | Error::Config(_) => io::ErrorKind::InvalidInput,
            Error::Io { source, .. } => source.kind(),
            // Not `Interrupted`: `write_all` retries on that.
            Error::Request { .. } | Error::Changed { .. } | Error::Cancelled { .. } => {
                io::ErrorKind::Other
            }
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(e.io_kind(), e)
    }
}

/// The crate's runtime: a small multi-threaded tokio runtime, made on first use and kept
/// for the life of the process; the blocking API drives it with `block_on`.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vma-s3")
            .enable_all()
            .build()
            .expect("vma-s3: cannot start its tokio runtime")
    })
}

/// Runs a future to completion from a synchronous caller.
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// An error with its whole chain of causes, for messages.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A server's XML error body in a message, shortened to `Code: Message`.
fn tidy(cause: String) -> String {
    let Some(i) = cause.find("<?xml").or_else(|| cause.find("<Error>")) else {
        return cause.trim_end_matches([':', ' ']).to_string();
    };
    let field = |tag: &str| {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        let from = cause.find(&open)? + open.len();
        let len = cause[from..].find(&close)?;
        let text = cause[from..from + len].trim();
        let text = text.strip_prefix("<![CDATA[").unwrap_or(text);
        Some(text.strip_suffix("]]>").unwrap_or(text).to_string())
    };
    match (field("Code"), field("Message")) {
        (Some(code), Some(msg)) => format!("{}{code}: {msg}", &cause[..i]),
        (Some(code), None) => format!("{}{code}", &cause[..i]),
        _ => cause,
    }
}

/// Maps an object_store error of operation `op` on `location`.
pub(crate) fn map_error(
    e: object_store::Error,
    location: &Location,
    credentials: &str,
    op: &'static str,
) -> Error {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Error::NotFound {
            location: location.clone(),
        },
        E::PermissionDenied { ref source, .. } | E::Unauthenticated { ref source, .. } => {
            Error::AccessDenied {
                location: location.clone(),
                credentials: credentials.to_string(),
                cause: tidy(chain(source.as_ref())),
            }
        }
        E::Precondition { .. } | E::NotModified { .. } => Error::Changed {
            location: location.clone(),
            detail: format!("{op}: the server says the ETag no longer matches"),
        },
        other => Error::Request {
            location: location.clone(),
            op,
            cause: tidy(chain(&other)),
        },
    }
}
