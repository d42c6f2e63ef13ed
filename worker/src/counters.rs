//! The worker's counters: plain integers on the hot path, published to its
//! shared-memory slot once per loop iteration.

use udpshard_shared::stats::{Counter, StatsSlot};

/// Words the worker owns in its slot (the supervisor writes the identity
/// words: pid, cpu, generation, state, restarts).
const WORKER_OWNED: [Counter; 41] = [
    Counter::RxPackets,
    Counter::RxBytes,
    Counter::TxPackets,
    Counter::TxBytes,
    Counter::RepliesIn,
    Counter::RepliesOut,
    Counter::SessionsActive,
    Counter::SessionsCreated,
    Counter::SessionsExpired,
    Counter::HandoffIn,
    Counter::HandoffOut,
    Counter::DropSocket,
    Counter::DropMalformed,
    Counter::DropSessionLimit,
    Counter::DropNoBackend,
    Counter::DropUpstream,
    Counter::DropHandoff,
    Counter::DropReply,
    Counter::DropUpstreamSocket,
    Counter::TransfersIn,
    Counter::TransfersOut,
    Counter::OwnersFull,
    Counter::DropDraining,
    Counter::SessionsRerouted,
    Counter::BusyNs,
    Counter::WallNs,
    Counter::Loops,
    Counter::LoopMaxUs,
    Counter::Heartbeat,
    Counter::DropNoPort,
    Counter::DropNoFd,
    Counter::DropStray,
    Counter::PathsActive,
    Counter::PathsCreated,
    Counter::PathsEvicted,
    Counter::PathsInherited,
    Counter::UpstreamSockets,
    Counter::BadFrames,
    Counter::ControlLost,
    Counter::TxRaw,
    Counter::TxRawRefused,
];

#[derive(Debug, Clone)]
pub struct Counters {
    words: [u64; Counter::COUNT],
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            words: [0; Counter::COUNT],
        }
    }
}

impl Counters {
    /// Counters that continue from what the slot holds, so a replacement
    /// worker does not make the slot's totals go backwards.
    pub fn resume_from(slot: &StatsSlot<'_>) -> Counters {
        let mut words = [0; Counter::COUNT];
        for c in WORKER_OWNED {
            words[c as usize] = slot.get(c);
        }
        // Gauges describe this process, not the slot's history.
        for gauge in [
            Counter::SessionsActive,
            Counter::PathsActive,
            Counter::UpstreamSockets,
        ] {
            words[gauge as usize] = 0;
        }
        Counters { words }
    }

    #[inline]
    pub fn add(&mut self, c: Counter, n: u64) {
        self.words[c as usize] = self.words[c as usize].wrapping_add(n);
    }

    #[inline]
    pub fn incr(&mut self, c: Counter) {
        self.add(c, 1);
    }

    #[inline]
    pub fn set(&mut self, c: Counter, v: u64) {
        self.words[c as usize] = v;
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.words[c as usize]
    }

    pub fn publish(&self, slot: &StatsSlot<'_>) {
        for c in WORKER_OWNED {
            slot.set(c, self.words[c as usize]);
        }
    }
}
