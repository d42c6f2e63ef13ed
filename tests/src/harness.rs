//! End-to-end harness: starts the real `udpshard` binary on loopback, real
//! UDP backends beside it, and reads its stats through its own CLI.
//!
//! Readiness is the proxy's `ready:` log line (which also reports every
//! listener's bound address, so tests bind port 0 and never guess ports);
//! waiting for counters polls the stats file with a deadline.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;
pub use udpshard_lab::Seen;
use udpshard_lab::{EchoBackend, ProxyChild};

/// A directory removed when dropped.
pub struct TempDir(udpshard_lab::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        TempDir(udpshard_lab::TempDir::new(&format!("e2e-{tag}")).expect("create temp dir"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// A socket in the place of systemd's notify socket: run the proxy under
/// `["env", &notify.env()]` and read what it tells systemd.
pub struct NotifySocket {
    sock: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Each read fails the test after `timeout`.
    pub fn bind(dir: &TempDir, timeout: Duration) -> NotifySocket {
        let path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(timeout))
            .expect("set a read timeout");
        NotifySocket { sock, path }
    }

    /// The `NOTIFY_SOCKET=` assignment that points a process here.
    pub fn env(&self) -> String {
        format!("NOTIFY_SOCKET={}", self.path.display())
    }

    /// The next notification, whole.
    pub fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// From `STATUS=` on, the next notification whose status starts with
    /// `prefix` (which includes `STATUS=`); those before it are skipped.
    pub fn next_status(&self, prefix: &str) -> String {
        loop {
            let text = self.next();
            if let Some(at) = text.find("STATUS=") {
                if text[at..].starts_with(prefix) {
                    return text[at..].to_string();
                }
            }
        }
    }
}

/// A running `udpshard run`, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proxy {
    child: ProxyChild,
    bin: PathBuf,
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub stats_file: PathBuf,
    /// Listener name -> bound address, from the ready line.
    pub listeners: HashMap<String, SocketAddr>,
    /// A test that makes a worker break the system-call filter says so;
    /// anywhere else, a worker the filter killed fails the test.
    filter_kills_expected: std::cell::Cell<bool>,
    /// The supervisor that took over in a binary upgrade ([`Proxy::upgrade`]):
    /// not this test's child, so stopped by hand when dropped.
    successor: Option<u32>,
}

/// A binary upgrade signalled ([`Proxy::begin_upgrade`]) and not yet
/// followed.
pub struct UpgradeBegun {
    old: u32,
    upgrades: u64,
}

/// What the supervisor says of a worker the system-call filter killed.
pub const FILTER_KILL: &str = "killed by the system-call filter";

impl Drop for Proxy {
    /// The allowlist must hold whatever a test drives: a worker the filter
    /// killed (and the supervisor restarted) fails the test that saw it.
    fn drop(&mut self) {
        if let Some(pid) = self.successor.take() {
            stop_pid(pid, Duration::from_secs(5));
        }
        if std::thread::panicking() || self.filter_kills_expected.get() {
            return;
        }
        let log = self.log();
        if let Some(line) = log.lines().find(|l| l.contains(FILTER_KILL)) {
            panic!("a worker broke the system-call filter: {line}\n{log}");
        }
    }
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
        let (dir, config_path, stats_file) = write_config(config);
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
        cmd: Command,
        bin: &Path,
        dir: TempDir,
        config_path: PathBuf,
        stats_file: PathBuf,
    ) -> Proxy {
        let echo = std::env::var_os("UDPSHARD_TEST_LOG").is_some();
        let on_line = move |line: &str| {
            if echo {
                eprintln!("[udpshard] {line}");
            }
        };
        let child =
            ProxyChild::spawn(cmd, on_line, READY_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        Proxy {
            listeners: child.listeners.clone(),
            child,
            bin: bin.to_path_buf(),
            dir,
            config_path,
            stats_file,
            filter_kills_expected: std::cell::Cell::new(false),
            successor: None,
        }
    }

    /// The addresses of the backends the stats say are down.
    pub fn backends_down(&self) -> Vec<String> {
        self.stats()["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["state"] == "down")
            .map(|b| b["addr"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// This test makes a worker call what the system-call filter forbids.
    pub fn expect_filter_kills(&self) {
        self.filter_kills_expected.set(true);
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .listeners
            .get(listener)
            .unwrap_or_else(|| panic!("no listener {listener} in {:?}", self.listeners))
    }

    /// The serving supervisor's pid: the test's child, or the process that
    /// took over from it in [`Proxy::upgrade`].
    pub fn pid(&self) -> u32 {
        self.successor.unwrap_or_else(|| self.child.pid())
    }

    /// Sends SIGUSR2 to the serving supervisor (traffic may go on while
    /// the upgrade runs; [`Proxy::finish_upgrade`] waits for it).
    pub fn begin_upgrade(&self) -> UpgradeBegun {
        let begun = UpgradeBegun {
            old: self.pid(),
            upgrades: self.stats()["upgrades"].as_u64().unwrap_or(0),
        };
        self.signal(libc::SIGUSR2);
        begun
    }

    /// Whether the upgrade `begun` has taken over (the stats count it).
    pub fn upgraded(&self, begun: &UpgradeBegun) -> bool {
        self.stats()["upgrades"].as_u64() > Some(begun.upgrades)
    }

    /// Waits until the upgrade `begun` has taken over and the old
    /// supervisor has exited, and follows the new one from then on.
    pub fn finish_upgrade(&mut self, begun: UpgradeBegun, timeout: Duration) -> Value {
        match self.successor {
            None => {
                let status = self
                    .wait_exit(timeout)
                    .unwrap_or_else(|| panic!("no upgrade within {timeout:?}:\n{}", self.log()));
                assert!(status.success(), "old supervisor: {status}\n{}", self.log());
            }
            Some(pid) => wait_until(timeout, "the old supervisor to exit", || {
                !process_exists(pid)
            }),
        }
        let stats = self.wait_stats(timeout, "the new supervisor serving", |s| {
            s["upgrades"].as_u64() > Some(begun.upgrades)
                && s["supervisor_pid"]
                    .as_u64()
                    .is_some_and(|p| p != u64::from(begun.old))
        });
        self.successor = stats["supervisor_pid"].as_u64().map(|p| p as u32);
        stats
    }

    /// Waits until the serving supervisor has exited: the child's status,
    /// or, for a successor, `None` once it is gone (its parent reaps it).
    /// Panics when it is still running after `timeout`.
    pub fn wait_gone(&mut self, timeout: Duration) -> Option<ExitStatus> {
        match self.successor.take() {
            None => Some(
                self.wait_exit(timeout)
                    .unwrap_or_else(|| panic!("still running after {timeout:?}")),
            ),
            Some(pid) => {
                wait_until(timeout, "the supervisor to exit", || !process_exists(pid));
                None
            }
        }
    }

    /// Everything the proxy has logged so far.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Waits until every process that writes the log has closed it (after
    /// the proxy exits: its workers' last lines are in); false on timeout.
    pub fn wait_log_closed(&self, timeout: Duration) -> bool {
        self.child.wait_log_closed(timeout)
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

    /// Reads the stats with `bin` from now on (the proxy's own path may hold
    /// another program: a test of binary upgrades replaces it).
    pub fn stats_with(&mut self, bin: &Path) {
        self.bin = bin.to_path_buf();
    }

    /// `udpshard health` on the stats file through the real CLI: whether
    /// it exited 0, and its line.
    pub fn health(&self) -> (bool, String) {
        let out = Command::new(&self.bin)
            .args(["health", "--stats-file"])
            .arg(&self.stats_file)
            .output()
            .expect("udpshard health");
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success(), line)
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

    /// Sends a signal to the serving supervisor.
    pub fn signal(&self, signal: i32) {
        match self.successor {
            // SAFETY: kill(2) on the supervisor this proxy upgraded to.
            Some(pid) => assert_eq!(
                unsafe { libc::kill(pid as i32, signal) },
                0,
                "kill({pid}, {signal})"
            ),
            None => assert!(self.child.signal(signal), "kill({}, {signal})", self.pid()),
        }
    }

    /// Waits for the supervisor to exit; `None` if it did not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child.wait_exit(timeout)
    }
}

/// A fresh temp dir with `config` written into it as `udpshard.toml`
/// (`{stats_file}` replaced by a path beside it, and a short drain unless the
/// config sets one): the dir, the config's path and the stats file's.
pub fn write_config(config: &str) -> (TempDir, PathBuf, PathBuf) {
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
    (dir, config_path, stats_file)
}

/// `bin ARGS` to its end: its exit code, stdout and stderr.
pub fn run_cli(
    bin: &Path,
    args: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>,
) -> (Option<i32>, String, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `udpshard check-config` on `text` written to a temp file: its exit
/// code, stdout and stderr (the file's path in stderr replaced by `FILE`).
pub fn check_config(bin: &Path, text: &str) -> (Option<i32>, String, String) {
    let dir = TempDir::new("check");
    let file = dir.path().join("udpshard.toml");
    std::fs::write(&file, text).expect("write config");
    let (code, stdout, stderr) = run_cli(
        bin,
        [std::ffi::OsStr::new("check-config"), file.as_os_str()],
    );
    (
        code,
        stdout,
        stderr.replace(&file.display().to_string(), "FILE"),
    )
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

/// A UDP backend on loopback that records every datagram and echoes it back
/// prefixed with its own name and a colon.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    echo: EchoBackend,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Backend::start_on(name, "127.0.0.1:0")
    }

    pub fn start_on(name: &str, bind: &str) -> Backend {
        let addr: SocketAddr = bind.parse().expect("socket address");
        let echo =
            EchoBackend::start(addr, format!("{name}:").as_bytes(), true).expect("start backend");
        Backend {
            addr: echo.addr,
            name: name.to_string(),
            echo,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.echo.seen()
    }

    pub fn count(&self) -> usize {
        self.echo.received() as usize
    }
}

/// A config with `top` (top-level keys) and one listener named `quic` on
/// 127.0.0.1:0 with `listener` keys and `backends`; the stats file goes
/// where [`Proxy::start`] puts it.
pub fn listener_config(top: &str, listener: &str, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    // Tests run side by side: keep their upstream ports out of the kernel's
    // ephemeral range, which their clients' sockets draw from.
    let ports = if listener.contains("upstream_ports") {
        ""
    } else {
        "upstream_ports = \"1025-32767\"\n"
    };
    format!(
        "{top}\nstats_file = \"{{stats_file}}\"\n\n[[listener]]\nname = \"quic\"\nbind = \"127.0.0.1:0\"\n{ports}backends = [{}]\n{listener}\n",
        list.join(", ")
    )
}

/// A UDP socket with a receive buffer big enough that a test's bursts
/// (hundreds of datagrams at once) never overflow it: a loss in a test
/// must be udpshard's, not the harness's.
pub fn bind_udp(addr: &str) -> UdpSocket {
    udpshard_lab::bind_udp(addr.parse().expect("socket address")).expect("bind")
}

/// Sends `datagrams` to `to` as one UDP_SEGMENT message (GSO), the way a
/// QUIC stack sends a flight: each as long as the first but the last. The
/// receiver sees them as separate datagrams (or, with UDP_GRO, as one
/// buffer with their size).
pub fn send_segmented(
    socket: &UdpSocket,
    to: SocketAddr,
    datagrams: &[&[u8]],
) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let iov: Vec<std::io::IoSlice<'_>> =
        datagrams.iter().map(|d| std::io::IoSlice::new(d)).collect();
    let size = datagrams.first().map_or(0, |d| d.len()) as u16;
    let cmsg = [ControlMessage::UdpGsoSegments(&size)];
    let to = SockaddrStorage::from(to);
    sendmsg(
        socket.as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::empty(),
        Some(&to),
    )
    .map_err(std::io::Error::from)
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
    udpshard_shared::flow::quic_short(&cid.to_be_bytes(), body)
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

/// SIGTERM to `pid` (not this process's child), then SIGKILL if it is still
/// there after `grace`.
pub fn stop_pid(pid: u32, grace: Duration) {
    // SAFETY: kill(2) on a proxy process a test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while process_exists(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if process_exists(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
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

/// A TCP port on 127.0.0.1 that was free a moment ago (for a metrics
/// endpoint, which may not be port 0).
pub fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    l.local_addr().expect("its address").port()
}

/// GET `path` from `addr` over HTTP/1.1: the whole response.
pub fn http_get(addr: &str, path: &str) -> String {
    http_get_with(addr, path, "")
}

/// GET with extra header lines (each ending in \r\n).
pub fn http_get_with(addr: &str, path: &str, headers: &str) -> String {
    http_request(addr, "GET", path, headers)
}

/// `method path` on the HTTP endpoint at `addr`, with `headers` (each
/// ending in CRLF): the whole response.
pub fn http_request(addr: &str, method: &str, path: &str, headers: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    out
}

/// Puts a copy of `from` at `to`, executable, as a new file (renamed into
/// place, as dpkg and rpm install one). The copy is written by `cp`, not by
/// this process: a test thread that forks meanwhile would inherit this
/// process's descriptor open for writing, and until that child execs,
/// running the file fails with ETXTBSY.
pub fn install_executable(from: &Path, to: &Path) {
    let next = to.with_extension("installing");
    let status = Command::new("cp")
        .arg(from)
        .arg(&next)
        .status()
        .expect("run cp");
    assert!(status.success(), "cp {} {}", from.display(), next.display());
    let status = Command::new("chmod")
        .arg("755")
        .arg(&next)
        .status()
        .expect("run chmod");
    assert!(status.success(), "chmod {}", next.display());
    std::fs::rename(&next, to).expect("rename into place");
}

/// Why this host would make a first run of the embedded default or the demo
/// warn (a true warning: its descriptor limit or its socket buffer ceiling
/// is below what they ask for), or `None`: they must not warn here.
pub fn host_lacks_for_a_first_run() -> Option<String> {
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit, which lives on this frame.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) } == 0;
    // 10,000 sessions per worker and room for the rest (max_sessions + 1024).
    if got && hard.rlim_max < 11_024 {
        return Some(format!(
            "RLIMIT_NOFILE's hard limit is {}, below 11024",
            hard.rlim_max
        ));
    }
    let rmem_max: u64 = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    // recv_buffer = "4MiB"
    if rmem_max < 4 << 20 {
        return Some(format!("net.core.rmem_max is {rmem_max}, below 4 MiB"));
    }
    // upstream_ports = "20000-29999", which must be outside the kernel's
    // ephemeral range.
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ends: Vec<u32> = range
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if let [lo, hi] = ends[..] {
        if lo <= 29_999 && hi >= 20_000 {
            return Some(format!(
                "the ephemeral range {lo}-{hi} overlaps upstream_ports 20000-29999"
            ));
        }
    }
    // A CPU quota below one worker per allowed CPU is said as a warning.
    if let Ok(max) = std::fs::read_to_string("/sys/fs/cgroup/cpu.max") {
        if !max.starts_with("max") {
            return Some(format!("a cgroup CPU quota ({})", max.trim()));
        }
    }
    None
}

/// A program from Debian's packages a test needs (a DNS server,
/// Prometheus): its path, or `None` (and a line saying
/// why) where it is not installed. Under CI, which installs it
/// (`.ci/run`), a missing program fails the test instead.
pub fn installed<'a>(path: &'a str, package: &str) -> Option<&'a Path> {
    let path = Path::new(path);
    if path.is_file() {
        return Some(path);
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "{} is missing: CI installs Debian's {package} (.ci/run)",
        path.display()
    );
    eprintln!(
        "skipped: {} is not installed (apt-get install {package})",
        path.display()
    );
    None
}
