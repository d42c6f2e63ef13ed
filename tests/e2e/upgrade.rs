//! End to end: the binary upgrade (SIGUSR2). The proxy runs from a copy of
//! the binary in a temp dir; the test copies the binary over that copy (a
//! new inode, as a package upgrade does), signals, and checks what a user
//! would: every datagram answered, every connection ID on its backend and
//! its proxy 4-tuple, a new supervisor, counters that went on. A binary that
//! fails, or that never stands ready, leaves the old generation serving.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use udpshard_tests::harness::{
    bind_udp, free_tcp_port, http_get, install_executable, listener_config, process_exists,
    quic_short, total, wait_until, Backend, NotifySocket, Proxy, TempDir,
};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
const WAIT: Duration = Duration::from_secs(20);
const CIDS: u64 = 200;
/// One datagram per CID per round, a round every 40 ms: 5,000 datagrams/s.
const ROUND: Duration = Duration::from_millis(40);

fn config(backends: &[SocketAddr], top: &str) -> String {
    listener_config(
        &format!("workers = 2\n{top}"),
        "dissector = \"quic\"\nshort_cid_len = 8\nrecv_buffer = \"4MiB\"",
        backends,
    )
}

/// A copy of the binary at a path of its own, in `dir`.
fn copy_binary(dir: &TempDir) -> PathBuf {
    let exe = dir.path().join("udpshard");
    install_executable(Path::new(BIN), &exe);
    exe
}

/// Puts a script at `exe` as a new file, as a package upgrade would put a
/// new version.
fn replace_with_script(exe: &Path, script: &str) {
    let text = exe.with_extension("script");
    std::fs::write(&text, script).unwrap();
    install_executable(&text, exe);
}

/// 200 clients, one CID each, sending in rounds and reading what comes back.
struct Clients {
    socks: Vec<UdpSocket>,
    sent: u64,
    /// Per CID: the replies' backend names.
    replies: HashMap<u64, Vec<String>>,
}

impl Clients {
    fn new() -> Clients {
        let socks = (0..CIDS)
            .map(|_| {
                let s = bind_udp("127.0.0.1:0");
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        Clients {
            socks,
            sent: 0,
            replies: HashMap::new(),
        }
    }

    /// One datagram from every client.
    fn round(&mut self, to: SocketAddr, seq: u64) {
        for (cid, s) in self.socks.iter().enumerate() {
            let body = format!("#{seq}");
            s.send_to(&quic_short(cid as u64, body.as_bytes()), to)
                .unwrap();
            self.sent += 1;
        }
    }

    /// Reads every reply waiting.
    fn read(&mut self) {
        let mut buf = [0u8; 256];
        for (cid, s) in self.socks.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                // "name:" then the datagram the backend got.
                let text = &buf[..n];
                let colon = text.iter().position(|&b| b == b':').unwrap();
                let name = String::from_utf8_lossy(&text[..colon]).into_owned();
                self.replies.entry(cid as u64).or_default().push(name);
            }
        }
    }

    fn received(&self) -> u64 {
        self.replies.values().map(|v| v.len() as u64).sum()
    }

    /// Reads until every datagram sent is answered, or `timeout`.
    fn settle(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.received() < self.sent && Instant::now() < deadline {
            self.read();
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Per CID: the proxy source addresses its backend saw it from.
fn sources(backends: &[&Backend]) -> HashMap<u64, HashSet<SocketAddr>> {
    let mut out: HashMap<u64, HashSet<SocketAddr>> = HashMap::new();
    for b in backends {
        for seen in b.seen() {
            let cid = u64::from_be_bytes(seen.payload[1..9].try_into().unwrap());
            out.entry(cid).or_default().insert(seen.from);
        }
    }
    out
}

/// Stops a supervisor that is not the test's child (the new generation).
fn stop(pid: u32) {
    // SAFETY: kill(2) on the proxy this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_until(WAIT, "the new supervisor to exit", || !process_exists(pid));
}

#[test]
fn sigusr2_upgrades_without_losing_a_datagram_a_backend_or_a_4tuple() {
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    let dir = TempDir::new("upgrade");
    let exe = copy_binary(&dir);
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let top = format!("metrics = \"{metrics}\"");
    let mut proxy = Proxy::start(&exe, &config(&[a.addr, b.addr, c.addr], &top));
    proxy.stats_with(Path::new(BIN));
    let to = proxy.addr("quic");
    let old_pid = proxy.pid();
    let mut clients = Clients::new();
    let mut seq = 0;
    // Steady traffic before: every CID has its session and its path.
    let mut next = Instant::now();
    for _ in 0..25 {
        clients.round(to, seq);
        seq += 1;
        next += ROUND;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        clients.read();
    }
    clients.settle(WAIT);
    assert_eq!(clients.received(), clients.sent, "before the upgrade");
    let before = proxy.stats();
    let before_sources = sources(&[&a, &b, &c]);
    assert_eq!(before_sources.len(), CIDS as usize);

    // The package manager's part: a new file at the binary's path. Then
    // the signal, with the traffic going on.
    install_executable(Path::new(BIN), &exe);
    proxy.signal(libc::SIGUSR2);
    let deadline = Instant::now() + WAIT;
    let mut after_took = None;
    while after_took.is_none_or(|n| n > 0) {
        assert!(Instant::now() < deadline, "no takeover:\n{}", proxy.log());
        clients.round(to, seq);
        seq += 1;
        next = next.max(Instant::now() - ROUND) + ROUND;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        clients.read();
        if after_took.is_none() && proxy.log().contains("upgraded to ") {
            // Another second of traffic on the new generation.
            after_took = Some(25);
        }
        after_took = after_took.map(|n: u32| n.saturating_sub(1));
    }
    clients.settle(WAIT);
    let log = proxy.log();

    // The old supervisor handed over and exited 0; a new one serves.
    let status = proxy.wait_exit(WAIT).expect("the old supervisor exits");
    assert!(status.success(), "old supervisor: {status}\n{log}");
    let after = proxy.stats();
    let new_pid = after["supervisor_pid"].as_u64().unwrap() as u32;
    assert_ne!(new_pid, old_pid, "{after:#}");
    assert!(process_exists(new_pid), "{log}");

    // Every datagram answered, each by its CID's one backend.
    assert_eq!(
        clients.received(),
        clients.sent,
        "lost across the upgrade:\n{log}"
    );
    for (cid, names) in &clients.replies {
        let first = &names[0];
        assert!(
            names.iter().all(|n| n == first),
            "CID {cid} moved between backends: {names:?}"
        );
    }
    // Each CID reached its backend from one proxy address throughout: the
    // upstream sockets went over with the sessions.
    for (cid, from) in sources(&[&a, &b, &c]) {
        assert_eq!(from.len(), 1, "CID {cid} reached its backend from {from:?}");
        assert_eq!(before_sources[&cid], from, "CID {cid}");
    }

    // The counters went on: nothing went back, and they add up to what the
    // clients sent and got.
    for field in [
        "rx_packets",
        "tx_packets",
        "replies_out",
        "sessions_created",
    ] {
        assert!(
            total(&after, field) >= total(&before, field),
            "{field} went back: {before:#} -> {after:#}"
        );
    }
    assert_eq!(total(&after, "rx_packets"), clients.sent, "{after:#}");
    assert_eq!(total(&after, "tx_packets"), clients.sent, "{after:#}");
    assert_eq!(total(&after, "replies_out"), clients.sent, "{after:#}");
    assert_eq!(
        total(&after, "sessions_created"),
        CIDS,
        "no session was made twice: {after:#}"
    );
    assert_eq!(after["upgrades"], 1, "{after:#}");
    assert_eq!(after["upgrade_failures"], 0, "{after:#}");
    for (w, old) in beside(&after, &before) {
        assert_eq!(w["state"], "ready", "{after:#}");
        assert_eq!(
            w["generation"].as_u64(),
            old["generation"].as_u64().map(|g| g + 1),
            "{after:#}"
        );
        assert!(w["version"]
            .as_str()
            .is_some_and(|v| v.starts_with(env!("CARGO_PKG_VERSION"))));
        assert_ne!(w["pid"], old["pid"], "{after:#}");
    }
    assert_eq!(total(&after, "drops.worker_lost"), 0, "{after:#}");

    // Again, from the new generation, with the config file changed
    // meanwhile: the third generation starts on what ran, then applies the
    // file (a fourth backend) as a reload would.
    let d = Backend::start("d");
    std::fs::write(
        &proxy.config_path,
        config(&[a.addr, b.addr, c.addr, d.addr], &top)
            .replace("{stats_file}", &proxy.stats_file.display().to_string()),
    )
    .unwrap();
    // SAFETY: kill(2) on the supervisor that took over.
    assert_eq!(unsafe { libc::kill(new_pid as i32, libc::SIGUSR2) }, 0);
    let third = proxy.wait_stats(WAIT, "a second upgrade", |s| {
        s["upgrades"] == 2 && s["config_generation"] == 2
    });
    wait_until(WAIT, "the second old supervisor to exit", || {
        !process_exists(new_pid)
    });
    let third_pid = third["supervisor_pid"].as_u64().unwrap() as u32;
    assert!(
        proxy
            .log()
            .contains("the config file differs from what ran; applying it"),
        "{}",
        proxy.log()
    );
    for (w, old) in beside(&third, &before) {
        assert_eq!(
            w["generation"].as_u64(),
            old["generation"].as_u64().map(|g| g + 2),
            "{third:#}"
        );
    }
    assert!(
        third["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["addr"] == d.addr.to_string() && b["in_config"] == true),
        "{third:#}"
    );
    clients.round(to, seq);
    clients.settle(WAIT);
    assert_eq!(clients.received(), clients.sent, "after the second upgrade");
    // The metrics listener went from generation to generation.
    let page = http_get(&metrics, "/metrics");
    assert!(page.contains("udpshard_upgrades_total 2"), "{page}");
    assert!(page.contains("udpshard_upgrade_failures_total 0"), "{page}");
    stop(third_pid);
}

#[test]
fn a_failed_upgrade_leaves_the_old_generation_serving_and_is_counted() {
    let a = Backend::start("a");
    let dir = TempDir::new("upgrade-fail");
    let exe = copy_binary(&dir);
    // systemd's notify socket, as packaging/upgrade-service reads it: every
    // refusal and failure gets a STATUS= of its own.
    let notify = NotifySocket::bind(&dir, WAIT);
    let mut proxy = Proxy::start_with(
        &exe,
        &config(&[a.addr], "upgrade_timeout = \"2s\""),
        &["env", &notify.env()],
    );
    // The stats through the test's own binary: the proxy's path will hold
    // broken ones.
    proxy.stats_with(Path::new(BIN));
    let to = proxy.addr("quic");
    let client = bind_udp("127.0.0.1:0");
    let serves = |n: usize, tag: &str| {
        for cid in 0..10u64 {
            client
                .send_to(&quic_short(cid, tag.as_bytes()), to)
                .unwrap();
        }
        wait_until(WAIT, tag, || a.count() == n);
    };
    serves(10, "before");
    let pids: Vec<u64> = worker_pids(&proxy);

    // A new binary that never stands ready: the upgrade times out, and a
    // second SIGUSR2 meanwhile is refused.
    replace_with_script(&exe, "#!/bin/sh\nexec sleep 30\n");
    proxy.signal(libc::SIGUSR2);
    proxy.wait_log("upgrade: the new binary started", WAIT);
    proxy.signal(libc::SIGUSR2);
    proxy.wait_log("an upgrade is already running", WAIT);
    assert_eq!(
        notify.next_status("STATUS=upgrade refused"),
        "STATUS=upgrade refused (refusal 1), this generation serves on: an upgrade is already running"
    );
    let s = proxy.wait_stats(WAIT, "a failed upgrade", |s| s["upgrade_failures"] == 1);
    let failed = notify.next_status("STATUS=upgrade failed");
    assert!(
        failed.starts_with("STATUS=upgrade failed (failure 1), this generation serves on: ")
            && failed.contains("did not stand ready within upgrade_timeout"),
        "{failed}"
    );
    assert!(
        proxy
            .log()
            .contains("did not stand ready within upgrade_timeout"),
        "{}",
        proxy.log()
    );
    assert_eq!(s["supervisor_pid"], proxy.pid(), "{s:#}");
    serves(20, "after a timeout");

    // A new binary that fails at once.
    replace_with_script(&exe, "#!/bin/sh\nexit 1\n");
    proxy.signal(libc::SIGUSR2);
    let s = proxy.wait_stats(WAIT, "a second failed upgrade", |s| {
        s["upgrade_failures"] == 2
    });
    // The same kind of failure again: new text all the same.
    let failed = notify.next_status("STATUS=upgrade failed");
    assert!(
        failed.starts_with("STATUS=upgrade failed (failure 2), "),
        "{failed}"
    );
    assert!(proxy.log().contains("exited"), "{}", proxy.log());
    serves(30, "after a failure");
    // Untouched: the same supervisor, the same workers, nothing lost.
    assert_eq!(s["supervisor_pid"], proxy.pid(), "{s:#}");
    assert_eq!(worker_pids(&proxy), pids);
    assert_eq!(s["upgrades"], 0, "{s:#}");
    let s = proxy.stats();
    assert_eq!(total(&s, "tx_packets"), 30, "{s:#}");

    // A binary whose config check fails says why.
    install_executable(Path::new(BIN), &exe);
    std::fs::write(&proxy.config_path, "workers = [\n").unwrap();
    proxy.signal(libc::SIGUSR2);
    let s = proxy.wait_stats(WAIT, "a third failed upgrade", |s| {
        s["upgrade_failures"] == 3
    });
    let log = proxy.log();
    assert!(
        log.contains("upgrade failed") && log.contains("udpshard.toml:1:"),
        "{log}"
    );
    let failed = notify.next_status("STATUS=upgrade failed");
    assert!(
        failed.starts_with("STATUS=upgrade failed (failure 3), ")
            && failed.contains("udpshard.toml:1:"),
        "{failed}"
    );
    serves(40, "after a bad config");
    assert_eq!(s["supervisor_pid"], proxy.pid(), "{s:#}");
    assert_eq!(worker_pids(&proxy), pids);
}

/// Each worker of stats `now` beside the same slot in stats `then`.
fn beside<'a>(
    now: &'a serde_json::Value,
    then: &'a serde_json::Value,
) -> impl Iterator<Item = (&'a serde_json::Value, &'a serde_json::Value)> {
    let slots = |s: &'a serde_json::Value| {
        s["workers"]
            .as_array()
            .expect("the stats list the workers")
            .iter()
    };
    slots(now).zip(slots(then))
}

fn worker_pids(proxy: &Proxy) -> Vec<u64> {
    proxy.stats()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect()
}

#[test]
fn an_upgrade_given_up_after_the_old_workers_quiesced_leaves_them_serving() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let dir = TempDir::new("upgrade-resume");
    let exe = copy_binary(&dir);
    let mut proxy = Proxy::start(&exe, &config(&[a.addr, b.addr], ""));
    proxy.stats_with(Path::new(BIN));
    let to = proxy.addr("quic");
    let mut clients = Clients::new();
    clients.round(to, 0);
    clients.settle(WAIT);
    assert_eq!(clients.received(), clients.sent);
    let before = proxy.stats();
    let pids = worker_pids(&proxy);
    // Worker 0 stops (SIGSTOP): it cannot quiesce, so once the new binary
    // stands by, worker 1 quiesces alone and the upgrade times out past
    // that step; worker 1 must then serve on, and so must worker 0.
    // SAFETY: kill(2) on the proxy's own worker.
    assert_eq!(unsafe { libc::kill(pids[0] as i32, libc::SIGSTOP) }, 0);
    proxy.signal(libc::SIGUSR2);
    proxy.wait_log("old workers stop reading", WAIT);
    // Traffic meanwhile waits in the kernel, for whoever serves next.
    clients.round(to, 1);
    let s = proxy.wait_stats(WAIT, "the upgrade given up", |s| s["upgrade_failures"] == 1);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pids[0] as i32, libc::SIGCONT) }, 0);
    proxy.wait_log("upgrade given up: reading the listeners again", WAIT);
    clients.round(to, 2);
    clients.settle(WAIT);
    let log = proxy.log();
    assert!(log.contains("did not stop reading within"), "{log}");
    // The same processes serve every datagram, each CID on its backend.
    let missing: Vec<u64> = (0..CIDS)
        .filter(|cid| clients.replies.get(cid).map_or(0, Vec::len) < 3)
        .collect();
    assert_eq!(
        clients.received(),
        clients.sent,
        "lost, CIDs {missing:?}:\n{:#}\n{log}",
        proxy.stats()
    );
    for (cid, names) in &clients.replies {
        assert!(names.iter().all(|n| n == &names[0]), "CID {cid}: {names:?}");
    }
    assert_eq!(s["supervisor_pid"], proxy.pid(), "{s:#}");
    assert_eq!(worker_pids(&proxy), pids);
    let after = proxy.stats();
    assert_eq!(after["upgrades"], 0, "{after:#}");
    assert_eq!(total(&after, "sessions_created"), CIDS, "{after:#}");
    assert_eq!(total(&after, "tx_packets"), clients.sent, "{after:#}");
    for (w, old) in beside(&after, &before) {
        assert_eq!(w["state"], "ready", "{after:#}");
        assert_eq!(w["generation"], old["generation"], "{after:#}");
    }
}
