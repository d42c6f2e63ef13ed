//! `soak`: minutes of load on udpshard while its workers are SIGKILLed, its
//! config reloaded and its workers resized, then the ledger checked: every
//! datagram sent reached a backend or was counted as dropped at a named hop
//! (`stats --json`'s `totals`). Also how fast a killed worker is replaced:
//! from the kill to the first datagram its replacement passes on, to a
//! backend or to the worker that holds the datagram's session.
//!
//! The schedule: a worker killed every `--kill-every` (round robin over the
//! slots serving); at a quarter of the run a reload to `workers = 1`, at half
//! back to `auto`, at three quarters a reload that adds a third backend.
//! Every stats read checks that no total went back.
//!
//! `--upgrades N` adds N binary upgrades (SIGUSR2) spread over the run, and
//! times each from the signal to the new supervisor's takeover;
//! `--kill-every 0s --no-reloads` leaves the upgrades alone under the load
//! (`bash tests/bench.sh soak --upgrades 4 --kill-every 0s --no-reloads`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use udpshard_shared::stats::{Counter, Header, SlotState, Snapshot, WorkerSnapshot};
use udpshard_shared::DropReason;
use udpshard_tests::load::proxy::{free_udp_addr, host_lock, own_dir, ProxyProcess};
use udpshard_tests::load::units::{parse_duration, parse_rate};
use udpshard_tests::load::{Generator, LoadReport, LoadSpec, Sink};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Load with kills, reloads and resizes; the ledger checked at the end"
)]
struct Args {
    /// Length of the load.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Datagrams per second.
    #[arg(long, default_value = "20000", value_parser = rate)]
    rate: u64,
    /// Flows, each its own connection ID.
    #[arg(long, default_value_t = 20_000)]
    flows: usize,
    /// Source sockets the flows share (a process cannot hold one per flow
    /// here).
    #[arg(long, default_value_t = 64)]
    sources: usize,
    /// Loopback source addresses for upstream sockets (127.0.0.1 to
    /// 127.0.0.N). A killed worker's ports cool for port_reuse_delay (60 s)
    /// for every flow but the one each served, which binds it again: one
    /// address (31,743 ports) serves 20,000 flows through a kill every 8 s.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    upstream_sources: u8,
    /// A worker is SIGKILLed this often (0s: never).
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    kill_every: Duration,
    /// Binary upgrades (SIGUSR2) spread over the run.
    #[arg(long, default_value_t = 0)]
    upgrades: u32,
    /// No reloads (nor resizes).
    #[arg(long)]
    no_reloads: bool,
    /// Where the udpshard binary is; default: the directory of this executable.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn rate(text: &str) -> Result<u64, String> {
    parse_rate(text)?.ok_or_else(|| "a number of datagrams per second".into())
}

/// At most what a killed worker can hold inside one system call at the
/// instant of SIGKILL (a receive batch), which the ledger cannot see.
const IN_SYSCALL: i64 = 32;

fn config(
    listen: SocketAddr,
    backends: &[SocketAddr],
    workers: &str,
    sources: u8,
    stats: &Path,
) -> String {
    let backends: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    let sources: Vec<String> = (1..=sources).map(|i| format!("\"127.0.0.{i}\"")).collect();
    format!(
        r#"workers = {workers}
stats_file = "{stats}"
drain_timeout = "0s"

[[listener]]
name = "soak"
bind = "{listen}"
dissector = "quic"
short_cid_len = 8
recv_buffer = "4MiB"
upstream_ports = "1025-32767"
upstream_sources = [{sources}]
backends = [{backends}]
{admission}"#,
        stats = stats.display(),
        admission = udpshard_tests::load::one_generator_admission(1_000_000, "60s"),
        sources = sources.join(", "),
        backends = backends.join(", "),
    )
}

/// What the proxy counted over its life, from one stats read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    rx: u64,
    tx: u64,
    dropped: u64,
}

impl Totals {
    fn of(snap: &Snapshot) -> Totals {
        Totals {
            rx: snap.total(Counter::RxPackets),
            tx: snap.total(Counter::TxPackets),
            dropped: DropReason::client().map(|r| snap.total(r.counter())).sum(),
        }
    }
}

/// Reads the stats, checking that no total went back since `last`.
fn read(stats: &Path, last: &mut Totals, backwards: &mut u32) -> Option<Snapshot> {
    let snap = Snapshot::read(stats).ok()?;
    let now = Totals::of(&snap);
    if now.rx < last.rx || now.tx < last.tx || now.dropped < last.dropped {
        eprintln!("soak: totals went back: {last:?} -> {now:?}");
        *backwards += 1;
    }
    *last = now;
    Some(snap)
}

/// What a worker has passed on: datagrams it forwarded and those it handed
/// to the worker holding their session. A worker started after a resize
/// forwards nothing of its own for a while (sessions move to it after three
/// handed datagrams: 3 s at one datagram per flow per second), and neither
/// does its replacement; it still serves.
fn passed_on(w: &WorkerSnapshot<'_>) -> u64 {
    w.get(Counter::TxPackets) + w.get(Counter::HandoffOut)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() -> ExitCode {
    let args = Args::parse();
    match soak(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(why) => {
            eprintln!("soak: {why}");
            ExitCode::FAILURE
        }
    }
}

fn soak(args: &Args) -> Result<bool, String> {
    let bin_dir = args
        .bin_dir
        .clone()
        .map_or_else(own_dir, Ok)
        .map_err(|e| e.to_string())?;
    let _lock = host_lock(Duration::from_secs(600))?;
    let workdir = std::env::temp_dir().join(format!("udpshard-soak-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).map_err(|e| e.to_string())?;
    let (config_path, stats) = (workdir.join("udpshard.toml"), workdir.join("stats"));
    let sink = Sink::bind_loopback(3).map_err(|e| e.to_string())?;
    let backends = sink.addrs().to_vec();
    let listen = free_udp_addr().map_err(|e| e.to_string())?;
    let write = |backends: &[SocketAddr], workers: &str| {
        let text = config(listen, backends, workers, args.upstream_sources, &stats);
        std::fs::write(&config_path, text).map_err(|e| e.to_string())
    };
    write(&backends[..2], "\"auto\"")?;
    let mut command = Command::new(bin_dir.join("udpshard"));
    command.arg("run").arg("--config").arg(&config_path);
    let mut proxy = ProxyProcess::start(command).map_err(|e| format!("cannot start: {e}"))?;
    proxy.wait_ready(Duration::from_secs(15))?;
    // The supervisor serving now: an upgrade replaces it.
    let mut supervisor = proxy.pid() as i32;

    let mut spec = LoadSpec::new(listen);
    spec.flows = args.flows;
    spec.rate = Some(args.rate);
    spec.duration = args.duration;
    let mut generator =
        Generator::open_shared(listen, args.flows, args.sources).map_err(|e| e.to_string())?;
    let load = std::thread::spawn(move || {
        let report = generator.run(&spec, &sink);
        (report, sink)
    });

    let (mut last, mut backwards) = (Totals::default(), 0u32);
    let start = Instant::now();
    let mut restarts: Vec<Duration> = Vec::new();
    let mut kills = 0u32;
    let mut next_kill = start + args.kill_every;
    let mut reloads = [
        (args.duration / 4, &backends[..2], "1"),
        (args.duration / 2, &backends[..2], "\"auto\""),
        (args.duration * 3 / 4, &backends[..], "\"auto\""),
    ]
    .into_iter()
    .filter(|_| !args.no_reloads)
    .peekable();
    let mut upgrades = (1..=args.upgrades)
        .map(|i| args.duration * i / (args.upgrades + 1))
        .peekable();
    // An upgrade under way: the old supervisor, when it was signalled.
    let mut upgrading: Option<(i32, Instant)> = None;
    let mut takeovers: Vec<Duration> = Vec::new();
    // A kill being timed: slot, the killed pid, what the slot had passed on
    // then, when.
    let mut timing: Option<(usize, u64, u64, Instant)> = None;
    while start.elapsed() < args.duration {
        std::thread::sleep(Duration::from_millis(1));
        let Some(snap) = read(&stats, &mut last, &mut backwards) else {
            continue;
        };
        if let Some((old, at)) = upgrading {
            let now = snap.header(Header::SupervisorPid) as i32;
            if now != old && now != 0 {
                takeovers.push(at.elapsed());
                eprintln!(
                    "soak: {:>5.1}s upgraded: supervisor {old} -> {now} in {:?}",
                    start.elapsed().as_secs_f64(),
                    at.elapsed()
                );
                supervisor = now;
                upgrading = None;
            } else if at.elapsed() > Duration::from_secs(60) {
                eprintln!("soak: no takeover 60 s after SIGUSR2");
                upgrading = None;
            }
        }
        if let Some(&when) = upgrades.peek() {
            if start.elapsed() >= when && upgrading.is_none() && timing.is_none() {
                upgrades.next();
                // SAFETY: kill(2) on the supervisor this program started
                // (or the one that took over from it).
                unsafe { libc::kill(supervisor, libc::SIGUSR2) };
                upgrading = Some((supervisor, Instant::now()));
                eprintln!("soak: {:>5.1}s SIGUSR2", start.elapsed().as_secs_f64());
            }
        }
        if let Some((slot, pid, passed, at)) = timing {
            if let Some(w) = snap.slots().nth(slot) {
                if w.get(Counter::Pid) != pid && passed_on(&w) > passed {
                    restarts.push(at.elapsed());
                    eprintln!(
                        "soak: {:>5.1}s worker {slot} passes datagrams on again, {:?} after its kill",
                        start.elapsed().as_secs_f64(),
                        at.elapsed()
                    );
                    timing = None;
                }
            }
            if at.elapsed() > Duration::from_secs(10) {
                eprintln!("soak: slot {slot} passed nothing on 10 s after its kill");
                timing = None;
            }
        }
        if let Some(&(when, list, workers)) = reloads.peek() {
            if start.elapsed() >= when {
                reloads.next();
                write(list, workers)?;
                let generation = snap.header(Header::ConfigGeneration);
                // SAFETY: kill(2) on the supervisor this program started.
                unsafe { libc::kill(supervisor, libc::SIGHUP) };
                eprintln!(
                    "soak: {:>5.1}s reload: workers = {workers}, {} backends (generation {})",
                    start.elapsed().as_secs_f64(),
                    list.len(),
                    generation + 1
                );
            }
        }
        if !args.kill_every.is_zero()
            && timing.is_none()
            && upgrading.is_none()
            && Instant::now() >= next_kill
        {
            next_kill += args.kill_every;
            let serving: Vec<_> = snap
                .workers()
                .filter(|w| w.state() == SlotState::Ready)
                .collect();
            if let Some(w) = serving.get(kills as usize % serving.len().max(1)) {
                let (pid, passed) = (w.get(Counter::Pid), passed_on(w));
                // SAFETY: kill(2) on one of the proxy's own workers.
                if unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
                    kills += 1;
                    timing = Some((w.id, pid, passed, Instant::now()));
                    eprintln!(
                        "soak: {:>5.1}s killed worker {} (pid {pid})",
                        start.elapsed().as_secs_f64(),
                        w.id
                    );
                }
            }
        }
    }
    let (report, sink) = load.join().map_err(|_| "the load thread panicked")?;
    let report: LoadReport = report.map_err(|e| e.to_string())?;
    // Settled: the totals stop moving and the sink has what was forwarded.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut settled = None;
    let mut previous = None;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let Some(snap) = read(&stats, &mut last, &mut backwards) else {
            continue;
        };
        let now = Totals::of(&snap);
        if previous == Some(now) && sink.stats().received >= now.tx {
            settled = Some(snap);
            break;
        }
        previous = Some(now);
    }
    let log = proxy.stderr_tail();
    if supervisor != proxy.pid() as i32 {
        // The supervisor serving now is not this program's child.
        // SAFETY: kill(2) on the supervisor that took over.
        unsafe { libc::kill(supervisor, libc::SIGTERM) };
        let gone = Instant::now() + Duration::from_secs(15);
        while Path::new(&format!("/proc/{supervisor}")).exists() && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let stderr = proxy.stop();
    // What the proxy warned of (refused paths, failed starts), at most 8
    // lines: the reasons behind the drops.
    for line in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(8)
    {
        println!("proxy: {line}");
    }
    // And how each upgrade went.
    for line in log.lines().filter(|l| l.contains("upgrade")).take(40) {
        println!("proxy: {line}");
    }
    let _ = std::fs::remove_dir_all(&workdir);
    let Some(snap) = settled else {
        return Err(format!("the proxy never settled; its stderr:\n{stderr}"));
    };
    let t = Totals::of(&snap);
    let received = sink.stats().received;
    let unaccounted = report.sent as i64 - received as i64 - t.dropped as i64;
    restarts.sort();
    takeovers.sort();
    println!(
        "soak: {:.0}s at {}/s (achieved {:.0}/s) over {} flows, {} upstream sources; {kills} kills, {}, {} upgrades",
        args.duration.as_secs_f64(),
        args.rate,
        report.sent as f64 / args.duration.as_secs_f64(),
        args.flows,
        args.upstream_sources,
        if args.no_reloads {
            "no reloads"
        } else {
            "3 reloads (2 resizes, 1 backend added)"
        },
        takeovers.len(),
    );
    println!(
        "ledger: sent {} = received {received} + dropped {} + unaccounted {unaccounted}",
        report.sent, t.dropped
    );
    let named: Vec<String> = DropReason::client()
        .map(|r| (r.name(), snap.total(r.counter())))
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    println!(
        "drops: {}",
        if named.is_empty() {
            "none".to_string()
        } else {
            named.join(", ")
        }
    );
    println!(
        "restarts: {} timed, kill to first datagram passed on p50 {:?} p99 {:?} max {:?}",
        restarts.len(),
        percentile(&restarts, 0.50),
        percentile(&restarts, 0.99),
        restarts.last().copied().unwrap_or_default()
    );
    if args.upgrades > 0 {
        println!(
            "upgrades: {} of {} took over, SIGUSR2 to takeover p50 {:?} max {:?}; sink latency p99 {:?} max {:?}",
            takeovers.len(),
            args.upgrades,
            percentile(&takeovers, 0.50),
            takeovers.last().copied().unwrap_or_default(),
            Duration::from_nanos(sink.stats().latency.quantile(0.99).unwrap_or(0)),
            Duration::from_nanos(sink.stats().latency.max().unwrap_or(0)),
        );
    }
    println!(
        "totals went back: {backwards} times; duplicates at the sink: {}",
        sink.stats().duplicates
    );
    let ok = backwards == 0
        && takeovers.len() == args.upgrades as usize
        && sink.stats().duplicates == 0
        && unaccounted.abs() <= IN_SYSCALL * i64::from(kills.max(1));
    println!("{}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}
