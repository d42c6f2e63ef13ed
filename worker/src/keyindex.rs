//! The session index: flow key -> session id, 8 bytes an entry, one cache
//! miss a lookup.
//!
//! An entry is the session id and 32 bits of its key's hash (its *tag*); the
//! key itself stays in the session, where the caller checks it. At 100,000
//! sessions a worker the index is about 1 MiB, where a map holding the keys
//! took 4 MiB. Entries sit in open addressing with linear probing: a lookup
//! reads the line its tag points to, and a line holds 8 entries, so a probe
//! seldom leaves it (a map with separate control bytes costs two misses).
//! Removal shifts the entries after it back: no tombstones to clean.
//!
//! The index is split into [`SHARDS`] tables, each growing on its own. One
//! table pre-sized for `max_sessions` would spread even a few thousand
//! entries over a table sized for a million, so that every lookup missed the
//! cache and the TLB. One table grown on demand stays compact, but doubling
//! rehashes every entry at once: a pause of milliseconds at a few hundred
//! thousand. A shard's growth moves a 64th of the entries.

use std::hash::Hash;

use ahash::RandomState;

/// Shards per index: a power of two.
pub(crate) const SHARDS: usize = 64;

/// Slots a shard starts with: a power of two.
const MIN_SLOTS: usize = 16;

/// An empty slot. An entry stores `id + 1`, so no entry is 0.
const EMPTY: u64 = 0;

/// Maps keys to `u32` ids (below `u32::MAX`) without holding the keys: the
/// caller's `is` tells whether an id's key is the one looked for.
#[derive(Debug)]
pub(crate) struct KeyIndex {
    shards: Box<[Shard]>,
    /// Keyed per process, so that keys a client picks cannot crowd one
    /// shard or one probe run.
    hasher: RandomState,
}

#[derive(Debug, Default)]
struct Shard {
    /// Entries: tag << 32 | (id + 1); a power of two long, or empty.
    slots: Box<[u64]>,
    len: usize,
}

/// Where a key lives: its shard and its tag.
#[derive(Clone, Copy)]
struct Slot {
    shard: usize,
    tag: u32,
}

#[inline]
fn entry(tag: u32, id: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(id + 1)
}

#[inline]
fn entry_tag(e: u64) -> u32 {
    (e >> 32) as u32
}

#[inline]
fn entry_id(e: u64) -> u32 {
    (e as u32).wrapping_sub(1)
}

impl Shard {
    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    #[inline]
    fn home(&self, tag: u32) -> usize {
        tag as usize & self.mask()
    }

    fn find(&self, tag: u32, mut is: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(tag);
        loop {
            let e = self.slots[i];
            if e == EMPTY {
                return None;
            }
            if entry_tag(e) == tag && is(entry_id(e)) {
                return Some(entry_id(e));
            }
            i = (i + 1) & mask;
        }
    }

    fn insert(&mut self, e: u64) {
        // At most 3/4 full: a miss then probes a few slots, mostly in one line.
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let mask = self.mask();
        let mut i = self.home(entry_tag(e));
        while self.slots[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = e;
        self.len += 1;
    }

    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(MIN_SLOTS);
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; size].into_boxed_slice());
        self.len = 0;
        for e in old.iter().copied().filter(|&e| e != EMPTY) {
            self.insert(e);
        }
    }

    fn remove(&mut self, e: u64) -> bool {
        if self.slots.is_empty() {
            return false;
        }
        let mask = self.mask();
        let mut hole = self.home(entry_tag(e));
        loop {
            match self.slots[hole] {
                EMPTY => return false,
                found if found == e => break,
                _ => hole = (hole + 1) & mask,
            }
        }
        // Close the hole: an entry after it, up to the next empty slot, moves
        // back into it when its home is not between the hole and itself.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let next = self.slots[j];
            if next == EMPTY {
                break;
            }
            let home = self.home(entry_tag(next));
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                self.slots[hole] = next;
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        true
    }
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl KeyIndex {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    #[inline]
    fn slot<K: Hash>(&self, key: &K) -> Slot {
        let h = self.hasher.hash_one(key);
        Slot {
            shard: (h >> (64 - SHARDS.trailing_zeros())) as usize,
            tag: h as u32,
        }
    }

    /// The id filed under `key`, among those whose key `is(id)` confirms.
    #[inline]
    pub(crate) fn get<K: Hash>(&self, key: &K, is: impl FnMut(u32) -> bool) -> Option<u32> {
        let s = self.slot(key);
        self.shards[s.shard].find(s.tag, is)
    }

    /// Starts loading the line a lookup of `key` reads first, so that a
    /// batch's lookups wait for memory together rather than one by one.
    #[inline]
    pub(crate) fn prefetch<K: Hash>(&self, key: &K) {
        let s = self.slot(key);
        let shard = &self.shards[s.shard];
        if let Some(e) = shard.slots.get(shard.home(s.tag)) {
            prefetch(e);
        }
    }

    /// Files `id` (below `u32::MAX`) under `key`; the caller has checked
    /// that no id is filed under it ([`KeyIndex::get`]).
    pub(crate) fn insert<K: Hash>(&mut self, key: &K, id: u32) {
        debug_assert!(id < u32::MAX);
        let s = self.slot(key);
        self.shards[s.shard].insert(entry(s.tag, id));
    }

    /// Removes `id` from under `key`; false when it was not filed there.
    pub(crate) fn remove<K: Hash>(&mut self, key: &K, id: u32) -> bool {
        let s = self.slot(key);
        self.shards[s.shard].remove(entry(s.tag, id))
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len).sum()
    }

    /// The largest shard's entries: what one growth step moves at most.
    #[cfg(test)]
    pub(crate) fn largest_shard(&self) -> usize {
        self.shards.iter().map(|s| s.len).max().unwrap_or(0)
    }
}

/// A hint to the CPU to load `at`'s cache line; no effect on what any
/// code reads.
#[inline(always)]
pub(crate) fn prefetch<T>(at: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 only hints the cache: it reads nothing into a
    // register and cannot fault, and `at` is a valid reference anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (at as *const T).cast(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// Ids are indices into `keys`, as session ids index the session slab.
    fn get(index: &KeyIndex, keys: &[u64], key: u64) -> Option<u32> {
        index.get(&key, |id| keys.get(id as usize) == Some(&key))
    }

    #[test]
    fn finds_what_was_filed_and_only_that() {
        let keys: Vec<u64> = (0..10_000u64).map(|k| k * 7919).collect();
        let mut index = KeyIndex::new();
        for (id, k) in keys.iter().enumerate() {
            index.insert(k, id as u32);
        }
        assert_eq!(index.len(), 10_000);
        for (id, k) in keys.iter().enumerate() {
            assert_eq!(get(&index, &keys, *k), Some(id as u32));
        }
        assert_eq!(get(&index, &keys, 1), None);
        assert!(index.remove(&keys[5], 5));
        assert!(!index.remove(&keys[5], 5), "removed twice");
        assert!(!index.remove(&keys[6], 7), "another id under that key");
        assert_eq!(get(&index, &keys, keys[5]), None);
        assert_eq!(get(&index, &keys, keys[6]), Some(6));
        assert_eq!(index.len(), 9_999);
        // Id 0 is an entry like any other (entries store id + 1).
        assert_eq!(get(&index, &keys, keys[0]), Some(0));
    }

    #[test]
    fn the_callers_check_decides_between_ids_with_one_tag() {
        // Two ids filed under one key (a caller that did not check first):
        // the check picks the one whose key matches.
        let mut index = KeyIndex::new();
        index.insert(&42u64, 1);
        index.insert(&42u64, 2);
        assert_eq!(index.get(&42u64, |id| id == 2), Some(2));
        assert_eq!(index.get(&42u64, |id| id == 1), Some(1));
        assert_eq!(index.get(&42u64, |_| false), None);
        assert!(index.remove(&42u64, 1));
        assert_eq!(index.get(&42u64, |_| true), Some(2));
    }

    #[test]
    fn entries_spread_over_the_shards() {
        let mut index = KeyIndex::new();
        for k in 0..64_000u64 {
            index.insert(&k, k as u32);
        }
        // 1000 per shard on average; a shard with twice that would make its
        // growth pause twice as long.
        assert!(index.largest_shard() < 1_400, "{}", index.largest_shard());
    }

    proptest! {
        /// Any sequence of inserts and removes over a small key space (so
        /// that probe runs collide, wrap and shift back) agrees with a map.
        #[test]
        fn agrees_with_a_map(ops in proptest::collection::vec((any::<bool>(), 0u64..300), 1..3000)) {
            let mut index = KeyIndex::new();
            let mut model: HashMap<u64, u32> = HashMap::new();
            // Key k's id is k: the check is then `id == key`.
            for (insert, k) in ops {
                if insert {
                    if let std::collections::hash_map::Entry::Vacant(v) = model.entry(k) {
                        v.insert(k as u32);
                        index.insert(&k, k as u32);
                    }
                } else {
                    prop_assert_eq!(index.remove(&k, k as u32), model.remove(&k).is_some());
                }
                prop_assert_eq!(index.len(), model.len());
            }
            for k in 0..300u64 {
                prop_assert_eq!(index.get(&k, |id| u64::from(id) == k), model.get(&k).copied());
            }
        }
    }
}
