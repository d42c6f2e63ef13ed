//! `floor-proxy`: the socket floor. A SO_REUSEPORT group of N sockets on the listen address,
//! one pinned thread per socket, `recvmmsg` a batch then `sendmmsg` it to the backend over a
//! connected socket. No parsing, no sessions, no return path: what forwarding costs when a
//! proxy does nothing but move datagrams, the lower bound udpshard is compared with.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use clap::Parser;
use udpshard_tests::load::baseline::{
    allowed_cpus, bind_listener, connect_upstream, pin_current_thread, stop_on_signals,
    DEFAULT_RECV_BUFFER,
};
use udpshard_tests::load::mmsg::Batch;
use udpshard_tests::load::units::parse_size;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Reuseport + recvmmsg/sendmmsg UDP forwarder (benchmark floor)"
)]
struct Args {
    /// Address to receive client datagrams on (one SO_REUSEPORT socket per thread).
    #[arg(long)]
    listen: SocketAddr,
    /// Where every datagram goes.
    #[arg(long)]
    backend: SocketAddr,
    /// Sockets and threads; default: the CPUs in sched_getaffinity, one thread pinned to each.
    #[arg(long)]
    threads: Option<usize>,
    /// SO_RCVBUF to ask for on each listening socket (clamped by net.core.rmem_max).
    #[arg(long, default_value = DEFAULT_RECV_BUFFER, value_parser = parse_size)]
    recv_buffer: usize,
    /// Datagrams per recvmmsg/sendmmsg.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: u16,
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
    let cpus = allowed_cpus();
    let threads = args.threads.unwrap_or(cpus.len()).max(1);
    // Bind the whole group before any thread starts, so `ready:` means every socket serves.
    let mut sockets = Vec::with_capacity(threads);
    let mut listen = args.listen;
    for _ in 0..threads {
        let listener = bind_listener(listen, args.recv_buffer, true)?;
        // With port 0 the first socket picks the port; the others join its group.
        listen = listener.local_addr()?;
        let upstream = connect_upstream(args.backend)?;
        sockets.push((listener, upstream));
    }
    let counters = Arc::new(Counters::default());
    let mut handles = Vec::with_capacity(threads);
    for (index, (listener, upstream)) in sockets.into_iter().enumerate() {
        let cpu = (!cpus.is_empty()).then(|| cpus[index % cpus.len()]);
        let (stop, counters) = (Arc::clone(&stop), Arc::clone(&counters));
        let batch = usize::from(args.batch);
        let handle = std::thread::Builder::new()
            .name(format!("floor-{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = pin_current_thread(cpu) {
                        eprintln!("floor-proxy: thread {index}: cannot pin to cpu {cpu}: {e}");
                    }
                }
                forward(&listener, &upstream, batch, &stop, &counters);
            })?;
        handles.push(handle);
    }
    eprintln!(
        "floor-proxy: ready: listening on {} with {threads} socket(s) on cpus {cpus:?}, backend {}",
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

fn forward(
    listener: &UdpSocket,
    upstream: &UdpSocket,
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
        let (sent, error) = batch.send_connected(upstream.as_fd());
        counters.forwarded.fetch_add(sent as u64, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        if error.is_some() {
            counters
                .send_errors
                .fetch_add((n - sent) as u64, Ordering::Relaxed);
        }
    }
}
