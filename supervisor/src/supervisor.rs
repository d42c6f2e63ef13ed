//! The supervisor: owns the listener sockets and the stats region, spawns one
//! pinned worker per slot, restarts the ones that die, applies reloads and
//! CPU-set changes, and drains everything on SIGTERM/SIGINT. It never
//! touches a datagram.
//!
//! Its role (serving, handing off to a new binary, taking over from an old
//! one, stopping) and each slot's process (live, then exited and restarted
//! after a backoff that doubles while it keeps crashing, unless the
//! supervisor is stopping or the slot is retiring) are the enums of
//! `lifecycle`. The slots' processes are `workers`' job, a reload and a
//! resize `reload`'s, a binary upgrade `upgrade`'s.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook_mio::v1_0::Signals;
use udpshard_config::{self as config, Config, Workers};
use udpshard_shared::backends::BackendState;
use udpshard_shared::control::ControlMsg;
use udpshard_shared::owners;
use udpshard_shared::state::StateRegion;
use udpshard_shared::stats::{Header, Readiness, SlotState, StatsError, StatsRegion};

use crate::cpus::{allowed_cpus, format_cpu_list};
use crate::notify::notify;
use crate::reuseport::{rmem_fix, ReuseportGroup};

mod lifecycle;
mod reload;
mod upgrade;
mod workers;

use lifecycle::{Role, WorkerSlot};

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
pub(crate) enum SupervisorError {
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
    #[error(transparent)]
    User(#[from] udpshard_worker::UserError),
    #[error("metrics endpoint {addr}: {source}{}", bind_denied_hint(source))]
    Metrics {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
}

/// EPERM from bind(2) is a cgroup's rule (systemd's SocketBindDeny=), not
/// the file permissions EACCES names: say which.
fn bind_denied_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EPERM) {
        " (a cgroup rule denies it, such as systemd's SocketBindDeny=: the packaged unit \
         allows TCP binds on port 9469 only; allow another port with a SocketBindAllow= \
         line in `systemctl edit udpshard`)"
    } else {
        ""
    }
}

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    Stopped,
    /// A binary upgrade: the new generation serves.
    HandedOver,
}

pub(crate) struct Supervisor {
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
    /// What this process does with the slots (`lifecycle`).
    role: Role,
    next_cpu_check: Instant,
    next_health_check: Instant,
    health: crate::health::Health,
    /// The Prometheus endpoint, when the config asks for one.
    metrics: Option<crate::metrics::MetricsServer>,
    /// Where the stats file is (a new generation inherits it).
    stats_path: PathBuf,
    /// SIGUSR2s refused by this process: numbers their STATUS= (see
    /// `refuse_upgrade`).
    upgrades_refused: u64,
    /// The supervisor's words of the stats region as of the end of its last
    /// loop pass (`save_stats`; `stats_scratch` is the next copy's room),
    /// and the region's repair count then: what a repair of a truncated
    /// file writes back (`check_stats_file`).
    stats_saved: Vec<u64>,
    stats_scratch: Vec<u64>,
    stats_repairs: u64,
}

/// The path this binary was started by (the path a package upgrade puts
/// the new version at, a symlink left unresolved), else the resolved one.
fn own_path() -> io::Result<PathBuf> {
    match std::env::args_os().next().map(PathBuf::from) {
        Some(p) if p.is_absolute() => Ok(p),
        _ => std::env::current_exe(),
    }
}

/// Applies the config's `user` (started as root: changes to it; started as
/// it: changes nothing; else refuses) and says who this process and its
/// workers run as.
pub(crate) fn run_as(config: &Config) -> Result<(), SupervisorError> {
    let Some(name) = &config.user else {
        let uid = nix::unistd::geteuid();
        tracing::info!(
            "running as uid {uid}, supervisor and workers{}",
            if uid.is_root() {
                " (root: workers give up every capability but keep uid 0; \
                 user = \"NAME\" runs every process as NAME)"
            } else {
                ""
            }
        );
        return Ok(());
    };
    let raw = config.upstream_send == config::UpstreamSend::Auto;
    let run_as = udpshard_worker::become_user(name, raw)?;
    if run_as.changed {
        tracing::info!(
            "running as user {name} (uid {}, gid {}) from here on, supervisor and workers; \
             workers start with {} and drop {} once set up",
            run_as.uid,
            run_as.gid,
            run_as.kept.join(", "),
            if run_as.kept.len() == 1 { "it" } else { "them" },
        );
    } else {
        tracing::info!(
            "running as user {name} (uid {}, gid {}), as started",
            run_as.uid,
            run_as.gid
        );
    }
    Ok(())
}

/// A QUIC server reads no PROXY header: a listener that sends one to QUIC
/// backends needs backends that strip it.
fn warn_proxy_v2_on_quic(config: &Config) {
    for l in &config.listeners {
        if l.proxy_protocol == config::ProxyProtocol::V2
            && matches!(l.dissector, config::Dissector::Quic { .. })
        {
            tracing::warn!(
                "listener {:?}: proxy_protocol = \"v2\" with dissector = \"quic\": QUIC servers \
                 read no PROXY header, so its backends must strip it (it is meant for the \
                 \"tuple\" and \"bytes\" dissectors, and DNS servers that read it)",
                l.name
            );
        }
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
    pub(crate) fn start(
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
        // A user this process cannot become fails the start before it
        // binds or replaces anything.
        if let Some(name) = &config.user {
            udpshard_worker::check_user(name)?;
        }
        warn_oversubscribed(count, &cpus);
        crate::doctor::warn_cpu_quota(count);
        crate::doctor::warn_foreign_ports(&config);
        warn_proxy_v2_on_quic(&config);
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
        // The ownership table is sized for the workers the allowed CPUs
        // give (not the machine's): every datagram a flood sends may touch
        // its pages.
        let entries = owners::capacity_for(max_sessions, count);
        let (state, state_fd) = StateRegion::create(entries).map_err(SupervisorError::State)?;
        tracing::info!(
            "ownership table: {entries} entries ({} MiB with their port hints, touched as used), \
             for {count} workers of up to {max_sessions} sessions each",
            (entries * 16) >> 20
        );
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
        // Everything that takes root is bound or open: from here on, the
        // user the config names.
        run_as(&config)?;
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
            role: Role::Serving {
                announced_ready: false,
            },
            next_cpu_check: Instant::now() + CPU_CHECK,
            next_health_check: Instant::now() + crate::health::CHECK,
            health: crate::health::Health::default(),
            metrics,
            stats_path,
            upgrades_refused: 0,
            stats_saved: Vec::new(),
            stats_scratch: Vec::new(),
            stats_repairs: 0,
        };
        sup.steer_groups()?;
        for id in 0..count {
            sup.spawn_or_retry(id);
        }
        if sup.workers.iter().all(|w| !w.is_live()) {
            // Not one worker could start: say so, rather than serve nothing.
            return Err(SupervisorError::NoWorker);
        }
        Ok(sup)
    }

    /// The stats file cut short under the running proxy (by anything that
    /// may write it): puts its length back if no process has yet (each
    /// one's guard does on its first access past the cut), then writes
    /// back the supervisor's words and says so. Saves those words for the
    /// next time.
    fn check_stats_file(&mut self) {
        let full = self.region.bytes() as u64;
        let len = self.stats_file.metadata().map_or(full, |m| m.len());
        let mut repairs = self.region.header(Header::Repairs);
        if len < full && self.stats_file.set_len(full).is_ok() {
            repairs += 1;
            self.region.set_header(Header::Repairs, repairs);
        }
        let whole = self.region.header(Header::Magic) == udpshard_shared::stats::MAGIC;
        if (repairs != self.stats_repairs || !whole) && !self.stats_saved.is_empty() {
            self.region.restore(&self.stats_saved);
            tracing::error!(
                "the stats file {} was cut short under the running proxy (by another program, \
                 or by hand): its length is back, the supervisor wrote its words back and the \
                 workers publish theirs again; backend counters show again as they change \
                 (repair {repairs})",
                self.stats_path.display()
            );
        }
        self.stats_repairs = repairs;
    }

    /// Keeps a copy of the supervisor's words of the stats region, as they
    /// are at the end of a loop pass, for [`Supervisor::check_stats_file`].
    /// A copy taken while the file was cut (before, or during the copy) is
    /// not kept: the one before stays.
    fn save_stats(&mut self) {
        let full = self.region.bytes() as u64;
        let whole = |sup: &Supervisor, repairs: u64| {
            sup.stats_file.metadata().is_ok_and(|m| m.len() >= full)
                && sup.region.header(Header::Repairs) == repairs
                && sup.region.header(Header::Magic) == udpshard_shared::stats::MAGIC
        };
        if !whole(self, self.stats_repairs) {
            return;
        }
        let mut copy = std::mem::take(&mut self.stats_scratch);
        self.region.save(&mut copy);
        if whole(self, self.stats_repairs)
            && copy.get(Header::Magic as usize) == Some(&udpshard_shared::stats::MAGIC)
        {
            std::mem::swap(&mut self.stats_saved, &mut copy);
        }
        self.stats_scratch = copy;
    }

    /// Serves until stopped; returns once every worker has exited. The stats
    /// file records when, so `udpshard stats` can tell a stopped proxy from
    /// a running one.
    pub(crate) fn run(mut self) -> Result<(), SupervisorError> {
        let result = self.serve();
        // Handed over to a new generation, the proxy runs on; one that never
        // took over leaves the file to the generation that serves.
        if self.role.serves() && !matches!(result, Ok(Served::HandedOver)) {
            self.region.set_header(Header::StoppedAt, unix_now());
        }
        result.map(|_| ())
    }

    fn serve(&mut self) -> Result<Served, SupervisorError> {
        let mut events = Events::with_capacity(64);
        loop {
            self.save_stats();
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
            self.check_stats_file();
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
            self.follow_workers_readiness();
            if let Role::Withdrawing { until } = self.role {
                if Instant::now() >= until {
                    self.drain("withdraw_delay is over");
                }
            }
            if let Role::Stopping { deadline, .. } = self.role {
                if self.workers.iter().all(|w| !w.is_live()) {
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
                if self.role.serves() {
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
            .filter_map(|w| w.restart_at())
            .min()
            .filter(|_| !self.upgrading());
        let stop = match self.role {
            Role::Stopping { deadline, .. } => Some(deadline),
            Role::Withdrawing { until } => Some(until),
            _ => None,
        };
        [
            restart,
            stop,
            self.upgrade_deadline(),
            Some(self.next_cpu_check),
            Some(self.next_health_check),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| Instant::now() + CPU_CHECK)
    }

    fn handle_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            match signal {
                SIGTERM | SIGINT => self.begin_stop(signal),
                SIGHUP if self.upgrading() => {
                    tracing::warn!(
                        "SIGHUP during a binary upgrade: refused; reload again once it is done"
                    );
                }
                SIGHUP if matches!(self.role, Role::Serving { .. }) => self.reload(),
                SIGHUP => tracing::warn!("SIGHUP while {}: refused", self.role.name()),
                SIGUSR2 => self.begin_upgrade(),
                // SIGCHLD: reaped after every wakeup.
                _ => {}
            }
        }
    }

    /// SIGTERM or SIGINT: with `withdraw_delay`, first says it is not
    /// ready and serves on for that long ([`Role::Withdrawing`]); then (or
    /// at once, or at a second signal) drains.
    fn begin_stop(&mut self, signal: i32) {
        let delay = self.config.withdraw_delay;
        if matches!(self.role, Role::HandingOff(_)) && !delay.is_zero() {
            // Stopping wins over the upgrade, and still withdraws first.
            self.abandon_upgrade(&format!("signal {signal}: stopping instead"));
        }
        match self.role {
            Role::Serving { .. } if !delay.is_zero() => {
                tracing::info!(
                    "signal {signal}: not ready from now on (/ready, udpshard health); serving on \
                     for withdraw_delay {delay:?} while the route is withdrawn, then draining (a \
                     second signal drains at once)"
                );
                notify("STOPPING=1");
                notify(&format!(
                    "STATUS=withdrawing: not ready, serving for {delay:?} more, then draining"
                ));
                self.set_role(Role::Withdrawing {
                    until: Instant::now() + delay,
                });
                self.set_readiness(Readiness::Withdrawing);
                return;
            }
            Role::Withdrawing { .. } => {
                tracing::info!("signal {signal} while withdrawing: draining now");
            }
            _ => {}
        }
        self.drain(&format!("signal {signal}"));
    }

    /// Serving, the proxy is ready while any worker serves (a host whose
    /// every worker is being restarted says so), and with `readiness =
    /// "backend_up"` while every listener has a backend up.
    fn follow_workers_readiness(&self) {
        if let Role::Serving {
            announced_ready: true,
        } = self.role
        {
            let without_backend = self.listener_without_backend();
            let r = match (
                self.workers.iter().any(WorkerSlot::is_ready),
                without_backend,
            ) {
                (false, _) => Readiness::NoWorker,
                (true, Some(_)) => Readiness::NoBackend,
                (true, None) => Readiness::Ready,
            };
            let was = Readiness::from_word(self.region.header(Header::Readiness));
            if was != r {
                match (was, r, without_backend) {
                    (_, Readiness::NoBackend, Some(l)) => tracing::warn!(
                        "listener {l} has no backend up: not ready (readiness = \"backend_up\"), \
                         serving on"
                    ),
                    (Readiness::NoBackend, Readiness::Ready, _) => {
                        tracing::info!("a backend is up again: ready")
                    }
                    _ => {}
                }
                self.set_readiness(r);
            }
        }
    }

    /// With `readiness = "backend_up"`, the first listener none of whose
    /// backends is up (all down, or draining with weight 0). A backend with
    /// no row of counters (the table is full) counts as up: nothing says
    /// otherwise.
    fn listener_without_backend(&self) -> Option<&str> {
        if self.config.readiness != udpshard_config::Readiness::BackendUp {
            return None;
        }
        self.config.listeners.iter().find_map(|l| {
            let up = l
                .backends
                .iter()
                .any(|b| match self.region.backend_row(&l.name, b.addr) {
                    Some(row) => self.region.backend_state(row) == Some(BackendState::Up),
                    None => true,
                });
            (!up).then_some(l.name.as_str())
        })
    }

    /// Says what `/ready` and `udpshard health` answer.
    pub(super) fn set_readiness(&self, r: Readiness) {
        if self.role.serves() {
            self.region.set_header(Header::Readiness, r as u64);
        }
    }

    /// Stops taking new flows and lets live sessions finish for
    /// `drain_timeout`, then exits.
    fn drain(&mut self, why: &str) {
        match self.role {
            Role::Stopping { .. } | Role::GaveUp => {
                // A second Ctrl-C: the user does not want to wait for the drain.
                tracing::warn!("{why} while draining: stopping the workers now");
                self.kill_all();
                return;
            }
            Role::TakingOver(_) => {
                // Standing by to take over: the old generation still serves,
                // and goes on serving once this one is gone.
                tracing::warn!("{why} while taking over: giving the upgrade up");
                let _ = self.fail_inbound(&format!("the new supervisor got {why}"));
                self.kill_all();
                return;
            }
            Role::HandingOff(_) => {
                self.abandon_upgrade(&format!("{why}: stopping instead"));
            }
            Role::Serving { .. } | Role::Withdrawing { .. } => {}
        }
        let timeout = self.config.drain_timeout;
        tracing::info!(
            "{why}: draining {} workers for up to {:?}",
            self.workers.len(),
            timeout
        );
        notify("STOPPING=1");
        notify(&format!("STATUS=draining for up to {timeout:?}"));
        self.set_role(Role::Stopping {
            deadline: Instant::now() + timeout + STOP_GRACE,
            served: true,
        });
        self.set_readiness(Readiness::Draining);
        let drain = ControlMsg::Drain {
            timeout_ms: timeout.as_millis() as u64,
        };
        for w in &mut self.workers {
            w.set_restart(None);
            if let Some(control) = w.control() {
                let _ = control.send(&drain, &[]);
                if let Some(slot) = self.region.slot(w.id) {
                    if slot.life().1 == SlotState::Ready {
                        slot.set_state(SlotState::Draining);
                    }
                }
            }
        }
    }

    /// Moves to role `next`, a step of the lifecycle (`lifecycle`), and
    /// returns the role it leaves; any other step is refused (a bug: it is
    /// logged) and `next` is dropped.
    fn set_role(&mut self, next: Role) -> Option<Role> {
        let legal = self.role.may_become(&next);
        debug_assert!(legal, "{} -> {}", self.role.name(), next.name());
        if !legal {
            tracing::error!(
                "refused a role change from {} to {}",
                self.role.name(),
                next.name()
            );
            return None;
        }
        Some(std::mem::replace(&mut self.role, next))
    }

    /// The upgrade this process takes part in as the new generation.
    fn inbound(&self) -> Option<&upgrade::Inbound> {
        match &self.role {
            Role::TakingOver(i) => Some(i),
            _ => None,
        }
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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
