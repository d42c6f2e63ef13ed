//! `flood-bench`: udpshard under hostile traffic. Established flows at a
//! steady rate and new legitimate connections (answered by backends that,
//! as QUIC servers do, answer what they can read and ignore the rest) run
//! through each phase:
//!
//! 1. baseline: no flood;
//! 2. junk Initials (1200 bytes, random connection IDs, forged loopback
//!    sources through a raw socket) at each `--flood` rate (`max`: as fast
//!    as the generator goes);
//! 3. a spray of the established flows' connection IDs from forged
//!    addresses.
//!
//! Per phase: loss on the established flows, the share of new connections
//! answered within 1 s, proxy CPU per flood datagram against a forwarded
//! one (from the baseline), what the flood holds (embryonic sessions,
//! upstream sockets, descriptors, memory), and after the spray whether
//! every established flow still reaches its backend from the one proxy
//! address it had. Without a raw socket (not root) the forged sources are
//! sockets bound on 127.1.0.0/16.
//!
//! `bash tests/bench.sh flood [--flood 20k --flood 100k --flood max]`.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use udpshard_shared::flow::{quic_initial, quic_short, QUIC_MIN_INITIAL};
use udpshard_shared::stats::{Counter, Snapshot};
use udpshard_tests::load::procstat::{all_processes, tree_cpu_time, tree_pids};
use udpshard_tests::load::proxy::{free_udp_addr, host_lock, own_dir, ProxyProcess};
use udpshard_tests::load::units::{parse_duration, parse_rate};

/// What a readable datagram carries; the backends ignore anything else.
const LEGIT: &[u8] = b"LEGIT";

#[derive(Parser, Debug)]
#[command(
    version,
    about = "udpshard under junk Initials and sprays of live CIDs"
)]
struct Args {
    /// Flood rates, datagrams/s, or `max` (repeatable).
    #[arg(long = "flood", default_values = ["20k", "100k", "max"])]
    floods: Vec<String>,
    /// Length of each phase.
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured junk at 20k/s after the baseline, so that the measured
    /// phases do not count the upstream sockets it first opens.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Established flows (connection IDs on one client socket).
    #[arg(long, default_value_t = 200)]
    flows: u64,
    /// Their datagrams/s, all together.
    #[arg(long, default_value = "10k", value_parser = rate)]
    flow_rate: u64,
    /// New legitimate connections per second.
    #[arg(long, default_value_t = 50)]
    new_per_second: u64,
    /// The spray's datagrams/s.
    #[arg(long, default_value = "20k", value_parser = rate)]
    spray_rate: u64,
    /// Where the udpshard binary is; default: beside this one.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn rate(text: &str) -> Result<u64, String> {
    parse_rate(text)?.ok_or_else(|| "a number of datagrams per second".into())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("flood-bench: {why}");
            ExitCode::FAILURE
        }
    }
}

/// A backend that answers a readable datagram with its CID and sequence
/// number, and records which proxy address each CID came from.
struct Backend {
    addr: SocketAddr,
    froms: Arc<Mutex<HashMap<u64, HashSet<SocketAddr>>>>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    fn start() -> Result<Backend, String> {
        let socket =
            udpshard_lab::bind_udp("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?;
        let addr = socket.local_addr().map_err(|e| e.to_string())?;
        let froms = Arc::new(Mutex::new(HashMap::<u64, HashSet<SocketAddr>>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, done) = (froms.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let d = &buf[..n];
                let Some(at) = d.windows(LEGIT.len()).position(|w| w == LEGIT) else {
                    continue;
                };
                let cid = cid_of(d);
                log.lock().unwrap().entry(cid).or_default().insert(from);
                // The answer: the CID, then what followed the marker (the
                // flow's sequence number).
                let tail = &d[at + LEGIT.len()..(at + LEGIT.len() + 8).min(n)];
                let _ = socket.send_to(&quic_short(&cid.to_be_bytes(), tail), from);
            }
        });
        Ok(Backend { addr, froms, stop })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn cid_of(d: &[u8]) -> u64 {
    let at = if d.first().is_some_and(|b| b & 0x80 != 0) {
        6
    } else {
        1
    };
    d.get(at..at + 8)
        .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
}

/// Forged datagrams: a raw socket that writes whole IPv4 packets from any
/// 127.0.0.0/8 source, or, without one, sockets on 127.1.0.0/16.
enum Forger {
    Raw(socket2::Socket),
    Sockets(Vec<UdpSocket>),
}

impl Forger {
    fn open() -> Forger {
        let raw = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        );
        match raw {
            Ok(s) => Forger::Raw(s),
            Err(e) => {
                eprintln!("flood-bench: no raw socket ({e}); forged sources are 512 sockets");
                Forger::Sockets(
                    (0..512)
                        .filter_map(|i| {
                            UdpSocket::bind(format!("127.1.{}.{}:0", 1 + i / 250, 1 + i % 250)).ok()
                        })
                        .collect(),
                )
            }
        }
    }

    /// Sends `payload` to `to` from forged source number `n`.
    fn send(&self, n: u64, to: SocketAddrV4, payload: &[u8], packet: &mut Vec<u8>) {
        match self {
            Forger::Raw(s) => {
                // 127.2.0.0/15 and up, a port per source.
                let src = Ipv4Addr::from(0x7f02_0000u32 + (n as u32 & 0x00ff_ffff));
                let sport = 1024 + (n % 60_000) as u16;
                packet.clear();
                let len = (20 + 8 + payload.len()) as u16;
                // IPv4 header: the kernel fills the checksum (and the id)
                // for IP_HDRINCL.
                packet.extend_from_slice(&[0x45, 0]);
                packet.extend_from_slice(&len.to_be_bytes());
                packet.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
                packet.extend_from_slice(&src.octets());
                packet.extend_from_slice(&to.ip().octets());
                // UDP header, no checksum (allowed on IPv4).
                packet.extend_from_slice(&sport.to_be_bytes());
                packet.extend_from_slice(&to.port().to_be_bytes());
                packet.extend_from_slice(&(len - 20).to_be_bytes());
                packet.extend_from_slice(&[0, 0]);
                packet.extend_from_slice(payload);
                let _ = s.send_to(packet, &SocketAddr::V4(to).into());
            }
            Forger::Sockets(sockets) => {
                let s = &sockets[n as usize % sockets.len()];
                let _ = s.send_to(payload, to);
            }
        }
    }
}

/// A source of random numbers good enough for junk.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What a phase sends besides the flows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Hostile {
    None,
    /// Junk Initials at this rate (None: as fast as it goes).
    Junk(Option<u64>),
    /// The flows' CIDs from forged addresses at this rate.
    Spray(u64),
}

/// One phase's figures.
#[derive(Debug, Default)]
struct Phase {
    name: String,
    flow_sent: u64,
    flow_received: u64,
    new_tried: u64,
    new_answered: u64,
    hostile_sent: u64,
    hostile_read: u64,
    forwarded: u64,
    proxy_cpu: Duration,
    embryonic: u64,
    evicted: u64,
    sockets: u64,
    fds: u64,
    rss_kib: u64,
    refused: u64,
    secs: f64,
}

fn run(args: &Args) -> Result<(), String> {
    let bin_dir = args
        .bin_dir
        .clone()
        .map_or_else(own_dir, Ok)
        .map_err(|e| e.to_string())?;
    let _lock = host_lock(Duration::from_secs(600))?;
    let workdir = std::env::temp_dir().join(format!("udpshard-flood-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).map_err(|e| e.to_string())?;
    let (config_path, stats) = (workdir.join("udpshard.toml"), workdir.join("stats"));
    let backends = [Backend::start()?, Backend::start()?];
    let listen = free_udp_addr().map_err(|e| e.to_string())?;
    let SocketAddr::V4(target) = listen else {
        return Err("an IPv4 listener".into());
    };
    // The packaged shape: ports for 10,000 paths per backend, admission's
    // defaults.
    let text = format!(
        "workers = \"auto\"\nstats_file = \"{}\"\ndrain_timeout = \"0s\"\n\n[[listener]]\n\
         name = \"flood\"\nbind = \"{listen}\"\ndissector = \"quic\"\nshort_cid_len = 8\n\
         recv_buffer = \"4MiB\"\nupstream_ports = \"20000-29999\"\nbackends = [\"{}\", \"{}\"]\n",
        stats.display(),
        backends[0].addr,
        backends[1].addr
    );
    std::fs::write(&config_path, text).map_err(|e| e.to_string())?;
    let mut command = Command::new(bin_dir.join("udpshard"));
    command.arg("run").arg("--config").arg(&config_path);
    let mut proxy = ProxyProcess::start(command).map_err(|e| format!("cannot start: {e}"))?;
    proxy.wait_ready(Duration::from_secs(15))?;
    let root = proxy.pid();

    // The established flows: their first flight, answered.
    let flows = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    flows
        .set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    for cid in 1..=args.flows {
        let mut d = quic_initial(&cid.to_be_bytes(), &[], LEGIT);
        d.resize(QUIC_MIN_INITIAL, 0);
        flows.send_to(&d, listen).map_err(|e| e.to_string())?;
    }
    let mut buf = [0u8; 256];
    let mut up = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while up < args.flows && Instant::now() < deadline {
        if flows.recv_from(&mut buf).is_ok() {
            up += 1;
        }
    }
    if up < args.flows {
        return Err(format!(
            "{up} of {} flows answered at the start",
            args.flows
        ));
    }
    let before: HashMap<u64, HashSet<SocketAddr>> = merged(&backends);

    let mut phases = vec![("baseline".to_string(), Hostile::None)];
    if !args.warmup.is_zero() {
        phases.push(("warm-up".to_string(), Hostile::Junk(Some(20_000))));
    }
    for f in &args.floods {
        let rate = parse_rate(f)?;
        phases.push((format!("junk {f}/s"), Hostile::Junk(rate)));
    }
    phases.push((
        format!("spray {}/s", args.spray_rate),
        Hostile::Spray(args.spray_rate),
    ));
    let flows = Arc::new(flows);
    let mut results = Vec::new();
    for (name, hostile) in phases {
        eprintln!("flood-bench: {name}");
        let duration = match name.as_str() {
            "warm-up" => args.warmup,
            _ => args.duration,
        };
        let p = phase(args, &name, hostile, duration, &flows, target, root, &stats)?;
        if name != "warm-up" {
            results.push(p);
        }
        // Let the phase's state settle (embryonic sessions give up).
        std::thread::sleep(Duration::from_secs(1));
    }
    let after = merged(&backends);
    let moved: Vec<u64> = (1..=args.flows)
        .filter(|cid| after.get(cid) != before.get(cid))
        .collect();
    let _ = proxy.stop();
    print(&results, args);
    println!(
        "after the spray: {} of {} established flows reach their backend from another proxy address{}",
        moved.len(),
        args.flows,
        if moved.is_empty() { "" } else { " (their 4-tuple moved)" }
    );
    Ok(())
}

fn merged(backends: &[Backend]) -> HashMap<u64, HashSet<SocketAddr>> {
    let mut out: HashMap<u64, HashSet<SocketAddr>> = HashMap::new();
    for b in backends {
        for (cid, froms) in b.froms.lock().unwrap().iter() {
            out.entry(*cid).or_default().extend(froms);
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn phase(
    args: &Args,
    name: &str,
    hostile: Hostile,
    duration: Duration,
    flows: &Arc<UdpSocket>,
    target: SocketAddrV4,
    root: u32,
    stats: &Path,
) -> Result<Phase, String> {
    let snap0 = Snapshot::read(stats).map_err(|e| e.to_string())?;
    let cpu0 = tree_cpu_time(root).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let end = start + duration;
    let stop = Arc::new(AtomicBool::new(false));
    // Replies to the established flows.
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let (flows, received, stop) = (flows.clone(), received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop.load(Ordering::Relaxed) {
                if flows.recv_from(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // New connections, each its own socket and thread, answered or not
    // within 1 s.
    let answered = Arc::new(AtomicU64::new(0));
    let newcomers = {
        let (answered, stop) = (answered.clone(), stop.clone());
        let every = Duration::from_secs_f64(1.0 / args.new_per_second.max(1) as f64);
        let base = 1_000_000u64 + start.elapsed().as_nanos() as u64 % 1_000_000 * 1000;
        std::thread::spawn(move || {
            let mut tried = 0u64;
            let mut threads = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let cid = base + tried;
                tried += 1;
                let answered = answered.clone();
                threads.push(std::thread::spawn(move || {
                    let Ok(c) = UdpSocket::bind("127.0.0.1:0") else {
                        return;
                    };
                    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut d = quic_initial(&cid.to_be_bytes(), &[], LEGIT);
                    d.resize(QUIC_MIN_INITIAL, 0);
                    let _ = c.send_to(&d, target);
                    let mut buf = [0u8; 256];
                    if let Ok((n, _)) = c.recv_from(&mut buf) {
                        if cid_of(&buf[..n]) == cid {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
                std::thread::sleep(every);
            }
            for t in threads {
                let _ = t.join();
            }
            tried
        })
    };
    // The hostile sender.
    let hostile_sent = Arc::new(AtomicU64::new(0));
    let forger_thread = {
        let (sent, stop) = (hostile_sent.clone(), stop.clone());
        let nflows = args.flows;
        std::thread::spawn(move || {
            let forger = Forger::open();
            let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15 ^ start.elapsed().as_nanos() as u64);
            let mut packet = Vec::with_capacity(1300);
            let mut junk = quic_initial(&[0; 8], &[], b"junk");
            junk.resize(QUIC_MIN_INITIAL, 0);
            let t0 = Instant::now();
            let mut n = 0u64;
            let rate = match hostile {
                Hostile::None => return,
                Hostile::Junk(r) => r,
                Hostile::Spray(r) => Some(r),
            };
            while !stop.load(Ordering::Relaxed) {
                if let Some(rate) = rate {
                    let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
                    if n >= due {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                }
                let src = rng.next();
                match hostile {
                    Hostile::Spray(_) => {
                        let cid = 1 + src % nflows;
                        let d = quic_short(&cid.to_be_bytes(), b"spoofed");
                        forger.send(src >> 8, target, &d, &mut packet);
                    }
                    _ => {
                        junk[6..14].copy_from_slice(&rng.next().to_be_bytes());
                        forger.send(src, target, &junk, &mut packet);
                    }
                }
                n += 1;
                sent.store(n, Ordering::Relaxed);
            }
        })
    };
    // The established flows, paced.
    let mut flow_sent = 0u64;
    let mut seq = 0u64;
    while Instant::now() < end {
        let due = (start.elapsed().as_secs_f64() * args.flow_rate as f64) as u64;
        while flow_sent < due {
            let cid = 1 + seq % args.flows;
            let mut body = LEGIT.to_vec();
            body.extend_from_slice(&seq.to_be_bytes());
            let _ = flows.send_to(&quic_short(&cid.to_be_bytes(), &body), target);
            seq += 1;
            flow_sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = forger_thread.join();
    let new_tried = newcomers.join().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(300));
    let _ = reader.join();
    let secs = start.elapsed().as_secs_f64();
    let cpu = tree_cpu_time(root).map_err(|e| e.to_string())? - cpu0;
    let snap = Snapshot::read(stats).map_err(|e| e.to_string())?;
    let delta = |c: Counter| snap.total(c).saturating_sub(snap0.total(c));
    let live = |c: Counter| snap.workers().map(|w| w.get(c)).sum::<u64>();
    let rx = delta(Counter::RxPackets);
    let refused = [
        Counter::DropNotInitial,
        Counter::DropRateLimited,
        Counter::DropPathLimit,
        Counter::DropNoPort,
        Counter::DropSessionLimit,
    ]
    .into_iter()
    .map(delta)
    .sum();
    let (fds, rss_kib) = workers_held(root);
    Ok(Phase {
        name: name.to_string(),
        flow_sent,
        flow_received: received.load(Ordering::Relaxed),
        new_tried,
        new_answered: answered.load(Ordering::Relaxed),
        hostile_sent: hostile_sent.load(Ordering::Relaxed),
        hostile_read: rx.saturating_sub(flow_sent + new_tried),
        forwarded: delta(Counter::TxPackets) + delta(Counter::RepliesOut),
        proxy_cpu: cpu,
        embryonic: live(Counter::SessionsEmbryonic),
        evicted: delta(Counter::SessionsEvicted),
        sockets: live(Counter::UpstreamSockets),
        fds,
        rss_kib,
        refused,
        secs,
    })
}

/// Descriptors and memory (KiB, proportional: a page the processes share,
/// such as the ownership table's, counts once) of the proxy's processes.
fn workers_held(root: u32) -> (u64, u64) {
    let Ok(all) = all_processes() else {
        return (0, 0);
    };
    let mut fds = 0;
    let mut rss = 0;
    for pid in tree_pids(root, &all) {
        fds += std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        rss += status
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    (fds, rss)
}

fn print(results: &[Phase], args: &Args) {
    let base = results.first();
    // CPU per forwarded datagram, and per second of the established load.
    let per_forward = base
        .filter(|b| b.forwarded > 0)
        .map(|b| b.proxy_cpu.as_secs_f64() / b.forwarded as f64);
    let base_rate = base.map_or(0.0, |b| b.proxy_cpu.as_secs_f64() / b.secs);
    println!(
        "{:<16} {:>10} {:>9} {:>8} {:>12} {:>11} {:>11} {:>8} {:>8} {:>9} {:>8} {:>7} {:>9}",
        "phase",
        "hostile/s",
        "flow loss",
        "new ≤1s",
        "µs/forward",
        "µs/hostile",
        "x forward",
        "refused",
        "evicted",
        "embryonic",
        "sockets",
        "fds",
        "pss MiB"
    );
    for p in results {
        let loss =
            100.0 * p.flow_sent.saturating_sub(p.flow_received) as f64 / p.flow_sent.max(1) as f64;
        let new = 100.0 * p.new_answered as f64 / p.new_tried.max(1) as f64;
        let extra = (p.proxy_cpu.as_secs_f64() - base_rate * p.secs).max(0.0);
        let per_hostile = (p.hostile_read > 0).then(|| extra / p.hostile_read as f64);
        let ratio = match (per_hostile, per_forward) {
            (Some(h), Some(f)) if f > 0.0 => format!("{:.2}", h / f),
            _ => "-".into(),
        };
        println!(
            "{:<16} {:>10.0} {:>8.3}% {:>7.1}% {:>12} {:>11} {:>11} {:>8} {:>8} {:>9} {:>8} {:>7} {:>9.1}",
            p.name,
            p.hostile_sent as f64 / p.secs,
            loss,
            new,
            per_forward.map_or("-".into(), |f| format!("{:.2}", f * 1e6)),
            per_hostile.map_or("-".into(), |h| format!("{:.2}", h * 1e6)),
            ratio,
            p.refused,
            p.evicted,
            p.embryonic,
            p.sockets,
            p.fds,
            p.rss_kib as f64 / 1024.0,
        );
    }
    println!(
        "established: {} flows at {}/s; new connections: {}/s; each phase {:?}; \
         hostile/s is what was sent; µs/hostile is the proxy's CPU beyond the baseline's rate \
         over the hostile datagrams it read",
        args.flows, args.flow_rate, args.new_per_second, args.duration
    );
}
