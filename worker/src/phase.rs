//! A worker process's phase in its slot's life. The event loop moves it
//! from phase to phase, as the supervisor's control messages say; the
//! router reads it on every decision. It is kept in one place, the router
//! ([`crate::router::Router::set_phase`]), which checks every step against
//! the lifecycle:
//!
//! ```text
//! start -----------------> Serving --Drain--> Draining --> exit
//!                           |    ^
//!                   Quiesce |    | Resume (the upgrade was given up)
//!                           v    |
//!                          HandingOver --HandOver, every session offered--> Stop: exit
//!
//! start, standing by --> Standby { listening: false }
//!                          |-- ReadListeners --> Standby { listening: true }
//!                          '-- Live (from either) --> Serving
//! ```
//!
//! - `Standby`: a binary upgrade's new generation of the slot, not yet live.
//!   It takes the sessions its predecessor hands it and serves them; it
//!   reads the listeners once the predecessor has stopped (`ReadListeners`),
//!   sending a datagram of a session still at the old generation there; it
//!   publishes nothing to the slot, which the predecessor still writes.
//! - `Serving`: reads the listeners, makes sessions, publishes its slot.
//! - `Draining` (SIGTERM): serves live sessions, makes none, until none is
//!   left or the deadline passes.
//! - `HandingOver` (SIGUSR2, the old generation): the listeners are the
//!   successor's; no session is made here; once told (`HandOver`) every
//!   session is offered to the successor. An upgrade given up (`Resume`)
//!   serves on, with the sessions still here.

use ahash::AHashSet;
use udpshard_shared::owners::Owner;

use crate::session::SessionId;

/// How long a handover may take before the sessions still here are given
/// up on (their flows start afresh at the successor).
pub const HAND_OVER_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Standby {
        /// The process serving the slot now, which hands its sessions over.
        predecessor: Owner,
        /// The predecessor has stopped reading the listeners: this process
        /// reads them.
        listening: bool,
    },
    Serving,
    Draining {
        /// When to exit with sessions still live (the loop's clock, ms).
        deadline_ms: u64,
    },
    HandingOver(HandingOver),
}

/// The old generation's side of a binary upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandingOver {
    /// The process taking the slot over: every session goes to it, and so
    /// do frames to this slot.
    pub successor: Owner,
    /// Since when the sessions are being offered (the loop's clock, ms);
    /// `None`: the listeners are left, and the offers have not begun.
    pub since_ms: Option<u64>,
    /// The supervisor has heard how the handover ended.
    pub reported: bool,
    /// Sessions the successor refused: not offered again.
    pub refused: AHashSet<SessionId>,
    /// The relays this worker keeps, offered to the successor once every
    /// session is: it becomes the home of their sockets.
    pub relays: RelayOffers,
}

/// How far the relays' handover has come.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayOffers {
    /// The next path index to look at.
    pub cursor: usize,
    pub offered: usize,
    pub answered: usize,
    /// When the first went (the loop's clock, ms).
    pub since_ms: Option<u64>,
}

impl HandingOver {
    pub fn to(successor: Owner) -> Phase {
        Phase::HandingOver(HandingOver {
            successor,
            since_ms: None,
            reported: false,
            refused: AHashSet::new(),
            relays: RelayOffers::default(),
        })
    }
}

impl Phase {
    /// Whether `self -> next` is a step of the lifecycle.
    pub fn may_become(&self, next: &Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (
                Standby {
                    listening: false,
                    ..
                },
                Standby {
                    listening: true,
                    ..
                }
            ) | (Standby { .. }, Serving)
                | (Serving, Draining { .. })
                | (Serving, HandingOver(_))
                | (HandingOver(_), Serving)
        )
    }

    /// Whether this process reads its listener sockets.
    pub fn reads_listeners(&self) -> bool {
        match self {
            Phase::Serving | Phase::Draining { .. } => true,
            Phase::Standby { listening, .. } => *listening,
            Phase::HandingOver(_) => false,
        }
    }

    /// Whether it reads what is left in the listeners before it exits: only
    /// a process that serves the slot. One handing over leaves them to its
    /// successor, and one standing by (its upgrade given up) to its
    /// predecessor, which serves on: what a standby process reads is
    /// counted nowhere, and the replies would come to a process that is
    /// gone.
    pub fn drains_listeners_on_exit(&self) -> bool {
        matches!(self, Phase::Serving | Phase::Draining { .. })
    }

    /// Whether it writes its slot's counters (a standby process counts
    /// apart, and adds the slot's totals when it goes live).
    pub fn publishes(&self) -> bool {
        !matches!(self, Phase::Standby { .. })
    }

    /// The predecessor a standby process takes the slot over from.
    pub fn predecessor(&self) -> Option<Owner> {
        match self {
            Phase::Standby { predecessor, .. } => Some(*predecessor),
            _ => None,
        }
    }

    /// The successor the old generation hands its sessions to.
    pub fn successor(&self) -> Option<Owner> {
        match self {
            Phase::HandingOver(h) => Some(h.successor),
            _ => None,
        }
    }

    pub fn is_draining(&self) -> bool {
        matches!(self, Phase::Draining { .. })
    }

    /// Its name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Standby { .. } => "standby",
            Phase::Serving => "serving",
            Phase::Draining { .. } => "draining",
            Phase::HandingOver(_) => "handing over",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_lifecycles_steps_are_legal() {
        let me = Owner::new(0, 2);
        let old = Owner::new(0, 1);
        let standby = |listening| Phase::Standby {
            predecessor: old,
            listening,
        };
        let draining = Phase::Draining { deadline_ms: 5 };
        let leaving = HandingOver::to(me);
        let all = [
            standby(false),
            standby(true),
            Phase::Serving,
            draining.clone(),
            leaving.clone(),
        ];
        let legal = [
            (standby(false), standby(true)),
            (standby(false), Phase::Serving),
            (standby(true), Phase::Serving),
            (Phase::Serving, draining.clone()),
            (Phase::Serving, leaving.clone()),
            (leaving.clone(), Phase::Serving),
        ];
        for from in &all {
            for to in &all {
                let want = legal.iter().any(|(a, b)| a == from && b == to);
                assert_eq!(from.may_become(to), want, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn listeners_are_read_by_one_generation_at_a_time() {
        let old = Owner::new(0, 1);
        assert!(Phase::Serving.reads_listeners());
        assert!(Phase::Draining { deadline_ms: 0 }.reads_listeners());
        assert!(!HandingOver::to(Owner::new(0, 2)).reads_listeners());
        for listening in [false, true] {
            let p = Phase::Standby {
                predecessor: old,
                listening,
            };
            assert_eq!(p.reads_listeners(), listening);
            assert!(!p.publishes());
        }
    }
}
