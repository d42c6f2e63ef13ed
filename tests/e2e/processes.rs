//! End to end: the supervisor's processes. Workers match the allowed CPU
//! set and are pinned, die with the supervisor, come back when they crash,
//! and stop cleanly on SIGTERM.

use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;

use udpshard_tests::harness::{
    allowed_cpus_of, field_of, listener_config, parse_cpu_list, process_exists, quic_short, total,
    wait_until, Backend, Proxy,
};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
const WAIT: Duration = Duration::from_secs(10);

fn config(workers: &str, backend: &Backend) -> String {
    listener_config(
        &format!("workers = {workers}"),
        "dissector = \"quic\"",
        &[backend.addr],
    )
}

fn worker_pids(proxy: &Proxy) -> Vec<(u32, usize)> {
    proxy.stats()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (field_of(w, "pid") as u32, field_of(w, "cpu") as usize))
        .collect()
}

#[test]
fn one_worker_per_allowed_cpu_each_pinned_to_its_own() {
    let a = Backend::start("a");
    let proxy = Proxy::start(Path::new(BIN), &config("\"auto\"", &a));
    let allowed = parse_cpu_list(&allowed_cpus_of(std::process::id()));
    let workers = worker_pids(&proxy);
    assert_eq!(
        workers.len(),
        allowed.len(),
        "workers {workers:?} for CPUs {allowed:?}"
    );
    let mut cpus: Vec<usize> = workers.iter().map(|w| w.1).collect();
    cpus.sort_unstable();
    assert_eq!(cpus, allowed, "each allowed CPU gets exactly one worker");
    for (pid, cpu) in workers {
        assert_eq!(
            allowed_cpus_of(pid),
            cpu.to_string(),
            "worker {pid} is pinned to its CPU only"
        );
    }
    let log = proxy.log();
    assert!(
        log.contains("allowed CPUs: "),
        "the log lists the CPU set before pinning:\n{log}"
    );
}

#[test]
fn under_taskset_c0_exactly_one_worker_on_cpu0() {
    let a = Backend::start("a");
    let proxy = Proxy::start_with(
        Path::new(BIN),
        &config("\"auto\"", &a),
        &["taskset", "-c", "0"],
    );
    let workers = worker_pids(&proxy);
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0].1, 0);
    assert_eq!(allowed_cpus_of(workers[0].0), "0");
    assert!(
        proxy
            .log()
            .contains("allowed CPUs: 0 (1 CPU); starting 1 worker"),
        "{}",
        proxy.log()
    );
    // And it forwards.
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.send_to(&quic_short(7, b"hi"), proxy.addr("quic"))
        .unwrap();
    wait_until(WAIT, "forwarded", || a.count() == 1);
}

#[test]
fn sigterm_stops_every_worker_and_exits_zero() {
    let a = Backend::start("a");
    let mut proxy = Proxy::start(Path::new(BIN), &config("2", &a));
    let pids = worker_pids(&proxy);
    proxy.signal(libc::SIGTERM);
    let status = proxy
        .wait_exit(Duration::from_secs(6))
        .expect("exited within the stop timeout");
    assert_eq!(status.code(), Some(0));
    for (pid, _) in pids {
        assert!(!process_exists(pid), "worker {pid} outlived the supervisor");
    }
}

#[test]
fn sigkilled_supervisor_leaves_no_worker_holding_the_port() {
    let a = Backend::start("a");
    let mut proxy = Proxy::start(Path::new(BIN), &config("2", &a));
    let pids = worker_pids(&proxy);
    let addr = proxy.addr("quic");
    proxy.signal(libc::SIGKILL);
    proxy.wait_exit(WAIT).expect("supervisor reaped");
    wait_until(Duration::from_secs(1), "workers gone within 1 s", || {
        pids.iter().all(|(pid, _)| !process_exists(*pid))
    });
    // Nobody holds the port: a plain bind (no SO_REUSEPORT) succeeds.
    UdpSocket::bind(addr).expect("port released");
}

#[test]
fn a_crashed_worker_is_replaced_on_the_same_cpu_with_its_socket() {
    let a = Backend::start("a");
    let proxy = Proxy::start(Path::new(BIN), &config("1", &a));
    let (old_pid, cpu) = worker_pids(&proxy)[0];
    // SAFETY: kill(2) on the proxy's own worker.
    assert_eq!(unsafe { libc::kill(old_pid as i32, libc::SIGKILL) }, 0);
    let stats = proxy.wait_stats(WAIT, "a replacement worker ready", |s| {
        let w = &s["workers"][0];
        field_of(w, "restarts") == 1
            && w["state"] == "ready"
            && field_of(w, "pid") != u64::from(old_pid)
    });
    let w = &stats["workers"][0];
    assert_eq!(field_of(w, "cpu") as usize, cpu);
    assert_eq!(field_of(w, "generation"), 2);
    assert_eq!(allowed_cpus_of(field_of(w, "pid") as u32), cpu.to_string());
    // The replacement serves the same socket.
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.send_to(&quic_short(9, b"after"), proxy.addr("quic"))
        .unwrap();
    wait_until(WAIT, "forwarded by the replacement", || a.count() == 1);
    assert_eq!(total(&proxy.stats(), "tx_packets"), 1);
}

/// As PID 1 of its own PID namespace (a container's init): it serves,
/// reaps its workers, and SIGTERM (which PID 1 only receives when it
/// handles it) stops it cleanly.
#[test]
fn as_pid_1_in_a_pid_namespace_it_serves_and_stops_on_sigterm() {
    let a = Backend::start("a");
    let mut proxy = Proxy::start_with(
        Path::new(BIN),
        &config("2", &a),
        &[
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGTERM",
        ],
    );
    let stats = proxy.stats();
    assert_eq!(
        stats["supervisor_pid"], 1,
        "the supervisor is PID 1 in its namespace: {stats:#}"
    );
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.send_to(&quic_short(5, b"init"), proxy.addr("quic"))
        .unwrap();
    wait_until(WAIT, "forwarded", || a.count() == 1);
    // unshare blocks SIGTERM while it waits: signal our PID 1 itself,
    // as the container runtime would (its host pid is unshare's child).
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", proxy.pid())).unwrap();
    let init: i32 = children
        .split_whitespace()
        .next()
        .expect("unshare's child")
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the proxy's own process.
    assert_eq!(unsafe { libc::kill(init, libc::SIGTERM) }, 0);
    let status = proxy.wait_exit(WAIT).expect("exited");
    assert_eq!(status.code(), Some(0));
    // The log reader may still be draining the closed pipe.
    proxy.wait_log("all workers exited", WAIT);
}
