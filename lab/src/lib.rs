//! udpshard on loopback, for `udpshard demo` and the end-to-end tests: one
//! implementation of the pieces both need.
//!
//! - [`TempDir`]: a private directory, removed when dropped.
//! - [`Echo`] / [`EchoBackend`]: a UDP backend that answers every datagram
//!   with a prefix and the datagram, counting (and optionally recording)
//!   what it received.
//! - [`ProxyChild`]: a `udpshard run` child process; readiness is its
//!   `ready:` log line, which also names every listener's bound address.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A directory under the system temp dir (mode 0700), removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `udpshard-TAG-PID-N`, a fresh one.
    pub fn new(tag: &str) -> io::Result<TempDir> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let base = std::env::temp_dir();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("udpshard-{tag}-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(TempDir(path)),
                // Left over by a crashed run with a recycled PID.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => continue,
                Err(e) => return Err(e),
            }
        }
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

/// A UDP socket whose receive buffer holds a test's or the demo's bursts
/// (hundreds of datagrams at once): a loss must be the proxy's, not the
/// peer's.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let want = 8 << 20;
    // SO_RCVBUFFORCE passes rmem_max when we may (root); else the kernel
    // clamps to rmem_max.
    if nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &want).is_err()
    {
        let _ = socket.set_recv_buffer_size(want);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// One datagram as a backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub payload: Vec<u8>,
    /// The proxy's upstream address it came from.
    pub from: SocketAddr,
}

/// A bound echo backend that does not run yet: bind first, start the
/// thread later (the demo starts its proxy child before any thread).
pub struct Echo {
    socket: UdpSocket,
    prefix: Vec<u8>,
    record: bool,
}

impl Echo {
    /// Binds `addr`. Replies are `prefix` then the datagram; with `record`,
    /// every datagram is kept for [`EchoBackend::seen`].
    pub fn bind(addr: SocketAddr, prefix: &[u8], record: bool) -> io::Result<Echo> {
        let socket = bind_udp(addr)?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        Ok(Echo {
            socket,
            prefix: prefix.to_vec(),
            record,
        })
    }

    pub fn addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub fn start(self) -> io::Result<EchoBackend> {
        let addr = self.socket.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, seen, stop) = (received.clone(), seen.clone(), stop.clone());
            std::thread::spawn(move || self.serve(&received, &seen, &stop))
        };
        Ok(EchoBackend {
            addr,
            received,
            seen,
            stop,
            thread: Some(thread),
        })
    }

    fn serve(self, received: &AtomicU64, seen: &Mutex<Vec<Seen>>, stop: &AtomicBool) {
        let mut buf = vec![0u8; 65536 + self.prefix.len()];
        buf[..self.prefix.len()].copy_from_slice(&self.prefix);
        let body = self.prefix.len();
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = self.socket.recv_from(&mut buf[body..]) else {
                continue;
            };
            // Recorded before the reply leaves: whoever sees the reply can
            // count on the backend having seen the datagram.
            if self.record {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                    payload: buf[body..body + n].to_vec(),
                    from,
                });
            }
            received.fetch_add(1, Ordering::Relaxed);
            let _ = self.socket.send_to(&buf[..body + n], from);
        }
    }
}

/// A running echo backend; the thread stops when dropped.
pub struct EchoBackend {
    pub addr: SocketAddr,
    received: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoBackend {
    pub fn start(addr: SocketAddr, prefix: &[u8], record: bool) -> io::Result<EchoBackend> {
        Echo::bind(addr, prefix, record)?.start()
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Every datagram received so far (recording backends only).
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug)]
pub enum SpawnError {
    Spawn(io::Error),
    /// No `ready:` line within the timeout; the log so far.
    NotReady(String),
    /// It exited before it was ready; the log.
    Exited(String),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::Spawn(e) => write!(f, "cannot start udpshard: {e}"),
            SpawnError::NotReady(log) => write!(f, "udpshard did not become ready; log:\n{log}"),
            SpawnError::Exited(log) => {
                write!(f, "udpshard exited before it was ready; log:\n{log}")
            }
        }
    }
}

impl std::error::Error for SpawnError {}

/// A proxy child (`udpshard run`, or a baseline the benchmarks measure
/// against). Its stderr is read line by line into a log (and handed to
/// `on_line`); readiness is the `ready:` line. Dropping it stops it:
/// SIGTERM, then SIGKILL after 5 s.
pub struct ProxyChild {
    child: Option<Child>,
    /// Listener name -> bound address, from the ready line.
    pub listeners: HashMap<String, SocketAddr>,
    log: Arc<Mutex<String>>,
    /// Set when every writer of the log (workers too) has closed it.
    log_closed: Arc<AtomicBool>,
    /// The text after `ready: `, once, when the child says it.
    ready: mpsc::Receiver<String>,
}

impl ProxyChild {
    /// Starts `cmd` and waits up to `ready_timeout` for its `ready:` line.
    pub fn spawn(
        cmd: Command,
        on_line: impl FnMut(&str) + Send + 'static,
        ready_timeout: Duration,
    ) -> Result<ProxyChild, SpawnError> {
        let mut proxy = ProxyChild::start(cmd, on_line)?;
        proxy.wait_ready(ready_timeout)?;
        Ok(proxy)
    }

    /// Starts `cmd` (stdin and stdout null, stderr piped), without waiting
    /// for it. The child dies with this process (PR_SET_PDEATHSIG: SIGTERM,
    /// so it still drains).
    pub fn start(
        mut cmd: Command,
        mut on_line: impl FnMut(&str) + Send + 'static,
    ) -> Result<ProxyChild, SpawnError> {
        let parent = std::process::id() as libc::pid_t;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and makes
        // only async-signal-safe calls (prctl, getppid) on a value computed
        // before the fork; it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(SpawnError::Spawn)?;
        let stderr = child.stderr.take().ok_or_else(|| {
            SpawnError::Spawn(io::Error::other("the child's stderr is not a pipe"))
        })?;
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let log_closed = Arc::new(AtomicBool::new(false));
        {
            let (log, closed) = (Arc::clone(&log), Arc::clone(&log_closed));
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    on_line(&line);
                    {
                        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                        log.push_str(&line);
                        log.push('\n');
                    }
                    // Text, or a JSON object (`--log-format json`), whose
                    // message ends at the first quote: the ready line's
                    // names and addresses hold none (JSON would escape one).
                    if let Some(rest) = line.split("ready: ").nth(1) {
                        let rest = rest.split('"').next().unwrap_or(rest);
                        let _ = ready_tx.send(rest.to_string());
                    }
                }
                closed.store(true, Ordering::Release);
            });
        }
        Ok(ProxyChild {
            child: Some(child),
            listeners: HashMap::new(),
            log,
            log_closed,
            ready: ready_rx,
        })
    }

    /// Waits up to `timeout` for the `ready:` line, and takes the listeners'
    /// addresses from it.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), SpawnError> {
        match self.ready.recv_timeout(timeout) {
            Ok(rest) => {
                self.listeners = listener_addrs(&rest);
                Ok(())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(SpawnError::NotReady(self.log())),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(SpawnError::Exited(self.log())),
        }
    }

    /// Its exit status, if it has exited (reaped now).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => {
                self.child = None;
                Ok(Some(status))
            }
            Some(other) => other,
            None => Err(io::Error::other("already reaped")),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the log is complete (every process that wrote it has
    /// exited); false if that took longer than `timeout`.
    pub fn wait_log_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.log_closed.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Sends `signal` to the supervisor; false when it has already exited.
    pub fn signal(&self, signal: i32) -> bool {
        let Some(child) = self.child.as_ref() else {
            return false;
        };
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(child.id() as i32, signal) == 0 }
    }

    /// Waits for the supervisor to exit; `None` if it did not within
    /// `timeout`.
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

    /// SIGTERM, then waits up to `timeout` for it to drain and exit; kills
    /// it after that.
    pub fn stop(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        match self.wait_exit(timeout) {
            Some(status) => Ok(status),
            None => {
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                Err(io::Error::other(format!(
                    "still running {timeout:?} after SIGTERM; killed"
                )))
            }
        }
    }
}

impl Drop for ProxyChild {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(Duration::from_secs(5));
        }
    }
}

/// Listener name -> address, from the text after `ready: `
/// ("2 workers serving quic@127.0.0.1:4433 other@[::1]:99").
pub fn listener_addrs(ready: &str) -> HashMap<String, SocketAddr> {
    let serving = ready.split("serving ").nth(1).unwrap_or("");
    serving
        .split_whitespace()
        .filter_map(|item| item.split_once('@'))
        .filter_map(|(name, addr)| Some((name.to_string(), addr.parse().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_names_listeners() {
        let addrs = listener_addrs("2 workers serving other@[::1]:99 demo@127.0.0.1:4433");
        assert_eq!(addrs["demo"], SocketAddr::from(([127, 0, 0, 1], 4433)));
        assert_eq!(addrs["other"], "[::1]:99".parse().unwrap());
        assert!(listener_addrs("2 workers").is_empty());
    }

    #[test]
    fn echo_answers_with_its_prefix_and_records() {
        let b = EchoBackend::start("127.0.0.1:0".parse().unwrap(), b"b:", true).unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.send_to(b"hi", b.addr).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = c.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"b:hi"[..], b.addr));
        assert_eq!(b.received(), 1);
        let seen = b.seen();
        assert_eq!(seen[0].payload, b"hi");
        assert_eq!(seen[0].from, c.local_addr().unwrap());
    }

    #[test]
    fn temp_dirs_are_private_and_removed() {
        let path = {
            let d = TempDir::new("lab").unwrap();
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
            d.path().to_path_buf()
        };
        assert!(!path.exists());
    }
}
