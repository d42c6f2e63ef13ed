//! What happens to a datagram, top to bottom. The event loop calls in here
//! with bytes it read; everything here is routing, sessions, ownership and
//! counting.
//!
//! Client -> backend ([`DataPath::client_datagram`]):
//! 1. Dissect the flow key (malformed: count, drop).
//! 2. A local session has it: forward on its upstream socket. If the
//!    datagram was handed over by another worker several times in a row,
//!    the kernel now delivers the flow there: move the session there.
//! 3. Else ask the ownership table. A live other worker owns it: hand the
//!    datagram over. A handed-over datagram is handed on only when its
//!    session just moved away from here (at most `MAX_HOPS` in all).
//! 4. Else claim it, pick the backend (QUIC-LB server ID, else Maglev),
//!    open a connected upstream socket, create the session, forward.
//!
//! Backend -> client ([`DataPath::upstream_readable`]): read the upstream
//! socket, learn a QUIC server's chosen connection ID from its long-header
//! packets (an alias of the session), send from the listener socket to the
//! client's current address.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use quinn_udp::{Transmit, UdpSockRef};
use udpshard_shared::flow::quic_long_scid;
use udpshard_shared::handoff::{Header, Kind, Transfer, MAX_HOPS};
use udpshard_shared::owners::{Claim, Owner};
use udpshard_shared::stats::{Counter, StatsRegion};
use udpshard_shared::{stable_hash, FlowKey};

use crate::counters::Counters;
use crate::handoff::Handoff;
use crate::listener::Listener;
use crate::session::{Session, SessionId, SessionTable};
use crate::sockio;

/// Session ids map to poll tokens above the listeners' and control's.
pub const UPSTREAM_TOKEN_BASE: usize = 1 << 20;

/// Replies read from one upstream socket per wakeup before yielding to the
/// rest of the loop.
const REPLY_BUDGET: usize = 64;

/// Handoff frames read per wakeup.
const INBOX_BUDGET: usize = 256;

/// Consecutive datagrams of a session handed over by the same worker before
/// the session moves there.
const TRANSFER_AFTER: u8 = 3;

/// The largest UDP payload: nothing is ever truncated.
pub const MAX_DATAGRAM: usize = 65_536;

/// Where a client datagram came from and how it reached this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub listener: usize,
    pub client: SocketAddr,
    /// The local address it was sent to (wildcard listeners only).
    pub local_ip: Option<IpAddr>,
    pub via: Via,
}

/// How a client datagram reached this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Read from this worker's listener socket.
    Socket,
    /// Handed over by another worker that believed we own its session,
    /// after `hops` handoffs.
    Handoff { from: u16, hops: u8 },
}

pub struct DataPath {
    pub listeners: Vec<Listener>,
    pub sessions: SessionTable<UdpSocket>,
    pub counters: Counters,
    /// Coarse monotonic clock (ms), advanced once per loop iteration.
    pub now_ms: u64,
    /// The stats region: this worker's slot and the ownership table.
    pub region: StatsRegion,
    pub id: usize,
    pub me: Owner,
    pub handoff: Handoff,
    /// Draining: live sessions are served, no new ones are made.
    pub draining: bool,
    /// Sessions whose upstream socket still held replies when their read
    /// budget ran out: edge-triggered polling will not report them again,
    /// so the loop comes back to them.
    pub pending_replies: Vec<SessionId>,
    reply_buf: Vec<u8>,
    last_warning_ms: u64,
}

/// The ownership table's key: the flow key within its listener (named by
/// its stable identity, so a reload that renumbers listeners keeps entries).
fn owner_hash(listener_ident: u64, key: &FlowKey) -> u64 {
    stable_hash(key.as_bytes()) ^ listener_ident.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl DataPath {
    pub fn new(
        listeners: Vec<Listener>,
        limits: Vec<(usize, u64)>,
        region: StatsRegion,
        id: usize,
        handoff: Handoff,
        counters: Counters,
    ) -> DataPath {
        let generation = region.slot(id).map_or(0, |s| s.get(Counter::Generation));
        DataPath {
            listeners,
            sessions: SessionTable::new(limits),
            counters,
            now_ms: 0,
            region,
            id,
            me: Owner::new(id, generation),
            handoff,
            draining: false,
            pending_replies: Vec::new(),
            reply_buf: vec![0; MAX_DATAGRAM],
            last_warning_ms: 0,
        }
    }

    /// A client datagram that arrived as `from` says (read from a listener
    /// socket, or handed over by another worker).
    pub fn client_datagram(&mut self, registry: &Registry, mut from: Arrival, datagram: &[u8]) {
        match from.via {
            Via::Socket => {
                self.counters.incr(Counter::RxPackets);
                self.counters.add(Counter::RxBytes, datagram.len() as u64);
            }
            Via::Handoff { .. } => self.counters.incr(Counter::HandoffIn),
        }
        let listener = &self.listeners[from.listener];
        let Ok(key) = listener.dissector.flow_key(datagram, from.client) else {
            self.counters.incr(Counter::DropMalformed);
            return;
        };
        if !listener.wildcard {
            from.local_ip = None;
        }
        let id = match self.sessions.lookup(from.listener, &key) {
            Some(id) => id,
            None => match self.find_or_open(registry, from, key, datagram) {
                Some(id) => id,
                None => return,
            },
        };
        self.forward(id, from, datagram);
        if let Via::Handoff { from: worker, .. } = from.via {
            self.note_handoff(registry, id, worker);
        }
    }

    /// A local miss: hand the datagram to its owner, or take the flow.
    fn find_or_open(
        &mut self,
        registry: &Registry,
        from: Arrival,
        key: FlowKey,
        datagram: &[u8],
    ) -> Option<SessionId> {
        let l = from.listener;
        let hash = owner_hash(self.listeners[l].ident, &key);
        let hops = match from.via {
            Via::Socket => 0,
            Via::Handoff { hops, .. } => hops,
        };
        if hops < MAX_HOPS {
            match self.region.owners().lookup(hash) {
                Some(owner) if owner != self.me && self.region.is_live(owner) => {
                    self.hand_over(owner.worker as usize, from, datagram, hops + 1);
                    return None;
                }
                Some(owner) if owner == self.me && from.via == Via::Socket => {
                    // Ours but unknown here: a session transfer to us is
                    // on its way. Read the inbox now rather than open a
                    // second session for the flow.
                    self.read_inbox(registry);
                    if let Some(id) = self.sessions.lookup(l, &key) {
                        return Some(id);
                    }
                }
                _ => {}
            }
        }
        let region = &self.region;
        match region.owners().claim(hash, self.me, |o| region.is_live(o)) {
            Claim::Mine => {}
            // Claimed by another worker an instant ago.
            Claim::Taken(owner) if hops < MAX_HOPS => {
                self.hand_over(owner.worker as usize, from, datagram, hops + 1);
                return None;
            }
            // Out of hops: it is ours now.
            Claim::Taken(_) => {
                region.owners().assign(hash, self.me);
            }
            Claim::Full => self.counters.incr(Counter::OwnersFull),
        }
        let id = self.open_session(registry, l, key, from.client, from.local_ip);
        if id.is_none() {
            self.region.owners().release(hash, self.me);
        }
        id
    }

    fn forward(&mut self, id: SessionId, from: Arrival, datagram: &[u8]) {
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        // A client that changed address (NAT rebinding, migration) gets
        // replies at the new one from now on.
        session.client = from.client;
        if from.local_ip.is_some() {
            session.local_ip = from.local_ip;
        }
        // Arriving here directly ends any run of handoffs.
        if from.via == Via::Socket {
            session.handoff_streak = (0, 0);
        }
        session.last_active_ms = self.now_ms;
        match session.upstream.send(datagram) {
            Ok(_) => {
                self.counters.incr(Counter::TxPackets);
                self.counters.add(Counter::TxBytes, datagram.len() as u64);
            }
            // Send buffer full, or the backend's port refused an earlier one.
            Err(_) => self.counters.incr(Counter::DropUpstream),
        }
    }

    fn hand_over(&mut self, to: usize, from: Arrival, datagram: &[u8], hops: u8) {
        let header = Header {
            kind: Kind::Datagram,
            hops,
            listener: self.listeners[from.listener].ident,
            from: self.id as u16,
            client: from.client,
            local_ip: from.local_ip,
        };
        match self.handoff.send_datagram(to, &header, datagram) {
            Ok(()) => self.counters.incr(Counter::HandoffOut),
            Err(_) => self.counters.incr(Counter::DropHandoff),
        }
    }

    /// Counts a handed-over datagram against its session; a flow the kernel
    /// keeps delivering to another worker moves there.
    fn note_handoff(&mut self, registry: &Registry, id: SessionId, from: u16) {
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        let (worker, count) = session.handoff_streak;
        session.handoff_streak = if worker == from {
            (from, count.saturating_add(1))
        } else {
            (from, 1)
        };
        if session.handoff_streak.1 >= TRANSFER_AFTER && usize::from(from) != self.id {
            self.transfer(registry, id, usize::from(from));
        }
    }

    /// Moves session `id` and its upstream socket to worker `to`.
    fn transfer(&mut self, registry: &Registry, id: SessionId, to: usize) {
        let Some(s) = self.sessions.get_mut(id) else {
            return;
        };
        let Some(to_slot) = self.region.slot(to) else {
            return;
        };
        let to_owner = Owner::new(to, to_slot.get(Counter::Generation));
        // Not to a worker that is leaving (retiring, or gone since).
        if !self.region.is_live(to_owner) {
            s.handoff_streak = (0, 0);
            return;
        }
        let header = Header {
            kind: Kind::Transfer,
            hops: 0,
            listener: self.listeners[s.listener].ident,
            from: self.id as u16,
            client: s.client,
            local_ip: s.local_ip,
        };
        let state = Transfer {
            key: s.key,
            aliases: s.aliases.clone(),
            backend: s.backend,
            upstream_drops_seen: s.upstream_drops_seen,
        };
        let fd = s.upstream.as_raw_fd();
        if self.handoff.send_transfer(to, &header, &state, fd).is_err() {
            // The flow stays here, still served through handoffs.
            s.handoff_streak = (0, 0);
            return;
        }
        let listener = s.listener;
        for key in std::iter::once(&state.key).chain(&state.aliases) {
            self.region
                .owners()
                .assign(owner_hash(self.listeners[listener].ident, key), to_owner);
        }
        let _ = registry.deregister(&mut SourceFd(&fd));
        // Our copy of the socket closes here; the receiver holds its own.
        self.sessions.remove(id);
        self.counters.incr(Counter::TransfersOut);
    }

    /// Reads the handoff inbox: datagrams to process as our own, sessions
    /// to adopt.
    pub fn read_inbox(&mut self, registry: &Registry) {
        for _ in 0..INBOX_BUDGET {
            let (len, fd) = match self.handoff.recv() {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(e) => {
                    self.warn_rate_limited(format_args!("handoff inbox: {e}"));
                    return;
                }
            };
            // The frame moves out of the handoff buffer so the datapath
            // can borrow itself mutably; swapped back below, no allocation.
            let frame = std::mem::take(&mut self.handoff.frame);
            let decoded = Header::decode(&frame[..len]).map(|(h, body)| {
                (
                    self.listeners.iter().position(|l| l.ident == h.listener),
                    h,
                    body,
                )
            });
            match decoded {
                // A listener removed by a reload: nothing to deliver to.
                Ok((None, _, _)) => self.counters.incr(Counter::DropHandoff),
                Ok((Some(l), h, body)) => match h.kind {
                    Kind::Datagram => {
                        let from = Arrival {
                            listener: l,
                            client: h.client,
                            local_ip: h.local_ip,
                            via: Via::Handoff {
                                from: h.from,
                                hops: h.hops,
                            },
                        };
                        self.client_datagram(registry, from, body)
                    }
                    Kind::Transfer => match (Transfer::decode(body), fd) {
                        (Ok(t), Some(fd)) => self.adopt(registry, l, &h, t, fd),
                        _ => self.warn_rate_limited(format_args!(
                            "malformed session transfer from worker {}",
                            h.from
                        )),
                    },
                },
                _ => self.warn_rate_limited(format_args!("malformed handoff frame")),
            }
            self.handoff.frame = frame;
        }
    }

    /// Takes over a session another worker sent us.
    fn adopt(&mut self, registry: &Registry, l: usize, h: &Header, t: Transfer, fd: OwnedFd) {
        if self.sessions.lookup(l, &t.key).is_some() {
            // We opened our own session for this flow meanwhile: keep it.
            return;
        }
        let upstream = UdpSocket::from(fd);
        let raw = upstream.as_raw_fd();
        let id = self.sessions.insert(Session {
            listener: l,
            key: t.key,
            client: h.client,
            local_ip: h.local_ip,
            upstream,
            last_active_ms: self.now_ms,
            upstream_drops_seen: t.upstream_drops_seen,
            reply_burst: false,
            backend: t.backend,
            aliases: t.aliases,
            handoff_streak: (0, 0),
        });
        if registry
            .register(
                &mut SourceFd(&raw),
                Token(UPSTREAM_TOKEN_BASE + id),
                Interest::READABLE,
            )
            .is_err()
        {
            self.sessions.remove(id);
            return;
        }
        if let Some(s) = self.sessions.get_mut(id) {
            for key in std::iter::once(&s.key).chain(&s.aliases) {
                self.region
                    .owners()
                    .assign(owner_hash(self.listeners[l].ident, key), self.me);
            }
        }
        self.counters.incr(Counter::TransfersIn);
        self.counters.incr(Counter::SessionsCreated);
    }

    fn open_session(
        &mut self,
        registry: &Registry,
        l: usize,
        key: FlowKey,
        client: SocketAddr,
        local_ip: Option<IpAddr>,
    ) -> Option<SessionId> {
        if self.draining {
            self.counters.incr(Counter::DropDraining);
            return None;
        }
        if self.sessions.admit(l).is_err() {
            self.counters.incr(Counter::DropSessionLimit);
            return None;
        }
        let listener = &self.listeners[l];
        let backend = listener.route(key.as_bytes());
        let Some(&backend_addr) = listener.backends.get(backend) else {
            self.counters.incr(Counter::DropNoBackend);
            return None;
        };
        let upstream = match sockio::connected_upstream(backend_addr) {
            Ok(s) => s,
            Err(e) => {
                let name = listener.name.clone();
                self.warn_rate_limited(format_args!(
                    "listener {name}: cannot open an upstream socket to {backend_addr}: {e}"
                ));
                self.counters.incr(Counter::DropUpstream);
                return None;
            }
        };
        let fd = upstream.as_raw_fd();
        let id = self.sessions.insert(Session {
            listener: l,
            key,
            client,
            local_ip,
            upstream,
            last_active_ms: self.now_ms,
            upstream_drops_seen: 0,
            reply_burst: false,
            backend: backend as u16,
            aliases: Vec::new(),
            handoff_streak: (0, 0),
        });
        if let Err(e) = registry.register(
            &mut SourceFd(&fd),
            Token(UPSTREAM_TOKEN_BASE + id),
            Interest::READABLE,
        ) {
            self.warn_rate_limited(format_args!("cannot poll an upstream socket: {e}"));
            self.sessions.remove(id);
            self.counters.incr(Counter::DropUpstream);
            return None;
        }
        self.counters.incr(Counter::SessionsCreated);
        Some(id)
    }

    /// The upstream socket of session `id` is readable: relay its replies.
    pub fn upstream_readable(&mut self, id: SessionId) {
        let mut drained = false;
        let mut learned = false;
        for _ in 0..REPLY_BUDGET {
            let Some(session) = self.sessions.get_mut(id) else {
                return;
            };
            let len =
                match sockio::recv_with_drops(session.upstream.as_raw_fd(), &mut self.reply_buf) {
                    Ok((len, drops)) => {
                        if let Some(total) = drops {
                            note_upstream_drops(&mut self.counters, session, total);
                        }
                        len
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    // An ICMP error for an earlier datagram (backend port
                    // closed): already counted as sent; nothing to relay.
                    Err(_) => continue,
                };
            self.counters.incr(Counter::RepliesIn);
            session.last_active_ms = self.now_ms;
            let (l, client, local_ip) = (session.listener, session.client, session.local_ip);
            // Learn the server's connection ID before the client can answer
            // with it: a reply to this reply may reach another worker at once.
            if !learned && self.listeners[l].learns_server_cids {
                let scid = quic_long_scid(&self.reply_buf[..len])
                    .filter(|scid| *scid != session.key && !session.aliases.contains(scid));
                if let Some(scid) = scid {
                    learned = true;
                    self.learn_alias(id, scid);
                }
            }
            let listener = &self.listeners[l];
            let transmit = Transmit {
                destination: client,
                ecn: None,
                contents: &self.reply_buf[..len],
                segment_size: None,
                src_ip: local_ip,
            };
            match listener
                .io
                .try_send(UdpSockRef::from(&listener.socket), &transmit)
            {
                Ok(()) => self.counters.incr(Counter::RepliesOut),
                Err(_) => self.counters.incr(Counter::DropReply),
            }
        }
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        if !drained {
            session.reply_burst = true;
            self.pending_replies.push(id);
        } else if session.reply_burst {
            session.reply_burst = false;
            if let Ok(total) = sockio::socket_drops(session.upstream.as_raw_fd()) {
                note_upstream_drops(&mut self.counters, session, total);
            }
        }
    }

    /// The server chose `scid` for this connection: the client's later
    /// datagrams carry it, so it finds this session too, here or through
    /// the ownership table.
    fn learn_alias(&mut self, id: SessionId, scid: FlowKey) {
        if !self.sessions.add_alias(id, scid) {
            return;
        }
        if let Some(s) = self.sessions.get_mut(id) {
            let region = &self.region;
            let _ = region.owners().claim(
                owner_hash(self.listeners[s.listener].ident, &scid),
                self.me,
                |o| region.is_live(o),
            );
        }
    }

    /// Periodic work: expire idle sessions (a slice of the table per tick)
    /// and read the kernel's drop counts on the listener sockets.
    pub fn tick(&mut self, registry: &Registry, sweep_budget: usize) {
        let counters = &mut self.counters;
        let (region, me, listeners) = (&self.region, self.me, &self.listeners);
        self.sessions
            .sweep(self.now_ms, sweep_budget, |_, session| {
                for key in std::iter::once(&session.key).chain(&session.aliases) {
                    region
                        .owners()
                        .release(owner_hash(listeners[session.listener].ident, key), me);
                }
                close_upstream(registry, counters, session);
                counters.incr(Counter::SessionsExpired);
            });
        let mut socket_drops = 0u64;
        for l in &self.listeners {
            socket_drops += sockio::socket_drops(l.socket.as_raw_fd()).map_or(0, u64::from);
        }
        self.counters.set(Counter::DropSocket, socket_drops);
        self.counters
            .set(Counter::SessionsActive, self.sessions.len() as u64);
    }

    /// Applies a reload: `listeners` replace the old ones (`map[j]` is old
    /// listener j's new index). Live sessions keep their backend when it is
    /// still listed; a session whose backend was removed is re-routed (its
    /// upstream socket reconnects, so its port, and the flow, survive).
    /// `old[j]` is old listener j's (identity, backends).
    pub fn reconfigure(
        &mut self,
        registry: &Registry,
        listeners: Vec<Listener>,
        old: &[(u64, Vec<SocketAddr>)],
        map: &[Option<usize>],
        limits: Vec<(usize, u64)>,
    ) {
        self.listeners = listeners;
        let counters = &mut self.counters;
        let (region, me) = (&self.region, self.me);
        self.sessions.remap(map, limits, |session| {
            let ident = old[session.listener].0;
            for key in std::iter::once(&session.key).chain(&session.aliases) {
                region.owners().release(owner_hash(ident, key), me);
            }
            close_upstream(registry, counters, session);
        });
        for (_, s) in self.sessions.iter_mut() {
            // Sessions were renumbered to the new listener order; their
            // backend index still points into the old list.
            let old_listener = map.iter().position(|m| *m == Some(s.listener));
            let old_addr = old_listener.and_then(|j| old[j].1.get(usize::from(s.backend)).copied());
            let listener = &self.listeners[s.listener];
            if let Some(i) = old_addr.and_then(|a| listener.backends.iter().position(|b| *b == a)) {
                s.backend = i as u16;
                continue;
            }
            let backend = listener.route(s.key.as_bytes());
            let Some(&addr) = listener.backends.get(backend) else {
                continue;
            };
            if s.upstream.connect(addr).is_ok() {
                s.backend = backend as u16;
                self.counters.incr(Counter::SessionsRerouted);
            }
        }
    }

    /// Closes every session (the worker is exiting). Ownership entries stay:
    /// once this process's generation is gone they are stale for everyone.
    pub fn close_all(&mut self, registry: &Registry) {
        let counters = &mut self.counters;
        for session in self.sessions.drain() {
            close_upstream(registry, counters, session);
        }
        self.counters.set(Counter::SessionsActive, 0);
    }

    fn warn_rate_limited(&mut self, message: std::fmt::Arguments<'_>) {
        if self.now_ms >= self.last_warning_ms + 1000 || self.last_warning_ms == 0 {
            self.last_warning_ms = self.now_ms.max(1);
            tracing::warn!("{message}");
        }
    }
}

/// Counts the upstream socket's drops the kernel reports beyond those
/// already counted (`total` is the socket's lifetime count).
fn note_upstream_drops(counters: &mut Counters, session: &mut Session<UdpSocket>, total: u32) {
    let new = total.wrapping_sub(session.upstream_drops_seen);
    session.upstream_drops_seen = total;
    counters.add(Counter::DropUpstreamSocket, u64::from(new));
}

/// Accounts the upstream socket's last drops before it closes.
fn close_upstream(registry: &Registry, counters: &mut Counters, mut session: Session<UdpSocket>) {
    let fd = session.upstream.as_raw_fd();
    if let Ok(total) = sockio::socket_drops(fd) {
        note_upstream_drops(counters, &mut session, total);
    }
    let _ = registry.deregister(&mut SourceFd(&fd));
}
