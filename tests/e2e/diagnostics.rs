//! End to end: every datagram is accounted for, and the diagnostics
//! (`stats --watch`, the Prometheus endpoint, `doctor`) show it.
//!
//! The invariant tests freeze the worker (SIGSTOP) so its socket buffer
//! overflows, then check that what was sent equals what the worker read plus
//! what the kernel dropped, and that udpshard's drop counter equals the
//! kernel's own /proc/net/udp drops column for that socket.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use udpshard_tests::harness::{
    bind_udp, field_of, free_tcp_port, http_get, http_get_with, installed, total, wait_until,
    Backend, Proxy, TempDir,
};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
const WAIT: Duration = Duration::from_secs(15);
/// Far more than a 64KiB buffer holds (~100 small datagrams).
const FLOOD: u64 = 5000;

fn config(backend: SocketAddr, extra: &str, listener_extra: &str) -> String {
    format!(
        r#"
workers = 1
stats_file = "{{stats_file}}"
{extra}

[[listener]]
name = "l"
bind = "127.0.0.1:0"
dissector = "tuple"
{listener_extra}
backends = ["{backend}"]
"#
    )
}

/// Stops a process; resumes it when dropped, so a failing assertion never
/// leaves a frozen worker behind.
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        // SAFETY: kill(2) on the proxy's worker, a process this test started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        // SIGSTOP is delivered asynchronously: wait until the state says so.
        wait_for(Duration::from_secs(5), "the worker to stop", || {
            proc_state(pid) == Some('T')
        });
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The kernel's drops column of /proc/net/udp, summed over the sockets
/// bound to 127.0.0.1:`port`.
/// The kernel's drop count on the IPv4 socket bound to `port` (on
/// 127.0.0.1, or on the wildcard, as upstream sockets are).
fn kernel_drops(port: u16) -> u64 {
    let text = std::fs::read_to_string("/proc/net/udp").expect("read /proc/net/udp");
    let locals = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(1)
                .is_some_and(|c| locals.iter().any(|l| l == c))
                .then(|| cols.last().and_then(|d| d.parse::<u64>().ok()))
                .flatten()
        })
        .sum()
}

/// Dropped column of /proc/net/softnet_stat, summed over CPUs.
fn softnet_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|c| u64::from_str_radix(c, 16).ok())
        .sum()
}

fn worker_pid(proxy: &Proxy) -> u32 {
    let stats = proxy.wait_stats(WAIT, "a worker pid", |s| total(s, "pid") > 0);
    field_of(&stats["workers"][0], "pid") as u32
}

#[test]
fn listener_drops_account_for_every_datagram() {
    let backend = Backend::start("b");
    let proxy = Proxy::start(
        Path::new(BIN),
        &config(backend.addr, "", "recv_buffer = \"64KiB\""),
    );
    let addr = proxy.addr("l");
    let pid = worker_pid(&proxy);
    let client = bind_udp("127.0.0.1:0");
    let softnet_before = softnet_drops();
    let payload = [0x5au8; 200];
    {
        let _frozen = Frozen::new(pid);
        for _ in 0..FLOOD {
            client.send_to(&payload, addr).expect("send");
        }
        assert!(
            kernel_drops(addr.port()) > 0,
            "the frozen worker's 64KiB buffer did not overflow"
        );
    }
    let stats = proxy.wait_stats(WAIT, "rx_packets + drops.socket == sent", |s| {
        total(s, "rx_packets") + total(s, "drops.socket") + softnet_drops() - softnet_before
            >= FLOOD
    });
    let rx = total(&stats, "rx_packets");
    let socket = total(&stats, "drops.socket");
    let softnet = softnet_drops() - softnet_before;
    println!("sent {FLOOD}: rx_packets {rx}, drops.socket {socket}, softnet drops {softnet}");
    assert_eq!(FLOOD, rx + socket + softnet, "{stats:#}");
    assert!(socket > 0);
    assert_eq!(
        socket,
        kernel_drops(addr.port()),
        "drops.socket vs /proc/net/udp"
    );
}

/// A session whose upstream socket overflowed while the worker was frozen.
struct RepliesFlooded {
    proxy: Proxy,
    _backend: UdpSocket,
    upstream: SocketAddr,
}

fn flood_replies() -> RepliesFlooded {
    // A backend that answers nothing on its own: the test floods replies.
    let backend = bind_udp("127.0.0.1:0");
    backend
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let proxy = Proxy::start(
        Path::new(BIN),
        &config(backend.local_addr().unwrap(), "", ""),
    );
    let pid = worker_pid(&proxy);
    let client = bind_udp("127.0.0.1:0");
    client.send_to(b"hello", proxy.addr("l")).unwrap();
    let mut buf = [0u8; 64];
    let (_, upstream) = backend
        .recv_from(&mut buf)
        .expect("the session's first datagram");
    let replies = [0xa5u8; 200];
    let _frozen = Frozen::new(pid);
    for _ in 0..FLOOD {
        backend.send_to(&replies, upstream).expect("send reply");
    }
    assert!(
        kernel_drops(upstream.port()) > 0,
        "the upstream socket's default buffer did not overflow; raise FLOOD"
    );
    RepliesFlooded {
        proxy,
        _backend: backend,
        upstream,
    }
}

/// The return-path invariant. Ignored because of a worker defect it found:
/// `Datapath::upstream_readable` reads at most REPLY_BUDGET (64) replies per
/// edge-triggered event and does not come back for the rest. After an
/// overflow the socket stays full (most likely because UDP returns receive memory
/// to the socket only after a quarter of its buffer is read), so later replies are
/// dropped without a wakeup and the session never reads again (measured, even with
/// the backend sending more: replies_in stuck at 64, drops.upstream_socket 0).
/// Run with `--ignored` once the worker drains until WouldBlock or
/// reschedules.
#[test]
fn upstream_socket_drops_account_for_every_reply() {
    let RepliesFlooded {
        proxy, upstream, ..
    } = flood_replies();
    let stats = proxy.wait_stats(WAIT, "replies_in + drops.upstream_socket == sent", |s| {
        total(s, "replies_in") + total(s, "drops.upstream_socket") >= FLOOD
    });
    let (replies_in, dropped) = (
        total(&stats, "replies_in"),
        total(&stats, "drops.upstream_socket"),
    );
    println!("backend sent {FLOOD}: replies_in {replies_in}, drops.upstream_socket {dropped}");
    assert_eq!(FLOOD, replies_in + dropped, "{stats:#}");
    assert_eq!(
        dropped,
        kernel_drops(upstream.port()),
        "drops.upstream_socket vs /proc/net/udp"
    );
}

/// `udpshard doctor --config file`, run to the end.
fn doctor(file: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["doctor", "--config"])
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn doctor_prints_the_rmem_max_fix() {
    let rmem_max: u64 = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .expect("read rmem_max")
        .trim()
        .parse()
        .expect("rmem_max is a number");
    let kib = rmem_max / 1024 + 64;
    if kib > 1 << 20 {
        println!("rmem_max {rmem_max} is at recv_buffer's own limit (1GiB); nothing to test");
        return;
    }
    let dir = udpshard_tests::harness::TempDir::new("doctor");
    let file = dir.path().join("udpshard.toml");
    std::fs::write(
        &file,
        config(
            "127.0.0.1:9".parse().unwrap(),
            "stats_file = \"/tmp/unused\"",
            &format!("recv_buffer = \"{kib}KiB\""),
        )
        .replace("stats_file = \"{stats_file}\"\n", ""),
    )
    .unwrap();
    let out = doctor(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fix = format!("sysctl -w net.core.rmem_max={}", kib * 1024);
    assert!(
        stdout.lines().any(|l| l.trim() == format!("fix: {fix}")),
        "{stdout}"
    );

    let out = doctor(Path::new("/nonexistent/udpshard.toml"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/udpshard.toml"));
}

/// A port of `upstream_ports` that another program holds is named, with the
/// program, by `doctor`.
#[test]
fn doctor_names_the_programs_that_hold_upstream_ports() {
    let squatter = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let dir = udpshard_tests::harness::TempDir::new("doctor-ports");
    let file = dir.path().join("udpshard.toml");
    std::fs::write(
        &file,
        config(
            "127.0.0.1:9".parse().unwrap(),
            "",
            &format!("upstream_ports = \"{port}-{port}\"\nmax_sessions = 1"),
        )
        .replace("stats_file = \"{stats_file}\"\n", ""),
    )
    .unwrap();
    let out = doctor(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let named = format!("127.0.0.1:{port} (pid {} ", std::process::id());
    assert!(
        stdout.lines().any(|l| l.contains(&format!(
            "listener \"l\": 1 port(s) of upstream_ports {port}-{port} are held by other programs"
        )) && l.contains(&named)),
        "{stdout}"
    );
    drop(squatter);
    let out = doctor(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("held by other programs"), "{stdout}");
}

/// The queries of packaging/grafana/udpshard.json: its panels' `expr`
/// fields.
fn dashboard_exprs() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/grafana/udpshard.json"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .expect("the dashboard is JSON");
    fn exprs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "query", Value::String(e)) => out.push(e.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    exprs(&json, &mut found);
    found
}

/// The metric names packaging/grafana/udpshard.json queries.
fn dashboard_metrics() -> Vec<String> {
    let mut names: Vec<String> = dashboard_exprs()
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("udpshard_"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_endpoint_serves_live_counters() {
    let backend = Backend::start("b");
    let port = free_tcp_port();
    let proxy = Proxy::start(
        Path::new(BIN),
        &config(backend.addr, &format!("metrics = \"127.0.0.1:{port}\""), ""),
    );
    let endpoint = format!("127.0.0.1:{port}");
    // What Prometheus asks for: OpenMetrics.
    let first = http_get_with(
        &endpoint,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4\r\n",
    );
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    assert!(first.contains("Content-Type: application/openmetrics-text; version=1.0.0"));
    assert!(first.contains("# TYPE udpshard_rx_packets counter"));
    assert!(first.ends_with("# EOF\n"), "{first}");
    // Anyone else (curl): the classic text format, the same samples.
    let classic = http_get(&endpoint, "/metrics");
    assert!(classic.contains("Content-Type: text/plain; version=0.0.4"));
    assert!(classic.contains("# TYPE udpshard_rx_packets_total counter"));
    assert!(!classic.contains("# EOF"));
    assert!(first.contains("udpshard_drops_total{worker=\"0\",reason=\"socket\"} 0"));
    assert!(first.contains("# TYPE udpshard_worker_busy_ratio gauge"));
    assert!(first.contains("udpshard_reload_failures_total 0"));
    let rx = "udpshard_rx_packets_total{worker=\"0\"}";
    let before = metric(&first, rx).expect("rx_packets for worker 0");

    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..10u8 {
        client.send_to(&[i; 32], proxy.addr("l")).unwrap();
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let now = metric(&http_get(&endpoint, "/metrics"), rx).unwrap_or(0.0);
        if now >= before + 10.0 {
            break;
        }
        assert!(Instant::now() < deadline, "rx_packets stayed at {now}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Per backend, labelled by listener and address as configured.
    let tx = format!(
        "udpshard_backend_tx_packets_total{{listener=\"l\",backend=\"{}\"}}",
        backend.addr
    );
    wait_until(WAIT, "the backend's counts in the metrics", || {
        metric(&http_get(&endpoint, "/metrics"), &tx) == Some(backend.count() as f64)
            && backend.count() == 10
    });
    let text = http_get(&endpoint, "/metrics");
    let up = format!(
        "udpshard_backend_up{{listener=\"l\",backend=\"{}\"}}",
        backend.addr
    );
    assert_eq!(metric(&text, &up), Some(1.0), "{text}");
    // Every series the packaged Grafana dashboard queries is served.
    let dashboard = dashboard_metrics();
    assert!(dashboard.len() >= 20, "{dashboard:?}");
    let mut missing = Vec::new();
    wait_until(WAIT, "every dashboard metric in the exposition", || {
        let text = http_get(&endpoint, "/metrics");
        missing = dashboard
            .iter()
            .filter(|name| {
                // A histogram's own name is its native form's (protobuf).
                let histogram = format!("# TYPE {name} histogram");
                !text.lines().any(|l| {
                    l == histogram
                        || l.strip_prefix(name.as_str())
                            .is_some_and(|r| r.starts_with(['{', ' ']))
                })
            })
            .cloned()
            .collect();
        missing.is_empty()
    });
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which are not served"
    );
    assert!(http_get(&endpoint, "/").starts_with("HTTP/1.1 404 "));
    // A client that connects and says nothing does not block the supervisor.
    let _idle = TcpStream::connect(&endpoint).unwrap();
    assert!(http_get(&endpoint, "/metrics").starts_with("HTTP/1.1 200 OK"));
}

#[test]
fn stats_watch_prints_samples_and_json_has_system() {
    let backend = Backend::start("b");
    let proxy = Proxy::start(Path::new(BIN), &config(backend.addr, "", ""));
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["stats", "--watch", "1", "--count", "2", "--stats-file"])
        .arg(&proxy.stats_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(stdout.matches("--- sample ").count(), 2, "{stdout}");
    assert!(stdout.contains("rates per second"), "{stdout}");
    assert!(stdout.contains("drops by stage, in path order"), "{stdout}");
    for stage in [
        "listener sockets",
        "handoff",
        "sessions/backends",
        "upstream sockets",
    ] {
        assert!(stdout.contains(stage), "{stage} missing:\n{stdout}");
    }

    let stats: Value = proxy.stats();
    assert!(stats["system"].is_object(), "{stats:#}");
    assert!(stats["workers"][0]["drops"]["socket"].is_u64());
    // Its owner and the udpshard group read it; nobody else.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&proxy.stats_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640, "{mode:o}");
}

/// `udpshard --log-format json run` on `text`: the proxy, and its log's
/// session events (`event` open, close or moved) as JSON objects.
fn json_proxy(text: &str) -> Proxy {
    let (dir, config_path, stats_file) = udpshard_tests::harness::write_config(text);
    let mut cmd = Command::new(BIN);
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(&config_path);
    Proxy::spawn(cmd, Path::new(BIN), dir, config_path, stats_file)
}

fn session_events(proxy: &Proxy) -> Vec<Value> {
    proxy
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["event"].is_string()
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("session "))
        })
        .collect()
}

/// `session_log = 1`: every session's opening and closing, each a JSON
/// object with its key, client, backend and what went each way.
#[test]
fn session_log_1_logs_every_session_opening_and_closing_with_its_counts() {
    let a = Backend::start("a");
    let proxy = json_proxy(&config(
        a.addr,
        "",
        "session_idle = \"1s\"\nsession_log = 1",
    ));
    let target = proxy.addr("l");
    let clients: Vec<UdpSocket> = (0..5).map(|_| bind_udp("127.0.0.1:0")).collect();
    let mut buf = [0u8; 256];
    for c in &clients {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..3 {
            c.send_to(format!("query {i}").as_bytes(), target).unwrap();
            let (n, _) = c.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], format!("a:query {i}").as_bytes());
        }
    }
    // Idle past session_idle, each closes.
    wait_until(WAIT, "five sessions closed", || {
        session_events(&proxy)
            .iter()
            .filter(|e| e["event"] == "close")
            .count()
            == 5
    });
    let events = session_events(&proxy);
    for c in &clients {
        let client = c.local_addr().unwrap().to_string();
        let open: Vec<&Value> = events
            .iter()
            .filter(|e| e["event"] == "open" && e["client"] == client.as_str())
            .collect();
        assert_eq!(open.len(), 1, "{events:#?}");
        assert_eq!(open[0]["backend"], a.addr.to_string().as_str());
        assert_eq!(open[0]["listener"], "l");
        let key = open[0]["key"].as_str().unwrap();
        let close: Vec<&Value> = events
            .iter()
            .filter(|e| e["event"] == "close" && e["key"] == key)
            .collect();
        assert_eq!(close.len(), 1, "{events:#?}");
        let close = close[0];
        assert_eq!(close["clients"], client.as_str());
        assert_eq!(close["forwarded"], 3);
        assert_eq!(close["forwarded_bytes"], 3 * 7);
        assert_eq!(close["replied"], 3);
        assert_eq!(close["replied_bytes"], 3 * 9);
        assert_eq!(close["drops"], 0);
        assert_eq!(close["paths"], 1);
        assert!(close["duration_ms"].as_u64().unwrap() >= 1000, "{close}");
    }
}

/// `session_log = 4` logs about a quarter of the sessions, chosen by their
/// key alone: two proxies with the same config log the same ones.
#[test]
fn session_log_4_samples_a_quarter_and_two_proxies_sample_the_same_sessions() {
    let a = Backend::start("a");
    let text = config(a.addr, "", "dissector = \"quic\"\nsession_log = 4")
        .replace("dissector = \"tuple\"\n", "");
    let proxies = [json_proxy(&text), json_proxy(&text)];
    let client = bind_udp("127.0.0.1:0");
    // In bursts of 50, each once the one before has arrived: no buffer on
    // the way overflows, whatever rmem_max.
    let mut sent = 0;
    for p in &proxies {
        for burst in (0..400u64).collect::<Vec<_>>().chunks(50) {
            for &cid in burst {
                client
                    .send_to(&udpshard_tests::harness::quic_short(cid, b"x"), p.addr("l"))
                    .unwrap();
            }
            sent += burst.len();
            wait_until(WAIT, "a burst at the backend", || a.count() == sent);
        }
    }
    let logged = |p: &Proxy| -> std::collections::BTreeSet<String> {
        session_events(p)
            .iter()
            .filter(|e| e["event"] == "open")
            .map(|e| e["key"].as_str().unwrap().to_string())
            .collect()
    };
    for p in &proxies {
        p.wait_stats(WAIT, "400 sessions", |s| {
            total(s, "sessions_created") == 400
        });
    }
    // The sample is the keys (here the 8-byte connection IDs) whose
    // stable_hash2 is 0 modulo 4.
    let expected: std::collections::BTreeSet<String> = (0..400u64)
        .map(|cid| cid.to_be_bytes())
        .filter(|k| udpshard_shared::hash::stable_hash2(k) % 4 == 0)
        .map(|k| k.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    wait_until(WAIT, "both proxies' session lines", || {
        proxies.iter().all(|p| logged(p) == expected)
    });
    let (first, second) = (logged(&proxies[0]), logged(&proxies[1]));
    // 400 draws of 1 in 4: 100 expected, 60..140 is beyond 4 standard
    // deviations (8.7) either way.
    assert!((60..=140).contains(&first.len()), "{} sampled", first.len());
    assert_eq!(first, second, "the two proxies sampled different sessions");
}

/// Worker 0's queue-delay quantile `q` ("p50_us", "p99_us") in `stats`.
fn delay_us(stats: &Value, q: &str) -> Option<f64> {
    stats["workers"][0]["queue_delay"][q].as_f64()
}

/// Sends `n` small datagrams to `to` in rounds of 100, each round read by
/// the worker (its rx count) before the next: no queue builds up.
fn send_paced(proxy: &Proxy, client: &UdpSocket, to: SocketAddr, n: u64) {
    let start = total(&proxy.stats(), "rx_packets");
    for round in 0..n.div_ceil(100) {
        let batch = (n - round * 100).min(100);
        for i in 0..batch {
            client.send_to(&i.to_le_bytes(), to).expect("send");
        }
        let want = start + round * 100 + batch;
        proxy.wait_stats(WAIT, "the worker to read the round", |s| {
            total(s, "rx_packets") >= want
        });
    }
}

#[test]
fn queue_delay_rises_while_a_worker_is_stopped_before_any_drop_and_falls_after() {
    let backend = Backend::start("b");
    let port = free_tcp_port();
    let proxy = Proxy::start(
        Path::new(BIN),
        &config(backend.addr, &format!("metrics = \"127.0.0.1:{port}\""), ""),
    );
    let endpoint = format!("127.0.0.1:{port}");
    let addr = proxy.addr("l");
    let pid = worker_pid(&proxy);
    let client = bind_udp("127.0.0.1:0");
    send_paced(&proxy, &client, addr, 300);
    let calm = proxy.stats();
    let calm_p99 = delay_us(&calm, "p99_us").expect("a p99 once datagrams were read");
    assert!(
        calm_p99 < 100_000.0,
        "{:#}",
        calm["workers"][0]["queue_delay"]
    );

    // Stopped, the worker reads nothing: what arrives waits in its socket
    // (100 datagrams: far below the buffer, so nothing is dropped).
    let frozen = Frozen::new(pid);
    for i in 0..100u64 {
        client.send_to(&i.to_le_bytes(), addr).expect("send");
    }
    let mut watch = Command::new(BIN)
        .args(["stats", "--watch", "0.3", "--count", "5", "--stats-file"])
        .arg(&proxy.stats_file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("stats --watch");
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(watch.stdout.take().expect("piped")));
    let mut out = String::new();
    // Sample 2's verdict is printed while the worker is still stopped: then
    // it resumes, and sample 3 sees the backlog read.
    let mut verdicts = 0;
    for line in lines.by_ref() {
        let line = line.expect("stats --watch output");
        out += &line;
        out += "\n";
        if line.starts_with("ok:") || line.starts_with("warning:") || line.starts_with("DROPPING") {
            verdicts += 1;
            if verdicts == 1 {
                break;
            }
        }
    }
    assert_eq!(kernel_drops(addr.port()), 0, "the socket dropped:\n{out}");
    drop(frozen);
    for line in lines {
        out += &line.expect("stats --watch output");
        out += "\n";
    }
    assert!(watch.wait().expect("stats --watch").success(), "{out}");
    println!("{out}");
    let samples: Vec<&str> = out.split("--- sample ").collect();
    assert_eq!(samples.len(), 6, "{out}");
    // A verdict names host-wide drops first (path order): other tests on
    // this host may overflow their sockets meanwhile.
    let stopped = verdict_of(samples[2]);
    assert!(
        stopped.starts_with("ok: no drops growing, p99 queue delay ")
            && stopped.contains(" since start, rho ")
            || host_wide_drops(&stopped),
        "stopped, the worker read nothing:\n{}",
        samples[2]
    );
    // The first window after the resume that saw the backlog read (the
    // worker may take a moment to be scheduled again).
    let resumed = samples[3..]
        .iter()
        .find(|s| s.contains("<- worker 0: queue delay growing, no drops yet: p99 "))
        .unwrap_or_else(|| panic!("the backlog's wait is marked:\n{out}"));
    let verdict = verdict_of(resumed);
    assert!(
        verdict.starts_with("warning: no drops yet, but queue delay is growing on worker 0: p99 ")
            || host_wide_drops(&verdict),
        "{resumed}"
    );

    // The rise, in the JSON and in Prometheus, with no drop counted.
    let stats = proxy.wait_stats(WAIT, "the backlog read", |s| {
        field_of(&s["workers"][0], "queue_delay.count") >= 400
    });
    let risen = delay_us(&stats, "p99_us").unwrap_or(f64::INFINITY);
    assert!(
        risen >= 125_000.0 && risen > calm_p99,
        "{:#}",
        stats["workers"][0]["queue_delay"]
    );
    assert_eq!(total(&stats, "drops.socket"), 0);
    let text = http_get(&endpoint, "/metrics");
    let count = metric(&text, "udpshard_queue_delay_seconds_count{worker=\"0\"}");
    let fast = metric(
        &text,
        "udpshard_queue_delay_seconds_bucket{le=\"0.125\",worker=\"0\"}",
    );
    let (Some(count), Some(fast)) = (count, fast) else {
        panic!("no queue-delay histogram for worker 0:\n{text}");
    };
    assert_eq!(count, 400.0, "{text}");
    assert!(
        count - fast >= 100.0,
        "the 100 that waited: {count} - {fast}"
    );
    assert_eq!(
        metric(
            &text,
            "udpshard_drops_total{worker=\"0\",reason=\"socket\"}"
        ),
        Some(0.0)
    );

    // Traffic the worker keeps up with brings the p99 back down.
    send_paced(&proxy, &client, addr, 20_000);
    let after = proxy.stats();
    let fallen = delay_us(&after, "p99_us").expect("a p99");
    assert!(
        fallen < 125_000.0,
        "100 slow of 20,400 are under 1%: {:#}",
        after["workers"][0]["queue_delay"]
    );
    assert_eq!(total(&after, "drops.socket"), 0);
}

/// Whether a verdict names drops at a host-wide stage (another program's).
fn host_wide_drops(verdict: &str) -> bool {
    ["NIC", "softnet", "UDP, other sockets"]
        .iter()
        .any(|stage| verdict.starts_with(&format!("DROPPING: {stage}")))
}

/// The verdict a table ends with, its wrapped lines joined.
fn verdict_of(table: &str) -> String {
    let lines: Vec<&str> = table.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| !l.starts_with("    "))
        .unwrap_or(0);
    lines[start..]
        .iter()
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `udpshard stats` until its verdict satisfies `want` (at most 10 times:
/// the host-wide stages come first in path order, and other tests that
/// overflow sockets on this host move them meanwhile); the last table.
fn stats_until(proxy: &Proxy, want: impl Fn(&str) -> bool) -> String {
    let mut table = String::new();
    for _ in 0..10 {
        table = stats_table(proxy);
        if want(&verdict_of(&table)) {
            break;
        }
    }
    table
}

/// `udpshard stats` on `proxy`'s file: its table, ending with the verdict.
fn stats_table(proxy: &Proxy) -> String {
    let out = Command::new(BIN)
        .arg("stats")
        .arg("--stats-file")
        .arg(&proxy.stats_file)
        .output()
        .expect("udpshard stats");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    stdout
}

#[test]
fn stats_ends_with_a_verdict_ok_or_the_first_growing_stage_and_its_fix() {
    let backend = Backend::start("b");
    let proxy = Proxy::start(
        Path::new(BIN),
        &config(backend.addr, "", "max_sessions = 1"),
    );
    let addr = proxy.addr("l");
    let client = bind_udp("127.0.0.1:0");
    send_paced(&proxy, &client, addr, 200);
    let healthy = stats_until(&proxy, |v| v.contains(": ok: "));
    assert!(
        healthy.lines().all(|l| l.len() <= 100),
        "the table and its verdict fit a terminal:\n{healthy}"
    );
    let verdict = verdict_of(&healthy);
    assert!(
        verdict.starts_with("over 0.5s: ok: no drops growing, p99 queue delay ")
            && verdict.contains(", rho 0."),
        "{healthy}"
    );

    // New flows past max_sessions, from fresh ports, while stats watches.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let s = bind_udp("127.0.0.1:0");
                s.send_to(b"new flow", addr).expect("send");
                sent += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            sent
        })
    };
    proxy.wait_stats(WAIT, "refused flows", |s| {
        total(s, "drops.session_limit") + total(s, "drops.rate_limited") > 0
    });
    let dropping = stats_until(&proxy, |v| v.contains(" sessions/backends drops growing"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(sender.join().expect("sender") > 0);
    assert!(dropping.lines().all(|l| l.len() <= 100), "{dropping}");
    let verdict = verdict_of(&dropping);
    assert!(
        verdict.starts_with("over 0.5s: DROPPING: sessions/backends drops growing, ")
            && verdict.contains("; fix: "),
        "{dropping}"
    );
    assert!(
        verdict.contains("mostly session_limit") && verdict.contains("raise max_sessions")
            || verdict.contains("mostly rate_limited") && verdict.contains("[listener.admission]"),
        "{verdict}"
    );
    println!("{healthy}\n{dropping}");
}

#[test]
fn queue_delay_off_stamps_nothing_and_a_reload_turns_it_on() {
    let backend = Backend::start("b");
    let proxy = Proxy::start(
        Path::new(BIN),
        &config(backend.addr, "", "queue_delay = \"off\""),
    );
    let addr = proxy.addr("l");
    let client = bind_udp("127.0.0.1:0");
    send_paced(&proxy, &client, addr, 200);
    let off = proxy.stats();
    assert_eq!(total(&off, "rx_packets"), 200);
    assert_eq!(
        off["workers"][0]["queue_delay"]["count"], 0,
        "no stamps, no delays: {:#}",
        off["workers"][0]["queue_delay"]
    );
    assert!(off["workers"][0]["queue_delay"]["p99_us"].is_null());

    // The same socket, kept across the reload, is stamped from then on.
    let text = std::fs::read_to_string(&proxy.config_path).expect("the config");
    let on = text.replace("queue_delay = \"off\"", "queue_delay = \"on\"");
    assert_ne!(on, text);
    std::fs::write(&proxy.config_path, on).expect("write the config");
    proxy.signal(libc::SIGHUP);
    proxy.wait_stats(WAIT, "the reload applied", |s| {
        s["config_generation"] == 2 && total(s, "config_generation") == 2
    });
    send_paced(&proxy, &client, addr, 200);
    let stats = proxy.wait_stats(WAIT, "the stamped datagrams counted", |s| {
        field_of(&s["workers"][0], "queue_delay.count") >= 200
    });
    assert_eq!(total(&stats, "rx_packets"), 400);
    assert_eq!(
        stats["workers"][0]["queue_delay"]["count"], 200,
        "{:#}",
        stats["workers"][0]["queue_delay"]
    );
}

/// Debian's Prometheus, scraping one target every second, with native
/// histograms on; stopped when dropped.
struct Prometheus {
    child: std::process::Child,
    web: String,
    _dir: TempDir,
}

impl Prometheus {
    fn start(bin: &Path, target: &str) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let conf = dir.path().join("prometheus.yml");
        std::fs::write(
            &conf,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: udpshard\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        let web = format!("127.0.0.1:{}", free_tcp_port());
        let child = Command::new(bin)
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .arg("--enable-feature=native-histograms")
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            web,
            _dir: dir,
        };
        wait_until(Duration::from_secs(30), "prometheus ready", || {
            TcpStream::connect(&p.web).is_ok() && p.get("/-/ready").starts_with("HTTP/1.1 200")
        });
        p
    }

    fn get(&self, path: &str) -> String {
        http_get_with(&self.web, path, "Connection: close\r\n")
    }

    /// An instant query's result vector.
    fn query(&self, promql: &str) -> Vec<Value> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let response = self.get(&format!("/api/v1/query?query={encoded}"));
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_the_queue_delay_as_a_native_histogram() {
    let Some(bin) = installed("/usr/bin/prometheus", "prometheus") else {
        return;
    };
    let backend = Backend::start("b");
    let port = free_tcp_port();
    let proxy = Proxy::start(
        Path::new(BIN),
        &config(backend.addr, &format!("metrics = \"127.0.0.1:{port}\""), ""),
    );
    let client = bind_udp("127.0.0.1:0");
    send_paced(&proxy, &client, proxy.addr("l"), 300);
    let prometheus = Prometheus::start(bin, &format!("127.0.0.1:{port}"));
    // Scraped in protobuf, the family is one native histogram per worker.
    let mut result = Vec::new();
    wait_until(WAIT * 2, "the queue delay in Prometheus", || {
        result = prometheus.query("udpshard_queue_delay_seconds{worker=\"0\"}");
        result
            .first()
            .is_some_and(|r| r["histogram"][1]["count"] == "300")
    });
    let h = &result[0]["histogram"][1];
    assert!(
        h["buckets"].as_array().is_some_and(|b| !b.is_empty()),
        "{h}"
    );
    assert!(
        result[0].get("value").is_none(),
        "a native histogram, not a float sample: {result:?}"
    );
    let p99 =
        prometheus.query("histogram_quantile(0.99, udpshard_queue_delay_seconds{worker=\"0\"})");
    let p99: f64 = p99
        .first()
        .and_then(|r| r["value"][1].as_str())
        .and_then(|v| v.parse().ok())
        .expect("a p99 from the native histogram");
    assert!(p99 > 0.0 && p99 < 0.1, "p99 {p99}");
    // The other families arrive in the same encoding.
    let rx = prometheus.query("udpshard_rx_packets_total{worker=\"0\"}");
    assert_eq!(
        rx.first().map(|r| r["value"][1].clone()),
        Some("300".into()),
        "{rx:?}"
    );
    let up = prometheus.query("udpshard_worker_ready");
    assert_eq!(up.len(), 1, "{up:?}");

    // The dashboard's p99 panel, as Grafana would send it, over traffic
    // that spans several scrapes.
    let panel = dashboard_exprs()
        .into_iter()
        .find(|e| e.starts_with("histogram_quantile(0.99, sum by (instance, worker) (rate(udpshard_queue_delay_seconds"))
        .expect("the dashboard's p99 queue-delay query");
    let promql = panel
        .replace("$instance", ".*")
        .replace("$__rate_interval", "30s");
    let deadline = Instant::now() + WAIT * 2;
    let mut series = Vec::new();
    while Instant::now() < deadline {
        send_paced(&proxy, &client, proxy.addr("l"), 100);
        series = prometheus.query(&promql);
        let value = series
            .first()
            .and_then(|r| r["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok());
        if value.is_some_and(|v| v > 0.0 && v < 0.1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(series.len(), 1, "{promql}: {series:?}");
    assert_eq!(series[0]["metric"]["worker"], "0", "{series:?}");
}
