//! The worker's event loop: moves bytes between sockets and the datapath.

use std::fs::File;
use std::io::{self, IoSliceMut, Read, Write};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use quinn_udp::{RecvMeta, UdpSockRef, BATCH_SIZE};
use udpshard_shared::control::{ControlMsg, FrameReader};
use udpshard_shared::stats::{Counter, SlotState, StatsRegion};

use crate::counters::Counters;
use crate::datapath::{DataPath, Via, MAX_DATAGRAM, UPSTREAM_TOKEN_BASE};
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

    let (origin, text) = receive_start(&control)?;
    let config = udpshard_config::parse(&text, &origin)?;
    if sockets.len() != config.listeners.len() {
        return Err(WorkerError::ListenerCount {
            got: sockets.len(),
            want: config.listeners.len(),
        });
    }
    let listeners = config
        .listeners
        .iter()
        .zip(sockets)
        .map(|(cfg, socket)| Listener::new(cfg, socket))
        .collect::<Result<Vec<_>, _>>()?;
    let limits = config
        .listeners
        .iter()
        .map(|l| (l.max_sessions, l.session_idle.as_millis() as u64))
        .collect();
    raise_fd_limit();

    let poll = Poll::new().map_err(WorkerError::Poll)?;
    control
        .set_nonblocking(true)
        .map_err(|e| WorkerError::Control(e.to_string()))?;
    let control_fd = control.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&control_fd), CONTROL, Interest::READABLE)
        .map_err(WorkerError::Poll)?;
    let inbox_fd = handoff.inbox.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&inbox_fd), HANDOFF, Interest::READABLE)
        .map_err(WorkerError::Poll)?;
    for (l, listener) in listeners.iter().enumerate() {
        let fd = listener.socket.as_raw_fd();
        poll.registry()
            .register(
                &mut SourceFd(&fd),
                Token(LISTENER_TOKEN_BASE + l),
                Interest::READABLE,
            )
            .map_err(WorkerError::Poll)?;
    }
    let counters = Counters::resume_from(&slot);
    counters.publish(&slot);
    slot.set(Counter::State, SlotState::Ready as u64);
    let path = DataPath::new(listeners, limits, region, args.id, handoff, counters);
    send_control(&control, &ControlMsg::Ready)?;
    tracing::debug!(worker = args.id, "ready");

    let mut lp = Loop {
        poll,
        control,
        control_frames: FrameReader::default(),
        rx: RecvBatch::new(),
        path,
    };
    let result = lp.serve();
    lp.path.close_all(lp.poll.registry());
    lp.publish();
    result
}

struct Loop {
    poll: Poll,
    control: UnixStream,
    control_frames: FrameReader,
    rx: RecvBatch,
    path: DataPath,
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
        let listeners = self.path.listeners.len();
        // Listeners whose socket may still hold datagrams (edge-triggered
        // polling reports each arrival once; a budget-limited drain must
        // come back without waiting for the next one).
        let mut undrained = vec![false; listeners];
        let start = Instant::now();
        // Busy and wall time continue the slot's totals together, so the
        // utilisation of a restarted worker's slot stays a true ratio.
        let wall_base = self.path.counters.get(Counter::WallNs);
        let mut next_tick = start;
        loop {
            let now = Instant::now();
            let timeout = if undrained.contains(&true) {
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
                            return Ok(());
                        }
                    }
                    HANDOFF => self.path.read_inbox(self.poll.registry()),
                    Token(t) if t >= UPSTREAM_TOKEN_BASE => {
                        self.path.upstream_readable(t - UPSTREAM_TOKEN_BASE)
                    }
                    Token(t) => {
                        if let Some(flag) = undrained.get_mut(t - LISTENER_TOKEN_BASE) {
                            *flag = true;
                        }
                    }
                }
            }
            for (l, flag) in undrained.iter_mut().enumerate() {
                if *flag {
                    *flag = !self.drain_listener(l);
                }
            }
            if busy_from >= next_tick {
                // Sweep about a tenth of the table per tick: all of it each second.
                let budget = (self.path.sessions.len() / 10).max(1024);
                self.path.tick(self.poll.registry(), budget);
                next_tick = busy_from + TICK;
            }
            let done = Instant::now();
            let counters = &mut self.path.counters;
            counters.add(
                Counter::BusyNs,
                done.duration_since(busy_from).as_nanos() as u64,
            );
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
            let listener = &self.path.listeners[l];
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
                if slot.is_empty() {
                    self.path.client_datagram(
                        self.poll.registry(),
                        l,
                        meta.addr,
                        meta.dst_ip,
                        slot,
                        Via::Socket,
                    );
                }
                for datagram in slot.chunks(stride) {
                    self.path.client_datagram(
                        self.poll.registry(),
                        l,
                        meta.addr,
                        meta.dst_ip,
                        datagram,
                        Via::Socket,
                    );
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
        let mut buf = [0u8; 4096];
        loop {
            match self.control.read(&mut buf) {
                Ok(0) => {
                    tracing::info!("supervisor closed the control channel; exiting");
                    return Ok(Some(Exit::Stop));
                }
                Ok(n) => self.control_frames.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::Control(e.to_string())),
            }
        }
        while let Some(msg) = self.control_frames.next_msg() {
            match msg.map_err(|e| WorkerError::Control(e.to_string()))? {
                ControlMsg::Stop => return Ok(Some(Exit::Stop)),
                other => tracing::warn!("unexpected control message {other:?}"),
            }
        }
        Ok(None)
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

fn receive_start(mut control: &UnixStream) -> Result<(String, String), WorkerError> {
    let err = |e: io::Error| WorkerError::Control(e.to_string());
    control.set_read_timeout(Some(START_TIMEOUT)).map_err(err)?;
    let mut frames = FrameReader::default();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(msg) = frames.next_msg() {
            return match msg.map_err(|e| WorkerError::Control(e.to_string()))? {
                ControlMsg::Start { origin, config } => Ok((origin, config)),
                other => Err(WorkerError::Control(format!(
                    "expected Start, got {other:?}"
                ))),
            };
        }
        match control.read(&mut buf) {
            Ok(0) => return Err(WorkerError::Control("closed before Start".into())),
            Ok(n) => frames.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(e)),
        }
    }
}

fn send_control(mut control: &UnixStream, msg: &ControlMsg) -> Result<(), WorkerError> {
    control
        .write_all(&msg.encode())
        .map_err(|e| WorkerError::Control(e.to_string()))
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
