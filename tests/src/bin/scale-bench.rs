//! `scale-bench`: what a proxy costs holding many sessions. For the socket floor and udpshard,
//! in one run: open N flows (one datagram each, each its own connection ID, paced at
//! `--open-rate`), then drive `--rate` datagrams/s over the same flows. Reports the sessions
//! held and refused, the open rate achieved, user-space memory per session (the proxy's
//! proportional set size), kernel memory per session (the host's Slab), the longest event-loop
//! iteration while sessions opened, and then CPU per datagram against the floor and loss.
//!
//! The flows share `--sources` sockets (a process cannot hold 200,000 descriptors here), so a
//! proxy that keys on the connection ID sees N clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::json;
use udpshard_shared::procnet::udp_sockets;
use udpshard_shared::stats::{Counter, Snapshot};
use udpshard_tests::load::procstat::{all_processes, tree_pids, CpuSnapshot};
use udpshard_tests::load::proxy::{free_udp_addr, host_lock, own_dir, show_command, ProxyProcess};
use udpshard_tests::load::units::{parse_duration, parse_port_range, parse_rate};
use udpshard_tests::load::{show_latency, Generator, LoadReport, LoadSpec, Sink, DEFAULT_SIZE};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Sessions held, memory per session and CPU per datagram: floor vs udpshard"
)]
struct Args {
    /// Flows to open, each its own connection ID.
    #[arg(long, default_value_t = 200_000)]
    sessions: usize,
    /// Backends (sink addresses) udpshard forwards to.
    #[arg(long, default_value_t = 8)]
    backends: usize,
    /// New flows per second while opening.
    #[arg(long, default_value = "50000", value_parser = rate)]
    open_rate: u64,
    /// Datagrams per second over the open flows, after opening.
    #[arg(long, default_value = "100000", value_parser = rate)]
    rate: u64,
    /// Length of the steady load.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Source sockets the flows share.
    #[arg(long, default_value_t = 64)]
    sources: usize,
    /// udpshard's upstream_ports (outside the kernel's ephemeral range).
    #[arg(long, default_value = "1025-32767")]
    upstream_ports: String,
    /// Measure only these proxies (repeatable).
    #[arg(long, value_enum)]
    only: Vec<Kind>,
    /// Where the proxy binaries are; default: the directory of this executable.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn rate(text: &str) -> Result<u64, String> {
    parse_rate(text)?.ok_or_else(|| "a number of datagrams per second".into())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Floor,
    /// The floor sending from one port per session, as udpshard's design does.
    FloorPorts,
    Udpshard,
    /// udpshard with `upstream_send = "socket"`: each forward on its own socket, no raw IP.
    UdpshardSocket,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Floor => "floor",
            Kind::FloorPorts => "floor-ports",
            Kind::Udpshard => "udpshard",
            Kind::UdpshardSocket => "udpshard-socket",
        }
    }

    fn is_udpshard(self) -> bool {
        matches!(self, Kind::Udpshard | Kind::UdpshardSocket)
    }
}

/// What one proxy did.
struct Result_ {
    kind: Kind,
    open: LoadReport,
    /// Sessions the proxy held after opening (udpshard's stats; the floor holds none).
    held: Option<u64>,
    /// New flows it refused (no_port, no_fd, session_limit).
    refused: Option<u64>,
    /// The longest loop iteration seen while opening, µs.
    loop_max_us: Option<u64>,
    /// Sockets in `/proc/net/udp{,6}` bound in the upstream port range after
    /// opening, and how many of them repeat another's 4-tuple.
    tuples: (usize, usize),
    /// Proportional set size of the proxy's processes gained while opening, bytes.
    pss_delta: i64,
    /// The host's Slab gained while opening, bytes.
    slab_delta: i64,
    steady: LoadReport,
    steady_cpu: Duration,
}

impl Result_ {
    fn cpu_us(&self) -> Option<f64> {
        (self.steady.received > 0)
            .then(|| self.steady_cpu.as_secs_f64() * 1e6 / self.steady.received as f64)
    }

    fn per_session(&self, bytes: i64) -> Option<f64> {
        self.held
            .filter(|h| *h > 0)
            .map(|h| bytes as f64 / h as f64)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let bin_dir = match args.bin_dir.clone().map_or_else(own_dir, Ok) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("scale-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _lock = match host_lock(Duration::from_secs(600)) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("scale-bench: {why}");
            return ExitCode::FAILURE;
        }
    };
    let workdir = std::env::temp_dir().join(format!("udpshard-scale-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&workdir);
    let kinds: Vec<Kind> = [
        Kind::Floor,
        Kind::FloorPorts,
        Kind::Udpshard,
        Kind::UdpshardSocket,
    ]
    .into_iter()
    .filter(|k| args.only.is_empty() || args.only.contains(k))
    .collect();
    let mut results = Vec::new();
    let mut failed = false;
    for kind in kinds {
        match run(&args, kind, &bin_dir, &workdir) {
            Ok(r) => results.push(r),
            Err(why) => {
                eprintln!("scale-bench: {}: FAILED: {why}", kind.name());
                failed = true;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&workdir);
    if args.json {
        println!("{}", to_json(&args, &results));
    } else {
        print!("{}", table(&args, &results));
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run(args: &Args, kind: Kind, bin_dir: &Path, workdir: &Path) -> Result<Result_, String> {
    let sink = Sink::bind_loopback(args.backends.max(1)).map_err(|e| e.to_string())?;
    let listen = free_udp_addr().map_err(|e| e.to_string())?;
    let stats_file = workdir.join("stats");
    let mut command = match kind {
        Kind::Floor | Kind::FloorPorts => {
            let mut c = Command::new(bin_dir.join("floor-proxy"));
            c.arg("--listen")
                .arg(listen.to_string())
                .arg("--backend")
                .arg(sink.addrs()[0].to_string());
            if kind == Kind::FloorPorts {
                for backend in &sink.addrs()[1..] {
                    c.arg("--backend").arg(backend.to_string());
                }
                c.arg("--spread")
                    .arg(spread_ports(args).to_string())
                    .arg("--spread-ports")
                    .arg(&args.upstream_ports);
            }
            c
        }
        Kind::Udpshard | Kind::UdpshardSocket => {
            let config = workdir.join("udpshard.toml");
            std::fs::write(
                &config,
                udpshard_toml(args, kind, listen, sink.addrs(), &stats_file),
            )
            .map_err(|e| e.to_string())?;
            let mut c = Command::new(bin_dir.join("udpshard"));
            c.arg("run").arg("--config").arg(config);
            c
        }
    };
    eprintln!(
        "scale-bench: {}: starting {}",
        kind.name(),
        show_command(&command)
    );
    let mut process = ProxyProcess::start(std::mem::replace(&mut command, Command::new("true")))
        .map_err(|e| format!("cannot start: {e}"))?;
    process.wait_ready(Duration::from_secs(15))?;
    let mut generator =
        Generator::open_shared(listen, args.sessions, args.sources).map_err(|e| e.to_string())?;

    // Opening: one datagram per flow.
    let pss_before = tree_pss(process.pid());
    let slab_before = meminfo("Slab");
    let sampling = Arc::new(AtomicBool::new(kind.is_udpshard()));
    let loop_max = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (sampling, loop_max, stats_file) =
            (sampling.clone(), loop_max.clone(), stats_file.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                if let Ok(snap) = Snapshot::read(&stats_file) {
                    let m = snap
                        .workers()
                        .map(|w| w.get(Counter::LoopMaxUs))
                        .max()
                        .unwrap_or(0);
                    loop_max.fetch_max(m, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let open_for = Duration::from_secs_f64(args.sessions as f64 / args.open_rate as f64);
    let open = generator
        .run(
            &LoadSpec {
                target: listen,
                flows: args.sessions,
                rate: Some(args.open_rate),
                duration: open_for * 3 + Duration::from_secs(5),
                max_datagrams: Some(args.sessions as u64),
                size: DEFAULT_SIZE,
            },
            &sink,
        )
        .map_err(|e| e.to_string())?;
    // A second of loop samples after the last new flow.
    std::thread::sleep(Duration::from_millis(1200));
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let pss_after = tree_pss(process.pid());
    let tuples = upstream_tuples(&args.upstream_ports);
    let slab_after = meminfo("Slab");
    let (held, refused) = match kind {
        Kind::Floor | Kind::FloorPorts => (None, None),
        Kind::Udpshard | Kind::UdpshardSocket => {
            let snap = Snapshot::read(&stats_file).map_err(|e| e.to_string())?;
            let sum = |c: Counter| snap.workers().map(|w| w.get(c)).sum::<u64>();
            (
                Some(sum(Counter::SessionsActive)),
                Some(
                    sum(Counter::DropNoPort)
                        + sum(Counter::DropNoFd)
                        + sum(Counter::DropSessionLimit),
                ),
            )
        }
    };
    eprintln!(
        "scale-bench: {}: opened: sent {} at {:.0}/s, received {}, held {held:?}, refused {refused:?}, \
         {} sockets in the upstream range, {} duplicate 4-tuples",
        kind.name(),
        open.sent,
        open.achieved_rate,
        open.received,
        tuples.0,
        tuples.1
    );
    process.check_alive()?;

    // The steady load over the same flows.
    std::thread::sleep(Duration::from_millis(300));
    let before = CpuSnapshot::take().map_err(|e| e.to_string())?;
    let steady = generator
        .run(
            &LoadSpec {
                target: listen,
                flows: args.sessions,
                rate: Some(args.rate),
                duration: args.duration,
                max_datagrams: None,
                size: DEFAULT_SIZE,
            },
            &sink,
        )
        .map_err(|e| e.to_string())?;
    let cpu = CpuSnapshot::take().map_err(|e| e.to_string())?.since(
        &before,
        process.pid(),
        std::process::id(),
    );
    process.check_alive()?;
    eprintln!(
        "scale-bench: {}: steady: sent {} at {:.0}/s, received {}, loss {:.4}%, proxy cpu {:.2}s, stolen by the hypervisor {:.2}s",
        kind.name(),
        steady.sent,
        steady.achieved_rate,
        steady.received,
        steady.loss_ratio * 100.0,
        cpu.tree.as_secs_f64(),
        cpu.steal.as_secs_f64()
    );
    if kind.is_udpshard() {
        if let Ok(snap) = Snapshot::read(&stats_file) {
            let sum = |c: Counter| snap.workers().map(|w| w.get(c)).sum::<u64>();
            eprintln!(
                "scale-bench: {}: {} of {} forwards left as raw IP packets; {} datagrams handed \
                 between workers; {} loop iterations",
                kind.name(),
                sum(Counter::TxRaw),
                sum(Counter::TxPackets),
                sum(Counter::HandoffIn),
                sum(Counter::Loops),
            );
        }
    }
    let status = process.stop();
    eprintln!("scale-bench: {}: stopped ({status})", kind.name());
    Ok(Result_ {
        kind,
        open,
        held,
        refused,
        loop_max_us: kind.is_udpshard().then(|| loop_max.load(Ordering::Relaxed)),
        tuples,
        pss_delta: pss_after - pss_before,
        slab_delta: slab_after - slab_before,
        steady,
        steady_cpu: cpu.tree,
    })
}

/// Ports per floor thread for `floor-ports`: as many as udpshard's workers use (a port serves
/// every backend), within the descriptors one process may hold here.
fn spread_ports(args: &Args) -> usize {
    let threads = udpshard_tests::load::baseline::allowed_cpus().len().max(1);
    let wanted = args.sessions.div_ceil(args.backends.max(1) * threads);
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    let limit = soft.max(hard).saturating_sub(256) as usize / threads;
    wanted.clamp(1, limit.max(1))
}

fn udpshard_toml(
    args: &Args,
    kind: Kind,
    listen: SocketAddr,
    backends: &[SocketAddr],
    stats: &Path,
) -> String {
    let backends: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    let send = if kind == Kind::UdpshardSocket {
        "socket"
    } else {
        "auto"
    };
    format!(
        r#"workers = "auto"
stats_file = "{stats}"
drain_timeout = "0s"
upstream_send = "{send}"

[[listener]]
name = "scale"
bind = "{listen}"
dissector = "quic"
short_cid_len = 8
recv_buffer = "4MiB"
session_idle = "120s"
max_sessions = {max}
upstream_ports = "{ports}"
backends = [{backends}]
{admission}"#,
        stats = stats.display(),
        admission = udpshard_tests::load::one_generator_admission(args.sessions, "120s"),
        max = args.sessions,
        ports = args.upstream_ports,
        backends = backends.join(", "),
    )
}

/// Sockets bound in the port range `ports` ("LO-HI") in `/proc/net/udp`
/// and `/proc/net/udp6`, and how many repeat another's (local, remote).
fn upstream_tuples(ports: &str) -> (usize, usize) {
    let Ok((lo, hi)) = parse_port_range(ports) else {
        return (0, 0);
    };
    let mut seen = std::collections::HashSet::new();
    let (mut sockets, mut duplicates) = (0, 0);
    for e in udp_sockets() {
        if (lo..=hi).contains(&e.local.port()) {
            sockets += 1;
            if !seen.insert((e.local, e.remote)) {
                duplicates += 1;
            }
        }
    }
    (sockets, duplicates)
}

/// The proportional set size of `root` and its descendants, bytes (each
/// process's share of shared pages, so shared memory counts once in all).
fn tree_pss(root: u32) -> i64 {
    let pids = all_processes()
        .map(|all| tree_pids(root, &all))
        .unwrap_or_default();
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|text| field_kb(&text, "Pss:"))
        .sum::<i64>()
        * 1024
}

/// A `/proc/meminfo` field, bytes.
fn meminfo(name: &str) -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| field_kb(&t, &format!("{name}:")))
        .unwrap_or(0)
        * 1024
}

fn field_kb(text: &str, key: &str) -> Option<i64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn table(args: &Args, results: &[Result_]) -> String {
    let floor = results
        .iter()
        .find(|r| r.kind == Kind::Floor)
        .and_then(Result_::cpu_us);
    let mut out = format!(
        "{} flows ({} per source socket), {} backends; opened at {}/s, then {}/s for {:?}; \
         floor-ports sends from {} ports per thread\n",
        args.sessions,
        args.sessions.div_ceil(args.sources.max(1)),
        args.backends,
        args.open_rate,
        args.rate,
        args.duration,
        spread_ports(args)
    );
    out += &format!(
        "{:<11} {:>8} {:>8} {:>10} {:>12} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8} {:>6} {:>9} {:>9}\n",
        "proxy", "held", "refused", "open/s", "loop max", "user B/s", "kern B/s", "steady/s",
        "received", "loss %", "µs/dgram", "x fl", "p50", "p99"
    );
    for r in results {
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        out += &format!(
            "{:<11} {:>8} {:>8} {:>10.0} {:>12} {:>10} {:>10} {:>10.0} {:>9} {:>9.4} {:>8} {:>6} {:>9} {:>9}\n",
            r.kind.name(),
            opt(r.held),
            opt(r.refused),
            r.open.achieved_rate,
            r.loop_max_us.map_or("-".into(), |v| format!("{v}µs")),
            r.per_session(r.pss_delta).map_or("-".into(), |v| format!("{v:.0}")),
            r.per_session(r.slab_delta).map_or("-".into(), |v| format!("{v:.0}")),
            r.steady.achieved_rate,
            r.steady.received,
            r.steady.loss_ratio * 100.0,
            r.cpu_us().map_or("-".into(), |v| format!("{v:.3}")),
            match (r.cpu_us(), floor) {
                (Some(c), Some(f)) if f > 0.0 => format!("{:.2}", c / f),
                _ => "-".into(),
            },
            show_latency(r.steady.p50),
            show_latency(r.steady.p99),
        );
    }
    for r in results.iter().filter(|r| r.tuples.0 > 0) {
        out += &format!(
            "{}: {} sockets bound in {} after opening, {} duplicate 4-tuples\n",
            r.kind.name(),
            r.tuples.0,
            args.upstream_ports,
            r.tuples.1
        );
    }
    out
}

fn to_json(args: &Args, results: &[Result_]) -> serde_json::Value {
    let floor = results
        .iter()
        .find(|r| r.kind == Kind::Floor)
        .and_then(Result_::cpu_us);
    json!({
        "sessions": args.sessions,
        "backends": args.backends,
        "sources": args.sources,
        "open_rate": args.open_rate,
        "rate": args.rate,
        "duration_s": args.duration.as_secs_f64(),
        "floor_ports_per_thread": spread_ports(args),
        "results": results.iter().map(|r| json!({
            "proxy": r.kind.name(),
            "held": r.held,
            "refused": r.refused,
            "open": r.open.to_json(),
            "loop_max_us": r.loop_max_us,
            "upstream_range_sockets": r.tuples.0,
            "duplicate_tuples": r.tuples.1,
            "pss_delta_bytes": r.pss_delta,
            "slab_delta_bytes": r.slab_delta,
            "user_bytes_per_session": r.per_session(r.pss_delta),
            "kernel_bytes_per_session": r.per_session(r.slab_delta),
            "steady": r.steady.to_json(),
            "steady_proxy_cpu_s": r.steady_cpu.as_secs_f64(),
            "cpu_us_per_datagram": r.cpu_us(),
            "ratio_to_floor": r.cpu_us().zip(floor).map(|(c, f)| c / f),
        })).collect::<Vec<_>>(),
    })
}
