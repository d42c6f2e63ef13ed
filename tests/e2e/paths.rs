//! End to end: upstream paths at scale. Ports come from `upstream_ports`,
//! not the kernel's ephemeral range; each (source, port) serves one path
//! per backend; exhaustion is counted and costs no socket; freed ports wait
//! out `port_reuse_delay`; a spoofed datagram gets a path of its own and
//! cannot redirect a session; the fd limit is raised or its fix logged.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use udpshard_shared::procnet::udp_sockets;
use udpshard_tests::harness::{
    bind_udp, field_of, listener_config, quic_short, total, wait_until, write_config, Backend,
    Proxy,
};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
const WAIT: Duration = Duration::from_secs(30);

fn worker_pids(proxy: &Proxy) -> Vec<u32> {
    proxy.stats()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| field_of(w, "pid") as u32)
        .collect()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Local addresses of the UDP sockets `pids` hold (from /proc/PID/fd and
/// /proc/net/udp), with how many sockets are bound to each.
fn bound_addresses(pids: &[u32]) -> HashMap<SocketAddr, usize> {
    let mut inodes = HashSet::new();
    for pid in pids {
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for e in dir.flatten() {
                if let Ok(target) = std::fs::read_link(e.path()) {
                    let t = target.to_string_lossy().to_string();
                    if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']'))
                    {
                        inodes.extend(ino.parse::<u64>());
                    }
                }
            }
        }
    }
    let mut out = HashMap::new();
    for e in udp_sockets() {
        if inodes.contains(&e.inode) {
            *out.entry(e.local).or_insert(0) += 1;
        }
    }
    out
}

/// Sends one datagram for every CID in `cids` from `clients` (round
/// robin) in bursts, each sent once the replies to the one before came
/// back (so no socket buffer on the way overflows), and returns how many
/// replies each CID got.
fn round(
    clients: &[UdpSocket],
    target: SocketAddr,
    cids: std::ops::Range<u64>,
    tag: &[u8],
) -> HashMap<u64, usize> {
    const BURST: usize = 256;
    let mut replies: HashMap<u64, usize> = HashMap::new();
    let mut got = 0;
    let mut sent = 0;
    let mut buf = [0u8; 256];
    let mut drain = |replies: &mut HashMap<u64, usize>, got: &mut usize| {
        for c in clients {
            while let Ok((n, _)) = c.recv_from(&mut buf) {
                if n >= 11 {
                    let cid = u64::from_be_bytes(buf[3..11].try_into().unwrap());
                    *replies.entry(cid).or_insert(0) += 1;
                    *got += 1;
                }
            }
        }
    };
    let all: Vec<u64> = cids.collect();
    for burst in all.chunks(BURST) {
        for (i, cid) in burst.iter().enumerate() {
            let c = &clients[(sent + i) % clients.len()];
            c.send_to(&quic_short(*cid, tag), target).unwrap();
        }
        sent += burst.len();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got < sent && Instant::now() < deadline {
            drain(&mut replies, &mut got);
            if got < sent {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    replies
}

fn clients(n: usize) -> Vec<UdpSocket> {
    (0..n)
        .map(|_| {
            let c = bind_udp("127.0.0.1:0");
            c.set_nonblocking(true).unwrap();
            c
        })
        .collect()
}

#[test]
fn forty_thousand_sessions_on_ports_outside_the_ephemeral_range() {
    const SESSIONS: u64 = 40_000;
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let proxy = Proxy::start(
        Path::new(BIN),
        &listener_config(
            "workers = 2",
            // One client address stands for 40,000 clients here.
            "dissector = \"quic\"\nupstream_ports = \"1025-32767\"\nmax_sessions = 100000\n\
             [listener.admission]\nnew_sessions_per_source = 0",
            &[a.addr, b.addr],
        ),
    );
    let target = proxy.addr("quic");
    let cl = clients(64);
    let replies = round(&cl, target, 0..SESSIONS, b"x");
    let missing: Vec<u64> = (0..SESSIONS)
        .filter(|c| replies.get(c) != Some(&1))
        .collect();
    assert!(
        missing.is_empty(),
        "{} flows without their reply, e.g. {:?}; stats {:#}",
        missing.len(),
        &missing[..missing.len().min(5)],
        proxy.stats()
    );
    // More sessions than the kernel's ephemeral range has ports, and a
    // program started meanwhile still gets one.
    let other = UdpSocket::bind("127.0.0.1:0").expect("another program's socket");
    other
        .connect("127.0.0.1:9")
        .expect("its connect() autobinds");
    assert!(other.local_addr().unwrap().port() >= 32768);
    let stats = proxy.wait_stats(WAIT, "every session counted", |s| {
        total(s, "sessions_active") == SESSIONS
    });
    assert_eq!(total(&stats, "drops.no_port"), 0);
    // Each (source, port) serves one path per backend: about half as many
    // sockets as sessions.
    let sockets = total(&stats, "upstream_sockets");
    assert!(
        sockets < SESSIONS * 6 / 10,
        "{sockets} upstream sockets for {SESSIONS} sessions over 2 backends"
    );
    // No two sockets bound to one address, and none in the ephemeral range.
    let pids = worker_pids(&proxy);
    let listener = proxy.addr("quic").port();
    for (local, n) in bound_addresses(&pids) {
        let port = local.port();
        if port == listener {
            // The listener's reuseport group: one socket per worker.
            continue;
        }
        assert_eq!(n, 1, "{local} bound {n} times");
        assert!(port <= 32767, "{local} in the ephemeral range");
    }
    // And no 4-tuple served two sessions: each (backend, proxy address)
    // pair carried one CID.
    let mut tuples: HashMap<(String, SocketAddr), u64> = HashMap::new();
    for backend in [&a, &b] {
        for seen in backend.seen() {
            let cid = u64::from_be_bytes(seen.payload[1..9].try_into().unwrap());
            let prev = tuples.insert((backend.name.clone(), seen.from), cid);
            assert!(
                prev.is_none_or(|p| p == cid),
                "{:?} carried CIDs {prev:?} and {cid}",
                seen.from
            );
        }
    }
    assert_eq!(tuples.len() as u64, SESSIONS);
}

#[test]
fn exhaustion_is_counted_as_no_port_and_opens_no_socket() {
    let a = Backend::start("a");
    let proxy = Proxy::start(
        Path::new(BIN),
        &listener_config(
            "workers = 1",
            "dissector = \"quic\"\nupstream_ports = \"31000-31009\"",
            &[a.addr],
        ),
    );
    let target = proxy.addr("quic");
    let cl = clients(1);
    let served = round(&cl, target, 0..10, b"in");
    assert_eq!(served.len(), 10, "ten ports, one backend: ten sessions");
    let pid = worker_pids(&proxy)[0];
    let fds = fd_count(pid);
    // Then every new flow is refused, counted exactly, with no socket.
    for cid in 100..150u64 {
        cl[0].send_to(&quic_short(cid, b"out"), target).unwrap();
    }
    let stats = proxy.wait_stats(WAIT, "50 refusals", |s| total(s, "drops.no_port") == 50);
    assert_eq!(total(&stats, "sessions_active"), 10);
    assert_eq!(fd_count(pid), fds, "refused flows opened descriptors");
    assert_eq!(a.count(), 10);
    // The live sessions are still served.
    assert_eq!(round(&cl, target, 0..10, b"again").len(), 10);
    proxy.wait_log(
        "capacity 1 sources x 10 ports x 1 backends = 10 paths",
        WAIT,
    );
}

/// Ports of `upstream_ports` that another program holds are named at
/// start and skipped: each new flow gets a free port, and only when none
/// is left are flows refused, counted as no_port.
#[test]
fn ports_another_program_holds_are_named_at_start_and_skipped() {
    let a = Backend::start("a");
    // Held on the wildcard address: the proxy's bind of 127.0.0.1 on the
    // same port collides.
    let held: Vec<UdpSocket> = [61502u16, 61505, 61508]
        .iter()
        .map(|p| UdpSocket::bind(("0.0.0.0", *p)).expect("a port of the test's own range"))
        .collect();
    let proxy = Proxy::start(
        Path::new(BIN),
        &listener_config(
            "workers = 1",
            "dissector = \"quic\"\nupstream_ports = \"61500-61509\"",
            &[a.addr],
        ),
    );
    let log = proxy.wait_log(
        "3 port(s) of upstream_ports are held by other programs",
        WAIT,
    );
    let line = log
        .lines()
        .find(|l| l.contains("held by other programs"))
        .unwrap();
    for p in ["0.0.0.0:61502", "0.0.0.0:61505", "0.0.0.0:61508"] {
        assert!(line.contains(p), "{line}");
    }
    let target = proxy.addr("quic");
    let cl = clients(1);
    let served = round(&cl, target, 0..7, b"in");
    assert_eq!(
        served.len(),
        7,
        "seven free ports, one backend: seven sessions"
    );
    let ports: HashSet<u16> = a.seen().iter().map(|s| s.from.port()).collect();
    assert_eq!(ports.len(), 7, "{ports:?}");
    assert!(
        ports
            .iter()
            .all(|p| (61500..=61509).contains(p) && ![61502, 61505, 61508].contains(p)),
        "{ports:?}"
    );
    // Every free port serves an answered session: the next flows are
    // refused, counted, and the live sessions are served on.
    for cid in 7..10u64 {
        cl[0].send_to(&quic_short(cid, b"more"), target).unwrap();
    }
    let stats = proxy.wait_stats(WAIT, "three refusals", |s| total(s, "drops.no_port") == 3);
    assert_eq!(total(&stats, "sessions_active"), 7);
    assert_eq!(round(&cl, target, 0..7, b"again").len(), 7);
    drop(held);
}

#[test]
fn a_freed_port_waits_out_the_reuse_delay_toward_its_backend() {
    let a = Backend::start("a");
    let proxy = Proxy::start(
        Path::new(BIN),
        &listener_config(
            "workers = 1",
            "dissector = \"quic\"\nupstream_ports = \"31500-31500\"\nsession_idle = \"1s\"\nport_reuse_delay = \"3s\"",
            &[a.addr],
        ),
    );
    let target = proxy.addr("quic");
    let c = bind_udp("127.0.0.1:0");
    c.send_to(&quic_short(1, b"first"), target).unwrap();
    wait_until(WAIT, "the first session", || a.count() == 1);
    let port = a.seen()[0].from.port();
    assert_eq!(port, 31500);
    let stats = proxy.wait_stats(WAIT, "it expires", |s| total(s, "sessions_expired") == 1);
    let expired_at = Instant::now();
    assert_eq!(total(&stats, "sessions_active"), 0);
    // The one port is cooling toward the backend: a new flow is refused.
    c.send_to(&quic_short(2, b"too soon"), target).unwrap();
    proxy.wait_stats(WAIT, "refused", |s| total(s, "drops.no_port") == 1);
    // Until the delay has passed (a refusal is remembered for a second, so
    // use a new flow each time).
    let mut cid = 3;
    while a.count() < 2 {
        assert!(
            expired_at.elapsed() < Duration::from_secs(10),
            "never reused"
        );
        c.send_to(&quic_short(cid, b"later"), target).unwrap();
        cid += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        expired_at.elapsed() >= Duration::from_millis(1800),
        "reused {:?} after the expiry",
        expired_at.elapsed()
    );
    assert_eq!(a.seen()[1].from.port(), 31500);
}

#[test]
fn a_spoofed_datagram_gets_its_own_path_and_cannot_redirect_the_session() {
    let backend = bind_udp("127.0.0.1:0");
    backend
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let proxy = Proxy::start(
        Path::new(BIN),
        &listener_config(
            "workers = 1",
            "dissector = \"quic\"\nsession_idle = \"60s\"\npath_idle = \"2s\"",
            &[backend.local_addr().unwrap()],
        ),
    );
    let target = proxy.addr("quic");
    let real = bind_udp("127.0.0.1:0");
    real.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let spoofer = bind_udp("127.0.0.2:0");
    spoofer
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 128];

    real.send_to(&quic_short(42, b"hello"), target).unwrap();
    let (_, real_path) = backend.recv_from(&mut buf).unwrap();
    // One datagram with the live CID from another address.
    spoofer.send_to(&quic_short(42, b"spoof"), target).unwrap();
    let (_, spoof_path) = backend.recv_from(&mut buf).unwrap();
    assert_ne!(
        real_path, spoof_path,
        "the backend sees a new peer: it validates it"
    );
    // The backend answers on the real client's path: it reaches the real
    // client, and nothing reaches the spoofer.
    backend
        .send_to(b"\x40for the real client", real_path)
        .unwrap();
    let (n, _) = real.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"\x40for the real client");
    assert!(
        spoofer.recv_from(&mut buf).is_err(),
        "the spoofer got a reply"
    );
    // A real move to a new port: the backend's reply on the new path
    // reaches the new address.
    let moved = bind_udp("127.0.0.1:0");
    moved
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    moved.send_to(&quic_short(42, b"moved"), target).unwrap();
    let (_, moved_path) = backend.recv_from(&mut buf).unwrap();
    assert!(moved_path != real_path && moved_path != spoof_path);
    backend.send_to(b"\x40to the new port", moved_path).unwrap();
    let (n, _) = moved.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"\x40to the new port");
    let stats = proxy.stats();
    assert_eq!(total(&stats, "sessions_created"), 1);
    assert_eq!(total(&stats, "paths_created"), 3);
    // The quiet paths (the first address's, the spoofer's) close after
    // path_idle; the session lives on with the moved client's.
    let deadline = Instant::now() + WAIT;
    loop {
        moved
            .send_to(&quic_short(42, b"keepalive"), target)
            .unwrap();
        if total(&proxy.stats(), "paths_active") == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle paths never closed: {:#}",
            proxy.stats()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(total(&proxy.stats(), "sessions_active"), 1);
}

#[test]
fn under_a_low_fd_limit_it_raises_it_or_logs_the_fix() {
    let a = Backend::start("a");
    // max_sessions that need more descriptors than 1024.
    let text = listener_config(
        "workers = 1",
        "dissector = \"quic\"\nmax_sessions = 4000",
        &[a.addr],
    );
    let (dir, config_path, stats_file) = write_config(&text);
    let hard: u64 = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1;
    // Soft and hard at 1024: nothing to raise to; the log says what to do.
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!(
        "ulimit -n 1024 && exec '{BIN}' run --config '{}'",
        config_path.display()
    ));
    let proxy = Proxy::spawn(cmd, Path::new(BIN), dir, config_path, stats_file);
    proxy.wait_log(
        "RLIMIT_NOFILE is 1024, but max_sessions can need 9024 descriptors",
        WAIT,
    );
    proxy.wait_log("fix: ulimit -Hn 9024 && ulimit -n 9024", WAIT);
    drop(proxy);
    // Soft 1024 under a higher hard limit: raised, no finding.
    if hard >= 9024 {
        let (dir, config_path, stats_file) = write_config(&text);
        let mut cmd = Command::new("bash");
        cmd.arg("-c").arg(format!(
            "ulimit -S -n 1024 && exec '{BIN}' run --config '{}'",
            config_path.display()
        ));
        let proxy = Proxy::spawn(cmd, Path::new(BIN), dir, config_path, stats_file);
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let soft: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
        assert!(soft >= 9024, "{line}");
        assert!(!proxy.log().contains("RLIMIT_NOFILE"), "{}", proxy.log());
    }
}

/// The raw sockets process `pid` holds: (IPv4, IPv6).
fn raw_sockets_of(pid: u32) -> (usize, usize) {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let count = |table: &str| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter(|l| {
                l.split_whitespace()
                    .nth(9)
                    .is_some_and(|inode| inodes.contains(inode))
            })
            .count()
    };
    (count("/proc/net/raw"), count("/proc/net/raw6"))
}

#[test]
fn a_worker_holds_a_raw_socket_only_where_forwards_use_it_and_only_of_its_backends_family() {
    let backend = Backend::start("a");
    let start = |send: &str| {
        Proxy::start(
            Path::new(BIN),
            &listener_config(
                &format!("workers = 1\nupstream_send = \"{send}\""),
                "dissector = \"quic\"",
                &[backend.addr],
            ),
        )
    };
    if !may_send_raw(socket2::Domain::IPV4) {
        eprintln!("skipped: no CAP_NET_RAW here, so no worker could hold a raw socket");
        return;
    }
    let socket = start("socket");
    for pid in worker_pids(&socket) {
        assert_eq!(raw_sockets_of(pid), (0, 0), "upstream_send = socket");
    }
    drop(socket);
    let auto = start("auto");
    for pid in worker_pids(&auto) {
        // An IPv4 backend only: no IPv6 raw socket, though one could open.
        assert_eq!(raw_sockets_of(pid), (1, 0), "upstream_send = auto");
    }
}

/// The value of line `name` (with its colon) of a `/proc/PID/status` text.
fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    let line = status.lines().find(|l| l.starts_with(name)).unwrap();
    line[name.len()..].trim()
}

/// Capabilities in a `/proc/PID/status` line's hex set.
fn cap_set(status: &str, name: &str) -> u64 {
    u64::from_str_radix(status_field(status, name), 16).unwrap()
}

/// `n` loopback client sockets whose reads wait up to 5 s.
fn waiting_clients(n: usize) -> Vec<UdpSocket> {
    (0..n)
        .map(|_| {
            let c = bind_udp("127.0.0.1:0");
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c
        })
        .collect()
}

/// Whether this process may open a raw socket of `domain` (CAP_NET_RAW),
/// as the proxy's workers, started by it, then may too.
fn may_send_raw(domain: socket2::Domain) -> bool {
    socket2::Socket::new(
        domain,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .is_ok()
}

/// One datagram from each client (CID = its index) to `target`; returns, per
/// CID, the address each backend saw it come from (the path's 4-tuple).
fn paths_seen(
    proxy: &Proxy,
    clients: &[UdpSocket],
    backends: &[&UdpSocket],
    tag: &[u8],
) -> HashMap<u64, SocketAddr> {
    let target = proxy.addr("quic");
    for (i, c) in clients.iter().enumerate() {
        c.send_to(&quic_short(i as u64, tag), target).unwrap();
    }
    let mut seen = HashMap::new();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + WAIT;
    while seen.len() < clients.len() && Instant::now() < deadline {
        for b in backends {
            if let Ok((n, from)) = b.recv_from(&mut buf) {
                assert!(buf[..n].ends_with(tag), "{:?}", &buf[..n]);
                let cid = u64::from_be_bytes(buf[1..9].try_into().unwrap());
                assert_eq!(seen.insert(cid, from), None, "CID {cid} arrived twice");
            }
        }
    }
    assert_eq!(
        seen.len(),
        clients.len(),
        "not every datagram arrived; stats {:#}\nlog:\n{}",
        proxy.stats(),
        proxy.log()
    );
    seen
}

/// Each backend answers on every path it saw; each client gets its answer.
fn answer_on(paths: &HashMap<u64, SocketAddr>, backends: &[&UdpSocket], clients: &[UdpSocket]) {
    for (cid, path) in paths {
        let b = backends
            .iter()
            .find(|b| b.local_addr().unwrap().is_ipv4() == path.is_ipv4())
            .unwrap();
        b.send_to(format!("\x40answer {cid}").as_bytes(), path)
            .unwrap();
    }
    let mut buf = [0u8; 256];
    for (i, c) in clients.iter().enumerate() {
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("\x40answer {i}").as_bytes());
    }
}

#[test]
fn forwards_leave_from_their_paths_address_whether_sent_raw_or_on_their_socket() {
    let v4 = bind_udp("127.0.0.1:0");
    v4.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    // IPv6 too where the host has ::1.
    let v6 = UdpSocket::bind("[::1]:0").ok();
    if let Some(v6) = &v6 {
        v6.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
    }
    let backends: Vec<&UdpSocket> = std::iter::once(&v4).chain(v6.as_ref()).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.local_addr().unwrap()).collect();
    // Ports of its own, outside the kernel's ephemeral range and away from
    // the 40,000-session test's 1025-32767, which may hold most of those
    // while this runs beside it.
    let config = |send: &str| {
        listener_config(
            &format!("workers = 1\nupstream_send = \"{send}\""),
            "dissector = \"quic\"\nupstream_ports = \"61100-61199\"",
            &addrs,
        )
    };
    let proxy = Proxy::start(Path::new(BIN), &config("auto"));
    let clients = waiting_clients(24);

    let first = paths_seen(&proxy, &clients, &backends, b"one");
    for path in first.values() {
        assert!(
            (61100..=61199).contains(&path.port()),
            "{path} is not from upstream_ports"
        );
    }
    if v6.is_some() {
        assert!(first.values().any(|p| p.is_ipv6()) && first.values().any(|p| p.is_ipv4()));
    }
    answer_on(&first, &backends, &clients);
    // Each family goes raw where its raw socket opens.
    let raw = first
        .values()
        .filter(|p| {
            may_send_raw(if p.is_ipv4() {
                socket2::Domain::IPV4
            } else {
                socket2::Domain::IPV6
            })
        })
        .count() as u64;
    // A worker publishes its counters after the sends of an iteration.
    let stats = proxy.wait_stats(WAIT, "24 forwards and 24 replies counted", |s| {
        total(s, "tx_packets") == 24 && total(s, "replies_out") == 24
    });
    assert_eq!(total(&stats, "tx_raw"), raw, "{stats:#}");
    // The workers hold their raw sockets, and no power at all: no
    // capability in any set (the bounding set too, where they may clear it:
    // started with CAP_SETPCAP, as this test's own set says), and
    // no_new_privs.
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let setpcap = cap_set(&own, "CapEff:") & (1 << 8) != 0;
    for pid in worker_pids(&proxy) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| status_field(&status, name);
        for set in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
            assert_eq!(cap_set(&status, set), 0, "worker {pid} {set}");
        }
        if setpcap {
            assert_eq!(cap_set(&status, "CapBnd:"), 0);
        }
        assert_eq!(field("NoNewPrivs:"), "1", "worker {pid}");
        // Its own filter, on top of any this test runs under (a container's
        // profile): filters are inherited, and the supervisor adds none.
        let own_filters = own
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
            .map_or(0, |v| v.trim().parse::<u32>().unwrap());
        assert_eq!(field("Seccomp:"), "2", "worker {pid}");
        assert_eq!(
            field("Seccomp_filters:").parse::<u32>().unwrap(),
            own_filters + 1,
            "worker {pid}: its system-call filter"
        );
    }

    // Each forward on its own socket from now on: the same paths, the same
    // 4-tuples, and the answers still come back on them.
    std::fs::write(
        &proxy.config_path,
        config("socket").replace("{stats_file}", &proxy.stats_file.display().to_string()),
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_stats(WAIT, "the worker on the new config", |s| {
        s["workers"][0]["config_generation"] == 2
    });
    let second = paths_seen(&proxy, &clients, &backends, b"two");
    assert_eq!(second, first, "a path's 4-tuple changed with the send mode");
    answer_on(&second, &backends, &clients);
    let stats = proxy.wait_stats(WAIT, "48 forwards and 48 replies counted", |s| {
        total(s, "tx_packets") == 48 && total(s, "replies_out") == 48
    });
    assert_eq!(total(&stats, "tx_raw"), raw, "{stats:#}");
    assert_eq!(total(&stats, "sessions_created"), 24);
    assert_eq!(total(&stats, "drops.upstream"), 0);
}

#[test]
fn started_as_root_with_a_user_every_process_runs_as_that_user_and_workers_hold_nothing() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: changing to user = \"nobody\" takes a start as root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: this host has no user \"nobody\"");
        return;
    };
    let backend = bind_udp("127.0.0.1:0");
    backend
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let backends = [&backend];
    let addrs = [backend.local_addr().unwrap()];
    let config = |user: &str| {
        listener_config(
            &format!("workers = 2\nupstream_send = \"auto\"\nuser = \"{user}\""),
            "dissector = \"quic\"\nupstream_ports = \"61300-61399\"",
            &addrs,
        )
    };
    let proxy = Proxy::start(Path::new(BIN), &config("nobody"));
    let uid = nobody.uid.as_raw();
    proxy.wait_log(
        &format!("running as user nobody (uid {uid}"),
        Duration::from_secs(5),
    );
    let clients = waiting_clients(16);
    let paths = paths_seen(&proxy, &clients, &backends, b"one");
    answer_on(&paths, &backends, &clients);
    let stats = proxy.wait_stats(WAIT, "16 forwards and 16 replies counted", |s| {
        total(s, "tx_packets") == 16 && total(s, "replies_out") == 16
    });
    // Root here, so the workers opened their raw socket before they gave
    // everything up: every forward left as a raw IP packet.
    assert_eq!(total(&stats, "tx_raw"), 16, "{stats:#}");

    let ids = |status: &str, name: &str| -> Vec<u32> {
        status_field(status, name)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    let gid = nobody.gid.as_raw();
    let supervisor = proxy.pid();
    let workers = worker_pids(&proxy);
    assert_eq!(workers.len(), 2);
    for &pid in std::iter::once(&supervisor).chain(&workers) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        // Real, effective, saved and filesystem ids, all four.
        assert_eq!(ids(&status, "Uid:"), [uid; 4], "process {pid}");
        assert_eq!(ids(&status, "Gid:"), [gid; 4], "process {pid}");
        assert!(!ids(&status, "Groups:").contains(&0), "process {pid}");
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "process {pid}");
        if pid == supervisor {
            // CAP_SETPCAP, CAP_NET_BIND_SERVICE and CAP_NET_RAW, for the
            // workers it starts, and nothing else can come back; of them it
            // uses only CAP_NET_BIND_SERVICE itself.
            let kept = 1 << 8 | 1 << 10 | 1 << 13;
            for set in ["CapPrm:", "CapInh:", "CapAmb:", "CapBnd:"] {
                assert_eq!(cap_set(&status, set), kept, "supervisor {set}");
            }
            assert_eq!(cap_set(&status, "CapEff:"), 1 << 10, "supervisor CapEff");
        } else {
            for set in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:", "CapBnd:"] {
                assert_eq!(cap_set(&status, set), 0, "worker {pid} {set}");
            }
        }
    }
    let log = proxy.log();
    assert!(
        log.contains(&format!("workers run as uid {uid} with no capabilities")),
        "{log}"
    );

    // A reload cannot change the user: refused, named, and nothing changes.
    // (The supervisor reads its config as nobody from here on.)
    std::fs::set_permissions(
        proxy.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(
        &proxy.config_path,
        config("root").replace("{stats_file}", &proxy.stats_file.display().to_string()),
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_log(
        "user changed from \"nobody\" to \"root\": a running proxy cannot change its user",
        Duration::from_secs(10),
    );
    let paths = paths_seen(&proxy, &clients, &backends, b"two");
    answer_on(&paths, &backends, &clients);
    let stats = proxy.wait_stats(WAIT, "32 forwards and 32 replies counted", |s| {
        total(s, "tx_packets") == 32 && total(s, "replies_out") == 32
    });
    assert_eq!(total(&stats, "sessions_created"), 16);
    for pid in worker_pids(&proxy) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert_eq!(ids(&status, "Uid:"), [uid; 4], "worker {pid}");
    }
}
