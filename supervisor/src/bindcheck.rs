//! `check-config`'s bind probe: can this listener address be bound, as
//! `nginx -t` would find out? A running udpshard already holding the address
//! is fine (a restart or reload takes it over); anything else holding it, or
//! an address this host does not have, is an error now rather than at start.
//!
//! The probe never joins a running reuseport group (it binds without
//! SO_REUSEPORT), so it cannot take a datagram meant for the service.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use socket2::{Domain, Protocol, Socket, Type};
use udpshard_shared::procnet::{udp_sockets, UdpSocketEntry};
use udpshard_shared::stats::{Header, Snapshot};

/// What the probe found for an address that can be used.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Probe {
    Free,
    /// Held by the running udpshard that the config's stats file names.
    HeldByRunning {
        pid: u32,
    },
}

#[derive(Debug)]
pub(crate) enum ProbeError {
    /// This user may not bind it (a port below 1024 without
    /// CAP_NET_BIND_SERVICE): the service, with the capability, may.
    Denied(io::Error),
    /// Another program holds it.
    InUse(String),
    /// The host cannot bind it at all (an address it does not have).
    Unavailable(io::Error),
}

/// Probes `addr`; `stats_file` is where a running udpshard with this config
/// keeps its counters.
pub(crate) fn probe(addr: SocketAddr, stats_file: &Path) -> Result<Probe, ProbeError> {
    if addr.port() == 0 {
        return Ok(Probe::Free);
    }
    let bound = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .and_then(|s| s.bind(&addr.into()));
    match bound {
        Ok(()) => Ok(Probe::Free),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
            Err(ProbeError::Denied(e))
        }
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            let holders = holders(addr);
            let running = running_supervisor(stats_file);
            match running {
                Some((pid, uid)) if !holders.is_empty() && holders.iter().all(|h| *h == uid) => {
                    Ok(Probe::HeldByRunning { pid })
                }
                _ => {
                    let uids: Vec<String> = holders.iter().map(|u| u.to_string()).collect();
                    Err(ProbeError::InUse(if uids.is_empty() {
                        "in use by another program".into()
                    } else {
                        format!(
                            "in use by another program (socket owner uid {}; `ss -uanp` names it)",
                            uids.join(", ")
                        )
                    }))
                }
            }
        }
        Err(e) => Err(ProbeError::Unavailable(e)),
    }
}

/// The owners (uids) of the UDP sockets whose local address conflicts with
/// `addr`: the same port, and the same address or a wildcard on either side.
fn holders(addr: SocketAddr) -> Vec<u32> {
    let mut uids = Vec::new();
    for UdpSocketEntry { local, uid, .. } in udp_sockets() {
        let overlaps = local.ip() == addr.ip()
            || local.ip().is_unspecified()
            || addr.ip().is_unspecified()
            || local.ip() == mapped(addr.ip());
        if local.port() == addr.port() && overlaps && !uids.contains(&uid) {
            uids.push(uid);
        }
    }
    uids
}

fn mapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    }
}

/// The running supervisor that `stats_file` names: its pid and uid.
fn running_supervisor(stats_file: &Path) -> Option<(u32, u32)> {
    let snap = Snapshot::read(stats_file).ok()?;
    let pid = u32::try_from(snap.header(Header::SupervisorPid)).ok()?;
    let ticks = crate::process::start_ticks(pid)?;
    if ticks != snap.header(Header::SupervisorStartTicks) || crate::process::is_gone(pid) {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((pid, uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_held_by_another_socket_is_in_use_and_a_free_one_is_free() {
        let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let none = Path::new("/nonexistent/stats");
        match probe(addr, none) {
            Err(ProbeError::InUse(what)) => assert!(what.contains("another program"), "{what}"),
            other => panic!("{other:?}"),
        }
        drop(held);
        assert_eq!(probe(addr, none).unwrap(), Probe::Free);
        assert_eq!(
            probe("127.0.0.1:0".parse().unwrap(), none).unwrap(),
            Probe::Free
        );
        // An address this host does not have (TEST-NET-1).
        assert!(matches!(
            probe("192.0.2.1:4433".parse().unwrap(), none),
            Err(ProbeError::Unavailable(_))
        ));
    }
}
