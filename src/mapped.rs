//! The files this process has memory-mapped (checkpoint shards, dumps), by address range, so that
//! a SIGBUS handler can name the one cut short on disk under it. A handler may not allocate or
//! lock: the table is a fixed array of slots, each claimed and published with atomics, and the
//! lookup only loads them and writes bytes that were published before.

use std::cell::UnsafeCell;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// Files mapped at once that can be named (GLM-5's FP8 release has 142 shards, and a diff maps
/// two dumps); past it a map is simply not named.
const SLOTS: usize = 512;
/// The bytes of a path kept (a longer one is cut to `…` and its end: the file name).
const PATH_BYTES: usize = 1024;

const FREE: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    path_len: AtomicUsize,
    path: UnsafeCell<[u8; PATH_BYTES]>,
}

// SAFETY: `path` is written only by the thread that claimed the slot (FREE -> WRITING), before it
// publishes it (READY, Release); readers read it only after seeing READY (Acquire).
unsafe impl Sync for Slot {}

static TABLE: [Slot; SLOTS] = [const {
    Slot {
        state: AtomicU8::new(FREE),
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        path_len: AtomicUsize::new(0),
        path: UnsafeCell::new([0; PATH_BYTES]),
    }
}; SLOTS];

/// A mapped file's entry in the table, cleared when dropped (with the map it names).
#[derive(Debug)]
pub struct Record(Option<usize>);

impl Drop for Record {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            TABLE[i].state.store(FREE, Ordering::Release);
        }
    }
}

/// Records that `len` bytes at `start` are `path`'s pages (nothing where the table is full).
pub fn record(start: *const u8, len: usize, path: &Path) -> Record {
    let Some(i) = TABLE
        .iter()
        .position(|s| s.state.compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed).is_ok())
    else {
        return Record(None);
    };
    let slot = &TABLE[i];
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: this thread claimed the slot (WRITING): no one else writes it, and readers skip it.
    let to = unsafe { &mut *slot.path.get() };
    let path_len = match bytes.len() <= PATH_BYTES {
        true => {
            to[..bytes.len()].copy_from_slice(bytes);
            bytes.len()
        }
        false => {
            let cut = "…".as_bytes();
            to[..cut.len()].copy_from_slice(cut);
            to[cut.len()..].copy_from_slice(&bytes[bytes.len() - (PATH_BYTES - cut.len())..]);
            PATH_BYTES
        }
    };
    slot.path_len.store(path_len, Ordering::Relaxed);
    slot.start.store(start as usize, Ordering::Relaxed);
    slot.len.store(len, Ordering::Relaxed);
    slot.state.store(READY, Ordering::Release);
    Record(Some(i))
}

/// The path of the mapped file whose pages hold `addr`, if one is recorded. Async-signal-safe:
/// atomic loads and a borrow of published bytes.
pub fn name_at(addr: usize) -> Option<&'static [u8]> {
    TABLE.iter().find_map(|slot| {
        if slot.state.load(Ordering::Acquire) != READY {
            return None;
        }
        let (start, len) = (slot.start.load(Ordering::Relaxed), slot.len.load(Ordering::Relaxed));
        if !(start..start.saturating_add(len)).contains(&addr) {
            return None;
        }
        // SAFETY: READY was seen with Acquire after the path was written; it is not written
        // again until the slot is freed and claimed anew.
        let path: &'static [u8; PATH_BYTES] = unsafe { &*slot.path.get() };
        Some(&path[..slot.path_len.load(Ordering::Relaxed).min(PATH_BYTES)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_range_is_named_until_dropped() {
        let pages = [0u8; 100];
        let at = pages.as_ptr();
        let record = record(at, pages.len(), Path::new("/data/model-00001-of-00002.safetensors"));
        let named = name_at(at as usize + 99).map(|b| String::from_utf8_lossy(b).into_owned());
        assert_eq!(named.as_deref(), Some("/data/model-00001-of-00002.safetensors"));
        assert_eq!(name_at(at as usize + 100), None, "one past the end");
        drop(record);
        assert_eq!(name_at(at as usize), None);
        let long = format!("/{}/shard.safetensors", "d".repeat(2 * PATH_BYTES));
        let _record = super::record(at, pages.len(), Path::new(&long));
        let named = name_at(at as usize).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
        assert!(named.starts_with("…ddd") && named.ends_with("/shard.safetensors") && named.len() == PATH_BYTES);
    }
}
