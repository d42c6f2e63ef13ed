//! End to end: DNS through udpshard to a real DNS server from Debian's
//! packages. With `proxy_protocol = "v2"` the server reads each query's
//! PROXY v2 header and applies its access list to the client that sent
//! it, not to the proxy.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use udpshard_tests::harness::{bind_udp, installed, listener_config, total, Proxy, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
const WAIT: Duration = Duration::from_secs(10);
const UNBOUND: &str = "/usr/sbin/unbound";

/// Unbound on 127.0.0.1:`port`, reading a PROXY v2 header on every
/// datagram there, answering `a.udpshard.test` itself, and allowing the
/// proxy (127.0.0.1, where the datagrams come from: Unbound checks the
/// sender too) and the client `allowed`; the rest of 127.0.0.0/8 is
/// refused.
struct Unbound {
    child: Child,
    _dir: TempDir,
}

impl Unbound {
    fn start(bin: &Path, port: u16, allowed: &str) -> Unbound {
        let dir = TempDir::new("unbound");
        let conf = dir.path().join("unbound.conf");
        std::fs::write(
            &conf,
            format!(
                "server:\n\
                 \tinterface: 127.0.0.1@{port}\n\
                 \tproxy-protocol-port: {port}\n\
                 \tdo-ip6: no\n\
                 \tdo-tcp: no\n\
                 \tdo-daemonize: no\n\
                 \tusername: \"\"\n\
                 \tchroot: \"\"\n\
                 \tdirectory: \"{dir}\"\n\
                 \tpidfile: \"\"\n\
                 \tuse-syslog: no\n\
                 \tlogfile: \"\"\n\
                 \tverbosity: 1\n\
                 \tlog-queries: yes\n\
                 \tnum-threads: 1\n\
                 \tmodule-config: \"iterator\"\n\
                 \taccess-control: 0.0.0.0/0 refuse\n\
                 \taccess-control: 127.0.0.0/8 refuse\n\
                 \taccess-control: 127.0.0.1/32 allow\n\
                 \taccess-control: {allowed}/32 allow\n\
                 \tlocal-zone: \"udpshard.test.\" static\n\
                 \tlocal-data: \"a.udpshard.test. 60 IN A 192.0.2.53\"\n\
                 remote-control:\n\
                 \tcontrol-enable: no\n",
                dir = dir.path().display(),
            ),
        )
        .unwrap();
        let mut child = Command::new(bin)
            .args(["-d", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start unbound");
        // Ready once it says so; its log goes on to our stderr.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("unbound: {line}");
                if line.contains("start of service") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(WAIT)
            .expect("unbound says 'start of service'");
        Unbound { child, _dir: dir }
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A query for `a.udpshard.test` A, with id `id`.
fn query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["a", "udpshard", "test"] {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    q
}

/// A response's id, RCODE and answer count.
fn response(r: &[u8]) -> (u16, u8, u16) {
    assert!(r.len() >= 12, "a DNS response: {r:?}");
    (
        u16::from_be_bytes([r[0], r[1]]),
        r[3] & 0x0f,
        u16::from_be_bytes([r[6], r[7]]),
    )
}

const NOERROR: u8 = 0;
const REFUSED: u8 = 5;

/// Through udpshard with `proxy_protocol = "v2"`, Unbound answers the
/// client its access list allows and refuses the other, though both
/// queries come from the proxy, which it allows: it judged each client,
/// not the proxy.
#[test]
fn a_dns_server_applies_its_access_list_to_the_client_behind_the_proxy() {
    let Some(unbound) = installed(UNBOUND, "unbound") else {
        return;
    };
    let port = {
        let probe = bind_udp("127.0.0.1:0");
        probe.local_addr().unwrap().port()
    };
    let _server = Unbound::start(unbound, port, "127.0.0.5");
    let backend: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let proxy = Proxy::start(
        Path::new(BIN),
        &listener_config(
            "workers = 2",
            "dissector = \"tuple\"\nproxy_protocol = \"v2\"",
            &[backend],
        ),
    );
    let target = proxy.addr("quic");
    let ask = |from: &str, id: u16| -> (u16, u8, u16) {
        let c = bind_udp(from);
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 512];
        // UDP: a query may be lost; ask again, within a bound.
        let deadline = Instant::now() + WAIT;
        loop {
            c.send_to(&query(id), target).unwrap();
            match c.recv_from(&mut buf) {
                Ok((n, from)) => {
                    assert_eq!(from, target);
                    return response(&buf[..n]);
                }
                Err(e) if Instant::now() < deadline => eprintln!("no answer yet: {e}"),
                Err(e) => panic!("no answer from {target} within {WAIT:?}: {e}"),
            }
        }
    };
    for id in 1..=3 {
        assert_eq!(
            ask("127.0.0.5:0", id),
            (id, NOERROR, 1),
            "the allowed client"
        );
        assert_eq!(
            ask("127.0.0.6:0", 100 + id),
            (100 + id, REFUSED, 0),
            "the refused client"
        );
    }
    // Sent straight to the server, a query has no header: not an answer
    // (a server that reads PROXY v2 on a port drops a datagram without one).
    let direct = bind_udp("127.0.0.5:0");
    direct
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    direct.send_to(&query(7), backend).unwrap();
    assert!(direct.recv_from(&mut [0u8; 512]).is_err());

    let stats = proxy.wait_stats(WAIT, "every query and answer counted", |s| {
        total(s, "replies_out") >= 6 && total(s, "tx_packets") == total(s, "replies_out")
    });
    assert_eq!(total(&stats, "drops.proxy_mtu"), 0);
}
