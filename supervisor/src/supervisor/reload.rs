//! Changing a running proxy: SIGHUP reloads, CPU-set changes, and the
//! resizing of every reuseport group they may cause.
//!
//! A reload is validated whole before anything changes; a bad file changes
//! nothing (the error names file:line:col, `reload_failures` counts it).
//! A good one keeps every socket it can (a listener with the same name and
//! bind keeps its group, so its queued datagrams and live sessions stay),
//! creates and closes the rest, resizes groups at their end only, and sends
//! each worker the new config with its sockets. Workers keep their sessions.

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
use crate::notify::notify;
use crate::reuseport::ReuseportGroup;

impl Supervisor {
    pub(super) fn reload(&mut self) {
        notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        let what = self.config_path.as_ref().map_or_else(
            || config::DEFAULT_CONFIG_ORIGIN.to_string(),
            |p| p.display().to_string(),
        );
        tracing::info!("SIGHUP: reloading {what}");
        let partly = match self.try_reload() {
            Ok(()) => None,
            Err(Reload::Partly(e)) => Some(e),
            Err(Reload::Refused(e)) => {
                let failures = self.region.header(Header::ReloadFailures) + 1;
                self.region.set_header(Header::ReloadFailures, failures);
                tracing::error!("reload failed, still serving the previous config: {e}");
                notify("READY=1");
                return;
            }
        };
        self.config_gen += 1;
        self.region
            .set_header(Header::ConfigGeneration, self.config_gen);
        // A retiring worker was told to stop: it leaves with the config it
        // has.
        for id in 0..self.workers.len() {
            let w = &self.workers[id];
            if w.state == super::WorkerState::Ready && !w.retiring {
                self.send_reload(id);
            }
        }
        match partly {
            Some(e) => tracing::error!(
                "reloaded {what} (config generation {}: its listeners and backends are served) \
                 but not every step took: {e}; {} workers serve",
                self.config_gen,
                self.live_workers()
            ),
            None => tracing::info!(
                "reloaded {what}: {} listeners, {} workers (config generation {})",
                self.groups.len(),
                self.live_workers(),
                self.config_gen
            ),
        }
        notify("READY=1");
    }

    /// Applies the config file. `Refused`: nothing changed. `Partly`: the
    /// new config is committed (listeners, backends) and a later step
    /// (steering, CPU pinning, resizing) failed: what failed is said, and
    /// the next reload tries it again.
    fn try_reload(&mut self) -> Result<(), Reload> {
        let (cpus, count) = self.load_new().map_err(Reload::Refused)?;
        let mut failed = Vec::new();
        if let Err(e) = self.steer_groups() {
            failed.push(e.to_string());
        }
        if let Err(e) = self.apply_cpus(cpus) {
            failed.push(e.to_string());
        }
        if let Err(e) = self.resize(count) {
            failed.push(e.to_string());
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Reload::Partly(failed.join("; ")))
        }
    }

    /// Reads, checks and binds the new config; commits it (groups, config,
    /// text) only when all of that succeeded. Returns the CPUs and the
    /// worker count it is to run on.
    fn load_new(&mut self) -> Result<(Vec<usize>, usize), String> {
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
        // Lease rows for new upstream sources first: nothing has changed yet.
        super::register_sources(&self.state, &cfg).map_err(|e| e.to_string())?;
        if cfg.stats_file != self.config.stats_file {
            tracing::warn!(
                "stats_file changed to {}; it takes effect at the next start",
                cfg.stats_file.display()
            );
        }
        if cfg.metrics != self.config.metrics {
            tracing::warn!("metrics changed; the endpoint moves at the next start");
        }
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
        for l in &cfg.listeners {
            let kept = old.iter().position(|g| {
                g.as_ref()
                    .is_some_and(|g| g.name == l.name && g.configured == l.bind)
            });
            let group = match kept.and_then(|j| old[j].take()) {
                Some(mut g) => {
                    if g.recv_buffer != l.recv_buffer {
                        if let Err(e) = g.set_recv_buffer(l.recv_buffer) {
                            tracing::warn!("{e}");
                        }
                    }
                    Ok(g)
                }
                None => bind_group(l, size).map_err(|e| e.to_string()),
            };
            match group {
                Ok(g) => groups.push((g, kept)),
                Err(e) => {
                    // Put the kept groups back; new ones close.
                    for (g, from) in groups {
                        if let Some(j) = from {
                            old[j] = Some(g);
                        }
                    }
                    self.groups = old.into_iter().flatten().collect();
                    return Err(e);
                }
            }
        }
        let groups: Vec<ReuseportGroup> = groups.into_iter().map(|(g, _)| g).collect();
        for g in old.into_iter().flatten() {
            tracing::info!(
                "listener {} removed; closing its {} sockets",
                g.name,
                g.sockets.len()
            );
        }
        self.groups = groups;
        self.config = cfg;
        self.text = text;
        Ok((cpus, count))
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
        let w = &mut self.workers[id];
        if let Some(control) = w.control.as_mut() {
            match control.send(&msg, &fds) {
                Ok(()) => w.config_gen = self.config_gen,
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

    pub(super) fn check_cpus(&mut self) -> Result<(), SupervisorError> {
        let cpus = allowed_cpus().map_err(SupervisorError::Affinity)?;
        if cpus == self.cpus {
            return Ok(());
        }
        tracing::info!(
            "allowed CPUs changed: {} -> {}",
            format_cpu_list(&self.cpus),
            format_cpu_list(&cpus)
        );
        let count = worker_count(&self.config, &cpus);
        self.apply_cpus(cpus)?;
        self.resize(count)
    }

    /// Re-pins every worker to its CPU of `cpus`.
    fn apply_cpus(&mut self, cpus: Vec<usize>) -> Result<(), SupervisorError> {
        if cpus.is_empty() {
            return Ok(());
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
            if let Some(child) = &w.child {
                let mut set = CpuSet::new();
                if set.set(cpu).is_ok() {
                    if let Err(e) = sched_setaffinity(Pid::from_raw(child.id() as i32), &set) {
                        tracing::warn!(worker = w.id, "cannot re-pin to CPU {cpu}: {e}");
                    }
                }
            }
            tracing::info!(worker = w.id, "pinned to CPU {cpu}");
        }
        self.cpus = cpus;
        Ok(())
    }

    fn live_workers(&self) -> usize {
        self.workers.iter().filter(|w| !w.retiring).count()
    }

    /// Grows or shrinks every group (and the worker set) to `count`, at the
    /// end only: the kernel numbers group members by position.
    fn resize(&mut self, count: usize) -> Result<(), SupervisorError> {
        let live = self.live_workers();
        if count == live {
            return Ok(());
        }
        warn_oversubscribed(count, &self.cpus);
        tracing::info!("workers: {live} -> {count}");
        if count > live {
            // A retiring slot still running comes back into service.
            for w in self.workers.iter_mut().take(count) {
                w.retiring = false;
            }
            let start = self.workers.len();
            let mut failed = None;
            for id in start..count {
                // A slot joins whole (a socket in every group, its inbox) or
                // not at all: the groups never hold a socket nobody reads.
                if let Err(e) = self.add_slot(id) {
                    failed = Some(e);
                    break;
                }
            }
            let grown = self.workers.len().min(count);
            self.region.set_workers(grown);
            // Each step is tried whatever the one before did; the first
            // error is reported.
            let steered = self.steer_groups();
            self.send_peers();
            for id in start..grown {
                self.spawn_or_retry(id);
            }
            if let Some(e) = failed {
                return Err(e);
            }
            steered?;
        } else {
            // First no worker hands a flow to a retiring one (its ownership
            // entries turn stale) and kernel-cid steering stops choosing its
            // sockets; then it forwards what is queued for it and exits, and
            // its sockets leave the groups.
            for w in self.workers.iter_mut().skip(count) {
                w.retiring = true;
                w.restart_at = None;
                if let Some(slot) = self.region.slot(w.id) {
                    slot.set_state(SlotState::Retiring);
                }
            }
            let steered = self.steer_groups();
            for w in self.workers.iter_mut().skip(count) {
                if let Some(control) = w.control.as_mut() {
                    let _ = control.send(&ControlMsg::Stop, &[]);
                }
            }
            self.region.set_workers(count);
            let removed = self.remove_retired();
            steered?;
            removed?;
        }
        Ok(())
    }

    /// Adds worker slot `id`: its socket in every group and its handoff
    /// inbox; on failure, nothing of it stays.
    fn add_slot(&mut self, id: usize) -> Result<(), SupervisorError> {
        let joined = self
            .groups
            .iter_mut()
            .try_for_each(|g| g.push())
            .map_err(SupervisorError::from)
            .and_then(|()| handoff_pair().map_err(SupervisorError::Poll));
        match joined {
            Ok(pair) => {
                self.handoff.push(pair);
                let cpu = self.cpus[id % self.cpus.len()];
                self.workers.push(WorkerSlot::new(id, cpu));
                Ok(())
            }
            Err(e) => {
                // The groups that took a socket for it give it back.
                for g in self.groups.iter_mut().filter(|g| g.sockets.len() > id) {
                    g.pop();
                }
                Err(e)
            }
        }
    }

    /// Drops retired slots that have exited, from the end of the groups.
    pub(super) fn remove_retired(&mut self) -> Result<(), SupervisorError> {
        let mut removed = false;
        while self
            .workers
            .last()
            .is_some_and(|w| w.retiring && w.child.is_none())
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
            if let Some(control) = w.control.as_mut() {
                if let Err(e) = control.send(&msg, &fds) {
                    tracing::warn!(worker = w.id, "cannot update handoff peers: {e}");
                }
            }
        }
    }
}

use std::os::fd::AsRawFd;

fn monotonic_usec() -> u64 {
    udpshard_shared::clock::monotonic_ns() / 1000
}

/// Why a reload did not fully take.
enum Reload {
    /// Nothing changed: the previous config is served.
    Refused(String),
    /// The new config is served, but these steps failed.
    Partly(String),
}
