//! An in-memory world of 2-4 routers, as quinn-proto's `Pair` is for QUIC:
//! one ownership table they share, a fake kernel that binds upstream ports
//! and knows which worker reads each socket, inboxes, backends and clients,
//! and virtual time. No sockets, no threads, no sleeps: every test is exact
//! and runs in microseconds.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use udpshard_shared::handoff::Frame;
use udpshard_shared::owners::{Claim, Owner, OwnerIndex};
use udpshard_shared::stats::{client_arrived, client_settled, replies_ledger, Counter};
use udpshard_shared::DropReason;

use super::{Action, Arrival, DatagramRef, Inherited, Outcome, Owners, Route, Router, Via};
use crate::counters::Counters;
use crate::paths::{OpenError, SockId, Sockets};
use crate::phase::Phase;

/// The ownership table and worker liveness, shared by the routers.
#[derive(Default)]
pub struct OwnerState {
    pub table: HashMap<u64, Owner>,
    /// Port hints: (writer, local address, backend tag), by entry.
    pub hints: HashMap<u64, (Owner, SocketAddr, u16)>,
    /// The process serving each slot, if it serves.
    pub live: Vec<Option<Owner>>,
}

#[derive(Clone)]
pub struct MemOwners(pub Rc<RefCell<OwnerState>>);

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
}

/// The fake kernel: which (source, port) is bound, who reads it, and each
/// worker's descriptors.
pub struct Net {
    pub lo: u16,
    pub hi: u16,
    pub source: IpAddr,
    /// local address -> the worker that reads it (its home).
    pub bound: HashMap<SocketAddr, usize>,
    /// per worker: socket id -> local address.
    pub fds: Vec<HashMap<SockId, SocketAddr>>,
    pub fd_limit: Option<usize>,
    /// Ports whose holder died with paths on them, and no one has bound
    /// since (the lease table's orphans).
    pub orphans: HashMap<SocketAddr, Owner>,
    /// Successful and failed opens, per worker.
    pub opens: Vec<usize>,
    cursor: u16,
}

impl Net {
    fn free_port(&mut self) -> Option<SocketAddr> {
        let span = u32::from(self.hi - self.lo) + 1;
        for i in 0..span {
            let port = self.lo + ((u32::from(self.cursor) + i) % span) as u16;
            let addr = SocketAddr::new(self.source, port);
            // An orphan cools (the lease table's word) until its heir
            // takes it back.
            if !self.bound.contains_key(&addr) && !self.orphans.contains_key(&addr) {
                self.cursor = (port - self.lo + 1) % span as u16;
                return Some(addr);
            }
        }
        None
    }
}

pub struct FakeSockets {
    pub worker: usize,
    pub net: Rc<RefCell<Net>>,
    pub owners: MemOwners,
}

impl Sockets for FakeSockets {
    fn open(
        &mut self,
        sock: SockId,
        _listener: usize,
        _ipv4: bool,
    ) -> Result<SocketAddr, OpenError> {
        let mut net = self.net.borrow_mut();
        net.opens[self.worker] += 1;
        if net
            .fd_limit
            .is_some_and(|l| net.fds[self.worker].len() >= l)
        {
            return Err(OpenError::NoFd);
        }
        let addr = net.free_port().ok_or(OpenError::NoPort)?;
        net.bound.insert(addr, self.worker);
        net.fds[self.worker].insert(sock, addr);
        Ok(addr)
    }

    fn close(&mut self, sock: SockId) {
        let mut net = self.net.borrow_mut();
        if let Some(addr) = net.fds[self.worker].remove(&sock) {
            // The port is free once no worker holds a descriptor for it.
            let held = net.fds.iter().any(|f| f.values().any(|a| *a == addr));
            if !held {
                net.bound.remove(&addr);
            }
        }
    }

    fn adopt(&mut self, sock: SockId, local: SocketAddr, home: Owner) -> bool {
        let mut net = self.net.borrow_mut();
        let reader = net.bound.get(&local).copied();
        let reader_live = reader.is_some_and(|w| {
            w != self.worker && self.owners.live_owner(w).is_some_and(|o| o != home)
        });
        if reader_live || !net.fds[self.worker].contains_key(&sock) {
            return false;
        }
        net.bound.insert(local, self.worker);
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
        if net.orphans.get(&local) != Some(&from) || net.bound.contains_key(&local) {
            return Err(OpenError::NoPort);
        }
        net.orphans.remove(&local);
        net.bound.insert(local, self.worker);
        net.fds[self.worker].insert(sock, local);
        Ok(unreaped_cool_ms)
    }

    fn in_range(&self, _listener: usize, local: SocketAddr) -> bool {
        let net = self.net.borrow();
        (net.lo..=net.hi).contains(&local.port())
    }
}

/// What a backend received: from which upstream 4-tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtBackend {
    pub backend: SocketAddr,
    pub from: SocketAddr,
    pub payload: Vec<u8>,
}

/// What a client received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtClient {
    pub client: SocketAddr,
    pub from_ip: Option<IpAddr>,
    pub payload: Vec<u8>,
    /// The worker whose listener socket sent it.
    pub worker: usize,
}

/// A frame in an inbox, with its descriptors (the sockets' local
/// addresses: what the receiver gets a copy of).
#[derive(Debug, Clone)]
struct InFrame {
    bytes: Vec<u8>,
    fds: Vec<SocketAddr>,
}

pub type TestRouter = Router<MemOwners, FakeSockets>;

pub struct World {
    pub routers: Vec<TestRouter>,
    pub owners: Rc<RefCell<OwnerState>>,
    pub net: Rc<RefCell<Net>>,
    inboxes: Vec<VecDeque<InFrame>>,
    /// Payloads the routers' actions name, by DatagramRef.
    payloads: Vec<Vec<u8>>,
    pub at_backend: Vec<AtBackend>,
    pub at_client: Vec<AtClient>,
    /// Every handoff frame's hop count, as sent.
    pub hops_sent: Vec<u8>,
    pub now_ms: u64,
    /// When set, inboxes are read only by `deliver` (tests of ordering).
    pub hold_inboxes: bool,
    config: String,
    generations: Vec<u64>,
}

pub const CLIENT: &str = "192.0.2.10:5000";

/// A one-listener config (QUIC, 8-byte short-header CIDs) with `extra` keys
/// and `backends` backends at 198.51.100.1..
pub fn config(extra: &str, backends: usize) -> String {
    let list: Vec<String> = (1..=backends)
        .map(|i| format!("\"198.51.100.{i}:443\""))
        .collect();
    format!(
        "[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"quic\"\nmax_sessions = 1000\n{extra}\nbackends = [{}]\n",
        list.join(", ")
    )
}

pub fn backend(i: usize) -> SocketAddr {
    format!("198.51.100.{}:443", i + 1).parse().unwrap()
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A QUIC short-header datagram for 8-byte CID `cid`.
pub fn short(cid: u64, body: &[u8]) -> Vec<u8> {
    let mut d = vec![0x40];
    d.extend_from_slice(&cid.to_be_bytes());
    d.extend_from_slice(body);
    d
}

/// A QUIC long-header (Initial) datagram with `dcid` and `scid`.
pub fn long(dcid: u64, scid: u64) -> Vec<u8> {
    let mut d = vec![0xc0, 0, 0, 0, 1, 8];
    d.extend_from_slice(&dcid.to_be_bytes());
    d.push(8);
    d.extend_from_slice(&scid.to_be_bytes());
    d.extend_from_slice(b"handshake");
    d
}

impl World {
    /// `workers` routers on config `text` (see [`config`]), upstream ports
    /// `lo..=hi`.
    pub fn new(workers: usize, text: &str, ports: (u16, u16)) -> World {
        let owners = Rc::new(RefCell::new(OwnerState {
            table: HashMap::new(),
            hints: HashMap::new(),
            live: (0..workers).map(|w| Some(Owner::new(w, 1))).collect(),
        }));
        let net = Rc::new(RefCell::new(Net {
            lo: ports.0,
            hi: ports.1,
            source: "0.0.0.0".parse().unwrap(),
            bound: HashMap::new(),
            fds: vec![HashMap::new(); workers],
            fd_limit: None,
            orphans: HashMap::new(),
            opens: vec![0; workers],
            cursor: 0,
        }));
        let mut w = World {
            routers: Vec::new(),
            owners,
            net,
            inboxes: vec![VecDeque::new(); workers],
            payloads: Vec::new(),
            at_backend: Vec::new(),
            at_client: Vec::new(),
            hops_sent: Vec::new(),
            now_ms: 1,
            hold_inboxes: false,
            config: text.to_string(),
            generations: vec![1; workers],
        };
        for id in 0..workers {
            let r = w.make_router(id);
            w.routers.push(r);
        }
        w
    }

    /// The routes of config `text` (see [`config`]), for a reload.
    pub fn routes_for(text: &str) -> Vec<Route> {
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

    fn make_router(&self, id: usize) -> TestRouter {
        let routes = World::routes_for(&self.config);
        let owners = MemOwners(self.owners.clone());
        Router::new(
            Owner::new(id, self.generations[id]),
            Phase::Serving,
            routes,
            owners.clone(),
            FakeSockets {
                worker: id,
                net: self.net.clone(),
                owners,
            },
            OwnerIndex::new([7, 9]),
            Counters::default(),
        )
    }

    fn payload(&mut self, bytes: &[u8]) -> DatagramRef {
        self.payloads.push(bytes.to_vec());
        DatagramRef(self.payloads.len() as u32 - 1)
    }

    /// A client datagram from `client` that the kernel delivers to `worker`.
    pub fn send(&mut self, worker: usize, client: &str, bytes: &[u8]) {
        self.send_on(worker, 0, client, bytes);
    }

    /// A client datagram to listener `listener` (see [`World::send`]).
    pub fn send_on(&mut self, worker: usize, listener: usize, client: &str, bytes: &[u8]) {
        let a = Arrival {
            listener,
            client: addr(client),
            local_ip: None,
            via: Via::Socket,
        };
        let d = self.payload(bytes);
        let now = self.now_ms;
        if self.routers[worker].client(now, a, bytes, d) == Outcome::Deferred {
            // The shell reads the inbox, then asks again.
            self.execute(worker, &[]);
            self.read_inbox(worker);
            let a = Arrival {
                via: Via::Retry,
                ..a
            };
            let now = self.now_ms;
            self.routers[worker].client(now, a, bytes, d);
        }
        self.execute(worker, &[]);
        if !self.hold_inboxes {
            self.settle();
        }
    }

    /// A backend's datagram to upstream address `to` (a path's local
    /// address): the kernel gives it to the worker that reads that socket.
    pub fn reply(&mut self, backend: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        let net = self.net.borrow();
        let Some(&reader) = net.bound.get(&to) else {
            return;
        };
        let sock = net.fds[reader]
            .iter()
            .find(|(_, a)| **a == to)
            .map(|(s, _)| *s);
        drop(net);
        let Some(sock) = sock else { return };
        let d = self.payload(bytes);
        let now = self.now_ms;
        self.routers[reader].backend(now, sock, backend, bytes, d, None);
        self.execute(reader, &[]);
        if !self.hold_inboxes {
            self.settle();
        }
    }

    /// Answers every datagram backends have received since `from` (index in
    /// `at_backend`), echoing its payload from the backend to its sender.
    pub fn echo_since(&mut self, from: usize) {
        let pending: Vec<AtBackend> = self.at_backend[from..].to_vec();
        for d in pending {
            self.reply(d.backend, d.from, &d.payload);
        }
    }

    /// Runs actions of router `worker`; `fds` are the local addresses of the
    /// descriptors of the frame it just read.
    fn execute(&mut self, worker: usize, fds: &[SocketAddr]) {
        let actions: Vec<Action> = self.routers[worker].actions().collect();
        for action in actions {
            match action {
                Action::Forward { sock, to, datagram } => {
                    let from = self.net.borrow().fds[worker].get(&sock).copied();
                    let from = from.expect("forward on a socket the worker holds");
                    self.at_backend.push(AtBackend {
                        backend: to,
                        from,
                        payload: self.payloads[datagram.0 as usize].clone(),
                    });
                }
                Action::Reply {
                    to,
                    from_ip,
                    datagram,
                    ..
                } => self.at_client.push(AtClient {
                    client: to,
                    from_ip,
                    payload: self.payloads[datagram.0 as usize].clone(),
                    worker,
                }),
                Action::Handoff {
                    to,
                    header,
                    datagram,
                } => {
                    self.hops_sent.push(header[1]);
                    let mut bytes = header.to_vec();
                    bytes.extend_from_slice(&self.payloads[datagram.0 as usize]);
                    self.inboxes[to].push_back(InFrame {
                        bytes,
                        fds: Vec::new(),
                    });
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
                        .filter_map(|s| net.fds[worker].get(s).copied())
                        .collect();
                    drop(net);
                    if let Some(d) = payload {
                        frame.extend_from_slice(&self.payloads[d.0 as usize]);
                    }
                    self.inboxes[to].push_back(InFrame { bytes: frame, fds });
                }
                Action::Keep { index, sock } => {
                    if let Some(local) = fds.get(index) {
                        self.net.borrow_mut().fds[worker].insert(sock, *local);
                    }
                }
            }
        }
    }

    /// Reads worker `w`'s inbox to the end.
    pub fn read_inbox(&mut self, w: usize) {
        while let Some(f) = self.inboxes[w].pop_front() {
            self.deliver_frame(w, f);
        }
    }

    /// Delivers the first frame waiting in worker `w`'s inbox; false when
    /// there is none.
    pub fn deliver(&mut self, w: usize) -> bool {
        match self.inboxes[w].pop_front() {
            Some(f) => {
                self.deliver_frame(w, f);
                true
            }
            None => false,
        }
    }

    fn deliver_frame(&mut self, w: usize, f: InFrame) {
        let bytes = f.bytes.clone();
        let payloads = &mut self.payloads;
        let mut payload = |at: usize| {
            payloads.push(bytes[at..].to_vec());
            DatagramRef(payloads.len() as u32 - 1)
        };
        let now = self.now_ms;
        // A dead worker reads nothing.
        if self.owners.borrow().live[w].is_none() {
            return;
        }
        self.routers[w].frame(now, &f.bytes, f.fds.len(), &mut payload);
        self.execute(w, &f.fds);
    }

    /// The frames waiting for worker `w` lose their descriptors.
    pub fn drop_descriptors(&mut self, w: usize) {
        for f in &mut self.inboxes[w] {
            f.fds.clear();
        }
    }

    /// Delivers every frame until no inbox holds one (bounded).
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            let Some(w) = (0..self.inboxes.len()).find(|w| !self.inboxes[*w].is_empty()) else {
                return;
            };
            self.read_inbox(w);
        }
        panic!("the routers never stopped sending frames");
    }

    /// Advances virtual time by `ms` and ticks every live router (each
    /// sweeping its whole table).
    pub fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        for w in 0..self.routers.len() {
            if self.owners.borrow().live[w].is_none() {
                continue;
            }
            let now = self.now_ms;
            self.routers[w].tick(now, 1 << 16);
            self.execute(w, &[]);
        }
        self.settle();
    }

    /// Kills worker `w`: it stops serving; the kernel closes its
    /// descriptors (a socket another worker holds a copy of stays bound).
    pub fn kill(&mut self, w: usize) {
        self.owners.borrow_mut().live[w] = None;
        self.inboxes[w].clear();
        let dead = Owner::new(w, self.generations[w]);
        let mut net = self.net.borrow_mut();
        let mine: Vec<SocketAddr> = net.fds[w].values().copied().collect();
        net.fds[w].clear();
        for addr in mine {
            let held = net.fds.iter().any(|f| f.values().any(|a| *a == addr));
            if !held && net.bound.get(&addr) == Some(&w) {
                net.bound.remove(&addr);
                net.orphans.insert(addr, dead);
            } else if !held {
                net.bound.remove(&addr);
            }
        }
    }

    /// Reloads every live router to config `text`: listeners are matched
    /// by name, as the worker matches their sockets.
    pub fn reload(&mut self, text: &str) {
        let old = World::routes_for(&self.config);
        let new = World::routes_for(text);
        let map: Vec<Option<usize>> = old
            .iter()
            .map(|o| new.iter().position(|n| n.ident == o.ident))
            .collect();
        self.config = text.to_string();
        for w in 0..self.routers.len() {
            if self.owners.borrow().live[w].is_none() {
                continue;
            }
            self.routers[w].reconfigure(World::routes_for(text), &map);
            self.execute(w, &[]);
        }
        self.settle();
    }

    /// Worker `w` drains (SIGTERM): it makes no new session.
    pub fn drain(&mut self, w: usize) {
        assert!(self.routers[w].set_phase(Phase::Draining {
            deadline_ms: u64::MAX
        }));
    }

    /// Replaces worker `w` with a fresh process (a new generation).
    pub fn restart(&mut self, w: usize) {
        self.generations[w] += 1;
        self.owners.borrow_mut().live[w] = Some(Owner::new(w, self.generations[w]));
        self.routers[w] = self.make_router(w);
    }

    pub fn counter(&self, w: usize, c: Counter) -> u64 {
        self.routers[w].counters.get(c)
    }

    pub fn total(&self, c: Counter) -> u64 {
        (0..self.routers.len()).map(|w| self.counter(w, c)).sum()
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.total(reason.counter())
    }

    /// Workers holding a session for `cid`'s key.
    pub fn holders(&self, cid: u64) -> Vec<usize> {
        let key = udpshard_shared::FlowKey::new(&cid.to_be_bytes()).unwrap();
        (0..self.routers.len())
            .filter(|w| self.routers[*w].sessions.lookup(0, &key).is_some())
            .collect()
    }

    /// Every distinct upstream address `backend` saw for datagrams whose
    /// payload starts with `prefix`.
    pub fn froms(&self, prefix: &[u8]) -> HashSet<(SocketAddr, SocketAddr)> {
        self.at_backend
            .iter()
            .filter(|d| d.payload.starts_with(prefix))
            .map(|d| (d.backend, d.from))
            .collect()
    }

    /// Checks the accounting identities that hold at rest: every client
    /// datagram ended in exactly one of forward, hand over, drop; every
    /// reply was relayed or dropped.
    pub fn assert_ledger(&self) {
        // The ledger the supervisor books a dead worker's losses from.
        let get = |c| self.total(c);
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
            self.hops_sent
                .iter()
                .all(|h| *h <= udpshard_shared::handoff::MAX_HOPS),
            "{:?}",
            self.hops_sent
        );
    }

    /// No two live paths anywhere share an upstream 4-tuple at their
    /// sockets' homes, and no two sessions anywhere send on one (a relay
    /// and the borrowed copy its session sends on are one path).
    pub fn assert_unique_tuples(&self) {
        let mut seen: HashMap<(SocketAddr, u16), usize> = HashMap::new();
        let mut senders: HashMap<(SocketAddr, u16), usize> = HashMap::new();
        for (w, r) in self.routers.iter().enumerate() {
            if self.owners.borrow().live[w].is_none() {
                continue;
            }
            for (_, p) in r.paths.paths.iter() {
                let Some(s) = r.paths.sock(p.sock) else {
                    continue;
                };
                let k = (s.local, p.backend);
                if !p.is_relay() {
                    if let Some(other) = senders.insert(k, w) {
                        panic!("4-tuple {k:?} sent on by sessions on workers {other} and {w}");
                    }
                }
                if s.home != crate::paths::Home::Here {
                    continue;
                }
                if let Some(other) = seen.insert(k, w) {
                    panic!("4-tuple {k:?} on workers {other} and {w}");
                }
            }
        }
    }

    /// Loses the first frame waiting in worker `w`'s inbox.
    pub fn lose_frame(&mut self, w: usize) -> bool {
        self.inboxes[w].pop_front().is_some()
    }

    /// The routers' view: which worker reads `local`.
    pub fn reader(&self, local: SocketAddr) -> Option<usize> {
        self.net.borrow().bound.get(&local).copied()
    }

    /// Decodes the frames waiting in `w`'s inbox (for ordering tests).
    pub fn inbox_kinds(&self, w: usize) -> Vec<String> {
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
}
