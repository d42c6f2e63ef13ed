//! The sink: the backends' side of a load test. Binds UDP addresses, receives with `recvmmsg`
//! on one thread that polls them all until stopped, and counts what arrived where and how late.
//!
//! One thread, not one per address: over loopback the sender pays for waking the receiver
//! (delivery runs in its softirq), so eight sleeping threads would charge a proxy with eight
//! backends for up to eight wake-ups per batch where a one-backend floor pays one. A single
//! poller sleeps once for all of them, and needs no lock between threads.
//!
//! Duplicates are recognised by sequence number, which is unique per process (the generators
//! of one process share one counter): a sink fed by two generator processes at once would see
//! their numbers collide.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

use super::datagram::Datagram;
use super::histogram::Histogram;
use super::mmsg::Batch;
use super::monotonic_ns;
use super::seqset::SeqSet;

/// Receive buffer asked for (the kernel clamps SO_RCVBUF to `net.core.rmem_max`; with
/// CAP_NET_ADMIN the sink forces it): the sink is not under test and should not drop.
const RECV_BUFFER: usize = 8 << 20;
/// How often the receiving thread looks at the stop flag when no traffic arrives.
const POLL_MS: u16 = 50;
/// Batches read from one socket before the others get their turn.
const TURN: usize = 4;
const BATCH: usize = 64;
const SLOT: usize = 2048;

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("cannot bind sink socket on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start the sink's receiving thread: {0}")]
    Spawn(io::Error),
    #[error("a sink needs at least one address")]
    NoAddress,
}

/// What a sink has counted since it was bound.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Datagrams that parsed, over all addresses, each sequence number counted once.
    pub received: u64,
    /// Like `received`, per address, in the order of [`Sink::addrs`].
    pub per_addr: Vec<u64>,
    /// Datagrams whose sequence number had arrived before (at any address): delivered twice.
    pub duplicates: u64,
    /// Datagrams that did not parse as generated datagrams.
    pub malformed: u64,
    /// `recvmmsg` failures other than timeouts and interruptions.
    pub recv_errors: u64,
    /// One-way latency (receive time minus the datagram's timestamp), nanoseconds.
    pub latency: Histogram,
}

impl SinkStats {
    /// What was counted after the snapshot `earlier` was taken.
    pub fn since(&self, earlier: &SinkStats) -> SinkStats {
        SinkStats {
            received: self.received.saturating_sub(earlier.received),
            per_addr: self
                .per_addr
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(earlier.per_addr.get(i).copied().unwrap_or(0)))
                .collect(),
            duplicates: self.duplicates.saturating_sub(earlier.duplicates),
            malformed: self.malformed.saturating_sub(earlier.malformed),
            recv_errors: self.recv_errors.saturating_sub(earlier.recv_errors),
            latency: self.latency.since(&earlier.latency),
        }
    }
}

struct Shared {
    stop: AtomicBool,
    /// Send every datagram back to where it came from (the bidirectional bench).
    echo: bool,
    /// Datagrams sent back (echo sinks).
    echoed: AtomicU64,
    /// Every datagram that arrived, parsed or not: cheap to poll while draining.
    arrivals: AtomicU64,
    counted: Mutex<Counted>,
}

struct Counted {
    stats: SinkStats,
    /// Sequence numbers seen, over all addresses.
    seen: SeqSet,
}

impl Shared {
    fn counted(&self) -> MutexGuard<'_, Counted> {
        // A receiving thread cannot panic while holding the lock (no indexing out of range,
        // no unwrap); a poisoned lock still holds consistent counters.
        self.counted.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub struct Sink {
    addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Sink {
    /// Binds every address (port 0 picks a free port; see [`Sink::addrs`] for the result) and
    /// starts receiving.
    pub fn bind(addrs: &[SocketAddr]) -> Result<Sink, SinkError> {
        Sink::bind_with(addrs, false)
    }

    /// As [`Sink::bind`], sending every datagram back to its sender as it counts it.
    pub fn bind_echo(addrs: &[SocketAddr]) -> Result<Sink, SinkError> {
        Sink::bind_with(addrs, true)
    }

    fn bind_with(addrs: &[SocketAddr], echo: bool) -> Result<Sink, SinkError> {
        if addrs.is_empty() {
            return Err(SinkError::NoAddress);
        }
        let sockets = addrs
            .iter()
            .map(|&addr| bind_one(addr).map_err(|source| SinkError::Bind { addr, source }))
            .collect::<Result<Vec<_>, _>>()?;
        let bound = sockets
            .iter()
            .zip(addrs)
            .map(|(s, &addr)| {
                s.local_addr()
                    .map_err(|source| SinkError::Bind { addr, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            echo,
            echoed: AtomicU64::new(0),
            arrivals: AtomicU64::new(0),
            counted: Mutex::new(Counted {
                stats: SinkStats {
                    per_addr: vec![0; sockets.len()],
                    ..SinkStats::default()
                },
                seen: SeqSet::new(),
            }),
        });
        let mut sink = Sink {
            addrs: bound,
            shared,
            threads: Vec::new(),
        };
        let shared = Arc::clone(&sink.shared);
        let thread = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || receive(&sockets, &shared))
            .map_err(SinkError::Spawn)?;
        sink.threads.push(thread);
        Ok(sink)
    }

    /// Binds `count` addresses on 127.0.0.1 with free ports.
    pub fn bind_loopback(count: usize) -> Result<Sink, SinkError> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Sink::bind(&vec![any; count])
    }

    /// As [`Sink::bind_loopback`], echoing.
    pub fn bind_loopback_echo(count: usize) -> Result<Sink, SinkError> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Sink::bind_echo(&vec![any; count])
    }

    /// Datagrams sent back so far (echo sinks; 0 otherwise).
    pub fn echoed(&self) -> u64 {
        self.shared.echoed.load(Ordering::Relaxed)
    }

    /// The bound addresses, in the order given to [`Sink::bind`].
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SinkStats {
        self.shared.counted().stats.clone()
    }

    /// Datagrams that arrived so far, parsed or not (cheaper than [`Sink::stats`]).
    pub fn arrivals(&self) -> u64 {
        self.shared.arrivals.load(Ordering::Relaxed)
    }

    /// Stops receiving and returns the final counters.
    pub fn stop(mut self) -> SinkStats {
        self.join();
        self.stats()
    }

    fn join(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            // The receiving loop does not panic; if it did, the counters are still readable.
            let _ = thread.join();
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.join();
    }
}

fn bind_one(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::RcvBufForce,
        &RECV_BUFFER,
    )
    .is_err()
    {
        socket.set_recv_buffer_size(RECV_BUFFER)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn receive(sockets: &[UdpSocket], shared: &Shared) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut batch = Batch::new(BATCH, SLOT);
    let mut ready = vec![false; sockets.len()];
    while !shared.stop.load(Ordering::Relaxed) {
        {
            let mut fds: Vec<PollFd<'_>> = sockets
                .iter()
                .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, PollTimeout::from(POLL_MS)) {
                Ok(0) => continue,
                Ok(_) => {
                    for (r, fd) in ready.iter_mut().zip(&fds) {
                        *r = fd.revents().is_some_and(|e| !e.is_empty());
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => {
                    shared.counted().stats.recv_errors += 1;
                    // Do not spin on a persistent error.
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
            }
        }
        for (index, socket) in sockets.iter().enumerate() {
            if !ready[index] {
                continue;
            }
            for _ in 0..TURN {
                if !receive_batch(socket, index, &mut batch, shared) {
                    break;
                }
            }
        }
    }
}

/// Reads and counts one batch from `socket`; false when it had nothing (or failed).
fn receive_batch(socket: &UdpSocket, index: usize, batch: &mut Batch, shared: &Shared) -> bool {
    match batch.recv(socket.as_fd()) {
        Ok(0) => false,
        Ok(n) => {
            let now = monotonic_ns();
            let mut counted = shared.counted();
            let Counted { stats, seen } = &mut *counted;
            let mut fresh = 0;
            for i in 0..n {
                match Datagram::parse(batch.datagram(i)) {
                    Ok(d) if seen.insert(d.seq) => {
                        fresh += 1;
                        stats.latency.record(now.saturating_sub(d.sent_ns));
                    }
                    Ok(_) => stats.duplicates += 1,
                    Err(_) => stats.malformed += 1,
                }
            }
            stats.received += fresh;
            if let Some(count) = stats.per_addr.get_mut(index) {
                *count += fresh;
            }
            drop(counted);
            if shared.echo {
                // Counted as sent back whether or not the send succeeds: one the sink's own
                // buffer refused is then the return leg's loss, as the generator sees it.
                let _ = batch.send_back(socket.as_fd());
                shared.echoed.fetch_add(n as u64, Ordering::Relaxed);
            }
            shared.arrivals.fetch_add(n as u64, Ordering::Relaxed);
            true
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) =>
        {
            false
        }
        Err(_) => {
            shared.counted().stats.recv_errors += 1;
            // A socket in error polls ready at once: do not spin on it.
            std::thread::sleep(Duration::from_millis(1));
            false
        }
    }
}
