//! The worker's queue-delay histogram (`udpshard_shared::stats::delay`):
//! per listener batch, one read of the wall clock against each datagram's
//! kernel receive timestamp (SO_TIMESTAMPNS, CLOCK_REALTIME).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use udpshard_shared::stats::delay::{self, Histogram};

#[derive(Debug, Default)]
pub(crate) struct QueueDelay {
    /// The slot's histogram as this process continues it.
    totals: Histogram,
    /// The longest delay of the second under way (the published one is
    /// also of the second before).
    window_max_ns: u64,
    /// Changed since it was last published.
    dirty: Cell<bool>,
}

/// The wall clock, as the kernel's receive timestamps read it.
pub(crate) fn wall_now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

impl QueueDelay {
    /// Continues the slot's histogram (a restarted worker's slot keeps its
    /// counts); the longest delay is this process's own.
    pub(crate) fn resume(words: Option<&[AtomicU64]>) -> QueueDelay {
        let mut q = QueueDelay::default();
        q.rebase(words);
        q
    }

    /// Adds the slot's counts to what this process counted (a binary
    /// upgrade's successor going live on its predecessor's slot).
    pub(crate) fn rebase(&mut self, words: Option<&[AtomicU64]>) {
        let Some(words) = words else { return };
        let mut slot = Histogram::load(words);
        slot.max_ns = 0;
        self.totals.add(&slot);
        self.dirty.set(true);
    }

    /// `datagrams` read at `now` that the kernel stamped at `stamp` (none:
    /// the socket gave no timestamp).
    #[inline]
    pub(crate) fn record(&mut self, now: Duration, stamp: Option<Duration>, datagrams: u64) {
        let Some(stamp) = stamp else { return };
        // A stamp after `now` is the clock stepped back: no wait at all.
        let ns = u64::try_from(now.saturating_sub(stamp).as_nanos()).unwrap_or(u64::MAX);
        let k = delay::bucket(ns);
        self.totals.buckets[k] = self.totals.buckets[k].wrapping_add(datagrams);
        self.totals.sum_ns = self
            .totals
            .sum_ns
            .wrapping_add(ns.saturating_mul(datagrams));
        if ns > self.window_max_ns {
            self.window_max_ns = ns;
            self.totals.max_ns = self.totals.max_ns.max(ns);
        }
        self.dirty.set(true);
    }

    /// A second is complete: the longest delay published is now of it and
    /// the second that begins.
    pub(crate) fn end_window(&mut self) {
        self.totals.max_ns = std::mem::take(&mut self.window_max_ns);
        self.dirty.set(true);
    }

    /// Writes the histogram to the slot's words, when it changed.
    pub(crate) fn publish(&self, words: Option<&[AtomicU64]>) {
        let Some(words) = words else { return };
        if !self.dirty.replace(false) {
            return;
        }
        let t = &self.totals;
        let values = t.buckets.iter().chain([&t.sum_ns, &t.max_ns]);
        for (w, v) in words.iter().zip(values) {
            w.store(*v, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    pub(crate) fn totals(&self) -> &Histogram {
        &self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words() -> Vec<AtomicU64> {
        (0..delay::WORDS).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn a_batch_is_counted_in_its_bucket_and_published_once() {
        let slot = words();
        let mut q = QueueDelay::resume(Some(&slot));
        let now = Duration::from_secs(1_000);
        q.record(now, Some(now - Duration::from_micros(30)), 5);
        q.record(now, None, 7);
        q.record(now, Some(now + Duration::from_micros(3)), 1);
        q.publish(Some(&slot));
        let h = Histogram::load(&slot);
        assert_eq!(h.count(), 6, "the datagram without a stamp is not counted");
        assert_eq!(h.buckets[delay::bucket(30_000)], 5);
        assert_eq!(
            h.buckets[0], 1,
            "a stamp from the future waited for nothing"
        );
        assert_eq!(h.sum_ns, 150_000);
        assert_eq!(h.max_ns, 30_000);
        // The longest stays while its second, or the next, is under way.
        q.end_window();
        q.record(now, Some(now - Duration::from_micros(10)), 1);
        q.publish(Some(&slot));
        assert_eq!(Histogram::load(&slot).max_ns, 30_000);
        q.end_window();
        q.publish(Some(&slot));
        assert_eq!(Histogram::load(&slot).max_ns, 10_000);
        q.end_window();
        q.publish(Some(&slot));
        assert_eq!(Histogram::load(&slot).max_ns, 0, "two quiet seconds");
        slot[0].store(99, Ordering::Relaxed);
        q.publish(Some(&slot));
        assert_eq!(
            slot[0].load(Ordering::Relaxed),
            99,
            "nothing changed: not written"
        );
    }

    #[test]
    fn a_new_process_continues_the_slot() {
        let slot = words();
        let mut first = QueueDelay::resume(Some(&slot));
        let now = Duration::from_secs(50);
        first.record(now, Some(now - Duration::from_millis(300)), 4);
        first.end_window();
        first.publish(Some(&slot));
        // A restart continues the counts; the longest delay is its own.
        let second = QueueDelay::resume(Some(&slot));
        assert_eq!(second.totals().count(), 4);
        assert_eq!(second.totals().max_ns, 0);
        // A successor that counted while it stood by adds the slot's.
        let mut successor = QueueDelay::default();
        successor.record(now, Some(now), 2);
        successor.rebase(Some(&slot));
        successor.publish(Some(&slot));
        assert_eq!(Histogram::load(&slot).count(), 6);
    }
}
