//! A hash map in shards that grow on their own.
//!
//! One map pre-sized for `max_sessions` never rehashes, but spreads even a
//! few thousand entries over a table sized for a million: every lookup then
//! misses the cache and the TLB. One map grown on demand stays compact, but
//! doubling rehashes every entry at once, a pause of milliseconds at a few
//! hundred thousand. Split into [`SHARDS`] maps, each doubles on its own:
//! a pause rehashes a 64th of the entries, and a small table stays small.

use std::hash::Hash;

use ahash::{AHashMap, RandomState};

/// Shards per map: a power of two.
pub const SHARDS: usize = 64;

#[derive(Debug)]
pub struct ShardedMap<K, V> {
    shards: Box<[AHashMap<K, V>]>,
    /// Keyed per process, so that keys a client picks cannot crowd one
    /// shard.
    pick: RandomState,
}

impl<K: Hash + Eq, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| AHashMap::new()).collect(),
            pick: RandomState::new(),
        }
    }
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    fn shard(&self, key: &K) -> usize {
        (self.pick.hash_one(key) >> (64 - SHARDS.trailing_zeros())) as usize
    }

    #[inline]
    pub fn get(&self, key: &K) -> Option<&V> {
        self.shards[self.shard(key)].get(key)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// The value that was there before, if any.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let s = self.shard(&key);
        self.shards[s].insert(key, value)
    }

    /// Inserts `value` unless `key` is present; the value now under `key`.
    pub fn get_or_insert(&mut self, key: K, value: V) -> &mut V {
        let s = self.shard(&key);
        self.shards[s].entry(key).or_insert(value)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let s = self.shard(key);
        self.shards[s].remove(key)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// The largest shard's entries: what one growth step rehashes at most.
    #[cfg(test)]
    pub fn largest_shard(&self) -> usize {
        self.shards.iter().map(|s| s.len()).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_one_map() {
        let mut m = ShardedMap::new();
        for k in 0..10_000u64 {
            assert_eq!(m.insert(k, k * 2), None);
        }
        assert_eq!(m.len(), 10_000);
        assert_eq!(m.insert(7, 1), Some(14));
        assert_eq!(*m.get_or_insert(7, 99), 1);
        assert_eq!(*m.get_or_insert(10_001, 5), 5);
        assert_eq!(m.get(&9_999), Some(&19_998));
        assert!(m.contains_key(&0));
        assert_eq!(m.remove(&0), Some(0));
        assert!(!m.contains_key(&0));
        assert_eq!(m.get(&123_456), None);
        assert_eq!(m.len(), 10_000);
    }

    #[test]
    fn entries_spread_over_the_shards() {
        let mut m = ShardedMap::new();
        for k in 0..64_000u64 {
            m.insert(k, ());
        }
        // 1000 per shard on average; a shard with twice that would make its
        // growth pause twice as long.
        assert!(m.largest_shard() < 1_400, "{}", m.largest_shard());
    }
}
