//! End to end: the command line a user types.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use udpshard_tests::harness::{self, total, Backend, Proxy, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");

fn check_config(text: &str) -> (Option<i32>, String, String) {
    harness::check_config(Path::new(BIN), text)
}

#[test]
fn check_config_accepts_a_valid_file() {
    let (code, stdout, _) = check_config(
        "[[listener]]\nname = \"q\"\nbind = \"0.0.0.0:443\"\ndissector = \"quic\"\nbackends = [\"10.0.0.1:443\", { addr = \"10.0.0.2:443\", weight = 2 }]\n",
    );
    assert_eq!(code, Some(0));
    assert!(stdout.contains("ok"), "{stdout}");
}

#[test]
fn check_config_names_file_line_col_and_exits_1() {
    let (code, _, stderr) = check_config(
        "workers = 2\n\n[[listener]]\nname = \"q\"\nbind = \"0.0.0.0:443\"\ndissector = \"quic\"\nrecv_bufer = \"4MiB\"\nbackends = [\"10.0.0.1:443\"]\n",
    );
    assert_eq!(code, Some(1));
    assert!(stderr.starts_with("FILE:7:1: "), "{stderr}");
    assert!(stderr.contains("recv_bufer"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one message: {stderr}");

    let (code, _, stderr) = check_config(
        "[[listener]]\nname = \"q\"\nbind = \"0.0.0.0:443\"\ndissector = \"quic\"\nshort_cid_len = 21\nbackends = [\"10.0.0.1:443\"]\n",
    );
    assert_eq!(code, Some(1));
    assert!(stderr.starts_with("FILE:5:17: "), "{stderr}");
}

#[test]
fn a_user_the_host_lacks_fails_check_config_and_the_start_before_anything_is_bound() {
    let text = "user = \"udpshard-no-such-user\"\n[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:0\"\ndissector = \"tuple\"\nbackends = [\"127.0.0.1:9\"]\n";
    let (code, _, stderr) = check_config(text);
    assert_eq!(code, Some(1));
    assert!(stderr.starts_with("FILE:1:8: "), "{stderr}");
    assert!(
        stderr.contains("user = \"udpshard-no-such-user\": no such user on this host"),
        "{stderr}"
    );

    let dir = TempDir::new("nouser");
    let file = dir.path().join("u.toml");
    let stats = dir.path().join("stats");
    std::fs::write(
        &file,
        format!("stats_file = \"{}\"\n{text}", stats.display()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no such user on this host"), "{stderr}");
    assert!(!stderr.contains("bound to"), "{stderr}");
    assert!(!stats.exists(), "the start created its stats file");
}

#[test]
fn check_config_of_a_missing_file_fails_clearly() {
    let out = Command::new(BIN)
        .args(["check-config", "/nonexistent/udpshard.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/udpshard.toml: cannot read"),
        "{stderr}"
    );
}

#[test]
fn run_refuses_a_bad_config_with_its_position() {
    let dir = TempDir::new("badrun");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "workers = 0\n").unwrap();
    let out = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:1:11", file.display())),
        "{stderr}"
    );
}

#[test]
fn a_clamped_receive_buffer_is_reported_with_the_sysctl_that_fixes_it() {
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let want = (rmem_max * 2).clamp(8192, 1 << 30);
    assert!(
        want > rmem_max,
        "rmem_max {rmem_max} is already at the config's ceiling"
    );
    let a = Backend::start("a");
    let proxy = Proxy::start(
        Path::new(BIN),
        &format!(
            "stats_file = \"{{stats_file}}\"\n[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:0\"\ndissector = \"quic\"\nrecv_buffer = {want}\nbackends = [\"{}\"]\n",
            a.addr
        ),
    );
    let log = proxy.log();
    assert!(
        log.contains(&format!("sysctl -w net.core.rmem_max={want}")),
        "{log}"
    );
    assert!(
        log.contains(&format!("receive buffer {rmem_max} bytes")),
        "{log}"
    );
}

#[test]
fn stats_prints_a_table_and_json() {
    let a = Backend::start("a");
    let proxy = Proxy::start(
        Path::new(BIN),
        &format!(
            "workers = 2\nstats_file = \"{{stats_file}}\"\n[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:0\"\ndissector = \"quic\"\nbackends = [\"{}\"]\n",
            a.addr
        ),
    );
    let out = Command::new(BIN)
        .args(["stats", "--stats-file"])
        .arg(&proxy.stats_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("state") && table.contains("drops") && table.contains("busy(rho):"),
        "{table}"
    );
    assert!(
        table.lines().all(|l| l.len() <= 100),
        "the default table fits a terminal:\n{table}"
    );
    let wide = Command::new(BIN)
        .args(["stats", "--wide", "--stats-file"])
        .arg(&proxy.stats_file)
        .output()
        .unwrap();
    let wide = String::from_utf8_lossy(&wide.stdout);
    assert!(
        wide.contains(" malformed ") && wide.contains("  upstream_socket replies dropped"),
        "--wide has every counter and its legend:\n{wide}"
    );
    assert_eq!(
        table.lines().filter(|l| l.contains(" ready ")).count(),
        2,
        "{table}"
    );

    let json = proxy.stats();
    let w = &json["workers"][0];
    for key in [
        "id",
        "pid",
        "cpu",
        "rx_packets",
        "tx_packets",
        "sessions_active",
        "handoff_in",
        "handoff_out",
    ] {
        assert!(w[key].is_u64(), "{key} missing: {w}");
    }
    for key in [
        "socket",
        "malformed",
        "session_limit",
        "no_backend",
        "upstream",
        "handoff",
    ] {
        assert!(w["drops"][key].is_u64(), "drops.{key} missing: {w}");
    }
    assert_eq!(total(&json, "rx_packets"), 0);
    // The loop runs (a tick every 100 ms) and reports its longest iteration
    // once a second. Utilisation is busy time over wall time since start: a
    // few ticks in, an idle worker's is near zero.
    let json = proxy.wait_stats(Duration::from_secs(5), "a loop-latency sample", |s| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["loops"].as_u64() >= Some(5) && w["loop_max_us"].is_u64())
    });
    assert!(
        json["workers"][0]["busy_ratio"].as_f64().unwrap() < 0.5,
        "idle workers are mostly idle: {json:#}"
    );
}

#[test]
fn stats_of_a_missing_file_fails_clearly() {
    let out = Command::new(BIN)
        .args(["stats", "--stats-file", "/nonexistent/stats"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/stats"));
}

/// `udpshard run` with no --config serves the embedded default, says so,
/// and `udpshard stats` with no --stats-file finds it. Needs the default
/// port (4433) and the default stats path (/run/udpshard), as a packaged
/// install would have.
#[test]
fn run_without_config_uses_the_embedded_default() {
    let dir = TempDir::new("default");
    let mut cmd = Command::new(BIN);
    cmd.arg("run");
    let proxy = Proxy::spawn(
        cmd,
        Path::new(BIN),
        dir,
        "<embedded default>".into(),
        "/run/udpshard/stats".into(),
    );
    let log = proxy.log();
    assert!(log.contains("embedded default"), "{log}");
    assert_eq!(proxy.addr("quic").to_string(), "127.0.0.1:4433");
    // A first run warns of nothing the host does not lack.
    match harness::host_lacks_for_a_first_run() {
        None => assert!(
            !log.lines().any(|l| l.contains(" WARN ")),
            "a warning on a first run:\n{log}"
        ),
        Some(why) => eprintln!("not checking for warnings: {why}"),
    }
    let out = Command::new(BIN)
        .args(["stats", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["supervisor_pid"].as_u64(),
        Some(u64::from(proxy.pid()))
    );
}

/// `udpshard worker` with these descriptor flags: (exit code, stderr).
fn worker_cli(fds: &[&str]) -> (Option<i32>, String) {
    let (code, _, stderr) =
        harness::run_cli(Path::new(BIN), ["worker", "--id", "0"].iter().chain(fds));
    (code, stderr)
}

#[test]
fn a_worker_command_line_naming_a_descriptor_twice_is_refused_before_any_is_taken() {
    let (code, stderr) = worker_cli(&[
        "--control-fd",
        "5",
        "--stats-fd",
        "6",
        "--state-fd",
        "7",
        "--listener-fds",
        "8,9",
        "--handoff-fd",
        "10",
        "--peer-fds",
        "10,11",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("descriptor 10 is named twice on the command line: as handoff inbox and as handoff peer"),
        "{stderr}"
    );
    let (code, stderr) = worker_cli(&[
        "--control-fd",
        "1",
        "--stats-fd",
        "6",
        "--state-fd",
        "7",
        "--listener-fds",
        "8",
        "--handoff-fd",
        "10",
        "--peer-fds",
        "11",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("control (fd 1)"), "{stderr}");
}

/// `udpshard route` for `cid` under `config`: (exit code, stdout, stderr).
fn route(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let head = [
        std::ffi::OsStr::new("route"),
        "--config".as_ref(),
        config.as_os_str(),
    ];
    harness::run_cli(
        Path::new(BIN),
        head.into_iter().chain(args.iter().map(|a| a.as_ref())),
    )
}

#[test]
fn route_names_the_backend_a_running_proxy_sends_each_cid_to() {
    let backends = [
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let config = harness::listener_config(
        "workers = 2",
        "dissector = \"quic\"\nshort_cid_len = 8",
        &addrs,
    );
    let proxy = Proxy::start(Path::new(BIN), &config);
    let client = harness::bind_udp("127.0.0.1:0");
    for cid in 0..40u64 {
        let cid = cid.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        client
            .send_to(&harness::quic_short(cid, b"r"), proxy.addr("quic"))
            .unwrap();
    }
    harness::wait_until(Duration::from_secs(15), "40 forwards", || {
        backends.iter().map(Backend::count).sum::<usize>() == 40
    });
    let mut used = std::collections::HashSet::new();
    for b in &backends {
        for seen in b.seen() {
            let cid = &seen.payload[1..9];
            let hex: String = cid.iter().map(|x| format!("{x:02x}")).collect();
            let (code, stdout, stderr) = route(&proxy.config_path, &[&hex]);
            assert_eq!(code, Some(0), "{stderr}");
            assert!(
                stdout.starts_with(&format!("quic: {hex} -> backend "))
                    && stdout.contains(&b.addr.to_string()),
                "CID {hex} went to {} but route says:\n{stdout}",
                b.addr
            );
            assert!(stdout.contains("Maglev: key hash"), "{stdout}");
            used.insert(b.name.clone());
        }
    }
    assert_eq!(used.len(), 3, "the CIDs spread over every backend");
    // Bad input: a clear error, exit 2.
    for (bad, says) in [
        ("0x12zz", "'z' is not a hex digit"),
        ("abc", "odd number"),
        (&"ab".repeat(21), "21 bytes"),
    ] {
        let (code, _, stderr) = route(&proxy.config_path, &[bad]);
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert!(stderr.contains(says), "{bad}: {stderr}");
    }
    let (code, _, stderr) = route(&proxy.config_path, &["--listener", "nope", "00"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("no listener \"nope\"") && stderr.contains("quic"),
        "{stderr}"
    );
}

#[test]
fn version_names_the_commit_the_features_and_the_target() {
    let (code, stdout, _) = harness::run_cli(Path::new(BIN), ["--version"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        format!("udpshard {}", env!("CARGO_PKG_VERSION")),
        "{stdout}"
    );
    let commit = lines[1].strip_prefix("commit: ").expect("a commit line");
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{stdout}"
    );
    assert!(
        lines.contains(&"features: json-log"),
        "the default features: {stdout}"
    );
    assert!(
        lines[3].starts_with("target: ") && lines[3].contains("linux"),
        "{stdout}"
    );
    let (code, short, _) = harness::run_cli(Path::new(BIN), ["-V"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        short.trim(),
        format!("udpshard {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn log_format_json_writes_one_object_per_line_from_the_supervisor_and_its_workers() {
    let a = Backend::start("a");
    let (dir, config_path, stats_file) = harness::write_config(&format!(
        "workers = 2\nstats_file = \"{{stats_file}}\"\n[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:0\"\ndissector = \"quic\"\nbackends = [\"{}\"]\n",
        a.addr
    ));
    let mut cmd = Command::new(BIN);
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(&config_path);
    let mut proxy = Proxy::spawn(cmd, Path::new(BIN), dir, config_path, stats_file);
    let client = harness::bind_udp("127.0.0.1:0");
    client
        .send_to(&harness::quic_short(0x4a50_0001, b"json"), proxy.addr("q"))
        .unwrap();
    harness::wait_until(Duration::from_secs(5), "the backend's datagram", || {
        a.count() == 1
    });
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success());
    assert!(proxy.wait_log_closed(Duration::from_secs(10)));
    let log = proxy.log();
    let mut messages = Vec::new();
    let mut exits = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{log}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        let message = v["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {line}"));
        // Logged by each worker process itself as it leaves: the one with
        // the session waits out the drain, the other has none.
        if message.starts_with("drain") {
            exits.push(v.clone());
        }
        messages.push(message.to_string());
    }
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("ready: 2 workers serving q@")),
        "{log}"
    );
    assert_eq!(exits.len(), 2, "each worker logs its exit in JSON:\n{log}");
    assert!(exits.iter().all(|v| v["worker"].is_u64()), "{log}");
    let timed_out: Vec<_> = exits
        .iter()
        .filter(|v| v["message"] == "drain timeout reached; exiting")
        .collect();
    assert_eq!(timed_out.len(), 1, "{log}");
    assert_eq!(timed_out[0]["sessions"], 1, "fields stay typed: {log}");
}
