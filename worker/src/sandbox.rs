//! What a worker gives up once it is set up. It parses every datagram from
//! the network; if a parser bug ever ran an attacker's code, the process
//! should hold no capability (it keeps its uid: run as root, it can still
//! write what root owns; the packaged unit runs it as a user of its own).
//! Once its raw sockets are
//! open (the last thing that needs privilege), a worker drops every
//! capability from every set (effective, permitted, inheritable, ambient and
//! bounding), keeping only CAP_NET_BIND_SERVICE where its config binds
//! upstream ports below the kernel's unprivileged start, and sets
//! no_new_privs, so no execve can give any back.

use std::io;

/// CAP_NET_BIND_SERVICE.
const NET_BIND_SERVICE: u32 = 10;
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
    // Where the kernel does not say, the highest it could know: a drop past
    // its last capability fails with EINVAL, which is no loss.
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(63)
        .min(63);
    const ZERO: libc::c_ulong = 0;
    // First, as it takes no privilege and cannot fail: no execve from here
    // on can give anything back.
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as libc::c_ulong,
            ZERO,
            ZERO,
            ZERO,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // The bounding set next, while CAP_SETPCAP (if held) is still there.
    let mut bounding_cleared = true;
    for cap in 0..=last {
        if keep_bind && cap == NET_BIND_SERVICE {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAPBSET_DROP,
                libc::c_ulong::from(cap),
                ZERO,
                ZERO,
                ZERO,
            )
        };
        if rc != 0 {
            bounding_cleared = false;
        }
    }
    // SAFETY: prctl with integer arguments only; it fails harmlessly where
    // ambient capabilities do not exist (capset below empties them anyway).
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            ZERO,
            ZERO,
            ZERO,
        )
    };
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
    let bind = 1u32 << NET_BIND_SERVICE;
    let kept_bind = keep_bind && data[0].permitted & bind != 0;
    let keep = if kept_bind { bind } else { 0 };
    data = [
        CapData {
            effective: keep,
            permitted: keep,
            inheritable: 0,
        },
        CapData::default(),
    ];
    // SAFETY: capset(2) reads the same header and two data structs.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Dropped {
        kept_bind,
        bounding_cleared,
    })
}
