//! Why a datagram was dropped: one list, in the order a datagram meets the
//! hops. The worker counts by it, `stats --json` names its `drops` keys by it,
//! Prometheus labels its `reason` by it, and the stage summary groups by it,
//! so a reason cannot be counted in one place and forgotten in another.

use crate::stats::Counter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The kernel dropped it on the worker's listener socket (buffer full).
    Socket,
    /// No flow key in it: not the configured protocol.
    Malformed,
    /// It could not be handed to the worker that owns its session (that
    /// worker's inbox was full, or its listener is gone), or it bounced
    /// between workers up to the hop cap while another had its flow.
    Handoff,
    /// A long header with no session that is not a QUIC Initial in a
    /// datagram of at least 1200 bytes (RFC 9000 14.1): it may not open one.
    NotInitial,
    /// A new session or path beyond its source prefix's rate.
    RateLimited,
    /// A new flow beyond `max_sessions`.
    SessionLimit,
    /// A new flow while the worker drains (SIGTERM/SIGINT).
    Draining,
    /// A new flow with no backend to go to.
    NoBackend,
    /// A new path its session may not have now: beyond its rate of new
    /// paths, or every path it has is one its backend answered.
    PathLimit,
    /// A new path for which no (source, port) is free toward its backend.
    NoPort,
    /// A new path for which the worker may open no more descriptors.
    NoFd,
    /// With `proxy_protocol = "v2"`: the header would take it past the
    /// largest datagram the path to its backend carries unfragmented.
    ProxyMtu,
    /// Sending it to the backend failed.
    Upstream,
    /// The kernel dropped a reply on an upstream socket (buffer full).
    UpstreamSocket,
    /// A datagram on an upstream socket that no path expects: not from a
    /// backend, or for a path that has closed.
    Stray,
    /// A reply could not be sent on to its client.
    Reply,
    /// Taken in by a worker that died before it forwarded, handed on or
    /// dropped it (booked when the supervisor reaps the worker).
    WorkerLost,
    /// A reply read by a worker that died before it sent it on.
    WorkerLostReply,
}

/// Where on a datagram's way a drop happens, in path order. The first three
/// are the host's own counters (every program's datagrams, not only
/// udpshard's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Nic,
    Softnet,
    /// UDP drops on sockets other than udpshard's.
    Udp,
    Listener,
    Handoff,
    Sessions,
    Upstream,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::Nic,
        Stage::Softnet,
        Stage::Udp,
        Stage::Listener,
        Stage::Handoff,
        Stage::Sessions,
        Stage::Upstream,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Nic => "NIC (rx dropped+errors)",
            Stage::Softnet => "softnet backlog",
            Stage::Udp => "UDP, other sockets",
            Stage::Listener => "listener sockets",
            Stage::Handoff => "handoff",
            Stage::Sessions => "sessions/backends",
            Stage::Upstream => "upstream sockets",
        }
    }

    /// The worker's drop reasons counted at this stage.
    pub fn reasons(self) -> impl Iterator<Item = DropReason> {
        DropReason::ALL
            .into_iter()
            .filter(move |r| r.stage() == self)
    }
}

impl DropReason {
    /// Every reason, in path order.
    pub const ALL: [DropReason; 18] = [
        DropReason::Socket,
        DropReason::WorkerLost,
        DropReason::Malformed,
        DropReason::Handoff,
        DropReason::NotInitial,
        DropReason::RateLimited,
        DropReason::SessionLimit,
        DropReason::Draining,
        DropReason::NoBackend,
        DropReason::PathLimit,
        DropReason::NoPort,
        DropReason::NoFd,
        DropReason::ProxyMtu,
        DropReason::Upstream,
        DropReason::UpstreamSocket,
        DropReason::Stray,
        DropReason::Reply,
        DropReason::WorkerLostReply,
    ];

    /// The reasons a client datagram is dropped for on its way to a
    /// backend, in path order: every stage before the upstream sockets.
    pub fn client() -> impl Iterator<Item = DropReason> {
        DropReason::ALL
            .into_iter()
            .filter(|r| r.stage() != Stage::Upstream)
    }

    /// The reasons a reply is dropped for on its way back to its client.
    pub fn reply() -> impl Iterator<Item = DropReason> {
        DropReason::ALL
            .into_iter()
            .filter(|r| r.stage() == Stage::Upstream)
    }

    /// Dropped by the kernel, on a socket's receive queue: before any
    /// worker read it.
    pub fn before_read(self) -> bool {
        matches!(self, DropReason::Socket | DropReason::UpstreamSocket)
    }

    /// Its key in `stats --json`'s `drops` and its Prometheus `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Socket => "socket",
            DropReason::Malformed => "malformed",
            DropReason::Handoff => "handoff",
            DropReason::NotInitial => "not_initial",
            DropReason::RateLimited => "rate_limited",
            DropReason::SessionLimit => "session_limit",
            DropReason::Draining => "draining",
            DropReason::NoBackend => "no_backend",
            DropReason::PathLimit => "path_limit",
            DropReason::NoPort => "no_port",
            DropReason::NoFd => "no_fd",
            DropReason::ProxyMtu => "proxy_mtu",
            DropReason::Upstream => "upstream",
            DropReason::UpstreamSocket => "upstream_socket",
            DropReason::Stray => "stray",
            DropReason::Reply => "reply",
            DropReason::WorkerLost => "worker_lost",
            DropReason::WorkerLostReply => "worker_lost_reply",
        }
    }

    /// One line for people (the `--wide` legend).
    pub fn help(self) -> &'static str {
        match self {
            DropReason::Socket => "dropped by the kernel on the listener socket (buffer full)",
            DropReason::Malformed => "no flow key in the datagram (not the configured protocol)",
            DropReason::Handoff => {
                "could not be handed to the worker owning its session (or bounced past the hop cap)"
            }
            DropReason::NotInitial => {
                "a long header with no session that is no QUIC Initial of 1200 bytes or more"
            }
            DropReason::RateLimited => "a new session or path beyond its source's rate (admission)",
            DropReason::SessionLimit => "a new flow beyond max_sessions",
            DropReason::Draining => "a new flow while stopping (SIGTERM/SIGINT)",
            DropReason::NoBackend => "a new flow with no backend to go to",
            DropReason::PathLimit => {
                "a new path beyond its session's rate, or every path is one its backend answered"
            }
            DropReason::NoPort => "no (source, port) free toward the backend (upstream_ports)",
            DropReason::NoFd => "no descriptor left for a new upstream socket (RLIMIT_NOFILE)",
            DropReason::ProxyMtu => {
                "the PROXY v2 header would take it past the path MTU to its backend"
            }
            DropReason::Upstream => "sending to the backend failed",
            DropReason::UpstreamSocket => {
                "replies dropped by the kernel on upstream sockets (it counts a GRO buffer, a backend's whole flight, as one)"
            }
            DropReason::Stray => {
                "on an upstream socket, not from a path's backend (late or foreign)"
            }
            DropReason::Reply => "a reply could not be sent on to its client",
            DropReason::WorkerLost => {
                "taken in by a worker that died before it sent it on (booked at the restart)"
            }
            DropReason::WorkerLostReply => "a reply read by a worker that died before sending it",
        }
    }

    pub fn counter(self) -> Counter {
        match self {
            DropReason::Socket => Counter::DropSocket,
            DropReason::Malformed => Counter::DropMalformed,
            DropReason::Handoff => Counter::DropHandoff,
            DropReason::NotInitial => Counter::DropNotInitial,
            DropReason::RateLimited => Counter::DropRateLimited,
            DropReason::PathLimit => Counter::DropPathLimit,
            DropReason::SessionLimit => Counter::DropSessionLimit,
            DropReason::Draining => Counter::DropDraining,
            DropReason::NoBackend => Counter::DropNoBackend,
            DropReason::NoPort => Counter::DropNoPort,
            DropReason::NoFd => Counter::DropNoFd,
            DropReason::ProxyMtu => Counter::DropProxyMtu,
            DropReason::Upstream => Counter::DropUpstream,
            DropReason::UpstreamSocket => Counter::DropUpstreamSocket,
            DropReason::Stray => Counter::DropStray,
            DropReason::Reply => Counter::DropReply,
            DropReason::WorkerLost => Counter::DropWorkerLost,
            DropReason::WorkerLostReply => Counter::DropWorkerLostReply,
        }
    }

    pub fn stage(self) -> Stage {
        match self {
            // Dissected as it is read, before any handoff.
            // Taken off the listener socket, never sent on.
            DropReason::Socket | DropReason::WorkerLost | DropReason::Malformed => Stage::Listener,
            DropReason::Handoff => Stage::Handoff,
            DropReason::NotInitial
            | DropReason::RateLimited
            | DropReason::SessionLimit
            | DropReason::PathLimit
            | DropReason::Draining
            | DropReason::NoBackend
            | DropReason::NoPort
            | DropReason::NoFd
            | DropReason::ProxyMtu
            | DropReason::Upstream => Stage::Sessions,
            DropReason::UpstreamSocket
            | DropReason::Stray
            | DropReason::Reply
            | DropReason::WorkerLostReply => Stage::Upstream,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_name_and_counter_and_is_in_path_order() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        let mut counters: Vec<_> = DropReason::ALL
            .iter()
            .map(|r| r.counter() as usize)
            .collect();
        names.dedup();
        counters.sort_unstable();
        counters.dedup();
        assert_eq!(names.len(), DropReason::ALL.len());
        assert_eq!(counters.len(), DropReason::ALL.len());
        let stages: Vec<usize> = DropReason::ALL
            .iter()
            .map(|r| Stage::ALL.iter().position(|s| *s == r.stage()).unwrap())
            .collect();
        assert!(stages.windows(2).all(|w| w[0] <= w[1]), "{stages:?}");
        let counted: usize = Stage::ALL.iter().map(|s| s.reasons().count()).sum();
        assert_eq!(counted, DropReason::ALL.len());
    }
}
