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
    pub(super) fn close_paths(
        &mut self,
        sid: SessionId,
    ) -> Vec<(SockId, SocketAddr, Option<IpAddr>, u64)> {
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
}
