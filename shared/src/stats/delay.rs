//! Queue delay: how long datagrams waited in a listener socket before a
//! worker read them (the kernel's receive timestamp against the time the
//! worker's batch was read). It grows while a worker falls behind, before
//! the socket's buffer fills and the drops begin.
//!
//! Each slot keeps a histogram of [`WORDS`] words in the region's tail:
//! [`BUCKETS`] log-scale buckets (at most 1 us, 2 us, 4 us ... 2^20 us, which
//! is about 1 s, then longer), the sum of every delay in nanoseconds, and
//! the longest delay of the second under way and the one before it. The buckets and the sum
//! continue over the slot's processes, as its counters do.

/// Buckets: at most 2^k us for k in 0..=20, then the rest.
pub const BUCKETS: usize = 22;
/// The word that sums every delay, in nanoseconds.
pub const SUM_NS: usize = BUCKETS;
/// The word that holds the longest delay of the second under way and the
/// one before it, in nanoseconds.
pub const MAX_NS: usize = BUCKETS + 1;
/// Words per slot: 3 cache lines, so slots never share one.
pub const WORDS: usize = 24;

/// Bucket `k`'s upper bound, in nanoseconds (inclusive); `None` for the
/// last bucket, which has none.
pub const fn upper_ns(k: usize) -> Option<u64> {
    if k + 1 >= BUCKETS {
        None
    } else {
        Some(1000 << k)
    }
}

/// The bucket of a delay of `ns` nanoseconds.
#[inline]
pub fn bucket(ns: u64) -> usize {
    // The smallest k with ns <= 1000 * 2^k: from the bit length of
    // ceil(ns / 1000) - 1.
    let us_ceil = ns.div_ceil(1000);
    let k = (u64::BITS - us_ceil.saturating_sub(1).leading_zeros()) as usize;
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

    /// The upper bound (ns) of the bucket that holds quantile `q` (0..=1):
    /// at least `q` of the delays were at most this long. `None` when
    /// nothing was counted; `u64::MAX` when it is past the last bound.
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (k, b) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(*b);
            if seen >= rank {
                return Some(upper_ns(k).unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

/// A delay for a person: `850us`, `3.9ms`, `1.2s`; a quantile past the last
/// bound reads `>1s`.
pub fn human(ns: u64) -> String {
    if ns == u64::MAX {
        return format!(">{}", human(upper_ns(BUCKETS - 2).unwrap_or(0)));
    }
    let us = ns as f64 / 1000.0;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_fall_in_the_bucket_of_their_bound() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1000), 0, "1us is at most 1us");
        assert_eq!(bucket(1001), 1);
        assert_eq!(bucket(2000), 1);
        assert_eq!(bucket(2001), 2);
        assert_eq!(bucket(40_000), 6, "40us: at most 64us");
        assert_eq!(bucket(1000 << 20), 20, "about 1s is the last bound");
        assert_eq!(bucket((1000 << 20) + 1), BUCKETS - 1);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        for k in 0..BUCKETS - 1 {
            let bound = upper_ns(k).unwrap();
            assert_eq!(bucket(bound), k);
            assert_eq!(bucket(bound + 1), k + 1);
        }
        assert_eq!(upper_ns(BUCKETS - 1), None);
    }

    #[test]
    fn quantiles_read_the_bound_that_holds_them() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile_ns(0.99), None);
        h.buckets[bucket(3_000)] = 98; // at most 4us
        h.buckets[bucket(100_000)] = 1; // at most 128us
        h.buckets[bucket(5_000_000_000)] = 1; // past 1s
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile_ns(0.5), Some(4_000));
        assert_eq!(h.quantile_ns(0.98), Some(4_000));
        assert_eq!(h.quantile_ns(0.99), Some(128_000));
        assert_eq!(h.quantile_ns(1.0), Some(u64::MAX));
        assert_eq!(human(4_000), "4us");
        assert_eq!(human(128_000), "128us");
        assert_eq!(human(2_048_000), "2.0ms");
        assert_eq!(human(262_144_000), "262ms");
        assert_eq!(human(u64::MAX), ">1.0s");
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
        assert_eq!(d.quantile_ns(0.99), Some(1000 << 19));
        let mut total = before;
        total.add(&d);
        assert_eq!(total.count(), 15);
    }
}
