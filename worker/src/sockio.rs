//! The few socket calls std, socket2 and quinn-udp do not offer, each in a
//! small function with its `unsafe` audited.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::RawFd;

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};

/// The kernel's count of datagrams dropped on this socket since it was
/// created (SK_MEMINFO_DROPS: the same number as /proc/net/udp's `drops`).
pub fn socket_drops(fd: RawFd) -> io::Result<u32> {
    let mut info = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
    let mut len = size_of::<[u32; libc::SK_MEMINFO_DROPS as usize + 1]>() as libc::socklen_t;
    // SAFETY: `info` is a live, writable buffer of `len` bytes; the kernel
    // writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < size_of::<u32>() * (libc::SK_MEMINFO_DROPS as usize + 1) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "short SO_MEMINFO",
        ));
    }
    Ok(info[libc::SK_MEMINFO_DROPS as usize])
}

/// A non-blocking UDP socket connected to `backend`, with SO_RXQ_OVFL on so
/// every reply carries the socket's drop count.
pub fn connected_upstream(backend: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::DGRAM.nonblocking(),
        Some(Protocol::UDP),
    )?;
    setsockopt(&socket, sockopt::RxqOvfl, &1)?;
    socket.connect(&backend.into())?;
    Ok(socket.into())
}

/// Which per-datagram control messages a listener socket receives: the
/// destination address only when `want_dst` (wildcard binds), never TOS.
pub fn set_recv_control(socket: &UdpSocket, want_dst: bool) -> io::Result<()> {
    if socket.local_addr()?.is_ipv4() {
        setsockopt(socket, sockopt::Ipv4PacketInfo, &want_dst)?;
        setsockopt(socket, sockopt::IpRecvTos, &false)?;
    } else {
        setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &want_dst)?;
        setsockopt(socket, sockopt::Ipv6RecvTClass, &false)?;
        // A dual-stack socket also receives IPv4 datagrams.
        let _ = setsockopt(socket, sockopt::Ipv4PacketInfo, &want_dst);
        let _ = setsockopt(socket, sockopt::IpRecvTos, &false);
    }
    Ok(())
}

/// Receives one datagram from a connected socket into `buf`, with the
/// socket's drop count when the kernel attached one (SO_RXQ_OVFL).
pub fn recv_with_drops(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u32>)> {
    // Room for one cmsghdr carrying a u32, 8-byte aligned.
    let mut control = [MaybeUninit::<u64>::uninit(); 4];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null name, no iov, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 4]>();
    // SAFETY: msg points at the live iovec and control buffer above, whose
    // lengths are given; the kernel writes within them.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut drops = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // bounded by msg_controllen; the payload of SO_RXQ_OVFL is one u32,
    // read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SO_RXQ_OVFL {
                drops = Some(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const u32));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, drops))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn upstream_reports_its_drops() {
        let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
        let up = connected_upstream(backend.local_addr().unwrap()).unwrap();
        // Shrink the receive buffer so a burst overflows it.
        let sock = socket2::SockRef::from(&up);
        sock.set_recv_buffer_size(4096).unwrap();
        let me = up.local_addr().unwrap();
        for _ in 0..200 {
            backend.send_to(&[7u8; 1000], me).unwrap();
        }
        let kernel = socket_drops(up.as_raw_fd()).unwrap();
        assert!(kernel > 0, "the burst must overflow a 4 KiB buffer");
        let mut buf = [0u8; 2048];
        // Every queued datagram was enqueued before the first drop: the
        // kernel attaches no count while it is zero.
        let mut queued = 0;
        while let Ok((n, seen)) = recv_with_drops(up.as_raw_fd(), &mut buf) {
            assert_eq!((n, seen), (1000, None));
            queued += 1;
        }
        assert_eq!(
            queued + kernel,
            200,
            "each datagram is either queued or dropped"
        );
        // One enqueued after the drops carries their count.
        backend.send_to(b"late", me).unwrap();
        let (n, seen) = recv_with_drops(up.as_raw_fd(), &mut buf).unwrap();
        assert_eq!((n, seen), (4, Some(kernel)));
    }
}
