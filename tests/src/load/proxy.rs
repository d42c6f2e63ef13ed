//! Running a proxy under test: its process (stderr kept for reports, read to
//! the end so the proxy never blocks on it, `ready:` noticed), stopping it and
//! whatever it left behind, and the host-wide lock that keeps two benchmark
//! runs from measuring each other.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use udpshard_lab::{ProxyChild, SpawnError};
use udpshard_shared::procnet::udp_sockets;

use super::baseline::allowed_cpus;
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

/// A proxy under test: lab's [`ProxyChild`] (stderr read on a thread, kept so that a failure
/// can show it, and read to the end so that the proxy never blocks on a full pipe), with what a
/// benchmark adds: waiting for a proxy that prints nothing when it is up, and stopping what its
/// process left behind.
pub struct ProxyProcess {
    child: ProxyChild,
    pid: u32,
}

impl ProxyProcess {
    /// Starts `command` for the `name` run of `bench` (saying so on stderr) and waits until
    /// it is up: its `ready:` line, or, for a proxy that prints nothing when it is (nginx:
    /// `bound`), one worker and socket per allowed CPU bound to that address.
    pub fn launch(
        bench: &str,
        name: &str,
        command: Command,
        bound: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<ProxyProcess, String> {
        eprintln!("{bench}: {name}: starting {}", show_command(&command));
        let mut process = ProxyProcess::start(command).map_err(|e| format!("cannot start: {e}"))?;
        match bound {
            Some(listen) => {
                process.wait_bound(listen, super::baseline::allowed_cpus().len(), timeout)?
            }
            None => process.wait_ready(timeout)?,
        }
        Ok(process)
    }

    pub fn start(command: Command) -> std::io::Result<ProxyProcess> {
        let child = ProxyChild::start(command, |_| {}).map_err(|e| match e {
            SpawnError::Spawn(e) => e,
            other => std::io::Error::other(other.to_string()),
        })?;
        let pid = child.pid();
        Ok(ProxyProcess { child, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for a stderr line containing `ready:`; fails with the stderr so far if the proxy
    /// exits or the timeout passes first.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        match self.child.wait_ready(timeout) {
            Ok(()) => Ok(()),
            Err(SpawnError::NotReady(_)) => Err(format!(
                "no `ready:` on stderr within {timeout:?}; its stderr:\n{}",
                self.stderr_tail()
            )),
            Err(_) => {
                self.check_alive()?;
                Err(format!(
                    "it closed stderr without `ready:`; its stderr:\n{}",
                    self.stderr_tail()
                ))
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
                self.child.wait_log_closed(Duration::from_millis(200));
                Err(format!(
                    "exited ({status}); its stderr:\n{}",
                    self.stderr_tail()
                ))
            }
            Err(e) => Err(format!("cannot wait for it: {e}")),
        }
    }

    /// The last lines of its stderr, for a report.
    pub fn stderr_tail(&self) -> String {
        let log = self.child.log();
        let lines: Vec<&str> = log.lines().collect();
        let mut text = String::new();
        for line in &lines[lines.len().saturating_sub(STDERR_LINES)..] {
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
        let root = self.pid;
        let descendants: Vec<ProcStat> = all_processes()
            .map(|all| {
                let tree = tree_pids(root, &all);
                all.into_iter()
                    .filter(|p| p.pid != root && tree.contains(&p.pid))
                    .collect()
            })
            .unwrap_or_default();
        let status = match self.child.stop(STOP_GRACE) {
            Ok(status) => status.to_string(),
            Err(e) => format!("{e} (no exit on SIGTERM within {STOP_GRACE:?})"),
        };
        let leftovers = kill_leftovers(&descendants);
        if leftovers == 0 {
            status
        } else {
            format!("{status}; killed {leftovers} process(es) it left behind")
        }
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

/// udpshard's configuration for the benchmark: one QUIC listener, 8-byte short-header CIDs,
/// a 4 MiB receive buffer like the other proxies, the sinks as backends; `top` adds
/// top-level keys (`upstream_send`, `offload`).
pub fn udpshard_toml(
    listen: SocketAddr,
    backends: &[SocketAddr],
    workdir: &Path,
    top: &str,
) -> String {
    udpshard_toml_keyed(
        listen,
        backends,
        workdir,
        top,
        "dissector = \"quic\"\nshort_cid_len = 8",
    )
}

/// As [`udpshard_toml`], with the listener's flow key given by `dissector` (its keys, for
/// instance `dissector = "tuple"`).
pub fn udpshard_toml_keyed(
    listen: SocketAddr,
    backends: &[SocketAddr],
    workdir: &Path,
    top: &str,
    dissector: &str,
) -> String {
    let backends: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        r#"workers = "auto"
stats_file = "{stats}"
{top}
# The load has stopped when the bench stops the proxy: no drain to wait for.
drain_timeout = "0s"

[[listener]]
name = "bench"
bind = "{listen}"
{dissector}
recv_buffer = "4MiB"
backends = [{backends}]
{admission}"#,
        stats = workdir.join("stats").display(),
        admission = super::one_generator_admission(1_000_000, "60s"),
        backends = backends.join(", "),
    )
}

/// Where Debian's libnginx-mod-stream puts the stream module (absent: built in, or missing,
/// and nginx says which when it reads `stream {}`).
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// nginx (`nginx`, Debian's binary) on its benchmark configuration, written to
/// `workdir/nginx.conf`, logging to stderr.
pub fn nginx_command(
    nginx: &Path,
    listen: SocketAddr,
    backends: &[SocketAddr],
    workdir: &Path,
) -> Result<Command, String> {
    let config = workdir.join("nginx.conf");
    std::fs::write(&config, nginx_conf(listen, backends, workdir))
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let mut command = Command::new(nginx);
    command
        .arg("-e")
        .arg("stderr")
        .arg("-p")
        .arg(workdir)
        .arg("-c")
        .arg(&config);
    Ok(command)
}

/// nginx's configuration for the benchmark: one worker per CPU (as the others), pinned, each
/// with its own SO_REUSEPORT socket; sessions kept for 60 s (`proxy_timeout`), replies
/// relayed without limit; backends round robin, one per session.
pub fn nginx_conf(listen: SocketAddr, backends: &[SocketAddr], workdir: &Path) -> String {
    let module = if Path::new(NGINX_STREAM_MODULE).is_file() {
        format!("load_module {NGINX_STREAM_MODULE};\n")
    } else {
        String::new()
    };
    let servers: String = backends
        .iter()
        .map(|b| format!("        server {b};\n"))
        .collect();
    format!(
        r#"{module}daemon off;
master_process on;
worker_processes {workers};
worker_cpu_affinity auto;
worker_rlimit_nofile 65536;
pid {pid};
error_log stderr warn;
events {{
    worker_connections 16384;
}}
stream {{
    upstream backends {{
{servers}    }}
    server {{
        listen {listen} udp reuseport;
        proxy_pass backends;
        proxy_timeout 60s;
    }}
}}
"#,
        workers = allowed_cpus().len(),
        pid = workdir.join("nginx.pid").display(),
    )
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
