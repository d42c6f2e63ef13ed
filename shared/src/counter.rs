//! Every word of a worker's stats slot, with what it is called, what it
//! means and who writes it: one catalogue that the worker's publishing,
//! `udpshard stats` (the table and `--json`) and the Prometheus endpoint
//! read, so that a counter cannot be named in one place and missed in
//! another. (Drop reasons have their own list, `crate::drops`, which names
//! the `drops.*` counters.)

use crate::DropReason;

/// Per-worker slot words. Identity words (pid, cpu, generation, state,
/// restarts) are written by the supervisor, the rest by the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    Pid = 0,
    Cpu,
    /// Incremented each time a process takes the slot.
    Generation,
    State,
    Restarts,
    /// Datagrams read from clients on the listener sockets.
    RxPackets,
    RxBytes,
    /// Datagrams forwarded to backends.
    TxPackets,
    TxBytes,
    /// Datagrams read from backends on upstream sockets.
    RepliesIn,
    /// Replies sent on to clients.
    RepliesOut,
    SessionsActive,
    SessionsCreated,
    SessionsExpired,
    HandoffIn,
    HandoffOut,
    /// Kernel drops on the worker's listener sockets (SK_MEMINFO_DROPS).
    DropSocket,
    DropMalformed,
    DropSessionLimit,
    DropNoBackend,
    /// Forwarding to a backend failed (send error, no upstream socket).
    DropUpstream,
    DropHandoff,
    /// A backend's reply could not be sent to the client.
    DropReply,
    /// Kernel drops on upstream sockets, closed ones included.
    DropUpstreamSocket,
    /// Sessions moved to or from another worker (with their upstream socket).
    TransfersIn,
    TransfersOut,
    /// Keys the ownership table had no room for (tracked locally only).
    OwnersFull,
    /// New flows refused while draining.
    DropDraining,
    /// The config generation the worker has applied (supervisor-written,
    /// when the worker confirms).
    ConfigGeneration,
    /// Live sessions moved to another backend because theirs was removed.
    SessionsRerouted,
    /// Nanoseconds spent handling events (not waiting in poll).
    BusyNs,
    /// Nanoseconds since the worker started its loop.
    WallNs,
    /// Event-loop iterations.
    Loops,
    /// The longest single iteration (handling time, µs) in the last
    /// completed second: how long a datagram can wait behind the loop.
    LoopMaxUs,
    /// The worker's clock at its last publish (CLOCK_MONOTONIC, ns).
    Heartbeat,
    /// New paths refused: no (source, port) free toward the backend.
    DropNoPort,
    /// New paths refused: no descriptor left for an upstream socket.
    DropNoFd,
    /// Datagrams on upstream sockets that no path expects.
    DropStray,
    /// Paths (client address, upstream 4-tuple) this worker serves or relays.
    PathsActive,
    PathsCreated,
    /// Paths closed because their session reached `max_paths`.
    PathsEvicted,
    /// Paths opened on the port their flow had at a worker that died (bound
    /// again: the backend saw no change).
    PathsInherited,
    /// Upstream sockets this worker holds (each one (source, port)).
    UpstreamSockets,
    /// Frames from other workers that did not decode (a bug, never traffic).
    BadFrames,
    /// Control frames to other workers given up: their inbox stayed full
    /// past the queue's bound, or their worker was gone.
    ControlLost,
    /// Datagrams of `TxPackets` that left as raw IP packets (many upstream
    /// ports per sendmmsg) rather than on their own sockets.
    TxRaw,
    /// Forwards the raw socket refused (a full send buffer, a datagram over
    /// the device MTU), sent on their own sockets instead.
    TxRawRefused,
    /// Client datagrams a worker had taken in (read, or been handed) and
    /// not yet forwarded, handed on or dropped when it died: booked by the
    /// supervisor when it reaps the worker, from the slot's own ledger.
    DropWorkerLost,
    /// Replies likewise (read from backends, not yet sent on).
    DropWorkerLostReply,
    /// The `Header::HealthGeneration` whose backend states the worker
    /// routes new sessions by.
    HealthApplied,
    /// The slot's generation and state in one word (generation << 8 |
    /// state), written by the supervisor alone: what liveness is read from,
    /// in one load. `Generation` and `State` repeat it for display.
    Life,
    /// The version of the binary the slot's process runs ([`pack_version`]),
    /// supervisor-written.
    Version,
    /// The kernel's drop counts on the listener sockets, summed, as the
    /// worker last read them: `DropSocket` less this is what closed sockets
    /// counted, and the slot's next process counts on from this reading.
    ListenerDropsSeen,
    DropNotInitial,
    DropRateLimited,
    DropPathLimit,
    /// Sessions whose backend has not sent on them yet.
    SessionsEmbryonic,
    /// Embryonic sessions closed unanswered: to make room for a new flow,
    /// or after `embryonic_timeout`.
    SessionsEvicted,
    /// Upstream receive buffers that held more than one datagram (UDP_GRO).
    RxGroBuffers,
    /// Messages of more than one datagram sent with UDP_SEGMENT (GSO),
    /// replies and forwards.
    TxGsoMessages,
    /// The datagrams those messages carried.
    TxGsoDatagrams,
    /// Times the slot's worker was killed by its system-call filter
    /// (SIGSYS), supervisor-written; each is also one of `Restarts` where
    /// the worker was restarted.
    FilterKills,
    /// Datagrams the PROXY v2 header would have taken past the path MTU.
    DropProxyMtu,
}

impl Counter {
    pub const COUNT: usize = Counter::DropProxyMtu as usize + 1;

    /// Every counter, in slot order.
    pub fn all() -> impl Iterator<Item = Counter> {
        CATALOGUE.iter().map(|e| e.counter)
    }

    /// Its catalogue entry.
    pub fn entry(self) -> &'static Entry {
        &CATALOGUE[self as usize]
    }

    /// Its name in `udpshard stats --json`.
    pub fn name(self) -> &'static str {
        self.entry().name
    }

    /// What it counts: a drop counter says it as its reason does.
    pub fn help(self) -> &'static str {
        match DropReason::ALL.iter().find(|r| r.counter() == self) {
            Some(r) => r.help(),
            None => self.entry().help,
        }
    }

    /// Whether the worker writes it (else the supervisor does).
    pub fn worker_owned(self) -> bool {
        self.entry().writer == Writer::Worker
    }
}

/// A counter's catalogue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub counter: Counter,
    /// Its name in `udpshard stats --json` (and the wide table's legend).
    pub name: &'static str,
    /// Its Prometheus family (`udpshard_<metric>_total`, labelled by
    /// worker), when it is exported as one of its own.
    pub metric: Option<&'static str>,
    pub help: &'static str,
    pub kind: Kind,
    pub writer: Writer,
    pub shown: Shown,
}

/// How a counter's value reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; a slot's next process continues it.
    Total,
    /// What holds now (a process's own: it starts from zero).
    Gauge,
    /// Names the process or what it applied (pid, generation, ...).
    Identity,
}

/// Which process writes a counter's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    Worker,
    Supervisor,
}

/// Where `udpshard stats --json` shows a counter (drops go under `drops`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    No,
    /// In each worker's object.
    Worker,
    /// In each worker's object and in `totals` (gauges summed over the
    /// workers serving, the rest over every slot that served).
    WorkerAndTotal,
}

/// The catalogue, in slot order.
pub const CATALOGUE: [Entry; Counter::COUNT] = [
    Entry {
        counter: Counter::Pid,
        name: "pid",
        metric: None,
        help: "The worker process's id.",
        kind: Kind::Identity,
        writer: Writer::Supervisor,
        shown: Shown::Worker,
    },
    Entry {
        counter: Counter::Cpu,
        name: "cpu",
        metric: None,
        help: "The CPU the worker is pinned to.",
        kind: Kind::Identity,
        writer: Writer::Supervisor,
        shown: Shown::Worker,
    },
    Entry {
        counter: Counter::Generation,
        name: "generation",
        metric: None,
        help: "The process's generation in its slot: one more per restart and per binary upgrade.",
        kind: Kind::Identity,
        writer: Writer::Supervisor,
        shown: Shown::Worker,
    },
    Entry {
        counter: Counter::State,
        name: "state",
        metric: None,
        help: "The slot's state (starting, ready, draining, exited, retiring).",
        kind: Kind::Identity,
        writer: Writer::Supervisor,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::Restarts,
        name: "restarts",
        metric: Some("worker_restarts"),
        help: "Times the worker slot's process was restarted.",
        kind: Kind::Total,
        writer: Writer::Supervisor,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::RxPackets,
        name: "rx_packets",
        metric: Some("rx_packets"),
        help: "Datagrams read from clients on the listener sockets.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::RxBytes,
        name: "rx_bytes",
        metric: Some("rx_bytes"),
        help: "Bytes read from clients on the listener sockets.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::TxPackets,
        name: "tx_packets",
        metric: Some("tx_packets"),
        help: "Datagrams forwarded to backends.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::TxBytes,
        name: "tx_bytes",
        metric: Some("tx_bytes"),
        help: "Bytes forwarded to backends.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::RepliesIn,
        name: "replies_in",
        metric: Some("replies_in"),
        help: "Datagrams read from backends on upstream sockets.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::RepliesOut,
        name: "replies_out",
        metric: Some("replies_out"),
        help: "Replies sent on to clients.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::SessionsActive,
        name: "sessions_active",
        metric: None,
        help: "Live sessions.",
        kind: Kind::Gauge,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::SessionsCreated,
        name: "sessions_created",
        metric: Some("sessions_created"),
        help: "Sessions created.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::SessionsExpired,
        name: "sessions_expired",
        metric: Some("sessions_expired"),
        help: "Sessions closed after their idle timeout.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::HandoffIn,
        name: "handoff_in",
        metric: Some("handoff_in"),
        help: "Datagrams handed to this worker by another, which owns their session.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::HandoffOut,
        name: "handoff_out",
        metric: Some("handoff_out"),
        help: "Datagrams this worker handed to the owner of their flow.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::DropSocket,
        name: "drop_socket",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropMalformed,
        name: "drop_malformed",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropSessionLimit,
        name: "drop_session_limit",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropNoBackend,
        name: "drop_no_backend",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropUpstream,
        name: "drop_upstream",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropHandoff,
        name: "drop_handoff",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropReply,
        name: "drop_reply",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropUpstreamSocket,
        name: "drop_upstream_socket",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::TransfersIn,
        name: "transfers_in",
        metric: Some("transfers_in"),
        help: "Sessions moved to this worker (with their upstream sockets).",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::TransfersOut,
        name: "transfers_out",
        metric: Some("transfers_out"),
        help: "Sessions moved away from this worker.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::OwnersFull,
        name: "owners_full",
        metric: None,
        help: "Keys the ownership table had no room for (tracked locally only).",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::DropDraining,
        name: "drop_draining",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::ConfigGeneration,
        name: "config_generation",
        metric: None,
        help: "The config generation the worker has applied.",
        kind: Kind::Identity,
        writer: Writer::Supervisor,
        shown: Shown::Worker,
    },
    Entry {
        counter: Counter::SessionsRerouted,
        name: "sessions_rerouted",
        metric: Some("sessions_rerouted"),
        help: "Live sessions moved to another backend because theirs was removed or went down.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::BusyNs,
        name: "busy_ns",
        metric: None,
        help: "Nanoseconds spent handling events (not waiting in poll).",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::WallNs,
        name: "wall_ns",
        metric: None,
        help: "Nanoseconds since the worker started its loop.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::Loops,
        name: "loops",
        metric: None,
        help: "Event-loop iterations.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::LoopMaxUs,
        name: "loop_max_us",
        metric: None,
        help: "The longest single loop iteration (handling time, us) in the last completed second: how long a datagram can wait behind the loop.",
        kind: Kind::Gauge,
        writer: Writer::Worker,
        shown: Shown::Worker,
    },
    Entry {
        counter: Counter::Heartbeat,
        name: "heartbeat",
        metric: None,
        help: "The worker's clock at its last publish (CLOCK_MONOTONIC, ns).",
        kind: Kind::Gauge,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropNoPort,
        name: "drop_no_port",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropNoFd,
        name: "drop_no_fd",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropStray,
        name: "drop_stray",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::PathsActive,
        name: "paths_active",
        metric: None,
        help: "Paths (client address, upstream 4-tuple) this worker serves or relays.",
        kind: Kind::Gauge,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::PathsCreated,
        name: "paths_created",
        metric: None,
        help: "Paths opened.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::PathsEvicted,
        name: "paths_evicted",
        metric: None,
        help: "Paths closed because their session reached max_paths.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::PathsInherited,
        name: "paths_inherited",
        metric: Some("paths_inherited"),
        help: "Paths opened on the port their flow had at a worker that died: the backend saw no change.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::UpstreamSockets,
        name: "upstream_sockets",
        metric: None,
        help: "Upstream sockets this worker holds, one (source, port) each.",
        kind: Kind::Gauge,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::BadFrames,
        name: "bad_frames",
        metric: Some("handoff_bad_frames"),
        help: "Frames from other workers that did not decode (a bug, never traffic).",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::ControlLost,
        name: "control_lost",
        metric: Some("handoff_control_lost"),
        help: "Control frames to other workers given up: their inbox stayed full past the queue's bound, or their worker was gone.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::TxRaw,
        name: "tx_raw",
        metric: Some("tx_raw_packets"),
        help: "Datagrams of tx_packets sent as raw IP packets (upstream_send = auto with CAP_NET_RAW).",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::TxRawRefused,
        name: "tx_raw_refused",
        metric: Some("tx_raw_refused_packets"),
        help: "Forwards the raw socket refused (full send buffer, over the device MTU), sent on their own sockets.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::DropWorkerLost,
        name: "drop_worker_lost",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Supervisor,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropWorkerLostReply,
        name: "drop_worker_lost_reply",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Supervisor,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::HealthApplied,
        name: "health_generation",
        metric: None,
        help: "The backend-health generation whose states the worker routes new sessions by.",
        kind: Kind::Identity,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::Life,
        name: "life",
        metric: None,
        help: "The slot's generation and state in one word (generation << 8 | state): what liveness is read from, in one load.",
        kind: Kind::Identity,
        writer: Writer::Supervisor,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::Version,
        name: "version",
        metric: None,
        help: "The version of the binary the slot's process runs.",
        kind: Kind::Identity,
        writer: Writer::Supervisor,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::ListenerDropsSeen,
        name: "listener_drops_seen",
        metric: None,
        help: "The kernel's drop counts on the listener sockets as the worker last read them: the slot's next process counts on from here.",
        kind: Kind::Gauge,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropNotInitial,
        name: "drop_not_initial",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropRateLimited,
        name: "drop_rate_limited",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::DropPathLimit,
        name: "drop_path_limit",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
    Entry {
        counter: Counter::SessionsEmbryonic,
        name: "sessions_embryonic",
        metric: None,
        help: "Live sessions whose backend has not sent on them yet (embryonic).",
        kind: Kind::Gauge,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::SessionsEvicted,
        name: "sessions_evicted",
        metric: Some("sessions_evicted"),
        help: "Embryonic sessions closed unanswered: to make room for a new flow, or after embryonic_timeout.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::RxGroBuffers,
        name: "rx_gro_buffers",
        metric: Some("rx_gro_buffers"),
        help: "Reads from backends that returned several datagrams in one buffer (UDP GRO): a flight read in one trip.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::TxGsoMessages,
        name: "tx_gso_messages",
        metric: Some("tx_gso_messages"),
        help: "Sends of several datagrams as one message that the kernel segments (UDP GSO), replies and forwards.",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::TxGsoDatagrams,
        name: "tx_gso_datagrams",
        metric: Some("tx_gso_datagrams"),
        help: "Datagrams sent inside UDP GSO messages (each also counted where it went: tx_packets or replies_out).",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::FilterKills,
        name: "filter_kills",
        metric: Some("worker_filter_kills"),
        help: "Times the slot's worker was killed by its system-call filter (a call outside the allowlist: a bug, or an attack).",
        kind: Kind::Total,
        writer: Writer::Supervisor,
        shown: Shown::WorkerAndTotal,
    },
    Entry {
        counter: Counter::DropProxyMtu,
        name: "drop_proxy_mtu",
        metric: None,
        help: "",
        kind: Kind::Total,
        writer: Writer::Worker,
        shown: Shown::No,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_is_in_slot_order_and_names_each_counter_once() {
        for (i, e) in CATALOGUE.iter().enumerate() {
            assert_eq!(e.counter as usize, i, "{}", e.name);
            assert!(!e.counter.help().is_empty(), "{} has no help", e.name);
        }
        let mut names: Vec<&str> = CATALOGUE.iter().map(|e| e.name).collect();
        let mut metrics: Vec<&str> = CATALOGUE.iter().filter_map(|e| e.metric).collect();
        for list in [&mut names, &mut metrics] {
            let n = list.len();
            list.sort_unstable();
            list.dedup();
            assert_eq!(list.len(), n, "a name twice");
        }
    }

    #[test]
    fn drop_counters_are_the_drop_reasons() {
        for e in &CATALOGUE {
            let reason = DropReason::ALL.iter().any(|r| r.counter() == e.counter);
            assert_eq!(reason, e.name.starts_with("drop_"), "{}", e.name);
        }
    }
}
