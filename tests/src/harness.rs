//! End-to-end harness: starts the real `udpshard` binary on loopback, real
//! UDP backends beside it, and reads its stats through its own CLI.
//!
//! Readiness is the proxy's `ready:` log line (which also reports every
//! listener's bound address, so tests bind port 0 and never guess ports);
//! waiting for counters polls the stats file with a deadline.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("udpshard-e2e-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `udpshard run`, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proxy {
    child: Option<Child>,
    bin: PathBuf,
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub stats_file: PathBuf,
    /// Listener name -> bound address, from the ready line.
    pub listeners: HashMap<String, SocketAddr>,
    log: Arc<Mutex<String>>,
    _log_reader: JoinHandle<()>,
}

/// How long a proxy may take to say it is ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

impl Proxy {
    /// Writes `config` (with `{stats_file}` replaced by a path in a fresh
    /// temp dir) and runs `bin run --config` on it.
    pub fn start(bin: &Path, config: &str) -> Proxy {
        Proxy::start_with(bin, config, &[])
    }

    /// As [`Proxy::start`], with the command run under `wrapper` (for
    /// instance `["taskset", "-c", "0"]`).
    pub fn start_with(bin: &Path, config: &str, wrapper: &[&str]) -> Proxy {
        let dir = TempDir::new("proxy");
        let stats_file = dir.path().join("stats");
        let config_path = dir.path().join("udpshard.toml");
        let mut text = config.replace("{stats_file}", &stats_file.display().to_string());
        // Each test's proxy stops when the test ends: a short drain keeps
        // the suite fast (tests of draining set their own).
        if !text.contains("drain_timeout") {
            text = format!("drain_timeout = \"300ms\"\n{text}");
        }
        std::fs::write(&config_path, text).expect("write config");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("run").arg("--config").arg(&config_path);
        Proxy::spawn(cmd, bin, dir, config_path, stats_file)
    }

    /// Runs an arbitrary `udpshard run ...` command line (for the embedded
    /// default config, which has its own stats path).
    pub fn spawn(
        mut cmd: Command,
        bin: &Path,
        dir: TempDir,
        config_path: PathBuf,
        stats_file: PathBuf,
    ) -> Proxy {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn udpshard");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let log_reader = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("UDPSHARD_TEST_LOG").is_some() {
                        eprintln!("[udpshard] {line}");
                    }
                    if let Some(rest) = line.split("ready: ").nth(1) {
                        let _ = ready_tx.send(rest.to_string());
                    }
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        let mut proxy = Proxy {
            child: Some(child),
            bin: bin.to_path_buf(),
            dir,
            config_path,
            stats_file,
            listeners: HashMap::new(),
            log,
            _log_reader: log_reader,
        };
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            // "2 workers serving quic@127.0.0.1:4433 other@[::1]:99"
            Ok(rest) => {
                let serving = rest.split("serving ").nth(1).unwrap_or("");
                for item in serving.split_whitespace() {
                    if let Some((name, addr)) = item.split_once('@') {
                        if let Ok(addr) = addr.parse() {
                            proxy.listeners.insert(name.to_string(), addr);
                        }
                    }
                }
            }
            Err(_) => panic!(
                "udpshard did not become ready in {READY_TIMEOUT:?}; log:\n{}",
                proxy.log()
            ),
        }
        proxy
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .listeners
            .get(listener)
            .unwrap_or_else(|| panic!("no listener {listener} in {:?}", self.listeners))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Everything the proxy has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "log never showed {needle:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `udpshard stats --json` through the real CLI.
    pub fn stats(&self) -> Value {
        stats_json(&self.bin, &self.stats_file)
    }

    /// Polls the stats until `pred` holds; panics with the last stats after
    /// `timeout`.
    pub fn wait_stats(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats();
            if pred(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "stats never showed {what} within {timeout:?}: {stats:#}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Sends a signal to the supervisor.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits for the supervisor to exit; `None` if it did not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `udpshard stats --json --stats-file F`, parsed.
pub fn stats_json(bin: &Path, stats_file: &Path) -> Value {
    let out = Command::new(bin)
        .args(["stats", "--json", "--stats-file"])
        .arg(stats_file)
        .output()
        .expect("run udpshard stats");
    assert!(
        out.status.success(),
        "udpshard stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats --json is JSON")
}

/// Sum of a per-worker field over all workers (`"drops.malformed"` reaches
/// into the drops object).
pub fn total(stats: &Value, field: &str) -> u64 {
    stats["workers"]
        .as_array()
        .map(|ws| ws.iter().map(|w| field_of(w, field)).sum())
        .unwrap_or(0)
}

pub fn field_of(worker: &Value, field: &str) -> u64 {
    let mut v = worker;
    for part in field.split('.') {
        v = &v[part];
    }
    v.as_u64().unwrap_or(0)
}

/// One datagram as a backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub payload: Vec<u8>,
    /// The proxy's upstream address it came from (one per session).
    pub from: SocketAddr,
}

/// A UDP backend on loopback that records every datagram and echoes it back
/// prefixed with its own name.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Backend::start_on(name, "127.0.0.1:0")
    }

    pub fn start_on(name: &str, bind: &str) -> Backend {
        let socket = bind_udp(bind);
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let addr = socket.local_addr().expect("backend addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop, name) = (Arc::clone(&seen), Arc::clone(&stop), name.to_string());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let payload = buf[..n].to_vec();
                    let mut reply = name.as_bytes().to_vec();
                    reply.push(b':');
                    reply.extend_from_slice(&payload);
                    let _ = socket.send_to(&reply, from);
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Seen { payload, from });
                }
            })
        };
        Backend {
            addr,
            name: name.to_string(),
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A config with `top` (top-level keys) and one listener named `quic` on
/// 127.0.0.1:0 with `listener` keys and `backends`; the stats file goes
/// where [`Proxy::start`] puts it.
pub fn listener_config(top: &str, listener: &str, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "{top}\nstats_file = \"{{stats_file}}\"\n\n[[listener]]\nname = \"quic\"\nbind = \"127.0.0.1:0\"\n{listener}\nbackends = [{}]\n",
        list.join(", ")
    )
}

/// A UDP socket with a receive buffer big enough that a test's bursts
/// (hundreds of datagrams at once) never overflow it: a loss in a test
/// must be udpshard's, not the harness's.
pub fn bind_udp(addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().expect("socket address");
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("socket");
    let want = 8 << 20;
    // SO_RCVBUFFORCE passes rmem_max when we may (root, as in CI).
    if nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &want).is_err()
    {
        let _ = socket.set_recv_buffer_size(want);
    }
    socket.bind(&addr.into()).expect("bind");
    socket.into()
}

/// Waits until `cond` holds, polling; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A QUIC short-header datagram for an 8-byte CID.
pub fn quic_short(cid: u64, body: &[u8]) -> Vec<u8> {
    let mut d = vec![0x40];
    d.extend_from_slice(&cid.to_be_bytes());
    d.extend_from_slice(body);
    d
}

/// The CPUs this process may run on, from /proc/self/status.
pub fn allowed_cpus_of(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Expands "0-2,5" into [0, 1, 2, 5].
pub fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                    cpus.extend(a..=b);
                }
            }
            None => cpus.extend(part.trim().parse::<usize>().ok()),
        }
    }
    cpus
}

pub fn process_exists(pid: u32) -> bool {
    // A zombie still has a /proc entry; only count live processes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}
