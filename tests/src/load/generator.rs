//! The sending side: flows spread over source sockets (one per flow, or many per socket for
//! loads of more flows than a process has descriptors), every flow sending once per round,
//! paced against an absolute schedule that never drifts, in `sendmmsg` batches of the flows
//! that share a socket; then a bounded drain while the sink catches the stragglers.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use serde_json::json;
use thiserror::Error;

use super::datagram::{flow_cid, Datagram, DEFAULT_SIZE, MAX_SIZE, MIN_SIZE};
use super::histogram::Histogram;
use super::mmsg::Batch;
use super::monotonic_ns;
use super::pacing::{Pacer, Step};
use super::seqset::SeqSet;
use super::sink::Sink;

/// Without pacing, look at the clock (and the limits) once per this many datagrams.
const UNPACED_CHUNK: u64 = 256;
/// Datagrams per `sendmmsg`.
const SEND_BATCH: usize = 64;
/// The drain ends once no datagram arrived for this long...
const DRAIN_QUIET: Duration = Duration::from_millis(200);
/// ...or after this long in any case.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// Next sequence number, shared by every generator of the process so that a sink sees each
/// number once however many loads feed it.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);

/// File descriptors kept free beyond one per flow.
const FD_HEADROOM: u64 = 64;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("invalid load: {0}")]
    InvalidSpec(String),
    #[error(
        "{flows} flow sockets need {needed} open files but the hard limit is {hard}; raise it (ulimit -n)"
    )]
    FdLimit {
        flows: usize,
        needed: u64,
        hard: u64,
    },
    #[error("cannot open flow socket {index} of {flows} towards {target}: {source}")]
    OpenFlow {
        index: usize,
        flows: usize,
        target: SocketAddr,
        source: io::Error,
    },
    #[error("the generator has {flows} flows to {target}; the load asks for {want_flows} to {want_target}")]
    SpecMismatch {
        target: SocketAddr,
        flows: usize,
        want_target: SocketAddr,
        want_flows: usize,
    },
}

/// One load: where, how many flows, how fast, how long, how big.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub flows: usize,
    /// Datagrams per second over all flows; `None` sends as fast as possible.
    pub rate: Option<u64>,
    /// Sending stops after this long...
    pub duration: Duration,
    /// ...or after this many datagrams, whichever comes first.
    pub max_datagrams: Option<u64>,
    /// Datagram size in bytes, at least [`MIN_SIZE`].
    pub size: usize,
}

impl LoadSpec {
    /// The benchmark's load: 2000 flows, 150k datagrams/s, 5 s, 33-byte datagrams.
    pub fn new(target: SocketAddr) -> LoadSpec {
        LoadSpec {
            target,
            flows: 2000,
            rate: Some(150_000),
            duration: Duration::from_secs(5),
            max_datagrams: None,
            size: DEFAULT_SIZE,
        }
    }

    pub fn validate(&self) -> Result<(), LoadError> {
        let invalid = |why: String| Err(LoadError::InvalidSpec(why));
        if self.flows == 0 {
            return invalid("at least one flow is needed".into());
        }
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.size) {
            return invalid(format!(
                "datagram size {} is outside {MIN_SIZE}..={MAX_SIZE}",
                self.size
            ));
        }
        if self.rate == Some(0) {
            return invalid("a rate of 0 sends nothing; use a positive rate or max".into());
        }
        if self.duration.is_zero() {
            return invalid("the duration must be positive".into());
        }
        Ok(())
    }
}

/// What the sending side did.
#[derive(Clone, Debug, PartialEq)]
pub struct SendReport {
    /// Datagrams the kernel accepted.
    pub sent: u64,
    /// Sends that failed (EAGAIN, ENOBUFS, ECONNREFUSED, ...): not counted in `sent`.
    pub send_errors: u64,
    /// The first send error, for the report.
    pub first_send_error: Option<String>,
    /// Schedule slots given up because the generator fell too far behind (paced loads only).
    pub slipped: u64,
    /// Time spent sending.
    pub elapsed: Duration,
}

impl SendReport {
    /// Datagrams sent per second.
    pub fn achieved_rate(&self) -> f64 {
        per_second(self.sent, self.elapsed)
    }
}

/// What a load did, from the sender and the sink's points of view.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    /// The rate asked for; `None` for as fast as possible.
    pub offered_rate: Option<u64>,
    pub flows: usize,
    pub sent: u64,
    pub send_errors: u64,
    pub first_send_error: Option<String>,
    pub slipped: u64,
    /// Generated datagrams that reached the sink during this load.
    pub received: u64,
    /// `sent - received` (0 if the sink received more, e.g. from another sender).
    pub lost: u64,
    pub loss_ratio: f64,
    /// Datagrams that reached the sink a second time (not counted in `received`).
    pub duplicates: u64,
    /// Datagrams at the sink that did not parse.
    pub malformed: u64,
    /// Received per sink address.
    pub per_sink: Vec<(SocketAddr, u64)>,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub max_latency: Option<Duration>,
    /// Time spent sending (the drain is not included).
    pub elapsed: Duration,
    /// Datagrams sent per second.
    pub achieved_rate: f64,
    /// Bidirectional loads ([`Generator::run_echo`]): what came back.
    pub replies: Option<Replies>,
}

/// The return leg of a bidirectional load: the sink's echoes as the flows received them.
#[derive(Clone, Debug, PartialEq)]
pub struct Replies {
    /// Datagrams the sink sent back (or tried to: one its buffer refused counts as lost on
    /// the way back). Duplicates the proxy delivered are echoed too, and show here as loss.
    pub echoed: u64,
    /// Echoes that reached their flow, each sequence number counted once.
    pub received: u64,
    pub duplicates: u64,
    /// Round-trip time (reply time minus the datagram's timestamp).
    pub rtt_p50: Option<Duration>,
    pub rtt_p99: Option<Duration>,
}

impl Replies {
    /// Echoes lost on the way back, as a share of those sent back.
    pub fn loss_ratio(&self) -> f64 {
        if self.echoed == 0 {
            0.0
        } else {
            self.echoed.saturating_sub(self.received) as f64 / self.echoed as f64
        }
    }
}

impl LoadReport {
    pub fn to_json(&self) -> serde_json::Value {
        let micros = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e6);
        json!({
            "offered_rate": self.offered_rate,
            "flows": self.flows,
            "sent": self.sent,
            "send_errors": self.send_errors,
            "first_send_error": self.first_send_error,
            "slipped": self.slipped,
            "received": self.received,
            "lost": self.lost,
            "loss_ratio": self.loss_ratio,
            "duplicates": self.duplicates,
            "malformed": self.malformed,
            "per_sink": self.per_sink.iter()
                .map(|(addr, n)| json!({"addr": addr.to_string(), "received": n}))
                .collect::<Vec<_>>(),
            "p50_us": micros(self.p50),
            "p99_us": micros(self.p99),
            "max_latency_us": micros(self.max_latency),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "achieved_rate": self.achieved_rate,
            "replies": self.replies.as_ref().map(|r| json!({
                "echoed": r.echoed,
                "received": r.received,
                "duplicates": r.duplicates,
                "loss_ratio": r.loss_ratio(),
                "rtt_p50_us": micros(r.rtt_p50),
                "rtt_p99_us": micros(r.rtt_p99),
            })),
        })
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let offered = self
            .offered_rate
            .map_or_else(|| "max".to_string(), |r| format!("{r}/s"));
        writeln!(
            f,
            "offered {offered} over {} flows for {:.2}s: sent {} ({:.0}/s), {} send errors, {} slipped",
            self.flows,
            self.elapsed.as_secs_f64(),
            self.sent,
            self.achieved_rate,
            self.send_errors,
            self.slipped,
        )?;
        if let Some(err) = &self.first_send_error {
            writeln!(f, "first send error: {err}")?;
        }
        writeln!(
            f,
            "received {}, lost {} ({:.3}%), duplicates {}, malformed {}",
            self.received,
            self.lost,
            self.loss_ratio * 100.0,
            self.duplicates,
            self.malformed
        )?;
        for (addr, n) in &self.per_sink {
            writeln!(f, "  sink {addr}: {n}")?;
        }
        write!(
            f,
            "latency p50 {} p99 {} max {}",
            show_latency(self.p50),
            show_latency(self.p99),
            show_latency(self.max_latency)
        )?;
        if let Some(r) = &self.replies {
            write!(
                f,
                "\nreplies: {} echoed, {} received ({:.3}% lost on the way back), {} duplicates, \
                 round trip p50 {} p99 {}",
                r.echoed,
                r.received,
                r.loss_ratio() * 100.0,
                r.duplicates,
                show_latency(r.rtt_p50),
                show_latency(r.rtt_p99)
            )?;
        }
        Ok(())
    }
}

/// A latency for people: `12.3µs`, `4.56ms`, or `-` when nothing arrived.
pub fn show_latency(latency: Option<Duration>) -> String {
    match latency {
        None => "-".to_string(),
        Some(d) if d < Duration::from_millis(1) => format!("{:.1}µs", d.as_secs_f64() * 1e6),
        Some(d) => format!("{:.2}ms", d.as_secs_f64() * 1e3),
    }
}

/// The flows of a load, kept open across loads so that a proxy sees the same clients (same
/// source ports, same CIDs) from the warm-up to the last measurement.
pub struct Generator {
    target: SocketAddr,
    sockets: Vec<UdpSocket>,
    flows: usize,
    /// Where the walk over the flows resumes: (socket, round). Flow `s + k * sockets` is
    /// socket `s`'s k-th; a round visits every flow of socket 0, then of socket 1, and so on,
    /// so consecutive datagrams share a socket and go out in one `sendmmsg`.
    cursor: (usize, usize),
}

impl Generator {
    /// Opens one non-blocking socket per flow, each bound to an ephemeral port and connected
    /// to `target`. Raises the soft open-file limit if it is too low for them.
    pub fn open(target: SocketAddr, flows: usize) -> Result<Generator, LoadError> {
        Generator::open_shared(target, flows, flows)
    }

    /// Opens `sources` sockets (at most one per flow) for `flows` flows: flow f sends from
    /// socket `f % sources`. A proxy that keys sessions on the connection ID sees `flows`
    /// clients; one that keys on the 4-tuple sees `sources`.
    pub fn open_shared(
        target: SocketAddr,
        flows: usize,
        sources: usize,
    ) -> Result<Generator, LoadError> {
        if flows == 0 || sources == 0 {
            return Err(LoadError::InvalidSpec(
                "at least one flow and one source are needed".into(),
            ));
        }
        let sources = sources.min(flows);
        ensure_fd_limit(sources)?;
        let local = SocketAddr::new(local_ip_for(target.ip()), 0);
        let open = |index: usize| -> Result<UdpSocket, LoadError> {
            let socket = UdpSocket::bind(local)
                .and_then(|s| s.connect(target).map(|()| s))
                .and_then(|s| s.set_nonblocking(true).map(|()| s));
            socket.map_err(|source| LoadError::OpenFlow {
                index,
                flows,
                target,
                source,
            })
        };
        let sockets = (0..sources).map(open).collect::<Result<Vec<_>, _>>()?;
        Ok(Generator {
            target,
            sockets,
            flows,
            cursor: (0, 0),
        })
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn flows(&self) -> usize {
        self.flows
    }

    /// The source sockets' addresses, in socket order.
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.sockets.iter().map(UdpSocket::local_addr).collect()
    }

    /// The source sockets (a reply reader polls them).
    pub fn sockets(&self) -> &[UdpSocket] {
        &self.sockets
    }

    /// Sends the load described by `spec` (whose target and flow count must be this
    /// generator's) and returns what the sending side did.
    pub fn send(&mut self, spec: &LoadSpec) -> Result<SendReport, LoadError> {
        spec.validate()?;
        if spec.target != self.target || spec.flows != self.flows {
            return Err(LoadError::SpecMismatch {
                target: self.target,
                flows: self.flows,
                want_target: spec.target,
                want_flows: spec.flows,
            });
        }
        // Sleeps of ~100 µs must not be stretched by the default 50 µs timer slack.
        let old_slack = nix::sys::prctl::get_timerslack().ok();
        let _ = nix::sys::prctl::set_timerslack(1);
        let report = self.send_paced(spec);
        if let Some(slack) = old_slack.and_then(|s| libc::c_ulong::try_from(s).ok()) {
            let _ = nix::sys::prctl::set_timerslack(slack);
        }
        Ok(report)
    }

    /// The next flow of the walk and its socket.
    fn next_flow(&mut self) -> (usize, usize) {
        let n = self.sockets.len();
        loop {
            let (s, k) = self.cursor;
            let flow = s + k * n;
            if flow < self.flows {
                self.cursor = (s, k + 1);
                return (flow, s);
            }
            self.cursor = ((s + 1) % n, 0);
        }
    }

    fn send_paced(&mut self, spec: &LoadSpec) -> SendReport {
        let limit = spec.max_datagrams.unwrap_or(u64::MAX);
        let mut pacer = spec.rate.map(Pacer::new);
        let mut batch = Batch::new(SEND_BATCH, spec.size);
        let mut report = SendReport {
            sent: 0,
            send_errors: 0,
            first_send_error: None,
            slipped: 0,
            elapsed: Duration::ZERO,
        };
        let mut offered = 0u64;
        let start = Instant::now();
        loop {
            let elapsed = start.elapsed();
            if elapsed >= spec.duration || offered >= limit {
                break;
            }
            let burst = match pacer.as_mut().map(|p| p.step(elapsed)) {
                None => UNPACED_CHUNK,
                Some(Step::Send(n)) => n,
                Some(Step::Wait(d)) => {
                    std::thread::sleep(d.min(spec.duration - elapsed));
                    continue;
                }
            };
            let mut left = burst.min(limit - offered);
            offered += left;
            while left > 0 {
                // One socket's next flows, up to a batch.
                let socket = self.cursor.0;
                batch.clear();
                while left > 0 && batch.len() < batch.capacity() {
                    let before = self.cursor;
                    let (flow, s) = self.next_flow();
                    if s != socket {
                        self.cursor = before;
                        // Rewind the wrap: the flow goes in the next batch.
                        break;
                    }
                    let datagram = Datagram {
                        cid: flow_cid(flow),
                        seq: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
                        sent_ns: monotonic_ns(),
                    };
                    // The slot is `spec.size` >= MIN_SIZE bytes (validated): the header fits.
                    let _ = batch.push_with(spec.size, |buf| datagram.encode(buf));
                    left -= 1;
                }
                if batch.is_empty() {
                    // The cursor sat at the end of a socket's flows: move on.
                    self.cursor = ((self.cursor.0 + 1) % self.sockets.len(), 0);
                    continue;
                }
                let (sent, err) = batch.send_connected(self.sockets[socket].as_fd());
                report.sent += sent as u64;
                if let Some(e) = err {
                    let failed = (batch.len() - sent) as u64;
                    report.send_errors += failed;
                    report.first_send_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        report.elapsed = start.elapsed();
        report.slipped = pacer.map_or(0, |p| p.slipped());
        report
    }

    /// Sends the load, waits for the stragglers (until nothing arrived for 200 ms, at most
    /// 2 s) and reports what reached `sink` meanwhile. The sink's counters are compared before
    /// and after, so one sink can serve several loads one after the other.
    pub fn run(&mut self, spec: &LoadSpec, sink: &Sink) -> Result<LoadReport, LoadError> {
        let before = sink.stats();
        let arrivals_before = sink.arrivals();
        let send = self.send(spec)?;
        drain(sink, arrivals_before, send.sent);
        let delta = sink.stats().since(&before);
        let nanos = |q: f64| delta.latency.quantile(q).map(Duration::from_nanos);
        let lost = send.sent.saturating_sub(delta.received);
        Ok(LoadReport {
            offered_rate: spec.rate,
            flows: spec.flows,
            sent: send.sent,
            send_errors: send.send_errors,
            first_send_error: send.first_send_error.clone(),
            slipped: send.slipped,
            received: delta.received,
            lost,
            loss_ratio: if send.sent == 0 {
                0.0
            } else {
                lost as f64 / send.sent as f64
            },
            duplicates: delta.duplicates,
            malformed: delta.malformed,
            per_sink: sink.addrs().iter().copied().zip(delta.per_addr).collect(),
            p50: nanos(0.50),
            p99: nanos(0.99),
            max_latency: delta.latency.max().map(Duration::from_nanos),
            elapsed: send.elapsed,
            achieved_rate: send.achieved_rate(),
            replies: None,
        })
    }

    /// As [`Generator::run`] against an echo sink ([`Sink::bind_echo`]): a thread reads the
    /// echoes on the flows' own sockets meanwhile, and the report gains what came back and
    /// the round-trip times. After the drain it waits for the echoes still on their way (until
    /// as many came back as the sink sent, nothing came for 200 ms, or 2 s passed).
    pub fn run_echo(&mut self, spec: &LoadSpec, sink: &Sink) -> Result<LoadReport, LoadError> {
        let readers = self
            .sockets
            .iter()
            .map(UdpSocket::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| LoadError::OpenFlow {
                index: 0,
                flows: self.flows,
                target: self.target,
                source,
            })?;
        let echoed_before = sink.echoed();
        let stop = AtomicBool::new(false);
        let count = AtomicU64::new(0);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| read_replies(&readers, spec.size, &stop, &count));
            let report = self.run(spec, sink);
            let start = Instant::now();
            let (mut last, mut last_change) = (0, start);
            loop {
                let now = Instant::now();
                let got = count.load(Ordering::Relaxed);
                if got >= sink.echoed() - echoed_before {
                    break;
                }
                if got != last {
                    (last, last_change) = (got, now);
                }
                if now - last_change >= DRAIN_QUIET || now - start >= DRAIN_MAX {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
            let tally = reader.join().unwrap_or_default();
            let mut report = report?;
            let nanos = |q: f64| tally.rtt.quantile(q).map(Duration::from_nanos);
            report.replies = Some(Replies {
                echoed: sink.echoed() - echoed_before,
                received: tally.received,
                duplicates: tally.duplicates,
                rtt_p50: nanos(0.50),
                rtt_p99: nanos(0.99),
            });
            Ok(report)
        })
    }
}

/// What the reply reader counted.
#[derive(Default)]
struct ReplyTally {
    received: u64,
    duplicates: u64,
    rtt: Histogram,
}

/// Reads echoes on `sockets` (non-blocking) until `stop`, counting each sequence number once
/// (and every datagram read in `count`, for the caller's wait).
fn read_replies(
    sockets: &[UdpSocket],
    size: usize,
    stop: &AtomicBool,
    count: &AtomicU64,
) -> ReplyTally {
    use mio::unix::SourceFd;
    use mio::{Events, Interest, Poll, Token};
    use std::os::fd::AsRawFd;
    let mut tally = ReplyTally::default();
    let Ok(mut poll) = Poll::new() else {
        return tally;
    };
    for (i, s) in sockets.iter().enumerate() {
        // A socket that cannot be watched would never be read: its replies count as lost.
        if poll
            .registry()
            .register(&mut SourceFd(&s.as_raw_fd()), Token(i), Interest::READABLE)
            .is_err()
        {
            return tally;
        }
    }
    let mut seen = SeqSet::new();
    let mut batch = Batch::new(SEND_BATCH, size.max(MIN_SIZE));
    let mut events = Events::with_capacity(1024);
    while !stop.load(Ordering::Relaxed) {
        if poll
            .poll(&mut events, Some(Duration::from_millis(20)))
            .is_err()
        {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for event in events.iter() {
            let Some(socket) = sockets.get(event.token().0) else {
                continue;
            };
            // Edge-triggered: read until the socket is empty. Reading an error (an ICMP
            // port unreachable on a connected socket) clears it: go on after one.
            let mut errors = 0;
            loop {
                let n = match batch.recv(socket.as_fd()) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // A persistent error, not a queued one: leave the socket.
                    Err(_) if errors >= 8 => break,
                    Err(_) => {
                        errors += 1;
                        continue;
                    }
                };
                let now = monotonic_ns();
                for i in 0..n {
                    match Datagram::parse(batch.datagram(i)) {
                        Ok(d) if seen.insert(d.seq) => {
                            tally.received += 1;
                            tally.rtt.record(now.saturating_sub(d.sent_ns));
                        }
                        Ok(_) => tally.duplicates += 1,
                        Err(_) => {}
                    }
                }
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    tally
}

/// Opens the flows, sends the load into `spec.target` and reports what reached `sink`.
pub fn run_load(spec: &LoadSpec, sink: &Sink) -> Result<LoadReport, LoadError> {
    spec.validate()?;
    Generator::open(spec.target, spec.flows)?.run(spec, sink)
}

/// Opens the flows and sends the load, with no sink to count arrivals.
pub fn send_load(spec: &LoadSpec) -> Result<SendReport, LoadError> {
    spec.validate()?;
    Generator::open(spec.target, spec.flows)?.send(spec)
}

/// Waits until `sent` datagrams arrived after `arrivals_before`, or nothing arrived for
/// [`DRAIN_QUIET`], or [`DRAIN_MAX`] passed.
fn drain(sink: &Sink, arrivals_before: u64, sent: u64) {
    let start = Instant::now();
    let mut last = sink.arrivals();
    let mut last_change = start;
    loop {
        let now = Instant::now();
        let arrivals = sink.arrivals();
        if arrivals.saturating_sub(arrivals_before) >= sent {
            return;
        }
        if arrivals != last {
            last = arrivals;
            last_change = now;
        }
        if now - last_change >= DRAIN_QUIET || now - start >= DRAIN_MAX {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Loopback targets get loopback sources (127.0.0.1 as asked, whatever the target's 127/8
/// address); others the wildcard of their family.
fn local_ip_for(target: IpAddr) -> IpAddr {
    match target {
        IpAddr::V4(ip) if ip.is_loopback() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(ip) if ip.is_loopback() => Ipv6Addr::LOCALHOST.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

fn ensure_fd_limit(sockets: usize) -> Result<(), LoadError> {
    let needed = sockets as u64 + FD_HEADROOM;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(()); // Cannot tell; opening the sockets will say.
    };
    if soft >= needed {
        return Ok(());
    }
    if hard < needed {
        return Err(LoadError::FdLimit {
            flows: sockets,
            needed,
            hard,
        });
    }
    // Failure shows up as EMFILE when opening the flows, with its own message.
    let _ = setrlimit(Resource::RLIMIT_NOFILE, needed.max(soft), hard);
    Ok(())
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}
