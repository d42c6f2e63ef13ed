//! The socket calls std, socket2 and quinn-udp do not offer, each in a
//! small function with its `unsafe` audited: batched sends with a
//! destination (and a source address) per datagram, batched receives with
//! the sender and the socket's drop count per datagram, and the kernel's
//! drop count on a socket.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::RawFd;

use nix::sys::socket::{setsockopt, sockopt};

/// Datagrams per batched call.
pub(crate) const BATCH: usize = 32;

/// The kernel's count of datagrams dropped on this socket since it was
/// created (SK_MEMINFO_DROPS: the same number as /proc/net/udp's `drops`).
pub(crate) fn socket_drops(fd: RawFd) -> io::Result<u32> {
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

/// Which per-datagram control messages a listener socket receives: the
/// kernel's receive timestamp when `want_stamp` (the queue delay is
/// measured against it), the destination address only when `want_dst`
/// (wildcard binds), never TOS.
pub(crate) fn set_recv_control(
    socket: &UdpSocket,
    want_dst: bool,
    want_stamp: bool,
) -> io::Result<()> {
    // quinn-udp turns SO_TIMESTAMPNS on, and goes on where it fails: the
    // queue delay needs it, so a refusal is an error here.
    setsockopt(socket, sockopt::ReceiveTimestampns, &want_stamp)?;
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

/// A socket address in the kernel's form.
#[derive(Clone, Copy)]
pub(crate) struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    pub(crate) fn new(addr: SocketAddr) -> RawAddr {
        // SAFETY: an all-zero sockaddr_storage is a valid (AF_UNSPEC) value.
        let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for
                // sockaddr_in.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin)
                };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for
                // sockaddr_in6.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6)
                };
                size_of::<libc::sockaddr_in6>()
            }
        };
        RawAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }

    /// For a message header's `msg_name`.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        (&mut self.storage as *mut libc::sockaddr_storage).cast()
    }

    pub(crate) fn len(&self) -> libc::socklen_t {
        self.len
    }
}

/// The socket address the kernel wrote into `storage`.
fn parse_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // the kernel wrote at least that many bytes.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            // A dual-stack socket names IPv4 peers as ::ffff:a.b.c.d.
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, u16::from_be(sin6.sin6_port))),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )),
            })
        }
        _ => None,
    }
}

/// Room for the control messages of one datagram, 8-byte aligned: to send,
/// IPV6_PKTINFO (40 bytes) and UDP_SEGMENT (24) exactly; to receive,
/// SO_RXQ_OVFL and UDP_GRO (16 each).
pub(crate) const CMSG_WORDS: usize = 8;

/// One datagram of a batched send.
pub(crate) struct OutMsg<'a> {
    pub to: SocketAddr,
    /// The source address (IP_PKTINFO / IPV6_PKTINFO), for replies from a
    /// wildcard-bound socket.
    pub from_ip: Option<IpAddr>,
    pub bytes: &'a [u8],
}

/// The most datagrams the kernel takes in one UDP_SEGMENT message
/// (UDP_MAX_SEGMENTS: 64 before Linux 6.5, 128 since).
const MAX_SEGMENTS: usize = 64;
/// The most bytes one UDP_SEGMENT message carries: an IP packet's 65,535
/// less the largest IPv6 and UDP headers.
const MAX_SEGMENTED_BYTES: usize = u16::MAX as usize - 40 - 8;

/// Whether a socket sends runs of datagrams as one message with
/// UDP_SEGMENT (GSO), and how many per message: the kernel cuts the
/// message into datagrams again, at one trip through the send path for
/// the whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gso {
    max_segments: usize,
}

impl Gso {
    /// On where the kernel takes UDP_SEGMENT (Linux 4.18), probed once per
    /// process on a throwaway socket.
    pub(crate) fn probe() -> Gso {
        static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let supported = *SUPPORTED.get_or_init(|| {
            UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|s| {
                    setsockopt(&s, sockopt::UdpGsoSegment, &1200).map_err(io::Error::from)
                })
                .is_ok()
        });
        Gso {
            max_segments: if supported { MAX_SEGMENTS } else { 1 },
        }
    }

    /// One datagram per message.
    pub(crate) fn off() -> Gso {
        Gso { max_segments: 1 }
    }

    pub(crate) fn is_on(&self) -> bool {
        self.max_segments > 1
    }

    /// How many of `msgs`, from the first, go in one message: the run that
    /// shares the first's destination and source, each as long as the
    /// first but the last, which may be shorter (and ends the run), within
    /// the kernel's limits.
    fn run_len(&self, msgs: &[OutMsg<'_>]) -> usize {
        let first = &msgs[0];
        let size = first.bytes.len();
        let (mut n, mut total) = (1, size);
        if size == 0 || size > u16::MAX as usize {
            return 1;
        }
        while n < msgs.len().min(self.max_segments) {
            let m = &msgs[n];
            let len = m.bytes.len();
            if m.to != first.to
                || m.from_ip != first.from_ip
                || len == 0
                || len > size
                || total + len > MAX_SEGMENTED_BYTES
            {
                break;
            }
            total += len;
            n += 1;
            if len < size {
                break;
            }
        }
        n
    }
}

/// What a send coalesced: messages of more than one datagram that went
/// out, and the datagrams they carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Coalesced {
    pub messages: u64,
    pub datagrams: u64,
}

/// Reusable buffers for [`send_batch`].
pub(crate) struct SendBatch {
    names: Vec<RawAddr>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<[u64; CMSG_WORDS]>,
    hdrs: Vec<libc::mmsghdr>,
    /// Per message: its first datagram, how many, and its control length.
    runs: Vec<(usize, usize, usize)>,
}

impl Default for SendBatch {
    fn default() -> SendBatch {
        SendBatch {
            names: Vec::with_capacity(BATCH),
            iovs: Vec::with_capacity(BATCH),
            cmsgs: Vec::with_capacity(BATCH),
            hdrs: Vec::with_capacity(BATCH),
            runs: Vec::with_capacity(BATCH),
        }
    }
}

/// Sends `msgs` on `fd` with as few sendmmsg calls as it takes, runs of
/// one destination as single UDP_SEGMENT messages where `gso` allows. The
/// index of every datagram that did not go out is pushed to `failed`: a
/// full send buffer (that one and all after it), or an error of its own
/// (an unreachable destination, a firewall's EPERM). A segmented message
/// the kernel refuses (EINVAL: a segment over the route's MTU; EIO: a
/// device without checksum offload, after which `gso` is turned off) is
/// sent again one datagram per message, so each failure is a datagram's.
pub(crate) fn send_batch(
    fd: RawFd,
    msgs: &[OutMsg<'_>],
    b: &mut SendBatch,
    gso: &mut Gso,
    failed: &mut Vec<usize>,
) -> Coalesced {
    let mut coalesced = Coalesced::default();
    let mut at = 0;
    // Where a send last failed with an error an ICMP report left on the
    // socket (it belongs to an earlier datagram, perhaps to another
    // backend, and the failed call consumed it): that one is tried again.
    let mut retried = None;
    // Datagrams before this index go one per message (a segmented message
    // holding them was refused).
    let mut plain_until = 0;
    while at < msgs.len() {
        b.names.clear();
        b.iovs.clear();
        b.cmsgs.clear();
        b.hdrs.clear();
        b.runs.clear();
        let mut next = at;
        while next < msgs.len() && b.runs.len() < BATCH {
            let n = if next < plain_until {
                1
            } else {
                gso.run_len(&msgs[next..])
            };
            let first = &msgs[next];
            b.names.push(RawAddr::new(first.to));
            let mut cmsg = [0; CMSG_WORDS];
            let mut len = first.from_ip.map_or(0, |ip| put_pktinfo(&mut cmsg, ip));
            if n > 1 {
                len = put_segment_size(&mut cmsg, len, first.bytes.len() as u16);
            }
            b.cmsgs.push(cmsg);
            for m in &msgs[next..next + n] {
                b.iovs.push(libc::iovec {
                    iov_base: m.bytes.as_ptr() as *mut libc::c_void,
                    iov_len: m.bytes.len(),
                });
            }
            b.runs.push((next, n, len));
            next += n;
        }
        let mut iov = 0;
        for (i, &(_, n, control)) in b.runs.iter().enumerate() {
            // SAFETY: an all-zero mmsghdr is valid (no name, no iov, no control).
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_name = b.names[i].as_mut_ptr();
            h.msg_hdr.msg_namelen = b.names[i].len;
            h.msg_hdr.msg_iov = &mut b.iovs[iov];
            h.msg_hdr.msg_iovlen = n;
            if control > 0 {
                h.msg_hdr.msg_control = b.cmsgs[i].as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = control;
            }
            b.hdrs.push(h);
            iov += n;
        }
        let (start, n, _) = b.runs[0];
        // SAFETY: every header points at live buffers above (a name, its
        // run's iovecs over borrowed datagrams, control space) with their
        // lengths; all were filled before the first pointer was taken, they
        // outlive the call, and the kernel only reads them.
        match unsafe { send_some(fd, &mut b.hdrs) } {
            Sent::Some(k) => {
                for &(_, n, _) in &b.runs[..k] {
                    if n > 1 {
                        coalesced.messages += 1;
                        coalesced.datagrams += n as u64;
                    }
                }
                at = b.runs.get(k).map_or(next, |&(first, _, _)| first);
            }
            Sent::Interrupted => {}
            Sent::Full => {
                failed.extend(at..msgs.len());
                return coalesced;
            }
            Sent::Refused(errno) if n > 1 => {
                if errno == libc::EIO {
                    tracing::info!("the kernel refused a segmented send (EIO): sending one datagram per message from now on");
                    *gso = Gso::off();
                }
                plain_until = start + n;
            }
            Sent::Reported if retried != Some(at) => retried = Some(at),
            Sent::Refused(_) | Sent::Reported => {
                failed.push(at);
                at += 1;
            }
        }
    }
    coalesced
}

/// What one sendmmsg did with the first of its datagrams.
pub(crate) enum Sent {
    /// This many went (at least one).
    Some(usize),
    /// A signal came first: try again.
    Interrupted,
    /// The send buffer is full (EAGAIN, ENOBUFS): it and the rest wait.
    Full,
    /// Its own error (EMSGSIZE, a firewall's EPERM, an unreachable
    /// destination; the errno): the ones after it may go.
    Refused(i32),
    /// ECONNREFUSED, EHOSTUNREACH or ENETUNREACH: with IP_RECVERR, most
    /// likely an ICMP report for an earlier datagram, which this call
    /// consumed without sending: it may go if tried again.
    Reported,
}

/// One non-blocking sendmmsg of `hdrs` on `fd`.
///
/// # Safety
/// Every header must point at live buffers (name, iovecs, control data)
/// with their lengths, none of them touched until the call returns.
pub(crate) unsafe fn send_some(fd: RawFd, hdrs: &mut [libc::mmsghdr]) -> Sent {
    // SAFETY: the caller vouches for the headers; `hdrs` is a live slice of
    // `hdrs.len()` of them.
    let n = unsafe {
        libc::sendmmsg(
            fd,
            hdrs.as_mut_ptr(),
            hdrs.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if n > 0 {
        return Sent::Some(n as usize);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EINTR) => Sent::Interrupted,
        Some(libc::EAGAIN | libc::ENOBUFS) => Sent::Full,
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH) => Sent::Reported,
        errno => Sent::Refused(errno.unwrap_or(0)),
    }
}

/// Writes an IP_PKTINFO (IPv4) or IPV6_PKTINFO control message asking for
/// source address `ip` at the start of `buf`; returns its length.
pub(crate) fn put_pktinfo(buf: &mut [u64; CMSG_WORDS], ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(v4) => put_cmsg(
            buf,
            0,
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            },
        ),
        IpAddr::V6(v6) => put_cmsg(
            buf,
            0,
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                ipi6_ifindex: 0,
            },
        ),
    }
}

/// Writes a UDP_SEGMENT control message (the size the kernel cuts the
/// message's bytes into) at byte `at` of `buf`; returns the length so far.
fn put_segment_size(buf: &mut [u64; CMSG_WORDS], at: usize, size: u16) -> usize {
    put_cmsg(buf, at, libc::SOL_UDP, libc::UDP_SEGMENT, size)
}

/// Writes one control message, `data` of (`level`, `kind`), at byte `at`
/// of `buf` (a multiple of 8, the end of the previous one); returns where
/// it ends.
fn put_cmsg<T: Copy>(
    buf: &mut [u64; CMSG_WORDS],
    at: usize,
    level: libc::c_int,
    kind: libc::c_int,
    data: T,
) -> usize {
    let data_len = size_of::<T>() as u32;
    // SAFETY: CMSG_SPACE and CMSG_LEN compute sizes only.
    let (space, len, data_at) = unsafe {
        (
            libc::CMSG_SPACE(data_len) as usize,
            libc::CMSG_LEN(data_len) as usize,
            libc::CMSG_LEN(0) as usize,
        )
    };
    assert!(at % 8 == 0 && at + space <= size_of::<[u64; CMSG_WORDS]>());
    // SAFETY: an all-zero cmsghdr is valid (it may have padding fields).
    let mut header: libc::cmsghdr = unsafe { zeroed() };
    header.cmsg_len = len as _;
    header.cmsg_level = level;
    header.cmsg_type = kind;
    // SAFETY: `at..at + space` lies inside `buf` (asserted), whose u64
    // words align the header at any multiple of 8; the data goes
    // CMSG_LEN(0) past the header, inside the space, written unaligned.
    unsafe {
        let base = buf.as_mut_ptr().cast::<u8>().add(at);
        std::ptr::write(base.cast::<libc::cmsghdr>(), header);
        std::ptr::write_unaligned(base.add(data_at).cast::<T>(), data);
    }
    at + space
}

/// One datagram of a batched receive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InMeta {
    pub len: usize,
    /// The size of each datagram in the buffer (UDP_GRO: a run of one
    /// sender's datagrams read as one, all this long but the last): `len`
    /// when it holds one.
    pub stride: usize,
    pub from: Option<SocketAddr>,
    /// The socket's lifetime drop count, when the kernel attached it
    /// (SO_RXQ_OVFL: only once the count is non-zero).
    pub drops: Option<u32>,
}

/// Reusable buffers for [`recv_batch`].
pub(crate) struct RecvBatch {
    pub bufs: Vec<Vec<u8>>,
    pub meta: [InMeta; BATCH],
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<[u64; CMSG_WORDS]>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    /// Buffers for `BATCH` datagrams of up to `size` bytes.
    pub(crate) fn new(size: usize) -> RecvBatch {
        RecvBatch {
            bufs: (0..BATCH).map(|_| vec![0u8; size]).collect(),
            meta: [InMeta {
                len: 0,
                stride: 0,
                from: None,
                drops: None,
            }; BATCH],
            // SAFETY: an all-zero sockaddr_storage is valid.
            names: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            iovs: Vec::with_capacity(BATCH),
            cmsgs: vec![[0; CMSG_WORDS]; BATCH],
            hdrs: Vec::with_capacity(BATCH),
        }
    }
}

/// Receives up to `BATCH` datagrams from `fd` with recvmmsg: how many, with
/// each one's sender and drop count in `b.meta`. `Ok(0)` when none waits.
pub(crate) fn recv_batch(fd: RawFd, b: &mut RecvBatch) -> io::Result<usize> {
    b.iovs.clear();
    b.hdrs.clear();
    for buf in b.bufs.iter_mut() {
        b.iovs.push(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        });
    }
    for i in 0..BATCH {
        // SAFETY: an all-zero mmsghdr is valid.
        let mut h: libc::mmsghdr = unsafe { zeroed() };
        h.msg_hdr.msg_name = (&mut b.names[i] as *mut libc::sockaddr_storage).cast();
        h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_hdr.msg_iov = &mut b.iovs[i];
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_control = b.cmsgs[i].as_mut_ptr().cast();
        h.msg_hdr.msg_controllen = size_of::<[u64; CMSG_WORDS]>();
        b.hdrs.push(h);
    }
    // SAFETY: every header points at live, writable buffers of the stated
    // lengths (name storage, one iovec over a datagram buffer, control
    // space) that outlive the call; the kernel writes within them.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            b.hdrs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Ok(0);
        }
        return Err(err);
    }
    let n = n as usize;
    for i in 0..n {
        let h = &b.hdrs[i];
        let mut drops = None;
        let mut stride = 0;
        // SAFETY: the CMSG_* macros walk the control buffer the kernel
        // filled, bounded by msg_controllen; SO_RXQ_OVFL's payload is one
        // u32 and UDP_GRO's one int, read unaligned.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !c.is_null() {
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => {
                        drops = Some(std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const u32));
                    }
                    (libc::SOL_UDP, libc::UDP_GRO) => {
                        let size = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const i32);
                        stride = usize::try_from(size).unwrap_or(0);
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
            }
        }
        let len = h.msg_len as usize;
        b.meta[i] = InMeta {
            len,
            stride: if stride == 0 || stride > len {
                len
            } else {
                stride
            },
            from: parse_addr(&b.names[i], h.msg_hdr.msg_namelen),
            drops,
        };
    }
    Ok(n)
}

/// The largest UDP payload the path to `dst` carries unfragmented, as the
/// kernel's route (with what path MTU discovery taught it) says: a socket
/// connected there (connect() on UDP sends nothing) reads IP_MTU. Where it
/// cannot tell, the most one IP packet carries.
pub(crate) fn path_room(dst: SocketAddr) -> usize {
    use std::os::fd::AsRawFd;
    let (headers, most) = if dst.is_ipv4() {
        (20 + 8, 65_535 - 20 - 8)
    } else {
        // IPv6's payload length leaves out its own 40-byte header.
        (40 + 8, 65_535 - 8)
    };
    let mtu = (|| {
        let probe = socket2::Socket::new(
            socket2::Domain::for_address(dst),
            socket2::Type::DGRAM.cloexec(),
            Some(socket2::Protocol::UDP),
        )
        .ok()?;
        probe.connect(&dst.into()).ok()?;
        let (level, name) = if dst.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_MTU)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_MTU)
        };
        let mut mtu: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `mtu`, which
        // lives on this frame, and the new length into `len`.
        let rc = unsafe {
            libc::getsockopt(
                probe.as_raw_fd(),
                level,
                name,
                (&mut mtu as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(mtu)
    })();
    match mtu {
        Some(mtu) if mtu as usize > headers => (mtu as usize - headers).min(most),
        _ => most,
    }
}

/// An unconnected, non-blocking UDP socket bound to `local` for upstream
/// paths, with SO_RXQ_OVFL on so replies carry its drop count, and UDP_GRO
/// when `gro`. No
/// SO_REUSEADDR: the kernel refuses a (source, port) another socket holds,
/// so two sockets never share a 4-tuple.
pub(crate) fn bound_upstream(local: SocketAddr, gro: bool) -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(local),
        socket2::Type::DGRAM.nonblocking().cloexec(),
        Some(socket2::Protocol::UDP),
    )?;
    if local.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    setsockopt(&socket, sockopt::RxqOvfl, &1)?;
    // A backend's flight to one path (a QUIC stack sends it with GSO) is
    // read as one buffer where the kernel keeps it whole (Linux 5.0): one
    // trip through the receive path for the run. Without it, one each.
    if gro {
        let _ = setsockopt(&socket, sockopt::UdpGroSegment, &true);
    }
    // ICMP errors for what it sends (port unreachable, above all) are
    // queued for it to read, naming the backend they are about: an
    // unconnected socket otherwise never hears of them.
    if local.is_ipv6() {
        setsockopt(&socket, sockopt::Ipv6RecvErr, &true)?;
    } else {
        setsockopt(&socket, sockopt::Ipv4RecvErr, &true)?;
    }
    socket.bind(&local.into())?;
    Ok(socket.into())
}

/// Errors an upstream socket's error queue holds at most per read (the
/// queue is bounded by the socket's receive buffer).
const ERRORS_PER_READ: usize = 256;

/// Reads the error queue of `fd` (IP_RECVERR): each error with the address
/// the datagram that caused it was sent to and its errno. Returns how many.
pub(crate) fn recv_errors(fd: RawFd, mut on: impl FnMut(SocketAddr, i32)) -> usize {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
    let mut n = 0;
    let mut buf = [0u8; 64];
    let mut cmsg = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
    for _ in 0..ERRORS_PER_READ {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let flags = MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT;
        let Ok(msg) = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), flags) else {
            break;
        };
        let to = msg.address.as_ref().and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from(SocketAddrV4::from(*v4)))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|v6| SocketAddr::from(SocketAddrV6::from(*v6)))
                })
        });
        let errno = msg.cmsgs().ok().and_then(|mut c| {
            c.find_map(|m| match m {
                ControlMessageOwned::Ipv4RecvErr(e, _) | ControlMessageOwned::Ipv6RecvErr(e, _) => {
                    Some(e.ee_errno as i32)
                }
                _ => None,
            })
        });
        if let (Some(to), Some(errno)) = (to, errno) {
            on(to, errno);
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn udp(addr: &str) -> UdpSocket {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s
    }

    /// Waits until `fd` has a datagram queued.
    fn readable(fd: &impl std::os::fd::AsFd) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1);
    }

    #[test]
    fn a_batch_goes_to_each_destination_and_comes_back_with_senders_and_drops() {
        let up = bound_upstream("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let (a, b) = (udp("127.0.0.1:0"), udp("127.0.0.1:0"));
        let msgs = [
            OutMsg {
                to: a.local_addr().unwrap(),
                from_ip: None,
                bytes: b"to a",
            },
            OutMsg {
                to: b.local_addr().unwrap(),
                from_ip: None,
                bytes: b"to b",
            },
        ];
        let mut sb = SendBatch::default();
        let mut failed = Vec::new();
        send_batch(up.as_raw_fd(), &msgs, &mut sb, &mut Gso::off(), &mut failed);
        assert!(failed.is_empty());
        let mut buf = [0u8; 16];
        let (n, from) = a.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"to a"[..], up.local_addr().unwrap()));
        let (n, _) = b.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"to b");

        // Replies from both, read in one batch with their senders.
        let me = up.local_addr().unwrap();
        a.send_to(b"from a", me).unwrap();
        b.send_to(b"from b!", me).unwrap();
        let mut rb = RecvBatch::new(2048);
        let mut got = Vec::new();
        while got.len() < 2 {
            readable(&up);
            let n = recv_batch(up.as_raw_fd(), &mut rb).unwrap();
            for i in 0..n {
                let m = rb.meta[i];
                assert_eq!(m.drops, None, "no drops yet: no count attached");
                got.push((m.from.unwrap(), rb.bufs[i][..m.len].to_vec()));
            }
        }
        assert_eq!(
            got,
            vec![
                (a.local_addr().unwrap(), b"from a".to_vec()),
                (b.local_addr().unwrap(), b"from b!".to_vec())
            ]
        );
        assert_eq!(recv_batch(up.as_raw_fd(), &mut rb).unwrap(), 0);

        // Overflow a small buffer: the next datagram carries the count.
        socket2::SockRef::from(&up)
            .set_recv_buffer_size(4096)
            .unwrap();
        for _ in 0..200 {
            a.send_to(&[7u8; 1000], me).unwrap();
        }
        let kernel = socket_drops(up.as_raw_fd()).unwrap();
        assert!(kernel > 0);
        let mut queued = 0;
        loop {
            let n = recv_batch(up.as_raw_fd(), &mut rb).unwrap();
            if n == 0 {
                break;
            }
            queued += n as u32;
        }
        assert_eq!(
            queued + kernel,
            200,
            "each datagram is either queued or dropped"
        );
        a.send_to(b"late", me).unwrap();
        readable(&up);
        assert_eq!(recv_batch(up.as_raw_fd(), &mut rb).unwrap(), 1);
        assert_eq!(rb.meta[0].drops, Some(kernel));
    }

    /// Sends `msgs` on `fd` with `gso`, expecting every one to go.
    fn send_all(fd: RawFd, msgs: &[OutMsg<'_>], gso: &mut Gso) -> Coalesced {
        let mut failed = Vec::new();
        let c = send_batch(fd, msgs, &mut SendBatch::default(), gso, &mut failed);
        assert!(failed.is_empty(), "{failed:?}");
        c
    }

    /// Reads what `s` has (a socket without GRO: one datagram per read).
    fn read_all(s: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        (0..n)
            .map(|_| {
                let (len, _) = s.recv_from(&mut buf).unwrap();
                buf[..len].to_vec()
            })
            .collect()
    }

    fn flight(tag: u8, sizes: &[usize]) -> Vec<Vec<u8>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![tag.wrapping_add(i as u8); n])
            .collect()
    }

    #[test]
    fn runs_to_one_address_go_as_one_segmented_message_and_arrive_as_datagrams() {
        let gso = Gso::probe();
        assert!(gso.is_on(), "this kernel takes UDP_SEGMENT (4.18)");
        let out = udp("127.0.0.1:0");
        let (a, b) = (udp("127.0.0.1:0"), udp("127.0.0.1:0"));
        // A flight of ten to a, the last shorter; one to b; two to a.
        let mut sizes = vec![1350; 9];
        sizes.push(700);
        let to_a = flight(1, &sizes);
        let to_b = flight(100, &[1350]);
        let again = flight(200, &[1350, 1350]);
        fn msg<'a>(to: &UdpSocket, bytes: &'a [u8]) -> OutMsg<'a> {
            OutMsg {
                to: to.local_addr().unwrap(),
                from_ip: None,
                bytes,
            }
        }
        let mut msgs: Vec<OutMsg<'_>> = to_a.iter().map(|d| msg(&a, d)).collect();
        msgs.push(msg(&b, &to_b[0]));
        msgs.extend(again.iter().map(|d| msg(&a, d)));
        let mut g = gso;
        let c = send_all(out.as_raw_fd(), &msgs, &mut g);
        assert_eq!(
            c,
            Coalesced {
                messages: 2,
                datagrams: 12
            }
        );
        let mut want = to_a.clone();
        want.extend(again.iter().cloned());
        assert_eq!(read_all(&a, 12), want, "each datagram whole, in order");
        assert_eq!(read_all(&b, 1), to_b);

        // A longer datagram ends a run (the kernel cuts at the first's size),
        // and so does a different source address.
        let mixed = flight(7, &[500, 1000, 1000]);
        let msgs: Vec<OutMsg<'_>> = mixed.iter().map(|d| msg(&a, d)).collect();
        let c = send_all(out.as_raw_fd(), &msgs, &mut g);
        assert_eq!(
            c,
            Coalesced {
                messages: 1,
                datagrams: 2
            }
        );
        assert_eq!(read_all(&a, 3), mixed);
        // Off: one datagram per message.
        let c = send_all(out.as_raw_fd(), &msgs, &mut Gso::off());
        assert_eq!(c, Coalesced::default());
        assert_eq!(read_all(&a, 3), mixed);
    }

    #[test]
    fn a_refused_segmented_message_goes_again_one_datagram_each() {
        // The kernel refuses UDP_SEGMENT on a socket that skips checksums
        // (EINVAL), as it does a segment over the route's MTU.
        let out = udp("127.0.0.1:0");
        setsockopt(&out, sockopt::UdpGsoSegment, &0).unwrap();
        // SAFETY: setsockopt reads one int from a live local.
        let rc = unsafe {
            let one: libc::c_int = 1;
            libc::setsockopt(
                out.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let a = udp("127.0.0.1:0");
        let datagrams = flight(3, &[1200, 1200, 1200, 40]);
        let msgs: Vec<OutMsg<'_>> = datagrams
            .iter()
            .map(|d| OutMsg {
                to: a.local_addr().unwrap(),
                from_ip: None,
                bytes: d,
            })
            .collect();
        let mut gso = Gso::probe();
        let c = send_all(out.as_raw_fd(), &msgs, &mut gso);
        assert_eq!(c, Coalesced::default(), "none went segmented");
        assert_eq!(read_all(&a, 4), datagrams);
        assert!(gso.is_on(), "EINVAL is this message's, not the device's");
    }

    #[test]
    fn a_backends_segmented_flight_is_read_as_one_buffer_with_its_stride() {
        let up = bound_upstream("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let backend = udp("127.0.0.1:0");
        let mut sizes = vec![1350; 9];
        sizes.push(100);
        let datagrams = flight(9, &sizes);
        let msgs: Vec<OutMsg<'_>> = datagrams
            .iter()
            .map(|d| OutMsg {
                to: up.local_addr().unwrap(),
                from_ip: None,
                bytes: d,
            })
            .collect();
        send_all(backend.as_raw_fd(), &msgs, &mut Gso::probe());
        readable(&up);
        let mut rb = RecvBatch::new(65536);
        assert_eq!(recv_batch(up.as_raw_fd(), &mut rb).unwrap(), 1);
        let m = rb.meta[0];
        assert_eq!((m.len, m.stride), (9 * 1350 + 100, 1350));
        assert_eq!(m.from, Some(backend.local_addr().unwrap()));
        assert_eq!(rb.bufs[0][..m.len], datagrams.concat()[..]);

        // Without GRO the kernel cuts it again: ten reads of one each.
        let plain = bound_upstream("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let msgs: Vec<OutMsg<'_>> = msgs
            .iter()
            .map(|m| OutMsg {
                to: plain.local_addr().unwrap(),
                ..*m
            })
            .collect();
        send_all(backend.as_raw_fd(), &msgs, &mut Gso::probe());
        let mut got = Vec::new();
        while got.len() < 10 {
            readable(&plain);
            let n = recv_batch(plain.as_raw_fd(), &mut rb).unwrap();
            for i in 0..n {
                let m = rb.meta[i];
                assert_eq!(m.stride, m.len);
                got.push(rb.bufs[i][..m.len].to_vec());
            }
        }
        assert_eq!(got, datagrams);
    }

    #[test]
    fn a_bound_port_is_refused_to_a_second_socket() {
        let first = bound_upstream("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let taken = first.local_addr().unwrap();
        let err = bound_upstream(taken, true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    }

    #[test]
    fn replies_from_a_wildcard_socket_leave_from_the_address_asked_for() {
        let wild = udp("0.0.0.0:0");
        let port = wild.local_addr().unwrap().port();
        let peer = udp("127.0.0.1:0");
        // One alone, then a segmented run: the source rides beside the
        // segment size.
        let sources = ["127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.3"];
        let msgs: Vec<OutMsg<'_>> = sources
            .iter()
            .map(|ip| OutMsg {
                to: peer.local_addr().unwrap(),
                from_ip: Some(ip.parse().unwrap()),
                bytes: b"xy",
            })
            .collect();
        let c = send_all(wild.as_raw_fd(), &msgs, &mut Gso::probe());
        assert_eq!(c.datagrams, 3);
        for ip in sources {
            let mut buf = [0u8; 4];
            let (n, from) = peer.recv_from(&mut buf).unwrap();
            assert_eq!((n, from), (2, SocketAddr::new(ip.parse().unwrap(), port)));
        }
    }

    #[test]
    fn an_ipv6_run_leaves_segmented_from_the_address_asked_for() {
        let Ok(wild) = UdpSocket::bind("[::]:0") else {
            return; // no IPv6 on this host
        };
        let Ok(peer) = UdpSocket::bind("[::1]:0") else {
            return;
        };
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let datagrams = flight(5, &[1200, 1200, 1200, 300]);
        let msgs: Vec<OutMsg<'_>> = datagrams
            .iter()
            .map(|d| OutMsg {
                to: peer.local_addr().unwrap(),
                from_ip: Some("::1".parse().unwrap()),
                bytes: d,
            })
            .collect();
        let c = send_all(wild.as_raw_fd(), &msgs, &mut Gso::probe());
        assert_eq!(
            c,
            Coalesced {
                messages: 1,
                datagrams: 4
            }
        );
        let port = wild.local_addr().unwrap().port();
        let mut buf = vec![0u8; 2048];
        for d in &datagrams {
            let (n, from) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(
                (&buf[..n], from),
                (&d[..], SocketAddr::new("::1".parse().unwrap(), port))
            );
        }
    }

    #[test]
    fn addresses_round_trip_through_the_kernel_form() {
        for a in ["127.0.0.1:9", "[::1]:443", "[2001:db8::1]:65535"] {
            let addr: SocketAddr = a.parse().unwrap();
            let raw = RawAddr::new(addr);
            assert_eq!(parse_addr(&raw.storage, raw.len), Some(addr));
        }
    }
}
