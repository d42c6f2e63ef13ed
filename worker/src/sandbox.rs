//! What a worker gives up once it is set up. It parses every datagram from
//! the network; if a parser bug ever ran an attacker's code, the process
//! should hold no capability. Once its raw sockets are open (the last thing
//! that needs privilege), a worker drops every capability from every set
//! (effective, permitted, inheritable, ambient and bounding), keeping only
//! CAP_NET_BIND_SERVICE where its config binds upstream ports below the
//! kernel's unprivileged start, and sets no_new_privs, so no execve can give
//! any back. It keeps the uid it was started with: the packaged unit's
//! user, or the config's `user` (`user`, which the supervisor applies
//! before it starts a worker), else root's.

use std::io;

mod user;

pub use user::{become_user, check_user, lookup_user, RunAs, UserError};

/// CAP_SETPCAP.
const SETPCAP: u32 = 8;
/// CAP_NET_BIND_SERVICE.
const NET_BIND_SERVICE: u32 = 10;
/// CAP_NET_RAW.
const NET_RAW: u32 = 13;
/// _LINUX_CAPABILITY_VERSION_3: two `CapData`, for capabilities 0-31 and 32-63.
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What [`drop_privileges`] left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// CAP_NET_BIND_SERVICE was kept (low upstream ports).
    pub kept_bind: bool,
    /// The bounding set is empty (dropping from it takes CAP_SETPCAP, which
    /// an unprivileged start does not have, and does not need).
    pub bounding_cleared: bool,
}

/// The kernel's first port any process may bind
/// (`net.ipv4.ip_unprivileged_port_start`).
fn unprivileged_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(1024)
}

/// The first listener of `config` whose upstream ports begin below the
/// unprivileged start (binding them takes CAP_NET_BIND_SERVICE, which a
/// worker keeps only when the config it starts with needs it), with that
/// range and the start.
pub fn privileged_upstream_ports(
    config: &udpshard_config::Config,
) -> Option<(String, u16, u16, u32)> {
    let start = unprivileged_start();
    config.listeners.iter().find_map(|l| {
        let (lo, hi) = l.upstream_ports.unwrap_or_else(crate::ephemeral_range);
        (u32::from(lo) < start).then(|| (l.name.clone(), lo, hi, start))
    })
}

/// Drops every capability but CAP_NET_BIND_SERVICE (with `keep_bind`) and
/// sets no_new_privs. An error leaves the process as it is, minus what was
/// already dropped: the caller logs it and serves on.
pub(crate) fn drop_privileges(keep_bind: bool) -> io::Result<Dropped> {
    // First, as it takes no privilege and cannot fail: no execve from here
    // on can give anything back.
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0)?;
    let bind = bit(NET_BIND_SERVICE);
    // The bounding set next, while CAP_SETPCAP (if held) is still there.
    let bounding_cleared = drop_bounding(if keep_bind { bind } else { 0 });
    // It fails harmlessly where ambient capabilities do not exist (the
    // capset below empties them anyway).
    let _ = prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as u32,
        0,
    );
    let kept_bind = keep_bind && permitted()? & bind != 0;
    let keep = if kept_bind { bind } else { 0 };
    set_caps(keep, keep, 0)?;
    Ok(Dropped {
        kept_bind,
        bounding_cleared,
    })
}

/// The bit of capability `cap` in a 64-bit set.
const fn bit(cap: u32) -> u64 {
    1 << cap
}

/// prctl(2) with integer arguments.
fn prctl(option: libc::c_int, arg2: u32, arg3: u32) -> io::Result<()> {
    const ZERO: libc::c_ulong = 0;
    let [arg2, arg3] = [arg2, arg3].map(libc::c_ulong::from);
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(option, arg2, arg3, ZERO, ZERO) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's last capability (where it does not say, the highest it
/// could know: a drop past its last one fails with EINVAL, which is no
/// loss).
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(63)
        .min(63)
}

/// Drops every capability outside `keep` from the bounding set; whether
/// all of them went (it takes CAP_SETPCAP).
fn drop_bounding(keep: u64) -> bool {
    let mut all = true;
    for cap in (0..=last_cap()).filter(|&c| keep & bit(c) == 0) {
        if prctl(libc::PR_CAPBSET_DROP, cap, 0).is_err() {
            all = false;
        }
    }
    all
}

/// This process's permitted set.
fn permitted() -> io::Result<u64> {
    let mut header = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(2) with version 3 reads a header and writes two data
    // structs of this layout; both live on this stack frame.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(data[0].permitted) | u64::from(data[1].permitted) << 32)
}

/// Sets the effective, permitted and inheritable sets.
fn set_caps(effective: u64, permitted: u64, inheritable: u64) -> io::Result<()> {
    let mut header = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    let half = |set: u64, high: bool| (if high { set >> 32 } else { set }) as u32;
    let data = [false, true].map(|high| CapData {
        effective: half(effective, high),
        permitted: half(permitted, high),
        inheritable: half(inheritable, high),
    });
    // SAFETY: capset(2) with version 3 reads a header and two data structs
    // of this layout, which live on this stack frame.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The system calls a serving worker makes (x86_64): receiving and sending
/// on its sockets, epoll, the control and handoff sockets (with descriptors
/// passed), upstream sockets opened, bound, probed and closed, memory, time,
/// a reload's reads of /proc/sys, logging, and its own exit. Everything else
/// traps: the process dies of SIGSYS after saying which call it was.
#[cfg(target_arch = "x86_64")]
const ALLOWED: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_sendmsg,
    libc::SYS_sendmmsg,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_recvmmsg,
    libc::SYS_recvfrom,
    libc::SYS_fcntl,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_uname,
    // A panic's backtrace (RUST_BACKTRACE) names the directory and the
    // executable.
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Installs the system-call filter on this (single-threaded) process: the
/// calls in `ALLOWED`; tgkill to itself (an abort); openat for reading;
/// ioctl(FIONBIO); ftruncate of the stats file to its full size (its
/// guard's repair); anything else raises SIGSYS, whose handler names the call on stderr and lets the
/// signal kill the process. (seccompiler sets no_new_privs, which
/// [`drop_privileges`] has already set.)
#[cfg(target_arch = "x86_64")]
pub(crate) fn install_syscall_filter() -> io::Result<()> {
    let program = filter_program(std::process::id())?;
    install_sigsys_handler()?;
    seccompiler::apply_filter(&program).map_err(|e| io::Error::other(e.to_string()))
}

/// The filter [`install_syscall_filter`] installs, for process `pid`.
#[cfg(target_arch = "x86_64")]
fn filter_program(pid: u32) -> io::Result<seccompiler::BpfProgram> {
    use std::collections::BTreeMap;

    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let err = |e: seccompiler::BackendError| io::Error::other(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let me = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(pid))
        .map_err(err)?;
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![me]).map_err(err)?],
    );
    // Files for reading only (a reload's /proc/sys, a backtrace's
    // executable): a worker creates, truncates and writes no file.
    let writes =
        (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64;
    let read_only = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(writes),
        0,
    )
    .map_err(err)?;
    rules.insert(
        libc::SYS_openat,
        vec![SeccompRule::new(vec![read_only]).map_err(err)?],
    );
    // ioctl only to make a socket non-blocking (std's set_nonblocking).
    let fionbio =
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::FIONBIO)
            .map_err(err)?;
    rules.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(vec![fionbio]).map_err(err)?],
    );
    // The stats file's guard puts a cut file's length back, and nothing
    // else may change its length.
    if let Some((fd, len)) = udpshard_shared::stats::guard::repair_call() {
        let on =
            |arg, len, value| SeccompCondition::new(arg, len, SeccompCmpOp::Eq, value).map_err(err);
        rules.insert(
            libc::SYS_ftruncate,
            vec![SeccompRule::new(vec![
                on(0, SeccompCmpArgLen::Dword, fd as u64)?,
                on(1, SeccompCmpArgLen::Qword, len)?,
            ])
            .map_err(err)?],
        );
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

/// No filter where its list was not written (the architecture's calls
/// differ): said at start.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn install_syscall_filter() -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "no system-call list for this architecture",
    ))
}

/// SIGSYS (a call the filter refused): writes "killed by the system-call
/// filter: syscall N" to stderr, then dies of the signal, which the
/// supervisor reports.
#[cfg(target_arch = "x86_64")]
fn install_sigsys_handler() -> io::Result<()> {
    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        /// si_code of a SIGSYS the filter raised.
        const SYS_SECCOMP: libc::c_int = 1;
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO.
        let code = unsafe { (*info).si_code };
        if code != SYS_SECCOMP {
            // Sent by someone (kill -SYS): die of it, naming nothing.
            udpshard_shared::signal::die_of(libc::SIGSYS);
            return;
        }
        // SAFETY: for SIGSYS from seccomp, si_syscall is at offset 24
        // (after si_signo, si_errno, si_code, padding, si_call_addr), read
        // as an i32.
        let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(24).cast::<i32>()) };
        let mut line = *b"udpshard worker: killed by the system-call filter: syscall           \n";
        // Digits, right to left, into the blanks before the newline; only
        // async-signal-safe work here (no allocation, no locks).
        let mut at = line.len() - 1;
        let mut n = nr.unsigned_abs();
        loop {
            at -= 1;
            line[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let start = b"udpshard worker: killed by the system-call filter: syscall ".len();
        let end = line.len();
        line.copy_within(at..end, start);
        let len = start + (end - at);
        // SAFETY: write(2) of a live stack buffer: async-signal-safe and
        // allowed by the filter (as are die_of's signal and raise).
        unsafe {
            libc::write(2, line.as_ptr().cast(), len);
        }
        udpshard_shared::signal::die_of(libc::SIGSYS);
    }
    // SAFETY: the handler only does async-signal-safe work (above).
    unsafe { udpshard_shared::signal::set_siginfo_handler(libc::SIGSYS, on_sigsys) }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Forks a child that installs `program` and runs `then`; how the child
    /// ended. Everything the child does after the fork is a system call (no
    /// allocation: the test process has other threads).
    fn in_filtered_child(program: &seccompiler::BpfProgram, then: fn() -> i32) -> libc::c_int {
        // SAFETY: the child makes system calls only (prctl, seccomp, then
        // `then`'s) and leaves with _exit; the parent waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                let code = match seccompiler::apply_filter(program) {
                    Ok(()) => then(),
                    Err(_) => 100,
                };
                libc::_exit(code);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            status
        }
    }

    #[test]
    fn the_filter_allows_reads_and_nonblocking_sockets_and_kills_writes_and_other_ioctls() {
        let program = filter_program(std::process::id()).unwrap();
        let allowed = in_filtered_child(&program, || {
            // SAFETY: plain system calls on a path literal and new fds.
            unsafe {
                let fd = libc::open(
                    c"/proc/self/status".as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                );
                if fd < 0 {
                    return 1;
                }
                let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                let mut on: libc::c_int = 1;
                if sock < 0 || libc::ioctl(sock, libc::FIONBIO, &mut on) != 0 {
                    return 2;
                }
                0
            }
        });
        assert!(libc::WIFEXITED(allowed), "status {allowed:#x}");
        assert_eq!(libc::WEXITSTATUS(allowed), 0);

        let writes: [fn() -> i32; 3] = [
            // SAFETY: the call the filter must refuse.
            || unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY) },
            // SAFETY: as above.
            || unsafe {
                libc::open(
                    c"/tmp/udpshard-filter-test".as_ptr(),
                    libc::O_RDONLY | libc::O_CREAT,
                    0o600,
                )
            },
            // SAFETY: as above: a terminal ioctl on stdin.
            || unsafe {
                let mut t: libc::termios = std::mem::zeroed();
                libc::ioctl(0, libc::TCGETS, &mut t)
            },
        ];
        for (i, call) in writes.into_iter().enumerate() {
            let status = in_filtered_child(&program, call);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "call {i}: status {status:#x}"
            );
        }
    }
}
