//! The new side of a binary upgrade: this binary, started by the old
//! supervisor with `--upgrade-fd N`, inherits its descriptors, starts a
//! standby worker per slot, and takes the slots over once the old workers
//! have handed everything over (see the parent module for the steps).

use std::fs::File;
use std::io;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::Interest;
use udpshard_config::{self as config, Config};
use udpshard_shared::control::{ControlChannel, ControlMsg};
use udpshard_shared::state::StateRegion;
use udpshard_shared::stats::{Counter, Header, Readiness, SlotState, StatsRegion};

use super::state::{Protocol, UpgradeState};
use super::{
    upgrade_error, Inbound, Role, Supervisor, SupervisorError, WorkerSlot, CPU_CHECK,
    INBOUND_GRACE, PROTOCOL, UPGRADE,
};
use crate::notify::notify_ready;
use crate::reuseport::ReuseportGroup;

impl Supervisor {
    /// `udpshard run --upgrade-fd N`: takes over from the supervisor at the
    /// other end of `fd`. `loaded` is the config file as this binary read
    /// it: an error fails the upgrade, and the old generation serves on.
    pub(crate) fn take_over(
        fd: RawFd,
        config_path: Option<PathBuf>,
        loaded: Result<(Config, String, String), config::ConfigError>,
    ) -> Result<Supervisor, SupervisorError> {
        // SAFETY: the old supervisor passed this descriptor for us alone
        // (`--upgrade-fd`), open across exec.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        set_cloexec(fd);
        let mut channel = ControlChannel::new(stream);
        let state = match channel.recv_timeout(Duration::from_secs(10)) {
            Ok((ControlMsg::Inherit { state }, _)) => state,
            Ok((other, _)) => {
                return Err(upgrade_error(format!("expected Inherit, got {other:?}")))
            }
            Err(e) => return Err(upgrade_error(format!("upgrade channel: {e}"))),
        };
        let fail = |channel: &mut ControlChannel, why: String| {
            send_last(channel, &ControlMsg::UpgradeFailed { why: why.clone() });
            upgrade_error(why)
        };
        let mut sup = match Supervisor::inherit(channel, config_path, loaded, &state) {
            Ok(sup) => sup,
            Err(failed) => {
                let (mut channel, why) = *failed;
                return Err(fail(&mut channel, why));
            }
        };
        for id in 0..sup.workers.len() {
            if let Err(e) = sup.spawn(id) {
                return Err(sup.fail_inbound(&e.to_string()));
            }
        }
        Ok(sup)
    }

    fn inherit(
        channel: ControlChannel,
        config_path: Option<PathBuf>,
        loaded: Result<(Config, String, String), config::ConfigError>,
        state: &str,
    ) -> Result<Supervisor, Box<(ControlChannel, String)>> {
        macro_rules! bail {
            ($($t:tt)*) => { return Err(Box::new((channel, format!($($t)*)))) };
        }
        let (_, _, file_text) = match loaded {
            Ok(l) => l,
            Err(e) => bail!("{e}"),
        };
        let protocol = match serde_json::from_str::<Protocol>(state) {
            Ok(p) => p.protocol,
            Err(e) => bail!("the old supervisor's state does not parse: {e}"),
        };
        if protocol != PROTOCOL {
            bail!(
                "the running udpshard speaks upgrade protocol {protocol}, this binary {PROTOCOL}: restart instead"
            );
        }
        let s: UpgradeState = match serde_json::from_str(state) {
            Ok(s) => s,
            Err(e) => bail!("the old supervisor's state does not parse: {e}"),
        };
        // Each named descriptor must be open, and named once: this process
        // takes each as its own, and two owners of one would close it twice.
        let taken = std::cell::RefCell::new(vec![channel.stream.as_raw_fd()]);
        let fd = |fd: RawFd| {
            let mut taken = taken.borrow_mut();
            // SAFETY: F_GETFD only reads the descriptor's flags; it fails
            // with EBADF for one that is not open.
            let open = fd > 2 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
            (open && !taken.contains(&fd)).then(|| {
                taken.push(fd);
                fd
            })
        };
        let (origin, text) = (s.origin.as_str(), s.config.as_str());
        // The config the old generation runs, as this binary reads it: the
        // new workers start with it; the file, if it differs, follows as a
        // reload once they are live.
        let running = match config::parse(text, origin) {
            Ok(c) => c,
            Err(e) => bail!("this binary refuses the running config: {e}"),
        };
        // Started by the old generation, this one runs as its user: a
        // config that names another cannot take over.
        if let Err(e) = crate::supervisor::run_as(&running) {
            bail!("{e}");
        }
        let (Some(stats_fd), Some(state_fd)) = (fd(s.stats_fd), fd(s.state_fd)) else {
            bail!("the old supervisor's state names no stats or state region");
        };
        // SAFETY: open, inherited across exec for this process alone, and
        // named once in the state (`fd` checks both).
        let stats_file = unsafe { File::from_raw_fd(stats_fd) };
        // SAFETY: as for the stats file.
        let state_fd = unsafe { OwnedFd::from_raw_fd(state_fd) };
        set_cloexec(stats_file.as_raw_fd());
        set_cloexec(state_fd.as_raw_fd());
        let region = match StatsRegion::open(&stats_file) {
            Ok(r) => r,
            Err(e) => bail!("the stats region: {e}"),
        };
        let state_region = match StateRegion::open(&state_fd) {
            Ok(r) => r,
            Err(e) => bail!("the state region: {e}"),
        };
        let groups: Vec<ReuseportGroup> = s
            .listeners
            .iter()
            .map(|l| ReuseportGroup {
                name: l.name.clone(),
                addr: l.addr,
                configured: l.configured,
                recv_buffer: l.recv_buffer,
                sockets: owned_fds(&l.fds, &fd)
                    .into_iter()
                    .map(UdpSocket::from)
                    .collect(),
                effective_recv_buffer: l.effective_recv_buffer,
            })
            .collect();
        let predecessors = owned_fds(&s.inboxes, &fd);
        let cpus = s.cpus.clone();
        let count = cpus.len();
        if count == 0
            || predecessors.len() != count
            || groups.len() != running.listeners.len()
            || groups.iter().any(|g| g.sockets.len() != count)
            || region.slot_capacity() < count
        {
            bail!("the old supervisor's state does not describe {count} workers whole");
        }
        let metrics_listener = s.metrics_fd.and_then(fd).map(|fd| {
            set_cloexec(fd);
            // SAFETY: inherited across exec for this process alone.
            unsafe { TcpListener::from_raw_fd(fd) }
        });
        let generations = (0..count)
            .map(|k| region.slot(k).map_or(0, |s| s.life().0) + 1)
            .collect();
        let handoff = match (0..count)
            .map(|_| crate::supervisor::handoff_pair())
            .collect::<io::Result<Vec<_>>>()
        {
            Ok(h) => h,
            Err(e) => bail!("handoff inboxes: {e}"),
        };
        let poll = match mio::Poll::new() {
            Ok(p) => p,
            Err(e) => bail!("event loop: {e}"),
        };
        let mut signals = match crate::supervisor::signals() {
            Ok(s) => s,
            Err(e) => bail!("signals: {e}"),
        };
        if let Err(e) =
            poll.registry()
                .register(&mut signals, crate::supervisor::SIGNALS, Interest::READABLE)
        {
            bail!("signals: {e}");
        }
        let exe = match crate::supervisor::own_path() {
            Ok(e) => e,
            Err(e) => bail!("cannot find the udpshard executable: {e}"),
        };
        let metrics = match metrics_listener {
            None => None,
            Some(l) => {
                match crate::metrics::MetricsServer::from_listener(l, poll.registry(), &stats_file)
                {
                    Ok(m) => Some(m),
                    Err(e) => bail!("metrics endpoint: {e}"),
                }
            }
        };
        if let Err(e) = channel.stream.set_nonblocking(true) {
            bail!("upgrade channel: {e}");
        }
        if let Err(e) = poll.registry().register(
            &mut SourceFd(&channel.stream.as_raw_fd()),
            UPGRADE,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            bail!("upgrade channel: {e}");
        }
        let stats_path = PathBuf::from(&s.stats_path);
        let config_gen = s.config_generation;
        let upgrade_timeout = running.upgrade_timeout;
        let workers = cpus
            .iter()
            .enumerate()
            .map(|(id, &cpu)| WorkerSlot::new(id, cpu))
            .collect();
        let sup = Supervisor {
            config_path,
            config: running,
            origin: origin.to_string(),
            text: text.to_string(),
            config_gen,
            groups,
            handoff,
            region,
            stats_file,
            state: state_region,
            state_fd,
            workers,
            cpus: crate::supervisor::allowed_cpus().unwrap_or(cpus),
            poll,
            signals,
            exe,
            next_cpu_check: Instant::now() + CPU_CHECK,
            next_health_check: Instant::now() + crate::health::CHECK,
            health: crate::health::Health::default(),
            metrics,
            upgrades_refused: 0,
            stats_saved: Vec::new(),
            stats_scratch: Vec::new(),
            stats_repairs: 0,
            role: Role::TakingOver(Box::new(Inbound {
                channel,
                generations,
                predecessors,
                deadline: Instant::now() + upgrade_timeout + INBOUND_GRACE,
                standby_sent: false,
                file_text: (file_text != text).then_some(file_text),
            })),
            stats_path,
        };
        tracing::info!(
            "upgrade: inherited {} listeners and {count} slots; starting workers to stand by",
            sup.groups.len()
        );
        Ok(sup)
    }

    /// The new side: a worker said `Ready` while standing by.
    pub(in crate::supervisor) fn standby_ready(&mut self) {
        let all = self.workers.iter().all(WorkerSlot::is_ready);
        let Role::TakingOver(i) = &mut self.role else {
            return;
        };
        if !all || i.standby_sent {
            return;
        }
        i.standby_sent = true;
        let fds: Vec<RawFd> = self.handoff.iter().map(|(_, tx)| tx.as_raw_fd()).collect();
        let msg = ControlMsg::Standby {
            fds: fds.len() as u32,
        };
        if let Err(e) = i.channel.send(&msg, &fds) {
            tracing::error!("upgrade: cannot tell the old generation we stand by: {e}");
        }
        tracing::info!("upgrade: {} workers stand by", fds.len());
    }

    pub(super) fn read_from_old(&mut self) -> Result<bool, SupervisorError> {
        let Role::TakingOver(i) = &mut self.role else {
            return Ok(false);
        };
        let _ = i.channel.flush();
        let open = i.channel.read_available().unwrap_or(false);
        let mut handed = false;
        let mut read = false;
        while let Some(msg) = i.channel.next_msg() {
            match msg {
                Ok((ControlMsg::Handed, _)) => handed = true,
                Ok((ControlMsg::ReadListeners, _)) => read = true,
                Ok((other, _)) => tracing::warn!("upgrade: unexpected message {other:?}"),
                Err(e) => tracing::warn!("upgrade: bad message from the old supervisor: {e}"),
            }
        }
        if read {
            for w in &mut self.workers {
                if let Some(control) = w.control() {
                    let _ = control.send(&ControlMsg::ReadListeners, &[]);
                }
            }
            tracing::info!("upgrade: the new workers read the listeners while sessions move");
        }
        if handed {
            self.go_live();
        } else if !open {
            // The old supervisor is gone, and its workers with it
            // (PR_SET_PDEATHSIG): the slots are ours.
            tracing::warn!("upgrade: the old supervisor went away; taking the slots over");
            self.go_live();
        }
        Ok(false)
    }

    /// Every slot is the new generation's: publish it, let the workers
    /// serve, tell systemd and the old supervisor.
    fn go_live(&mut self) {
        if !matches!(self.role, Role::TakingOver(_)) {
            return;
        }
        let serving = Role::Serving {
            announced_ready: true,
        };
        let Some(Role::TakingOver(mut i)) = self.set_role(serving) else {
            return;
        };
        self.set_readiness(Readiness::Ready);
        let pid = std::process::id();
        self.region
            .set_header(Header::SupervisorPid, u64::from(pid));
        self.region.set_header(
            Header::SupervisorStartTicks,
            crate::process::start_ticks(pid).unwrap_or(0),
        );
        self.region.set_header(
            Header::SupervisorPidNs,
            crate::process::pid_namespace().unwrap_or(0),
        );
        self.region
            .set_header(Header::SupervisorVersion, crate::version_word());
        let upgrades = self.region.header(Header::Upgrades) + 1;
        self.region.set_header(Header::Upgrades, upgrades);
        for w in &mut self.workers {
            if let Some(slot) = self.region.slot(w.id) {
                slot.set_life(i.generation(w.id), SlotState::Ready);
                slot.set(Counter::Cpu, w.cpu as u64);
                slot.set(Counter::Version, crate::version_word());
                if let Some(live) = w.live() {
                    slot.set(Counter::ConfigGeneration, live.config_gen);
                    slot.set(Counter::Pid, u64::from(live.child.id()));
                }
            }
            let id = w.id;
            if let Some(control) = w.control() {
                if let Err(e) = control.send(&ControlMsg::Live, &[]) {
                    tracing::warn!(worker = id, "cannot tell the worker it is live: {e}");
                }
            }
        }
        let message = format!(
            "upgraded to {}: {} workers serving, pid {pid}",
            crate::VERSION,
            self.workers.len()
        );
        tracing::info!("{message}");
        notify_ready(&message);
        send_last(&mut i.channel, &ControlMsg::Took);
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&i.channel.stream.as_raw_fd()));
        drop(i.predecessors);
        if i.file_text.is_some() {
            tracing::info!("upgrade: the config file differs from what ran; applying it");
            self.reload();
        }
    }

    /// The new side gives up: the old supervisor hears why, and this one
    /// exits (its workers die with it).
    pub(in crate::supervisor) fn fail_inbound(&mut self, why: &str) -> SupervisorError {
        if matches!(self.role, Role::TakingOver(_)) {
            if let Some(Role::TakingOver(mut i)) = self.set_role(Role::GaveUp) {
                let why = why.to_string();
                send_last(&mut i.channel, &ControlMsg::UpgradeFailed { why });
            }
        }
        upgrade_error(why)
    }
}

/// Sends `msg` as this side's last word on `channel`: it waits until the
/// message is written (the process may exit right after).
fn send_last(channel: &mut ControlChannel, msg: &ControlMsg) {
    let _ = channel.send(msg, &[]);
    let _ = channel.stream.set_nonblocking(false);
    let _ = channel.flush();
}

/// The descriptors `list` names, each checked by `fd` (open, named once),
/// close-on-exec, and this process's own.
fn owned_fds(list: &[RawFd], fd: &impl Fn(RawFd) -> Option<RawFd>) -> Vec<OwnedFd> {
    list.iter()
        .filter_map(|&n| fd(n))
        .map(|fd| {
            set_cloexec(fd);
            // SAFETY: open (checked by `fd`), inherited across exec for this
            // process alone, and named once in the state.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect()
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: sets a flag on a descriptor this process owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}
