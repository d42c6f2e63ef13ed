//! The supervisor: owns the listener sockets and the stats region, spawns one
//! pinned worker per slot, restarts the ones that die, and stops them all on
//! SIGTERM/SIGINT. It never touches a datagram.
//!
//! Worker lifecycle, per slot:
//! `Starting` (spawned, config sent) -> `Ready` (said so on its control
//! channel) -> `Exited` (reaped) -> `Starting` again after a backoff that
//! doubles while it keeps crashing, unless the supervisor is stopping.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use udpshard_config::{Config, Workers};
use udpshard_shared::control::{ControlMsg, FrameReader};
use udpshard_shared::owners;
use udpshard_shared::stats::{Counter, Header, SlotState, StatsError, StatsRegion};

use crate::cpus::{allowed_cpus, format_cpu_list};
use crate::notify::notify;
use crate::reuseport::{rmem_fix, ReuseportGroup};
use crate::spawn::{spawn_worker, WorkerSpec};

const SIGNALS: Token = Token(0);
const CONTROL_TOKEN_BASE: usize = 1;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before dying was healthy: restart at once.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// How long workers get to exit after Stop before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot read the allowed CPU set: {0}")]
    Affinity(nix::Error),
    #[error(transparent)]
    Group(#[from] crate::reuseport::GroupError),
    #[error("stats file: {0}")]
    Stats(#[from] udpshard_shared::stats::StatsError),
    #[error("cannot find the udpshard executable to start workers: {0}")]
    Exe(io::Error),
    #[error("event loop: {0}")]
    Poll(io::Error),
    #[error("worker {id}: {source}")]
    Spawn { id: usize, source: io::Error },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerState {
    Starting,
    Ready,
    /// Dead, waiting for its restart time.
    Exited,
}

struct WorkerSlot {
    id: usize,
    cpu: usize,
    state: WorkerState,
    child: Option<Child>,
    control: Option<UnixStream>,
    frames: FrameReader,
    started_at: Instant,
    restart_at: Option<Instant>,
    backoff: Duration,
}

pub struct Supervisor {
    origin: String,
    text: String,
    groups: Vec<ReuseportGroup>,
    /// Per worker slot: its handoff inbox and the sending end the others
    /// use. Held here for the supervisor's life, so a restarted worker gets
    /// the same inbox (and whatever was queued in it).
    handoff: Vec<(UnixDatagram, UnixDatagram)>,
    region: StatsRegion,
    stats_file: File,
    workers: Vec<WorkerSlot>,
    poll: Poll,
    signals: Signals,
    exe: PathBuf,
    announced_ready: bool,
    stop_deadline: Option<Instant>,
}

impl Supervisor {
    /// Binds every listener, creates the stats region and starts the workers.
    pub fn start(
        config: Config,
        origin: String,
        text: String,
    ) -> Result<Supervisor, SupervisorError> {
        let cpus = allowed_cpus().map_err(SupervisorError::Affinity)?;
        let count = match config.workers {
            Workers::Auto => cpus.len(),
            Workers::Count(n) => n,
        };
        tracing::info!(
            "allowed CPUs: {} ({} CPUs); starting {count} workers",
            format_cpu_list(&cpus),
            cpus.len()
        );
        if count > cpus.len() {
            tracing::warn!(
                "workers = {count} exceeds the {} allowed CPUs: some CPUs get two workers, which then compete",
                cpus.len()
            );
        }
        let mut groups = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let group = ReuseportGroup::bind(l, count)?;
            tracing::info!(
                "listener {} bound to {} ({count} sockets, receive buffer {} bytes)",
                group.name,
                group.addr,
                group.effective_recv_buffer
            );
            if let Some(fix) = rmem_fix(l.recv_buffer, group.effective_recv_buffer) {
                tracing::warn!(
                    "listener {}: recv_buffer = {} was clamped by the kernel to {}; to allow it: {fix}",
                    l.name,
                    l.recv_buffer,
                    group.effective_recv_buffer
                );
            }
            group.steer(l)?;
            groups.push(group);
        }
        let capacity = count.max(
            nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_CONF)
                .ok()
                .flatten()
                .unwrap_or(1) as usize,
        );
        let max_sessions: usize = config.listeners.iter().map(|l| l.max_sessions).sum();
        let (region, stats_file, stats_path) = create_stats(
            &config.stats_file,
            capacity,
            owners::capacity_for(max_sessions, count),
        )?;
        let handoff = (0..count)
            .map(|_| handoff_pair())
            .collect::<io::Result<Vec<_>>>()
            .map_err(SupervisorError::Poll)?;
        tracing::info!("stats at {}", stats_path.display());
        region.set_header(Header::SupervisorPid, std::process::id() as u64);
        region.set_header(Header::StartedAt, unix_now());
        region.set_header(Header::ConfigGeneration, 1);
        region.set_header(Header::Workers, count as u64);

        let poll = Poll::new().map_err(SupervisorError::Poll)?;
        let mut signals =
            Signals::new([SIGTERM, SIGINT, SIGHUP, SIGCHLD]).map_err(SupervisorError::Poll)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(SupervisorError::Poll)?;
        let exe = std::env::current_exe().map_err(SupervisorError::Exe)?;
        let workers = (0..count)
            .map(|id| WorkerSlot {
                id,
                cpu: cpus[id % cpus.len()],
                state: WorkerState::Exited,
                child: None,
                control: None,
                frames: FrameReader::default(),
                started_at: Instant::now(),
                restart_at: None,
                backoff: Duration::ZERO,
            })
            .collect();
        let mut sup = Supervisor {
            origin,
            text,
            groups,
            region,
            stats_file,
            handoff,
            workers,
            poll,
            signals,
            exe,
            announced_ready: false,
            stop_deadline: None,
        };
        for id in 0..count {
            sup.spawn(id)?;
        }
        Ok(sup)
    }

    /// Serves until stopped; returns once every worker has exited.
    pub fn run(mut self) -> Result<(), SupervisorError> {
        let mut events = Events::with_capacity(64);
        loop {
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SupervisorError::Poll(e)),
            }
            for event in events.iter() {
                match event.token() {
                    SIGNALS => self.handle_signals(),
                    Token(t) => self.read_control(t - CONTROL_TOKEN_BASE),
                }
            }
            self.reap();
            if self.stop_deadline.is_some() {
                if self.workers.iter().all(|w| w.child.is_none()) {
                    tracing::info!("all workers exited; bye");
                    return Ok(());
                }
                if self.stop_deadline.is_some_and(|d| Instant::now() >= d) {
                    self.kill_all();
                }
                continue;
            }
            self.restart_due()?;
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let restart = self.workers.iter().filter_map(|w| w.restart_at).min();
        match (restart, self.stop_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn spawn(&mut self, id: usize) -> Result<(), SupervisorError> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|source| SupervisorError::Spawn { id, source })?;
        let spec = WorkerSpec {
            id,
            cpu: self.workers[id].cpu,
            control_fd: theirs.as_raw_fd(),
            stats_fd: self.stats_file.as_raw_fd(),
            listener_fds: self
                .groups
                .iter()
                .map(|g| g.sockets[id].as_raw_fd())
                .collect(),
            handoff_fd: self.handoff[id].0.as_raw_fd(),
            peer_fds: self.handoff.iter().map(|(_, tx)| tx.as_raw_fd()).collect(),
        };
        let child = spawn_worker(&self.exe, &spec)
            .map_err(|source| SupervisorError::Spawn { id, source })?;
        drop(theirs);
        let start = ControlMsg::Start {
            origin: self.origin.clone(),
            config: self.text.clone(),
        };
        // The socket buffer holds the config: a worker that died before
        // reading it shows up as a reaped child, not as a write error here.
        let _ = (&ours).write_all(&start.encode());
        ours.set_nonblocking(true)
            .map_err(|source| SupervisorError::Spawn { id, source })?;
        let fd = ours.as_raw_fd();
        self.poll
            .registry()
            .register(
                &mut SourceFd(&fd),
                Token(CONTROL_TOKEN_BASE + id),
                Interest::READABLE,
            )
            .map_err(SupervisorError::Poll)?;
        let slot = self.region.slot(id).expect("region sized for every worker");
        slot.set(Counter::Pid, u64::from(child.id()));
        slot.set(Counter::Cpu, self.workers[id].cpu as u64);
        slot.add(Counter::Generation, 1);
        slot.set(Counter::State, SlotState::Starting as u64);
        let w = &mut self.workers[id];
        tracing::debug!(worker = id, pid = child.id(), cpu = w.cpu, "spawned");
        w.child = Some(child);
        w.control = Some(ours);
        w.frames = FrameReader::default();
        w.state = WorkerState::Starting;
        w.started_at = Instant::now();
        w.restart_at = None;
        Ok(())
    }

    fn read_control(&mut self, id: usize) {
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        let Some(control) = w.control.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match control.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => w.frames.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        while let Some(msg) = w.frames.next_msg() {
            match msg {
                Ok(ControlMsg::Ready) => {
                    w.state = WorkerState::Ready;
                    tracing::info!(
                        worker = id,
                        cpu = w.cpu,
                        pid = w.child.as_ref().map(|c| c.id()),
                        "worker ready"
                    );
                }
                Ok(ControlMsg::Fatal { message }) => {
                    tracing::error!(worker = id, "worker failed: {message}")
                }
                Ok(other) => tracing::warn!(worker = id, "unexpected control message {other:?}"),
                Err(e) => tracing::warn!(worker = id, "bad control stream: {e}"),
            }
        }
        if !self.announced_ready && self.workers.iter().all(|w| w.state == WorkerState::Ready) {
            self.announced_ready = true;
            let addrs: Vec<String> = self
                .groups
                .iter()
                .map(|g| format!("{}@{}", g.name, g.addr))
                .collect();
            tracing::info!(
                "ready: {} workers serving {}",
                self.workers.len(),
                addrs.join(" ")
            );
            notify("READY=1");
        }
    }

    fn handle_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            match signal {
                SIGTERM | SIGINT => self.begin_stop(signal),
                SIGHUP => tracing::warn!("SIGHUP: configuration reload is not supported yet; still serving the current config"),
                // SIGCHLD: reaped after every wakeup.
                _ => {}
            }
        }
    }

    fn begin_stop(&mut self, signal: i32) {
        if self.stop_deadline.is_some() {
            return;
        }
        tracing::info!("signal {signal}: stopping {} workers", self.workers.len());
        notify("STOPPING=1");
        self.stop_deadline = Some(Instant::now() + STOP_TIMEOUT);
        for w in &mut self.workers {
            w.restart_at = None;
            if let Some(control) = w.control.as_mut() {
                let _ = control.write_all(&ControlMsg::Stop.encode());
            }
        }
    }

    fn kill_all(&mut self) {
        for w in &mut self.workers {
            if let Some(child) = w.child.as_mut() {
                tracing::warn!(worker = w.id, "did not stop in time; killing it");
                let _ = child.kill();
            }
        }
        self.stop_deadline = Some(Instant::now() + Duration::from_millis(200));
    }

    /// Collects every exited child and schedules its replacement.
    fn reap(&mut self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let Some(pid) = status.pid() else {
                return;
            };
            let Some(w) = self.workers.iter_mut().find(|w| {
                w.child
                    .as_ref()
                    .is_some_and(|c| c.id() as i32 == pid.as_raw())
            }) else {
                // Not a worker: as PID 1 in a container we reap orphans too.
                continue;
            };
            w.child = None;
            if let Some(control) = w.control.take() {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&control.as_raw_fd()));
            }
            w.state = WorkerState::Exited;
            let slot = self
                .region
                .slot(w.id)
                .expect("region sized for every worker");
            slot.set(Counter::State, SlotState::Exited as u64);
            if self.stop_deadline.is_some() {
                tracing::info!(worker = w.id, "exited: {}", describe(&status));
                continue;
            }
            let ran = w.started_at.elapsed();
            w.backoff = if ran >= HEALTHY_RUN {
                Duration::ZERO
            } else if w.backoff.is_zero() {
                FIRST_BACKOFF
            } else {
                (w.backoff * 2).min(MAX_BACKOFF)
            };
            w.restart_at = Some(Instant::now() + w.backoff);
            slot.add(Counter::Restarts, 1);
            tracing::warn!(
                worker = w.id,
                cpu = w.cpu,
                "died ({}) after {:.1}s; restarting in {:?}",
                describe(&status),
                ran.as_secs_f64(),
                w.backoff
            );
        }
    }

    fn restart_due(&mut self) -> Result<(), SupervisorError> {
        let now = Instant::now();
        let due: Vec<usize> = self
            .workers
            .iter()
            .filter(|w| w.restart_at.is_some_and(|t| t <= now))
            .map(|w| w.id)
            .collect();
        for id in due {
            self.spawn(id)?;
        }
        Ok(())
    }
}

/// Creates the stats region; a default path the user may not write falls
/// back to a per-user one (see `stats_path`).
fn create_stats(
    path: &std::path::Path,
    slots: usize,
    owners: usize,
) -> Result<(StatsRegion, File, PathBuf), SupervisorError> {
    let first = match StatsRegion::create(path, slots, owners) {
        Ok((region, file)) => return Ok((region, file, path.to_path_buf())),
        Err(e) => e,
    };
    let denied = matches!(&first, StatsError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied);
    if !denied || path != std::path::Path::new(udpshard_config::DEFAULT_STATS_FILE) {
        return Err(first.into());
    }
    for fallback in crate::stats_path::default_candidates().iter().skip(1) {
        if let Ok((region, file)) = StatsRegion::create(fallback, slots, owners) {
            tracing::warn!(
                "{first}; using {} instead (`udpshard stats` looks there too)",
                fallback.display()
            );
            return Ok((region, file, fallback.clone()));
        }
    }
    Err(first.into())
}

/// How many bytes of handoff frames may wait in one worker's inbox. The
/// sending end's send buffer is the limit (a socketpair's peers skip
/// net.unix.max_dgram_qlen, 10 by default); a frame costs about 1 KiB of
/// kernel memory, so this holds a burst of several thousand.
const HANDOFF_BUFFER: usize = 4 << 20;

/// A worker's inbox and the sending end every worker uses.
fn handoff_pair() -> io::Result<(UnixDatagram, UnixDatagram)> {
    let (inbox, tx) = UnixDatagram::pair()?;
    let sock = socket2::SockRef::from(&tx);
    // SO_SNDBUFFORCE passes wmem_max where we may (CAP_NET_ADMIN); else
    // the kernel clamps to wmem_max.
    if sock.set_send_buffer_size(HANDOFF_BUFFER).is_ok()
        && sock.send_buffer_size().unwrap_or(0) < HANDOFF_BUFFER
    {
        let _ = crate::reuseport::force_buffer(&tx, libc::SO_SNDBUFFORCE, HANDOFF_BUFFER);
    }
    Ok((inbox, tx))
}

fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit code {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("killed by {}", Signal::as_str(*signal)),
        other => format!("{other:?}"),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
