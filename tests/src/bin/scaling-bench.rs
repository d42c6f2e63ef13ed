//! `scaling-bench`: how udpshard's capacity grows with its workers. The host's allowed CPUs
//! are split in two: the generator's threads and the sinks run pinned on the first
//! `--generator-cpus`, udpshard (under `taskset`, `workers = "auto"`: one worker per CPU it
//! may use) on 1, 2, 4, 8 ... and all of the rest. For each worker count, every generator
//! thread sends as fast as it can over its own connection IDs for `--duration`; the sinks
//! count what arrives. Reported: datagrams/s delivered, per worker, the scaling efficiency
//! (rate at N workers / N x rate at 1), loss, and how busy the workers were. Where the
//! workers were not the limit (under 90% of their CPUs busy and under 1% lost) the generator
//! was, and the efficiency says so rather than a number.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use udpshard_shared::flow::quic_short;
use udpshard_tests::load::baseline::{allowed_cpus, pin_current_thread};
use udpshard_tests::load::cli::Common;
use udpshard_tests::load::mmsg::Batch;
use udpshard_tests::load::procstat::CpuSnapshot;
use udpshard_tests::load::proxy::{free_udp_addr, show_command, udpshard_toml, ProxyProcess};
use udpshard_tests::load::units::parse_duration;

/// Datagrams per sendmmsg of a generator thread.
const BURST: usize = 64;
/// A worker set was the limit where its CPUs were this busy, or where it lost this share.
const BUSY: f64 = 0.9;
const LOSSY: f64 = 0.01;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "udpshard's delivered rate at 1, 2, 4 ... workers, with the generator on CPUs of its own"
)]
struct Args {
    /// CPUs (of the allowed ones, from the lowest) for the generator and the sinks; the rest
    /// are udpshard's. Default: half, at least one.
    #[arg(long)]
    generator_cpus: Option<usize>,
    /// Worker counts to measure (repeatable); default 1, 2, 4, 8 ... and all of udpshard's
    /// CPUs.
    #[arg(long)]
    workers: Vec<usize>,
    /// Connection IDs per generator thread.
    #[arg(long, default_value_t = 1000)]
    flows: usize,
    /// Datagram size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Length of each measured load.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// `upstream_send` for udpshard.
    #[arg(long, default_value = "auto")]
    upstream_send: String,
    #[command(flatten)]
    common: Common,
}

struct Row {
    workers: usize,
    cpus: Vec<usize>,
    sent: u64,
    delivered: u64,
    /// What the sinks' own sockets dropped (their threads share CPUs with the generator):
    /// not the proxy's loss.
    sink_drops: u64,
    sending: Duration,
    /// The proxy's CPU over the load, in CPUs (1.0: one CPU all the time).
    busy_cpus: f64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.sending.as_secs_f64().max(1e-9)
    }

    fn per_worker(&self) -> f64 {
        self.rate() / self.workers as f64
    }

    fn busy(&self) -> f64 {
        self.busy_cpus / self.workers as f64
    }

    /// The share of what the generator sent that the proxy did not deliver (the sinks' own
    /// drops are theirs).
    fn loss(&self) -> f64 {
        self.sent.saturating_sub(self.delivered + self.sink_drops) as f64 / self.sent.max(1) as f64
    }

    /// Whether the workers were the limit: busy, or losing datagrams the generator sent.
    fn saturated(&self) -> bool {
        self.busy() >= BUSY || self.loss() >= LOSSY
    }

    /// Rate at N / (N x rate at 1), where both runs had their workers as the limit.
    fn efficiency(&self, rows: &[Row]) -> Option<f64> {
        let one = rows.iter().find(|r| r.workers == 1)?;
        (self.saturated() && one.saturated())
            .then(|| self.rate() / (self.workers as f64 * one.rate()))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(rows) => {
            if args.common.json {
                println!("{}", to_json(&rows));
            } else {
                print!("{}", table(&rows));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("scaling-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<Vec<Row>, String> {
    if args.flows == 0 || !(9..=1400).contains(&args.size) {
        return Err("--flows must be at least 1 and --size in 9..=1400".into());
    }
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        return Err(format!(
            "needs two CPUs at least (one for the generator, one for udpshard); allowed: {cpus:?}"
        ));
    }
    let split = args
        .generator_cpus
        .unwrap_or(cpus.len() / 2)
        .clamp(1, cpus.len() - 1);
    let (generator, proxy_cpus) = cpus.split_at(split);
    let mut counts = args.workers.clone();
    if counts.is_empty() {
        counts = std::iter::successors(Some(1usize), |n| Some(n * 2))
            .take_while(|&n| n < proxy_cpus.len())
            .chain([proxy_cpus.len()])
            .collect();
    }
    counts.retain(|&n| (1..=proxy_cpus.len()).contains(&n));
    let _lock = args.common.lock()?;
    let bin = args
        .common
        .bin_dir()
        .map_err(|e| format!("cannot find the binaries: {e}"))?
        .join("udpshard");
    eprintln!(
        "scaling-bench: generator and sinks on cpus {generator:?}, udpshard on {proxy_cpus:?}; workers {counts:?}"
    );
    let mut rows = Vec::new();
    for n in counts {
        let row = measure(args, &bin, generator, &proxy_cpus[..n])?;
        eprintln!(
            "scaling-bench: {n} workers on {:?}: sent {}, delivered {} ({:.0}/s, {:.0}/s per worker, loss {:.2}%), workers {:.0}% busy",
            row.cpus,
            row.sent,
            row.delivered,
            row.rate(),
            row.per_worker(),
            row.loss() * 100.0,
            row.busy() * 100.0
        );
        rows.push(row);
    }
    Ok(rows)
}

/// Sinks: one socket per generator CPU (the proxy's backends), each read by a thread pinned
/// there; they count datagrams.
struct Sinks {
    addrs: Vec<SocketAddr>,
    delivered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Sinks {
    fn start(cpus: &[usize]) -> Result<Sinks, String> {
        let delivered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut addrs = Vec::new();
        let mut threads = Vec::new();
        for &cpu in cpus {
            let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("sink: {e}"))?;
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .map_err(|e| e.to_string())?;
            let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(8 << 20);
            addrs.push(socket.local_addr().map_err(|e| e.to_string())?);
            let (delivered, stop) = (delivered.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let _ = pin_current_thread(cpu);
                let mut batch = Batch::new(256, 2048);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = batch.recv(socket.as_fd()) {
                        delivered.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }));
        }
        Ok(Sinks {
            addrs,
            delivered,
            stop,
            threads,
        })
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends from one thread per generator CPU, each over its own connection IDs and its own
/// sockets, as fast as it can for `duration` (`once`: one datagram per flow): how many the
/// kernel took.
fn blast(
    args: &Args,
    target: SocketAddr,
    cpus: &[usize],
    duration: Duration,
    once: bool,
) -> Result<u64, String> {
    let threads: Vec<JoinHandle<Result<u64, String>>> = cpus
        .iter()
        .enumerate()
        .map(|(t, &cpu)| {
            let (flows, size) = (args.flows, args.size);
            std::thread::spawn(move || {
                let _ = pin_current_thread(cpu);
                // One socket per 64 flows: the proxy sees many clients.
                let sockets: Vec<UdpSocket> = (0..flows.div_ceil(64))
                    .map(|_| {
                        let s = UdpSocket::bind("127.0.0.1:0")?;
                        s.connect(target)?;
                        Ok(s)
                    })
                    .collect::<std::io::Result<_>>()
                    .map_err(|e| format!("generator socket: {e}"))?;
                let body = vec![0u8; size.saturating_sub(9)];
                let datagrams: Vec<Vec<u8>> = (0..flows)
                    .map(|flow| {
                        let cid = ((t as u64) << 32 | flow as u64) + 1;
                        quic_short(&cid.to_be_bytes(), &body)
                    })
                    .collect();
                let mut batch = Batch::new(BURST, size.max(9));
                let start = Instant::now();
                let mut sent = 0u64;
                let mut round = 0usize;
                loop {
                    for (s, socket) in sockets.iter().enumerate() {
                        batch.clear();
                        for k in 0..BURST.min(64) {
                            let flow = s * 64 + (k + round) % 64;
                            if flow >= flows {
                                continue;
                            }
                            let d = &datagrams[flow];
                            let _ = batch.push_with(d.len(), |buf| {
                                buf.copy_from_slice(d);
                                Some(())
                            });
                            if once {
                                break;
                            }
                        }
                        let (n, _) = batch.send_connected(socket.as_fd());
                        sent += n as u64;
                    }
                    round += 1;
                    if (once && round >= 64) || (!once && start.elapsed() >= duration) {
                        return Ok(sent);
                    }
                }
            })
        })
        .collect();
    let mut sent = 0;
    for t in threads {
        sent += t.join().map_err(|_| "a generator thread panicked")??;
    }
    Ok(sent)
}

fn measure(
    args: &Args,
    bin: &std::path::Path,
    generator: &[usize],
    cpus: &[usize],
) -> Result<Row, String> {
    let workdir = std::env::temp_dir().join(format!("scaling-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;
    let sinks = Sinks::start(generator)?;
    let listen = free_udp_addr().map_err(|e| format!("cannot find a free port: {e}"))?;
    let config = workdir.join("udpshard.toml");
    let top = format!("upstream_send = \"{}\"", args.upstream_send);
    std::fs::write(&config, udpshard_toml(listen, &sinks.addrs, &workdir, &top))
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let list: Vec<String> = cpus.iter().map(usize::to_string).collect();
    let mut command = Command::new("taskset");
    command
        .arg("-c")
        .arg(list.join(","))
        .arg(bin)
        .arg("run")
        .arg("--config")
        .arg(&config);
    eprintln!("scaling-bench: starting {}", show_command(&command));
    let mut process = ProxyProcess::start(command).map_err(|e| format!("cannot start: {e}"))?;
    process.wait_ready(args.common.ready_timeout)?;
    // Every flow once (its session), then a short unmeasured load.
    blast(args, listen, generator, Duration::ZERO, true)?;
    blast(args, listen, generator, Duration::from_millis(500), false)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = sinks.delivered.load(Ordering::Relaxed);
    let drops_before = socket_drops(&sinks.addrs);
    let cpu_before = CpuSnapshot::take().map_err(|e| format!("/proc: {e}"))?;
    let started = Instant::now();
    let sent = blast(args, listen, generator, args.duration, false)?;
    let sending = started.elapsed();
    // The queues drain (at most 2 s).
    let mut last = sinks.delivered.load(Ordering::Relaxed);
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(200));
        let now = sinks.delivered.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let cpu = CpuSnapshot::take()
        .map_err(|e| format!("/proc: {e}"))?
        .since(&cpu_before, process.pid(), std::process::id());
    let sink_drops = socket_drops(&sinks.addrs).saturating_sub(drops_before);
    process.check_alive()?;
    let status = process.stop();
    eprintln!("scaling-bench: stopped ({status})");
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(Row {
        workers: cpus.len(),
        cpus: cpus.to_vec(),
        sent,
        delivered: last - before,
        sink_drops,
        sending,
        // Over the sending time: the drain's idle tail would understate it.
        busy_cpus: cpu.tree.as_secs_f64() / sending.as_secs_f64().max(1e-9),
    })
}

/// The kernel's drop counts of the sockets bound to `addrs` (IPv4 loopback), from
/// /proc/net/udp.
fn socket_drops(addrs: &[SocketAddr]) -> u64 {
    let wanted: Vec<String> = addrs
        .iter()
        .filter_map(|a| match a {
            SocketAddr::V4(v4) => Some(format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(v4.ip().octets()),
                v4.port()
            )),
            SocketAddr::V6(_) => None,
        })
        .collect();
    std::fs::read_to_string("/proc/net/udp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            wanted
                .iter()
                .any(|w| w == local)
                .then(|| fields.last()?.parse::<u64>().ok())?
        })
        .sum()
}

fn table(rows: &[Row]) -> String {
    let header = [
        "workers",
        "delivered/s",
        "per worker/s",
        "efficiency",
        "loss %",
        "busy %",
        "sink drops",
    ];
    let mut table = vec![header.map(String::from).to_vec()];
    table.extend(rows.iter().map(|r| {
        let efficiency = match r.efficiency(rows) {
            Some(e) => format!("{e:.2}"),
            None if !r.saturated() => "gen-bound".into(),
            None => "-".into(),
        };
        vec![
            r.workers.to_string(),
            format!("{:.0}", r.rate()),
            format!("{:.0}", r.per_worker()),
            efficiency,
            format!("{:.2}", r.loss() * 100.0),
            format!("{:.0}", r.busy() * 100.0),
            r.sink_drops.to_string(),
        ]
    }));
    udpshard_tests::load::table::render(&table)
}

fn to_json(rows: &[Row]) -> serde_json::Value {
    json!({
        "cpus": allowed_cpus(),
        "results": rows.iter().map(|r| json!({
            "workers": r.workers,
            "cpus": r.cpus,
            "sent": r.sent,
            "delivered": r.delivered,
            "sink_drops": r.sink_drops,
            "delivered_per_s": r.rate(),
            "per_worker_per_s": r.per_worker(),
            "efficiency": r.efficiency(rows),
            "loss": r.loss(),
            "workers_busy": r.busy(),
        })).collect::<Vec<_>>(),
    })
}
