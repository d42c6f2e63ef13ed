//! End to end: supervision under load and signals. Worker crashes, SIGHUP
//! reloads (backends, a broken file, the worker count), CPU-set changes,
//! SIGTERM draining.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use udpshard_tests::harness::{
    bind_udp, field_of, free_tcp_port, http_get, http_request, listener_config, quic_short, total,
    wait_until, Backend, Proxy,
};
use udpshard_tests::load::{run_load, LoadSpec, Sink};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
const WAIT: Duration = Duration::from_secs(15);

fn config(workers: &str, backends: &[SocketAddr]) -> String {
    listener_config(
        &format!("workers = {workers}"),
        "dissector = \"quic\"\nshort_cid_len = 8\nrecv_buffer = \"4MiB\"",
        backends,
    )
}

/// Rewrites the running proxy's config file for `workers` (a SIGHUP then
/// applies it).
fn rewrite(proxy: &Proxy, workers: &str, backends: &[SocketAddr]) {
    std::fs::write(
        &proxy.config_path,
        config(workers, backends).replace("{stats_file}", &proxy.stats_file.display().to_string()),
    )
    .unwrap();
}

fn worker_pids(proxy: &Proxy) -> Vec<u64> {
    proxy.stats()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| field_of(w, "pid"))
        .collect()
}

/// Sends one datagram per CID from one client and waits until `expect`
/// datagrams in all have reached `backends`.
fn send_cids(proxy: &Proxy, client: &UdpSocket, cids: std::ops::Range<u64>, tag: &[u8]) {
    for cid in cids {
        client
            .send_to(&quic_short(cid, tag), proxy.addr("quic"))
            .unwrap();
    }
}

/// CID -> (backend name, proxy source address), for datagrams carrying `tag`.
fn routes(backends: &[&Backend], tag: &[u8]) -> HashMap<u64, (String, SocketAddr)> {
    let mut out = HashMap::new();
    for b in backends {
        for seen in b.seen() {
            if seen.payload.ends_with(tag) {
                let cid = u64::from_be_bytes(seen.payload[1..9].try_into().unwrap());
                out.insert(cid, (b.name.clone(), seen.from));
            }
        }
    }
    out
}

/// Reloads and waits until every worker has applied `generation`.
fn sighup_and_wait(proxy: &Proxy, generation: u64) -> serde_json::Value {
    proxy.signal(libc::SIGHUP);
    proxy.wait_stats(WAIT, "every worker on the new config", |s| {
        s["config_generation"] == generation
            && s["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| field_of(w, "config_generation") == generation)
    })
}

#[test]
fn a_killed_worker_is_replaced_within_a_second_and_its_queue_is_served() {
    let sink = Sink::bind_loopback(2).unwrap();
    let proxy = Proxy::start(Path::new(BIN), &config("2", sink.addrs()));
    let mut spec = LoadSpec::new(proxy.addr("quic"));
    spec.flows = 200;
    spec.rate = Some(5_000);
    spec.duration = Duration::from_secs(3);
    let load = std::thread::spawn(move || {
        let report = run_load(&spec, &sink).unwrap();
        (report, sink)
    });
    proxy.wait_stats(WAIT, "load flowing", |s| total(s, "tx_packets") > 1_000);
    let victim = worker_pids(&proxy)[0];
    let cpu = field_of(&proxy.stats()["workers"][0], "cpu");
    // SAFETY: kill(2) on the proxy's own worker.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let killed_at = Instant::now();
    let stats = proxy.wait_stats(Duration::from_secs(1), "a replacement within 1 s", |s| {
        let w = &s["workers"][0];
        field_of(w, "restarts") == 1 && w["state"] == "ready" && field_of(w, "pid") != victim
    });
    let replaced_in = killed_at.elapsed();
    assert_eq!(field_of(&stats["workers"][0], "cpu"), cpu, "same CPU");
    let (report, _sink) = load.join().unwrap();
    eprintln!(
        "worker replaced in {replaced_in:?}; sent {} received {} lost {}",
        report.sent, report.received, report.lost
    );
    // Datagrams that arrived while the worker was down waited in its
    // socket. At most one receive batch (32) can have been in the killed
    // process's hands at the instant of SIGKILL.
    assert!(report.lost <= 32, "lost {} of {}", report.lost, report.sent);
    let stats = proxy.stats();
    assert_eq!(total(&stats, "drops.socket"), 0, "{stats:#}");
}

#[test]
fn a_killed_workers_sessions_keep_their_upstream_4_tuples_at_its_replacement() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let proxy = Proxy::start(Path::new(BIN), &config("2", &[a.addr, b.addr]));
    let client = bind_udp("127.0.0.1:0");
    send_cids(&proxy, &client, 1..201, b"before");
    wait_until(WAIT, "first round", || a.count() + b.count() == 200);
    let before = routes(&[&a, &b], b"before");
    let stats = proxy.stats();
    let workers = stats["workers"].as_array().unwrap();
    // One client address: the kernel gives every datagram to one worker.
    let victim = workers
        .iter()
        .position(|w| field_of(w, "sessions_active") == 200)
        .unwrap_or_else(|| panic!("one worker has the sessions: {stats:#}"));
    let pid = field_of(&workers[victim], "pid");
    // SAFETY: kill(2) on the proxy's own worker.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    proxy.wait_stats(WAIT, "the replacement serving", |s| {
        let w = &s["workers"][victim];
        field_of(w, "restarts") == 1 && w["state"] == "ready" && field_of(w, "pid") != pid
    });
    send_cids(&proxy, &client, 1..201, b"after");
    wait_until(WAIT, "second round", || a.count() + b.count() == 400);
    let after = routes(&[&a, &b], b"after");
    for (cid, route) in &before {
        assert_eq!(
            after.get(cid),
            Some(route),
            "CID {cid} changed backend or upstream 4-tuple across the crash"
        );
    }
    let stats = proxy.stats();
    assert_eq!(total(&stats, "paths_inherited"), 200, "{stats:#}");
    assert_eq!(total(&stats, "drops.no_port"), 0);
}

#[test]
fn sighup_adding_a_backend_keeps_live_sessions_and_new_cids_reach_it() {
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    let proxy = Proxy::start(Path::new(BIN), &config("2", &[a.addr, b.addr]));
    let client = bind_udp("127.0.0.1:0");
    send_cids(&proxy, &client, 1..201, b"one");
    wait_until(WAIT, "first round", || a.count() + b.count() == 200);
    let before = routes(&[&a, &b], b"one");

    std::fs::write(
        &proxy.config_path,
        config("2", &[a.addr, b.addr, c.addr])
            .replace("{stats_file}", &proxy.stats_file.display().to_string()),
    )
    .unwrap();
    sighup_and_wait(&proxy, 2);
    assert!(proxy.log().contains("reloaded"), "{}", proxy.log());

    send_cids(&proxy, &client, 1..201, b"two");
    send_cids(&proxy, &client, 1001..1301, b"new");
    wait_until(WAIT, "second round", || {
        a.count() + b.count() + c.count() == 700
    });
    let after = routes(&[&a, &b, &c], b"two");
    for (cid, route) in &before {
        assert_eq!(
            after.get(cid),
            Some(route),
            "CID {cid} lost its backend or session"
        );
    }
    let fresh = routes(&[&a, &b, &c], b"new");
    assert!(
        fresh.values().any(|(name, _)| name == "c"),
        "no new CID reached the new backend"
    );

    // Removing a backend re-routes its live sessions: the same sessions (none
    // is made anew), to the backend their key maps to now.
    let created = total(&proxy.stats(), "sessions_created");
    let on_a: Vec<u64> = before
        .iter()
        .filter(|(_, (n, _))| n == "a")
        .map(|(c, _)| *c)
        .collect();
    std::fs::write(
        &proxy.config_path,
        config("2", &[b.addr, c.addr])
            .replace("{stats_file}", &proxy.stats_file.display().to_string()),
    )
    .unwrap();
    let stats = sighup_and_wait(&proxy, 3);
    let fresh_on_a = fresh.values().filter(|(n, _)| n == "a").count();
    assert_eq!(
        total(&stats, "sessions_rerouted"),
        (on_a.len() + fresh_on_a) as u64
    );
    let a_count = a.count();
    send_cids(&proxy, &client, 1..201, b"three");
    wait_until(WAIT, "third round", || {
        b.count() + c.count() + a.count() == 900
    });
    assert_eq!(a.count(), a_count, "a removed backend got traffic");
    let third = routes(&[&b, &c], b"three");
    let maglev =
        udpshard_shared::Maglev::new(&[(b.addr.to_string(), 1), (c.addr.to_string(), 1)], 65537)
            .unwrap();
    for cid in &on_a {
        let want = ["b", "c"][maglev.backend_for(&cid.to_be_bytes())];
        assert_eq!(third[cid].0, want, "CID {cid} re-routed elsewhere");
    }
    let stats = proxy.stats();
    assert_eq!(
        total(&stats, "sessions_created"),
        created,
        "re-routing made new sessions"
    );
}

#[test]
fn sighup_with_a_broken_file_keeps_serving_the_old_config() {
    let a = Backend::start("a");
    let proxy = Proxy::start(Path::new(BIN), &config("2", &[a.addr]));
    std::fs::write(&proxy.config_path, "workers = 2\n[[listener]]\nname = \"quic\"\nbind = \"127.0.0.1:0\"\ndissector = \"quic\"\nbackends = [\"nonsense\"]\n").unwrap();
    proxy.signal(libc::SIGHUP);
    let stats = proxy.wait_stats(WAIT, "a reload failure", |s| s["reload_failures"] == 1);
    assert_eq!(stats["config_generation"], 1);
    let log = proxy.wait_log("reload failed", WAIT);
    let file = proxy.config_path.display().to_string();
    assert!(
        log.contains(&format!("{file}:6:13")),
        "the log names file:line:col:\n{log}"
    );
    let client = bind_udp("127.0.0.1:0");
    send_cids(&proxy, &client, 1..51, b"still");
    wait_until(WAIT, "still serving", || a.count() == 50);
}

/// Workers give up CAP_NET_BIND_SERVICE at start when their upstream ports
/// do not need it: a reload that moves them below the unprivileged start is
/// refused with the reason, and the old config serves on.
#[test]
fn a_reload_to_privileged_upstream_ports_is_refused_and_says_restart() {
    let start: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(1024);
    if start <= 600 {
        eprintln!("skipped: every port from {start} up binds without privilege here");
        return;
    }
    let a = Backend::start("a");
    let text = config("2", &[a.addr]);
    let proxy = Proxy::start(Path::new(BIN), &text);
    let low = text.replace(
        "upstream_ports = \"1025-32767\"",
        "upstream_ports = \"500-600\"",
    );
    assert_ne!(low, text, "the test config names its upstream ports");
    std::fs::write(
        &proxy.config_path,
        low.replace("{stats_file}", &proxy.stats_file.display().to_string()),
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    let stats = proxy.wait_stats(WAIT, "a reload failure", |s| s["reload_failures"] == 1);
    assert_eq!(stats["config_generation"], 1);
    let log = proxy.wait_log("reload failed", WAIT);
    assert!(
        log.contains("upstream_ports 500-600") && log.contains("restart to apply"),
        "{log}"
    );
    let client = bind_udp("127.0.0.1:0");
    send_cids(&proxy, &client, 1..51, b"still");
    wait_until(WAIT, "still serving", || a.count() == 50);
}

/// A worker that calls what its system-call filter forbids dies of it: it
/// names the call, the supervisor says why it died and replaces it, and the
/// proxy serves on. (A test-only hook makes worker 1 call acct(2) once.)
#[test]
fn a_worker_that_breaks_the_system_call_filter_is_killed_named_and_replaced() {
    let a = Backend::start("a");
    let (dir, config_path, stats_file) =
        udpshard_tests::harness::write_config(&config("2", &[a.addr]));
    let hook = dir.path().join("forbidden");
    std::fs::write(&hook, "1").unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(&config_path)
        .env("UDPSHARD_TEST_FORBIDDEN_SYSCALL", &hook);
    let proxy = Proxy::spawn(cmd, Path::new(BIN), dir, config_path, stats_file);
    proxy.expect_filter_kills();
    let log = proxy.wait_log("died (killed by the system-call filter", WAIT);
    assert!(
        log.contains(&format!(
            "udpshard worker: killed by the system-call filter: syscall {}\n",
            libc::SYS_acct
        )),
        "the worker names the call:\n{log}"
    );
    assert!(!hook.exists(), "the hook fires once");
    proxy.wait_stats(WAIT, "worker 1 replaced and serving", |s| {
        let w = &s["workers"][1];
        field_of(w, "restarts") == 1 && w["state"] == "ready"
    });
    // Counted, on the slot whose worker it was.
    let stats = proxy.stats();
    assert_eq!(
        field_of(&stats["workers"][1], "filter_kills"),
        1,
        "{stats:#}"
    );
    assert_eq!(
        field_of(&stats["workers"][0], "filter_kills"),
        0,
        "{stats:#}"
    );
    let client = bind_udp("127.0.0.1:0");
    send_cids(&proxy, &client, 1..101, b"after");
    wait_until(WAIT, "every datagram at the backend", || a.count() == 100);
}

/// The soft RLIMIT_NOFILE at which process `pid` can open exactly one more
/// descriptor (the lowest free numbers are used first).
fn one_more_fd(pid: u32) -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let first_free = (0..).find(|n| !open.contains(n)).unwrap();
    (first_free + 1..).find(|n| !open.contains(n)).unwrap()
}

fn set_fd_limit(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a null new limit only reads the current one.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0);
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: lowers (or restores) the soft limit of the proxy's own
    // supervisor, below its hard limit.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    old.rlim_cur
}

#[test]
fn a_reload_whose_new_worker_slot_cannot_be_made_is_rolled_back_whole() {
    let a = Backend::start("a");
    let proxy = Proxy::start(Path::new(BIN), &config("1", &[a.addr]));
    let client = bind_udp("127.0.0.1:0");
    send_cids(&proxy, &client, 1..51, b"before");
    wait_until(WAIT, "serving", || a.count() == 50);
    // Room for the config file, then for one socket of the new slot: its
    // handoff inbox fails with EMFILE, after the groups took a socket for it.
    let pid = proxy.pid();
    let limit = set_fd_limit(pid, one_more_fd(pid));
    rewrite(&proxy, "2", &[a.addr]);
    proxy.signal(libc::SIGHUP);
    let stats = proxy.wait_stats(WAIT, "a reload failure", |s| s["reload_failures"] == 1);
    set_fd_limit(pid, limit);
    let log = proxy.wait_log("reload failed", WAIT);
    assert!(
        log.contains("still serving the previous config: adding worker slots")
            && log.contains("(rolled back)"),
        "{log}"
    );
    assert!(!log.contains("workers: 1 -> 2"), "{log}");
    assert_eq!(stats["config_generation"], 1);
    assert_eq!(stats["workers"].as_array().unwrap().len(), 1, "{stats:#}");
    send_cids(&proxy, &client, 1..51, b"after");
    wait_until(WAIT, "still serving", || a.count() == 100);
    // With room again, the same file applies whole.
    let stats = sighup_and_wait(&proxy, 2);
    assert_eq!(stats["workers"].as_array().unwrap().len(), 2, "{stats:#}");
    send_cids(&proxy, &client, 51..101, b"later");
    wait_until(WAIT, "serving on two", || a.count() == 150);
}

#[test]
fn sighup_follows_workers_2_1_2_and_traffic_keeps_flowing() {
    let a = Backend::start("a");
    let proxy = Proxy::start(Path::new(BIN), &config("2", &[a.addr]));
    let client = bind_udp("127.0.0.1:0");
    let write = |workers: &str| rewrite(&proxy, workers, &[a.addr]);
    let mut sent = 0;
    let mut round = |proxy: &Proxy| {
        let cids = 10_000 * (sent / 100 + 1);
        send_cids(proxy, &client, cids..cids + 100, b"x");
        sent += 100;
        let want = sent as usize;
        wait_until(WAIT, "traffic flows", || a.count() == want);
    };
    round(&proxy);
    write("1");
    let stats = sighup_and_wait(&proxy, 2);
    let stats = if stats["workers"].as_array().unwrap().len() == 1 {
        stats
    } else {
        proxy.wait_stats(WAIT, "one worker", |s| {
            s["workers"].as_array().unwrap().len() == 1
        })
    };
    assert_eq!(stats["workers"][0]["state"], "ready");
    round(&proxy);
    write("2");
    sighup_and_wait(&proxy, 3);
    proxy.wait_stats(WAIT, "two workers ready", |s| {
        let ws = s["workers"].as_array().unwrap();
        ws.len() == 2 && ws.iter().all(|w| w["state"] == "ready")
    });
    round(&proxy);
    assert_eq!(total(&proxy.stats(), "drops.socket"), 0);
    // A normal shrink is not an error: no warning about the retired worker.
    let log = proxy.log();
    assert!(
        !log.contains("cannot send the new config") && !log.contains("Broken pipe"),
        "{log}"
    );
}

#[test]
fn a_cpu_set_change_is_followed_without_a_signal() {
    let cpus = udpshard_tests::harness::parse_cpu_list(&udpshard_tests::harness::allowed_cpus_of(
        std::process::id(),
    ));
    assert!(
        cpus.len() >= 2,
        "this test needs two CPUs; the machine offers {cpus:?}"
    );
    let a = Backend::start("a");
    let proxy = Proxy::start_with(
        Path::new(BIN),
        &config("\"auto\"", &[a.addr]),
        &["taskset", "-c", &cpus[0].to_string()],
    );
    assert_eq!(worker_pids(&proxy).len(), 1);
    // What `docker update --cpuset-cpus` does to a running container.
    let list = format!("{},{}", cpus[0], cpus[1]);
    let status = Command::new("taskset")
        .args(["-p", "-c", &list, &proxy.pid().to_string()])
        .output()
        .unwrap();
    assert!(status.status.success());
    let stats = proxy.wait_stats(WAIT, "a worker per CPU", |s| {
        let ws = s["workers"].as_array().unwrap();
        ws.len() == 2 && ws.iter().all(|w| w["state"] == "ready")
    });
    let mut pinned: Vec<u64> = stats["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| field_of(w, "cpu"))
        .collect();
    pinned.sort_unstable();
    assert_eq!(pinned, vec![cpus[0] as u64, cpus[1] as u64]);
    let client = bind_udp("127.0.0.1:0");
    send_cids(&proxy, &client, 1..101, b"y");
    wait_until(WAIT, "traffic flows", || a.count() == 100);
}

#[test]
fn sigterm_drains_live_sessions_refuses_new_ones_and_exits_zero() {
    let backend = bind_udp("127.0.0.1:0");
    backend
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let cfg = format!(
        "drain_timeout = \"2s\"\n{}",
        config("1", &[backend.local_addr().unwrap()])
    );
    let mut proxy = Proxy::start(Path::new(BIN), &cfg);
    let client = bind_udp("127.0.0.1:0");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client
        .send_to(&quic_short(1, b"live"), proxy.addr("quic"))
        .unwrap();
    let mut buf = [0u8; 64];
    let (_, upstream) = backend.recv_from(&mut buf).unwrap();

    proxy.signal(libc::SIGTERM);
    let stopped_at = Instant::now();
    proxy.wait_stats(WAIT, "draining", |s| s["workers"][0]["state"] == "draining");
    // The live session's reply still reaches the client...
    backend.send_to(b"reply", upstream).unwrap();
    let (n, _) = client.recv_from(&mut buf).expect("reply during the drain");
    assert_eq!(&buf[..n], b"reply");
    // ...and a new flow is refused, and counted.
    client
        .send_to(&quic_short(2, b"new"), proxy.addr("quic"))
        .unwrap();
    proxy.wait_stats(WAIT, "the new flow refused", |s| {
        total(s, "drops.draining") == 1
    });
    let status = proxy.wait_exit(Duration::from_secs(5)).expect("exited");
    assert_eq!(status.code(), Some(0));
    let took = stopped_at.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "exited after {took:?}, drain timeout 2s"
    );
}

/// GET /ready on the metrics endpoint: the status line and the body.
fn ready(endpoint: &str) -> (String, String) {
    let r = http_get(endpoint, "/ready");
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or((&r, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    (status, body.trim().to_string())
}

#[test]
fn sigterm_with_withdraw_delay_turns_not_ready_serves_new_flows_then_drains() {
    let backend = Backend::start("b");
    let port = free_tcp_port();
    let endpoint = format!("127.0.0.1:{port}");
    let cfg = format!(
        "withdraw_delay = \"5s\"\ndrain_timeout = \"1s\"\nmetrics = \"{endpoint}\"\n{}",
        config("2", &[backend.addr])
    );
    let mut proxy = Proxy::start(Path::new(BIN), &cfg);
    assert_eq!(
        proxy.health(),
        (true, "ready: 2 workers serving".to_string())
    );
    assert_eq!(
        ready(&endpoint),
        (
            "HTTP/1.1 200 OK".to_string(),
            "ready: 2 workers serving".to_string()
        )
    );
    let live = bind_udp("127.0.0.1:0");
    live.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    live.send_to(&quic_short(1, b"live"), proxy.addr("quic"))
        .unwrap();
    live.recv_from(&mut buf).expect("the live flow's reply");

    proxy.signal(libc::SIGTERM);
    let stopped_at = Instant::now();
    wait_until(WAIT, "/ready to say 503", || {
        ready(&endpoint).0 == "HTTP/1.1 503 Service Unavailable"
    });
    let withdrawing = "not ready: withdrawing: stopping soon, still serving until the drain begins";
    assert_eq!(ready(&endpoint).1, withdrawing);
    // HEAD, as some load balancers' checks send it: the status, no body.
    let head = http_request(&endpoint, "HEAD", "/ready", "");
    assert!(
        head.starts_with("HTTP/1.1 503 Service Unavailable\r\n") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    assert_eq!(proxy.health(), (false, withdrawing.to_string()));
    // Not ready, and still serving: the live flow, and a new one.
    live.send_to(&quic_short(1, b"again"), proxy.addr("quic"))
        .unwrap();
    let (n, _) = live
        .recv_from(&mut buf)
        .expect("the live flow, withdrawing");
    assert!(buf[..n].ends_with(b"again"));
    let new = bind_udp("127.0.0.1:0");
    new.set_read_timeout(Some(WAIT)).unwrap();
    new.send_to(&quic_short(2, b"new"), proxy.addr("quic"))
        .unwrap();
    let (n, _) = new.recv_from(&mut buf).expect("a new flow, withdrawing");
    assert!(buf[..n].ends_with(b"new"));
    let stats = proxy.stats();
    assert_eq!(total(&stats, "drops.draining"), 0, "{stats:#}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(5),
        "the checks outlasted withdraw_delay"
    );

    // Then it drains, and exits.
    let status = proxy.wait_exit(WAIT).expect("exited");
    assert_eq!(status.code(), Some(0));
    let took = stopped_at.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(10),
        "exited {took:?} after SIGTERM: withdraw_delay 5s, then a drain of at most 1s"
    );
    let log = proxy.log();
    assert!(
        log.contains("withdraw_delay is over: draining 2 workers"),
        "{log}"
    );
    let (ready_now, line) = proxy.health();
    assert!(
        !ready_now && line.starts_with("not ready: the proxy is not running"),
        "{line}"
    );
}

#[test]
fn a_second_sigterm_skips_the_withdraw_delay() {
    let backend = Backend::start("b");
    let cfg = format!(
        "withdraw_delay = \"1h\"\ndrain_timeout = \"1s\"\n{}",
        config("1", &[backend.addr])
    );
    let mut proxy = Proxy::start(Path::new(BIN), &cfg);
    proxy.signal(libc::SIGTERM);
    let stopped_at = Instant::now();
    wait_until(WAIT, "health to say withdrawing", || {
        proxy.health().1.starts_with("not ready: withdrawing")
    });
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(WAIT).expect("exited without the hour");
    assert_eq!(status.code(), Some(0));
    assert!(stopped_at.elapsed() < WAIT);
    let log = proxy.log();
    assert!(
        log.contains("signal 15 while withdrawing: draining now"),
        "{log}"
    );
}

#[test]
fn sighup_adds_and_removes_listeners() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let proxy = Proxy::start(Path::new(BIN), &config("2", &[a.addr]));
    let first = proxy.addr("quic");
    let client = bind_udp("127.0.0.1:0");
    send_cids(&proxy, &client, 1..51, b"q");
    wait_until(WAIT, "first listener serves", || a.count() == 50);

    // A second listener, on a port of its own, to backend b.
    let spare = UdpSocket::bind("127.0.0.1:0").unwrap();
    let second: SocketAddr = spare.local_addr().unwrap();
    drop(spare);
    let two = format!(
        "{}\n[[listener]]\nname = \"other\"\nbind = \"{second}\"\ndissector = \"tuple\"\nbackends = [\"{}\"]\n",
        config("2", &[a.addr]),
        b.addr
    );
    std::fs::write(
        &proxy.config_path,
        two.replace("{stats_file}", &proxy.stats_file.display().to_string()),
    )
    .unwrap();
    sighup_and_wait(&proxy, 2);
    for i in 0..20u8 {
        client.send_to(&[i; 5], second).unwrap();
    }
    wait_until(WAIT, "the new listener serves", || b.count() == 20);
    // The first listener kept its sessions: same upstream address per CID.
    let before = routes(&[&a], b"q");
    send_cids(&proxy, &client, 1..51, b"r");
    wait_until(WAIT, "first listener still serves", || a.count() == 100);
    let after = routes(&[&a], b"r");
    for (cid, route) in &before {
        assert_eq!(
            after.get(cid),
            Some(route),
            "CID {cid} lost its session across the reload"
        );
    }

    // Remove the first listener: its port closes, the other keeps serving.
    let only_other = format!(
        "workers = 2\nstats_file = \"{}\"\n[[listener]]\nname = \"other\"\nbind = \"{second}\"\ndissector = \"tuple\"\nbackends = [\"{}\"]\n",
        proxy.stats_file.display(),
        b.addr
    );
    std::fs::write(&proxy.config_path, only_other).unwrap();
    sighup_and_wait(&proxy, 3);
    wait_until(WAIT, "the removed listener's port is free", || {
        UdpSocket::bind(first).is_ok()
    });
    for i in 0..20u8 {
        client.send_to(&[i; 6], second).unwrap();
    }
    wait_until(WAIT, "the kept listener serves", || b.count() == 40);
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let dir = udpshard_tests::harness::TempDir::new("notify");
    let notify = udpshard_tests::harness::NotifySocket::bind(&dir, WAIT);
    let a = Backend::start("a");
    let mut proxy = Proxy::start_with(
        Path::new(BIN),
        &config("2", &[a.addr]),
        &["env", &notify.env()],
    );
    let next = || notify.next();
    let ready = next();
    assert!(
        ready.starts_with("READY=1\nSTATUS=ready: 2 workers serving "),
        "{ready}"
    );
    proxy.signal(libc::SIGHUP);
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    let usec: u64 = reloading.rsplit('=').next().unwrap().parse().unwrap();
    assert!(usec > 0);
    let reloaded = next();
    assert!(
        reloaded.starts_with("READY=1\nSTATUS=reloaded ")
            && reloaded.contains("(config generation 2)"),
        "{reloaded}"
    );
    // A broken file: still READY, and the status says why.
    std::fs::write(&proxy.config_path, "workers = 0\n").unwrap();
    proxy.signal(libc::SIGHUP);
    assert!(next().starts_with("RELOADING=1\n"));
    let refused = next();
    assert!(
        refused.starts_with("READY=1\nSTATUS=reload failed, still serving the previous config: ")
            && refused.contains(":1:11"),
        "{refused}"
    );
    proxy.signal(libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1");
    assert_eq!(proxy.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
}

/// A no-op reload, then workers 2 -> 1 -> 2, under load: a retiring worker
/// is steered away from before it stops, so nothing is lost.
fn reloads_under_steady_load(steering: &str) {
    let sink = Sink::bind_loopback(2).unwrap();
    let backends: Vec<SocketAddr> = sink.addrs().to_vec();
    let with_steering = |workers: &str| {
        config(workers, &backends).replace(
            "short_cid_len = 8",
            &format!("short_cid_len = 8\nsteering = \"{steering}\""),
        )
    };
    let proxy = Proxy::start(Path::new(BIN), &with_steering("2"));
    let mut spec = LoadSpec::new(proxy.addr("quic"));
    spec.flows = 200;
    spec.rate = Some(5_000);
    spec.duration = Duration::from_secs(4);
    let load = std::thread::spawn(move || (run_load(&spec, &sink).unwrap(), sink));
    proxy.wait_stats(WAIT, "load flowing", |s| total(s, "tx_packets") > 1_000);
    let write = |workers: &str| rewrite(&proxy, workers, &backends);
    // Same config (a no-op reload), then 2 -> 1 -> 2 workers.
    sighup_and_wait(&proxy, 2);
    write("1");
    sighup_and_wait(&proxy, 3);
    proxy.wait_stats(WAIT, "one worker", |s| {
        s["workers"].as_array().unwrap().len() == 1
    });
    write("2");
    sighup_and_wait(&proxy, 4);
    let (report, sink) = load.join().unwrap();
    // The generator stops waiting after 200 ms without an arrival; on a loaded machine a
    // worker that has just started can hold the last datagrams longer than that. Late is
    // not lost: wait for them (bounded), then count what never came.
    let arrived = || sink.stats().received;
    let deadline = Instant::now() + WAIT;
    while arrived() < report.sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let lost = report.sent.saturating_sub(arrived());
    eprintln!(
        "reloads under load ({steering}): sent {} received {} (late {}) lost {lost}",
        report.sent,
        arrived(),
        arrived().saturating_sub(report.received),
    );
    let totals = &proxy.stats()["totals"];
    assert_eq!(
        lost,
        0,
        "{report:?}; the proxy's client drops: {}",
        client_drops(totals)
    );
}

#[test]
fn reloads_under_steady_load_lose_nothing_with_kernel_cid_steering() {
    reloads_under_steady_load("kernel-cid");
}

#[test]
fn reloads_under_steady_load_lose_nothing_with_reshuffle_steering() {
    reloads_under_steady_load("reshuffle");
}

/// The client datagrams the proxy counted as dropped, over its whole life:
/// every reason on the way to a backend (kernel drops on the listener
/// sockets, what died with a killed worker, and the router's own).
fn client_drops(totals: &serde_json::Value) -> u64 {
    udpshard_shared::DropReason::client()
        .map(|r| totals["drops"][r.name()].as_u64().unwrap())
        .sum()
}

#[test]
fn every_datagram_is_accounted_through_kills_and_resizes_and_totals_never_go_back() {
    let sink = Sink::bind_loopback(2).unwrap();
    let backends: Vec<SocketAddr> = sink.addrs().to_vec();
    let proxy = Proxy::start(Path::new(BIN), &config("2", &backends));
    let mut spec = LoadSpec::new(proxy.addr("quic"));
    spec.flows = 2_000;
    spec.rate = Some(10_000);
    spec.duration = Duration::from_secs(5);
    let load = std::thread::spawn(move || (run_load(&spec, &sink).unwrap(), sink));
    let write = |workers: &str| rewrite(&proxy, workers, &backends);
    // Every stats read checks that no total went back since the last one.
    let last = std::cell::RefCell::new((0u64, 0u64, 0u64));
    let monotonic = |s: &serde_json::Value| {
        let t = &s["totals"];
        let now = (
            t["rx_packets"].as_u64().unwrap(),
            t["tx_packets"].as_u64().unwrap(),
            client_drops(t),
        );
        let before = last.replace(now);
        assert!(
            now.0 >= before.0 && now.1 >= before.1 && now.2 >= before.2,
            "totals went back: {before:?} -> {now:?}\n{s:#}"
        );
    };
    let kill = |k: usize| {
        let stats = proxy.stats();
        monotonic(&stats);
        let w = &stats["workers"][k];
        let (victim, restarts) = (field_of(w, "pid"), field_of(w, "restarts"));
        // SAFETY: kill(2) on the proxy's own worker.
        assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
        proxy.wait_stats(WAIT, "the killed worker replaced", |s| {
            monotonic(s);
            let w = &s["workers"][k];
            field_of(w, "restarts") == restarts + 1
                && w["state"] == "ready"
                && field_of(w, "pid") != victim
        });
    };
    proxy.wait_stats(WAIT, "load flowing", |s| {
        monotonic(s);
        total(s, "tx_packets") > 2_000
    });
    kill(0);
    write("1");
    proxy.signal(libc::SIGHUP);
    let one = proxy.wait_stats(WAIT, "one worker left", |s| {
        monotonic(s);
        s["workers"].as_array().unwrap().len() == 1
    });
    assert_eq!(one["totals"]["workers_retired"], 1, "{one:#}");
    kill(0);
    write("2");
    proxy.signal(libc::SIGHUP);
    proxy.wait_stats(WAIT, "two workers again", |s| {
        monotonic(s);
        let ws = s["workers"].as_array().unwrap();
        ws.len() == 2 && ws.iter().all(|w| w["state"] == "ready")
    });
    kill(1);
    let (report, sink) = load.join().unwrap();
    // Whatever the proxy still held has reached the sink, or was counted.
    let previous = std::cell::Cell::new(u64::MAX);
    let settled = proxy.wait_stats(WAIT, "the ledger settled", |s| {
        monotonic(s);
        let t = &s["totals"];
        let now = t["tx_packets"].as_u64().unwrap() + client_drops(t);
        now == previous.replace(now) && sink.stats().received >= t["tx_packets"].as_u64().unwrap()
    });
    let t = &settled["totals"];
    let received = sink.stats().received;
    let dropped = client_drops(t);
    let unaccounted = report.sent as i64 - received as i64 - dropped as i64;
    eprintln!(
        "sent {} received {received} dropped {dropped} ({:#}) unaccounted {unaccounted}",
        report.sent, t["drops"]
    );
    assert_eq!(sink.stats().duplicates, 0);
    // Every datagram the proxy counted as forwarded arrived; beyond them
    // only a batch a killed worker sent inside its last system call, too late
    // to note it (then booked as worker_lost).
    let unnoted = received as i64 - t["tx_packets"].as_u64().unwrap() as i64;
    assert!(
        (0..=3 * 32).contains(&unnoted),
        "unnoted {unnoted}\n{settled:#}"
    );
    // The proxy counted every datagram the kernel did not drop on its
    // sockets as read, but for a batch being read as a worker was killed.
    let unread = report.sent as i64
        - (t["rx_packets"].as_u64().unwrap() + t["drops"]["socket"].as_u64().unwrap()) as i64;
    assert!(
        (0..=3 * 32).contains(&unread),
        "unread {unread}\n{settled:#}"
    );
    // What a killed worker held at the instant of SIGKILL is counted
    // (drops.worker_lost), except a batch inside a system call at that
    // instant: one the kernel had handed over as the worker died, or one it
    // sent before the worker could note it. At most a receive batch (32)
    // for each of the 3 kills.
    assert!(
        unaccounted.abs() <= 3 * 32,
        "unaccounted {unaccounted}\n{settled:#}"
    );
}

/// Sets the soft RLIMIT_NOFILE of process `pid` (its hard limit stays);
/// returns the soft limit it had.
fn set_nofile(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit(2) with a null new limit only reads.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit read: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit(2) on the proxy this test started, with valid structs.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old.rlim_cur
}

#[test]
fn a_worker_that_cannot_be_started_is_retried_while_the_others_serve() {
    let a = Backend::start("a");
    let proxy = Proxy::start(Path::new(BIN), &config("2", &[a.addr]));
    let stats = || udpshard_tests::harness::stats_json(Path::new(BIN), &proxy.stats_file);
    // A client the steering sends to worker 1, and one it sends to worker 0.
    let client_for = |worker: u32| loop {
        let c = bind_udp("127.0.0.1:0");
        if udpshard_shared::steer::tuple_index(c.local_addr().unwrap(), 2) == worker {
            return c;
        }
    };
    let (to_0, to_1) = (client_for(0), client_for(1));
    let victim = field_of(&stats()["workers"][0], "pid");
    // The supervisor may open no descriptor: every start of a worker fails
    // (it has no socketpair to give it), and it runs on with what it holds.
    let limit = set_nofile(proxy.pid(), 4);
    // SAFETY: kill(2) on the proxy's own worker.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    proxy.wait_log("cannot start worker 0", WAIT);
    // It keeps trying, and the supervisor and worker 1 keep serving.
    send_cids(&proxy, &to_1, 0..50, b"one");
    wait_until(WAIT, "worker 1 serves", || a.count() == 50);
    send_cids(&proxy, &to_0, 100..150, b"zero");
    let s = stats();
    assert!(udpshard_tests::harness::process_exists(proxy.pid()));
    assert_eq!(s["workers"][0]["state"], "exited", "{s:#}");
    assert_eq!(s["workers"][1]["state"], "ready", "{s:#}");
    // Descriptors again: the slot's next try starts it, and what waited in
    // worker 0's socket meanwhile is served.
    set_nofile(proxy.pid(), limit);
    wait_until(WAIT, "worker 0 back, its queue served", || a.count() == 100);
    let s = stats();
    assert_eq!(s["workers"][0]["state"], "ready", "{s:#}");
    assert_eq!(total(&s, "drops.socket"), 0, "{s:#}");
}

#[test]
fn a_worker_restarted_after_the_binary_was_replaced_runs_the_supervisors_own() {
    let a = Backend::start("a");
    // A copy of the binary, which the test replaces with a program that
    // fails, as a package upgrade replaces the file before SIGUSR2.
    let dir = udpshard_tests::harness::TempDir::new("replaced-binary");
    let exe = dir.path().join("udpshard");
    udpshard_tests::harness::install_executable(Path::new(BIN), &exe);
    let proxy = Proxy::start(&exe, &config("2", &[a.addr]));
    let stats = || udpshard_tests::harness::stats_json(Path::new(BIN), &proxy.stats_file);
    let victim = field_of(&stats()["workers"][0], "pid");
    let script = dir.path().join("broken.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 1\n").unwrap();
    udpshard_tests::harness::install_executable(&script, &exe);
    // SAFETY: kill(2) on the proxy's own worker.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    // (The stats through the test's binary: the proxy's path holds a broken one.)
    wait_until(WAIT, "worker 0 restarted", || {
        let s = stats();
        field_of(&s["workers"][0], "pid") != victim && s["workers"][0]["state"] == "ready"
    });
    let s = stats();
    assert_eq!(field_of(&s["workers"][0], "restarts"), 1, "{s:#}");
    let pid = field_of(&s["workers"][0], "pid");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(
        comm.trim(),
        "udpshard",
        "the worker is named for what it is"
    );
    // Both workers serve, from the image the supervisor runs.
    let client = bind_udp("127.0.0.1:0");
    for port_client in 0..20u64 {
        let c = bind_udp("127.0.0.1:0");
        c.send_to(&quic_short(port_client, b"x"), proxy.addr("quic"))
            .unwrap();
    }
    send_cids(&proxy, &client, 100..110, b"y");
    wait_until(WAIT, "every datagram forwarded", || a.count() == 30);
    assert_eq!(total(&stats(), "tx_packets"), 30, "{:#}", stats());
}

/// The stats file cut short under the running proxy (`: > stats`, as an
/// operator might) kills nothing: each process puts its length back at
/// its first access past the cut, the supervisor says so and writes its
/// words back, the workers publish theirs again, and traffic goes on. Read
/// while cut, `udpshard stats` names the damage.
#[test]
fn a_stats_file_cut_short_under_the_running_proxy_is_repaired_and_kills_nothing() {
    let a = Backend::start("a");
    let mut proxy = Proxy::start(Path::new(BIN), &config("2", &[a.addr]));
    let client = bind_udp("127.0.0.1:0");
    send_cids(&proxy, &client, 1..101, b"before");
    wait_until(WAIT, "100 datagrams at the backend", || a.count() == 100);
    let pids = worker_pids(&proxy);
    let stats_file = proxy.stats_file.clone();
    let cut = |len: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&stats_file)
            .unwrap()
            .set_len(len)
            .unwrap();
    };

    // Whole, then past the header (512 bytes) and the first slot.
    for (round, len) in [(1u64, 0u64), (2, 1024)] {
        cut(len);
        let from = round * 1000;
        send_cids(&proxy, &client, from..from + 100, b"after");
        wait_until(WAIT, "100 more datagrams at the backend", || {
            a.count() == 100 * (round as usize + 1)
        });
        // Repaired by whichever process touched the cut first (two at
        // once count two), and rewritten by the supervisor, which says so.
        wait_until(WAIT, "the supervisor's repair", || {
            proxy
                .log()
                .matches("was cut short under the running proxy")
                .count()
                >= round as usize
        });
        let stats = proxy.wait_stats(WAIT, "every forward counted again", |s| {
            total(s, "tx_packets") == 100 * (round + 1)
                && s["stats_repairs"].as_u64().is_some_and(|r| r >= round)
        });
        assert_eq!(worker_pids(&proxy), pids, "a worker died: {stats:#}");
        assert_eq!(total(&stats, "restarts"), 0, "{stats:#}");
        for w in stats["workers"].as_array().unwrap() {
            assert_eq!(w["state"], "ready", "{stats:#}");
        }
    }
    assert!(
        proxy
            .log()
            .contains("was cut short under the running proxy"),
        "{}",
        proxy.log()
    );

    // Stopped, and cut again: the reader says so, and reads nothing else.
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_exit(WAIT).is_some_and(|s| s.success()));
    cut(100);
    let (code, _, stderr) = udpshard_tests::harness::run_cli(
        Path::new(BIN),
        [
            "stats".as_ref(),
            "--stats-file".as_ref(),
            stats_file.as_os_str(),
        ],
    );
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("stats file is truncated: 100 bytes"),
        "{stderr}"
    );
}
