//! Upstream port leases: which worker holds a socket bound to (source, port),
//! shared by every worker through the state region.
//!
//! A worker's upstream socket is bound to one (source address, port) and
//! serves one path per backend (`sources x ports x backends` 4-tuples in
//! all). The kernel's bind is the final arbiter of who holds a port; the
//! lease table coordinates the workers before any syscall, and it remembers
//! what the kernel cannot: that a port whose socket just closed must not be
//! used again toward its backends for `port_reuse_delay`, so a backend's late
//! datagrams for a dead session never reach a new one on the same 4-tuple.
//!
//! One `AtomicU64` per (source row, port), every change a single CAS:
//!
//! ```text
//! 0                               free
//! 1 << 63 | worker << 14 | gen    leased by that worker process
//! 1 << 62 | until_ms              cooling until that CLOCK_MONOTONIC time
//! 3 << 61 | owner << 37 | until   orphaned: its holder died with live paths
//!                                 on it; cooling until `until` (units of
//!                                 1024 ms), and reclaimable by the heir of
//!                                 one of those paths at any time
//! ```
//!
//! An orphaned port stays orphaned until someone leases it: so long, no
//! path has used it since its holder died, and the 4-tuple of each of the
//! dead holder's paths still belongs to that path's flow. The worker that
//! takes such a flow over may bind the flow's own port again at once
//! ([`LeaseTable::reclaim`]), so a crash changes nothing the backend sees,
//! and a crash loop does not run the host out of ports.
//! CLOCK_MONOTONIC is one clock for every process on the host, so a time
//! written by one worker (or by the supervisor, which cools a dead worker's
//! leases when it reaps it) means the same to all.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::owners::Owner;

/// Entries per source row: every port number.
pub const PORTS: usize = 65_536;

const LEASED: u64 = 1 << 63;
const COOLING: u64 = 1 << 62;
const ORPHAN: u64 = 1 << 61;
const OWNER_MASK: u64 = (1 << 24) - 1;
const TIME_MASK: u64 = (1 << 48) - 1;
const ORPHAN_OWNER_SHIFT: u32 = 37;
const ORPHAN_TIME_MASK: u64 = (1 << ORPHAN_OWNER_SHIFT) - 1;
/// An orphan's cooling time is kept in units of 2^10 ms (rounded up).
const ORPHAN_TIME_SHIFT: u32 = 10;

/// What an entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Free,
    Leased(Owner),
    /// Not to be leased before this time (ms, CLOCK_MONOTONIC).
    Cooling(u64),
    /// Its holder died with paths on it: cooling until the time, and
    /// reclaimable by an heir of that holder's flows.
    Orphaned(Owner, u64),
}

fn decode(word: u64) -> Lease {
    if word & LEASED != 0 {
        Lease::Leased(owner_bits(word & OWNER_MASK))
    } else if word & COOLING != 0 && word & ORPHAN != 0 {
        let owner = owner_bits((word >> ORPHAN_OWNER_SHIFT) & OWNER_MASK);
        Lease::Orphaned(owner, (word & ORPHAN_TIME_MASK) << ORPHAN_TIME_SHIFT)
    } else if word & COOLING != 0 {
        Lease::Cooling(word & TIME_MASK)
    } else {
        Lease::Free
    }
}

fn owner_bits(bits: u64) -> Owner {
    Owner::new((bits >> 14) as usize, bits & 0x3fff)
}

fn leased(owner: Owner) -> u64 {
    LEASED | owner_word(owner)
}

fn owner_word(owner: Owner) -> u64 {
    (u64::from(owner.worker) << 14) | u64::from(owner.generation)
}

fn orphaned(owner: Owner, until_ms: u64) -> u64 {
    let units = until_ms.div_ceil(1 << ORPHAN_TIME_SHIFT) & ORPHAN_TIME_MASK;
    COOLING | ORPHAN | (owner_word(owner) << ORPHAN_OWNER_SHIFT) | units
}

fn cooling(until_ms: u64) -> u64 {
    COOLING | (until_ms & TIME_MASK)
}

/// A view of the lease words (in the state region, or a test's Vec):
/// `rows` rows of [`PORTS`] entries.
pub struct LeaseTable<'a> {
    words: &'a [AtomicU64],
}

impl<'a> LeaseTable<'a> {
    pub fn new(words: &'a [AtomicU64]) -> LeaseTable<'a> {
        LeaseTable { words }
    }

    pub fn rows(&self) -> usize {
        self.words.len() / PORTS
    }

    fn word(&self, row: usize, port: u16) -> Option<&AtomicU64> {
        self.words.get(row * PORTS + usize::from(port))
    }

    pub fn get(&self, row: usize, port: u16) -> Lease {
        self.word(row, port)
            .map_or(Lease::Free, |w| decode(w.load(Ordering::Acquire)))
    }

    /// Leases (row, port) to `me` if it is free, or cooled down by `now_ms`.
    pub fn lease(&self, row: usize, port: u16, me: Owner, now_ms: u64) -> bool {
        let Some(w) = self.word(row, port) else {
            return false;
        };
        let seen = w.load(Ordering::Acquire);
        let takeable = match decode(seen) {
            Lease::Free => true,
            Lease::Cooling(until) | Lease::Orphaned(_, until) => until <= now_ms,
            Lease::Leased(_) => false,
        };
        takeable
            && w.compare_exchange(seen, leased(me), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Leases (row, port) to `me`, the heir of a flow whose path dead owner
    /// `from` had on it, cooling or not: it is orphaned by `from` (no one
    /// has leased it since), or still leased by `from`, which the caller
    /// knows is dead (the supervisor has not reaped it yet). Returns the
    /// word it replaced, for [`LeaseTable::unclaim`] should the bind fail,
    /// and until when its other 4-tuples cool (`unreaped_until_ms` for a
    /// lease not yet orphaned).
    pub fn reclaim(
        &self,
        row: usize,
        port: u16,
        me: Owner,
        from: Owner,
        unreaped_until_ms: u64,
    ) -> Option<(u64, u64)> {
        let w = self.word(row, port)?;
        let seen = w.load(Ordering::Acquire);
        let until = match decode(seen) {
            Lease::Orphaned(o, until) if o == from => until,
            Lease::Leased(o) if o == from && o != me => unreaped_until_ms,
            _ => return None,
        };
        w.compare_exchange(seen, leased(me), Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| (seen, until))
    }

    /// Undoes a [`LeaseTable::reclaim`] by `me` whose bind failed: the port
    /// is orphaned by the dead owner again, cooling until `until_ms` (a
    /// lease it took from an owner not yet reaped is orphaned now: the
    /// supervisor's reap may have passed it by meanwhile).
    pub fn unclaim(&self, row: usize, port: u16, me: Owner, word: u64, until_ms: u64) {
        if let Some(w) = self.word(row, port) {
            let back = match decode(word) {
                Lease::Leased(dead) => orphaned(dead, until_ms),
                _ => word,
            };
            let _ = w.compare_exchange(leased(me), back, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// `me` closed its socket on (row, port): free now, or cooling until
    /// `until_ms` (a port the kernel refused us, or one still hot).
    pub fn release(&self, row: usize, port: u16, me: Owner, until_ms: Option<u64>) {
        if let Some(w) = self.word(row, port) {
            let new = until_ms.map_or(0, cooling);
            let _ = w.compare_exchange(leased(me), new, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Takes over (row, port) for `me`, who holds its socket (another
    /// worker's, borrowed, whose holder has died): from a lease of an owner
    /// `live` says is dead, or from the cooling the supervisor put on it.
    pub fn adopt(&self, row: usize, port: u16, me: Owner, live: impl Fn(Owner) -> bool) -> bool {
        let Some(w) = self.word(row, port) else {
            return false;
        };
        let seen = w.load(Ordering::Acquire);
        let takeable = match decode(seen) {
            Lease::Leased(o) => o == me || !live(o),
            Lease::Cooling(_) | Lease::Orphaned(..) | Lease::Free => true,
        };
        takeable
            && w.compare_exchange(seen, leased(me), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// The supervisor, reaping: every lease of an owner `dead` says is gone
    /// is orphaned, cooling until `until_ms` (its sockets closed with live
    /// paths on them). Returns how many it orphaned.
    pub fn cool_dead(&self, dead: impl Fn(Owner) -> bool, until_ms: u64) -> usize {
        let mut n = 0;
        for w in self.words {
            let seen = w.load(Ordering::Acquire);
            if let Lease::Leased(o) = decode(seen) {
                if dead(o)
                    && w.compare_exchange(
                        seen,
                        orphaned(o, until_ms),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
                {
                    n += 1;
                }
            }
        }
        n
    }

    /// Leases held by `worker`'s processes, in all rows.
    pub fn count_leased_by(&self, worker: usize) -> usize {
        self.words
            .iter()
            .filter(|w| matches!(decode(w.load(Ordering::Relaxed)), Lease::Leased(o) if usize::from(o.worker) == worker))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows: usize) -> Vec<AtomicU64> {
        (0..rows * PORTS).map(|_| AtomicU64::new(0)).collect()
    }

    const A: Owner = Owner {
        worker: 0,
        generation: 1,
    };
    const B: Owner = Owner {
        worker: 1,
        generation: 7,
    };

    #[test]
    fn a_port_is_leased_once_and_cools_after_release() {
        let words = table(2);
        let t = LeaseTable::new(&words);
        assert_eq!(t.rows(), 2);
        assert!(t.lease(0, 4000, A, 10));
        assert!(!t.lease(0, 4000, B, 10), "one holder at a time");
        assert!(t.lease(1, 4000, B, 10), "rows are independent");
        assert_eq!(t.get(0, 4000), Lease::Leased(A));
        t.release(0, 4000, B, None); // not B's: no effect
        assert_eq!(t.get(0, 4000), Lease::Leased(A));
        t.release(0, 4000, A, Some(70));
        assert_eq!(t.get(0, 4000), Lease::Cooling(70));
        assert!(!t.lease(0, 4000, B, 69), "still cooling");
        assert!(t.lease(0, 4000, B, 70));
        t.release(0, 4000, B, None);
        assert_eq!(t.get(0, 4000), Lease::Free);
        assert!(!t.lease(2, 1, A, 0), "no such row");
    }

    #[test]
    fn the_supervisor_cools_a_dead_workers_leases_and_a_survivor_adopts_one() {
        let words = table(1);
        let t = LeaseTable::new(&words);
        for port in [1, 2, 3] {
            assert!(t.lease(0, port, A, 0));
        }
        assert!(t.lease(0, 9, B, 0));
        assert_eq!(t.count_leased_by(0), 3);
        let dead = |o: Owner| o == A;
        // A survivor holding a borrowed copy of port 2's socket adopts it
        // before the supervisor gets there.
        assert!(t.adopt(0, 2, B, |o| !dead(o)));
        assert!(!t.adopt(0, 9, A, |_| true), "a live holder keeps its lease");
        assert_eq!(t.cool_dead(dead, 500), 2);
        assert_eq!(
            t.get(0, 1),
            Lease::Orphaned(A, 1024),
            "rounded up to 1024 ms"
        );
        assert!(!t.lease(0, 1, B, 1023), "an orphan cools like any port");
        assert_eq!(t.get(0, 2), Lease::Leased(B));
        assert_eq!(t.get(0, 9), Lease::Leased(B));
        // ... or after it: cooling is no obstacle to the one that holds the socket.
        assert!(t.adopt(0, 3, B, |o| !dead(o)));
        assert_eq!(t.get(0, 3), Lease::Leased(B));
    }

    #[test]
    fn an_orphaned_port_is_reclaimed_by_an_heir_of_its_dead_holder_only() {
        let words = table(1);
        let t = LeaseTable::new(&words);
        let c = Owner::new(0, 2); // A's replacement
        for port in [1, 2, 3] {
            assert!(t.lease(0, port, A, 0));
        }
        // Not reaped yet: the caller knows A is dead.
        let (word, until) = t.reclaim(0, 3, c, A, 777).unwrap();
        assert_eq!((word, until), (leased(A), 777));
        assert_eq!(t.get(0, 3), Lease::Leased(c));
        t.unclaim(0, 3, c, word, 777);
        assert_eq!(
            t.get(0, 3),
            Lease::Orphaned(A, 1024),
            "a failed bind orphans it"
        );
        assert_eq!(t.cool_dead(|o| o == A, 60_000), 2, "3 was orphaned already");
        assert_eq!(t.reclaim(0, 1, c, B, 0), None, "not B's");
        assert_eq!(
            t.reclaim(0, 1, c, A, 0).map(|r| r.1),
            Some(60_416),
            "cooling or not, with the time its other 4-tuples cool"
        );
        assert_eq!(t.reclaim(0, 1, B, A, 0), None, "once");
        // Once leased normally (after its cooling), no heir may take it.
        assert!(t.lease(0, 2, B, 70_000));
        t.release(0, 2, B, Some(80_000));
        assert_eq!(t.reclaim(0, 2, c, A, 0), None);
        assert_eq!(t.reclaim(0, 9, c, A, 0), None, "never leased");
        assert_eq!(t.reclaim(0, 3, c, c, 0), None, "not from oneself");
    }

    #[test]
    fn concurrent_leases_of_one_port_elect_one_holder() {
        let words = table(1);
        let t = LeaseTable::new(&words);
        for port in 0..200u16 {
            let wins: usize = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4usize)
                    .map(|w| {
                        let t = &t;
                        s.spawn(move || t.lease(0, port, Owner::new(w, 1), 0) as usize)
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(wins, 1);
        }
    }
}
