//! The worker's phase as the router keeps it, and the binary upgrade's
//! handover: the old generation offers every session to its slot's
//! successor, the new one stands by taking them, and an upgrade given up
//! leaves the old one serving.

use udpshard_shared::owners::{Owner, GEN_MASK};

use super::{Owners, Router, Sockets};
use crate::paths::{Home, SockId};
use crate::phase::Phase;

impl<O: Owners, S: Sockets> Router<O, S> {
    /// Where this process is in its slot's life.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Moves to phase `next`, a step of the lifecycle ([`Phase::may_become`];
    /// any other is refused: a bug, and false). Leaving `HandingOver` for
    /// `Serving` (the upgrade was given up): sessions on offer to the
    /// successor stay (whatever it answered, it is gone), and their keys are
    /// this worker's again.
    pub fn set_phase(&mut self, next: Phase) -> bool {
        let legal = self.phase.may_become(&next);
        debug_assert!(legal, "{:?} -> {next:?}", self.phase);
        if !legal {
            tracing::error!(
                worker = self.id,
                "refused a phase change from {} to {}",
                self.phase.name(),
                next.name()
            );
            return false;
        }
        let resumed = matches!(self.phase, Phase::HandingOver(_)) && next == Phase::Serving;
        self.phase = next;
        if resumed {
            self.take_offers_back();
        }
        true
    }

    /// The sessions on offer to this slot's successor stay here.
    fn take_offers_back(&mut self) {
        let me = self.me;
        for sid in self.sessions.ids() {
            let offered = self
                .sessions
                .get(sid)
                .and_then(|s| s.offer())
                .is_some_and(|o| usize::from(o.to) == self.id);
            if !offered {
                continue;
            }
            if let Some(s) = self.sessions.get_mut(sid) {
                s.take_offer();
            }
            for hash in self.key_hashes(sid) {
                self.owners.assign(hash, me);
            }
        }
    }

    /// Handing over: the sessions are offered from `now_ms` on.
    pub fn start_handing_over(&mut self, now_ms: u64) {
        if let Phase::HandingOver(h) = &mut self.phase {
            h.since_ms.get_or_insert(now_ms);
        }
    }

    /// Handing over: the supervisor has heard how it ended.
    pub fn handover_reported(&mut self) {
        if let Phase::HandingOver(h) = &mut self.phase {
            h.reported = true;
        }
    }

    /// Offers up to `budget` sessions not yet on offer to the successor;
    /// returns how many it offered.
    pub fn offer_to_successor(&mut self, budget: usize) -> usize {
        let Phase::HandingOver(h) = &self.phase else {
            return 0;
        };
        let candidates: Vec<_> = self
            .sessions
            .ids()
            .into_iter()
            .filter(|sid| {
                self.sessions.get(*sid).is_some_and(|s| s.offer().is_none())
                    && !h.refused.contains(sid)
            })
            .take(budget)
            .collect();
        for &sid in &candidates {
            self.transfer(sid, self.id);
        }
        candidates.len()
    }

    /// Sessions the successor refused (they stay here until this process
    /// exits; their flows start afresh there).
    pub fn refused_by_successor(&self) -> usize {
        match &self.phase {
            Phase::HandingOver(h) => h.refused.len(),
            _ => 0,
        }
    }

    /// Sessions on offer and not yet answered.
    pub fn offers_pending(&self) -> usize {
        self.sessions
            .ids()
            .into_iter()
            .filter(|&sid| self.sessions.get(sid).is_some_and(|s| s.offer().is_some()))
            .count()
    }

    /// Whether `o` may be the process about to take slot `o.worker` over in
    /// an upgrade: a generation after the slot's latest (serving, or dead
    /// since the upgrade began), not yet published. Not only the next one:
    /// an upgrade given up before spent a generation, which the next
    /// upgrade's process comes after.
    pub(super) fn unpublished_successor(&self, o: Owner) -> bool {
        let worker = usize::from(o.worker);
        self.owners.slot_generation(worker).is_some_and(|g| {
            let published = Owner::new(worker, g).generation;
            let ahead = o.generation.wrapping_sub(published) & GEN_MASK as u16;
            ahead > 0 && u64::from(ahead) <= GEN_MASK / 2
        })
    }

    /// Whether `o` serves: the successor does, to its predecessor; so does
    /// another slot's later generation, not yet published: a successor
    /// standing by (its relays stay, its sockets are not adopted, a flow it
    /// has is handed to it), or one an upgrade given up spent (whose keys
    /// its slot's process takes back, or claims when it finds them).
    pub(super) fn live(&self, o: Owner) -> bool {
        self.owners.is_live(o)
            || self.phase.successor() == Some(o)
            || (o.worker != self.me.worker && self.unpublished_successor(o))
    }

    /// Who serves slot `worker`: this slot's successor, to its predecessor.
    pub(super) fn live_at(&self, worker: usize) -> Option<Owner> {
        match self.phase.successor() {
            Some(next) if worker == self.id => Some(next),
            _ => self.owners.live_owner(worker),
        }
    }

    /// Borrowed sockets whose home is gone, taken over now (not at the next
    /// sweep): a new generation that has just gone live adopts the sockets
    /// of the sessions its predecessor handed it.
    pub fn adopt_orphans(&mut self) {
        let orphans: Vec<(SockId, Owner)> = self
            .paths
            .socks
            .iter()
            .filter_map(|(id, s)| match s.home {
                Home::Borrowed(home) => Some((id as SockId, home)),
                Home::Here => None,
            })
            .collect();
        for (sock, home) in orphans {
            if !self.live(home) {
                self.orphaned(sock, home);
            }
        }
    }
}
