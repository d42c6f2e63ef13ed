//! The worker's event loop: the shell around the router. It reads batches
//! of datagrams, hands each to the router with the time, and has the
//! executor turn the router's actions into batched syscalls. It keeps no
//! routing state of its own.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use quinn_udp::{RecvMeta, UdpSockRef, BATCH_SIZE};
use udpshard_shared::backends::BackendState;
use udpshard_shared::control::ControlChannel;
use udpshard_shared::stats::{Counter, Header, StatsRegion};

use crate::counters::Counters;
use crate::exec::Executor;
use crate::handoff::{Handoff, MAX_DATAGRAM};
use crate::listener::Listener;
use crate::paths::SockId;
use crate::phase::Phase;
use crate::queue_delay::{self, QueueDelay};
use crate::router::{Arrival, DatagramRef, Outcome, Router, Via};
use crate::shm::ShmOwners;
use crate::sockio;
use crate::upstream::{Upstream, UPSTREAM_TOKEN_BASE};
use crate::WorkerError;

const CONTROL: Token = Token(0);
const HANDOFF: Token = Token(1);
const LISTENER_TOKEN_BASE: usize = 2;

/// Batches read from one listener per loop iteration before the loop turns
/// to replies and timers: bounds the latency a flood adds to the return path.
const LISTENER_BATCH_BUDGET: usize = 8;
/// Replies read from one upstream socket per visit: reads go on until this
/// many datagrams (GRO buffers count as what they hold) or an empty socket.
const REPLY_BUDGET: usize = 2 * sockio::BATCH;
/// Handoff frames read per wakeup.
const INBOX_BUDGET: usize = 256;

const TICK: Duration = Duration::from_millis(100);

/// How long a new worker waits for its config before giving up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

type WorkerRouter = Router<ShmOwners, Upstream>;

mod control;
mod start;

pub use start::run;

/// Where the bytes a `DatagramRef` names are, until the actions naming them
/// are flushed.
#[derive(Debug, Clone, Copy)]
enum Src {
    /// In the listener batch: slot, offset (a GRO segment), length.
    Listener { slot: u16, off: u32, len: u32 },
    /// In the upstream batch: slot, offset (a GRO segment), length.
    Upstream { slot: u16, off: u32, len: u32 },
    /// Bytes of the inbox frame just read: from an offset, a length.
    Inbox { off: u32, len: u32 },
}

/// What the log last said of refusals, and when (the loop's clock, ms).
#[derive(Debug, Default)]
struct Warned {
    no_port: u64,
    no_port_ms: u64,
    /// not_initial, rate_limited, path_limit, sessions_evicted.
    admission: [u64; 4],
    admission_ms: u64,
}

/// Receive buffers for one listener batch, reused forever.
struct ListenerBatch {
    buf: Vec<u8>,
    meta: [RecvMeta; BATCH_SIZE],
}

impl ListenerBatch {
    fn new() -> ListenerBatch {
        ListenerBatch {
            buf: vec![0; MAX_DATAGRAM * BATCH_SIZE],
            meta: [RecvMeta::default(); BATCH_SIZE],
        }
    }
}

struct Loop {
    poll: Poll,
    control: ControlChannel,
    listeners: Vec<Listener>,
    router: WorkerRouter,
    handoff: Handoff,
    /// The inbox frame just read.
    frame: Vec<u8>,
    exec: Executor,
    rx: ListenerBatch,
    up_rx: sockio::RecvBatch,
    refs: Vec<Src>,
    /// The inbox may still hold frames (a read stopped at its budget).
    inbox_undrained: bool,
    /// Listeners whose socket may still hold datagrams (edge-triggered
    /// polling reports each arrival once; a budget-limited drain must come
    /// back without waiting for the next one).
    undrained: Vec<bool>,
    /// Upstream sockets that may hold replies, and a flag per socket so
    /// each is listed once.
    up_ready: Vec<SockId>,
    up_queued: Vec<bool>,
    region: StatsRegion,
    id: usize,
    /// The listeners are registered for reading: they are while the
    /// router's phase reads them ([`Loop::follow_phase`]).
    registered: bool,
    start: Instant,
    /// CLOCK_MONOTONIC at `start`, ns: the heartbeat is derived from it.
    start_ns: u64,
    /// Milliseconds since `start` when the current iteration began: one
    /// clock read serves every datagram of the iteration.
    iter_ms: u64,
    /// What the log last said of refusals, and when.
    warned: Warned,
    /// Kernel drops on the listener sockets held now, at the last reading.
    socket_drops_seen: u64,
    /// Drops counted before on listener sockets no longer held: the slot's
    /// `drops.socket` is this plus the held sockets' own counts.
    socket_drops_base: u64,
    /// What the slot shows for `rx_packets`/`rx_bytes` and `replies_in`
    /// since the current batch was read (counted ahead of the router).
    rx_ahead: (u64, u64),
    replies_ahead: u64,
    /// The slot's wall time before this process's loop began.
    wall_base: u64,
    /// How long listener datagrams waited in their socket.
    queue_delay: QueueDelay,
}

/// The bytes `d` names, resolved against the loop's buffers.
fn resolve<'a>(
    refs: &'a [Src],
    rx: &'a ListenerBatch,
    up_rx: &'a sockio::RecvBatch,
    frame: &'a [u8],
    d: DatagramRef,
) -> &'a [u8] {
    match refs.get(d.0 as usize) {
        Some(Src::Listener { slot, off, len }) => {
            let start = usize::from(*slot) * MAX_DATAGRAM + *off as usize;
            &rx.buf[start..start + *len as usize]
        }
        Some(Src::Upstream { slot, off, len }) => {
            &up_rx.bufs[usize::from(*slot)][*off as usize..(*off + *len) as usize]
        }
        Some(Src::Inbox { off, len }) => &frame[*off as usize..(*off + *len) as usize],
        None => &[],
    }
}

impl Loop {
    fn now_ms(&self) -> u64 {
        self.iter_ms
    }

    /// Counts a batch just read in the slot before it is handled (the
    /// router counts it again, to the same total, as it goes): if this
    /// process dies meanwhile, the supervisor finds the batch taken in and
    /// not settled, and books it as `drops.worker_lost`, where it would
    /// otherwise vanish from every count. Mid-batch (a flush for a deferred
    /// datagram, an inbox frame) the router has counted only part of it:
    /// the slot keeps the larger figure, so it never goes back.
    fn publish_ahead(&self) {
        if !self.router.phase().publishes() {
            return;
        }
        let Some(slot) = self.region.slot(self.id) else {
            return;
        };
        let counters = &self.router.counters;
        if self.rx_ahead.0 > counters.get(Counter::RxPackets) {
            slot.set(Counter::RxPackets, self.rx_ahead.0);
            slot.set(Counter::RxBytes, self.rx_ahead.1);
        }
        if self.replies_ahead > counters.get(Counter::RepliesIn) {
            slot.set(Counter::RepliesIn, self.replies_ahead);
        }
    }

    fn publish(&self) {
        if !self.router.phase().publishes() {
            return;
        }
        if let Some(slot) = self.region.slot(self.id) {
            self.router.counters.publish(&slot);
        }
        if let Some(counts) = self.region.backend_counts(self.id) {
            self.router.counters.publish_backends(&counts);
        }
        self.queue_delay.publish(self.region.delay(self.id));
        self.publish_ahead();
    }

    /// Executes what the router decided (the descriptors of the frame just
    /// read, if any, go to `Keep`).
    fn flush(&mut self, fds: &mut [Option<OwnedFd>]) {
        let (refs, rx, up_rx, frame) = (&self.refs, &self.rx, &self.up_rx, &self.frame);
        let bytes = |d: DatagramRef| resolve(refs, rx, up_rx, frame, d);
        self.exec.flush(
            &mut self.router,
            &self.listeners,
            &mut self.handoff,
            fds,
            &bytes,
        );
        // What was just sent is in the slot before anything else happens:
        // a worker killed later does not have it booked as lost.
        self.publish();
    }

    fn serve(&mut self) -> Result<(), WorkerError> {
        let mut events = Events::with_capacity(1024);
        // Busy and wall time continue the slot's totals together, so the
        // utilisation of a restarted worker's slot stays a true ratio.
        self.wall_base = self.router.counters.get(Counter::WallNs);
        // The longest iteration seen in the current one-second window.
        let (mut window_start, mut window_max_ns) = (self.start, 0u64);
        let mut next_tick = self.start;
        // Two clock reads per iteration: when it begins and when it ends.
        let mut done = Instant::now();
        loop {
            let timeout = if self.undrained.contains(&true)
                || !self.up_ready.is_empty()
                || self.inbox_undrained
            {
                Duration::ZERO
            } else {
                next_tick.saturating_duration_since(done)
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::Poll(e)),
            }
            let busy_from = Instant::now();
            self.iter_ms = busy_from.duration_since(self.start).as_millis() as u64;
            for event in events.iter() {
                match event.token() {
                    CONTROL => {
                        if self.read_control()? {
                            self.leave();
                            return Ok(());
                        }
                    }
                    HANDOFF => self.read_inbox(),
                    Token(t) if t >= UPSTREAM_TOKEN_BASE => {
                        let sock = (t - UPSTREAM_TOKEN_BASE) as SockId;
                        // ICMP reports queued (IP_RECVERR): read them now,
                        // also those whose pending error a send consumed.
                        if event.is_error() {
                            self.upstream_errors(sock);
                        }
                        self.upstream_ready(sock)
                    }
                    Token(t) => {
                        if let Some(flag) = self.undrained.get_mut(t - LISTENER_TOKEN_BASE) {
                            *flag = true;
                        }
                    }
                }
            }
            if self.inbox_undrained {
                self.read_inbox();
            }
            for l in 0..self.undrained.len() {
                if self.undrained[l] {
                    self.undrained[l] = !self.drain_listener(l);
                }
            }
            self.drain_upstream();
            self.hand_over_step()?;
            if busy_from >= next_tick {
                self.tick();
                next_tick = busy_from + TICK;
                if let Phase::Draining { deadline_ms } = *self.router.phase() {
                    if self.router.sessions() == 0 {
                        tracing::info!(worker = self.id, "drained: no live sessions left");
                        return Ok(());
                    }
                    if self.now_ms() >= deadline_ms {
                        tracing::info!(
                            worker = self.id,
                            sessions = self.router.sessions(),
                            "drain timeout reached; exiting"
                        );
                        return Ok(());
                    }
                }
            }
            done = Instant::now();
            let iteration_ns = done.duration_since(busy_from).as_nanos() as u64;
            let counters = &mut self.router.counters;
            counters.add(Counter::BusyNs, iteration_ns);
            counters.incr(Counter::Loops);
            window_max_ns = window_max_ns.max(iteration_ns);
            if done.duration_since(window_start) >= Duration::from_secs(1) {
                counters.set(Counter::LoopMaxUs, window_max_ns / 1000);
                self.queue_delay.end_window();
                (window_start, window_max_ns) = (done, 0);
            }
            let since_start = done.duration_since(self.start).as_nanos() as u64;
            counters.set(Counter::WallNs, self.wall_base + since_start);
            counters.set(Counter::Heartbeat, self.start_ns + since_start);
            self.router.update_gauges();
            self.publish();
        }
    }

    fn tick(&mut self) {
        let now = self.now_ms();
        // Backend states, as the supervisor decides them for every worker
        // (read before the generation is noted: a change after the read
        // is applied at the next tick).
        let health = self.region.header(Header::HealthGeneration);
        for l in 0..self.router.listeners() {
            let down: Vec<bool> = self
                .router
                .backend_rows(l)
                .iter()
                .map(|row| {
                    row.and_then(|r| self.region.backend_state(usize::from(r)))
                        == Some(BackendState::Down)
                })
                .collect();
            self.router.set_backend_states(l, &down);
        }
        self.router.counters.set(Counter::HealthApplied, health);
        // Sweep about a tenth of the tables per tick: all of them each second.
        let budget = (self.router.sweep_span() / 10).max(1024);
        self.router.tick(now, budget);
        // What the sweep decided (closed paths to tell their homes about).
        self.flush(&mut []);
        self.handoff.flush_pending();
        let queue = self.handoff.take_outcomes();
        self.router.counters.add(Counter::ControlLost, queue.lost);
        self.router
            .handoff_queue_settled(queue.sent_datagrams, queue.lost_datagrams);
        self.note_listener_drops();
        // Refused paths: once a second at most, with what the ranges hold.
        let no_port = self.router.counters.get(Counter::DropNoPort);
        self.note_admission(now);
        let w = &mut self.warned;
        if no_port > w.no_port && now >= w.no_port_ms + 1000 {
            let refused = no_port - w.no_port;
            (w.no_port, w.no_port_ms) = (no_port, now);
            let held = self.router.paths().sock_counts().0;
            for l in 0..self.router.routes().len() {
                let Some((ports, v4, v6)) = self.router.sockets().capacity(l) else {
                    continue;
                };
                let route = &self.router.routes()[l];
                let v4_backends = route.backends.iter().filter(|b| b.is_ipv4()).count();
                let v6_backends = route.backends.len() - v4_backends;
                let sources =
                    if v4_backends > 0 { v4 } else { 0 } + if v6_backends > 0 { v6 } else { 0 };
                let paths = ports * (v4 * v4_backends + v6 * v6_backends);
                tracing::warn!(
                    worker = self.id,
                    "listener {}: {refused} datagrams of new paths refused (drops.no_port): no port \
                     free toward their backend; capacity {sources} sources x {ports} ports x {} \
                     backends = {paths} paths, this worker holds {held} upstream sockets \
                     (upstream_ports, upstream_sources)",
                    route.name,
                    route.backends.len(),
                );
            }
        }
    }

    /// What admission refused since the log last said, once a second at
    /// most: a flood shows in the log as one line a second per worker.
    fn note_admission(&mut self, now: u64) {
        let c = &self.router.counters;
        let counts = [
            c.get(Counter::DropNotInitial),
            c.get(Counter::DropRateLimited),
            c.get(Counter::DropPathLimit),
            c.get(Counter::SessionsEvicted),
        ];
        let w = &mut self.warned;
        // The first look only notes where the counts stand (a restarted
        // worker continues its slot's).
        if w.admission_ms == 0 {
            (w.admission, w.admission_ms) = (counts, now.max(1));
            return;
        }
        if counts == w.admission || now < w.admission_ms + 1000 {
            return;
        }
        let d: Vec<u64> = counts
            .iter()
            .zip(w.admission)
            .map(|(now, then)| now.saturating_sub(then))
            .collect();
        let secs = (now.saturating_sub(w.admission_ms) as f64 / 1000.0).min(999.0);
        (w.admission, w.admission_ms) = (counts, now);
        tracing::warn!(
            worker = self.id,
            "admission, over {secs:.1}s: refused {} long headers that were no client's first \
             flight (drops.not_initial), {} new sessions or paths over their source's rate \
             (drops.rate_limited), {} new paths over their session's (drops.path_limit); gave \
             up {} unanswered sessions (sessions_evicted); {} unanswered now",
            d[0],
            d[1],
            d[2],
            d[3],
            self.router.counters.get(Counter::SessionsEmbryonic),
        );
    }

    /// The kernel's drops on the listener sockets, into `drops.socket`.
    fn note_listener_drops(&mut self) {
        let socket_drops = listener_drops(&self.listeners);
        if socket_drops < self.socket_drops_seen {
            // A listener left (reload): what its socket counted stays.
            self.socket_drops_base += self.socket_drops_seen - socket_drops;
        }
        self.socket_drops_seen = socket_drops;
        let counters = &mut self.router.counters;
        counters.set(Counter::DropSocket, self.socket_drops_base + socket_drops);
        counters.set(Counter::ListenerDropsSeen, socket_drops);
    }

    /// Reads up to the budget from listener `l`; true when its socket is empty.
    fn drain_listener(&mut self, l: usize) -> bool {
        for _ in 0..LISTENER_BATCH_BUDGET {
            let Some(listener) = self.listeners.get(l) else {
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
            let now = self.now_ms();
            self.refs.clear();
            // One clock read for the batch, against each datagram's (or
            // GRO run's) kernel receive timestamp.
            let wall = queue_delay::wall_now();
            let (mut datagrams, mut bytes) = (0, 0);
            for m in &self.rx.meta[..n] {
                let run = segments(m.len, m.stride).count() as u64;
                self.queue_delay.record(wall, m.timestamp, run);
                (datagrams, bytes) = (datagrams + run, bytes + m.len as u64);
            }
            let counters = &self.router.counters;
            self.rx_ahead = (
                counters.get(Counter::RxPackets) + datagrams,
                counters.get(Counter::RxBytes) + bytes,
            );
            self.publish_ahead();
            let (buf, meta) = (&self.rx.buf, &self.rx.meta);
            self.router.warm(
                l,
                meta[..n].iter().enumerate().map(|(i, m)| {
                    let first = segments(m.len, m.stride).next().map_or(0, |(_, len)| len);
                    (&buf[i * MAX_DATAGRAM..i * MAX_DATAGRAM + first], m.addr)
                }),
            );
            for i in 0..n {
                let meta = self.rx.meta[i];
                let a = Arrival {
                    listener: l,
                    client: meta.addr,
                    local_ip: meta.dst_ip,
                    via: Via::Socket,
                };
                for (off, len) in segments(meta.len, meta.stride) {
                    self.client_datagram(now, a, i, off, len);
                }
            }
            self.flush(&mut []);
            // A short batch emptied the socket; a later arrival raises a new
            // edge, so no extra EAGAIN-returning call is needed.
            if n < BATCH_SIZE {
                return true;
            }
        }
        false
    }

    /// One datagram of the listener batch (slot `i`, bytes `off..off+len`).
    fn client_datagram(&mut self, now: u64, a: Arrival, i: usize, off: usize, len: usize) {
        let d = DatagramRef(self.refs.len() as u32);
        self.refs.push(Src::Listener {
            slot: i as u16,
            off: off as u32,
            len: len as u32,
        });
        let start = i * MAX_DATAGRAM + off;
        let bytes = &self.rx.buf[start..start + len];
        if self.router.client(now, a, bytes, d) == Outcome::Deferred {
            // What made the flow ours is in the inbox: read it, then ask
            // again. The listener batch stays where it is meanwhile.
            self.flush(&mut []);
            self.read_inbox();
            let bytes = &self.rx.buf[start..start + len];
            let a = Arrival {
                via: Via::Retry,
                ..a
            };
            self.router.client(self.now_ms(), a, bytes, d);
        }
    }

    fn upstream_ready(&mut self, sock: SockId) {
        let i = sock as usize;
        if self.up_queued.len() <= i {
            self.up_queued.resize(i + 1, false);
        }
        if !self.up_queued[i] {
            self.up_queued[i] = true;
            self.up_ready.push(sock);
        }
    }

    /// Reads the ICMP reports queued on upstream socket `sock` and counts
    /// them at their backends; returns how many.
    fn upstream_errors(&mut self, sock: SockId) -> usize {
        let Some(fd) = self.router.sockets().fd(sock) else {
            return 0;
        };
        let router = &mut self.router;
        sockio::recv_errors(fd, |to, errno| {
            let unreachable = matches!(
                errno,
                libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH
            );
            router.upstream_error(sock, to, unreachable);
        })
    }

    /// Reads replies from the upstream sockets that have some, up to a
    /// budget each; sockets with more stay listed for the next iteration.
    fn drain_upstream(&mut self) {
        let moves_first = self.router.relays_can_move();
        for sock in std::mem::take(&mut self.up_ready) {
            let Some(fd) = self.router.sockets().fd(sock) else {
                self.up_queued[sock as usize] = false;
                continue;
            };
            let mut emptied = false;
            let mut burst = false;
            let mut errors = 0;
            let mut handled = 0;
            while handled < REPLY_BUDGET {
                if moves_first {
                    self.read_inbox();
                }
                // An error is an ICMP report for an earlier datagram
                // (IP_RECVERR): its queue names the backend. Replies may
                // wait behind it: read on.
                let n = match sockio::recv_batch(fd, &mut self.up_rx) {
                    Ok(n) => n,
                    // Read on past a report (the call consumed it; replies
                    // may wait behind it). An error that keeps coming is
                    // no report: it ends this socket's turn.
                    Err(_) if errors < 2 => {
                        errors += 1;
                        self.upstream_errors(sock);
                        continue;
                    }
                    Err(_) => 0,
                };
                let now = self.now_ms();
                self.refs.clear();
                // Counted before they are handled, as client batches are:
                // each datagram of a GRO buffer.
                let replies: usize = self.up_rx.meta[..n]
                    .iter()
                    .filter(|m| m.from.is_some())
                    .map(|m| segments(m.len, m.stride).count())
                    .sum();
                handled += replies.max(1);
                self.replies_ahead = self.router.counters.get(Counter::RepliesIn) + replies as u64;
                self.publish_ahead();
                for i in 0..n {
                    let meta = self.up_rx.meta[i];
                    let Some(from) = meta.from else { continue };
                    if meta.stride < meta.len {
                        self.router.counters.incr(Counter::RxGroBuffers);
                    }
                    for (off, len) in segments(meta.len, meta.stride) {
                        let d = DatagramRef(self.refs.len() as u32);
                        self.refs.push(Src::Upstream {
                            slot: i as u16,
                            off: off as u32,
                            len: len as u32,
                        });
                        let bytes = &self.up_rx.bufs[i][off..off + len];
                        self.router.backend(now, sock, from, bytes, d, meta.drops);
                    }
                }
                self.flush(&mut []);
                if n < sockio::BATCH {
                    emptied = true;
                    break;
                }
                burst = true;
            }
            if emptied {
                self.up_queued[sock as usize] = false;
                // Datagrams queued before a drop carry no count: after a
                // burst, ask the kernel.
                if burst {
                    if let Ok(total) = sockio::socket_drops(fd) {
                        self.router.note_socket_drops(sock, total);
                    }
                }
            } else {
                self.up_ready.push(sock);
            }
        }
    }

    /// Reads the handoff inbox: datagrams to process as our own, sessions
    /// and notes from other workers. Called in the middle of a listener
    /// batch too (a deferred datagram): its refs stay as they are.
    fn read_inbox(&mut self) {
        let mark = self.refs.len();
        // Edge-triggered: frames left past the budget raise no new event,
        // so the loop comes back for them.
        self.inbox_undrained = true;
        for _ in 0..INBOX_BUDGET {
            let (len, fds) = match self.handoff.recv(&mut self.frame) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    self.inbox_undrained = false;
                    break;
                }
                Err(e) => {
                    tracing::warn!(worker = self.id, "handoff inbox: {e}");
                    self.inbox_undrained = false;
                    break;
                }
            };
            let now = self.now_ms();
            let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
            let refs = &mut self.refs;
            let mut payload = |at: usize| {
                refs.push(Src::Inbox {
                    off: at as u32,
                    len: len.saturating_sub(at) as u32,
                });
                DatagramRef(refs.len() as u32 - 1)
            };
            self.router
                .frame(now, &self.frame[..len], fds.len(), &mut payload);
            self.flush(&mut fds);
            self.refs.truncate(mark);
        }
    }
}

/// Where a slot's listener-socket drops stand: (the kernel's count its last
/// process read, what sockets since closed had counted).
fn drops_from(counters: &Counters) -> (u64, u64) {
    let seen = counters.get(Counter::ListenerDropsSeen);
    (seen, counters.get(Counter::DropSocket).saturating_sub(seen))
}

/// The kernel's drop counts on `listeners`' sockets, summed.
fn listener_drops(listeners: &[Listener]) -> u64 {
    listeners
        .iter()
        .map(|l| sockio::socket_drops(l.socket.as_raw_fd()).map_or(0, u64::from))
        .sum()
}

/// The datagrams in one receive slot, as (offset, length): GRO may coalesce
/// several of one sender, `stride` bytes each but the last. An empty
/// datagram is one, of length 0.
fn segments(len: usize, stride: usize) -> impl Iterator<Item = (usize, usize)> {
    let stride = if stride == 0 { len.max(1) } else { stride };
    (0..len.max(1))
        .step_by(stride)
        .map(move |off| (off, stride.min(len - off)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(len: usize, stride: usize) -> (usize, usize) {
        (len, stride)
    }

    #[test]
    fn a_receive_slot_splits_into_its_datagrams() {
        let all = |(len, stride)| segments(len, stride).collect::<Vec<_>>();
        assert_eq!(all(meta(33, 0)), [(0, 33)]);
        assert_eq!(all(meta(0, 0)), [(0, 0)], "an empty datagram is one");
        assert_eq!(all(meta(0, 40)), [(0, 0)]);
        assert_eq!(all(meta(100, 40)), [(0, 40), (40, 40), (80, 20)]);
        assert_eq!(all(meta(80, 40)), [(0, 40), (40, 40)]);
    }
}
