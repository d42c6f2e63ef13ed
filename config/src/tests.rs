use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

/// A valid one-listener config; tests append keys to the listener (line 6).
const BASE: &str = r#"[[listener]]
name = "a"
bind = "127.0.0.1:9000"
dissector = "quic"
backends = ["10.0.0.1:443"]
"#;

fn with(extra: &str) -> String {
    format!("{BASE}{extra}\n")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ok(text: &str) -> Config {
    parse(text, "t.toml").unwrap_or_else(|e| panic!("unexpected error: {e}"))
}

/// Asserts the first error is at `line:col` and its message contains `needle`.
#[track_caller]
fn assert_err(text: &str, line: usize, col: usize, needle: &str) {
    let e = match parse(text, "t.toml") {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    };
    let message = e.message().unwrap().to_owned();
    assert_eq!((e.line(), e.col()), (Some(line), Some(col)), "{e}");
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    let shown = e.to_string();
    assert_eq!(shown, format!("t.toml:{line}:{col}: {message}"));
    assert!(!shown.contains('\n'), "{shown:?} spans lines");
}

#[test]
fn default_parses() {
    let parsed = parse(DEFAULT_CONFIG_TOML, DEFAULT_CONFIG_ORIGIN).unwrap();
    let expected = Config {
        workers: Workers::Auto,
        stats_file: PathBuf::from(DEFAULT_STATS_FILE),
        drain_timeout: Duration::from_secs(5),
        withdraw_delay: Duration::ZERO,
        readiness: Readiness::Serving,
        upgrade_timeout: Duration::from_secs(30),
        upstream_send: UpstreamSend::Auto,
        offload: Offload::Auto,
        syscall_filter: true,
        user: None,
        metrics: None,
        listeners: vec![Listener {
            name: "quic".into(),
            bind: sa("127.0.0.1:4433"),
            dissector: Dissector::Quic { short_cid_len: 8 },
            steering: Steering::Auto,
            recv_buffer: 4 << 20,
            session_idle: Duration::from_secs(60),
            max_sessions: 10_000,
            maglev_table_size: 65_537,
            quic_lb: None,
            migration: Migration::Path,
            proxy_protocol: ProxyProtocol::Off,
            session_log: 0,
            queue_delay: true,
            path_idle: Duration::from_secs(30),
            max_paths: 4,
            upstream_sources: vec![],
            upstream_ports: Some((20000, 29999)),
            port_reuse_delay: Duration::from_secs(60),
            fall: 3,
            reply_timeout: Duration::from_secs(1),
            revive_after: Duration::from_secs(10),
            on_backend_down: OnBackendDown::Keep,
            max_ejection_percent: 50,
            health: None,
            admission: Admission {
                max_embryonic: 2_500,
                embryonic_timeout: Duration::from_secs(10),
                source_prefix_v4: 32,
                source_prefix_v6: 64,
                new_sessions_per_source: 10_000,
                new_sessions_burst: 20_000,
                new_paths_per_source: 2000,
                new_paths_burst: 4000,
                new_paths_per_session: 1,
                new_paths_per_session_burst: 4,
            },
            backends: vec![
                Backend {
                    addr: sa("127.0.0.1:4434"),
                    weight: 1,
                    server_id: None,
                },
                Backend {
                    addr: sa("127.0.0.1:4435"),
                    weight: 1,
                    server_id: None,
                },
            ],
        }],
    };
    assert_eq!(parsed, expected);
    assert_eq!(default_config(), expected);
}

#[test]
fn full_example() {
    let c = ok(r#"
workers = 4
stats_file = "/var/run/udpshard.stats"

[[listener]]
name = "edge-v6.1"
bind = "[::1]:8443"
dissector = "bytes"
cid_offset = 0
cid_len = 20
steering = "kernel-cid"
recv_buffer = 65536
session_idle = "500000ms"
max_sessions = 100_000_000
maglev_table_size = 101
backends = [
  { addr = "[2001:db8::1]:443", weight = 1000 },
  "192.0.2.7:443",
  { addr = "192.0.2.8:443" },
]

[[listener]]
name = "plain_udp"
bind = "0.0.0.0:0"
dissector = "tuple"
steering = "reshuffle"
recv_buffer = "1GiB"
session_idle = "24h"
maglev_table_size = 10_000_019

  [[listener.backends]]
  addr = "10.1.0.1:53"
  weight = 3

[[listener]]
name = "q"
bind = "0.0.0.0:0"
dissector = "quic"
short_cid_len = 20
recv_buffer = "4KiB"
session_idle = "1s"
backends = ["10.2.0.1:443"]
"#);
    assert_eq!(c.workers, Workers::Count(4));
    assert_eq!(c.stats_file, PathBuf::from("/var/run/udpshard.stats"));
    assert_eq!(c.listeners.len(), 3);

    let l = &c.listeners[0];
    assert_eq!(l.name, "edge-v6.1");
    assert_eq!(l.bind, sa("[::1]:8443"));
    assert_eq!(
        l.dissector,
        Dissector::Bytes {
            cid_offset: 0,
            cid_len: 20
        }
    );
    assert_eq!(l.steering, Steering::KernelCid);
    assert_eq!(l.recv_buffer, 65_536);
    assert_eq!(l.session_idle, Duration::from_millis(500_000));
    assert_eq!(l.max_sessions, 100_000_000);
    assert_eq!(l.maglev_table_size, 101);
    assert_eq!(
        l.backends,
        [
            Backend {
                addr: sa("[2001:db8::1]:443"),
                weight: 1000,
                server_id: None,
            },
            Backend {
                addr: sa("192.0.2.7:443"),
                weight: 1,
                server_id: None,
            },
            Backend {
                addr: sa("192.0.2.8:443"),
                weight: 1,
                server_id: None,
            },
        ]
    );

    let l = &c.listeners[1];
    assert_eq!(l.bind, sa("0.0.0.0:0"));
    assert_eq!(l.dissector, Dissector::Tuple);
    assert_eq!(l.steering, Steering::Reshuffle);
    assert_eq!(l.recv_buffer, 1 << 30);
    assert_eq!(l.session_idle, Duration::from_secs(86_400));
    assert_eq!(l.maglev_table_size, 10_000_019);
    assert_eq!(
        l.backends,
        [Backend {
            addr: sa("10.1.0.1:53"),
            weight: 3,
            server_id: None,
        }]
    );

    let l = &c.listeners[2];
    assert_eq!(l.dissector, Dissector::Quic { short_cid_len: 20 });
    assert_eq!(l.recv_buffer, 4096);
    assert_eq!(l.session_idle, Duration::from_secs(1));
}

#[test]
fn defaults_filled() {
    let c = ok(BASE);
    assert_eq!(c.workers, Workers::Auto);
    assert_eq!(c.stats_file, PathBuf::from(DEFAULT_STATS_FILE));
    let l = &c.listeners[0];
    assert_eq!(l.dissector, Dissector::Quic { short_cid_len: 8 });
    assert_eq!(l.steering, Steering::Auto);
    assert_eq!(l.recv_buffer, 4 * 1024 * 1024);
    assert_eq!(l.session_idle, Duration::from_secs(60));
    assert_eq!(l.max_sessions, 1_000_000);
    assert_eq!(l.maglev_table_size, 65_537);
    assert_eq!(
        l.backends,
        [Backend {
            addr: sa("10.0.0.1:443"),
            weight: 1,
            server_id: None,
        }]
    );
    assert_eq!(l.migration, Migration::Path);
    assert_eq!(l.path_idle, Duration::from_secs(30));
    assert_eq!(l.max_paths, 4);
    assert_eq!(l.upstream_sources, Vec::<std::net::IpAddr>::new());
    assert_eq!(l.upstream_ports, None);
    assert_eq!(l.port_reuse_delay, Duration::from_secs(60));
    // path_idle never outlasts session_idle.
    let short = ok(&with("session_idle = \"10s\""));
    assert_eq!(short.listeners[0].path_idle, Duration::from_secs(10));
}

#[test]
fn paths_and_ports() {
    let c = ok(&with(
        "migration = \"path\"\nmax_paths = 16\npath_idle = \"5s\"\nupstream_sources = [\"10.0.0.5\", \"::1\"]\nupstream_ports = \"1025-32767\"\nport_reuse_delay = \"0s\"",
    ));
    let l = &c.listeners[0];
    assert_eq!(l.max_paths, 16);
    assert_eq!(l.path_idle, Duration::from_secs(5));
    assert_eq!(
        l.upstream_sources,
        vec![
            "10.0.0.5".parse::<std::net::IpAddr>().unwrap(),
            "::1".parse().unwrap()
        ]
    );
    assert_eq!(l.upstream_ports, Some((1025, 32767)));
    assert_eq!(l.port_reuse_delay, Duration::ZERO);
    let follow = ok(&with("migration = \"follow\""));
    assert_eq!(follow.listeners[0].migration, Migration::Follow);
    assert_eq!(follow.listeners[0].max_paths, 1);
    assert_eq!(
        ok(&with("upstream_ports = \"9-9\"")).listeners[0].upstream_ports,
        Some((9, 9))
    );
}

#[test]
fn bad_paths_and_ports() {
    assert_err(
        &with("migration = \"roam\""),
        6,
        13,
        r#"migration = "roam" is invalid"#,
    );
    assert_err(
        &with("migration = \"follow\"\nmax_paths = 2"),
        7,
        13,
        r#"max_paths needs migration = "path""#,
    );
    assert_err(
        &with("max_paths = 0"),
        6,
        13,
        "max_paths = 0 is out of range (1..=16)",
    );
    assert_err(&with("max_paths = 17"), 6, 13, "out of range");
    assert_err(
        &with("path_idle = \"90s\""),
        6,
        13,
        "path_idle = \"90s\" is longer than session_idle",
    );
    assert_err(&with("path_idle = 5"), 6, 13, "has no unit");
    for bad in ["1000", "0-10", "10-9", "1-65536", "a-b", ""] {
        assert_err(
            &with(&format!("upstream_ports = \"{bad}\"")),
            6,
            18,
            &format!("upstream_ports = {bad:?}"),
        );
    }
    assert_err(&with("upstream_ports = 1000"), 6, 18, "");
    assert_err(
        &with("upstream_sources = [\"10.0.0.5\", \"10.0.0.5\"]"),
        6,
        33,
        "upstream_sources lists 10.0.0.5 twice",
    );
    assert_err(
        &with("upstream_sources = [\"host.example\"]"),
        6,
        21,
        r#"upstream_sources entry "host.example" is not an IP address"#,
    );
    assert_err(
        &with("upstream_sources = []"),
        6,
        20,
        "needs 1 to 64 addresses",
    );
    assert_err(
        &with("upstream_sources = [\"::1\"]"),
        6,
        20,
        "backend 10.0.0.1:443 is IPv4, but upstream_sources has no IPv4 address",
    );
    assert_err(
        &with("port_reuse_delay = \"2h\""),
        6,
        20,
        r#"port_reuse_delay = "2h" is out of range (0s..=1h)"#,
    );
}

#[test]
fn size_units() {
    let size = |v: &str| ok(&with(&format!("recv_buffer = {v}"))).listeners[0].recv_buffer;
    assert_eq!(size("4096"), 4096);
    assert_eq!(size("\"64KB\""), 64_000);
    assert_eq!(size("\"2MB\""), 2_000_000);
    assert_eq!(size("\"1GB\""), 1_000_000_000);
    assert_eq!(size("\"8192B\""), 8192);
    assert_eq!(size("\"16 MiB\""), 16 << 20);
}

#[test]
fn duration_units() {
    let idle = |v: &str| ok(&with(&format!("session_idle = \"{v}\""))).listeners[0].session_idle;
    assert_eq!(idle("1000ms"), Duration::from_secs(1));
    assert_eq!(idle("90s"), Duration::from_secs(90));
    assert_eq!(idle("15m"), Duration::from_secs(900));
    assert_eq!(idle("2h"), Duration::from_secs(7200));
}

#[test]
fn unknown_top_level_key() {
    assert_err(
        &format!("workers = 2\nworkerz = 3\n{BASE}"),
        2,
        1,
        "unknown field `workerz`, expected one of `workers`",
    );
}

#[test]
fn unknown_listener_key() {
    assert_err(
        &with("recv_bufer = \"1MiB\""),
        6,
        1,
        "unknown field `recv_bufer`, expected one of `name`",
    );
}

#[test]
fn unknown_backend_table_key() {
    let text = BASE.replace(
        r#"backends = ["10.0.0.1:443"]"#,
        r#"backends = [{ addr = "10.0.0.1:443", wieght = 2 }]"#,
    );
    assert_err(
        &text,
        5,
        38,
        "unknown field `wieght`, expected one of `addr`, `weight`, `server_id`",
    );
}

#[test]
fn type_errors() {
    assert_err(
        &with("max_sessions = \"x\""),
        6,
        16,
        "listener.max_sessions: invalid type: string \"x\", expected an integer",
    );
    assert_err(&with("max_sessions = 1.5"), 6, 16, "expected an integer");
    assert_err(&with("name2 = 1"), 6, 1, "unknown field `name2`");
    assert_err(
        &with("recv_buffer = true"),
        6,
        15,
        "expected an integer or a string",
    );
    assert_err(&with("steering = 1"), 6, 12, "expected a string");
    assert_err(
        &format!("workers = [1]\n{BASE}"),
        1,
        11,
        "workers: invalid type",
    );
    assert_err(
        &BASE.replace(
            "backends = [\"10.0.0.1:443\"]",
            "backends = \"10.0.0.1:443\"",
        ),
        5,
        12,
        "expected an array of backends",
    );
    assert_err(
        &BASE.replace(
            "backends = [\"10.0.0.1:443\"]",
            "backends = [\"10.0.0.1:443\", 7]",
        ),
        5,
        29,
        "expected a backend address string or a table",
    );
    // `[listener]` instead of `[[listener]]` is the likely newcomer mistake.
    assert_err(
        &BASE.replace("[[listener]]", "[listener]"),
        1,
        1,
        "written as [[listener]]",
    );
}

#[test]
fn columns_count_characters_not_bytes() {
    let text = BASE.replace("backends = [\"10.0.0.1:443\"]", "backends = [\"ü\", 7]");
    assert_err(&text, 5, 18, "expected a backend address string");
}

#[test]
fn bad_sizes() {
    assert_err(
        &with("recv_buffer = \"4XB\""),
        6,
        15,
        r#"listener "a": recv_buffer = "4XB" is not a size (expected an integer byte count or "<n>B|KiB|MiB|GiB|KB|MB|GB""#,
    );
    assert_err(&with("recv_buffer = \"4096\""), 6, 15, "is not a size");
    assert_err(&with("recv_buffer = \"4mib\""), 6, 15, "is not a size");
    assert_err(
        &with("recv_buffer = 4095"),
        6,
        15,
        "recv_buffer = 4095 is out of range (4KiB..=1GiB)",
    );
    assert_err(
        &with("recv_buffer = -1"),
        6,
        15,
        "is out of range (4KiB..=1GiB)",
    );
    assert_err(
        &with("recv_buffer = \"2GiB\""),
        6,
        15,
        r#"recv_buffer = "2GiB" is out of range (4KiB..=1GiB)"#,
    );
    assert_err(
        &with("recv_buffer = \"99999999999999999999GiB\""),
        6,
        15,
        "is out of range",
    );
}

#[test]
fn bad_durations() {
    assert_err(
        &with("session_idle = \"60x\""),
        6,
        16,
        r#"listener "a": session_idle = "60x" is not a duration (expected "<n>ms|s|m|h""#,
    );
    assert_err(&with("session_idle = \"1.5s\""), 6, 16, "is not a duration");
    assert_err(
        &with("session_idle = 60"),
        6,
        16,
        "session_idle = 60 has no unit",
    );
    assert_err(
        &with("session_idle = \"999ms\""),
        6,
        16,
        r#"session_idle = "999ms" is out of range (1s..=24h)"#,
    );
    assert_err(
        &with("session_idle = \"25h\""),
        6,
        16,
        "is out of range (1s..=24h)",
    );
}

#[test]
fn out_of_range_values() {
    assert_err(
        &with("short_cid_len = 21"),
        6,
        17,
        r#"listener "a": short_cid_len = 21 is out of range (1..=20)"#,
    );
    assert_err(
        &with("short_cid_len = 0"),
        6,
        17,
        "short_cid_len = 0 is out of range (1..=20)",
    );
    assert_err(
        &with("max_sessions = 0"),
        6,
        16,
        "max_sessions = 0 is out of range (1..=100_000_000)",
    );
    assert_err(
        &with("max_sessions = 100000001"),
        6,
        16,
        "is out of range (1..=100_000_000)",
    );
    assert_err(
        &with("maglev_table_size = 97"),
        6,
        21,
        "maglev_table_size = 97 is out of range (101..=10_000_019)",
    );
    assert_err(
        &format!("workers = 0\n{BASE}"),
        1,
        11,
        "workers = 0 is out of range (1..=1024)",
    );
    assert_err(
        &format!("workers = 1025\n{BASE}"),
        1,
        11,
        "workers = 1025 is out of range (1..=1024)",
    );
    assert_err(
        &format!("workers = \"all\"\n{BASE}"),
        1,
        11,
        r#"workers = "all" is invalid (expected "auto" or an integer 1..=1024)"#,
    );

    let bytes = |offset: &str, len: &str| {
        BASE.replace(
            "dissector = \"quic\"",
            &format!("dissector = \"bytes\"\ncid_offset = {offset}\ncid_len = {len}"),
        )
    };
    assert_err(
        &bytes("1401", "4"),
        5,
        14,
        "cid_offset = 1401 is out of range (0..=1400)",
    );
    assert_err(
        &bytes("-1", "4"),
        5,
        14,
        "cid_offset = -1 is out of range (0..=1400)",
    );
    assert_err(
        &bytes("1400", "21"),
        6,
        11,
        "cid_len = 21 is out of range (1..=20)",
    );
    assert_err(
        &bytes("1400", "0"),
        6,
        11,
        "cid_len = 0 is out of range (1..=20)",
    );

    let weighted = |w: &str| {
        BASE.replace(
            r#"["10.0.0.1:443"]"#,
            &format!(r#"[{{ addr = "10.0.0.1:443", weight = {w} }}]"#),
        )
    };
    assert_eq!(ok(&weighted("1000")).listeners[0].backends[0].weight, 1000);
    assert_err(
        &weighted("0"),
        5,
        12,
        "every backend has weight = 0, so no new session could go anywhere",
    );
    let drained = BASE.replace(
        r#"["10.0.0.1:443"]"#,
        r#"[{ addr = "10.0.0.1:443", weight = 0 }, "10.0.0.2:443"]"#,
    );
    assert_eq!(
        ok(&drained).listeners[0].backends[0].weight,
        0,
        "one drained"
    );
    assert_err(
        &weighted("1001"),
        5,
        47,
        "weight = 1001 is out of range (0..=1000)",
    );
}

#[test]
fn passive_health_keys_are_checked() {
    let with = |line: &str| {
        BASE.replace(
            "dissector = \"quic\"",
            &format!("dissector = \"quic\"\n{line}"),
        )
    };
    let l = &ok(&with(
        "fall = 5\nreply_timeout = \"250ms\"\nrevive_after = \"2s\"\non_backend_down = \"reroute\"",
    ))
    .listeners[0];
    assert_eq!(
        (l.fall, l.reply_timeout, l.revive_after, l.on_backend_down),
        (
            5,
            Duration::from_millis(250),
            Duration::from_secs(2),
            OnBackendDown::Reroute
        )
    );
    for (line, says) in [
        ("fall = 0", "fall = 0 is out of range (1..=1000)"),
        ("reply_timeout = \"10ms\"", "reply_timeout"),
        ("revive_after = \"0s\"", "revive_after"),
        (
            "on_backend_down = \"drop\"",
            "on_backend_down = \"drop\" is invalid",
        ),
    ] {
        let err = udpshard_config_err(&with(line));
        assert!(
            err.contains(says) && err.starts_with("FILE:5:"),
            "{line}: {err}"
        );
    }
}

#[test]
fn active_health_is_checked() {
    let with = |t: &str| format!("{BASE}[listener.health]\n{t}\n");
    let h = ok(&with("probe = \"0x0a0B\"\nexpect = \"PONG\"\ninterval = \"500ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 2"))
        .listeners[0]
        .health
        .clone()
        .unwrap();
    assert_eq!(h.probe, Probe::Bytes(vec![0x0a, 0x0b]));
    assert_eq!(h.expect, b"PONG".to_vec());
    assert_eq!(
        (h.interval, h.timeout, h.rise, h.fall),
        (Duration::from_millis(500), Duration::from_millis(200), 1, 2)
    );
    let d = ok(&with("probe = \"PING\"")).listeners[0]
        .health
        .clone()
        .unwrap();
    assert_eq!(
        (d.probe, d.interval, d.timeout, d.rise, d.fall),
        (
            Probe::Bytes(b"PING".to_vec()),
            Duration::from_secs(2),
            Duration::from_secs(1),
            2,
            3
        )
    );
    for (t, line, says) in [
        (
            "probe = \"0xzz\"",
            7,
            "health.probe = \"0xzz\" is not valid hex",
        ),
        ("probe = \"0xabc\"", 7, "an odd number of digits"),
        (
            "probe = \"P\"\nrise = 0",
            8,
            "health.rise = 0 is out of range (1..=100)",
        ),
        (
            "probe = \"P\"\nfall = 0",
            8,
            "health.fall = 0 is out of range (1..=100)",
        ),
        (
            "probe = \"P\"\ninterval = \"1s\"\ntimeout = \"2s\"",
            9,
            "is longer than its interval",
        ),
        ("expect = \"x\"", 6, "probe"),
    ] {
        let err = udpshard_config_err(&with(t));
        assert!(
            err.contains(says) && err.starts_with(&format!("FILE:{line}:")),
            "{t}: {err}"
        );
    }
}

fn udpshard_config_err(text: &str) -> String {
    crate::parse(text, "FILE").unwrap_err().to_string()
}

#[test]
fn invalid_enumerations() {
    assert_err(
        &BASE.replace("\"quic\"", "\"QUIC\""),
        4,
        13,
        r#"dissector = "QUIC" is invalid (expected "quic", "bytes" or "tuple")"#,
    );
    assert_err(
        &with("steering = \"kernel\""),
        6,
        12,
        r#"steering = "kernel" is invalid (expected "auto", "kernel-cid" or "reshuffle")"#,
    );
}

#[test]
fn invalid_names() {
    for bad in [
        "",
        "has space",
        "slash/",
        "x23456789012345678901234567890123",
        "ü",
    ] {
        let text = BASE.replace("name = \"a\"", &format!("name = \"{bad}\""));
        assert_err(&text, 2, 8, "listener #1: name = ");
    }
    let longest = "x2345678901234567890123456789012";
    assert_eq!(
        ok(&BASE.replace("\"a\"", &format!("\"{longest}\""))).listeners[0].name,
        longest
    );
}

#[test]
fn missing_required_keys_point_at_the_header() {
    for (key, line) in [
        ("name", "name = \"a\"\n"),
        ("bind", "bind = \"127.0.0.1:9000\"\n"),
        ("dissector", "dissector = \"quic\"\n"),
        ("backends", "backends = [\"10.0.0.1:443\"]\n"),
    ] {
        let text = format!("workers = 1\n\n  {}", BASE.replace(line, ""));
        assert_err(&text, 3, 3, &format!("missing required key `{key}`"));
    }
    let table = BASE.replace(r#"["10.0.0.1:443"]"#, r#"["10.0.0.2:1", { weight = 2 }]"#);
    assert_err(
        &table,
        5,
        27,
        r#"listener "a": backend table: missing required key `addr`"#,
    );
}

#[test]
fn second_listener_errors_point_into_it() {
    let second = BASE.replace("name = \"a\"\n", "").replace("9000", "9001");
    assert_err(
        &format!("{BASE}\n{second}"),
        7,
        1,
        "listener #2: missing required key `name`",
    );
}

#[test]
fn duplicate_name() {
    let second = BASE.replace("9000", "9001");
    assert_err(
        &format!("{BASE}{second}"),
        7,
        8,
        r#"listener name "a" is used twice"#,
    );
}

#[test]
fn duplicate_bind() {
    let second = BASE.replace("\"a\"", "\"b\"");
    assert_err(
        &format!("{BASE}{second}"),
        8,
        8,
        r#"listener "b": bind = "127.0.0.1:9000" is already used by listener "a""#,
    );
    // Port 0 means "any free port", so it never collides.
    let zero = BASE.replace("9000", "0");
    let c = ok(&format!("{zero}{}", zero.replace("\"a\"", "\"b\"")));
    assert_eq!(c.listeners[1].bind, sa("127.0.0.1:0"));
}

#[test]
fn duplicate_backend() {
    let text = BASE.replace(
        r#"["10.0.0.1:443"]"#,
        r#"["10.0.0.1:443", "10.0.0.2:443", { addr = "10.0.0.1:443", weight = 2 }]"#,
    );
    assert_err(
        &text,
        5,
        54,
        r#"listener "a": backend 10.0.0.1:443 is listed twice"#,
    );
    // Equality is on the parsed address, not the text.
    let v6 = BASE.replace(r#"["10.0.0.1:443"]"#, r#"["[::1]:443", "[0:0::1]:443"]"#);
    assert_err(&v6, 5, 26, "backend [::1]:443 is listed twice");
}

#[test]
fn dissector_specific_keys() {
    let bytes = BASE.replace(
        "dissector = \"quic\"",
        "dissector = \"bytes\"\ncid_offset = 4\ncid_len = 4",
    );
    assert_eq!(
        ok(&bytes).listeners[0].dissector,
        Dissector::Bytes {
            cid_offset: 4,
            cid_len: 4
        }
    );
    assert_err(
        &format!("{bytes}short_cid_len = 8\n"),
        8,
        17,
        r#"listener "a": short_cid_len is only valid with dissector = "quic", not "bytes""#,
    );
    assert_err(
        &with("cid_offset = 4"),
        6,
        14,
        r#"cid_offset is only valid with dissector = "bytes", not "quic""#,
    );
    assert_err(
        &with("cid_len = 4"),
        6,
        11,
        r#"cid_len is only valid with dissector = "bytes", not "quic""#,
    );
    let tuple = BASE.replace("\"quic\"", "\"tuple\"");
    assert_err(
        &format!("{tuple}short_cid_len = 8\n"),
        6,
        17,
        r#"short_cid_len is only valid with dissector = "quic", not "tuple""#,
    );
    assert_err(
        &format!("{tuple}cid_len = 8\n"),
        6,
        11,
        r#"cid_len is only valid with dissector = "bytes", not "tuple""#,
    );
}

#[test]
fn bytes_dissector_requires_its_keys() {
    let header_at = |extra: &str| {
        format!(
            "\n   {}",
            BASE.replace(
                "dissector = \"quic\"",
                &format!("dissector = \"bytes\"{extra}")
            )
        )
    };
    assert_err(
        &header_at("\ncid_len = 4"),
        2,
        4,
        r#"listener "a" (dissector = "bytes"): missing required key `cid_offset`"#,
    );
    assert_err(
        &header_at("\ncid_offset = 4"),
        2,
        4,
        r#"listener "a" (dissector = "bytes"): missing required key `cid_len`"#,
    );
}

#[test]
fn kernel_cid_needs_a_connection_id() {
    let tuple = BASE.replace("\"quic\"", "\"tuple\"");
    assert_err(
        &format!("{tuple}steering = \"kernel-cid\"\n"),
        6,
        12,
        r#"listener "a": steering = "kernel-cid" needs a connection ID, which dissector = "tuple" does not provide"#,
    );
    assert_eq!(
        ok(&with("steering = \"kernel-cid\"")).listeners[0].steering,
        Steering::KernelCid
    );
}

#[test]
fn maglev_table_size_must_be_prime_and_large_enough() {
    assert_err(
        &with("maglev_table_size = 65536"),
        6,
        21,
        r#"listener "a": maglev_table_size = 65536 is not a prime"#,
    );
    let eleven: Vec<String> = (1..=11).map(|i| format!("\"10.0.0.{i}:443\"")).collect();
    let many = BASE.replace(r#"["10.0.0.1:443"]"#, &format!("[{}]", eleven.join(", ")));
    assert_err(&format!("{many}maglev_table_size = 101\n"), 6, 21, "maglev_table_size = 101 is too small for 11 backends (needs at least 10x the backend count: 110)");
    assert_eq!(
        ok(&format!("{many}maglev_table_size = 113\n")).listeners[0].maglev_table_size,
        113
    );
}

#[test]
fn no_listeners() {
    assert_err(
        "",
        1,
        1,
        "no [[listener]] is defined; at least one is required",
    );
    assert_err("workers = 2\n", 1, 1, "no [[listener]] is defined");
    assert_err(
        "workers = 2\nlistener = []\n",
        2,
        12,
        "listener list is empty",
    );
}

#[test]
fn empty_backends() {
    assert_err(
        &BASE.replace(r#"["10.0.0.1:443"]"#, "[]"),
        5,
        12,
        r#"listener "a": backends is empty; at least one backend is required"#,
    );
}

#[test]
fn bad_socket_addresses() {
    assert_err(
        &BASE.replace("127.0.0.1:9000", "localhost:443"),
        3,
        8,
        r#"listener "a": bind = "localhost:443" is not a socket address (host names are not accepted: write an IP address, e.g. "127.0.0.1:443")"#,
    );
    for bad in ["127.0.0.1", "::1:443", "1.2.3.4:65536", "[::1]443"] {
        assert_err(
            &BASE.replace("127.0.0.1:9000", bad),
            3,
            8,
            &format!(
                r#"listener "a": bind = "{bad}" is not a socket address (expected "ip:port" or "[ipv6]:port")"#
            ),
        );
    }
    assert_err(
        &BASE.replace("10.0.0.1:443", "10.0.0.1"),
        5,
        13,
        r#"listener "a": backend "10.0.0.1" is not a socket address"#,
    );
    let table = BASE.replace(r#"["10.0.0.1:443"]"#, r#"[{ addr = "nope", weight = 2 }]"#);
    assert_err(&table, 5, 22, r#"backend "nope" is not a socket address"#);
    assert_err(
        &BASE.replace("10.0.0.1:443", "10.0.0.1:0"),
        5,
        13,
        "backend 10.0.0.1:0 has port 0",
    );
}

#[test]
fn stats_file_must_be_absolute() {
    assert_err(
        &format!("stats_file = \"run/stats\"\n{BASE}"),
        1,
        14,
        r#"stats_file = "run/stats" must be an absolute path"#,
    );
    assert_err(
        &format!("stats_file = \"\"\n{BASE}"),
        1,
        14,
        "must be an absolute path",
    );
}

#[test]
fn toml_syntax_errors() {
    assert_err(
        &with("max_sessions = "),
        6,
        16,
        "string values must be quoted",
    );
    assert_err(
        &with("max_sessions = 1 2"),
        6,
        16,
        "string values must be quoted",
    );
    assert_err(&with("name = \"b\""), 6, 1, "duplicate key `name`");
    assert_err("[[listener]\n", 1, 12, "unclosed array table, expected `]`");
}

#[test]
fn display_format() {
    let e = parse(&with("recv_bufer = 1"), "/etc/udpshard.toml").unwrap_err();
    assert!(
        e.to_string().starts_with("/etc/udpshard.toml:6:1: listener: unknown field `recv_bufer`, expected one of `name`, "),
        "{e}"
    );
    assert_eq!(e.origin(), "/etc/udpshard.toml");
    let e = parse(&with("short_cid_len = 21"), "x.toml").unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"x.toml:6:17: listener "a": short_cid_len = 21 is out of range (1..=20)"#
    );
}

#[test]
fn load_reads_files() {
    let dir = std::env::temp_dir().join(format!("udpshard-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, BASE).unwrap();
    assert_eq!(load(&good).unwrap(), ok(BASE));
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, with("bogus = 1")).unwrap();
    let e = load(&bad).unwrap_err();
    assert_eq!((e.line(), e.col()), (Some(6), Some(1)));
    assert!(
        e.to_string()
            .starts_with(&format!("{}:6:1: ", bad.display())),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_missing_file() {
    let path = std::path::Path::new("/nonexistent/udpshard/config.toml");
    let e = load(path).unwrap_err();
    assert!(matches!(e, ConfigError::Io { .. }), "{e:?}");
    assert_eq!((e.line(), e.col(), e.message()), (None, None, None));
    let shown = e.to_string();
    assert!(
        shown.starts_with("/nonexistent/udpshard/config.toml: cannot read: "),
        "{shown}"
    );
    assert!(shown.contains("No such file"), "{shown}");
}

const QUIC_LB: &str = r#"
[[listener]]
name = "q"
bind = "0.0.0.0:443"
dissector = "quic"
backends = [{ addr = "10.0.0.1:443", server_id = "c4605e" }, { addr = "10.0.0.2:443", server_id = "0000ff" }]
[listener.quic_lb]
config_id = 0
server_id_len = 3
"#;

#[test]
fn quic_lb_parses() {
    let cfg = ok(QUIC_LB);
    let l = &cfg.listeners[0];
    assert_eq!(
        l.quic_lb,
        Some(crate::QuicLb {
            config_id: 0,
            server_id_len: 3
        })
    );
    assert_eq!(
        l.backends[0].server_id.as_deref(),
        Some(&[0xc4, 0x60, 0x5e][..])
    );
}

#[test]
fn quic_lb_errors_point_at_their_values() {
    assert_err(
        &QUIC_LB.replace("config_id = 0", "config_id = 7"),
        8,
        13,
        "config_id = 7 is out of range",
    );
    assert_err(
        &QUIC_LB.replace("\"0000ff\"", "\"00ff\""),
        6,
        99,
        "must be 3 bytes of hex",
    );
    assert_err(
        &QUIC_LB.replace("\"0000ff\"", "\"c4605e\""),
        6,
        99,
        "is used twice",
    );
    assert_err(
        &QUIC_LB.replace(
            r#"{ addr = "10.0.0.2:443", server_id = "0000ff" }"#,
            r#""10.0.0.2:443""#,
        ),
        6,
        62,
        "needs a server_id",
    );
    assert_err(
        &QUIC_LB.replace("server_id_len = 3", "server_id_len = 8"),
        9,
        17,
        "does not fit in short_cid_len = 8",
    );
    assert_err(
        &QUIC_LB.replace("dissector = \"quic\"", "dissector = \"tuple\""),
        7,
        1,
        "quic_lb needs dissector",
    );
}

#[test]
fn server_id_without_quic_lb_is_an_error() {
    let text = QUIC_LB.split("[listener.quic_lb]").next().unwrap();
    assert_err(text, 6, 50, "has a server_id but the listener has no");
}

#[test]
fn drain_timeout() {
    let base = "[[listener]]\nname = \"q\"\nbind = \"0.0.0.0:443\"\ndissector = \"quic\"\nbackends = [\"10.0.0.1:443\"]\n";
    assert_eq!(
        ok(&format!("drain_timeout = \"250ms\"\n{base}")).drain_timeout,
        Duration::from_millis(250)
    );
    assert_err(
        &format!("drain_timeout = \"2h\"\n{base}"),
        1,
        17,
        "out of range (0s..=1h)",
    );
}

#[test]
fn withdraw_delay() {
    let base = "[[listener]]\nname = \"q\"\nbind = \"0.0.0.0:443\"\ndissector = \"quic\"\nbackends = [\"10.0.0.1:443\"]\n";
    assert_eq!(ok(base).withdraw_delay, Duration::ZERO);
    assert_eq!(
        ok(&format!("withdraw_delay = \"3s\"\n{base}")).withdraw_delay,
        Duration::from_secs(3)
    );
    assert_err(
        &format!("withdraw_delay = \"2h\"\n{base}"),
        1,
        18,
        "out of range (0s..=1h)",
    );
}

#[test]
fn readiness() {
    let base = "[[listener]]\nname = \"q\"\nbind = \"0.0.0.0:443\"\ndissector = \"quic\"\nbackends = [\"10.0.0.1:443\"]\n";
    assert_eq!(ok(base).readiness, Readiness::Serving);
    assert_eq!(
        ok(&format!("readiness = \"backend_up\"\n{base}")).readiness,
        Readiness::BackendUp
    );
    assert_err(
        &format!("readiness = \"backends\"\n{base}"),
        1,
        13,
        "readiness = \"backends\" is invalid (expected \"serving\" or \"backend_up\")",
    );
}

#[test]
fn upgrade_timeout() {
    let base = "[[listener]]\nname = \"q\"\nbind = \"0.0.0.0:443\"\ndissector = \"quic\"\nbackends = [\"10.0.0.1:443\"]\n";
    assert_eq!(ok(base).upgrade_timeout, Duration::from_secs(30));
    assert_eq!(
        ok(&format!("upgrade_timeout = \"5s\"\n{base}")).upgrade_timeout,
        Duration::from_secs(5)
    );
    assert_err(
        &format!("upgrade_timeout = \"0s\"\n{base}"),
        1,
        19,
        "out of range (1s..=10m)",
    );
}

#[test]
fn metrics() {
    let base = "[[listener]]\nname = \"q\"\nbind = \"0.0.0.0:443\"\ndissector = \"quic\"\nbackends = [\"10.0.0.1:443\"]\n";
    assert_eq!(ok(base).metrics, None);
    assert_eq!(
        ok(&format!("metrics = \"127.0.0.1:9469\"\n{base}")).metrics,
        Some(sa("127.0.0.1:9469"))
    );
    assert_eq!(
        ok(&format!("metrics = \"[::1]:9469\"\n{base}")).metrics,
        Some(sa("[::1]:9469"))
    );
    assert_err(
        &format!("metrics = \"localhost\"\n{base}"),
        1,
        11,
        "is not a socket address",
    );
    assert_err(
        &format!("workers = 1\nmetrics = \"127.0.0.1:0\"\n{base}"),
        2,
        11,
        "port 0",
    );
    assert_err(&format!("metrics = 9469\n{base}"), 1, 11, "");
}

#[test]
fn syscall_filter_is_on_or_off() {
    let base = "[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"tuple\"\nbackends = [{ addr = \"127.0.0.1:5000\" }]\n";
    assert!(parse(base, "t.toml").unwrap().syscall_filter);
    let off = format!("syscall_filter = \"off\"\n{base}");
    assert!(!parse(&off, "t.toml").unwrap().syscall_filter);
    let bad = format!("syscall_filter = \"yes\"\n{base}");
    let e = parse(&bad, "t.toml").unwrap_err().to_string();
    assert!(e.starts_with("t.toml:1:18:"), "{e}");
    assert!(e.contains("expected \"on\" or \"off\""), "{e}");
}

#[test]
fn queue_delay_is_on_or_off() {
    let base =
        "[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"tuple\"\nbackends = [\"127.0.0.1:5000\"]\n";
    assert!(parse(base, "t.toml").unwrap().listeners[0].queue_delay);
    let off = format!("{base}queue_delay = \"off\"\n");
    assert!(!parse(&off, "t.toml").unwrap().listeners[0].queue_delay);
    let bad = format!("{base}queue_delay = \"maybe\"\n");
    let e = parse(&bad, "t.toml").unwrap_err().to_string();
    assert!(e.starts_with("t.toml:6:15:"), "{e}");
    assert!(e.contains("queue_delay = \"maybe\" is invalid"), "{e}");
}

#[test]
fn session_log_is_off_or_one_in_n() {
    let base = "[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"tuple\"\nbackends = [{ addr = \"127.0.0.1:5000\" }]\n";
    assert_eq!(parse(base, "t.toml").unwrap().listeners[0].session_log, 0);
    let on = format!("{base}session_log = 10000\n");
    assert_eq!(
        parse(&on, "t.toml").unwrap().listeners[0].session_log,
        10_000
    );
    let bad = format!("{base}session_log = -1\n");
    let e = parse(&bad, "t.toml").unwrap_err().to_string();
    assert!(e.starts_with("t.toml:6:15:"), "{e}");
    assert!(e.contains("session_log = -1 is out of range"), "{e}");
}

#[test]
fn proxy_protocol_is_v2_or_off() {
    let base = "[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"tuple\"\nbackends = [{ addr = \"127.0.0.1:5000\" }]\n";
    assert_eq!(
        parse(base, "t.toml").unwrap().listeners[0].proxy_protocol,
        ProxyProtocol::Off
    );
    let on = format!("{base}proxy_protocol = \"v2\"\n");
    assert_eq!(
        parse(&on, "t.toml").unwrap().listeners[0].proxy_protocol,
        ProxyProtocol::V2
    );
    let bad = format!("{base}proxy_protocol = \"v1\"\n");
    let e = parse(&bad, "t.toml").unwrap_err().to_string();
    assert!(e.starts_with("t.toml:6:18:"), "{e}");
    assert!(e.contains("expected \"v2\" or \"off\""), "{e}");
}

#[test]
fn user_is_a_user_name() {
    let base = "[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"tuple\"\nbackends = [{ addr = \"127.0.0.1:5000\" }]\n";
    assert_eq!(parse(base, "t.toml").unwrap().user, None);
    let nobody = format!("user = \"nobody\"\n{base}");
    assert_eq!(
        parse(&nobody, "t.toml").unwrap().user.as_deref(),
        Some("nobody")
    );
    for bad in ["", "-x", "a b", "root:root", "../etc"] {
        let text = format!("user = {bad:?}\n{base}");
        let e = parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.starts_with("t.toml:1:8:"), "{e}");
        assert!(e.contains("is not a user name"), "{e}");
    }
}

#[test]
fn offload_is_auto_or_off() {
    let base = "[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"tuple\"\nbackends = [{ addr = \"127.0.0.1:5000\" }]\n";
    assert_eq!(parse(base, "t.toml").unwrap().offload, Offload::Auto);
    let off = format!("offload = \"off\"\n{base}");
    assert_eq!(parse(&off, "t.toml").unwrap().offload, Offload::Off);
    let bad = format!("offload = \"on\"\n{base}");
    let e = parse(&bad, "t.toml").unwrap_err().to_string();
    assert!(e.starts_with("t.toml:1:11:"), "{e}");
    assert!(e.contains("expected \"auto\" or \"off\""), "{e}");
}

#[test]
fn upstream_send_is_auto_or_socket() {
    let base = "[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"tuple\"\nbackends = [{ addr = \"127.0.0.1:5000\" }]\n";
    assert_eq!(
        parse(base, "t.toml").unwrap().upstream_send,
        UpstreamSend::Auto
    );
    let socket = format!("upstream_send = \"socket\"\n{base}");
    assert_eq!(
        parse(&socket, "t.toml").unwrap().upstream_send,
        UpstreamSend::Socket
    );
    let bad = format!("upstream_send = \"raw\"\n{base}");
    let e = parse(&bad, "t.toml").unwrap_err().to_string();
    assert!(e.starts_with("t.toml:1:17:"), "{e}");
    assert!(e.contains("expected \"auto\" or \"socket\""), "{e}");
}

#[test]
fn admission_takes_its_defaults_from_the_listener() {
    let a = ok(&with("max_sessions = 1000\nsession_idle = \"5s\"")).listeners[0]
        .admission
        .clone();
    assert_eq!(a.max_embryonic, 250, "a quarter of max_sessions");
    assert_eq!(
        a.embryonic_timeout,
        Duration::from_secs(5),
        "at most session_idle"
    );
    assert_eq!((a.source_prefix_v4, a.source_prefix_v6), (32, 64));
    let a = ok(&with(
        "[listener.admission]\nmax_embryonic = 10\nembryonic_timeout = \"2s\"\nsource_prefix_v4 = 24\n\
         new_sessions_per_source = 5\nnew_paths_per_session = 0",
    ))
    .listeners[0]
    .admission
    .clone();
    assert_eq!(
        (a.max_embryonic, a.embryonic_timeout, a.source_prefix_v4),
        (10, Duration::from_secs(2), 24)
    );
    assert_eq!((a.new_sessions_per_source, a.new_sessions_burst), (5, 10));
    assert_eq!(a.new_paths_per_session, 0, "0 turns the limit off");
}

#[test]
fn admission_refuses_what_cannot_hold() {
    assert_err(
        &with("max_sessions = 10\n[listener.admission]\nmax_embryonic = 11"),
        8,
        17,
        "admission.max_embryonic (at most max_sessions) = 11 is out of range",
    );
    assert_err(
        &with("session_idle = \"5s\"\n[listener.admission]\nembryonic_timeout = \"6s\""),
        8,
        21,
        "is longer than session_idle",
    );
    assert_err(
        &with("[listener.admission]\nsource_prefix_v6 = 129"),
        7,
        20,
        "source_prefix_v6 = 129 is out of range",
    );
    assert_err(
        &with("[listener.admission]\nnew_sessions_per_source = -1"),
        7,
        27,
        "out of range",
    );
    assert_err(
        &with("[listener.admission]\nnew_session_rate = 1"),
        7,
        1,
        "unknown field",
    );
}

#[test]
fn the_quic_probe_and_the_ejection_cap() {
    let c = ok(&with(
        "max_ejection_percent = 30\n[listener.health]\nprobe = \"quic\"",
    ));
    assert_eq!(c.listeners[0].max_ejection_percent, 30);
    assert_eq!(c.listeners[0].health.as_ref().unwrap().probe, Probe::Quic);
    assert_eq!(ok(BASE).listeners[0].max_ejection_percent, 50);
    assert_err(&with("max_ejection_percent = 101"), 6, 24, "out of range");
    assert_err(
        &with("[listener.health]\nprobe = \"quic\"\nexpect = \"x\""),
        8,
        10,
        "has no place with probe = \"quic\"",
    );
}
