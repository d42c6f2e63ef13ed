//! Sessions moving between workers: a flow the kernel keeps delivering to
//! another worker is offered there with its paths' sockets (SCM_RIGHTS);
//! the session stays here, served as before, until the receiver answers.
//! The socket's home keeps reading it and relays the backend's replies.

use std::net::{IpAddr, SocketAddr};

use udpshard_shared::handoff::{generation_bits, Control, Frame, PathRef, Transfer, TransferPath};
use udpshard_shared::owners::Owner;
use udpshard_shared::stats::Counter;
use udpshard_shared::{DropReason, FlowKey};

use super::{Action, DatagramRef, Owners, Router, Sockets, TRANSFER_AFTER};
use crate::paths::{Home, Path, PathId, NONE};
use crate::phase::Phase;
use crate::session::{Offer, Session, SessionId};

/// A path whose replies are to be relayed here ([`Router::relay_in`]): the
/// worker that asks, the listener, the path, its client.
#[derive(Debug, Clone, Copy)]
pub(super) struct RelayAsk {
    pub from: u16,
    pub listener: usize,
    pub path: PathRef,
    pub client: SocketAddr,
    pub local_ip: Option<IpAddr>,
}

impl<O: Owners, S: Sockets> Router<O, S> {
    /// Counts a handed-over datagram against its session; a flow the kernel
    /// keeps delivering to another worker moves there.
    pub(super) fn note_handoff(&mut self, sid: SessionId, from: u16) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        if s.handed_over_by(from) >= TRANSFER_AFTER && usize::from(from) != self.id {
            self.transfer(sid, usize::from(from));
        }
    }

    /// Offers session `sid` to worker `to`, with a copy of each path's
    /// socket. It stays here, served as before, until `to` answers.
    pub(super) fn transfer(&mut self, sid: SessionId, to: usize) {
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        // Not twice at once, and not to a worker that is leaving; handing
        // over, only to the successor.
        let to_owner = self.live_at(to);
        if s.offer().is_some()
            || to_owner.is_none()
            || (self.phase.successor().is_some() && to != self.id)
        {
            if let Some(s) = self.sessions.get_mut(sid) {
                s.end_run();
            }
            return;
        }
        let route = &self.routes[s.listener];
        let mut paths = Vec::with_capacity(usize::from(s.path_count));
        let mut socks = Vec::with_capacity(usize::from(s.path_count));
        let mut offered = Vec::with_capacity(usize::from(s.path_count));
        let mut pid = s.first_path;
        while let Some(p) = self.paths.path(pid) {
            if let Some(sock) = self.paths.sock(p.sock) {
                let home = match sock.home {
                    Home::Here => self.me,
                    Home::Borrowed(o) => o,
                };
                paths.push(TransferPath {
                    client: p.client,
                    local_ip: p.local_ip,
                    upstream: sock.local,
                    home: home.worker,
                    home_generation: home.generation,
                    idle_ms: self
                        .now_ms
                        .saturating_sub(p.last_active_ms())
                        .min(u64::from(u32::MAX)) as u32,
                    answered: Some(p.answered),
                });
                socks.push(p.sock);
                offered.push((sock.local, p.client));
            }
            pid = p.next;
        }
        let backend_addr = route.backends[usize::from(s.backend)];
        let offer = Offer {
            to: to as u16,
            since_ms: self.now_ms,
            backend: backend_addr,
            paths: offered,
            aliases: s.aliases.len(),
        };
        let transfer = Transfer {
            key: s.key,
            aliases: s.aliases.clone(),
            backend: s.backend,
            backend_addr,
            paths,
        };
        let listener = s.listener;
        if let Some(s) = self.sessions.get_mut(sid) {
            s.set_offered(offer);
        }
        self.control(to, listener, Control::Transfer(transfer), socks);
    }

    /// A transfer offer could not be sent at all: the session stays.
    pub fn transfer_failed(&mut self, frame: &[u8]) {
        if let Ok(Frame::Control {
            listener,
            control: Control::Transfer(t),
            ..
        }) = Frame::decode(frame)
        {
            let sid = self
                .listener_of(listener)
                .and_then(|l| self.sessions.lookup(l, &t.key));
            if let Some(s) = sid.and_then(|sid| self.sessions.get_mut(sid)) {
                s.take_offer();
            }
        }
    }

    /// Takes over a session worker `from` offers, with its paths;
    /// `generation`: the sender's generation bits, where its frame says them.
    pub(super) fn transfer_in(
        &mut self,
        from: u16,
        generation: Option<u8>,
        listener: usize,
        t: Transfer,
        fds: usize,
    ) {
        let accept = |r: &mut Self, accepted: bool| {
            r.control(
                usize::from(from),
                listener,
                Control::TransferDone {
                    key: t.key,
                    accepted,
                },
                Vec::new(),
            );
        };
        let route = &self.routes[listener];
        let backend_ok = route.backends.get(usize::from(t.backend)) == Some(&t.backend_addr);
        // Its sockets' descriptors did not arrive (we are out of them), the
        // backend lists differ (mid-reload), or we made our own session
        // meanwhile: it stays where it is.
        // Nor does it come to a worker that is leaving or full.
        // Nor when another process has taken its key since the offer (the
        // sender died, and its flow started afresh there: at another
        // worker, or at the sender's replacement, which a frame tells by
        // its sender's generation), or no process owns it any more (the
        // sender gave the offer up and the session closed there: its
        // sockets' relays are gone with it).
        // Nor from this slot's predecessor once it is gone (it died since
        // it offered, or this process went live after it exited): its
        // sessions start afresh here, as the supervisor says of an old
        // worker lost mid-handover.
        let owner = self.owners.lookup(self.owner_hash(listener, &t.key));
        let replaced = |o: Owner| {
            o.worker == from
                && generation.is_some_and(|g| g != generation_bits(o.generation))
                && self.owners.is_live(o)
        };
        let taken = owner.is_some_and(|o| o != self.me && (o.worker != from || replaced(o)));
        let orphaned = usize::from(from) == self.id
            && self
                .phase
                .predecessor()
                .is_none_or(|p| !self.owners.is_live(p));
        let refused = if self.phase.successor().is_some() {
            Some("handing its own sessions over")
        } else if fds != t.paths.len() {
            Some("its sockets did not arrive")
        } else if !backend_ok {
            Some("the backend lists differ")
        } else if self.sessions.lookup(listener, &t.key).is_some() {
            Some("a session of its key is here")
        } else if self.phase.is_draining() {
            Some("draining")
        } else if self.sessions.admit(listener).is_err() {
            Some("at max_sessions")
        } else if taken {
            Some("another process took its key since")
        } else if owner.is_none() {
            Some("its sender closed it since")
        } else if orphaned {
            Some("its sender died")
        } else {
            None
        };
        if let Some(why) = refused {
            tracing::debug!(worker = self.id, from, "transfer refused: {why}");
            accept(self, false);
            return;
        }
        let backends = route.backends.len();
        // Embryonic only when the sender says no path was answered (a
        // sender of an earlier release says nothing: established).
        let answered = t.paths.is_empty() || t.paths.iter().any(|p| p.answered != Some(false));
        let mut session = Session::transferred(listener, t.key, t.backend, self.now_ms, answered);
        session.aliases = t.aliases.clone();
        let sid = self.sessions.insert(session);
        for (index, tp) in t.paths.iter().enumerate() {
            let last = self.now_ms.saturating_sub(u64::from(tp.idle_ms));
            let sock = match self.paths.by_local(tp.upstream) {
                Some(sock) => sock,
                None => {
                    let home = Owner::new(usize::from(tp.home), u64::from(tp.home_generation));
                    let sock = self
                        .paths
                        .borrow_sock(listener, tp.upstream, home, backends);
                    self.actions.push(Action::Keep { index, sock });
                    self.inherit_lease(tp.upstream, home);
                    sock
                }
            };
            // Our own socket (the session comes home): its relay becomes
            // the session's path again.
            if let Some(pid) = self.paths.on_slot(sock, t.backend) {
                let first = self.sessions.get(sid).map_or(NONE, |s| s.first_path);
                if let Some(p) = self
                    .paths
                    .path_mut(pid)
                    .filter(|p| p.is_relay() && p.key == t.key)
                {
                    p.session = sid as u32;
                    p.next = first;
                    p.client = tp.client;
                    p.local_ip = tp.local_ip;
                    p.last_client_ms = last;
                    if let Some(s) = self.sessions.get_mut(sid) {
                        s.first_path = pid;
                        s.path_count += 1;
                    }
                }
                continue;
            }
            let path = Path::new(
                listener,
                t.backend,
                sock,
                tp.client,
                tp.local_ip,
                t.key,
                last,
            );
            let answered = tp.answered != Some(false);
            let path = Path {
                last_reply_ms: if answered { last } else { 0 },
                answered,
                ..path
            };
            self.link_first(sid, path);
        }
        let me = self.me;
        for hash in self.key_hashes(sid) {
            self.owners.assign(hash, me);
        }
        self.counters.incr(Counter::TransfersIn);
        self.sample_session(sid, Some(usize::from(from)));
        accept(self, true);
    }

    /// A socket borrowed from this process's predecessor in a binary
    /// upgrade is this process's to read once the predecessor is gone: it
    /// takes the lease now, so that no other worker adopts the socket
    /// first (the predecessor reads it until it exits).
    fn inherit_lease(&mut self, local: SocketAddr, home: Owner) {
        if self.phase.predecessor() == Some(home) {
            self.sockets.take_lease(local, home);
        }
    }

    /// A path's replies on a socket of ours are to be relayed: its home in
    /// a binary upgrade hands us its relay, with the socket (`fds` 1, from
    /// this slot's predecessor), or a worker that borrows the socket from
    /// us since we adopted it asks for its path (`fds` 0). A relay handed
    /// over is answered, whatever became of it; a request that cannot be
    /// met is answered with `PathClosed`, and the borrower closes its path
    /// (it would send on a 4-tuple whose replies nobody relays).
    pub(super) fn relay_in(&mut self, ask: RelayAsk, fds: usize) {
        let handed = fds > 0;
        let answer = match handed {
            true => Control::RelayTaken(ask.path),
            false => Control::PathClosed(ask.path),
        };
        let taken = self.take_relay(&ask, handed);
        if handed || !taken {
            self.control(usize::from(ask.from), ask.listener, answer, Vec::new());
        }
    }

    /// [`Router::relay_in`]'s work: whether the path's replies are relayed
    /// here now (or reach a path of its own session here).
    fn take_relay(&mut self, ask: &RelayAsk, handed: bool) -> bool {
        let RelayAsk {
            from,
            listener,
            path,
            client,
            local_ip,
        } = *ask;
        let predecessor = self
            .phase
            .predecessor()
            .filter(|_| handed && usize::from(from) == self.id);
        let Some(backend) = self.routes[listener].backend_of(path.backend) else {
            return false;
        };
        let sock = match (self.paths.by_local(path.upstream), predecessor) {
            (Some(sock), _) => sock,
            (None, Some(home)) => {
                let backends = self.routes[listener].backends.len();
                let sock = self
                    .paths
                    .borrow_sock(listener, path.upstream, home, backends);
                self.actions.push(Action::Keep { index: 0, sock });
                sock
            }
            (None, None) => return false,
        };
        let home = self.paths.sock(sock).map(|s| s.home);
        let ours = match home {
            Some(Home::Here) => true,
            Some(Home::Borrowed(h)) => Some(h) == self.phase.predecessor(),
            None => false,
        };
        if !ours {
            return false;
        }
        if let (Some(Home::Borrowed(h)), true) = (home, handed) {
            self.inherit_lease(path.upstream, h);
        }
        // A path of this flow there already: the relay, or its own path
        // (the session came here). Another flow's: not for this one.
        if let Some(pid) = self.paths.on_slot(sock, backend) {
            return self.paths.path(pid).is_some_and(|p| p.key == path.key);
        }
        let now = self.now_ms;
        let relay = Path {
            // Its backend has answered, for all we know: it cools when it
            // closes.
            last_reply_ms: now,
            answered: true,
            ..Path::new(listener, backend, sock, client, local_ip, path.key, now)
        };
        self.paths.insert_relay(relay).is_some()
    }

    /// The answer to a transfer we offered.
    pub(super) fn transfer_done(
        &mut self,
        from: u16,
        listener: usize,
        key: FlowKey,
        accepted: bool,
    ) {
        let Some(sid) = self.sessions.lookup(listener, &key) else {
            return;
        };
        // The successor of an upgrade given up answers an offer this worker
        // took back when it resumed: the session stays here, and its keys,
        // which the successor took if it said yes, are ours again.
        if usize::from(from) == self.id && self.phase.successor().is_none() {
            let me = self.me;
            for hash in self.key_hashes(sid) {
                self.owners.assign(hash, me);
            }
            return;
        }
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        // An answer to an offer we had given up on (its receiver seemed
        // gone) still counts: the receiver owns the session now, and what
        // changed here since the offer is put right as for any yes.
        if s.offer().is_some_and(|o| o.to != from) {
            return;
        }
        let offer = match s.offer() {
            Some(_) => s.take_offer(),
            None => s.answered_late(from),
        };
        if !accepted {
            // The successor will not have it: it is not offered again (the
            // handover would loop until its timeout).
            if let Phase::HandingOver(h) = &mut self.phase {
                if usize::from(from) == self.id {
                    h.refused.insert(sid);
                }
            }
            return;
        }
        if let Some(offer) = offer {
            self.reconcile(sid, from, listener, &offer);
        }
        // It is served there now. Our sockets' paths stay, as relays: we
        // read those sockets and relay their replies. Borrowed copies go.
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        let mut pid = s.first_path;
        self.log_session_end(sid, Some(usize::from(from)));
        self.sessions.remove(sid);
        let cool = self.routes[listener].reuse_delay_ms;
        while let Some(p) = self.paths.path(pid) {
            let next = p.next;
            if self.paths.sock(p.sock).map(|s| s.home) == Some(Home::Here) {
                if let Some(p) = self.paths.path_mut(pid) {
                    p.session = NONE;
                    p.next = NONE;
                }
            } else {
                self.paths.remove(pid, self.now_ms, cool);
            }
            pid = next;
        }
        self.counters.incr(Counter::TransfersOut);
    }

    /// The receiver of session `sid` took what `offer` sent it; what
    /// changed here since is put right before the session leaves. A path
    /// opened meanwhile on a socket of ours stays here as a relay (what it
    /// forwarded has replies on their way; the receiver opens its own path
    /// when the client sends again), one on a borrowed socket goes with the
    /// other borrowed copies (`transfer_done`); the receiver closes its copy
    /// of an offered path that closed here meanwhile, whose port may
    /// otherwise serve another session once it cooled; aliases learned
    /// meanwhile go with it.
    fn reconcile(&mut self, sid: SessionId, to: u16, listener: usize, offer: &Offer) {
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        let key = s.key;
        let new_aliases: Vec<FlowKey> = s.aliases.get(offer.aliases..).unwrap_or(&[]).to_vec();
        // An offered path is still here when a path of the session uses
        // its 4-tuple for its client: one that closed meanwhile may have
        // left its 4-tuple to a new path for another address (`path`
        // migration; with `follow` the one path's client moves, and the
        // socket's home relays to where it moved). None is when a reload
        // moved the session to another backend since: the receiver has
        // it on the backend offered.
        let follow = self.routes[listener].follow;
        let same_backend = self.routes[listener].backend_of(offer.backend) == Some(s.backend);
        let mut now_here = Vec::new();
        let mut pid = if same_backend { s.first_path } else { NONE };
        while let Some(p) = self.paths.path(pid) {
            if let Some(local) = self.paths.sock(p.sock).map(|s| s.local) {
                let offered = offer
                    .paths
                    .iter()
                    .find(|(u, c)| *u == local && (follow || *c == p.client));
                if let Some(&(u, c)) = offered {
                    now_here.push((u, c));
                }
            }
            pid = p.next;
        }
        for (upstream, _) in offer.paths.iter().filter(|p| !now_here.contains(p)) {
            let control = Control::PathClosed(PathRef {
                key,
                upstream: *upstream,
                backend: offer.backend,
            });
            self.control(usize::from(to), listener, control, Vec::new());
        }
        let owner = self.live_at(usize::from(to));
        for alias in new_aliases {
            if let Some(owner) = owner {
                self.owners.assign(self.owner_hash(listener, &alias), owner);
            }
            let control = Control::AliasLearned { key, alias };
            self.control(usize::from(to), listener, control, Vec::new());
        }
    }

    /// Whether this worker's relays go to its successor: what changes of
    /// them goes there too.
    fn relays_on_offer(&self) -> bool {
        matches!(&self.phase, Phase::HandingOver(h) if h.relays.cursor > 0)
    }

    /// The relay path named by `path` (its home is here).
    fn relay(&self, listener: usize, path: &PathRef) -> Option<PathId> {
        let sock = self.paths.by_local(path.upstream)?;
        let backend = self.routes[listener].backend_of(path.backend)?;
        let pid = self.paths.on_slot(sock, backend)?;
        self.paths
            .path(pid)
            .filter(|p| p.is_relay() && p.key == path.key)
            .map(|_| pid)
    }

    /// A path closed at another worker: the relay we keep for it (we are
    /// its socket's home), or our copy of it (the worker that handed us the
    /// session closed it before our acceptance reached it). The home is not
    /// told of that copy: it knows (it told us, or the sender told it when
    /// it closed the path), and its relay on that 4-tuple may be a new path
    /// the sender opened there since, for another client.
    pub(super) fn path_closed(&mut self, listener: usize, path: PathRef) {
        if self.relays_on_offer() {
            self.control(self.id, listener, Control::PathClosed(path), Vec::new());
        }
        if let Some(pid) = self.relay(listener, &path) {
            self.close_path(pid);
            return;
        }
        let Some(sock) = self.paths.by_local(path.upstream) else {
            return;
        };
        if !matches!(
            self.paths.sock(sock).map(|s| s.home),
            Some(Home::Borrowed(_))
        ) {
            return;
        }
        let Some(backend) = self.routes[listener].backend_of(path.backend) else {
            return;
        };
        let ours = self.paths.on_slot(sock, backend).filter(|pid| {
            self.paths
                .path(*pid)
                .is_some_and(|p| !p.is_relay() && p.key == path.key)
        });
        if let Some(pid) = ours {
            self.drop_path(pid, false);
        }
    }

    /// The owner of a path we relay says its client moved, and hands us the
    /// datagram that moved it to forward.
    pub(super) fn relay_moved(
        &mut self,
        listener: usize,
        path: PathRef,
        client: SocketAddr,
        local_ip: Option<IpAddr>,
        carried: Option<(DatagramRef, usize)>,
    ) {
        let relay = self.relay(listener, &path);
        if let Some(p) = relay.and_then(|pid| self.paths.path_mut(pid)) {
            p.client = client;
            p.local_ip = local_ip;
        }
        if self.relays_on_offer() {
            let moved = Control::PathMoved {
                path,
                client,
                local_ip,
            };
            self.control(self.id, listener, moved, Vec::new());
        }
        let Some((d, len)) = carried else {
            return;
        };
        self.counters.incr(Counter::HandoffIn);
        let relayed = relay
            .and_then(|pid| self.paths.path(pid))
            .map(|p| (p.sock, p.listener, p.backend));
        match relayed {
            Some((sock, listener, backend)) => {
                let _ = self.push_forward(sock, listener, backend, (client, local_ip), d, len);
            }
            // The relay closed meanwhile: nothing carries the datagram.
            None => self.drop_datagram(DropReason::Handoff),
        }
    }

    /// A relaying home saw replies on one of our paths.
    pub(super) fn relayed_activity(&mut self, listener: usize, path: PathRef) {
        let Some(sock) = self.paths.by_local(path.upstream) else {
            return;
        };
        let Some(backend) = self.routes[listener].backend_of(path.backend) else {
            return;
        };
        let Some(pid) = self.paths.on_slot(sock, backend) else {
            return;
        };
        let now = self.now_ms;
        if let Some(p) = self.paths.path_mut(pid) {
            p.last_reply_ms = now;
            p.answered = true;
            let sid = p.session as usize;
            if let Some(s) = self.sessions.get_mut(sid) {
                s.last_active_ms = now;
                self.established(sid);
            }
        }
    }
}
