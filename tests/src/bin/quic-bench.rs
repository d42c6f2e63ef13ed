//! `quic-bench`: real QUIC downloads through the proxies. A quinn server hands out QUIC-LB
//! connection IDs (so a client that moves to a fresh ID stays routable); quinn clients, each
//! on its own socket, download `--size` bytes on one stream each, `--connections` at once, and
//! half of them move to a new socket (a new address: a migration) halfway through. The same
//! downloads run directly, through nginx and through udpshard, in one run: throughput, the
//! proxy's CPU per GB and per datagram (both ways), and what the QUIC stacks saw lost.
//!
//! quinn sends with GSO and receives with GRO, as deployed QUIC stacks do.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use quinn::{ConnectionId, ConnectionIdGenerator, Endpoint, EndpointConfig, ServerConfig};
use serde_json::json;
use udpshard_shared::stats::{Counter, Snapshot};
use udpshard_shared::DropReason;
use udpshard_tests::load::baseline::allowed_cpus;
use udpshard_tests::load::cli::{Common, Via};
use udpshard_tests::load::procstat::{CpuSnapshot, CpuUse};
use udpshard_tests::load::proxy::{free_udp_addr, nginx_command, ProxyProcess};
use udpshard_tests::load::units::parse_duration;

/// The server's QUIC-LB server ID (config 0, 2 bytes).
const SERVER_ID: [u8; 2] = [0x0a, 0x0a];
/// Bytes the server writes per call.
const CHUNK: usize = 64 * 1024;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "quinn downloads directly, through nginx and through udpshard: throughput and proxy CPU"
)]
struct Args {
    /// Connections downloading at once (each its own client socket).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Bytes each connection downloads (MiB).
    #[arg(long, default_value_t = 8)]
    mib: u64,
    /// How many of the connections move to a new socket halfway through (default: half).
    #[arg(long)]
    migrating: Option<usize>,
    /// Measure only these paths (repeatable).
    #[arg(long, value_enum)]
    only: Vec<Via>,
    /// Leave these paths out (repeatable).
    #[arg(long, value_enum)]
    skip: Vec<Via>,
    /// A download's limit: past it the connection counts as failed.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    #[command(flatten)]
    common: Common,
}

/// QUIC-LB plaintext IDs: config 0, the 2-byte server ID, 5 bytes of nonce.
struct QuicLbCids {
    counter: u64,
}

impl ConnectionIdGenerator for QuicLbCids {
    fn generate_cid(&mut self) -> ConnectionId {
        self.counter += 1;
        let nonce = (self.counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ u64::from(std::process::id()))
        .to_be_bytes();
        let mut cid = [0u8; 8];
        cid[0] = 0x07; // config 0, length bits 7 (length - 1)
        cid[1..3].copy_from_slice(&SERVER_ID);
        cid[3..8].copy_from_slice(&nonce[..5]);
        ConnectionId::new(&cid)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// What the server's side of the finished downloads saw.
#[derive(Clone, Copy, Debug, Default)]
struct ServerTally {
    datagrams_sent: u64,
    lost_packets: u64,
    congestion_events: u64,
}

/// A download server: each bidirectional stream names a length (8 bytes, big endian) and
/// gets that many bytes; once the client has them all, the connection's counts are added up.
fn server(
    certs: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    tally: Arc<Mutex<ServerTally>>,
) -> Result<(Endpoint, SocketAddr), String> {
    let mut endpoint_config = EndpointConfig::default();
    endpoint_config.cid_generator(|| Box::new(QuicLbCids { counter: 0 }));
    let server_config = ServerConfig::with_single_cert(certs.to_vec(), key.clone_key())
        .map_err(|e| e.to_string())?;
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = socket.local_addr().map_err(|e| e.to_string())?;
    let endpoint = Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| e.to_string())?;
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let tally = tally.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let Ok(ask) = recv.read_to_end(8).await else {
                    return;
                };
                let Ok(len) = <[u8; 8]>::try_from(ask.as_slice()).map(u64::from_be_bytes) else {
                    return;
                };
                let chunk = vec![0x5a; CHUNK];
                let mut left = len;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    if send.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = send.finish();
                // Acknowledged, all of it: the counts are final for the download.
                let _ = send.stopped().await;
                let s = conn.stats();
                let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                t.datagrams_sent += s.udp_tx.datagrams;
                t.lost_packets += s.path.lost_packets;
                t.congestion_events += s.path.congestion_events;
            });
        }
    });
    Ok((endpoint, addr))
}

/// What the clients of one pass saw.
#[derive(Debug, Default)]
struct Pass {
    bytes: u64,
    completed: usize,
    failed: Vec<String>,
    datagrams_received: u64,
    datagrams_sent: u64,
    migrated: usize,
}

/// One client: connects to `target`, asks for `len` bytes and reads them, moving to a new
/// socket halfway when `migrate`.
async fn download(
    target: SocketAddr,
    config: quinn::ClientConfig,
    len: u64,
    migrate: bool,
) -> Result<(u64, quinn::ConnectionStats, bool), String> {
    let mut ep = Endpoint::client("127.0.0.1:0".parse().map_err(|e| format!("{e}"))?)
        .map_err(|e| format!("client endpoint: {e}"))?;
    ep.set_default_client_config(config);
    let conn = ep
        .connect(target, "localhost")
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("stream: {e}"))?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| format!("request: {e}"))?;
    send.finish().map_err(|e| format!("request: {e}"))?;
    let mut got = 0u64;
    let mut moved = false;
    while let Some(chunk) = recv
        .read_chunk(usize::MAX, true)
        .await
        .map_err(|e| format!("read after {got} bytes: {e}"))?
    {
        got += chunk.bytes.len() as u64;
        if migrate && !moved && got >= len / 2 {
            let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("rebind: {e}"))?;
            ep.rebind(socket).map_err(|e| format!("rebind: {e}"))?;
            moved = true;
        }
    }
    if got != len {
        return Err(format!("got {got} of {len} bytes"));
    }
    let stats = conn.stats();
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    Ok((got, stats, moved))
}

async fn run_pass(
    args: &Args,
    target: SocketAddr,
    config: &quinn::ClientConfig,
    migrating: usize,
) -> Pass {
    let len = args.mib << 20;
    let tasks: Vec<_> = (0..args.connections)
        .map(|i| {
            let config = config.clone();
            let limit = args.timeout;
            tokio::spawn(async move {
                tokio::time::timeout(limit, download(target, config, len, i < migrating))
                    .await
                    .unwrap_or_else(|_| Err(format!("not done within {limit:?}")))
            })
        })
        .collect();
    let mut pass = Pass::default();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(Ok((bytes, stats, moved))) => {
                pass.bytes += bytes;
                pass.completed += 1;
                pass.datagrams_received += stats.udp_rx.datagrams;
                pass.datagrams_sent += stats.udp_tx.datagrams;
                pass.migrated += usize::from(moved);
            }
            Ok(Err(e)) => pass.failed.push(format!("connection {i}: {e}")),
            Err(e) => pass.failed.push(format!("connection {i}: {e}")),
        }
    }
    pass
}

struct Measurement {
    kind: Via,
    pass: Pass,
    server: ServerTally,
    wall: Duration,
    cpu: CpuUse,
}

impl Measurement {
    fn gbit_per_s(&self) -> f64 {
        self.pass.bytes as f64 * 8.0 / self.wall.as_secs_f64().max(1e-9) / 1e9
    }

    fn proxied(&self) -> bool {
        self.kind != Via::Direct
    }

    fn cpu_s_per_gb(&self) -> Option<f64> {
        (self.proxied() && self.pass.bytes > 0)
            .then(|| self.cpu.tree.as_secs_f64() / (self.pass.bytes as f64 / 1e9))
    }

    /// Proxy CPU per datagram through it, both ways (what the server sent, what the
    /// clients sent).
    fn cpu_us_per_datagram(&self) -> Option<f64> {
        let datagrams = self.server.datagrams_sent + self.pass.datagrams_sent;
        (self.proxied() && datagrams > 0)
            .then(|| self.cpu.tree.as_secs_f64() * 1e6 / datagrams as f64)
    }

    fn of(all: &[Measurement], kind: Via) -> Option<&Measurement> {
        all.iter().find(|m| m.kind == kind)
    }
}

fn cert() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).map_err(|e| e.to_string())?;
    let key = PrivatePkcs8KeyDer::from(c.signing_key.serialize_der());
    Ok((vec![c.cert.der().clone()], key.into()))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(all) => args.common.report(
            || to_json(&args, &all).to_string(),
            || table(&args, &all),
            all.iter().any(|m| !m.pass.failed.is_empty()),
        ),
        Err(e) => {
            eprintln!("quic-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<Vec<Measurement>, String> {
    if args.connections == 0 || args.mib == 0 {
        return Err("--connections and --mib must be at least 1".into());
    }
    let _lock = args.common.lock()?;
    let bin_dir = args
        .common
        .bin_dir()
        .map_err(|e| format!("cannot find the binaries: {e}"))?;
    let migrating = args
        .migrating
        .unwrap_or(args.connections / 2)
        .min(args.connections);
    // The clients and the server share two runtime threads, as a QUIC server and its clients
    // on one host would.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let (certs, key) = cert()?;
    let tally = Arc::new(Mutex::new(ServerTally::default()));
    let (server_ep, server_addr) = {
        let _guard = rt.enter();
        server(&certs, &key, tally.clone())?
    };
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots.add(certs[0].clone()).map_err(|e| e.to_string())?;
    let crypto = quinn::rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client_config = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(crypto).map_err(|e| e.to_string())?,
    ));
    let workdir = std::env::temp_dir().join(format!("quic-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;
    let mut all = Vec::new();
    for kind in Via::ALL {
        if (!args.only.is_empty() && !args.only.contains(&kind)) || args.skip.contains(&kind) {
            continue;
        }
        let (target, mut process) = match kind {
            Via::Direct => (server_addr, None),
            _ => match start_proxy(args, kind, &bin_dir, &workdir, server_addr) {
                Ok((listen, p)) => (listen, Some(p)),
                Err(e) => {
                    eprintln!("quic-bench: skipping {}: {e}", kind.name());
                    continue;
                }
            },
        };
        let before_tally = *tally.lock().unwrap_or_else(|e| e.into_inner());
        let cpu_before = CpuSnapshot::take().map_err(|e| format!("/proc: {e}"))?;
        let started = Instant::now();
        let pass = rt.block_on(run_pass(args, target, &client_config, migrating));
        let wall = started.elapsed();
        let root = process.as_ref().map_or(0, ProxyProcess::pid);
        let cpu = CpuSnapshot::take()
            .map_err(|e| format!("/proc: {e}"))?
            .since(&cpu_before, root, std::process::id());
        // The server adds a download's counts once the client acknowledged it all.
        std::thread::sleep(Duration::from_millis(200));
        let after = *tally.lock().unwrap_or_else(|e| e.into_inner());
        let server = ServerTally {
            datagrams_sent: after.datagrams_sent - before_tally.datagrams_sent,
            lost_packets: after.lost_packets - before_tally.lost_packets,
            congestion_events: after.congestion_events - before_tally.congestion_events,
        };
        if kind == Via::Udpshard {
            report_udpshard(&workdir.join("stats"));
        }
        if let Some(p) = process.as_mut() {
            let status = p.stop();
            eprintln!("quic-bench: {}: stopped ({status})", kind.name());
        }
        let m = Measurement {
            kind,
            pass,
            server,
            wall,
            cpu,
        };
        eprintln!(
            "quic-bench: {}: {} of {} downloads done ({} moved), {:.0} MB in {:.2}s ({:.2} Gbit/s), server sent {} datagrams ({} lost, {} congestion events), proxy cpu {:.2}s, other processes {:.2}s, steal {:.2}s",
            kind.name(),
            m.pass.completed,
            args.connections,
            m.pass.migrated,
            m.pass.bytes as f64 / 1e6,
            wall.as_secs_f64(),
            m.gbit_per_s(),
            m.server.datagrams_sent,
            m.server.lost_packets,
            m.server.congestion_events,
            m.cpu.tree.as_secs_f64(),
            m.cpu.other_processes.as_secs_f64(),
            m.cpu.steal.as_secs_f64(),
        );
        for f in m.pass.failed.iter().take(5) {
            eprintln!("quic-bench: {}: {f}", kind.name());
        }
        all.push(m);
    }
    server_ep.close(0u32.into(), b"done");
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(all)
}

/// What udpshard counted: its drops by reason, and its offloads at work.
fn report_udpshard(stats: &Path) {
    let Ok(snap) = Snapshot::read(stats) else {
        return;
    };
    let drops: Vec<String> = DropReason::ALL
        .iter()
        .map(|r| (r.name(), snap.total(r.counter())))
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    eprintln!(
        "quic-bench: udpshard counted: rx {} tx {} replies in {} out {}, gro buffers {}, gso messages {} ({} datagrams), drops: {}",
        snap.total(Counter::RxPackets),
        snap.total(Counter::TxPackets),
        snap.total(Counter::RepliesIn),
        snap.total(Counter::RepliesOut),
        snap.total(Counter::RxGroBuffers),
        snap.total(Counter::TxGsoMessages),
        snap.total(Counter::TxGsoDatagrams),
        if drops.is_empty() { "none".into() } else { drops.join(", ") }
    );
}

/// Starts nginx or udpshard in front of the server: where it listens, and its process.
fn start_proxy(
    args: &Args,
    kind: Via,
    bin_dir: &Path,
    workdir: &Path,
    server: SocketAddr,
) -> Result<(SocketAddr, ProxyProcess), String> {
    let listen = free_udp_addr().map_err(|e| format!("cannot find a free port: {e}"))?;
    let mut command;
    match kind {
        Via::Nginx => {
            if !args.nginx.is_file() {
                return Err(format!("{} is missing", args.nginx.display()));
            }
            command = nginx_command(&args.nginx, listen, &[server], workdir)?;
        }
        _ => {
            let binary = bin_dir.join("udpshard");
            if !binary.is_file() {
                return Err(format!("{} is missing", binary.display()));
            }
            let config = workdir.join("udpshard.toml");
            std::fs::write(&config, udpshard_toml(listen, server, workdir))
                .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            command = Command::new(binary);
            command.arg("run").arg("--config").arg(config);
        }
    }
    let bound = (kind == Via::Nginx).then_some(listen);
    let process = ProxyProcess::launch(
        "quic-bench",
        kind.name(),
        command,
        bound,
        args.common.ready_timeout,
    )?;
    Ok((listen, process))
}

/// udpshard in front of one quinn server: QUIC-LB routing (a client that moves to a fresh
/// connection ID is routed by it), forwards on their sockets whoever runs the bench (raw
/// sends need CAP_NET_RAW).
fn udpshard_toml(listen: SocketAddr, server: SocketAddr, workdir: &Path) -> String {
    format!(
        r#"workers = "auto"
stats_file = "{stats}"
drain_timeout = "0s"
upstream_send = "socket"

[[listener]]
name = "bench"
bind = "{listen}"
dissector = "quic"
short_cid_len = 8
recv_buffer = "4MiB"
backends = [{{ addr = "{server}", server_id = "0a0a" }}]

[listener.quic_lb]
config_id = 0
server_id_len = 2
"#,
        stats = workdir.join("stats").display(),
    )
}

fn table(args: &Args, all: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} quinn connections x {} MiB, {} moving to a new socket halfway; cpus {:?}, shared by the proxy, the server and the clients",
        args.connections,
        args.mib,
        args.migrating.unwrap_or(args.connections / 2).min(args.connections),
        allowed_cpus()
    );
    let direct = Measurement::of(all, Via::Direct).map(Measurement::gbit_per_s);
    let nginx_gb = Measurement::of(all, Via::Nginx).and_then(Measurement::cpu_s_per_gb);
    let header = [
        "path",
        "done",
        "Gbit/s",
        "x direct",
        "server lost pkts",
        "proxy cpu s/GB",
        "x nginx",
        "cpu µs/datagram",
        "other+steal %",
    ];
    let rows: Vec<[String; 9]> = all
        .iter()
        .map(|m| {
            let share = (m.cpu.other_processes + m.cpu.steal).as_secs_f64()
                / m.wall.as_secs_f64().max(1e-9);
            [
                m.kind.name().to_string(),
                format!("{}/{}", m.pass.completed, args.connections),
                format!("{:.2}", m.gbit_per_s()),
                direct.map_or("-".into(), |d| format!("{:.2}", m.gbit_per_s() / d)),
                m.server.lost_packets.to_string(),
                m.cpu_s_per_gb().map_or("-".into(), |v| format!("{v:.2}")),
                m.cpu_s_per_gb()
                    .zip(nginx_gb)
                    .map_or("-".into(), |(v, n)| format!("{:.2}", v / n)),
                m.cpu_us_per_datagram()
                    .map_or("-".into(), |v| format!("{v:.2}")),
                format!("{:.0}", share * 100.0),
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
        "connections": args.connections,
        "mib": args.mib,
        "cpus": allowed_cpus(),
        "results": all.iter().map(|m| json!({
            "path": m.kind.name(),
            "completed": m.pass.completed,
            "failed": m.pass.failed,
            "migrated": m.pass.migrated,
            "bytes": m.pass.bytes,
            "wall_s": m.wall.as_secs_f64(),
            "gbit_per_s": m.gbit_per_s(),
            "server_datagrams_sent": m.server.datagrams_sent,
            "server_lost_packets": m.server.lost_packets,
            "server_congestion_events": m.server.congestion_events,
            "client_datagrams_sent": m.pass.datagrams_sent,
            "client_datagrams_received": m.pass.datagrams_received,
            "proxy_cpu_s": m.cpu.tree.as_secs_f64(),
            "proxy_cpu_s_per_gb": m.cpu_s_per_gb(),
            "proxy_cpu_us_per_datagram": m.cpu_us_per_datagram(),
            "other_processes_cpu_s": m.cpu.other_processes.as_secs_f64(),
            "steal_cpu_s": m.cpu.steal.as_secs_f64(),
        })).collect::<Vec<_>>(),
    })
}
