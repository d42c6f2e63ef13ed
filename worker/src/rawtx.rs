//! Forwards sent as whole IP packets on one raw socket per family.
//!
//! Each path has its own upstream port, so at scale nearly every forward of
//! a flush leaves from a different socket, and per-socket sendmmsg degrades
//! to one syscall per datagram. A raw socket (`IPPROTO_RAW`, which implies
//! IP_HDRINCL) takes datagrams from any number of upstream ports in one
//! sendmmsg: the worker writes the IP and UDP headers itself, the datagram
//! leaves with exactly the 4-tuple its upstream socket would have given it,
//! and the backend's reply arrives on that socket as before.
//!
//! Each packet carries IP_PKTINFO (IPV6_PKTINFO) naming its source, so the
//! kernel routes it as it would the upstream socket's datagram: rules that
//! select a route by source address apply.
//!
//! The packet differs from the kernel's UDP output in a few ways, all
//! deliberate:
//! - IPv4: DF is clear. The kernel's UDP socket (IP_PMTUDISC_WANT) fragments
//!   a datagram over the path MTU; a raw packet with DF would instead be
//!   refused or dropped. Without DF, one over the path MTU is fragmented.
//!   IPv6 has no DF: a raw packet over the path MTU is refused (EMSGSIZE),
//!   and goes out on its own socket, which fragments it.
//! - The UDP checksum is computed here, not offloaded.
//! - TTL (hop limit) is 64 whatever `ip_default_ttl` says; the IPv6 flow
//!   label and the traffic class are 0, as the upstream sockets send them.
//!
//! Sending takes CAP_NET_RAW. Without it [`RawTx::open`] finds no socket
//! and every forward goes out on its own upstream socket. A datagram the raw
//! socket refuses (larger than the device's MTU, a full send buffer, any
//! error) is handed back, and the caller sends it on its own socket: the raw
//! path loses nothing the socket path would have sent (a queue discipline
//! that drops a packet after the send succeeded drops it on either path).
//! After a full send buffer the rest of the family's datagrams are handed
//! back too, so none of a path's later datagrams overtakes them; one refused
//! for an error of its own may be overtaken by later ones of its path.

use std::io;
use std::mem::zeroed;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{setsockopt, sockopt};

use crate::sockio::{put_pktinfo, send_some, RawAddr, Sent, BATCH, CMSG_WORDS};

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;
/// Room for the larger header pair.
const HEADER_ROOM: usize = IPV6_HEADER + UDP_HEADER;
const TTL: u8 = 64;
/// Every forward of a worker shares one raw socket, so it gets a send
/// buffer the size of many upstream sockets' (forced past wmem_max where
/// the process may).
const SEND_BUFFER: usize = 4 << 20;
/// The largest UDP payload either family carries in one packet (IPv4's
/// 16-bit total length; IPv6 without jumbograms has 65,527).
const MAX_PAYLOAD: usize = 65_535 - IPV4_HEADER - UDP_HEADER;

/// One datagram to send: from `src` (the path's upstream address, source IP
/// resolved) to `dst`.
#[derive(Clone, Copy)]
pub(crate) struct RawMsg<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub bytes: &'a [u8],
}

/// The raw sockets, and reusable buffers for one send.
pub(crate) struct RawTx {
    v4: Option<OwnedFd>,
    v6: Option<OwnedFd>,
    headers: Vec<[u8; HEADER_ROOM]>,
    names: Vec<RawAddr>,
    cmsgs: Vec<[u64; CMSG_WORDS]>,
    iovs: Vec<[libc::iovec; 2]>,
    hdrs: Vec<libc::mmsghdr>,
    /// Indexes (into the caller's messages) of this family's batch.
    picked: Vec<usize>,
    /// Of those, the ones with headers, and the headers' lengths.
    sendable: Vec<(usize, usize)>,
}

impl RawTx {
    /// No raw sockets: every forward goes out on its own socket.
    pub(crate) fn none() -> RawTx {
        RawTx {
            v4: None,
            v6: None,
            headers: Vec::with_capacity(BATCH),
            names: Vec::with_capacity(BATCH),
            cmsgs: Vec::with_capacity(BATCH),
            iovs: Vec::with_capacity(BATCH),
            hdrs: Vec::with_capacity(BATCH),
            picked: Vec::with_capacity(BATCH),
            sendable: Vec::with_capacity(BATCH),
        }
    }

    /// Opens a raw socket for each family asked for (`v4`, `v6`: those of
    /// the backends) that the process may (CAP_NET_RAW); the errors of those
    /// it could not.
    pub(crate) fn open(v4: bool, v6: bool) -> (RawTx, Vec<io::Error>) {
        let mut tx = RawTx::none();
        let mut errors = Vec::new();
        if v4 {
            match raw_socket(socket2::Domain::IPV4) {
                Ok(fd) => tx.v4 = Some(fd),
                Err(e) => errors.push(e),
            }
        }
        if v6 {
            match raw_socket(socket2::Domain::IPV6) {
                Ok(fd) => tx.v6 = Some(fd),
                Err(e) => errors.push(e),
            }
        }
        (tx, errors)
    }

    /// Whether datagrams of this family can go out here.
    pub(crate) fn carries(&self, ipv4: bool) -> bool {
        if ipv4 {
            self.v4.is_some()
        } else {
            self.v6.is_some()
        }
    }

    /// Whether any family can.
    pub(crate) fn is_on(&self) -> bool {
        self.v4.is_some() || self.v6.is_some()
    }

    /// Sends datagrams `msg(0..count)` (each `src` and `dst` of one family,
    /// one the raw socket carries) in as few sendmmsg calls as it takes. The
    /// index of every datagram that did not go out is pushed to `refused`,
    /// for the caller to send on its own socket.
    pub(crate) fn send<'a>(
        &mut self,
        count: usize,
        msg: impl Fn(usize) -> RawMsg<'a>,
        refused: &mut Vec<usize>,
    ) {
        for ipv4 in [true, false] {
            let fd = match (ipv4, &self.v4, &self.v6) {
                (true, Some(fd), _) | (false, _, Some(fd)) => fd.as_raw_fd(),
                _ => {
                    refused.extend((0..count).filter(|&i| msg(i).dst.is_ipv4() == ipv4));
                    continue;
                }
            };
            let mut start = 0;
            while start < count {
                self.picked.clear();
                let mut i = start;
                while i < count && self.picked.len() < BATCH {
                    if msg(i).dst.is_ipv4() == ipv4 {
                        self.picked.push(i);
                    }
                    i += 1;
                }
                start = i;
                if !self.picked.is_empty() && !self.send_picked(fd, &msg, refused) {
                    // The buffer is full: the rest of this family go out on
                    // their own sockets, after those refused just now.
                    refused.extend((start..count).filter(|&i| msg(i).dst.is_ipv4() == ipv4));
                    break;
                }
            }
        }
    }

    /// One batch: the datagrams `picked` names, all of one family. False
    /// when the send buffer filled (the batch's unsent ones are refused).
    fn send_picked<'a>(
        &mut self,
        fd: RawFd,
        msg: &impl Fn(usize) -> RawMsg<'a>,
        refused: &mut Vec<usize>,
    ) -> bool {
        self.headers.clear();
        self.names.clear();
        self.cmsgs.clear();
        self.iovs.clear();
        self.hdrs.clear();
        self.sendable.clear();
        for &i in &self.picked {
            let m = msg(i);
            let mut header = [0u8; HEADER_ROOM];
            match write_headers(&mut header, m.src, m.dst, m.bytes) {
                Some(len) => {
                    self.headers.push(header);
                    // The port of a raw socket's destination names a
                    // protocol (IPv6 refuses one over 255): always 0. The
                    // scope of a link-local backend stays.
                    let mut to = m.dst;
                    to.set_port(0);
                    self.names.push(RawAddr::new(to));
                    self.cmsgs.push([0; CMSG_WORDS]);
                    self.sendable.push((i, len));
                }
                None => refused.push(i),
            }
        }
        for (k, &(i, len)) in self.sendable.iter().enumerate() {
            let bytes = msg(i).bytes;
            self.iovs.push([
                libc::iovec {
                    iov_base: self.headers[k].as_mut_ptr().cast(),
                    iov_len: len,
                },
                libc::iovec {
                    iov_base: bytes.as_ptr() as *mut libc::c_void,
                    iov_len: bytes.len(),
                },
            ]);
        }
        for (k, &(i, _)) in self.sendable.iter().enumerate() {
            let control = put_pktinfo(&mut self.cmsgs[k], msg(i).src.ip());
            // SAFETY: an all-zero mmsghdr is valid (no name, no iov, no control).
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_name = self.names[k].as_mut_ptr();
            h.msg_hdr.msg_namelen = self.names[k].len();
            h.msg_hdr.msg_iov = self.iovs[k].as_mut_ptr();
            h.msg_hdr.msg_iovlen = 2;
            h.msg_hdr.msg_control = self.cmsgs[k].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = control;
            self.hdrs.push(h);
        }
        let mut at = 0;
        while at < self.hdrs.len() {
            // SAFETY: every header points at live buffers of this struct
            // (name, control message, two iovecs: the headers written above
            // and a borrowed datagram) with their lengths; all were filled
            // before the first pointer was taken, none is touched until the
            // call returns, and the kernel only reads them.
            match unsafe { send_some(fd, &mut self.hdrs[at..]) } {
                Sent::Some(n) => at += n,
                Sent::Interrupted => {}
                // The rest go out on their own sockets.
                Sent::Full => {
                    refused.extend(self.sendable[at..].iter().map(|&(i, _)| i));
                    return false;
                }
                // This datagram's own error (EMSGSIZE over the device's
                // MTU, a firewall's EPERM): its socket may do better.
                Sent::Refused(_) | Sent::Reported => {
                    refused.push(self.sendable[at].0);
                    at += 1;
                }
            }
        }
        true
    }
}

/// A send-only raw socket of `domain` with IP_HDRINCL.
fn raw_socket(domain: socket2::Domain) -> io::Result<OwnedFd> {
    let socket = socket2::Socket::new(
        domain,
        socket2::Type::RAW.nonblocking().cloexec(),
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )?;
    // Nothing is ever read from it (an IPPROTO_RAW socket receives nothing),
    // so the receive side gets the smallest buffer.
    let _ = socket.set_recv_buffer_size(0);
    if setsockopt(&socket, sockopt::SndBufForce, &SEND_BUFFER).is_err() {
        let _ = socket.set_send_buffer_size(SEND_BUFFER);
    }
    Ok(socket.into())
}

/// Writes the IP and UDP headers of `payload` from `src` to `dst` into
/// `out`; their length, or `None` when the pair cannot be one packet
/// (families differ, the payload is too large).
pub(crate) fn write_headers(
    out: &mut [u8; HEADER_ROOM],
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Option<usize> {
    if payload.len() > MAX_PAYLOAD {
        return None;
    }
    let udp_len = (UDP_HEADER + payload.len()) as u16;
    let (ip_len, mut sum) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (IPV4_HEADER + UDP_HEADER + payload.len()) as u16;
            let h = &mut out[..IPV4_HEADER];
            h[0] = 0x45;
            h[1] = 0;
            h[2..4].copy_from_slice(&total.to_be_bytes());
            // Identification 0: the kernel picks one. Flags and offset 0:
            // no DF (see the module's note). Checksum 0: the kernel fills it.
            h[4..8].fill(0);
            h[8] = TTL;
            h[9] = libc::IPPROTO_UDP as u8;
            h[10..12].fill(0);
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let mut pseudo = [0u8; 12];
            pseudo[..4].copy_from_slice(&s.octets());
            pseudo[4..8].copy_from_slice(&d.octets());
            pseudo[9] = libc::IPPROTO_UDP as u8;
            pseudo[10..12].copy_from_slice(&udp_len.to_be_bytes());
            (IPV4_HEADER, sum_words(&pseudo))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let h = &mut out[..IPV6_HEADER];
            // Version 6, traffic class 0, flow label 0.
            h[..4].copy_from_slice(&[0x60, 0, 0, 0]);
            h[4..6].copy_from_slice(&udp_len.to_be_bytes());
            h[6] = libc::IPPROTO_UDP as u8;
            h[7] = TTL;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            let mut pseudo = [0u8; 40];
            pseudo[..16].copy_from_slice(&s.octets());
            pseudo[16..32].copy_from_slice(&d.octets());
            pseudo[34..36].copy_from_slice(&udp_len.to_be_bytes());
            pseudo[39] = libc::IPPROTO_UDP as u8;
            (IPV6_HEADER, sum_words(&pseudo))
        }
        _ => return None,
    };
    let udp = &mut out[ip_len..ip_len + UDP_HEADER];
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].fill(0);
    sum += sum_words(udp);
    sum += sum_words(payload);
    let checksum = match !fold(sum) {
        // A computed 0 is sent as all ones (0 means "none" to IPv4 and is
        // invalid in IPv6).
        0 => 0xffff,
        c => c,
    };
    // `fold` works on native-order words, so the result is stored as such.
    udp[6..8].copy_from_slice(&checksum.to_ne_bytes());
    Some(ip_len + UDP_HEADER)
}

/// The one's-complement sum of `bytes` as 16-bit words (a zero byte padding
/// an odd tail), unfolded, in native byte order (RFC 1071's byte-order
/// independence). `bytes` starts on an even offset of the checksummed data.
#[inline]
fn sum_words(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut chunks = bytes.chunks_exact(4);
    for c in &mut chunks {
        sum += u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut tail = [0u8; 4];
        tail[..rest.len()].copy_from_slice(rest);
        sum += u64::from(u32::from_ne_bytes(tail));
    }
    sum
}

/// Folds a sum of native-order words to 16 bits.
#[inline]
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    /// RFC 768's checksum, the plain way: big-endian 16-bit words.
    fn reference(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> u16 {
        let udp_len = (UDP_HEADER + payload.len()) as u32;
        let mut data = Vec::new();
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                data.extend_from_slice(&s.octets());
                data.extend_from_slice(&d.octets());
                data.extend_from_slice(&[0, 17]);
                data.extend_from_slice(&(udp_len as u16).to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                data.extend_from_slice(&s.octets());
                data.extend_from_slice(&d.octets());
                data.extend_from_slice(&udp_len.to_be_bytes());
                data.extend_from_slice(&[0, 0, 0, 17]);
            }
            _ => unreachable!(),
        }
        data.extend_from_slice(&src.port().to_be_bytes());
        data.extend_from_slice(&dst.port().to_be_bytes());
        data.extend_from_slice(&(udp_len as u16).to_be_bytes());
        data.extend_from_slice(&[0, 0]);
        data.extend_from_slice(payload);
        if data.len() % 2 == 1 {
            data.push(0);
        }
        let mut sum: u32 = 0;
        for w in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        match !(sum as u16) {
            0 => 0xffff,
            c => c,
        }
    }

    fn addr() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
        prop_oneof![
            (
                any::<[u8; 4]>(),
                any::<[u8; 4]>(),
                any::<u16>(),
                any::<u16>()
            )
                .prop_map(|(s, d, sp, dp)| (
                    SocketAddr::new(IpAddr::from(s), sp),
                    SocketAddr::new(IpAddr::from(d), dp)
                )),
            (
                any::<[u8; 16]>(),
                any::<[u8; 16]>(),
                any::<u16>(),
                any::<u16>()
            )
                .prop_map(|(s, d, sp, dp)| (
                    SocketAddr::new(IpAddr::from(s), sp),
                    SocketAddr::new(IpAddr::from(d), dp)
                )),
        ]
    }

    proptest! {
        #[test]
        fn checksum_matches_rfc_768(
            (src, dst) in addr(),
            payload in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let mut h = [0u8; HEADER_ROOM];
            let len = write_headers(&mut h, src, dst, &payload).unwrap();
            let udp = &h[len - UDP_HEADER..len];
            prop_assert_eq!(u16::from_be_bytes([udp[6], udp[7]]), reference(src, dst, &payload));
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    prop_assert_eq!(len, 28);
                    prop_assert_eq!(h[0], 0x45);
                    prop_assert_eq!(usize::from(u16::from_be_bytes([h[2], h[3]])), 28 + payload.len());
                    // No DF, no fragment offset; the kernel picks the ID.
                    prop_assert_eq!(&h[4..8], &[0, 0, 0, 0]);
                    prop_assert_eq!(h[8], TTL);
                    prop_assert_eq!(h[9], 17);
                    prop_assert_eq!(&h[12..16], &s.octets());
                    prop_assert_eq!(&h[16..20], &d.octets());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    prop_assert_eq!(len, 48);
                    prop_assert_eq!(&h[0..4], &[0x60, 0, 0, 0]);
                    prop_assert_eq!(usize::from(u16::from_be_bytes([h[4], h[5]])), 8 + payload.len());
                    prop_assert_eq!(h[6], 17);
                    prop_assert_eq!(h[7], TTL);
                    prop_assert_eq!(&h[8..24], &s.octets());
                    prop_assert_eq!(&h[24..40], &d.octets());
                }
                _ => unreachable!(),
            }
            prop_assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), src.port());
            prop_assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), dst.port());
            prop_assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), payload.len() + 8);
        }
    }

    #[test]
    fn mixed_families_and_oversized_payloads_are_not_packets() {
        let mut h = [0u8; HEADER_ROOM];
        let v4: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        assert_eq!(write_headers(&mut h, v4, v6, b"x"), None);
        assert_eq!(
            write_headers(&mut h, v4, v4, &vec![0; MAX_PAYLOAD + 1]),
            None
        );
        assert_eq!(
            write_headers(&mut h, v4, v4, &vec![0; MAX_PAYLOAD]),
            Some(28)
        );
    }

    /// Over loopback the receiver checks the checksum (a raw packet is not
    /// marked as verified), so a datagram that arrives proves it right.
    #[test]
    fn raw_datagrams_arrive_from_the_source_they_name() {
        let (mut tx, _) = RawTx::open(true, true);
        if !tx.is_on() {
            // No CAP_NET_RAW here: the e2e tests cover the socket path.
            eprintln!("skipped: no raw socket (CAP_NET_RAW)");
            return;
        }
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The sources are sockets of ours, so nothing else owns the ports.
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.2:0").unwrap();
        let to = sink.local_addr().unwrap();
        let odd = vec![0xa5u8; 1201];
        let msgs = [
            RawMsg {
                src: a.local_addr().unwrap(),
                dst: to,
                bytes: b"first",
            },
            RawMsg {
                src: b.local_addr().unwrap(),
                dst: to,
                bytes: &odd,
            },
            RawMsg {
                src: a.local_addr().unwrap(),
                dst: to,
                bytes: b"",
            },
        ];
        let mut refused = Vec::new();
        tx.send(msgs.len(), |i| msgs[i], &mut refused);
        assert!(refused.is_empty(), "{refused:?}");
        let mut buf = [0u8; 2048];
        for m in &msgs {
            let (n, from) = sink.recv_from(&mut buf).unwrap();
            assert_eq!(from, m.src);
            assert_eq!(&buf[..n], m.bytes);
        }
        if !tx.carries(false) {
            return;
        }
        let Ok(sink6) = UdpSocket::bind("[::1]:0") else {
            return;
        };
        sink6
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let c = UdpSocket::bind("[::1]:0").unwrap();
        let msgs = [RawMsg {
            src: c.local_addr().unwrap(),
            dst: sink6.local_addr().unwrap(),
            bytes: &odd,
        }];
        tx.send(msgs.len(), |i| msgs[i], &mut refused);
        assert!(refused.is_empty(), "{refused:?}");
        let (n, from) = sink6.recv_from(&mut buf).unwrap();
        assert_eq!(from, msgs[0].src);
        assert_eq!(&buf[..n], &odd[..]);
    }

    #[test]
    fn a_family_without_a_socket_is_refused_whole() {
        let mut tx = RawTx::none();
        let v4: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let msgs = [
            RawMsg {
                src: v4,
                dst: v4,
                bytes: b"a",
            },
            RawMsg {
                src: v4,
                dst: v4,
                bytes: b"b",
            },
        ];
        let mut refused = Vec::new();
        tx.send(msgs.len(), |i| msgs[i], &mut refused);
        assert_eq!(refused, vec![0, 1]);
    }
}
