//! Upstream sockets as the worker opens them: a (source, port) leased in the
//! state region, then a socket bound to it (the kernel's bind has the last
//! word: a port something else holds is skipped, and cools a while). The
//! [`Sockets`] the router is given.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use udpshard_config as config;
use udpshard_shared::clock::monotonic_ms;
use udpshard_shared::leases::Lease;
use udpshard_shared::owners::Owner;
use udpshard_shared::state::StateRegion;

use crate::paths::{OpenError, SockId, Sockets};
use crate::sockio;

/// Upstream sockets' poll tokens start here (above listeners and control).
pub(crate) const UPSTREAM_TOKEN_BASE: usize = 1 << 20;

/// A port another program holds is not tried again for this long.
const FOREIGN_COOL_MS: u64 = 60_000;
/// After a scan found no free port, new paths are refused at once for this
/// long: exhaustion costs no scan per datagram.
const EXHAUSTED_MS: u64 = 250;
/// After EMFILE, the same for descriptors.
const NO_FD_MS: u64 = 100;
/// Binds tried per open before giving up for now. A port another program
/// holds fails its bind once a minute (the lease table remembers), so this
/// bounds one open's work, not a storm: the next open goes on from there.
const MAX_BINDS: usize = 1024;

/// Where a listener's upstream sockets may bind.
#[derive(Debug)]
struct Range {
    /// Source addresses and their lease rows.
    sources: Vec<(IpAddr, usize)>,
    lo: u16,
    hi: u16,
    cursor: u64,
    /// By family (0: IPv4, 1: IPv6): no port free before this time.
    exhausted_until: [u64; 2],
}

impl Range {
    fn contains(&self, local: SocketAddr) -> bool {
        (self.lo..=self.hi).contains(&local.port())
            && self.sources.iter().any(|(ip, _)| *ip == local.ip())
    }
}

struct Entry {
    socket: UdpSocket,
    /// Where it is bound (`None`: the kernel would not say, so it is only
    /// sent on, never by raw IP).
    local: Option<SocketAddr>,
    /// The (row, port) this worker leases for it; `None` for a borrowed copy.
    lease: Option<(usize, u16)>,
}

pub(crate) struct Upstream {
    me: Owner,
    registry: Registry,
    state: StateRegion,
    socks: Vec<Option<Entry>>,
    ranges: Vec<Range>,
    no_fd_until: u64,
    /// The source address the route to a backend picks, for sockets bound
    /// to the wildcard, and until when that answer is trusted.
    route_sources: ahash::AHashMap<IpAddr, (Option<IpAddr>, u64)>,
    /// Sockets opened from now on read backends' flights as one buffer
    /// (UDP_GRO; `offload = "auto"`). Open ones keep what they had: a
    /// buffer already coalesced would read as one datagram without it.
    gro: bool,
    /// The longest `port_reuse_delay` of the listeners: how long a lease
    /// given up with a borrowed copy cools.
    reuse_cool_ms: u64,
}

/// How long a route's source address is trusted before it is asked again
/// (and on every reload). An address that went away meanwhile: IPv6 refuses
/// the raw send (the datagram goes out on its socket); IPv4 sends it with
/// the old source for at most this long.
const ROUTE_SOURCE_MS: u64 = 1_000;

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), the
/// default of `upstream_ports`.
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// The source address the kernel picks for a datagram to `dst` from a
/// wildcard-bound socket: a socket connected there (connect() on UDP sends
/// nothing) says what its route chose. The connect takes an ephemeral port
/// for an instant (once per backend a second): with `upstream_ports` in the
/// ephemeral range, a bind of that very port at that instant fails, and the
/// port cools as if another program held it.
fn route_source(dst: SocketAddr) -> Option<IpAddr> {
    let probe = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::DGRAM.cloexec(),
        Some(socket2::Protocol::UDP),
    )
    .ok()?;
    if dst.is_ipv6() {
        probe.set_only_v6(true).ok()?;
    }
    probe.connect(&dst.into()).ok()?;
    let ip = probe.local_addr().ok()?.as_socket()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The source addresses of a listener: as configured, else the wildcard of
/// each family (the route to the backend picks the address).
pub fn sources_of(cfg: &config::Listener) -> Vec<IpAddr> {
    if cfg.upstream_sources.is_empty() {
        vec![
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ]
    } else {
        cfg.upstream_sources.clone()
    }
}

impl Upstream {
    pub(crate) fn new(me: Owner, registry: Registry, state: StateRegion) -> Upstream {
        Upstream {
            me,
            registry,
            state,
            socks: Vec::new(),
            ranges: Vec::new(),
            no_fd_until: 0,
            route_sources: ahash::AHashMap::new(),
            gro: true,
            reuse_cool_ms: 0,
        }
    }

    /// Takes the listeners' ranges from `config` (at start and on reload).
    pub(crate) fn configure(&mut self, config: &config::Config) {
        // A reload is when addresses and routes were likely changed too.
        self.route_sources.clear();
        self.gro = config.offload == config::Offload::Auto;
        self.reuse_cool_ms = config
            .listeners
            .iter()
            .map(|l| l.port_reuse_delay.as_millis() as u64)
            .max()
            .unwrap_or(0);
        self.ranges = config
            .listeners
            .iter()
            .map(|l| {
                let (lo, hi) = l.upstream_ports.unwrap_or_else(ephemeral_range);
                Range {
                    // A source the supervisor registered no row for cannot
                    // be leased (it logged why).
                    sources: sources_of(l)
                        .into_iter()
                        .filter_map(|ip| Some((ip, self.state.source_row(ip)?)))
                        .collect(),
                    lo,
                    hi,
                    // Workers, and other instances on the host, start apart.
                    cursor: u64::from(std::process::id()).wrapping_mul(7919),
                    exhausted_until: [0; 2],
                }
            })
            .collect();
    }

    /// The descriptor of socket `sock`.
    pub(crate) fn fd(&self, sock: SockId) -> Option<RawFd> {
        self.socks
            .get(sock as usize)?
            .as_ref()
            .map(|e| e.socket.as_raw_fd())
    }

    /// The address a datagram from socket `sock` to `dst` leaves from: the
    /// socket's own, with the source address the route to `dst` picks when
    /// it is bound to the wildcard. `None` when that cannot be told.
    pub(crate) fn source_toward(
        &mut self,
        sock: SockId,
        dst: SocketAddr,
        now_ms: u64,
    ) -> Option<SocketAddr> {
        let local = self.socks.get(sock as usize)?.as_ref()?.local?;
        if !local.ip().is_unspecified() {
            return Some(local);
        }
        // A v4-mapped backend is not reachable from a v6-only socket: the
        // socket path reports that, where a raw packet would go astray.
        if let SocketAddr::V6(d) = dst {
            if d.ip().to_ipv4_mapped().is_some() {
                return None;
            }
        }
        let ip = match self.route_sources.get(&dst.ip()) {
            Some(&(ip, until)) if now_ms < until => ip,
            _ => {
                let ip = route_source(dst);
                self.route_sources
                    .insert(dst.ip(), (ip, now_ms + ROUTE_SOURCE_MS));
                ip
            }
        }?;
        Some(SocketAddr::new(ip, local.port()))
    }

    /// Keeps a descriptor received with a transfer as borrowed socket
    /// `sock` (sent on, never read here).
    pub(crate) fn keep(&mut self, sock: SockId, fd: OwnedFd) {
        let i = sock as usize;
        if self.socks.len() <= i {
            self.socks.resize_with(i + 1, || None);
        }
        let socket = UdpSocket::from(fd);
        let local = socket.local_addr().ok();
        self.socks[i] = Some(Entry {
            socket,
            local,
            lease: None,
        });
    }

    /// Listener `l`'s ports, and its sources of each family (IPv4, IPv6):
    /// a backend's paths are its family's sources times the ports.
    pub(crate) fn capacity(&self, listener: usize) -> Option<(usize, usize, usize)> {
        let r = self.ranges.get(listener)?;
        let v4 = r.sources.iter().filter(|(ip, _)| ip.is_ipv4()).count();
        Some((usize::from(r.hi - r.lo) + 1, v4, r.sources.len() - v4))
    }

    fn register(&self, sock: SockId, socket: &UdpSocket) -> io::Result<()> {
        self.registry.register(
            &mut SourceFd(&socket.as_raw_fd()),
            Token(UPSTREAM_TOKEN_BASE + sock as usize),
            Interest::READABLE,
        )
    }

    /// Starts reading `socket`, bound on leased (row, port), as `sock`.
    fn keep_leased(
        &mut self,
        sock: SockId,
        row: usize,
        port: u16,
        socket: UdpSocket,
    ) -> Result<SocketAddr, OpenError> {
        let local = socket.local_addr().map_err(|_| OpenError::Other)?;
        if let Err(e) = self.register(sock, &socket) {
            return Err(if e.raw_os_error() == Some(libc::ENOMEM) {
                OpenError::NoFd
            } else {
                OpenError::Other
            });
        }
        self.store(
            sock,
            Entry {
                socket,
                local: Some(local),
                lease: Some((row, port)),
            },
        );
        Ok(local)
    }

    fn store(&mut self, sock: SockId, entry: Entry) {
        let i = sock as usize;
        if self.socks.len() <= i {
            self.socks.resize_with(i + 1, || None);
        }
        self.socks[i] = Some(entry);
    }
}

impl Sockets for Upstream {
    fn open(&mut self, sock: SockId, listener: usize, ipv4: bool) -> Result<SocketAddr, OpenError> {
        let now = monotonic_ms();
        if now < self.no_fd_until {
            return Err(OpenError::NoFd);
        }
        let family = usize::from(!ipv4);
        let me = self.me;
        let range = self.ranges.get(listener).ok_or(OpenError::Other)?;
        if now < range.exhausted_until[family] {
            return Err(OpenError::NoPort);
        }
        let rows: Vec<(IpAddr, usize)> = range
            .sources
            .iter()
            .copied()
            .filter(|(ip, _)| ip.is_ipv4() == ipv4)
            .collect();
        let (lo, span, cursor) = (range.lo, u64::from(range.hi - range.lo) + 1, range.cursor);
        let total = span * rows.len() as u64;
        let mut binds = 0;
        let mut found = None;
        let mut tried = 0;
        for step in 0..total {
            tried = step + 1;
            let at = (cursor + step) % total;
            let (ip, row) = rows[(at / span) as usize];
            let port = lo + (at % span) as u16;
            let leases = self.state.leases();
            if !leases.lease(row, port, me, now) {
                continue;
            }
            binds += 1;
            match sockio::bound_upstream(SocketAddr::new(ip, port), self.gro) {
                Ok(socket) => {
                    found = Some((row, port, socket));
                    break;
                }
                Err(e) => match e.raw_os_error() {
                    // Another program holds it: leave it alone a while (the
                    // lease table remembers, so it costs one bind a minute).
                    Some(libc::EADDRINUSE) => {
                        leases.release(row, port, me, Some(now + FOREIGN_COOL_MS));
                    }
                    Some(libc::EMFILE | libc::ENFILE) => {
                        leases.release(row, port, me, None);
                        self.no_fd_until = now + NO_FD_MS;
                        return Err(OpenError::NoFd);
                    }
                    _ => {
                        leases.release(row, port, me, None);
                        return Err(OpenError::Other);
                    }
                },
            }
            if binds >= MAX_BINDS {
                break;
            }
        }
        // The next open goes on where this one stopped.
        let range = self.ranges.get_mut(listener).ok_or(OpenError::Other)?;
        range.cursor = (cursor + tried) % total.max(1);
        let Some((row, port, socket)) = found else {
            // A whole scan without a free entry: exhausted for a moment.
            if binds < MAX_BINDS {
                range.exhausted_until[family] = now + EXHAUSTED_MS;
            }
            return Err(OpenError::NoPort);
        };
        self.keep_leased(sock, row, port, socket).inspect_err(|_| {
            self.state.leases().release(row, port, me, None);
        })
    }

    fn reclaim(
        &mut self,
        sock: SockId,
        listener: usize,
        local: SocketAddr,
        from: Owner,
        unreaped_cool_ms: u64,
    ) -> Result<u64, OpenError> {
        let now = monotonic_ms();
        if now < self.no_fd_until {
            return Err(OpenError::NoFd);
        }
        let range = self.ranges.get(listener).ok_or(OpenError::Other)?;
        if !range.contains(local) {
            return Err(OpenError::NoPort);
        }
        let row = self.state.source_row(local.ip()).ok_or(OpenError::Other)?;
        let port = local.port();
        let me = self.me;
        let (was, until) = self
            .state
            .leases()
            .reclaim(row, port, me, from, now + unreaped_cool_ms)
            .ok_or(OpenError::NoPort)?;
        let kept = match sockio::bound_upstream(local, self.gro) {
            Ok(socket) => self.keep_leased(sock, row, port, socket),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                Err(OpenError::NoFd)
            }
            // A copy of the dead worker's socket that another worker
            // borrowed still holds it: that worker adopts it.
            Err(_) => Err(OpenError::NoPort),
        };
        match kept {
            Ok(_) => Ok(until.saturating_sub(now)),
            Err(e) => {
                self.state.leases().unclaim(row, port, me, was, until);
                Err(e)
            }
        }
    }

    fn close(&mut self, sock: SockId) {
        let Some(entry) = self.socks.get_mut(sock as usize).and_then(Option::take) else {
            return;
        };
        if let Some((row, port)) = entry.lease {
            let _ = self
                .registry
                .deregister(&mut SourceFd(&entry.socket.as_raw_fd()));
            // Closed first, then released: no other worker can bind it while
            // this socket still holds it.
            drop(entry.socket);
            self.state.leases().release(row, port, self.me, None);
        } else if let Some(local) = entry.local {
            // A borrowed copy whose lease this process took from its
            // predecessor (`take_lease`) and never read: the lease goes
            // with it, cooling as a closed socket's port does (its paths
            // may have late replies on the way).
            drop(entry.socket);
            if let Some(row) = self.state.source_row(local.ip()) {
                let until = monotonic_ms() + self.reuse_cool_ms;
                self.state
                    .leases()
                    .release(row, local.port(), self.me, Some(until));
            }
        }
    }

    fn adopt(&mut self, sock: SockId, local: SocketAddr, serves: &dyn Fn(Owner) -> bool) -> bool {
        let Some(row) = self.state.source_row(local.ip()) else {
            return false;
        };
        let adopted = self
            .state
            .leases()
            .adopt(row, local.port(), self.me, serves);
        if !adopted {
            return false;
        }
        let Some(Some(entry)) = self.socks.get(sock as usize) else {
            return false;
        };
        if self.register(sock, &entry.socket).is_err() {
            return false;
        }
        if let Some(Some(entry)) = self.socks.get_mut(sock as usize) {
            entry.lease = Some((row, local.port()));
        }
        true
    }

    fn lease_holder(&self, local: SocketAddr) -> Option<Owner> {
        let row = self.state.source_row(local.ip())?;
        match self.state.leases().get(row, local.port()) {
            Lease::Leased(o) | Lease::Orphaned(o, _) => Some(o),
            Lease::Free | Lease::Cooling(_) => None,
        }
    }

    fn take_lease(&mut self, local: SocketAddr, from: Owner) -> bool {
        let Some(row) = self.state.source_row(local.ip()) else {
            return false;
        };
        let now = monotonic_ms();
        self.state
            .leases()
            .reclaim(row, local.port(), self.me, from, now)
            .is_some()
    }

    fn in_range(&self, listener: usize, local: SocketAddr) -> bool {
        self.ranges.get(listener).is_some_and(|r| r.contains(local))
    }
}
