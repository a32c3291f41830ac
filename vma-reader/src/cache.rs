//! The bounded cache of decompressed units (zstd frames, lzop blocks) that compressed
//! sources read through: unit `n` decompresses from its own bytes of the file, so any unit
//! can be loaded alone. Units are kept, most recently used last, while they hold at most
//! the cache's bound in all (at least the last one used, whatever its size), and a unit is
//! loaded by one thread at a time: others that need it wait for it (an NBD client's
//! parallel requests often fall into one unit).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::error::Result;

/// Decompressed units, shared by every reading thread.
pub(crate) struct UnitCache {
    state: Mutex<State>,
    /// Signalled whenever a unit's loading ends.
    loaded: Condvar,
    bound: usize,
}

#[derive(Default)]
struct State {
    /// Unit number, its content (complete, or its first bytes), least recent first.
    units: Vec<(usize, Arc<Vec<u8>>)>,
    bytes: usize,
    /// Units a thread is loading.
    loading: Vec<usize>,
}

impl UnitCache {
    /// An empty cache keeping at most `bound` bytes (and at least one unit).
    pub(crate) fn new(bound: usize) -> UnitCache {
        UnitCache {
            state: Mutex::new(State::default()),
            loaded: Condvar::new(),
            bound,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether unit `unit` is cached (whole or in part) or being loaded.
    pub(crate) fn has(&self, unit: usize) -> bool {
        let state = self.lock();
        state.loading.contains(&unit) || state.units.iter().any(|(u, _)| *u == unit)
    }

    /// Bytes of content the cache holds.
    pub(crate) fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// At least the first `need` bytes of unit `unit`: from the cache, else from `load`
    /// (which may give only a prefix of the unit, of at least `need` bytes), then cached.
    pub(crate) fn get(
        &self,
        unit: usize,
        need: usize,
        load: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<Vec<u8>>> {
        let mut state = self.lock();
        loop {
            if let Some(i) = state.units.iter().position(|(u, _)| *u == unit) {
                if state.units[i].1.len() >= need {
                    let entry = state.units.remove(i);
                    let content = Arc::clone(&entry.1);
                    state.units.push(entry);
                    return Ok(content);
                }
            }
            if !state.loading.contains(&unit) {
                break;
            }
            state = self
                .loaded
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.loading.push(unit);
        drop(state);
        let content = load();
        let mut state = self.lock();
        state.loading.retain(|u| *u != unit);
        self.loaded.notify_all();
        let content = Arc::new(content?);
        if let Some(i) = state.units.iter().position(|(u, _)| *u == unit) {
            let (_, old) = state.units.remove(i);
            state.bytes -= old.len();
        }
        state.bytes += content.len();
        state.units.push((unit, Arc::clone(&content)));
        while state.bytes > self.bound && state.units.len() > 1 {
            let (_, old) = state.units.remove(0);
            state.bytes -= old.len();
        }
        Ok(content)
    }
}

/// Fills `buf` from decompressed offset `offset` of a source made of units: `locate`
/// names the unit holding an offset with its start and length, `content` gives at least
/// the first bytes of a unit. A missing unit is an unexpected end at that offset.
pub(crate) fn read_units(
    buf: &mut [u8],
    offset: u64,
    locate: impl Fn(u64) -> Option<(usize, u64, u32)>,
    content: impl Fn(usize, usize) -> Result<Arc<Vec<u8>>>,
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        let Some((unit, start, len)) = locate(at) else {
            return Err(crate::error::Error::Read {
                offset: at,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        };
        let within = (at - start) as usize;
        let take = (buf.len() - done).min(len as usize - within);
        let content = content(unit, within + take)?;
        buf[done..done + take].copy_from_slice(&content[within..within + take]);
        done += take;
    }
    Ok(())
}
