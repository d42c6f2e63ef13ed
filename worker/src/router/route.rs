//! Backend choice and health: a listener's [`Route`] picks a new flow's
//! backend (QUIC-LB server ID, else Maglev over the backends that are up),
//! and the backend states the supervisor decides are applied here.

use std::net::SocketAddr;

use udpshard_config as config;
use udpshard_shared::maglev::MaglevError;
use udpshard_shared::owners::backend_tag;
use udpshard_shared::quic_lb::QuicLbRouter;
use udpshard_shared::stats::Counter;
use udpshard_shared::{stable_hash, Dissector, Maglev};

use super::admission::Admission;
use super::{Owners, Router, Sockets};
use crate::session::SessionId;

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
    pub(super) tags: Vec<u16>,
    /// `rows[b]`: backend b's row of counters in the stats region (`None`:
    /// uncounted).
    pub(super) rows: Vec<Option<u16>>,
    /// `ipv4[b]`: backend b's address family.
    pub(super) ipv4: Vec<bool>,
    by_addr: ahash::AHashMap<SocketAddr, u16>,
    quic_lb: Option<QuicLbRouter>,
    /// QUIC: learn the server's chosen connection IDs from its replies.
    pub(super) learns_server_cids: bool,
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
    /// What an unauthenticated datagram may create here.
    pub(crate) admission: Admission,
    /// With `proxy_protocol = "v2"`: what each forward's header needs.
    pub(super) proxy_v2: Option<ProxyV2>,
    /// `session_log`: one session in this many is logged (0: none).
    pub(super) session_log: u64,
}

/// What a listener's PROXY v2 headers need beyond each path's client.
#[derive(Debug, Clone)]
pub(super) struct ProxyV2 {
    /// The listener's address: its port is the one clients reached, and so
    /// is its IP unless it is a wildcard (then each path's own).
    pub local: SocketAddr,
    /// Per backend: the largest datagram its path carries unfragmented.
    pub room: Vec<usize>,
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
            admission: Admission::new(cfg),
            proxy_v2: (cfg.proxy_protocol == config::ProxyProtocol::V2).then(|| ProxyV2 {
                local: cfg.bind,
                room: vec![usize::MAX; cfg.backends.len()],
            }),
            session_log: u64::from(cfg.session_log),
        })
    }

    /// With PROXY v2 headers: the address the listener is bound to (its
    /// port, the one the kernel picked for port 0), and per backend the
    /// largest datagram its path carries (the shell measures both).
    pub fn set_proxy_v2_path(&mut self, local: SocketAddr, room: Vec<usize>) {
        if let Some(p) = self.proxy_v2.as_mut() {
            p.local = local;
            if room.len() == self.backends.len() {
                p.room = room;
            }
        }
    }

    /// Whether `key`'s session is one `session_log` samples: by a hash of
    /// the key alone, so every host of a fleet samples the same ones.
    pub fn samples(&self, key: &[u8]) -> bool {
        self.session_log > 0 && udpshard_shared::hash::stable_hash2(key) % self.session_log == 0
    }

    /// Whether forwards carry a PROXY v2 header.
    pub fn sends_proxy_v2(&self) -> bool {
        self.proxy_v2.is_some()
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

    pub(super) fn backend_of(&self, addr: SocketAddr) -> Option<u16> {
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

impl<O: Owners, S: Sockets> Router<O, S> {
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
        // The sessions move a batch per tick from here (`reroute_step`):
        // a flip costs no pause in proportion to the table.
        if self.reroute.len() <= listener {
            self.reroute.resize(listener + 1, None);
        }
        self.reroute[listener] = Some(0);
    }

    /// Moves up to `batch` table slots' worth of sessions off the backends
    /// that are down, where a reroute is under way.
    pub(super) fn reroute_step(&mut self, batch: usize) {
        let mut moved = false;
        for listener in 0..self.reroute.len() {
            let Some(from) = self.reroute[listener] else {
                continue;
            };
            let end = (from + batch).min(self.sessions.span());
            for sid in from..end {
                moved |= self.reroute_session(listener, sid);
            }
            self.reroute[listener] = (end < self.sessions.span()).then_some(end);
        }
        if moved {
            self.sessions.recount();
        }
    }

    /// Session `sid`, if it is `listener`'s and its backend is down, moves
    /// to the backend its key maps to now; true when it moved.
    fn reroute_session(&mut self, listener: usize, sid: SessionId) -> bool {
        let Some(s) = self.sessions.get(sid) else {
            return false;
        };
        let Some(route) = self.routes.get(listener) else {
            return false;
        };
        if s.listener != listener || !route.is_down(usize::from(s.backend)) {
            return false;
        }
        let to = route.pick(s.key.as_bytes()) as u16;
        // Not onto another down backend (every one is: nothing to move
        // to), and not while a transfer names its backend.
        if to == s.backend || route.is_down(usize::from(to)) || s.offer().is_some() {
            return false;
        }
        let old = self.close_paths(sid);
        if let Some(s) = self.sessions.get_mut(sid) {
            s.backend = to;
            s.awaiting_since_ms = None;
        }
        self.counters.incr(Counter::SessionsRerouted);
        let v4 = self.routes[listener].ipv4.get(usize::from(to)).copied();
        self.reopen_paths(sid, listener, to, v4, old);
        true
    }
}
