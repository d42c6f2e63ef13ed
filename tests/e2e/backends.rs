//! End to end: backends an operator can see. Per-backend counters in
//! `stats`, `stats --json` and (see diagnostics.rs) Prometheus, counted
//! exactly and kept through worker restarts; ICMP unreachable reports
//! counted at the backend they are about.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use udpshard_shared::Maglev;
use udpshard_tests::harness::{
    bind_udp, field_of, listener_config, quic_short, total, wait_until, Backend, Proxy,
};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
const WAIT: Duration = Duration::from_secs(15);

fn config(top: &str, backends: &[SocketAddr]) -> String {
    listener_config(top, "dissector = \"quic\"\nshort_cid_len = 8", backends)
}

/// `stats --json`'s backends, by address.
fn backends(proxy: &Proxy) -> HashMap<SocketAddr, Value> {
    proxy.stats()["backends"]
        .as_array()
        .expect("a backends array")
        .iter()
        .map(|b| (b["addr"].as_str().unwrap().parse().unwrap(), b.clone()))
        .collect()
}

fn get(b: &Value, field: &str) -> u64 {
    b[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {b}"))
}

#[test]
fn per_backend_counters_match_what_each_backend_received_and_outlive_a_worker() {
    let bs = [
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    ];
    let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(Path::new(BIN), &config("workers = 2", &addrs));
    let client = bind_udp("127.0.0.1:0");
    let cids: Vec<u64> = (0..100).collect();
    for round in 0..10u8 {
        send(&proxy, &client, &cids, round);
    }
    wait_until(WAIT, "1000 at the backends", || {
        bs.iter().map(Backend::count).sum::<usize>() == 1000
    });
    let mut echoes = 0;
    let mut buf = [0u8; 64];
    client.set_read_timeout(Some(WAIT)).unwrap();
    while echoes < 1000 {
        client.recv_from(&mut buf).expect("every echo");
        echoes += 1;
    }
    let stats = proxy.wait_stats(WAIT, "the session gauge", |s| {
        s["backends"]
            .as_array()
            .is_some_and(|v| v.iter().map(|b| get(b, "sessions_active")).sum::<u64>() == 100)
    });
    let by_addr = backends(&proxy);
    assert_eq!(by_addr.len(), 3, "{stats:#}");
    for b in &bs {
        let row = &by_addr[&b.addr];
        assert_eq!(row["listener"], "quic");
        assert_eq!(row["state"], "up");
        assert_eq!(row["weight"], 1);
        assert_eq!(get(row, "tx_packets"), b.count() as u64, "{row}");
        assert_eq!(get(row, "tx_bytes"), b.count() as u64 * 10);
        assert_eq!(get(row, "replies"), b.count() as u64, "every echo read");
        assert_eq!(get(row, "sessions_created") * 10, b.count() as u64);
        assert_eq!(get(row, "unreachable"), 0);
        assert!(row["last_reply_ms_ago"].as_u64().is_some(), "{row}");
    }
    // The table shows them too.
    let out = Command::new(BIN)
        .args(["stats", "--stats-file"])
        .arg(&proxy.stats_file)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    for b in &bs {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("quic") && l.contains(&b.addr.to_string())),
            "{table}"
        );
    }
    // A worker dies: its counts stay with the backends.
    let pid = field_of(&stats["workers"][0], "pid");
    // SAFETY: kill(2) on the proxy's own worker.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    proxy.wait_stats(WAIT, "the replacement serving", |s| {
        let w = &s["workers"][0];
        field_of(w, "restarts") == 1 && w["state"] == "ready" && field_of(w, "pid") != pid
    });
    let after = backends(&proxy);
    for b in &bs {
        assert_eq!(get(&after[&b.addr], "tx_packets"), b.count() as u64);
        assert_eq!(
            get(&after[&b.addr], "sessions_created"),
            get(&by_addr[&b.addr], "sessions_created")
        );
    }
}

/// An address nothing listens on: a port bound a moment ago, then closed.
fn closed_port() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

fn unreachable_counted_exactly(upstream_send: &str) {
    let live = Backend::start("live");
    let dead = closed_port();
    let addrs = [live.addr, dead];
    let top = format!("workers = 2\nupstream_send = \"{upstream_send}\"");
    let proxy = Proxy::start(Path::new(BIN), &config(&top, &addrs));
    let to_dead = cids_to(&addrs, 1, 0, 4);
    let client = bind_udp("127.0.0.1:0");
    // 12 reports: the kernel sends ICMP errors from a host-wide budget
    // (burst 50, icmp_msgs_per_sec), which the tests running beside this
    // one share. Round by round: a path's datagrams that leave together go
    // as one GSO message, which loopback hands to the closed port whole,
    // and it answers one report for the run (a wire would carry, and a
    // remote host answer, each datagram).
    for round in 0..3u8 {
        send(&proxy, &client, &to_dead, round);
        let want = 4 * (u64::from(round) + 1);
        proxy.wait_stats(WAIT, &format!("{want} unreachable reports"), |s| {
            s["backends"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|b| b["addr"] == dead.to_string() && get(b, "unreachable") == want)
            })
        });
    }
    let rows = backends(&proxy);
    assert_eq!(get(&rows[&dead], "tx_packets"), 12);
    assert_eq!(get(&rows[&dead], "unreachable"), 12, "{}", rows[&dead]);
    assert_eq!(get(&rows[&dead], "replies"), 0);
    assert!(rows[&dead]["last_reply_ms_ago"].is_null());
    assert_eq!(get(&rows[&live.addr], "unreachable"), 0);
    assert_eq!(get(&rows[&live.addr], "tx_packets"), 0);
    // The live backend still gets its flows.
    send(&proxy, &client, &cids_to(&addrs, 0, 0, 1), b'x');
    wait_until(WAIT, "the live backend", || live.count() == 1);
}

#[test]
fn unreachable_reports_are_counted_at_their_backend_when_forwards_go_on_their_sockets() {
    unreachable_counted_exactly("socket");
}

#[test]
fn unreachable_reports_are_counted_at_their_backend_when_forwards_go_raw() {
    unreachable_counted_exactly("auto");
}

#[test]
fn weight_0_in_a_reload_drains_a_backend_its_live_sessions_stay_and_stats_count_them() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let text = config("workers = 2", &[a.addr, b.addr]);
    let proxy = Proxy::start(Path::new(BIN), &text);
    let client = bind_udp("127.0.0.1:0");
    let live: Vec<u64> = (0..60).collect();
    send(&proxy, &client, &live, 1);
    wait_until(WAIT, "the first round", || a.count() + b.count() == 60);
    let on_a = a.count();
    assert!(on_a > 0 && on_a < 60, "both backends have sessions: {on_a}");
    // Reload with a drained.
    let drained = text.replace(
        &format!("\"{}\"", a.addr),
        &format!("{{ addr = \"{}\", weight = 0 }}", a.addr),
    );
    std::fs::write(
        &proxy.config_path,
        drained.replace("{stats_file}", &proxy.stats_file.display().to_string()),
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    let stats = proxy.wait_stats(WAIT, "a draining", |s| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| field_of(w, "config_generation") == 2)
    });
    let rows = backends(&proxy);
    assert_eq!(rows[&a.addr]["state"], "draining", "{stats:#}");
    assert_eq!(get(&rows[&a.addr], "weight"), 0);
    // Its live sessions keep working ...
    send(&proxy, &client, &live, 2);
    wait_until(WAIT, "the second round", || a.count() + b.count() == 120);
    assert_eq!(a.count(), 2 * on_a, "a's live sessions stayed on a");
    // ... and no new one goes there.
    send(&proxy, &client, &(1000..1200).collect::<Vec<_>>(), 3);
    wait_until(WAIT, "new CIDs", || a.count() + b.count() == 320);
    assert_eq!(
        a.count(),
        2 * on_a,
        "a new session went to a drained backend"
    );
    // The gauge is recounted every tick (100 ms).
    let stats = proxy.wait_stats(WAIT, "the sessions left on a", |s| {
        s["backends"].as_array().is_some_and(|v| {
            v.iter().any(|r| {
                r["addr"] == a.addr.to_string() && get(r, "sessions_active") == on_a as u64
            }) && v.iter().any(|r| {
                r["addr"] == b.addr.to_string() && get(r, "sessions_active") == (260 - on_a) as u64
            })
        })
    });
    let rows = backends(&proxy);
    assert!(!stats["backends"].is_null());
    assert_eq!(get(&rows[&a.addr], "sessions_created"), on_a as u64);
    assert_eq!(
        get(&rows[&b.addr], "sessions_created"),
        (60 - on_a + 200) as u64
    );
}

/// Waits until `addr` is `state` and every worker routes by it.
fn wait_state(proxy: &Proxy, addr: SocketAddr, state: &str) {
    proxy.wait_stats(
        WAIT,
        &format!("{addr} {state}, applied by every worker"),
        |s| {
            let generation = &s["health_generation"];
            s["backends"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|b| b["addr"] == addr.to_string() && b["state"] == state)
            }) && s["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| &w["health_generation"] == generation)
        },
    );
}

fn state_of(proxy: &Proxy, addr: SocketAddr) -> String {
    backends(proxy)[&addr]["state"]
        .as_str()
        .unwrap()
        .to_string()
}

fn health_config(top: &str, listener: &str, backends: &[SocketAddr]) -> String {
    listener_config(
        top,
        &format!("dissector = \"quic\"\nshort_cid_len = 8\n{listener}"),
        backends,
    )
}

/// CIDs (from `from` on) that Maglev over `addrs` sends to backend `b`.
fn cids_to(addrs: &[SocketAddr], b: usize, from: u64, n: usize) -> Vec<u64> {
    let names: Vec<(String, u32)> = addrs.iter().map(|a| (a.to_string(), 1)).collect();
    let maglev = Maglev::new(&names, 65537).unwrap();
    (from..)
        .filter(|c| maglev.backend_for(&c.to_be_bytes()) == b)
        .take(n)
        .collect()
}

fn send(proxy: &Proxy, client: &UdpSocket, cids: &[u64], tag: u8) {
    for cid in cids {
        client
            .send_to(&quic_short(*cid, &[tag]), proxy.addr("quic"))
            .unwrap();
    }
}

#[test]
fn a_closed_backend_goes_down_within_fall_sessions_new_cids_avoid_it_and_it_comes_back() {
    let live = Backend::start("live");
    let dead = closed_port();
    let addrs = [live.addr, dead];
    let proxy = Proxy::start(
        Path::new(BIN),
        &health_config("workers = 2", "fall = 3\nrevive_after = \"2s\"", &addrs),
    );
    let client = bind_udp("127.0.0.1:0");
    // Three new sessions toward the closed port: three unreachable reports.
    let doomed = cids_to(&addrs, 1, 0, 3);
    send(&proxy, &client, &doomed, 1);
    wait_state(&proxy, dead, "down");
    let log = proxy.wait_log("is down for new sessions", WAIT);
    assert!(log.contains("3 ICMP unreachable reports in a row"), "{log}");
    let rows = backends(&proxy);
    assert_eq!(get(&rows[&dead], "unreachable"), 3, "counted exactly");
    assert_eq!(get(&rows[&dead], "downs"), 1);
    // New CIDs that map to it go to the live backend; CIDs that never
    // mapped to it keep theirs.
    let redirected = cids_to(&addrs, 1, 1000, 20);
    let kept = cids_to(&addrs, 0, 1000, 10);
    send(&proxy, &client, &redirected, 2);
    send(&proxy, &client, &kept, 2);
    wait_until(WAIT, "30 at the live backend", || live.count() == 30);
    let routes = |cids: &[u64]| -> usize {
        live.seen()
            .iter()
            .filter(|s| {
                let cid = u64::from_be_bytes(s.payload[1..9].try_into().unwrap());
                cids.contains(&cid)
            })
            .count()
    };
    assert_eq!(routes(&redirected), 20);
    assert_eq!(routes(&kept), 10);
    // With on_backend_down = "keep", the live sessions on it stay there.
    send(&proxy, &client, &doomed[..1], 3);
    proxy.wait_stats(WAIT, "a 4th report", |s| {
        s["backends"].as_array().is_some_and(|v| {
            v.iter()
                .any(|b| b["addr"] == dead.to_string() && get(b, "unreachable") == 4)
        })
    });
    // Still closed after revive_after: on trial, one report takes it down.
    wait_state(&proxy, dead, "up");
    let trial = cids_to(&addrs, 1, 3000, 1);
    send(&proxy, &client, &trial, 5);
    wait_state(&proxy, dead, "down");
    assert_eq!(
        get(&backends(&proxy)[&dead], "downs"),
        2,
        "down again after one report"
    );
    // It reopens; after revive_after new sessions reach it again.
    let back = Backend::start_on("back", &dead.to_string());
    wait_state(&proxy, dead, "up");
    proxy.wait_log("is up: down for", WAIT);
    let fresh = cids_to(&addrs, 1, 5000, 5);
    send(&proxy, &client, &fresh, 4);
    wait_until(WAIT, "new sessions at the revived backend", || {
        back.count() == 5
    });
    assert_eq!(state_of(&proxy, dead), "up", "its replies keep it up");
}

#[test]
fn on_backend_down_reroute_moves_live_sessions_off_a_closed_backend() {
    let live = Backend::start("live");
    let dead = closed_port();
    let addrs = [live.addr, dead];
    let proxy = Proxy::start(
        Path::new(BIN),
        &health_config(
            "workers = 2",
            "fall = 3\non_backend_down = \"reroute\"",
            &addrs,
        ),
    );
    let client = bind_udp("127.0.0.1:0");
    let doomed = cids_to(&addrs, 1, 0, 3);
    send(&proxy, &client, &doomed, 1);
    proxy.wait_stats(WAIT, "down and rerouted", |s| {
        total(s, "sessions_rerouted") == 3
    });
    send(&proxy, &client, &doomed, 2);
    wait_until(WAIT, "the rerouted sessions at the live backend", || {
        live.count() == 3
    });
    let stats = proxy.stats();
    assert_eq!(
        total(&stats, "sessions_created"),
        3,
        "the same sessions, moved"
    );
}

#[test]
fn a_backend_that_never_answers_new_quic_sessions_goes_down() {
    let live = Backend::start("live");
    // Takes datagrams, answers none.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mute = silent.local_addr().unwrap();
    let addrs = [live.addr, mute];
    let proxy = Proxy::start(
        Path::new(BIN),
        &health_config("workers = 2", "fall = 3\nreply_timeout = \"200ms\"", &addrs),
    );
    let client = bind_udp("127.0.0.1:0");
    // Short-header datagrams expect nothing: never judged.
    send(&proxy, &client, &cids_to(&addrs, 1, 100, 5), 1);
    wait_until(WAIT, "the silent backend to take 5", || {
        get(&backends(&proxy)[&mute], "tx_packets") == 5
    });
    // Initials are answered by every QUIC server: three unanswered in a row.
    for cid in cids_to(&addrs, 1, 0, 3) {
        client
            .send_to(&quic_initial(cid), proxy.addr("quic"))
            .unwrap();
    }
    wait_state(&proxy, mute, "down");
    let log = proxy.wait_log("is down for new sessions", WAIT);
    assert!(
        log.contains("3 new sessions in a row without a reply within 200ms"),
        "{log}"
    );
    let rows = backends(&proxy);
    assert_eq!(get(&rows[&mute], "sessions_unanswered"), 3);
    assert_eq!(get(&rows[&live.addr], "sessions_unanswered"), 0);
}

/// A QUIC v1 Initial for destination CID `cid`, in the 1200 bytes a
/// client's first flight has (a shorter one opens no session).
fn quic_initial(cid: u64) -> Vec<u8> {
    let mut d = udpshard_shared::flow::quic_initial(
        &cid.to_be_bytes(),
        &(!cid).to_be_bytes(),
        &[0, 0x40, 0x10],
    );
    d.resize(udpshard_shared::flow::QUIC_MIN_INITIAL, 0);
    d
}

/// A UDP backend that echoes, stays silent or answers garbage, as told.
struct Switchable {
    addr: SocketAddr,
    /// 0: echo, 1: silent, 2: garbage.
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Switchable {
    fn start() -> Switchable {
        use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
        use std::sync::Arc;
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (mode.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                match m.load(Ordering::Relaxed) {
                    0 => drop(socket.send_to(&buf[..n], from)),
                    2 => drop(socket.send_to(b"garbage", from)),
                    _ => {}
                }
            }
        });
        Switchable {
            addr,
            mode,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Switchable {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn active_probes_take_a_silent_or_garbled_backend_down_within_fall_intervals_and_back_after_rise() {
    let live = Backend::start("live");
    let flaky = Switchable::start();
    let addrs = [live.addr, flaky.addr];
    let (interval, fall, rise) = (200u64, 3u64, 2u64);
    let proxy = Proxy::start(
        Path::new(BIN),
        &format!(
            "{}\n[listener.health]\nprobe = \"0x50494e47\"\nexpect = \"PING\"\ninterval = \"{interval}ms\"\ntimeout = \"100ms\"\nrise = {rise}\nfall = {fall}\n",
            health_config("workers = 2", "", &addrs)
        ),
    );
    // Probes answered: it stays up.
    wait_state(&proxy, flaky.addr, "up");
    // Silent: down within fall intervals plus one (and up to 1 s for the
    // supervisor's 100 ms look and the stats reads on a loaded machine).
    let bound = Duration::from_millis((fall + 1) * interval + 1000);
    flaky.set(1);
    let t = std::time::Instant::now();
    wait_state(&proxy, flaky.addr, "down");
    let went = t.elapsed();
    assert!(went <= bound, "down after {went:?}, more than {bound:?}");
    let log = proxy.wait_log("is down for new sessions", WAIT);
    assert!(
        log.contains("3 probes failed in a row (fall = 3): no reply within 100ms"),
        "{log}"
    );
    // New CIDs that map to it go elsewhere meanwhile.
    let client = bind_udp("127.0.0.1:0");
    send(&proxy, &client, &cids_to(&addrs, 1, 0, 10), 1);
    wait_until(WAIT, "10 at the live backend", || live.count() == 10);
    // Answering again: up after rise good probes.
    flaky.set(0);
    let t = std::time::Instant::now();
    wait_state(&proxy, flaky.addr, "up");
    let back = t.elapsed();
    let bound = Duration::from_millis((rise + 1) * interval + 1000);
    assert!(back <= bound, "up after {back:?}, more than {bound:?}");
    eprintln!("silent to down: {went:?}; answering to up: {back:?}");
    assert!(proxy.log().contains("2 good probes in a row (rise = 2)"));
    // Garbage counts as failing.
    flaky.set(2);
    wait_state(&proxy, flaky.addr, "down");
    assert!(proxy
        .log()
        .contains("a reply that does not start with `expect`"));
    let rows = backends(&proxy);
    assert_eq!(get(&rows[&flaky.addr], "downs"), 2);
}

#[test]
fn readiness_backend_up_withdraws_a_host_whose_backends_are_all_down_and_it_serves_on() {
    let (a, b) = (Switchable::start(), Switchable::start());
    let addrs = [a.addr, b.addr];
    let probes = "\n[listener.health]\nprobe = \"0x50494e47\"\nexpect = \"PING\"\n\
                  interval = \"100ms\"\ntimeout = \"50ms\"\nrise = 1\nfall = 2\n";
    let text = |top: &str| format!("{}{probes}", health_config(top, "", &addrs));
    let proxy = Proxy::start(Path::new(BIN), &text("workers = 2"));
    wait_state(&proxy, a.addr, "up");
    wait_state(&proxy, b.addr, "up");
    assert!(proxy.health().0, "{:?}", proxy.health());
    // Both fail their probes: by default the host stays ready.
    a.set(1);
    b.set(1);
    wait_state(&proxy, a.addr, "down");
    wait_state(&proxy, b.addr, "down");
    assert!(proxy.health().0, "{:?}", proxy.health());
    // A reload to readiness = "backend_up": not ready, for that reason.
    std::fs::write(
        &proxy.config_path,
        text("workers = 2\nreadiness = \"backend_up\"")
            .replace("{stats_file}", &proxy.stats_file.display().to_string()),
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    wait_until(WAIT, "health to say no backend up", || {
        proxy.health()
            == (
                false,
                "not ready: no backend up: every backend of a listener is down; still serving"
                    .to_string(),
            )
    });
    assert!(proxy
        .log()
        .contains("listener quic has no backend up: not ready"));
    // It serves on: new flows go to the backends it has (trying a failing
    // one beats refusing all).
    let before = total(&proxy.stats(), "tx_packets");
    let client = bind_udp("127.0.0.1:0");
    send(&proxy, &client, &(900..910).collect::<Vec<u64>>(), 1);
    proxy.wait_stats(WAIT, "10 more forwarded", |s| {
        total(s, "tx_packets") == before + 10
    });
    // One answers again: ready.
    a.set(0);
    wait_state(&proxy, a.addr, "up");
    wait_until(WAIT, "health to say ready", || proxy.health().0);
    assert!(proxy.log().contains("a backend is up again: ready"));
}
