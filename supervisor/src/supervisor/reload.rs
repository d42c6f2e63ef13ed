//! Changing a running proxy: SIGHUP reloads, CPU-set changes, and the
//! resizing of every reuseport group they may cause.
//!
//! A reload is validated whole before anything changes; a bad file changes
//! nothing (the error names file:line:col, `reload_failures` counts it).
//! A good one keeps every socket it can (a listener with the same name and
//! bind keeps its group, so its queued datagrams and live sessions stay),
//! creates and closes the rest, resizes groups at their end only, and sends
//! each worker the new config with its sockets. Workers keep their sessions.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use udpshard_config as config;
use udpshard_shared::control::ControlMsg;
use udpshard_shared::stats::{Counter, Header, SlotState};

use super::{
    bind_group, handoff_pair, warn_oversubscribed, worker_count, Supervisor, SupervisorError,
    WorkerSlot,
};
use crate::cpus::{allowed_cpus, format_cpu_list};
use crate::notify::{notify, notify_ready};
use crate::reuseport::ReuseportGroup;

impl Supervisor {
    pub(super) fn reload(&mut self) {
        notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        let what = self.config_path.as_ref().map_or_else(
            || config::DEFAULT_CONFIG_ORIGIN.to_string(),
            |p| p.display().to_string(),
        );
        tracing::info!("SIGHUP: reloading {what}");
        if let Err(e) = self.try_reload() {
            let failures = self.region.header(Header::ReloadFailures) + 1;
            self.region.set_header(Header::ReloadFailures, failures);
            let message = format!("reload failed, still serving the previous config: {e}");
            tracing::error!("{message}");
            notify_ready(&message);
            return;
        }
        self.config_gen += 1;
        self.region
            .set_header(Header::ConfigGeneration, self.config_gen);
        // A retiring worker was told to stop: it leaves with the config it
        // has.
        for id in 0..self.workers.len() {
            let w = &self.workers[id];
            if w.is_ready() && !w.retiring {
                self.send_reload(id);
            }
        }
        let message = format!(
            "reloaded {what}: {} listeners, {} workers (config generation {})",
            self.groups.len(),
            self.live_workers(),
            self.config_gen
        );
        tracing::info!("{message}");
        notify_ready(&message);
    }

    /// Applies the config file, whole or not at all. Everything that can
    /// fail happens on a staged copy first: reading and checking the file,
    /// binding new listeners, the sockets and inboxes of added worker slots,
    /// and attaching every group's steering for the new worker count. A
    /// failure there puts the previous state back (kept groups, their
    /// steering) and says which step failed. What follows the swap cannot
    /// fail (spawn failures back off and retry on their own).
    fn try_reload(&mut self) -> Result<(), String> {
        let mut staged = self.load_new()?;
        if let Err(e) = self.prepare(&mut staged) {
            self.unstage(staged);
            return Err(format!("{e} (rolled back)"));
        }
        self.commit(staged);
        super::warn_proxy_v2_on_quic(&self.config);
        Ok(())
    }

    /// Reads, checks and binds the new config, without changing what is
    /// served: the kept groups move into the staged state, and come back
    /// on failure.
    fn load_new(&mut self) -> Result<Staged, String> {
        let (cfg, text) = match &self.config_path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
                let cfg = config::parse(&text, &self.origin).map_err(|e| e.to_string())?;
                (cfg, text)
            }
            None => (
                config::default_config(),
                config::DEFAULT_CONFIG_TOML.to_string(),
            ),
        };
        // Every process already runs as the user the config started with.
        if cfg.user != self.config.user {
            let name =
                |u: &Option<String>| u.as_deref().map_or("(none)".into(), |n| format!("{n:?}"));
            return Err(format!(
                "user changed from {} to {}: a running proxy cannot change its user: restart to apply",
                name(&self.config.user),
                name(&cfg.user)
            ));
        }
        // Workers keep CAP_NET_BIND_SERVICE only when the config they start
        // with binds low upstream ports: a reload cannot bring them there.
        if let (Some((name, lo, hi, start)), None) = (
            udpshard_worker::privileged_upstream_ports(&cfg),
            udpshard_worker::privileged_upstream_ports(&self.config),
        ) {
            return Err(format!(
                "listener {name:?}: upstream_ports {lo}-{hi} begins below \
                 net.ipv4.ip_unprivileged_port_start ({start}), which takes CAP_NET_BIND_SERVICE; \
                 the workers gave it up at start: restart to apply"
            ));
        }
        // Lease rows for new upstream sources first: nothing has changed yet.
        super::register_sources(&self.state, &cfg).map_err(|e| e.to_string())?;
        let cpus = allowed_cpus().map_err(|e| format!("cannot read the allowed CPU set: {e}"))?;
        let count = worker_count(&cfg, &cpus);
        let capacity = self.region.slot_capacity();
        if count > capacity {
            return Err(format!(
                "workers = {count} exceeds the {capacity} slots this run was started with; restart to grow"
            ));
        }
        // Every group of the new config, bound before anything is
        // committed: an address in use fails the reload, changing nothing.
        let size = self.workers.len();
        let mut old: Vec<Option<ReuseportGroup>> = std::mem::take(&mut self.groups)
            .into_iter()
            .map(Some)
            .collect();
        let mut groups: Vec<(ReuseportGroup, Option<usize>)> =
            Vec::with_capacity(cfg.listeners.len());
        let mut failed = None;
        for l in &cfg.listeners {
            let kept = old.iter().position(|g| {
                g.as_ref()
                    .is_some_and(|g| g.name == l.name && g.configured == l.bind)
            });
            let group = match kept.and_then(|j| old[j].take()) {
                Some(g) => Ok(g),
                None => bind_group(l, size).map_err(|e| e.to_string()),
            };
            match group {
                Ok(g) => groups.push((g, kept)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let staged = Staged {
            cfg,
            text,
            cpus,
            count,
            groups,
            dropped: old,
            slots: Vec::new(),
        };
        match failed {
            None => Ok(staged),
            Some(e) => {
                self.unstage(staged);
                Err(e)
            }
        }
    }

    /// The steps of a reload that can fail, on the staged groups: the
    /// sockets and inboxes of the worker slots it adds, and the steering of
    /// every group for its worker count.
    fn prepare(&mut self, staged: &mut Staged) -> Result<(), String> {
        let live = self.live_workers();
        if staged.count > live {
            let mut groups: Vec<&mut ReuseportGroup> =
                staged.groups.iter_mut().map(|(g, _)| g).collect();
            staged.slots = stage_slots(&mut groups, self.workers.len(), staged.count)
                .map_err(|e| format!("adding worker slots: {e}"))?;
        }
        let active = staged.count;
        for ((g, _), l) in staged.groups.iter().zip(&staged.cfg.listeners) {
            g.steer(l, active)
                .map_err(|e| format!("steering listener {}: {e}", l.name))?;
        }
        Ok(())
    }

    /// Puts back what [`Supervisor::load_new`] and [`Supervisor::prepare`]
    /// took: the kept groups at their places (less any socket staged for an
    /// added slot), with the previous config's steering. Groups bound for
    /// the new config close.
    fn unstage(&mut self, staged: Staged) {
        let size = self.workers.len();
        let mut old = staged.dropped;
        for (mut g, from) in staged.groups {
            if let Some(j) = from {
                while g.sockets.len() > size {
                    g.pop();
                }
                old[j] = Some(g);
            }
        }
        self.groups = old.into_iter().flatten().collect();
        if let Err(e) = self.steer_groups() {
            tracing::error!("putting the previous steering back: {e}");
        }
    }

    /// Serves the staged config: nothing here can fail.
    fn commit(&mut self, mut staged: Staged) {
        for g in staged.dropped.into_iter().flatten() {
            tracing::info!(
                "listener {} removed; closing its {} sockets",
                g.name,
                g.sockets.len()
            );
        }
        if staged.cfg.stats_file != self.config.stats_file {
            tracing::warn!(
                "stats_file changed to {}; it takes effect at the next start",
                staged.cfg.stats_file.display()
            );
        }
        if staged.cfg.metrics != self.config.metrics {
            tracing::warn!("metrics changed; the endpoint moves at the next start");
        }
        let listeners = staged.cfg.listeners.iter();
        for ((g, _), l) in staged.groups.iter_mut().zip(listeners) {
            if g.recv_buffer != l.recv_buffer {
                if let Err(e) = g.set_recv_buffer(l.recv_buffer) {
                    tracing::warn!("{e}");
                }
            }
        }
        self.groups = staged.groups.into_iter().map(|(g, _)| g).collect();
        super::register_backends(&self.region, &staged.cfg);
        self.config = staged.cfg;
        self.text = staged.text;
        self.apply_cpus(staged.cpus);
        // Steered in `prepare`: only the removal of slots that have already
        // exited (none, this soon) steers again.
        if let Err(e) = self.set_count(staged.count, staged.slots, false) {
            tracing::warn!("after the reload: {e}");
        }
    }

    /// Sends worker `id` the current config and its sockets.
    pub(super) fn send_reload(&mut self, id: usize) {
        let fds: Vec<_> = self
            .groups
            .iter()
            .map(|g| g.sockets[id].as_raw_fd())
            .collect();
        let msg = ControlMsg::Reload {
            origin: self.origin.clone(),
            config: self.text.clone(),
            fds: fds.len() as u32,
        };
        let config_gen = self.config_gen;
        if let Some(live) = self.workers[id].live_mut() {
            let control = &mut live.control;
            match control.send(&msg, &fds) {
                Ok(()) => live.config_gen = config_gen,
                // It is exiting; its reap restarts it with the new config.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    tracing::debug!(worker = id, "exited before its new config reached it")
                }
                Err(e) => tracing::warn!(worker = id, "cannot send the new config: {e}"),
            }
        }
    }

    /// (Re)attaches each group's steering for its current size.
    pub(super) fn steer_groups(&mut self) -> Result<(), SupervisorError> {
        let active = self.live_workers();
        for (g, l) in self.groups.iter().zip(&self.config.listeners) {
            g.steer(l, active)?;
        }
        Ok(())
    }

    /// Follows a change of the allowed CPU set; also retries a resize that
    /// failed (the worker count differs from what the CPUs call for).
    pub(super) fn check_cpus(&mut self) -> Result<(), SupervisorError> {
        let cpus = allowed_cpus().map_err(SupervisorError::Affinity)?;
        let count = worker_count(&self.config, &cpus);
        if cpus == self.cpus && count == self.live_workers() {
            return Ok(());
        }
        if cpus != self.cpus {
            tracing::info!(
                "allowed CPUs changed: {} -> {}",
                format_cpu_list(&self.cpus),
                format_cpu_list(&cpus)
            );
            self.apply_cpus(cpus);
        }
        self.resize(count)
    }

    /// Re-pins every worker to its CPU of `cpus`.
    fn apply_cpus(&mut self, cpus: Vec<usize>) {
        if cpus.is_empty() {
            return;
        }
        for w in &mut self.workers {
            let cpu = cpus[w.id % cpus.len()];
            if cpu == w.cpu {
                continue;
            }
            w.cpu = cpu;
            if let Some(slot) = self.region.slot(w.id) {
                slot.set(Counter::Cpu, cpu as u64);
            }
            if let Some(live) = w.live() {
                let mut set = CpuSet::new();
                if set.set(cpu).is_ok() {
                    if let Err(e) = sched_setaffinity(Pid::from_raw(live.child.id() as i32), &set) {
                        tracing::warn!(worker = w.id, "cannot re-pin to CPU {cpu}: {e}");
                    }
                }
            }
            tracing::info!(worker = w.id, "pinned to CPU {cpu}");
        }
        self.cpus = cpus;
    }

    fn live_workers(&self) -> usize {
        self.workers.iter().filter(|w| !w.retiring).count()
    }

    /// Grows or shrinks every group (and the worker set) to `count`, at the
    /// end only: the kernel numbers group members by position. An added
    /// slot joins whole (a socket in every group, its inbox) or not at all.
    fn resize(&mut self, count: usize) -> Result<(), SupervisorError> {
        let mut slots = Vec::new();
        if count > self.live_workers() {
            let mut groups: Vec<&mut ReuseportGroup> = self.groups.iter_mut().collect();
            slots = stage_slots(&mut groups, self.workers.len(), count)?;
        }
        self.set_count(count, slots, true)
    }

    /// Brings the worker set to `count`, with `slots` the inboxes of the
    /// slots it adds (their sockets are in every group already); steers the
    /// groups for it unless the caller has.
    fn set_count(
        &mut self,
        count: usize,
        slots: Vec<(UnixDatagram, UnixDatagram)>,
        steer: bool,
    ) -> Result<(), SupervisorError> {
        let live = self.live_workers();
        if count == live {
            return Ok(());
        }
        warn_oversubscribed(count, &self.cpus);
        tracing::info!("workers: {live} -> {count}");
        let steered = if count > live {
            // A retiring slot still running comes back into service.
            for w in self.workers.iter_mut().take(count) {
                w.retiring = false;
            }
            let start = self.workers.len();
            for pair in slots {
                let id = self.workers.len();
                self.handoff.push(pair);
                let cpu = self.cpus[id % self.cpus.len()];
                self.workers.push(WorkerSlot::new(id, cpu));
            }
            self.region.set_workers(self.workers.len());
            let steered = if steer { self.steer_groups() } else { Ok(()) };
            self.send_peers();
            for id in start..self.workers.len() {
                self.spawn_or_retry(id);
            }
            steered
        } else {
            // First no worker hands a flow to a retiring one (its ownership
            // entries turn stale) and kernel-cid steering stops choosing its
            // sockets; then it forwards what is queued for it and exits, and
            // its sockets leave the groups.
            for w in self.workers.iter_mut().skip(count) {
                w.retiring = true;
                w.set_restart(None);
                if let Some(slot) = self.region.slot(w.id) {
                    slot.set_state(SlotState::Retiring);
                }
            }
            let steered = if steer { self.steer_groups() } else { Ok(()) };
            // What the kernel was steering to them meanwhile is in their
            // sockets before they read them for the last time.
            crate::reuseport::settle_steering();
            for w in self.workers.iter_mut().skip(count) {
                if let Some(control) = w.control() {
                    let _ = control.send(&ControlMsg::Stop, &[]);
                }
            }
            self.region.set_workers(count);
            steered.and(self.remove_retired())
        };
        steered
    }

    /// Drops retired slots that have exited, from the end of the groups.
    pub(super) fn remove_retired(&mut self) -> Result<(), SupervisorError> {
        let mut removed = false;
        while self
            .workers
            .last()
            .is_some_and(|w| w.retiring && !w.is_live())
        {
            for g in &mut self.groups {
                g.pop();
            }
            self.handoff.pop();
            self.workers.pop();
            removed = true;
        }
        if removed {
            self.steer_groups()?;
            self.send_peers();
        }
        Ok(())
    }

    /// Tells every running worker the current set of handoff inboxes.
    fn send_peers(&mut self) {
        let fds: Vec<_> = self.handoff.iter().map(|(_, tx)| tx.as_raw_fd()).collect();
        let msg = ControlMsg::Peers {
            fds: fds.len() as u32,
        };
        for w in &mut self.workers {
            if let Some(control) = w.control() {
                if let Err(e) = control.send(&msg, &fds) {
                    tracing::warn!(worker = w.id, "cannot update handoff peers: {e}");
                }
            }
        }
    }
}

fn monotonic_usec() -> u64 {
    udpshard_shared::clock::monotonic_ns() / 1000
}

/// A new config, bound and checked, not yet served.
struct Staged {
    cfg: config::Config,
    text: String,
    cpus: Vec<usize>,
    count: usize,
    /// Its groups in config order, each with the index of the old group it
    /// keeps.
    groups: Vec<(ReuseportGroup, Option<usize>)>,
    /// The old groups it does not keep, at their old indices.
    dropped: Vec<Option<ReuseportGroup>>,
    /// The inboxes of the worker slots it adds.
    slots: Vec<(UnixDatagram, UnixDatagram)>,
}

/// Adds a socket in every group and an inbox for each slot `from..to`, or,
/// on failure, nothing: the groups are back at `from` sockets.
fn stage_slots(
    groups: &mut [&mut ReuseportGroup],
    from: usize,
    to: usize,
) -> Result<Vec<(UnixDatagram, UnixDatagram)>, SupervisorError> {
    let mut slots = Vec::new();
    let staged = (from..to).try_for_each(|_| {
        groups.iter_mut().try_for_each(|g| g.push())?;
        slots.push(handoff_pair().map_err(SupervisorError::Inbox)?);
        Ok::<(), SupervisorError>(())
    });
    if let Err(e) = staged {
        for g in groups.iter_mut() {
            while g.sockets.len() > from {
                g.pop();
            }
        }
        return Err(e);
    }
    Ok(slots)
}
