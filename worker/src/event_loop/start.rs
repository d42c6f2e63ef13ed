//! A worker's start: it takes the descriptors the supervisor passed, waits
//! for its config, builds its listeners and router, and says it is ready.

use std::fs::File;
use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};
use quinn_udp::BATCH_SIZE;
use udpshard_config::{Offload, UpstreamSend};
use udpshard_shared::clock::monotonic_ns;
use udpshard_shared::control::{ControlChannel, ControlMsg};
use udpshard_shared::owners::{Owner, OwnerIndex};
use udpshard_shared::state::StateRegion;
use udpshard_shared::stats::{Counter, StatsRegion};

use super::{
    drops_from, ListenerBatch, Loop, CONTROL, HANDOFF, LISTENER_TOKEN_BASE, START_TIMEOUT,
};
use crate::counters::Counters;
use crate::exec::Executor;
use crate::handoff::{Handoff, MAX_DATAGRAM};
use crate::listener::Listener;
use crate::phase::Phase;
use crate::queue_delay::QueueDelay;
use crate::rawtx::RawTx;
use crate::router::{Route, Router};
use crate::sandbox;
use crate::shm::ShmOwners;
use crate::sockio;
use crate::upstream::Upstream;
use crate::{WorkerArgs, WorkerError};

/// Runs a worker until the supervisor stops it or goes away.
pub fn run(args: WorkerArgs) -> Result<(), WorkerError> {
    args.check()?;
    // Started from /proc/self/exe, the kernel names the process "exe":
    // `ps`, `top` and `pgrep udpshard` should see what it is.
    let _ = nix::sys::prctl::set_name(c"udpshard");
    let Inherited {
        control,
        stats,
        state,
        listeners: sockets,
        handoff,
    } = Inherited::adopt(&args)?;
    let mut control = ControlChannel::new(control);
    let config = receive_config(&mut control)?;
    let listeners = build_listeners(&config, sockets, &mut [])?;
    raise_fd_limit();
    let poll = Poll::new().map_err(WorkerError::Poll)?;
    control.stream.set_nonblocking(true).map_err(control_err)?;
    register(&poll, control.stream.as_raw_fd(), CONTROL, true)?;
    register(&poll, handoff.inbox.as_raw_fd(), HANDOFF, false)?;
    let region = StatsRegion::open(&stats)?;
    let shared = (&stats, &state, &region);
    let (router, socket_drops) = build_router(&args, &config, shared, &listeners, &poll)?;
    // Standing by, the predecessor reads the listeners until it hands over.
    let registered = router.phase().reads_listeners();
    if registered {
        register_listeners(poll.registry(), &listeners)?;
    }
    if config.offload == Offload::Auto && !sockio::Gso::probe().is_on() && args.id == 0 {
        tracing::info!(
            "offload = \"auto\": this kernel refuses UDP_SEGMENT (it needs Linux 4.18), so \
             every datagram goes out as its own message"
        );
    }
    let exec = Executor::new(
        raw_tx(&config, args.id),
        config.upstream_send == UpstreamSend::Auto,
        config.offload == Offload::Auto,
    );
    // The raw sockets were the last thing that took privilege.
    sandbox(&config, args.id);
    control.send(&ControlMsg::Ready, &[]).map_err(control_err)?;
    let early = wait_live(&mut control, args.standby.is_some())?;
    tracing::debug!(worker = args.id, "ready");

    // A standby successor's counts join the slot's when it goes live.
    let queue_delay = match args.standby {
        Some(_) => QueueDelay::default(),
        None => QueueDelay::resume(region.delay(args.id)),
    };
    let mut lp = Loop {
        poll,
        control,
        undrained: vec![false; listeners.len()],
        inbox_undrained: false,
        listeners,
        router,
        handoff,
        frame: Handoff::frame_buffer(),
        exec,
        rx: ListenerBatch::new(),
        up_rx: sockio::RecvBatch::new(MAX_DATAGRAM),
        refs: Vec::with_capacity(BATCH_SIZE * 4),
        up_ready: Vec::new(),
        up_queued: Vec::new(),
        region,
        id: args.id,
        registered,
        start: Instant::now(),
        start_ns: monotonic_ns(),
        iter_ms: 0,
        warned: Default::default(),
        socket_drops_seen: socket_drops.0,
        socket_drops_base: socket_drops.1,
        rx_ahead: (0, 0),
        replies_ahead: 0,
        wall_base: 0,
        queue_delay,
    };
    let epoch_ms = lp.start_ns / 1_000_000;
    lp.router.set_epoch(epoch_ms);
    for (msg, fds) in early {
        if lp.handle_control(msg, fds) {
            lp.leave();
            lp.publish();
            return Ok(());
        }
    }
    let result = lp.serve();
    lp.publish();
    result
}

fn control_err(e: io::Error) -> WorkerError {
    WorkerError::Control(e.to_string())
}

/// The descriptors the supervisor passed, each taken once.
struct Inherited {
    control: UnixStream,
    stats: File,
    state: OwnedFd,
    listeners: Vec<UdpSocket>,
    handoff: Handoff,
}

impl Inherited {
    fn adopt(args: &WorkerArgs) -> Result<Inherited, WorkerError> {
        let control = UnixStream::from(adopt_fd(args.control_fd, "control")?);
        let stats = File::from(adopt_fd(args.stats_fd, "stats")?);
        let state = adopt_fd(args.state_fd, "state")?;
        let listeners = args
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
        let predecessor = args
            .predecessor_fd
            .map(|fd| adopt_fd(fd, "predecessor inbox").map(UnixDatagram::from))
            .transpose()?;
        let mut handoff = Handoff::new(inbox, peers)
            .map_err(|e| WorkerError::Control(format!("handoff sockets: {e}")))?;
        if predecessor.is_some() {
            handoff
                .set_twin(args.id, predecessor)
                .map_err(|e| WorkerError::Control(format!("predecessor inbox: {e}")))?;
        }
        Ok(Inherited {
            control,
            stats,
            state,
            listeners,
            handoff,
        })
    }
}

/// The config the supervisor sends first.
fn receive_config(control: &mut ControlChannel) -> Result<udpshard_config::Config, WorkerError> {
    match control.recv_timeout(START_TIMEOUT).map_err(control_err)? {
        (ControlMsg::Start { origin, config }, _) => Ok(udpshard_config::parse(&config, &origin)?),
        (other, _) => Err(WorkerError::Control(format!(
            "expected Start, got {other:?}"
        ))),
    }
}

fn register(poll: &Poll, fd: RawFd, token: Token, writable: bool) -> Result<(), WorkerError> {
    let interest = match writable {
        true => Interest::READABLE | Interest::WRITABLE,
        false => Interest::READABLE,
    };
    poll.registry()
        .register(&mut SourceFd(&fd), token, interest)
        .map_err(WorkerError::Poll)
}

/// The router of this process, and where its slot's listener-socket drops
/// stand (see [`drops_from`]). Serving, its counters continue the slot's;
/// standing by, the slot is the predecessor's to write: this process counts
/// from zero and adds the slot's totals when it goes live.
fn build_router(
    args: &WorkerArgs,
    config: &udpshard_config::Config,
    (stats, state, region): (&File, &OwnedFd, &StatsRegion),
    listeners: &[Listener],
    poll: &Poll,
) -> Result<(super::WorkerRouter, (u64, u64)), WorkerError> {
    let slot = region.slot(args.id).ok_or(WorkerError::NoSlot(args.id))?;
    let me = Owner::new(
        args.id,
        args.standby.unwrap_or(slot.get(Counter::Generation)),
    );
    let owners = ShmOwners {
        state: StateRegion::open(state)?,
        stats: StatsRegion::open(stats)?,
    };
    let index = OwnerIndex::new(owners.state.index_key());
    let mut upstream = Upstream::new(
        me,
        poll.registry().try_clone().map_err(WorkerError::Poll)?,
        StateRegion::open(state)?,
    );
    upstream.configure(config);
    let routes = build_routes(config, listeners, region)?;
    let (counters, phase) = match args.standby {
        // It succeeds the process of the slot's generation now.
        Some(generation) => (
            Counters::default(),
            Phase::Standby {
                predecessor: Owner::new(args.id, generation.wrapping_sub(1)),
                listening: false,
            },
        ),
        None => {
            let mut counters = Counters::resume_from(&slot);
            if let Some(counts) = region.backend_counts(args.id) {
                counters.resume_backends(&counts);
            }
            counters.publish(&slot);
            (counters, Phase::Serving)
        }
    };
    // The slot's socket drops continue from its last process's reading of
    // the same sockets (what overflowed since, after a crash, is counted at
    // the next tick), over what the slot counted before on sockets since
    // closed (a resize that retired the slot, a reload that removed a
    // listener).
    let drops = drops_from(&counters);
    let router = Router::new(me, phase, routes, owners, upstream, index, counters);
    Ok((router, drops))
}

/// Serves once the supervisor has published the slot as ready: before
/// that, other workers would take this one's ownership entries as stale.
/// What it sends meanwhile (new peers, a reload) waits for the loop, and is
/// returned. A standby worker serves at once (the sessions handed to it),
/// and goes live when `Live` comes.
#[allow(clippy::type_complexity)]
fn wait_live(
    control: &mut ControlChannel,
    standby: bool,
) -> Result<Vec<(ControlMsg, Vec<OwnedFd>)>, WorkerError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut early = Vec::new();
    if standby {
        return Ok(early);
    }
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match control.recv_timeout(wait).map_err(control_err)? {
            (ControlMsg::Live, _) => return Ok(early),
            other => early.push(other),
        }
    }
}

/// Listeners for `config` on `sockets` (one per listener, in order). A
/// socket that is one of `current` (same inode) keeps that listener's
/// socket state.
pub(super) fn build_listeners(
    config: &udpshard_config::Config,
    sockets: Vec<UdpSocket>,
    current: &mut [Option<Listener>],
) -> Result<Vec<Listener>, WorkerError> {
    if sockets.len() != config.listeners.len() {
        return Err(WorkerError::ListenerCount {
            got: sockets.len(),
            want: config.listeners.len(),
        });
    }
    config
        .listeners
        .iter()
        .zip(sockets)
        .map(|(cfg, socket)| {
            let inode = crate::listener::socket_inode(&socket).ok();
            let same = current
                .iter_mut()
                .find(|l| l.as_ref().is_some_and(|l| Some(l.inode) == inode))
                .and_then(Option::take);
            match same {
                // The duplicate descriptor closes; the listener keeps its own.
                Some(mut listener) => {
                    listener.reconfigure(cfg);
                    Ok(listener)
                }
                None => Listener::new(cfg, socket),
            }
        })
        .collect()
}

/// The routes of `config`, each backend with its row of counters in the
/// stats region (the supervisor gave them out before sending the config).
pub(super) fn build_routes(
    config: &udpshard_config::Config,
    listeners: &[Listener],
    region: &StatsRegion,
) -> Result<Vec<Route>, WorkerError> {
    config
        .listeners
        .iter()
        .zip(listeners)
        .map(|(cfg, l)| {
            let mut route = Route::new(cfg, l.wildcard).map_err(|source| WorkerError::Routing {
                listener: cfg.name.clone(),
                source,
            })?;
            for (b, backend) in cfg.backends.iter().enumerate() {
                let row = region.backend_row(&cfg.name, backend.addr);
                route.set_row(b, row.map(|r| r as u16));
            }
            if route.sends_proxy_v2() {
                let local = l.socket.local_addr().unwrap_or(cfg.bind);
                let room = cfg
                    .backends
                    .iter()
                    .map(|b| sockio::path_room(b.addr))
                    .collect();
                route.set_proxy_v2_path(local, room);
            }
            Ok(route)
        })
        .collect()
}

pub(super) fn deregister_listeners(registry: &mio::Registry, listeners: &[Listener]) {
    for listener in listeners {
        let _ = registry.deregister(&mut SourceFd(&listener.socket.as_raw_fd()));
    }
}

pub(super) fn register_listeners(
    registry: &mio::Registry,
    listeners: &[Listener],
) -> Result<(), WorkerError> {
    for (l, listener) in listeners.iter().enumerate() {
        let fd = listener.socket.as_raw_fd();
        registry
            .register(
                &mut SourceFd(&fd),
                Token(LISTENER_TOKEN_BASE + l),
                Interest::READABLE,
            )
            .map_err(WorkerError::Poll)?;
    }
    Ok(())
}

/// Takes ownership of a descriptor inherited from the supervisor.
fn adopt_fd(fd: RawFd, name: &'static str) -> Result<OwnedFd, WorkerError> {
    // SAFETY: F_GETFD only reads the descriptor's flags; it fails with EBADF
    // for a descriptor that is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(WorkerError::BadFd { name, fd });
    }
    // SAFETY: the descriptor is open (checked above) and was passed to this
    // process for it alone to own; the supervisor names each once
    // (`WorkerArgs::check` refuses a command line that does not).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not to be inherited by anything this worker might start.
    // SAFETY: sets a flag on a descriptor we own.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

/// The raw sockets forwards may leave on, only where `upstream_send =
/// "auto"` asks for them and only for the families of the backends: a raw
/// socket can send any packet, so a worker holds none it does not use. (A
/// reload to "auto" or to a backend of another family finds none: those
/// forwards go out on their own sockets until the workers restart.)
fn raw_tx(config: &udpshard_config::Config, worker: usize) -> RawTx {
    if config.upstream_send == UpstreamSend::Socket {
        return RawTx::none();
    }
    let backends = || config.listeners.iter().flat_map(|l| &l.backends);
    let v4 = backends().any(|b| b.addr.is_ipv4());
    let v6 = backends().any(|b| b.addr.is_ipv6());
    let (tx, errors) = RawTx::open(v4, v6);
    if tx.is_on() {
        tracing::debug!(worker, "forwards leave as raw IP packets");
    } else if let Some(e) = errors.first() {
        // Said once per host, not once per worker.
        if worker == 0 {
            tracing::info!(
                "upstream_send = \"auto\": no raw socket ({e}; it takes CAP_NET_RAW), \
                 so each forward goes out on its own upstream socket, one sendmmsg per socket"
            );
        }
    }
    tx
}

/// Gives up every capability (CAP_NET_BIND_SERVICE stays where the config
/// binds upstream ports below the kernel's unprivileged start) and sets
/// no_new_privs: from here the worker needs only its descriptors.
fn sandbox(config: &udpshard_config::Config, worker: usize) {
    let keep_bind = sandbox::privileged_upstream_ports(config).is_some();
    match sandbox::drop_privileges(keep_bind) {
        Ok(dropped) if worker == 0 => tracing::info!(
            "workers run as uid {} with no capabilities{}{} and no_new_privs",
            nix::unistd::geteuid(),
            if dropped.kept_bind {
                " but CAP_NET_BIND_SERVICE (upstream_ports below the unprivileged start)"
            } else {
                ""
            },
            if dropped.bounding_cleared {
                ", an empty bounding set"
            } else {
                ""
            }
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(worker, "cannot drop the worker's privileges: {e}"),
    }
    // A test's hook: this worker calls what the filter forbids, once (the
    // hook's file is gone before the filter is on, so a restart serves).
    let forbidden = std::env::var_os("UDPSHARD_TEST_FORBIDDEN_SYSCALL")
        .map(std::path::PathBuf::from)
        .filter(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| t.trim() == worker.to_string())
                && std::fs::remove_file(f).is_ok()
        });
    if !config.syscall_filter {
        if worker == 0 {
            tracing::info!(
                "syscall_filter = \"off\": workers run without their system-call allowlist"
            );
        }
        return;
    }
    match sandbox::install_syscall_filter() {
        Ok(()) if worker == 0 => tracing::info!(
            "workers run under a system-call allowlist (seccomp; syscall_filter = \"off\" for debugging)"
        ),
        Ok(()) => {}
        Err(e) if worker == 0 => tracing::warn!("no system-call filter: {e}"),
        Err(_) => {}
    }
    if forbidden.is_some() {
        // SAFETY: acct(2) with a null path, which the filter refuses before
        // the kernel runs it.
        unsafe { libc::syscall(libc::SYS_acct, std::ptr::null::<libc::c_char>()) };
    }
}

/// Each upstream socket is a descriptor: allow as many as the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
