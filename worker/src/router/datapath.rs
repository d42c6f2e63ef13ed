//! The datapath, in the order a datagram meets it: a client's datagram
//! ([`Router::client`]) is dissected, found in the session table or
//! handed to its owner or made a session, and forwarded on its path; a
//! backend's ([`Router::backend`]) is replied to its path's client; a frame
//! from another worker ([`Router::frame`]) is a handed-over datagram or a
//! control message. Each count a failed send takes back sits beside the
//! count it takes back.

use std::net::{IpAddr, SocketAddr};

use udpshard_shared::backends::BackendCounter;
use udpshard_shared::flow::{quic_is_initial, quic_long_scid, quic_may_open};
use udpshard_shared::handoff::{Control, Frame, Header, PathRef, HEADER_LEN, MAX_HOPS};
use udpshard_shared::owners::Claim;
use udpshard_shared::stats::Counter;
use udpshard_shared::{DropReason, FlowKey};

use super::admission::MAX_EVICTIONS;
use super::transfer::RelayAsk;
use super::upgrade;
use super::{
    Action, Arrival, DatagramRef, Inherited, Outcome, Owners, Router, Sockets, Via,
    TRANSFER_TIMEOUT_MS, WARM_BATCH,
};
use crate::keyindex::prefetch;
use crate::paths::{Home, OpenError, Path, PathId, SockId, NONE};
use crate::session::{Session, SessionId};

/// What a datagram with no session may make of itself.
#[derive(Debug, Clone, Copy)]
struct Opening {
    /// Admission lets it open a session (on `quic` listeners: a first
    /// flight, or a short header).
    may_open: bool,
    /// It is a QUIC Initial, which its backend must answer: passive health
    /// judges the session.
    initial: bool,
}

impl<O: Owners, S: Sockets> Router<O, S> {
    /// Starts loading what a batch of client datagrams on `listener` will
    /// read: each one's index line, then its session and first path. Their
    /// cache misses then overlap, where `client` would wait for each in
    /// turn (at 100,000 sessions a worker, three a datagram). Changes
    /// nothing; datagrams past the first [`WARM_BATCH`] are left alone.
    pub fn warm<'a>(&self, listener: usize, batch: impl Iterator<Item = (&'a [u8], SocketAddr)>) {
        let Some(route) = self.routes.get(listener) else {
            return;
        };
        let mut keys = [None; WARM_BATCH];
        for (slot, (bytes, client)) in keys.iter_mut().zip(batch) {
            *slot = route.dissector.flow_key(bytes, client).ok();
            if let Some(key) = slot {
                self.sessions.prefetch(listener, key);
            }
        }
        for key in keys.iter().flatten() {
            let session = self.sessions.lookup(listener, key);
            if let Some(s) = session.and_then(|sid| self.sessions.get(sid)) {
                if let Some(p) = self.paths.path(s.first_path) {
                    prefetch(p);
                }
            }
        }
    }

    /// A client datagram that arrived as `a` says.
    pub fn client(&mut self, now_ms: u64, a: Arrival, bytes: &[u8], d: DatagramRef) -> Outcome {
        self.now_ms = now_ms;
        match a.via {
            Via::Socket => {
                self.counters.incr(Counter::RxPackets);
                self.counters.add(Counter::RxBytes, bytes.len() as u64);
            }
            Via::Handoff { .. } => self.counters.incr(Counter::HandoffIn),
            Via::Retry => {}
        }
        let Some(route) = self.routes.get(a.listener) else {
            self.drop_datagram(DropReason::Handoff);
            return Outcome::Done;
        };
        let Ok(key) = route.dissector.flow_key(bytes, a.client) else {
            self.drop_datagram(DropReason::Malformed);
            return Outcome::Done;
        };
        let a = Arrival {
            local_ip: if route.wildcard { a.local_ip } else { None },
            ..a
        };
        let sid = match self.sessions.lookup(a.listener, &key) {
            Some(sid) => sid,
            None => {
                let opening = Opening {
                    may_open: !route.admission.quic || quic_may_open(bytes),
                    initial: route.learns_server_cids && quic_is_initial(bytes),
                };
                match self.miss(a, key, d, opening) {
                    Ok(sid) => sid,
                    Err(outcome) => return outcome,
                }
            }
        };
        self.forward(sid, a, bytes.len(), d);
        Outcome::Done
    }

    /// No local session has the key: hand the datagram to its owner, or
    /// take the flow, if it may open one (`admission`).
    fn miss(
        &mut self,
        a: Arrival,
        key: FlowKey,
        d: DatagramRef,
        opening: Opening,
    ) -> Result<SessionId, Outcome> {
        if let Some(reason) = self.refused.check(a.listener, &key, self.now_ms) {
            self.drop_datagram(reason);
            return Err(Outcome::Done);
        }
        let hash = self.owner_hash(a.listener, &key);
        let hops = a.via.hops();
        if self.phase.successor().is_some() {
            // Handing over: a session another old worker still has is
            // served there; any other goes to the successor, which makes
            // the sessions now (one more hop whatever the count, up to one
            // past the cap: what it sends here is only what this generation
            // still has).
            // Another slot's: its old worker has it, or passes it on to its
            // successor (not yet published) that has; within the hop cap.
            let to = match self.owners.lookup(hash) {
                Some(o)
                    if usize::from(o.worker) != self.id
                        && hops < MAX_HOPS
                        && (self.owners.is_live(o)
                            || upgrade::unpublished_successor(&self.owners, o)) =>
                {
                    usize::from(o.worker)
                }
                _ => self.id,
            };
            // One hop past the cap, never two: a datagram that waited in an
            // inbox through an upgrade has had its extra one.
            if hops > MAX_HOPS {
                self.drop_datagram(DropReason::Handoff);
            } else {
                self.hand_over(to, a, d, hops + 1);
            }
            return Err(Outcome::Done);
        }
        let mut inherited = None;
        // Standing by while the predecessor serves, a session of the old
        // generation is served there until it comes (in order, on the
        // predecessor's channel: what it sends back arrives after the
        // session); once the predecessor is gone, or the slots are
        // published, the flow is routed as any.
        let standing_by = self.phase.predecessor().is_some();
        let standby = self.phase.predecessor().filter(|p| self.owners.is_live(*p));
        let owner = self.owners.lookup(hash);
        // Another slot's successor, not yet published: standing by, this
        // process's peer (its predecessor serving or not).
        let peer = owner.filter(|o| {
            standing_by
                && o.worker != self.me.worker
                && upgrade::unpublished_successor(&self.owners, *o)
        });
        if hops < MAX_HOPS {
            match owner {
                // Ours, but unknown here: what made it ours (a transfer, a
                // learned alias) is in the inbox.
                Some(o) if o == self.me && a.via == Via::Socket => return Err(Outcome::Deferred),
                // A peer has it.
                Some(o) if peer.is_some() => {
                    self.hand_over(usize::from(o.worker), a, d, hops + 1);
                    return Err(Outcome::Done);
                }
                // The old generation's: the predecessor has it, or sends it
                // on to the old worker that has.
                Some(o) if standby.is_some() && o != self.me && self.owners.is_live(o) => {
                    self.hand_over(self.id, a, d, hops + 1);
                    return Err(Outcome::Done);
                }
                Some(o) if standby.is_none() && o != self.me && self.live(o) => {
                    self.hand_over(usize::from(o.worker), a, d, hops + 1);
                    return Err(Outcome::Done);
                }
                // Its owner died with the session: its path's port, if the
                // flow can have it back.
                Some(o) if o != self.me && !self.live(o) => inherited = self.owners.hint(hash, o),
                _ => {}
            }
        }
        if peer.is_some() {
            // Out of hops (see below): the table's liveness does not know
            // the peer, and would let this process take the flow from it.
            self.drop_datagram(DropReason::Handoff);
            return Err(Outcome::Done);
        }
        // Admission, before the ownership table is written: a first flight
        // only, within its source's rate.
        if !opening.may_open {
            self.drop_datagram(DropReason::NotInitial);
            return Err(Outcome::Done);
        }
        let now = self.now_ms;
        let admission = &mut self.routes[a.listener].admission;
        if !admission.new_sessions.take(a.client.ip(), now) {
            self.drop_datagram(DropReason::RateLimited);
            return Err(Outcome::Done);
        }
        match self.owners.claim(hash, self.me) {
            Claim::Mine => {}
            // Claimed by another worker an instant ago.
            Claim::Taken(o) if hops < MAX_HOPS && standby.is_none() => {
                self.hand_over(usize::from(o.worker), a, d, hops + 1);
                return Err(Outcome::Done);
            }
            // Out of hops, and a live worker has the flow: a second session
            // here would send it from a second 4-tuple, so what bounced this
            // long is dropped (a datagram that waited in a dead worker's
            // inbox while another took its flow over).
            Claim::Taken(_) => {
                self.drop_datagram(DropReason::Handoff);
                return Err(Outcome::Done);
            }
            Claim::Full => self.counters.incr(Counter::OwnersFull),
        }
        match self.open_session(a, key, hash, inherited, opening.initial) {
            Ok(sid) => Ok(sid),
            Err(reason) => {
                self.owners.release(hash, self.me);
                if matches!(reason, DropReason::NoPort | DropReason::NoFd) {
                    self.refused.remember(a.listener, key, reason, self.now_ms);
                }
                self.drop_datagram(reason);
                Err(Outcome::Done)
            }
        }
    }

    /// A new session with its first path, for the client of `a` (`hash`:
    /// its key's ownership entry): on the port the flow had at a dead worker
    /// when it can (`inherited`).
    fn open_session(
        &mut self,
        a: Arrival,
        key: FlowKey,
        hash: u64,
        inherited: Option<Inherited>,
        initial: bool,
    ) -> Result<SessionId, DropReason> {
        if self.phase.is_draining() {
            return Err(DropReason::Draining);
        }
        // The oldest embryonic sessions make room, never an established one.
        if !self.room_for_session(a.listener) {
            return Err(DropReason::SessionLimit);
        }
        let route = &self.routes[a.listener];
        let backend = route.pick(key.as_bytes());
        if backend >= route.backends.len() {
            return Err(DropReason::NoBackend);
        }
        let inherited = inherited.filter(|h| h.backend == route.tags[backend]);
        let mut session = Session::new(a.listener, key, backend as u16, self.now_ms);
        // QUIC answers every Initial: a session that began with one and got
        // no reply within `reply_timeout` counts against its backend
        // (passive health).
        if initial {
            session.awaiting_since_ms = Some(self.now_ms);
        }
        let sid = self.sessions.insert(session);
        let opened = match inherited.and_then(|h| self.inherited_path(sid, a, h)) {
            Some(pid) => Ok(pid),
            None => self.open_path_making_room(sid, a.client, a.local_ip),
        };
        if let Err(reason) = opened {
            self.sessions.remove(sid);
            return Err(reason);
        }
        self.hint_port(sid, hash);
        self.sample_session(sid, None);
        self.counters.incr(Counter::SessionsCreated);
        let row = self.row_of(a.listener, backend as u16);
        self.counters
            .backend_add(row, BackendCounter::SessionsCreated, 1);
        Ok(sid)
    }

    /// Session `sid`'s first path on the port its flow had at a dead worker.
    fn inherited_path(&mut self, sid: SessionId, a: Arrival, h: Inherited) -> Option<PathId> {
        let s = self.sessions.get(sid)?;
        let (listener, backend, key) = (s.listener, s.backend, s.key);
        let route = &self.routes[listener];
        let sock = self.paths.inherited_slot(
            listener,
            backend,
            h.local,
            h.from,
            route.backends.len(),
            self.now_ms,
            route.reuse_delay_ms,
            &mut self.sockets,
        )?;
        let path = Path::new(
            listener,
            backend,
            sock,
            a.client,
            a.local_ip,
            key,
            self.now_ms,
        );
        // Its backend knew this 4-tuple: it cools when it closes, and is
        // trusted until its session's backend answers elsewhere.
        let path = Path {
            last_reply_ms: self.now_ms,
            answered: true,
            ..path
        };
        let pid = self.link_first(sid, path)?;
        self.counters.incr(Counter::PathsCreated);
        self.counters.incr(Counter::PathsInherited);
        Some(pid)
    }

    /// Records where session `sid` (whose entry `hash` is ours) has its
    /// first path, for whoever takes the flow over should this worker die.
    fn hint_port(&self, sid: SessionId, hash: u64) {
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        let here = self
            .paths
            .path(s.first_path)
            .and_then(|p| self.paths.sock(p.sock))
            .filter(|k| k.home == Home::Here);
        match here {
            Some(sock) => {
                let tag = self.routes[s.listener].tags[usize::from(s.backend)];
                self.owners.set_hint(hash, self.me, sock.local, tag);
            }
            None => self.owners.clear_hint(hash, self.me),
        }
    }

    /// The ownership-table hashes of session `sid`'s keys.
    pub(super) fn key_hashes(&self, sid: SessionId) -> Vec<u64> {
        self.sessions.get(sid).map_or_else(Vec::new, |s| {
            s.keys().map(|k| self.owner_hash(s.listener, k)).collect()
        })
    }

    /// Forwards on session `sid`'s path for the client of `a`.
    fn forward(&mut self, sid: SessionId, a: Arrival, len: usize, d: DatagramRef) {
        if let Some(to) = self.receiver_of_new_path(sid, a) {
            // A new client address while the session's transfer is in
            // flight: its path is opened where the session is going. The
            // receiver reads the offer first (one inbox, in order); if it
            // refused, it hands the datagram back, and the path opens here.
            self.hand_over(to, a, d, a.via.hops() + 1);
            return;
        }
        let (pid, moved) = match self.path_for(sid, a.client, a.local_ip) {
            Ok(found) => found,
            Err(reason) => {
                self.drop_datagram(reason);
                if let Some(sample) = self.sample_of(sid) {
                    sample.drops += 1;
                }
                return;
            }
        };
        let now = self.now_ms;
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        s.last_active_ms = now;
        // Arriving here directly ends any run of handoffs.
        if !matches!(a.via, Via::Handoff { .. }) {
            s.end_run();
        }
        let (listener, backend) = (s.listener, s.backend);
        let Some(p) = self.paths.path_mut(pid) else {
            return;
        };
        p.last_client_ms = now;
        if moved {
            // A relayed path's client moved (`follow`): its home re-points
            // its relay and then forwards this datagram, so no reply to it
            // can reach the old address.
            let p = p.clone();
            self.tell_home_moved(&p, d);
            self.counters.incr(Counter::HandoffOut);
        } else {
            let (sock, client, local_ip) = (p.sock, p.client, p.local_ip);
            let sent = self.push_forward(sock, listener, backend, (client, local_ip), d, len);
            let s = self.sessions.get_mut(sid);
            if let Some((sample, paths)) =
                s.and_then(|s| Some((s.sample.as_deref_mut()?, u32::from(s.path_count))))
            {
                match sent {
                    Some(bytes) => {
                        sample.forwarded.0 += 1;
                        sample.forwarded.1 += bytes as u64;
                    }
                    None => sample.drops += 1,
                }
                sample.client(client);
                sample.paths = sample.paths.max(paths);
            }
        }
        if let Via::Handoff { from, .. } = a.via {
            self.note_handoff(sid, from);
        }
    }

    /// The worker session `sid` is being transferred to, when `a` comes
    /// from a client address that has no path yet and straight from our
    /// socket (a datagram the receiver handed back opens its path here).
    fn receiver_of_new_path(&self, sid: SessionId, a: Arrival) -> Option<usize> {
        let s = self.sessions.get(sid)?;
        let offer = s.offer()?;
        let route = &self.routes[s.listener];
        if a.via.hops() > 0
            || route.follow
            || self.now_ms.saturating_sub(offer.since_ms) >= TRANSFER_TIMEOUT_MS
        {
            return None;
        }
        let mut pid = s.first_path;
        while let Some(p) = self.paths.path(pid) {
            if p.client == a.client {
                return None;
            }
            pid = p.next;
        }
        Some(usize::from(offer.to))
    }

    /// The path of session `sid` for `client`: its own (`path`), or the
    /// session's one path moved to it (`follow`), opening one if needed.
    /// True with it when the path moved and its socket's home, another
    /// worker, must hear of it before the datagram goes.
    fn path_for(
        &mut self,
        sid: SessionId,
        client: SocketAddr,
        local_ip: Option<IpAddr>,
    ) -> Result<(PathId, bool), DropReason> {
        let s = self.sessions.get(sid).ok_or(DropReason::Upstream)?;
        let route = &self.routes[s.listener];
        if route.follow && s.first_path != NONE {
            let pid = s.first_path;
            let p = self.paths.path_mut(pid).ok_or(DropReason::Upstream)?;
            let moved = p.client != client || (local_ip.is_some() && p.local_ip != local_ip);
            if moved {
                p.client = client;
                if local_ip.is_some() {
                    p.local_ip = local_ip;
                }
            }
            let sock = p.sock;
            let relayed = matches!(
                self.paths.sock(sock).map(|s| s.home),
                Some(Home::Borrowed(_))
            );
            return Ok((pid, moved && relayed));
        }
        let mut pid = s.first_path;
        while let Some(p) = self.paths.path(pid) {
            if p.client == client {
                return Ok((pid, false));
            }
            pid = p.next;
        }
        // A new client address: a path of its own, within its session's and
        // its source's rates of new paths, and never in the place of one its
        // backend answered.
        let full = usize::from(s.path_count) >= route.max_paths;
        let (listener, now) = (s.listener, self.now_ms);
        let (rate, burst) = (
            route.admission.paths_per_session,
            route.admission.paths_per_session_burst,
        );
        let s = self.sessions.get_mut(sid).ok_or(DropReason::Upstream)?;
        if !s.take_path_token(now, rate, burst) {
            return Err(DropReason::PathLimit);
        }
        if !self.routes[listener]
            .admission
            .new_paths
            .take(client.ip(), now)
        {
            return Err(DropReason::RateLimited);
        }
        if full && !self.evict_untrusted(sid) {
            return Err(DropReason::PathLimit);
        }
        self.open_path_making_room(sid, client, local_ip)
            .map(|pid| (pid, false))
    }

    /// A new path of session `sid` for `client`, first in its list.
    fn open_path(
        &mut self,
        sid: SessionId,
        client: SocketAddr,
        local_ip: Option<IpAddr>,
    ) -> Result<PathId, DropReason> {
        let s = self.sessions.get(sid).ok_or(DropReason::Upstream)?;
        let (listener, backend, key) = (s.listener, s.backend, s.key);
        let route = &self.routes[listener];
        let sock = self
            .paths
            .free_slot(listener, backend, &route.ipv4, &mut self.sockets)
            .map_err(|e| match e {
                OpenError::NoPort => DropReason::NoPort,
                OpenError::NoFd => DropReason::NoFd,
                OpenError::Other => DropReason::Upstream,
            })?;
        let path = Path::new(listener, backend, sock, client, local_ip, key, self.now_ms);
        let pid = self.link_first(sid, path).ok_or(DropReason::Upstream)?;
        self.counters.incr(Counter::PathsCreated);
        Ok(pid)
    }

    /// [`Router::open_path`], and when ports or descriptors run short, the
    /// oldest embryonic sessions give theirs back (at once: their backend
    /// never sent on them), never an established one.
    fn open_path_making_room(
        &mut self,
        sid: SessionId,
        client: SocketAddr,
        local_ip: Option<IpAddr>,
    ) -> Result<PathId, DropReason> {
        let mut opened = self.open_path(sid, client, local_ip);
        let (listener, backend) = self
            .sessions
            .get(sid)
            .map_or((0, 0), |s| (s.listener, s.backend));
        for _ in 0..MAX_EVICTIONS {
            if !matches!(opened, Err(DropReason::NoPort | DropReason::NoFd)) {
                break;
            }
            // One toward the same backend frees the slot this path needs.
            let victim = self
                .sessions
                .oldest_embryonic_where(listener, |s| s.backend == backend);
            match victim {
                Some(old) if old != sid => {
                    self.close_session(old);
                    self.counters.incr(Counter::SessionsEvicted);
                }
                _ => break,
            }
            opened = self.open_path(sid, client, local_ip);
        }
        opened
    }

    /// Inserts `path` as the first of session `sid`'s paths.
    pub(super) fn link_first(&mut self, sid: SessionId, mut path: Path) -> Option<PathId> {
        path.session = sid as u32;
        path.next = self.sessions.get(sid).map_or(NONE, |s| s.first_path);
        let pid = self.paths.insert(path)?;
        if let Some(s) = self.sessions.get_mut(sid) {
            s.first_path = pid;
            s.path_count += 1;
        }
        Some(pid)
    }

    /// Closes session `sid`'s least recently used path (it is at
    /// `max_paths`).
    /// Closes the least recently used of session `sid`'s paths that its
    /// backend has not answered lately (`trusted`): it is at `max_paths`.
    /// False when every path is trusted, unless the session may have one
    /// path only (`max_paths = 1`: a move replaces it, or a client that
    /// moved could never be answered at its new address).
    fn evict_untrusted(&mut self, sid: SessionId) -> bool {
        let Some(s) = self.sessions.get(sid) else {
            return false;
        };
        let mut newest_reply = 0;
        let mut pid = s.first_path;
        while let Some(p) = self.paths.path(pid) {
            newest_reply = newest_reply.max(p.last_reply_ms);
            pid = p.next;
        }
        let one = self.routes[s.listener].max_paths == 1;
        let mut oldest: Option<(u64, PathId)> = None;
        let mut pid = s.first_path;
        while let Some(p) = self.paths.path(pid) {
            if (one || !self.trusted(pid, newest_reply))
                && oldest.is_none_or(|(t, _)| p.last_active_ms() < t)
            {
                oldest = Some((p.last_active_ms(), pid));
            }
            pid = p.next;
        }
        let Some((_, pid)) = oldest else {
            return false;
        };
        self.close_path(pid);
        self.counters.incr(Counter::PathsEvicted);
        true
    }

    /// Closes a path: unlinks it from its session, cools its slot, and tells
    /// its socket's home when that is another worker.
    pub(super) fn close_path(&mut self, pid: PathId) {
        self.drop_path(pid, true);
    }

    /// [`Router::close_path`], telling the socket's home or not (not when
    /// the home said the path is closed).
    pub(super) fn drop_path(&mut self, pid: PathId, tell_home: bool) {
        let Some(p) = self.paths.path(pid) else {
            return;
        };
        let (sid, next, listener) = (p.session, p.next, p.listener);
        // The port hint may name this path: it names the session's first
        // path now, or nothing.
        let rehint = sid != NONE;
        if sid != NONE {
            if let Some(s) = self.sessions.get_mut(sid as usize) {
                s.path_count = s.path_count.saturating_sub(1);
                if s.first_path == pid {
                    s.first_path = next;
                } else {
                    let mut at = s.first_path;
                    while let Some(q) = self.paths.path(at) {
                        if q.next == pid {
                            break;
                        }
                        at = q.next;
                    }
                    if let Some(q) = self.paths.path_mut(at) {
                        q.next = next;
                    }
                }
            }
        }
        // A port whose backend never sent on it needs no cooling: no reply
        // of an old flow can reach a new one on it.
        let answered = self.paths.path(pid).is_some_and(|p| p.answered);
        let cool = match answered {
            true => self.routes.get(listener).map_or(0, |r| r.reuse_delay_ms),
            false => 0,
        };
        let Some(p) = self.paths.remove(pid, self.now_ms, cool) else {
            return;
        };
        // A heir must never take a 4-tuple that cooled and went to another
        // flow.
        if rehint {
            let sid = sid as usize;
            for hash in self.key_hashes(sid) {
                self.hint_port(sid, hash);
            }
        }
        let home = self.paths.sock(p.sock).map(|s| s.home);
        if let (Some(Home::Borrowed(home)), true) = (home, tell_home) {
            if let Some(path) = self.path_ref_of(&p) {
                let control = Control::PathClosed(path);
                self.control(usize::from(home.worker), p.listener, control, Vec::new());
            }
        }
    }

    /// Names path `p` across workers: its key, its socket's address, its
    /// backend's address.
    pub(super) fn path_ref_of(&self, p: &Path) -> Option<PathRef> {
        Some(PathRef {
            key: p.key,
            upstream: self.paths.sock(p.sock)?.local,
            backend: *self
                .routes
                .get(p.listener)?
                .backends
                .get(usize::from(p.backend))?,
        })
    }

    /// Asks the home of path `p`'s socket to relay its replies.
    pub(super) fn relay_request(&self, p: &Path) -> Option<Control> {
        Some(Control::Relay {
            path: self.path_ref_of(p)?,
            client: p.client,
            local_ip: p.local_ip,
        })
    }

    /// Names path `pid` across workers ([`Router::path_ref_of`]).
    pub(super) fn path_ref(&self, pid: PathId) -> Option<PathRef> {
        self.path_ref_of(self.paths.path(pid)?)
    }

    /// Forwards `d` (`len` bytes) on `sock` to backend `backend` of
    /// `listener`, for the client `from.0` that reached `from.1` (wildcard
    /// listeners): after its PROXY v2 header where the listener sends one,
    /// unless the header would take past its path's MTU a datagram that
    /// fits it (then dropped; one too big already goes as it would without
    /// a header). The bytes it sends; `None`: dropped.
    pub(super) fn push_forward(
        &mut self,
        sock: SockId,
        listener: usize,
        backend: u16,
        from: (SocketAddr, Option<IpAddr>),
        d: DatagramRef,
        len: usize,
    ) -> Option<usize> {
        let route = &self.routes[listener];
        let b = usize::from(backend);
        let to = route.backends[b];
        let (prefix, sent) = match &route.proxy_v2 {
            None => (None, len),
            Some(p) => {
                let (client, local_ip) = from;
                let reached = SocketAddr::new(local_ip.unwrap_or(p.local.ip()), p.local.port());
                let header = udpshard_shared::proxy_v2::Header::proxy(client, reached);
                let sent = header.as_bytes().len() + len;
                let room = p.room.get(b).copied().unwrap_or(usize::MAX);
                if sent > room && len <= room {
                    self.drop_datagram(DropReason::ProxyMtu);
                    return None;
                }
                self.prefixes.push(header);
                (Some(self.prefixes.len() as u32 - 1), sent)
            }
        };
        self.actions.push(Action::Forward {
            sock,
            to,
            datagram: d,
            prefix,
        });
        self.count_forward(listener, backend, sent);
        Some(sent)
    }

    /// Session `sid`'s sample, where `session_log` samples it.
    pub(super) fn sample_of(&mut self, sid: SessionId) -> Option<&mut crate::session::Sample> {
        self.sessions.get_mut(sid)?.sample.as_deref_mut()
    }

    /// A forward of `len` bytes to backend `backend` of `listener`.
    pub(super) fn count_forward(&mut self, listener: usize, backend: u16, len: usize) {
        self.counters.incr(Counter::TxPackets);
        self.counters.add(Counter::TxBytes, len as u64);
        let row = self.row_of(listener, backend);
        self.counters.backend_add(row, BackendCounter::TxPackets, 1);
        self.counters
            .backend_add(row, BackendCounter::TxBytes, len as u64);
    }

    /// A `Forward` of `len` bytes on `sock` to `to` could not be sent (in
    /// the flush that made it: its counts are taken back before anything
    /// is published).
    pub fn forward_failed(&mut self, sock: SockId, to: SocketAddr, len: usize) {
        self.counters.sub(Counter::TxPackets, 1);
        self.counters.sub(Counter::TxBytes, len as u64);
        self.drop_datagram(DropReason::Upstream);
        let row = self.row_toward(sock, to);
        self.counters.backend_sub(row, BackendCounter::TxPackets, 1);
        self.counters
            .backend_sub(row, BackendCounter::TxBytes, len as u64);
        self.counters
            .backend_add(row, BackendCounter::SendErrors, 1);
    }

    /// Backend `backend` of `listener`'s row of counters.
    pub(super) fn row_of(&self, listener: usize, backend: u16) -> Option<u16> {
        self.routes.get(listener)?.row(usize::from(backend))
    }

    /// The row of backend `to` of the listener whose socket `sock` is.
    fn row_toward(&self, sock: SockId, to: SocketAddr) -> Option<u16> {
        let listener = self.paths.sock(sock)?.listener;
        let b = self.routes.get(listener)?.backend_of(to)?;
        self.row_of(listener, b)
    }

    /// In follow mode a relayed path's client moved: its home re-points the
    /// relay, then forwards `d` (the datagram that moved it).
    fn tell_home_moved(&mut self, p: &Path, d: DatagramRef) {
        let Some(sock) = self.paths.sock(p.sock) else {
            return;
        };
        if let (Home::Borrowed(home), Some(path)) = (sock.home, self.path_ref_of(p)) {
            let control = Control::PathMoved {
                path,
                client: p.client,
                local_ip: p.local_ip,
            };
            let frame = control.encode(self.me, self.routes[p.listener].ident);
            self.actions.push(Action::Control {
                to: usize::from(home.worker),
                frame,
                socks: Vec::new(),
                payload: Some(d),
            });
        }
    }

    fn hand_over(&mut self, to: usize, a: Arrival, d: DatagramRef, hops: u8) {
        let header = Header {
            hops,
            listener: self.routes[a.listener].ident,
            from: self.id as u16,
            client: a.client,
            local_ip: a.local_ip,
        };
        self.actions.push(Action::Handoff {
            to,
            header: header.encode(),
            datagram: d,
        });
        self.counters.incr(Counter::HandoffOut);
    }

    /// A `Handoff` could not be delivered, in the flush that made it (its
    /// `handoff_out` is taken back before anything is published).
    pub fn handoff_failed(&mut self) {
        self.counters.sub(Counter::HandoffOut, 1);
        self.drop_datagram(DropReason::Handoff);
    }

    /// A frame carrying a client datagram waits behind a full inbox, in the
    /// flush that made it: the datagram is not handed on yet. It stays
    /// taken-in and unsettled (a kill meanwhile books it as worker_lost)
    /// until [`Router::handoff_queue_settled`] says what became of it, so
    /// no published count goes back.
    pub fn handoff_queued(&mut self) {
        self.counters.sub(Counter::HandoffOut, 1);
    }

    /// Of the datagrams queued behind full inboxes, `sent` went and `lost`
    /// were given up.
    pub fn handoff_queue_settled(&mut self, sent: u64, lost: u64) {
        self.counters.add(Counter::HandoffOut, sent);
        for _ in 0..lost {
            self.drop_datagram(DropReason::Handoff);
        }
    }

    pub(super) fn control(
        &mut self,
        to: usize,
        listener: usize,
        control: Control,
        socks: Vec<SockId>,
    ) {
        let frame = control.encode(self.me, self.routes[listener].ident);
        self.actions.push(Action::Control {
            to,
            frame,
            socks,
            payload: None,
        });
    }

    /// A control frame for a listener by its identity (one we may not have).
    fn control_to(&mut self, to: usize, ident: u64, control: Control) {
        let frame = control.encode(self.me, ident);
        let socks = Vec::new();
        self.actions.push(Action::Control {
            to,
            frame,
            socks,
            payload: None,
        });
    }

    /// A datagram from backend `from` on upstream socket `sock` (with the
    /// socket's lifetime drop count when the kernel attached one).
    pub fn backend(
        &mut self,
        now_ms: u64,
        sock: SockId,
        from: SocketAddr,
        bytes: &[u8],
        d: DatagramRef,
        drops: Option<u32>,
    ) {
        self.now_ms = now_ms;
        self.counters.incr(Counter::RepliesIn);
        if let Some(total) = drops {
            self.note_socket_drops(sock, total);
        }
        let Some(listener) = self.paths.sock(sock).map(|s| s.listener) else {
            self.drop_datagram(DropReason::Stray);
            return;
        };
        // A socket of a listener a reload removed has no route: a stray.
        let Some((b, pid)) = self
            .routes
            .get(listener)
            .and_then(|r| r.backend_of(from))
            .and_then(|b| Some((b, self.paths.on_slot(sock, b)?)))
        else {
            self.drop_datagram(DropReason::Stray);
            return;
        };
        let row = self.row_of(listener, b);
        self.counters.backend_add(row, BackendCounter::Replies, 1);
        let at = self.epoch_ms + now_ms;
        self.counters
            .backend_set(row, BackendCounter::LastReplyMs, at);
        let route = &self.routes[listener];
        let learns = route.learns_server_cids;
        let Some(p) = self.paths.path_mut(pid) else {
            return;
        };
        p.last_reply_ms = now_ms;
        p.answered = true;
        let (session, client, local_ip) = (p.session, p.client, p.local_ip);
        // Learn the server's connection ID before the client can answer
        // with it: a reply to this reply may reach another worker at once.
        if learns {
            if let Some(scid) = quic_long_scid(bytes) {
                self.learn_alias(pid, scid);
            }
        }
        if session == NONE {
            self.relay_activity(pid);
        } else if let Some(s) = self.sessions.get_mut(session as usize) {
            s.last_active_ms = now_ms;
            if let Some(sample) = s.sample.as_deref_mut() {
                sample.replied.0 += 1;
                sample.replied.1 += bytes.len() as u64;
            }
            if s.awaiting_since_ms.take().is_some() {
                self.counters.backend_add(row, BackendCounter::Answered, 1);
            }
            self.established(session as usize);
        }
        self.actions.push(Action::Reply {
            listener,
            to: client,
            from_ip: local_ip,
            datagram: d,
        });
        self.counters.incr(Counter::RepliesOut);
    }

    /// A `Reply` could not be sent.
    pub fn reply_failed(&mut self) {
        self.counters.sub(Counter::RepliesOut, 1);
        self.drop_datagram(DropReason::Reply);
    }

    /// Counts an upstream socket's kernel drops beyond those already counted
    /// (`total` is the socket's lifetime count).
    pub fn note_socket_drops(&mut self, sock: SockId, total: u32) {
        if let Some(s) = self.paths.sock_mut(sock) {
            let new = total.wrapping_sub(s.drops_seen);
            s.drops_seen = total;
            self.counters
                .add(Counter::DropUpstreamSocket, u64::from(new));
        }
    }

    /// The kernel reported an error for a datagram `sock` sent to `to`
    /// (ICMP, read from the socket's error queue): `unreachable` for port,
    /// host or network unreachable, else another send error.
    pub fn upstream_error(&mut self, sock: SockId, to: SocketAddr, unreachable: bool) {
        let row = self.row_toward(sock, to);
        let c = if unreachable {
            BackendCounter::Unreachable
        } else {
            BackendCounter::SendErrors
        };
        self.counters.backend_add(row, c, 1);
    }

    /// The server chose `scid` for the connection on path `pid`: the
    /// client's later datagrams carry it, so they must find the session.
    fn learn_alias(&mut self, pid: PathId, scid: FlowKey) {
        let Some(p) = self.paths.path(pid) else {
            return;
        };
        let (listener, key, session) = (p.listener, p.key, p.session);
        if scid == key {
            return;
        }
        let hash = self.owner_hash(listener, &scid);
        if session != NONE {
            let sid = session as usize;
            if self.sessions.lookup(listener, &scid).is_some() {
                return;
            }
            // Never over a live owner's: the ID is another session's.
            match self.owners.claim(hash, self.me) {
                Claim::Mine if self.sessions.add_alias(sid, scid) => self.hint_port(sid, hash),
                Claim::Mine => self.owners.release(hash, self.me),
                Claim::Full => {
                    self.sessions.add_alias(sid, scid);
                }
                Claim::Taken(_) => {}
            }
            return;
        }
        // A relay: the session's owner is elsewhere. Point the alias at it
        // now, then tell it (once: the ownership table says it is done).
        let owner_hash = self.owner_hash(listener, &key);
        let Some(owner) = self.owners.lookup(owner_hash).filter(|o| self.live(*o)) else {
            return;
        };
        match self.owners.lookup(hash) {
            Some(o) if o == owner => return,
            // Never over a live owner's: the ID is another session's.
            Some(o) if self.live(o) => return,
            _ => {}
        }
        self.owners.assign(hash, owner);
        self.control(
            usize::from(owner.worker),
            listener,
            Control::AliasLearned { key, alias: scid },
            Vec::new(),
        );
    }

    /// Replies flow on relay `pid`: tell its session's owner, at most a few
    /// times per `path_idle`, so it does not close the path as idle.
    fn relay_activity(&mut self, pid: PathId) {
        let now = self.now_ms;
        let Some(p) = self.paths.path(pid) else {
            return;
        };
        let route = &self.routes[p.listener];
        if now < p.reported_ms + route.path_idle_ms / 4 {
            return;
        }
        let (listener, key) = (p.listener, p.key);
        let Some(path) = self.path_ref(pid) else {
            return;
        };
        let owner = self
            .owners
            .lookup(self.owner_hash(listener, &key))
            .filter(|o| self.live(*o) && *o != self.me);
        if let Some(p) = self.paths.path_mut(pid) {
            p.reported_ms = now;
        }
        if let Some(owner) = owner {
            self.control(
                usize::from(owner.worker),
                listener,
                Control::Activity(path),
                Vec::new(),
            );
        }
    }

    /// A frame from another worker's handoff, with `fds` descriptors beside
    /// it. `payload(at)` gives the shell's ref to the frame's bytes from
    /// offset `at` on (a carried datagram).
    pub fn frame(
        &mut self,
        now_ms: u64,
        frame: &[u8],
        fds: usize,
        payload: &mut dyn FnMut(usize) -> DatagramRef,
    ) -> Outcome {
        self.now_ms = now_ms;
        let decoded = match Frame::decode(frame) {
            Ok(f) => f,
            Err(_) => {
                self.counters.incr(Counter::BadFrames);
                return Outcome::Done;
            }
        };
        match decoded {
            Frame::Datagram {
                header,
                payload: bytes,
            } => {
                let Some(listener) = self.listener_of(header.listener) else {
                    // A listener a reload removed: nothing to deliver to.
                    self.counters.incr(Counter::HandoffIn);
                    self.drop_datagram(DropReason::Handoff);
                    return Outcome::Done;
                };
                let a = Arrival {
                    listener,
                    client: header.client,
                    local_ip: header.local_ip,
                    via: Via::Handoff {
                        from: header.from,
                        hops: header.hops,
                    },
                };
                self.client(now_ms, a, bytes, payload(HEADER_LEN))
            }
            Frame::Control {
                from,
                generation,
                listener,
                control,
                payload: carried,
                payload_at,
            } => {
                let Some(listener) = self.listener_of(listener) else {
                    // A listener we do not have (a reload reached one of us
                    // first): an offer is refused, so the session stays.
                    // A relay handed over is answered all the same.
                    match control {
                        Control::Transfer(t) => {
                            let done = Control::TransferDone {
                                key: t.key,
                                accepted: false,
                            };
                            self.control_to(usize::from(from), listener, done);
                        }
                        Control::Relay { path, .. } if fds > 0 => {
                            let taken = Control::RelayTaken(path);
                            self.control_to(usize::from(from), listener, taken);
                        }
                        _ => {}
                    }
                    return Outcome::Done;
                };
                match control {
                    Control::Transfer(t) => self.transfer_in(from, generation, listener, t, fds),
                    Control::TransferDone { key, accepted } => {
                        self.transfer_done(from, listener, key, accepted)
                    }
                    Control::PathClosed(path) => self.path_closed(listener, path),
                    Control::PathMoved {
                        path,
                        client,
                        local_ip,
                    } => {
                        let carried =
                            (!carried.is_empty()).then(|| (payload(payload_at), carried.len()));
                        self.relay_moved(listener, path, client, local_ip, carried)
                    }
                    Control::AliasLearned { key, alias } => {
                        if let Some(sid) = self.sessions.lookup(listener, &key) {
                            self.sessions.add_alias(sid, alias);
                        }
                    }
                    Control::Activity(path) => self.relayed_activity(listener, path),
                    Control::Relay {
                        path,
                        client,
                        local_ip,
                    } => {
                        let ask = RelayAsk {
                            from,
                            listener,
                            path,
                            client,
                            local_ip,
                        };
                        self.relay_in(ask, fds)
                    }
                    Control::RelayTaken(_) => self.relay_taken(from),
                }
                Outcome::Done
            }
        }
    }

    pub(super) fn listener_of(&self, ident: u64) -> Option<usize> {
        self.routes.iter().position(|r| r.ident == ident)
    }
}
