//! The line `udpshard stats` ends with: what two samples say, in one line.
//! Healthy, it says so with the figures that show it (`ok: no drops
//! growing, p99 queue delay 40us, rho 0.31`); otherwise it names the first
//! stage in path order whose drops grew, the reason that grew most there,
//! and the fix, as `udpshard doctor` words it. Queue delay that climbs
//! while nothing drops yet is said too: it is the warning before the drops.

use udpshard_shared::stats::delay::{self, Histogram};
use udpshard_shared::stats::Counter;
use udpshard_shared::{DropReason, Stage};

use crate::doctor::{NETDEV_MAX_BACKLOG, RMEM_DEFAULT};
use crate::stats_cmd::{busy_ratio_between, first_growing, stage_drops, Sample};

/// Utilisation from which a worker's CPU is the limit.
const CPU_BOUND: f64 = 0.9;
/// A window's p99 queue delay this many times the run's before it, and
/// at least [`DELAY_FLOOR`] seconds, is a queue building up.
const DELAY_GROWTH: f64 = 4.0;
const DELAY_FLOOR: f64 = 2.5e-4;

/// Whether a window's p99 queue delay (`now`) shows a queue building up
/// against the p99 of the run before it (`then`).
pub(crate) fn delay_growing(then: Option<f64>, now: Option<f64>) -> bool {
    match (then, now) {
        (Some(then), Some(now)) => now >= DELAY_FLOOR && now >= then * DELAY_GROWTH && now > then,
        // Nothing before to grow from.
        _ => false,
    }
}

/// The verdict over the window from `before` to `after`.
pub(crate) fn line(before: &Sample, after: &Sample) -> String {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let rho = after
        .snap
        .workers()
        .map(|w| {
            let b = before.snap.workers().find(|x| x.id == w.id);
            busy_ratio_between(b.as_ref(), &w)
        })
        .fold(0.0f64, f64::max);
    let delays = queue_delays(before, after);
    let (b, a) = (
        stage_drops(&before.snap, &before.system),
        stage_drops(&after.snap, &after.system),
    );
    if let Some(stage) = first_growing(&b, &a) {
        let i = Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0);
        let per_sec = a[i].saturating_sub(b[i]) as f64 / secs;
        let reason = top_reason(before, after, stage);
        let why = reason.map_or(String::new(), |r| {
            format!(", mostly {} ({})", r.name(), r.help())
        });
        return format!(
            "DROPPING: {} drops growing, {per_sec:.0}/s{why}; fix: {}",
            stage.name(),
            fix(stage, reason, rho)
        );
    }
    // A queue that builds on one worker, its socket not yet dropping.
    if let Some(d) = delays
        .iter()
        .find(|d| !d.dropped && delay_growing(d.was.quantile(0.99), d.window.quantile(0.99)))
    {
        let q = |h: &Histogram| h.quantile(0.99).map_or("-".to_string(), delay::human);
        return format!(
            "warning: no drops yet, but queue delay is growing on worker {}: p99 {} (before: \
             {}), rho {rho:.2}; {}",
            d.id,
            q(&d.window),
            q(&d.was),
            late(rho)
        );
    }
    // The slowest worker's p99: over the window, else (nothing read in it)
    // over the run, said as such.
    let worst = |h: fn(&Delays) -> &Histogram| {
        delays
            .iter()
            .filter_map(|d| Some((h(d).quantile(0.99)?, d.id)))
            .max_by(|x, y| x.0.total_cmp(&y.0))
    };
    let named = |(p99, id): (f64, usize)| match delays.len() {
        1 => delay::human(p99),
        _ => format!("{} (worker {id})", delay::human(p99)),
    };
    let shown = match (worst(|d| &d.window), worst(|d| &d.total)) {
        (Some(now), _) => named(now),
        (None, Some(run)) => format!("{} since start", named(run)),
        (None, None) => "- (nothing read yet)".to_string(),
    };
    format!("ok: no drops growing, p99 queue delay {shown}, rho {rho:.2}")
}

/// One worker's queue delay: up to the window, over it, in all; and
/// whether its listener socket dropped in the window.
struct Delays {
    id: usize,
    was: Histogram,
    window: Histogram,
    total: Histogram,
    dropped: bool,
}

/// Why datagrams wait longer with no drops yet, and what to look at.
fn late(rho: f64) -> String {
    if rho >= CPU_BOUND {
        return fix(Stage::Listener, Some(DropReason::Socket), rho);
    }
    "the workers read late with CPU to spare: stalled (loop_max_us) or starved of CPU (other \
     processes, the hypervisor's steal); the listener's recv_buffer is what holds until the \
     socket drops"
        .to_string()
}

/// Each serving worker's queue delay.
fn queue_delays(before: &Sample, after: &Sample) -> Vec<Delays> {
    after
        .snap
        .workers()
        .map(|w| {
            let b = before.snap.slots().find(|x| x.id == w.id);
            let was = b.map_or_else(Histogram::default, |b| *b.delay);
            let drops = |x: Option<u64>| x.unwrap_or(0);
            Delays {
                id: w.id,
                was,
                window: w.delay.since(&was),
                total: *w.delay,
                dropped: w.get(Counter::DropSocket) > drops(b.map(|b| b.get(Counter::DropSocket))),
            }
        })
        .collect()
}

/// The drop reason of `stage` that grew most over the window (none for
/// the host-wide stages).
fn top_reason(before: &Sample, after: &Sample, stage: Stage) -> Option<DropReason> {
    let grew = |c: Counter| {
        let sum = |s: &Sample| s.snap.slots().fold(0u64, |t, w| t.wrapping_add(w.get(c)));
        sum(after).saturating_sub(sum(before))
    };
    stage
        .reasons()
        .map(|r| (grew(r.counter()), r))
        .filter(|(n, _)| *n > 0)
        .max_by_key(|(n, _)| *n)
        .map(|(_, r)| r)
}

/// What to do about drops at `stage` (for `reason`, where the stage is
/// udpshard's), given the busiest worker's utilisation.
pub(crate) fn fix(stage: Stage, reason: Option<DropReason>, rho: f64) -> String {
    let text = match (stage, reason) {
        (Stage::Nic, _) => {
            "the NIC drops before the kernel sees the datagrams: a larger RX ring \
             (ethtool -g DEV, then ethtool -G DEV rx MAX), and its queues spread over CPUs"
        }
        (Stage::Softnet, _) => {
            return format!(
                "a CPU's input backlog overflows: sysctl -w net.core.netdev_max_backlog={NETDEV_MAX_BACKLOG}"
            )
        }
        (Stage::Udp, _) => {
            "another program's UDP socket overflows, not udpshard's: ss -uamn shows each \
             socket's d<drops>"
        }
        (_, Some(DropReason::Socket)) if rho >= CPU_BOUND => {
            return format!(
                "the workers are CPU-bound (rho {rho:.2}): give udpshard more CPUs (workers = \
                 \"auto\" over a larger CPU set)"
            )
        }
        (_, Some(DropReason::Socket)) => {
            "the listener sockets overflow in bursts while the workers have CPU to spare: \
             raise recv_buffer, and net.core.rmem_max to match (udpshard doctor checks both)"
        }
        (_, Some(DropReason::WorkerLost | DropReason::WorkerLostReply)) => {
            "a worker died holding datagrams: its exit is in the log (journalctl -u udpshard)"
        }
        (_, Some(DropReason::Malformed)) => {
            "the datagrams carry no flow key of the listener's dissector: find their sender"
        }
        (_, Some(DropReason::Handoff)) => {
            "a worker does not read its inbox fast enough: see each worker's busy(rho), and \
             give the busiest more CPU"
        }
        (_, Some(DropReason::NotInitial | DropReason::RateLimited | DropReason::PathLimit)) => {
            "admission refuses traffic no client asked for (a flood or a scan): it protects the \
             established sessions; [listener.admission] sets the limits"
        }
        (_, Some(DropReason::SessionLimit)) => {
            "raise max_sessions (udpshard doctor says what the host's ports and descriptors hold)"
        }
        (_, Some(DropReason::Draining)) => "the proxy is stopping: new flows wait for the next start",
        (_, Some(DropReason::NoBackend)) => {
            "no backend is up: the backends table shows their state; check the backends"
        }
        (_, Some(DropReason::NoPort)) => {
            "widen upstream_ports, or add upstream_sources (udpshard doctor)"
        }
        (_, Some(DropReason::NoFd)) => {
            "raise the descriptor limit (LimitNOFILE= in the unit; udpshard doctor)"
        }
        (_, Some(DropReason::ProxyMtu)) => {
            "the PROXY v2 header would take datagrams past the path MTU toward the backend: \
             a larger MTU there, or smaller client datagrams"
        }
        (_, Some(DropReason::Upstream)) => {
            "the kernel refuses sends to a backend: the backends table's unreach and errs say which"
        }
        (_, Some(DropReason::UpstreamSocket)) => {
            return format!(
                "replies overflow the upstream sockets: sysctl -w net.core.rmem_default={RMEM_DEFAULT}"
            )
        }
        (_, Some(DropReason::Stray)) => {
            "replies from addresses that are no session's backend: find their sender"
        }
        (_, Some(DropReason::Reply)) => {
            "replies could not be sent to clients: ss -uamn shows the listener sockets' send queues"
        }
        (_, None) => "udpshard doctor",
    };
    text.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_and_reason_has_a_fix() {
        for stage in Stage::ALL {
            assert!(!fix(stage, None, 0.0).is_empty());
            for r in stage.reasons() {
                let text = fix(stage, Some(r), 0.0);
                assert_ne!(
                    text,
                    "udpshard doctor",
                    "{} has no fix of its own",
                    r.name()
                );
            }
        }
        assert!(fix(Stage::Listener, Some(DropReason::Socket), 0.95).contains("CPU-bound"));
        assert!(fix(Stage::Listener, Some(DropReason::Socket), 0.2).contains("recv_buffer"));
        assert!(fix(Stage::Softnet, None, 0.0).contains("netdev_max_backlog=50000"));
    }
}
