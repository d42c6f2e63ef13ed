//! The Prometheus text endpoint (`metrics = "127.0.0.1:9469"`).
//!
//! A tiny HTTP/1.1 server inside the supervisor's single-threaded mio loop:
//! non-blocking accept, read the request head (bounded), answer
//! `GET /metrics` with the text exposition format (0.0.4) and anything else
//! with 404, then close. Values are read from the stats region at scrape
//! time, so a scrape sees exactly what `udpshard stats` would.
//!
//! The exposition text is written by hand rather than with the
//! prometheus-client crate: every value already lives in shared memory as a
//! counter, so a registry would only be refilled on each scrape to be
//! encoded again; the format is a few lines of text (HELP, TYPE, samples)
//! and `render` is a pure function tested below.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use udpshard_shared::stats::{Counter, Header, SlotState, Snapshot, StatsError};

use crate::system::SystemCounters;

/// Tokens at and above this belong to the metrics server (the supervisor's
/// control tokens are worker ids, far below).
pub const LISTENER: Token = Token(1 << 30);
const CONN_BASE: usize = (1 << 30) + 1;
/// Scrapers are few; more connections than this are refused at accept.
const MAX_CONNS: usize = 32;
/// A request head larger than this is answered with 431 and closed.
const MAX_REQUEST: usize = 8 << 10;
/// A connection that has not finished in this long is closed.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

pub fn owns(token: Token) -> bool {
    token.0 >= LISTENER.0
}

struct Conn {
    stream: TcpStream,
    request: Vec<u8>,
    /// The response, once the request is complete, and how much is sent.
    response: Option<(Vec<u8>, usize)>,
    opened: Instant,
}

pub struct MetricsServer {
    listener: TcpListener,
    pub addr: SocketAddr,
    conns: HashMap<Token, Conn>,
    next: usize,
    /// The stats region's file (its own descriptor: the supervisor's may be
    /// replaced, this one always reads the live region).
    stats: File,
}

impl MetricsServer {
    pub fn bind(addr: SocketAddr, registry: &Registry, stats: &File) -> io::Result<MetricsServer> {
        let mut listener = TcpListener::bind(addr)?;
        registry.register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(MetricsServer {
            addr: listener.local_addr()?,
            listener,
            conns: HashMap::new(),
            next: 0,
            stats: stats.try_clone()?,
        })
    }

    /// Handles a readiness event for one of its tokens; never blocks.
    pub fn handle(&mut self, registry: &Registry, token: Token) {
        self.expire(registry);
        if token == LISTENER {
            self.accept(registry);
        } else {
            self.serve(registry, token);
        }
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("metrics: accept: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNS {
                continue; // dropped: closed at once
            }
            let token = Token(CONN_BASE + self.next % (usize::MAX - CONN_BASE));
            self.next = self.next.wrapping_add(1);
            if registry
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    stream,
                    request: Vec::new(),
                    response: None,
                    opened: Instant::now(),
                },
            );
            // Data may already be waiting; edge-triggered events won't repeat.
            self.serve(registry, token);
        }
    }

    fn serve(&mut self, registry: &Registry, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let done = match conn.response {
            None => read_request(conn, &self.stats),
            Some(_) => Progress::Writing,
        };
        let done = match done {
            Progress::Writing => write_response(conn),
            other => other,
        };
        if done == Progress::Close {
            if let Some(mut conn) = self.conns.remove(&token) {
                let _ = registry.deregister(&mut conn.stream);
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Closes connections that outstayed [`CONN_TIMEOUT`] (slow or idle
    /// clients must not hold slots forever).
    pub fn expire(&mut self, registry: &Registry) {
        let stale: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| c.opened.elapsed() > CONN_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for token in stale {
            if let Some(mut conn) = self.conns.remove(&token) {
                let _ = registry.deregister(&mut conn.stream);
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Waiting for more of the request.
    Reading,
    Writing,
    Close,
}

fn read_request(conn: &mut Conn, stats: &File) -> Progress {
    let mut buf = [0u8; 2048];
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => return Progress::Close,
            Ok(n) => conn.request.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Progress::Close,
        }
        if conn.request.len() > MAX_REQUEST {
            break;
        }
    }
    match respond(&conn.request, || scrape(stats)) {
        None => Progress::Reading,
        Some(response) => {
            conn.response = Some((response, 0));
            Progress::Writing
        }
    }
}

fn write_response(conn: &mut Conn) -> Progress {
    let Some((response, sent)) = conn.response.as_mut() else {
        return Progress::Close;
    };
    while *sent < response.len() {
        match conn.stream.write(&response[*sent..]) {
            Ok(0) => return Progress::Close,
            Ok(n) => *sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Writing,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Progress::Close,
        }
    }
    Progress::Close
}

/// The stats region as it is now, and the host's counters.
fn scrape(stats: &File) -> Result<String, StatsError> {
    let io_err = |source| StatsError::Io {
        path: "stats region".into(),
        source,
    };
    let len = stats.metadata().map_err(io_err)?.len() as usize;
    let mut bytes = vec![0u8; len];
    stats.read_exact_at(&mut bytes, 0).map_err(io_err)?;
    let snap = Snapshot::parse(&bytes)?;
    Ok(render(&snap, &SystemCounters::read()))
}

/// The full HTTP response to `request`, or `None` while its head is
/// incomplete (and within [`MAX_REQUEST`]).
fn respond(request: &[u8], body: impl FnOnce() -> Result<String, StatsError>) -> Option<Vec<u8>> {
    let head_end = find(request, b"\r\n\r\n").or_else(|| find(request, b"\n\n"));
    if head_end.is_none() {
        if request.len() > MAX_REQUEST {
            return Some(http(431, "text/plain", "request header too large\n"));
        }
        return None;
    }
    let line_end = find(request, b"\n").unwrap_or(request.len());
    let line = String::from_utf8_lossy(&request[..line_end]);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" || path != "/metrics" {
        return Some(http(404, "text/plain", "not found; try GET /metrics\n"));
    }
    Some(match body() {
        Ok(text) => http(200, "text/plain; version=0.0.4; charset=utf-8", &text),
        Err(e) => http(
            500,
            "text/plain",
            &format!("cannot read the stats region: {e}\n"),
        ),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn http(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Per-worker counters: (name, help, counter).
const WORKER_COUNTERS: [(&str, &str, Counter); 19] = [
    (
        "rx_packets",
        "Datagrams read from clients on the listener sockets.",
        Counter::RxPackets,
    ),
    (
        "rx_bytes",
        "Bytes read from clients on the listener sockets.",
        Counter::RxBytes,
    ),
    (
        "tx_packets",
        "Datagrams forwarded to backends.",
        Counter::TxPackets,
    ),
    ("tx_bytes", "Bytes forwarded to backends.", Counter::TxBytes),
    (
        "tx_raw_packets",
        "Datagrams of tx_packets sent as raw IP packets (upstream_send = auto with CAP_NET_RAW).",
        Counter::TxRaw,
    ),
    (
        "tx_raw_refused_packets",
        "Forwards the raw socket refused (full send buffer, over the device MTU), sent on their own sockets.",
        Counter::TxRawRefused,
    ),
    (
        "replies_in",
        "Datagrams read from backends on upstream sockets.",
        Counter::RepliesIn,
    ),
    (
        "replies_out",
        "Replies sent on to clients.",
        Counter::RepliesOut,
    ),
    (
        "handoff_in",
        "Datagrams handed to this worker by another.",
        Counter::HandoffIn,
    ),
    (
        "handoff_out",
        "Datagrams this worker handed to the owner of their flow.",
        Counter::HandoffOut,
    ),
    (
        "transfers_in",
        "Sessions moved to this worker.",
        Counter::TransfersIn,
    ),
    (
        "transfers_out",
        "Sessions moved away from this worker.",
        Counter::TransfersOut,
    ),
    (
        "sessions_created",
        "Sessions created.",
        Counter::SessionsCreated,
    ),
    (
        "sessions_expired",
        "Sessions closed after their idle timeout.",
        Counter::SessionsExpired,
    ),
    (
        "sessions_rerouted",
        "Live sessions moved to another backend because theirs was removed.",
        Counter::SessionsRerouted,
    ),
    (
        "paths_inherited",
        "Paths opened on the port their flow had at a worker that died: the backend saw no change.",
        Counter::PathsInherited,
    ),
    (
        "worker_restarts",
        "Times the worker slot's process was restarted.",
        Counter::Restarts,
    ),
    (
        "handoff_bad_frames",
        "Frames from other workers that did not decode (a bug, never traffic).",
        Counter::BadFrames,
    ),
    (
        "handoff_control_lost",
        "Control frames to other workers given up: their inbox stayed full past the queue's bound.",
        Counter::ControlLost,
    ),
];

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP udpshard_{name} {help}");
        let _ = writeln!(self.out, "# TYPE udpshard_{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "udpshard_{name}");
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Per-backend families, labelled by listener and backend address (as
/// configured); a backend a reload removed keeps its series.
fn backend_families(f: &mut Family<'_>, snap: &Snapshot) {
    use udpshard_shared::backends::{BackendCounter as B, BackendState};
    use udpshard_shared::stats::BackendSnapshot;
    let rows = snap.backends();
    let labels: Vec<(String, String)> = rows
        .iter()
        .map(|b| (b.meta.listener.clone(), b.meta.addr.to_string()))
        .collect();
    // One family: a sample per backend that has a value.
    let mut family =
        |name: &str, kind: &str, help: &str, value: &dyn Fn(&BackendSnapshot) -> Option<String>| {
            f.head(name, kind, help);
            for (b, (l, a)) in rows.iter().zip(&labels) {
                if let Some(v) = value(b) {
                    f.sample(name, &[("listener", l), ("backend", a)], v);
                }
            }
        };
    let counters = [
        (
            "backend_sessions_created_total",
            "counter",
            "Sessions created toward the backend.",
            B::SessionsCreated,
        ),
        (
            "backend_tx_packets_total",
            "counter",
            "Datagrams forwarded to the backend.",
            B::TxPackets,
        ),
        (
            "backend_tx_bytes_total",
            "counter",
            "Bytes forwarded to the backend.",
            B::TxBytes,
        ),
        (
            "backend_replies_total",
            "counter",
            "Datagrams read from the backend.",
            B::Replies,
        ),
        (
            "backend_unreachable_total",
            "counter",
            "ICMP port, host or network unreachable reports for datagrams sent to the backend.",
            B::Unreachable,
        ),
        (
            "backend_send_errors_total",
            "counter",
            "Forwards to the backend the kernel refused, and other ICMP errors.",
            B::SendErrors,
        ),
        (
            "backend_sessions_active",
            "gauge",
            "Live sessions with the backend.",
            B::SessionsActive,
        ),
    ];
    for (name, kind, help, c) in counters {
        family(name, kind, help, &|b| Some(b.total(c).to_string()));
    }
    family(
        "backend_up",
        "gauge",
        "1 when the backend takes new sessions (configured, up, weight above 0).",
        &|b| {
            let up = b.meta.in_config && b.meta.state == BackendState::Up && b.meta.weight > 0;
            Some(u8::from(up).to_string())
        },
    );
    family(
        "backend_downs_total",
        "counter",
        "Times passive health took the backend down for new sessions.",
        &|b| Some(b.meta.downs.to_string()),
    );
    family(
        "backend_weight",
        "gauge",
        "The backend's configured weight.",
        &|b| Some(b.meta.weight.to_string()),
    );
    let now_ms = udpshard_shared::clock::monotonic_ns() / 1_000_000;
    family(
        "backend_last_reply_age_seconds",
        "gauge",
        "Time since the backend's latest reply (absent until it has replied).",
        &|b| {
            let at = b.total(B::LastReplyMs);
            (at > 0).then(|| (now_ms.saturating_sub(at) as f64 / 1000.0).to_string())
        },
    );
}

/// A host metric family: name, help, and how to read it from `T`.
type HostFamily<T> = (&'static str, &'static str, fn(&T) -> u64);

/// The exposition text for a stats snapshot and the host's counters.
pub fn render(snap: &Snapshot, system: &SystemCounters) -> String {
    let mut out = String::with_capacity(8192);
    let mut f = Family { out: &mut out };
    let workers: Vec<_> = snap.workers().collect();
    let ids: Vec<String> = workers.iter().map(|w| w.id.to_string()).collect();
    // Counters cover every slot that has served: one a resize retired keeps
    // its series (at its final counts), so no sum over workers goes back.
    let served: Vec<_> = snap.slots().collect();
    let served_ids: Vec<String> = served.iter().map(|w| w.id.to_string()).collect();

    for (name, help, counter) in WORKER_COUNTERS {
        let name = format!("{name}_total");
        f.head(&name, "counter", help);
        for (w, id) in served.iter().zip(&served_ids) {
            f.sample(&name, &[("worker", id)], w.get(counter));
        }
    }
    f.head(
        "drops_total",
        "counter",
        "Datagrams dropped, by worker and the hop where they were lost (socket: kernel drops on the listener socket; upstream_socket: on upstream sockets).",
    );
    for (w, id) in served.iter().zip(&served_ids) {
        for reason in udpshard_shared::DropReason::ALL {
            f.sample(
                "drops_total",
                &[("worker", id), ("reason", reason.name())],
                w.get(reason.counter()),
            );
        }
    }
    backend_families(&mut f, snap);
    f.head("sessions_active", "gauge", "Live sessions.");
    for (w, id) in workers.iter().zip(&ids) {
        f.sample(
            "sessions_active",
            &[("worker", id)],
            w.get(Counter::SessionsActive),
        );
    }
    f.head(
        "worker_busy_seconds_total",
        "counter",
        "Time the worker spent handling events (not waiting in poll).",
    );
    for (w, id) in served.iter().zip(&served_ids) {
        f.sample(
            "worker_busy_seconds_total",
            &[("worker", id)],
            w.get(Counter::BusyNs) as f64 / 1e9,
        );
    }
    f.head(
        "worker_busy_ratio",
        "gauge",
        "Busy time over wall time since the worker started (utilisation, rho).",
    );
    for (w, id) in workers.iter().zip(&ids) {
        let wall = w.get(Counter::WallNs);
        let ratio = if wall == 0 {
            0.0
        } else {
            w.get(Counter::BusyNs) as f64 / wall as f64
        };
        f.sample("worker_busy_ratio", &[("worker", id)], ratio);
    }
    f.head(
        "worker_loop_max_seconds",
        "gauge",
        "The longest event-loop iteration in the last completed second: how long a datagram can wait behind the loop.",
    );
    for (w, id) in workers.iter().zip(&ids) {
        f.sample(
            "worker_loop_max_seconds",
            &[("worker", id)],
            w.get(Counter::LoopMaxUs) as f64 / 1e6,
        );
    }
    f.head("worker_ready", "gauge", "1 when the worker is serving.");
    for (w, id) in workers.iter().zip(&ids) {
        f.sample(
            "worker_ready",
            &[("worker", id)],
            u8::from(w.state() == SlotState::Ready),
        );
    }
    f.head("workers", "gauge", "Worker slots in use.");
    f.sample("workers", &[], workers.len());
    f.head(
        "config_generation",
        "gauge",
        "Successful config loads, the first one included.",
    );
    f.sample(
        "config_generation",
        &[],
        snap.header(Header::ConfigGeneration),
    );
    f.head(
        "reload_failures_total",
        "counter",
        "Reloads refused because the new config was invalid.",
    );
    f.sample(
        "reload_failures_total",
        &[],
        snap.header(Header::ReloadFailures),
    );
    f.head(
        "start_time_seconds",
        "gauge",
        "When the supervisor started (Unix time).",
    );
    f.sample("start_time_seconds", &[], snap.header(Header::StartedAt));

    // The host's counters (this network namespace), path order.
    let nic: [HostFamily<crate::system::Nic>; 3] = [
        (
            "nic_rx_dropped_total",
            "Received packets the interface dropped.",
            |n| n.rx_dropped,
        ),
        (
            "nic_rx_errors_total",
            "Receive errors on the interface.",
            |n| n.rx_errors,
        ),
        (
            "nic_tx_dropped_total",
            "Packets the interface dropped on transmit.",
            |n| n.tx_dropped,
        ),
    ];
    for (name, help, get) in nic {
        if system.nics.is_empty() {
            break;
        }
        f.head(name, "counter", help);
        for n in &system.nics {
            f.sample(name, &[("device", &n.name)], get(n));
        }
    }
    if let Some(s) = system.softnet {
        f.head("softnet_dropped_total", "counter", "Packets dropped because a CPU's input backlog was full (netdev_max_backlog), all CPUs.");
        f.sample("softnet_dropped_total", &[], s.dropped);
        f.head(
            "softnet_time_squeeze_total",
            "counter",
            "Times the receive softirq ran out of budget with work left, all CPUs.",
        );
        f.sample("softnet_time_squeeze_total", &[], s.time_squeeze);
    }
    let udp: [HostFamily<crate::system::UdpCounters>; 5] = [
        (
            "udp_in_datagrams_total",
            "UDP datagrams delivered to sockets, host-wide.",
            |u| u.in_datagrams,
        ),
        (
            "udp_in_errors_total",
            "UDP datagrams dropped on receive, host-wide (all sockets).",
            |u| u.in_errors,
        ),
        (
            "udp_rcvbuf_errors_total",
            "UDP datagrams dropped because a socket's receive buffer was full, host-wide.",
            |u| u.rcvbuf_errors,
        ),
        (
            "udp_sndbuf_errors_total",
            "UDP sends that failed for lack of send buffer, host-wide.",
            |u| u.sndbuf_errors,
        ),
        (
            "udp_no_ports_total",
            "UDP datagrams for a port no socket listens on, host-wide.",
            |u| u.no_ports,
        ),
    ];
    let families = [("ipv4", system.udp), ("ipv6", system.udp6)];
    if families.iter().any(|(_, u)| u.is_some()) {
        for (name, help, get) in udp {
            f.head(name, "counter", help);
            for (family, u) in &families {
                if let Some(u) = u {
                    f.sample(name, &[("family", family)], get(u));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::{Nic, UdpCounters};
    use udpshard_shared::stats::StatsRegion;

    fn snapshot() -> Snapshot {
        let dir = std::env::temp_dir().join(format!("udpshard-metrics-{}", std::process::id()));
        let path = dir.join("stats");
        let (region, _file) = StatsRegion::create(&path, 2).unwrap();
        region.set_header(Header::Workers, 2);
        region.set_header(Header::ReloadFailures, 3);
        let slot = region.slot(1).unwrap();
        slot.set(Counter::RxPackets, 42);
        slot.set(Counter::DropSocket, 7);
        slot.set(Counter::BusyNs, 250);
        slot.set(Counter::WallNs, 1000);
        slot.set_life(1, SlotState::Ready);
        let snap = Snapshot::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        snap
    }

    #[test]
    fn exposition_text() {
        let system = SystemCounters {
            nics: vec![Nic {
                name: "eth\"0".into(),
                rx_dropped: 5,
                ..Nic::default()
            }],
            udp: Some(UdpCounters {
                rcvbuf_errors: 9,
                ..UdpCounters::default()
            }),
            ..SystemCounters::default()
        };
        let text = render(&snapshot(), &system);
        for line in [
            "# TYPE udpshard_rx_packets_total counter",
            "udpshard_rx_packets_total{worker=\"0\"} 0",
            "udpshard_rx_packets_total{worker=\"1\"} 42",
            "udpshard_drops_total{worker=\"1\",reason=\"socket\"} 7",
            "udpshard_worker_busy_ratio{worker=\"1\"} 0.25",
            "udpshard_worker_ready{worker=\"1\"} 1",
            "udpshard_reload_failures_total 3",
            "udpshard_udp_rcvbuf_errors_total{family=\"ipv4\"} 9",
            "udpshard_nic_rx_dropped_total{device=\"eth\\\"0\"} 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("softnet"), "no softnet family without data");
        // Every sample's family has HELP and TYPE before it.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
    }

    #[test]
    fn http_requests() {
        let ok = || Ok("x 1\n".to_string());
        assert_eq!(respond(b"GET /metrics HTTP/1.1\r\nHost: a", ok), None);
        let r =
            String::from_utf8(respond(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", ok).unwrap())
                .unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(r.ends_with("\r\n\r\nx 1\n"), "{r}");
        let r = respond(b"GET / HTTP/1.1\r\n\r\n", ok).unwrap();
        assert!(r.starts_with(b"HTTP/1.1 404 "));
        let r = respond(b"POST /metrics HTTP/1.1\r\n\r\n", ok).unwrap();
        assert!(r.starts_with(b"HTTP/1.1 404 "));
        let r = respond(b"\xff\xfe\n\n", ok).unwrap();
        assert!(r.starts_with(b"HTTP/1.1 404 "));
        let big = vec![b'a'; MAX_REQUEST + 1];
        assert!(respond(&big, ok).unwrap().starts_with(b"HTTP/1.1 431 "));
        let r = respond(b"GET /metrics?x=1 HTTP/1.0\n\n", || {
            Err(StatsError::BadMagic)
        })
        .unwrap();
        assert!(r.starts_with(b"HTTP/1.1 500 "));
    }
}
