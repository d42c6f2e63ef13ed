//! Load generator core (flows, pacing, sink, latency).
//!
//! A load is `flows` UDP sockets sending QUIC short-header datagrams (one connection ID per
//! flow, see [`datagram`]) round-robin at a paced rate to a target, usually a proxy; a [`Sink`]
//! stands where the proxy's backends are and counts what arrives, where and how late.
//!
//! ```no_run
//! use udpshard_tests::load::{run_load, LoadSpec, Sink};
//! let sink = Sink::bind_loopback(1)?;
//! let spec = LoadSpec { flows: 20, max_datagrams: Some(2000), ..LoadSpec::new(sink.addrs()[0]) };
//! let report = run_load(&spec, &sink)?;
//! assert_eq!(report.lost, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod baseline;
pub mod cli;
pub mod datagram;
pub mod generator;
pub mod histogram;
pub mod mmsg;
pub mod pacing;
pub mod procstat;
pub mod proxy;
pub mod seqset;
pub mod sink;
pub mod table;
pub mod units;

pub use datagram::{flow_cid, Datagram, DEFAULT_SIZE, MIN_SIZE};

/// A udpshard listener's `[listener.admission]` for a load of one generator: it stands for
/// many clients (so no per-source rate applies), and its sinks answer nothing (so its
/// sessions stay embryonic: bounded only by `max_sessions`, given up after `session_idle`).
/// Goes last in the listener's table.
pub fn one_generator_admission(max_sessions: usize, session_idle: &str) -> String {
    format!(
        "\n# One generator stands for many clients, and its sinks answer nothing.\n\
         [listener.admission]\nmax_embryonic = {max_sessions}\nembryonic_timeout = \"{session_idle}\"\n\
         new_sessions_per_source = 0\nnew_paths_per_source = 0\nnew_paths_per_session = 0\n"
    )
}
pub use generator::{
    run_load, send_load, show_latency, Generator, LoadError, LoadReport, LoadSpec, Replies,
    SendReport,
};
pub use histogram::Histogram;
pub use sink::{Sink, SinkError, SinkStats};

/// CLOCK_MONOTONIC in nanoseconds: the clock of the datagrams' timestamps,
/// comparable across processes.
pub use udpshard_shared::clock::monotonic_ns;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    #[test]
    fn a_small_load_arrives_whole_at_a_sink() {
        let sink = Sink::bind_loopback(1).unwrap();
        let spec = LoadSpec {
            flows: 20,
            rate: Some(50_000),
            duration: Duration::from_secs(5),
            max_datagrams: Some(2000),
            ..LoadSpec::new(sink.addrs()[0])
        };
        let report = run_load(&spec, &sink).unwrap();
        assert_eq!(report.sent, 2000, "{report}");
        assert_eq!(report.send_errors, 0);
        assert_eq!(report.malformed, 0);
        assert_eq!(report.duplicates, 0);
        // The drain normally catches everything; on a starved machine a straggler may come
        // after it, so the report must at least add up, and the sink must get all of them.
        assert_eq!(report.received + report.lost, 2000, "{report}");
        assert_eq!(report.per_sink, vec![(sink.addrs()[0], report.received)]);
        assert!(report.p50.is_some() && report.p99 >= report.p50);
        // 2000 datagrams at 50k/s take about 40 ms.
        assert!(report.elapsed < Duration::from_secs(1), "{report}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.stats().received < 2000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let stats = sink.stop();
        assert_eq!(stats.received, 2000, "all datagrams arrive");
        assert_eq!(stats.duplicates, 0);
    }

    #[test]
    fn an_echo_sink_sends_every_datagram_back_to_its_flow() {
        let sink = Sink::bind_loopback_echo(1).unwrap();
        let spec = LoadSpec {
            flows: 50,
            rate: Some(20_000),
            duration: Duration::from_secs(5),
            max_datagrams: Some(1000),
            ..LoadSpec::new(sink.addrs()[0])
        };
        let mut generator = Generator::open(spec.target, spec.flows).unwrap();
        let report = generator.run_echo(&spec, &sink).unwrap();
        let replies = report.replies.clone().unwrap();
        assert_eq!(report.sent, 1000, "{report}");
        assert_eq!(replies.echoed, report.received, "{report}");
        assert_eq!(replies.received, replies.echoed, "{report}");
        assert_eq!(replies.duplicates, 0);
        assert!(replies.rtt_p50.is_some() && replies.rtt_p99 >= replies.rtt_p50);
        // A one-way sink echoes nothing.
        let quiet = Sink::bind_loopback(1).unwrap();
        let spec = LoadSpec {
            max_datagrams: Some(100),
            ..LoadSpec::new(quiet.addrs()[0])
        };
        let mut generator = Generator::open(spec.target, spec.flows).unwrap();
        let report = generator.run_echo(&spec, &quiet).unwrap();
        assert_eq!(report.replies.unwrap().received, 0);
        assert_eq!(quiet.echoed(), 0);
    }

    #[test]
    fn sink_counts_per_address_and_malformed() {
        let sink = Sink::bind_loopback(2).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut good = [0u8; DEFAULT_SIZE];
        Datagram {
            cid: flow_cid(3),
            seq: 9,
            sent_ns: monotonic_ns(),
        }
        .encode(&mut good)
        .unwrap();
        client.send_to(&good, sink.addrs()[1]).unwrap();
        client.send_to(&good, sink.addrs()[1]).unwrap();
        client
            .send_to(b"not a quic datagram at all", sink.addrs()[0])
            .unwrap();
        client.send_to(&[], sink.addrs()[0]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.arrivals() < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let stats = sink.stats();
        assert_eq!(stats.received, 1);
        assert_eq!(stats.per_addr, vec![0, 1]);
        assert_eq!(stats.malformed, 2);
        assert_eq!(stats.duplicates, 1);
        assert_eq!(stats.latency.count(), 1);
    }

    #[test]
    fn one_generator_serves_consecutive_loads() {
        let sink = Sink::bind_loopback(1).unwrap();
        let spec = LoadSpec {
            flows: 5,
            rate: None,
            max_datagrams: Some(500),
            ..LoadSpec::new(sink.addrs()[0])
        };
        let mut generator = Generator::open(spec.target, spec.flows).unwrap();
        let ports = generator.local_addrs().unwrap();
        for _ in 0..2 {
            let report = generator.run(&spec, &sink).unwrap();
            assert_eq!((report.sent, report.received), (500, 500), "{report}");
        }
        assert_eq!(generator.local_addrs().unwrap(), ports);
        let other = LoadSpec { flows: 6, ..spec };
        assert!(matches!(
            generator.run(&other, &sink),
            Err(LoadError::SpecMismatch { .. })
        ));
    }

    #[test]
    fn shared_sources_send_every_flow_once_per_round_from_its_socket() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let target = receiver.local_addr().unwrap();
        let (flows, sources) = (10, 3);
        let mut generator = Generator::open_shared(target, flows, sources).unwrap();
        assert_eq!(generator.flows(), flows);
        let ports = generator.local_addrs().unwrap();
        assert_eq!(ports.len(), sources);
        // Two rounds, one datagram per flow each, sent one at a time.
        let spec = LoadSpec {
            flows,
            rate: None,
            max_datagrams: Some(2 * flows as u64),
            ..LoadSpec::new(target)
        };
        let report = generator.send(&spec).unwrap();
        assert_eq!(report.sent, 2 * flows as u64);
        let mut seen = std::collections::HashMap::<[u8; 8], Vec<std::net::SocketAddr>>::new();
        let mut buf = [0u8; 2048];
        for _ in 0..2 * flows {
            let (len, from) = receiver.recv_from(&mut buf).unwrap();
            let d = Datagram::parse(&buf[..len]).expect("a generator datagram");
            seen.entry(d.cid).or_default().push(from);
        }
        assert_eq!(seen.len(), flows, "every flow sent");
        for flow in 0..flows {
            let from = &seen[&flow_cid(flow)];
            assert_eq!(from, &vec![ports[flow % sources]; 2], "flow {flow}");
        }
    }

    #[test]
    fn invalid_specs_are_refused() {
        let sink = Sink::bind_loopback(1).unwrap();
        let base = LoadSpec::new(sink.addrs()[0]);
        for spec in [
            LoadSpec {
                flows: 0,
                ..base.clone()
            },
            LoadSpec {
                size: MIN_SIZE - 1,
                ..base.clone()
            },
            LoadSpec {
                rate: Some(0),
                ..base.clone()
            },
            LoadSpec {
                duration: Duration::ZERO,
                ..base.clone()
            },
        ] {
            assert!(matches!(
                run_load(&spec, &sink),
                Err(LoadError::InvalidSpec(_))
            ));
        }
    }
}
