//! The exposition's content: a prometheus-client collector over one stats
//! snapshot and the host's counters, read at scrape time (every value
//! already lives in the stats region, so there is no registry of metric
//! objects to keep in step with the workers).

use std::fmt::{self, Write as _};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelValue, EncodeMetric,
    LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry as MetricRegistry;
use udpshard_shared::counter::CATALOGUE;
use udpshard_shared::stats::delay::{self, Histogram};
use udpshard_shared::stats::{Counter, Header, SlotState, Snapshot};

use crate::system::SystemCounters;

/// A label value, escaped as the exposition format requires (prometheus-client
/// writes label values as given: a quote or backslash in a listener or device
/// name would otherwise break the line).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Value(String);

impl Value {
    fn new(v: impl std::fmt::Display) -> Value {
        Value(
            v.to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n"),
        )
    }
}

impl EncodeLabelValue for Value {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(&self.0)
    }
}

type Labels = Vec<(&'static str, Value)>;

/// One family: its descriptor, then a sample per label set (none at all is
/// a family with no samples yet, still described).
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, kind)?;
    let mut samples = samples.into_iter().peekable();
    while let Some((labels, value)) = samples.next() {
        if labels.is_empty() && samples.peek().is_none() {
            // The family's one sample, with no label set at all (`{}` is
            // valid, but not what scrapers show).
            return value.encode(metric);
        }
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counters<N: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, N)>,
) -> fmt::Result {
    let samples = samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(enc, name, help, MetricType::Counter, samples)
}

fn gauges<N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, N)>,
) -> fmt::Result {
    let samples = samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(enc, name, help, MetricType::Gauge, samples)
}

/// A worker's queue delay as a histogram family's sample: buckets at
/// 2^k seconds (k = -20..=4), then +Inf; the sum in seconds.
#[derive(Debug)]
struct DelaySample(Histogram);

impl EncodeMetric for DelaySample {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let h = &self.0;
        let buckets: Vec<(f64, u64)> = h
            .buckets
            .iter()
            .enumerate()
            .map(|(k, n)| (delay::upper_seconds(k).unwrap_or(f64::MAX), *n))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(h.sum_ns as f64 / 1e9, h.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn worker(id: usize) -> Labels {
    vec![("worker", Value::new(id))]
}

/// The collector behind the endpoint: one stats snapshot and the host's
/// counters, read at scrape time and encoded by prometheus-client.
struct Exposition {
    snap: Snapshot,
    system: SystemCounters,
}

impl fmt::Debug for Exposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Exposition(stats snapshot)")
    }
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        self.workers(&mut enc)?;
        self.backends(&mut enc)?;
        self.supervisor(&mut enc)?;
        self.host(&mut enc)
    }
}

impl Exposition {
    fn workers(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let snap = &self.snap;
        // Counters cover every slot that has served: one a resize retired
        // keeps its series (at its final counts), so no sum over workers
        // goes back. Gauges cover the slots in use.
        let served: Vec<_> = snap.slots().collect();
        let live: Vec<_> = snap.workers().collect();
        for e in CATALOGUE.iter() {
            let Some(name) = e.metric else { continue };
            counters(
                enc,
                name,
                e.help,
                served.iter().map(|w| (worker(w.id), w.get(e.counter))),
            )?;
        }
        counters(
            enc,
            "drops",
            "Datagrams dropped, by worker and the hop where they were lost (socket: kernel drops on the listener socket; upstream_socket: on upstream sockets).",
            served.iter().flat_map(|w| {
                udpshard_shared::DropReason::ALL.iter().map(move |reason| {
                    let mut labels = worker(w.id);
                    labels.push(("reason", Value::new(reason.name())));
                    (labels, w.get(reason.counter()))
                })
            }),
        )?;
        gauges(
            enc,
            "sessions_active",
            "Live sessions.",
            live.iter()
                .map(|w| (worker(w.id), w.get(Counter::SessionsActive))),
        )?;
        gauges(
            enc,
            "sessions_embryonic",
            Counter::SessionsEmbryonic.help(),
            live.iter()
                .map(|w| (worker(w.id), w.get(Counter::SessionsEmbryonic))),
        )?;
        counters(
            enc,
            "worker_busy_seconds",
            "Time the worker spent handling events (not waiting in poll).",
            served
                .iter()
                .map(|w| (worker(w.id), w.get(Counter::BusyNs) as f64 / 1e9)),
        )?;
        gauges(
            enc,
            "worker_busy_ratio",
            "Busy time over wall time since the worker started (utilisation, rho).",
            live.iter().map(|w| {
                let wall = w.get(Counter::WallNs);
                let busy = w.get(Counter::BusyNs) as f64;
                (
                    worker(w.id),
                    if wall == 0 { 0.0 } else { busy / wall as f64 },
                )
            }),
        )?;
        family(
            enc,
            "queue_delay_seconds",
            "How long datagrams waited in the worker's listener sockets before it read them (the kernel's receive timestamp against the read): it grows before the sockets drop.",
            MetricType::Histogram,
            served
                .iter()
                .map(|w| (worker(w.id), DelaySample(*w.delay))),
        )?;
        gauges(
            enc,
            "queue_delay_max_seconds",
            "The longest queue delay of the second under way and the one before it.",
            live.iter()
                .map(|w| (worker(w.id), w.delay.max_ns as f64 / 1e9)),
        )?;
        gauges(
            enc,
            "worker_loop_max_seconds",
            "The longest event-loop iteration in the last completed second: how long a datagram can wait behind the loop.",
            live.iter()
                .map(|w| (worker(w.id), w.get(Counter::LoopMaxUs) as f64 / 1e6)),
        )?;
        gauges(
            enc,
            "worker_ready",
            "1 when the worker is serving.",
            live.iter()
                .map(|w| (worker(w.id), u64::from(w.state() == SlotState::Ready))),
        )?;
        gauges(
            enc,
            "workers",
            "Worker slots in use.",
            [(Labels::new(), live.len() as u64)],
        )
    }

    /// Per-backend families, labelled by listener and backend address (as
    /// configured); a backend a reload removed keeps its series.
    fn backends(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        use udpshard_shared::backends::{BackendCounter as B, BackendState};
        let rows = self.snap.backends();
        let labels: Vec<Labels> = rows
            .iter()
            .map(|b| {
                vec![
                    ("listener", Value::new(&b.meta.listener)),
                    ("backend", Value::new(b.meta.addr)),
                ]
            })
            .collect();
        let each = |c: B| {
            rows.iter()
                .zip(&labels)
                .map(move |(b, l)| (l.clone(), b.total(c)))
        };
        let backend_counters = [
            (
                "backend_sessions_created",
                "Sessions created toward the backend.",
                B::SessionsCreated,
            ),
            (
                "backend_tx_packets",
                "Datagrams forwarded to the backend.",
                B::TxPackets,
            ),
            (
                "backend_tx_bytes",
                "Bytes forwarded to the backend.",
                B::TxBytes,
            ),
            (
                "backend_replies",
                "Datagrams read from the backend.",
                B::Replies,
            ),
            (
                "backend_unreachable",
                "ICMP port, host or network unreachable reports for datagrams sent to the backend.",
                B::Unreachable,
            ),
            (
                "backend_send_errors",
                "Forwards to the backend the kernel refused, and other ICMP errors.",
                B::SendErrors,
            ),
        ];
        for (name, help, c) in backend_counters {
            counters(enc, name, help, each(c))?;
        }
        gauges(
            enc,
            "backend_sessions_active",
            "Live sessions with the backend.",
            each(B::SessionsActive),
        )?;
        gauges(
            enc,
            "backend_up",
            "1 when the backend takes new sessions (configured, up, weight above 0).",
            rows.iter().zip(&labels).map(|(b, l)| {
                let up = b.meta.in_config && b.meta.state == BackendState::Up && b.meta.weight > 0;
                (l.clone(), u64::from(up))
            }),
        )?;
        counters(
            enc,
            "backend_downs",
            "Times passive health took the backend down for new sessions.",
            rows.iter()
                .zip(&labels)
                .map(|(b, l)| (l.clone(), b.meta.downs)),
        )?;
        gauges(
            enc,
            "backend_weight",
            "The backend's configured weight.",
            rows.iter()
                .zip(&labels)
                .map(|(b, l)| (l.clone(), u64::from(b.meta.weight))),
        )?;
        let now_ms = udpshard_shared::clock::monotonic_ns() / 1_000_000;
        gauges(
            enc,
            "backend_last_reply_age_seconds",
            "Time since the backend's latest reply (absent until it has replied).",
            rows.iter().zip(&labels).filter_map(|(b, l)| {
                let at = b.total(B::LastReplyMs);
                (at > 0).then(|| (l.clone(), now_ms.saturating_sub(at) as f64 / 1000.0))
            }),
        )
    }

    fn supervisor(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let header = |h| [(Labels::new(), self.snap.header(h))];
        gauges(
            enc,
            "config_generation",
            "Successful config loads, the first one included.",
            header(Header::ConfigGeneration),
        )?;
        counters(
            enc,
            "reload_failures",
            "Reloads refused because the new config was invalid.",
            header(Header::ReloadFailures),
        )?;
        counters(
            enc,
            "upgrades",
            "Binary upgrades (SIGUSR2) whose new generation took over.",
            header(Header::Upgrades),
        )?;
        counters(
            enc,
            "upgrade_failures",
            "Binary upgrades that did not take over (the old generation served on).",
            header(Header::UpgradeFailures),
        )?;
        gauges(
            enc,
            "start_time_seconds",
            "When the supervisor started (Unix time).",
            header(Header::StartedAt),
        )
    }

    /// The host's counters (this network namespace), in path order; a family
    /// this host does not report is left out.
    fn host(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let system = &self.system;
        let nic: [HostFamily<crate::system::Nic>; 3] = [
            (
                "nic_rx_dropped",
                "Received packets the interface dropped.",
                |n| n.rx_dropped,
            ),
            ("nic_rx_errors", "Receive errors on the interface.", |n| {
                n.rx_errors
            }),
            (
                "nic_tx_dropped",
                "Packets the interface dropped on transmit.",
                |n| n.tx_dropped,
            ),
        ];
        if !system.nics.is_empty() {
            for (name, help, get) in nic {
                let device = |n: &crate::system::Nic| vec![("device", Value::new(&n.name))];
                counters(
                    enc,
                    name,
                    help,
                    system.nics.iter().map(|n| (device(n), get(n))),
                )?;
            }
        }
        if let Some(s) = system.softnet {
            counters(
                enc,
                "softnet_dropped",
                "Packets dropped because a CPU's input backlog was full (netdev_max_backlog), all CPUs.",
                [(Labels::new(), s.dropped)],
            )?;
            counters(
                enc,
                "softnet_time_squeeze",
                "Times the receive softirq ran out of budget with work left, all CPUs.",
                [(Labels::new(), s.time_squeeze)],
            )?;
        }
        let udp: [HostFamily<crate::system::UdpCounters>; 5] = [
            (
                "udp_in_datagrams",
                "UDP datagrams delivered to sockets, host-wide.",
                |u| u.in_datagrams,
            ),
            (
                "udp_in_errors",
                "UDP datagrams dropped on receive, host-wide (all sockets).",
                |u| u.in_errors,
            ),
            (
                "udp_rcvbuf_errors",
                "UDP datagrams dropped because a socket's receive buffer was full, host-wide.",
                |u| u.rcvbuf_errors,
            ),
            (
                "udp_sndbuf_errors",
                "UDP sends that failed for lack of send buffer, host-wide.",
                |u| u.sndbuf_errors,
            ),
            (
                "udp_no_ports",
                "UDP datagrams for a port no socket listens on, host-wide.",
                |u| u.no_ports,
            ),
        ];
        let families = [("ipv4", system.udp), ("ipv6", system.udp6)];
        if families.iter().any(|(_, u)| u.is_some()) {
            for (name, help, get) in udp {
                let samples = families.iter().filter_map(|(family, u)| {
                    u.as_ref()
                        .map(|u| (vec![("family", Value::new(family))], get(u)))
                });
                counters(enc, name, help, samples)?;
            }
        }
        Ok(())
    }
}

/// A host metric family: name, help, and how to read it from `T`.
type HostFamily<T> = (&'static str, &'static str, fn(&T) -> u64);

/// The exposition (OpenMetrics text, which Prometheus asks for first) for a
/// stats snapshot and the host's counters.
/// Fails only for a value the encoder refuses (a gauge above i64::MAX):
/// the scrape then gets a 500, never a page cut short.
pub(crate) fn render(snap: Snapshot, system: SystemCounters) -> Result<String, fmt::Error> {
    let mut registry = MetricRegistry::with_prefix("udpshard");
    registry.register_collector(Box::new(Exposition { snap, system }));
    let mut out = String::with_capacity(16 << 10);
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}
