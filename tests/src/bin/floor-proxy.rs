//! `floor-proxy`: the socket floor. A SO_REUSEPORT group of N sockets on the listen address,
//! one pinned thread per socket, `recvmmsg` a batch then `sendmmsg` it to the backend over a
//! connected socket. No parsing, no sessions, no return path: what forwarding costs when a
//! proxy does nothing but move datagrams, the lower bound udpshard is compared with.
//!
//! With `--spread N` each thread instead sends every datagram from one of N sockets of its
//! own, bound to distinct ports of `--spread-ports` and chosen by the datagram's connection
//! ID: the kernel's cost of one upstream port per session, still with no logic (the floor of
//! udpshard's design, which `scale-bench` reports beside the plain floor).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use clap::Parser;
use udpshard_tests::load::baseline::{
    allowed_cpus, backend_for, bind_listener, connect_upstream, pin_current_thread,
    stop_on_signals, DEFAULT_RECV_BUFFER,
};
use udpshard_tests::load::mmsg::Batch;
use udpshard_tests::load::units::{parse_port_range, parse_size};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Reuseport + recvmmsg/sendmmsg UDP forwarder (benchmark floor)"
)]
struct Args {
    /// Address to receive client datagrams on (one SO_REUSEPORT socket per thread).
    #[arg(long)]
    listen: SocketAddr,
    /// Where every datagram goes. With `--spread`, repeat it: each connection ID goes to one
    /// of them, as a proxy's backend choice would.
    #[arg(long, required = true)]
    backend: Vec<SocketAddr>,
    /// Sockets and threads; default: the CPUs in sched_getaffinity, one thread pinned to each.
    #[arg(long)]
    threads: Option<usize>,
    /// SO_RCVBUF to ask for on each listening socket (clamped by net.core.rmem_max).
    #[arg(long, default_value = DEFAULT_RECV_BUFFER, value_parser = parse_size)]
    recv_buffer: usize,
    /// Datagrams per recvmmsg/sendmmsg.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: u16,
    /// Sockets per thread to spread sends over, one datagram per send (0: one connected socket).
    #[arg(long, default_value_t = 0)]
    spread: usize,
    /// Ports the spread sockets bind on the loopback address, LO-HI.
    #[arg(long, default_value = "1025-32767", value_parser = parse_port_range)]
    spread_ports: (u16, u16),
}

/// Binds up to `count` sockets on distinct free ports of `ports`, after `*next`.
fn spread_sockets(
    count: usize,
    ports: (u16, u16),
    next: &mut u32,
) -> std::io::Result<Vec<UdpSocket>> {
    let mut sockets = Vec::with_capacity(count);
    while sockets.len() < count && *next <= u32::from(ports.1) {
        let port = *next as u16;
        *next += 1;
        match UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], port))) {
            Ok(s) => sockets.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    if sockets.len() < count {
        return Err(std::io::Error::other(format!(
            "--spread {count}: only {} free ports in {}-{}",
            sockets.len(),
            ports.0,
            ports.1
        )));
    }
    Ok(sockets)
}

/// Bytes per datagram slot: datagrams beyond this are truncated (the benchmark sends 33).
const SLOT: usize = 2048;

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    /// recvmmsg calls that returned datagrams: forwarded / batches is the mean batch.
    batches: AtomicU64,
    send_errors: AtomicU64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> std::io::Result<()> {
    let stop = stop_on_signals()?;
    if args.spread > 0 {
        // Each thread holds `spread` sockets: take every descriptor the hard limit allows.
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    let cpus = allowed_cpus();
    let threads = args.threads.unwrap_or(cpus.len()).max(1);
    // Bind the whole group before any thread starts, so `ready:` means every socket serves.
    let mut sockets = Vec::with_capacity(threads);
    let mut listen = args.listen;
    let mut next_port = u32::from(args.spread_ports.0);
    for _ in 0..threads {
        let listener = bind_listener(listen, args.recv_buffer, true)?;
        // With port 0 the first socket picks the port; the others join its group.
        listen = listener.local_addr()?;
        let upstream = connect_upstream(args.backend[0])?;
        let spread = spread_sockets(args.spread, args.spread_ports, &mut next_port)?;
        sockets.push((listener, upstream, spread));
    }
    let counters = Arc::new(Counters::default());
    let mut handles = Vec::with_capacity(threads);
    for (index, (listener, upstream, spread)) in sockets.into_iter().enumerate() {
        let cpu = (!cpus.is_empty()).then(|| cpus[index % cpus.len()]);
        let (stop, counters) = (Arc::clone(&stop), Arc::clone(&counters));
        let batch = usize::from(args.batch);
        let backends = args.backend.clone();
        let handle = std::thread::Builder::new()
            .name(format!("floor-{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = pin_current_thread(cpu) {
                        eprintln!("floor-proxy: thread {index}: cannot pin to cpu {cpu}: {e}");
                    }
                }
                let upstream = Upstream {
                    connected: &upstream,
                    spread: &spread,
                    backends: &backends,
                };
                forward(&listener, &upstream, batch, &stop, &counters);
            })?;
        handles.push(handle);
    }
    eprintln!(
        "floor-proxy: ready: listening on {} with {threads} socket(s) on cpus {cpus:?}, backend {:?}",
        listen, args.backend
    );
    for handle in handles {
        let _ = handle.join();
    }
    let forwarded = counters.forwarded.load(Ordering::Relaxed);
    let batches = counters.batches.load(Ordering::Relaxed);
    eprintln!(
        "floor-proxy: stopped: forwarded {forwarded} in {batches} batches ({:.1} per batch), send errors {}",
        forwarded as f64 / batches.max(1) as f64,
        counters.send_errors.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Where a thread's datagrams leave from.
struct Upstream<'a> {
    connected: &'a UdpSocket,
    /// When not empty: send each datagram from one of these, by connection ID.
    spread: &'a [UdpSocket],
    backends: &'a [SocketAddr],
}

impl Upstream<'_> {
    /// Sends the batch; returns how many went and the first error.
    fn send(&self, batch: &mut Batch, n: usize) -> (usize, Option<std::io::Error>) {
        if self.spread.is_empty() {
            return batch.send_connected(self.connected.as_fd());
        }
        let (mut sent, mut error) = (0, None);
        for i in 0..n {
            let datagram = batch.datagram(i);
            // One hash picks the backend and the port, as a proxy holding one session per
            // connection ID on ports shared by all backends would.
            let hash = backend_for(datagram, usize::MAX);
            let backend = self.backends[hash % self.backends.len()];
            let socket = &self.spread[(hash / self.backends.len()) % self.spread.len()];
            match socket.send_to(datagram, backend) {
                Ok(_) => sent += 1,
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        (sent, error)
    }
}

fn forward(
    listener: &UdpSocket,
    upstream: &Upstream<'_>,
    batch: usize,
    stop: &AtomicBool,
    counters: &Counters,
) {
    let mut batch = Batch::new(batch, SLOT);
    while !stop.load(Ordering::Relaxed) {
        // Timeouts (SO_RCVTIMEO) and signals come back as errors; both mean "look at the flag".
        let Ok(n) = batch.recv(listener.as_fd()) else {
            continue;
        };
        if n == 0 {
            continue;
        }
        let (sent, error) = upstream.send(&mut batch, n);
        counters.forwarded.fetch_add(sent as u64, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        if error.is_some() {
            counters
                .send_errors
                .fetch_add((n - sent) as u64, Ordering::Relaxed);
        }
    }
}
