//! The router, driven in memory: 2-4 routers sharing one ownership table,
//! a fake kernel, virtual time. `cargo test -p udpshard-worker router`.

use std::collections::HashSet;
use std::net::SocketAddr;

use udpshard_shared::stats::Counter;
use udpshard_shared::DropReason;

use super::harness::{addr, backend, config, long, short, World, CLIENT};
use super::{Owners, OFFER_LIFETIME_MS, TRANSFER_AFTER, TRANSFER_TIMEOUT_MS};

const PORTS: (u16, u16) = (20000, 29999);

fn world(workers: usize, extra: &str, backends: usize) -> World {
    World::new(workers, &config(extra, backends), PORTS)
}

#[test]
fn router_a_new_flow_opens_a_path_and_forwards() {
    let mut w = world(2, "", 2);
    w.send(0, CLIENT, &short(1, b"hi"));
    assert_eq!(w.at_backend.len(), 1);
    let d = &w.at_backend[0];
    assert_eq!(d.payload, short(1, b"hi"));
    assert!((20000..=29999).contains(&d.from.port()), "{d:?}");
    assert_eq!(w.counter(0, Counter::SessionsCreated), 1);
    assert_eq!(w.counter(0, Counter::PathsCreated), 1);
    assert_eq!(w.holders(1), vec![0]);
    w.assert_ledger();
}

#[test]
fn router_replies_reach_the_client_of_their_path() {
    let mut w = world(2, "", 2);
    w.send(0, CLIENT, &short(1, b"q"));
    w.echo_since(0);
    assert_eq!(w.at_client.len(), 1);
    assert_eq!(w.at_client[0].client, addr(CLIENT));
    assert_eq!(w.at_client[0].payload, short(1, b"q"));
    w.assert_ledger();
}

#[test]
fn router_the_backend_is_the_maglev_choice_and_sticks() {
    let mut w = world(1, "", 3);
    for cid in 0..50u64 {
        for n in 0..3u8 {
            w.send(0, CLIENT, &short(cid, &[n]));
        }
    }
    let maglev = udpshard_shared::Maglev::new(
        &(0..3)
            .map(|i| (backend(i).to_string(), 1))
            .collect::<Vec<_>>(),
        65537,
    )
    .unwrap();
    for d in &w.at_backend {
        let cid = u64::from_be_bytes(d.payload[1..9].try_into().unwrap());
        assert_eq!(d.backend, backend(maglev.backend_for(&cid.to_be_bytes())));
    }
    assert_eq!(w.counter(0, Counter::SessionsCreated), 50);
    w.assert_ledger();
}

#[test]
fn router_a_failed_open_drops_with_no_port_and_releases_the_claim() {
    // One port, one backend: one path (answered: established), then none.
    let mut w = World::new(1, &config("", 1), (20000, 20000));
    w.send(0, CLIENT, &short(1, b"a"));
    w.echo_since(0);
    w.send(0, CLIENT, &short(2, b"b"));
    assert_eq!(w.at_backend.len(), 1);
    assert_eq!(w.drops(DropReason::NoPort), 1);
    assert!(w.holders(2).is_empty());
    // The refused key is not left owned: another worker could take it.
    let key = udpshard_shared::FlowKey::new(&2u64.to_be_bytes()).unwrap();
    let hash = w.routers[0].owner_hash(0, &key);
    assert_eq!(w.routers[0].owners().lookup(hash), None);
    w.assert_ledger();
}

#[test]
fn router_a_refused_flow_costs_no_further_open() {
    let mut w = World::new(1, &config("", 1), (20000, 20000));
    w.send(0, CLIENT, &short(1, b"a"));
    w.echo_since(0);
    let opens = w.opens(0);
    for n in 0..100u8 {
        w.send(0, CLIENT, &short(2, &[n]));
    }
    assert_eq!(w.opens(0), opens + 1, "one try, then remembered");
    assert_eq!(w.drops(DropReason::NoPort), 100);
    // After the refusal is forgotten, it is tried again.
    w.advance(1_100);
    w.send(0, CLIENT, &short(2, b"again"));
    assert_eq!(w.opens(0), opens + 2);
    w.assert_ledger();
}

#[test]
fn router_ports_are_shared_across_backends() {
    // Ten ports, two backends: twenty paths, from ten sockets.
    let mut w = World::new(1, &config("", 2), (20000, 20009));
    let mut cid = 0u64;
    while w.at_backend.len() < 20 && cid < 1000 {
        // Each answered: established, it keeps its port.
        let n = w.at_backend.len();
        w.send(0, CLIENT, &short(cid, b"x"));
        w.echo_since(n);
        cid += 1;
    }
    assert_eq!(w.at_backend.len(), 20, "capacity ports x backends");
    assert_eq!(w.fds(0), 10);
    w.assert_unique_tuples();
    // Answered, they are established: no new flow may take their place.
    w.echo_since(0);
    // Every further new flow is refused, counted exactly.
    let before = w.drops(DropReason::NoPort);
    for n in 0..10 {
        w.send(0, CLIENT, &short(5000 + n, b"y"));
    }
    assert_eq!(w.drops(DropReason::NoPort), before + 10);
    w.assert_ledger();
}

#[test]
fn router_no_fd_is_its_own_reason() {
    let mut w = world(1, "", 1);
    w.net.borrow_mut().fd_limit = Some(1);
    w.send(0, CLIENT, &short(1, b"a"));
    w.echo_since(0);
    w.send(0, CLIENT, &short(2, b"b"));
    assert_eq!(w.drops(DropReason::NoFd), 1);
    assert_eq!(w.drops(DropReason::NoPort), 0);
    w.assert_ledger();
}

#[test]
fn router_a_flow_owned_elsewhere_is_handed_to_its_owner() {
    let mut w = world(2, "", 2);
    w.send(0, CLIENT, &short(1, b"first"));
    // The same CID from another address reaches worker 1.
    w.send(1, "192.0.2.11:6000", &short(1, b"moved"));
    assert_eq!(w.counter(1, Counter::HandoffOut), 1);
    assert_eq!(w.counter(0, Counter::HandoffIn), 1);
    assert_eq!(w.at_backend.len(), 2);
    assert_eq!(w.holders(1), vec![0]);
    w.assert_ledger();
}

#[test]
fn router_the_hop_cap_stops_a_bouncing_datagram() {
    let mut w = world(3, "", 1);
    w.send(0, CLIENT, &short(1, b"x"));
    // A stale entry: the table says worker 1 owns the flow, which worker 1
    // does not have; worker 1 finds it pointing at worker 2, and so on.
    let key = udpshard_shared::FlowKey::new(&1u64.to_be_bytes()).unwrap();
    let hash = w.routers[0].owner_hash(0, &key);
    w.hold_inboxes = true;
    let worker1 = w.routers[1].me;
    w.owners.borrow_mut().table.insert(hash, worker1);
    w.send(2, "192.0.2.12:7000", &short(1, b"bounce"));
    // 2 -> 1 (hop 1); 1 has no session and the table says 1: it is 1's
    // now, a session there. Never more than MAX_HOPS.
    w.hold_inboxes = false;
    w.settle();
    assert!(w
        .hops_sent
        .iter()
        .all(|h| *h <= udpshard_shared::handoff::MAX_HOPS));
    assert_eq!(w.froms(b"\x40\0\0\0\0\0\0\0\x01bounce").len(), 1);
    w.assert_ledger();
}

#[test]
fn router_two_workers_claiming_one_cid_make_one_session() {
    let mut w = world(2, "", 2);
    // Both receive the flow's first datagram before either has a session.
    w.hold_inboxes = true;
    w.send(0, CLIENT, &short(9, b"a"));
    w.send(1, "192.0.2.11:1", &short(9, b"b"));
    w.hold_inboxes = false;
    w.settle();
    assert_eq!(w.total(Counter::SessionsCreated), 1);
    assert_eq!(w.holders(9).len(), 1);
    assert_eq!(w.at_backend.len(), 2, "both forwarded, once each");
    w.assert_ledger();
}

#[test]
fn router_a_handoff_streak_moves_the_session_and_its_paths() {
    let mut w = world(2, "", 2);
    w.send(0, CLIENT, &short(3, b"at 0"));
    let first_from = w.at_backend[0].from;
    // The kernel now delivers the flow to worker 1.
    for n in 0..TRANSFER_AFTER {
        w.send(1, CLIENT, &short(3, &[b'h', n]));
    }
    assert_eq!(w.holders(3), vec![1], "the session moved");
    assert_eq!(w.total(Counter::TransfersOut), 1);
    assert_eq!(w.total(Counter::TransfersIn), 1);
    let handoffs = w.total(Counter::HandoffOut);
    // Later datagrams go straight out of worker 1, on the same 4-tuple.
    w.send(1, CLIENT, &short(3, b"direct"));
    assert_eq!(w.total(Counter::HandoffOut), handoffs);
    assert_eq!(w.at_backend.last().unwrap().from, first_from);
    assert_eq!(w.froms(b"\x40").len(), 1, "the backend saw one 4-tuple");
    // Replies are read by the socket's home (worker 0) and relayed.
    let before = w.at_backend.len();
    w.echo_since(before - 1);
    assert_eq!(w.at_client.last().unwrap().client, addr(CLIENT));
    assert_eq!(w.at_client.last().unwrap().worker, 0, "relayed by the home");
    w.assert_ledger();
}

#[test]
fn router_a_transfer_whose_descriptors_did_not_arrive_leaves_the_session() {
    let mut w = world(2, "", 2);
    w.send(0, CLIENT, &short(4, b"x"));
    w.hold_inboxes = true;
    for n in 0..TRANSFER_AFTER {
        w.send(1, CLIENT, &short(4, &[n]));
    }
    // Deliver the handoffs to worker 0; its transfer offer goes to worker 1.
    while w.deliver(0) {}
    assert_eq!(w.inbox_kinds(1), vec!["Transfer"]);
    // Worker 1 is out of descriptors: the frame arrives without them (the
    // kernel closes what does not fit, MSG_CTRUNC).
    w.drop_descriptors(1);
    w.hold_inboxes = false;
    w.settle();
    assert_eq!(w.holders(4), vec![0], "it stays with the sender");
    assert_eq!(w.total(Counter::TransfersIn), 0);
    // And is served as before.
    w.send(0, CLIENT, &short(4, b"still"));
    assert_eq!(w.at_backend.last().unwrap().payload, short(4, b"still"));
    w.assert_ledger();
}

/// Worker 1 gets CID `cid`'s datagrams until worker 0, the session's
/// owner, offers it the session; the offer waits in worker 1's inbox.
fn offer_to_worker_1(w: &mut World, cid: u64) {
    w.hold_inboxes = true;
    for n in 0..TRANSFER_AFTER {
        w.send(1, CLIENT, &short(cid, &[n]));
    }
    while w.deliver(0) {}
    assert_eq!(w.inbox_kinds(1), vec!["Transfer"]);
}

#[test]
fn router_a_new_client_address_during_a_transfer_gets_its_path_at_the_receiver() {
    let mut w = world(2, "", 1);
    w.send(0, CLIENT, &short(7, b"first"));
    offer_to_worker_1(&mut w, 7);
    // Before the offer is read, the client shows up from a new address at
    // worker 0: the datagram follows the offer to worker 1.
    let handed = w.counter(0, Counter::HandoffOut);
    w.send(0, "192.0.2.99:9", &short(7, b"moved"));
    assert_eq!(w.counter(0, Counter::HandoffOut), handed + 1);
    assert_eq!(
        w.counter(0, Counter::PathsCreated),
        1,
        "no path opened at the sender"
    );
    w.hold_inboxes = false;
    w.settle();
    assert_eq!(w.holders(7), vec![1]);
    let moved = w.at_backend.last().unwrap().clone();
    assert_eq!(moved.payload, short(7, b"moved"));
    // Its path is worker 1's own: one path per client address, anywhere.
    assert_eq!(w.reader(moved.from), Some(1));
    let clients: Vec<SocketAddr> = w
        .routers
        .iter()
        .flat_map(|r| {
            r.paths
                .paths
                .iter()
                .map(|(_, p)| p.client)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        clients
            .iter()
            .filter(|c| **c == addr("192.0.2.99:9"))
            .count(),
        1,
        "{clients:?}"
    );
    w.reply(moved.backend, moved.from, b"answer");
    assert_eq!(w.at_client.last().unwrap().client, addr("192.0.2.99:9"));
    w.assert_unique_tuples();
    w.assert_ledger();
}

#[test]
fn router_a_refused_transfer_hands_a_new_client_address_back_to_open_its_path_at_home() {
    let mut w = world(2, "", 1);
    w.send(0, CLIENT, &short(7, b"first"));
    offer_to_worker_1(&mut w, 7);
    w.drain(1); // a draining worker refuses transfers
    w.send(0, "192.0.2.99:9", &short(7, b"moved"));
    w.hold_inboxes = false;
    w.settle();
    assert_eq!(w.holders(7), vec![0], "refused: the session stayed");
    let moved = w.at_backend.last().unwrap().clone();
    assert_eq!(moved.payload, short(7, b"moved"));
    assert_eq!(w.reader(moved.from), Some(0));
    assert_eq!(w.drops(DropReason::Handoff), 0);
    w.assert_unique_tuples();
    w.assert_ledger();
}

#[test]
fn router_a_path_closed_while_its_transfer_is_in_flight_closes_at_the_receiver() {
    // One path per session, two ports, a short reuse delay.
    let text = config("max_paths = 1\nport_reuse_delay = \"1s\"", 1);
    let mut w = World::new(2, &text, (20000, 20001));
    w.send(0, CLIENT, &short(7, b"first"));
    // Answered: its port cools when it closes.
    w.echo_since(0);
    let offered = w.at_backend[0].from;
    offer_to_worker_1(&mut w, 7);
    // The offer goes unanswered past its timeout (worker 0 stops handing
    // new client addresses to the receiver), then the client moves: at
    // max_paths, the path offered is evicted at worker 0 and a new one
    // opens. The late yes comes after.
    w.now_ms += TRANSFER_TIMEOUT_MS; // no tick: the offer still waits
    w.send(0, "192.0.2.99:9", &short(7, b"moved"));
    assert_eq!(w.counter(0, Counter::PathsEvicted), 1);
    w.hold_inboxes = false;
    w.settle();
    assert_eq!(w.holders(7), vec![1], "worker 1 took the session");
    // Worker 1 sends on no copy of the path worker 0 closed.
    let r1 = &w.routers[1];
    let sending: Vec<SocketAddr> = r1
        .paths
        .paths
        .iter()
        .filter(|(_, p)| !p.is_relay())
        .filter_map(|(_, p)| r1.paths.sock(p.sock).map(|s| s.local))
        .collect();
    assert!(!sending.contains(&offered), "{sending:?}");
    // Worker 0 keeps the path it opened meanwhile as a relay: the reply to
    // what it forwarded on it still reaches the client there.
    let r0 = &w.routers[0];
    let kept: Vec<_> = r0
        .paths
        .paths
        .iter()
        .map(|(_, p)| (p.client, p.is_relay()))
        .collect();
    assert_eq!(kept, vec![(addr("192.0.2.99:9"), true)]);
    let moved = w.at_backend.last().unwrap().clone();
    assert_eq!(moved.payload, short(7, b"moved"));
    w.reply(moved.backend, moved.from, b"answer");
    let answer = w.at_client.last().unwrap();
    assert_eq!(
        (answer.client, answer.payload.as_slice()),
        (addr("192.0.2.99:9"), &b"answer"[..])
    );
    assert_eq!(w.drops(DropReason::Stray), 0);
    // Once the offered port cooled, a new session takes it, and no 4-tuple
    // is shared (the relay holds the other port).
    w.advance(1_100);
    let before = w.at_backend.len();
    w.send(0, CLIENT, &short(100, b"new"));
    assert_eq!(
        w.at_backend[before..]
            .iter()
            .map(|d| d.from)
            .collect::<Vec<_>>(),
        vec![offered]
    );
    w.assert_unique_tuples();
    w.assert_ledger();
}

#[test]
fn router_aliases_learned_while_a_transfer_is_in_flight_go_with_it() {
    let mut w = world(2, "", 1);
    w.send(0, CLIENT, &long(8, 1));
    offer_to_worker_1(&mut w, 8);
    // The server answers with its own connection ID before the offer is
    // read: worker 0 learns it as an alias of the session.
    let d = w.at_backend[0].clone();
    w.reply(d.backend, d.from, &long(1, 0x5e));
    w.hold_inboxes = false;
    w.settle();
    assert_eq!(w.holders(8), vec![1]);
    // The client's next datagram, to the server's ID, reaches the session
    // at worker 1 from either worker.
    let created = w.total(Counter::SessionsCreated);
    w.send(0, CLIENT, &short(0x5e, b"to the alias"));
    w.send(1, CLIENT, &short(0x5e, b"to the alias"));
    assert_eq!(w.total(Counter::SessionsCreated), created, "no new session");
    assert_eq!(
        w.holders(0x5e),
        vec![1],
        "the alias names worker 1's session"
    );
    assert_eq!(w.froms(b"\x40").len(), 1, "one 4-tuple");
    w.assert_ledger();
}

#[test]
fn router_a_lost_answer_to_a_transfer_is_settled_by_the_ownership_table() {
    let mut w = world(2, "", 1);
    w.send(0, CLIENT, &short(9, b"x"));
    offer_to_worker_1(&mut w, 9);
    // Worker 1 accepts; its answer is lost on the way.
    assert!(w.deliver(1));
    assert_eq!(w.inbox_kinds(0), vec!["TransferDone"]);
    assert!(w.lose_frame(0));
    assert_eq!(w.holders(9), vec![0, 1], "both, until the offer times out");
    w.hold_inboxes = false;
    w.advance(3_000);
    assert_eq!(w.holders(9), vec![1], "worker 0 let go");
    assert_eq!(w.counter(0, Counter::TransfersOut), 1);
    w.send(1, CLIENT, &short(9, b"y"));
    w.assert_unique_tuples();
    w.assert_ledger();
}

#[test]
fn router_a_refused_transfer_whose_answer_is_lost_stays_and_may_be_offered_again() {
    let mut w = world(2, "", 1);
    w.send(0, CLIENT, &short(10, b"x"));
    offer_to_worker_1(&mut w, 10);
    // Worker 1 is draining: it refuses; the refusal is lost.
    w.drain(1);
    assert!(w.deliver(1));
    assert!(w.lose_frame(0));
    w.hold_inboxes = false;
    let offered = |w: &World| {
        let key = udpshard_shared::FlowKey::new(&10u64.to_be_bytes()).unwrap();
        let sessions = &w.routers[0].sessions;
        sessions
            .get(sessions.lookup(0, &key).unwrap())
            .unwrap()
            .offer()
            .is_some()
    };
    w.advance(3_000);
    assert_eq!(w.holders(10), vec![0], "it stayed");
    assert!(offered(&w), "the offer waits for a late answer");
    w.advance(OFFER_LIFETIME_MS);
    assert_eq!(w.holders(10), vec![0], "it stayed");
    assert!(!offered(&w), "nobody answered: it may be offered again");
    assert_eq!(w.total(Counter::TransfersIn), 0);
    w.assert_ledger();
}

#[test]
fn router_datagrams_racing_a_transfer_are_forwarded_once_each() {
    let mut w = world(2, "", 1);
    w.send(0, CLIENT, &short(5, b"0"));
    w.hold_inboxes = true;
    for n in 0..TRANSFER_AFTER + 3 {
        w.send(1, CLIENT, &short(5, &[b'a' + n]));
        // Worker 0 reads one frame between each of worker 1's datagrams.
        w.deliver(0);
        w.deliver(1);
    }
    w.hold_inboxes = false;
    w.settle();
    let sent = 1 + usize::from(TRANSFER_AFTER) + 3;
    assert_eq!(w.at_backend.len(), sent, "each forwarded exactly once");
    let payloads: HashSet<Vec<u8>> = w.at_backend.iter().map(|d| d.payload.clone()).collect();
    assert_eq!(payloads.len(), sent);
    assert_eq!(w.holders(5).len(), 1);
    w.assert_ledger();
}

#[test]
fn router_a_server_scid_is_learned_before_its_reply_is_relayed() {
    let mut w = world(2, "", 1);
    w.send(0, CLIENT, &long(0xd0, 0xc1));
    let from = w.at_backend[0].from;
    // The server's Initial chooses SCID 0x5e.
    w.reply(backend(0), from, &long(0xc1, 0x5e));
    assert_eq!(w.at_client.len(), 1);
    // Before the client can answer with it, the alias names the session.
    let key = udpshard_shared::FlowKey::new(&0x5eu64.to_be_bytes()).unwrap();
    let hash = w.routers[0].owner_hash(0, &key);
    assert_eq!(w.routers[0].owners().lookup(hash), Some(w.routers[0].me));
    // The client's next packet, with the new DCID, lands on worker 1: it is
    // handed to the session, not made a session of its own.
    w.send(1, CLIENT, &short(0x5e, b"1rtt"));
    assert_eq!(w.total(Counter::SessionsCreated), 1);
    assert_eq!(w.at_backend.len(), 2);
    assert_eq!(w.at_backend[1].from, from, "same path");
    w.assert_ledger();
}

#[test]
fn router_a_relay_learns_an_alias_for_the_sessions_owner() {
    let mut w = world(2, "", 1);
    w.send(0, CLIENT, &long(0xd1, 0xc2));
    for n in 0..TRANSFER_AFTER {
        w.send(1, CLIENT, &short(0xd1, &[n]));
    }
    assert_eq!(w.holders(0xd1), vec![1]);
    let from = w.at_backend[0].from;
    // Worker 0 relays the server's reply, which names a new SCID.
    w.reply(backend(0), from, &long(0xc2, 0x77));
    let key = udpshard_shared::FlowKey::new(&0x77u64.to_be_bytes()).unwrap();
    let hash = w.routers[0].owner_hash(0, &key);
    assert_eq!(w.routers[0].owners().lookup(hash), Some(w.routers[1].me));
    // The owner found the alias: a datagram with it is its session's.
    w.send(1, CLIENT, &short(0x77, b"x"));
    assert_eq!(w.total(Counter::SessionsCreated), 1);
    assert_eq!(w.at_backend.last().unwrap().from, from);
    w.assert_ledger();
}

#[test]
fn router_re_routes_when_a_backend_is_removed() {
    let mut w = world(1, "", 2);
    for cid in 0..40u64 {
        w.send(0, CLIENT, &short(cid, b"one"));
    }
    let on_b0: Vec<u64> = w
        .at_backend
        .iter()
        .filter(|d| d.backend == backend(0))
        .map(|d| u64::from_be_bytes(d.payload[1..9].try_into().unwrap()))
        .collect();
    assert!(!on_b0.is_empty());
    // Reload without backend 0.
    let cfg = udpshard_config::parse(
        "[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"quic\"\nmax_sessions = 1000\nbackends = [\"198.51.100.2:443\"]\n",
        "t",
    )
    .unwrap();
    let routes = vec![super::Route::new(&cfg.listeners[0], false).unwrap()];
    w.routers[0].reconfigure(routes, &[Some(0)]);
    let before = w.at_backend.len();
    for cid in 0..40u64 {
        w.send(0, CLIENT, &short(cid, b"two"));
    }
    assert!(w.at_backend[before..]
        .iter()
        .all(|d| d.backend == backend(1)));
    assert_eq!(w.counter(0, Counter::SessionsRerouted), on_b0.len() as u64);
    assert_eq!(
        w.counter(0, Counter::SessionsCreated),
        40,
        "the same sessions"
    );
    w.assert_unique_tuples();
    w.assert_ledger();
}

/// A reload that removes one listener and a backend of another: the
/// listeners after the removed one are renumbered, and a session re-routed
/// off the removed backend must take its new path on its listener's new
/// index (the old index was out of the new list's bounds: a panic).
#[test]
fn router_re_routes_on_a_listener_renumbered_by_the_same_reload() {
    let listener = |name: &str, port: u16, backends: &[usize]| {
        let list: Vec<String> = backends
            .iter()
            .map(|b| format!("\"{}\"", backend(*b)))
            .collect();
        format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\ndissector = \"quic\"\nbackends = [{}]\n",
            list.join(", ")
        )
    };
    let before = listener("a", 4433, &[0]) + &listener("b", 4434, &[0, 1]);
    let mut w = World::new(1, &before, (20000, 20063));
    for cid in 0..20u64 {
        w.send_on(0, 1, CLIENT, &short(cid, b"one"));
    }
    let on_b0 = w
        .at_backend
        .iter()
        .filter(|d| d.backend == backend(0))
        .count();
    assert!(on_b0 > 0, "some CIDs map to backend 0");
    w.reload(&listener("b", 4434, &[1]));
    let sent = w.at_backend.len();
    for cid in 0..20u64 {
        w.send_on(0, 0, CLIENT, &short(cid, b"two"));
    }
    assert_eq!(w.at_backend.len(), sent + 20, "every datagram forwarded");
    assert!(w.at_backend[sent..].iter().all(|d| d.backend == backend(1)));
    assert_eq!(w.counter(0, Counter::SessionsRerouted), on_b0 as u64);
    assert_eq!(
        w.counter(0, Counter::SessionsCreated),
        20,
        "the same sessions"
    );
    w.assert_unique_tuples();
    w.assert_ledger();
}

#[test]
fn router_idle_sessions_expire_in_virtual_time() {
    let mut w = world(1, "session_idle = \"10s\"", 1);
    w.send(0, CLIENT, &short(1, b"a"));
    w.send(0, CLIENT, &short(2, b"b"));
    w.echo_since(0);
    w.advance(6_000);
    w.send(0, CLIENT, &short(2, b"keep"));
    w.advance(6_000);
    assert!(w.holders(1).is_empty(), "idle 12 s: gone");
    assert_eq!(w.holders(2), vec![0], "active 6 s ago: stays");
    assert_eq!(w.counter(0, Counter::SessionsExpired), 1);
    // Its key is free again.
    let key = udpshard_shared::FlowKey::new(&1u64.to_be_bytes()).unwrap();
    let hash = w.routers[0].owner_hash(0, &key);
    assert_eq!(w.routers[0].owners().lookup(hash), None);
    w.assert_ledger();
}

#[test]
fn router_an_extra_path_closes_after_path_idle_and_the_last_stays() {
    let mut w = world(1, "session_idle = \"60s\"\npath_idle = \"5s\"", 1);
    w.send(0, CLIENT, &short(1, b"a"));
    w.echo_since(0);
    w.send(0, "192.0.2.99:9", &short(1, b"second address"));
    assert_eq!(
        w.counter(0, Counter::PathsActive),
        0,
        "gauges update at ticks"
    );
    w.advance(1_000);
    assert_eq!(w.routers[0].paths.paths.len(), 2);
    // The first address keeps sending; the second goes quiet.
    for _ in 0..6 {
        w.send(0, CLIENT, &short(1, b"a"));
        w.advance(1_000);
    }
    assert_eq!(w.routers[0].paths.paths.len(), 1, "the quiet path closed");
    // The last path lives as long as the session.
    w.advance(30_000);
    assert_eq!(w.routers[0].paths.paths.len(), 1);
    w.assert_ledger();
}

#[test]
fn router_a_spoofed_address_gets_its_own_path_and_replies_stay_on_theirs() {
    let mut w = world(1, "", 1);
    w.send(0, CLIENT, &short(7, b"real"));
    let real = w.at_backend[0].from;
    // Someone who saw the CID sends one datagram with it from elsewhere.
    w.send(0, "203.0.113.66:666", &short(7, b"spoof"));
    let spoof = w.at_backend[1].from;
    assert_ne!(
        real, spoof,
        "a new address is a new 4-tuple: the backend sees it"
    );
    // The backend answers on the real client's path: it reaches the real
    // client only.
    w.reply(backend(0), real, b"for the real client");
    assert_eq!(w.at_client.len(), 1);
    assert_eq!(w.at_client[0].client, addr(CLIENT));
    // A real move to a new port gets replies at the new address.
    w.send(0, "192.0.2.10:5001", &short(7, b"moved"));
    let moved = w.at_backend[2].from;
    w.reply(backend(0), moved, b"for the new port");
    assert_eq!(w.at_client[1].client, addr("192.0.2.10:5001"));
    w.assert_ledger();
}

#[test]
fn router_max_paths_evicts_the_least_recently_used() {
    let mut w = world(1, "max_paths = 2", 1);
    w.send(0, "192.0.2.1:1", &short(1, b"a"));
    w.advance(10);
    w.send(0, "192.0.2.2:2", &short(1, b"b"));
    w.advance(10);
    w.send(0, "192.0.2.1:1", &short(1, b"a again"));
    w.advance(10);
    w.send(0, "192.0.2.3:3", &short(1, b"c"));
    assert_eq!(w.counter(0, Counter::PathsEvicted), 1);
    assert_eq!(w.routers[0].paths.paths.len(), 2);
    // 192.0.2.2 was the least recently used: its path is gone.
    let clients: HashSet<_> = w.routers[0]
        .paths
        .paths
        .iter()
        .map(|(_, p)| p.client)
        .collect();
    assert!(clients.contains(&addr("192.0.2.1:1")) && clients.contains(&addr("192.0.2.3:3")));
    w.assert_ledger();
}

#[test]
fn router_a_freed_slot_cools_before_reuse_toward_the_same_backend() {
    // One port, one backend, 2 s reuse delay, 1 s idle.
    let mut w = World::new(
        1,
        &config(
            "session_idle = \"1s\"\npath_idle = \"1s\"\nport_reuse_delay = \"2s\"",
            1,
        ),
        (20000, 20000),
    );
    w.send(0, CLIENT, &short(1, b"a"));
    w.echo_since(0);
    w.advance(1_500);
    assert!(w.holders(1).is_empty(), "expired");
    // The port toward the backend is cooling: a new flow is refused.
    w.send(0, CLIENT, &short(2, b"too soon"));
    assert_eq!(w.drops(DropReason::NoPort), 1);
    w.advance(2_100);
    w.send(0, CLIENT, &short(3, b"later"));
    assert_eq!(w.at_backend.last().unwrap().payload, short(3, b"later"));
    assert_eq!(w.at_backend.last().unwrap().from.port(), 20000);
    w.assert_ledger();
}

#[test]
fn router_counts_every_forward_reply_and_session_by_backend() {
    use udpshard_shared::backends::BackendCounter as B;
    let mut w = world(1, "", 3);
    for n in 0..100u64 {
        for _ in 0..10 {
            w.send(0, CLIENT, &short(n, b"xy"));
        }
    }
    let at: Vec<usize> = (0..3)
        .map(|b| {
            w.at_backend
                .iter()
                .filter(|d| d.backend == backend(b))
                .count()
        })
        .collect();
    assert_eq!(at.iter().sum::<usize>(), 1000);
    let c = &w.routers[0].counters;
    for (b, n) in at.iter().enumerate() {
        assert_eq!(c.backend_get(b, B::TxPackets), *n as u64, "backend {b}");
        assert_eq!(c.backend_get(b, B::TxBytes), *n as u64 * 11);
    }
    let created: u64 = (0..3).map(|b| c.backend_get(b, B::SessionsCreated)).sum();
    assert_eq!(created, 100);
    // Replies count at their backend, with the time of the latest.
    let first = w.at_backend[0].clone();
    w.now_ms = 777;
    w.reply(first.backend, first.from, b"r");
    let b = (0..3).find(|b| backend(*b) == first.backend).unwrap();
    let c = &w.routers[0].counters;
    assert_eq!(c.backend_get(b, B::Replies), 1);
    assert_eq!(c.backend_get(b, B::LastReplyMs), 777);
    // The gauge follows the sessions each tick.
    w.advance(1);
    let c = &w.routers[0].counters;
    let active: Vec<u64> = (0..3)
        .map(|b| c.backend_get(b, B::SessionsActive))
        .collect();
    assert_eq!(active.iter().sum::<u64>(), 100);
    for (b, n) in active.iter().enumerate() {
        assert_eq!(*n, c.backend_get(b, B::SessionsCreated));
    }
    w.advance(120_000);
    let c = &w.routers[0].counters;
    assert_eq!(
        (0..3)
            .map(|b| c.backend_get(b, B::SessionsActive))
            .sum::<u64>(),
        0,
        "expired"
    );
    w.assert_ledger();
}

#[test]
fn router_session_limit_drops_new_flows() {
    let mut w = World::new(
        1,
        &config("", 1).replace("max_sessions = 1000", "max_sessions = 2"),
        PORTS,
    );
    // Answered, the first two are established: no new flow takes their
    // place.
    for cid in 0..5u64 {
        w.send(0, CLIENT, &short(cid, b"x"));
        w.echo_since(0);
    }
    assert_eq!(w.drops(DropReason::SessionLimit), 3);
    assert_eq!(w.at_backend.len(), 2);
    w.assert_ledger();
}

#[test]
fn router_draining_refuses_new_flows_and_serves_live_ones() {
    let mut w = world(1, "", 1);
    w.send(0, CLIENT, &short(1, b"live"));
    w.drain(0);
    w.send(0, CLIENT, &short(1, b"still live"));
    w.send(0, CLIENT, &short(2, b"new"));
    assert_eq!(w.drops(DropReason::Draining), 1);
    assert_eq!(w.at_backend.len(), 2);
    w.assert_ledger();
}

#[test]
fn router_malformed_input_is_counted_and_changes_nothing() {
    let mut w = world(2, "", 1);
    for bad in [
        &b""[..],
        &[0x40, 1, 2][..],
        &[0xc0, 0, 0, 0, 1, 25, 1][..],
        &[0xc0, 0, 0, 0, 1, 0][..],
    ] {
        w.send(0, CLIENT, bad);
    }
    assert_eq!(w.drops(DropReason::Malformed), 4);
    assert_eq!(w.total(Counter::SessionsCreated), 0);
    assert!(w.at_backend.is_empty());
    // Frames from another worker that do not decode count too.
    w.routers[1].frame(1, &[9, 9, 9], 0, &mut |_| super::DatagramRef(0));
    assert_eq!(w.counter(1, Counter::BadFrames), 1);
    w.assert_ledger();
}

#[test]
fn router_stray_datagrams_on_upstream_sockets_are_counted() {
    let mut w = world(1, "", 1);
    w.send(0, CLIENT, &short(1, b"x"));
    let from = w.at_backend[0].from;
    // Not from the backend.
    w.reply(addr("203.0.113.5:53"), from, b"not yours");
    assert_eq!(w.drops(DropReason::Stray), 1);
    assert!(w.at_client.is_empty());
    w.assert_ledger();
}

#[test]
fn router_follow_mode_moves_the_one_path() {
    let mut w = world(1, "migration = \"follow\"", 1);
    w.send(0, CLIENT, &short(1, b"a"));
    w.send(0, "192.0.2.20:20", &short(1, b"moved"));
    assert_eq!(w.froms(b"\x40").len(), 1, "one 4-tuple");
    w.reply(backend(0), w.at_backend[0].from, b"r");
    assert_eq!(
        w.at_client[0].client,
        addr("192.0.2.20:20"),
        "replies follow"
    );
    w.assert_ledger();
}

#[test]
fn router_follow_mode_moves_a_relayed_path_through_its_home() {
    let mut w = world(2, "migration = \"follow\"", 1);
    w.send(0, CLIENT, &short(2, b"a"));
    for n in 0..TRANSFER_AFTER {
        w.send(1, CLIENT, &short(2, &[n]));
    }
    assert_eq!(w.holders(2), vec![1]);
    let from = w.at_backend[0].from;
    // The client moves; its datagram reaches the owner, which has the home
    // re-point its relay before forwarding it.
    w.send(1, "192.0.2.30:30", &short(2, b"moved"));
    assert_eq!(w.at_backend.last().unwrap().from, from);
    w.reply(backend(0), from, b"after the move");
    assert_eq!(w.at_client.last().unwrap().client, addr("192.0.2.30:30"));
    w.assert_ledger();
}

#[test]
fn router_relay_activity_keeps_a_transferred_path_alive() {
    let mut w = world(2, "session_idle = \"10s\"\npath_idle = \"10s\"", 1);
    w.send(0, CLIENT, &short(6, b"a"));
    for n in 0..TRANSFER_AFTER {
        w.send(1, CLIENT, &short(6, &[n]));
    }
    let from = w.at_backend[0].from;
    // The client goes quiet; the server keeps sending (read at the home).
    for _ in 0..5 {
        w.advance(4_000);
        w.reply(backend(0), from, b"push");
    }
    assert_eq!(w.holders(6), vec![1], "alive after 20 s of replies");
    assert_eq!(w.at_client.len(), 5);
    w.assert_ledger();
}

#[test]
fn router_a_dead_home_is_replaced_by_the_borrower_adopting_the_socket() {
    let mut w = world(2, "", 1);
    w.send(0, CLIENT, &short(8, b"a"));
    for n in 0..TRANSFER_AFTER {
        w.send(1, CLIENT, &short(8, &[n]));
    }
    let from = w.at_backend[0].from;
    assert_eq!(w.reader(from), Some(0));
    w.kill(0);
    w.advance(200);
    assert_eq!(w.reader(from), Some(1), "adopted");
    w.reply(backend(0), from, b"after the home died");
    assert_eq!(w.at_client.last().unwrap().worker, 1);
    w.send(1, CLIENT, &short(8, b"still"));
    assert_eq!(w.at_backend.last().unwrap().from, from);
}

#[test]
fn router_a_relay_whose_owner_died_closes() {
    let mut w = world(2, "port_reuse_delay = \"0s\"", 1);
    w.send(0, CLIENT, &short(10, b"a"));
    for n in 0..TRANSFER_AFTER {
        w.send(1, CLIENT, &short(10, &[n]));
    }
    assert_eq!(w.routers[0].paths.paths.len(), 1, "worker 0 relays");
    w.kill(1);
    w.advance(200);
    assert_eq!(
        w.routers[0].paths.paths.len(),
        0,
        "the orphaned relay closed"
    );
}

#[test]
fn router_a_dead_workers_flows_are_taken_over_by_whoever_gets_them() {
    let mut w = world(2, "", 1);
    w.send(0, CLIENT, &short(11, b"a"));
    w.kill(0);
    w.restart(0);
    // The entry names a dead generation: worker 1 takes the flow at once
    // instead of handing it to the new process in slot 0.
    w.send(1, CLIENT, &short(11, b"b"));
    assert_eq!(w.holders(11), vec![1]);
    assert_eq!(w.counter(1, Counter::HandoffOut), 0);
    assert_eq!(w.at_backend.len(), 2);
}

#[test]
fn router_a_replacement_binds_its_flows_ports_again_and_keeps_the_others_for_theirs() {
    let mut w = World::new(1, &config("", 2), (20000, 20029));
    let old: Vec<(u64, SocketAddr, SocketAddr)> = (0..8u64)
        .map(|cid| {
            w.send(0, CLIENT, &short(cid, b"before"));
            let at = w.at_backend.last().unwrap();
            (cid, at.from, at.backend)
        })
        .collect();
    let tuples: HashSet<(SocketAddr, SocketAddr)> = old.iter().map(|o| (o.1, o.2)).collect();
    assert_eq!(tuples.len(), 8);
    w.kill(0);
    w.restart(0);
    // The first flow back binds its own port again ...
    w.send(0, CLIENT, &short(0, b"after"));
    assert_eq!(w.at_backend.last().unwrap().from, old[0].1);
    assert_eq!(w.counter(0, Counter::PathsInherited), 1);
    // ... and new flows keep off the 4-tuples of those still to come back.
    for cid in 100..110u64 {
        w.send(0, CLIENT, &short(cid, b"new"));
        let at = w.at_backend.last().unwrap();
        assert_eq!(at.payload, short(cid, b"new"));
        assert!(
            !tuples.contains(&(at.from, at.backend)),
            "cid {cid} took a dead flow's 4-tuple"
        );
    }
    for (cid, from, to) in &old[1..] {
        w.send(0, CLIENT, &short(*cid, b"after"));
        let at = w.at_backend.last().unwrap();
        assert_eq!(
            (at.from, at.backend),
            (*from, *to),
            "cid {cid} kept its 4-tuple"
        );
    }
    assert_eq!(w.counter(0, Counter::PathsInherited), 8);
    w.assert_unique_tuples();
    // Its replies come back on it.
    let (from, to) = (old[3].1, old[3].2);
    w.reply(to, from, b"reply");
    assert_eq!(w.at_client.last().unwrap().payload, b"reply");
}

#[test]
fn router_a_dead_flows_port_is_taken_by_that_flow_only_and_follows_it_across_deaths() {
    let mut w = world(2, "", 2);
    w.send(0, CLIENT, &short(5, b"a"));
    let first = w.at_backend[0].clone();
    w.kill(0);
    w.restart(0);
    // Another flow's entry names no dead owner: it never gets that port.
    for cid in 200..240u64 {
        w.send(0, CLIENT, &short(cid, b"x"));
        let at = w.at_backend.last().unwrap();
        assert!((at.from, at.backend) != (first.from, first.backend));
    }
    // Worker 1 takes the flow over (it claims the dead entry): its port too.
    w.send(1, CLIENT, &short(5, b"b"));
    assert_eq!(w.holders(5), vec![1]);
    assert_eq!(w.at_backend.last().unwrap().from, first.from);
    assert_eq!(w.counter(1, Counter::PathsInherited), 1);
    // Its hint is worker 1's now; worker 1 dies too, and 0 takes it back.
    w.kill(1);
    w.restart(1);
    w.send(0, CLIENT, &short(5, b"c"));
    assert_eq!(w.at_backend.last().unwrap().from, first.from);
    assert_eq!(w.counter(0, Counter::PathsInherited), 1);
    w.assert_unique_tuples();
}

#[test]
fn router_removing_a_listener_closes_its_sessions() {
    let mut w = world(1, "", 1);
    w.send(0, CLIENT, &short(1, b"a"));
    w.routers[0].reconfigure(Vec::new(), &[None]);
    assert_eq!(w.routers[0].sessions(), 0);
    assert_eq!(w.routers[0].paths.paths.len(), 0);
}

#[test]
fn router_a_removed_listeners_socket_takes_strays_cools_then_closes() {
    let mut w = world(1, "port_reuse_delay = \"5s\"", 1);
    w.send(0, CLIENT, &short(1, b"a"));
    w.echo_since(0);
    let replied = w.at_client.len();
    let from = w.at_backend[0].from;
    w.routers[0].reconfigure(Vec::new(), &[None]);
    // A late reply on the removed listener's socket: a stray, not a crash.
    w.reply(backend(0), from, &short(1, b"late"));
    assert_eq!(w.drops(DropReason::Stray), 1);
    assert_eq!(w.at_client.len(), replied, "nothing relayed");
    assert_eq!(w.fds(0), 1, "the port cools first");
    w.advance(4_000);
    assert_eq!(w.fds(0), 1, "still cooling");
    w.advance(2_000);
    assert_eq!(w.fds(0), 0, "closed once cooled");
}

#[test]
fn router_free_ports_stay_usable_after_a_reload() {
    // Two ports, two backends. One session; a reload keeping the listener
    // must leave its socket's other slot free for the other backend.
    let text = config("port_reuse_delay = \"0s\"", 2);
    let mut w = World::new(1, &text, (20000, 20001));
    w.send(0, CLIENT, &short(0, b"x"));
    let mut cid = 1u64;
    w.routers[0].reconfigure(World::routes_for(&text), &[Some(0)]);
    while w.at_backend.len() < 4 && cid < 1000 {
        w.send(0, CLIENT, &short(cid, b"y"));
        cid += 1;
    }
    assert_eq!(w.at_backend.len(), 4, "ports x backends after the reload");
    assert_eq!(w.fds(0), 2);
    w.assert_unique_tuples();
}

#[test]
fn router_the_backend_gauge_survives_a_reload_that_drains_a_backend() {
    use udpshard_shared::backends::BackendCounter as B;
    let mut w = world(1, "", 2);
    for cid in 0..40u64 {
        w.send(0, CLIENT, &short(cid, b"x"));
    }
    w.advance(1);
    let before: Vec<u64> = (0..2)
        .map(|b| w.routers[0].counters.backend_get(b, B::SessionsActive))
        .collect();
    assert_eq!(before.iter().sum::<u64>(), 40);
    let text = config("", 2).replacen(
        &format!("\"{}\"", backend(0)),
        &format!("{{ addr = \"{}\", weight = 0 }}", backend(0)),
        1,
    );
    assert!(text.contains("weight = 0"), "{text}");
    w.routers[0].reconfigure(World::routes_for(&text), &[Some(0)]);
    w.advance(1);
    let after: Vec<u64> = (0..2)
        .map(|b| w.routers[0].counters.backend_get(b, B::SessionsActive))
        .collect();
    assert_eq!(after, before, "live sessions keep their backends");
    for cid in 100..140u64 {
        w.send(0, CLIENT, &short(cid, b"new"));
        assert_eq!(
            w.at_backend.last().unwrap().backend,
            backend(1),
            "a drained backend took a new session"
        );
    }
}

#[test]
fn router_a_hint_follows_the_sessions_paths_and_never_names_a_closed_one() {
    // Two paths; the one the hint named closes; after a death the heir binds
    // the port of the path that is left, not the closed one's.
    let mut w = world(1, "path_idle = \"1s\"", 1);
    w.send(0, "192.0.2.1:1", &short(9, b"a"));
    let first = w.at_backend.last().unwrap().from;
    w.advance(600);
    w.send(0, "192.0.2.2:2", &short(9, b"b"));
    let second = w.at_backend.last().unwrap().from;
    assert_ne!(first, second);
    // The first path idles out (1 s); the second stays.
    w.advance(600);
    w.send(0, "192.0.2.2:2", &short(9, b"keep"));
    w.advance(600);
    w.send(0, "192.0.2.2:2", &short(9, b"keep"));
    assert_eq!(w.routers[0].paths.paths.len(), 1, "the first path closed");
    w.kill(0);
    w.restart(0);
    w.send(0, "192.0.2.2:2", &short(9, b"after"));
    assert_eq!(w.at_backend.last().unwrap().from, second);
    assert_eq!(w.counter(0, Counter::PathsInherited), 1);
}

/// With `proxy_protocol = "v2"` every forward carries a header naming its
/// own path's client (a migrated client's datagrams name the new address,
/// whichever worker read them) and the address it reached; a datagram the
/// header would take past its path's MTU is dropped and counted.
#[test]
fn router_proxy_v2_headers_name_each_path_s_client_and_respect_the_path_mtu() {
    use udpshard_shared::proxy_v2::{parse, Parsed};
    let mut w = world(2, "proxy_protocol = \"v2\"", 1);
    w.send(0, CLIENT, &short(1, b"hi"));
    // The same connection from a new address, read by the other worker:
    // handed to the session's owner, which forwards it on a new path.
    w.send(1, "192.0.2.11:6000", &short(1, b"moved"));
    assert_eq!(w.at_backend.len(), 2);
    for (d, (client, body)) in w.at_backend.iter().zip([
        (CLIENT, short(1, b"hi")),
        ("192.0.2.11:6000", short(1, b"moved")),
    ]) {
        let (parsed, len) = parse(&d.payload).expect("a PROXY v2 header");
        assert_eq!(
            parsed,
            Parsed::Proxy {
                client: addr(client),
                reached: addr("127.0.0.1:4433"),
            }
        );
        assert_eq!(d.payload[len..], body[..]);
    }
    // Replies carry no header and reach the path's client.
    w.echo_since(0);
    assert_eq!(w.at_client.len(), 2);

    // A path that carries 100-byte datagrams: 28 bytes of header leave 72.
    let cfg = udpshard_config::parse(&config("proxy_protocol = \"v2\"", 1), "t").unwrap();
    for r in 0..2 {
        let mut route = super::Route::new(&cfg.listeners[0], false).unwrap();
        route.set_proxy_v2_path(addr("127.0.0.1:4433"), vec![100]);
        w.routers[r].reconfigure(vec![route], &[Some(0)]);
    }
    let sent = w.at_backend.len();
    w.send(0, CLIENT, &short(1, &[7; 64])); // 73 bytes + 28 > 100
    w.send(0, CLIENT, &short(1, &[7; 63])); // 72 bytes + 28 = 100
    assert_eq!(w.drops(DropReason::ProxyMtu), 1);
    assert_eq!(w.at_backend.len(), sent + 1);
    assert_eq!(w.at_backend[sent].payload.len(), 100);
    w.assert_ledger();
}
