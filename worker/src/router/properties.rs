//! Properties of the routers over random event sequences, with every fault
//! the supervisor meets: kills and restarts, reloads, backends going down
//! and up, and binary upgrades (given up or completed) at any point. The
//! ledger and the unique 4-tuples are checked after every step; at rest, a
//! flow has a session in one process at most.
//!
//! Each property runs from a seed: a failure prints it, with the smallest
//! event sequence that fails, and `UDPSHARD_WORLD_SEED=<seed>` replays it
//! (`cargo test -p udpshard-worker router_properties`);
//! `UDPSHARD_WORLD_CASES=5000` runs more cases than the default 256.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

use super::harness::{config, short, World, P};

#[derive(Debug, Clone, Copy)]
pub(super) enum Event {
    /// A client datagram for cid, from client address index, to worker.
    Client { cid: u8, client: u8, worker: u8 },
    /// The backend answers the newest datagram it got from some path.
    Reply { pick: u16 },
    /// Time passes (ms).
    Advance { ms: u16 },
    /// One inbox frame is read (by the slot's standby, `next`).
    Deliver { worker: u8, next: bool },
    /// The worker of a slot dies.
    Kill { worker: u8 },
    /// Dead workers are restarted (not during an upgrade: the supervisor
    /// waits for it to end).
    Restart,
    /// A reload to 2, 3 or 4 backends.
    Reload { backends: u8 },
    /// Passive health takes these backends (a bit each) down, the others up.
    Health { down: u8 },
    /// SIGUSR2, or the upgrade under way takes its next step.
    Upgrade,
    /// The upgrade under way is given up; the new workers leave before the
    /// old ones hear it, or after.
    GiveUp { leave_first: bool },
}

/// The events of the first properties: traffic, time and inbox order only.
fn traffic(workers: u8) -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0u8..12, 0u8..6, 0..workers).prop_map(|(cid, client, worker)| Event::Client { cid, client, worker }),
        2 => any::<u16>().prop_map(|pick| Event::Reply { pick }),
        1 => (1u16..20_000).prop_map(|ms| Event::Advance { ms }),
        3 => (0..workers).prop_map(|worker| Event::Deliver { worker, next: false }),
    ]
}

/// Traffic with every fault mixed in.
fn faults(workers: u8) -> impl Strategy<Value = Event> {
    prop_oneof![
        12 => traffic(workers),
        2 => (0..workers).prop_map(|worker| Event::Deliver { worker, next: true }),
        1 => (0..workers).prop_map(|worker| Event::Kill { worker }),
        1 => Just(Event::Restart),
        1 => (2u8..=4).prop_map(|backends| Event::Reload { backends }),
        1 => (0u8..16).prop_map(|down| Event::Health { down }),
        3 => Just(Event::Upgrade),
        1 => any::<bool>().prop_map(|leave_first| Event::GiveUp { leave_first }),
    ]
}

/// The config of every run: `extra` keys, `backends` backends.
fn text(follow: bool, reroute: bool, backends: u8) -> String {
    let mut extra = if follow {
        "migration = \"follow\"\nsession_idle = \"30s\"\nport_reuse_delay = \"5s\"".to_string()
    } else {
        "max_paths = 3\nsession_idle = \"30s\"\npath_idle = \"10s\"\nport_reuse_delay = \"5s\""
            .to_string()
    };
    if reroute {
        extra.push_str("\non_backend_down = \"reroute\"");
    }
    // Small enough to build in microseconds: restarts, upgrades and reloads
    // build their routes again.
    extra.push_str("\nmaglev_table_size = 1009");
    config(&extra, usize::from(backends))
}

/// Runs `events` on `workers` slots, checking the ledger and the 4-tuples
/// after every step; at the end dead workers restart, an upgrade under way
/// completes, and every inbox is read.
pub(super) fn run(workers: usize, events: &[Event], follow: bool, reroute: bool) -> World {
    let mut w = World::new(workers, &text(follow, reroute, 3), (20000, 20063));
    w.hold_inboxes = true;
    let mut backends = 3;
    for e in events {
        step(&mut w, e, follow, reroute, &mut backends);
        w.assert_ledger();
        w.assert_unique_tuples();
    }
    w.hold_inboxes = false;
    // An upgrade under way completes, as the supervisor drives it: within
    // the handover's timeout.
    for _ in 0..1000 {
        if w.upgrade.is_none() {
            break;
        }
        w.upgrade_step();
        w.advance(100);
    }
    assert!(
        w.upgrade.is_none(),
        "the upgrade never completed: {}",
        w.upgrade_state()
    );
    restart_dead(&mut w);
    w.settle();
    w
}

fn restart_dead(w: &mut World) {
    for slot in 0..w.workers() {
        if !w.alive(P::Cur(slot)) {
            w.restart(slot);
        }
    }
}

fn step(w: &mut World, e: &Event, follow: bool, reroute: bool, backends: &mut u8) {
    let n = w.workers() as u8;
    match *e {
        Event::Client {
            cid,
            client,
            worker,
        } => {
            let from = client_addr(client);
            w.send(
                usize::from(worker % n),
                &from,
                &short(u64::from(cid), &[cid, client]),
            );
        }
        Event::Reply { pick } => {
            if !w.at_backend.is_empty() {
                let d = w.at_backend[usize::from(pick) % w.at_backend.len()].clone();
                w.reply(d.backend, d.from, &d.payload);
            }
        }
        Event::Advance { ms } => {
            w.hold_inboxes = false;
            w.advance(u64::from(ms));
            w.hold_inboxes = true;
        }
        Event::Deliver { worker, next } => {
            let slot = usize::from(worker % n);
            w.deliver_to(if next { P::Next(slot) } else { P::Cur(slot) });
        }
        Event::Kill { worker } => w.kill(usize::from(worker % n)),
        Event::Restart => {
            if w.upgrade.is_none() {
                restart_dead(w);
            }
        }
        Event::Reload { backends: b } => {
            // The supervisor refuses a reload during an upgrade.
            if w.upgrade.is_none() {
                *backends = b;
                w.reload(&text(follow, reroute, b));
            }
        }
        Event::Health { down } => {
            let down: Vec<bool> = (0..*backends).map(|b| down & (1 << b) != 0).collect();
            w.set_down(&down);
        }
        Event::Upgrade => {
            if w.upgrade.is_none() {
                w.begin_upgrade();
            } else {
                w.upgrade_step();
            }
        }
        Event::GiveUp { leave_first } => {
            w.give_up_upgrade(leave_first);
        }
    }
}

pub(super) fn check(w: &World) {
    // Every client datagram ended in exactly one of forward, hand over or a
    // drop with its reason; replies likewise; hops within the cap.
    w.assert_ledger();
    // No upstream 4-tuple is used twice.
    w.assert_unique_tuples();
    // At rest, a flow has a session in one process at most.
    for cid in 0..12u64 {
        assert!(
            w.holders(cid).len() <= 1,
            "CID {cid} on {:?}",
            w.holders(cid)
        );
    }
}

/// At rest (every worker serving, time enough for the sweeps), a reply on
/// every live path reaches a client: no path is left on a socket nobody
/// reads, or whose reader has no path or relay for it. With `migration =
/// "path"` it reaches that path's own client (a path's 4-tuple is one
/// client address's). With `"follow"` the socket's home holds the newest
/// address the flow was seen at; the session's copy of its one path may
/// be older until the client sends again (a move while an offer was in
/// flight), so any address the flow was sent from will do.
pub(super) fn check_replies(w: &mut World, follow: bool) {
    w.advance(1_000);
    w.settle();
    let stray = w.drops(udpshard_shared::DropReason::Stray);
    for (backend, local, client, key) in w.live_paths() {
        let before = w.at_client.len();
        w.reply(backend, local, b"at rest");
        assert_eq!(
            w.at_client.len(),
            before + 1,
            "a reply to {local} from {backend} reached no client (reader {:?})",
            w.reader(local)
        );
        let got = w.at_client[before].client;
        if follow {
            assert!(
                addresses_of(w, &key).contains(&got),
                "reply on {local} to {got}, not an address of {key:?}"
            );
        } else {
            assert_eq!(got, client, "reply on {local}");
        }
        assert_eq!(w.drops(udpshard_shared::DropReason::Stray), stray);
    }
}

/// The client addresses that sent datagrams of flow `key`.
fn addresses_of(w: &World, key: &udpshard_shared::FlowKey) -> Vec<std::net::SocketAddr> {
    let cid = <[u8; 8]>::try_from(key.as_bytes()).ok();
    cid.and_then(|c| w.clients_of.get(&c))
        .map(|set| set.iter().copied().collect())
        .unwrap_or_default()
}

/// Client `client`'s datagram of connection ID `cid` to worker `worker`.
pub(super) fn client(cid: u8, client: u8, worker: u8) -> Event {
    Event::Client {
        cid,
        client,
        worker,
    }
}

/// Client `client`'s address in the events.
fn client_addr(client: u8) -> String {
    format!("192.0.2.{}:{}", 1 + client, 1000 + u16::from(client))
}

/// Runs `cases` cases of `strategy` through `test` from a seed:
/// `UDPSHARD_WORLD_SEED` when set (a replay), else a fresh one. A failure
/// names the seed and the smallest input that fails.
fn replayable<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let seed = std::env::var("UDPSHARD_WORLD_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(name)
        });
    // More cases for a soak: UDPSHARD_WORLD_CASES=5000.
    let cases = std::env::var("UDPSHARD_WORLD_CASES")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(cases);
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, test) {
        panic!(
            "{name} failed: {e}\nreplay it: UDPSHARD_WORLD_SEED={seed} cargo test -p udpshard-worker {name}"
        );
    }
}

#[test]
fn router_properties_hold_over_random_events_on_2_to_4_workers() {
    let strategy = (2usize..=4, prop::collection::vec(traffic(4), 1..120));
    replayable(
        "router_properties_hold_over_random_events_on_2_to_4_workers",
        256,
        strategy,
        |(workers, events)| {
            let mut w = run(workers, &events, false, false);
            check(&w);
            check_replies(&mut w, false);
            Ok(())
        },
    );
}

#[test]
fn router_properties_hold_in_follow_mode() {
    let strategy = prop::collection::vec(traffic(2), 1..120);
    replayable(
        "router_properties_hold_in_follow_mode",
        256,
        strategy,
        |events| {
            let mut w = run(2, &events, true, false);
            check(&w);
            check_replies(&mut w, true);
            Ok(())
        },
    );
}

#[test]
fn router_properties_hold_through_kills_reloads_health_and_upgrades() {
    let strategy = (
        2usize..=4,
        any::<bool>(),
        prop::collection::vec(faults(4), 1..160),
    );
    replayable(
        "router_properties_hold_through_kills_reloads_health_and_upgrades",
        256,
        strategy,
        |(workers, reroute, events)| {
            let mut w = run(workers, &events, false, reroute);
            check(&w);
            check_replies(&mut w, false);
            Ok(())
        },
    );
}

#[test]
fn router_properties_hold_through_faults_in_follow_mode() {
    let strategy = prop::collection::vec(faults(2), 1..160);
    replayable(
        "router_properties_hold_through_faults_in_follow_mode",
        256,
        strategy,
        |events| {
            let mut w = run(2, &events, true, false);
            check(&w);
            check_replies(&mut w, true);
            Ok(())
        },
    );
}

/// A receiver that answers after the sender stopped waiting (here: the
/// clock jumps 5 s before the inboxes are read). Meanwhile the sender
/// evicted one offered path (max_paths) and, once its port cooled, gave the
/// port to another session toward the same backend. The late yes must still
/// close that path's copy at the receiver: found as a shared 4-tuple by the
/// properties above.
#[test]
fn a_late_yes_to_a_transfer_still_closes_the_paths_closed_meanwhile() {
    use Event::*;
    let events = [
        client(10, 0, 0),
        client(5, 3, 0),
        client(5, 0, 1),
        client(5, 2, 1),
        Advance { ms: 1 },
        client(5, 0, 1),
        Deliver {
            worker: 0,
            next: false,
        },
        client(5, 1, 0),
        client(10, 1, 1),
        Advance { ms: 5000 },
    ];
    let w = run(3, &events, false, false);
    check(&w);
    assert!(w.holders(5).len() == 1, "CID 5 on {:?}", w.holders(5));
}
