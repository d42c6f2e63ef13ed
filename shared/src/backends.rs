//! Per-backend counters in the stats region.
//!
//! The supervisor gives every (listener name, backend address) of the
//! config a *row*, once for the run: a reload that keeps a backend keeps its
//! row, one that removes it leaves the row (and its counts) marked as no
//! longer configured, so nothing a backend was counted for ever goes away.
//! Each worker's slot has its own counters for every row, written by that
//! worker alone; readers sum them.
//!
//! Row metadata, [`META_WORDS`] words, written by the supervisor:
//!
//! ```text
//! word 0     1 | in_config << 1 | state << 8 | weight << 16   (0: row unused)
//! words 1-2  the address (IPv4 as v4-mapped IPv6), high then low
//! word 3     port | family << 16 (4 or 6)
//! words 4-7  the listener's name, NUL-padded (names are at most 32 bytes)
//! word 8     times it went down (passive health)
//! word 9     CLOCK_MONOTONIC (ms) of its latest state change
//! ```

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Backend rows a run can have (over every listener, reloads included).
pub const BACKEND_ROWS: usize = 256;
pub const META_WORDS: usize = 10;
/// Counters per row per worker.
pub const FIELDS: usize = 10;
const NAME_WORDS: usize = 4;
/// Words 1..=7: address, port and family, listener name.
pub const IDENTITY_WORDS: usize = 3 + NAME_WORDS;
/// Word 8: times it went down; word 9: when its state last changed.
pub const DOWNS_WORD: usize = 8;
pub const CHANGED_WORD: usize = 9;

/// One backend's counters in a worker's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum BackendCounter {
    /// Sessions on this worker with this backend (a gauge, recounted every
    /// second).
    SessionsActive = 0,
    SessionsCreated,
    /// Datagrams forwarded to it, and their bytes.
    TxPackets,
    TxBytes,
    /// Datagrams read from it.
    Replies,
    /// ICMP port/host/network unreachable reports for datagrams sent to it
    /// (read from the upstream sockets' error queues).
    Unreachable,
    /// Forwards to it that the kernel refused, and other ICMP errors.
    SendErrors,
    /// CLOCK_MONOTONIC (ms) of its latest reply on this worker; 0: none.
    LastReplyMs,
    /// New sessions (QUIC) that got no reply within `reply_timeout`.
    NoReply,
    /// New sessions (QUIC) that got their first reply within it.
    Answered,
}

impl BackendCounter {
    pub const ALL: [BackendCounter; FIELDS] = [
        BackendCounter::SessionsActive,
        BackendCounter::SessionsCreated,
        BackendCounter::TxPackets,
        BackendCounter::TxBytes,
        BackendCounter::Replies,
        BackendCounter::Unreachable,
        BackendCounter::SendErrors,
        BackendCounter::LastReplyMs,
        BackendCounter::NoReply,
        BackendCounter::Answered,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BackendCounter::SessionsActive => "sessions_active",
            BackendCounter::SessionsCreated => "sessions_created",
            BackendCounter::TxPackets => "tx_packets",
            BackendCounter::TxBytes => "tx_bytes",
            BackendCounter::Replies => "replies",
            BackendCounter::Unreachable => "unreachable",
            BackendCounter::SendErrors => "send_errors",
            BackendCounter::LastReplyMs => "last_reply_ms",
            BackendCounter::NoReply => "sessions_unanswered",
            BackendCounter::Answered => "sessions_answered",
        }
    }
}

/// What new sessions may do with a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    Up = 1,
    Down = 2,
    /// Weight 0: no new sessions; live ones stay until they idle out.
    Draining = 3,
}

impl BackendState {
    pub fn name(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
        }
    }

    fn from_bits(bits: u64) -> BackendState {
        match bits {
            2 => BackendState::Down,
            3 => BackendState::Draining,
            _ => BackendState::Up,
        }
    }
}

/// A row's identity and standing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendMeta {
    pub listener: String,
    pub addr: SocketAddr,
    /// In the config being served (false: a reload removed it).
    pub in_config: bool,
    pub state: BackendState,
    pub weight: u32,
    /// Times passive health took it down.
    pub downs: u64,
    /// CLOCK_MONOTONIC (ms) of its latest state change (0: none yet).
    pub changed_ms: u64,
}

/// The state word 0 of a row holds.
pub fn state_of(word0: u64) -> BackendState {
    BackendState::from_bits((word0 >> 8) & 0xff)
}

/// Word 0 of a row.
pub fn status_word(in_config: bool, state: BackendState, weight: u32) -> u64 {
    1 | u64::from(in_config) << 1 | (state as u64) << 8 | u64::from(weight.min(0xffff)) << 16
}

/// Words 1..8 of a row: its identity.
pub fn identity_words(listener: &str, addr: SocketAddr) -> [u64; IDENTITY_WORDS] {
    let (family, v6) = match addr.ip() {
        IpAddr::V4(v4) => (4u64, v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => (6, v6),
    };
    let bits = v6.to_bits();
    let mut out = [0u64; IDENTITY_WORDS];
    out[0] = (bits >> 64) as u64;
    out[1] = bits as u64;
    out[2] = u64::from(addr.port()) | family << 16;
    let mut name = [0u8; NAME_WORDS * 8];
    let bytes = listener.as_bytes();
    let n = bytes.len().min(name.len());
    name[..n].copy_from_slice(&bytes[..n]);
    for (i, chunk) in name.chunks_exact(8).enumerate() {
        out[3 + i] = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
    }
    out
}

/// A row's metadata from its words; `None` for an unused or garbled row.
pub fn decode_meta(w: &[u64]) -> Option<BackendMeta> {
    if w.len() < META_WORDS || w[0] & 1 == 0 {
        return None;
    }
    let v6 = Ipv6Addr::from_bits(u128::from(w[1]) << 64 | u128::from(w[2]));
    let port = (w[3] & 0xffff) as u16;
    let ip = match w[3] >> 16 {
        4 => IpAddr::V4(v6.to_ipv4_mapped()?),
        6 => IpAddr::V6(v6),
        _ => return None,
    };
    let name: Vec<u8> = w[4..4 + NAME_WORDS]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .take_while(|b| *b != 0)
        .collect();
    Some(BackendMeta {
        listener: String::from_utf8_lossy(&name).into_owned(),
        addr: SocketAddr::new(ip, port),
        in_config: w[0] & 2 != 0,
        state: BackendState::from_bits((w[0] >> 8) & 0xff),
        weight: ((w[0] >> 16) & 0xffff) as u32,
        downs: w[DOWNS_WORD],
        changed_ms: w[CHANGED_WORD],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_round_trips_its_identity_and_standing() {
        for addr in ["10.0.0.1:443", "[2001:db8::7]:8443"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut w = vec![status_word(true, BackendState::Draining, 0)];
            w.extend(identity_words("quic-public", addr));
            w.extend([0, 0]);
            let meta = decode_meta(&w).unwrap();
            assert_eq!(
                meta,
                BackendMeta {
                    listener: "quic-public".into(),
                    addr,
                    in_config: true,
                    state: BackendState::Draining,
                    weight: 0,
                    downs: 0,
                    changed_ms: 0,
                }
            );
        }
        assert_eq!(decode_meta(&[0; META_WORDS]), None, "unused");
        let mut w = vec![status_word(false, BackendState::Up, 1000)];
        w.extend(identity_words(
            &"n".repeat(32),
            "10.0.0.1:1".parse().unwrap(),
        ));
        w.extend([2, 77]);
        let meta = decode_meta(&w).unwrap();
        assert_eq!(meta.listener.len(), 32);
        assert!(!meta.in_config);
        assert_eq!(meta.weight, 1000);
        assert_eq!((meta.downs, meta.changed_ms), (2, 77));
    }
}
