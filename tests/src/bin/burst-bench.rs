//! `burst-bench`: the reply path under QUIC-shaped traffic, for nginx and udpshard in one run.
//!
//! Clients (`--sockets` sockets, `--cids` QUIC connection IDs spread over them) send small
//! requests; the backends answer each with a flight of `--flight` datagrams of `--size` bytes,
//! sent the way a QUIC stack sends one: a single UDP_SEGMENT message (`gso`) or a single
//! sendmmsg (`mmsg`). The flights come back through the proxy to the clients. For each proxy,
//! backend send mode and reply rate: the proxy's CPU (its process tree, from /proc) per reply
//! datagram delivered, and the loss each way, counted exactly: requests the clients sent
//! against those the backends read, reply datagrams the backends sent against those the
//! clients read.
//!
//! The proxies: nginx's stream UDP proxy, udpshard, and udpshard with `offload = "off"` (the
//! same binary without GRO and GSO: what the offloads are worth, in the same run).

use std::fmt::Write as _;
use std::io::IoSlice;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recvmsg, sendmmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, MultiHeaders,
    SockaddrStorage,
};
use serde_json::json;
use udpshard_shared::flow::quic_short;
use udpshard_tests::harness::send_segmented;
use udpshard_tests::load::baseline::allowed_cpus;
use udpshard_tests::load::cli::Common;
use udpshard_tests::load::mmsg::Batch;
use udpshard_tests::load::pacing::{Pacer, Step};
use udpshard_tests::load::procstat::{CpuSnapshot, CpuUse};
use udpshard_tests::load::proxy::{free_udp_addr, nginx_command, udpshard_toml, ProxyProcess};
use udpshard_tests::load::units::{parse_duration, parse_rate};

/// How long the backends and the clients' reader wait in one blocking call before they look
/// at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// After a load: done when no reply arrived for this long (or all did), at most `DRAIN_MAX`.
const DRAIN_QUIET: Duration = Duration::from_millis(200);
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// Pause between loads.
const SETTLE: Duration = Duration::from_millis(300);
/// Other programs' CPU and steal, as a share of one CPU, above which a load is measured again.
const NOISY: f64 = 0.05;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Proxy CPU per reply datagram when backends answer small requests with flights of large datagrams"
)]
struct Args {
    /// Reply datagrams/s of a load (120000, 120k); repeat it for several loads.
    #[arg(long, value_parser = fixed_rate, default_values = ["50k", "120k"])]
    rate: Vec<u64>,
    /// Datagrams in each flight.
    #[arg(long, default_value_t = 10)]
    flight: usize,
    /// Bytes of each reply datagram.
    #[arg(long, default_value_t = 1350)]
    size: usize,
    /// Bytes of each request.
    #[arg(long, default_value_t = 48)]
    request_size: usize,
    /// QUIC connection IDs the requests carry, round robin.
    #[arg(long, default_value_t = 2000)]
    cids: u64,
    /// Client sockets (each CID always on one).
    #[arg(long, default_value_t = 64)]
    sockets: usize,
    /// Length of each measured load.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured load before the measured ones (sessions for every CID); 0s skips it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// How the backends send a flight (repeatable; default both).
    #[arg(long, value_enum)]
    send: Vec<SendMode>,
    /// The clients read with UDP_GRO, as QUIC stacks do (quinn-udp turns it on): a flight
    /// sent on segmented arrives as one buffer. On loopback the kernel bills a receiver's
    /// per-datagram work (segmenting, queueing, waking it) to the sender, the proxy; over a
    /// network it would be the client's.
    #[arg(long)]
    client_gro: bool,
    /// Measure only these proxies (repeatable).
    #[arg(long, value_enum)]
    only: Vec<Kind>,
    /// Leave these proxies out (repeatable).
    #[arg(long, value_enum)]
    skip: Vec<Kind>,
    /// Measure a load again (up to this many times) when other programs and steal took more
    /// than 5% of a CPU during it.
    #[arg(long, default_value_t = 1)]
    retries: u32,
    /// nginx's binary (Debian's `nginx` with `libnginx-mod-stream`).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    #[command(flatten)]
    common: Common,
}

fn fixed_rate(text: &str) -> Result<u64, String> {
    parse_rate(text)?.ok_or_else(|| "--rate takes a number".into())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Nginx,
    Udpshard,
    /// udpshard with `offload = "off"`.
    UdpshardNoOffload,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Nginx, Kind::Udpshard, Kind::UdpshardNoOffload];

    fn name(self) -> &'static str {
        match self {
            Kind::Nginx => "nginx",
            Kind::Udpshard => "udpshard",
            Kind::UdpshardNoOffload => "udpshard offload=off",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SendMode {
    /// One UDP_SEGMENT message per flight (quinn, quiche and msquic send so).
    Gso,
    /// One sendmmsg per flight, a message per datagram.
    Mmsg,
}

impl SendMode {
    fn name(self) -> &'static str {
        match self {
            SendMode::Gso => "gso",
            SendMode::Mmsg => "sendmmsg",
        }
    }
}

/// Counts that only go up, shared by the load's threads.
#[derive(Default)]
struct Tally {
    requests_sent: AtomicU64,
    requests_in: AtomicU64,
    replies_sent: AtomicU64,
    reply_send_errors: AtomicU64,
    replies_in: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    requests_sent: u64,
    requests_in: u64,
    replies_sent: u64,
    reply_send_errors: u64,
    replies_in: u64,
}

impl Tally {
    fn read(&self) -> Counts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            requests_sent: get(&self.requests_sent),
            requests_in: get(&self.requests_in),
            replies_sent: get(&self.replies_sent),
            reply_send_errors: get(&self.reply_send_errors),
            replies_in: get(&self.replies_in),
        }
    }
}

impl Counts {
    fn since(&self, before: &Counts) -> Counts {
        Counts {
            requests_sent: self.requests_sent - before.requests_sent,
            requests_in: self.requests_in - before.requests_in,
            replies_sent: self.replies_sent - before.replies_sent,
            reply_send_errors: self.reply_send_errors - before.reply_send_errors,
            replies_in: self.replies_in - before.replies_in,
        }
    }
}

/// The backends and the clients' reader: threads that run until dropped.
struct Rig {
    backends: Vec<SocketAddr>,
    clients: Arc<Vec<UdpSocket>>,
    gso: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<()>>,
}

impl Rig {
    fn start(args: &Args, proxy: SocketAddr) -> Result<Rig, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let gso = Arc::new(AtomicBool::new(true));
        let tally = Arc::new(Tally::default());
        let mut threads = Vec::new();
        let mut backends = Vec::new();
        let flight: Arc<Vec<Vec<u8>>> =
            Arc::new((0..args.flight).map(|i| vec![i as u8; args.size]).collect());
        for _ in 0..2 {
            let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("backend: {e}"))?;
            socket
                .set_read_timeout(Some(POLL))
                .map_err(|e| e.to_string())?;
            backends.push(socket.local_addr().map_err(|e| e.to_string())?);
            let (stop, gso, tally, flight) =
                (stop.clone(), gso.clone(), tally.clone(), flight.clone());
            threads.push(std::thread::spawn(move || {
                serve_backend(&socket, &flight, &gso, &stop, &tally)
            }));
        }
        let clients: Vec<UdpSocket> = (0..args.sockets)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0")?;
                s.connect(proxy)?;
                s.set_nonblocking(true)?;
                socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20)?;
                if args.client_gro {
                    setsockopt(&s, sockopt::UdpGroSegment, &true)?;
                }
                Ok(s)
            })
            .collect::<std::io::Result<_>>()
            .map_err(|e: std::io::Error| format!("client sockets: {e}"))?;
        let clients = Arc::new(clients);
        let (reader_clients, reader_stop, reader_tally) =
            (clients.clone(), stop.clone(), tally.clone());
        let gro = args.client_gro;
        threads.push(std::thread::spawn(move || {
            read_replies(&reader_clients, gro, &reader_stop, &reader_tally)
        }));
        Ok(Rig {
            backends,
            clients,
            gso,
            stop,
            tally,
            threads,
        })
    }

    /// Sends requests for `duration` at `rate` reply datagrams/s, then waits for the flights'
    /// stragglers: the counts of the load, and how long it sent.
    fn load(&self, args: &Args, rate: u64, duration: Duration) -> (Counts, Duration) {
        let before = self.tally.read();
        let mut pacer = Pacer::new((rate / args.flight as u64).max(1));
        let start = Instant::now();
        let mut cid = 0u64;
        let body = vec![0u8; args.request_size.saturating_sub(9)];
        loop {
            let elapsed = start.elapsed();
            if elapsed >= duration {
                break;
            }
            let n = match pacer.step(elapsed) {
                Step::Send(n) => n,
                Step::Wait(d) => {
                    std::thread::sleep(d.min(duration - elapsed));
                    continue;
                }
            };
            for _ in 0..n {
                cid = cid % args.cids + 1;
                let request = quic_short(&cid.to_be_bytes(), &body);
                let socket = &self.clients[(cid % self.clients.len() as u64) as usize];
                if socket.send(&request).is_ok() {
                    self.tally.requests_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let sending = start.elapsed();
        // Stragglers: until every flight sent has arrived or nothing came for a while.
        let drain_start = Instant::now();
        let mut last = self.tally.read();
        let mut last_change = drain_start;
        loop {
            std::thread::sleep(Duration::from_millis(5));
            let now = self.tally.read();
            let load = now.since(&before);
            if load.replies_in >= load.replies_sent && load.requests_in >= load.requests_sent {
                break;
            }
            if now.replies_in != last.replies_in || now.requests_in != last.requests_in {
                last_change = Instant::now();
            }
            last = now;
            if last_change.elapsed() >= DRAIN_QUIET || drain_start.elapsed() >= DRAIN_MAX {
                break;
            }
        }
        (self.tally.read().since(&before), sending)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A backend: each request answered with a flight to its sender, in one UDP_SEGMENT message
/// or one sendmmsg (blocking: a full send buffer waits, it does not drop).
fn serve_backend(
    socket: &UdpSocket,
    flight: &[Vec<u8>],
    gso: &AtomicBool,
    stop: &AtomicBool,
    tally: &Tally,
) {
    let slices: Vec<&[u8]> = flight.iter().map(Vec::as_slice).collect();
    let iovs: Vec<[IoSlice<'_>; 1]> = flight.iter().map(|d| [IoSlice::new(d)]).collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(flight.len(), None);
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Ok((_, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        tally.requests_in.fetch_add(1, Ordering::Relaxed);
        let sent = if gso.load(Ordering::Relaxed) {
            send_segmented(socket, from, &slices).map_or(0, |_| flight.len())
        } else {
            let to = vec![Some(SockaddrStorage::from(from)); flight.len()];
            sendmmsg(
                socket.as_raw_fd(),
                &mut headers,
                &iovs,
                &to,
                [],
                MsgFlags::empty(),
            )
            .map_or(0, |r| r.count())
        };
        tally.replies_sent.fetch_add(sent as u64, Ordering::Relaxed);
        tally
            .reply_send_errors
            .fetch_add((flight.len() - sent) as u64, Ordering::Relaxed);
    }
}

/// The clients' reader: every reply datagram on every client socket, counted (with `gro`,
/// each buffer as the datagrams it holds).
fn read_replies(clients: &[UdpSocket], gro: bool, stop: &AtomicBool, tally: &Tally) {
    let mut batch = Batch::new(64, 2048);
    let mut buf = vec![0u8; 65536];
    let timeout = PollTimeout::try_from(POLL).unwrap_or(PollTimeout::NONE);
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<PollFd<'_>> = clients
            .iter()
            .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN))
            .collect();
        if poll(&mut fds, timeout).unwrap_or(0) <= 0 {
            continue;
        }
        let ready: Vec<usize> = fds
            .iter()
            .enumerate()
            .filter(|(_, f)| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
            .map(|(i, _)| i)
            .collect();
        drop(fds);
        for i in ready {
            if gro {
                while let Some(n) = recv_gro(&clients[i], &mut buf) {
                    tally.replies_in.fetch_add(n, Ordering::Relaxed);
                }
                continue;
            }
            while let Ok(n) = batch.recv(clients[i].as_fd()) {
                if n == 0 {
                    break;
                }
                tally.replies_in.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Reads one buffer from `socket` (UDP_GRO on): how many datagrams it holds; `None` when
/// nothing waits.
fn recv_gro(socket: &UdpSocket, buf: &mut [u8]) -> Option<u64> {
    let mut cmsg = nix::cmsg_space!(i32);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    let len = msg.bytes;
    let stride = msg.cmsgs().ok().and_then(|mut c| {
        c.find_map(|m| match m {
            ControlMessageOwned::UdpGroSegments(s) => usize::try_from(s).ok(),
            _ => None,
        })
    });
    Some(match stride {
        Some(s) if s > 0 && s < len => len.div_ceil(s) as u64,
        _ => 1,
    })
}

/// One measured load.
struct Measurement {
    proxy: Kind,
    send: SendMode,
    rate: u64,
    counts: Counts,
    /// How long the load sent, and how long it took with its drain.
    sending: Duration,
    wall: Duration,
    cpu: CpuUse,
    attempts: u32,
}

impl Measurement {
    fn cpu_us_per_reply(&self) -> Option<f64> {
        (self.counts.replies_in > 0)
            .then(|| self.cpu.tree.as_secs_f64() * 1e6 / self.counts.replies_in as f64)
    }

    fn share(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    fn replies_lost(&self) -> u64 {
        self.counts
            .replies_sent
            .saturating_sub(self.counts.replies_in)
    }

    fn reply_loss(&self) -> f64 {
        self.replies_lost() as f64 / self.counts.replies_sent.max(1) as f64
    }

    fn requests_lost(&self) -> u64 {
        self.counts
            .requests_sent
            .saturating_sub(self.counts.requests_in)
    }

    /// Reply datagrams received per second of sending.
    fn achieved(&self) -> f64 {
        self.counts.replies_in as f64 / self.sending.as_secs_f64().max(1e-9)
    }

    fn ratio_to_nginx(&self, all: &[Measurement]) -> Option<f64> {
        let nginx = all
            .iter()
            .find(|m| m.proxy == Kind::Nginx && m.send == self.send && m.rate == self.rate)?
            .cpu_us_per_reply()?;
        Some(self.cpu_us_per_reply()? / nginx)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // A flight must fit one UDP_SEGMENT message: 64 datagrams, one IP packet's bytes.
    if !(1..=64).contains(&args.flight)
        || args.size == 0
        || args.size > 1472
        || args.flight * args.size > 65_000
        || args.cids == 0
        || args.sockets == 0
    {
        eprintln!(
            "burst-bench: --flight 1..=64, --size 1..=1472 (a flight at most 65000 bytes), --cids and --sockets at least 1"
        );
        return ExitCode::FAILURE;
    }
    let _lock = match args.common.lock() {
        Ok(lock) => lock,
        Err(e) => {
            eprintln!("burst-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| args.only.is_empty() || args.only.contains(k))
        .filter(|k| !args.skip.contains(k))
        .collect();
    let modes = if args.send.is_empty() {
        vec![SendMode::Gso, SendMode::Mmsg]
    } else {
        args.send.clone()
    };
    let bin_dir = match args.common.bin_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("burst-bench: cannot find the binaries: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut all = Vec::new();
    let mut failed = Vec::new();
    for kind in kinds {
        let binary = match kind {
            Kind::Nginx => args.nginx.clone(),
            Kind::Udpshard | Kind::UdpshardNoOffload => bin_dir.join("udpshard"),
        };
        if !binary.is_file() {
            eprintln!(
                "burst-bench: skipping {}: {} is missing",
                kind.name(),
                binary.display()
            );
            continue;
        }
        match bench_proxy(&args, kind, &binary, &modes) {
            Ok(ms) => all.extend(ms),
            Err(e) => {
                eprintln!("burst-bench: {} failed: {e}", kind.name());
                failed.push((kind, e));
            }
        }
    }
    args.common.report(
        || to_json(&args, &all).to_string(),
        || table(&args, &all),
        !failed.is_empty(),
    )
}

fn bench_proxy(
    args: &Args,
    kind: Kind,
    binary: &Path,
    modes: &[SendMode],
) -> Result<Vec<Measurement>, String> {
    let workdir = std::env::temp_dir().join(format!("burst-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;
    let listen = free_udp_addr().map_err(|e| format!("cannot find a free port: {e}"))?;
    let rig = Rig::start(args, listen)?;
    let mut command = Command::new(binary);
    match kind {
        Kind::Nginx => {
            command = nginx_command(binary, listen, &rig.backends, &workdir)?;
        }
        Kind::Udpshard | Kind::UdpshardNoOffload => {
            let offload = if kind == Kind::Udpshard {
                "auto"
            } else {
                "off"
            };
            let config = workdir.join("udpshard.toml");
            let top = format!("upstream_send = \"socket\"\noffload = \"{offload}\"");
            std::fs::write(
                &config,
                udpshard_toml(listen, &rig.backends, &workdir, &top),
            )
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            command.arg("run").arg("--config").arg(config);
        }
    }
    let bound = (kind == Kind::Nginx).then_some(listen);
    let mut process = ProxyProcess::launch(
        "burst-bench",
        kind.name(),
        command,
        bound,
        args.common.ready_timeout,
    )?;
    if !args.warmup.is_zero() {
        let (c, _) = rig.load(args, args.rate[0], args.warmup);
        eprintln!(
            "burst-bench: {}: warm-up: {} requests, {} of {} reply datagrams back",
            kind.name(),
            c.requests_sent,
            c.replies_in,
            c.replies_sent
        );
        process.check_alive()?;
    }
    let mut results = Vec::new();
    for &send in modes {
        rig.gso.store(send == SendMode::Gso, Ordering::Relaxed);
        for &rate in &args.rate {
            let mut attempts = 0;
            let m = loop {
                attempts += 1;
                std::thread::sleep(SETTLE);
                let cpu_before = CpuSnapshot::take().map_err(|e| format!("/proc: {e}"))?;
                let started = Instant::now();
                let (counts, sending) = rig.load(args, rate, args.duration);
                let wall = started.elapsed();
                let cpu = CpuSnapshot::take()
                    .map_err(|e| format!("/proc: {e}"))?
                    .since(&cpu_before, process.pid(), std::process::id());
                process.check_alive()?;
                let m = Measurement {
                    proxy: kind,
                    send,
                    rate,
                    counts,
                    sending,
                    wall,
                    cpu,
                    attempts,
                };
                report_progress(&m);
                let noise = m.share(m.cpu.other_processes + m.cpu.steal);
                if noise <= NOISY || attempts > args.retries {
                    break m;
                }
                eprintln!(
                    "burst-bench: other programs and steal took {:.0}% of a CPU: measuring again",
                    noise * 100.0
                );
            };
            results.push(m);
        }
    }
    let status = process.stop();
    eprintln!("burst-bench: {}: stopped ({status})", kind.name());
    drop(rig);
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(results)
}

fn report_progress(m: &Measurement) {
    eprintln!(
        "burst-bench: {} backends {} @ {}/s: requests sent {} (lost {}), reply datagrams sent {} ({} send errors), received {} ({:.0}/s, loss {:.3}%), proxy cpu {:.2}s ({} µs/reply), generator cpu {:.2}s, other processes {:.2}s, steal {:.2}s",
        m.proxy.name(),
        m.send.name(),
        m.rate,
        m.counts.requests_sent,
        m.requests_lost(),
        m.counts.replies_sent,
        m.counts.reply_send_errors,
        m.counts.replies_in,
        m.achieved(),
        m.reply_loss() * 100.0,
        m.cpu.tree.as_secs_f64(),
        m.cpu_us_per_reply().map_or("-".into(), |v| format!("{v:.3}")),
        m.cpu.own.as_secs_f64(),
        m.cpu.other_processes.as_secs_f64(),
        m.cpu.steal.as_secs_f64(),
    );
}

fn table(args: &Args, all: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flights of {} x {} bytes per request, {} CIDs over {} client sockets ({}), {:?} per load; cpus {:?}, shared by the proxy, the clients and the backends",
        args.flight,
        args.size,
        args.cids,
        args.sockets,
        if args.client_gro {
            "reading with GRO"
        } else {
            "reading datagram by datagram"
        },
        args.duration,
        allowed_cpus()
    );
    let header = [
        "proxy",
        "backend send",
        "replies/s offered",
        "achieved",
        "reply loss %",
        "requests lost",
        "cpu µs/reply",
        "x nginx",
        "proxy cpu %",
        "other+steal %",
        "tries",
    ];
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|m| {
            vec![
                m.proxy.name().to_string(),
                m.send.name().to_string(),
                m.rate.to_string(),
                format!("{:.0}", m.achieved()),
                format!("{:.3}", m.reply_loss() * 100.0),
                m.requests_lost().to_string(),
                m.cpu_us_per_reply()
                    .map_or("-".into(), |v| format!("{v:.2}")),
                m.ratio_to_nginx(all)
                    .map_or("-".into(), |v| format!("{v:.2}")),
                format!("{:.0}", m.share(m.cpu.tree) * 100.0),
                format!(
                    "{:.0}",
                    m.share(m.cpu.other_processes + m.cpu.steal) * 100.0
                ),
                m.attempts.to_string(),
            ]
        })
        .collect();
    let mut table = vec![header.map(String::from).to_vec()];
    table.extend(rows.iter().map(|r| r.to_vec()));
    out.push_str(&udpshard_tests::load::table::render(&table));
    out
}

fn to_json(args: &Args, all: &[Measurement]) -> serde_json::Value {
    json!({
        "flight": args.flight,
        "size": args.size,
        "cids": args.cids,
        "sockets": args.sockets,
        "client_gro": args.client_gro,
        "duration_s": args.duration.as_secs_f64(),
        "cpus": allowed_cpus(),
        "results": all.iter().map(|m| json!({
            "proxy": m.proxy.name(),
            "backend_send": m.send.name(),
            "offered_replies_per_s": m.rate,
            "achieved_replies_per_s": m.achieved(),
            "requests_sent": m.counts.requests_sent,
            "requests_lost": m.requests_lost(),
            "replies_sent": m.counts.replies_sent,
            "reply_send_errors": m.counts.reply_send_errors,
            "replies_received": m.counts.replies_in,
            "reply_loss": m.reply_loss(),
            "proxy_cpu_s": m.cpu.tree.as_secs_f64(),
            "cpu_us_per_reply": m.cpu_us_per_reply(),
            "ratio_to_nginx": m.ratio_to_nginx(all),
            "generator_cpu_s": m.cpu.own.as_secs_f64(),
            "other_processes_cpu_s": m.cpu.other_processes.as_secs_f64(),
            "steal_cpu_s": m.cpu.steal.as_secs_f64(),
            "attempts": m.attempts,
        })).collect::<Vec<_>>(),
    })
}
