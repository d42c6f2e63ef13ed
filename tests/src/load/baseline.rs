//! What the two baseline proxies (`naive-proxy`, `floor-proxy`) share: socket setup, the stop
//! signal, and the naive proxy's choice of backend.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::datagram::CID_LEN;

/// SO_RCVBUF every proxy in the benchmark asks for (udpshard's `recv_buffer = "4MiB"`).
pub const DEFAULT_RECV_BUFFER: &str = "4MiB";
/// How often a blocked receive wakes up to look at the stop flag.
pub const STOP_POLL: Duration = Duration::from_millis(200);

/// A flag that SIGTERM and SIGINT set.
pub fn stop_on_signals() -> io::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    Ok(stop)
}

/// A UDP socket on `addr` with SO_RCVBUF `recv_buffer` (clamped by the kernel to
/// `net.core.rmem_max`), an SO_RCVTIMEO of [`STOP_POLL`] so that the receiving loop sees the
/// stop flag, and SO_REUSEPORT if asked.
pub fn bind_listener(
    addr: SocketAddr,
    recv_buffer: usize,
    reuse_port: bool,
) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_recv_buffer_size(recv_buffer)?;
    socket.set_read_timeout(Some(STOP_POLL))?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A socket connected to `backend`, from an ephemeral port of the matching family.
pub fn connect_upstream(backend: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if backend.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(backend)?;
    Ok(socket)
}

/// The backend of a datagram for the naive proxy: FNV-1a of the short-header CID (bytes
/// 1..9, fewer if the datagram is shorter) modulo `backends`. 0 when there are no backends.
pub fn backend_for(datagram: &[u8], backends: usize) -> usize {
    if backends == 0 {
        return 0;
    }
    let end = datagram.len().min(1 + CID_LEN);
    let cid = datagram.get(1..end).unwrap_or(&[]);
    let hash = cid.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % backends as u64) as usize
}

/// The CPUs this process may run on (`sched_getaffinity`), in increasing order.
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::datagram::{flow_cid, Datagram};

    #[test]
    fn backend_choice_is_stable_and_spread() {
        let mut counts = [0usize; 2];
        for flow in 0..2000 {
            let mut buf = [0u8; 33];
            Datagram {
                cid: flow_cid(flow),
                seq: flow as u64,
                sent_ns: 7,
            }
            .encode(&mut buf)
            .unwrap();
            let backend = backend_for(&buf, 2);
            // Only the CID matters, not the sequence number or time.
            buf[10] ^= 0xFF;
            assert_eq!(backend_for(&buf, 2), backend);
            counts[backend] += 1;
        }
        assert!(counts.iter().all(|&n| n > 800), "{counts:?}");
    }

    #[test]
    fn short_or_empty_datagrams_do_not_panic() {
        assert_eq!(backend_for(&[], 3), backend_for(&[0x40], 3));
        assert!(backend_for(&[0x40, 1, 2], 3) < 3);
        assert_eq!(backend_for(&[0x40, 1, 2], 0), 0);
    }

    #[test]
    fn this_process_may_run_somewhere() {
        assert!(!allowed_cpus().is_empty());
    }
}
