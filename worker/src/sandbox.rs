//! What a worker gives up once it is set up. It parses every datagram from
//! the network; if a parser bug ever ran an attacker's code, the process
//! should hold no power beyond its descriptors. Once its raw sockets are
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

/// Whether binding `port` takes CAP_NET_BIND_SERVICE on this host.
pub(crate) fn port_needs_privilege(port: u16) -> bool {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(1024);
    u32::from(port) < start
}

/// Drops every capability but CAP_NET_BIND_SERVICE (with `keep_bind`) and
/// sets no_new_privs. An error leaves the process as it is, minus what was
/// already dropped: the caller logs it and serves on.
pub(crate) fn drop_privileges(keep_bind: bool) -> io::Result<Dropped> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(40)
        .min(63);
    // The bounding set first, while CAP_SETPCAP (if held) is still there.
    let mut bounding_cleared = true;
    for cap in 0..=last {
        if keep_bind && cap == NET_BIND_SERVICE {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            bounding_cleared = false;
        }
    }
    // SAFETY: prctl with integer arguments only; it fails harmlessly where
    // ambient capabilities do not exist.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
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
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Dropped {
        kept_bind,
        bounding_cleared,
    })
}
