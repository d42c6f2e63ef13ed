//! `bench`: CPU per forwarded datagram and loss of four proxies, measured in one run on one
//! host: `floor-proxy` (the socket floor), `naive-proxy` (the seed's design), nginx's stream
//! UDP proxy (the strongest common peer, with sessions kept) and `udpshard`.
//!
//! With `--echo` the sinks send every datagram back and the generator counts the replies:
//! CPU per round trip, loss each way and round-trip latency, for nginx and udpshard (the
//! floor and the naive proxy have no return path).
//!
//! For each proxy: a sink stands in for the backends, the proxy starts and says `ready:` on
//! stderr, a warm-up load creates its sessions, then the same flows send at `--rate` and then
//! as fast as the generator can. The proxy's CPU is utime + stime of its process tree, read
//! from /proc just before and after each load (the drain included). The sibling binaries are
//! found next to this one (`cargo build --release --workspace --bins`, see tests/bench.sh).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::json;
use udpshard_tests::load::baseline::allowed_cpus;
use udpshard_tests::load::cli::Common;
use udpshard_tests::load::procstat::{clock_ticks, CpuSnapshot, CpuUse, UdpCounters};
use udpshard_tests::load::proxy::{
    free_udp_addr, nginx_command, udpshard_toml_keyed, ProxyProcess,
};
use udpshard_tests::load::units::{parse_duration, parse_rate};
use udpshard_tests::load::{
    show_latency, Generator, LoadError, LoadReport, LoadSpec, Sink, DEFAULT_SIZE,
};

/// Pause between loads, so one load's tail does not land in the next one's counters.
const SETTLE: Duration = Duration::from_millis(300);
/// CPU taken by other programs or by the hypervisor (steal), as a share of one CPU, above
/// which a load is flagged and, with `--retries`, measured again.
const NOISY: f64 = 0.05;
/// Pause before measuring a disturbed load again.
const NOISE_PAUSE: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Proxy CPU per forwarded datagram and loss: floor, naive, udpshard"
)]
struct Args {
    /// Offered rate of a load, datagrams/s (150000, 150k); repeat it for several loads, each
    /// at its rate, before the max-rate load.
    #[arg(long, default_value = "150000", value_parser = fixed_rate)]
    rate: Vec<u64>,
    /// Bidirectional: the sinks echo every datagram; CPU per round trip, loss each way and
    /// round-trip latency (nginx and udpshard only, unless --only says otherwise).
    #[arg(long)]
    echo: bool,
    /// nginx's binary (Debian's `nginx` with `libnginx-mod-stream`; tests/bench.sh installs
    /// them when missing).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// Flows (client sockets, one CID each).
    #[arg(long, default_value_t = 2000)]
    flows: usize,
    /// Length of each measured load.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Datagram size in bytes.
    #[arg(long, default_value_t = DEFAULT_SIZE)]
    size: usize,
    /// Unmeasured load at --rate before the measured ones (sessions, caches); 0s skips it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Measure only these proxies (repeatable).
    #[arg(long, value_enum)]
    only: Vec<ProxyKind>,
    /// Leave these proxies out (repeatable).
    #[arg(long, value_enum)]
    skip: Vec<ProxyKind>,
    /// Measure a load again (up to this many times) when other programs used more than 5%
    /// of a CPU during it; the last attempt is kept either way.
    #[arg(long, default_value_t = 2)]
    retries: u32,
    /// Skip the max-rate load.
    #[arg(long)]
    no_max: bool,
    #[command(flatten)]
    common: Common,
}

fn fixed_rate(text: &str) -> Result<u64, String> {
    parse_rate(text)?.ok_or_else(|| "--rate takes a number; the max-rate load always runs".into())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProxyKind {
    Floor,
    Naive,
    Nginx,
    Udpshard,
    /// udpshard with `upstream_send = "socket"` (no raw IP): only with `--only`.
    UdpshardSocket,
    /// udpshard with `queue_delay = "off"` (no arrival stamps): only with
    /// `--only`, beside `udpshard` for the queue delay's cost in one run.
    UdpshardNoDelay,
}

impl ProxyKind {
    const ALL: [ProxyKind; 4] = [
        ProxyKind::Floor,
        ProxyKind::Naive,
        ProxyKind::Nginx,
        ProxyKind::Udpshard,
    ];
    /// Those with a return path, measured by default with `--echo`.
    const ECHO: [ProxyKind; 2] = [ProxyKind::Nginx, ProxyKind::Udpshard];

    fn name(self) -> &'static str {
        match self {
            ProxyKind::Floor => "floor",
            ProxyKind::Naive => "naive",
            ProxyKind::Nginx => "nginx",
            ProxyKind::Udpshard => "udpshard",
            ProxyKind::UdpshardSocket => "udpshard-socket",
            ProxyKind::UdpshardNoDelay => "udpshard-no-delay",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            ProxyKind::Floor => "floor-proxy",
            ProxyKind::Naive => "naive-proxy",
            ProxyKind::Nginx => "nginx",
            ProxyKind::Udpshard | ProxyKind::UdpshardSocket | ProxyKind::UdpshardNoDelay => {
                "udpshard"
            }
        }
    }

    /// Backends (sink addresses) the proxy forwards to.
    fn backends(self) -> usize {
        match self {
            ProxyKind::Floor => 1,
            ProxyKind::Naive
            | ProxyKind::Nginx
            | ProxyKind::Udpshard
            | ProxyKind::UdpshardSocket
            | ProxyKind::UdpshardNoDelay => 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Paced at this many datagrams/s.
    Rate(u64),
    /// As fast as the generator can send.
    Max,
}

impl Phase {
    fn rate(self) -> Option<u64> {
        match self {
            Phase::Rate(rate) => Some(rate),
            Phase::Max => None,
        }
    }

    fn label(self) -> String {
        match self {
            Phase::Rate(rate) => rate.to_string(),
            Phase::Max => "max".into(),
        }
    }
}

/// One measured load against one proxy.
struct Measurement {
    proxy: ProxyKind,
    phase: Phase,
    report: LoadReport,
    /// Where the CPU time went during the load and its drain: `cpu.tree` is the proxy's
    /// process tree, `cpu.own` the generator and the sink (this process).
    cpu: CpuUse,
    /// Wall time of the load and its drain.
    wall: Duration,
    /// Loads run to get this one (more than 1 when other programs disturbed the earlier ones).
    attempts: u32,
    /// Host UDP counters moved during the load (all sockets: proxy, sink, generator).
    udp: Option<UdpCounters>,
}

impl Measurement {
    /// CPU per datagram that reached the sink; with `--echo`, per round trip (an echo that
    /// came back: two datagrams through the proxy).
    fn cpu_us_per_datagram(&self) -> Option<f64> {
        let done = match &self.report.replies {
            Some(r) => r.received,
            None => self.report.received,
        };
        (done > 0).then(|| self.cpu.tree.as_secs_f64() * 1e6 / done as f64)
    }

    /// CPU the load lost to others: other programs on this machine, and the hypervisor's
    /// steal. Both slow the generator and grow the proxy's queues, so they disturb every figure.
    fn disturbance(&self) -> f64 {
        self.share(self.cpu.other_processes + self.cpu.steal)
    }

    /// CPU time as a share of one CPU over the load's wall time.
    fn share(&self, cpu: Duration) -> f64 {
        if self.wall.is_zero() {
            0.0
        } else {
            cpu.as_secs_f64() / self.wall.as_secs_f64()
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let bin_dir = match args.common.bin_dir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("bench: cannot find the directory of this executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let default: &[ProxyKind] = if args.echo {
        &ProxyKind::ECHO
    } else {
        &ProxyKind::ALL
    };
    let selected: Vec<ProxyKind> = ProxyKind::ALL
        .into_iter()
        .chain([ProxyKind::UdpshardSocket, ProxyKind::UdpshardNoDelay])
        .filter(|p| args.only.contains(p) || (args.only.is_empty() && default.contains(p)))
        .filter(|p| !args.skip.contains(p))
        .collect();
    if selected.is_empty() {
        eprintln!("bench: no proxy selected (see --only and --skip)");
        return ExitCode::FAILURE;
    }
    let _lock = match args.common.lock() {
        Ok(lock) => lock,
        Err(why) => {
            eprintln!("bench: {why}");
            return ExitCode::FAILURE;
        }
    };
    let workdir = std::env::temp_dir().join(format!("udpshard-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&workdir) {
        eprintln!("bench: cannot create {}: {e}", workdir.display());
        return ExitCode::FAILURE;
    }
    eprintln!("bench: {}", host_line());

    let mut measurements = Vec::new();
    let mut skipped = Vec::new();
    let mut failed = Vec::new();
    for proxy in selected {
        let binary = match proxy {
            ProxyKind::Nginx => args.nginx.clone(),
            _ => bin_dir.join(proxy.binary()),
        };
        if !binary.is_file() {
            let fix = match proxy {
                ProxyKind::Nginx => "apt-get install nginx libnginx-mod-stream, or --nginx PATH",
                _ => "cargo build --release --workspace --bins",
            };
            let why = format!("binary not found at {} ({fix})", binary.display());
            eprintln!("bench: {}: skipped: {why}", proxy.name());
            skipped.push((proxy, why));
            continue;
        }
        match bench_proxy(&args, proxy, &binary, &workdir) {
            Ok(mut results) => measurements.append(&mut results),
            Err(why) => {
                eprintln!("bench: {}: FAILED: {why}", proxy.name());
                failed.push((proxy, why));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&workdir);

    if args.common.json {
        println!("{}", to_json(&args, &measurements, &skipped, &failed));
    } else {
        print!("{}", table(&measurements));
        for (proxy, why) in &skipped {
            println!("{}: skipped: {why}", proxy.name());
        }
        for (proxy, why) in &failed {
            println!(
                "{}: FAILED: {}",
                proxy.name(),
                why.lines().next().unwrap_or("")
            );
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs the warm-up and the measured loads against one proxy.
fn bench_proxy(
    args: &Args,
    proxy: ProxyKind,
    binary: &Path,
    workdir: &Path,
) -> Result<Vec<Measurement>, String> {
    let sink = if args.echo {
        Sink::bind_loopback_echo(proxy.backends())
    } else {
        Sink::bind_loopback(proxy.backends())
    }
    .map_err(|e| e.to_string())?;
    let listen = free_udp_addr().map_err(|e| format!("cannot find a free port: {e}"))?;
    let command = proxy_command(proxy, binary, listen, sink.addrs(), workdir)?;
    // nginx says nothing when it is up: its workers' sockets in /proc/net/udp say it.
    let bound = (proxy == ProxyKind::Nginx).then_some(listen);
    let mut process = ProxyProcess::launch(
        "bench",
        proxy.name(),
        command,
        bound,
        args.common.ready_timeout,
    )?;

    let mut generator = Generator::open(listen, args.flows).map_err(|e| e.to_string())?;
    let spec = |rate: Option<u64>, duration: Duration| LoadSpec {
        target: listen,
        flows: args.flows,
        rate,
        duration,
        max_datagrams: None,
        size: args.size,
    };
    let run = |generator: &mut Generator, spec: &LoadSpec| {
        if args.echo {
            generator.run_echo(spec, &sink)
        } else {
            generator.run(spec, &sink)
        }
    };
    if !args.warmup.is_zero() {
        let report = run(&mut generator, &spec(Some(args.rate[0]), args.warmup))
            .map_err(|e| e.to_string())?;
        eprintln!(
            "bench: {}: warm-up: sent {}, received {}",
            proxy.name(),
            report.sent,
            report.received
        );
        process.check_alive()?;
    }
    let mut phases: Vec<Phase> = args.rate.iter().map(|&r| Phase::Rate(r)).collect();
    if !args.no_max {
        phases.push(Phase::Max);
    }
    let mut results = Vec::new();
    for phase in phases {
        let mut attempt = 0;
        let m = loop {
            attempt += 1;
            std::thread::sleep(SETTLE);
            let m = measure(
                (proxy, phase),
                &mut || run(&mut generator, &spec(phase.rate(), args.duration)),
                &mut process,
            )?;
            let m = Measurement {
                attempts: attempt,
                ..m
            };
            report_progress(&m);
            let noise = m.disturbance();
            if noise <= NOISY || attempt > args.retries {
                break m;
            }
            eprintln!(
                "bench: {} @ {}: other programs and steal took {:.0}% of a CPU; measuring again in {NOISE_PAUSE:?} (attempt {} of {})",
                proxy.name(),
                phase.label(),
                noise * 100.0,
                attempt + 1,
                args.retries + 1
            );
            std::thread::sleep(NOISE_PAUSE);
        };
        results.push(m);
    }
    let status = process.stop();
    eprintln!("bench: {}: stopped ({status})", proxy.name());
    Ok(results)
}

/// One load against a running proxy, with the CPU it cost.
fn measure(
    (proxy, phase): (ProxyKind, Phase),
    load: &mut dyn FnMut() -> Result<LoadReport, LoadError>,
    process: &mut ProxyProcess,
) -> Result<Measurement, String> {
    let cpu_before = CpuSnapshot::take().map_err(|e| format!("/proc: {e}"))?;
    let udp_before = UdpCounters::read().ok();
    let started = Instant::now();
    let report = load().map_err(|e| e.to_string())?;
    let wall = started.elapsed();
    let cpu = CpuSnapshot::take()
        .map_err(|e| format!("/proc: {e}"))?
        .since(&cpu_before, process.pid(), std::process::id());
    let udp = UdpCounters::read()
        .ok()
        .zip(udp_before)
        .map(|(after, before)| after.since(&before));
    process.check_alive()?;
    Ok(Measurement {
        proxy,
        phase,
        attempts: 1,
        report,
        cpu,
        wall,
        udp,
    })
}

fn report_progress(m: &Measurement) {
    let (proxy, phase) = (m.proxy, m.phase);
    eprintln!(
        "bench: {} @ {}: sent {} ({:.0}/s, {} slipped), received {} ({} duplicates), loss {:.3}%, proxy cpu {:.2}s ({} µs/datagram), generator+sink cpu {:.2}s, ksoftirqd {:.2}s, other kernel threads {:.2}s, other processes {:.2}s, not in a live process (irqs on idle cpus, exited processes) {:.2}s, stolen by the hypervisor {:.2}s",
        proxy.name(),
        phase.label(),
        m.report.sent,
        m.report.achieved_rate,
        m.report.slipped,
        m.report.received,
        m.report.duplicates,
        m.report.loss_ratio * 100.0,
        m.cpu.tree.as_secs_f64(),
        m.cpu_us_per_datagram().map_or("-".into(), |v| format!("{v:.3}")),
        m.cpu.own.as_secs_f64(),
        m.cpu.softirq_threads.as_secs_f64(),
        m.cpu.kernel_threads.as_secs_f64(),
        m.cpu.other_processes.as_secs_f64(),
        m.cpu.unattributed.as_secs_f64(),
        m.cpu.steal.as_secs_f64(),
    );
    if let Some(r) = &m.report.replies {
        eprintln!(
            "bench: {} @ {}: round trips: {} echoed, {} came back ({:.3}% lost on the way back), round trip p50 {} p99 {}",
            proxy.name(),
            phase.label(),
            r.echoed,
            r.received,
            r.loss_ratio() * 100.0,
            show_latency(r.rtt_p50),
            show_latency(r.rtt_p99),
        );
    }
    if m.disturbance() > NOISY {
        let mut takers: Vec<String> = m
            .cpu
            .top_others
            .iter()
            .map(|(comm, cpu)| format!("{comm} {:.2}s", cpu.as_secs_f64()))
            .collect();
        if !m.cpu.steal.is_zero() {
            takers.push(format!(
                "hypervisor steal {:.2}s",
                m.cpu.steal.as_secs_f64()
            ));
        }
        eprintln!(
            "bench: warning: other programs and steal took {:.0}% of a CPU during this load ({}); its figures are disturbed",
            m.disturbance() * 100.0,
            takers.join(", ")
        );
    }
}

fn proxy_command(
    proxy: ProxyKind,
    binary: &Path,
    listen: SocketAddr,
    backends: &[SocketAddr],
    workdir: &Path,
) -> Result<Command, String> {
    let mut command = Command::new(binary);
    match proxy {
        ProxyKind::Floor => {
            command
                .arg("--listen")
                .arg(listen.to_string())
                .arg("--backend")
                .arg(backends[0].to_string());
        }
        ProxyKind::Naive => {
            command.arg("--listen").arg(listen.to_string());
            for backend in backends {
                command.arg("--backend").arg(backend.to_string());
            }
        }
        ProxyKind::Nginx => {
            command = nginx_command(binary, listen, backends, workdir)?;
        }
        ProxyKind::Udpshard | ProxyKind::UdpshardSocket | ProxyKind::UdpshardNoDelay => {
            let config = workdir.join("udpshard.toml");
            let send = if proxy == ProxyKind::UdpshardSocket {
                "socket"
            } else {
                "auto"
            };
            let stamps = if proxy == ProxyKind::UdpshardNoDelay {
                "off"
            } else {
                "on"
            };
            std::fs::write(
                &config,
                udpshard_toml_keyed(
                    listen,
                    backends,
                    workdir,
                    &format!("upstream_send = \"{send}\""),
                    &format!("dissector = \"quic\"\nshort_cid_len = 8\nqueue_delay = \"{stamps}\""),
                ),
            )
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            command.arg("run").arg("--config").arg(config);
        }
    }
    Ok(command)
}

/// The floor's CPU per datagram in the same phase, for the ratio column.
fn floor_of(measurements: &[Measurement], phase: Phase) -> Option<f64> {
    baseline_of(measurements, phase, ProxyKind::Floor)
}

fn baseline_of(measurements: &[Measurement], phase: Phase, baseline: ProxyKind) -> Option<f64> {
    measurements
        .iter()
        .find(|m| m.proxy == baseline && m.phase == phase)
        .and_then(Measurement::cpu_us_per_datagram)
}

/// CPU per datagram (per round trip with --echo) against nginx's in the same phase.
fn ratio_to_nginx(measurements: &[Measurement], m: &Measurement) -> Option<f64> {
    let nginx = baseline_of(measurements, m.phase, ProxyKind::Nginx)?;
    let own = m.cpu_us_per_datagram()?;
    (nginx > 0.0).then(|| own / nginx)
}

fn ratio_to_floor(measurements: &[Measurement], m: &Measurement) -> Option<f64> {
    let floor = floor_of(measurements, m.phase)?;
    let own = m.cpu_us_per_datagram()?;
    (floor > 0.0).then(|| own / floor)
}

fn table(measurements: &[Measurement]) -> String {
    let echo = measurements.iter().any(|m| m.report.replies.is_some());
    let mut header = vec![
        "proxy",
        "offered/s",
        "achieved/s",
        "sent",
        "received",
        "loss %",
    ];
    if echo {
        header.extend(["replies", "back loss %", "cpu µs/round trip"]);
    } else {
        header.push("cpu µs/dgram");
    }
    header.extend(["x floor", "x nginx", "proxy cpu %", "p50", "p99"]);
    if echo {
        header.extend(["rtt p50", "rtt p99"]);
    }
    header.extend(["rcvbuf drops", "ksoftirqd %", "others %", "steal %"]);
    let mut rows = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    let ratio = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    for m in measurements {
        let r = &m.report;
        let mut row = vec![
            m.proxy.name().to_string(),
            m.phase.label(),
            format!("{:.0}", r.achieved_rate),
            r.sent.to_string(),
            r.received.to_string(),
            format!("{:.3}", r.loss_ratio * 100.0),
        ];
        if echo {
            let replies = r.replies.as_ref();
            row.push(replies.map_or("-".into(), |x| x.received.to_string()));
            row.push(replies.map_or("-".into(), |x| format!("{:.3}", x.loss_ratio() * 100.0)));
        }
        row.extend([
            m.cpu_us_per_datagram()
                .map_or("-".into(), |v| format!("{v:.3}")),
            ratio(ratio_to_floor(measurements, m)),
            ratio(ratio_to_nginx(measurements, m)),
            format!("{:.0}", m.share(m.cpu.tree) * 100.0),
            show_latency(r.p50),
            show_latency(r.p99),
        ]);
        if echo {
            let replies = r.replies.as_ref();
            row.push(show_latency(replies.and_then(|x| x.rtt_p50)));
            row.push(show_latency(replies.and_then(|x| x.rtt_p99)));
        }
        row.extend([
            m.udp.map_or("-".into(), |u| u.rcvbuf_errors.to_string()),
            format!("{:.0}", m.share(m.cpu.softirq_threads) * 100.0),
            format!("{:.0}", m.share(m.cpu.other_processes) * 100.0),
            format!("{:.0}", m.share(m.cpu.steal) * 100.0),
        ]);
        rows.push(row);
    }
    udpshard_tests::load::table::render(&rows)
}

fn to_json(
    args: &Args,
    measurements: &[Measurement],
    skipped: &[(ProxyKind, String)],
    failed: &[(ProxyKind, String)],
) -> serde_json::Value {
    let results: Vec<serde_json::Value> = measurements
        .iter()
        .map(|m| {
            json!({
                "proxy": m.proxy.name(),
                "phase": m.phase.label(),
                "offered_rate": m.phase.rate(),
                "attempts": m.attempts,
                "proxy_cpu_s": m.cpu.tree.as_secs_f64(),
                "wall_s": m.wall.as_secs_f64(),
                "proxy_cpu_share": m.share(m.cpu.tree),
                "generator_sink_cpu_s": m.cpu.own.as_secs_f64(),
                "ksoftirqd_cpu_s": m.cpu.softirq_threads.as_secs_f64(),
                "kernel_threads_cpu_s": m.cpu.kernel_threads.as_secs_f64(),
                "other_processes_cpu_s": m.cpu.other_processes.as_secs_f64(),
                "unattributed_cpu_s": m.cpu.unattributed.as_secs_f64(),
                "steal_cpu_s": m.cpu.steal.as_secs_f64(),
                "top_other_processes": m.cpu.top_others.iter()
                    .map(|(comm, cpu)| json!({"comm": comm, "cpu_s": cpu.as_secs_f64()}))
                    .collect::<Vec<_>>(),
                "cpu_us_per_datagram": m.cpu_us_per_datagram(),
                "ratio_to_floor": ratio_to_floor(measurements, m),
                "ratio_to_nginx": ratio_to_nginx(measurements, m),
                "udp": m.udp.map(|u| json!({
                    "in_datagrams": u.in_datagrams,
                    "rcvbuf_errors": u.rcvbuf_errors,
                    "in_errors": u.in_errors,
                    "no_ports": u.no_ports,
                    "sndbuf_errors": u.sndbuf_errors,
                })),
                "load": m.report.to_json(),
            })
        })
        .collect();
    let reasons = |list: &[(ProxyKind, String)]| -> Vec<serde_json::Value> {
        list.iter()
            .map(|(p, why)| json!({"proxy": p.name(), "reason": why}))
            .collect()
    };
    json!({
        "host": {
            "cpus": allowed_cpus(),
            "rmem_max": rmem_max(),
            "clock_ticks": clock_ticks(),
        },
        "load": {
            "rates": args.rate,
            "echo": args.echo,
            "flows": args.flows,
            "duration_s": args.duration.as_secs_f64(),
            "warmup_s": args.warmup.as_secs_f64(),
            "size": args.size,
        },
        "results": results,
        "skipped": reasons(skipped),
        "failed": reasons(failed),
    })
}

fn rmem_max() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn host_line() -> String {
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "cpus {:?} (sched_getaffinity), net.core.rmem_max {}, clock ticks {}/s, loadavg {}; generator, sink and proxy share the cpus",
        allowed_cpus(),
        rmem_max().map_or("?".into(), |v| v.to_string()),
        clock_ticks(),
        loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use udpshard_tests::load::proxy::udpshard_toml;

    #[test]
    fn the_udpshard_config_is_valid() {
        let backends: [SocketAddr; 2] = [
            "127.0.0.1:4001".parse().unwrap(),
            "127.0.0.1:4002".parse().unwrap(),
        ];
        let text = udpshard_toml(
            "127.0.0.1:4000".parse().unwrap(),
            &backends,
            Path::new("/tmp/x"),
            "upstream_send = \"socket\"\noffload = \"off\"",
        );
        assert!(text.contains("stats_file = \"/tmp/x/stats\""));
        assert!(text.contains(r#"backends = ["127.0.0.1:4001", "127.0.0.1:4002"]"#));
        if let Err(e) = udpshard_config::parse(&text, "bench.toml") {
            panic!("{e}\n{text}");
        }
    }

    fn measurement(proxy: ProxyKind, phase: Phase, cpu_ms: u64, received: u64) -> Measurement {
        Measurement {
            proxy,
            phase,
            attempts: 1,
            report: LoadReport {
                offered_rate: phase.rate(),
                flows: 2000,
                sent: received,
                send_errors: 0,
                first_send_error: None,
                slipped: 0,
                received,
                lost: 0,
                loss_ratio: 0.0,
                duplicates: 0,
                malformed: 0,
                per_sink: Vec::new(),
                p50: Some(Duration::from_micros(100)),
                p99: None,
                max_latency: None,
                elapsed: Duration::from_secs(5),
                achieved_rate: received as f64 / 5.0,
                replies: None,
            },
            cpu: CpuUse {
                tree: Duration::from_millis(cpu_ms),
                ..CpuUse::default()
            },

            wall: Duration::from_secs(5),
            udp: None,
        }
    }

    #[test]
    fn steal_counts_as_disturbance() {
        let mut m = measurement(ProxyKind::Udpshard, Phase::Rate(30_000), 1_000, 1_000);
        assert_eq!(m.disturbance(), 0.0);
        m.cpu.steal = Duration::from_millis(400);
        assert!((m.disturbance() - 0.08).abs() < 1e-9, "{}", m.disturbance());
        m.cpu.other_processes = Duration::from_millis(100);
        assert!((m.disturbance() - 0.10).abs() < 1e-9, "{}", m.disturbance());
        assert!(m.disturbance() > NOISY);
        let table = table(&[m]);
        let row = table.lines().nth(1).unwrap();
        assert!(row.ends_with(" 8"), "{table}");
    }

    #[test]
    fn ratios_compare_with_the_floor_in_the_same_phase() {
        let ms = [
            measurement(ProxyKind::Floor, Phase::Rate(150_000), 1_000, 1_000_000),
            measurement(ProxyKind::Floor, Phase::Max, 3_000, 1_000_000),
            measurement(ProxyKind::Udpshard, Phase::Rate(150_000), 1_500, 1_000_000),
            measurement(ProxyKind::Udpshard, Phase::Max, 3_000, 0),
        ];
        assert_eq!(ms[2].cpu_us_per_datagram(), Some(1.5));
        assert_eq!(ratio_to_floor(&ms, &ms[2]), Some(1.5));
        assert_eq!(ratio_to_floor(&ms, &ms[3]), None);
        let table = table(&ms);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[0].ends_with("steal %"), "{table}");
        assert!(
            lines[3].starts_with("udpshard") && lines[3].contains(" 1.50 "),
            "{table}"
        );
        assert!(lines[4].contains(" - "), "{table}");
        let json = to_json(&Args::parse_from(["bench"]), &ms, &[], &[]);
        assert_eq!(json["results"][2]["ratio_to_floor"], 1.5);
    }

    #[test]
    fn proxies_run_floor_first() {
        assert_eq!(ProxyKind::ALL[0], ProxyKind::Floor);
        assert_eq!(ProxyKind::Udpshard.binary(), "udpshard");
    }
}
