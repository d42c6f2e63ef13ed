//! `udpshard demo`: the proxy at work on loopback, with nothing to set up.
//!
//! Two echo backends (threads in this process), the real proxy as a child
//! process (`udpshard run` on a config written to a temp directory), and a
//! client load of QUIC-shaped flows: each opens with a long-header Initial and
//! goes on with short headers under the same connection ID. Halfway through,
//! every fourth flow moves to a new source port, as a client whose NAT
//! rebinds would. Then the stats table, a summary of what the client saw
//! (replies per flow, whether each flow kept its backend), SIGTERM to the
//! proxy, and the temp directory removed. Everything is bounded in time and
//! count; Ctrl-C ends it early and cleans up the same way.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use udpshard_lab::{Echo, ProxyChild, TempDir};
use udpshard_shared::flow::{quic_initial, quic_short};

use crate::cpus::{allowed_cpus, format_cpu_list};
use crate::stats_cmd::{Sample, Window};

/// Prints a line to stdout. A reader that went away (`udpshard demo | head`)
/// costs the output, never the clean-up: the demo goes on and removes what
/// it started.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stdout(), $($arg)*);
    }};
}

/// Client flows; every fourth migrates.
const FLOWS: usize = 200;
const MIGRATE_EVERY: usize = 4;
/// Each flow sends once per round; a round is split into slices so the
/// datagrams are spread over time instead of arriving as one burst:
/// 200 flows every 100 ms is 2000 datagrams/s.
const ROUND: Duration = Duration::from_millis(100);
const SLICES: usize = 10;
/// QUIC: a client's Initial is padded to 1200 bytes; later packets are smaller.
const INITIAL_LEN: usize = 1200;
const SHORT_LEN: usize = 300;
const CID_LEN: usize = 8;
/// The demo shows a few workers even on a large machine (`run` uses all).
const MAX_WORKERS: usize = 4;
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const REPLY_GRACE: Duration = Duration::from_millis(500);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const MIN_DURATION: Duration = Duration::from_secs(1);
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(3600);

/// Echo backends' names: the first byte of every reply says who answered.
const BACKENDS: [u8; 2] = [b'A', b'B'];

#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoError {
    #[error("temp directory: {0}")]
    TempDir(io::Error),
    #[error("temp directory {0} is not valid UTF-8")]
    TempDirName(std::path::PathBuf),
    #[error("config file: {0}")]
    Config(io::Error),
    #[error("echo backend: {0}")]
    Backend(io::Error),
    #[error("{0}")]
    Proxy(udpshard_lab::SpawnError),
    #[error("no listener \"demo\" in the proxy's ready line")]
    ReadyLine,
    #[error("client: {0}")]
    Client(io::Error),
    #[error("stopping the proxy: {0}")]
    Stop(io::Error),
    #[error("stats: {0}")]
    Stats(udpshard_shared::stats::StatsError),
    #[error("the proxy exited with {0} after SIGTERM")]
    ProxyFailed(ExitStatus),
}

/// Parses `--duration`: "10s", "500ms", "2m", or plain seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. \"10s\", \"500ms\", \"2m\")"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("{text:?}: unit must be ms, s or m")),
    };
    if d < MIN_DURATION || d > MAX_DURATION {
        return Err(format!("{text:?} is out of range (1s..=1h)"));
    }
    Ok(d)
}

pub(crate) fn run(duration: Duration) -> ExitCode {
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&interrupted)) {
            let _ = writeln!(
                io::stderr(),
                "udpshard demo: cannot handle signal {signal}: {e}"
            );
            return ExitCode::FAILURE;
        }
    }
    match demo(duration, &interrupted) {
        Ok(_) if interrupted.load(Ordering::Relaxed) => {
            say!("(interrupted)");
            ExitCode::from(130)
        }
        Ok(summary) if summary.replies == 0 => {
            let _ = writeln!(
                io::stderr(),
                "udpshard demo: no datagram came back through the proxy"
            );
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(io::stderr(), "udpshard demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(duration: Duration, interrupted: &AtomicBool) -> Result<Summary, DemoError> {
    let dir = TempDir::new("demo").map_err(DemoError::TempDir)?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    // Bound now, served once the proxy runs: the proxy child is forked
    // before this process starts any thread.
    let echoes = [
        Echo::bind(loopback, &[BACKENDS[0]], false).map_err(DemoError::Backend)?,
        Echo::bind(loopback, &[BACKENDS[1]], false).map_err(DemoError::Backend)?,
    ];
    let addrs = [
        echoes[0].addr().map_err(DemoError::Backend)?,
        echoes[1].addr().map_err(DemoError::Backend)?,
    ];
    let cpus = allowed_cpus().unwrap_or_default();
    let workers = cpus.len().clamp(1, MAX_WORKERS);
    let stats_file = dir.path().join("stats");
    let config_file = dir.path().join("udpshard.toml");
    let config = demo_config(workers, &stats_file, addrs)?;
    std::fs::write(&config_file, config).map_err(DemoError::Config)?;

    say!(
        "udpshard demo: {workers} workers (CPUs {}), echo backends A {} and B {}",
        format_cpu_list(&cpus),
        addrs[0],
        addrs[1]
    );
    let exe = std::env::current_exe()
        .map_err(|e| DemoError::Proxy(udpshard_lab::SpawnError::Spawn(e)))?;
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg("--config").arg(&config_file);
    let mut proxy =
        ProxyChild::spawn(cmd, eprintln_quiet, READY_TIMEOUT).map_err(DemoError::Proxy)?;
    let [a, b] = echoes;
    let backends = [
        a.start().map_err(DemoError::Backend)?,
        b.start().map_err(DemoError::Backend)?,
    ];
    let addr = *proxy.listeners.get("demo").ok_or(DemoError::ReadyLine)?;
    say!(
        "proxy ready on {addr}; client: {FLOWS} QUIC flows for {:.1}s, {} datagrams/s; every {}th flow moves to a new source port halfway",
        duration.as_secs_f64(),
        FLOWS as u64 * 1000 / ROUND.as_millis() as u64,
        MIGRATE_EVERY
    );
    let before = Sample::take(&stats_file).map_err(DemoError::Stats)?;
    let mut summary = drive_load(addr, duration, interrupted)?;
    summary.backend_received = [backends[0].received(), backends[1].received()];
    say!();
    let after = Sample::take(&stats_file).map_err(DemoError::Stats)?;
    say!(
        "{}",
        crate::stats_cmd::window_table(&before, &after, Window::Deltas, false)
    );
    say!("{}\n", summary.render());
    say!("stopping the proxy (SIGTERM): workers drain their sessions, then exit");
    let status = proxy.stop(STOP_TIMEOUT).map_err(DemoError::Stop)?;
    proxy.wait_log_closed(Duration::from_secs(1));
    if !status.success() {
        return Err(DemoError::ProxyFailed(status));
    }
    say!("proxy exited cleanly; removing {}", dir.path().display());
    Ok(summary)
}

/// The proxy's log, indented, on stderr; a closed stderr loses the lines only.
fn eprintln_quiet(line: &str) {
    let _ = writeln!(io::stderr(), "  proxy | {line}");
}

/// The config the demo's proxy runs: one QUIC listener on an ephemeral
/// loopback port, stats in the demo's temp directory.
fn demo_config(
    workers: usize,
    stats_file: &Path,
    backends: [SocketAddr; 2],
) -> Result<String, DemoError> {
    let stats = stats_file
        .to_str()
        .ok_or_else(|| DemoError::TempDirName(stats_file.to_path_buf()))?;
    // A JSON string is a valid TOML basic string: quotes and backslashes escaped.
    let stats = serde_json::Value::from(stats).to_string();
    Ok(format!(
        "# written by `udpshard demo`\n\
         workers = {workers}\n\
         stats_file = {stats}\n\
         \n\
         [[listener]]\n\
         name = \"demo\"\n\
         bind = \"127.0.0.1:0\"\n\
         dissector = \"quic\"\n\
         short_cid_len = {CID_LEN}\n\
         # short, so that the drain on SIGTERM ends soon after the load\n\
         session_idle = \"1s\"\n\
         # outside the kernel's ephemeral range, and what an 11,024-descriptor\n\
         # limit holds: the demo's 200 flows need far less\n\
         upstream_ports = \"20000-29999\"\n\
         max_sessions = 10000\n\
         backends = [\"{}\", \"{}\"]\n",
        backends[0], backends[1]
    ))
}

/// A QUIC-shaped datagram of flow `flow`: the first one a long-header
/// Initial (DCID length at byte 5, DCID from byte 6), padded to 1200 bytes;
/// the rest short headers (DCID from byte 1). Flow index and sequence number
/// follow the header.
fn datagram(cid: u64, flow: u32, seq: u32) -> Vec<u8> {
    let mut d = if seq == 0 {
        quic_initial(&cid.to_be_bytes(), &[], &[])
    } else {
        quic_short(&cid.to_be_bytes(), &[])
    };
    d.extend_from_slice(&flow.to_be_bytes());
    d.extend_from_slice(&seq.to_be_bytes());
    d.resize(if seq == 0 { INITIAL_LEN } else { SHORT_LEN }, 0);
    d
}

/// A flow's connection ID: spread over the hash space, different every run.
fn flow_cid(seed: u64, flow: usize) -> u64 {
    // splitmix64
    let mut z = seed.wrapping_add((flow as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the client saw of one flow.
#[derive(Debug, Default, Clone)]
struct FlowRecord {
    sent: u32,
    replies: u64,
    migrated: bool,
    replies_after_move: u64,
    /// The backend that answered first.
    backend: Option<u8>,
    /// Another backend answered later.
    switched: bool,
}

impl FlowRecord {
    fn reply(&mut self, reply: &[u8], on_new_port: bool) {
        let Some(&backend) = reply.first() else {
            return;
        };
        self.replies += 1;
        if on_new_port {
            self.replies_after_move += 1;
        }
        match self.backend {
            None => self.backend = Some(backend),
            Some(b) if b != backend => self.switched = true,
            Some(_) => {}
        }
    }
}

struct ClientFlow {
    cid: u64,
    socket: mio::net::UdpSocket,
    /// The socket before the move, still read: replies already on their way.
    old_socket: Option<mio::net::UdpSocket>,
    record: FlowRecord,
}

fn client_socket(proxy: SocketAddr) -> io::Result<mio::net::UdpSocket> {
    let socket = mio::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    socket.connect(proxy)?;
    Ok(socket)
}

/// Sends the load and collects the replies; returns what the client saw.
fn drive_load(
    proxy: SocketAddr,
    duration: Duration,
    interrupted: &AtomicBool,
) -> Result<Summary, DemoError> {
    let mut poll = Poll::new().map_err(DemoError::Client)?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut flows = Vec::with_capacity(FLOWS);
    for i in 0..FLOWS {
        let mut socket = client_socket(proxy).map_err(DemoError::Client)?;
        poll.registry()
            .register(&mut socket, Token(i), Interest::READABLE)
            .map_err(DemoError::Client)?;
        flows.push(ClientFlow {
            cid: flow_cid(seed, i),
            socket,
            old_socket: None,
            record: FlowRecord::default(),
        });
    }
    let mut events = Events::with_capacity(1024);
    let slice = ROUND / SLICES as u32;
    let ticks = (duration.as_nanos() / slice.as_nanos()).max(2) as usize;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut buf = vec![0u8; 65536];
    for tick in 0..ticks {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        if tick == ticks / 2 {
            migrate(&mut flows, &poll, proxy)?;
        }
        for (i, flow) in flows.iter_mut().enumerate() {
            if i % SLICES != tick % SLICES {
                continue;
            }
            let d = datagram(flow.cid, i as u32, flow.record.sent);
            // A full socket buffer is the client's own loss: the datagram
            // simply does not count as sent.
            if flow.socket.send(&d).is_ok() {
                flow.record.sent += 1;
                sent += 1;
            }
        }
        let next = start + slice * (tick as u32 + 1);
        collect(&mut poll, &mut events, &mut flows, &mut buf, next)?;
    }
    // Replies still on their way.
    let grace = Instant::now() + REPLY_GRACE;
    while Instant::now() < grace && replies(&flows) < sent && !interrupted.load(Ordering::Relaxed) {
        let next = (Instant::now() + Duration::from_millis(20)).min(grace);
        collect(&mut poll, &mut events, &mut flows, &mut buf, next)?;
    }
    let records: Vec<FlowRecord> = flows.into_iter().map(|f| f.record).collect();
    Ok(Summary::of(&records, sent, start.elapsed()))
}

fn replies(flows: &[ClientFlow]) -> u64 {
    flows.iter().map(|f| f.record.replies).sum()
}

/// Every MIGRATE_EVERY-th flow continues from a new socket (a new source
/// port) with the same connection ID; the old socket is kept for replies
/// already in flight.
fn migrate(flows: &mut [ClientFlow], poll: &Poll, proxy: SocketAddr) -> Result<(), DemoError> {
    for (i, flow) in flows.iter_mut().enumerate().step_by(MIGRATE_EVERY) {
        let new = client_socket(proxy).map_err(DemoError::Client)?;
        let mut old = std::mem::replace(&mut flow.socket, new);
        poll.registry()
            .reregister(&mut old, Token(FLOWS + i), Interest::READABLE)
            .map_err(DemoError::Client)?;
        poll.registry()
            .register(&mut flow.socket, Token(i), Interest::READABLE)
            .map_err(DemoError::Client)?;
        flow.old_socket = Some(old);
        flow.record.migrated = true;
    }
    Ok(())
}

/// Reads replies until `until`.
fn collect(
    poll: &mut Poll,
    events: &mut Events,
    flows: &mut [ClientFlow],
    buf: &mut [u8],
    until: Instant,
) -> Result<(), DemoError> {
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        match poll.poll(events, Some(until - now)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(DemoError::Client(e)),
        }
        for event in events.iter() {
            let Token(t) = event.token();
            let (i, old) = if t >= FLOWS {
                (t - FLOWS, true)
            } else {
                (t, false)
            };
            let Some(flow) = flows.get_mut(i) else {
                continue;
            };
            let socket = if old {
                flow.old_socket.as_ref()
            } else {
                Some(&flow.socket)
            };
            let Some(socket) = socket else { continue };
            loop {
                match socket.recv(buf) {
                    Ok(n) => {
                        let on_new_port = flow.record.migrated && !old;
                        flow.record.reply(&buf[..n], on_new_port);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // ECONNREFUSED from an earlier send: nothing to read.
                    Err(_) => break,
                }
            }
        }
    }
}

/// What the demo's client saw, for people.
#[derive(Debug, Default, PartialEq)]
struct Summary {
    sent: u64,
    replies: u64,
    elapsed: Duration,
    flows: usize,
    flows_answered: usize,
    migrated: usize,
    migrated_answered_on_new_port: usize,
    switched_backend: usize,
    flows_per_backend: Vec<(u8, usize)>,
    /// Datagrams each echo backend received (filled in by the caller).
    backend_received: [u64; 2],
}

impl Summary {
    fn of(records: &[FlowRecord], sent: u64, elapsed: Duration) -> Summary {
        let mut flows_per_backend: Vec<(u8, usize)> = Vec::new();
        for b in records.iter().filter_map(|r| r.backend) {
            match flows_per_backend.iter_mut().find(|(name, _)| *name == b) {
                Some((_, n)) => *n += 1,
                None => flows_per_backend.push((b, 1)),
            }
        }
        flows_per_backend.sort_unstable();
        Summary {
            sent,
            replies: records.iter().map(|r| r.replies).sum(),
            elapsed,
            flows: records.len(),
            flows_answered: records.iter().filter(|r| r.replies > 0).count(),
            migrated: records.iter().filter(|r| r.migrated).count(),
            migrated_answered_on_new_port: records
                .iter()
                .filter(|r| r.migrated && r.replies_after_move > 0)
                .count(),
            switched_backend: records.iter().filter(|r| r.switched).count(),
            flows_per_backend,
            backend_received: [0, 0],
        }
    }

    fn render(&self) -> String {
        let pct = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                part as f64 * 100.0 / whole as f64
            }
        };
        let per_backend: Vec<String> = self
            .flows_per_backend
            .iter()
            .map(|(b, n)| format!("{}: {n} flows", *b as char))
            .collect();
        let kept = if self.switched_backend == 0 {
            format!("yes, every flow ({})", per_backend.join(", "))
        } else {
            format!(
                "NO: {} flows were answered by more than one backend ({})",
                self.switched_backend,
                per_backend.join(", ")
            )
        };
        format!(
            "summary ({:.1}s of load):\n\
             \x20 datagrams sent:      {}\n\
             \x20 replies received:    {} ({:.1}%)\n\
             \x20 backends received:   A {}, B {}\n\
             \x20 flows answered:      {} of {}\n\
             \x20 flows migrated:      {} to a new source port, {} answered there\n\
             \x20 kept their backend:  {kept}",
            self.elapsed.as_secs_f64(),
            self.sent,
            self.replies,
            pct(self.replies, self.sent),
            self.backend_received[0],
            self.backend_received[1],
            self.flows_answered,
            self.flows,
            self.migrated,
            self.migrated_answered_on_new_port,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use udpshard_shared::flow::{Dissector, FlowKey};

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("500ms").is_err(), "below 1s");
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
    }

    #[test]
    fn datagrams_carry_the_flow_cid_for_the_quic_dissector() {
        let quic = Dissector::Quic {
            short_cid_len: CID_LEN,
        };
        let client = SocketAddr::from(([127, 0, 0, 1], 5555));
        let cid = flow_cid(7, 3);
        let want = FlowKey::new(&cid.to_be_bytes());
        let initial = datagram(cid, 3, 0);
        let short = datagram(cid, 3, 1);
        assert_eq!(initial.len(), INITIAL_LEN);
        assert_eq!(short.len(), SHORT_LEN);
        assert_eq!(quic.flow_key(&initial, client).ok(), want);
        assert_eq!(quic.flow_key(&short, client).ok(), want);
    }

    #[test]
    fn flow_cids_differ() {
        let mut cids: Vec<u64> = (0..FLOWS).map(|i| flow_cid(42, i)).collect();
        cids.sort_unstable();
        cids.dedup();
        assert_eq!(cids.len(), FLOWS);
    }

    #[test]
    fn config_is_valid_and_escapes_the_stats_path() {
        let backends = [
            SocketAddr::from(([127, 0, 0, 1], 1000)),
            SocketAddr::from(([127, 0, 0, 1], 1001)),
        ];
        let path = Path::new("/tmp/odd \"dir\\\"/stats");
        let text = demo_config(3, path, backends).unwrap();
        let cfg = udpshard_config::parse(&text, "demo").unwrap();
        assert_eq!(cfg.stats_file, path);
        assert_eq!(cfg.workers, udpshard_config::Workers::Count(3));
        assert_eq!(cfg.listeners[0].backends.len(), 2);
    }

    #[test]
    fn summary_counts_affinity_and_migration() {
        let mut stay = FlowRecord::default();
        stay.reply(b"Ax", false);
        stay.reply(b"Ay", false);
        let mut moved = FlowRecord {
            migrated: true,
            ..FlowRecord::default()
        };
        moved.reply(b"Bx", false);
        moved.reply(b"By", true);
        let mut switched = FlowRecord::default();
        switched.reply(b"Ax", false);
        switched.reply(b"Bx", false);
        let silent = FlowRecord::default();
        let s = Summary::of(&[stay, moved, switched, silent], 10, Duration::from_secs(2));
        assert_eq!(s.replies, 6);
        assert_eq!(s.flows, 4);
        assert_eq!(s.flows_answered, 3);
        assert_eq!(s.migrated, 1);
        assert_eq!(s.migrated_answered_on_new_port, 1);
        assert_eq!(s.switched_backend, 1);
        assert_eq!(s.flows_per_backend, vec![(b'A', 2), (b'B', 1)]);
        let text = s.render();
        assert!(text.contains("replies received:    6 (60.0%)"), "{text}");
        assert!(text.contains("NO: 1 flows"), "{text}");
    }
}
