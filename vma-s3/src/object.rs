//! An object read by ranged GETs through a bounded cache (README.md, "Reading").

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use object_store::{GetOptions, GetRange, ObjectStore};

use crate::{
    map_error, Config, Error, Location, Result, CACHE_BYTES, MAX_FETCHES_IN_FLIGHT,
    READ_AHEAD_UNITS, UNIT_SIZE, WINDOW_SIZE,
};

/// An aligned range of the object: a unit or a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    start: u64,
    len: u64,
}

impl Key {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A fetch under way; readers wanting its bytes wait for it.
struct Pending {
    done: Mutex<Option<Result<Bytes>>>,
    cv: Condvar,
}

impl Pending {
    fn wait(&self) -> Result<Bytes> {
        let mut g = self.done.lock().unwrap();
        loop {
            if let Some(r) = &*g {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap();
        }
    }
}

enum Slot {
    Loading(Arc<Pending>),
    Ready { data: Bytes, used: u64 },
}

#[derive(Default)]
struct Cache {
    slots: HashMap<Key, Slot>,
    ready_bytes: usize,
    tick: u64,
    /// Where recent reads ended: a read starting at one of these is sequential.
    ends: [u64; 8],
    next_end: usize,
    /// Background fetches (read-ahead) under way.
    prefetching: usize,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    location: Location,
    path: object_store::path::Path,
    credentials: String,
    size: u64,
    etag: Option<String>,
    requests: AtomicU64,
    bytes: AtomicU64,
    cache: Mutex<Cache>,
    fetch_slots: Arc<tokio::sync::Semaphore>,
}

/// An object of a bucket, read at any offset from many threads at once, by ranged GETs
/// through a bounded cache ([`CACHE_BYTES`]). Each GET carries `If-Match` with the ETag
/// of the HEAD of [`Config::open`], so an object replaced under the reader fails with
/// [`Error::Changed`] rather than mixing two versions.
#[derive(Clone)]
pub struct S3Object {
    inner: Arc<Inner>,
}

impl fmt::Debug for S3Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Object")
            .field("location", &self.inner.location)
            .field("size", &self.inner.size)
            .field("etag", &self.inner.etag)
            .field("requests", &self.requests())
            .field("bytes_fetched", &self.bytes_fetched())
            .finish()
    }
}

impl S3Object {
    pub(crate) fn open(config: &Config, at: &Location) -> Result<S3Object> {
        let store = config.store(at)?;
        let credentials = config.describe_credentials();
        let path = at.path();
        let head = crate::block_on(store.head(&path));
        let meta = match head {
            Ok(m) => m,
            Err(e) => {
                let e = map_error(e, at, &credentials, "HEAD");
                if matches!(e, Error::NotFound { .. }) && bucket_missing(&*store, &path) {
                    return Err(Error::NoSuchBucket {
                        location: at.clone(),
                    });
                }
                return Err(e);
            }
        };
        Ok(S3Object {
            inner: Arc::new(Inner {
                store,
                location: at.clone(),
                path,
                credentials,
                size: meta.size,
                etag: meta.e_tag,
                requests: AtomicU64::new(1),
                bytes: AtomicU64::new(0),
                cache: Mutex::new(Cache::default()),
                fetch_slots: Arc::new(tokio::sync::Semaphore::new(MAX_FETCHES_IN_FLIGHT)),
            }),
        })
    }

    /// Where the object is.
    pub fn location(&self) -> &Location {
        &self.inner.location
    }

    /// Its size, from the HEAD of [`Config::open`].
    pub fn len(&self) -> u64 {
        self.inner.size
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.inner.size == 0
    }

    /// Its ETag, from the HEAD of [`Config::open`].
    pub fn etag(&self) -> Option<&str> {
        self.inner.etag.as_deref()
    }

    /// Requests issued so far: the HEAD and every GET (retries by object_store not counted).
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Bytes received in GET bodies so far.
    pub fn bytes_fetched(&self) -> u64 {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// Fills `buf` from `offset`, as [`vma_reader::ReadAt::read_exact_at`], with this
    /// crate's error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Inner::read(&self.inner, buf, offset)
    }
}

/// Whether a 404 came from a missing bucket rather than a missing key: one GET, whose
/// error body names `NoSuchBucket`.
fn bucket_missing(store: &dyn ObjectStore, path: &object_store::path::Path) -> bool {
    let opts = GetOptions {
        range: Some(GetRange::Bounded(0..1)),
        ..Default::default()
    };
    match crate::block_on(store.get_opts(path, opts)) {
        Err(e) => format!("{e:?}").contains("NoSuchBucket"),
        Ok(_) => false,
    }
}

impl Inner {
    fn unit(&self, pos: u64) -> Key {
        let start = pos - pos % UNIT_SIZE as u64;
        Key {
            start,
            len: (UNIT_SIZE as u64).min(self.size - start),
        }
    }

    fn window(&self, pos: u64) -> Key {
        let start = pos - pos % WINDOW_SIZE as u64;
        Key {
            start,
            len: (WINDOW_SIZE as u64).min(self.size - start),
        }
    }

    fn read(self: &Arc<Self>, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::Io {
                location: self.location.clone(),
                source: Arc::new(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {len} bytes at {offset} is past the end ({} bytes)",
                        self.size
                    ),
                )),
            });
        }
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let sequential = {
            let mut c = self.cache.lock().unwrap();
            let seq = offset != 0 && c.ends.contains(&offset);
            if let Some(i) = c.ends.iter().position(|&e| e == offset) {
                c.ends[i] = end;
            } else {
                let i = c.next_end;
                c.ends[i] = end;
                c.next_end = (i + 1) % c.ends.len();
            }
            seq
        };
        let small = len < WINDOW_SIZE as u64 && !sequential;
        if !small {
            // The units after the first of a large read come in parallel with it.
            let unit = UNIT_SIZE as u64;
            let (first, last) = (offset / unit, (end - 1) / unit);
            if last > first {
                let keys: Vec<Key> = (first + 1..=last)
                    .take(CACHE_BYTES / 2 / UNIT_SIZE)
                    .map(|u| self.unit(u * unit))
                    .collect();
                self.prefetch(keys, None);
            }
        }
        let mut pos = offset;
        while pos < end {
            let data_key = self.get(pos, small)?;
            let (key, data) = data_key;
            let from = (pos - key.start) as usize;
            let to = ((end.min(key.end())) - key.start) as usize;
            let at = (pos - offset) as usize;
            buf[at..at + (to - from)].copy_from_slice(&data[from..to]);
            pos = key.start + to as u64;
        }
        if sequential {
            self.read_ahead(end);
        }
        Ok(())
    }

    /// The cached range holding `pos`: a unit, or for a small read a window (unless the
    /// unit is already there or coming); fetched in this thread if nobody has it.
    fn get(self: &Arc<Self>, pos: u64, small: bool) -> Result<(Key, Bytes)> {
        let unit = self.unit(pos);
        let (key, pending, mine) = {
            let mut c = self.cache.lock().unwrap();
            c.tick += 1;
            let tick = c.tick;
            let key = if small && !c.slots.contains_key(&unit) {
                self.window(pos)
            } else {
                unit
            };
            match c.slots.get_mut(&key) {
                Some(Slot::Ready { data, used }) => {
                    *used = tick;
                    return Ok((key, data.clone()));
                }
                Some(Slot::Loading(p)) => (key, p.clone(), false),
                None => {
                    let p = Arc::new(Pending {
                        done: Mutex::new(None),
                        cv: Condvar::new(),
                    });
                    c.slots.insert(key, Slot::Loading(p.clone()));
                    (key, p, true)
                }
            }
        };
        if mine {
            let r = crate::block_on(self.fetch(key));
            self.complete(key, &pending, r.clone());
            return r.map(|d| (key, d));
        }
        pending.wait().map(|d| (key, d))
    }

    /// Stores a fetch's result (or forgets the range on error, so a later read tries
    /// again) and wakes its waiters.
    fn complete(&self, key: Key, pending: &Arc<Pending>, r: Result<Bytes>) {
        {
            let mut c = self.cache.lock().unwrap();
            let ours =
                matches!(c.slots.get(&key), Some(Slot::Loading(p)) if Arc::ptr_eq(p, pending));
            if ours {
                match &r {
                    Ok(data) => {
                        c.tick += 1;
                        let used = c.tick;
                        c.ready_bytes += data.len();
                        c.slots.insert(
                            key,
                            Slot::Ready {
                                data: data.clone(),
                                used,
                            },
                        );
                        evict(&mut c, key);
                    }
                    Err(_) => {
                        c.slots.remove(&key);
                    }
                }
            }
        }
        *pending.done.lock().unwrap() = Some(r);
        pending.cv.notify_all();
    }

    async fn fetch(&self, key: Key) -> Result<Bytes> {
        let _permit = self.fetch_slots.acquire().await;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let opts = GetOptions {
            range: Some(GetRange::Bounded(key.start..key.end())),
            if_match: self.etag.clone(),
            ..Default::default()
        };
        let err = |e| map_error(e, &self.location, &self.credentials, "GET");
        let got = self.store.get_opts(&self.path, opts).await.map_err(err)?;
        if let (Some(want), Some(have)) = (&self.etag, &got.meta.e_tag) {
            if want != have {
                return Err(Error::Changed {
                    location: self.location.clone(),
                    detail: format!("ETag {have}, opened as {want}"),
                });
            }
        }
        let data = got.bytes().await.map_err(err)?;
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        if data.len() as u64 != key.len {
            return Err(Error::Changed {
                location: self.location.clone(),
                detail: format!(
                    "GET of bytes {}..{} returned {} bytes",
                    key.start,
                    key.end(),
                    data.len()
                ),
            });
        }
        Ok(data)
    }

    /// Starts background fetches of `keys` not cached or coming; at most `limit` at once
    /// when `limit` is given (read-ahead).
    fn prefetch(self: &Arc<Self>, keys: impl IntoIterator<Item = Key>, limit: Option<usize>) {
        let mut started = Vec::new();
        {
            let mut c = self.cache.lock().unwrap();
            for key in keys {
                if limit.is_some_and(|l| c.prefetching >= l) {
                    break;
                }
                if c.slots.contains_key(&key) {
                    continue;
                }
                let p = Arc::new(Pending {
                    done: Mutex::new(None),
                    cv: Condvar::new(),
                });
                c.slots.insert(key, Slot::Loading(p.clone()));
                c.prefetching += 1;
                started.push((key, p));
            }
        }
        for (key, p) in started {
            let me = self.clone();
            crate::runtime().spawn(async move {
                let r = me.fetch(key).await;
                me.complete(key, &p, r);
                me.cache.lock().unwrap().prefetching -= 1;
            });
        }
    }

    fn read_ahead(self: &Arc<Self>, end: u64) {
        if end >= self.size {
            return;
        }
        let first = self.unit(end);
        let keys: Vec<Key> = (0..READ_AHEAD_UNITS as u64)
            .map(|i| first.start + i * UNIT_SIZE as u64)
            .take_while(|&s| s < self.size)
            .map(|s| self.unit(s))
            .collect();
        self.prefetch(keys, Some(READ_AHEAD_UNITS));
    }

    /// The ranges `ranges` need: units for large ones, windows for small ones (unless
    /// their unit is wanted too), each once, in order, within half the cache.
    fn plan(&self, ranges: &[Range<u64>]) -> Vec<Key> {
        let mut keys: Vec<Key> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut budget = (CACHE_BYTES / 2) as u64;
        let units: std::collections::HashSet<u64> = ranges
            .iter()
            .filter(|r| r.end - r.start >= WINDOW_SIZE as u64)
            .flat_map(|r| {
                let r = r.start.min(self.size)..r.end.min(self.size);
                let first = r.start / UNIT_SIZE as u64;
                let last = r.end.saturating_sub(1) / UNIT_SIZE as u64;
                (first..=last).filter(move |_| r.start < r.end)
            })
            .collect();
        for r in ranges {
            let r = r.start.min(self.size)..r.end.min(self.size);
            if r.start >= r.end {
                continue;
            }
            let small = r.end - r.start < WINDOW_SIZE as u64;
            let mut pos = r.start;
            while pos < r.end {
                let key = if small && !units.contains(&(pos / UNIT_SIZE as u64)) {
                    self.window(pos)
                } else {
                    self.unit(pos)
                };
                pos = key.end();
                if seen.insert(key) {
                    if key.len > budget {
                        return keys;
                    }
                    budget -= key.len;
                    keys.push(key);
                }
            }
        }
        keys
    }
}

/// Drops least recently used ready ranges (never `keep`) until the cache fits.
fn evict(c: &mut Cache, keep: Key) {
    while c.ready_bytes > CACHE_BYTES {
        let victim = c
            .slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Ready { used, data } if *k != keep => Some((*used, *k, data.len())),
                _ => None,
            })
            .min_by_key(|(used, _, _)| *used);
        let Some((_, k, n)) = victim else { break };
        c.slots.remove(&k);
        c.ready_bytes -= n;
    }
}

impl vma_reader::ReadAt for S3Object {
    fn size(&self) -> io::Result<u64> {
        Ok(self.inner.size)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Ok(self.read_at(buf, offset)?)
    }

    /// Fetches the units (for ranges of 64 KiB and more) and windows (for smaller ones)
    /// that `ranges` need, in parallel ([`MAX_FETCHES_IN_FLIGHT`] at once), each once
    /// however many ranges share it, at most half the cache's worth.
    fn will_read(&self, ranges: &[Range<u64>]) {
        let keys = self.inner.plan(ranges);
        self.inner.prefetch(keys, None);
    }
}
