//! End to end: what a newcomer meets in the first hour. Ctrl-C (SIGINT to
//! the whole process group) drains instead of killing the workers; a closed
//! log pipe or closed standard descriptors never take the proxy down;
//! `stats` piped into `head` ends quietly; `stats` of a proxy that is gone
//! says so; `check-config` finds an address that cannot be bound.

use std::net::UdpSocket;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use udpshard_tests::harness::{
    listener_config, quic_short, stats_json, total, wait_until, write_config, Backend, Proxy,
};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
const WAIT: Duration = Duration::from_secs(10);

fn client() -> UdpSocket {
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

/// Sends one datagram of `cid` and returns the reply.
fn round_trip(c: &UdpSocket, to: std::net::SocketAddr, cid: u64, body: &[u8]) -> Vec<u8> {
    c.send_to(&quic_short(cid, body), to).unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = c.recv_from(&mut buf).expect("a reply");
    buf[..n].to_vec()
}

#[test]
fn ctrl_c_to_the_process_group_drains_live_sessions_and_exits_zero() {
    let a = Backend::start("a");
    let text = listener_config(
        "workers = 2\ndrain_timeout = \"3s\"",
        "dissector = \"quic\"\nsession_idle = \"10s\"",
        &[a.addr],
    );
    let (dir, config_path, stats_file) = write_config(&text);
    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg("--config").arg(&config_path);
    // Its own process group, as a shell gives a foreground job.
    cmd.process_group(0);
    let mut proxy = Proxy::spawn(cmd, Path::new(BIN), dir, config_path, stats_file);
    let target = proxy.addr("quic");
    let c = client();
    assert_eq!(
        round_trip(&c, target, 77, b"before"),
        b"a:\x40\0\0\0\0\0\0\0\x4dbefore"
    );

    // What a terminal does on Ctrl-C: SIGINT to every process of the group.
    // SAFETY: killpg(2) on the group our own child leads.
    assert_eq!(unsafe { libc::killpg(proxy.pid() as i32, libc::SIGINT) }, 0);
    // A worker without live sessions is done draining at once.
    proxy.wait_stats(WAIT, "the workers draining", |s| {
        s["workers"].as_array().is_some_and(|ws| {
            ws.iter()
                .all(|w| w["state"] == "draining" || w["state"] == "exited")
                && ws.iter().any(|w| w["state"] == "draining")
        })
    });
    // The live session is still served during the drain.
    let reply = round_trip(&c, target, 77, b"during");
    assert!(reply.ends_with(b"during"), "{reply:?}");

    let status = proxy.wait_exit(WAIT).expect("exited after the drain");
    assert_eq!(status.code(), Some(0), "{}", proxy.log());
    let log = proxy.log();
    assert!(
        !log.contains("killed by SIGINT"),
        "a worker died of the signal:\n{log}"
    );
    assert!(log.contains("signal 2: draining 2 workers"), "{log}");
}

/// Polls `stats --json` until `workers` workers are ready (for a proxy whose
/// log cannot be read).
fn wait_ready_by_stats(stats_file: &Path, workers: usize) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        // The file exists a moment before it is a stats file: tolerate that.
        if let Some(s) = stats_json_ok(stats_file) {
            let ready = s["workers"]
                .as_array()
                .is_some_and(|ws| ws.len() == workers && ws.iter().all(|w| w["state"] == "ready"));
            if ready {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "not ready within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_closed_log_pipe_and_a_closed_stdout_do_not_stop_the_proxy() {
    let a = Backend::start("a");
    let port = free_port();
    let text = format!(
        "workers = 2\ndrain_timeout = \"300ms\"\nstats_file = \"{{stats_file}}\"\n[[listener]]\nname = \"quic\"\nbind = \"127.0.0.1:{port}\"\ndissector = \"quic\"\nbackends = [\"{}\"]\n",
        a.addr
    );
    let (_dir, config_path, stats_file) = write_config(&text);
    let mut child = Reaped(
        Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn udpshard"),
    );
    // The readers go away before the first line is read: every log line
    // from now on meets EPIPE.
    drop(child.0.stdout.take());
    drop(child.0.stderr.take());
    wait_ready_by_stats(&stats_file, 2);
    let target = format!("127.0.0.1:{port}").parse().unwrap();
    let c = client();
    for cid in 1..=20u64 {
        let reply = round_trip(&c, target, cid, b"x");
        assert!(reply.starts_with(b"a:"), "{reply:?}");
    }
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_child(&mut child);
    assert_eq!(status.code(), Some(0), "{status}");
    let s = stats_json_any(&stats_file);
    assert_eq!(total(&s, "tx_packets"), 20);
}

#[test]
fn started_with_its_standard_descriptors_closed_it_serves_and_stops_cleanly() {
    let a = Backend::start("a");
    let port = free_port();
    let text = format!(
        "workers = 1\ndrain_timeout = \"300ms\"\nstats_file = \"{{stats_file}}\"\n[[listener]]\nname = \"quic\"\nbind = \"127.0.0.1:{port}\"\ndissector = \"quic\"\nbackends = [\"{}\"]\n",
        a.addr
    );
    let (_dir, config_path, stats_file) = write_config(&text);
    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg("--config").arg(&config_path);
    // SAFETY: runs in the forked child before exec; close(2) is
    // async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            for fd in 0..=2 {
                libc::close(fd);
            }
            Ok(())
        });
    }
    let mut child = Reaped(cmd.spawn().expect("spawn udpshard"));
    wait_ready_by_stats(&stats_file, 1);
    let target = format!("127.0.0.1:{port}").parse().unwrap();
    let reply = round_trip(&client(), target, 5, b"y");
    assert!(reply.starts_with(b"a:"), "{reply:?}");
    // The stats file must still be a stats file: no log line landed in it.
    let s = stats_json(Path::new(BIN), &stats_file);
    assert_eq!(total(&s, "tx_packets"), 1);
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(wait_child(&mut child).code(), Some(0));
}

/// A child that is killed and reaped if the test fails before it ends it:
/// a failed assertion must not leave a proxy running on the host.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_child(child: &mut Reaped) -> std::process::ExitStatus {
    let child = &mut child.0;
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("still running {WAIT:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A loopback port nobody holds at the moment.
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn stats_watch_into_head_ends_quietly() {
    let a = Backend::start("a");
    let proxy = Proxy::start(
        Path::new(BIN),
        &listener_config("workers = 1", "dissector = \"quic\"", &[a.addr]),
    );
    let script = format!(
        "'{BIN}' stats --watch 1 --stats-file '{}' | head -1; echo \"status=${{PIPESTATUS[0]}}\"",
        proxy.stats_file.display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.starts_with("--- sample 1\n"), "{stdout}");
    let status = stdout
        .lines()
        .find_map(|l| l.strip_prefix("status="))
        .unwrap();
    assert!(
        status == "0" || status == "141",
        "status {status}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

fn stats_cli(stats_file: &Path) -> (Option<i32>, String, String) {
    let args = [
        std::ffi::OsStr::new("stats"),
        "--stats-file".as_ref(),
        stats_file.as_os_str(),
    ];
    udpshard_tests::harness::run_cli(Path::new(BIN), args)
}

#[test]
fn stats_of_a_killed_proxy_say_it_is_not_running() {
    let a = Backend::start("a");
    let mut proxy = Proxy::start(
        Path::new(BIN),
        &listener_config("workers = 2", "dissector = \"quic\"", &[a.addr]),
    );
    let (code, table, _) = stats_cli(&proxy.stats_file);
    assert_eq!(code, Some(0));
    assert!(!table.contains("NOT RUNNING"), "{table}");
    let pid = proxy.pid();
    proxy.signal(libc::SIGKILL);
    proxy.wait_exit(WAIT).expect("reaped");
    let (code, table, stderr) = stats_cli(&proxy.stats_file);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("not running: its supervisor (pid {pid}) is gone")),
        "{stderr}"
    );
    assert!(table.contains("NOT RUNNING"), "{table}");
    assert!(
        !table.contains(" ready "),
        "dead workers shown as ready:\n{table}"
    );
    let json = stats_json_any(&proxy.stats_file);
    assert_eq!(json["running"], false);
}

#[test]
fn stats_of_a_stopped_proxy_say_when_it_stopped() {
    let a = Backend::start("a");
    let mut proxy = Proxy::start(
        Path::new(BIN),
        &listener_config("workers = 1", "dissector = \"quic\"", &[a.addr]),
    );
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
    let (code, _, stderr) = stats_cli(&proxy.stats_file);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("stopped at 20"), "{stderr}");
    let json = stats_json_any(&proxy.stats_file);
    assert_eq!(json["running"], false);
    assert!(json["stopped_at"].as_u64().is_some_and(|t| t > 0), "{json}");
}

/// `stats --json` of a running proxy, if it reads.
fn stats_json_ok(stats_file: &Path) -> Option<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["stats", "--json", "--stats-file"])
        .arg(stats_file)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// `stats --json`, whatever its exit status.
fn stats_json_any(stats_file: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["stats", "--json", "--stats-file"])
        .arg(stats_file)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn check_config(text: &str) -> (Option<i32>, String, String) {
    udpshard_tests::harness::check_config(Path::new(BIN), text)
}

#[test]
fn check_config_reports_an_address_another_program_holds() {
    let holder = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let text = format!(
        "[[listener]]\nname = \"q\"\ndissector = \"quic\"\nbind = \"127.0.0.1:{port}\"\nbackends = [\"127.0.0.1:9\"]\n"
    );
    let (code, _, stderr) = check_config(&text);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.starts_with("FILE:4:8: "), "{stderr}");
    assert!(stderr.contains("in use by another program"), "{stderr}");
    drop(holder);
    let (code, stdout, stderr) = check_config(&text);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.trim_end().ends_with(": ok (1 listener)"), "{stdout}");
}

#[test]
fn check_config_of_a_running_proxys_own_file_passes() {
    let a = Backend::start("a");
    let port = free_port();
    let text = format!(
        "workers = 2\nstats_file = \"{{stats_file}}\"\n[[listener]]\nname = \"quic\"\nbind = \"127.0.0.1:{port}\"\ndissector = \"quic\"\nbackends = [\"{}\"]\n",
        a.addr
    );
    let proxy = Proxy::start(Path::new(BIN), &text);
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&proxy.config_path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The probe joined no group: everything sent still reaches a worker.
    let c = client();
    let target = proxy.addr("quic");
    for cid in 0..50 {
        round_trip(&c, target, cid, b"z");
    }
    wait_until(WAIT, "all forwarded", || a.count() == 50);
}
