//! A udpshard worker: one process pinned to one CPU, one mio event loop,
//! serving its socket of every listener's reuseport group.
//!
//! The supervisor starts it as `udpshard worker ...` with its sockets, its
//! control channel and the stats region inherited as descriptors
//! ([`WorkerArgs`]); the config arrives over the control channel. Lifecycle:
//! starting (slot state `Starting`, set by the supervisor) -> ready (after
//! every listener is registered; the worker says `Ready` on the control
//! channel) -> exited (on `Stop`, or when the supervisor is gone).

mod counters;
mod event_loop;
mod exec;
mod handoff;
mod keyindex;
mod listener;
pub mod paths;
pub mod phase;
mod queue_delay;
mod rawtx;
pub mod router;
mod sandbox;
mod session;
mod shm;
mod sockio;
mod upstream;

use std::io;
use std::os::fd::RawFd;

pub use event_loop::run;
pub use sandbox::{
    become_user, check_user, lookup_user, privileged_upstream_ports, RunAs, UserError,
};
pub use upstream::{ephemeral_range, sources_of as upstream_sources};

/// What the supervisor hands a worker on its command line.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The worker's slot, and its index in every reuseport group.
    pub id: usize,
    pub control_fd: RawFd,
    pub stats_fd: RawFd,
    /// The state region (ownership table, port leases): a memfd.
    pub state_fd: RawFd,
    /// This worker's socket of each listener's group, in config order.
    pub listener_fds: Vec<RawFd>,
    /// This worker's handoff inbox.
    pub handoff_fd: RawFd,
    /// A sending end to every worker's inbox, by worker id.
    pub peer_fds: Vec<RawFd>,
    /// A binary upgrade: this process is generation `standby` of its slot,
    /// which another process still serves; it stands by, taking the
    /// sessions that process hands it, until the supervisor says `Live`.
    pub standby: Option<u64>,
    /// With `standby`: the sending end of the serving process's inbox
    /// (answers to what it hands over).
    pub predecessor_fd: Option<RawFd>,
}

impl WorkerArgs {
    /// Every descriptor it names, with what it is for.
    fn named(&self) -> Vec<(RawFd, &'static str)> {
        let mut fds = vec![
            (self.control_fd, "control"),
            (self.stats_fd, "stats"),
            (self.state_fd, "state"),
            (self.handoff_fd, "handoff inbox"),
        ];
        fds.extend(self.listener_fds.iter().map(|&fd| (fd, "listener")));
        fds.extend(self.peer_fds.iter().map(|&fd| (fd, "handoff peer")));
        fds.extend(self.predecessor_fd.map(|fd| (fd, "predecessor inbox")));
        fds
    }

    /// Refuses a command line that names a descriptor twice, or one of the
    /// standard streams: the worker takes each named descriptor as its own,
    /// and two owners of one would close it twice.
    pub fn check(&self) -> Result<(), WorkerError> {
        let named = self.named();
        for (i, &(fd, name)) in named.iter().enumerate() {
            if fd <= 2 {
                return Err(WorkerError::BadFd { name, fd });
            }
            if let Some(&(_, first)) = named[..i].iter().find(|(other, _)| *other == fd) {
                return Err(WorkerError::DuplicateFd {
                    fd,
                    first,
                    second: name,
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("inherited descriptor {name} (fd {fd}) is not open, or is a standard stream")]
    BadFd { name: &'static str, fd: RawFd },
    #[error("descriptor {fd} is named twice on the command line: as {first} and as {second}")]
    DuplicateFd {
        fd: RawFd,
        first: &'static str,
        second: &'static str,
    },
    #[error("stats region: {0}")]
    Stats(#[from] udpshard_shared::stats::StatsError),
    #[error("{0}")]
    State(#[from] udpshard_shared::state::StateError),
    #[error("worker slot {0} is beyond the stats region's capacity")]
    NoSlot(usize),
    #[error("control channel: {0}")]
    Control(String),
    #[error("{0}")]
    Config(#[from] udpshard_config::ConfigError),
    #[error("got {got} listener sockets for {want} listeners")]
    ListenerCount { got: usize, want: usize },
    #[error("listener {listener}: {source}")]
    Socket { listener: String, source: io::Error },
    #[error("listener {listener}: {source}")]
    Routing {
        listener: String,
        source: udpshard_shared::maglev::MaglevError,
    },
    #[error("event loop: {0}")]
    Poll(io::Error),
}
