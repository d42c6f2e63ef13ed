//! What happens to a datagram, top to bottom. The event loop calls in here
//! with bytes it read; everything here is routing, sessions and counting.
//!
//! Client -> backend: dissect the flow key (malformed: count, drop), find the
//! session or make one (over the listener's limit: count, drop), send on the
//! session's connected upstream socket (failure: count, drop).
//! Backend -> client: read the upstream socket, send from the listener socket
//! to the client's current address (failure: count, drop).

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use quinn_udp::{Transmit, UdpSockRef};
use udpshard_shared::stats::Counter;

use crate::counters::Counters;
use crate::listener::Listener;
use crate::session::{Session, SessionId, SessionTable};
use crate::sockio;

/// Session ids map to poll tokens above the listeners' and control's.
pub const UPSTREAM_TOKEN_BASE: usize = 1 << 20;

/// Replies read from one upstream socket per wakeup before yielding to the
/// rest of the loop.
const REPLY_BUDGET: usize = 64;

/// The largest UDP payload: nothing is ever truncated.
pub const MAX_DATAGRAM: usize = 65_536;

pub struct DataPath {
    pub listeners: Vec<Listener>,
    pub sessions: SessionTable<UdpSocket>,
    pub counters: Counters,
    /// Coarse monotonic clock (ms), advanced once per loop iteration.
    pub now_ms: u64,
    reply_buf: Vec<u8>,
    last_warning_ms: u64,
}

impl DataPath {
    pub fn new(
        listeners: Vec<Listener>,
        limits: Vec<(usize, u64)>,
        counters: Counters,
    ) -> DataPath {
        DataPath {
            listeners,
            sessions: SessionTable::new(limits),
            counters,
            now_ms: 0,
            reply_buf: vec![0; MAX_DATAGRAM],
            last_warning_ms: 0,
        }
    }

    /// A datagram from `client` on listener `l`, sent to `local_ip` (known
    /// when the listener is a wildcard).
    pub fn client_datagram(
        &mut self,
        registry: &Registry,
        l: usize,
        client: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
    ) {
        self.counters.incr(Counter::RxPackets);
        self.counters.add(Counter::RxBytes, datagram.len() as u64);
        let listener = &self.listeners[l];
        let Ok(key) = listener.dissector.flow_key(datagram, client) else {
            self.counters.incr(Counter::DropMalformed);
            return;
        };
        let local_ip = if listener.wildcard { local_ip } else { None };
        let id = match self.sessions.lookup(l, &key) {
            Some(id) => id,
            None => match self.open_session(registry, l, key, client, local_ip) {
                Some(id) => id,
                None => return,
            },
        };
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        // A client that changed address (NAT rebinding) gets replies at the
        // new one from now on.
        session.client = client;
        if local_ip.is_some() {
            session.local_ip = local_ip;
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

    fn open_session(
        &mut self,
        registry: &Registry,
        l: usize,
        key: udpshard_shared::FlowKey,
        client: SocketAddr,
        local_ip: Option<IpAddr>,
    ) -> Option<SessionId> {
        if self.sessions.admit(l).is_err() {
            self.counters.incr(Counter::DropSessionLimit);
            return None;
        }
        let listener = &self.listeners[l];
        let backend = listener.maglev.backend_for(key.as_bytes());
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
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        let fd = session.upstream.as_raw_fd();
        let listener = &self.listeners[session.listener];
        for _ in 0..REPLY_BUDGET {
            let len = match sockio::recv_with_drops(fd, &mut self.reply_buf) {
                Ok((len, drops)) => {
                    if let Some(d) = drops {
                        let new = d.wrapping_sub(session.upstream_drops_seen);
                        session.upstream_drops_seen = d;
                        self.counters
                            .add(Counter::DropUpstreamSocket, u64::from(new));
                    }
                    len
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // An ICMP error for an earlier datagram (backend port
                // closed): already counted as sent; nothing to relay.
                Err(_) => continue,
            };
            self.counters.incr(Counter::RepliesIn);
            session.last_active_ms = self.now_ms;
            let transmit = Transmit {
                destination: session.client,
                ecn: None,
                contents: &self.reply_buf[..len],
                segment_size: None,
                src_ip: session.local_ip,
            };
            match listener
                .io
                .try_send(UdpSockRef::from(&listener.socket), &transmit)
            {
                Ok(()) => self.counters.incr(Counter::RepliesOut),
                Err(_) => self.counters.incr(Counter::DropReply),
            }
        }
    }

    /// Periodic work: expire idle sessions (a slice of the table per tick)
    /// and read the kernel's drop counts on the listener sockets.
    pub fn tick(&mut self, registry: &Registry, sweep_budget: usize) {
        let counters = &mut self.counters;
        self.sessions
            .sweep(self.now_ms, sweep_budget, |_, session| {
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

    /// Closes every session (the worker is exiting).
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

/// Accounts the upstream socket's last drops before it closes.
fn close_upstream(registry: &Registry, counters: &mut Counters, session: Session<UdpSocket>) {
    let fd = session.upstream.as_raw_fd();
    if let Ok(total) = sockio::socket_drops(fd) {
        counters.add(
            Counter::DropUpstreamSocket,
            u64::from(total.wrapping_sub(session.upstream_drops_seen)),
        );
    }
    let _ = registry.deregister(&mut SourceFd(&fd));
}
