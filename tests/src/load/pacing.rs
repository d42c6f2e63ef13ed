//! Pacing against an absolute schedule: datagram `k` is due at `k / rate` seconds after the
//! start. The sender asks what to do at the current elapsed time and either sends a burst or
//! sleeps until a small burst is due. A late wakeup is caught up, but never by more than
//! [`MAX_LAG`] worth of datagrams: older missed slots are given up (counted as slipped) instead
//! of being sent as one unbounded burst. No clock of its own, so it is tested in virtual time.

use std::time::Duration;

/// Sleep until this much traffic is due, so each wakeup sends a small burst instead of one
/// datagram (fewer wakeups, same average rate).
const BURST_SPAN: Duration = Duration::from_micros(100);
/// The most the sender may be behind schedule; beyond it, slots are dropped.
pub const MAX_LAG: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this many datagrams now.
    Send(u64),
    /// Nothing is due; sleep this long.
    Wait(Duration),
}

#[derive(Clone, Debug)]
pub struct Pacer {
    rate: u64,
    /// Datagrams per wakeup when on schedule.
    burst: u64,
    /// Datagrams of lag allowed before slots are dropped.
    max_lag: u64,
    /// Slots handed out (sent or dropped).
    issued: u64,
    slipped: u64,
}

impl Pacer {
    /// `rate` datagrams per second; `rate` must be at least 1.
    pub fn new(rate: u64) -> Pacer {
        let rate = rate.max(1);
        Pacer {
            rate,
            burst: slots_in(rate, BURST_SPAN).max(1),
            max_lag: slots_in(rate, MAX_LAG).max(16),
            issued: 0,
            slipped: 0,
        }
    }

    /// What to do `elapsed` after the start.
    pub fn step(&mut self, elapsed: Duration) -> Step {
        // Slot k is due at k / rate, so slots 0..=floor(elapsed * rate) are due.
        let due = slots_in(self.rate, elapsed) + 1;
        if due <= self.issued {
            let wake_at = self.time_of(self.issued + self.burst - 1);
            return Step::Wait(wake_at.saturating_sub(elapsed));
        }
        let behind = due - self.issued;
        if behind > self.max_lag {
            let dropped = behind - self.max_lag;
            self.slipped += dropped;
            self.issued += dropped;
        }
        let n = due - self.issued;
        self.issued += n;
        Step::Send(n)
    }

    /// Slots given up because the sender fell more than [`MAX_LAG`] behind.
    pub fn slipped(&self) -> u64 {
        self.slipped
    }

    /// When slot `k` is due.
    fn time_of(&self, slot: u64) -> Duration {
        let nanos = u128::from(slot) * 1_000_000_000 / u128::from(self.rate);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// Whole slots in `span` at `rate` per second.
fn slots_in(rate: u64, span: Duration) -> u64 {
    let slots = span.as_nanos() * u128::from(rate) / 1_000_000_000;
    u64::try_from(slots).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the pacer for `total` of virtual time; every wait oversleeps by `oversleep`.
    fn simulate(rate: u64, total: Duration, oversleep: Duration) -> (u64, u64, u64) {
        let mut pacer = Pacer::new(rate);
        let mut now = Duration::ZERO;
        let (mut sent, mut largest) = (0, 0);
        while now < total {
            match pacer.step(now) {
                Step::Send(n) => {
                    sent += n;
                    largest = largest.max(n);
                    // Sending costs a little time.
                    now += Duration::from_nanos(500 * n);
                }
                Step::Wait(d) => {
                    assert!(d > Duration::ZERO);
                    now += d + oversleep;
                }
            }
        }
        (sent, largest, pacer.slipped())
    }

    #[test]
    fn rate_is_held_with_accurate_sleeps() {
        let (sent, largest, slipped) = simulate(150_000, Duration::from_secs(1), Duration::ZERO);
        assert!((149_000..=151_000).contains(&sent), "{sent}");
        assert!(largest <= 20, "bursts of {largest}");
        assert_eq!(slipped, 0);
    }

    #[test]
    fn late_wakeups_are_caught_up() {
        // Every sleep 60 µs late: the schedule is absolute, so the rate holds.
        let (sent, largest, slipped) =
            simulate(150_000, Duration::from_secs(1), Duration::from_micros(60));
        assert!((148_500..=151_500).contains(&sent), "{sent}");
        assert!(largest <= 40, "bursts of {largest}");
        assert_eq!(slipped, 0);
    }

    #[test]
    fn a_long_stall_is_bounded_and_counted() {
        let mut pacer = Pacer::new(150_000);
        assert_eq!(pacer.step(Duration::ZERO), Step::Send(1));
        // One wakeup 100 ms late: at most MAX_LAG (10 ms = 1500 datagrams) is sent at once.
        let Step::Send(n) = pacer.step(Duration::from_millis(100)) else {
            panic!("expected a burst");
        };
        assert_eq!(n, 1_500);
        assert_eq!(pacer.slipped(), 15_001 - 1 - 1_500);
        assert!(matches!(
            pacer.step(Duration::from_millis(100)),
            Step::Wait(_)
        ));
    }

    #[test]
    fn low_rates_wait_between_single_datagrams() {
        let mut pacer = Pacer::new(10);
        assert_eq!(pacer.step(Duration::ZERO), Step::Send(1));
        assert_eq!(
            pacer.step(Duration::from_millis(1)),
            Step::Wait(Duration::from_millis(99))
        );
        assert_eq!(pacer.step(Duration::from_millis(100)), Step::Send(1));
    }
}
