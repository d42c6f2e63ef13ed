//! Admission in the in-memory world: every bound refusing what exceeds it
//! while legitimate traffic passes beside it.

use std::collections::HashSet;

use udpshard_shared::stats::Counter;
use udpshard_shared::DropReason;

use super::harness::{backend, config, long, short, World, CLIENT};

const PORTS: (u16, u16) = (20000, 29999);

fn world(extra: &str, backends: usize) -> World {
    World::new(1, &config(extra, backends), PORTS)
}

/// Whether `cid`'s session at worker 0 is established.
fn established(w: &World, cid: u64) -> bool {
    let key = udpshard_shared::FlowKey::new(&cid.to_be_bytes()).unwrap();
    let sessions = &w.routers[0].sessions;
    sessions
        .lookup(0, &key)
        .and_then(|sid| sessions.get(sid))
        .is_some_and(|s| s.answered())
}

fn client(n: u32) -> String {
    format!(
        "127.{}.{}.{}:{}",
        n >> 16 & 0xff,
        n >> 8 & 0xff,
        n & 0xff,
        1000 + n % 50_000
    )
}

#[test]
fn only_a_first_flight_opens_a_session_and_nothing_else_is_written() {
    let mut w = world("", 1);
    let mut small = long(1, 0x51);
    small.truncate(1199);
    let mut handshake = long(2, 0x52);
    handshake[0] = 0xe0;
    w.send(0, CLIENT, &small);
    w.send(0, CLIENT, &handshake);
    assert_eq!(w.drops(DropReason::NotInitial), 2);
    assert!(w.at_backend.is_empty());
    assert!(
        w.owners.borrow().table.is_empty(),
        "not admitted: the ownership table is not written"
    );
    assert_eq!(w.opens(0), 0, "no socket opened");
    // A full-sized Initial and a short header pass.
    w.send(0, CLIENT, &long(3, 0x53));
    w.send(0, "192.0.2.20:20", &short(4, b"from a fleet peer"));
    assert_eq!(w.at_backend.len(), 2);
    assert_eq!(w.total(Counter::SessionsCreated), 2);
    // A Handshake packet of a live session is forwarded as any datagram.
    let mut follow_up = long(3, 0x53);
    follow_up[0] = 0xe0;
    follow_up.truncate(60);
    w.send(0, CLIENT, &follow_up);
    assert_eq!(w.at_backend.len(), 3);
    w.assert_ledger();
}

#[test]
fn embryonic_sessions_are_bounded_and_the_oldest_makes_room() {
    let mut w = world("[listener.admission]\nmax_embryonic = 10", 1);
    // Ten clients the backend answers: established.
    for cid in 0..10u64 {
        w.send(0, CLIENT, &short(cid, b"real"));
    }
    w.echo_since(0);
    // A flood of a hundred garbage flows, never answered.
    for cid in 100..200u64 {
        w.send(0, &client(cid as u32), &short(cid, b"junk"));
    }
    assert_eq!(w.routers[0].sessions.embryonic(0), 10, "at the bound");
    assert_eq!(w.counter(0, Counter::SessionsEvicted), 90);
    assert!((0..10).all(|cid| established(&w, cid)));
    assert!(
        (0..10).all(|cid| w.holders(cid) == vec![0]),
        "no established session was evicted"
    );
    // The newest garbage is what is left of it; a new real client passes.
    assert_eq!(w.holders(199), vec![0]);
    assert!(w.holders(100).is_empty());
    let before = w.at_backend.len();
    w.send(0, CLIENT, &short(1000, b"new real client"));
    assert_eq!(w.at_backend.len(), before + 1);
    w.assert_ledger();
    w.assert_unique_tuples();
}

#[test]
fn at_max_sessions_a_new_flow_takes_an_embryonic_place_never_an_established_one() {
    let text = config("[listener.admission]\nmax_embryonic = 4", 1)
        .replace("max_sessions = 1000", "max_sessions = 4");
    let mut w = World::new(1, &text, PORTS);
    for cid in 0..2u64 {
        w.send(0, CLIENT, &short(cid, b"real"));
    }
    w.echo_since(0);
    for cid in 10..12u64 {
        w.send(0, CLIENT, &short(cid, b"junk"));
    }
    // Full: each new flow evicts an embryonic one.
    w.send(0, CLIENT, &short(20, b"new"));
    w.send(0, CLIENT, &short(21, b"new"));
    assert_eq!(w.counter(0, Counter::SessionsEvicted), 2);
    assert!(w.holders(10).is_empty() && w.holders(11).is_empty());
    assert_eq!(w.drops(DropReason::SessionLimit), 0);
    // Once every session is established, a new flow is refused.
    w.echo_since(0);
    w.send(0, CLIENT, &short(30, b"refused"));
    assert_eq!(w.drops(DropReason::SessionLimit), 1);
    assert!((0..2).chain(20..22).all(|cid| w.holders(cid) == vec![0]));
    w.assert_ledger();
}

#[test]
fn an_unanswered_session_is_given_up_after_embryonic_timeout() {
    let mut w = world(
        "session_idle = \"60s\"\n[listener.admission]\nembryonic_timeout = \"3s\"",
        1,
    );
    w.send(0, CLIENT, &short(1, b"answered"));
    w.echo_since(0);
    w.send(0, CLIENT, &short(2, b"never answered"));
    // The client keeps sending: still given up, counted from its start.
    for _ in 0..4 {
        w.advance(1_000);
        w.send(0, CLIENT, &short(2, b"again"));
    }
    w.advance(100);
    assert_eq!(w.counter(0, Counter::SessionsEvicted), 1, "given up at 3 s");
    assert_eq!(
        w.counter(0, Counter::SessionsCreated),
        3,
        "its next datagram began it again, embryonic"
    );
    assert!(!established(&w, 2));
    assert_eq!(w.holders(1), vec![0], "established: stays");
    w.assert_ledger();
}

#[test]
fn out_of_ports_a_new_flow_takes_an_embryonic_ones_port_at_once() {
    // Four ports, one backend, a long reuse delay.
    let mut w = World::new(1, &config("port_reuse_delay = \"60s\"", 1), (20000, 20003));
    for cid in 0..2u64 {
        w.send(0, CLIENT, &short(cid, b"real"));
    }
    w.echo_since(0);
    for cid in 10..12u64 {
        w.send(0, CLIENT, &short(cid, b"junk"));
    }
    assert_eq!(w.fds(0), 4, "every port taken");
    // A new client gets a garbage flow's port, with no cooling: its backend
    // never sent on it.
    w.send(0, CLIENT, &short(20, b"new"));
    assert_eq!(w.drops(DropReason::NoPort), 0);
    assert_eq!(w.counter(0, Counter::SessionsEvicted), 1);
    let real: HashSet<_> = w.at_backend[..2].iter().map(|d| d.from).collect();
    assert!(!real.contains(&w.at_backend.last().unwrap().from));
    // The established flows keep theirs.
    for cid in 0..2u64 {
        w.send(0, CLIENT, &short(cid, b"again"));
        assert!(real.contains(&w.at_backend.last().unwrap().from));
    }
    w.assert_unique_tuples();
    w.assert_ledger();
}

#[test]
fn out_of_ports_a_migration_takes_the_place_of_a_flow_to_its_own_backend() {
    // Two ports shared by two backends: four paths, each socket carrying
    // one path to each backend.
    let text = config("max_paths = 2\nport_reuse_delay = \"60s\"", 2);
    let mut w = World::new(1, &text, (20000, 20001));
    let pick = |w: &World, cid: u64| w.routers[0].routes[0].pick(&cid.to_be_bytes());
    w.send(0, CLIENT, &short(0, b"real"));
    w.echo_since(0);
    let home = pick(&w, 0);
    // The two oldest garbage flows go to the other backend, the newest to
    // the real client's.
    let other: Vec<u64> = (10..).filter(|&c| pick(&w, c) != home).take(2).collect();
    let same = (10..).find(|&c| pick(&w, c) == home).unwrap();
    for cid in [other[0], other[1], same] {
        w.send(0, CLIENT, &short(cid, b"junk"));
    }
    assert_eq!(w.routers[0].paths.paths.len(), 4);
    assert_eq!(w.counter(0, Counter::SessionsEvicted), 0);
    // The client moves: its new path needs a place toward its backend, and
    // only the garbage flow there gives one back.
    w.send(0, "192.0.2.9:9", &short(0, b"moved"));
    assert_eq!(w.drops(DropReason::NoPort), 0);
    assert_eq!(w.counter(0, Counter::SessionsEvicted), 1);
    assert_eq!(w.at_backend.last().unwrap().backend, backend(home));
    let sessions = &w.routers[0].sessions;
    let alive = |cid: u64| {
        let key = udpshard_shared::FlowKey::new(&cid.to_be_bytes()).unwrap();
        sessions.lookup(0, &key).is_some()
    };
    assert!(alive(other[0]) && alive(other[1]), "the others stay");
    assert!(!alive(same));
    w.assert_unique_tuples();
    w.assert_ledger();
}

#[test]
fn one_source_over_its_rate_is_refused_while_another_passes() {
    let mut w = world(
        "[listener.admission]\nnew_sessions_per_source = 10\nnew_sessions_burst = 20",
        1,
    );
    for cid in 0..100u64 {
        w.send(0, "198.51.100.77:4000", &short(cid, b"flood"));
    }
    assert_eq!(w.drops(DropReason::RateLimited), 80, "past its burst");
    assert_eq!(w.total(Counter::SessionsCreated), 20);
    // Another address at the same time passes, and so does the flooder's
    // own established flow.
    w.send(0, "203.0.113.5:4000", &short(500, b"real"));
    assert_eq!(w.holders(500), vec![0]);
    w.send(0, "198.51.100.77:4000", &short(0, b"its own session"));
    assert_eq!(
        w.at_backend.last().unwrap().payload,
        short(0, b"its own session")
    );
    // Its rate refills: 10 a second.
    w.advance(1_000);
    w.send(0, "198.51.100.77:4000", &short(600, b"later"));
    assert_eq!(w.holders(600), vec![0]);
    w.assert_ledger();
}

#[test]
fn a_spray_of_a_live_cid_never_moves_the_real_clients_4_tuple() {
    let mut w = world("max_paths = 4\npath_idle = \"30s\"", 1);
    w.send(0, CLIENT, &short(7, b"real"));
    w.echo_since(0);
    let real = w.at_backend[0].from;
    let opens = w.opens(0);
    // Thousands of forged addresses carry its CID (the backend ignores
    // them, as a QUIC server ignores what it cannot decrypt), while the
    // client keeps talking and its backend answering.
    for n in 0..3000u32 {
        w.send(0, &client(n + 1), &short(7, b"spoof"));
        if n % 100 == 0 {
            let at = w.at_backend.len();
            w.send(0, CLIENT, &short(7, b"real"));
            assert_eq!(w.at_backend.last().unwrap().from, real, "spoof {n}");
            w.echo_since(at);
            w.advance(20);
        }
    }
    let limited = w.drops(DropReason::PathLimit) + w.drops(DropReason::RateLimited);
    assert!(limited >= 2990, "spoofed paths refused: {limited}");
    assert!(
        w.opens(0) - opens < 16,
        "ports opened for the spray: {}",
        w.opens(0) - opens
    );
    assert!(w.routers[0].paths.paths.len() <= 4);
    w.assert_ledger();
    w.assert_unique_tuples();
}

#[test]
fn a_migration_still_gets_its_path_beside_a_trusted_one() {
    let mut w = world("max_paths = 2", 1);
    w.send(0, CLIENT, &short(7, b"real"));
    w.echo_since(0);
    w.send(0, "192.0.2.55:7", &short(7, b"moved"));
    assert_eq!(w.routers[0].paths.paths.len(), 2);
    let moved = w.at_backend.last().unwrap().from;
    assert_ne!(moved, w.at_backend[0].from, "a path of its own");
    // A spoofer's address may take the unanswered path's place, never the
    // answered one's.
    w.send(0, "192.0.2.66:6", &short(7, b"spoof"));
    w.send(0, CLIENT, &short(7, b"still"));
    assert_eq!(w.at_backend.last().unwrap().from, w.at_backend[0].from);
    w.assert_ledger();
}

#[test]
fn an_alias_never_takes_a_live_sessions_cid() {
    let mut w = World::new(2, &config("", 1), PORTS);
    // Worker 1 serves CID 0x5e.
    w.send(1, CLIENT, &short(0x5e, b"owner"));
    let owner = w.routers[1].me;
    // A server on worker 0's session claims 0x5e as its SCID.
    w.send(0, "192.0.2.3:3", &long(0xd0, 0xc1));
    let from = w.at_backend.last().unwrap().from;
    w.reply(backend(0), from, &long(0xc1, 0x5e));
    let key = udpshard_shared::FlowKey::new(&0x5eu64.to_be_bytes()).unwrap();
    let hash = w.routers[0].owner_hash(0, &key);
    assert_eq!(w.owners.borrow().table.get(&hash), Some(&owner));
    // The CID's datagrams still reach worker 1's session.
    w.send(0, CLIENT, &short(0x5e, b"still"));
    assert_eq!(w.holders(0x5e), vec![1]);
    w.assert_ledger();
}

#[test]
fn a_transferred_session_keeps_what_its_backend_had_answered() {
    let mut w = World::new(2, &config("", 1), PORTS);
    w.send(0, CLIENT, &short(1, b"a"));
    w.echo_since(0);
    w.send(0, CLIENT, &short(2, b"b"));
    for cid in [1u64, 2] {
        for n in 0..super::TRANSFER_AFTER {
            w.send(1, CLIENT, &short(cid, &[n]));
        }
    }
    assert_eq!(w.holders(1), vec![1]);
    assert_eq!(w.holders(2), vec![1]);
    let sessions = &w.routers[1].sessions;
    let answered = |cid: u64| {
        let key = udpshard_shared::FlowKey::new(&cid.to_be_bytes()).unwrap();
        sessions
            .get(sessions.lookup(0, &key).unwrap())
            .unwrap()
            .answered()
    };
    assert!(answered(1), "established there too");
    assert!(!answered(2), "still embryonic there");
    assert_eq!(sessions.embryonic(0), 1);
    w.assert_ledger();
}
