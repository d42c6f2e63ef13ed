//! A log-linear latency histogram with fixed buckets: exact below 64, then 32 buckets per power
//! of two (relative error under 3.2%) up to `u64::MAX`. Recording is an index computation and an
//! increment; nothing is allocated after construction.

/// Sub-buckets per power of two, as a power of two.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Values below this have a bucket each.
const LINEAR: u64 = 2 * SUB;
/// 64 exact buckets, then 32 per exponent from 6 to 63.
const BUCKETS: usize = (LINEAR + (64 - SUB_BITS as u64 - 1) * SUB) as usize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            max: 0,
        }
    }

    pub fn record(&mut self, value: u64) {
        self.counts[bucket_of(value)] += 1;
        self.total += 1;
        self.max = self.max.max(value);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Largest value recorded (exact for a histogram that was recorded into; within a bucket's
    /// width for one made by [`Histogram::since`]).
    pub fn max(&self) -> Option<u64> {
        (self.total > 0).then_some(self.max)
    }

    /// The value at quantile `q` (0.0..=1.0): the highest value of the bucket that holds the
    /// `ceil(q * count)`-th smallest value, so never below the true quantile by more than
    /// rounding and never above the recorded maximum. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let q = if q.is_nan() { 1.0 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(bucket_high(bucket).min(self.max));
            }
        }
        Some(self.max)
    }

    /// What was recorded into `self` after it was the snapshot `earlier`.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let counts: Box<[u64]> = self
            .counts
            .iter()
            .zip(earlier.counts.iter())
            .map(|(now, then)| now.saturating_sub(*then))
            .collect();
        let total = counts.iter().sum();
        let max = counts
            .iter()
            .rposition(|&c| c > 0)
            .map_or(0, |bucket| bucket_high(bucket).min(self.max));
        Histogram { counts, total, max }
    }
}

fn bucket_of(value: u64) -> usize {
    if value < LINEAR {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros();
    let shift = exponent - SUB_BITS;
    // `value >> shift` lies in SUB..2*SUB.
    (u64::from(shift) * SUB + (value >> shift)) as usize
}

/// The highest value that lands in `bucket`.
fn bucket_high(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < LINEAR {
        return bucket;
    }
    let shift = bucket / SUB - 1;
    let mantissa = bucket - shift * SUB;
    // For the last bucket this is 2^64 - 1, computed without overflow.
    (mantissa << shift) + ((1u64 << shift) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_u64_contiguously() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(63), 63);
        assert_eq!(bucket_of(64), 64);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_high(BUCKETS - 1), u64::MAX);
        for bucket in 0..BUCKETS - 1 {
            let high = bucket_high(bucket);
            assert_eq!(bucket_of(high), bucket, "bucket {bucket}");
            assert_eq!(bucket_of(high + 1), bucket + 1, "bucket {bucket}");
        }
    }

    #[test]
    fn bucket_width_is_within_the_stated_error() {
        for value in [64u64, 100, 1_000, 12_345, 1_000_000, 987_654_321, 1 << 50] {
            let high = bucket_high(bucket_of(value));
            assert!(high >= value);
            assert!((high - value) as f64 / value as f64 <= 1.0 / SUB as f64);
        }
    }

    #[test]
    fn quantiles_of_a_uniform_range() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 100_000);
        let close = |got: u64, want: u64| {
            let err = got.abs_diff(want) as f64 / want as f64;
            assert!(err < 0.032, "got {got}, want {want}");
        };
        close(h.quantile(0.5).unwrap(), 50_000);
        close(h.quantile(0.99).unwrap(), 99_000);
        assert_eq!(h.quantile(1.0), Some(100_000));
        assert_eq!(h.quantile(0.0), Some(1));
        assert_eq!(h.max(), Some(100_000));
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in [5, 5, 5, 7, 9, 60, 61, 62, 63, 63] {
            h.record(v);
        }
        assert_eq!(h.quantile(0.3), Some(5));
        assert_eq!(h.quantile(0.5), Some(9));
        assert_eq!(h.quantile(0.99), Some(63));
    }

    #[test]
    fn a_quantile_never_exceeds_the_maximum() {
        let mut h = Histogram::new();
        h.record(1_000_001);
        assert_eq!(h.quantile(0.5), Some(1_000_001));
        assert_eq!(h.quantile(f64::NAN), Some(1_000_001));
    }

    #[test]
    fn empty_has_no_quantile() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        assert_eq!(h.max(), None);
    }

    #[test]
    fn since_keeps_only_the_later_values() {
        let mut h = Histogram::new();
        for _ in 0..1000 {
            h.record(1_000_000);
        }
        let before = h.clone();
        for _ in 0..10 {
            h.record(2_000);
        }
        let delta = h.since(&before);
        assert_eq!(delta.count(), 10);
        let p99 = delta.quantile(0.99).unwrap();
        assert!((2_000..2_064).contains(&p99), "{p99}");
        assert!((2_000..2_064).contains(&delta.max().unwrap()));
    }
}
