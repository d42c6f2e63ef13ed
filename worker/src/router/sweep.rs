//! Periodic work: idle paths and sessions close, unanswered transfer
//! offers are settled, relays whose owner is gone close, borrowed sockets
//! whose home is gone are adopted.

use udpshard_shared::backends::BackendCounter;
use udpshard_shared::owners::Owner;
use udpshard_shared::stats::Counter;

use super::upgrade::serves;
use super::{Owners, Router, Sockets, OFFER_LIFETIME_MS, TRANSFER_TIMEOUT_MS};
use crate::paths::{Home, PathId, SockId, NONE};
use crate::session::SessionId;

/// Sessions a tick moves off backends that went down (10 ticks a second).
const REROUTE_BATCH: usize = 4096;

impl<O: Owners, S: Sockets> Router<O, S> {
    /// Periodic work, with a budget of sessions and sockets to look at (the
    /// whole table about once a second): idle paths and sessions close,
    /// relays whose owner is gone close, borrowed sockets whose home is gone
    /// are adopted, cooled ports come back.
    pub fn tick(&mut self, now_ms: u64, budget: usize) {
        self.now_ms = now_ms;
        self.expire_embryonic(budget);
        self.reroute_step(REROUTE_BATCH);
        for sid in self.sessions.sweep(budget) {
            self.sweep_session(sid);
        }
        let idle_close = self
            .routes
            .iter()
            .map(|r| r.session_idle_ms)
            .max()
            .unwrap_or(60_000);
        let (borrowed, homes) = self
            .paths
            .tick(now_ms, idle_close, budget, &mut self.sockets);
        for (sock, home) in borrowed {
            if !self.live(home) {
                self.orphaned(sock, home);
            }
        }
        for sock in homes {
            self.keep_lease(sock);
        }
        self.sweep_relays(budget);
        self.update_gauges();
        for (l, route) in self.routes.iter().enumerate() {
            for b in 0..route.backends.len() {
                let n = self.sessions.on_backend(l, b);
                self.counters.backend_set(
                    route.row(b),
                    BackendCounter::SessionsActive,
                    u64::from(n),
                );
            }
        }
    }

    /// Sessions, paths and sockets held now, for the stats.
    pub fn update_gauges(&mut self) {
        self.counters
            .set(Counter::SessionsActive, self.sessions.len() as u64);
        self.counters.set(
            Counter::SessionsEmbryonic,
            self.sessions.embryonic_total() as u64,
        );
        self.counters
            .set(Counter::PathsActive, self.paths.paths.len() as u64);
        self.counters
            .set(Counter::UpstreamSockets, self.paths.socks.len() as u64);
    }

    fn sweep_session(&mut self, sid: SessionId) {
        let now = self.now_ms;
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let timeout = self
            .routes
            .get(s.listener)
            .map_or(u64::MAX, |r| r.reply_timeout_ms);
        if s.awaiting_since_ms
            .is_some_and(|t| now.saturating_sub(t) >= timeout)
        {
            s.awaiting_since_ms = None;
            let (listener, backend) = (s.listener, s.backend);
            let row = self.row_of(listener, backend);
            self.counters.backend_add(row, BackendCounter::NoReply, 1);
        }
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        // Offered to another worker: it answers, unless it died (then the
        // offer is void; a replacement reading it late answers too). An
        // answer lost on the way is settled by the ownership table.
        if let Some((to, since)) = s.offer().map(|o| (o.to, o.since_ms)) {
            let (listener, key) = (s.listener, s.key);
            let waited = now.saturating_sub(since);
            match self.live_at(usize::from(to)) {
                Some(_) if waited < TRANSFER_TIMEOUT_MS => return,
                Some(owner)
                    if self.owners.lookup(self.owner_hash(listener, &key)) == Some(owner) =>
                {
                    self.transfer_done(to, listener, key, true);
                    return;
                }
                // Not taken, and no answer yet: a busy or stalled receiver
                // may still say yes. The offer stays, so that a late yes is
                // reconciled (paths closed here since then are closed there
                // too, or their ports, once cooled, would serve a second
                // 4-tuple), and so does the session: nothing of it closes
                // while the receiver may hold copies of its sockets.
                Some(_) if waited < OFFER_LIFETIME_MS => return,
                // An answer that never came: the offer is void.
                Some(_) => self.transfer_done(to, listener, key, false),
                // The receiver died or is leaving: its replacement may read
                // the offer from the inbox and say yes, which must still be
                // reconciled; meanwhile the session stays, as above.
                None if waited < OFFER_LIFETIME_MS => return,
                None => {
                    if let Some(s) = self.sessions.get_mut(sid) {
                        s.give_up_offer();
                    }
                }
            }
        }
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        let route = &self.routes[s.listener];
        let (session_idle, path_idle) = (route.session_idle_ms, route.path_idle_ms);
        if now.saturating_sub(s.last_active_ms) > session_idle {
            self.close_session(sid);
            self.counters.incr(Counter::SessionsExpired);
            return;
        }
        // A path that is not the session's last closes sooner: of the idle
        // ones, all but the most recently used when every path is idle.
        if s.path_count > 1 {
            let mut idle = Vec::new();
            let mut newest: Option<(u64, PathId)> = None;
            let mut pid = s.first_path;
            while let Some(p) = self.paths.path(pid) {
                let last = p.last_active_ms();
                if newest.is_none_or(|(t, _)| last > t) {
                    newest = Some((last, pid));
                }
                if now.saturating_sub(last) > path_idle {
                    idle.push(pid);
                }
                pid = p.next;
            }
            for pid in idle {
                if Some(pid) != newest.map(|(_, p)| p) {
                    self.close_path(pid);
                }
            }
        }
    }

    /// Closes a session, its paths and its ownership entries.
    pub(super) fn close_session(&mut self, sid: SessionId) {
        self.log_session_end(sid, None);
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        let listener = s.listener;
        let hashes: Vec<u64> = s.keys().map(|k| self.owner_hash(listener, k)).collect();
        while let Some(pid) = self
            .sessions
            .get(sid)
            .map(|s| s.first_path)
            .filter(|p| *p != NONE)
        {
            self.close_path(pid);
        }
        for hash in hashes {
            self.owners.release(hash, self.me);
        }
        self.sessions.remove(sid);
    }

    /// Relays whose session has no live owner any more close.
    fn sweep_relays(&mut self, budget: usize) {
        let span = self.paths.path_span();
        if span == 0 {
            return;
        }
        let mut dead = Vec::new();
        for _ in 0..budget.min(span) {
            let id = self.relay_cursor % span;
            self.relay_cursor = id + 1;
            let Some(p) = self.paths.paths.get(id) else {
                continue;
            };
            if !p.is_relay() {
                continue;
            }
            let owner = self.owners.lookup(self.owner_hash(p.listener, &p.key));
            let orphan = match owner {
                Some(o) => o == self.me || !self.live(o),
                None => true,
            };
            if orphan {
                dead.push(id as PathId);
            }
        }
        for pid in dead {
            self.close_path(pid);
        }
    }

    /// A socket this worker reads is leased to it: a successor that took the
    /// lease with the socket and then stopped serving (its upgrade given up,
    /// a frame it read on its way out) gives it back.
    fn keep_lease(&mut self, sock: SockId) {
        let Some(local) = self.paths.sock(sock).map(|s| s.local) else {
            return;
        };
        let holder = self.sockets.lease_holder(local);
        if let Some(h) = holder.filter(|&h| h != self.me && !self.live(h)) {
            self.sockets.take_lease(local, h);
        }
    }

    /// The home of borrowed socket `sock` is gone: take the socket over. A
    /// process that serves may hold its lease already: the home's successor
    /// in a binary upgrade, which took it with the home's relays, or a
    /// worker that adopted it first. Then that one reads it: our paths stay,
    /// borrowed from it, and it is asked to relay each (it has the relays
    /// already when it is the successor). Else our paths on it close.
    pub(super) fn orphaned(&mut self, sock: SockId, home: Owner) {
        let Some(local) = self.paths.sock(sock).map(|s| s.local) else {
            return;
        };
        let listener = self.paths.sock(sock).map_or(0, |s| s.listener);
        let cool = self.routes.get(listener).map_or(0, |r| r.reuse_delay_ms);
        let (owners, phase, me) = (&self.owners, &self.phase, self.me);
        let serves = |o: Owner| o != home && serves(owners, phase, me, o);
        if self.sockets.adopt(sock, local, &serves) {
            self.paths.adopted(sock, self.now_ms, cool);
            return;
        }
        let holder = self
            .sockets
            .lease_holder(local)
            .filter(|&h| h != self.me && serves(h));
        let Some(holder) = holder else {
            for pid in self.paths.on_sock(sock) {
                self.close_path(pid);
            }
            return;
        };
        if let Some(s) = self.paths.sock_mut(sock) {
            s.home = Home::Borrowed(holder);
        }
        for pid in self.paths.on_sock(sock) {
            let Some(p) = self.paths.path(pid) else {
                continue;
            };
            // A relay here is no use: we do not read the socket.
            if p.is_relay() {
                self.close_path(pid);
                continue;
            }
            if let Some(control) = self.relay_request(p) {
                let listener = p.listener;
                self.control(usize::from(holder.worker), listener, control, Vec::new());
            }
        }
    }
}
