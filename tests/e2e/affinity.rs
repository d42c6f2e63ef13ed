//! End to end: connection affinity across client migration, in both
//! steering modes and both migration modes. 200 connection IDs move to a
//! new port, then to new source IPs; each keeps its backend and its session,
//! and replies follow the client. With `migration = "path"` the backend sees
//! one proxy address per client address (it validates the move itself);
//! with `"follow"` it keeps seeing the same one.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use udpshard_tests::harness::{
    bind_udp, listener_config, quic_short, total, wait_until, Backend, Proxy,
};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
const WAIT: Duration = Duration::from_secs(15);
const CIDS: u64 = 200;

fn config(steering: &str, migration: &str, a: &Backend, b: &Backend) -> String {
    listener_config(
        "workers = 2",
        &format!(
            "dissector = \"quic\"\nshort_cid_len = 8\nsteering = \"{steering}\"\nmigration = \"{migration}\"\nupstream_ports = \"1025-32767\""
        ),
        &[a.addr, b.addr],
    )
}

fn client_on(ip: &str) -> UdpSocket {
    let c = bind_udp(&format!("{ip}:0"));
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

/// Sends `per_cid` datagrams for every CID, each CID from its own socket
/// on `ips` (round robin), and checks that each socket gets its replies.
/// Returns the sockets: held until the test ends, their ports cannot come
/// back to a later phase (a CID whose "new" port was its old one would not
/// have migrated).
fn phase(proxy: &Proxy, ips: &[&str], per_cid: usize, tag: u8) -> Vec<UdpSocket> {
    let target = proxy.addr("quic");
    let clients: Vec<UdpSocket> = (0..CIDS as usize)
        .map(|i| client_on(ips[i % ips.len()]))
        .collect();
    for n in 0..per_cid {
        for (cid, c) in clients.iter().enumerate() {
            c.send_to(&quic_short(cid as u64 + 1, &[tag, n as u8]), target)
                .unwrap();
        }
    }
    for (cid, c) in clients.iter().enumerate() {
        let mut buf = [0u8; 64];
        for _ in 0..per_cid {
            let (n, from) = c.recv_from(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "CID {}: reply at {}: {e}\nstats: {:#}\nlog:\n{}",
                    cid + 1,
                    c.local_addr().unwrap(),
                    proxy.stats(),
                    proxy.log()
                )
            });
            assert_eq!(from, target);
            assert_eq!(&buf[3..11], &(cid as u64 + 1).to_be_bytes());
            assert_eq!(
                buf[11], tag,
                "a reply of an earlier phase reached the new address"
            );
            assert!(n >= 13);
        }
    }
    clients
}

fn migrate_in(steering: &str, migration: &str) -> serde_json::Value {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let proxy = Proxy::start(Path::new(BIN), &config(steering, migration, &a, &b));
    let mode = if steering == "reshuffle" {
        "reshuffle steering"
    } else {
        "kernel-cid steering"
    };
    assert!(proxy.log().contains(mode), "{}", proxy.log());

    let first = phase(&proxy, &["127.0.0.1"], 3, 1);
    // NAT rebinding: the same CIDs from new ports.
    let rebound = phase(&proxy, &["127.0.0.1"], 5, 2);
    // New source IPs.
    let moved = phase(&proxy, &["127.0.0.2", "127.0.0.3"], 5, 3);
    let want = CIDS as usize * 13;
    wait_until(WAIT, "every datagram at a backend", || {
        a.count() + b.count() == want
    });

    let mut routes: HashMap<u64, (HashSet<String>, HashSet<SocketAddr>)> = HashMap::new();
    let mut tuples: HashSet<(String, SocketAddr)> = HashSet::new();
    for backend in [&a, &b] {
        for seen in backend.seen() {
            let cid = u64::from_be_bytes(seen.payload[1..9].try_into().unwrap());
            let e = routes.entry(cid).or_default();
            e.0.insert(backend.name.clone());
            e.1.insert(seen.from);
            tuples.insert((backend.name.clone(), seen.from));
        }
    }
    assert_eq!(routes.len(), CIDS as usize);
    // Three client addresses per CID: its first, a new port, a new IP.
    let addresses_seen = if migration == "path" { 3 } else { 1 };
    for (cid, (names, froms)) in &routes {
        assert_eq!(names.len(), 1, "CID {cid} reached {names:?}");
        assert_eq!(
            froms.len(),
            addresses_seen,
            "CID {cid}: the backend saw {froms:?}"
        );
    }
    // No two paths ever shared an upstream 4-tuple.
    assert_eq!(tuples.len(), CIDS as usize * addresses_seen);
    let stats = proxy.wait_stats(WAIT, "every reply counted", |s| {
        total(s, "replies_out") == want as u64
    });
    assert_eq!(total(&stats, "tx_packets"), want as u64);
    assert_eq!(total(&stats, "sessions_active"), CIDS);
    // A migrated connection keeps its session: none was made twice.
    assert_eq!(total(&stats, "sessions_created"), CIDS);
    assert_eq!(total(&stats, "drops.handoff"), 0);
    drop((first, rebound, moved));
    stats
}

fn reshuffle_hands_migrated_flows_to_their_owner_then_moves_them(migration: &str) {
    let stats = migrate_in("reshuffle", migration);
    // Two workers, 400 fresh 4-tuples: about half land on the other worker.
    let handoffs = total(&stats, "handoff_out");
    assert!(handoffs > 0, "no handoffs: {stats:#}");
    assert_eq!(handoffs, total(&stats, "handoff_in"));
    let moved = total(&stats, "transfers_out");
    assert!(moved > 0, "no session followed its flow: {stats:#}");
    assert_eq!(moved, total(&stats, "transfers_in"));
    // Handoff is the exception: after a transfer the flow arrives directly,
    // so fewer handoffs than the migrated datagrams.
    assert!(
        handoffs < CIDS * 10,
        "{handoffs} handoffs: transfers did not stop them"
    );
}

fn kernel_cid_keeps_migrated_flows_on_their_worker_without_handoff(migration: &str) {
    let stats = migrate_in("kernel-cid", migration);
    assert_eq!(total(&stats, "handoff_out"), 0, "{stats:#}");
    assert_eq!(total(&stats, "transfers_out"), 0, "{stats:#}");
}

#[test]
fn path_mode_reshuffle_hands_migrated_flows_to_their_owner_then_moves_them() {
    reshuffle_hands_migrated_flows_to_their_owner_then_moves_them("path");
}

#[test]
fn follow_mode_reshuffle_hands_migrated_flows_to_their_owner_then_moves_them() {
    reshuffle_hands_migrated_flows_to_their_owner_then_moves_them("follow");
}

#[test]
fn path_mode_kernel_cid_keeps_migrated_flows_on_their_worker_without_handoff() {
    kernel_cid_keeps_migrated_flows_on_their_worker_without_handoff("path");
}

#[test]
fn follow_mode_kernel_cid_keeps_migrated_flows_on_their_worker_without_handoff() {
    kernel_cid_keeps_migrated_flows_on_their_worker_without_handoff("follow");
}
