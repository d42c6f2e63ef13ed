//! `udpshard stats`: reads the shared-memory stats file and prints it as a
//! table for a person or as JSON for a program.

use std::path::Path;

use serde_json::{json, Value};
use udpshard_shared::stats::{Counter, Header, Snapshot, StatsError, WorkerSnapshot};

/// Drop reasons in the order a datagram meets them: kernel socket, dissector,
/// session table, routing, upstream send, handoff, then the return path.
const DROPS: [(&str, Counter); 9] = [
    ("socket", Counter::DropSocket),
    ("malformed", Counter::DropMalformed),
    ("session_limit", Counter::DropSessionLimit),
    ("draining", Counter::DropDraining),
    ("no_backend", Counter::DropNoBackend),
    ("upstream", Counter::DropUpstream),
    ("handoff", Counter::DropHandoff),
    ("upstream_socket", Counter::DropUpstreamSocket),
    ("reply", Counter::DropReply),
];

const PLAIN: [(&str, Counter); 19] = [
    ("pid", Counter::Pid),
    ("cpu", Counter::Cpu),
    ("generation", Counter::Generation),
    ("restarts", Counter::Restarts),
    ("rx_packets", Counter::RxPackets),
    ("rx_bytes", Counter::RxBytes),
    ("tx_packets", Counter::TxPackets),
    ("tx_bytes", Counter::TxBytes),
    ("replies_in", Counter::RepliesIn),
    ("replies_out", Counter::RepliesOut),
    ("sessions_active", Counter::SessionsActive),
    ("sessions_created", Counter::SessionsCreated),
    ("sessions_expired", Counter::SessionsExpired),
    ("handoff_in", Counter::HandoffIn),
    ("transfers_in", Counter::TransfersIn),
    ("transfers_out", Counter::TransfersOut),
    ("owners_full", Counter::OwnersFull),
    ("sessions_rerouted", Counter::SessionsRerouted),
    ("config_generation", Counter::ConfigGeneration),
];

pub fn print(path: &Path, as_json: bool) -> Result<(), StatsError> {
    let snap = Snapshot::read(path)?;
    if as_json {
        println!("{}", to_json(&snap));
    } else {
        print!("{}", to_table(&snap));
    }
    Ok(())
}

fn busy_ratio(w: &WorkerSnapshot<'_>) -> f64 {
    let wall = w.get(Counter::WallNs);
    if wall == 0 {
        0.0
    } else {
        w.get(Counter::BusyNs) as f64 / wall as f64
    }
}

pub fn to_json(snap: &Snapshot) -> Value {
    let workers: Vec<Value> = snap
        .workers()
        .map(|w| {
            let mut obj = serde_json::Map::new();
            obj.insert("id".into(), json!(w.id));
            for (name, c) in PLAIN {
                obj.insert(name.into(), json!(w.get(c)));
            }
            obj.insert("handoff_out".into(), json!(w.get(Counter::HandoffOut)));
            obj.insert("state".into(), json!(w.state().name()));
            obj.insert("busy_ratio".into(), json!(busy_ratio(&w)));
            let drops: serde_json::Map<String, Value> = DROPS
                .iter()
                .map(|(name, c)| ((*name).into(), json!(w.get(*c))))
                .collect();
            obj.insert("drops".into(), Value::Object(drops));
            Value::Object(obj)
        })
        .collect();
    json!({
        "supervisor_pid": snap.header(Header::SupervisorPid),
        "started_at": snap.header(Header::StartedAt),
        "config_generation": snap.header(Header::ConfigGeneration),
        "reload_failures": snap.header(Header::ReloadFailures),
        "workers": workers,
    })
}

pub fn to_table(snap: &Snapshot) -> String {
    let mut out = format!(
        "udpshard supervisor pid {}, config generation {}, reload failures {}\n",
        snap.header(Header::SupervisorPid),
        snap.header(Header::ConfigGeneration),
        snap.header(Header::ReloadFailures)
    );
    out += &format!(
        "{:>3} {:>8} {:>4} {:<8} {:>4} {:>12} {:>12} {:>12} {:>9} {:>6}  drops: {}\n",
        "id",
        "pid",
        "cpu",
        "state",
        "rst",
        "rx",
        "tx",
        "replies",
        "sessions",
        "busy",
        DROPS.map(|(n, _)| n).join(" ")
    );
    for w in snap.workers() {
        let drops: Vec<String> = DROPS.iter().map(|(_, c)| w.get(*c).to_string()).collect();
        out += &format!(
            "{:>3} {:>8} {:>4} {:<8} {:>4} {:>12} {:>12} {:>12} {:>9} {:>5.1}%  {}\n",
            w.id,
            w.get(Counter::Pid),
            w.get(Counter::Cpu),
            w.state().name(),
            w.get(Counter::Restarts),
            w.get(Counter::RxPackets),
            w.get(Counter::TxPackets),
            w.get(Counter::RepliesOut),
            w.get(Counter::SessionsActive),
            busy_ratio(&w) * 100.0,
            drops.join(" ")
        );
    }
    out
}
