//! The Prometheus text endpoint (`metrics = "127.0.0.1:9469"`).
//!
//! A tiny HTTP/1.1 server inside the supervisor's single-threaded mio loop:
//! non-blocking accept, read the request head (bounded), answer
//! `GET /metrics` in the encoding the scraper's Accept prefers: protobuf
//! (`proto`; what Prometheus asks for first with native histograms on),
//! OpenMetrics text (what it asks for otherwise), or the classic text
//! format (0.0.4) for anyone else; `GET /ready` says whether the proxy
//! should be sent new flows; anything else gets 404; then close. Values are
//! read from the stats region at scrape time, so a scrape sees exactly what
//! `udpshard stats` would. What the exposition holds is `exposition`'s;
//! the protobuf encoding is `proto`'s.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use udpshard_shared::stats::{Snapshot, StatsError};

use crate::system::SystemCounters;

mod exposition;
mod proto;

use exposition::render;

/// What [`render`] writes, served to scrapers that ask for it (Prometheus
/// asks for it first).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic text format, served to everyone else (`curl`, older tools).
const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Tokens at and above this belong to the metrics server (the supervisor's
/// control tokens are worker ids, far below).
pub(crate) const LISTENER: Token = Token(1 << 30);
const CONN_BASE: usize = (1 << 30) + 1;
/// Scrapers are few; more connections than this are refused at accept.
const MAX_CONNS: usize = 32;
/// A request head larger than this is answered with 431 and closed.
const MAX_REQUEST: usize = 8 << 10;
/// A connection that has not finished in this long is closed.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn owns(token: Token) -> bool {
    token.0 >= LISTENER.0
}

struct Conn {
    stream: TcpStream,
    request: Vec<u8>,
    /// The response, once the request is complete, and how much is sent.
    response: Option<(Vec<u8>, usize)>,
    opened: Instant,
}

pub(crate) struct MetricsServer {
    listener: TcpListener,
    pub addr: SocketAddr,
    conns: HashMap<Token, Conn>,
    next: usize,
    /// The stats region's file (its own descriptor: the supervisor's may be
    /// replaced, this one always reads the live region).
    stats: File,
}

impl MetricsServer {
    pub(crate) fn bind(
        addr: SocketAddr,
        registry: &Registry,
        stats: &File,
    ) -> io::Result<MetricsServer> {
        MetricsServer::from_listener(std::net::TcpListener::bind(addr)?, registry, stats)
    }

    /// Serves on `listener` (bound here, or inherited from the previous
    /// generation of a binary upgrade).
    pub(crate) fn from_listener(
        listener: std::net::TcpListener,
        registry: &Registry,
        stats: &File,
    ) -> io::Result<MetricsServer> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        registry.register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(MetricsServer {
            addr: listener.local_addr()?,
            listener,
            conns: HashMap::new(),
            next: 0,
            stats: stats.try_clone()?,
        })
    }

    /// The listening socket's descriptor (a binary upgrade passes it on).
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.listener.as_raw_fd()
    }

    /// Handles a readiness event for one of its tokens; never blocks.
    pub(crate) fn handle(&mut self, registry: &Registry, token: Token) {
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
    pub(crate) fn expire(&mut self, registry: &Registry) {
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
    match respond(&conn.request, || scrape(stats), || ready(stats)) {
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

/// The stats region as it is now; or what went wrong.
fn snapshot_of(stats: &File) -> Result<Snapshot, String> {
    let io_err = |source| StatsError::Io {
        path: "stats region".into(),
        source,
    };
    let read = || -> Result<Snapshot, StatsError> {
        let len = stats.metadata().map_err(io_err)?.len() as usize;
        let mut bytes = vec![0u8; len];
        stats.read_exact_at(&mut bytes, 0).map_err(io_err)?;
        Snapshot::parse(&bytes)
    };
    read().map_err(|e| format!("cannot read the stats region: {e}"))
}

/// The stats region as it is now, and the host's counters, as OpenMetrics
/// text; or what went wrong.
fn scrape(stats: &File) -> Result<String, String> {
    render(snapshot_of(stats)?, SystemCounters::read())
        .map_err(|_| "a value the exposition format cannot encode".to_string())
}

/// Whether the proxy should be sent new flows, and the line that says so
/// (`udpshard health` says the same).
fn ready(stats: &File) -> Result<(bool, String), String> {
    snapshot_of(stats).map(|snap| crate::stats_cmd::readiness(&snap))
}

/// The full HTTP response to `request`, or `None` while its head is
/// incomplete (and within [`MAX_REQUEST`]).
fn respond(
    request: &[u8],
    body: impl FnOnce() -> Result<String, String>,
    ready: impl FnOnce() -> Result<(bool, String), String>,
) -> Option<Vec<u8>> {
    let head_end = find(request, b"\r\n\r\n").or_else(|| find(request, b"\n\n"));
    if head_end.is_none() {
        if request.len() > MAX_REQUEST {
            return Some(http(431, "text/plain", b"request header too large\n"));
        }
        return None;
    }
    let line_end = find(request, b"\n").unwrap_or(request.len());
    let line = String::from_utf8_lossy(&request[..line_end]);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    // HEAD (a load balancer's health check may use it): GET's head alone.
    let full = method != "HEAD";
    let response = match (method, path) {
        (_, p) if p != "/metrics" && p != "/ready" => http(
            404,
            "text/plain",
            b"not found; try GET /metrics or GET /ready\n",
        ),
        ("GET" | "HEAD", _) => respond_to(path, request, head_end, body, ready),
        _ => http(405, "text/plain", b"GET or HEAD only\n"),
    };
    Some(match full {
        true => response,
        false => head_only(response),
    })
}

/// GET (or HEAD) of `path`, /ready or /metrics.
fn respond_to(
    path: &str,
    request: &[u8],
    head_end: Option<usize>,
    body: impl FnOnce() -> Result<String, String>,
    ready: impl FnOnce() -> Result<(bool, String), String>,
) -> Vec<u8> {
    match path {
        // For whatever steers traffic here (a BGP speaker's health check):
        // 200 while it serves, 503 while it starts, withdraws or drains.
        "/ready" => match ready() {
            Ok((true, line)) => http(200, "text/plain", format!("{line}\n").as_bytes()),
            Ok((false, line)) => http(503, "text/plain", format!("{line}\n").as_bytes()),
            Err(e) => http(503, "text/plain", format!("not ready: {e}\n").as_bytes()),
        },
        _ => metrics_response(request, head_end, body),
    }
}

/// A response without its body (its Content-Length stays: the body's).
fn head_only(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(end) = find(&response, b"\r\n\r\n") {
        response.truncate(end + 4);
    }
    response
}

/// GET /metrics: the exposition in the encoding the request's Accept
/// header prefers.
fn metrics_response(
    request: &[u8],
    head_end: Option<usize>,
    body: impl FnOnce() -> Result<String, String>,
) -> Vec<u8> {
    let head = String::from_utf8_lossy(&request[..head_end.unwrap_or(request.len())]);
    let accept: Vec<&str> = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("accept"))
        .map(|(_, v)| v)
        .collect();
    match (body(), negotiate(&accept.join(","))) {
        (Ok(text), Encoding::Protobuf) => {
            http(200, proto::CONTENT_TYPE, &proto::from_openmetrics(&text))
        }
        (Ok(text), Encoding::OpenMetrics) => http(200, OPENMETRICS, text.as_bytes()),
        (Ok(text), Encoding::Text) => http(200, TEXT_004, text_004(&text).as_bytes()),
        (Err(e), _) => http(500, "text/plain", format!("{e}\n").as_bytes()),
    }
}

/// The encodings the endpoint serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    OpenMetrics,
    Text,
}

/// The encoding an Accept header prefers (its q values; protobuf first
/// among equals, then OpenMetrics): the classic text when it names
/// neither.
fn negotiate(accept: &str) -> Encoding {
    let mut best = (0.0f64, Encoding::Text);
    for range in accept.split(',') {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or("").to_ascii_lowercase();
        let encoding = match media.as_str() {
            proto::MEDIA_TYPE => Encoding::Protobuf,
            "application/openmetrics-text" => Encoding::OpenMetrics,
            "text/plain" | "text/*" | "*/*" => Encoding::Text,
            _ => continue,
        };
        let mut q = 1.0;
        for p in params {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "q" => q = v.parse().unwrap_or(0.0),
                // Only the MetricFamily messages of client_model are served.
                "proto" if v != "io.prometheus.client.MetricFamily" => q = 0.0,
                "encoding" if v != "delimited" => q = 0.0,
                _ => {}
            }
        }
        let rank = |e: Encoding| match e {
            Encoding::Protobuf => 2,
            Encoding::OpenMetrics => 1,
            Encoding::Text => 0,
        };
        if q > best.0 || q == best.0 && q > 0.0 && rank(encoding) > rank(best.1) {
            best = (q, encoding);
        }
    }
    best.1
}

/// OpenMetrics text as the classic 0.0.4 format: a counter family's HELP and
/// TYPE name its samples (`x_total`), and there is no `# EOF`.
fn text_004(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + counters.len() * 16);
    for line in openmetrics.lines().filter(|l| *l != "# EOF") {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let (name, rest) = line.strip_prefix(prefix)?.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {rest}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn http(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let allow = match status {
        405 => "Allow: GET, HEAD\r\n",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\n{allow}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::{Nic, UdpCounters};
    use udpshard_shared::stats::delay;
    use udpshard_shared::stats::{Counter, Header, SlotState, StatsRegion};

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
        // Worker 1's queue delay: 5 datagrams at most 2^-17 s (7.6us), 1
        // past the last bound (16 s).
        let delay = region.delay(1).unwrap();
        delay[3].store(5, std::sync::atomic::Ordering::Relaxed);
        delay[delay::BUCKETS - 1].store(1, std::sync::atomic::Ordering::Relaxed);
        delay[delay::SUM_NS].store(1_500_030_000, std::sync::atomic::Ordering::Relaxed);
        delay[delay::MAX_NS].store(1_500_000_000, std::sync::atomic::Ordering::Relaxed);
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
        let text = render(snapshot(), system).unwrap();
        let classic = text_004(&text);
        for line in [
            "# TYPE udpshard_rx_packets counter",
            "udpshard_rx_packets_total{worker=\"0\"} 0",
            "udpshard_rx_packets_total{worker=\"1\"} 42",
            "udpshard_drops_total{worker=\"1\",reason=\"socket\"} 7",
            "udpshard_worker_busy_ratio{worker=\"1\"} 0.25",
            "udpshard_worker_ready{worker=\"1\"} 1",
            "# TYPE udpshard_queue_delay_seconds histogram",
            "udpshard_queue_delay_seconds_count{worker=\"1\"} 6",
            "udpshard_queue_delay_seconds_sum{worker=\"1\"} 1.50003",
            "udpshard_queue_delay_seconds_bucket{le=\"0.000003814697265625\",worker=\"1\"} 0",
            "udpshard_queue_delay_seconds_bucket{le=\"0.00000762939453125\",worker=\"1\"} 5",
            "udpshard_queue_delay_seconds_bucket{le=\"16.0\",worker=\"1\"} 5",
            "udpshard_queue_delay_seconds_bucket{le=\"+Inf\",worker=\"1\"} 6",
            "udpshard_queue_delay_max_seconds{worker=\"1\"} 1.5",
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
        assert!(
            classic
                .lines()
                .any(|l| l == "# TYPE udpshard_rx_packets_total counter"),
            "{classic}"
        );
        assert!(!classic.contains("# EOF"));
        // OpenMetrics: every sample's family has HELP and TYPE (a counter's
        // family is named without its samples' _total), and # EOF ends it.
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let histogram = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|f| text.contains(&format!("# TYPE {f} histogram\n")));
            let family = match name.strip_suffix("_total") {
                Some(f) if text.contains(&format!("# TYPE {f} counter\n")) => f,
                _ => histogram.unwrap_or(name),
            };
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{name} has no TYPE"
            );
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{name} has no HELP"
            );
        }
    }

    #[test]
    fn http_requests() {
        let page = "# HELP c A counter.\n# TYPE c counter\nc_total 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
        let ok = || Ok(page.to_string());
        let up = || Ok((true, "ready: 2 workers serving".to_string()));
        assert_eq!(respond(b"GET /metrics HTTP/1.1\r\nHost: a", ok, up), None);
        let get = |request: &[u8]| String::from_utf8(respond(request, ok, up).unwrap()).unwrap();
        // Prometheus's Accept: OpenMetrics, as encoded.
        let r = get(b"GET /metrics HTTP/1.1\r\nHost: a\r\nAccept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
            "{r}"
        );
        assert!(r.ends_with(&format!("\r\n\r\n{page}")), "{r}");
        // No Accept (curl): the classic format, counters' HELP and TYPE
        // renamed to their samples, no # EOF.
        let r = get(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(
            r.ends_with("\r\n\r\n# HELP c_total A counter.\n# TYPE c_total counter\nc_total 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n"),
            "{r}"
        );
        let r = respond(b"GET / HTTP/1.1\r\n\r\n", ok, up).unwrap();
        assert!(r.starts_with(b"HTTP/1.1 404 "));
        let r = get(b"GET /ready HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nready: 2 workers serving\n"), "{r}");
        let down = || Ok((false, "not ready: draining".to_string()));
        let r = respond(b"GET /ready HTTP/1.1\r\n\r\n", ok, down).unwrap();
        let r = String::from_utf8(r).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nnot ready: draining\n"), "{r}");
        let r = respond(b"POST /metrics HTTP/1.1\r\n\r\n", ok, up).unwrap();
        let r = String::from_utf8(r).unwrap();
        assert!(
            r.starts_with("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\n"),
            "{r}"
        );
        // HEAD: GET's head, Content-Length included, and no body.
        let r = respond(b"HEAD /ready HTTP/1.1\r\n\r\n", ok, down).unwrap();
        let r = String::from_utf8(r).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("Content-Length: 20\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n"), "{r}");
        let r = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", ok, up).unwrap();
        assert!(r.starts_with(b"HTTP/1.1 200 OK\r\n") && r.ends_with(b"\r\n\r\n"));
        let r = respond(b"HEAD /nothing HTTP/1.1\r\n\r\n", ok, up).unwrap();
        assert!(r.starts_with(b"HTTP/1.1 404 ") && r.ends_with(b"\r\n\r\n"));
        let r = respond(b"\xff\xfe\n\n", ok, up).unwrap();
        assert!(r.starts_with(b"HTTP/1.1 404 "));
        let big = vec![b'a'; MAX_REQUEST + 1];
        assert!(respond(&big, ok, up).unwrap().starts_with(b"HTTP/1.1 431 "));
        let r = respond(
            b"GET /metrics?x=1 HTTP/1.0\n\n",
            || Err("cannot read the stats region: bad magic".into()),
            up,
        )
        .unwrap();
        assert!(r.starts_with(b"HTTP/1.1 500 "));
        assert!(r.ends_with(b"\r\n\r\ncannot read the stats region: bad magic\n"));
        // Prometheus with native histograms: protobuf first.
        let r = respond(b"GET /metrics HTTP/1.1\r\nAccept: application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n\r\n", ok, up).unwrap();
        let head = String::from_utf8_lossy(&r);
        assert!(head.contains("Content-Type: application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited\r\n"), "{head}");
        assert!(r.ends_with(&proto::from_openmetrics(page)));
    }

    #[test]
    fn accept_headers_choose_by_q() {
        use Encoding::*;
        assert_eq!(negotiate(""), Text);
        assert_eq!(negotiate("*/*"), Text);
        assert_eq!(negotiate("text/plain;version=0.0.4"), Text);
        assert_eq!(
            negotiate("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
            OpenMetrics
        );
        assert_eq!(
            negotiate("application/openmetrics-text;q=0.5,application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7"),
            Protobuf
        );
        assert_eq!(
            negotiate("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.3,application/openmetrics-text;q=0.5"),
            OpenMetrics
        );
        assert_eq!(
            negotiate("application/vnd.google.protobuf;proto=other.Message;encoding=delimited"),
            Text,
            "only MetricFamily messages"
        );
        assert_eq!(negotiate("application/openmetrics-text;q=0"), Text);
        assert_eq!(
            negotiate("text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.1"),
            Text,
            "text first, as asked"
        );
        assert_eq!(
            negotiate("Application/OpenMetrics-Text; Q=0.9, text/plain; q=0.5"),
            OpenMetrics
        );
        assert_eq!(
            negotiate("application/vnd.google.protobuf;proto=\"io.prometheus.client.MetricFamily\";encoding=delimited"),
            Protobuf
        );
    }
}
