//! CLOCK_MONOTONIC: one clock for every process on the host, so a time one
//! process writes into shared memory (a heartbeat, a port's cooling
//! deadline) means the same to all.

/// Nanoseconds since boot (CLOCK_MONOTONIC).
pub fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Milliseconds since boot (CLOCK_MONOTONIC).
pub fn monotonic_ms() -> u64 {
    monotonic_ns() / 1_000_000
}

#[cfg(test)]
mod tests {
    #[test]
    fn it_moves_forward() {
        let a = super::monotonic_ns();
        let b = super::monotonic_ns();
        assert!(a > 0 && b >= a);
        assert_eq!(super::monotonic_ms(), super::monotonic_ns() / 1_000_000);
    }
}
