//! PROXY protocol version 2 headers for datagrams (HAProxy's
//! proxy-protocol.txt, section 2.2): with `proxy_protocol = "v2"`, one goes
//! in front of every datagram forwarded to a backend, naming the client's
//! address and port and the address and port it reached, so the backend can
//! log, limit and filter by the client rather than by the proxy. On UDP the
//! header is part of each datagram's payload, as dnsdist sends it and
//! PowerDNS Recursor, dnsdist and Unbound read it.
//!
//! ```text
//! 12 bytes  signature \r\n\r\n\0\r\nQUIT\n
//! 1 byte    0x21: version 2, PROXY (0x20: LOCAL, a health check's)
//! 1 byte    0x12: IPv4 over DGRAM, 0x22: IPv6 over DGRAM (0x00: UNSPEC)
//! 2 bytes   the length of what follows, big-endian: 12 or 36 (0)
//! then      source address, destination address, source port,
//!           destination port, each in network order
//! ```

use std::net::{IpAddr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest header this writes: IPv6 addresses.
pub const MAX_LEN: usize = 16 + 36;
/// A header for IPv4 addresses.
pub const V4_LEN: usize = 16 + 12;

const PROXY: u8 = 0x21;
const LOCAL: u8 = 0x20;
const INET_DGRAM: u8 = 0x12;
const INET6_DGRAM: u8 = 0x22;

/// A header, written into its own bytes.
#[derive(Clone, Copy)]
pub struct Header {
    bytes: [u8; MAX_LEN],
    len: u8,
}

impl Header {
    /// The header of a datagram `client` sent to `reached`. Both in one
    /// family: IPv4 when both are (an IPv4-mapped IPv6 address counts as
    /// IPv4), else IPv6 with any IPv4 address mapped.
    pub fn proxy(client: SocketAddr, reached: SocketAddr) -> Header {
        let (src, dst) = (client.ip().to_canonical(), reached.ip().to_canonical());
        let mut bytes = [0u8; MAX_LEN];
        bytes[..12].copy_from_slice(&SIGNATURE);
        bytes[12] = PROXY;
        let at = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                bytes[13] = INET_DGRAM;
                bytes[16..20].copy_from_slice(&s.octets());
                bytes[20..24].copy_from_slice(&d.octets());
                24
            }
            _ => {
                let v6 = |ip: IpAddr| match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                bytes[13] = INET6_DGRAM;
                bytes[16..32].copy_from_slice(&v6(src).octets());
                bytes[32..48].copy_from_slice(&v6(dst).octets());
                48
            }
        };
        bytes[at..at + 2].copy_from_slice(&client.port().to_be_bytes());
        bytes[at + 2..at + 4].copy_from_slice(&reached.port().to_be_bytes());
        let len = at + 4;
        bytes[14..16].copy_from_slice(&((len - 16) as u16).to_be_bytes());
        Header {
            bytes,
            len: len as u8,
        }
    }

    /// A LOCAL header (no addresses): a datagram the proxy sends on its own
    /// behalf, such as a health check, which the backend answers as from
    /// the proxy.
    pub fn local() -> Header {
        let mut bytes = [0u8; MAX_LEN];
        bytes[..12].copy_from_slice(&SIGNATURE);
        bytes[12] = LOCAL;
        Header { bytes, len: 16 }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// PROXY: the client's address and the one it reached.
    Proxy {
        client: SocketAddr,
        reached: SocketAddr,
    },
    /// LOCAL: from the proxy itself.
    Local,
}

/// Reads the v2 header `datagram` starts with: what it says and its length
/// (the payload follows). `None`: no valid v2 header for a datagram.
pub fn parse(datagram: &[u8]) -> Option<(Parsed, usize)> {
    if datagram.len() < 16 || datagram[..12] != SIGNATURE {
        return None;
    }
    let len = 16 + usize::from(u16::from_be_bytes([datagram[14], datagram[15]]));
    let body = datagram.get(16..len)?;
    match datagram[12] {
        LOCAL => Some((Parsed::Local, len)),
        PROXY => {
            // Source and destination addresses, then their ports.
            let width = match datagram[13] {
                INET_DGRAM => 4,
                INET6_DGRAM => 16,
                _ => return None,
            };
            let body = body.get(..2 * width + 4)?;
            let ip = |at: usize| -> IpAddr {
                let bytes = &body[at..at + width];
                match <[u8; 4]>::try_from(bytes) {
                    Ok(v4) => IpAddr::from(v4),
                    Err(_) => {
                        let mut v6 = [0u8; 16];
                        v6.copy_from_slice(bytes);
                        IpAddr::from(v6)
                    }
                }
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            let client = SocketAddr::new(ip(0), port(2 * width));
            let reached = SocketAddr::new(ip(width), port(2 * width + 2));
            Some((Parsed::Proxy { client, reached }, len))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_header_is_the_spec_s_bytes() {
        let h = Header::proxy(
            "192.0.2.1:51000".parse().unwrap(),
            "198.51.100.7:53".parse().unwrap(),
        );
        let mut want = SIGNATURE.to_vec();
        want.extend([0x21, 0x12, 0, 12]);
        want.extend([192, 0, 2, 1, 198, 51, 100, 7]);
        want.extend(51000u16.to_be_bytes());
        want.extend(53u16.to_be_bytes());
        assert_eq!(h.as_bytes(), want.as_slice());
        assert_eq!(h.as_bytes().len(), V4_LEN);
    }

    #[test]
    fn headers_read_back_as_written_in_both_families() {
        for (client, reached) in [
            ("192.0.2.1:51000", "198.51.100.7:53"),
            ("[2001:db8::1]:443", "[2001:db8::53]:4433"),
            // A mapped client of a dual-stack listener is an IPv4 client.
            ("[::ffff:192.0.2.9]:7", "[::ffff:127.0.0.1]:8"),
            // Mixed: IPv6, with the IPv4 address mapped.
            ("192.0.2.1:1", "[2001:db8::53]:2"),
        ] {
            let (client, reached): (SocketAddr, SocketAddr) =
                (client.parse().unwrap(), reached.parse().unwrap());
            let h = Header::proxy(client, reached);
            let mut datagram = h.as_bytes().to_vec();
            datagram.extend_from_slice(b"payload");
            let (parsed, len) = parse(&datagram).unwrap();
            assert_eq!(&datagram[len..], b"payload");
            let Parsed::Proxy {
                client: c,
                reached: r,
            } = parsed
            else {
                panic!("{parsed:?}");
            };
            let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
            assert_eq!((canon(c), canon(r)), (canon(client), canon(reached)));
            assert_eq!(
                len,
                if canon(client).is_ipv4() && canon(reached).is_ipv4() {
                    V4_LEN
                } else {
                    MAX_LEN
                }
            );
        }
    }

    #[test]
    fn a_local_header_and_garbage_parse_as_they_should() {
        assert_eq!(parse(Header::local().as_bytes()), Some((Parsed::Local, 16)));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIT\n\x21\x12\x00\x0c"), None);
        assert_eq!(parse(b"not a header at all"), None);
        let mut wrong = Header::proxy(
            "192.0.2.1:1".parse().unwrap(),
            "192.0.2.2:2".parse().unwrap(),
        )
        .as_bytes()
        .to_vec();
        wrong[12] = 0x11;
        assert_eq!(parse(&wrong), None);
    }
}
