//! The generator's datagram: a QUIC short header whose connection ID names the flow, followed by
//! a sequence number and the send time, so a sink can count, attribute and time every datagram.
//!
//! ```text
//! byte 0      0x40 (short header: form bit 0, fixed bit 1)
//! bytes 1..9  destination connection ID, 8 bytes, derived from the flow index
//! bytes 9..17 sequence number, u64 little endian
//! bytes 17..25 send timestamp, CLOCK_MONOTONIC nanoseconds, u64 little endian
//! bytes 25..  padding (zeros) up to the datagram size
//! ```

use thiserror::Error;

/// First byte of every generated datagram: a QUIC short header with the fixed bit set.
pub const SHORT_HEADER: u8 = 0x40;
/// Length of the connection ID that follows the first byte (configure proxies with
/// `short_cid_len = 8`).
pub const CID_LEN: usize = 8;
/// Bytes before the padding: first byte, CID, sequence number, timestamp.
pub const HEADER_LEN: usize = 1 + CID_LEN + 8 + 8;
/// Smallest datagram the generator can send.
pub const MIN_SIZE: usize = HEADER_LEN;
/// Default datagram size: a small QUIC packet (the benchmark's figure).
pub const DEFAULT_SIZE: usize = 33;
/// Largest UDP payload over IPv4.
pub const MAX_SIZE: usize = 65_507;

const SEQ_AT: usize = 1 + CID_LEN;
const SENT_AT: usize = SEQ_AT + 8;

/// XORed into the flow index so that CIDs are non-zero and do not all share leading zero bytes.
/// Its top nibble is set, so no flow index below 2^60 maps to zero.
const CID_MASK: u64 = 0xC1D5_A7E5_0000_0000;

/// The connection ID of flow `flow`: stable across runs and processes, distinct per flow and
/// never all zeros.
pub fn flow_cid(flow: usize) -> [u8; CID_LEN] {
    ((flow as u64) ^ CID_MASK).to_be_bytes()
}

/// The flow index that [`flow_cid`] encoded in `cid`.
pub fn cid_flow(cid: [u8; CID_LEN]) -> u64 {
    u64::from_be_bytes(cid) ^ CID_MASK
}

/// What a generated datagram carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub cid: [u8; CID_LEN],
    pub seq: u64,
    /// Send time, CLOCK_MONOTONIC nanoseconds.
    pub sent_ns: u64,
}

/// Why bytes are not a generated datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("datagram of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("first byte {0:#04x} is not the short header {SHORT_HEADER:#04x}")]
    NotShortHeader(u8),
}

impl Datagram {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf` and leaves the rest (the
    /// padding) as it is. Returns `None` when `buf` is shorter than the header.
    pub fn encode(&self, buf: &mut [u8]) -> Option<()> {
        let header = buf.get_mut(..HEADER_LEN)?;
        header[0] = SHORT_HEADER;
        header[1..SEQ_AT].copy_from_slice(&self.cid);
        header[SEQ_AT..SENT_AT].copy_from_slice(&self.seq.to_le_bytes());
        header[SENT_AT..HEADER_LEN].copy_from_slice(&self.sent_ns.to_le_bytes());
        Some(())
    }

    /// Reads a datagram written by [`Datagram::encode`]; bytes past the header are ignored.
    pub fn parse(buf: &[u8]) -> Result<Datagram, ParseError> {
        let header: &[u8; HEADER_LEN] = buf
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(ParseError::TooShort { len: buf.len() })?;
        if header[0] != SHORT_HEADER {
            return Err(ParseError::NotShortHeader(header[0]));
        }
        let (cid, rest) = header[1..].split_at(CID_LEN);
        let (seq, sent) = rest.split_at(8);
        Ok(Datagram {
            cid: array(cid),
            seq: u64::from_le_bytes(array(seq)),
            sent_ns: u64::from_le_bytes(array(sent)),
        })
    }
}

/// Copies an 8-byte slice whose length the caller's `split_at` already fixed.
fn array(bytes: &[u8]) -> [u8; 8] {
    let mut out = [0; 8];
    out.copy_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn encode_then_parse_round_trips_with_padding() {
        let d = Datagram {
            cid: flow_cid(1234),
            seq: 0x0102_0304_0506_0708,
            sent_ns: u64::MAX - 1,
        };
        let mut buf = vec![0xEE; DEFAULT_SIZE];
        d.encode(&mut buf).unwrap();
        assert_eq!(buf[0], 0x40);
        assert_eq!(&buf[1..9], &flow_cid(1234));
        assert_eq!(&buf[9..17], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&buf[HEADER_LEN..], &[0xEE; DEFAULT_SIZE - HEADER_LEN]);
        assert_eq!(Datagram::parse(&buf), Ok(d));
        assert_eq!(Datagram::parse(&buf[..MIN_SIZE]), Ok(d));
    }

    #[test]
    fn encode_refuses_a_short_buffer() {
        let d = Datagram {
            cid: flow_cid(0),
            seq: 1,
            sent_ns: 2,
        };
        assert_eq!(d.encode(&mut [0; HEADER_LEN - 1]), None);
    }

    #[test]
    fn parse_rejects_short_and_foreign_datagrams() {
        assert_eq!(Datagram::parse(&[]), Err(ParseError::TooShort { len: 0 }));
        assert_eq!(
            Datagram::parse(&[0x40; 24]),
            Err(ParseError::TooShort { len: 24 })
        );
        let mut long_header = [0u8; 40];
        long_header[0] = 0xC3;
        assert_eq!(
            Datagram::parse(&long_header),
            Err(ParseError::NotShortHeader(0xC3))
        );
    }

    #[test]
    fn flow_cids_are_distinct_nonzero_and_reversible() {
        let cids: HashSet<_> = (0..100_000).map(flow_cid).collect();
        assert_eq!(cids.len(), 100_000);
        assert!(!cids.contains(&[0; CID_LEN]));
        for flow in [0usize, 1, 1999, 65_535, 1 << 40] {
            assert_eq!(cid_flow(flow_cid(flow)), flow as u64);
        }
        // Pinned: other tools (and proxies' tests) may rely on these bytes.
        assert_eq!(flow_cid(0), [0xC1, 0xD5, 0xA7, 0xE5, 0, 0, 0, 0]);
        assert_eq!(flow_cid(0x0102), [0xC1, 0xD5, 0xA7, 0xE5, 0, 0, 0x01, 0x02]);
    }
}
