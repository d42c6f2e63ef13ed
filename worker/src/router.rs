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

use udpshard_shared::handoff::HEADER_LEN;
use udpshard_shared::owners::{Claim, Owner, OwnerIndex};
use udpshard_shared::{DropReason, FlowKey};

use crate::counters::Counters;
use crate::paths::{Paths, SockId};
use crate::phase::Phase;
use crate::session::SessionTable;

mod admission;
mod datapath;
mod refusals;
mod reload;
mod route;
mod session_log;
mod sweep;
mod transfer;
mod upgrade;

use refusals::Refusals;
pub use route::{Pick, PickedBy, Route};

pub use crate::paths::Sockets;

/// Consecutive datagrams of a session handed over by the same worker before
/// the session moves there.
pub const TRANSFER_AFTER: u8 = 3;

/// An offered transfer unanswered this long is settled by the ownership
/// table: the receiver records itself as the owner before it answers.
const TRANSFER_TIMEOUT_MS: u64 = 2_000;
/// How long an offer nobody answered is kept for a late answer; the
/// session waits that long before it may be offered again or close.
const OFFER_LIFETIME_MS: u64 = 30_000;
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
    /// The generation of slot `worker`'s latest process, serving or not.
    fn slot_generation(&self, worker: usize) -> Option<u64>;
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
    /// Send `datagram` to backend `to` from upstream socket `sock`, after
    /// the PROXY v2 header [`Router::swap_prefixes`] holds at `prefix`.
    Forward {
        sock: SockId,
        to: SocketAddr,
        datagram: DatagramRef,
        prefix: Option<u32>,
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
    /// Where this process is in its slot's life (`crate::phase`).
    phase: Phase,
    /// CLOCK_MONOTONIC (ms) at `now_ms` 0.
    epoch_ms: u64,
    actions: Vec<Action>,
    /// The PROXY v2 headers the forwards among `actions` name.
    prefixes: Vec<udpshard_shared::proxy_v2::Header>,
    relay_cursor: usize,
    /// Per listener: where a reroute off down backends is, when one is
    /// under way (a slab index).
    reroute: Vec<Option<usize>>,
}

impl<O: Owners, S: Sockets> Router<O, S> {
    /// A router for process `me`, starting in `phase` (`Serving`, or
    /// `Standby` for a binary upgrade's new generation).
    pub fn new(
        me: Owner,
        phase: Phase,
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
            phase,
            epoch_ms: 0,
            actions: Vec::with_capacity(256),
            prefixes: Vec::new(),
            relay_cursor: 0,
            reroute: Vec::new(),
        }
    }

    /// The actions decided since the last call, in order.
    pub fn actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    /// Hands the PROXY v2 headers of the actions just taken to `into`
    /// (which is cleared, and whose capacity the router keeps).
    pub fn swap_prefixes(&mut self, into: &mut Vec<udpshard_shared::proxy_v2::Header>) {
        into.clear();
        std::mem::swap(&mut self.prefixes, into);
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

    /// Listeners routed now.
    pub fn listeners(&self) -> usize {
        self.routes.len()
    }

    /// Listener `l`'s backends' rows of counters (and of health state).
    pub fn backend_rows(&self, l: usize) -> Vec<Option<u16>> {
        self.routes.get(l).map_or_else(Vec::new, |r| r.rows.clone())
    }

    /// Where the router's clock (ms since its loop started) is on
    /// CLOCK_MONOTONIC: backend reply times are published on that clock.
    pub fn set_epoch(&mut self, epoch_ms: u64) {
        self.epoch_ms = epoch_ms;
    }

    fn drop_datagram(&mut self, reason: DropReason) {
        self.counters.incr(reason.counter());
    }

    fn owner_hash(&self, listener: usize, key: &FlowKey) -> u64 {
        self.index.hash(self.routes[listener].ident, key.as_bytes())
    }
}

#[cfg(test)]
mod admission_tests;
#[cfg(test)]
mod faults;
#[cfg(test)]
mod harness;
#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;
