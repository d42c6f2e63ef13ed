//! Flow keys and the dissectors that extract them from a datagram.
//!
//! A flow key is what ties a datagram to its session: the QUIC destination
//! connection ID, a byte range of a custom protocol, or the client's address.
//! Keys live inline (no allocation per datagram) and hash with the session
//! table's hasher.

use std::net::{IpAddr, SocketAddr};

/// The longest connection ID QUIC v1 allows (RFC 9000, 17.2).
pub const MAX_CID_LEN: usize = 20;

/// Enough for a connection ID or an encoded socket address (1 + 16 + 2).
const KEY_CAPACITY: usize = 20;

/// A flow's identity within one listener, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    len: u8,
    bytes: [u8; KEY_CAPACITY],
}

impl FlowKey {
    /// A key of `bytes`; `None` when longer than a key can hold.
    pub fn new(bytes: &[u8]) -> Option<FlowKey> {
        if bytes.len() > KEY_CAPACITY {
            return None;
        }
        let mut key = FlowKey {
            len: bytes.len() as u8,
            bytes: [0; KEY_CAPACITY],
        };
        key.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(key)
    }

    /// The key of a client address: family tag, address, port (big-endian).
    pub fn from_addr(addr: SocketAddr) -> FlowKey {
        let mut key = FlowKey {
            len: 0,
            bytes: [0; KEY_CAPACITY],
        };
        let len = match addr.ip() {
            IpAddr::V4(ip) => {
                key.bytes[0] = 4;
                key.bytes[1..5].copy_from_slice(&ip.octets());
                key.bytes[5..7].copy_from_slice(&addr.port().to_be_bytes());
                7
            }
            IpAddr::V6(ip) => {
                key.bytes[0] = 6;
                key.bytes[1..17].copy_from_slice(&ip.octets());
                key.bytes[17..19].copy_from_slice(&addr.port().to_be_bytes());
                19
            }
        };
        key.len = len;
        key
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why a datagram carries no usable flow key. Counted as `malformed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    Empty,
    /// Shorter than the header that holds the connection ID.
    Truncated,
    /// A long header whose DCID length exceeds 20.
    CidTooLong,
    /// A long header with a zero-length DCID: nothing to route on.
    EmptyCid,
}

/// How a listener finds the flow key in a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dissector {
    /// QUIC: long header (first bit set) DCID length at byte 5, DCID from
    /// byte 6; short header DCID of `short_cid_len` bytes from byte 1.
    Quic { short_cid_len: usize },
    /// `cid_len` bytes at `cid_offset`.
    Bytes { cid_offset: usize, cid_len: usize },
    /// The client's address and port.
    Tuple,
}

impl From<udpshard_config::Dissector> for Dissector {
    fn from(d: udpshard_config::Dissector) -> Self {
        match d {
            udpshard_config::Dissector::Quic { short_cid_len } => Dissector::Quic { short_cid_len },
            udpshard_config::Dissector::Bytes {
                cid_offset,
                cid_len,
            } => Dissector::Bytes {
                cid_offset,
                cid_len,
            },
            udpshard_config::Dissector::Tuple => Dissector::Tuple,
        }
    }
}

impl Dissector {
    /// The flow key of a datagram from `client`.
    pub fn flow_key(&self, datagram: &[u8], client: SocketAddr) -> Result<FlowKey, Malformed> {
        match *self {
            Dissector::Tuple => Ok(FlowKey::from_addr(client)),
            Dissector::Quic { short_cid_len } => quic_dcid(datagram, short_cid_len),
            Dissector::Bytes {
                cid_offset,
                cid_len,
            } => {
                if datagram.is_empty() {
                    return Err(Malformed::Empty);
                }
                let cid = datagram
                    .get(cid_offset..cid_offset + cid_len)
                    .ok_or(Malformed::Truncated)?;
                FlowKey::new(cid).ok_or(Malformed::CidTooLong)
            }
        }
    }

    /// Whether this dissector keys on a connection ID (and so can be steered
    /// by the kernel on it).
    pub fn has_cid(&self) -> bool {
        !matches!(self, Dissector::Tuple)
    }
}

fn quic_dcid(datagram: &[u8], short_cid_len: usize) -> Result<FlowKey, Malformed> {
    let first = *datagram.first().ok_or(Malformed::Empty)?;
    let cid = if first & 0x80 != 0 {
        let len = *datagram.get(5).ok_or(Malformed::Truncated)? as usize;
        if len > MAX_CID_LEN {
            return Err(Malformed::CidTooLong);
        }
        if len == 0 {
            return Err(Malformed::EmptyCid);
        }
        datagram.get(6..6 + len).ok_or(Malformed::Truncated)?
    } else {
        datagram
            .get(1..1 + short_cid_len)
            .ok_or(Malformed::Truncated)?
    };
    FlowKey::new(cid).ok_or(Malformed::CidTooLong)
}

/// A QUIC short-header datagram (fixed bit set) with connection ID `cid`,
/// then `body`: what a client sends once its connection is up.
pub fn quic_short(cid: &[u8], body: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(1 + cid.len() + body.len());
    d.push(0x40);
    d.extend_from_slice(cid);
    d.extend_from_slice(body);
    d
}

/// A QUIC v1 Initial's long header with `dcid` and `scid`, then `body`
/// (where a real Initial has its token, length and packet number).
pub fn quic_initial(dcid: &[u8], scid: &[u8], body: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(7 + dcid.len() + scid.len() + body.len());
    d.push(0xc0);
    d.extend_from_slice(&1u32.to_be_bytes());
    d.push(dcid.len() as u8);
    d.extend_from_slice(dcid);
    d.push(scid.len() as u8);
    d.extend_from_slice(scid);
    d.extend_from_slice(body);
    d
}

/// Whether `datagram` is a QUIC Initial packet (v1, or v2 with its own type
/// codepoint): a server answers every one, so a new session that began
/// with one and got no reply says something about its backend.
pub fn quic_is_initial(datagram: &[u8]) -> bool {
    let Some(&first) = datagram.first() else {
        return false;
    };
    if first & 0xc0 != 0xc0 {
        return false;
    }
    let Some(version) = datagram.get(1..5) else {
        return false;
    };
    let kind = (first >> 4) & 0x3;
    match version {
        [0, 0, 0, 1] => kind == 0,
        [0x6b, 0x33, 0x43, 0xcf] => kind == 1,
        _ => false,
    }
}

/// The smallest datagram that may carry a client's Initial (RFC 9000 14.1).
pub const QUIC_MIN_INITIAL: usize = 1200;

/// Whether `datagram`, whose connection ID has no session, may open one: a
/// short header may (a connection moving to this host from another of the
/// fleet), a long header only as a client's first flight: an Initial (of
/// QUIC v1 or v2) in a datagram of at least 1200 bytes, or a long header of
/// a version this proxy does not know, as large, which its server answers
/// with Version Negotiation. Anything else (Handshake, 0-RTT or Retry
/// packets, short Initials, version 0) is refused before it costs a
/// session.
pub fn quic_may_open(datagram: &[u8]) -> bool {
    let Some(&first) = datagram.first() else {
        return false;
    };
    if first & 0x80 == 0 {
        return true;
    }
    if datagram.len() < QUIC_MIN_INITIAL {
        return false;
    }
    match datagram.get(1..5) {
        Some([0, 0, 0, 0]) | None => false,
        Some([0, 0, 0, 1] | [0x6b, 0x33, 0x43, 0xcf]) => quic_is_initial(datagram),
        Some(_) => true,
    }
}

/// Where a QUIC server's long-header packet carries its chosen source
/// connection ID: the SCID follows the DCID. Used to learn the IDs a client
/// will use after the handshake.
pub fn quic_long_scid(datagram: &[u8]) -> Option<FlowKey> {
    if datagram.first()? & 0x80 == 0 {
        return None;
    }
    let dcid_len = *datagram.get(5)? as usize;
    if dcid_len > MAX_CID_LEN {
        return None;
    }
    let scid_len_at = 6 + dcid_len;
    let scid_len = *datagram.get(scid_len_at)? as usize;
    if scid_len == 0 || scid_len > MAX_CID_LEN {
        return None;
    }
    FlowKey::new(datagram.get(scid_len_at + 1..scid_len_at + 1 + scid_len)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initials_are_told_from_other_packets() {
        assert!(quic_is_initial(&[0xc3, 0, 0, 0, 1, 8]));
        assert!(!quic_is_initial(&[0xe3, 0, 0, 0, 1, 8]), "v1 handshake");
        assert!(
            quic_is_initial(&[0xd0, 0x6b, 0x33, 0x43, 0xcf]),
            "v2 initial"
        );
        assert!(
            !quic_is_initial(&[0xc0, 0x6b, 0x33, 0x43, 0xcf]),
            "v2: type 0 is 0-RTT"
        );
        assert!(!quic_is_initial(&[0x40, 0, 0, 0, 1]), "short header");
        assert!(!quic_is_initial(&[0xc0, 0, 0, 0, 0]), "version negotiation");
        assert!(!quic_is_initial(&[0xc0, 0, 0]), "truncated");
        assert!(!quic_is_initial(&[]));
    }

    fn client() -> SocketAddr {
        "127.0.0.1:5555".parse().unwrap()
    }

    fn quic8() -> Dissector {
        Dissector::Quic { short_cid_len: 8 }
    }

    fn long_header(dcid: &[u8]) -> Vec<u8> {
        let mut d = vec![0xc3, 0, 0, 0, 1, dcid.len() as u8];
        d.extend_from_slice(dcid);
        d.push(0); // SCID length
        d.extend_from_slice(&[0u8; 20]);
        d
    }

    #[test]
    fn quic_short_header() {
        let d = [0x40, 1, 2, 3, 4, 5, 6, 7, 8, 0xff, 0xff];
        let key = quic8().flow_key(&d, client()).unwrap();
        assert_eq!(key.as_bytes(), &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn quic_short_header_exact_length() {
        let d = [0x40, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(quic8().flow_key(&d, client()).unwrap().as_bytes().len(), 8);
    }

    #[test]
    fn quic_short_header_truncated_cid() {
        let d = [0x40, 1, 2, 3, 4, 5, 6, 7];
        assert_eq!(quic8().flow_key(&d, client()), Err(Malformed::Truncated));
    }

    #[test]
    fn quic_long_header_every_cid_length() {
        for len in 1..=20u8 {
            let dcid: Vec<u8> = (0..len)
                .map(|i| i.wrapping_mul(7).wrapping_add(1))
                .collect();
            let key = quic8().flow_key(&long_header(&dcid), client()).unwrap();
            assert_eq!(key.as_bytes(), &dcid[..], "dcid length {len}");
        }
    }

    #[test]
    fn quic_long_header_cid_too_long() {
        for bad in [21u8, 255] {
            let mut d = vec![0xc0, 0, 0, 0, 1, bad];
            d.extend_from_slice(&[9u8; 300]);
            assert_eq!(
                quic8().flow_key(&d, client()),
                Err(Malformed::CidTooLong),
                "len {bad}"
            );
        }
    }

    #[test]
    fn quic_long_header_truncated() {
        // Too short to hold the DCID length byte.
        assert_eq!(
            quic8().flow_key(&[0xc0, 0, 0, 0, 1], client()),
            Err(Malformed::Truncated)
        );
        // Length says 8, only 3 CID bytes present.
        assert_eq!(
            quic8().flow_key(&[0xc0, 0, 0, 0, 1, 8, 1, 2, 3], client()),
            Err(Malformed::Truncated)
        );
    }

    #[test]
    fn quic_long_header_zero_length_dcid() {
        assert_eq!(
            quic8().flow_key(&[0xc0, 0, 0, 0, 1, 0, 0], client()),
            Err(Malformed::EmptyCid)
        );
    }

    #[test]
    fn quic_empty_and_one_byte() {
        assert_eq!(quic8().flow_key(&[], client()), Err(Malformed::Empty));
        assert_eq!(
            quic8().flow_key(&[0x40], client()),
            Err(Malformed::Truncated)
        );
        assert_eq!(
            quic8().flow_key(&[0xc0], client()),
            Err(Malformed::Truncated)
        );
    }

    #[test]
    fn bytes_dissector() {
        let d = Dissector::Bytes {
            cid_offset: 4,
            cid_len: 4,
        };
        let key = d.flow_key(&[0, 0, 0, 0, 9, 8, 7, 6, 5], client()).unwrap();
        assert_eq!(key.as_bytes(), &[9, 8, 7, 6]);
        assert_eq!(
            d.flow_key(&[0, 0, 0, 0, 9, 8, 7], client()),
            Err(Malformed::Truncated)
        );
        assert_eq!(d.flow_key(&[], client()), Err(Malformed::Empty));
        assert_eq!(d.flow_key(&[1], client()), Err(Malformed::Truncated));
    }

    #[test]
    fn tuple_dissector_keys_on_address() {
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let v6: SocketAddr = "[::1]:1000".parse().unwrap();
        let t = Dissector::Tuple;
        assert_eq!(t.flow_key(b"", a).unwrap(), t.flow_key(b"xyz", a).unwrap());
        assert_ne!(t.flow_key(b"", a).unwrap(), t.flow_key(b"", b).unwrap());
        assert_ne!(t.flow_key(b"", a).unwrap(), t.flow_key(b"", v6).unwrap());
        assert_eq!(t.flow_key(b"", v6).unwrap().as_bytes().len(), 19);
    }

    #[test]
    fn scid_of_server_long_header() {
        let mut d = vec![0xc0, 0, 0, 0, 1, 2, 0xaa, 0xbb, 3, 1, 2, 3, 0];
        assert_eq!(quic_long_scid(&d).unwrap().as_bytes(), &[1, 2, 3]);
        d[8] = 9; // SCID length beyond the datagram
        assert_eq!(quic_long_scid(&d), None);
        assert_eq!(quic_long_scid(&[0x40, 1, 2]), None);
    }

    #[test]
    fn key_capacity() {
        assert!(FlowKey::new(&[0; 20]).is_some());
        assert!(FlowKey::new(&[0; 21]).is_none());
    }

    #[test]
    fn only_a_full_sized_first_flight_may_open_a_session() {
        let cid = [7u8; 8];
        let initial = |len: usize| {
            let mut d = quic_initial(&cid, &cid, &[]);
            d.resize(len, 0);
            d
        };
        assert!(quic_may_open(&quic_short(&cid, b"x")), "a short header may");
        assert!(quic_may_open(&initial(1200)));
        assert!(!quic_may_open(&initial(1199)), "a short Initial may not");
        let mut handshake = initial(1200);
        handshake[0] = 0xe0;
        assert!(!quic_may_open(&handshake), "a Handshake packet may not");
        let mut unknown = initial(1200);
        unknown[1..5].copy_from_slice(&[0x1a, 0x2a, 0x3a, 0x4a]);
        assert!(
            quic_may_open(&unknown),
            "an unknown version, for negotiation"
        );
        unknown.truncate(1199);
        assert!(!quic_may_open(&unknown));
        let mut negotiation = initial(1200);
        negotiation[1..5].copy_from_slice(&[0; 4]);
        assert!(!quic_may_open(&negotiation), "version 0 comes from servers");
        assert!(!quic_may_open(&[]));
    }
}
