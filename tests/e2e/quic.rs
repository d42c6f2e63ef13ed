//! End to end with a real QUIC stack: quinn clients and servers complete
//! handshakes through udpshard (2 backends, 2 workers) and keep their
//! connections when the client rebinds to a new port mid-stream, in both
//! steering modes and both migration modes. quinn moves to a connection ID
//! the proxy has never seen when it rebinds, so the server sees a new peer
//! address (a new upstream 4-tuple) and validates the new path itself; the
//! QUIC-LB server ID in that ID keeps it on its server.
//!
//! The servers issue QUIC-LB plaintext connection IDs (their server ID after
//! the first octet), as a deployment behind udpshard would: a migrating
//! client switches to a connection ID the proxy has never seen, and the ID
//! itself names the server.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use quinn::{ConnectionId, ConnectionIdGenerator, Endpoint, EndpointConfig, ServerConfig};
use udpshard_tests::harness::{total, Proxy};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");

/// QUIC-LB plaintext IDs: config 0, a 2-byte server ID, 5 bytes of nonce.
struct QuicLbCids {
    server_id: [u8; 2],
    counter: u64,
}

impl ConnectionIdGenerator for QuicLbCids {
    fn generate_cid(&mut self) -> ConnectionId {
        self.counter += 1;
        let nonce = (self.counter.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ std::process::id() as u64)
            .to_be_bytes();
        let mut cid = [0u8; 8];
        cid[0] = 0x07; // config 0, length bits 7 (length - 1)
        cid[1..3].copy_from_slice(&self.server_id);
        cid[3..8].copy_from_slice(&nonce[..5]);
        ConnectionId::new(&cid)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

fn cert() -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = PrivatePkcs8KeyDer::from(c.signing_key.serialize_der());
    (vec![c.cert.der().clone()], key.into())
}

/// An echo server: every bidirectional stream gets its bytes back, prefixed
/// with the server's name and the peer address it sees now
/// (`a@127.0.0.1:40000:bytes`).
fn server(
    name: &'static str,
    server_id: [u8; 2],
    certs: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> (Endpoint, SocketAddr) {
    let mut endpoint_config = EndpointConfig::default();
    endpoint_config.cid_generator(move || {
        Box::new(QuicLbCids {
            server_id,
            counter: 0,
        })
    });
    let server_config = ServerConfig::with_single_cert(certs.to_vec(), key.clone_key()).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let endpoint = Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(data) = recv.read_to_end(1 << 16).await else {
                        return;
                    };
                    let mut reply = format!("{name}@{}:", conn.remote_address()).into_bytes();
                    reply.extend_from_slice(&data);
                    let _ = send.write_all(&reply).await;
                    let _ = send.finish();
                }
            });
        }
    });
    (endpoint, addr)
}

async fn echo(conn: &quinn::Connection, msg: &str) -> String {
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    send.write_all(msg.as_bytes()).await.unwrap();
    send.finish().unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 16))
        .await
        .expect("echo in time")
        .expect("echo");
    String::from_utf8(reply).unwrap()
}

/// An echo reply: (server name, the peer address it saw, the echoed text).
/// Peers are IPv4 loopback addresses here: `a@127.0.0.1:40000:text`.
fn parse(reply: &str) -> (String, String, String) {
    let (name, rest) = reply.split_once('@').expect("name@peer:text");
    let mut parts = rest.splitn(3, ':');
    let (ip, port, text) = (parts.next(), parts.next(), parts.next());
    let peer = format!("{}:{}", ip.unwrap_or(""), port.unwrap_or(""));
    (name.to_string(), peer, text.unwrap_or("").to_string())
}

fn handshakes_and_rebinds(steering: &str, migration: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (certs, key) = cert();
        let (a, a_addr) = server("a", [0x0a, 0x0a], &certs, &key);
        let (b, b_addr) = server("b", [0x0b, 0x0b], &certs, &key);
        let config = format!(
            r#"
workers = 2
stats_file = "{{stats_file}}"

[[listener]]
name = "quic"
bind = "127.0.0.1:0"
dissector = "quic"
short_cid_len = 8
steering = "{steering}"
migration = "{migration}"
upstream_ports = "1025-32767"
backends = [
    {{ addr = "{a_addr}", server_id = "0a0a" }},
    {{ addr = "{b_addr}", server_id = "0b0b" }},
]

[listener.quic_lb]
config_id = 0
server_id_len = 2
"#
        );
        let proxy = Proxy::start(Path::new(BIN), &config);
        let target = proxy.addr("quic");

        let mut roots = quinn::rustls::RootCertStore::empty();
        roots.add(certs[0].clone()).unwrap();
        let client_crypto = quinn::rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client_config =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_crypto).unwrap()));

        // At least eight clients, each its own endpoint (source port), so
        // both workers and both backends see handshakes. A client's first
        // CID is random, so its backend is too: all of eight on one backend
        // happens once in 128 runs; going on until both have one (at most
        // 40 clients) makes that once in 2^39.
        let mut clients: Vec<(Endpoint, quinn::Connection, String)> = Vec::new();
        for i in 0..40 {
            let seen: std::collections::HashSet<String> =
                clients.iter().map(|(_, _, r)| parse(r).0).collect();
            if clients.len() >= 8 && seen.len() == 2 {
                break;
            }
            let mut ep = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(client_config.clone());
            let conn = tokio::time::timeout(
                Duration::from_secs(10),
                ep.connect(target, "localhost").unwrap(),
            )
            .await
            .expect("handshake in time")
            .unwrap_or_else(|e| panic!("handshake {i}: {e}\n{}", proxy.log()));
            let first = echo(&conn, &format!("hello {i}")).await;
            clients.push((ep, conn, first));
        }
        let servers: std::collections::HashSet<String> =
            clients.iter().map(|(_, _, r)| parse(r).0).collect();
        assert_eq!(
            servers.len(),
            2,
            "both backends serve connections: {servers:?}"
        );

        for (i, (ep, conn, first)) in clients.iter().enumerate() {
            // Mid-stream: a stream is open when the client moves.
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"before ").await.unwrap();
            ep.rebind(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
            send.write_all(b"after").await.unwrap();
            send.finish().unwrap();
            let reply = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 16))
                .await
                .unwrap_or_else(|_| {
                    panic!("connection {i} stalled after rebinding\n{}", proxy.log())
                })
                .unwrap_or_else(|e| panic!("connection {i} broke after rebinding: {e}"));
            let reply = String::from_utf8(reply).unwrap();
            let (server, peer_before, _) = parse(first);
            let (moved_to, _, text) = parse(&reply);
            assert_eq!(
                (moved_to.as_str(), text.as_str()),
                (server.as_str(), "before after"),
                "connection {i} moved servers: {reply}"
            );
            // And it keeps working from the new address.
            let (again_server, peer_now, again) = parse(&echo(conn, "again").await);
            assert_eq!(
                (again_server.as_str(), again.as_str()),
                (server.as_str(), "again")
            );
            // quinn moves to a fresh connection ID when it rebinds (the
            // server's QUIC-LB ID routes it), so the server sees a new peer
            // address in both modes, validates it, and keeps the connection.
            assert_ne!(
                peer_now, peer_before,
                "connection {i}: the server never saw the move"
            );
        }
        for (_, conn, _) in &clients {
            assert!(conn.close_reason().is_none(), "a connection closed");
        }
        let stats = proxy.stats();
        assert_eq!(total(&stats, "drops.malformed"), 0, "{stats:#}");
        assert_eq!(total(&stats, "drops.handoff"), 0, "{stats:#}");
        // On 4-tuple steering (auto's choice for QUIC) a connection stays
        // where its handshake landed, though its connection ID changes
        // after it; a rebinding client with a fresh ID routes by QUIC-LB
        // where it lands. Steering on the ID hands over 6 to 14 datagrams
        // of these 8 connections.
        if steering != "kernel-cid" {
            assert_eq!(total(&stats, "handoff_out"), 0, "{stats:#}");
            assert_eq!(total(&stats, "transfers_out"), 0, "{stats:#}");
        }
        a.close(0u32.into(), b"done");
        b.close(0u32.into(), b"done");
    });
}

#[test]
fn quinn_connections_survive_rebinding_with_kernel_cid_steering_in_path_mode() {
    handshakes_and_rebinds("kernel-cid", "path");
}

#[test]
fn quinn_connections_survive_rebinding_with_reshuffle_steering_in_path_mode() {
    handshakes_and_rebinds("reshuffle", "path");
}

#[test]
fn quinn_connections_survive_rebinding_with_default_steering_without_a_handoff() {
    handshakes_and_rebinds("auto", "path");
}

#[test]
fn quinn_connections_survive_rebinding_with_kernel_cid_steering_in_follow_mode() {
    handshakes_and_rebinds("kernel-cid", "follow");
}

#[test]
fn quinn_connections_survive_rebinding_with_reshuffle_steering_in_follow_mode() {
    handshakes_and_rebinds("reshuffle", "follow");
}

/// With `probe = "quic"` the probes decide: junk Initials, which a quinn
/// server drops (it cannot decrypt them), only ask for a probe, and every
/// server answers the probe with Version Negotiation, so none goes down;
/// a server that is gone stops answering and goes down.
#[test]
fn the_quic_probe_keeps_quic_servers_up_through_junk_and_finds_one_gone() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (certs, key) = cert();
        let (a, a_addr) = server("a", [0x0a, 0x0a], &certs, &key);
        let (b, b_addr) = server("b", [0x0b, 0x0b], &certs, &key);
        let config = format!(
            r#"
workers = 1
stats_file = "{{stats_file}}"

[[listener]]
name = "quic"
bind = "127.0.0.1:0"
dissector = "quic"
fall = 2
reply_timeout = "200ms"
upstream_ports = "1025-32767"
backends = ["{a_addr}", "{b_addr}"]

[listener.health]
probe = "quic"
interval = "200ms"
timeout = "150ms"
fall = 2
rise = 1
"#
        );
        let proxy = Proxy::start(Path::new(BIN), &config);
        let target = proxy.addr("quic");
        let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
        for n in 0..40u64 {
            let mut d = udpshard_shared::flow::quic_initial(&(n + 1).to_be_bytes(), &[], b"junk");
            d.resize(1200, 0);
            junk.send_to(&d, target).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                proxy.backends_down().is_empty(),
                "after junk {n}: {:?}",
                proxy.backends_down()
            );
        }
        let stats = proxy.stats();
        let unanswered: u64 = stats["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| b["sessions_unanswered"].as_u64().unwrap_or(0))
            .sum();
        assert!(unanswered >= 4, "the junk was evidence: {stats:#}");
        // Server b goes away: its probes fail, and it goes down.
        b.close(0u32.into(), b"bye");
        drop(b);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !proxy.backends_down().contains(&b_addr.to_string()) {
            assert!(
                std::time::Instant::now() < deadline,
                "b never went down: {}",
                proxy.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(proxy.backends_down(), vec![b_addr.to_string()]);
        proxy.wait_log("probes failed in a row", Duration::from_secs(5));
        drop(a);
        assert_eq!(total(&proxy.stats(), "drops.not_initial"), 0);
    });
}
