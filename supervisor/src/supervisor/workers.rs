//! The worker slots' processes: spawning one with its config, reading its
//! control channel, reaping it (its losses booked, its ports cooled) and
//! restarting it after a backoff that doubles while it keeps crashing.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Token};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use udpshard_shared::control::{ControlChannel, ControlMsg};
use udpshard_shared::owners::Owner;
use udpshard_shared::stats::{Counter, Header, Readiness, SlotState};

use super::lifecycle::{Live, Role, WorkerSlot};
use super::{
    max_reuse_delay_ms, Supervisor, SupervisorError, CONTROL_TOKEN_BASE, FIRST_BACKOFF,
    HEALTHY_RUN, MAX_BACKOFF, RUNNING_IMAGE,
};
use crate::notify::notify_ready;
use crate::spawn::{spawn_worker, WorkerSpec};

impl Supervisor {
    pub(super) fn spawn(&mut self, id: usize) -> Result<(), SupervisorError> {
        // The new generation is published before the process exists: the
        // worker takes its identity from it. Taking over from an old
        // generation, the slot is the old process's until it has handed
        // over: the worker is told its generation, and stands by.
        let standby = self.inbound().map(|i| i.generation(id));
        if let Some(slot) = self.region.slot(id).filter(|_| standby.is_none()) {
            slot.set_life(slot.life().0 + 1, SlotState::Starting);
            slot.set(Counter::Cpu, self.workers[id].cpu as u64);
            slot.set(Counter::Version, crate::version_word());
        }
        let predecessor_fd = self.inbound().and_then(|i| i.predecessor_fd(id));
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
        w.started(Live {
            child,
            control,
            ready: false,
            started_at: Instant::now(),
            config_gen: self.config_gen,
        });
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

    pub(super) fn read_control(&mut self, id: usize) {
        let taking_over = matches!(self.role, Role::TakingOver(_));
        let stopping = matches!(self.role, Role::Stopping { .. });
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        let (cpu, retiring) = (w.cpu, w.retiring);
        let Some(live) = w.live_mut() else {
            return;
        };
        let control = &mut live.control;
        if let Err(e) = control.flush() {
            tracing::debug!(worker = id, "control channel: {e}");
        }
        let _ = control.read_available();
        let mut became_ready = false;
        let mut became_standby = false;
        let mut upgrade_steps = Vec::new();
        while let Some(msg) = control.next_msg() {
            match msg {
                Ok((ControlMsg::Ready, _)) if taking_over => {
                    // Standing by: the slot is the old generation's yet.
                    live.ready = true;
                    tracing::debug!(worker = id, "standing by");
                    became_standby = true;
                }
                Ok((msg @ (ControlMsg::Quiesced | ControlMsg::HandedOver { .. }), _)) => {
                    upgrade_steps.push(msg);
                }
                Ok((ControlMsg::Ready, _)) => {
                    live.ready = true;
                    if let Some(slot) = self.region.slot(id) {
                        slot.set(Counter::ConfigGeneration, live.config_gen);
                        // A shrink or a stop that came while it started
                        // stands: it is published as leaving, not as ready.
                        slot.set_state(if retiring {
                            SlotState::Retiring
                        } else if stopping {
                            SlotState::Draining
                        } else {
                            SlotState::Ready
                        });
                    }
                    if let Err(e) = control.send(&ControlMsg::Live, &[]) {
                        tracing::warn!(worker = id, "cannot tell the worker it is live: {e}");
                    }
                    became_ready = true;
                    tracing::info!(worker = id, cpu, pid = live.child.id(), "worker ready");
                }
                Ok((ControlMsg::Reloaded, _)) => {
                    if let Some(slot) = self.region.slot(id) {
                        slot.set(Counter::ConfigGeneration, live.config_gen);
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
        let Some(w) = self.workers.get(id) else {
            return;
        };
        // Started before a reload: it serves the old config; bring it up to date.
        if became_ready && w.live().is_some_and(|l| l.config_gen != self.config_gen) {
            self.send_reload(id);
        }
        let all_ready = self.workers.iter().all(WorkerSlot::is_ready);
        if let Role::Serving { announced_ready } = &mut self.role {
            if *announced_ready || !all_ready {
                return;
            }
            *announced_ready = true;
            self.region
                .set_header(Header::Readiness, Readiness::Ready as u64);
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

    pub(super) fn kill_all(&mut self) {
        for w in &mut self.workers {
            let id = w.id;
            if let Some(child) = w.child_mut() {
                tracing::warn!(worker = id, "did not stop in time; killing it");
                let _ = child.kill();
            }
        }
        let served = self.role.serves();
        self.set_role(Role::Stopping {
            deadline: Instant::now() + Duration::from_millis(200),
            served,
        });
    }

    /// Collects every exited child and schedules its replacement.
    pub(super) fn reap(&mut self) -> Result<(), SupervisorError> {
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
            let Some(w) = self
                .workers
                .iter_mut()
                .find(|w| w.pid().is_some_and(|p| p as i32 == pid.as_raw()))
            else {
                // Not a worker: as PID 1 in a container we reap orphans too
                // (the new generation of an upgrade is `check_upgrade`'s).
                continue;
            };
            // Standing by (or given up before taking over), the slot is the
            // old generation's: nothing of it is this process's to write.
            if !self.role.serves() {
                w.exited(None);
                if matches!(self.role, Role::TakingOver(_)) {
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
            let ran = match w.exited(None) {
                Some(live) => {
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut SourceFd(&live.control.stream.as_raw_fd()));
                    live.started_at.elapsed()
                }
                None => Duration::ZERO,
            };
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
                if let Some(spent) = w.spent.take() {
                    let successor = Owner::new(w.id, spent);
                    self.state.leases().cool_dead(|o| o == successor, until);
                    slot.set_life(spent, SlotState::Exited);
                }
            }
            if matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)) {
                if let Some(slot) = self.region.slot(w.id) {
                    slot.add(Counter::FilterKills, 1);
                }
            }
            if matches!(self.role, Role::Stopping { .. }) || w.retiring || handing_over {
                tracing::info!(worker = w.id, "exited: {}", describe(&status));
                continue;
            }
            // The first crash is replaced at once (its socket is filling);
            // one that keeps crashing waits 100 ms, 200 ms, ... up to 30 s.
            w.crashes = if ran >= HEALTHY_RUN { 1 } else { w.crashes + 1 };
            w.backoff = restart_backoff(w.crashes);
            w.set_restart(Some(Instant::now() + w.backoff));
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
            && matches!(self.role, Role::HandingOff(_))
            && self.workers.iter().any(|w| !w.is_live())
        {
            // Nothing has moved yet: the upgrade is given up, and the dead
            // worker restarts as after any crash.
            self.abandon_upgrade("a worker died while the new binary started");
        }
        self.remove_retired()
    }

    pub(super) fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .workers
            .iter()
            .filter(|w| w.restart_at().is_some_and(|t| t <= now))
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
        w.set_restart(Some(Instant::now() + w.backoff));
        if let Some(slot) = self.region.slot(id) {
            slot.set_state(SlotState::Exited);
        }
        tracing::error!(worker = id, "{e}; trying again in {:?}", w.backoff);
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

fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit code {code}"),
        WaitStatus::Signaled(_, Signal::SIGSYS, _) => {
            "killed by the system-call filter (SIGSYS: its last log line names the call)".into()
        }
        WaitStatus::Signaled(_, signal, _) => format!("killed by {}", Signal::as_str(*signal)),
        other => format!("{other:?}"),
    }
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
