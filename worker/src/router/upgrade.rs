//! The binary upgrade's handover, as a router sees it: the old generation
//! offers every session to its slot's successor, the new one stands by
//! taking them, and an upgrade given up leaves the old one serving.

use udpshard_shared::owners::Owner;

use super::{Owners, Router, Sockets};
use crate::paths::{Home, SockId};

impl<O: Owners, S: Sockets> Router<O, S> {
    /// A binary upgrade: `to` takes this slot over. From now on no session
    /// is made here: a datagram with none goes to `to`, and so does every
    /// session ([`Router::offer_to_successor`]).
    pub fn set_successor(&mut self, to: Owner) {
        self.successor = Some(to);
    }

    /// The upgrade is given up: this worker serves on. Sessions on offer to
    /// the successor stay (whatever it answered, it is gone), their keys
    /// this worker's again.
    pub fn resume(&mut self) {
        self.successor = None;
        self.refused_by_successor.clear();
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

    /// A binary upgrade: this process stands by to take the slot over from
    /// `predecessor` until it is live (`None`), taking the sessions the
    /// predecessor hands it; a datagram of a session still there goes to it.
    pub fn set_standby(&mut self, predecessor: Option<Owner>) {
        self.standby = predecessor;
    }

    /// Offers up to `budget` sessions not yet on offer to the successor;
    /// returns how many it offered.
    pub fn offer_to_successor(&mut self, budget: usize) -> usize {
        if self.successor.is_none() {
            return 0;
        }
        let mut offered = 0;
        for sid in self.sessions.ids() {
            if offered >= budget {
                break;
            }
            if self.sessions.get(sid).is_some_and(|s| s.offer().is_none())
                && !self.refused_by_successor.contains(&sid)
            {
                self.transfer(sid, self.id);
                offered += 1;
            }
        }
        offered
    }

    /// Sessions the successor refused (they stay here until this process
    /// exits; their flows start afresh there).
    pub fn refused_by_successor(&self) -> usize {
        self.refused_by_successor.len()
    }

    /// Sessions on offer and not yet answered.
    pub fn offers_pending(&self) -> usize {
        self.sessions
            .ids()
            .into_iter()
            .filter(|&sid| self.sessions.get(sid).is_some_and(|s| s.offer().is_some()))
            .count()
    }

    /// Whether `o` is the process about to take slot `o.worker` over in an
    /// upgrade: the generation after the one serving it, not yet published.
    pub(super) fn unpublished_successor(&self, o: Owner) -> bool {
        let worker = usize::from(o.worker);
        self.owners
            .live_owner(worker)
            .is_some_and(|l| Owner::new(worker, u64::from(l.generation) + 1) == o)
    }

    /// Whether `o` serves: the successor does, to its predecessor.
    pub(super) fn live(&self, o: Owner) -> bool {
        self.successor == Some(o) || self.owners.is_live(o)
    }

    /// Who serves slot `worker`: this slot's successor, to its predecessor.
    pub(super) fn live_at(&self, worker: usize) -> Option<Owner> {
        match self.successor {
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

    /// Draining: live sessions are served, no new ones are made.
    pub fn drain(&mut self) {
        self.draining = true;
    }
}
