//! Running a proxy under test: its process (stderr kept for reports, read to
//! the end so the proxy never blocks on it, `ready:` noticed), stopping it and
//! whatever it left behind, and the host-wide lock that keeps two benchmark
//! runs from measuring each other.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use udpshard_shared::procnet::udp_sockets;

use super::procstat::{all_processes, read_stat, tree_pids, ProcStat};

/// How long a proxy gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a stopped proxy's children get to exit before SIGKILL.
const LEFTOVER_GRACE: Duration = Duration::from_secs(1);
/// Lines of a proxy's stderr kept for error reports.
const STDERR_LINES: usize = 200;

/// An exclusive lock that one bench run on this host holds at a time (released on exit).
pub fn host_lock(timeout: Duration) -> Result<Flock<File>, String> {
    let path = std::env::temp_dir().join("udpshard-bench.lock");
    let mut file =
        File::create(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let deadline = Instant::now() + timeout;
    let mut told = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                if !told {
                    eprintln!("bench: another bench run holds {}; waiting", path.display());
                    told = true;
                }
                file = f;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(format!(
                    "another bench run still holds {} after {timeout:?}",
                    path.display()
                ))
            }
            Err((_, e)) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
}

pub fn own_dir() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| std::io::Error::other("executable has no parent directory"))
}

/// A loopback address whose UDP port was free a moment ago.
pub fn free_udp_addr() -> std::io::Result<SocketAddr> {
    UdpSocket::bind("127.0.0.1:0")?.local_addr()
}

pub fn show_command(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// A proxy under test: its process, and its stderr read on a thread (kept so that a failure
/// can show it, and read to the end so that the proxy never blocks on a full pipe).
pub struct ProxyProcess {
    child: Child,
    stderr: Arc<Mutex<VecDeque<String>>>,
    ready: mpsc::Receiver<()>,
}

impl ProxyProcess {
    pub fn start(mut command: Command) -> std::io::Result<ProxyProcess> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let (ready_tx, ready) = mpsc::channel();
        if let Some(pipe) = child.stderr.take() {
            let lines = Arc::clone(&stderr);
            std::thread::spawn(move || read_stderr(pipe, &lines, &ready_tx));
        }
        Ok(ProxyProcess {
            child,
            stderr,
            ready,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stderr line containing `ready:`; fails with the stderr so far if the proxy
    /// exits or the timeout passes first.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut stderr_open = true;
        loop {
            if stderr_open {
                match self.ready.recv_timeout(Duration::from_millis(100)) {
                    Ok(()) => return Ok(()),
                    // The proxy closed stderr: it is exiting, or will never say ready.
                    Err(mpsc::RecvTimeoutError::Disconnected) => stderr_open = false,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
            } else {
                std::thread::sleep(Duration::from_millis(100));
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                return Err(format!(
                    "no `ready:` on stderr within {timeout:?}; its stderr:\n{}",
                    self.stderr_tail()
                ));
            }
        }
    }

    /// For a proxy that prints nothing when it is up (nginx): waits until its process tree has
    /// `workers` processes besides the root and `/proc/net/udp` shows `workers` sockets bound
    /// to `listen` (one per worker in its SO_REUSEPORT group).
    pub fn wait_bound(
        &mut self,
        listen: SocketAddr,
        workers: usize,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let children = all_processes()
                .map(|all| tree_pids(self.pid(), &all).len().saturating_sub(1))
                .unwrap_or(0);
            let bound = udp_sockets_bound_to(listen);
            if children >= workers && bound >= workers {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                return Err(format!(
                    "{children} of {workers} workers up and {bound} sockets bound to {listen} \
                     after {timeout:?}; its stderr:\n{}",
                    self.stderr_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                // Let the reader thread take in the last lines before they are shown.
                std::thread::sleep(Duration::from_millis(200));
                Err(format!(
                    "exited ({status}); its stderr:\n{}",
                    self.stderr_tail()
                ))
            }
            Err(e) => Err(format!("cannot wait for it: {e}")),
        }
    }

    pub fn stderr_tail(&self) -> String {
        let lines = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        let mut text = String::new();
        for line in lines.iter() {
            let _ = writeln!(text, "  | {line}");
        }
        if text.is_empty() {
            text.push_str("  | (nothing)\n");
        }
        text
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_GRACE`]; then SIGKILL what
    /// is left of the processes it had started (a worker that outlived it).
    pub fn stop(&mut self) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.to_string();
        }
        let root = self.child.id();
        let descendants: Vec<ProcStat> = all_processes()
            .map(|all| {
                let tree = tree_pids(root, &all);
                all.into_iter()
                    .filter(|p| p.pid != root && tree.contains(&p.pid))
                    .collect()
            })
            .unwrap_or_default();
        let status = self.terminate();
        let leftovers = kill_leftovers(&descendants);
        if leftovers == 0 {
            status
        } else {
            format!("{status}; killed {leftovers} process(es) it left behind")
        }
    }

    fn terminate(&mut self) -> String {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.to_string();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .map_or("unknown".into(), |s: ExitStatus| s.to_string());
        format!("killed after {STOP_GRACE:?} without exiting on SIGTERM: {status}")
    }
}

/// Sockets in `/proc/net/udp` (or `udp6`) bound to `addr`.
pub fn udp_sockets_bound_to(addr: SocketAddr) -> usize {
    udp_sockets().iter().filter(|e| e.local == addr).count()
}

/// Gives `processes` (a stopped proxy's descendants) a moment to exit on their own, then
/// SIGKILLs those still there (same pid, same command). Returns how many were killed.
pub fn kill_leftovers(processes: &[ProcStat]) -> usize {
    let alive = |p: &ProcStat| read_stat(p.pid).is_ok_and(|now| now.comm == p.comm);
    let deadline = Instant::now() + LEFTOVER_GRACE;
    while processes.iter().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut killed = 0;
    for p in processes.iter().filter(|p| alive(p)) {
        if let Ok(pid) = i32::try_from(p.pid) {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
    }
    killed
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

pub fn read_stderr(
    pipe: std::process::ChildStderr,
    lines: &Mutex<VecDeque<String>>,
    ready: &mpsc::Sender<()>,
) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    let mut said_ready = false;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
        if !said_ready && line.contains("ready:") {
            said_ready = true;
            let _ = ready.send(());
        }
        let mut lines = lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == STDERR_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_sockets_are_found_in_proc_net_udp() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(udp_sockets_bound_to(a.local_addr().unwrap()), 1);
        if let Ok(b) = UdpSocket::bind("[::1]:0") {
            assert_eq!(udp_sockets_bound_to(b.local_addr().unwrap()), 1);
        }
        let gone = a.local_addr().unwrap();
        drop(a);
        assert_eq!(udp_sockets_bound_to(gone), 0);
    }
}
