//! Frames between workers over their handoff sockets (Unix datagram
//! socketpairs the supervisor creates, one inbox per worker).
//!
//! A `Datagram` frame carries a client datagram to the worker that owns its
//! session, with the client's address and the local address it was sent
//! to. The receiver processes it as its own. The one exception: a worker
//! that has just transferred the session away returns the datagram to the
//! new owner; `hops` caps that at [`MAX_HOPS`], so a stale ownership entry
//! can never make workers bounce a datagram.
//! A `Transfer` frame moves a session, its upstream socket travelling
//! beside it as SCM_RIGHTS, so a migrated flow stops needing handoffs.
//!
//! Header, 48 bytes, little-endian:
//! `kind u8 | hops u8 | from worker u16 | client: family u8, ip [16], port u16 |
//!  local: family u8 (0: none), ip [16] | listener identity u64`
//!
//! The listener is named by its stable identity (its name's hash), not its
//! position, so a frame sent across a reload that renumbers listeners still
//! finds its listener, or is recognised as for one that is gone.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::flow::FlowKey;

pub const HEADER_LEN: usize = 48;

/// Handoffs a datagram may take in all.
pub const MAX_HOPS: u8 = 2;

/// Aliases a session may carry (learned server connection IDs).
pub const MAX_ALIASES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Datagram = 1,
    Transfer = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// How many handoffs this datagram has taken, this one included.
    pub hops: u8,
    /// The listener's stable identity (see `udpshard_worker`'s `Listener::ident`).
    pub listener: u64,
    pub from: u16,
    pub client: SocketAddr,
    pub local_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff frame shorter than its header")]
    Short,
    #[error("unknown handoff frame kind {0}")]
    Kind(u8),
    #[error("bad address family {0} in a handoff frame")]
    Family(u8),
    #[error("malformed session transfer")]
    Transfer,
}

fn put_ip(out: &mut [u8], ip: Option<IpAddr>) {
    match ip {
        None => out[0] = 0,
        Some(IpAddr::V4(v4)) => {
            out[0] = 4;
            out[1..5].copy_from_slice(&v4.octets());
        }
        Some(IpAddr::V6(v6)) => {
            out[0] = 6;
            out[1..17].copy_from_slice(&v6.octets());
        }
    }
}

fn get_ip(b: &[u8]) -> Result<Option<IpAddr>, HandoffError> {
    match b[0] {
        0 => Ok(None),
        4 => Ok(Some(IpAddr::V4(Ipv4Addr::new(b[1], b[2], b[3], b[4])))),
        6 => {
            let octets: [u8; 16] = b[1..17].try_into().map_err(|_| HandoffError::Short)?;
            Ok(Some(IpAddr::V6(Ipv6Addr::from(octets))))
        }
        other => Err(HandoffError::Family(other)),
    }
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = self.kind as u8;
        out[1] = self.hops;
        out[2..4].copy_from_slice(&self.from.to_le_bytes());
        put_ip(&mut out[4..21], Some(self.client.ip()));
        out[21..23].copy_from_slice(&self.client.port().to_le_bytes());
        put_ip(&mut out[23..40], self.local_ip);
        out[40..48].copy_from_slice(&self.listener.to_le_bytes());
        out
    }

    /// Splits a frame into its header and body.
    pub fn decode(frame: &[u8]) -> Result<(Header, &[u8]), HandoffError> {
        let head = frame.get(..HEADER_LEN).ok_or(HandoffError::Short)?;
        let kind = match head[0] {
            1 => Kind::Datagram,
            2 => Kind::Transfer,
            other => return Err(HandoffError::Kind(other)),
        };
        let client_ip = get_ip(&head[4..21])?.ok_or(HandoffError::Family(0))?;
        let mut ident = [0u8; 8];
        ident.copy_from_slice(&head[40..48]);
        let header = Header {
            kind,
            hops: head[1],
            listener: u64::from_le_bytes(ident),
            from: u16::from_le_bytes([head[2], head[3]]),
            client: SocketAddr::new(client_ip, u16::from_le_bytes([head[21], head[22]])),
            local_ip: get_ip(&head[23..40])?,
        };
        Ok((header, &frame[HEADER_LEN..]))
    }
}

/// A session's state as it travels to its new owner (the upstream socket
/// goes alongside as a descriptor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub key: FlowKey,
    pub aliases: Vec<FlowKey>,
    pub backend: u16,
    /// The kernel's drop count on the upstream socket already accounted.
    pub upstream_drops_seen: u32,
}

impl Transfer {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let put_key = |out: &mut Vec<u8>, k: &FlowKey| {
            out.push(k.as_bytes().len() as u8);
            out.extend_from_slice(k.as_bytes());
        };
        put_key(out, &self.key);
        let aliases = &self.aliases[..self.aliases.len().min(MAX_ALIASES)];
        out.push(aliases.len() as u8);
        for a in aliases {
            put_key(out, a);
        }
        out.extend_from_slice(&self.backend.to_le_bytes());
        out.extend_from_slice(&self.upstream_drops_seen.to_le_bytes());
    }

    pub fn decode(mut body: &[u8]) -> Result<Transfer, HandoffError> {
        fn take<'a>(body: &mut &'a [u8], n: usize) -> Result<&'a [u8], HandoffError> {
            let (head, rest) = (
                body.get(..n).ok_or(HandoffError::Transfer)?,
                &body[n.min(body.len())..],
            );
            *body = rest;
            Ok(head)
        }
        fn key(body: &mut &[u8]) -> Result<FlowKey, HandoffError> {
            let len = take(body, 1)?[0] as usize;
            FlowKey::new(take(body, len)?).ok_or(HandoffError::Transfer)
        }
        let primary = key(&mut body)?;
        let count = take(&mut body, 1)?[0] as usize;
        if count > MAX_ALIASES {
            return Err(HandoffError::Transfer);
        }
        let aliases = (0..count)
            .map(|_| key(&mut body))
            .collect::<Result<Vec<_>, _>>()?;
        let backend = u16::from_le_bytes(
            take(&mut body, 2)?
                .try_into()
                .map_err(|_| HandoffError::Transfer)?,
        );
        let drops = u32::from_le_bytes(
            take(&mut body, 4)?
                .try_into()
                .map_err(|_| HandoffError::Transfer)?,
        );
        if !body.is_empty() {
            return Err(HandoffError::Transfer);
        }
        Ok(Transfer {
            key: primary,
            aliases,
            backend,
            upstream_drops_seen: drops,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_both_families() {
        for (client, local) in [
            ("127.0.0.2:4000", Some("127.0.0.1")),
            ("[2001:db8::1]:443", Some("::1")),
            ("10.1.2.3:65535", None),
        ] {
            let h = Header {
                kind: Kind::Datagram,
                hops: 2,
                listener: 0x0123_4567_89ab_cdef,
                from: 7,
                client: client.parse().unwrap(),
                local_ip: local.map(|l| l.parse().unwrap()),
            };
            let mut frame = h.encode().to_vec();
            frame.extend_from_slice(b"payload");
            let (got, body) = Header::decode(&frame).unwrap();
            assert_eq!(got, h);
            assert_eq!(body, b"payload");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(Header::decode(&[1; 10]), Err(HandoffError::Short));
        let mut f = [0u8; HEADER_LEN];
        f[0] = 9;
        assert_eq!(Header::decode(&f), Err(HandoffError::Kind(9)));
        f[0] = 1;
        f[4] = 5;
        assert_eq!(Header::decode(&f), Err(HandoffError::Family(5)));
        for len in 0..20 {
            let body: Vec<u8> = (0..len).map(|i| i as u8 * 3).collect();
            let _ = Transfer::decode(&body);
        }
    }

    #[test]
    fn transfer_round_trips() {
        let t = Transfer {
            key: FlowKey::new(&[1; 16]).unwrap(),
            aliases: vec![
                FlowKey::new(&[2; 8]).unwrap(),
                FlowKey::new(&[3; 20]).unwrap(),
            ],
            backend: 3,
            upstream_drops_seen: 77,
        };
        let mut out = Vec::new();
        t.encode(&mut out);
        assert_eq!(Transfer::decode(&out).unwrap(), t);
        out.push(0);
        assert_eq!(Transfer::decode(&out), Err(HandoffError::Transfer));
    }
}
