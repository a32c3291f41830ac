//! An object written by multipart upload (README.md, "Writing").

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::{MultipartUpload, ObjectStore, PutPayload};
use tokio::task::JoinHandle;

use crate::{map_error, Config, Error, Location, Result, MAX_PARTS_IN_FLIGHT};

/// The longest [`Drop`] waits for the parts in flight, and then for AbortMultipartUpload.
const ABORT_TIMEOUT: Duration = Duration::from_secs(30);

type Part = JoinHandle<object_store::Result<()>>;

/// An object being written: [`io::Write`] buffers one part, parts go up
/// [`MAX_PARTS_IN_FLIGHT`] at once, and the object appears only at [`S3Upload::finish`].
/// Any error poisons the upload: later writes fail and `finish` aborts. Dropping it
/// unfinished aborts it (the parts in flight finish, then AbortMultipartUpload; at most
/// 30 s for each), so no object and no parts are left behind.
pub struct S3Upload {
    location: Location,
    credentials: String,
    upload: Option<Box<dyn MultipartUpload>>,
    part_size: usize,
    buf: Vec<u8>,
    in_flight: VecDeque<Part>,
    written: u64,
    parts: u64,
    poisoned: Option<Error>,
    retry_timeout: Duration,
    cancel: Option<Arc<AtomicBool>>,
}

impl fmt::Debug for S3Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Upload")
            .field("location", &self.location)
            .field("part_size", &self.part_size)
            .field("written", &self.written)
            .field("parts", &self.parts)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl S3Upload {
    pub(crate) fn start(config: &Config, at: &Location, part_size: usize) -> Result<S3Upload> {
        let store = config.store(at)?;
        let credentials = config.describe_credentials();
        let upload =
            crate::block_on(store.put_multipart(&at.path())).map_err(|e| {
                match map_error(e, at, &credentials, "CreateMultipartUpload") {
                    Error::NotFound { location } => Error::NoSuchBucket { location },
                    e => e,
                }
            })?;
        Ok(S3Upload {
            location: at.clone(),
            credentials,
            upload: Some(upload),
            part_size,
            buf: Vec::with_capacity(part_size),
            in_flight: VecDeque::new(),
            written: 0,
            parts: 0,
            poisoned: None,
            retry_timeout: config.retry_timeout(),
            cancel: None,
        })
    }

    /// Aborts instead of completing once `flag` is set (from a signal handler, say): a
    /// write after it fails with [`Error::Cancelled`], and so does [`finish`](Self::finish)
    /// if it is set by the time the last parts are up, right before the upload would be
    /// completed; either way the upload is aborted.
    pub fn cancel_when(&mut self, flag: Arc<AtomicBool>) {
        self.cancel = Some(flag);
    }

    /// [`Error::Cancelled`] (poisoning the upload) if the cancel flag is set.
    fn check_cancel(&mut self) -> Result<()> {
        match &self.cancel {
            Some(flag) if flag.load(Ordering::Relaxed) => {
                let e = Error::Cancelled {
                    location: self.location.clone(),
                };
                Err(self.poison(e))
            }
            _ => Ok(()),
        }
    }

    /// Where the object goes.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The part size of this upload.
    pub fn part_size(&self) -> usize {
        self.part_size
    }

    fn poison(&mut self, e: Error) -> Error {
        self.poisoned.get_or_insert(e).clone()
    }

    fn check(&self) -> Result<()> {
        match &self.poisoned {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn wait_part(&mut self, part: Part) -> Result<()> {
        let r = match crate::block_on(part) {
            Ok(r) => r.map_err(|e| map_error(e, &self.location, &self.credentials, "UploadPart")),
            Err(join) => Err(Error::Request {
                location: self.location.clone(),
                op: "UploadPart",
                cause: join.to_string(),
            }),
        };
        r.map_err(|e| self.poison(e))
    }

    /// Collects finished parts, surfacing their errors early.
    fn reap(&mut self) -> Result<()> {
        while self.in_flight.front().is_some_and(|p| p.is_finished()) {
            let p = self.in_flight.pop_front().expect("checked");
            self.wait_part(p)?;
        }
        Ok(())
    }

    /// Sends the buffer as the next part, first waiting for room.
    fn send_part(&mut self) -> Result<()> {
        self.reap()?;
        while self.in_flight.len() >= MAX_PARTS_IN_FLIGHT {
            let p = self.in_flight.pop_front().expect("non-empty");
            self.wait_part(p)?;
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part_size));
        let upload = self.upload.as_mut().expect("not finished");
        let fut = upload.put_part(PutPayload::from(Bytes::from(data)));
        self.in_flight.push_back(crate::runtime().spawn(fut));
        self.parts += 1;
        Ok(())
    }

    fn finish_inner(&mut self) -> Result<u64> {
        self.check()?;
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        while let Some(p) = self.in_flight.pop_front() {
            self.wait_part(p)?;
        }
        self.check_cancel()?;
        let upload = self.upload.as_mut().expect("not finished");
        crate::block_on(upload.complete()).map_err(|e| {
            let e = map_error(
                e,
                &self.location,
                &self.credentials,
                "CompleteMultipartUpload",
            );
            self.poison(e)
        })?;
        self.upload = None;
        Ok(self.written)
    }

    /// Sends the last part and completes the upload: the object appears now. Returns the
    /// bytes written. On any error (now or earlier) the upload is aborted and the error
    /// returned.
    pub fn finish(mut self) -> Result<u64> {
        match self.finish_inner() {
            Ok(n) => Ok(n),
            Err(e) => {
                let _ = self.abort_inner(self.retry_timeout.min(ABORT_TIMEOUT));
                Err(e)
            }
        }
    }

    /// Abandons the upload: the parts in flight finish (or are cancelled after the retry
    /// timeout), then AbortMultipartUpload removes the parts sent, so no object appears.
    pub fn abort(mut self) -> Result<()> {
        self.abort_inner(self.retry_timeout)
    }

    fn abort_inner(&mut self, limit: Duration) -> Result<()> {
        let parts: Vec<Part> = self.in_flight.drain(..).collect();
        let Some(mut upload) = self.upload.take() else {
            for p in &parts {
                p.abort();
            }
            return Ok(());
        };
        let location = self.location.clone();
        let credentials = self.credentials.clone();
        let fut = async move {
            // Parts in flight are let finish first (within `limit`): a part the server is
            // still storing when the abort arrives could outlive it. Those not done by
            // then are cancelled.
            let deadline = tokio::time::Instant::now() + limit;
            for mut p in parts {
                if tokio::time::timeout_at(deadline, &mut p).await.is_err() {
                    p.abort();
                    let _ = p.await;
                }
            }
            match tokio::time::timeout(limit, upload.abort()).await {
                Ok(r) => {
                    r.map_err(|e| map_error(e, &location, &credentials, "AbortMultipartUpload"))
                }
                Err(_) => Err(Error::Request {
                    location,
                    op: "AbortMultipartUpload",
                    cause: format!("no answer within {limit:?}"),
                }),
            }
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside some runtime (not ours: our API is blocking): cannot block here.
            crate::runtime().spawn(fut);
            return Ok(());
        }
        crate::block_on(fut)
    }
}

impl io::Write for S3Upload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check()?;
        self.check_cancel()?;
        let room = self.part_size - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() == self.part_size {
            self.send_part()?;
        }
        Ok(n)
    }

    /// Surfaces the error of any part already finished; sends nothing (a part goes up
    /// only when full, or at [`S3Upload::finish`]).
    fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        self.reap()?;
        Ok(())
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        if self.upload.is_some() {
            let _ = self.abort_inner(self.retry_timeout.min(ABORT_TIMEOUT));
        }
    }
}
