//! Binary upgrade on SIGUSR2, with no datagram and no session lost.
//!
//! The old supervisor fork+execs the binary at its path (the new version on
//! disk) as `udpshard run --upgrade-fd N`. The new one inherits, as
//! descriptors named in the `Inherit` message on that socket: every listener
//! socket (the same reuseport groups, so the kernel never sees one close),
//! the stats file (every counter goes on from where it is), the state
//! region (ownership table, port leases), the metrics listener, and the
//! sending end of every old worker's inbox. Then, in order:
//!
//! 1. The new supervisor checks the config file, starts one worker per slot
//!    in standby (generation g+1 of the slot, listeners not read, the slot
//!    not written) and, once all say `Ready`, sends `Standby` with their
//!    inboxes. Anything failing before this point (the binary, the config,
//!    a worker, `upgrade_timeout`) leaves the old generation untouched; it
//!    counts `upgrade_failures` and says why.
//! 2. The old supervisor tells each old worker to `Quiesce` (stop reading
//!    the listeners), then, once all have, to `HandOver`, and the new
//!    workers to `ReadListeners`: each old worker transfers every session
//!    with its upstream sockets (SCM_RIGHTS) to its slot's successor, which
//!    the backend therefore never sees change. Meanwhile the successor
//!    reads the listeners: a datagram of a session still at the old worker
//!    goes there over its inbox, and one reaching an old worker for a
//!    session it no longer has goes on to the successor (after the session,
//!    on the same channel).
//! 3. When every old worker has handed over and exited (its ledger booked as
//!    after any exit), the old supervisor names the new one systemd's main
//!    process (`MAINPID=`) and sends `Handed`. The new one publishes its
//!    workers as the slots' generation, tells them `Live` (they read the
//!    listeners, adopt the sockets they were handed and continue the slot's
//!    counters), sends READY=1 and `Took`; the old one exits 0.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Token};
use udpshard_shared::control::{ControlChannel, ControlMsg};
use udpshard_shared::owners::Owner;
use udpshard_shared::stats::{Header, SlotState};

use super::{Role, Supervisor, SupervisorError, WorkerSlot, CPU_CHECK};
use state::{ListenerState, UpgradeState};

mod inbound;
mod state;
use crate::notify::notify;

/// The channel between the two supervisors.
pub(super) const UPGRADE: Token = Token((1 << 30) - 1);
/// What the two generations speak across an upgrade: this state, the
/// upgrade's control messages, the handoff frames old and new workers
/// exchange (a session's `Transfer`), and the layouts of the stats and
/// state regions. A change to any of them bumps it; a new binary that
/// speaks another refuses, and the old generation serves on. A frame kind
/// added is no change: an older receiver drops a kind it does not know,
/// and the sender must not wait on its answer for long (the relays a new
/// old worker hands over: 2 s).
const PROTOCOL: u64 = 1;
/// How long the old workers may take to stop reading their listeners.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long they may take to hand their sessions over (they give up on
/// those left after 10 s, and say so).
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long they may take to exit once told; then they are killed (their
/// sessions are the new generation's already).
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the new supervisor may take to say it serves, after which the
/// old one exits anyway: the new one holds everything by then.
const TOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new side waits for the old one's steps once it stands by.
const INBOUND_GRACE: Duration = Duration::from_secs(40);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The new binary is starting, checking its config, starting workers.
    Starting,
    /// Old workers stop reading the listeners.
    Quiescing,
    /// Old workers hand their sessions over.
    HandingOver,
    /// Old workers are told to exit.
    Stopping,
    /// Every old worker is gone; waiting for the new supervisor's `Took`.
    Handed,
}

/// The old side: the new supervisor this one started.
pub(super) struct Outbound {
    child: Child,
    channel: ControlChannel,
    phase: Phase,
    deadline: Instant,
    /// Slots whose old worker takes part (it was serving when it began).
    taking_part: Vec<bool>,
    /// Slots whose old worker has done the current step.
    done: Vec<bool>,
    /// The successors' inboxes (sending ends), by slot.
    successors: Vec<OwnedFd>,
    /// The new binary exited, reaped with the workers (its pid is no longer
    /// its to signal), and how.
    exited: Option<String>,
    /// When its end of the channel closed (it is exiting).
    closed_at: Option<Instant>,
}

/// The new side: this supervisor, standing by to take over.
pub(super) struct Inbound {
    channel: ControlChannel,
    /// The generation each slot's new worker is.
    generations: Vec<u64>,
    /// The sending ends of the old workers' inboxes, by slot.
    predecessors: Vec<OwnedFd>,
    deadline: Instant,
    standby_sent: bool,
    /// The config file's text as it is now, when it differs from the one
    /// the old generation runs (applied as a reload once live).
    file_text: Option<String>,
}

impl Inbound {
    pub(super) fn generation(&self, id: usize) -> u64 {
        self.generations.get(id).copied().unwrap_or(1)
    }

    pub(super) fn predecessor_fd(&self, id: usize) -> Option<RawFd> {
        self.predecessors.get(id).map(|fd| fd.as_raw_fd())
    }
}

fn upgrade_error(e: impl std::fmt::Display) -> SupervisorError {
    SupervisorError::Upgrade(e.to_string())
}

impl Supervisor {
    /// SIGUSR2: starts the binary at this one's path as the new generation.
    pub(super) fn begin_upgrade(&mut self) {
        match self.role {
            Role::HandingOff(_) | Role::TakingOver(_) => {
                return self.refuse_upgrade("an upgrade is already running")
            }
            Role::Stopping { .. } | Role::GaveUp | Role::Withdrawing { .. } => {
                return self.refuse_upgrade("the proxy is stopping")
            }
            Role::Serving { .. } => {}
        }
        if std::process::id() == 1 {
            // Its exit would end the container, the new generation with it.
            return self.refuse_upgrade(
                "as PID 1 (a container's init) this process cannot hand over and exit; \
                 run the container with an init (docker run --init) to upgrade in place",
            );
        }
        if let Some(w) = self.workers.iter().find(|w| !w.is_ready() || w.retiring) {
            let why = format!(
                "worker {} is starting, restarting or retiring; try again once \
                 `udpshard stats` shows every worker ready",
                w.id
            );
            return self.refuse_upgrade(&why);
        }
        tracing::info!("SIGUSR2: upgrading to {}", self.exe.display());
        match self.start_successor() {
            Ok(out) => {
                tracing::info!(
                    pid = out.child.id(),
                    "upgrade: the new binary started; this generation serves until it stands ready"
                );
                self.set_role(Role::HandingOff(Box::new(out)));
            }
            Err(e) => {
                self.count_upgrade_failure(&format!("cannot start {}: {e}", self.exe.display()))
            }
        }
    }

    /// A SIGUSR2 that starts nothing. Numbered like a failure, so that
    /// packaging/upgrade-service sees new STATUS= text each time.
    fn refuse_upgrade(&mut self, why: &str) {
        self.upgrades_refused += 1;
        let message = format!(
            "upgrade refused (refusal {}), this generation serves on: {why}",
            self.upgrades_refused
        );
        tracing::warn!("SIGUSR2: {message}");
        notify(&format!("STATUS={message}"));
    }

    fn count_upgrade_failure(&mut self, why: &str) {
        let n = self.region.header(Header::UpgradeFailures) + 1;
        self.region.set_header(Header::UpgradeFailures, n);
        // The count makes each failure's STATUS= new, even one with the
        // reason of the last: packaging/upgrade-service waits for a change.
        let message = format!("upgrade failed (failure {n}), this generation serves on: {why}");
        tracing::error!("{message}");
        notify(&format!("STATUS={message}"));
    }

    fn start_successor(&mut self) -> io::Result<Outbound> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut inherit: Vec<RawFd> = vec![
            theirs.as_raw_fd(),
            self.stats_file.as_raw_fd(),
            self.state_fd.as_raw_fd(),
        ];
        let metrics_fd = self.metrics.as_ref().map(|m| m.raw_fd());
        inherit.extend(metrics_fd);
        let listeners: Vec<ListenerState> = self
            .groups
            .iter()
            .map(|g| {
                let fds: Vec<RawFd> = g.sockets.iter().map(|s| s.as_raw_fd()).collect();
                inherit.extend(&fds);
                ListenerState {
                    name: g.name.clone(),
                    configured: g.configured,
                    addr: g.addr,
                    recv_buffer: g.recv_buffer,
                    effective_recv_buffer: g.effective_recv_buffer,
                    fds,
                }
            })
            .collect();
        let inboxes: Vec<RawFd> = self.handoff.iter().map(|(_, tx)| tx.as_raw_fd()).collect();
        inherit.extend(&inboxes);
        let state = UpgradeState {
            protocol: PROTOCOL,
            version: crate::version_word(),
            origin: self.origin.clone(),
            config: self.text.clone(),
            config_generation: self.config_gen,
            stats_path: self.stats_path.display().to_string(),
            stats_fd: self.stats_file.as_raw_fd(),
            state_fd: self.state_fd.as_raw_fd(),
            metrics_fd,
            listeners,
            inboxes,
            cpus: self.workers.iter().map(|w| w.cpu).collect(),
        };
        let state = serde_json::to_string(&state).map_err(io::Error::other)?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["--log-format", crate::logging::format().as_arg(), "run"]);
        if let Some(path) = &self.config_path {
            cmd.arg("--config").arg(path);
        }
        cmd.args(["--upgrade-fd", &theirs.as_raw_fd().to_string()])
            .stdin(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only
        // clears close-on-exec (fcntl, async-signal-safe) on descriptors
        // listed before the fork; the supervisor is single-threaded.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        ours.set_nonblocking(true)?;
        let mut channel = ControlChannel::new(ours);
        // A binary that exits at once closes the channel: its exit is
        // reported as such (`read_upgrade`).
        if let Err(e) = channel.send(&ControlMsg::Inherit { state }, &[]) {
            tracing::debug!("upgrade: sending the state: {e}");
        }
        self.poll.registry().register(
            &mut SourceFd(&channel.stream.as_raw_fd()),
            UPGRADE,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let n = self.workers.len();
        Ok(Outbound {
            child,
            channel,
            phase: Phase::Starting,
            deadline: Instant::now() + self.config.upgrade_timeout,
            taking_part: vec![false; n],
            done: vec![false; n],
            successors: Vec::new(),
            exited: None,
            closed_at: None,
        })
    }

    /// The upgrade's deadline, for the loop's timeout.
    pub(super) fn upgrade_deadline(&self) -> Option<Instant> {
        match &self.role {
            Role::HandingOff(o) => Some(o.deadline),
            Role::TakingOver(i) => Some(i.deadline),
            _ => None,
        }
    }

    /// Whether an upgrade holds restarts and resizes back.
    pub(super) fn upgrading(&self) -> bool {
        matches!(self.role, Role::HandingOff(_) | Role::TakingOver(_))
    }

    /// The other supervisor's channel has something, or room.
    pub(super) fn read_upgrade(&mut self) -> Result<bool, SupervisorError> {
        if matches!(self.role, Role::TakingOver(_)) {
            return self.read_from_old();
        }
        let Role::HandingOff(out) = &mut self.role else {
            return Ok(false);
        };
        let _ = out.channel.flush();
        let open = out.channel.read_available().unwrap_or(false);
        let mut msgs = Vec::new();
        while let Some(msg) = out.channel.next_msg() {
            msgs.push(msg);
        }
        for msg in msgs {
            match msg {
                Ok((ControlMsg::Standby { .. }, fds)) => self.quiesce_all(fds),
                Ok((ControlMsg::Took, _)) => {
                    tracing::info!("upgrade: the new generation serves; this supervisor exits");
                    return Ok(true);
                }
                Ok((ControlMsg::UpgradeFailed { why }, _)) => {
                    self.abandon_upgrade(&why);
                    return Ok(false);
                }
                Ok((other, _)) => tracing::warn!("upgrade: unexpected message {other:?}"),
                Err(e) => {
                    self.abandon_upgrade(&format!("bad message from the new binary: {e}"));
                    return Ok(false);
                }
            }
        }
        if let Role::HandingOff(out) = &mut self.role {
            if open {
                return Ok(false);
            }
            // The channel closes as the process exits: its exit status,
            // reaped in a moment, says how it ended (`check_upgrade`).
            if out.closed_at.is_none() {
                out.closed_at = Some(Instant::now());
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&out.channel.stream.as_raw_fd()));
            }
        }
        Ok(false)
    }

    /// The new generation stands by: every serving old worker stops
    /// reading its listeners.
    fn quiesce_all(&mut self, successors: Vec<OwnedFd>) {
        let n = self.workers.len();
        if successors.len() != n {
            self.abandon_upgrade(&format!(
                "the new binary stands by with {} workers for {n} slots",
                successors.len()
            ));
            return;
        }
        let Role::HandingOff(out) = &mut self.role else {
            return;
        };
        out.phase = Phase::Quiescing;
        out.deadline = Instant::now() + QUIESCE_TIMEOUT;
        for (w, successor) in self.workers.iter_mut().zip(&successors) {
            let serving = w.is_ready() && !w.retiring;
            out.taking_part[w.id] = serving;
            out.done[w.id] = !serving;
            let id = w.id;
            let Some(control) = w.control().filter(|_| serving) else {
                continue;
            };
            let generation = self.region.slot(id).map_or(0, |s| s.life().0) + 1;
            if let Err(e) = control.send(
                &ControlMsg::Quiesce { generation },
                &[successor.as_raw_fd()],
            ) {
                tracing::warn!(worker = id, "upgrade: cannot tell it to quiesce: {e}");
            }
        }
        out.successors = successors;
        tracing::info!("upgrade: the new generation stands by; old workers stop reading");
        self.advance_upgrade();
    }

    /// A worker's answer during an upgrade.
    pub(super) fn upgrade_step_done(&mut self, id: usize, msg: &ControlMsg) {
        let Role::HandingOff(out) = &mut self.role else {
            return;
        };
        let expected = match out.phase {
            Phase::Quiescing => matches!(msg, ControlMsg::Quiesced),
            Phase::HandingOver => matches!(msg, ControlMsg::HandedOver { .. }),
            _ => false,
        };
        if expected {
            if let Some(d) = out.done.get_mut(id) {
                *d = true;
            }
        }
        if let ControlMsg::HandedOver { left } = msg {
            tracing::info!(
                worker = id,
                "upgrade: handed its sessions over ({left} could not be)"
            );
        }
        self.advance_upgrade();
    }

    /// Moves to the next step once every old worker has done this one.
    fn advance_upgrade(&mut self) {
        let Role::HandingOff(out) = &mut self.role else {
            return;
        };
        match out.phase {
            Phase::Quiescing | Phase::HandingOver if out.done.iter().all(|d| *d) => {}
            Phase::Stopping => {
                if self.workers.iter().all(|w| !w.is_live()) {
                    self.all_handed();
                }
                return;
            }
            _ => return,
        }
        let (next, msg) = match out.phase {
            Phase::Quiescing => (Phase::HandingOver, ControlMsg::HandOver),
            _ => (Phase::Stopping, ControlMsg::Stop),
        };
        if next == Phase::HandingOver {
            // No old worker reads a listener now: the new ones may, and
            // send what is not yet theirs back here while sessions move.
            if let Err(e) = out.channel.send(&ControlMsg::ReadListeners, &[]) {
                tracing::warn!("upgrade: cannot tell the new generation to read: {e}");
            }
        }
        out.phase = next;
        out.deadline = Instant::now()
            + match next {
                Phase::HandingOver => HAND_OVER_TIMEOUT,
                _ => EXIT_TIMEOUT,
            };
        for (w, part) in self.workers.iter_mut().zip(&out.taking_part) {
            out.done[w.id] = !part;
            if let Some(control) = w.control().filter(|_| *part) {
                let _ = control.send(&msg, &[]);
            }
        }
        if next == Phase::Stopping {
            // Slots not taking part have no process: nothing to wait for.
            for w in &mut self.workers {
                w.set_restart(None);
            }
        }
        self.advance_upgrade();
    }

    /// Every old worker has exited: the slots are the new generation's.
    fn all_handed(&mut self) {
        let Role::HandingOff(out) = &mut self.role else {
            return;
        };
        out.phase = Phase::Handed;
        out.deadline = Instant::now() + TOOK_TIMEOUT;
        // systemd's main process is the new supervisor from now on; its
        // READY=1 then comes from the main process (NotifyAccess=main).
        notify(&format!("MAINPID={}", out.child.id()));
        if let Err(e) = out.channel.send(&ControlMsg::Handed, &[]) {
            tracing::error!("upgrade: cannot tell the new generation it has the slots: {e}");
        }
        tracing::info!("upgrade: every old worker has handed over and exited");
    }

    /// The old side: the upgrade did not take. Before the old workers
    /// quiesced, nothing changed; after, they are restarted as after a
    /// crash (the sessions handed to the dead successor start afresh).
    pub(super) fn abandon_upgrade(&mut self, why: &str) {
        if !matches!(self.role, Role::HandingOff(_)) {
            return;
        }
        let serving = Role::Serving {
            announced_ready: true,
        };
        let Some(Role::HandingOff(mut out)) = self.set_role(serving) else {
            return;
        };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&out.channel.stream.as_raw_fd()));
        if out.exited.is_none() {
            // Killed, it is reaped with the workers (it has no PDEATHSIG).
            let _ = out.child.kill();
        }
        if out.phase == Phase::Handed {
            // systemd was told the new one is the main process: no more.
            notify(&format!("MAINPID={}", std::process::id()));
        }
        if out.phase != Phase::Starting {
            let until = udpshard_shared::clock::monotonic_ns() / 1_000_000
                + super::max_reuse_delay_ms(&self.config);
            // Old workers still quiescing or handing over serve on with the
            // sessions they have; those told to exit have none left, and go.
            let resume = matches!(out.phase, Phase::Quiescing | Phase::HandingOver);
            for w in &mut self.workers {
                let (id, part) = (w.id, out.taking_part.get(w.id).copied().unwrap_or(false));
                if let Some(control) = w.control().filter(|_| part && resume) {
                    if let Err(e) = control.send(&ControlMsg::Resume, &[]) {
                        tracing::warn!(worker = id, "cannot tell it to serve on: {e}");
                    }
                } else if let Some(child) = w.child_mut().filter(|_| part) {
                    let _ = child.kill();
                }
                // The generation its successor had is spent: the ownership
                // entries and leases it took name it. The slot's next
                // worker comes after it, and its leases cool: once this
                // slot's old worker is reaped, or now if it is gone.
                let Some(slot) = self.region.slot(w.id) else {
                    continue;
                };
                let spent = slot.life().0 + 1;
                let successor = Owner::new(w.id, spent);
                self.state.leases().cool_dead(|o| o == successor, until);
                if w.is_live() {
                    w.spent = Some(spent);
                } else {
                    slot.set_life(spent, SlotState::Exited);
                }
            }
        }
        // A slot whose worker died meanwhile restarts now.
        let now = Instant::now();
        for w in &mut self.workers {
            if !w.is_live() && !w.retiring && w.restart_at().is_none() {
                w.set_restart(Some(now));
            }
        }
        self.count_upgrade_failure(why);
    }

    /// The loop's periodic check: true when this supervisor is to exit (it
    /// handed everything over).
    pub(super) fn check_upgrade(&mut self) -> Result<bool, SupervisorError> {
        let now = Instant::now();
        if let Role::HandingOff(out) = &mut self.role {
            if let Some(status) = out.exited.clone() {
                let why = format!("the new binary exited ({status}) before it took over");
                self.abandon_upgrade(&why);
            } else if out
                .closed_at
                .is_some_and(|t| now >= t + Duration::from_secs(1))
            {
                self.abandon_upgrade("the new binary closed the upgrade channel");
            } else if now >= out.deadline {
                match out.phase {
                    Phase::Starting => {
                        let why = format!(
                            "the new binary did not stand ready within upgrade_timeout ({:?})",
                            self.config.upgrade_timeout
                        );
                        self.abandon_upgrade(&why);
                    }
                    Phase::Quiescing => self.abandon_upgrade(&format!(
                        "the old workers did not stop reading within {QUIESCE_TIMEOUT:?}"
                    )),
                    Phase::HandingOver => self.abandon_upgrade(&format!(
                        "the old workers did not hand over within {HAND_OVER_TIMEOUT:?}"
                    )),
                    Phase::Stopping => {
                        // Their sessions are handed over: what is left of
                        // them goes now.
                        tracing::warn!("upgrade: old workers did not exit in time; killing them");
                        for w in &mut self.workers {
                            if let Some(child) = w.child_mut() {
                                let _ = child.kill();
                            }
                        }
                        out.deadline = now + EXIT_TIMEOUT;
                    }
                    // The new generation has everything: never kill it now.
                    Phase::Handed => {
                        tracing::warn!(
                            "upgrade: the new supervisor did not confirm within {TOOK_TIMEOUT:?}; \
                             it holds every slot, so this one exits anyway"
                        );
                        return Ok(true);
                    }
                }
            }
        }
        if let Some(i) = self.inbound() {
            if now >= i.deadline {
                return Err(self.fail_inbound("the old generation did not hand over in time"));
            }
        }
        Ok(false)
    }

    /// `pid` was reaped: true when it is the new binary (not a worker).
    pub(super) fn successor_exited(&mut self, pid: i32, how: &str) -> bool {
        match &mut self.role {
            Role::HandingOff(out) if out.child.id() as i32 == pid => {
                out.exited = Some(how.to_string());
                true
            }
            _ => false,
        }
    }

    /// Old worker `id` exited during the upgrade: one that crashed before
    /// its step was done takes no further part (its sessions start afresh
    /// at the new generation), so the others do not wait for it.
    pub(super) fn upgrade_reaped(&mut self, id: usize) {
        let Role::HandingOff(out) = &mut self.role else {
            return;
        };
        if matches!(out.phase, Phase::Quiescing | Phase::HandingOver) {
            if let (Some(part), Some(done)) = (out.taking_part.get_mut(id), out.done.get_mut(id)) {
                if *part && !*done {
                    tracing::warn!(worker = id, "upgrade: died while handing over");
                    *part = false;
                    *done = true;
                }
            }
        }
        if out.phase != Phase::Starting {
            self.advance_upgrade();
        }
    }

    /// Whether exits are the upgrade's (no restart).
    pub(super) fn handing_over(&self) -> bool {
        matches!(&self.role, Role::HandingOff(o) if o.phase != Phase::Starting)
    }
}
