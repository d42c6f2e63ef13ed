//! What happens to a datagram, top to bottom. The router makes every
//! datapath decision and does no I/O: events come in (a client datagram, a
//! backend's datagram on an upstream socket, a frame from another worker, a
//! tick, a reload), and actions come out (forward, reply, hand over, send a
//! frame) for the shell to turn into syscalls. Time is an argument. The
//! ownership table and the opening of upstream sockets are behind traits
//! ([`Owners`], [`Sockets`]), so tests drive several routers in memory.
//!
//! Client -> backend ([`Router::client`]):
//! 1. Dissect the flow key (none: `malformed`).
//! 2. A local session has it: forward on the session's path for this client
//!    address. A new address gets a path of its own (a new upstream 4-tuple,
//!    `migration = "path"`), or moves the one path (`"follow"`). A flow
//!    handed over by the same worker several times in a row is where the
//!    kernel delivers it now: the session moves there.
//! 3. A flow refused a moment ago (no port, no descriptor) is dropped again
//!    at once: a refused flow costs no more than a forwarded one.
//! 4. The ownership table names another live worker: hand the datagram
//!    over (at most `MAX_HOPS` in all). It names this worker although no
//!    session is here: a transfer to us is in the inbox; the shell reads it
//!    and asks again.
//! 5. Else claim the key, pick the backend (QUIC-LB server ID, else
//!    Maglev), open a path and forward.
//!
//! Backend -> client ([`Router::backend`]): the socket and the sender name
//! the path; learn a QUIC server's new connection ID from its long-header
//! packets (before the reply that carries it reaches the client), reply to
//! that path's client from the listener socket. A path whose session moved
//! to another worker is relayed the same way: its home keeps its socket.
//!
//! Every client datagram ends in exactly one of: forward, hand over, drop
//! with a [`DropReason`] (or [`Outcome::Deferred`], and then one of those).

use std::net::{IpAddr, SocketAddr};

use udpshard_config as config;
use udpshard_shared::backends::BackendCounter;
use udpshard_shared::flow::{quic_is_initial, quic_long_scid};
use udpshard_shared::handoff::{
    Control, Frame, Header, PathRef, Transfer, TransferPath, HEADER_LEN, MAX_HOPS,
};
use udpshard_shared::maglev::MaglevError;
use udpshard_shared::owners::{backend_tag, Claim, Owner, OwnerIndex};
use udpshard_shared::quic_lb::QuicLbRouter;
use udpshard_shared::stats::Counter;
use udpshard_shared::{stable_hash, Dissector, DropReason, FlowKey, Maglev};

use crate::counters::Counters;
use crate::keyindex::prefetch;
use crate::paths::{Home, OpenError, Path, PathId, Paths, SockId, NONE};
use crate::session::{Offer, Session, SessionId, SessionTable};

pub use crate::paths::Sockets;

/// Consecutive datagrams of a session handed over by the same worker before
/// the session moves there.
pub const TRANSFER_AFTER: u8 = 3;

/// How long a refused flow's further datagrams are dropped without a try.
const REFUSAL_MS: u64 = 1_000;
/// An offered transfer unanswered this long is settled by the ownership
/// table: the receiver records itself as the owner before it answers.
const TRANSFER_TIMEOUT_MS: u64 = 2_000;
/// How long an offer nobody answered is kept for a late answer; the
/// session waits that long before it may be offered again or close.
const OFFER_LIFETIME_MS: u64 = 30_000;
const MAX_REFUSALS: usize = 1 << 16;
/// Datagrams of a batch [`Router::warm`] prepares: a listener batch.
pub const WARM_BATCH: usize = 32;

/// The ownership table, as a router sees it.
pub trait Owners {
    /// The recorded owner of `hash`, live or not.
    fn lookup(&self, hash: u64) -> Option<Owner>;
    /// Makes `me` the owner unless a live worker is.
    fn claim(&self, hash: u64, me: Owner) -> Claim;
    /// Records `to` as the owner, whoever owned it.
    fn assign(&self, hash: u64, to: Owner);
    /// Forgets `hash` if `me` owns it.
    fn release(&self, hash: u64, me: Owner);
    /// The process serving slot `worker` now, if it serves.
    fn live_owner(&self, worker: usize) -> Option<Owner>;
    /// Where dead owner `from`'s session of `hash` had its first path, as
    /// `from` recorded it.
    fn hint(&self, hash: u64, from: Owner) -> Option<Inherited>;
    /// Records where `me`'s session of `hash` has its first path: (its
    /// socket's local address, [`backend_tag`] of its backend).
    fn set_hint(&self, hash: u64, me: Owner, local: SocketAddr, backend: u16);
    /// Forgets `me`'s hint for `hash` (its session has no path to name).
    fn clear_hint(&self, hash: u64, me: Owner);
    fn is_live(&self, owner: Owner) -> bool {
        self.live_owner(usize::from(owner.worker)) == Some(owner)
    }
}

/// A flow's path at a worker that died, which the worker taking the flow
/// over binds again when it can: the backend then sees no change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inherited {
    pub from: Owner,
    /// The path's socket's (source, port).
    pub local: SocketAddr,
    /// [`backend_tag`] of its backend.
    pub backend: u16,
}

/// A datagram the shell holds until the actions naming it are done: the
/// router never copies datagram bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramRef(pub u32);

/// Where a client datagram came from and how it reached this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub listener: usize,
    pub client: SocketAddr,
    /// The local address it was sent to (wildcard listeners only).
    pub local_ip: Option<IpAddr>,
    pub via: Via,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Read from this worker's listener socket.
    Socket,
    /// Handed over by another worker, after `hops` handoffs.
    Handoff { from: u16, hops: u8 },
    /// Read from the listener socket, then deferred: asked again after the
    /// inbox was read.
    Retry,
}

impl Via {
    fn hops(self) -> u8 {
        match self {
            Via::Handoff { hops, .. } => hops,
            Via::Socket | Via::Retry => 0,
        }
    }
}

/// What the router decided about a client datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Read the handoff inbox, then ask again with `Via::Retry`.
    Deferred,
}

/// What the shell is to do. Sends that fail are reported back
/// ([`Router::forward_failed`] and its siblings) and counted as drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `datagram` to backend `to` from upstream socket `sock`.
    Forward {
        sock: SockId,
        to: SocketAddr,
        datagram: DatagramRef,
    },
    /// Send `datagram` to a client from listener `listener`'s socket, from
    /// `from_ip` when the listener is a wildcard bind.
    Reply {
        listener: usize,
        to: SocketAddr,
        from_ip: Option<IpAddr>,
        datagram: DatagramRef,
    },
    /// Hand a client datagram to worker `to`: `header` then `datagram`.
    Handoff {
        to: usize,
        header: [u8; HEADER_LEN],
        datagram: DatagramRef,
    },
    /// A control frame to worker `to`, with these sockets as SCM_RIGHTS and
    /// `payload` after it (a moved path's datagram). Delivered reliably: the
    /// shell queues it while the inbox is full.
    Control {
        to: usize,
        frame: Vec<u8>,
        socks: Vec<SockId>,
        payload: Option<DatagramRef>,
    },
    /// Keep descriptor `index` of the frame just read as socket `sock`
    /// (a borrowed copy: the shell does not read it).
    Keep { index: usize, sock: SockId },
}

/// A listener as the router routes it: built from its config (replaced on
/// reload).
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// Stable identity across reloads (its name's hash): ownership table
    /// keys and handoff frames use it.
    pub ident: u64,
    pub dissector: Dissector,
    maglev: Maglev,
    /// Maglev's backend i is backend `taking[i]` (those of weight > 0).
    taking: Vec<usize>,
    pub backends: Vec<SocketAddr>,
    /// `tags[b]`: [`backend_tag`] of backend b, as port hints name it.
    tags: Vec<u16>,
    /// `rows[b]`: backend b's row of counters in the stats region (`None`:
    /// uncounted).
    rows: Vec<Option<u16>>,
    /// `ipv4[b]`: backend b's address family.
    ipv4: Vec<bool>,
    by_addr: ahash::AHashMap<SocketAddr, u16>,
    quic_lb: Option<QuicLbRouter>,
    /// QUIC: learn the server's chosen connection IDs from its replies.
    learns_server_cids: bool,
    /// Bound to a wildcard address: replies leave from the address each
    /// client wrote to.
    pub wildcard: bool,
    pub follow: bool,
    pub max_paths: usize,
    pub max_sessions: usize,
    pub session_idle_ms: u64,
    pub path_idle_ms: u64,
    pub reuse_delay_ms: u64,
    /// Passive health: a new session's first reply is due within this.
    pub reply_timeout_ms: u64,
    /// `on_backend_down = "reroute"`.
    pub reroute_when_down: bool,
    /// Backends passive health has taken down (the supervisor decides; every
    /// worker reads the same states).
    down: Vec<bool>,
    /// The config's backends (for rebuilding Maglev when states change).
    weights: Vec<u32>,
    maglev_size: usize,
}

impl Route {
    pub fn new(cfg: &config::Listener, wildcard: bool) -> Result<Route, MaglevError> {
        let backends: Vec<SocketAddr> = cfg.backends.iter().map(|b| b.addr).collect();
        let weights: Vec<u32> = cfg.backends.iter().map(|b| b.weight).collect();
        let down = vec![false; backends.len()];
        let (maglev, taking) = maglev_over(&backends, &weights, &down, cfg.maglev_table_size)?;
        Ok(Route {
            name: cfg.name.clone(),
            ident: stable_hash(cfg.name.as_bytes()),
            dissector: cfg.dissector.into(),
            maglev,
            taking,
            ipv4: backends.iter().map(|b| b.is_ipv4()).collect(),
            tags: backends.iter().map(|b| backend_tag(*b)).collect(),
            rows: vec![None; backends.len()],
            by_addr: backends
                .iter()
                .enumerate()
                .map(|(i, b)| (*b, i as u16))
                .collect(),
            backends,
            quic_lb: cfg.quic_lb.map(|lb| {
                QuicLbRouter::new(
                    lb,
                    cfg.backends
                        .iter()
                        .map(|b| b.server_id.clone().unwrap_or_default()),
                )
            }),
            learns_server_cids: matches!(cfg.dissector, config::Dissector::Quic { .. }),
            wildcard,
            follow: cfg.migration == config::Migration::Follow,
            max_paths: cfg.max_paths.max(1),
            max_sessions: cfg.max_sessions,
            session_idle_ms: cfg.session_idle.as_millis() as u64,
            path_idle_ms: cfg.path_idle.as_millis() as u64,
            reuse_delay_ms: cfg.port_reuse_delay.as_millis() as u64,
            reply_timeout_ms: cfg.reply_timeout.as_millis() as u64,
            reroute_when_down: cfg.on_backend_down == config::OnBackendDown::Reroute,
            down,
            weights,
            maglev_size: cfg.maglev_table_size,
        })
    }

    /// Takes the backends `down` says are down out of new sessions' way:
    /// Maglev is rebuilt over those of weight > 0 that are up, so keys that
    /// mapped elsewhere stay there. When none would be left, every backend
    /// of weight > 0 stays in (trying a failing one beats refusing all).
    /// Returns whether anything changed.
    pub fn set_down(&mut self, down: &[bool]) -> bool {
        if down.len() != self.down.len() || down == self.down.as_slice() {
            return false;
        }
        let Ok((maglev, taking)) =
            maglev_over(&self.backends, &self.weights, down, self.maglev_size)
        else {
            return false;
        };
        self.maglev = maglev;
        self.taking = taking;
        self.down = down.to_vec();
        true
    }

    /// Whether backend `b` is down (passive health).
    pub fn is_down(&self, b: usize) -> bool {
        self.down.get(b).copied().unwrap_or(false)
    }

    /// The backend for a new flow: its QUIC-LB server ID, else Maglev.
    pub fn pick(&self, key: &[u8]) -> usize {
        self.quic_lb
            .as_ref()
            .and_then(|lb| lb.route(key))
            .unwrap_or_else(|| self.taking[self.maglev.backend_for(key)])
    }

    /// Gives backend `b` its row of counters (`None`: uncounted).
    pub fn set_row(&mut self, b: usize, row: Option<u16>) {
        if let Some(r) = self.rows.get_mut(b) {
            *r = row;
        }
    }

    /// Backend `b`'s row of counters.
    pub fn row(&self, b: usize) -> Option<u16> {
        self.rows.get(b).copied().flatten()
    }

    /// What [`Route::pick`] decides for `key`, and why.
    pub fn explain(&self, key: &[u8]) -> Pick {
        if let Some(backend) = self.quic_lb.as_ref().and_then(|lb| lb.route(key)) {
            return Pick {
                backend,
                by: PickedBy::ServerId,
            };
        }
        let hash = stable_hash(key);
        let (slot, size) = self.maglev.slot_for_hash(hash);
        Pick {
            backend: self.taking[self.maglev.backend_for_hash(hash)],
            by: PickedBy::Maglev { hash, slot, size },
        }
    }

    fn backend_of(&self, addr: SocketAddr) -> Option<u16> {
        self.by_addr.get(&addr).copied()
    }
}

/// Maglev over the backends that take new sessions, and which backend each
/// of its indices is: those of weight > 0 that are not `down` (a drained or
/// down backend leaves the table, and keys that did not map to it stay).
/// When none would be left, every backend of weight > 0 stays in: trying a
/// failing one beats refusing all.
fn maglev_over(
    backends: &[SocketAddr],
    weights: &[u32],
    down: &[bool],
    size: usize,
) -> Result<(Maglev, Vec<usize>), MaglevError> {
    let taking = |skip_down: bool| -> Vec<usize> {
        (0..backends.len())
            .filter(|&i| weights[i] > 0 && !(skip_down && down.get(i) == Some(&true)))
            .collect()
    };
    let mut taking_now = taking(true);
    if taking_now.is_empty() {
        taking_now = taking(false);
    }
    let names: Vec<(String, u32)> = taking_now
        .iter()
        .map(|&i| (backends[i].to_string(), weights[i]))
        .collect();
    Ok((Maglev::new(&names, size)?, taking_now))
}

/// A new flow's backend, and why it is that one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub backend: usize,
    pub by: PickedBy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickedBy {
    /// The connection ID carries the backend's QUIC-LB server ID.
    ServerId,
    /// Maglev: the key's stable hash, its slot in a table of `size`.
    Maglev { hash: u64, slot: usize, size: usize },
}

/// Flows refused a moment ago, and why.
#[derive(Debug, Default)]
struct Refusals {
    map: ahash::AHashMap<(usize, FlowKey), (DropReason, u64)>,
}

impl Refusals {
    fn check(&mut self, listener: usize, key: &FlowKey, now_ms: u64) -> Option<DropReason> {
        if self.map.is_empty() {
            return None;
        }
        match self.map.get(&(listener, *key)) {
            Some(&(reason, until)) if until > now_ms => Some(reason),
            Some(_) => {
                self.map.remove(&(listener, *key));
                None
            }
            None => None,
        }
    }

    fn remember(&mut self, listener: usize, key: FlowKey, reason: DropReason, now_ms: u64) {
        // Bounded: a flood of refused flows forgets the oldest all at once.
        if self.map.len() >= MAX_REFUSALS {
            self.map.clear();
        }
        self.map
            .insert((listener, key), (reason, now_ms + REFUSAL_MS));
    }
}

/// One worker's routing state.
pub struct Router<O, S> {
    pub id: usize,
    me: Owner,
    routes: Vec<Route>,
    sessions: SessionTable,
    paths: Paths,
    owners: O,
    sockets: S,
    index: OwnerIndex,
    refused: Refusals,
    pub counters: Counters,
    now_ms: u64,
    draining: bool,
    /// CLOCK_MONOTONIC (ms) at `now_ms` 0.
    epoch_ms: u64,
    actions: Vec<Action>,
    relay_cursor: usize,
    /// A binary upgrade: the process taking this slot over, to which every
    /// session goes (frames to this worker's own id go to it).
    successor: Option<Owner>,
    /// A binary upgrade: this process stands by to take the slot over from
    /// this predecessor and is not yet live (frames to its own id go to it).
    standby: Option<Owner>,
    /// Sessions the successor refused: not offered again.
    refused_by_successor: ahash::AHashSet<SessionId>,
}

impl<O: Owners, S: Sockets> Router<O, S> {
    pub fn new(
        me: Owner,
        routes: Vec<Route>,
        owners: O,
        sockets: S,
        index: OwnerIndex,
        counters: Counters,
    ) -> Router<O, S> {
        let limits: Vec<usize> = routes.iter().map(|r| r.max_sessions).collect();
        let expected = limits.iter().sum::<usize>().min(1 << 20);
        Router {
            id: usize::from(me.worker),
            me,
            paths: Paths::new(routes.len(), expected),
            sessions: SessionTable::new(limits),
            routes,
            owners,
            sockets,
            index,
            refused: Refusals::default(),
            counters,
            now_ms: 0,
            draining: false,
            epoch_ms: 0,
            actions: Vec::with_capacity(256),
            relay_cursor: 0,
            successor: None,
            standby: None,
            refused_by_successor: ahash::AHashSet::new(),
        }
    }

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
                .and_then(|s| s.transferring.as_ref())
                .is_some_and(|o| usize::from(o.to) == self.id);
            if !offered {
                continue;
            }
            if let Some(s) = self.sessions.get_mut(sid) {
                s.transferring = None;
                s.handoff_streak = (0, 0);
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
            if self
                .sessions
                .get(sid)
                .is_some_and(|s| s.transferring.is_none())
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
            .filter(|&sid| {
                self.sessions
                    .get(sid)
                    .is_some_and(|s| s.transferring.is_some())
            })
            .count()
    }

    /// Whether `o` is the process about to take slot `o.worker` over in an
    /// upgrade: the generation after the one serving it, not yet published.
    fn unpublished_successor(&self, o: Owner) -> bool {
        let worker = usize::from(o.worker);
        self.owners
            .live_owner(worker)
            .is_some_and(|l| Owner::new(worker, u64::from(l.generation) + 1) == o)
    }

    /// Whether `o` serves: the successor does, to its predecessor.
    fn live(&self, o: Owner) -> bool {
        self.successor == Some(o) || self.owners.is_live(o)
    }

    /// Who serves slot `worker`: this slot's successor, to its predecessor.
    fn live_at(&self, worker: usize) -> Option<Owner> {
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

    /// The actions decided since the last call, in order.
    pub fn actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Whether a relayed path's client can move (a `follow` listener): the
    /// shell then reads the inbox before relaying replies, so a move the
    /// owner reported is applied before any reply the moved client's
    /// datagrams caused.
    pub fn relays_can_move(&self) -> bool {
        self.routes.iter().any(|r| r.follow)
    }

    /// The time of the last event the router was given, ms.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub fn sockets(&mut self) -> &mut S {
        &mut self.sockets
    }

    pub fn owners(&self) -> &O {
        &self.owners
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// How many table slots a full sweep visits: a tick's budget should be
    /// a tenth of it (every table swept each second at 10 ticks/s).
    pub fn sweep_span(&self) -> usize {
        self.sessions
            .span()
            .max(self.paths.path_span())
            .max(self.paths.socks.capacity())
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    fn drop_datagram(&mut self, reason: DropReason) {
        self.counters.incr(reason.counter());
    }

    fn owner_hash(&self, listener: usize, key: &FlowKey) -> u64 {
        self.index.hash(self.routes[listener].ident, key.as_bytes())
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
            None => match self.miss(
                a,
                key,
                d,
                route.learns_server_cids && quic_is_initial(bytes),
            ) {
                Ok(sid) => sid,
                Err(outcome) => return outcome,
            },
        };
        self.forward(sid, a, bytes.len(), d);
        Outcome::Done
    }

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

    /// No local session has the key: hand the datagram to its owner, or
    /// take the flow.
    /// `initial`: it is a QUIC Initial, which its backend must answer
    /// (passive health judges the session).
    fn miss(
        &mut self,
        a: Arrival,
        key: FlowKey,
        d: DatagramRef,
        initial: bool,
    ) -> Result<SessionId, Outcome> {
        if let Some(reason) = self.refused.check(a.listener, &key, self.now_ms) {
            self.drop_datagram(reason);
            return Err(Outcome::Done);
        }
        let hash = self.owner_hash(a.listener, &key);
        let hops = a.via.hops();
        if self.successor.is_some() {
            // Handing over: a session another old worker still has is
            // served there; any other goes to the successor, which makes
            // the sessions now (one more hop whatever the count: what it
            // sends here is only what this generation still has).
            // Another slot's: its old worker has it, or passes it on to its
            // successor (not yet published) that has.
            let to = match self.owners.lookup(hash) {
                Some(o)
                    if usize::from(o.worker) != self.id
                        && (self.owners.is_live(o) || self.unpublished_successor(o)) =>
                {
                    usize::from(o.worker)
                }
                _ => self.id,
            };
            self.hand_over(to, a, d, hops.saturating_add(1));
            return Err(Outcome::Done);
        }
        let mut inherited = None;
        // Standing by while the predecessor serves, a session of the old
        // generation is served there until it comes (in order, on the
        // predecessor's channel: what it sends back arrives after the
        // session); once the predecessor is gone, or the slots are
        // published, the flow is routed as any.
        let standby = self.standby.filter(|p| self.owners.is_live(*p));
        if hops < MAX_HOPS {
            match self.owners.lookup(hash) {
                // Ours, but unknown here: what made it ours (a transfer, a
                // learned alias) is in the inbox.
                Some(o) if o == self.me && a.via == Via::Socket => return Err(Outcome::Deferred),
                // Another slot's successor has it, not yet published.
                Some(o)
                    if standby.is_some()
                        && o.worker != self.me.worker
                        && self.unpublished_successor(o) =>
                {
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
        match self.owners.claim(hash, self.me) {
            Claim::Mine => {}
            // Claimed by another worker an instant ago.
            Claim::Taken(o) if hops < MAX_HOPS && standby.is_none() => {
                self.hand_over(usize::from(o.worker), a, d, hops + 1);
                return Err(Outcome::Done);
            }
            // Out of hops: it is ours now.
            Claim::Taken(_) => self.owners.assign(hash, self.me),
            Claim::Full => self.counters.incr(Counter::OwnersFull),
        }
        match self.open_session(a, key, hash, inherited, initial) {
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
        if self.draining {
            return Err(DropReason::Draining);
        }
        if self.sessions.admit(a.listener).is_err() {
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
            None => self.open_path(sid, a.client, a.local_ip),
        };
        if let Err(reason) = opened {
            self.sessions.remove(sid);
            return Err(reason);
        }
        self.hint_port(sid, hash);
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
        let pid = self.link_first(sid, path)?;
        self.counters.incr(Counter::PathsCreated);
        self.counters.incr(Counter::PathsInherited);
        Some(pid)
    }

    /// A forward of `len` bytes to backend `backend` of `listener`.
    fn count_forward(&mut self, listener: usize, backend: u16, len: usize) {
        self.counters.incr(Counter::TxPackets);
        self.counters.add(Counter::TxBytes, len as u64);
        let row = self.row_of(listener, backend);
        self.counters.backend_add(row, BackendCounter::TxPackets, 1);
        self.counters
            .backend_add(row, BackendCounter::TxBytes, len as u64);
    }

    /// Backend `backend` of `listener`'s row of counters.
    fn row_of(&self, listener: usize, backend: u16) -> Option<u16> {
        self.routes.get(listener)?.row(usize::from(backend))
    }

    /// The ownership-table hashes of session `sid`'s keys.
    fn key_hashes(&self, sid: SessionId) -> Vec<u64> {
        self.sessions.get(sid).map_or_else(Vec::new, |s| {
            s.keys().map(|k| self.owner_hash(s.listener, k)).collect()
        })
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
            s.handoff_streak = (0, 0);
        }
        let (listener, backend) = (s.listener, s.backend);
        let Some(p) = self.paths.path_mut(pid) else {
            return;
        };
        p.last_client_ms = now;
        let to = self.routes[listener].backends[usize::from(backend)];
        if moved {
            // A relayed path's client moved (`follow`): its home re-points
            // its relay and then forwards this datagram, so no reply to it
            // can reach the old address.
            let p = p.clone();
            self.tell_home_moved(&p, d);
            self.counters.incr(Counter::HandoffOut);
        } else {
            self.actions.push(Action::Forward {
                sock: p.sock,
                to,
                datagram: d,
            });
            self.count_forward(listener, backend, len);
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
        let offer = s.transferring.as_ref()?;
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
        if usize::from(s.path_count) >= route.max_paths {
            self.evict_lru(sid);
        }
        self.open_path(sid, client, local_ip)
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

    /// Inserts `path` as the first of session `sid`'s paths.
    fn link_first(&mut self, sid: SessionId, mut path: Path) -> Option<PathId> {
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
    fn evict_lru(&mut self, sid: SessionId) {
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        let mut oldest: Option<(u64, PathId)> = None;
        let mut pid = s.first_path;
        while let Some(p) = self.paths.path(pid) {
            if oldest.is_none_or(|(t, _)| p.last_active_ms() < t) {
                oldest = Some((p.last_active_ms(), pid));
            }
            pid = p.next;
        }
        if let Some((_, pid)) = oldest {
            self.close_path(pid);
            self.counters.incr(Counter::PathsEvicted);
        }
    }

    /// Closes a path: unlinks it from its session, cools its slot, and tells
    /// its socket's home when that is another worker.
    fn close_path(&mut self, pid: PathId) {
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
        let cool = self.routes.get(listener).map_or(0, |r| r.reuse_delay_ms);
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
        if let Some(Home::Borrowed(home)) = self.paths.sock(p.sock).map(|s| s.home) {
            let upstream = self.paths.sock(p.sock).map(|s| s.local);
            if let Some(upstream) = upstream {
                let route = &self.routes[p.listener];
                let control = Control::PathClosed(PathRef {
                    key: p.key,
                    upstream,
                    backend: route.backends[usize::from(p.backend)],
                });
                self.control(usize::from(home.worker), p.listener, control, Vec::new());
            }
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

    fn control(&mut self, to: usize, listener: usize, control: Control, socks: Vec<SockId>) {
        let frame = control.encode(self.id as u16, self.routes[listener].ident);
        self.actions.push(Action::Control {
            to,
            frame,
            socks,
            payload: None,
        });
    }

    /// A control frame for a listener by its identity (one we may not have).
    fn control_to(&mut self, to: usize, ident: u64, control: Control) {
        let frame = control.encode(self.id as u16, ident);
        let socks = Vec::new();
        self.actions.push(Action::Control {
            to,
            frame,
            socks,
            payload: None,
        });
    }

    /// Counts a handed-over datagram against its session; a flow the kernel
    /// keeps delivering to another worker moves there.
    fn note_handoff(&mut self, sid: SessionId, from: u16) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let (worker, count) = s.handoff_streak;
        s.handoff_streak = if worker == from {
            (from, count.saturating_add(1))
        } else {
            (from, 1)
        };
        if s.handoff_streak.1 >= TRANSFER_AFTER && usize::from(from) != self.id {
            self.transfer(sid, usize::from(from));
        }
    }

    /// Offers session `sid` to worker `to`, with a copy of each path's
    /// socket. It stays here, served as before, until `to` answers.
    fn transfer(&mut self, sid: SessionId, to: usize) {
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        // Not twice at once, and not to a worker that is leaving; handing
        // over, only to the successor.
        let to_owner = self.live_at(to);
        if s.transferring.is_some()
            || to_owner.is_none()
            || (self.successor.is_some() && to != self.id)
        {
            if let Some(s) = self.sessions.get_mut(sid) {
                s.handoff_streak = (0, 0);
            }
            return;
        }
        let route = &self.routes[s.listener];
        let mut paths = Vec::with_capacity(usize::from(s.path_count));
        let mut socks = Vec::with_capacity(usize::from(s.path_count));
        let mut upstreams = Vec::with_capacity(usize::from(s.path_count));
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
                });
                socks.push(p.sock);
                upstreams.push(sock.local);
            }
            pid = p.next;
        }
        let offer = Offer {
            to: to as u16,
            since_ms: self.now_ms,
            upstreams,
            aliases: s.aliases.len(),
        };
        let transfer = Transfer {
            key: s.key,
            aliases: s.aliases.clone(),
            backend: s.backend,
            backend_addr: route.backends[usize::from(s.backend)],
            paths,
        };
        let listener = s.listener;
        if let Some(s) = self.sessions.get_mut(sid) {
            s.transferring = Some(Box::new(offer));
        }
        self.control(to, listener, Control::Transfer(transfer), socks);
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
            if s.awaiting_since_ms.take().is_some() {
                self.counters.backend_add(row, BackendCounter::Answered, 1);
            }
        }
        self.actions.push(Action::Reply {
            listener,
            to: client,
            from_ip: local_ip,
            datagram: d,
        });
        self.counters.incr(Counter::RepliesOut);
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
            if self.sessions.lookup(listener, &scid) == Some(sid) {
                return;
            }
            if self.sessions.add_alias(sid, scid) && self.owners.claim(hash, self.me) == Claim::Mine
            {
                self.hint_port(sid, hash);
            }
            return;
        }
        // A relay: the session's owner is elsewhere. Point the alias at it
        // now, then tell it (once: the ownership table says it is done).
        let owner_hash = self.owner_hash(listener, &key);
        let Some(owner) = self.owners.lookup(owner_hash).filter(|o| self.live(*o)) else {
            return;
        };
        if self.owners.lookup(hash) == Some(owner) {
            return;
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
        let (listener, key, backend, sock) = (p.listener, p.key, p.backend, p.sock);
        let Some(upstream) = self.paths.sock(sock).map(|s| s.local) else {
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
            let path = PathRef {
                key,
                upstream,
                backend: self.routes[listener].backends[usize::from(backend)],
            };
            self.control(
                usize::from(owner.worker),
                listener,
                Control::Activity(path),
                Vec::new(),
            );
        }
    }

    /// In follow mode a relayed path's client moved: its home re-points the
    /// relay, then forwards `d` (the datagram that moved it).
    fn tell_home_moved(&mut self, p: &Path, d: DatagramRef) {
        let Some(sock) = self.paths.sock(p.sock) else {
            return;
        };
        if let Home::Borrowed(home) = sock.home {
            let route = &self.routes[p.listener];
            let control = Control::PathMoved {
                path: PathRef {
                    key: p.key,
                    upstream: sock.local,
                    backend: route.backends[usize::from(p.backend)],
                },
                client: p.client,
                local_ip: p.local_ip,
            };
            let frame = control.encode(self.id as u16, route.ident);
            self.actions.push(Action::Control {
                to: usize::from(home.worker),
                frame,
                socks: Vec::new(),
                payload: Some(d),
            });
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
                listener,
                control,
                payload: carried,
                payload_at,
            } => {
                let Some(listener) = self.listener_of(listener) else {
                    // A listener we do not have (a reload reached one of us
                    // first): an offer is refused, so the session stays.
                    if let Control::Transfer(t) = control {
                        let done = Control::TransferDone {
                            key: t.key,
                            accepted: false,
                        };
                        self.control_to(usize::from(from), listener, done);
                    }
                    return Outcome::Done;
                };
                match control {
                    Control::Transfer(t) => self.transfer_in(from, listener, t, fds),
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
                }
                Outcome::Done
            }
        }
    }

    fn listener_of(&self, ident: u64) -> Option<usize> {
        self.routes.iter().position(|r| r.ident == ident)
    }

    /// Takes over a session another worker offers, with its paths.
    fn transfer_in(&mut self, from: u16, listener: usize, t: Transfer, fds: usize) {
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
        let refused = if self.successor.is_some() {
            Some("handing its own sessions over")
        } else if fds != t.paths.len() {
            Some("its sockets did not arrive")
        } else if !backend_ok {
            Some("the backend lists differ")
        } else if self.sessions.lookup(listener, &t.key).is_some() {
            Some("a session of its key is here")
        } else if self.draining {
            Some("draining")
        } else if self.sessions.admit(listener).is_err() {
            Some("at max_sessions")
        } else {
            None
        };
        if let Some(why) = refused {
            tracing::debug!(worker = self.id, from, "transfer refused: {why}");
            accept(self, false);
            return;
        }
        let backends = route.backends.len();
        let mut session = Session::new(listener, t.key, t.backend, self.now_ms);
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
            self.link_first(sid, path);
        }
        let me = self.me;
        for hash in self.key_hashes(sid) {
            self.owners.assign(hash, me);
        }
        self.counters.incr(Counter::TransfersIn);
        accept(self, true);
    }

    /// The answer to a transfer we offered.
    fn transfer_done(&mut self, from: u16, listener: usize, key: FlowKey, accepted: bool) {
        let Some(sid) = self.sessions.lookup(listener, &key) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        // An answer to an offer we had given up on (its receiver seemed
        // gone) still counts: the receiver owns the session now.
        if s.transferring.as_ref().is_some_and(|o| o.to != from) {
            return;
        }
        let offer = s.transferring.take();
        if !accepted {
            s.handoff_streak = (0, 0);
            // The successor will not have it: it is not offered again (the
            // handover would loop until its timeout).
            if self.successor.is_some() && usize::from(from) == self.id {
                self.refused_by_successor.insert(sid);
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
        let (key, backend) = (s.key, s.backend);
        let new_aliases: Vec<FlowKey> = s.aliases.get(offer.aliases..).unwrap_or(&[]).to_vec();
        let mut now_here = Vec::new();
        let mut pid = s.first_path;
        while let Some(p) = self.paths.path(pid) {
            if let Some(local) = self.paths.sock(p.sock).map(|s| s.local) {
                if offer.upstreams.contains(&local) {
                    now_here.push(local);
                }
            }
            pid = p.next;
        }
        let Some(backend_addr) = self.routes[listener]
            .backends
            .get(usize::from(backend))
            .copied()
        else {
            return;
        };
        for upstream in offer.upstreams.iter().filter(|u| !now_here.contains(u)) {
            let control = Control::PathClosed(PathRef {
                key,
                upstream: *upstream,
                backend: backend_addr,
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
    /// session closed it before our acceptance reached it).
    fn path_closed(&mut self, listener: usize, path: PathRef) {
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
            self.close_path(pid);
        }
    }

    /// The owner of a path we relay says its client moved, and hands us the
    /// datagram that moved it to forward.
    fn relay_moved(
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
        let Some((d, len)) = carried else {
            return;
        };
        self.counters.incr(Counter::HandoffIn);
        let relayed = relay
            .and_then(|pid| self.paths.path(pid))
            .map(|p| (p.sock, p.listener, p.backend));
        match relayed {
            Some((sock, listener, backend)) => {
                self.actions.push(Action::Forward {
                    sock,
                    to: path.backend,
                    datagram: d,
                });
                self.count_forward(listener, backend, len);
            }
            // The relay closed meanwhile: nothing carries the datagram.
            None => self.drop_datagram(DropReason::Handoff),
        }
    }

    /// A relaying home saw replies on one of our paths.
    fn relayed_activity(&mut self, listener: usize, path: PathRef) {
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
            let sid = p.session;
            if let Some(s) = self.sessions.get_mut(sid as usize) {
                s.last_active_ms = now;
            }
        }
    }

    /// Periodic work, with a budget of sessions and sockets to look at (the
    /// whole table about once a second): idle paths and sessions close,
    /// relays whose owner is gone close, borrowed sockets whose home is gone
    /// are adopted, cooled ports come back.
    pub fn tick(&mut self, now_ms: u64, budget: usize) {
        self.now_ms = now_ms;
        for sid in self.sessions.sweep(budget) {
            self.sweep_session(sid);
        }
        let idle_close = self
            .routes
            .iter()
            .map(|r| r.session_idle_ms)
            .max()
            .unwrap_or(60_000);
        let borrowed = self
            .paths
            .tick(now_ms, idle_close, budget, &mut self.sockets);
        for (sock, home) in borrowed {
            if !self.live(home) {
                self.orphaned(sock, home);
            }
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
        if let Some((to, since)) = s.transferring.as_ref().map(|o| (o.to, o.since_ms)) {
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
                Some(_) if waited < OFFER_LIFETIME_MS => {
                    if let Some(s) = self.sessions.get_mut(sid) {
                        s.handoff_streak = (0, 0);
                    }
                    return;
                }
                // An answer that never came: the offer is void.
                Some(_) => self.transfer_done(to, listener, key, false),
                // The receiver died or is leaving: its replacement may read
                // the offer from the inbox and say yes, which must still be
                // reconciled; meanwhile the session stays, as above.
                None if waited < OFFER_LIFETIME_MS => {
                    if let Some(s) = self.sessions.get_mut(sid) {
                        s.handoff_streak = (0, 0);
                    }
                    return;
                }
                None => {
                    if let Some(s) = self.sessions.get_mut(sid) {
                        s.transferring = None;
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
    fn close_session(&mut self, sid: SessionId) {
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

    /// The home of borrowed socket `sock` is gone: take the socket over, or
    /// (another worker took it first) give up its paths here.
    fn orphaned(&mut self, sock: SockId, home: Owner) {
        let Some(local) = self.paths.sock(sock).map(|s| s.local) else {
            return;
        };
        let listener = self.paths.sock(sock).map_or(0, |s| s.listener);
        let cool = self.routes.get(listener).map_or(0, |r| r.reuse_delay_ms);
        if self.sockets.adopt(sock, local, home) {
            self.paths.adopted(sock, self.now_ms, cool);
        } else {
            for pid in self.paths.on_sock(sock) {
                self.close_path(pid);
            }
        }
    }

    /// Applies a reload: `routes` replace the old ones (`map[j]` is old
    /// listener j's new index). Sessions of removed listeners close; a
    /// session whose backend was removed is re-routed (its paths close, and
    /// its next datagram opens one to its new backend).
    pub fn reconfigure(&mut self, routes: Vec<Route>, map: &[Option<usize>]) {
        // Old backend index -> new, per old listener.
        let backends: Vec<Vec<Option<u16>>> = self
            .routes
            .iter()
            .enumerate()
            .map(|(j, old)| {
                let new = map.get(j).copied().flatten().map(|i| &routes[i]);
                old.backends
                    .iter()
                    .map(|addr| new.and_then(|n| n.backend_of(*addr)))
                    .collect()
            })
            .collect();
        // Sessions keep their backend where it is still listed; the others
        // get the one their key maps to now.
        let mut rerouted = Vec::new();
        for sid in self.sessions.ids() {
            let Some(s) = self.sessions.get(sid) else {
                continue;
            };
            let (listener, backend, key) = (s.listener, s.backend, s.key);
            let Some(to) = map.get(listener).copied().flatten() else {
                self.close_session(sid);
                continue;
            };
            match backends[listener][usize::from(backend)] {
                Some(b) => rerouted.push((sid, b, Vec::new(), false)),
                None => {
                    // Its paths close; where their socket has the new
                    // backend's slot free, the new path takes it, so the
                    // backend sees the proxy address it would have seen.
                    let old = self.close_paths(sid);
                    rerouted.push((sid, routes[to].pick(key.as_bytes()) as u16, old, true));
                }
            }
        }
        // Relays to removed backends or listeners close too.
        for pid in self.paths.ids() {
            let Some(p) = self.paths.path(pid) else {
                continue;
            };
            let gone = map.get(p.listener).copied().flatten().is_none()
                || backends[p.listener][usize::from(p.backend)].is_none();
            if gone {
                self.close_path(pid);
            }
        }
        let counts: Vec<usize> = routes.iter().map(|r| r.backends.len()).collect();
        self.paths.remap(map, &backends, &counts);
        for (sid, backend, old, moved) in rerouted {
            let Some(s) = self.sessions.get_mut(sid) else {
                continue;
            };
            s.backend = backend;
            if !moved {
                continue;
            }
            self.counters.incr(Counter::SessionsRerouted);
            let (listener, key) = (s.listener, s.key);
            for (sock, client, local_ip, last) in old {
                let same_family = routes[listener].ipv4.get(usize::from(backend)).copied()
                    == self.paths.sock(sock).map(|s| s.local.is_ipv4());
                let free = self
                    .paths
                    .sock(sock)
                    .is_some_and(|s| s.home == Home::Here && s.is_free(backend));
                if !(same_family && free) {
                    continue;
                }
                let path = Path::new(listener, backend, sock, client, local_ip, key, last);
                self.link_first(sid, path);
            }
        }
        let limits: Vec<usize> = routes.iter().map(|r| r.max_sessions).collect();
        self.sessions.remap(map, &limits);
        self.sessions.recount();
        // A backend no longer configured has no sessions here any more.
        let rows = |rs: &[Route]| -> Vec<u16> {
            rs.iter()
                .flat_map(|r| r.rows.iter().flatten().copied())
                .collect()
        };
        let kept = rows(&routes);
        for row in rows(&self.routes) {
            if !kept.contains(&row) {
                self.counters
                    .backend_set(Some(row), BackendCounter::SessionsActive, 0);
            }
        }
        self.routes = routes;
        // Sockets outside a listener's new ranges take no new paths.
        let retire: Vec<SockId> = self
            .paths
            .socks
            .iter()
            .filter(|(_, s)| s.home == Home::Here && !self.sockets.in_range(s.listener, s.local))
            .map(|(id, _)| id as SockId)
            .collect();
        for sock in retire {
            if let Some(s) = self.paths.sock_mut(sock) {
                s.retired = true;
            }
        }
    }

    /// Closes session `sid`'s paths (it is moving to another backend): what
    /// each was, (socket, client, local address, last client datagram), so
    /// its new paths can take the same sockets where their slot is free.
    #[allow(clippy::type_complexity)]
    fn close_paths(&mut self, sid: SessionId) -> Vec<(SockId, SocketAddr, Option<IpAddr>, u64)> {
        let mut old = Vec::new();
        while let Some(pid) = self
            .sessions
            .get(sid)
            .map(|s| s.first_path)
            .filter(|p| *p != NONE)
        {
            if let Some(p) = self.paths.path(pid) {
                old.push((p.sock, p.client, p.local_ip, p.last_client_ms));
            }
            self.close_path(pid);
        }
        old
    }

    /// Follows the backend states passive health decided for `listener`
    /// (`down[b]`): new sessions avoid the down ones, and with
    /// `on_backend_down = "reroute"` live sessions on them move to the
    /// backend their key maps to now.
    pub fn set_backend_states(&mut self, listener: usize, down: &[bool]) {
        let Some(route) = self.routes.get_mut(listener) else {
            return;
        };
        if !route.set_down(down) || !route.reroute_when_down {
            return;
        }
        for sid in self.sessions.ids() {
            let Some(s) = self.sessions.get(sid) else {
                continue;
            };
            if s.listener != listener || !self.routes[listener].is_down(usize::from(s.backend)) {
                continue;
            }
            let key = s.key;
            let to = self.routes[listener].pick(key.as_bytes()) as u16;
            // Not onto another down backend (every one is: nothing to
            // move to), and not while a transfer names its backend.
            if to == s.backend
                || self.routes[listener].is_down(usize::from(to))
                || s.transferring.is_some()
            {
                continue;
            }
            let old = self.close_paths(sid);
            if let Some(s) = self.sessions.get_mut(sid) {
                s.backend = to;
                s.awaiting_since_ms = None;
            }
            self.counters.incr(Counter::SessionsRerouted);
            // Where the old socket has the new backend's slot free, the new
            // path takes it; otherwise the next datagram opens one.
            for (sock, client, local_ip, last) in old {
                let same_family = self.routes[listener].ipv4.get(usize::from(to)).copied()
                    == self.paths.sock(sock).map(|s| s.local.is_ipv4());
                let free = self
                    .paths
                    .sock(sock)
                    .is_some_and(|s| s.home == Home::Here && s.is_free(to));
                if same_family && free {
                    let path = Path::new(listener, to, sock, client, local_ip, key, last);
                    self.link_first(sid, path);
                }
            }
        }
        self.sessions.recount();
    }

    /// Listeners routed now.
    pub fn listeners(&self) -> usize {
        self.routes.len()
    }

    /// Listener `l`'s backends' rows of counters (and of health state).
    pub fn backend_rows(&self, l: usize) -> Vec<Option<u16>> {
        self.routes.get(l).map_or_else(Vec::new, |r| r.rows.clone())
    }

    /// Draining: live sessions are served, no new ones are made.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// A `Forward` of `len` bytes on `sock` to `to` could not be sent (in
    /// the flush that made it: its counts are taken back before anything
    /// is published).
    pub fn forward_failed(&mut self, sock: SockId, to: SocketAddr, len: usize) {
        self.counters.add(Counter::TxPackets, u64::MAX);
        self.counters
            .add(Counter::TxBytes, (len as u64).wrapping_neg());
        self.drop_datagram(DropReason::Upstream);
        let row = self.row_toward(sock, to);
        self.counters
            .backend_add(row, BackendCounter::TxPackets, u64::MAX);
        self.counters
            .backend_add(row, BackendCounter::TxBytes, (len as u64).wrapping_neg());
        self.counters
            .backend_add(row, BackendCounter::SendErrors, 1);
    }

    /// The row of backend `to` of the listener whose socket `sock` is.
    fn row_toward(&self, sock: SockId, to: SocketAddr) -> Option<u16> {
        let listener = self.paths.sock(sock)?.listener;
        let b = self.routes.get(listener)?.backend_of(to)?;
        self.row_of(listener, b)
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

    /// Where the router's clock (ms since its loop started) is on
    /// CLOCK_MONOTONIC: backend reply times are published on that clock.
    pub fn set_epoch(&mut self, epoch_ms: u64) {
        self.epoch_ms = epoch_ms;
    }

    /// A `Reply` could not be sent.
    pub fn reply_failed(&mut self) {
        self.counters.add(Counter::RepliesOut, u64::MAX);
        self.drop_datagram(DropReason::Reply);
    }

    /// A `Handoff` could not be delivered, in the flush that made it (its
    /// `handoff_out` is taken back before anything is published).
    pub fn handoff_failed(&mut self) {
        self.counters.add(Counter::HandoffOut, u64::MAX);
        self.drop_datagram(DropReason::Handoff);
    }

    /// A frame carrying a client datagram waits behind a full inbox, in the
    /// flush that made it: the datagram is not handed on yet. It stays
    /// taken-in and unsettled (a kill meanwhile books it as worker_lost)
    /// until [`Router::handoff_queue_settled`] says what became of it, so
    /// no published count goes back.
    pub fn handoff_queued(&mut self) {
        self.counters.add(Counter::HandoffOut, u64::MAX);
    }

    /// Of the datagrams queued behind full inboxes, `sent` went and `lost`
    /// were given up.
    pub fn handoff_queue_settled(&mut self, sent: u64, lost: u64) {
        self.counters.add(Counter::HandoffOut, sent);
        for _ in 0..lost {
            self.drop_datagram(DropReason::Handoff);
        }
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
                s.transferring = None;
                s.handoff_streak = (0, 0);
            }
        }
    }
}

#[cfg(test)]
mod harness;
#[cfg(test)]
mod tests;
