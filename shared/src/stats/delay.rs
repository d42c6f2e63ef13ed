//! Queue delay: how long datagrams waited in a listener socket before a
//! worker read them (the kernel's receive timestamp against the time the
//! worker's batch was read). It grows while a worker falls behind, before
//! the socket's buffer fills and the drops begin.
//!
//! Each slot keeps a histogram of [`WORDS`] words in the region's tail:
//! [`BUCKETS`] log-scale buckets whose bounds are powers of two in seconds
//! (at most 2^-20 s, about 1 us; then (2^-20, 2^-19] ... (8, 16] s; then
//! longer), the sum of every delay in nanoseconds, and the longest delay of
//! the second under way and the one before it. The buckets and the sum
//! continue over the slot's processes, as its counters do. Powers of two in
//! seconds are the bounds of a Prometheus native histogram of schema 0, so
//! the same counts are exposed as one, exactly but for the last bucket:
//! what waited past 16 s is counted in (16 s, 32 s] there.

use std::sync::atomic::{AtomicU64, Ordering};

/// Buckets: at most 2^(k-20) s for k in 0..=24, then the rest.
pub const BUCKETS: usize = 26;
/// The exponent of bucket 0's bound (2^-20 s).
pub const LOWEST_EXP: i32 = -20;
/// The word that sums every delay, in nanoseconds.
pub const SUM_NS: usize = BUCKETS;
/// The word that holds the longest delay of the second under way and the
/// one before it, in nanoseconds.
pub const MAX_NS: usize = BUCKETS + 1;
/// Words per slot: 4 cache lines, so slots never share one.
pub const WORDS: usize = 32;

/// Bucket `k`'s upper bound, in seconds (inclusive); `None` for the last
/// bucket, which has none.
pub fn upper_seconds(k: usize) -> Option<f64> {
    (k + 1 < BUCKETS).then(|| 2f64.powi(k as i32 + LOWEST_EXP))
}

/// The bucket of a delay of `ns` nanoseconds.
#[inline]
pub fn bucket(ns: u64) -> usize {
    // The smallest k with ns / 1e9 <= 2^(k-20), that is ns * 2^20 <= 1e9 *
    // 2^k: the bit length of ceil(ns * 2^20 / 1e9) - 1. Past 2^43 ns (2.4
    // hours) the shift would overflow: the last bucket.
    if ns >= 1 << 43 {
        return BUCKETS - 1;
    }
    let q = (ns << 20).div_ceil(1_000_000_000);
    let k = (u64::BITS - q.saturating_sub(1).leading_zeros()) as usize;
    k.min(BUCKETS - 1)
}

/// One slot's histogram, or the difference of two readings of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u64; BUCKETS],
    pub sum_ns: u64,
    /// The longest delay of the last second or two (a reading, not a
    /// total: a difference keeps the later one).
    pub max_ns: u64,
}

impl Histogram {
    /// From a slot's words (see the module's layout).
    pub fn from_words(words: &[u64]) -> Histogram {
        let mut h = Histogram::default();
        for (b, w) in h.buckets.iter_mut().zip(words) {
            *b = *w;
        }
        h.sum_ns = words.get(SUM_NS).copied().unwrap_or(0);
        h.max_ns = words.get(MAX_NS).copied().unwrap_or(0);
        h
    }

    /// From a slot's live words (see the module's layout).
    pub fn load(words: &[AtomicU64]) -> Histogram {
        let read: Vec<u64> = words.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        Histogram::from_words(&read)
    }

    /// Delays counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0, |s, b| s.wrapping_add(*b))
    }

    /// What was counted after `before` (an earlier reading of the same
    /// slot): the longest delay is the later reading's.
    pub fn since(&self, before: &Histogram) -> Histogram {
        let mut h = *self;
        for (b, old) in h.buckets.iter_mut().zip(before.buckets) {
            *b = b.saturating_sub(old);
        }
        h.sum_ns = self.sum_ns.saturating_sub(before.sum_ns);
        h
    }

    /// Adds `other`'s counts (the workers' histograms summed); the longest
    /// delay is the longer.
    pub fn add(&mut self, other: &Histogram) {
        for (b, o) in self.buckets.iter_mut().zip(other.buckets) {
            *b = b.wrapping_add(o);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// The upper bound (seconds) of the bucket that holds quantile `q`
    /// (0..=1): at least `q` of the delays were at most this long. `None`
    /// when nothing was counted; infinity when it is past the last bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (k, b) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(*b);
            if seen >= rank {
                return Some(upper_seconds(k).unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }
}

/// A delay in seconds for a person: `977us`, `3.9ms`, `1.0s`; one past the
/// last bound reads `>16s`.
pub fn human(seconds: f64) -> String {
    if seconds.is_infinite() {
        let last = upper_seconds(BUCKETS - 2).unwrap_or(0.0);
        return format!(">{last:.0}s");
    }
    let us = seconds * 1e6;
    if us < 1000.0 {
        format!("{us:.0}us")
    } else if us < 10_000.0 {
        format!("{:.1}ms", us / 1000.0)
    } else if us < 1_000_000.0 {
        format!("{:.0}ms", us / 1000.0)
    } else {
        format!("{:.1}s", us / 1_000_000.0)
    }
}

/// [`human`] for a delay in nanoseconds.
pub fn human_ns(ns: u64) -> String {
    human(ns as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_fall_in_the_bucket_of_their_bound() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(953), 0, "953ns is at most 2^-20 s (953.67ns)");
        assert_eq!(bucket(954), 1);
        assert_eq!(bucket(40_000), 6, "40us: at most 2^-14 s (61us)");
        assert_eq!(bucket(1_000_000_000), 20, "1s is 2^0");
        assert_eq!(bucket(1_000_000_001), 21);
        assert_eq!(bucket(16_000_000_000), 24, "16s is the last bound");
        assert_eq!(bucket(16_000_000_001), BUCKETS - 1);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        for k in 0..BUCKETS - 1 {
            let bound = upper_seconds(k).unwrap();
            let ns = bound * 1e9;
            assert_eq!(bucket(ns.floor() as u64), k, "{k}");
            assert_eq!(bucket(ns.floor() as u64 + 1), k + 1, "{k}");
        }
        assert_eq!(upper_seconds(BUCKETS - 1), None);
        assert_eq!(upper_seconds(20), Some(1.0));
    }

    #[test]
    fn quantiles_read_the_bound_that_holds_them() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.99), None);
        h.buckets[bucket(3_000)] = 98; // at most 2^-18 s (3.8us)
        h.buckets[bucket(100_000)] = 1; // at most 2^-13 s (122us)
        h.buckets[bucket(20_000_000_000)] = 1; // past 16s
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile(0.5), Some(2f64.powi(-18)));
        assert_eq!(h.quantile(0.98), Some(2f64.powi(-18)));
        assert_eq!(h.quantile(0.99), Some(2f64.powi(-13)));
        assert_eq!(h.quantile(1.0), Some(f64::INFINITY));
        assert_eq!(human(2f64.powi(-18)), "4us");
        assert_eq!(human(2f64.powi(-13)), "122us");
        assert_eq!(human(2f64.powi(-9)), "2.0ms");
        assert_eq!(human(0.25), "250ms");
        assert_eq!(human(f64::INFINITY), ">16s");
        assert_eq!(human_ns(1_500_000_000), "1.5s");
    }

    #[test]
    fn a_difference_counts_what_came_after() {
        let mut before = Histogram::default();
        before.buckets[0] = 10;
        before.sum_ns = 5_000;
        before.max_ns = 900;
        let mut after = before;
        after.buckets[0] = 12;
        after.buckets[19] = 3;
        after.sum_ns = 9_000;
        after.max_ns = 400_000_000;
        let d = after.since(&before);
        assert_eq!(d.count(), 5);
        assert_eq!(d.sum_ns, 4_000);
        assert_eq!(d.max_ns, 400_000_000);
        assert_eq!(d.quantile(0.99), Some(0.5));
        let mut total = before;
        total.add(&d);
        assert_eq!(total.count(), 15);
    }
}
