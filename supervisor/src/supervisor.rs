//! The supervisor: owns the listener sockets and the stats region, spawns one
//! pinned worker per slot, restarts the ones that die, applies reloads and
//! CPU-set changes, and drains everything on SIGTERM/SIGINT. It never
//! touches a datagram.
//!
//! Worker lifecycle, per slot:
//! `Starting` (spawned, config sent) -> `Ready` (said so on its control
//! channel) -> `Exited` (reaped) -> `Starting` again after a backoff that
//! doubles while it keeps crashing, unless the supervisor is stopping or the
//! slot is retiring (the group shrank; slots go from the end only).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook_mio::v1_0::Signals;
use udpshard_config::{self as config, Config, Workers};
use udpshard_shared::backends::BackendState;
use udpshard_shared::control::{ControlChannel, ControlMsg};
use udpshard_shared::owners;
use udpshard_shared::owners::Owner;
use udpshard_shared::state::StateRegion;
use udpshard_shared::stats::{Counter, Header, SlotState, StatsError, StatsRegion};

use crate::cpus::{allowed_cpus, format_cpu_list};
use crate::notify::{notify, notify_ready};
use crate::reuseport::{rmem_fix, ReuseportGroup};
use crate::spawn::{spawn_worker, WorkerSpec};

mod reload;
mod upgrade;

const SIGNALS: Token = Token(0);
/// This process's own executable, even once its path holds another file.
const RUNNING_IMAGE: &str = "/proc/self/exe";
const CONTROL_TOKEN_BASE: usize = 1;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before dying was healthy: restart at once.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// Beyond the drain timeout, how long workers get before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often the allowed CPU set is re-read (`docker update --cpuset-cpus`
/// changes it at run time, with no signal).
const CPU_CHECK: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot read the allowed CPU set: {0}")]
    Affinity(nix::Error),
    #[error(transparent)]
    Group(#[from] crate::reuseport::GroupError),
    #[error("stats file: {0}")]
    Stats(#[from] udpshard_shared::stats::StatsError),
    #[error("{0}")]
    State(udpshard_shared::state::StateError),
    #[error(
        "upstream_sources: more than {} distinct source addresses across listeners",
        udpshard_shared::state::SOURCE_ROWS
    )]
    Sources,
    #[error("cannot find the udpshard executable to start workers: {0}")]
    Exe(io::Error),
    #[error("a worker's handoff inbox: {0}")]
    Inbox(io::Error),
    #[error("event loop: {0}")]
    Poll(io::Error),
    #[error("cannot start worker {id}: {source}")]
    Spawn { id: usize, source: io::Error },
    #[error("no worker could start (each failure is logged above)")]
    NoWorker,
    #[error("upgrade: {0}")]
    Upgrade(String),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
}

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    Stopped,
    /// A binary upgrade: the new generation serves.
    HandedOver,
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
    control: Option<ControlChannel>,
    started_at: Instant,
    restart_at: Option<Instant>,
    backoff: Duration,
    /// Crashes in a row, each within HEALTHY_RUN of its start.
    crashes: u32,
    /// The config generation it was given.
    config_gen: u64,
    /// The group shrank past it: stopped, not restarted, removed on exit.
    retiring: bool,
}

pub struct Supervisor {
    /// `None`: the embedded default.
    config_path: Option<PathBuf>,
    config: Config,
    origin: String,
    text: String,
    config_gen: u64,
    /// One reuseport group per listener, in config order.
    groups: Vec<ReuseportGroup>,
    /// Per worker slot: its handoff inbox and the sending end the others
    /// use. Held here for the supervisor's life, so a restarted worker gets
    /// the same inbox (and whatever was queued in it).
    handoff: Vec<(UnixDatagram, UnixDatagram)>,
    region: StatsRegion,
    stats_file: File,
    /// The state region (ownership table, port leases), shared with the
    /// workers only.
    state: StateRegion,
    state_fd: OwnedFd,
    workers: Vec<WorkerSlot>,
    cpus: Vec<usize>,
    poll: Poll,
    signals: Signals,
    exe: PathBuf,
    announced_ready: bool,
    /// Set by SIGTERM/SIGINT: when to kill what is still running.
    stop_deadline: Option<Instant>,
    next_cpu_check: Instant,
    next_health_check: Instant,
    health: crate::health::Health,
    /// The Prometheus endpoint, when the config asks for one.
    metrics: Option<crate::metrics::MetricsServer>,
    /// A binary upgrade this supervisor started: the new one, on its way.
    outbound: Option<upgrade::Outbound>,
    /// This supervisor is the new generation of an upgrade, standing by.
    inbound: Option<upgrade::Inbound>,
    /// Where the stats file is (a new generation inherits it).
    stats_path: PathBuf,
    /// Whether this process serves the slots: a new generation does once it
    /// has taken over (until then the stats file is the old one's).
    serving: bool,
    /// Slot generations an abandoned upgrade's successors had: the slot's
    /// next worker comes after them, and what they leased cools.
    burned: Vec<(usize, u64)>,
    /// SIGUSR2s refused by this process: numbers their STATUS= (see
    /// `refuse_upgrade`).
    upgrades_refused: u64,
}

/// The path this binary was started by (the path a package upgrade puts
/// the new version at, a symlink left unresolved), else the resolved one.
fn own_path() -> io::Result<PathBuf> {
    match std::env::args_os().next().map(PathBuf::from) {
        Some(p) if p.is_absolute() => Ok(p),
        _ => std::env::current_exe(),
    }
}

/// The signals the supervisor acts on.
fn signals() -> io::Result<Signals> {
    Signals::new([SIGTERM, SIGINT, SIGHUP, SIGCHLD, SIGUSR2])
}

fn worker_count(config: &Config, cpus: &[usize]) -> usize {
    match config.workers {
        Workers::Auto => cpus.len().max(1),
        Workers::Count(n) => n,
    }
}

impl Supervisor {
    /// Binds every listener, creates the stats region and starts the workers.
    pub fn start(
        config: Config,
        config_path: Option<PathBuf>,
        origin: String,
        text: String,
    ) -> Result<Supervisor, SupervisorError> {
        let cpus = allowed_cpus().map_err(SupervisorError::Affinity)?;
        let count = worker_count(&config, &cpus);
        tracing::info!(
            "allowed CPUs: {} ({} {}); starting {count} {}",
            format_cpu_list(&cpus),
            cpus.len(),
            if cpus.len() == 1 { "CPU" } else { "CPUs" },
            if count == 1 { "worker" } else { "workers" },
        );
        warn_oversubscribed(count, &cpus);
        crate::doctor::warn_cpu_quota(count);
        let mut groups = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            groups.push(bind_group(l, count)?);
        }
        // Room for every CPU the machine has, so a grown CPU set or a
        // reload to more workers needs no new region.
        let capacity = count.max(
            nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_CONF)
                .ok()
                .flatten()
                .unwrap_or(1) as usize,
        );
        let max_sessions: usize = config.listeners.iter().map(|l| l.max_sessions).sum();
        let (region, stats_file, stats_path) = create_stats(&config.stats_file, capacity)?;
        let (state, state_fd) = StateRegion::create(owners::capacity_for(max_sessions, capacity))
            .map_err(SupervisorError::State)?;
        register_sources(&state, &config)?;
        register_backends(&region, &config);
        crate::capacity::warn_at_start(&config, count);
        let handoff = (0..count)
            .map(|_| handoff_pair())
            .collect::<io::Result<Vec<_>>>()
            .map_err(SupervisorError::Poll)?;
        tracing::info!("stats at {}", stats_path.display());
        region.set_header(Header::SupervisorPid, std::process::id() as u64);
        region.set_header(Header::SupervisorVersion, crate::version_word());
        region.set_header(
            Header::SupervisorStartTicks,
            crate::process::start_ticks(std::process::id()).unwrap_or(0),
        );
        region.set_header(
            Header::SupervisorPidNs,
            crate::process::pid_namespace().unwrap_or(0),
        );
        region.set_header(
            Header::SupervisorHeartbeat,
            udpshard_shared::clock::monotonic_ns(),
        );
        region.set_header(Header::StartedAt, unix_now());
        region.set_header(Header::ConfigGeneration, 1);
        region.set_workers(count);

        let poll = Poll::new().map_err(SupervisorError::Poll)?;
        let mut signals = signals().map_err(SupervisorError::Poll)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(SupervisorError::Poll)?;
        let exe = own_path().map_err(SupervisorError::Exe)?;
        let metrics = match config.metrics {
            None => None,
            Some(addr) => {
                let server =
                    crate::metrics::MetricsServer::bind(addr, poll.registry(), &stats_file)
                        .map_err(|source| SupervisorError::Metrics { addr, source })?;
                tracing::info!("metrics at http://{}/metrics", server.addr);
                Some(server)
            }
        };
        let workers = (0..count)
            .map(|id| WorkerSlot::new(id, cpus[id % cpus.len()]))
            .collect();
        let mut sup = Supervisor {
            config_path,
            config,
            origin,
            text,
            config_gen: 1,
            groups,
            handoff,
            region,
            stats_file,
            state,
            state_fd,
            workers,
            cpus,
            poll,
            signals,
            exe,
            announced_ready: false,
            stop_deadline: None,
            next_cpu_check: Instant::now() + CPU_CHECK,
            next_health_check: Instant::now() + crate::health::CHECK,
            health: crate::health::Health::default(),
            metrics,
            outbound: None,
            inbound: None,
            stats_path,
            serving: true,
            burned: Vec::new(),
            upgrades_refused: 0,
        };
        sup.steer_groups()?;
        for id in 0..count {
            sup.spawn_or_retry(id);
        }
        if sup.workers.iter().all(|w| w.child.is_none()) {
            // Not one worker could start: say so, rather than serve nothing.
            return Err(SupervisorError::NoWorker);
        }
        Ok(sup)
    }

    /// Serves until stopped; returns once every worker has exited. The stats
    /// file records when, so `udpshard stats` can tell a stopped proxy from
    /// a running one.
    pub fn run(mut self) -> Result<(), SupervisorError> {
        let result = self.serve();
        // Handed over to a new generation, the proxy runs on; one that never
        // took over leaves the file to the generation that serves.
        if self.serving && !matches!(result, Ok(Served::HandedOver)) {
            self.region.set_header(Header::StoppedAt, unix_now());
        }
        result.map(|_| ())
    }

    fn serve(&mut self) -> Result<Served, SupervisorError> {
        let mut events = Events::with_capacity(64);
        loop {
            let timeout = self
                .next_deadline()
                .saturating_duration_since(Instant::now());
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SupervisorError::Poll(e)),
            }
            self.region.set_header(
                Header::SupervisorHeartbeat,
                udpshard_shared::clock::monotonic_ns(),
            );
            for event in events.iter() {
                match event.token() {
                    SIGNALS => self.handle_signals(),
                    upgrade::UPGRADE => {
                        if self.read_upgrade()? {
                            return Ok(Served::HandedOver);
                        }
                    }
                    t if crate::metrics::owns(t) => {
                        if let Some(m) = self.metrics.as_mut() {
                            m.handle(self.poll.registry(), t);
                        }
                    }
                    Token(t) => self.read_control(t - CONTROL_TOKEN_BASE),
                }
            }
            // Nothing here ends the proxy: a failure is logged, and the
            // workers that run keep serving.
            if let Err(e) = self.reap() {
                if matches!(e, SupervisorError::Upgrade(_)) {
                    return Err(e);
                }
                tracing::error!("after a worker exited: {e}");
            }
            if self.check_upgrade()? {
                return Ok(Served::HandedOver);
            }
            if let Some(deadline) = self.stop_deadline {
                if self.workers.iter().all(|w| w.child.is_none()) {
                    tracing::info!("all workers exited; bye");
                    return Ok(Served::Stopped);
                }
                if Instant::now() >= deadline {
                    self.kill_all();
                }
                continue;
            }
            if !self.upgrading() {
                self.restart_due();
            }
            // The timers run on through an upgrade (a timer left due would
            // make every poll return at once); what they do waits. Standing
            // by, the old generation's supervisor judges backends.
            if Instant::now() >= self.next_health_check {
                self.next_health_check = Instant::now() + crate::health::CHECK;
                if self.inbound.is_none() {
                    self.check_health();
                }
            }
            if Instant::now() >= self.next_cpu_check {
                self.next_cpu_check = Instant::now() + CPU_CHECK;
                if !self.upgrading() {
                    if let Err(e) = self.check_cpus() {
                        tracing::error!(
                            "following the allowed CPU set: {e}; trying again in {CPU_CHECK:?}"
                        );
                    }
                }
            }
        }
    }

    /// Passive health: reads the workers' per-backend counters from the
    /// stats file and moves backends between up and down.
    fn check_health(&mut self) {
        let now_ms = udpshard_shared::clock::monotonic_ns() / 1_000_000;
        let changes = self.health.check(&self.config, &self.region, now_ms);
        if !changes.is_empty() {
            let generation = self.region.header(Header::HealthGeneration) + 1;
            self.region.set_header(Header::HealthGeneration, generation);
        }
        for c in changes {
            if c.down {
                tracing::warn!(
                    "listener {}: backend {} is down for new sessions: {}",
                    c.listener,
                    c.addr,
                    c.why
                );
            } else {
                tracing::info!(
                    "listener {}: backend {} is up: {}",
                    c.listener,
                    c.addr,
                    c.why
                );
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        // Restarts wait while an upgrade runs: their times are not due.
        let restart = self
            .workers
            .iter()
            .filter_map(|w| w.restart_at)
            .min()
            .filter(|_| !self.upgrading());
        [
            restart,
            self.stop_deadline,
            self.upgrade_deadline(),
            Some(self.next_cpu_check),
            Some(self.next_health_check),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| Instant::now() + CPU_CHECK)
    }

    fn spawn(&mut self, id: usize) -> Result<(), SupervisorError> {
        // The new generation is published before the process exists: the
        // worker takes its identity from it. Taking over from an old
        // generation, the slot is the old process's until it has handed
        // over: the worker is told its generation, and stands by.
        let standby = self.inbound.as_ref().map(|i| i.generation(id));
        if let Some(slot) = self.region.slot(id).filter(|_| standby.is_none()) {
            slot.set_life(slot.life().0 + 1, SlotState::Starting);
            slot.set(Counter::Cpu, self.workers[id].cpu as u64);
            slot.set(Counter::Version, crate::version_word());
        }
        let predecessor_fd = self.inbound.as_ref().and_then(|i| i.predecessor_fd(id));
        let (ours, theirs) =
            UnixStream::pair().map_err(|source| SupervisorError::Spawn { id, source })?;
        let spec = WorkerSpec {
            id,
            cpu: self.workers[id].cpu,
            control_fd: theirs.as_raw_fd(),
            stats_fd: self.stats_file.as_raw_fd(),
            state_fd: self.state_fd.as_raw_fd(),
            listener_fds: self
                .groups
                .iter()
                .map(|g| g.sockets[id].as_raw_fd())
                .collect(),
            handoff_fd: self.handoff[id].0.as_raw_fd(),
            peer_fds: self.handoff.iter().map(|(_, tx)| tx.as_raw_fd()).collect(),
            standby,
            predecessor_fd,
        };
        // The image this process runs, whatever the path holds now: a
        // package upgrade replaces the file, and a worker restarted after it
        // must still speak this supervisor's protocol (SIGUSR2 is what
        // moves the whole proxy to the new file).
        let mut child = spawn_worker(std::path::Path::new(RUNNING_IMAGE), &spec)
            .map_err(|source| SupervisorError::Spawn { id, source })?;
        drop(theirs);
        let control = match self.open_control(id, ours) {
            Ok(control) => control,
            Err(e) => {
                // No way to talk to it: it must not run on its own.
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        if let Some(slot) = self.region.slot(id).filter(|_| standby.is_none()) {
            slot.set(Counter::Pid, u64::from(child.id()));
        }
        let w = &mut self.workers[id];
        tracing::debug!(worker = id, pid = child.id(), cpu = w.cpu, "spawned");
        w.child = Some(child);
        w.control = Some(control);
        w.state = WorkerState::Starting;
        w.started_at = Instant::now();
        w.restart_at = None;
        w.config_gen = self.config_gen;
        Ok(())
    }

    /// The supervisor's end of worker `id`'s control channel, in the loop
    /// and with the worker's config on its way.
    fn open_control(
        &mut self,
        id: usize,
        ours: UnixStream,
    ) -> Result<ControlChannel, SupervisorError> {
        ours.set_nonblocking(true)
            .map_err(|source| SupervisorError::Spawn { id, source })?;
        let mut control = ControlChannel::new(ours);
        let start = ControlMsg::Start {
            origin: self.origin.clone(),
            config: self.text.clone(),
        };
        // A worker that died before reading it shows up as a reaped child.
        let _ = control.send(&start, &[]);
        // Writable too: a frame the socket had no room for goes out when
        // it has (the loop never waits for a worker to read).
        self.poll
            .registry()
            .register(
                &mut SourceFd(&control.stream.as_raw_fd()),
                Token(CONTROL_TOKEN_BASE + id),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(SupervisorError::Poll)?;
        Ok(control)
    }

    fn read_control(&mut self, id: usize) {
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        let Some(control) = w.control.as_mut() else {
            return;
        };
        if let Err(e) = control.flush() {
            tracing::debug!(worker = id, "control channel: {e}");
        }
        let _ = control.read_available();
        let mut became_ready = false;
        let mut became_standby = false;
        let mut upgrade_steps = Vec::new();
        while let Some(msg) = control.next_msg() {
            match msg {
                Ok((ControlMsg::Ready, _)) if self.inbound.is_some() => {
                    // Standing by: the slot is the old generation's yet.
                    w.state = WorkerState::Ready;
                    tracing::debug!(worker = id, "standing by");
                    became_standby = true;
                }
                Ok((msg @ (ControlMsg::Quiesced | ControlMsg::HandedOver { .. }), _)) => {
                    upgrade_steps.push(msg);
                }
                Ok((ControlMsg::Ready, _)) => {
                    w.state = WorkerState::Ready;
                    if let Some(slot) = self.region.slot(id) {
                        slot.set(Counter::ConfigGeneration, w.config_gen);
                        // A shrink or a stop that came while it started
                        // stands: it is published as leaving, not as ready.
                        slot.set_state(if w.retiring {
                            SlotState::Retiring
                        } else if self.stop_deadline.is_some() {
                            SlotState::Draining
                        } else {
                            SlotState::Ready
                        });
                    }
                    if let Err(e) = control.send(&ControlMsg::Live, &[]) {
                        tracing::warn!(worker = id, "cannot tell the worker it is live: {e}");
                    }
                    became_ready = true;
                    tracing::info!(
                        worker = id,
                        cpu = w.cpu,
                        pid = w.child.as_ref().map(|c| c.id()),
                        "worker ready"
                    );
                }
                Ok((ControlMsg::Reloaded, _)) => {
                    if let Some(slot) = self.region.slot(id) {
                        slot.set(Counter::ConfigGeneration, w.config_gen);
                    }
                }
                Ok((other, _)) => {
                    tracing::warn!(worker = id, "unexpected control message {other:?}")
                }
                Err(e) => tracing::warn!(worker = id, "bad control stream: {e}"),
            }
        }
        for msg in upgrade_steps {
            self.upgrade_step_done(id, &msg);
        }
        if became_standby {
            self.standby_ready();
            return;
        }
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        // Started before a reload: it serves the old config; bring it up to date.
        if became_ready && w.config_gen != self.config_gen {
            self.send_reload(id);
        }
        if !self.announced_ready && self.workers.iter().all(|w| w.state == WorkerState::Ready) {
            self.announced_ready = true;
            let addrs: Vec<String> = self
                .groups
                .iter()
                .map(|g| format!("{}@{}", g.name, g.addr))
                .collect();
            let n = self.workers.len();
            let message = format!(
                "ready: {n} {} serving {}",
                if n == 1 { "worker" } else { "workers" },
                addrs.join(" ")
            );
            tracing::info!("{message}");
            notify_ready(&message);
        }
    }

    fn handle_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            match signal {
                SIGTERM | SIGINT => self.begin_stop(signal),
                SIGHUP if self.stop_deadline.is_none() && self.upgrading() => {
                    tracing::warn!(
                        "SIGHUP during a binary upgrade: refused; reload again once it is done"
                    );
                }
                SIGHUP if self.stop_deadline.is_none() => self.reload(),
                SIGUSR2 => self.begin_upgrade(),
                // SIGCHLD: reaped after every wakeup.
                _ => {}
            }
        }
    }

    /// Stops taking new flows and lets live sessions finish for
    /// `drain_timeout`, then exits.
    fn begin_stop(&mut self, signal: i32) {
        if self.stop_deadline.is_some() {
            // A second Ctrl-C: the user does not want to wait for the drain.
            tracing::warn!("signal {signal} while draining: stopping the workers now");
            self.kill_all();
            return;
        }
        if self.inbound.is_some() {
            // Standing by to take over: the old generation still serves,
            // and goes on serving once this one is gone.
            tracing::warn!("signal {signal} while taking over: giving the upgrade up");
            let _ = self.fail_inbound(&format!("the new supervisor got signal {signal}"));
            self.kill_all();
            return;
        }
        if self.outbound.is_some() {
            self.abandon_upgrade(&format!("signal {signal}: stopping instead"));
        }
        let timeout = self.config.drain_timeout;
        tracing::info!(
            "signal {signal}: draining {} workers for up to {:?}",
            self.workers.len(),
            timeout
        );
        notify("STOPPING=1");
        self.stop_deadline = Some(Instant::now() + timeout + STOP_GRACE);
        let drain = ControlMsg::Drain {
            timeout_ms: timeout.as_millis() as u64,
        };
        for w in &mut self.workers {
            w.restart_at = None;
            if let Some(control) = w.control.as_mut() {
                let _ = control.send(&drain, &[]);
                if let Some(slot) = self.region.slot(w.id) {
                    if slot.life().1 == SlotState::Ready {
                        slot.set_state(SlotState::Draining);
                    }
                }
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
    fn reap(&mut self) -> Result<(), SupervisorError> {
        let handing_over = self.handing_over();
        let mut reaped = Vec::new();
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => status,
            };
            let Some(pid) = status.pid() else {
                break;
            };
            if self.successor_exited(pid.as_raw(), &describe(&status)) {
                continue;
            }
            let Some(w) = self.workers.iter_mut().find(|w| {
                w.child
                    .as_ref()
                    .is_some_and(|c| c.id() as i32 == pid.as_raw())
            }) else {
                // Not a worker: as PID 1 in a container we reap orphans too
                // (the new generation of an upgrade is `check_upgrade`'s).
                continue;
            };
            // Standing by (or given up before taking over), the slot is the
            // old generation's: nothing of it is this process's to write.
            if self.inbound.is_some() || !self.serving {
                w.child = None;
                if self.inbound.is_some() {
                    let why = format!(
                        "worker {} died while standing by ({})",
                        w.id,
                        describe(&status)
                    );
                    return Err(self.fail_inbound(&why));
                }
                continue;
            }
            reaped.push(w.id);
            w.child = None;
            if let Some(control) = w.control.take() {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&control.stream.as_raw_fd()));
            }
            w.state = WorkerState::Exited;
            if let Some(slot) = self.region.slot(w.id) {
                slot.set_state(SlotState::Exited);
                // What it had taken in and not yet sent on died with it:
                // booked from its own ledger, so that every datagram it read
                // stays counted (the slot's next worker continues the ledger).
                let (lost, lost_replies) = worker_lost(&slot);
                slot.add(Counter::DropWorkerLost, lost);
                slot.add(Counter::DropWorkerLostReply, lost_replies);
                if lost + lost_replies > 0 {
                    tracing::warn!(
                        worker = w.id,
                        "{lost} client datagrams and {lost_replies} replies it had read were \
                         lost with it (drops.worker_lost, drops.worker_lost_reply)"
                    );
                }
                // Its upstream sockets closed with it, some with live paths:
                // their ports wait out the reuse delay before anyone leases
                // them again (a copy another worker borrowed keeps its port
                // bound, and that worker adopts it).
                let dead = Owner::new(w.id, slot.life().0);
                let until = udpshard_shared::clock::monotonic_ns() / 1_000_000
                    + max_reuse_delay_ms(&self.config);
                let cooled = self.state.leases().cool_dead(|o| o == dead, until);
                tracing::debug!(worker = w.id, "{cooled} upstream ports cool after its exit");
                // An abandoned upgrade's successor of this slot: its
                // generation is spent, its leases cool too.
                if let Some(at) = self.burned.iter().position(|(id, _)| *id == w.id) {
                    let (_, spent) = self.burned.swap_remove(at);
                    let successor = Owner::new(w.id, spent);
                    self.state.leases().cool_dead(|o| o == successor, until);
                    slot.set_life(spent, SlotState::Exited);
                }
            }
            if self.stop_deadline.is_some() || w.retiring || handing_over {
                tracing::info!(worker = w.id, "exited: {}", describe(&status));
                continue;
            }
            let ran = w.started_at.elapsed();
            // The first crash is replaced at once (its socket is filling);
            // one that keeps crashing waits 100 ms, 200 ms, ... up to 30 s.
            w.crashes = if ran >= HEALTHY_RUN { 1 } else { w.crashes + 1 };
            w.backoff = restart_backoff(w.crashes);
            w.restart_at = Some(Instant::now() + w.backoff);
            if let Some(slot) = self.region.slot(w.id) {
                slot.add(Counter::Restarts, 1);
            }
            tracing::warn!(
                worker = w.id,
                cpu = w.cpu,
                "died ({}) after {:.1}s; restarting in {:?}",
                describe(&status),
                ran.as_secs_f64(),
                w.backoff
            );
        }
        for id in reaped {
            self.upgrade_reaped(id);
        }
        if !handing_over
            && self.outbound.is_some()
            && self.workers.iter().any(|w| w.child.is_none())
        {
            // Nothing has moved yet: the upgrade is given up, and the dead
            // worker restarts as after any crash.
            self.abandon_upgrade("a worker died while the new binary started");
        }
        self.remove_retired()
    }

    fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .workers
            .iter()
            .filter(|w| w.restart_at.is_some_and(|t| t <= now))
            .map(|w| w.id)
            .collect();
        for id in due {
            self.spawn_or_retry(id);
        }
    }

    /// Starts slot `id`'s worker; when that fails (fork, EMFILE, ENOMEM,
    /// an executable gone), the slot backs off and tries again, as after a
    /// crash, while the other workers keep serving.
    pub(super) fn spawn_or_retry(&mut self, id: usize) {
        let Err(e) = self.spawn(id) else {
            return;
        };
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        w.crashes = w.crashes.saturating_add(1).max(2);
        w.backoff = restart_backoff(w.crashes);
        w.restart_at = Some(Instant::now() + w.backoff);
        w.state = WorkerState::Exited;
        if let Some(slot) = self.region.slot(id) {
            slot.set_state(SlotState::Exited);
        }
        tracing::error!(worker = id, "{e}; trying again in {:?}", w.backoff);
    }
}

impl WorkerSlot {
    fn new(id: usize, cpu: usize) -> WorkerSlot {
        WorkerSlot {
            id,
            cpu,
            state: WorkerState::Exited,
            child: None,
            control: None,
            started_at: Instant::now(),
            restart_at: None,
            backoff: Duration::ZERO,
            crashes: 0,
            config_gen: 0,
            retiring: false,
        }
    }
}

/// How long to wait before restarting a worker that crashed `crashes`
/// times in a row.
fn restart_backoff(crashes: u32) -> Duration {
    match crashes {
        0 | 1 => Duration::ZERO,
        n => FIRST_BACKOFF
            .saturating_mul(1 << (n - 2).min(16))
            .min(MAX_BACKOFF),
    }
}

fn warn_oversubscribed(count: usize, cpus: &[usize]) {
    if count > cpus.len() {
        tracing::warn!(
            "workers = {count} exceeds the {} allowed CPUs: some CPUs get two workers, which then compete",
            cpus.len()
        );
    }
}

/// Binds a listener's group of `count` sockets and reports what it got.
fn bind_group(l: &config::Listener, count: usize) -> Result<ReuseportGroup, SupervisorError> {
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
    Ok(group)
}

/// Creates the stats region; a default path the user may not write falls
/// back to a per-user one (see `stats_path`).
fn create_stats(
    path: &std::path::Path,
    slots: usize,
) -> Result<(StatsRegion, File, PathBuf), SupervisorError> {
    let first = match StatsRegion::create(path, slots) {
        Ok((region, file)) => return Ok((region, file, path.to_path_buf())),
        Err(e) => e,
    };
    let denied = matches!(&first, StatsError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied);
    if !denied || path != std::path::Path::new(udpshard_config::DEFAULT_STATS_FILE) {
        return Err(first.into());
    }
    for fallback in crate::stats_path::default_candidates().iter().skip(1) {
        if let Ok((region, file)) = StatsRegion::create(fallback, slots) {
            tracing::warn!(
                "{first}; using {} instead (`udpshard stats` looks there too)",
                fallback.display()
            );
            return Ok((region, file, fallback.clone()));
        }
    }
    Err(first.into())
}

/// Gives every upstream source address of `config` a lease row in the state
/// region (workers look them up; only the supervisor writes the registry).
pub(crate) fn register_sources(
    state: &StateRegion,
    config: &Config,
) -> Result<(), SupervisorError> {
    for l in &config.listeners {
        for ip in udpshard_worker::upstream_sources(l) {
            state.register_source(ip).ok_or(SupervisorError::Sources)?;
        }
    }
    Ok(())
}

/// Gives every backend of `config` its row of counters in the stats region
/// (the same row as before for one a reload keeps), and marks the rows of
/// backends it no longer has. Workers look their rows up when they apply
/// the config; a backend past the last row goes uncounted, said once.
pub(crate) fn register_backends(region: &StatsRegion, config: &Config) {
    let mut kept = Vec::new();
    for l in &config.listeners {
        for b in &l.backends {
            // A reload leaves a backend passive health took down as it is
            // (its revive clock runs on).
            let was = region
                .backend_row(&l.name, b.addr)
                .and_then(|row| region.backend_state(row));
            let state = match (b.weight, was) {
                (0, _) => BackendState::Draining,
                (_, Some(BackendState::Down)) => BackendState::Down,
                _ => BackendState::Up,
            };
            match region.register_backend(&l.name, b.addr, state, b.weight) {
                Some(row) => kept.push(row),
                None => tracing::warn!(
                    "listener {}: backend {} has no per-backend counters (all {} rows are taken; \
                     a restart frees the rows of removed backends)",
                    l.name,
                    b.addr,
                    udpshard_shared::backends::BACKEND_ROWS
                ),
            }
        }
    }
    for (row, meta) in region.backend_rows() {
        if meta.in_config && !kept.contains(&row) {
            region.set_backend(row, false, meta.state, meta.weight);
        }
    }
}

/// The longest `port_reuse_delay` of any listener: a dead worker's ports
/// cool this long.
pub(crate) fn max_reuse_delay_ms(config: &Config) -> u64 {
    config
        .listeners
        .iter()
        .map(|l| l.port_reuse_delay.as_millis() as u64)
        .max()
        .unwrap_or(0)
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
        let _ = nix::sys::socket::setsockopt(
            &tx,
            nix::sys::socket::sockopt::SndBufForce,
            &HANDOFF_BUFFER,
        );
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

/// The client datagrams and the replies an exited worker's slot holds as
/// taken in and not settled: what died with the process.
fn worker_lost(slot: &udpshard_shared::stats::StatsSlot<'_>) -> (u64, u64) {
    use udpshard_shared::stats::{client_arrived, client_settled, replies_ledger};
    let get = |c| slot.get(c);
    let (replies_in, replies_settled) = replies_ledger(get);
    (
        client_arrived(get).saturating_sub(client_settled(get)),
        replies_in.saturating_sub(replies_settled),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_second_crash_and_is_capped() {
        let ms: Vec<u128> = (1..=12).map(|n| restart_backoff(n).as_millis()).collect();
        assert_eq!(
            ms,
            [0, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(restart_backoff(1000), MAX_BACKOFF);
    }
}
