//! Starting a worker: fork and exec of this same binary as `udpshard worker`,
//! with exactly its descriptors inherited, pinned to its CPU from its first
//! instruction, and bound to die with the supervisor.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::sched::CpuSet;

pub(crate) struct WorkerSpec {
    pub id: usize,
    pub cpu: usize,
    pub control_fd: RawFd,
    pub stats_fd: RawFd,
    pub state_fd: RawFd,
    pub listener_fds: Vec<RawFd>,
    pub handoff_fd: RawFd,
    pub peer_fds: Vec<RawFd>,
    /// A binary upgrade: the generation to stand by as.
    pub standby: Option<u64>,
    /// With it: the sending end of the predecessor's inbox.
    pub predecessor_fd: Option<RawFd>,
}

fn fd_list(fds: &[RawFd]) -> String {
    fds.iter()
        .map(|fd| fd.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn spawn_worker(exe: &Path, spec: &WorkerSpec) -> io::Result<Child> {
    let mut cpus = CpuSet::new();
    cpus.set(spec.cpu).map_err(io::Error::from)?;
    let parent = nix::unistd::getpid();
    let mut inherit = vec![
        spec.control_fd,
        spec.stats_fd,
        spec.state_fd,
        spec.handoff_fd,
    ];
    inherit.extend_from_slice(&spec.listener_fds);
    inherit.extend_from_slice(&spec.peer_fds);
    inherit.extend(spec.predecessor_fd);

    let mut cmd = Command::new(exe);
    // argv[0] as a user would run it (`ps`), whatever path the image came from.
    cmd.arg0("udpshard")
        .args(["--log-format", crate::logging::format().as_arg()])
        .arg("worker")
        .args(["--id", &spec.id.to_string()])
        .args(["--control-fd", &spec.control_fd.to_string()])
        .args(["--stats-fd", &spec.stats_fd.to_string()])
        .args(["--state-fd", &spec.state_fd.to_string()])
        .args(["--listener-fds", &fd_list(&spec.listener_fds)])
        .args(["--handoff-fd", &spec.handoff_fd.to_string()])
        .args(["--peer-fds", &fd_list(&spec.peer_fds)])
        .stdin(Stdio::null());
    if let Some(generation) = spec.standby {
        cmd.args(["--standby", &generation.to_string()]);
    }
    if let Some(fd) = spec.predecessor_fd {
        cmd.args(["--predecessor-fd", &fd.to_string()]);
    }
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (fcntl, signal, prctl, getppid,
    // sched_setaffinity) on values prepared before the fork, and allocates
    // nothing (its errors are raw OS errors). The supervisor is
    // single-threaded, so no lock is held by a thread that does not exist in
    // the child.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // A terminal's Ctrl-C, a hangup and `timeout` signal the whole
            // process group, workers included: those are requests to the
            // supervisor, which drains the workers over their control
            // channels. Ignored dispositions survive exec, so this also
            // covers the worker's start-up.
            // SIGUSR2 too: `systemctl kill -s USR2` without --kill-whom=main
            // must upgrade the proxy, not kill its workers.
            for signal in [
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGUSR2,
            ] {
                if libc::signal(signal, libc::SIG_IGN) == libc::SIG_ERR {
                    return Err(io::Error::last_os_error());
                }
            }
            // No orphan worker may keep the port after a SIGKILLed supervisor.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The supervisor may have died between fork and prctl.
            if libc::getppid() != parent.as_raw() {
                // ESRCH: the process that should supervise us is gone.
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)
                .map_err(io::Error::from)
        });
    }
    cmd.spawn()
}
