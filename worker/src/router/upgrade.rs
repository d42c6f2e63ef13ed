//! The worker's phase as the router keeps it, and the binary upgrade's
//! handover: the old generation offers every session to its slot's
//! successor, the new one stands by taking them, and an upgrade given up
//! leaves the old one serving. Last, the old generation hands its relays
//! over, with their sockets: the successor becomes the home of every socket
//! that carries a relay or a path of a session it was handed.

use udpshard_shared::owners::{Owner, GEN_MASK};

use super::{Owners, Router, Sockets};
use crate::paths::{Home, PathId, SockId};
use crate::phase::{HandingOver, Phase};

/// How long the successor may take to answer the relays offered it.
pub(super) const RELAY_ANSWER_MS: u64 = 2_000;

/// Whether `o` may be the process about to take slot `o.worker` over in
/// an upgrade: a generation after the slot's latest (serving, or dead
/// since the upgrade began), not yet published. Not only the next one:
/// an upgrade given up before spent a generation, which the next
/// upgrade's process comes after.
pub(super) fn unpublished_successor(owners: &impl Owners, o: Owner) -> bool {
    let worker = usize::from(o.worker);
    owners.slot_generation(worker).is_some_and(|g| {
        let published = Owner::new(worker, g).generation;
        let ahead = o.generation.wrapping_sub(published) & GEN_MASK as u16;
        ahead > 0 && u64::from(ahead) <= GEN_MASK / 2
    })
}

/// Whether `o` serves, as process `me` in `phase` sees it: the successor
/// does, to its predecessor; so does another slot's later generation, not
/// yet published: a successor standing by (its relays stay, its sockets
/// are not adopted, a flow it has is handed to it), or one an upgrade
/// given up spent (whose keys its slot's process takes back, or claims
/// when it finds them).
pub(super) fn serves(owners: &impl Owners, phase: &Phase, me: Owner, o: Owner) -> bool {
    owners.is_live(o)
        || phase.successor() == Some(o)
        || (o.worker != me.worker && unpublished_successor(owners, o))
}

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
        // The leases of our sockets the spent successor took with them come
        // back by the sweep (`keep_lease`), as any it takes on its way out.
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

    /// Offers up to `budget` of the relays kept here to the successor, with
    /// their sockets, once no session waits for an answer; returns how many
    /// it offered. The successor becomes the home of every socket it had,
    /// with a relay or a path of its own on each slot in use: the other
    /// workers' new generations, which borrowed those sockets from here,
    /// find it holding them when this process is gone.
    pub fn offer_relays_to_successor(&mut self, budget: usize) -> usize {
        let Phase::HandingOver(h) = &self.phase else {
            return 0;
        };
        let span = self.paths.path_span();
        let mut cursor = h.relays.cursor;
        // Looks at most this many entries per call.
        let end = span.min(cursor.saturating_add(budget.saturating_mul(64)));
        let mut relays = Vec::new();
        while cursor < end && relays.len() < budget {
            let pid = cursor as PathId;
            cursor += 1;
            let Some(p) = self.paths.path(pid) else {
                continue;
            };
            let home = self.paths.sock(p.sock).map(|s| s.home);
            if let (true, Some(Home::Here)) = (p.is_relay(), home) {
                if let Some(control) = self.relay_request(p) {
                    relays.push((p.listener, p.sock, control));
                }
            }
        }
        let now = self.now_ms;
        if let Phase::HandingOver(h) = &mut self.phase {
            h.relays.cursor = cursor;
            h.relays.offered += relays.len();
            if !relays.is_empty() {
                h.relays.since_ms.get_or_insert(now);
            }
        }
        let n = relays.len();
        for (listener, sock, control) in relays {
            self.control(self.id, listener, control, vec![sock]);
        }
        n
    }

    /// Whether the relays are handed over: every one offered and answered,
    /// or none answered in [`RELAY_ANSWER_MS`] (a successor of a release
    /// before relays were handed over does not answer).
    pub fn relays_handed(&self) -> bool {
        let Phase::HandingOver(h) = &self.phase else {
            return true;
        };
        let r = &h.relays;
        let all_offered = r.cursor >= self.paths.path_span();
        all_offered && (r.answered >= r.offered || self.relay_answers_overdue(h))
    }

    /// Relays offered and not answered yet (none once the successor has
    /// had [`RELAY_ANSWER_MS`] to answer: one of an earlier release never
    /// does, and the rest go without waiting).
    pub fn relays_pending(&self) -> usize {
        match &self.phase {
            Phase::HandingOver(h) if !self.relay_answers_overdue(h) => {
                h.relays.offered.saturating_sub(h.relays.answered)
            }
            _ => 0,
        }
    }

    /// The successor answered none of the relays in [`RELAY_ANSWER_MS`]:
    /// it is of a release that does not know them. One that answers, if
    /// slowly, is waited for (within the handover's own timeout).
    fn relay_answers_overdue(&self, h: &HandingOver) -> bool {
        h.relays.answered == 0
            && h.relays
                .since_ms
                .is_some_and(|t| self.now_ms.saturating_sub(t) >= RELAY_ANSWER_MS)
    }

    /// The successor took a relay offered it.
    pub(super) fn relay_taken(&mut self, from: u16) {
        if let Phase::HandingOver(h) = &mut self.phase {
            if usize::from(from) == self.id {
                h.relays.answered += 1;
            }
        }
    }

    /// Sessions the successor refused (they stay here until this process
    /// exits; their flows start afresh there).
    pub fn refused_by_successor(&self) -> usize {
        match &self.phase {
            Phase::HandingOver(h) => h
                .refused
                .iter()
                .filter(|&&sid| self.sessions.get(sid).is_some())
                .count(),
            _ => 0,
        }
    }

    /// Sessions still to hand over: on offer, or not offered yet.
    fn sessions_to_hand(&self) -> usize {
        self.sessions().saturating_sub(self.refused_by_successor())
    }

    /// Offers the successor what comes next: sessions while any is left to
    /// hand over, then the relays; at most `batch` at a time, and at most
    /// `in_flight` unanswered. Returns how many it offered.
    pub fn offer_next(&mut self, in_flight: usize, batch: usize) -> usize {
        let sessions = self.sessions_to_hand() > 0;
        let pending = match sessions {
            true => self.offers_pending(),
            false => self.relays_pending(),
        };
        let room = in_flight.saturating_sub(pending).min(batch);
        match (room, sessions) {
            (0, _) => 0,
            (_, true) => self.offer_to_successor(room),
            (_, false) => self.offer_relays_to_successor(room),
        }
    }

    /// Whether the handover is done: every session answered (taken or
    /// refused), every relay handed over.
    pub fn handed_over(&self) -> bool {
        self.sessions_to_hand() == 0 && self.relays_handed()
    }

    /// Sessions on offer and not yet answered.
    pub fn offers_pending(&self) -> usize {
        self.sessions
            .ids()
            .into_iter()
            .filter(|&sid| self.sessions.get(sid).is_some_and(|s| s.offer().is_some()))
            .count()
    }

    /// Whether `o` serves: see [`serves`].
    pub(super) fn live(&self, o: Owner) -> bool {
        serves(&self.owners, &self.phase, self.me, o)
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
