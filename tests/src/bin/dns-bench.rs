//! `dns-bench`: DNS, the load users most often put behind nginx's stream UDP proxy. dnsperf
//! (Debian's) queries NSD (Debian's authoritative server) serving a small zone: directly,
//! through nginx's stream UDP proxy and through udpshard (`dissector = "tuple"`), in one run.
//! For each path and query rate: the queries per second achieved, the queries lost (dnsperf's
//! count: no answer within its timeout), latency p50/p99 (from dnsperf's per-answer report),
//! and the proxy's CPU (its process tree, from /proc) per answered query, against nginx's.
//!
//! dnsperf, NSD, the proxy and this program share the machine's CPUs; a load during which
//! other programs and steal took more than 5% of a CPU is measured again (`--retries`).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use udpshard_tests::load::baseline::allowed_cpus;
use udpshard_tests::load::cli::{Common, Via};
use udpshard_tests::load::procstat::{tree_cpu_time, CpuSnapshot, CpuUse};
use udpshard_tests::load::proxy::{
    free_udp_addr, nginx_command, udpshard_toml_keyed, ProxyProcess,
};
use udpshard_tests::load::units::{parse_duration, Rate};

/// Other programs' CPU and steal, as a share of one CPU, above which a load is measured again.
const NOISY: f64 = 0.05;
/// Pause between loads.
const SETTLE: Duration = Duration::from_millis(300);
/// The names dnsperf asks for, round robin: what NSD serves.
const QUERIES: &str =
    "a.bench.test A\nb.bench.test A\nc.bench.test AAAA\nbench.test NS\nbench.test SOA\n";
const ZONE: &str = "$ORIGIN bench.test.
$TTL 300
@ IN SOA ns.bench.test. admin.bench.test. 1 3600 600 86400 300
@ IN NS ns
ns IN A 192.0.2.1
a IN A 192.0.2.10
b IN A 192.0.2.11
c IN AAAA 2001:db8::1
";

#[derive(Parser, Debug)]
#[command(
    version,
    about = "DNS through nginx and udpshard: dnsperf against NSD, queries/s, loss, latency and proxy CPU per query"
)]
struct Args {
    /// Queries/s dnsperf offers (20000, 20k), or `max` (as fast as its outstanding queries
    /// allow); repeat it for several loads.
    #[arg(long, default_values = ["20k", "max"])]
    rate: Vec<Rate>,
    /// Length of each measured load.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// dnsperf's clients (each its own socket: a session to the proxies).
    #[arg(long, default_value_t = 32)]
    clients: u32,
    /// dnsperf's most queries outstanding at once.
    #[arg(long, default_value_t = 256)]
    outstanding: u32,
    /// Unmeasured load before the measured ones; 0s skips it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Measure only these paths (repeatable).
    #[arg(long, value_enum)]
    only: Vec<Via>,
    /// Leave these paths out (repeatable).
    #[arg(long, value_enum)]
    skip: Vec<Via>,
    /// Measure a load again (up to this many times) when other programs and steal took more
    /// than 5% of a CPU during it.
    #[arg(long, default_value_t = 1)]
    retries: u32,
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    #[arg(long, default_value = "/usr/sbin/nsd")]
    nsd: PathBuf,
    #[arg(long, default_value = "/usr/bin/dnsperf")]
    dnsperf: PathBuf,
    #[command(flatten)]
    common: Common,
}

/// What dnsperf reported of one load.
#[derive(Clone, Debug, Default)]
struct Perf {
    sent: u64,
    completed: u64,
    lost: u64,
    qps: f64,
    /// Each answer's latency, sorted.
    latencies: Vec<f64>,
}

impl Perf {
    fn percentile(&self, p: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let at = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        Some(Duration::from_secs_f64(self.latencies[at]))
    }
}

/// One measured load.
struct Measurement {
    kind: Via,
    rate: Option<u64>,
    perf: Perf,
    wall: Duration,
    cpu: CpuUse,
    /// NSD's CPU during the load.
    server_cpu: Duration,
    attempts: u32,
}

impl Measurement {
    fn cpu_us_per_query(&self) -> Option<f64> {
        (self.kind != Via::Direct && self.perf.completed > 0)
            .then(|| self.cpu.tree.as_secs_f64() * 1e6 / self.perf.completed as f64)
    }

    fn share(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// Other programs' CPU (NSD is measured apart; dnsperf exits before the snapshot) and
    /// steal.
    fn noise(&self) -> Duration {
        self.cpu.other_processes.saturating_sub(self.server_cpu) + self.cpu.steal
    }

    fn ratio_to_nginx(&self, all: &[Measurement]) -> Option<f64> {
        let nginx = all
            .iter()
            .find(|m| m.kind == Via::Nginx && m.rate == self.rate)?
            .cpu_us_per_query()?;
        Some(self.cpu_us_per_query()? / nginx)
    }
}

/// NSD on `addr`, serving `bench.test` from a temp directory, until dropped.
struct Nsd {
    child: Child,
    dir: PathBuf,
}

impl Nsd {
    fn start(binary: &Path, addr: SocketAddr, timeout: Duration) -> Result<Nsd, String> {
        let dir = std::env::temp_dir().join(format!("dns-bench-nsd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::write(dir.join("bench.zone"), ZONE).map_err(|e| e.to_string())?;
        let d = dir.display();
        let conf = format!(
            "server:\n\tip-address: {ip}@{port}\n\tport: {port}\n\tusername: \"\"\n\tchroot: \"\"\n\
             \tzonesdir: \"{d}\"\n\tdatabase: \"\"\n\tzonelistfile: \"{d}/zone.list\"\n\
             \txfrdfile: \"{d}/xfrd.state\"\n\txfrdir: \"{d}\"\n\tpidfile: \"{d}/nsd.pid\"\n\
             \tserver-count: 1\n\tverbosity: 1\n\trrl-ratelimit: 0\n\tdo-ip6: no\n\
             remote-control:\n\tcontrol-enable: no\n\
             zone:\n\tname: bench.test\n\tzonefile: bench.zone\n",
            ip = addr.ip(),
            port = addr.port(),
        );
        let conf_path = dir.join("nsd.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let nsd = Nsd { child, dir };
        // Ready once it answers.
        let probe = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        probe
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let query = dns_query(1, "a.bench.test");
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            let _ = probe.send_to(&query, addr);
            if matches!(probe.recv_from(&mut buf), Ok((n, _)) if n >= 12) {
                return Ok(nsd);
            }
        }
        Err(format!("NSD did not answer on {addr} within {timeout:?}"))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A query for `name` A with id `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    q
}

/// Runs dnsperf against `target` for `duration` at `rate` (None: as fast as it can), and
/// reads its report: the counts from its statistics, each answer's latency from its
/// verbose lines (`> NOERROR a.bench.test A 0.000331`).
fn dnsperf(
    args: &Args,
    queries: &Path,
    target: SocketAddr,
    rate: Option<u64>,
    duration: Duration,
) -> Result<Perf, String> {
    let mut command = Command::new(&args.dnsperf);
    command
        .arg("-s")
        .arg(target.ip().to_string())
        .arg("-p")
        .arg(target.port().to_string())
        .arg("-d")
        .arg(queries)
        .arg("-l")
        .arg(duration.as_secs().max(1).to_string())
        .arg("-c")
        .arg(args.clients.to_string())
        .arg("-q")
        .arg(args.outstanding.to_string())
        .arg("-t")
        .arg("1")
        .arg("-v");
    if let Some(rate) = rate {
        command.arg("-Q").arg(rate.to_string());
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.dnsperf.display()))?;
    let stdout = child.stdout.take().ok_or("no dnsperf output")?;
    let mut perf = Perf::default();
    let number = |line: &str| -> u64 {
        line.split(':')
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let t = line.trim();
        if let Some(answer) = t.strip_prefix("> ") {
            if let Some(latency) = answer
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            {
                perf.latencies.push(latency);
            }
        } else if t.starts_with("Queries sent:") {
            perf.sent = number(t);
        } else if t.starts_with("Queries completed:") {
            perf.completed = number(t);
        } else if t.starts_with("Queries lost:") {
            perf.lost = number(t);
        } else if t.starts_with("Queries per second:") {
            perf.qps = t
                .split(':')
                .nth(1)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0);
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() || perf.sent == 0 {
        return Err(format!(
            "dnsperf ended {status} after {} queries",
            perf.sent
        ));
    }
    perf.latencies.sort_by(f64::total_cmp);
    Ok(perf)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.clients == 0 || args.outstanding == 0 || args.duration < Duration::from_secs(1) {
        eprintln!("dns-bench: --clients and --outstanding at least 1, --duration at least 1s");
        return ExitCode::FAILURE;
    }
    for (what, path, package) in [
        ("dnsperf", &args.dnsperf, "dnsperf"),
        ("NSD", &args.nsd, "nsd"),
    ] {
        if !path.is_file() {
            eprintln!(
                "dns-bench: {what} is missing at {} (apt-get install {package}; `bash tests/bench.sh dns` installs it as root)",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    }
    let _lock = match args.common.lock() {
        Ok(lock) => lock,
        Err(e) => {
            eprintln!("dns-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bin_dir = match args.common.bin_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("dns-bench: cannot find the binaries: {e}");
            return ExitCode::FAILURE;
        }
    };
    let workdir = std::env::temp_dir().join(format!("dns-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&workdir) {
        eprintln!("dns-bench: {}: {e}", workdir.display());
        return ExitCode::FAILURE;
    }
    let queries = workdir.join("queries.txt");
    if let Err(e) = std::fs::write(&queries, QUERIES) {
        eprintln!("dns-bench: {}: {e}", queries.display());
        return ExitCode::FAILURE;
    }
    let server_addr = match free_udp_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dns-bench: cannot find a free port: {e}");
            return ExitCode::FAILURE;
        }
    };
    let nsd = match Nsd::start(&args.nsd, server_addr, args.common.ready_timeout) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("dns-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("dns-bench: NSD serves bench.test on {server_addr}");
    let kinds: Vec<Via> = Via::ALL
        .into_iter()
        .filter(|k| args.only.is_empty() || args.only.contains(k))
        .filter(|k| !args.skip.contains(k))
        .collect();
    let mut all = Vec::new();
    let mut failed = Vec::new();
    for kind in kinds {
        match bench_path(&args, kind, &bin_dir, &workdir, &queries, &nsd, server_addr) {
            Ok(ms) => all.extend(ms),
            Err(e) => {
                eprintln!("dns-bench: {} failed: {e}", kind.name());
                failed.push((kind, e));
            }
        }
    }
    drop(nsd);
    let _ = std::fs::remove_dir_all(&workdir);
    args.common.report(
        || to_json(&args, &all).to_string(),
        || table(&args, &all),
        !failed.is_empty(),
    )
}

fn bench_path(
    args: &Args,
    kind: Via,
    bin_dir: &Path,
    workdir: &Path,
    queries: &Path,
    nsd: &Nsd,
    server: SocketAddr,
) -> Result<Vec<Measurement>, String> {
    let listen = free_udp_addr().map_err(|e| format!("cannot find a free port: {e}"))?;
    let mut process = match kind {
        Via::Direct => None,
        Via::Nginx | Via::Udpshard => {
            let mut command;
            if kind == Via::Nginx {
                if !args.nginx.is_file() {
                    return Err(format!(
                        "{} is missing (apt-get install nginx libnginx-mod-stream)",
                        args.nginx.display()
                    ));
                }
                command = nginx_command(&args.nginx, listen, &[server], workdir)?;
            } else {
                let config = workdir.join("udpshard.toml");
                std::fs::write(
                    &config,
                    udpshard_toml_keyed(listen, &[server], workdir, "", "dissector = \"tuple\""),
                )
                .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
                command = Command::new(bin_dir.join("udpshard"));
                command.arg("run").arg("--config").arg(config);
            }
            let bound = (kind == Via::Nginx).then_some(listen);
            Some(ProxyProcess::launch(
                "dns-bench",
                kind.name(),
                command,
                bound,
                args.common.ready_timeout,
            )?)
        }
    };
    let target = if kind == Via::Direct { server } else { listen };
    if !args.warmup.is_zero() {
        let perf = dnsperf(
            args,
            queries,
            target,
            None,
            args.warmup.max(Duration::from_secs(1)),
        )?;
        eprintln!(
            "dns-bench: {}: warm-up: {} queries, {} answered",
            kind.name(),
            perf.sent,
            perf.completed
        );
    }
    let mut results = Vec::new();
    for &Rate(rate) in &args.rate {
        let mut attempts = 0;
        let m = loop {
            attempts += 1;
            std::thread::sleep(SETTLE);
            let root = process.as_ref().map_or(0, ProxyProcess::pid);
            let server_before = tree_cpu_time(nsd.pid()).map_err(|e| format!("/proc: {e}"))?;
            let cpu_before = CpuSnapshot::take().map_err(|e| format!("/proc: {e}"))?;
            let started = Instant::now();
            let perf = dnsperf(args, queries, target, rate, args.duration)?;
            let wall = started.elapsed();
            let cpu = CpuSnapshot::take()
                .map_err(|e| format!("/proc: {e}"))?
                .since(&cpu_before, root, std::process::id());
            let server_cpu = tree_cpu_time(nsd.pid())
                .map_err(|e| format!("/proc: {e}"))?
                .saturating_sub(server_before);
            if let Some(p) = process.as_mut() {
                p.check_alive()?;
            }
            let m = Measurement {
                kind,
                rate,
                perf,
                wall,
                cpu,
                server_cpu,
                attempts,
            };
            report_progress(&m);
            let noise = m.share(m.noise());
            if noise <= NOISY || attempts > args.retries {
                break m;
            }
            eprintln!(
                "dns-bench: other programs and steal took {:.0}% of a CPU: measuring again",
                noise * 100.0
            );
        };
        results.push(m);
    }
    if let Some(mut p) = process {
        let status = p.stop();
        eprintln!("dns-bench: {}: stopped ({status})", kind.name());
    }
    Ok(results)
}

fn rate_name(rate: Option<u64>) -> String {
    rate.map_or("max".into(), |r| r.to_string())
}

fn micros(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.0}µs", d.as_secs_f64() * 1e6))
}

fn report_progress(m: &Measurement) {
    eprintln!(
        "dns-bench: {} @ {}: sent {}, answered {} ({:.0}/s), lost {}, p50 {} p99 {}, proxy cpu {:.2}s ({} µs/query), NSD cpu {:.2}s, this program {:.2}s, other processes {:.2}s, steal {:.2}s",
        m.kind.name(),
        rate_name(m.rate),
        m.perf.sent,
        m.perf.completed,
        m.perf.qps,
        m.perf.lost,
        micros(m.perf.percentile(0.5)),
        micros(m.perf.percentile(0.99)),
        m.cpu.tree.as_secs_f64(),
        m.cpu_us_per_query().map_or("-".into(), |v| format!("{v:.2}")),
        m.server_cpu.as_secs_f64(),
        m.cpu.own.as_secs_f64(),
        m.cpu.other_processes.as_secs_f64(),
        m.cpu.steal.as_secs_f64(),
    );
}

fn table(args: &Args, all: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dnsperf ({} clients, {} outstanding) -> [proxy] -> NSD (one server process), {:?} per load; cpus {:?}, shared by all of them",
        args.clients,
        args.outstanding,
        args.duration,
        allowed_cpus()
    );
    let header = [
        "path",
        "offered q/s",
        "answered q/s",
        "sent",
        "lost",
        "lost %",
        "p50",
        "p99",
        "proxy cpu µs/query",
        "x nginx",
        "proxy cpu %",
        "NSD cpu %",
        "other+steal %",
        "tries",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for m in all {
        rows.push(vec![
            m.kind.name().to_string(),
            rate_name(m.rate),
            format!("{:.0}", m.perf.qps),
            m.perf.sent.to_string(),
            m.perf.lost.to_string(),
            format!(
                "{:.3}",
                m.perf.lost as f64 * 100.0 / m.perf.sent.max(1) as f64
            ),
            micros(m.perf.percentile(0.5)),
            micros(m.perf.percentile(0.99)),
            m.cpu_us_per_query()
                .map_or("-".into(), |v| format!("{v:.2}")),
            m.ratio_to_nginx(all)
                .map_or("-".into(), |v| format!("{v:.2}")),
            if m.kind == Via::Direct {
                "-".into()
            } else {
                format!("{:.0}", m.share(m.cpu.tree) * 100.0)
            },
            format!("{:.0}", m.share(m.server_cpu) * 100.0),
            format!("{:.0}", m.share(m.noise()) * 100.0),
            m.attempts.to_string(),
        ]);
    }
    out.push_str(&udpshard_tests::load::table::render(&rows));
    out
}

fn to_json(args: &Args, all: &[Measurement]) -> serde_json::Value {
    json!({
        "clients": args.clients,
        "outstanding": args.outstanding,
        "duration_s": args.duration.as_secs_f64(),
        "cpus": allowed_cpus(),
        "results": all.iter().map(|m| json!({
            "path": m.kind.name(),
            "offered_qps": m.rate,
            "answered_qps": m.perf.qps,
            "sent": m.perf.sent,
            "completed": m.perf.completed,
            "lost": m.perf.lost,
            "p50_s": m.perf.percentile(0.5).map(|d| d.as_secs_f64()),
            "p99_s": m.perf.percentile(0.99).map(|d| d.as_secs_f64()),
            "proxy_cpu_s": m.cpu.tree.as_secs_f64(),
            "cpu_us_per_query": m.cpu_us_per_query(),
            "ratio_to_nginx": m.ratio_to_nginx(all),
            "server_cpu_s": m.server_cpu.as_secs_f64(),
            "bench_cpu_s": m.cpu.own.as_secs_f64(),
            "other_processes_cpu_s": m.cpu.other_processes.as_secs_f64(),
            "steal_cpu_s": m.cpu.steal.as_secs_f64(),
            "attempts": m.attempts,
        })).collect::<Vec<_>>(),
    })
}
