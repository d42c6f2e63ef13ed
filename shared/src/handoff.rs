//! Frames between workers over their handoff sockets (Unix datagram
//! socketpairs the supervisor creates, one inbox per worker).
//!
//! - `Datagram` carries a client datagram to the worker that owns its
//!   session, with the client's address and the local address it was sent
//!   to. The receiver processes it as its own. A worker that has just
//!   transferred the session away hands it on; `hops` caps that at
//!   [`MAX_HOPS`], so a stale ownership entry can never bounce a datagram.
//! - `Transfer` moves a session to the worker the kernel now delivers it to,
//!   with its paths. Each path's upstream socket travels beside it
//!   (SCM_RIGHTS, in path order): the receiver sends on it. The socket's
//!   home, the worker holding its port lease, keeps reading it and relays
//!   the path's replies, so the backend never sees the 4-tuple change.
//! - `TransferDone` answers a transfer: accepted (the receiver owns the
//!   session now), or refused (its descriptors did not arrive; the sender
//!   keeps the session).
//! - `PathClosed` tells a socket's home that the owner of a path it relays
//!   closed it. `PathMoved` tells it that the path's client moved
//!   (`follow`), with the datagram that moved it: the home forwards that
//!   datagram itself, after it has pointed the relay at the new address, so
//!   no reply to it can go to the old one.
//! - `AliasLearned` and `Activity` tell a session's owner what the home of
//!   one of its paths saw in a reply: the server's new connection ID, and
//!   that replies still flow.
//! - `Relay` asks a socket's home to relay a path's replies. A binary
//!   upgrade's old worker sends each relay it keeps to its successor, with
//!   the socket (the successor becomes the home of every socket it had,
//!   with every slot in use on it); a worker that finds its socket's home
//!   gone and another worker holding it since sends it for each of its
//!   paths there, without. `RelayTaken` answers the first.
//!
//! A datagram frame's 48-byte header, little-endian:
//! `kind u8 | hops u8 | from u16 | client: family u8, ip [16], port u16 |
//!  local: family u8 (0: none), ip [16] | listener identity u64`, then the
//! datagram. Every other frame: `kind u8 | generation u8 | from u16 |
//! listener u64`, then its body, field after field. `generation` is `0x80 |`
//! the sender's generation mod 128 (0 from releases before it: not said),
//! so a receiver can tell an offer a dead process left in its inbox from
//! one of the process that serves its slot now (generations 128 apart
//! look alike: a slot restarts far less often than a frame waits).
//!
//! The listener is named by its stable identity (its name's hash), not its
//! position, so a frame sent across a reload that renumbers listeners still
//! finds its listener, or is recognised as for one that is gone.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::flow::FlowKey;
use crate::owners::Owner;

pub const HEADER_LEN: usize = 48;

/// Handoffs a datagram may take in all.
pub const MAX_HOPS: u8 = 2;

/// Aliases a session may carry (learned server connection IDs).
pub const MAX_ALIASES: usize = 8;

/// Paths a transfer may carry (the most `max_paths` allows).
pub const MAX_TRANSFER_PATHS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Datagram = 1,
    Transfer = 2,
    TransferDone = 3,
    PathClosed = 4,
    PathMoved = 5,
    AliasLearned = 6,
    Activity = 7,
    Relay = 8,
    RelayTaken = 9,
}

impl Kind {
    fn from_byte(b: u8) -> Result<Kind, HandoffError> {
        Ok(match b {
            1 => Kind::Datagram,
            2 => Kind::Transfer,
            3 => Kind::TransferDone,
            4 => Kind::PathClosed,
            5 => Kind::PathMoved,
            6 => Kind::AliasLearned,
            7 => Kind::Activity,
            8 => Kind::Relay,
            9 => Kind::RelayTaken,
            other => return Err(HandoffError::Kind(other)),
        })
    }
}

/// A handed-over client datagram's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// How many handoffs this datagram has taken, this one included.
    pub hops: u8,
    /// The listener's stable identity (see `udpshard_worker`'s listener ident).
    pub listener: u64,
    pub from: u16,
    pub client: SocketAddr,
    pub local_ip: Option<IpAddr>,
}

/// A control frame's second byte has this bit set where it says its
/// sender's generation (the low 7 bits).
const GENERATION_SAID: u8 = 0x80;

/// The bits of generation `generation` a control frame carries.
pub fn generation_bits(generation: u16) -> u8 {
    (generation & 0x7f) as u8
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff frame shorter than its header")]
    Short,
    #[error("unknown handoff frame kind {0}")]
    Kind(u8),
    #[error("bad address family {0} in a handoff frame")]
    Family(u8),
    #[error("malformed {0:?} frame")]
    Body(Kind),
}

/// One path of a session in transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferPath {
    pub client: SocketAddr,
    pub local_ip: Option<IpAddr>,
    /// Its upstream socket's local address: (source, port).
    pub upstream: SocketAddr,
    /// The worker holding the socket's lease (it reads the socket).
    pub home: u16,
    /// Its generation, mod 2^14.
    pub home_generation: u16,
    /// How long since its client last sent, in ms.
    pub idle_ms: u32,
    /// Whether its backend has sent on it; `None` from a sender that does
    /// not say (a release before admission, in a binary upgrade).
    pub answered: Option<bool>,
}

/// On the wire a path's `answered` rides in the generation's top bits,
/// which a generation (mod 2^14) never sets: bit 14 says it is there, bit
/// 15 what it is. Frames of earlier releases read as `None`.
const ANSWER_KNOWN: u16 = 1 << 14;
const ANSWERED: u16 = 1 << 15;

/// A session as it travels to its new owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub key: FlowKey,
    pub aliases: Vec<FlowKey>,
    /// Its backend: the index in the listener's list and the address (a
    /// receiver whose list differs, mid-reload, refuses the transfer).
    pub backend: u16,
    pub backend_addr: SocketAddr,
    pub paths: Vec<TransferPath>,
}

/// A path named across workers by its 4-tuple: the upstream socket's local
/// address and the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathRef {
    /// The session's primary key (its owner is found by it).
    pub key: FlowKey,
    pub upstream: SocketAddr,
    pub backend: SocketAddr,
}

/// Every frame but a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Transfer(Transfer),
    TransferDone {
        key: FlowKey,
        accepted: bool,
    },
    PathClosed(PathRef),
    PathMoved {
        path: PathRef,
        client: SocketAddr,
        local_ip: Option<IpAddr>,
    },
    AliasLearned {
        key: FlowKey,
        alias: FlowKey,
    },
    Activity(PathRef),
    Relay {
        path: PathRef,
        client: SocketAddr,
        local_ip: Option<IpAddr>,
    },
    RelayTaken(PathRef),
}

/// A decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Datagram {
        header: Header,
        payload: &'a [u8],
    },
    Control {
        from: u16,
        /// The sender's generation mod 128, where it says (see the module
        /// notes; compare with [`generation_bits`]).
        generation: Option<u8>,
        listener: u64,
        control: Control,
        /// The client datagram a `PathMoved` carries (empty for the others).
        payload: &'a [u8],
        /// Where `payload` starts in the frame.
        payload_at: usize,
    },
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
        out[0] = Kind::Datagram as u8;
        out[1] = self.hops;
        out[2..4].copy_from_slice(&self.from.to_le_bytes());
        put_ip(&mut out[4..21], Some(self.client.ip()));
        out[21..23].copy_from_slice(&self.client.port().to_le_bytes());
        put_ip(&mut out[23..40], self.local_ip);
        out[40..48].copy_from_slice(&self.listener.to_le_bytes());
        out
    }

    fn decode(head: &[u8]) -> Result<Header, HandoffError> {
        let client_ip = get_ip(&head[4..21])?.ok_or(HandoffError::Family(0))?;
        let mut ident = [0u8; 8];
        ident.copy_from_slice(&head[40..48]);
        Ok(Header {
            hops: head[1],
            listener: u64::from_le_bytes(ident),
            from: u16::from_le_bytes([head[2], head[3]]),
            client: SocketAddr::new(client_ip, u16::from_le_bytes([head[21], head[22]])),
            local_ip: get_ip(&head[23..40])?,
        })
    }
}

impl<'a> Frame<'a> {
    pub fn decode(frame: &'a [u8]) -> Result<Frame<'a>, HandoffError> {
        let kind = Kind::from_byte(*frame.first().ok_or(HandoffError::Short)?)?;
        if kind == Kind::Datagram {
            let head = frame.get(..HEADER_LEN).ok_or(HandoffError::Short)?;
            return Ok(Frame::Datagram {
                header: Header::decode(head)?,
                payload: &frame[HEADER_LEN..],
            });
        }
        let head = frame.get(..12).ok_or(HandoffError::Short)?;
        let from = u16::from_le_bytes([head[2], head[3]]);
        let generation = (head[1] & GENERATION_SAID != 0).then_some(head[1] & !GENERATION_SAID);
        let listener = u64::from_le_bytes(head[4..12].try_into().map_err(|_| HandoffError::Short)?);
        let mut r = Reader {
            rest: &frame[12..],
            kind,
        };
        let control = match kind {
            Kind::Datagram => unreachable!("handled above"),
            Kind::Transfer => Control::Transfer(r.transfer()?),
            Kind::TransferDone => Control::TransferDone {
                key: r.key()?,
                accepted: r.u8()? != 0,
            },
            Kind::PathClosed => Control::PathClosed(r.path()?),
            Kind::PathMoved => Control::PathMoved {
                path: r.path()?,
                client: r.addr()?,
                local_ip: r.opt_ip()?,
            },
            Kind::AliasLearned => Control::AliasLearned {
                key: r.key()?,
                alias: r.key()?,
            },
            Kind::Activity => Control::Activity(r.path()?),
            Kind::Relay => Control::Relay {
                path: r.path()?,
                client: r.addr()?,
                local_ip: r.opt_ip()?,
            },
            Kind::RelayTaken => Control::RelayTaken(r.path()?),
        };
        let payload = std::mem::take(&mut r.rest);
        if !payload.is_empty() && kind != Kind::PathMoved {
            return Err(HandoffError::Body(kind));
        }
        Ok(Frame::Control {
            from,
            generation,
            listener,
            control,
            payload_at: frame.len() - payload.len(),
            payload,
        })
    }
}

impl Control {
    fn kind(&self) -> Kind {
        match self {
            Control::Transfer(_) => Kind::Transfer,
            Control::TransferDone { .. } => Kind::TransferDone,
            Control::PathClosed(_) => Kind::PathClosed,
            Control::PathMoved { .. } => Kind::PathMoved,
            Control::AliasLearned { .. } => Kind::AliasLearned,
            Control::Activity(_) => Kind::Activity,
            Control::Relay { .. } => Kind::Relay,
            Control::RelayTaken(_) => Kind::RelayTaken,
        }
    }

    /// The frame for this message from process `from` about listener
    /// `listener` (its stable identity). A `PathMoved`'s datagram follows it
    /// in the same frame.
    pub fn encode(&self, from: Owner, listener: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(self.kind() as u8);
        out.push(GENERATION_SAID | generation_bits(from.generation));
        out.extend_from_slice(&from.worker.to_le_bytes());
        out.extend_from_slice(&listener.to_le_bytes());
        let w = &mut out;
        match self {
            Control::Transfer(t) => {
                put_key(w, &t.key);
                let aliases = &t.aliases[..t.aliases.len().min(MAX_ALIASES)];
                w.push(aliases.len() as u8);
                for a in aliases {
                    put_key(w, a);
                }
                w.extend_from_slice(&t.backend.to_le_bytes());
                put_addr(w, t.backend_addr);
                let paths = &t.paths[..t.paths.len().min(MAX_TRANSFER_PATHS)];
                w.push(paths.len() as u8);
                for p in paths {
                    put_addr(w, p.client);
                    put_opt_ip(w, p.local_ip);
                    put_addr(w, p.upstream);
                    w.extend_from_slice(&p.home.to_le_bytes());
                    let answer = match p.answered {
                        None => 0,
                        Some(false) => ANSWER_KNOWN,
                        Some(true) => ANSWER_KNOWN | ANSWERED,
                    };
                    let generation = (p.home_generation & !(ANSWER_KNOWN | ANSWERED)) | answer;
                    w.extend_from_slice(&generation.to_le_bytes());
                    w.extend_from_slice(&p.idle_ms.to_le_bytes());
                }
            }
            Control::TransferDone { key, accepted } => {
                put_key(w, key);
                w.push(u8::from(*accepted));
            }
            Control::PathClosed(p) | Control::Activity(p) | Control::RelayTaken(p) => {
                put_path(w, p)
            }
            Control::PathMoved {
                path,
                client,
                local_ip,
            }
            | Control::Relay {
                path,
                client,
                local_ip,
            } => {
                put_path(w, path);
                put_addr(w, *client);
                put_opt_ip(w, *local_ip);
            }
            Control::AliasLearned { key, alias } => {
                put_key(w, key);
                put_key(w, alias);
            }
        }
        out
    }
}

fn put_key(w: &mut Vec<u8>, k: &FlowKey) {
    w.push(k.as_bytes().len() as u8);
    w.extend_from_slice(k.as_bytes());
}

fn put_opt_ip(w: &mut Vec<u8>, ip: Option<IpAddr>) {
    match ip {
        None => w.push(0),
        Some(IpAddr::V4(v4)) => {
            w.push(4);
            w.extend_from_slice(&v4.octets());
        }
        Some(IpAddr::V6(v6)) => {
            w.push(6);
            w.extend_from_slice(&v6.octets());
        }
    }
}

fn put_addr(w: &mut Vec<u8>, a: SocketAddr) {
    put_opt_ip(w, Some(a.ip()));
    w.extend_from_slice(&a.port().to_le_bytes());
}

fn put_path(w: &mut Vec<u8>, p: &PathRef) {
    put_key(w, &p.key);
    put_addr(w, p.upstream);
    put_addr(w, p.backend);
}

struct Reader<'a> {
    rest: &'a [u8],
    kind: Kind,
}

impl<'a> Reader<'a> {
    fn bad(&self) -> HandoffError {
        HandoffError::Body(self.kind)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], HandoffError> {
        if self.rest.len() < n {
            return Err(self.bad());
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, HandoffError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, HandoffError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, HandoffError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn key(&mut self) -> Result<FlowKey, HandoffError> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        FlowKey::new(bytes).ok_or(self.bad())
    }

    fn opt_ip(&mut self) -> Result<Option<IpAddr>, HandoffError> {
        match self.u8()? {
            0 => Ok(None),
            4 => {
                let b = self.take(4)?;
                Ok(Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))))
            }
            6 => {
                let b: [u8; 16] = self.take(16)?.try_into().map_err(|_| self.bad())?;
                Ok(Some(IpAddr::V6(Ipv6Addr::from(b))))
            }
            other => Err(HandoffError::Family(other)),
        }
    }

    fn addr(&mut self) -> Result<SocketAddr, HandoffError> {
        let ip = self.opt_ip()?.ok_or(HandoffError::Family(0))?;
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    fn path(&mut self) -> Result<PathRef, HandoffError> {
        Ok(PathRef {
            key: self.key()?,
            upstream: self.addr()?,
            backend: self.addr()?,
        })
    }

    fn transfer(&mut self) -> Result<Transfer, HandoffError> {
        let key = self.key()?;
        let count = usize::from(self.u8()?);
        if count > MAX_ALIASES {
            return Err(self.bad());
        }
        let aliases = (0..count).map(|_| self.key()).collect::<Result<_, _>>()?;
        let backend = self.u16()?;
        let backend_addr = self.addr()?;
        let count = usize::from(self.u8()?);
        if count > MAX_TRANSFER_PATHS {
            return Err(self.bad());
        }
        let mut paths = Vec::with_capacity(count);
        for _ in 0..count {
            let (client, local_ip, upstream) = (self.addr()?, self.opt_ip()?, self.addr()?);
            let (home, generation) = (self.u16()?, self.u16()?);
            paths.push(TransferPath {
                client,
                local_ip,
                upstream,
                home,
                home_generation: generation & !(ANSWER_KNOWN | ANSWERED),
                idle_ms: self.u32()?,
                answered: (generation & ANSWER_KNOWN != 0).then_some(generation & ANSWERED != 0),
            });
        }
        Ok(Transfer {
            key,
            aliases,
            backend,
            backend_addr,
            paths,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8, len: usize) -> FlowKey {
        FlowKey::new(&vec![b; len]).unwrap()
    }

    #[test]
    fn datagram_header_round_trips_both_families() {
        for (client, local) in [
            ("127.0.0.2:4000", Some("127.0.0.1")),
            ("[2001:db8::1]:443", Some("::1")),
            ("10.1.2.3:65535", None),
        ] {
            let h = Header {
                hops: 2,
                listener: 0x0123_4567_89ab_cdef,
                from: 7,
                client: client.parse().unwrap(),
                local_ip: local.map(|l| l.parse().unwrap()),
            };
            let mut frame = h.encode().to_vec();
            frame.extend_from_slice(b"payload");
            assert_eq!(
                Frame::decode(&frame).unwrap(),
                Frame::Datagram {
                    header: h,
                    payload: b"payload"
                }
            );
        }
    }

    #[test]
    fn every_control_frame_round_trips() {
        let path = PathRef {
            key: key(1, 8),
            upstream: "0.0.0.0:20001".parse().unwrap(),
            backend: "[2001:db8::9]:443".parse().unwrap(),
        };
        let messages = vec![
            Control::Transfer(Transfer {
                key: key(1, 16),
                aliases: vec![key(2, 8), key(3, 20)],
                backend: 3,
                backend_addr: "10.0.0.3:443".parse().unwrap(),
                paths: vec![
                    TransferPath {
                        client: "127.0.0.1:5000".parse().unwrap(),
                        local_ip: None,
                        upstream: "10.9.9.9:30000".parse().unwrap(),
                        home: 1,
                        home_generation: 9,
                        answered: Some(true),
                        idle_ms: 1234,
                    },
                    TransferPath {
                        client: "[::1]:6000".parse().unwrap(),
                        local_ip: Some("::1".parse().unwrap()),
                        upstream: "[::]:30001".parse().unwrap(),
                        home: 0,
                        home_generation: 2,
                        answered: None,
                        idle_ms: 0,
                    },
                ],
            }),
            Control::TransferDone {
                key: key(4, 8),
                accepted: true,
            },
            Control::TransferDone {
                key: key(4, 8),
                accepted: false,
            },
            Control::PathClosed(path),
            Control::PathMoved {
                path,
                client: "127.0.0.9:9".parse().unwrap(),
                local_ip: Some("127.0.0.1".parse().unwrap()),
            },
            Control::AliasLearned {
                key: key(5, 8),
                alias: key(6, 12),
            },
            Control::Activity(path),
            Control::Relay {
                path,
                client: "[2001:db8::7]:443".parse().unwrap(),
                local_ip: None,
            },
            Control::RelayTaken(path),
        ];
        for m in messages {
            let frame = m.encode(Owner::new(3, 130), 0xfeed);
            assert_eq!(
                Frame::decode(&frame).unwrap(),
                Frame::Control {
                    from: 3,
                    generation: Some(2),
                    listener: 0xfeed,
                    control: m.clone(),
                    payload: &[],
                    payload_at: frame.len(),
                },
                "{m:?}"
            );
            // Every truncation is an error, never a panic; so is a trailer,
            // except a moved path's datagram.
            for cut in 0..frame.len() {
                assert!(Frame::decode(&frame[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut long = frame.clone();
            long.extend_from_slice(b"datagram");
            match Frame::decode(&long) {
                Ok(Frame::Control {
                    control: Control::PathMoved { .. },
                    payload,
                    payload_at,
                    ..
                }) => {
                    assert_eq!((payload, payload_at), (&b"datagram"[..], frame.len()));
                }
                other => assert!(other.is_err(), "{m:?}: {other:?}"),
            }
            // Generation 0 (mod 128) is said too.
            let zero = m.encode(Owner::new(3, 256), 0xfeed);
            assert!(
                matches!(
                    Frame::decode(&zero),
                    Ok(Frame::Control {
                        generation: Some(0),
                        ..
                    })
                ),
                "{m:?}"
            );
            // A release before the generation byte wrote 0 there.
            let mut older = frame.clone();
            older[1] = 0;
            assert!(
                matches!(
                    Frame::decode(&older),
                    Ok(Frame::Control {
                        from: 3,
                        generation: None,
                        ..
                    })
                ),
                "{m:?}"
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(Frame::decode(&[]), Err(HandoffError::Short));
        assert_eq!(Frame::decode(&[1; 10]), Err(HandoffError::Short));
        let mut f = [0u8; HEADER_LEN];
        f[0] = 10;
        assert_eq!(Frame::decode(&f), Err(HandoffError::Kind(10)));
        f[0] = 1;
        f[4] = 5;
        assert_eq!(Frame::decode(&f), Err(HandoffError::Family(5)));
        let mut seed = 0x1234_5678_u32;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed % 9) as u8
                })
                .collect();
            let _ = Frame::decode(&bytes);
        }
    }
}
