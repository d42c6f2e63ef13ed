//! `udpshard stats`: reads the shared-memory stats file and prints it as a
//! table for a person or as JSON for a program.
//!
//! The table is in path order, the order a datagram meets the counters:
//! NIC -> softnet -> UDP (host) -> listener sockets -> handoff ->
//! sessions/backends -> upstream sockets. `--watch` samples repeatedly and
//! marks the first stage whose drops grew: that is where datagrams are lost
//! (the stages after it only see what survived).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use udpshard_shared::stats::{Counter, Header, Snapshot, StatsError, WorkerSnapshot};

use crate::system::SystemCounters;

/// Drop reasons in the order a datagram meets them: the kernel's socket
/// queue, the dissector, the handoff to the owning worker, the session
/// table, routing, the upstream send, then the return path. The names are
/// the `drops` keys of `--json` and the `reason` label of the metrics.
pub const DROPS: [(&str, Counter); 9] = [
    ("socket", Counter::DropSocket),
    ("malformed", Counter::DropMalformed),
    ("handoff", Counter::DropHandoff),
    ("session_limit", Counter::DropSessionLimit),
    ("draining", Counter::DropDraining),
    ("no_backend", Counter::DropNoBackend),
    ("upstream", Counter::DropUpstream),
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
    let sample = Sample::take(path)?;
    if as_json {
        println!("{}", sample.to_json());
    } else {
        print!("{}", to_table(&sample.snap, &sample.system));
    }
    Ok(())
}

/// `--watch`: a sample every `interval`, `count` of them (forever when
/// `None`). After the first, the table shows per-second rates and the
/// stage summary marks the first stage whose drops grew.
pub fn watch(
    path: &Path,
    as_json: bool,
    interval: Duration,
    count: Option<u64>,
) -> Result<(), StatsError> {
    let mut prev: Option<Sample> = None;
    let mut n = 0u64;
    loop {
        let sample = Sample::take(path)?;
        n += 1;
        if as_json {
            println!("{}", sample.to_json());
        } else {
            let mut out = format!("--- sample {n}\n");
            match &prev {
                None => out += &to_table(&sample.snap, &sample.system),
                Some(p) => out += &rates_table(p, &sample),
            }
            print!("{out}");
        }
        if count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        prev = Some(sample);
        std::thread::sleep(interval);
    }
}

/// One reading of the proxy's and the host's counters.
pub struct Sample {
    pub snap: Snapshot,
    pub system: SystemCounters,
    pub at: Instant,
}

impl Sample {
    pub fn take(path: &Path) -> Result<Sample, StatsError> {
        Ok(Sample {
            snap: Snapshot::read(path)?,
            system: SystemCounters::read(),
            at: Instant::now(),
        })
    }

    fn to_json(&self) -> Value {
        let mut v = to_json(&self.snap);
        v["system"] = self.system.to_json();
        v
    }
}

/// The stages of the path, in order.
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

pub const STAGES: [Stage; 7] = [
    Stage::Nic,
    Stage::Softnet,
    Stage::Udp,
    Stage::Listener,
    Stage::Handoff,
    Stage::Sessions,
    Stage::Upstream,
];

impl Stage {
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
}

/// The worker counters that make up a stage's drops.
fn stage_counters(stage: Stage) -> &'static [Counter] {
    match stage {
        Stage::Nic | Stage::Softnet | Stage::Udp => &[],
        Stage::Listener => &[Counter::DropSocket],
        Stage::Handoff => &[Counter::DropHandoff],
        Stage::Sessions => &[
            Counter::DropMalformed,
            Counter::DropSessionLimit,
            Counter::DropNoBackend,
            Counter::DropDraining,
            Counter::DropUpstream,
        ],
        Stage::Upstream => &[Counter::DropUpstreamSocket, Counter::DropReply],
    }
}

fn sum_workers(snap: &Snapshot, counters: &[Counter]) -> u64 {
    snap.workers()
        .flat_map(|w| counters.iter().map(move |c| w.get(*c)))
        .fold(0, u64::saturating_add)
}

/// Drops per stage, in path order. The host's UDP InErrors also counts the
/// kernel drops on udpshard's own sockets; they are subtracted so a full
/// listener buffer shows up once, at the listener stage.
pub fn stage_drops(snap: &Snapshot, system: &SystemCounters) -> [u64; 7] {
    let own = sum_workers(snap, &[Counter::DropSocket, Counter::DropUpstreamSocket]);
    STAGES.map(|stage| match stage {
        Stage::Nic => system.nic_drops(),
        Stage::Softnet => system.softnet_drops(),
        Stage::Udp => system.udp_in_errors().saturating_sub(own),
        other => sum_workers(snap, stage_counters(other)),
    })
}

/// The first stage (path order) whose drops grew from `before` to `after`.
pub fn first_growing(before: &[u64; 7], after: &[u64; 7]) -> Option<Stage> {
    STAGES
        .iter()
        .zip(before.iter().zip(after))
        .find(|(_, (b, a))| a > b)
        .map(|(s, _)| *s)
}

fn rate(before: u64, after: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        after.saturating_sub(before) as f64 / secs
    }
}

fn busy_ratio(w: &WorkerSnapshot<'_>) -> f64 {
    let wall = w.get(Counter::WallNs);
    if wall == 0 {
        0.0
    } else {
        w.get(Counter::BusyNs) as f64 / wall as f64
    }
}

/// ρ over an interval: busy time gained / wall time gained.
fn busy_ratio_between(before: Option<&WorkerSnapshot<'_>>, after: &WorkerSnapshot<'_>) -> f64 {
    let Some(b) = before else {
        return busy_ratio(after);
    };
    let wall = after
        .get(Counter::WallNs)
        .saturating_sub(b.get(Counter::WallNs));
    if wall == 0 {
        return busy_ratio(after);
    }
    after
        .get(Counter::BusyNs)
        .saturating_sub(b.get(Counter::BusyNs)) as f64
        / wall as f64
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
            obj.insert("loops".into(), json!(w.get(Counter::Loops)));
            obj.insert("loop_max_us".into(), json!(w.get(Counter::LoopMaxUs)));
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

/// Per-worker columns, grouped by stage in path order.
const COLUMNS: [(&str, Counter); 14] = [
    ("rx", Counter::RxPackets),
    ("sock_drop", Counter::DropSocket),
    ("hoff_in", Counter::HandoffIn),
    ("hoff_out", Counter::HandoffOut),
    ("hoff_drop", Counter::DropHandoff),
    ("malformed", Counter::DropMalformed),
    ("sess_limit", Counter::DropSessionLimit),
    ("no_backend", Counter::DropNoBackend),
    ("draining", Counter::DropDraining),
    ("up_send", Counter::DropUpstream),
    ("tx", Counter::TxPackets),
    ("up_sock_drop", Counter::DropUpstreamSocket),
    ("replies_in", Counter::RepliesIn),
    ("reply_drop", Counter::DropReply),
];

fn worker_header(out: &mut String, busy: &str) {
    *out += &format!(
        "{:>3} {:>8} {:>4} {:<8} {:>4} {:>8} {:>9}",
        "id", "pid", "cpu", "state", "rst", "sessions", busy
    );
    for (name, _) in COLUMNS {
        *out += &format!(" {name:>12}");
    }
    *out += "\n";
    *out += "    (listener: rx sock_drop | handoff: hoff_* | sessions/backends: malformed..up_send, tx | upstream sockets: up_sock_drop replies_in reply_drop)\n";
}

fn system_lines(out: &mut String, before: Option<&SystemCounters>, s: &SystemCounters, secs: f64) {
    let show = |b: Option<u64>, a: u64| match b {
        None => a.to_string(),
        Some(b) => format!("{:.0}/s", rate(b, a, secs)),
    };
    let nics: Vec<String> = s
        .nics
        .iter()
        .map(|n| {
            let b = before.and_then(|b| b.nics.iter().find(|x| x.name == n.name));
            format!(
                "{} rx_dropped {} rx_errors {} tx_dropped {}",
                n.name,
                show(b.map(|b| b.rx_dropped), n.rx_dropped),
                show(b.map(|b| b.rx_errors), n.rx_errors),
                show(b.map(|b| b.tx_dropped), n.tx_dropped)
            )
        })
        .collect();
    *out += &format!(
        "NIC      {}\n",
        if nics.is_empty() {
            "(no /sys/class/net statistics)".to_string()
        } else {
            nics.join("; ")
        }
    );
    match s.softnet {
        None => *out += "softnet  (no /proc/net/softnet_stat)\n",
        Some(n) => {
            let b = before.and_then(|b| b.softnet);
            *out += &format!(
                "softnet  dropped {} time_squeeze {}\n",
                show(b.map(|b| b.dropped), n.dropped),
                show(b.map(|b| b.time_squeeze), n.time_squeeze)
            );
        }
    }
    for (name, now, then) in [
        ("UDP ", s.udp, before.and_then(|b| b.udp)),
        ("UDP6", s.udp6, before.and_then(|b| b.udp6)),
    ] {
        let Some(u) = now else { continue };
        *out += &format!(
            "{name}     in {} in_errors {} rcvbuf_errors {} sndbuf_errors {} no_ports {}\n",
            show(then.map(|t| t.in_datagrams), u.in_datagrams),
            show(then.map(|t| t.in_errors), u.in_errors),
            show(then.map(|t| t.rcvbuf_errors), u.rcvbuf_errors),
            show(then.map(|t| t.sndbuf_errors), u.sndbuf_errors),
            show(then.map(|t| t.no_ports), u.no_ports)
        );
    }
    if udp_missing(s) {
        *out += "UDP      (no /proc/net/snmp)\n";
    }
}

fn udp_missing(s: &SystemCounters) -> bool {
    s.udp.is_none() && s.udp6.is_none()
}

fn stage_summary(out: &mut String, before: Option<&[u64; 7]>, after: &[u64; 7], secs: f64) {
    *out += "drops by stage, in path order:\n";
    let first = before.and_then(|b| first_growing(b, after));
    for (i, stage) in STAGES.iter().enumerate() {
        *out += &format!("  {:<24} {:>14}", stage.name(), after[i]);
        if let Some(b) = before {
            *out += &format!(" {:>10.0}/s", rate(b[i], after[i], secs));
        }
        if first == Some(*stage) {
            *out += "  <- first growing drop";
        }
        *out += "\n";
    }
}

fn header_line(snap: &Snapshot) -> String {
    format!(
        "udpshard supervisor pid {}, config generation {}, reload failures {}\n",
        snap.header(Header::SupervisorPid),
        snap.header(Header::ConfigGeneration),
        snap.header(Header::ReloadFailures)
    )
}

fn worker_ident(w: &WorkerSnapshot<'_>, busy: f64) -> String {
    format!(
        "{:>3} {:>8} {:>4} {:<8} {:>4} {:>8} {:>8.1}%",
        w.id,
        w.get(Counter::Pid),
        w.get(Counter::Cpu),
        w.state().name(),
        w.get(Counter::Restarts),
        w.get(Counter::SessionsActive),
        busy * 100.0
    )
}

/// The totals since start, in path order.
pub fn to_table(snap: &Snapshot, system: &SystemCounters) -> String {
    let mut out = header_line(snap);
    system_lines(&mut out, None, system, 0.0);
    worker_header(&mut out, "busy(ρ)");
    for w in snap.workers() {
        out += &worker_ident(&w, busy_ratio(&w));
        for (_, c) in COLUMNS {
            out += &format!(" {:>12}", w.get(c));
        }
        out += "\n";
    }
    stage_summary(&mut out, None, &stage_drops(snap, system), 0.0);
    out
}

/// Per-second rates between two samples, ρ over the interval, and the
/// first stage whose drops grew.
pub fn rates_table(before: &Sample, after: &Sample) -> String {
    let secs = after.at.duration_since(before.at).as_secs_f64();
    let mut out = header_line(&after.snap);
    out += &format!("rates per second over the last {secs:.1}s\n");
    system_lines(&mut out, Some(&before.system), &after.system, secs);
    worker_header(&mut out, "busy(ρ)");
    for w in after.snap.workers() {
        let b = before.snap.workers().find(|b| b.id == w.id);
        out += &worker_ident(&w, busy_ratio_between(b.as_ref(), &w));
        for (_, c) in COLUMNS {
            let then = b.as_ref().map_or(0, |b| b.get(c));
            out += &format!(" {:>12.0}", rate(then, w.get(c), secs));
        }
        out += "\n";
    }
    stage_summary(
        &mut out,
        Some(&stage_drops(&before.snap, &before.system)),
        &stage_drops(&after.snap, &after.system),
        secs,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_growing_is_in_path_order() {
        let before = [0, 5, 0, 10, 0, 0, 0];
        assert_eq!(first_growing(&before, &before), None);
        let mut after = before;
        after[6] = 1;
        after[3] = 11;
        assert_eq!(first_growing(&before, &after), Some(Stage::Listener));
        after[1] = 6;
        assert_eq!(first_growing(&before, &after), Some(Stage::Softnet));
        // A counter that went backwards (a reset) is not growth.
        assert_eq!(first_growing(&after, &before), None);
    }

    #[test]
    fn rates() {
        assert_eq!(rate(10, 30, 2.0), 10.0);
        assert_eq!(rate(30, 10, 2.0), 0.0);
        assert_eq!(rate(0, 10, 0.0), 0.0);
    }
}
