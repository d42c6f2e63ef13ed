//! Properties over arbitrary bytes for every decoder that sees outside
//! input: none panics, and what they return stays within its bounds.
//!
//! They stand in for coverage-guided fuzzing, which needs crates (afl,
//! libfuzzer-sys) or a nightly toolchain that this build cannot fetch.

use std::net::SocketAddr;

use proptest::prelude::*;
use udpshard_shared::control::FrameReader;
use udpshard_shared::flow::quic_long_scid;
use udpshard_shared::handoff::Frame;
use udpshard_shared::quic_lb::QuicLbRouter;
use udpshard_shared::stats::{Snapshot, MAGIC, SLOT_WORDS};
use udpshard_shared::steer::{interpret, kernel_cid_index, program, FALLBACK};
use udpshard_shared::Dissector;

const CASES: u32 = 4096;

fn dissector() -> impl Strategy<Value = Dissector> {
    prop_oneof![
        (0usize..=20).prop_map(|short_cid_len| Dissector::Quic { short_cid_len }),
        (0usize..64, 1usize..=20).prop_map(|(cid_offset, cid_len)| Dissector::Bytes {
            cid_offset,
            cid_len
        }),
        Just(Dissector::Tuple),
    ]
}

fn datagram() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..1500)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn a_dissector_takes_any_datagram(d in dissector(), bytes in datagram(), port in any::<u16>()) {
        let client = SocketAddr::from(([192, 0, 2, 1], port));
        if let Ok(key) = d.flow_key(&bytes, client) {
            prop_assert!(key.as_bytes().len() <= 20);
        }
    }

    #[test]
    fn a_long_header_scid_is_read_from_any_datagram(bytes in datagram()) {
        if let Some(key) = quic_long_scid(&bytes) {
            prop_assert!(key.as_bytes().len() <= 20);
        }
    }

    #[test]
    fn the_kernel_program_and_its_rust_twin_agree_on_any_datagram(
        d in dissector(), bytes in datagram(), n in 1u32..=64,
    ) {
        if let Some(prog) = program(&d, n) {
            let want = kernel_cid_index(&d, &bytes, n).unwrap_or(FALLBACK);
            prop_assert_eq!(interpret(&prog, &bytes), want);
        }
    }

    #[test]
    fn quic_lb_routes_any_connection_id_to_a_known_server_or_none(
        config_id in 0u8..=6, server_id_len in 1usize..=15, servers in 1usize..8,
        cid in prop::collection::vec(any::<u8>(), 0..=20),
    ) {
        let ids: Vec<Vec<u8>> = (0..servers).map(|i| vec![i as u8; server_id_len]).collect();
        let router = QuicLbRouter::new(
            udpshard_config::QuicLb { config_id, server_id_len },
            ids,
        );
        if let Some(i) = router.route(&cid) {
            prop_assert!(i < servers);
        }
    }

    #[test]
    fn a_handoff_frame_decodes_from_any_bytes(bytes in datagram()) {
        let _ = Frame::decode(&bytes);
    }

    #[test]
    fn control_frames_decode_from_any_stream(chunks in prop::collection::vec(datagram(), 0..6)) {
        let mut reader = FrameReader::default();
        for chunk in &chunks {
            reader.push(chunk);
            while reader.next_msg().is_some() {}
        }
    }

    #[test]
    fn a_stats_snapshot_parses_from_any_file(
        rest in prop::collection::vec(any::<u8>(), 0..4096),
        slots in any::<u64>(), workers in any::<u64>(), magic in any::<bool>(),
    ) {
        // Headers that pass the first checks, with any counts after them.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&if magic { MAGIC } else { 0 }.to_le_bytes());
        // Mostly a capacity a file could hold; else any (a hostile file).
        let slots = if slots & 1 == 0 { slots % 8 } else { slots };
        bytes.extend_from_slice(&slots.to_le_bytes());
        bytes.extend_from_slice(&(SLOT_WORDS as u64).to_le_bytes());
        bytes.extend_from_slice(&workers.to_le_bytes());
        bytes.extend_from_slice(&rest);
        if let Ok(snap) = Snapshot::parse(&bytes) {
            prop_assert!(snap.workers().count() <= snap.slots().count());
        }
        let _ = Snapshot::parse(&rest);
    }
}
