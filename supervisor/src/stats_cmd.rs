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
use udpshard_shared::backends::BackendCounter;
use udpshard_shared::counter::{Entry, Kind, Shown, CATALOGUE};
use udpshard_shared::stats::delay::{self, Histogram};
use udpshard_shared::stats::{
    version_text, BackendSnapshot, Counter, Header, Readiness, SlotState, Snapshot, StatsError,
    WorkerSnapshot,
};
use udpshard_shared::{DropReason, Stage};

use crate::system::SystemCounters;

/// The counters `--json` shows for each worker (drops go under `drops`).
fn shown() -> impl Iterator<Item = &'static Entry> {
    CATALOGUE.iter().filter(|e| e.shown != Shown::No)
}

/// How `stats` prints.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct View {
    pub json: bool,
    /// Every counter as its own column, with a legend.
    pub wide: bool,
}

/// The exit status of `stats` when the proxy is not running (as LSB init
/// scripts and `systemctl status` use 3 for "not running").
pub(crate) const NOT_RUNNING: u8 = 3;

/// A supervisor beats at least every 2 s (its CPU-set check); one silent
/// this long is gone.
const HEARTBEAT_STALE: Duration = Duration::from_secs(10);

/// Whether the supervisor that wrote a stats file still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    Running,
    /// It stopped (SIGTERM, SIGINT, or an error it logged) at this Unix time.
    Stopped {
        pid: u64,
        at: u64,
    },
    /// Its process is gone without a stop: killed, or crashed.
    Gone {
        pid: u64,
    },
}

impl Liveness {
    pub(crate) fn of(snap: &Snapshot) -> Liveness {
        let pid = snap.header(Header::SupervisorPid);
        let stopped = snap.header(Header::StoppedAt);
        if stopped != 0 {
            return Liveness::Stopped { pid, at: stopped };
        }
        let ns = snap.header(Header::SupervisorPidNs);
        let alive = if ns == 0 || crate::process::pid_namespace() == Some(ns) {
            // The same PID with another start time is a later process.
            u32::try_from(pid).ok().is_some_and(|p| {
                !crate::process::is_gone(p)
                    && crate::process::start_ticks(p)
                        == Some(snap.header(Header::SupervisorStartTicks))
            })
        } else {
            // Its PIDs are not ours to look up: trust a recent heartbeat.
            let beat = snap.header(Header::SupervisorHeartbeat);
            udpshard_shared::clock::monotonic_ns().saturating_sub(beat)
                < HEARTBEAT_STALE.as_nanos() as u64
        };
        if alive {
            Liveness::Running
        } else {
            Liveness::Gone { pid }
        }
    }
}

impl std::fmt::Display for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Liveness::Running => write!(f, "running"),
            Liveness::Stopped { pid, at } => write!(
                f,
                "the proxy is not running: its supervisor (pid {pid}) stopped at {}; these are its last counters",
                utc(*at)
            ),
            Liveness::Gone { pid } => write!(
                f,
                "the proxy is not running: its supervisor (pid {pid}) is gone without stopping (killed or \
                 crashed); these are its last counters"
            ),
        }
    }
}

/// How long the table's verdict watches a running proxy: drops that grow,
/// and the queue delay, are read over this window.
const VERDICT_WINDOW: Duration = Duration::from_millis(500);

/// Prints one sample; says whether its proxy is running. The table ends
/// with a verdict over [`VERDICT_WINDOW`] (a second sample).
pub(crate) fn print(path: &Path, view: View) -> Result<Liveness, StatsError> {
    let sample = Sample::take(path)?;
    if view.json {
        println!("{}", sample.to_json());
        return Ok(sample.liveness);
    }
    let mut out = to_table(&sample, view.wide);
    if sample.liveness == Liveness::Running {
        std::thread::sleep(VERDICT_WINDOW);
        let run = |s: &Snapshot| (s.header(Header::StartedAt), s.header(Header::SupervisorPid));
        match Sample::take(path) {
            Ok(later) if run(&later.snap) == run(&sample.snap) => {
                out += &wrap(&format!(
                    "over {:.1}s: {}",
                    VERDICT_WINDOW.as_secs_f64(),
                    crate::verdict::line(&sample, &later)
                ));
            }
            _ => out += "no verdict: the proxy restarted, or its stats file went, meanwhile\n",
        }
    }
    print!("{out}");
    Ok(sample.liveness)
}

/// Whether the proxy whose stats file is at `path` should be sent new
/// flows, and the line that says so (`ready: ...`, `not ready: <why>`).
pub(crate) fn health(path: &Path) -> (bool, String) {
    let read = || match Snapshot::read(path) {
        Ok(snap) => match Liveness::of(&snap) {
            Liveness::Running => Ok(readiness(&snap)),
            gone => Err(format!("not ready: {gone}")),
        },
        Err(e) => Err(format!("not ready: {e}")),
    };
    // A binary upgrade's new supervisor writes its pid and its start time
    // one after the other: a reading between the two looks gone. Once
    // more, a moment later, before saying so.
    read()
        .or_else(|_| {
            std::thread::sleep(Duration::from_millis(50));
            read()
        })
        .unwrap_or_else(|line| (false, line))
}

/// What a running proxy's stats say of its readiness (`/ready` answers
/// the same): the supervisor's word; where a supervisor from before the
/// word runs, whether any slot's worker is ready.
pub(crate) fn readiness(snap: &Snapshot) -> (bool, String) {
    let n = snap.workers().count();
    let s = if n == 1 { "" } else { "s" };
    match Readiness::from_word(snap.header(Header::Readiness)) {
        Readiness::Unknown => {}
        word => {
            return match word.reason() {
                Some(why) => (false, format!("not ready: {why}")),
                None => (true, format!("ready: {n} worker{s} serving")),
            }
        }
    }
    let serving = snap
        .workers()
        .filter(|w| w.state() == SlotState::Ready)
        .count();
    match serving {
        0 => (
            false,
            format!("not ready: none of {n} worker{s} serves (starting or restarting)"),
        ),
        k if k == n => (true, format!("ready: {n} worker{s} serving")),
        k => (true, format!("ready: {k} of {n} worker{s} serving")),
    }
}

/// `--watch`: a sample every `interval`, `count` of them (forever when
/// `None`), until the proxy stops. After the first, the table shows
/// per-second rates and the stage summary marks the first stage whose drops
/// grew.
pub(crate) fn watch(
    path: &Path,
    view: View,
    interval: Duration,
    count: Option<u64>,
) -> Result<Liveness, StatsError> {
    let mut prev: Option<Sample> = None;
    let mut n = 0u64;
    loop {
        let sample = Sample::take(path)?;
        n += 1;
        if view.json {
            println!("{}", sample.to_json());
        } else {
            let mut out = format!("--- sample {n}\n");
            match &prev {
                None => out += &to_table(&sample, view.wide),
                Some(p) => out += &window_table(p, &sample, Window::Rates, view.wide),
            }
            print!("{out}");
        }
        if sample.liveness != Liveness::Running || count.is_some_and(|c| n >= c) {
            return Ok(sample.liveness);
        }
        prev = Some(sample);
        std::thread::sleep(interval);
    }
}

/// One reading of the proxy's and the host's counters.
pub(crate) struct Sample {
    pub snap: Snapshot,
    pub system: SystemCounters,
    pub at: Instant,
    pub liveness: Liveness,
}

impl Sample {
    pub(crate) fn take(path: &Path) -> Result<Sample, StatsError> {
        let snap = Snapshot::read(path)?;
        Ok(Sample {
            liveness: Liveness::of(&snap),
            snap,
            system: SystemCounters::read(),
            at: Instant::now(),
        })
    }

    fn to_json(&self) -> Value {
        let mut v = to_json(&self.snap);
        v["system"] = self.system.to_json();
        v["running"] = json!(self.liveness == Liveness::Running);
        v["stopped_at"] = match self.liveness {
            Liveness::Stopped { at, .. } => json!(at),
            _ => Value::Null,
        };
        v
    }

    /// A worker's state as this sample can vouch for it: the slot says
    /// `ready` forever once its supervisor is gone.
    fn state_of(&self, w: &WorkerSnapshot<'_>) -> &'static str {
        match self.liveness {
            Liveness::Running => w.state().name(),
            _ => "stopped",
        }
    }
}

/// The worker counters that make up a stage's drops.
fn stage_counters(stage: Stage) -> Vec<Counter> {
    stage.reasons().map(DropReason::counter).collect()
}

fn sum_workers(snap: &Snapshot, counters: &[Counter]) -> u64 {
    snap.workers()
        .flat_map(|w| counters.iter().map(move |c| w.get(*c)))
        .fold(0, u64::saturating_add)
}

/// Drops per stage, in path order. The host's UDP InErrors also counts the
/// kernel drops on udpshard's own sockets; they are subtracted so a full
/// listener buffer shows up once, at the listener stage.
pub(crate) fn stage_drops(snap: &Snapshot, system: &SystemCounters) -> [u64; 7] {
    let own = sum_workers(snap, &[Counter::DropSocket, Counter::DropUpstreamSocket]);
    Stage::ALL.map(|stage| match stage {
        Stage::Nic => system.nic_drops(),
        Stage::Softnet => system.softnet_drops(),
        Stage::Udp => system.udp_in_errors().saturating_sub(own),
        other => sum_workers(snap, &stage_counters(other)),
    })
}

/// The first stage (path order) whose drops grew from `before` to `after`.
pub(crate) fn first_growing(before: &[u64; 7], after: &[u64; 7]) -> Option<Stage> {
    Stage::ALL
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
pub(crate) fn busy_ratio_between(
    before: Option<&WorkerSnapshot<'_>>,
    after: &WorkerSnapshot<'_>,
) -> f64 {
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
pub(crate) fn to_json(snap: &Snapshot) -> Value {
    let workers: Vec<Value> = snap
        .workers()
        .map(|w| {
            let mut obj = serde_json::Map::new();
            obj.insert("id".into(), json!(w.id));
            for e in shown() {
                obj.insert(e.name.into(), json!(w.get(e.counter)));
            }
            obj.insert("state".into(), json!(w.state().name()));
            obj.insert(
                "version".into(),
                json!(version_text(w.get(Counter::Version))),
            );
            obj.insert("busy_ratio".into(), json!(busy_ratio(&w)));
            obj.insert("queue_delay".into(), queue_delay_json(w.delay));
            obj.insert("drops".into(), drops_json(|c| w.get(c)));
            Value::Object(obj)
        })
        .collect();
    json!({
        "supervisor_pid": snap.header(Header::SupervisorPid),
        "started_at": snap.header(Header::StartedAt),
        "config_generation": snap.header(Header::ConfigGeneration),
        "reload_failures": snap.header(Header::ReloadFailures),
        "upgrades": snap.header(Header::Upgrades),
        "upgrade_failures": snap.header(Header::UpgradeFailures),
        "stats_repairs": snap.header(Header::Repairs),
        "supervisor_version": version_text(snap.header(Header::SupervisorVersion)),
        "health_generation": snap.header(Header::HealthGeneration),
        "totals": totals_json(snap),
        "workers": workers,
        "backends": backends_json(snap),
    })
}

/// Milliseconds since a backend's latest reply (CLOCK_MONOTONIC, the
/// clock the workers wrote it on); `None` when it never replied.
fn since_reply_ms(b: &BackendSnapshot) -> Option<u64> {
    let at = b.total(BackendCounter::LastReplyMs);
    (at > 0).then(|| (udpshard_shared::clock::monotonic_ns() / 1_000_000).saturating_sub(at))
}

/// Every backend the run has had: its listener and address as configured,
/// its standing, and its counters over every worker.
fn backends_json(snap: &Snapshot) -> Value {
    let rows: Vec<Value> = snap
        .backends()
        .iter()
        .map(|b| {
            let mut obj = serde_json::Map::new();
            obj.insert("listener".into(), json!(b.meta.listener));
            obj.insert("addr".into(), json!(b.meta.addr.to_string()));
            obj.insert("state".into(), json!(b.meta.state.name()));
            obj.insert("weight".into(), json!(b.meta.weight));
            obj.insert("in_config".into(), json!(b.meta.in_config));
            obj.insert("downs".into(), json!(b.meta.downs));
            for c in BackendCounter::ALL {
                if c != BackendCounter::LastReplyMs {
                    obj.insert(c.name().into(), json!(b.total(c)));
                }
            }
            obj.insert("last_reply_ms_ago".into(), json!(since_reply_ms(b)));
            Value::Object(obj)
        })
        .collect();
    Value::Array(rows)
}

/// The backends table: one line per backend of the config being served
/// (and those a reload removed, while they have sessions).
fn backends_table(out: &mut String, before: Option<&Snapshot>, after: &Snapshot, n: &Numbers) {
    let rows: Vec<&BackendSnapshot> = after
        .backends()
        .iter()
        .filter(|b| b.meta.in_config || b.total(BackendCounter::SessionsActive) > 0)
        .collect();
    if rows.is_empty() {
        return;
    }
    *out += &format!(
        "\n{:<8} {:<21} {:<8} {:>3} {:>6} {:>7} {:>8} {:>8} {:>7} {:>5} {:>8}\n",
        "listener",
        "backend",
        "state",
        "wt",
        "active",
        "created",
        "tx",
        "replies",
        "unreach",
        "errs",
        "last rep"
    );
    for b in rows {
        let prev = before.and_then(|s| {
            s.backends()
                .iter()
                .find(|x| x.meta.listener == b.meta.listener && x.meta.addr == b.meta.addr)
        });
        let show = |c: BackendCounter| n.show(prev.map(|p| p.total(c)), b.total(c));
        let last = since_reply_ms(b).map_or("never".to_string(), |ms| {
            format!("{:.1}s", ms as f64 / 1000.0)
        });
        let state = if b.meta.in_config {
            b.meta.state.name()
        } else {
            "removed"
        };
        *out += &format!(
            "{:<8} {:<21} {:<8} {:>3} {:>6} {:>7} {:>8} {:>8} {:>7} {:>5} {:>8}\n",
            b.meta.listener,
            b.meta.addr.to_string(),
            state,
            b.meta.weight,
            b.total(BackendCounter::SessionsActive),
            show(BackendCounter::SessionsCreated),
            show(BackendCounter::TxPackets),
            show(BackendCounter::Replies),
            show(BackendCounter::Unreachable),
            show(BackendCounter::SendErrors),
            last
        );
    }
    *out +=
        "  active: live sessions; unreach: ICMP unreachable reports for datagrams sent to it;\n";
    *out += "  errs: sends refused; last rep: time since its latest reply; wt: weight\n";
}

/// A queue-delay histogram: its count, sum, quantiles and buckets, in
/// microseconds. A quantile is its bucket's upper bound, `null` when
/// nothing was counted or it lies past the last bound (16 s).
fn queue_delay_json(h: &Histogram) -> Value {
    let us = |s: Option<f64>| s.filter(|s| s.is_finite()).map(|s| s * 1e6);
    let buckets: Vec<Value> = h
        .buckets
        .iter()
        .enumerate()
        .map(|(k, count)| json!({"le_us": us(delay::upper_seconds(k)), "count": count}))
        .collect();
    json!({
        "count": h.count(),
        "sum_us": h.sum_ns / 1000,
        "p50_us": us(h.quantile(0.5)),
        "p99_us": us(h.quantile(0.99)),
        "max_us": h.max_ns / 1000,
        "buckets": buckets,
    })
}

/// Every drop reason's count, by its name.
fn drops_json(get: impl Fn(Counter) -> u64) -> Value {
    DropReason::ALL
        .iter()
        .map(|r| (r.name().to_string(), json!(get(r.counter()))))
        .collect::<serde_json::Map<String, Value>>()
        .into()
}

/// The workers' fields summed over every slot that has served since the
/// start (restarted workers continue their slot; a slot a resize retired
/// keeps its counts), so no total ever goes backwards; gauges over the
/// workers serving now.
fn totals_json(snap: &Snapshot) -> Value {
    let mut obj = serde_json::Map::new();
    for e in shown().filter(|e| e.shown == Shown::WorkerAndTotal) {
        let value = match e.kind {
            Kind::Gauge => sum_workers(snap, &[e.counter]),
            Kind::Total | Kind::Identity => snap.total(e.counter),
        };
        obj.insert(e.name.into(), json!(value));
    }
    obj.insert("drops".into(), drops_json(|c| snap.total(c)));
    let mut delays = Histogram::default();
    snap.slots().for_each(|w| delays.add(w.delay));
    obj.insert("queue_delay".into(), queue_delay_json(&delays));
    obj.insert(
        "workers_retired".into(),
        json!(snap.slots().count() - snap.workers().count()),
    );
    Value::Object(obj)
}

const NARROW_LEGEND: &str = concat!(
    "  rx: datagrams from clients   tx: forwarded to backends   replies: sent back to clients\n",
    "  drops: every datagram the worker dropped, for any reason (by stage below; --wide: by reason)\n",
    "  busy(rho): time handling datagrams / wall time; near 100% means the CPU is the limit\n",
    "  p99 wait: 99% of datagrams waited at most this long in the listener socket before the\n",
    "  worker read them; it grows before the socket drops (--wide: p50/p99/longest)\n",
    "  rst: restarts after a crash   gen: the process's generation in its slot (one more per\n",
    "  restart and per binary upgrade)\n",
);

/// The counters of one column: one for most, every drop for `drops`.
struct Column {
    name: &'static str,
    counters: Vec<Counter>,
    help: &'static str,
}

fn column(name: &'static str, c: Counter) -> Column {
    Column {
        name,
        counters: vec![c],
        help: c.help(),
    }
}

/// The default table's columns, or (`wide`) every counter in path order:
/// the datagram's way in, each drop reason, its way out.
fn columns(wide: bool) -> Vec<Column> {
    if !wide {
        return vec![
            column("rx", Counter::RxPackets),
            column("tx", Counter::TxPackets),
            column("replies", Counter::RepliesOut),
            Column {
                name: "drops",
                counters: DropReason::ALL.iter().map(|r| r.counter()).collect(),
                help: "",
            },
        ];
    }
    let mut out = vec![
        column("rx", Counter::RxPackets),
        column("hoff_in", Counter::HandoffIn),
        column("hoff_out", Counter::HandoffOut),
        column("tx", Counter::TxPackets),
        column("paths", Counter::PathsActive),
        column("embryonic", Counter::SessionsEmbryonic),
        column("up_socks", Counter::UpstreamSockets),
        column("replies_in", Counter::RepliesIn),
        column("replies", Counter::RepliesOut),
    ];
    // Drops after the datagram's way in, before its way out.
    let drops = DropReason::ALL
        .iter()
        .map(|r| column(r.name(), r.counter()));
    let tail = out.split_off(3);
    out.extend(drops);
    out.extend(tail);
    out
}

/// A counter column's width: the default table fits 100 columns.
fn width(wide: bool) -> usize {
    if wide {
        12
    } else {
        9
    }
}

/// How a table relates two samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Window {
    /// Per second, over the interval (`--watch`).
    Rates,
    /// What happened between the two samples (the demo's run).
    Deltas,
}

/// How one table shows its numbers: totals, or over a window.
struct Numbers {
    window: Option<Window>,
    secs: f64,
}

impl Numbers {
    fn show(&self, before: Option<u64>, after: u64) -> String {
        match (self.window, before) {
            (Some(Window::Rates), Some(b)) => format!("{:.0}/s", rate(b, after, self.secs)),
            (Some(Window::Deltas), Some(b)) => after.saturating_sub(b).to_string(),
            _ => after.to_string(),
        }
    }

    fn changed(&self, before: Option<u64>, after: u64) -> bool {
        match (self.window, before) {
            (Some(_), Some(b)) => after > b,
            _ => after > 0,
        }
    }
}

fn system_lines(
    out: &mut String,
    before: Option<&SystemCounters>,
    s: &SystemCounters,
    n: &Numbers,
) {
    *out += match n.window {
        None => "host-wide counters since boot (every program's, not only udpshard's):\n",
        Some(Window::Rates) => "host-wide counters (every program's, not only udpshard's):\n",
        Some(Window::Deltas) => {
            "host-wide counters over the run (every program's, not only udpshard's):\n"
        }
    };
    // Interfaces with nothing to report would only push the rest away.
    let nics: Vec<String> = s
        .nics
        .iter()
        .filter_map(|nic| {
            let b = before.and_then(|b| b.nics.iter().find(|x| x.name == nic.name));
            let fields = [
                ("rx_dropped", b.map(|b| b.rx_dropped), nic.rx_dropped),
                ("rx_errors", b.map(|b| b.rx_errors), nic.rx_errors),
                ("tx_dropped", b.map(|b| b.tx_dropped), nic.tx_dropped),
            ];
            fields.iter().any(|(_, b, a)| n.changed(*b, *a)).then(|| {
                let parts: Vec<String> = fields
                    .iter()
                    .map(|(name, b, a)| format!("{name} {}", n.show(*b, *a)))
                    .collect();
                format!("{} {}", nic.name, parts.join(" "))
            })
        })
        .collect();
    *out += &format!(
        "  NIC      {}\n",
        if s.nics.is_empty() {
            "(no /sys/class/net statistics)".to_string()
        } else if nics.is_empty() {
            "no drops or errors on any interface".to_string()
        } else {
            nics.join("; ")
        }
    );
    match s.softnet {
        None => *out += "  softnet  (no /proc/net/softnet_stat)\n",
        Some(now) => {
            let b = before.and_then(|b| b.softnet);
            *out += &format!(
                "  softnet  dropped {} time_squeeze {}\n",
                n.show(b.map(|b| b.dropped), now.dropped),
                n.show(b.map(|b| b.time_squeeze), now.time_squeeze)
            );
        }
    }
    for (name, now, then) in [
        ("UDP ", s.udp, before.and_then(|b| b.udp)),
        ("UDP6", s.udp6, before.and_then(|b| b.udp6)),
    ] {
        let Some(u) = now else { continue };
        *out += &format!(
            "  {name}     in {} in_errors {} rcvbuf_errors {} sndbuf_errors {} no_ports {}\n",
            n.show(then.map(|t| t.in_datagrams), u.in_datagrams),
            n.show(then.map(|t| t.in_errors), u.in_errors),
            n.show(then.map(|t| t.rcvbuf_errors), u.rcvbuf_errors),
            n.show(then.map(|t| t.sndbuf_errors), u.sndbuf_errors),
            n.show(then.map(|t| t.no_ports), u.no_ports)
        );
    }
    if udp_missing(s) {
        *out += "  UDP      (no /proc/net/snmp)\n";
    }
}

fn udp_missing(s: &SystemCounters) -> bool {
    s.udp.is_none() && s.udp6.is_none()
}

fn stage_summary(out: &mut String, before: Option<&[u64; 7]>, after: &[u64; 7], n: &Numbers) {
    *out += match n.window {
        None => "drops by stage, in path order (the first three host-wide, since boot):\n",
        Some(Window::Rates) => "drops by stage, in path order (the first three host-wide):\n",
        Some(Window::Deltas) => {
            "drops by stage over the run, in path order (the first three host-wide):\n"
        }
    };
    let first = before.and_then(|b| first_growing(b, after));
    for (i, stage) in Stage::ALL.iter().enumerate() {
        let b = before.map(|b| b[i]);
        *out += &format!("  {:<24} {:>14}", stage.name(), n.show(b, after[i]));
        if first == Some(*stage) {
            *out += "  <- first growing drop";
        }
        *out += "\n";
    }
}

fn header_line(sample: &Sample) -> String {
    let snap = &sample.snap;
    let version = snap.header(Header::SupervisorVersion);
    let mut line = format!(
        "udpshard supervisor pid {} ({}), config generation {}, reload failures {}",
        snap.header(Header::SupervisorPid),
        version_text(version),
        snap.header(Header::ConfigGeneration),
        snap.header(Header::ReloadFailures),
    );
    if sample.liveness != Liveness::Running {
        line += " (NOT RUNNING)";
    } else if let (false, _) = readiness(snap) {
        line += " (NOT READY: udpshard health says why)";
    }
    line += "\n";
    let (upgrades, failed) = (
        snap.header(Header::Upgrades),
        snap.header(Header::UpgradeFailures),
    );
    if upgrades + failed > 0 {
        line += &format!("binary upgrades (SIGUSR2): {upgrades} done, {failed} failed\n");
    }
    // Each worker runs its supervisor's binary; one that does not is named.
    for w in snap.workers() {
        let theirs = w.get(Counter::Version);
        if theirs != 0 && theirs != version {
            line += &format!("worker {} runs {}\n", w.id, version_text(theirs));
        }
    }
    line
}

/// The totals since start, in path order.
pub(crate) fn to_table(sample: &Sample, wide: bool) -> String {
    render(None, sample, None, wide)
}

/// What happened between two samples: per second (`--watch`) or in all
/// (the demo), with the first stage whose drops grew marked.
pub(crate) fn window_table(before: &Sample, after: &Sample, window: Window, wide: bool) -> String {
    render(Some(before), after, Some(window), wide)
}

fn render(before: Option<&Sample>, after: &Sample, window: Option<Window>, wide: bool) -> String {
    let secs = before.map_or(0.0, |b| after.at.duration_since(b.at).as_secs_f64());
    let n = Numbers { window, secs };
    let mut out = header_line(after);
    match window {
        Some(Window::Rates) => out += &format!("rates per second over the last {secs:.1}s\n"),
        Some(Window::Deltas) => out += &format!("counts over the last {secs:.1}s\n"),
        None => {}
    }
    system_lines(&mut out, before.map(|b| &b.system), &after.system, &n);
    let columns = columns(wide);
    let (wait, wait_width) = match wide {
        true => ("wait p50/p99/max", 18),
        false => ("p99 wait", 8),
    };
    out += &format!(
        "{:>3} {:>7} {:>3} {:<8} {:>3} {:>3} {:>8} {:>9} {wait:>wait_width$}",
        "id", "pid", "cpu", "state", "rst", "gen", "sessions", "busy(rho)"
    );
    for c in &columns {
        out += &format!(" {:>width$}", c.name, width = width(wide));
    }
    out += "\n";
    let mut marks = String::new();
    for w in after.snap.workers() {
        let b = before.and_then(|b| b.snap.workers().find(|x| x.id == w.id));
        let busy = match window {
            Some(_) => busy_ratio_between(b.as_ref(), &w),
            None => busy_ratio(&w),
        };
        let delays = match &b {
            Some(b) => {
                let window = w.delay.since(b.delay);
                let drops = |x: &WorkerSnapshot<'_>| x.get(Counter::DropSocket);
                let (then, now) = (b.delay.quantile(0.99), window.quantile(0.99));
                if drops(&w) == drops(b) && crate::verdict::delay_growing(then, now) {
                    marks += &format!(
                        "  <- worker {}: queue delay growing, no drops yet: p99 {} (before: {})\n",
                        w.id,
                        now.map_or("-".into(), delay::human),
                        then.map_or("-".into(), delay::human),
                    );
                }
                window
            }
            None => *w.delay,
        };
        out += &format!(
            "{:>3} {:>7} {:>3} {:<8} {:>3} {:>3} {:>8} {:>8.1}% {:>wait_width$}",
            w.id,
            w.get(Counter::Pid),
            w.get(Counter::Cpu),
            after.state_of(&w),
            w.get(Counter::Restarts),
            w.get(Counter::Generation),
            w.get(Counter::SessionsActive),
            busy * 100.0,
            wait_cell(&delays, wide)
        );
        let sum = |x: &WorkerSnapshot<'_>, c: &Column| {
            c.counters
                .iter()
                .map(|c| x.get(*c))
                .fold(0, u64::saturating_add)
        };
        for c in &columns {
            out += &format!(
                " {:>width$}",
                n.show(b.as_ref().map(|b| sum(b, c)), sum(&w, c)),
                width = width(wide)
            );
        }
        out += "\n";
    }
    out += &marks;
    backends_table(&mut out, before.map(|b| &b.snap), &after.snap, &n);
    if wide {
        for c in &columns {
            out += &format!("  {:<15} {}\n", c.name, c.help);
        }
        out += "  busy(rho)       time handling datagrams / wall time: near 100% means the CPU is the limit\n";
        out += "  wait            how long datagrams waited in the listener socket before the worker read\n";
        out += "                  them: p50, p99 (each its bucket's bound, a power of two in seconds) and the\n";
        out += "                  longest of the last 1-2s; it grows before the socket drops\n";
    } else {
        out += NARROW_LEGEND;
    }
    stage_summary(
        &mut out,
        before.map(|b| stage_drops(&b.snap, &b.system)).as_ref(),
        &stage_drops(&after.snap, &after.system),
        &n,
    );
    if let Some(before) = before {
        out += &wrap(&crate::verdict::line(before, after));
    }
    out
}

/// A line wrapped at the table's width (100 columns), its continuations
/// indented.
pub(crate) fn wrap(text: &str) -> String {
    const WIDTH: usize = 100;
    const INDENT: &str = "    ";
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.len() + 1 + word.len() > WIDTH {
            out += &line;
            out += "\n";
            line = INDENT.to_string();
        } else if !line.is_empty() && line != INDENT {
            line.push(' ');
        }
        line += word;
    }
    out += &line;
    out += "\n";
    out
}

/// A worker's queue delay as the table shows it: its p99, or (`wide`)
/// `4us/32us/120us` for p50, p99 and the longest; `-` where nothing was
/// read. A quantile reads as its bucket's upper bound.
fn wait_cell(h: &Histogram, wide: bool) -> String {
    let q = |q: f64| h.quantile(q).map_or("-".to_string(), delay::human);
    if !wide {
        return q(0.99);
    }
    let max = match h.max_ns {
        0 if h.count() == 0 => "-".to_string(),
        ns => delay::human_ns(ns),
    };
    format!("{}/{}/{max}", q(0.5), q(0.99))
}

/// `2026-12-01 20:45:31 UTC` for a Unix time.
pub(crate) fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
    fn readiness_reads_the_supervisors_word() {
        let dir = std::env::temp_dir().join(format!("udpshard-ready-{}", std::process::id()));
        let path = dir.join("stats");
        let (region, _file) = udpshard_shared::stats::StatsRegion::create(&path, 2).unwrap();
        region.set_header(Header::Workers, 2);
        let read = || readiness(&Snapshot::read(&path).unwrap());
        assert_eq!(
            read(),
            (
                false,
                "not ready: starting: not every worker serves yet".into()
            )
        );
        // The supervisor's word holds, whatever the slots say (in a binary
        // upgrade, none is `ready` while the proxy serves on).
        region.set_header(Header::Readiness, Readiness::Ready as u64);
        assert_eq!(read(), (true, "ready: 2 workers serving".into()));
        region.set_header(Header::Readiness, Readiness::NoWorker as u64);
        assert!(read().1.starts_with("not ready: no worker serves"));
        region.set_header(Header::Readiness, Readiness::NoBackend as u64);
        assert!(!read().0);
        assert!(read().1.starts_with("not ready: no backend up"));
        // A supervisor from before the word: the slots say.
        region.set_header(Header::Readiness, 0);
        assert_eq!(
            read(),
            (
                false,
                "not ready: none of 2 workers serves (starting or restarting)".into()
            )
        );
        region.slot(0).unwrap().set_life(1, SlotState::Ready);
        assert_eq!(read(), (true, "ready: 1 of 2 workers serving".into()));
        region.slot(1).unwrap().set_life(1, SlotState::Ready);
        assert_eq!(read(), (true, "ready: 2 workers serving".into()));
        region.set_header(Header::Readiness, Readiness::Withdrawing as u64);
        assert!(read().1.starts_with("not ready: withdrawing"));
        region.set_header(Header::Readiness, Readiness::Draining as u64);
        assert!(read().1.starts_with("not ready: draining"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_157_931), "2026-12-01 20:45:31 UTC");
    }

    #[test]
    fn rates() {
        assert_eq!(rate(10, 30, 2.0), 10.0);
        assert_eq!(rate(30, 10, 2.0), 0.0);
        assert_eq!(rate(0, 10, 0.0), 0.0);
    }
}
