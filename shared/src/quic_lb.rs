//! QUIC-LB plaintext routing (draft-ietf-quic-load-balancers-21, section 5).
//!
//! A server that knows its QUIC-LB server ID writes it into every
//! connection ID it issues: first octet (3 config-rotation bits, then 5
//! bits of length or randomness), then the server ID, then a nonce. The
//! proxy reads the ID back and routes to that server directly, so a client
//! that switches to a connection ID the proxy has never seen (as clients do
//! when they migrate) still reaches its server. IDs whose config bits do
//! not match (a client's random Initial DCID, the unroutable codepoint
//! 0b111, an unknown server ID) fall back to Maglev.

use udpshard_config::QuicLb;

#[derive(Debug, Clone)]
pub struct QuicLbRouter {
    config_id: u8,
    server_id_len: usize,
    /// (server ID, backend index), sorted by ID.
    ids: Vec<(Vec<u8>, usize)>,
}

impl QuicLbRouter {
    /// `server_ids[i]` is backend i's ID (config validation guarantees
    /// every backend has one of the configured length).
    pub fn new(cfg: QuicLb, server_ids: impl IntoIterator<Item = Vec<u8>>) -> QuicLbRouter {
        let mut ids: Vec<(Vec<u8>, usize)> = server_ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| (id, i))
            .collect();
        ids.sort();
        QuicLbRouter {
            config_id: cfg.config_id,
            server_id_len: cfg.server_id_len,
            ids,
        }
    }

    /// The backend a connection ID names, if it is one of this config's.
    pub fn route(&self, cid: &[u8]) -> Option<usize> {
        let first = *cid.first()?;
        if first >> 5 != self.config_id {
            return None;
        }
        let id = cid.get(1..1 + self.server_id_len)?;
        self.ids
            .binary_search_by(|(sid, _)| sid.as_slice().cmp(id))
            .ok()
            .map(|i| self.ids[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> QuicLbRouter {
        QuicLbRouter::new(
            QuicLb {
                config_id: 0,
                server_id_len: 3,
            },
            [
                vec![0x00, 0x00, 0x01],
                vec![0xc4, 0x60, 0x5e],
                vec![0xff, 0xff, 0xff],
            ],
        )
    }

    /// The draft's plaintext vector: config 0, server ID c4605e, nonce
    /// 4504cc4f gives CID 07c4605e4504cc4f.
    #[test]
    fn draft_vector_routes_to_its_server() {
        let cid = [0x07, 0xc4, 0x60, 0x5e, 0x45, 0x04, 0xcc, 0x4f];
        assert_eq!(router().route(&cid), Some(1));
    }

    #[test]
    fn other_ids_fall_back() {
        let r = router();
        // Config rotation bits 0b111: unroutable.
        assert_eq!(r.route(&[0xe7, 0xc4, 0x60, 0x5e, 0, 0, 0, 0]), None);
        // Another config id.
        assert_eq!(r.route(&[0x27, 0xc4, 0x60, 0x5e, 0, 0, 0, 0]), None);
        // Unknown server ID.
        assert_eq!(r.route(&[0x07, 0xc4, 0x60, 0x5f, 0, 0, 0, 0]), None);
        // Too short to hold the ID.
        assert_eq!(r.route(&[0x07, 0xc4, 0x60]), None);
        assert_eq!(r.route(&[]), None);
        // The length bits are the server's business, not routing's.
        assert_eq!(r.route(&[0x1f, 0xff, 0xff, 0xff, 9]), Some(2));
    }
}
