//! End to end: the real `udpshard` binary forwarding real datagrams on
//! loopback between real client sockets and real backends.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use udpshard_shared::Maglev;
use udpshard_tests::harness::{
    bind_udp, listener_config, quic_short, send_segmented, total, wait_until, Backend, Proxy,
};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
const WAIT: Duration = Duration::from_secs(10);

fn config(listener_extra: &str, backends: &[&Backend]) -> String {
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    listener_config("workers = \"auto\"", listener_extra, &addrs)
}

fn client() -> UdpSocket {
    let c = bind_udp("127.0.0.1:0");
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    c
}

/// Which backend saw each CID (from the first 8 bytes after the header
/// byte), and from which proxy addresses.
fn cid_routes(backends: &[&Backend]) -> HashMap<u64, (HashSet<String>, HashSet<SocketAddr>)> {
    let mut routes: HashMap<u64, (HashSet<String>, HashSet<SocketAddr>)> = HashMap::new();
    for b in backends {
        for seen in b.seen() {
            let cid = u64::from_be_bytes(seen.payload[1..9].try_into().unwrap());
            let entry = routes.entry(cid).or_default();
            entry.0.insert(b.name.clone());
            entry.1.insert(seen.from);
        }
    }
    routes
}

#[test]
fn each_cid_sticks_to_one_backend_and_replies_come_back() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let proxy = Proxy::start(
        Path::new(BIN),
        &config("dissector = \"quic\"\nshort_cid_len = 8", &[&a, &b]),
    );
    let target = proxy.addr("quic");
    const CIDS: u64 = 200;
    const PER_CID: usize = 5;
    // One client socket per CID: 200 source ports spread over the workers.
    let clients: Vec<UdpSocket> = (0..CIDS).map(|_| client()).collect();
    for round in 0..PER_CID {
        for (cid, c) in clients.iter().enumerate() {
            c.send_to(&quic_short(cid as u64 + 1, &[round as u8; 16]), target)
                .unwrap();
        }
    }
    let want = CIDS as usize * PER_CID;
    wait_until(WAIT, "every datagram at a backend", || {
        a.count() + b.count() == want
    });

    let routes = cid_routes(&[&a, &b]);
    assert_eq!(routes.len(), CIDS as usize);
    // The fleet-stable choice: what any udpshard of any version picks.
    let maglev = Maglev::new(&[(a.addr.to_string(), 1), (b.addr.to_string(), 1)], 65537).unwrap();
    for (cid, (names, froms)) in &routes {
        assert_eq!(names.len(), 1, "CID {cid} reached {names:?}");
        assert_eq!(
            froms.len(),
            1,
            "CID {cid} came from several proxy sockets: {froms:?}"
        );
        let expected = ["a", "b"][maglev.backend_for(&cid.to_be_bytes())];
        assert!(
            names.contains(expected),
            "CID {cid} went to {names:?}, Maglev says {expected}"
        );
    }
    assert!(
        a.count() > 0 && b.count() > 0,
        "a {} b {}",
        a.count(),
        b.count()
    );

    // Every client gets its own replies, from the proxy's address.
    for (cid, c) in clients.iter().enumerate() {
        let mut buf = [0u8; 128];
        for _ in 0..PER_CID {
            let (n, from) = c.recv_from(&mut buf).expect("reply");
            assert_eq!(from, target);
            let reply = &buf[..n];
            assert_eq!(
                &reply[3..11],
                &(cid as u64 + 1).to_be_bytes(),
                "reply for another CID"
            );
        }
    }

    let stats = proxy.wait_stats(WAIT, "replies counted", |s| {
        total(s, "replies_out") == want as u64
    });
    assert_eq!(total(&stats, "rx_packets"), want as u64);
    assert_eq!(total(&stats, "tx_packets"), want as u64);
    assert_eq!(total(&stats, "replies_in"), want as u64);
    assert_eq!(total(&stats, "sessions_active"), CIDS);
    assert_eq!(total(&stats, "sessions_created"), CIDS);
    for drop in [
        "socket",
        "malformed",
        "session_limit",
        "no_backend",
        "upstream",
        "handoff",
        "reply",
    ] {
        assert_eq!(total(&stats, &format!("drops.{drop}")), 0, "drops.{drop}");
    }
    // The kernel hash spread 200 source ports over every worker.
    let workers = stats["workers"].as_array().unwrap();
    if workers.len() > 1 {
        for w in workers {
            assert!(w["rx_packets"].as_u64().unwrap() > 0, "worker idle: {w}");
        }
    }
}

#[test]
fn malformed_datagrams_are_counted_and_harm_nothing() {
    let a = Backend::start("a");
    let proxy = Proxy::start(
        Path::new(BIN),
        &config("dissector = \"quic\"\nshort_cid_len = 8", &[&a]),
    );
    let target = proxy.addr("quic");
    let c = client();
    let mut long_21 = vec![0xc0, 0, 0, 0, 1, 21];
    long_21.extend_from_slice(&[7; 40]);
    let mut long_255 = vec![0xc0, 0, 0, 0, 1, 255];
    long_255.extend_from_slice(&[7; 300]);
    let malformed: Vec<Vec<u8>> = vec![
        vec![],                          // empty
        vec![0x40],                      // 1 byte
        long_21,                         // DCID length 21
        long_255,                        // DCID length 255
        vec![0xc0, 0, 0, 0, 1, 8, 1, 2], // long header, CID truncated
        vec![0x40, 1, 2, 3],             // short header, CID truncated
        vec![0xc0, 0, 0, 0],             // long header without a length byte
    ];
    for d in &malformed {
        c.send_to(d, target).unwrap();
    }
    // Good traffic before and after still flows.
    for i in 0..10u64 {
        c.send_to(&quic_short(1000 + i, b"ok"), target).unwrap();
    }
    wait_until(WAIT, "good datagrams forwarded", || a.count() == 10);
    let stats = proxy.wait_stats(WAIT, "malformed counted", |s| {
        total(s, "drops.malformed") == malformed.len() as u64
    });
    assert_eq!(total(&stats, "rx_packets"), malformed.len() as u64 + 10);
    assert_eq!(total(&stats, "tx_packets"), 10);
    assert_eq!(total(&stats, "sessions_created"), 10);
    assert!(a.seen().iter().all(|s| s.payload.ends_with(b"ok")));
}

#[test]
fn session_limit_drops_new_flows_and_counts_them() {
    let a = Backend::start("a");
    let cfg = config("dissector = \"quic\"\nmax_sessions = 5", &[&a])
        .replace("workers = \"auto\"", "workers = 1");
    let proxy = Proxy::start(Path::new(BIN), &cfg);
    let target = proxy.addr("quic");
    let c = client();
    // Five flows their backend answers: established, they hold their
    // places (an unanswered one would make room for a new flow).
    for cid in 0..5u64 {
        c.send_to(&quic_short(cid, b"x"), target).unwrap();
        let mut buf = [0u8; 64];
        c.recv_from(&mut buf).expect("the backend's answer");
    }
    for cid in 5..12u64 {
        c.send_to(&quic_short(cid, b"x"), target).unwrap();
    }
    // Handled: read, and forwarded or dropped (a worker publishes what it
    // read before it has decided on it).
    let stats = proxy.wait_stats(WAIT, "all 12 handled", |s| {
        total(s, "rx_packets") == 12
            && total(s, "tx_packets") + total(s, "drops.session_limit") == 12
    });
    assert_eq!(total(&stats, "drops.session_limit"), 7);
    assert_eq!(total(&stats, "tx_packets"), 5);
    assert_eq!(total(&stats, "sessions_active"), 5);
    // Existing sessions keep working at the limit.
    c.send_to(&quic_short(0, b"again"), target).unwrap();
    wait_until(WAIT, "6 datagrams at the backend", || a.count() == 6);
    assert_eq!(total(&proxy.stats(), "drops.session_limit"), 7);
}

#[test]
fn idle_sessions_expire_and_free_their_place() {
    let a = Backend::start("a");
    let cfg = config(
        "dissector = \"quic\"\nsession_idle = \"1s\"\nmax_sessions = 3\n\
         [listener.admission]\nmax_embryonic = 3",
        &[&a],
    )
    .replace("workers = \"auto\"", "workers = 1");
    let proxy = Proxy::start(Path::new(BIN), &cfg);
    let target = proxy.addr("quic");
    let c = client();
    for cid in 0..3u64 {
        c.send_to(&quic_short(cid, b"x"), target).unwrap();
    }
    proxy.wait_stats(WAIT, "3 sessions", |s| total(s, "sessions_active") == 3);
    let stats = proxy.wait_stats(WAIT, "sessions expired", |s| {
        total(s, "sessions_expired") == 3
    });
    assert_eq!(total(&stats, "sessions_active"), 0);
    // The freed places take new flows.
    for cid in 10..13u64 {
        c.send_to(&quic_short(cid, b"y"), target).unwrap();
    }
    wait_until(WAIT, "new flows forwarded", || a.count() == 6);
    assert_eq!(total(&proxy.stats(), "drops.session_limit"), 0);
}

#[test]
fn bytes_dissector_keys_on_the_configured_range() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let cfg = config(
        "dissector = \"bytes\"\ncid_offset = 4\ncid_len = 4",
        &[&a, &b],
    );
    let proxy = Proxy::start(Path::new(BIN), &cfg);
    let target = proxy.addr("quic");
    // 50 flows, each sent from 3 different client sockets with varying
    // bytes outside the key: one session per flow.
    let clients: Vec<UdpSocket> = (0..3).map(|_| client()).collect();
    for flow in 0..50u32 {
        for (i, c) in clients.iter().enumerate() {
            let mut d = vec![i as u8, 0xee, 0xee, 0xee];
            d.extend_from_slice(&flow.to_be_bytes());
            d.extend_from_slice(&[i as u8; 5]);
            c.send_to(&d, target).unwrap();
        }
    }
    wait_until(WAIT, "150 datagrams", || a.count() + b.count() == 150);
    let mut by_flow: HashMap<[u8; 4], HashSet<SocketAddr>> = HashMap::new();
    for backend in [&a, &b] {
        for s in backend.seen() {
            by_flow
                .entry(s.payload[4..8].try_into().unwrap())
                .or_default()
                .insert(s.from);
        }
    }
    assert_eq!(by_flow.len(), 50);
    // Different client sockets may land on different workers (each then
    // has its own session until connection affinity steers them), but
    // one backend per flow is the fleet-wide rule.
    let maglev = Maglev::new(&[(a.addr.to_string(), 1), (b.addr.to_string(), 1)], 65537).unwrap();
    for backend in [(&a, 0usize), (&b, 1)] {
        for s in backend.0.seen() {
            assert_eq!(maglev.backend_for(&s.payload[4..8]), backend.1);
        }
    }
    let stats = proxy.stats();
    assert_eq!(total(&stats, "drops.malformed"), 0);
    // Too short for the range: malformed.
    clients[0].send_to(&[1, 2, 3, 4, 5, 6], target).unwrap();
    proxy.wait_stats(WAIT, "short datagram malformed", |s| {
        total(s, "drops.malformed") == 1
    });
}

#[test]
fn tuple_dissector_is_one_session_per_client_address() {
    let a = Backend::start("a");
    let cfg = config("dissector = \"tuple\"", &[&a]);
    let proxy = Proxy::start(Path::new(BIN), &cfg);
    let target = proxy.addr("quic");
    let clients: Vec<UdpSocket> = (0..4).map(|_| client()).collect();
    for round in 0..5u8 {
        for c in &clients {
            // Payloads of any shape, empty included: no connection ID needed.
            c.send_to(&vec![round; round as usize], target).unwrap();
        }
    }
    wait_until(WAIT, "20 datagrams", || a.count() == 20);
    let froms: HashSet<SocketAddr> = a.seen().iter().map(|s| s.from).collect();
    assert_eq!(froms.len(), 4, "one upstream socket per client address");
    let stats = proxy.wait_stats(WAIT, "replies", |s| total(s, "replies_out") == 20);
    assert_eq!(total(&stats, "sessions_created"), 4);
    assert_eq!(total(&stats, "drops.malformed"), 0);
}

#[test]
fn a_wildcard_listener_replies_from_the_address_the_client_wrote_to() {
    let a = Backend::start("a");
    let cfg = config("dissector = \"quic\"", &[&a])
        .replace("bind = \"127.0.0.1:0\"", "bind = \"0.0.0.0:0\"");
    let proxy = Proxy::start(Path::new(BIN), &cfg);
    let port = proxy.addr("quic").port();
    for (i, local) in ["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().enumerate() {
        let c = client();
        let target: SocketAddr = format!("{local}:{port}").parse().unwrap();
        c.send_to(&quic_short(50 + i as u64, b"where"), target)
            .unwrap();
        let mut buf = [0u8; 64];
        let (_, from) = c.recv_from(&mut buf).expect("reply");
        assert_eq!(
            from, target,
            "the reply must come from the address the client used"
        );
    }
}

/// A QUIC server sends a flight as one GSO message. The proxy reads it as
/// one buffer (GRO) and sends it on to the client as one message (GSO); the
/// client sees the datagrams, whole and in order, and every counter counts
/// datagrams. A client's run is forwarded the same way. With
/// `offload = "off"` the same datagrams go one by one.
#[test]
fn a_backends_segmented_flight_reaches_the_client_whole_and_goes_on_segmented() {
    for offload in ["auto", "off"] {
        let backend = bind_udp("127.0.0.1:0");
        backend.set_read_timeout(Some(WAIT)).unwrap();
        let top = format!("workers = 1\noffload = \"{offload}\"\nupstream_send = \"socket\"");
        let addr = backend.local_addr().unwrap();
        let proxy = Proxy::start(
            Path::new(BIN),
            &listener_config(&top, "dissector = \"tuple\"", &[addr]),
        );
        let target = proxy.addr("quic");
        let c = client();
        c.send_to(b"get", target).unwrap();
        let mut buf = vec![0u8; 65536];
        let (n, upstream) = backend.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"get");

        // Nine of 1350 bytes and a last of 200, each its own bytes.
        let flight: Vec<Vec<u8>> = (0..10u8)
            .map(|i| vec![i + 1; if i == 9 { 200 } else { 1350 }])
            .collect();
        let refs: Vec<&[u8]> = flight.iter().map(Vec::as_slice).collect();
        send_segmented(&backend, upstream, &refs).unwrap();
        let got: Vec<Vec<u8>> = (0..10)
            .map(|_| {
                let n = c.recv(&mut buf).expect("every datagram of the flight");
                buf[..n].to_vec()
            })
            .collect();
        assert_eq!(got, flight, "offload = {offload}");
        let s = proxy.wait_stats(WAIT, "the flight counted", |s| {
            total(s, "replies_out") >= 10
        });
        assert_eq!(total(&s, "replies_in"), 10, "datagrams, not buffers");
        assert_eq!(total(&s, "replies_out"), 10);
        let on = offload == "auto";
        assert_eq!(total(&s, "rx_gro_buffers"), u64::from(on), "{offload}");
        assert_eq!(total(&s, "tx_gso_messages"), u64::from(on), "{offload}");
        assert_eq!(total(&s, "tx_gso_datagrams"), 10 * u64::from(on));

        // The client's run of four, forwarded.
        let run: Vec<Vec<u8>> = (0..4u8).map(|i| vec![b'a' + i; 1200]).collect();
        let refs: Vec<&[u8]> = run.iter().map(Vec::as_slice).collect();
        send_segmented(&c, target, &refs).unwrap();
        let got: Vec<Vec<u8>> = (0..4)
            .map(|_| {
                let (n, from) = backend.recv_from(&mut buf).unwrap();
                assert_eq!(from, upstream, "the path's own socket");
                buf[..n].to_vec()
            })
            .collect();
        assert_eq!(got, run, "offload = {offload}");
        let s = proxy.wait_stats(WAIT, "the run counted", |s| total(s, "tx_packets") >= 5);
        assert_eq!(total(&s, "tx_packets"), 5);
        assert_eq!(total(&s, "tx_gso_messages"), 2 * u64::from(on));
        assert_eq!(total(&s, "tx_gso_datagrams"), 14 * u64::from(on));
    }
}

/// `proxy_protocol = "v2"`: every datagram reaches the backend after a
/// PROXY v2 header naming the client that sent it (each client its own
/// address) and the listener address it reached; the backend's replies,
/// without one, reach each client. One the header would take past the
/// largest datagram the path carries is dropped and counted as proxy_mtu.
#[test]
fn proxy_v2_headers_tell_the_backend_each_client_and_replies_come_back_bare() {
    use udpshard_shared::proxy_v2::{parse, Parsed};
    let backend = bind_udp("127.0.0.1:0");
    backend
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let proxy = Proxy::start(
        Path::new(BIN),
        &listener_config(
            "workers = 2",
            "dissector = \"tuple\"\nproxy_protocol = \"v2\"",
            &[backend.local_addr().unwrap()],
        ),
    );
    let target = proxy.addr("quic");
    let clients: Vec<UdpSocket> = ["127.0.0.2:0", "127.0.0.3:0", "127.0.0.1:0"]
        .iter()
        .map(|a| {
            let c = bind_udp(a);
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c
        })
        .collect();
    let mut buf = vec![0u8; 65_536];
    for round in 0..4 {
        for (i, c) in clients.iter().enumerate() {
            c.send_to(format!("query {round} from {i}").as_bytes(), target)
                .unwrap();
        }
        for _ in 0..clients.len() {
            let (n, path) = backend.recv_from(&mut buf).unwrap();
            let (parsed, len) = parse(&buf[..n]).expect("a PROXY v2 header");
            let Parsed::Proxy { client, reached } = parsed else {
                panic!("{parsed:?}");
            };
            assert_eq!(reached, target);
            let i = clients
                .iter()
                .position(|c| c.local_addr().unwrap() == client)
                .unwrap_or_else(|| panic!("{client} is none of the clients"));
            assert_eq!(
                &buf[len..n],
                format!("query {round} from {i}").as_bytes(),
                "the datagram follows its header whole"
            );
            let answer = format!("answer {round} to {i}");
            backend.send_to(answer.as_bytes(), path).unwrap();
        }
        for (i, c) in clients.iter().enumerate() {
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!(from, target);
            assert_eq!(&buf[..n], format!("answer {round} to {i}").as_bytes());
        }
    }
    let stats = proxy.wait_stats(WAIT, "12 forwards and 12 replies", |s| {
        total(s, "tx_packets") == 12 && total(s, "replies_out") == 12
    });
    // Each on the wire with its 28 bytes of header.
    let body: u64 = (0..4)
        .flat_map(|r| (0..3).map(move |i| format!("query {r} from {i}").len() as u64))
        .sum();
    assert_eq!(total(&stats, "tx_bytes"), body + 12 * 28, "{stats:#}");

    // 65,479 bytes and a 28-byte header are the most one IPv4 datagram
    // holds (65,507): it goes; one byte more cannot, and is counted.
    let c = &clients[0];
    c.send_to(&vec![b'x'; 65_480], target).unwrap();
    c.send_to(&vec![b'y'; 65_479], target).unwrap();
    let (n, _) = backend.recv_from(&mut buf).unwrap();
    assert_eq!(n, 65_507);
    assert!(buf[28..n].iter().all(|&b| b == b'y'));
    let stats = proxy.wait_stats(WAIT, "one proxy_mtu drop", |s| {
        total(s, "drops.proxy_mtu") == 1 && total(s, "tx_packets") == 13
    });
    assert_eq!(total(&stats, "drops.malformed"), 0, "{stats:#}");
    // Where the workers could open their raw socket (root here), every
    // forward left through it, header and all.
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .is_ok();
    if raw {
        assert_eq!(total(&stats, "tx_raw"), 13, "{stats:#}");
    }
}
