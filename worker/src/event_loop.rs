//! The worker's event loop: moves bytes between sockets and the datapath.

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use quinn_udp::{RecvMeta, UdpSockRef, BATCH_SIZE};
use udpshard_shared::control::{ControlChannel, ControlMsg};
use udpshard_shared::stats::{Counter, SlotState, StatsRegion};

use crate::counters::Counters;
use crate::datapath::{Arrival, DataPath, Via, MAX_DATAGRAM, UPSTREAM_TOKEN_BASE};
use crate::handoff::Handoff;
use crate::listener::Listener;
use crate::{WorkerArgs, WorkerError};

const CONTROL: Token = Token(0);
const HANDOFF: Token = Token(1);
const LISTENER_TOKEN_BASE: usize = 2;

/// Batches read from one listener per loop iteration before the loop turns
/// to replies and timers: bounds the latency a flood adds to the return path.
const LISTENER_BATCH_BUDGET: usize = 8;

const TICK: Duration = Duration::from_millis(100);

/// How long a new worker waits for its config before giving up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a worker until the supervisor stops it or goes away.
pub fn run(args: WorkerArgs) -> Result<(), WorkerError> {
    let control = UnixStream::from(adopt_fd(args.control_fd, "control")?);
    let stats_file = File::from(adopt_fd(args.stats_fd, "stats")?);
    let sockets = args
        .listener_fds
        .iter()
        .map(|&fd| adopt_fd(fd, "listener").map(UdpSocket::from))
        .collect::<Result<Vec<_>, _>>()?;
    let inbox = UnixDatagram::from(adopt_fd(args.handoff_fd, "handoff inbox")?);
    let peers = args
        .peer_fds
        .iter()
        .map(|&fd| adopt_fd(fd, "handoff peer").map(UnixDatagram::from))
        .collect::<Result<Vec<_>, _>>()?;
    let handoff = Handoff::new(inbox, peers)
        .map_err(|e| WorkerError::Control(format!("handoff sockets: {e}")))?;
    let region = StatsRegion::open(&stats_file)?;
    let slot = region.slot(args.id).ok_or(WorkerError::NoSlot(args.id))?;

    let mut control = ControlChannel::new(control);
    let control_err = |e: io::Error| WorkerError::Control(e.to_string());
    let (origin, text) = match control.recv_timeout(START_TIMEOUT).map_err(control_err)? {
        (ControlMsg::Start { origin, config }, _) => (origin, config),
        (other, _) => {
            return Err(WorkerError::Control(format!(
                "expected Start, got {other:?}"
            )))
        }
    };
    let config = udpshard_config::parse(&text, &origin)?;
    let listeners = build_listeners(&config, sockets, &mut [])?;
    raise_fd_limit();

    let poll = Poll::new().map_err(WorkerError::Poll)?;
    control.stream.set_nonblocking(true).map_err(control_err)?;
    let control_fd = control.stream.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&control_fd), CONTROL, Interest::READABLE)
        .map_err(WorkerError::Poll)?;
    let inbox_fd = handoff.inbox.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&inbox_fd), HANDOFF, Interest::READABLE)
        .map_err(WorkerError::Poll)?;
    register_listeners(poll.registry(), &listeners)?;
    let counters = Counters::resume_from(&slot);
    counters.publish(&slot);
    slot.set(Counter::State, SlotState::Ready as u64);
    let undrained = vec![false; listeners.len()];
    let path = DataPath::new(
        listeners,
        limits(&config),
        region,
        args.id,
        handoff,
        counters,
    );
    control.send(&ControlMsg::Ready, &[]).map_err(control_err)?;
    tracing::debug!(worker = args.id, "ready");

    let mut lp = Loop {
        poll,
        control,
        rx: RecvBatch::new(),
        path,
        undrained,
        drain_deadline: None,
    };
    let result = lp.serve();
    lp.path.close_all(lp.poll.registry());
    lp.publish();
    result
}

fn limits(config: &udpshard_config::Config) -> Vec<(usize, u64)> {
    config
        .listeners
        .iter()
        .map(|l| (l.max_sessions, l.session_idle.as_millis() as u64))
        .collect()
}

/// Listeners for `config` on `sockets` (one per listener, in order). A
/// socket that is one of `current` (same inode) keeps that listener's
/// socket state, with new routing; `map[j]` then says where current
/// listener j went.
fn build_listeners(
    config: &udpshard_config::Config,
    sockets: Vec<UdpSocket>,
    current: &mut [Option<Listener>],
) -> Result<Vec<Listener>, WorkerError> {
    if sockets.len() != config.listeners.len() {
        return Err(WorkerError::ListenerCount {
            got: sockets.len(),
            want: config.listeners.len(),
        });
    }
    config
        .listeners
        .iter()
        .zip(sockets)
        .map(|(cfg, socket)| {
            let inode = nix::sys::stat::fstat(&socket).map(|st| st.st_ino).ok();
            let same = current
                .iter_mut()
                .find(|l| l.as_ref().is_some_and(|l| Some(l.inode) == inode))
                .and_then(Option::take);
            match same {
                // The duplicate descriptor closes; the listener keeps its own.
                Some(mut listener) => listener.configure(cfg).map(|()| listener),
                None => Listener::new(cfg, socket),
            }
        })
        .collect()
}

fn register_listeners(registry: &mio::Registry, listeners: &[Listener]) -> Result<(), WorkerError> {
    for (l, listener) in listeners.iter().enumerate() {
        let fd = listener.socket.as_raw_fd();
        registry
            .register(
                &mut SourceFd(&fd),
                Token(LISTENER_TOKEN_BASE + l),
                Interest::READABLE,
            )
            .map_err(WorkerError::Poll)?;
    }
    Ok(())
}

struct Loop {
    poll: Poll,
    control: ControlChannel,
    rx: RecvBatch,
    path: DataPath,
    /// Listeners whose socket may still hold datagrams (edge-triggered
    /// polling reports each arrival once; a budget-limited drain must come
    /// back without waiting for the next one).
    undrained: Vec<bool>,
    /// Set by `Drain`: serve live sessions until then, then exit.
    drain_deadline: Option<Instant>,
}

/// Why the loop ended.
enum Exit {
    Stop,
}

impl Loop {
    fn publish(&self) {
        if let Some(slot) = self.path.region.slot(self.path.id) {
            self.path.counters.publish(&slot);
        }
    }

    fn serve(&mut self) -> Result<(), WorkerError> {
        let mut events = Events::with_capacity(1024);
        let start = Instant::now();
        // Busy and wall time continue the slot's totals together, so the
        // utilisation of a restarted worker's slot stays a true ratio.
        let wall_base = self.path.counters.get(Counter::WallNs);
        // The longest iteration seen in the current one-second window.
        let (mut window_start, mut window_max_ns) = (start, 0u64);
        let mut next_tick = start;
        loop {
            let now = Instant::now();
            let timeout = if self.undrained.contains(&true) || !self.path.pending_replies.is_empty()
            {
                Duration::ZERO
            } else {
                next_tick.saturating_duration_since(now)
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::Poll(e)),
            }
            let busy_from = Instant::now();
            self.path.now_ms = busy_from.duration_since(start).as_millis() as u64;
            for event in events.iter() {
                match event.token() {
                    CONTROL => {
                        if let Some(Exit::Stop) = self.read_control()? {
                            // A retiring worker's sockets leave their groups
                            // when we exit: forward what is queued in them,
                            // and what other workers handed us meanwhile.
                            self.path.read_inbox(self.poll.registry());
                            for l in 0..self.path.listeners.len() {
                                self.drain_listener(l);
                            }
                            self.path.read_inbox(self.poll.registry());
                            return Ok(());
                        }
                    }
                    HANDOFF => self.path.read_inbox(self.poll.registry()),
                    Token(t) if t >= UPSTREAM_TOKEN_BASE => {
                        self.path.upstream_readable(t - UPSTREAM_TOKEN_BASE)
                    }
                    Token(t) => {
                        if let Some(flag) = self.undrained.get_mut(t - LISTENER_TOKEN_BASE) {
                            *flag = true;
                        }
                    }
                }
            }
            for l in 0..self.undrained.len() {
                if self.undrained[l] {
                    self.undrained[l] = !self.drain_listener(l);
                }
            }
            for id in std::mem::take(&mut self.path.pending_replies) {
                self.path.upstream_readable(id);
            }
            if busy_from >= next_tick {
                // Sweep about a tenth of the table per tick: all of it each second.
                let budget = (self.path.sessions.len() / 10).max(1024);
                self.path.tick(self.poll.registry(), budget);
                next_tick = busy_from + TICK;
                if let Some(deadline) = self.drain_deadline {
                    if self.path.sessions.is_empty() {
                        tracing::info!(worker = self.path.id, "drained: no live sessions left");
                        return Ok(());
                    }
                    if busy_from >= deadline {
                        tracing::info!(
                            worker = self.path.id,
                            sessions = self.path.sessions.len(),
                            "drain timeout reached; exiting"
                        );
                        return Ok(());
                    }
                }
            }
            let done = Instant::now();
            let iteration_ns = done.duration_since(busy_from).as_nanos() as u64;
            let counters = &mut self.path.counters;
            counters.add(Counter::BusyNs, iteration_ns);
            counters.incr(Counter::Loops);
            window_max_ns = window_max_ns.max(iteration_ns);
            if done.duration_since(window_start) >= Duration::from_secs(1) {
                counters.set(Counter::LoopMaxUs, window_max_ns / 1000);
                (window_start, window_max_ns) = (done, 0);
            }
            counters.set(
                Counter::WallNs,
                wall_base + done.duration_since(start).as_nanos() as u64,
            );
            counters.set(Counter::Heartbeat, monotonic_ns());
            counters.set(Counter::SessionsActive, self.path.sessions.len() as u64);
            self.publish();
        }
    }

    /// Reads up to the budget from listener `l`; true when its socket is empty.
    fn drain_listener(&mut self, l: usize) -> bool {
        for _ in 0..LISTENER_BATCH_BUDGET {
            let Some(listener) = self.path.listeners.get(l) else {
                return true;
            };
            let received = {
                let mut chunks = self.rx.buf.chunks_mut(MAX_DATAGRAM);
                let mut iovs: [IoSliceMut<'_>; BATCH_SIZE] =
                    std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
                listener.io.recv(
                    UdpSockRef::from(&listener.socket),
                    &mut iovs,
                    &mut self.rx.meta,
                )
            };
            let n = match received {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(listener = %listener.name, "receive failed: {e}");
                    return true;
                }
            };
            for (i, meta) in self.rx.meta[..n].iter().enumerate() {
                let slot = &self.rx.buf[i * MAX_DATAGRAM..i * MAX_DATAGRAM + meta.len];
                // GRO may coalesce several datagrams of one sender.
                let stride = if meta.stride == 0 {
                    meta.len.max(1)
                } else {
                    meta.stride
                };
                let from = Arrival {
                    listener: l,
                    client: meta.addr,
                    local_ip: meta.dst_ip,
                    via: Via::Socket,
                };
                if slot.is_empty() {
                    self.path.client_datagram(self.poll.registry(), from, slot);
                }
                for datagram in slot.chunks(stride) {
                    self.path
                        .client_datagram(self.poll.registry(), from, datagram);
                }
            }
            // A short batch emptied the socket; a later arrival raises a new
            // edge, so no extra EAGAIN-returning call is needed.
            if n < BATCH_SIZE {
                return true;
            }
        }
        false
    }

    fn read_control(&mut self) -> Result<Option<Exit>, WorkerError> {
        let open = self
            .control
            .read_available()
            .map_err(|e| WorkerError::Control(e.to_string()))?;
        while let Some(msg) = self.control.next_msg() {
            let (msg, fds) = msg.map_err(|e| WorkerError::Control(e.to_string()))?;
            match msg {
                ControlMsg::Stop => return Ok(Some(Exit::Stop)),
                ControlMsg::Reload { origin, config, .. } => {
                    match self.reload(&origin, &config, fds) {
                        Ok(()) => {
                            let _ = self.control.send(&ControlMsg::Reloaded, &[]);
                        }
                        // The supervisor validated the same text: this is a
                        // socket-level failure; keep serving what we have.
                        Err(e) => tracing::error!(worker = self.path.id, "reload failed: {e}"),
                    }
                }
                ControlMsg::Peers { .. } => {
                    let peers = fds.into_iter().map(UnixDatagram::from).collect();
                    if let Err(e) = self.path.handoff.set_peers(peers) {
                        tracing::error!(worker = self.path.id, "handoff peers: {e}");
                    }
                }
                ControlMsg::Drain { timeout_ms } => {
                    self.path.draining = true;
                    self.drain_deadline = Some(Instant::now() + Duration::from_millis(timeout_ms));
                    if let Some(slot) = self.path.region.slot(self.path.id) {
                        slot.set(Counter::State, SlotState::Draining as u64);
                    }
                }
                other => tracing::warn!("unexpected control message {other:?}"),
            }
        }
        if !open {
            tracing::info!("supervisor closed the control channel; exiting");
            return Ok(Some(Exit::Stop));
        }
        Ok(None)
    }

    /// Serves a new config: listeners added, removed, or re-routed; live
    /// sessions kept.
    fn reload(&mut self, origin: &str, text: &str, fds: Vec<OwnedFd>) -> Result<(), WorkerError> {
        let config = udpshard_config::parse(text, origin)?;
        let sockets: Vec<UdpSocket> = fds.into_iter().map(UdpSocket::from).collect();
        let registry = self.poll.registry();
        for listener in &self.path.listeners {
            let _ = registry.deregister(&mut SourceFd(&listener.socket.as_raw_fd()));
        }
        let routes: Vec<(u64, Vec<std::net::SocketAddr>)> = self
            .path
            .listeners
            .iter()
            .map(|l| (l.ident, l.backends.clone()))
            .collect();
        let old: Vec<Listener> = std::mem::take(&mut self.path.listeners);
        let inodes: Vec<u64> = old.iter().map(|l| l.inode).collect();
        let mut current: Vec<Option<Listener>> = old.into_iter().map(Some).collect();
        let listeners = match build_listeners(&config, sockets, &mut current) {
            Ok(l) => l,
            Err(e) => {
                // Put back what we had.
                self.path.listeners = current.into_iter().flatten().collect();
                register_listeners(registry, &self.path.listeners)?;
                return Err(e);
            }
        };
        let map: Vec<Option<usize>> = inodes
            .iter()
            .map(|ino| listeners.iter().position(|l| l.inode == *ino))
            .collect();
        // Removed listeners' sockets close with `current`; the supervisor
        // has closed its copies, so the kernel drops them from their group.
        drop(current);
        register_listeners(registry, &listeners)?;
        self.undrained = vec![true; listeners.len()];
        self.path
            .reconfigure(registry, listeners, &routes, &map, limits(&config));
        tracing::info!(worker = self.path.id, "reloaded {origin}");
        Ok(())
    }
}

/// Receive buffers for one batch, reused forever: no allocation per datagram.
struct RecvBatch {
    buf: Vec<u8>,
    meta: [RecvMeta; BATCH_SIZE],
}

impl RecvBatch {
    fn new() -> RecvBatch {
        RecvBatch {
            buf: vec![0; MAX_DATAGRAM * BATCH_SIZE],
            meta: [RecvMeta::default(); BATCH_SIZE],
        }
    }
}

/// Takes ownership of a descriptor inherited from the supervisor.
fn adopt_fd(fd: RawFd, name: &'static str) -> Result<OwnedFd, WorkerError> {
    // SAFETY: F_GETFD only reads the descriptor's flags; it fails with EBADF
    // for a descriptor that is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(WorkerError::BadFd { name, fd });
    }
    // SAFETY: the descriptor is open (checked above) and was passed to this
    // process for it alone to own; the command line names each only once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not to be inherited by anything this worker might start.
    // SAFETY: sets a flag on a descriptor we own.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

/// Each session holds an upstream socket: allow as many as the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
