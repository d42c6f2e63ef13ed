//! An in-memory world of 2-4 worker slots, as quinn-proto's `Pair` is for
//! QUIC: one ownership table the routers share, a fake kernel that binds
//! upstream ports and knows which process reads each socket, listener
//! sockets and inboxes that outlive their processes, backends and clients,
//! and virtual time. No sockets, no threads, no sleeps: every test is exact
//! and runs in microseconds.
//!
//! It replays what the supervisor does to the workers: a kill and the
//! restart after it, a reload, backend states, and the whole binary upgrade
//! (a standby generation, quiesce, hand-over, give up or go live), each a
//! step that the properties in `tests.rs` mix at random.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use udpshard_shared::handoff::{Frame, MAX_HOPS};
use udpshard_shared::owners::{Claim, Owner, OwnerIndex};
use udpshard_shared::stats::{client_arrived, client_settled, replies_ledger, Counter};
use udpshard_shared::{DropReason, FlowKey};

use super::{Action, Arrival, DatagramRef, Inherited, Outcome, Owners, Route, Router, Via};
use crate::counters::Counters;
use crate::paths::{Home, OpenError, SockId, Sockets};
use crate::phase::{HandingOver, Phase, HAND_OVER_TIMEOUT_MS};

/// The ownership table and worker liveness, shared by the routers.
#[derive(Default)]
pub(super) struct OwnerState {
    pub table: HashMap<u64, Owner>,
    /// Port hints: (writer, local address, backend tag), by entry.
    pub hints: HashMap<u64, (Owner, SocketAddr, u16)>,
    /// The process serving each slot, if it serves.
    pub live: Vec<Option<Owner>>,
    /// Each slot's latest published generation, serving or not.
    pub generations: Vec<u64>,
}

#[derive(Clone)]
pub(super) struct MemOwners(pub Rc<RefCell<OwnerState>>);

impl Owners for MemOwners {
    fn lookup(&self, hash: u64) -> Option<Owner> {
        self.0.borrow().table.get(&hash).copied()
    }

    fn claim(&self, hash: u64, me: Owner) -> Claim {
        let mut s = self.0.borrow_mut();
        if let Some(o) = s.table.get(&hash).copied() {
            if o == me {
                return Claim::Mine;
            }
            if s.live.get(usize::from(o.worker)).copied().flatten() == Some(o) {
                return Claim::Taken(o);
            }
        }
        s.table.insert(hash, me);
        s.hints.remove(&hash);
        Claim::Mine
    }

    fn assign(&self, hash: u64, to: Owner) {
        let mut s = self.0.borrow_mut();
        if s.table.insert(hash, to) != Some(to) {
            s.hints.remove(&hash);
        }
    }

    fn release(&self, hash: u64, me: Owner) {
        let mut s = self.0.borrow_mut();
        if s.table.get(&hash) == Some(&me) {
            s.table.remove(&hash);
            s.hints.remove(&hash);
        }
    }

    fn hint(&self, hash: u64, from: Owner) -> Option<Inherited> {
        let s = self.0.borrow();
        let &(writer, local, backend) = s.hints.get(&hash)?;
        (s.table.get(&hash) == Some(&from) && writer == from).then_some(Inherited {
            from,
            local,
            backend,
        })
    }

    fn clear_hint(&self, hash: u64, me: Owner) {
        let mut s = self.0.borrow_mut();
        if s.table.get(&hash) == Some(&me) {
            s.hints.remove(&hash);
        }
    }

    fn set_hint(&self, hash: u64, me: Owner, local: SocketAddr, backend: u16) {
        let mut s = self.0.borrow_mut();
        if s.table.get(&hash) == Some(&me) {
            s.hints.insert(hash, (me, local, backend));
        }
    }

    fn live_owner(&self, worker: usize) -> Option<Owner> {
        self.0.borrow().live.get(worker).copied().flatten()
    }

    fn slot_generation(&self, worker: usize) -> Option<u64> {
        self.0.borrow().generations.get(worker).copied()
    }
}

/// The fake kernel: which (source, port) is bound, which process reads
/// it, and each process's descriptors.
pub(super) struct Net {
    pub lo: u16,
    pub hi: u16,
    pub source: IpAddr,
    /// local address -> the process that reads it (its home).
    pub bound: HashMap<SocketAddr, Owner>,
    /// Leases taken by a process that does not read the socket yet (an
    /// upgrade's successor, from its predecessor): local address -> holder.
    /// Elsewhere the reader holds the lease.
    pub leases: HashMap<SocketAddr, Owner>,
    /// per process: socket id -> local address.
    pub fds: HashMap<Owner, HashMap<SockId, SocketAddr>>,
    /// Descriptors a process may hold (its RLIMIT_NOFILE), if limited.
    pub fd_limit: Option<usize>,
    /// Ports whose holder died with paths on them, cooling until a time
    /// (the lease table's orphans): only that holder's heir may bind one
    /// before then.
    pub orphans: HashMap<SocketAddr, (Owner, u64)>,
    /// Opens tried, per process.
    pub opens: HashMap<Owner, usize>,
    /// The world's clock, for the orphans' cooling.
    pub now_ms: u64,
    cursor: u16,
}

impl Net {
    fn free_port(&mut self) -> Option<SocketAddr> {
        let span = u32::from(self.hi - self.lo) + 1;
        for i in 0..span {
            let port = self.lo + ((u32::from(self.cursor) + i) % span) as u16;
            let addr = SocketAddr::new(self.source, port);
            let cooling = self
                .orphans
                .get(&addr)
                .is_some_and(|(_, until)| *until > self.now_ms);
            if !self.bound.contains_key(&addr) && !cooling {
                self.orphans.remove(&addr);
                self.cursor = (port - self.lo + 1) % span as u16;
                return Some(addr);
            }
        }
        None
    }

    /// Who holds the lease of `addr`.
    fn lease_of(&self, addr: SocketAddr) -> Option<Owner> {
        self.leases
            .get(&addr)
            .or_else(|| self.bound.get(&addr))
            .copied()
    }

    /// Whether any process holds a descriptor for `addr`.
    fn held(&self, addr: SocketAddr) -> bool {
        self.fds.values().any(|f| f.values().any(|a| *a == addr))
    }

    /// Process `dead` is gone: the kernel closes its descriptors. A port it
    /// read that nobody else holds is its orphan until `until_ms`.
    fn close_all(&mut self, dead: Owner, until_ms: u64) {
        let mine: Vec<SocketAddr> = self
            .fds
            .remove(&dead)
            .map(|f| f.into_values().collect())
            .unwrap_or_default();
        for addr in mine {
            if self.held(addr) {
                continue;
            }
            if self.bound.remove(&addr) == Some(dead) {
                self.orphans.insert(addr, (dead, until_ms));
            }
            self.leases.remove(&addr);
        }
    }
}

pub(super) struct FakeSockets {
    pub me: Owner,
    pub net: Rc<RefCell<Net>>,
}

impl Sockets for FakeSockets {
    fn open(
        &mut self,
        sock: SockId,
        _listener: usize,
        _ipv4: bool,
    ) -> Result<SocketAddr, OpenError> {
        let mut net = self.net.borrow_mut();
        *net.opens.entry(self.me).or_default() += 1;
        let held = net.fds.get(&self.me).map_or(0, HashMap::len);
        if net.fd_limit.is_some_and(|l| held >= l) {
            return Err(OpenError::NoFd);
        }
        let addr = net.free_port().ok_or(OpenError::NoPort)?;
        net.bound.insert(addr, self.me);
        net.fds.entry(self.me).or_default().insert(sock, addr);
        Ok(addr)
    }

    fn close(&mut self, sock: SockId) {
        let mut net = self.net.borrow_mut();
        let closed = net.fds.get_mut(&self.me).and_then(|f| f.remove(&sock));
        if let Some(addr) = closed {
            if net.leases.get(&addr) == Some(&self.me) {
                net.leases.remove(&addr);
            }
            // The port is free once no process holds a descriptor for it.
            if !net.held(addr) {
                net.bound.remove(&addr);
                net.leases.remove(&addr);
            }
        }
    }

    fn adopt(&mut self, sock: SockId, local: SocketAddr, serves: &dyn Fn(Owner) -> bool) -> bool {
        let mut net = self.net.borrow_mut();
        // The lease is takeable unless another process that serves holds it.
        let taken = net
            .lease_of(local)
            .is_some_and(|o| o != self.me && serves(o));
        let mine = net.fds.get(&self.me).is_some_and(|f| f.contains_key(&sock));
        if taken || !mine {
            return false;
        }
        net.bound.insert(local, self.me);
        net.leases.remove(&local);
        true
    }

    fn lease_holder(&self, local: SocketAddr) -> Option<Owner> {
        self.net.borrow().lease_of(local)
    }

    fn take_lease(&mut self, local: SocketAddr, from: Owner) -> bool {
        let mut net = self.net.borrow_mut();
        if net.lease_of(local) != Some(from) {
            return false;
        }
        net.leases.insert(local, self.me);
        true
    }

    fn reclaim(
        &mut self,
        sock: SockId,
        _listener: usize,
        local: SocketAddr,
        from: Owner,
        unreaped_cool_ms: u64,
    ) -> Result<u64, OpenError> {
        let mut net = self.net.borrow_mut();
        let orphan = net.orphans.get(&local).map(|(o, _)| *o);
        if orphan != Some(from) || net.bound.contains_key(&local) {
            return Err(OpenError::NoPort);
        }
        net.orphans.remove(&local);
        net.bound.insert(local, self.me);
        net.fds.entry(self.me).or_default().insert(sock, local);
        Ok(unreaped_cool_ms)
    }

    fn in_range(&self, _listener: usize, local: SocketAddr) -> bool {
        let net = self.net.borrow();
        (net.lo..=net.hi).contains(&local.port())
    }
}

/// What a backend received: from which upstream 4-tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AtBackend {
    pub backend: SocketAddr,
    pub from: SocketAddr,
    pub payload: Vec<u8>,
}

/// What a client received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AtClient {
    pub client: SocketAddr,
    pub from_ip: Option<IpAddr>,
    pub payload: Vec<u8>,
    /// The slot whose listener socket sent it.
    pub worker: usize,
}

/// A frame in an inbox, with its descriptors (the sockets' local
/// addresses: what the receiver gets a copy of).
#[derive(Debug, Clone)]
struct InFrame {
    bytes: Vec<u8>,
    fds: Vec<SocketAddr>,
}

/// A client datagram waiting in a slot's listener socket.
#[derive(Debug, Clone)]
struct Queued {
    listener: usize,
    client: SocketAddr,
    bytes: Vec<u8>,
}

pub(super) type TestRouter = Router<MemOwners, FakeSockets>;

/// A process of the world: slot `w`'s serving generation (`Cur`), or the
/// generation standing by to take it over in a binary upgrade (`Next`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum P {
    Cur(usize),
    Next(usize),
}

/// Where frames a serving process sends to its own slot go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Twin {
    /// Its own inbox (no upgrade has touched it).
    Own,
    /// The successor's inbox: it is handing over.
    Successor,
    /// Nowhere: the other generation is gone, and the send fails.
    Gone,
}

/// How far a binary upgrade has come, as the old supervisor drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Upgrade {
    /// The new generation stands by, not yet reading.
    Standby,
    /// The old workers left the listeners to it.
    Quiesced,
    /// The old workers offer their sessions; the new ones read the
    /// listeners.
    HandingOver,
}

pub(super) struct World {
    /// Each slot's serving process (during an upgrade, the old one).
    pub routers: Vec<TestRouter>,
    /// A binary upgrade's new generation, by slot.
    pub standbys: Vec<Option<TestRouter>>,
    pub owners: Rc<RefCell<OwnerState>>,
    pub net: Rc<RefCell<Net>>,
    /// The serving generation's inboxes (the supervisor holds them: they
    /// outlive a process, and its replacement reads what waits).
    inboxes: Vec<VecDeque<InFrame>>,
    /// The new generation's inboxes during an upgrade.
    next_inboxes: Vec<VecDeque<InFrame>>,
    /// Datagrams waiting in each slot's listener socket (no process reads
    /// it now, or `hold_listeners`).
    listeners: Vec<VecDeque<Queued>>,
    twins: Vec<Twin>,
    pub upgrade: Option<Upgrade>,
    /// Payloads the routers' actions name, by DatagramRef.
    payloads: Vec<Vec<u8>>,
    pub at_backend: Vec<AtBackend>,
    pub at_client: Vec<AtClient>,
    /// Client datagrams sent to the proxy's listeners.
    pub sent_by_clients: usize,
    /// The client addresses that sent each short-header CID.
    pub clients_of: HashMap<[u8; 8], HashSet<SocketAddr>>,
    /// Every handoff frame's hop count, as sent.
    pub hops_sent: Vec<u8>,
    /// Those an old worker handing over sent its successor (one hop more
    /// than the cap: what it sends is only what it no longer has).
    pub hops_to_successor: Vec<u8>,
    pub now_ms: u64,
    /// When set, inboxes are read only by `deliver` (tests of ordering).
    pub hold_inboxes: bool,
    /// When set, listener sockets are read only by `read_listener`.
    pub hold_listeners: bool,
    config: String,
    /// The generation each slot's next process will be.
    next_generation: Vec<u64>,
    /// What processes whose counts no slot kept (an upgrade's new
    /// generation, given up) had counted.
    discarded: Counters,
}

pub(super) const CLIENT: &str = "192.0.2.10:5000";

/// A one-listener config (QUIC, 8-byte short-header CIDs) with `extra` keys
/// and `backends` backends at 198.51.100.1..
pub(super) fn config(extra: &str, backends: usize) -> String {
    let list: Vec<String> = (1..=backends)
        .map(|i| format!("\"198.51.100.{i}:443\""))
        .collect();
    format!(
        "[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"quic\"\nmax_sessions = 1000\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

pub(super) fn backend(i: usize) -> SocketAddr {
    format!("198.51.100.{}:443", i + 1).parse().unwrap()
}

pub(super) fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A QUIC short-header datagram for 8-byte CID `cid`.
pub(super) fn short(cid: u64, body: &[u8]) -> Vec<u8> {
    udpshard_shared::flow::quic_short(&cid.to_be_bytes(), body)
}

/// A QUIC long-header (Initial) datagram with `dcid` and `scid`, of the
/// 1200 bytes a client's first flight has.
pub(super) fn long(dcid: u64, scid: u64) -> Vec<u8> {
    let mut d =
        udpshard_shared::flow::quic_initial(&dcid.to_be_bytes(), &scid.to_be_bytes(), b"handshake");
    d.resize(udpshard_shared::flow::QUIC_MIN_INITIAL, 0);
    d
}

impl World {
    /// `workers` routers on config `text` (see [`config`]), upstream ports
    /// `lo..=hi`.
    pub(super) fn new(workers: usize, text: &str, ports: (u16, u16)) -> World {
        let owners = Rc::new(RefCell::new(OwnerState {
            table: HashMap::new(),
            hints: HashMap::new(),
            live: (0..workers).map(|w| Some(Owner::new(w, 1))).collect(),
            generations: vec![1; workers],
        }));
        let net = Rc::new(RefCell::new(Net {
            lo: ports.0,
            hi: ports.1,
            source: "0.0.0.0".parse().unwrap(),
            bound: HashMap::new(),
            leases: HashMap::new(),
            fds: HashMap::new(),
            fd_limit: None,
            orphans: HashMap::new(),
            opens: HashMap::new(),
            now_ms: 1,
            cursor: 0,
        }));
        let mut w = World {
            routers: Vec::new(),
            standbys: (0..workers).map(|_| None).collect(),
            owners,
            net,
            inboxes: vec![VecDeque::new(); workers],
            next_inboxes: vec![VecDeque::new(); workers],
            listeners: vec![VecDeque::new(); workers],
            twins: vec![Twin::Own; workers],
            upgrade: None,
            payloads: Vec::new(),
            at_backend: Vec::new(),
            at_client: Vec::new(),
            sent_by_clients: 0,
            clients_of: HashMap::new(),
            hops_sent: Vec::new(),
            hops_to_successor: Vec::new(),
            now_ms: 1,
            hold_inboxes: false,
            hold_listeners: false,
            config: text.to_string(),
            next_generation: vec![2; workers],
            discarded: Counters::default(),
        };
        for id in 0..workers {
            let r = w.make_router(Owner::new(id, 1), Phase::Serving, Counters::default());
            w.routers.push(r);
        }
        w
    }

    /// The routes of config `text` (see [`config`]), for a reload.
    pub(super) fn routes_for(text: &str) -> Vec<Route> {
        let cfg = udpshard_config::parse(text, "test").unwrap();
        // Backend b of listener l counts in row 16 l + b.
        cfg.listeners
            .iter()
            .enumerate()
            .map(|(l, cfg)| {
                let mut route = Route::new(cfg, false).unwrap();
                for b in 0..cfg.backends.len() {
                    route.set_row(b, Some((16 * l + b) as u16));
                }
                route
            })
            .collect()
    }

    fn make_router(&self, me: Owner, phase: Phase, counters: Counters) -> TestRouter {
        let routes = World::routes_for(&self.config);
        let owners = MemOwners(self.owners.clone());
        Router::new(
            me,
            phase,
            routes,
            owners,
            FakeSockets {
                me,
                net: self.net.clone(),
            },
            OwnerIndex::new([7, 9]),
            counters,
        )
    }

    /// How long a dead process's ports cool (the supervisor's longest
    /// `port_reuse_delay`).
    fn orphan_cool_ms(&self) -> u64 {
        self.routers
            .iter()
            .flat_map(|r| r.routes.iter().map(|r| r.reuse_delay_ms))
            .max()
            .unwrap_or(0)
    }

    pub(super) fn workers(&self) -> usize {
        self.routers.len()
    }

    fn router(&self, p: P) -> Option<&TestRouter> {
        match p {
            P::Cur(w) => self.routers.get(w),
            P::Next(w) => self.standbys.get(w)?.as_ref(),
        }
    }

    fn router_mut(&mut self, p: P) -> Option<&mut TestRouter> {
        match p {
            P::Cur(w) => self.routers.get_mut(w),
            P::Next(w) => self.standbys.get_mut(w)?.as_mut(),
        }
    }

    /// Whether process `p` runs.
    pub(super) fn alive(&self, p: P) -> bool {
        match p {
            P::Cur(w) => self.owners.borrow().live[w] == Some(self.routers[w].me),
            P::Next(w) => self.standbys[w].is_some(),
        }
    }

    /// The processes that run.
    fn processes(&self) -> Vec<P> {
        (0..self.workers())
            .flat_map(|w| [P::Cur(w), P::Next(w)])
            .filter(|p| self.alive(*p))
            .collect()
    }

    /// The process that reads its slot's listener socket now, if any: one
    /// generation at a time, the serving one first.
    fn reader_of_slot(&self, w: usize) -> Option<P> {
        [P::Cur(w), P::Next(w)].into_iter().find(|p| {
            self.alive(*p) && self.router(*p).is_some_and(|r| r.phase().reads_listeners())
        })
    }

    /// The process that owns socket `local`, by its owner.
    fn process_of(&self, o: Owner) -> Option<P> {
        let w = usize::from(o.worker);
        [P::Cur(w), P::Next(w)]
            .into_iter()
            .find(|p| self.alive(*p) && self.router(*p).is_some_and(|r| r.me == o))
    }

    fn payload(&mut self, bytes: &[u8]) -> DatagramRef {
        self.payloads.push(bytes.to_vec());
        DatagramRef(self.payloads.len() as u32 - 1)
    }

    /// A client datagram from `client` that the kernel delivers to `worker`.
    pub(super) fn send(&mut self, worker: usize, client: &str, bytes: &[u8]) {
        self.send_on(worker, 0, client, bytes);
    }

    /// A client datagram to listener `listener` (see [`World::send`]): it
    /// waits in the slot's socket while no process reads it.
    pub(super) fn send_on(&mut self, worker: usize, listener: usize, client: &str, bytes: &[u8]) {
        self.sent_by_clients += 1;
        if let Some(cid) = bytes.get(1..9).and_then(|c| <[u8; 8]>::try_from(c).ok()) {
            self.clients_of.entry(cid).or_default().insert(addr(client));
        }
        self.listeners[worker].push_back(Queued {
            listener,
            client: addr(client),
            bytes: bytes.to_vec(),
        });
        if !self.hold_listeners {
            self.read_listener(worker);
        }
    }

    /// The process reading slot `w`'s listener socket reads what waits
    /// there; false when no process reads it.
    pub(super) fn read_listener(&mut self, w: usize) -> bool {
        let Some(p) = self.reader_of_slot(w) else {
            return false;
        };
        self.drain_listener(p, w);
        true
    }

    fn drain_listener(&mut self, p: P, w: usize) {
        while let Some(q) = self.listeners[w].pop_front() {
            self.client_datagram(p, q);
        }
    }

    fn client_datagram(&mut self, p: P, q: Queued) {
        let a = Arrival {
            listener: q.listener,
            client: q.client,
            local_ip: None,
            via: Via::Socket,
        };
        let d = self.payload(&q.bytes);
        let now = self.now_ms;
        let r = self.router_mut(p).expect("a reader");
        if r.client(now, a, &q.bytes, d) == Outcome::Deferred {
            // The shell reads the inbox, then asks again.
            self.execute(p, &[]);
            self.read_inbox_of(p);
            let a = Arrival {
                via: Via::Retry,
                ..a
            };
            let now = self.now_ms;
            if let Some(r) = self.router_mut(p) {
                r.client(now, a, &q.bytes, d);
            }
        }
        self.execute(p, &[]);
        if !self.hold_inboxes {
            self.settle();
        }
    }

    /// A backend's datagram to upstream address `to` (a path's local
    /// address): the kernel gives it to the process that reads that socket.
    pub(super) fn reply(&mut self, backend: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        let net = self.net.borrow();
        let Some(&reader) = net.bound.get(&to) else {
            return;
        };
        let sock = net
            .fds
            .get(&reader)
            .and_then(|f| f.iter().find(|(_, a)| **a == to).map(|(s, _)| *s));
        drop(net);
        let (Some(sock), Some(p)) = (sock, self.process_of(reader)) else {
            return;
        };
        let d = self.payload(bytes);
        let now = self.now_ms;
        if let Some(r) = self.router_mut(p) {
            r.backend(now, sock, backend, bytes, d, None);
        }
        self.execute(p, &[]);
        if !self.hold_inboxes {
            self.settle();
        }
    }

    /// Answers every datagram backends have received since `from` (index in
    /// `at_backend`), echoing its payload from the backend to its sender.
    pub(super) fn echo_since(&mut self, from: usize) {
        let pending: Vec<AtBackend> = self.at_backend[from..].to_vec();
        for d in pending {
            self.reply(d.backend, d.from, &d.payload);
        }
    }

    /// The inbox a frame from process `from` to slot `to` goes to: its
    /// generation's, or its own slot's other generation's (`None`: gone).
    fn inbox_to(&mut self, from: P, to: usize) -> Option<&mut VecDeque<InFrame>> {
        match from {
            P::Cur(w) if w == to => match self.twins[w] {
                Twin::Own => self.inboxes.get_mut(to),
                Twin::Successor => self.next_inboxes.get_mut(to),
                Twin::Gone => None,
            },
            P::Cur(_) => self.inboxes.get_mut(to),
            P::Next(w) if w == to => self.inboxes.get_mut(to),
            P::Next(_) => self.next_inboxes.get_mut(to),
        }
    }

    /// Runs the actions of process `p`; `fds` are the local addresses of
    /// the descriptors of the frame it just read.
    fn execute(&mut self, p: P, fds: &[SocketAddr]) {
        let Some(r) = self.router_mut(p) else {
            return;
        };
        let me = r.me;
        let actions: Vec<Action> = r.actions().collect();
        let mut prefixes = Vec::new();
        r.swap_prefixes(&mut prefixes);
        for action in actions {
            match action {
                Action::Forward {
                    sock,
                    to,
                    datagram,
                    prefix,
                } => {
                    let net = self.net.borrow();
                    let from = net.fds.get(&me).and_then(|f| f.get(&sock)).copied();
                    drop(net);
                    let from = from.expect("forward on a socket the process holds");
                    let mut payload = prefix
                        .and_then(|i| prefixes.get(i as usize))
                        .map_or_else(Vec::new, |h| h.as_bytes().to_vec());
                    payload.extend_from_slice(&self.payloads[datagram.0 as usize]);
                    self.at_backend.push(AtBackend {
                        backend: to,
                        from,
                        payload,
                    });
                }
                Action::Reply {
                    to,
                    from_ip,
                    datagram,
                    ..
                } => {
                    let worker = match p {
                        P::Cur(w) | P::Next(w) => w,
                    };
                    self.at_client.push(AtClient {
                        client: to,
                        from_ip,
                        payload: self.payloads[datagram.0 as usize].clone(),
                        worker,
                    });
                }
                Action::Handoff {
                    to,
                    header,
                    datagram,
                } => {
                    let mut bytes = header.to_vec();
                    bytes.extend_from_slice(&self.payloads[datagram.0 as usize]);
                    let leaving = self
                        .router(p)
                        .is_some_and(|r| r.phase().successor().is_some());
                    match self.inbox_to(p, to) {
                        Some(inbox) => {
                            inbox.push_back(InFrame {
                                bytes,
                                fds: Vec::new(),
                            });
                            match leaving {
                                true => self.hops_to_successor.push(header[1]),
                                false => self.hops_sent.push(header[1]),
                            }
                        }
                        None => {
                            if let Some(r) = self.router_mut(p) {
                                r.handoff_failed();
                            }
                        }
                    }
                }
                Action::Control {
                    to,
                    mut frame,
                    socks,
                    payload,
                } => {
                    let net = self.net.borrow();
                    let fds: Vec<SocketAddr> = socks
                        .iter()
                        .filter_map(|s| net.fds.get(&me).and_then(|f| f.get(s)).copied())
                        .collect();
                    drop(net);
                    let sent = frame.clone();
                    if let Some(d) = payload {
                        frame.extend_from_slice(&self.payloads[d.0 as usize]);
                    }
                    match self.inbox_to(p, to) {
                        Some(inbox) => inbox.push_back(InFrame { bytes: frame, fds }),
                        None => {
                            if let Some(r) = self.router_mut(p) {
                                match payload {
                                    Some(_) => r.handoff_failed(),
                                    None => r.transfer_failed(&sent),
                                }
                            }
                        }
                    }
                }
                Action::Keep { index, sock } => {
                    if let Some(local) = fds.get(index) {
                        self.net
                            .borrow_mut()
                            .fds
                            .entry(me)
                            .or_default()
                            .insert(sock, *local);
                    }
                }
            }
        }
    }

    /// The inbox process `p` reads.
    fn inbox_of(&mut self, p: P) -> &mut VecDeque<InFrame> {
        match p {
            P::Cur(w) => &mut self.inboxes[w],
            P::Next(w) => &mut self.next_inboxes[w],
        }
    }

    fn read_inbox_of(&mut self, p: P) {
        while self.deliver_to(p) {}
    }

    /// Delivers the first frame waiting in worker `w`'s inbox; false when
    /// there is none (or no process reads it).
    pub(super) fn deliver(&mut self, w: usize) -> bool {
        self.deliver_to(P::Cur(w))
    }

    /// Delivers the first frame waiting for process `p`.
    pub(super) fn deliver_to(&mut self, p: P) -> bool {
        // A dead process reads nothing: its frames wait for its successor.
        if !self.alive(p) {
            return false;
        }
        let Some(f) = self.inbox_of(p).pop_front() else {
            return false;
        };
        let bytes = f.bytes.clone();
        let payloads = &mut self.payloads;
        let mut payload = |at: usize| {
            payloads.push(bytes[at..].to_vec());
            DatagramRef(payloads.len() as u32 - 1)
        };
        let now = self.now_ms;
        let r = match p {
            P::Cur(w) => &mut self.routers[w],
            P::Next(w) => self.standbys[w].as_mut().expect("alive"),
        };
        r.frame(now, &f.bytes, f.fds.len(), &mut payload);
        self.execute(p, &f.fds);
        true
    }

    /// The frames waiting for worker `w` lose their descriptors.
    pub(super) fn drop_descriptors(&mut self, w: usize) {
        for f in &mut self.inboxes[w] {
            f.fds.clear();
        }
    }

    /// Delivers every frame until no process has one to read (bounded).
    pub(super) fn settle(&mut self) {
        for _ in 0..10_000 {
            let Some(p) = self.processes().into_iter().find(|p| !self.inbox_empty(*p)) else {
                return;
            };
            self.read_inbox_of(p);
        }
        panic!("the routers never stopped sending frames");
    }

    fn inbox_empty(&self, p: P) -> bool {
        match p {
            P::Cur(w) => self.inboxes[w].is_empty(),
            P::Next(w) => self.next_inboxes[w].is_empty(),
        }
    }

    /// Advances virtual time by `ms` and ticks every live process (each
    /// sweeping its whole table).
    pub(super) fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        self.net.borrow_mut().now_ms = self.now_ms;
        for p in self.processes() {
            let now = self.now_ms;
            if let Some(r) = self.router_mut(p) {
                r.tick(now, 1 << 16);
            }
            self.execute(p, &[]);
        }
        self.settle();
    }

    /// Reloads every live process to config `text`: listeners are matched
    /// by name, as the worker matches their sockets.
    pub(super) fn reload(&mut self, text: &str) {
        let old = World::routes_for(&self.config);
        let new = World::routes_for(text);
        let map: Vec<Option<usize>> = old
            .iter()
            .map(|o| new.iter().position(|n| n.ident == o.ident))
            .collect();
        self.config = text.to_string();
        for p in self.processes() {
            if let Some(r) = self.router_mut(p) {
                r.reconfigure(World::routes_for(text), &map);
            }
            self.execute(p, &[]);
        }
        self.settle();
    }

    /// Passive health as the supervisor decides it: every live process
    /// applies `down` to listener 0's backends (at its next tick).
    pub(super) fn set_down(&mut self, down: &[bool]) {
        for p in self.processes() {
            if let Some(r) = self.router_mut(p) {
                r.set_backend_states(0, down);
            }
            self.execute(p, &[]);
        }
        self.settle();
    }

    /// Worker `w` drains (SIGTERM): it makes no new session.
    pub(super) fn drain(&mut self, w: usize) {
        assert!(self.routers[w].set_phase(Phase::Draining {
            deadline_ms: u64::MAX
        }));
    }

    /// Kills worker `w`: it stops serving; the kernel closes its
    /// descriptors (a socket another process holds a copy of stays bound).
    /// Its inbox and listener socket keep what waits for its replacement.
    pub(super) fn kill(&mut self, w: usize) {
        self.owners.borrow_mut().live[w] = None;
        let dead = self.routers[w].me;
        let until = self.now_ms + self.orphan_cool_ms();
        self.net.borrow_mut().close_all(dead, until);
    }

    /// Replaces worker `w` with a fresh process (the next generation),
    /// whose counters continue the slot's; it reads what waited.
    pub(super) fn restart(&mut self, w: usize) {
        let generation = self.next_generation[w];
        self.next_generation[w] += 1;
        let me = Owner::new(w, generation);
        let old = &self.routers[w].counters;
        let mut counters = Counters::resume(|c| old.get(c));
        counters.resume_backends_with(|row, c| old.backend_get(row, c));
        self.routers[w] = self.make_router(me, Phase::Serving, counters);
        self.twins[w] = Twin::Own;
        let mut owners = self.owners.borrow_mut();
        owners.live[w] = Some(me);
        owners.generations[w] = generation;
        drop(owners);
        self.read_listener(w);
        if !self.hold_inboxes {
            self.settle();
        }
    }

    // ---- a binary upgrade, as the old supervisor drives it ----

    /// SIGUSR2: the new binary starts one standby process per slot. Refused
    /// (false) while another runs or a slot has no serving process.
    pub(super) fn begin_upgrade(&mut self) -> bool {
        if self.upgrade.is_some() || (0..self.workers()).any(|w| !self.alive(P::Cur(w))) {
            return false;
        }
        for w in 0..self.workers() {
            let generation = self.next_generation[w];
            self.next_generation[w] += 1;
            let predecessor = self.routers[w].me;
            let phase = Phase::Standby {
                predecessor,
                listening: false,
            };
            let me = Owner::new(w, generation);
            self.standbys[w] = Some(self.make_router(me, phase, Counters::default()));
            self.next_inboxes[w].clear();
        }
        self.upgrade = Some(Upgrade::Standby);
        true
    }

    /// The next step of the upgrade under way: quiesce the old workers;
    /// then hand over (the new ones read the listeners); then the old ones
    /// offer a batch of sessions at a time, and once every one is handed
    /// over (or refused), they exit and the new generation goes live.
    /// Returns false when no upgrade runs.
    pub(super) fn upgrade_step(&mut self) -> bool {
        match self.upgrade {
            None => false,
            Some(Upgrade::Standby) => {
                for w in 0..self.workers() {
                    let successor = self.standbys[w].as_ref().map(|r| r.me);
                    let Some(successor) = successor else { continue };
                    self.twins[w] = Twin::Successor;
                    assert!(self.routers[w].set_phase(HandingOver::to(successor)));
                }
                self.upgrade = Some(Upgrade::Quiesced);
                true
            }
            Some(Upgrade::Quiesced) => {
                for w in 0..self.workers() {
                    if let Some(r) = self.standbys[w].as_mut() {
                        let predecessor = r.phase().predecessor().expect("standing by");
                        assert!(r.set_phase(Phase::Standby {
                            predecessor,
                            listening: true,
                        }));
                    }
                    let now = self.now_ms;
                    self.routers[w].start_handing_over(now);
                    self.read_listener(w);
                }
                self.upgrade = Some(Upgrade::HandingOver);
                true
            }
            Some(Upgrade::HandingOver) => {
                let mut done = true;
                for w in 0..self.workers() {
                    if !self.alive(P::Cur(w)) {
                        continue;
                    }
                    let now = self.now_ms;
                    let r = &mut self.routers[w];
                    let timed_out = match r.phase() {
                        Phase::HandingOver(h) => h
                            .since_ms
                            .is_some_and(|t| now.saturating_sub(t) >= HAND_OVER_TIMEOUT_MS),
                        _ => true,
                    };
                    if !r.handed_over() && !timed_out {
                        done = false;
                        if r.offer_next(4, 2) > 0 {
                            self.execute(P::Cur(w), &[]);
                        }
                    }
                }
                if !self.hold_inboxes {
                    self.settle();
                }
                if done {
                    self.finish_upgrade();
                }
                true
            }
        }
    }

    /// Every old worker has handed its sessions over: each exits, and the
    /// new generation is published and goes live.
    fn finish_upgrade(&mut self) {
        for w in 0..self.workers() {
            if self.alive(P::Cur(w)) {
                self.leave(P::Cur(w));
            }
            let old = self.routers[w].me;
            let until = self.now_ms + self.orphan_cool_ms();
            self.owners.borrow_mut().live[w] = None;
            self.net.borrow_mut().close_all(old, until);
        }
        self.upgrade = None;
        for w in 0..self.workers() {
            let Some(mut next) = self.standbys[w].take() else {
                continue;
            };
            let old = &self.routers[w].counters;
            next.counters.rebase_with(|c| old.get(c));
            next.counters
                .rebase_backends_with(|row, c| old.backend_get(row, c));
            let mut owners = self.owners.borrow_mut();
            owners.live[w] = Some(next.me);
            owners.generations[w] = u64::from(next.me.generation);
            drop(owners);
            self.routers[w] = next;
            self.inboxes[w] = std::mem::take(&mut self.next_inboxes[w]);
            self.twins[w] = Twin::Gone;
        }
        for w in 0..self.workers() {
            assert!(self.routers[w].set_phase(Phase::Serving));
            self.routers[w].adopt_orphans();
            self.execute(P::Cur(w), &[]);
            self.read_listener(w);
        }
        if !self.hold_inboxes {
            self.settle();
        }
    }

    /// The upgrade is given up: old workers that had quiesced serve on
    /// (`Resume`), and the new generation exits (its supervisor is gone: its
    /// workers see their control channel close, and leave), first or after
    /// (`leave_first`: the two race); its generation is spent.
    pub(super) fn give_up_upgrade(&mut self, leave_first: bool) -> bool {
        let Some(step) = self.upgrade else {
            return false;
        };
        if leave_first {
            self.standbys_leave();
        }
        for w in 0..self.workers() {
            if step != Upgrade::Standby && self.alive(P::Cur(w)) {
                self.twins[w] = Twin::Gone;
                assert!(self.routers[w].set_phase(Phase::Serving));
                self.execute(P::Cur(w), &[]);
                self.read_listener(w);
            }
        }
        self.standbys_leave();
        self.upgrade = None;
        for w in 0..self.workers() {
            self.next_inboxes[w].clear();
            self.read_listener(w);
        }
        if !self.hold_inboxes {
            self.settle();
        }
        true
    }

    /// The new generation's workers leave; what they counted no slot keeps.
    fn standbys_leave(&mut self) {
        for w in 0..self.workers() {
            if self.standbys[w].is_some() {
                self.leave(P::Next(w));
                let r = self.standbys[w].take().expect("standing by");
                // Its generation is spent: a dead slot's next process comes
                // after it.
                if !self.alive(P::Cur(w)) {
                    self.owners.borrow_mut().generations[w] = u64::from(r.me.generation);
                }
                self.discarded.add_all(&r.counters);
                let until = self.now_ms + self.orphan_cool_ms();
                self.net.borrow_mut().close_all(r.me, until);
            }
        }
    }

    /// Process `p` exits as the event loop's `leave` does: it reads its
    /// inbox, and its listeners if its phase says so.
    fn leave(&mut self, p: P) {
        self.read_inbox_of(p);
        let w = match p {
            P::Cur(w) | P::Next(w) => w,
        };
        if self
            .router(p)
            .is_some_and(|r| r.phase().drains_listeners_on_exit())
        {
            self.drain_listener(p, w);
        }
        self.read_inbox_of(p);
    }

    /// Counter `c` of slot `w`'s serving process.
    pub(super) fn counter(&self, w: usize, c: Counter) -> u64 {
        self.routers[w].counters.get(c)
    }

    /// Counter `c` over every slot, every process standing by, and what
    /// processes no slot kept had counted.
    pub(super) fn total(&self, c: Counter) -> u64 {
        let standing = self.standbys.iter().flatten().map(|r| r.counters.get(c));
        (0..self.routers.len())
            .map(|w| self.counter(w, c))
            .chain(standing)
            .fold(self.discarded.get(c), u64::wrapping_add)
    }

    pub(super) fn drops(&self, reason: DropReason) -> u64 {
        self.total(reason.counter())
    }

    /// Live processes holding a session for `cid`'s key: slot `w`'s serving
    /// one as `w`, its standby as `workers + w`.
    pub(super) fn holders(&self, cid: u64) -> Vec<usize> {
        let key = udpshard_shared::FlowKey::new(&cid.to_be_bytes()).unwrap();
        let n = self.workers();
        self.processes()
            .into_iter()
            .filter(|p| {
                self.router(*p)
                    .is_some_and(|r| r.sessions.lookup(0, &key).is_some())
            })
            .map(|p| match p {
                P::Cur(w) => w,
                P::Next(w) => n + w,
            })
            .collect()
    }

    /// Every distinct upstream address `backend` saw for datagrams whose
    /// payload starts with `prefix`.
    pub(super) fn froms(&self, prefix: &[u8]) -> HashSet<(SocketAddr, SocketAddr)> {
        self.at_backend
            .iter()
            .filter(|d| d.payload.starts_with(prefix))
            .map(|d| (d.backend, d.from))
            .collect()
    }

    /// Checks the accounting identities, at rest or between any two steps:
    /// every client datagram sent is waiting in a listener socket or was
    /// read; every one read or handed in ended in exactly one of forward,
    /// hand over, drop (a datagram in an inbox was handed over, and is not
    /// yet handed in); every reply was relayed or dropped.
    pub(super) fn assert_ledger(&self) {
        // The ledger the supervisor books a dead worker's losses from.
        let get = |c| self.total(c);
        let queued: usize = self.listeners.iter().map(VecDeque::len).sum();
        assert_eq!(
            self.sent_by_clients as u64,
            get(Counter::RxPackets) + queued as u64,
            "client datagrams: sent != read + waiting in listener sockets"
        );
        assert_eq!(
            client_arrived(get),
            client_settled(get),
            "client datagrams: arrived != forwarded + handed over + dropped"
        );
        assert_eq!(
            self.total(Counter::TxPackets) as usize,
            self.at_backend.len(),
            "tx_packets != datagrams at backends"
        );
        let (replies_in, replies_settled) = replies_ledger(get);
        assert_eq!(
            replies_in, replies_settled,
            "replies: in != out + dropped after the read"
        );
        assert_eq!(
            self.total(Counter::RepliesOut) as usize,
            self.at_client.len()
        );
        assert!(
            self.hops_sent.iter().all(|h| *h <= MAX_HOPS),
            "{:?}",
            self.hops_sent
        );
        assert!(
            self.hops_to_successor.iter().all(|h| *h <= MAX_HOPS + 1),
            "{:?}",
            self.hops_to_successor
        );
    }

    /// No two live paths anywhere share an upstream 4-tuple at their
    /// sockets' homes, and no two sessions of different keys anywhere send
    /// on one (a relay and the borrowed copy its session sends on are one
    /// path; a session on offer and the receiver's copy are one session).
    pub(super) fn assert_unique_tuples(&self) {
        let mut seen: HashMap<(SocketAddr, SocketAddr), P> = HashMap::new();
        let mut senders: HashMap<(SocketAddr, SocketAddr), (P, FlowKey)> = HashMap::new();
        for p in self.processes() {
            let r = self.router(p).expect("alive");
            for (_, path) in r.paths.paths.iter() {
                let Some(s) = r.paths.sock(path.sock) else {
                    continue;
                };
                let Some(to) = r
                    .routes
                    .get(path.listener)
                    .and_then(|route| route.backends.get(usize::from(path.backend)))
                else {
                    continue;
                };
                let k = (s.local, *to);
                if !path.is_relay() {
                    if let Some((other, key)) = senders.insert(k, (p, path.key)) {
                        assert!(
                            key == path.key,
                            "4-tuple {k:?} sent on by sessions {key:?} on {other:?} and {:?} on {p:?}",
                            path.key
                        );
                    }
                }
                if s.home != Home::Here {
                    continue;
                }
                if let Some(other) = seen.insert(k, p) {
                    panic!("4-tuple {k:?} on {other:?} and {p:?}");
                }
            }
        }
    }

    /// Every path of a session in a serving process: (its backend, its
    /// upstream 4-tuple's local address, its client, its session's key).
    pub(super) fn live_paths(&self) -> Vec<(SocketAddr, SocketAddr, SocketAddr, FlowKey)> {
        let mut out = Vec::new();
        for w in 0..self.workers() {
            if !self.alive(P::Cur(w)) {
                continue;
            }
            let r = &self.routers[w];
            for (_, p) in r.paths.paths.iter() {
                if p.is_relay() {
                    continue;
                }
                let Some(s) = r.paths.sock(p.sock) else {
                    continue;
                };
                let backend = r.routes[p.listener].backends[usize::from(p.backend)];
                out.push((backend, s.local, p.client, p.key));
            }
        }
        out
    }

    /// Loses the first frame waiting in worker `w`'s inbox.
    pub(super) fn lose_frame(&mut self, w: usize) -> bool {
        self.inboxes[w].pop_front().is_some()
    }

    /// The slot of the process that reads `local`.
    pub(super) fn reader(&self, local: SocketAddr) -> Option<usize> {
        self.net
            .borrow()
            .bound
            .get(&local)
            .map(|o| usize::from(o.worker))
    }

    /// Upstream sockets slot `w`'s serving process holds.
    pub(super) fn fds(&self, w: usize) -> usize {
        let me = self.routers[w].me;
        self.net.borrow().fds.get(&me).map_or(0, HashMap::len)
    }

    /// Upstream sockets slot `w`'s serving process tried to open.
    pub(super) fn opens(&self, w: usize) -> usize {
        let me = self.routers[w].me;
        self.net.borrow().opens.get(&me).copied().unwrap_or(0)
    }

    /// Decodes the frames waiting in `w`'s inbox (for ordering tests).
    pub(super) fn inbox_kinds(&self, w: usize) -> Vec<String> {
        self.inboxes[w]
            .iter()
            .map(|f| match Frame::decode(&f.bytes) {
                Ok(Frame::Datagram { .. }) => "datagram".to_string(),
                Ok(Frame::Control { control, .. }) => format!("{control:?}")
                    .split(['(', ' ', '{'])
                    .next()
                    .unwrap_or("")
                    .to_string(),
                Err(e) => format!("bad: {e}"),
            })
            .collect()
    }

    /// Where each slot's processes stand in an upgrade, for a failure
    /// message.
    pub(super) fn upgrade_state(&self) -> String {
        let mut out = String::new();
        for w in 0..self.workers() {
            let r = &self.routers[w];
            out += &format!(
                "\nslot {w}: old alive {}, {}, {} sessions, {} on offer, {} refused, {} in its inbox",
                self.alive(P::Cur(w)),
                r.phase().name(),
                r.sessions(),
                r.offers_pending(),
                r.refused_by_successor(),
                self.inboxes[w].len()
            );
            if let Some(n) = &self.standbys[w] {
                out += &format!(
                    "; new {}, {} sessions, {} in its inbox",
                    n.phase().name(),
                    n.sessions(),
                    self.next_inboxes[w].len()
                );
            }
        }
        out
    }
}
