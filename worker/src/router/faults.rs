//! Faults replayed in the in-memory world: the upgrade bugs end-to-end
//! tests and CI once found by chance (f90abd2, 5a23141, fd69396), and the
//! event sequences the fault properties found, each the smallest that
//! failed before its fix.

use udpshard_shared::stats::Counter;
use udpshard_shared::DropReason;

use super::harness::{config, short, World, CLIENT, P};
use super::properties::{check, client, run, Event};
use super::TRANSFER_AFTER;

fn world(workers: usize) -> World {
    World::new(workers, &config("", 1), (20000, 20063))
}

/// f90abd2: an upgrade given up after the new workers began to read the
/// listeners. The standby worker that exits must leave what waits in the
/// listener socket to its predecessor, which serves on: what a standby
/// reads is counted in no slot (and in the real proxy its replies come to a
/// process that is gone).
#[test]
fn a_standby_given_up_leaves_the_listeners_to_its_predecessor() {
    let mut w = world(2);
    w.send(0, CLIENT, &short(1, b"before"));
    let tuple = w.at_backend[0].from;
    assert!(w.begin_upgrade());
    assert!(w.upgrade_step(), "quiesce");
    assert!(w.upgrade_step(), "the new workers read the listeners");
    w.hold_listeners = true;
    for n in 0..5u8 {
        w.send(0, CLIENT, &short(1, &[n]));
    }
    let rx = w.counter(0, Counter::RxPackets);
    // The new workers leave before the old ones resume.
    assert!(w.give_up_upgrade(true));
    assert!(w.read_listener(0));
    assert_eq!(
        w.counter(0, Counter::RxPackets),
        rx + 5,
        "the old worker read all five"
    );
    assert_eq!(w.at_backend.len(), 6);
    assert!(w.at_backend.iter().all(|d| d.from == tuple), "one 4-tuple");
    check(&w);
}

/// 5a23141: an upgrade given up after the old workers quiesced and offered
/// their sessions resumes them: every session stays where it was, on its
/// 4-tuple, even when the successor said yes before it left (its yes comes
/// to a worker that took the offer back).
#[test]
fn an_upgrade_given_up_mid_handover_leaves_every_flow_on_its_worker_and_4_tuple() {
    for leave_first in [false, true] {
        given_up_mid_handover(leave_first);
    }
}

fn given_up_mid_handover(leave_first: bool) {
    let mut w = world(2);
    for cid in 0..6u64 {
        w.send((cid % 2) as usize, CLIENT, &short(cid, b"before"));
    }
    let before: Vec<_> = w.at_backend.iter().map(|d| d.from).collect();
    assert!(w.begin_upgrade());
    assert!(w.upgrade_step(), "quiesce");
    assert!(w.upgrade_step(), "hand over");
    w.hold_inboxes = true;
    assert!(w.upgrade_step(), "the first offers");
    assert!(w.routers.iter().any(|r| r.offers_pending() > 0));
    assert!(w.give_up_upgrade(leave_first));
    w.hold_inboxes = false;
    w.settle();
    for cid in 0..6u64 {
        // From either worker's socket: the flow is found where it was.
        w.send(1 - (cid % 2) as usize, CLIENT, &short(cid, b"after"));
        assert_eq!(w.holders(cid), vec![(cid % 2) as usize], "cid {cid}");
        assert_eq!(
            w.at_backend.last().unwrap().from,
            before[cid as usize],
            "cid {cid} kept its 4-tuple"
        );
    }
    assert_eq!(w.total(Counter::SessionsCreated), 6, "no session made anew");
    check(&w);
}

/// fd69396: handing over, an old worker offers its sessions to its
/// successor and to no one else, however many datagrams another worker
/// hands it.
#[test]
fn handing_over_a_session_goes_to_the_successor_only() {
    let mut w = world(2);
    w.send(0, CLIENT, &short(7, b"a"));
    assert!(w.begin_upgrade());
    assert!(w.upgrade_step(), "quiesce");
    assert!(w.upgrade_step(), "hand over");
    // The kernel now gives the flow to slot 1's new worker, which hands it
    // to its predecessor, which hands it to slot 0's old worker: a run of
    // handoffs by worker 1 that would move the flow there.
    w.hold_inboxes = true;
    for n in 0..2 * TRANSFER_AFTER {
        w.send(1, CLIENT, &short(7, &[n]));
        assert!(w.deliver_to(P::Cur(1)));
        assert!(w.deliver_to(P::Cur(0)));
        assert!(
            !w.inbox_kinds(1).iter().any(|k| k == "Transfer"),
            "offered to worker 1: {:?}",
            w.inbox_kinds(1)
        );
    }
    w.hold_inboxes = false;
    while w.upgrade.is_some() {
        w.upgrade_step();
    }
    assert_eq!(w.holders(7), vec![0], "at slot 0's new worker");
    check(&w);
}

/// fd69396: a standby worker whose predecessor died routes a flow as any
/// worker does, and a flow another slot's standby has goes there.
#[test]
fn a_standby_whose_predecessor_died_routes_as_any_and_finds_its_peers() {
    let mut w = world(2);
    w.send(1, CLIENT, &short(3, b"a"));
    assert!(w.begin_upgrade());
    assert!(w.upgrade_step(), "quiesce");
    assert!(w.upgrade_step(), "hand over");
    while w.upgrade.is_some() && w.holders(3) != vec![3] {
        w.upgrade_step();
    }
    w.kill(0);
    w.send(0, CLIENT, &short(3, b"b"));
    assert_eq!(w.holders(3), vec![3], "at slot 1's new worker only");
    assert_eq!(w.at_backend.len(), 2);
    check(&w);
}

/// Runs `events` on `workers` workers and checks the world at rest: every
/// property, and a reply on every live path reaching its client.
fn replay(workers: usize, events: &[Event], follow: bool) {
    let mut w = run(workers, events, follow, false);
    check(&w);
    super::properties::check_replies(&mut w, follow);
}

fn deliver(worker: u8) -> Event {
    Event::Deliver {
        worker,
        next: false,
    }
}

/// A worker that died mid-handover with offers in its successor's inbox:
/// another slot's successor took one of its flows meanwhile, and the dead
/// worker's successor must not take it too (found as a flow on two workers).
#[test]
fn offers_of_a_worker_that_died_mid_handover_are_refused() {
    use Event::*;
    let events = [
        client(0, 0, 0),
        client(5, 0, 0),
        Upgrade,
        Upgrade,
        Upgrade,
        Upgrade,
        Kill { worker: 0 },
        client(5, 0, 1),
    ];
    check(&run(2, &events, true, false));
}

/// An upgrade after one given up: its new workers are two generations
/// after the old ones (the first one's is spent), and must still know one
/// another (found as a flow on two workers).
#[test]
fn a_second_upgrade_after_one_given_up_still_finds_its_peers() {
    use Event::*;
    let events = [
        Upgrade,
        GiveUp { leave_first: false },
        Upgrade,
        Upgrade,
        client(0, 0, 1),
        client(0, 0, 0),
    ];
    check(&run(2, &events, false, false));
}

/// A datagram out of hops at a standby whose peer has its flow: dropped,
/// not made a second session (the ownership table's liveness does not know
/// the peer).
#[test]
fn out_of_hops_a_standby_does_not_take_a_flow_from_its_peer() {
    use Event::*;
    let events = [
        client(8, 0, 0),
        client(8, 0, 1),
        Kill { worker: 0 },
        Restart,
        Upgrade,
        client(0, 0, 0),
        Upgrade,
        Upgrade,
        deliver(0),
        client(8, 0, 1),
    ];
    check(&run(2, &events, true, false));
}

/// A datagram that waited in a dead worker's inbox while another worker
/// took its flow over: out of hops, it is dropped rather than made a second
/// session of the flow.
#[test]
fn out_of_hops_a_live_owners_flow_is_not_taken() {
    use Event::*;
    let events = [
        client(4, 0, 0),
        Upgrade,
        Upgrade,
        client(4, 0, 1),
        Upgrade,
        deliver(1),
        Kill { worker: 0 },
        GiveUp { leave_first: false },
        client(4, 0, 1),
    ];
    let w = run(2, &events, false, false);
    check(&w);
    assert!(w.drops(udpshard_shared::DropReason::Handoff) > 0);
}

/// A datagram that waited in an inbox through one upgrade gets its one hop
/// past the cap there, and no second one in the next.
#[test]
fn one_hop_past_the_cap_at_most_across_upgrades() {
    use Event::*;
    let mut events = vec![
        client(10, 0, 2),
        Upgrade,
        Upgrade,
        client(10, 0, 0),
        Upgrade,
        deliver(0),
        Kill { worker: 2 },
        GiveUp { leave_first: false },
        Restart,
    ];
    events.extend([Upgrade; 6]);
    events.push(client(0, 0, 0));
    check(&run(3, &events, false, false));
}

/// A new worker that goes live reads its predecessor's late offer (the
/// predecessor died before it heard an answer): refused, or two sessions
/// would send on one 4-tuple once the port cooled.
#[test]
fn a_late_offer_from_a_dead_predecessor_is_refused_after_going_live() {
    use Event::*;
    let events = [
        client(0, 0, 0),
        client(0, 0, 0),
        Upgrade,
        Upgrade,
        Upgrade,
        Advance { ms: 14043 },
        Advance { ms: 15958 },
        Upgrade,
        Upgrade,
        client(1, 0, 0),
        client(3, 0, 0),
        Upgrade,
        Upgrade,
        Upgrade,
        Kill { worker: 0 },
        client(1, 0, 1),
        Upgrade,
        Advance { ms: 5000 },
        Reload { backends: 2 },
    ];
    check(&run(2, &events, true, false));
}

/// Standby workers keep the relays of sessions their peers took over, and
/// do not adopt their peers' sockets (found as one 4-tuple sent on by two
/// sessions).
#[test]
fn standbys_keep_relays_for_their_peers() {
    use Event::*;
    let events = [
        client(0, 0, 0),
        Upgrade,
        Upgrade,
        Upgrade,
        client(1, 1, 2),
        client(11, 3, 2),
        client(11, 0, 0),
        client(11, 0, 0),
        Upgrade,
        client(11, 3, 0),
        Advance { ms: 1 },
        Advance { ms: 1 },
        client(0, 0, 0),
        client(0, 0, 0),
        client(1, 0, 0),
        Advance { ms: 5000 },
        client(0, 0, 0),
    ];
    check(&run(3, &events, false, false));
}

/// A successor's yes that comes after the upgrade was given up, while
/// another worker finds the flow's entry naming the spent successor: it is
/// handed to the slot that took its session back, not made anew.
#[test]
fn a_spent_successors_keys_lead_back_to_the_worker_that_resumed() {
    use Event::*;
    let events = [
        client(3, 0, 1),
        client(0, 0, 0),
        client(0, 0, 0),
        Upgrade,
        Upgrade,
        Upgrade,
        Upgrade,
        GiveUp { leave_first: false },
        client(3, 0, 0),
        client(0, 0, 0),
        client(0, 0, 0),
    ];
    check(&run(4, &events, false, false));
}

/// The old worker that a flow's offer waits on dies as the upgrade begins:
/// the handover ends at its timeout, and the upgrade completes.
#[test]
fn a_handover_ends_at_its_timeout_when_an_offer_waits_on_a_dead_worker() {
    let mut w = world(2);
    w.send(0, CLIENT, &short(9, b"a"));
    w.hold_inboxes = true;
    for n in 0..TRANSFER_AFTER {
        w.send(1, CLIENT, &short(9, &[n]));
    }
    w.deliver_to(P::Cur(0));
    w.deliver_to(P::Cur(0));
    w.deliver_to(P::Cur(0));
    assert_eq!(w.routers[0].offers_pending(), 1, "offered to worker 1");
    w.hold_inboxes = false;
    assert!(w.begin_upgrade());
    w.kill(1);
    for _ in 0..400 {
        if w.upgrade.is_none() {
            break;
        }
        w.upgrade_step();
        w.advance(100);
    }
    assert!(w.upgrade.is_none(), "{}", w.upgrade_state());
    check(&w);
}

/// The session key `cid` goes to backend `b` of 2 (as the router's Maglev
/// table chooses).
fn backend_of(cid: u64) -> usize {
    let names: Vec<(String, u32)> = (0..2)
        .map(|i| (super::harness::backend(i).to_string(), 1))
        .collect();
    udpshard_shared::Maglev::new(&names, 65537)
        .unwrap()
        .backend_for(&cid.to_be_bytes())
}

/// One upstream socket, two slots: worker 1 is its home; one slot carries
/// a session worker 0 took over (worker 1 relays its replies), the other a
/// session of worker 1's own. Across an upgrade, each generation's worker
/// 1 hands the socket to the next, with the relay, and worker 0's new
/// generation borrows it from there: every reply on both 4-tuples reaches
/// its client, none is a stray (found by the fleet test's rolling upgrade).
#[test]
fn an_upgrade_keeps_the_relays_of_a_socket_two_workers_share() {
    let mut w = World::new(2, &config("", 2), (20000, 20000));
    let s = 1u64;
    let t = (2..100u64)
        .find(|&c| backend_of(c) != backend_of(s))
        .expect("a CID on the other backend");
    w.send(1, CLIENT, &short(s, b"s"));
    for n in 0..TRANSFER_AFTER {
        w.send(0, CLIENT, &short(s, &[n]));
    }
    assert_eq!(w.holders(s), vec![0], "worker 0 took S over");
    w.send(1, "192.0.2.11:5000", &short(t, b"t"));
    assert_eq!(w.holders(t), vec![1]);
    let froms: Vec<_> = w.at_backend.iter().map(|d| d.from).collect();
    assert!(
        froms.iter().all(|f| *f == froms[0]),
        "one socket: {froms:?}"
    );
    let stray = w.drops(DropReason::Stray);
    assert!(w.begin_upgrade());
    for _ in 0..100 {
        if w.upgrade.is_none() {
            break;
        }
        w.upgrade_step();
        w.advance(10);
    }
    assert!(w.upgrade.is_none(), "{}", w.upgrade_state());
    w.advance(1000);
    let n = w.at_backend.len();
    let replies = w.at_client.len();
    w.send(0, CLIENT, &short(s, b"s after"));
    w.send(1, "192.0.2.11:5000", &short(t, b"t after"));
    assert_eq!(w.at_backend.len(), n + 2);
    assert!(w.at_backend[n..].iter().all(|d| d.from == froms[0]));
    w.echo_since(n);
    assert_eq!(w.drops(DropReason::Stray), stray, "a reply was a stray");
    assert_eq!(w.at_client.len(), replies + 2);
    check(&w);
}

/// The client address of session T in [`lent_by_worker_2`].
const OTHER: &str = "192.0.2.11:5000";

/// Sessions S (from [`CLIENT`]) and T (from [`OTHER`]), on the two backends
/// of a one-port world: made at worker 2, then taken over by workers 0 and
/// 1, which borrow worker 2's one socket. Returns S, T and the socket's
/// address.
fn lent_by_worker_2(w: &mut World) -> (u64, u64, std::net::SocketAddr) {
    let s = 1u64;
    let t = (2..100u64)
        .find(|&c| backend_of(c) != backend_of(s))
        .expect("a CID on the other backend");
    w.send(2, CLIENT, &short(s, b"s"));
    w.send(2, OTHER, &short(t, b"t"));
    for n in 0..TRANSFER_AFTER {
        w.send(0, CLIENT, &short(s, &[n]));
        w.send(1, OTHER, &short(t, &[n]));
    }
    assert_eq!((w.holders(s), w.holders(t)), (vec![0], vec![1]));
    let from = w.at_backend[0].from;
    assert!(w.at_backend.iter().all(|d| d.from == from), "one socket");
    (s, t, from)
}

/// One socket of a worker that dies, two slots, each borrowed by another
/// worker for a session it took over. The first to look adopts the socket;
/// the other finds it held, borrows it from the adopter and asks it to
/// relay its path: the replies on both 4-tuples still reach their clients.
#[test]
fn two_borrowers_of_a_dead_home_share_its_socket_through_the_one_that_adopts_it() {
    let mut w = World::new(3, &config("", 2), (20000, 20000));
    let (s, t, from) = lent_by_worker_2(&mut w);
    w.kill(2);
    w.advance(200);
    let reader = w.reader(from).expect("adopted");
    assert!(reader < 2, "adopted by a borrower");
    let stray = w.drops(DropReason::Stray);
    let n = w.at_backend.len();
    let replies = w.at_client.len();
    w.send(0, CLIENT, &short(s, b"s after"));
    w.send(1, OTHER, &short(t, b"t after"));
    assert_eq!(w.at_backend.len(), n + 2, "both still forward");
    assert!(w.at_backend[n..].iter().all(|d| d.from == from));
    w.echo_since(n);
    assert_eq!(w.drops(DropReason::Stray), stray, "a reply was a stray");
    assert_eq!(w.at_client.len(), replies + 2);
    let clients: Vec<_> = w.at_client[replies..].iter().map(|c| c.client).collect();
    assert!(clients.contains(&super::harness::addr(CLIENT)));
    assert!(clients.contains(&super::harness::addr(OTHER)));
    check(&w);
}

/// A relay that took a slot cooling since its socket was adopted, then
/// closed: the slot cools its full `port_reuse_delay` from the relay's
/// close, not from the adoption (the adoption's cooling entry is stale).
#[test]
fn a_relay_on_a_slot_cooling_since_adoption_cools_from_its_own_close() {
    let cool = 10_000u64;
    let mut w = World::new(
        3,
        &config("port_reuse_delay = \"10s\"\nsession_idle = \"1h\"", 2),
        (20000, 20000),
    );
    let (_, t, from) = lent_by_worker_2(&mut w);
    w.kill(2);
    w.advance(200);
    assert_eq!(w.reader(from), Some(0), "worker 0 adopted the socket");
    // Worker 1, which holds T, dies: worker 0's relay for T closes.
    w.advance(cool / 2);
    w.kill(1);
    w.advance(200);
    // Past the adoption's cooling, before the relay's: a new flow toward
    // T's backend finds no free slot on the one port.
    w.advance(cool / 2);
    let u = (200..400u64)
        .find(|&c| backend_of(c) == backend_of(t))
        .expect("a CID on T's backend");
    let refused = w.drops(DropReason::NoPort);
    w.send(0, "192.0.2.12:5000", &short(u, b"u"));
    assert_eq!(
        w.drops(DropReason::NoPort),
        refused + 1,
        "the slot cooled early"
    );
    // Once the relay's cooling is over, it is free.
    w.advance(cool);
    let v = (u + 1..600u64)
        .find(|&c| backend_of(c) == backend_of(t))
        .expect("another CID on T's backend");
    let n = w.at_backend.len();
    w.send(0, "192.0.2.13:5000", &short(v, b"v"));
    assert_eq!(w.at_backend.len(), n + 1, "forwarded once the slot cooled");
    assert_eq!(w.at_backend[n].from, from);
}

/// Found by the at-rest reply property: a path closed unanswered while
/// its session's offer was in flight freed its slot at once, and a new
/// path of the same session for another client address took it. The
/// offer's answer then found "the same socket" still there, so the
/// receiver kept its copy with the old client while the home relayed the
/// 4-tuple's replies to the new one. The answer now names offered paths by
/// socket and client, and the receiver closes its copy.
#[test]
fn a_path_closed_while_its_session_is_on_offer_does_not_lend_its_4_tuple_to_another_client() {
    use Event::*;
    let c = client;
    let mut events = vec![c(0, 0, 0), c(0, 0, 0), c(0, 0, 0), c(7, 0, 0), c(0, 0, 0)];
    events.push(c(7, 5, 2));
    events.extend(std::iter::repeat_n(c(0, 0, 0), 14));
    events.extend([c(7, 0, 2), c(0, 0, 0), c(0, 0, 0), c(7, 3, 2), c(7, 1, 1)]);
    events.extend(std::iter::repeat_n(c(0, 0, 0), 5));
    events.push(Advance { ms: 1 });
    events.extend(std::iter::repeat_n(c(0, 0, 0), 7));
    events.push(Deliver {
        worker: 0,
        next: false,
    });
    events.extend(std::iter::repeat_n(c(0, 0, 0), 3));
    replay(3, &events, false);
}

/// Found by the at-rest reply property: an offer waited in the inbox of a
/// worker that died until the sender gave it up and, past
/// `session_idle`, closed the session and released its key. The
/// replacement then read the offer and took the session, on a socket
/// whose home no longer relayed it: every reply was a stray. An offer
/// whose key no process owns is refused.
#[test]
fn an_offer_read_after_its_sender_closed_the_session_is_refused() {
    use Event::*;
    let c = client;
    let events = [
        c(8, 0, 1),
        c(8, 0, 0),
        c(8, 0, 0),
        Advance { ms: 1 },
        c(8, 0, 0),
        Deliver {
            worker: 1,
            next: false,
        },
        Kill { worker: 0 },
        Advance { ms: 18_840 },
        Advance { ms: 11_161 },
    ];
    replay(2, &events, true);
}

/// Found by the at-rest reply property in a soak (200,000 cases): worker
/// 1 offered CID 8 to worker 0 and died before worker 0 read the offer.
/// Its replacement read a datagram of CID 8 from a new client, took the
/// key and opened a path on the same 4-tuple for that client. Worker 0
/// then read the dead worker's offer and took the session, with the
/// 4-tuple for the old client, and the replacement turned its path into a
/// relay to the new client: every reply on it went to the wrong client. A
/// control frame now says its sender's generation, and an offer whose key
/// another generation of its sender's slot owns is refused.
#[test]
fn an_offer_left_by_a_dead_worker_is_refused_once_its_replacement_took_the_key() {
    use Event::*;
    let c = client;
    let mut events = vec![c(0, 0, 0); 6];
    events.extend([
        Kill { worker: 3 },
        c(8, 0, 3),
        c(0, 0, 0),
        c(8, 0, 3),
        c(8, 0, 1),
    ]);
    events.extend([c(0, 0, 0); 3]);
    events.extend([Restart, Advance { ms: 1 }, c(8, 0, 3)]);
    events.extend([
        Deliver {
            worker: 1,
            next: false,
        },
        c(0, 0, 0),
        Kill { worker: 1 },
        c(8, 1, 1),
        Deliver {
            worker: 0,
            next: true,
        },
    ]);
    replay(3, &events, false);
}

/// Found by the at-rest reply property in a soak: worker 1 offered CID
/// 11 (on backend 3) to worker 0, which died before it read the offer.
/// Two reloads then moved the session to backend 2 on the same socket and
/// brought backend 3 back. Worker 0's replacement read the offer and took
/// the session on backend 3; worker 1 found the offered path "still here"
/// (same socket, same client) and kept a relay for backend 2, so every
/// reply from backend 3 was a stray. The offer now remembers its backend:
/// a path toward another one is not the path offered, and the receiver is
/// told to close its copy.
#[test]
fn an_offer_whose_session_a_reload_moved_to_another_backend_closes_the_paths_offered() {
    use Event::*;
    let c = client;
    let events = [
        c(11, 0, 1),
        c(11, 0, 2),
        Health { down: 0 },
        c(11, 0, 2),
        c(11, 0, 0),
        Deliver {
            worker: 0,
            next: false,
        },
        Deliver {
            worker: 1,
            next: false,
        },
        Deliver {
            worker: 1,
            next: false,
        },
        Kill { worker: 0 },
        Reload { backends: 2 },
        c(0, 0, 0),
        Reload { backends: 3 },
        c(0, 0, 0),
    ];
    replay(2, &events, false);
}

/// Found by the fault property in a soak (on the code before this session
/// too): worker 1 offered CID 10 to worker 0, which died with the offer
/// in its inbox. Past the offer's lifetime worker 1 gave the offer up,
/// and the offered path closed (its client moved and went quiet). Worker
/// 0's replacement then read the offer and said yes; worker 1 took the
/// yes with nothing to reconcile it against, so the replacement kept the
/// closed path's 4-tuple and nobody relayed it. An offer given up on a
/// dead receiver is now kept for such a late yes.
#[test]
fn a_late_yes_to_an_offer_given_up_on_a_dead_receiver_is_reconciled() {
    use Event::*;
    let c = client;
    let events = [
        Upgrade,
        Upgrade,
        c(10, 0, 1),
        Upgrade,
        c(10, 0, 3),
        c(10, 0, 3),
        Upgrade,
        Advance { ms: 1 },
        Deliver {
            worker: 0,
            next: true,
        },
        c(10, 0, 3),
        Deliver {
            worker: 1,
            next: false,
        },
        c(0, 0, 0),
        Kill { worker: 0 },
        Advance { ms: 7284 },
        Advance { ms: 15862 },
        c(10, 1, 1),
        Advance { ms: 6854 },
    ];
    replay(3, &events, false);
}

/// Found by soaks of the fault properties while trying fixes for a case
/// left open (an upgrade given up, then another, and the given-up
/// successor's late yes read as the new one's answer): each flow stays on
/// one worker and every reply reaches its client as the code stands.
/// Kept so that a fix for that case does not break them.
#[test]
fn a_given_up_upgrade_then_another_keeps_each_flow_on_one_worker_1() {
    use Event::*;
    let c = client;
    let events = [
        Upgrade,
        c(6, 0, 0),
        Upgrade,
        Upgrade,
        c(0, 0, 1),
        Upgrade,
        Deliver {
            worker: 0,
            next: true,
        },
        c(1, 0, 1),
        Advance { ms: 1 },
        Upgrade,
        c(6, 0, 0),
        c(0, 0, 0),
        Health { down: 0 },
        c(3, 0, 1),
        Upgrade,
        c(6, 0, 0),
        Upgrade,
        Upgrade,
        c(0, 0, 1),
        c(0, 0, 1),
        c(3, 0, 1),
        Upgrade,
        c(0, 0, 0),
        Upgrade,
        c(2, 0, 0),
        c(2, 0, 0),
        Health { down: 0 },
        c(0, 0, 0),
        c(0, 0, 0),
        c(0, 0, 0),
        Health { down: 0 },
        c(2, 0, 0),
        Reply { pick: 15424 },
        Upgrade,
        GiveUp { leave_first: false },
        Upgrade,
        Upgrade,
        c(3, 0, 0),
        Upgrade,
        Upgrade,
        Health { down: 0 },
        Advance { ms: 10001 },
        GiveUp { leave_first: false },
        c(3, 0, 0),
    ];
    replay(2, &events, true);
}

/// See above.
#[test]
fn a_given_up_upgrade_then_another_keeps_each_flow_on_one_worker_2() {
    use Event::*;
    let c = client;
    let events = [
        c(1, 0, 0),
        c(0, 0, 1),
        c(0, 0, 0),
        c(1, 0, 0),
        Kill { worker: 1 },
        c(1, 0, 0),
        c(2, 0, 1),
        c(0, 0, 1),
        c(1, 0, 0),
        Restart,
        Reply { pick: 37753 },
        Restart,
        c(0, 0, 0),
        Upgrade,
        Upgrade,
        Upgrade,
        Upgrade,
        GiveUp { leave_first: false },
        c(0, 0, 0),
        c(0, 0, 0),
        Upgrade,
        Upgrade,
        c(0, 0, 0),
        Upgrade,
        c(0, 0, 0),
        c(1, 0, 0),
        c(0, 0, 0),
        Advance { ms: 1 },
        c(2, 0, 0),
        Advance { ms: 10000 },
        GiveUp { leave_first: false },
        c(1, 0, 1),
    ];
    replay(2, &events, true);
}

/// See above.
#[test]
fn a_given_up_upgrade_then_another_keeps_each_flow_on_one_worker_3() {
    use Event::*;
    let events = [
        Client {
            cid: 10,
            client: 0,
            worker: 1,
        },
        Client {
            cid: 0,
            client: 0,
            worker: 0,
        },
        Upgrade,
        Upgrade,
        Upgrade,
        Upgrade,
        GiveUp { leave_first: false },
        Upgrade,
        Upgrade,
        Upgrade,
        Upgrade,
        Deliver {
            worker: 1,
            next: true,
        },
        Deliver {
            worker: 1,
            next: false,
        },
        Kill { worker: 1 },
        Client {
            cid: 10,
            client: 0,
            worker: 0,
        },
    ];
    replay(2, &events, true);
}

/// See above.
#[test]
fn a_given_up_upgrade_then_another_keeps_each_flow_on_one_worker_4() {
    use Event::*;
    let c = client;
    let mut events = vec![
        Kill { worker: 0 },
        c(0, 0, 0),
        c(0, 0, 0),
        c(0, 0, 1),
        c(1, 0, 1),
        c(2, 0, 1),
        c(3, 0, 1),
        c(10, 0, 1),
    ];
    events.extend([c(0, 0, 0); 3]);
    events.extend([Restart, Reload { backends: 2 }]);
    events.extend([c(0, 0, 0); 9]);
    events.extend([
        Upgrade,
        c(0, 0, 0),
        c(4, 0, 1),
        Deliver {
            worker: 0,
            next: false,
        },
        Deliver {
            worker: 0,
            next: false,
        },
        c(0, 0, 0),
        Restart,
        c(0, 0, 0),
        Upgrade,
        c(0, 0, 0),
        Upgrade,
        Upgrade,
        Upgrade,
        Health { down: 0 },
        Upgrade,
        GiveUp { leave_first: false },
        Upgrade,
        Upgrade,
        Upgrade,
        c(10, 0, 0),
        Upgrade,
        Advance { ms: 1 },
        Kill { worker: 1 },
        c(10, 0, 0),
    ]);
    replay(2, &events, true);
}

/// See above.
#[test]
fn a_given_up_upgrade_then_another_keeps_each_flow_on_one_worker_5() {
    use Event::*;
    let c = client;
    let mut events = vec![c(7, 0, 0)];
    events.extend([c(0, 0, 0); 7]);
    events.push(Deliver {
        worker: 0,
        next: false,
    });
    events.extend([c(0, 0, 0); 6]);
    events.extend([
        Upgrade,
        Upgrade,
        Upgrade,
        Upgrade,
        GiveUp { leave_first: false },
        Upgrade,
        c(0, 0, 0),
        c(0, 0, 0),
        Upgrade,
        Deliver {
            worker: 1,
            next: false,
        },
        c(7, 0, 2),
        Upgrade,
        c(0, 0, 0),
        Advance { ms: 1 },
        Kill { worker: 2 },
        c(0, 0, 0),
        c(7, 0, 1),
        c(0, 0, 0),
    ]);
    replay(2, &events, false);
}
