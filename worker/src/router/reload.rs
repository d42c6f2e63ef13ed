//! A reload: new routes replace the old; sessions keep their backend
//! where it is still listed, and the others move to the one their key maps
//! to now.

use std::net::{IpAddr, SocketAddr};

use udpshard_shared::backends::BackendCounter;
use udpshard_shared::stats::Counter;

use super::{Owners, Route, Router, Sockets};
use crate::paths::{Home, Path, SockId, NONE};
use crate::session::SessionId;

impl<O: Owners, S: Sockets> Router<O, S> {
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
                Some(b) => rerouted.push((sid, to, b, Vec::new(), false)),
                None => {
                    // Its paths close; where their socket has the new
                    // backend's slot free, the new path takes it, so the
                    // backend sees the proxy address it would have seen.
                    let old = self.close_paths(sid);
                    let b = routes[to].pick(key.as_bytes()) as u16;
                    rerouted.push((sid, to, b, old, true));
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
        for (sid, to, backend, old, moved) in rerouted {
            let Some(s) = self.sessions.get_mut(sid) else {
                continue;
            };
            s.backend = backend;
            if !moved {
                continue;
            }
            self.counters.incr(Counter::SessionsRerouted);
            // The session's listener index is remapped below; its paths'
            // already are.
            let v4 = routes[to].ipv4.get(usize::from(backend)).copied();
            self.reopen_paths(sid, to, backend, v4, old);
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
        // Listener indices moved: the next backend states start afresh.
        self.reroute.clear();
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

    /// Closes session `sid`'s paths (it is moving to another backend),
    /// saying what each was, so its new paths can take the same sockets
    /// where their slot is free ([`Router::reopen_paths`]).
    pub(super) fn close_paths(&mut self, sid: SessionId) -> Vec<ClosedPath> {
        let mut old = Vec::new();
        while let Some(pid) = self
            .sessions
            .get(sid)
            .map(|s| s.first_path)
            .filter(|p| *p != NONE)
        {
            if let Some(p) = self.paths.path(pid) {
                old.push(ClosedPath {
                    sock: p.sock,
                    client: p.client,
                    local_ip: p.local_ip,
                    last_client_ms: p.last_client_ms,
                });
            }
            self.close_path(pid);
        }
        old
    }

    /// Session `sid` moved to `backend` of `listener` (of family `v4`):
    /// where a socket of its `old` paths has that backend's slot free, the
    /// new path takes it, so the backend sees the proxy address it would
    /// have seen; otherwise the session's next datagram opens one.
    pub(super) fn reopen_paths(
        &mut self,
        sid: SessionId,
        listener: usize,
        backend: u16,
        v4: Option<bool>,
        old: Vec<ClosedPath>,
    ) {
        let Some(key) = self.sessions.get(sid).map(|s| s.key) else {
            return;
        };
        for c in old {
            let usable = self.paths.sock(c.sock).is_some_and(|s| {
                Some(s.local.is_ipv4()) == v4 && s.home == Home::Here && s.is_free(backend)
            });
            if usable {
                let path = Path::new(
                    listener,
                    backend,
                    c.sock,
                    c.client,
                    c.local_ip,
                    key,
                    c.last_client_ms,
                );
                self.link_first(sid, path);
            }
        }
    }
}

/// A path closed because its session moves to another backend.
pub(super) struct ClosedPath {
    sock: SockId,
    client: SocketAddr,
    local_ip: Option<IpAddr>,
    last_client_ms: u64,
}
