//! Connection affinity's cost, measured on the real binary: datagrams per
//! second and proxy CPU per datagram for flows that never migrate, and for
//! the same flows right after every one of them moved to a new source port
//! (in `reshuffle` mode about half then land on another worker: handoff,
//! then session transfer). Both phases run in one udpshard, back to back.
//!
//! `migration-bench [--steering reshuffle|kernel-cid] [--flows N]
//!  [--per-flow N] [--rate R]`; run through `bash tests/bench.sh`'s build, or
//! `cargo build --release --workspace --bins` first.

use std::path::Path;
use std::time::{Duration, Instant};

use udpshard_tests::harness::{total, Proxy};
use udpshard_tests::load::procstat::tree_cpu_time;
use udpshard_tests::load::{Generator, LoadSpec, Sink};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

struct Phase {
    name: &'static str,
    sent: u64,
    received: u64,
    elapsed: Duration,
    cpu: Duration,
    handoffs: u64,
    transfers: u64,
}

fn main() {
    let steering = arg("--steering", "reshuffle");
    let flows: usize = arg("--flows", "2000").parse().expect("--flows");
    let per_flow: u64 = arg("--per-flow", "20").parse().expect("--per-flow");
    let rate: u64 = arg("--rate", "100000").parse().expect("--rate");
    let exe = std::env::current_exe().expect("own path");
    let bin = exe.with_file_name("udpshard");
    let sink = Sink::bind_loopback(2).expect("sink");
    let backends: Vec<String> = sink.addrs().iter().map(|a| format!("\"{a}\"")).collect();
    let config = format!(
        "workers = 2\nstats_file = \"{{stats_file}}\"\n[[listener]]\nname = \"bench\"\nbind = \"127.0.0.1:0\"\n\
         dissector = \"quic\"\nshort_cid_len = 8\nsteering = \"{steering}\"\nrecv_buffer = \"4MiB\"\nbackends = [{}]\n{}",
        backends.join(", "),
        udpshard_tests::load::one_generator_admission(1_000_000, "60s"),
    );
    let proxy = Proxy::start(Path::new(&bin), &config);
    let target = proxy.addr("bench");
    let spec = |n: u64| LoadSpec {
        target,
        flows,
        rate: Some(rate),
        duration: Duration::from_secs(60),
        max_datagrams: Some(n),
        size: 33,
    };
    let wait_sink = |want: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.arrivals() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        sink.arrivals()
    };
    let mut old_ports = Generator::open(target, flows).expect("flows");
    // Sessions for every flow.
    let warm = old_ports.send(&spec(flows as u64 * 2)).expect("warm-up");
    let mut expected = wait_sink(warm.sent);

    let mut run = |name: &'static str, gen: &mut Generator| {
        let before = proxy.stats();
        let cpu0 = tree_cpu_time(proxy.pid()).expect("cpu");
        let start = Instant::now();
        let report = gen.send(&spec(flows as u64 * per_flow)).expect("load");
        expected += report.sent;
        let arrived = wait_sink(expected);
        let elapsed = start.elapsed();
        let cpu = tree_cpu_time(proxy.pid())
            .expect("cpu")
            .saturating_sub(cpu0);
        let after = proxy.stats();
        let delta = |f: &str| total(&after, f) - total(&before, f);
        Phase {
            name,
            sent: report.sent,
            received: report.sent - (expected - arrived.min(expected)),
            elapsed,
            cpu,
            handoffs: delta("handoff_out"),
            transfers: delta("transfers_out"),
        }
    };
    let steady = run("never migrate", &mut old_ports);
    let mut new_ports = Generator::open(target, flows).expect("flows");
    let migrated = run("just migrated", &mut new_ports);
    println!(
        "steering {steering}, {flows} flows, {per_flow} datagrams per flow per phase, offered {rate}/s"
    );
    println!(
        "{:<14} {:>9} {:>9} {:>12} {:>12} {:>9} {:>10}",
        "phase", "sent", "lost", "datagrams/s", "µs/datagram", "handoffs", "transfers"
    );
    for p in [&steady, &migrated] {
        println!(
            "{:<14} {:>9} {:>9} {:>12.0} {:>12.2} {:>9} {:>10}",
            p.name,
            p.sent,
            p.sent - p.received,
            p.sent as f64 / p.elapsed.as_secs_f64(),
            p.cpu.as_secs_f64() * 1e6 / p.sent as f64,
            p.handoffs,
            p.transfers
        );
    }
}
