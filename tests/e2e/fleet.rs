//! End to end: a fleet of identical udpshard instances behind ECMP, built in
//! network namespaces this test creates and removes itself (root only).
//!
//! ```text
//!  client ns            router ns                proxy ns i (i = 0..3)
//!  192.0.2.2 ---------- 192.0.2.1                 VIP 203.0.113.10 on lo
//!                       198.51.100.(4i+1) ------- 198.51.100.(4i+2)
//!  backend ns           VIP/32: ECMP over every proxy ns, L4 hash
//!  203.0.113.66 ------- 203.0.113.65
//!  (ports 4001..4004)
//! ```
//! Each client flow is one CID sent from 4 source ports in turn, so the
//! router's 4-tuple hash carries one connection through several instances,
//! as a fabric does when a client migrates. Addresses are from the
//! documentation ranges; nothing leaves the namespaces.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use udpshard_shared::Maglev;
use udpshard_tests::harness::{installed, quic_short, total, wait_until, Backend, Proxy, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_udpshard");
const WAIT: Duration = Duration::from_secs(20);
const VIP: &str = "203.0.113.10";
const PORT: u16 = 4433;
const INSTANCES: usize = 3;
const CIDS: u64 = 300;
/// Source ports (client sockets) per CID.
const PORTS_PER_CID: usize = 4;
/// The host whose BGP speaker is ExaBGP (BIRD on the others).
const EXABGP_HOST: usize = 2;

/// The BGP speakers' programs (BIRD on host [`EXABGP_HOST`] too where
/// ExaBGP is missing, outside CI).
struct Speakers<'a> {
    bird: &'a Path,
    exabgp: Option<&'a Path>,
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one fabric, removed when dropped (and before they are
/// made, should a crashed run have left them).
struct Fabric {
    client: String,
    router: String,
    backend: String,
    proxies: Vec<String>,
}

impl Fabric {
    /// The namespaces and links; with `static_ecmp`, the router's ECMP
    /// route to the VIP through every instance (else a BGP speaker puts
    /// it there).
    fn build(tag: &str, static_ecmp: bool) -> Fabric {
        let f = Fabric {
            client: format!("usf{tag}-client"),
            router: format!("usf{tag}-router"),
            backend: format!("usf{tag}-backend"),
            proxies: (0..INSTANCES)
                .map(|i| format!("usf{tag}-proxy{i}"))
                .collect(),
        };
        f.remove();
        for ns in f.all() {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let r = f.router.as_str();
        f.link(&f.client, "to-client", "192.0.2.1/24", "192.0.2.2/24");
        f.link(
            &f.backend,
            "to-backend",
            "203.0.113.65/26",
            "203.0.113.66/26",
        );
        ip(&[
            "-n",
            &f.client,
            "route",
            "add",
            "default",
            "via",
            "192.0.2.1",
        ]);
        ip(&[
            "-n",
            &f.backend,
            "route",
            "add",
            "default",
            "via",
            "203.0.113.65",
        ]);
        for (i, ns) in f.proxies.iter().enumerate() {
            let (here, there) = (hop(i), format!("198.51.100.{}", 4 * i + 2));
            f.link(
                ns,
                &format!("to-proxy{i}"),
                &format!("{here}/30"),
                &format!("{there}/30"),
            );
            ip(&["-n", ns, "route", "add", "default", "via", &here]);
            ip(&["-n", ns, "addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
        }
        let sysctl = "echo 1 > /proc/sys/net/ipv4/ip_forward && \
                      echo 1 > /proc/sys/net/ipv4/fib_multipath_hash_policy";
        ip(&["netns", "exec", r, "sh", "-c", sysctl]);
        if static_ecmp {
            f.route_through(&(0..INSTANCES).collect::<Vec<_>>());
        }
        f
    }

    /// The instances the router's route to the VIP goes through now.
    fn nexthops(&self) -> Vec<usize> {
        let out = Command::new("ip")
            .args(["-n", &self.router, "route", "show", &format!("{VIP}/32")])
            .output()
            .expect("ip route show");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut hops: Vec<usize> = (0..INSTANCES)
            .filter(|&i| {
                let via = format!("via 198.51.100.{} ", 4 * i + 2);
                text.contains(&via)
            })
            .collect();
        hops.sort();
        hops
    }

    /// A veth pair: `name` in the router, `r` in `ns`, with their addresses.
    fn link(&self, ns: &str, name: &str, router_addr: &str, ns_addr: &str) {
        let r = self.router.as_str();
        ip(&[
            "-n", r, "link", "add", "name", name, "type", "veth", "peer", "name", "r", "netns", ns,
        ]);
        ip(&["-n", r, "addr", "add", router_addr, "dev", name]);
        ip(&["-n", ns, "addr", "add", ns_addr, "dev", "r"]);
        ip(&["-n", r, "link", "set", "dev", name, "up"]);
        ip(&["-n", ns, "link", "set", "dev", "r", "up"]);
    }

    /// The router's ECMP route to the VIP, through these instances.
    fn route_through(&self, instances: &[usize]) {
        let mut args = vec!["-n", &self.router, "route", "replace", "203.0.113.10/32"];
        let hops: Vec<String> = instances
            .iter()
            .map(|&i| format!("198.51.100.{}", 4 * i + 2))
            .collect();
        for h in &hops {
            args.extend(["nexthop", "via", h.as_str()]);
        }
        ip(&args);
    }

    fn all(&self) -> Vec<&str> {
        let mut v = vec![
            self.client.as_str(),
            self.router.as_str(),
            self.backend.as_str(),
        ];
        v.extend(self.proxies.iter().map(String::as_str));
        v
    }

    fn remove(&self) {
        for ns in self.all() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The router's address toward instance `i`.
fn hop(i: usize) -> String {
    format!("198.51.100.{}", 4 * i + 1)
}

/// Runs `f` on a thread inside network namespace `ns`: sockets it makes
/// belong to that namespace wherever they are used later.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let handle = File::open(format!("/run/netns/{ns}")).expect("namespace handle");
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on this thread only, with a namespace
            // descriptor we hold open.
            let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

fn backend_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 66], port))
}

/// The config every instance runs (the same text on every host).
fn config(backends: usize, quic_lb: bool) -> String {
    let list: Vec<String> = (0..backends)
        .map(|b| {
            let addr = backend_addr(4001 + b as u16);
            if quic_lb {
                format!("{{ addr = \"{addr}\", server_id = \"00000{}\" }}", b + 1)
            } else {
                format!("\"{addr}\"")
            }
        })
        .collect();
    let lb = if quic_lb {
        "\n[listener.quic_lb]\nconfig_id = 0\nserver_id_len = 3\n"
    } else {
        ""
    };
    format!(
        "workers = 2\nstats_file = \"{{stats_file}}\"\n\n[[listener]]\nname = \"quic\"\n\
         bind = \"{VIP}:{PORT}\"\ndissector = \"quic\"\nshort_cid_len = 8\n\
         backends = [{}]\n{lb}",
        list.join(", ")
    )
}

/// Rewrites instance `p`'s config and waits until its workers apply it.
fn reload(p: &Proxy, text: &str, generation: u64) {
    let text = text.replace("{stats_file}", &p.stats_file.display().to_string());
    std::fs::write(&p.config_path, text).unwrap();
    p.signal(libc::SIGHUP);
    p.wait_stats(WAIT, "the reload applied", |s| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["config_generation"] == generation)
    });
}

struct Fleet {
    // Dropped last: the processes and sockets in the namespaces go first.
    /// BGP speakers and their followers (`start_bgp`), stopped first.
    speakers: Vec<Daemon>,
    proxies: Vec<Proxy>,
    /// Their configs, logs and the proxies' stats files.
    bgp_dir: Option<TempDir>,
    backends: Vec<Backend>,
    /// PORTS_PER_CID client sockets per CID slot, in the client namespace.
    clients: Vec<UdpSocket>,
    fabric: Fabric,
}

impl Fleet {
    fn start(tag: &str, text: &str) -> Fleet {
        let mut fleet = Fleet::fabric(Fabric::build(tag, true));
        fleet.proxies = fleet
            .fabric
            .proxies
            .iter()
            .map(|ns| Proxy::start_with(Path::new(BIN), text, &["ip", "netns", "exec", ns]))
            .collect();
        fleet
    }

    /// The fabric, its backends and clients; no proxy yet.
    fn fabric(fabric: Fabric) -> Fleet {
        let backends = in_ns(&fabric.backend, || {
            (0..4u16)
                .map(|b| {
                    let name = format!("b{}", b + 1);
                    Backend::start_on(&name, &backend_addr(4001 + b).to_string())
                })
                .collect()
        });
        let clients = in_ns(&fabric.client, || {
            (0..CIDS as usize * PORTS_PER_CID)
                .map(|_| {
                    let s = UdpSocket::bind("192.0.2.2:0").expect("client socket");
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s
                })
                .collect()
        });
        Fleet {
            speakers: Vec::new(),
            proxies: Vec::new(),
            bgp_dir: None,
            backends,
            clients,
            fabric,
        }
    }

    /// The fabric with a BGP speaker in every namespace: the router (BIRD)
    /// merges what the hosts announce into one ECMP route. Host
    /// [`EXABGP_HOST`] runs the packaged exabgp.conf, whose healthcheck
    /// runs `udpshard health`; the others run the packaged bird.conf and
    /// udpshard-bgp-follow, which turns the announcement on while `udpshard
    /// health` says ready. Asserts that nothing is announced before the
    /// proxies serve, then starts them and waits for the route through all
    /// three.
    fn start_bgp(tag: &str, speakers: &Speakers, text: &str) -> Fleet {
        let mut fleet = Fleet::fabric(Fabric::build(tag, false));
        let dir = TempDir::new("bgp");
        let d = dir.path().to_path_buf();
        let packaged = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/");
        let template = |file: &str| {
            std::fs::read_to_string(format!("{packaged}{file}"))
                .unwrap_or_else(|e| panic!("packaging/{file}: {e}"))
        };
        let mut router = String::from(
            "log stderr all;\nrouter id 192.0.2.1;\nprotocol device {\n}\n\
             protocol kernel {\n\tipv4 { import none; export all; };\n\tmerge paths on;\n}\n\
             template bgp host {\n\tlocal as 65000;\n\tipv4 { import all; export none; };\n\
             \thold time 9;\n\tconnect delay time 1;\n\tconnect retry time 2;\n}\n",
        );
        for i in 0..INSTANCES {
            let me = format!("198.51.100.{}", 4 * i + 2);
            router +=
                &format!("protocol bgp proxy{i} from host {{\n\tneighbor {me} as 65001;\n}}\n");
            let ns = fleet.fabric.proxies[i].clone();
            let stats = d.join(format!("stats{i}")).display().to_string();
            let addresses =
                |conf: String| conf.replace("10.0.0.5", &me).replace("10.0.0.1", &hop(i));
            if let (EXABGP_HOST, Some(exabgp)) = (i, speakers.exabgp) {
                let conf = addresses(template("exabgp/exabgp.conf")).replace(
                    "udpshard health",
                    &format!("{BIN} health --stats-file {stats}"),
                );
                let file = d.join("exabgp.conf");
                std::fs::write(&file, conf).expect("write the ExaBGP config");
                fleet.speakers.push(Daemon::start(
                    &d.join("exabgp.log"),
                    &[
                        "env",
                        "exabgp_daemon_user=root",
                        "exabgp_daemon_daemonize=false",
                        "exabgp_api_cli=false",
                        "exabgp_log_destination=stdout",
                        "ip",
                        "netns",
                        "exec",
                        &ns,
                    ],
                    exabgp,
                    &[&file.display().to_string()],
                ));
                continue;
            }
            let conf = format!("log stderr all;\n{}", addresses(template("bird/bird.conf")));
            let (speaker, sock) = Daemon::bird(speakers.bird, &d, &format!("bird{i}"), &ns, &conf);
            fleet.speakers.push(speaker);
            fleet.speakers.push(Daemon::start(
                &d.join(format!("follow{i}.log")),
                &["ip", "netns", "exec", &ns, "sh"],
                Path::new(&format!("{packaged}bird/udpshard-bgp-follow")),
                &[
                    "--udpshard",
                    BIN,
                    "--stats-file",
                    &stats,
                    "--socket",
                    &sock.display().to_string(),
                    "--interval",
                    "0.1",
                ],
            ));
        }
        let r = fleet.fabric.router.clone();
        let (speaker, router_sock) = Daemon::bird(speakers.bird, &d, "router", &r, &router);
        fleet.speakers.push(speaker);
        let established = || {
            let out = Command::new("birdc")
                .args([
                    "-s",
                    &router_sock.display().to_string(),
                    "show",
                    "protocols",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            out.matches("Established").count()
        };
        wait_until(WAIT * 2, "the router's 3 BGP sessions established", || {
            established() == INSTANCES
        });
        assert_eq!(
            fleet.fabric.nexthops(),
            Vec::<usize>::new(),
            "a host was announced before its proxy served"
        );
        fleet.proxies = (0..INSTANCES)
            .map(|i| {
                let stats = d.join(format!("stats{i}")).display().to_string();
                let ns = fleet.fabric.proxies[i].clone();
                let mut p = Proxy::start_with(
                    Path::new(BIN),
                    &text.replace("{stats_file}", &stats),
                    &["ip", "netns", "exec", &ns],
                );
                // The follower reads this file: the test chose it.
                p.stats_file = stats.into();
                p
            })
            .collect();
        let deadline = Instant::now() + WAIT;
        while fleet.fabric.nexthops() != (0..INSTANCES).collect::<Vec<_>>() {
            if Instant::now() > deadline {
                panic!(
                    "no ECMP route through every host within {WAIT:?}: {:?}\n{}",
                    fleet.fabric.nexthops(),
                    speaker_logs(&d)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        fleet.bgp_dir = Some(dir);
        fleet
    }

    fn at_backends(&self) -> usize {
        self.backends.iter().map(Backend::count).sum()
    }

    /// Sends CIDs `cids[k]` from their 4 sockets in turn (`tag` in each
    /// datagram), waits for every one at a backend and every echo at its
    /// client socket. Returns CID -> (backends that got it, instances that
    /// carried it).
    fn drive(&self, cids: &[u64], tag: &str) -> HashMap<u64, (HashSet<String>, HashSet<usize>)> {
        let vip: SocketAddr = format!("{VIP}:{PORT}").parse().unwrap();
        let before = self.at_backends();
        for round in 0..PORTS_PER_CID {
            for (k, cid) in cids.iter().enumerate() {
                let body = format!("{tag}{round}");
                self.clients[k * PORTS_PER_CID + round]
                    .send_to(&quic_short(*cid, body.as_bytes()), vip)
                    .unwrap();
            }
        }
        let want = before + cids.len() * PORTS_PER_CID;
        wait_until(WAIT, "every datagram at a backend", || {
            self.at_backends() >= want
        });
        assert_eq!(self.at_backends(), want, "no datagram twice");
        let mut buf = [0u8; 256];
        for k in 0..cids.len() * PORTS_PER_CID {
            let (n, from) = self.clients[k].recv_from(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "no echo at client socket {k} (CID {:x}): {e}; drops: {}",
                    cids[k / PORTS_PER_CID],
                    self.drops()
                )
            });
            assert_eq!(from, vip, "the echo comes from the service address");
            let echo = &buf[..n];
            assert!(
                echo.windows(tag.len()).any(|w| w == tag.as_bytes()),
                "not an echo of this round: {echo:?}"
            );
        }
        let wanted: HashSet<u64> = cids.iter().copied().collect();
        let mut out: HashMap<u64, (HashSet<String>, HashSet<usize>)> = HashMap::new();
        for b in &self.backends {
            for seen in b.seen() {
                let cid = u64::from_be_bytes(seen.payload[1..9].try_into().unwrap());
                let body = &seen.payload[9..];
                if !wanted.contains(&cid) || !body.starts_with(tag.as_bytes()) {
                    continue;
                }
                let instance = (0..INSTANCES)
                    .find(|&i| seen.from.ip().to_string() == format!("198.51.100.{}", 4 * i + 2))
                    .unwrap_or_else(|| panic!("from {}: not an instance", seen.from));
                let e = out.entry(cid).or_default();
                e.0.insert(b.name.clone());
                e.1.insert(instance);
            }
        }
        assert_eq!(out.len(), cids.len());
        out
    }

    /// SIGTERM on host `i` (systemctl stop, `withdraw_delay` 3 s): waits
    /// until the router's ECMP route goes through `left` alone, which must
    /// happen within the delay. Returns when the signal went and how long
    /// the withdrawal took.
    fn stop_host(&self, i: usize, left: &[usize]) -> (Instant, Duration) {
        let stop = Instant::now();
        self.proxies[i].signal(libc::SIGTERM);
        wait_until(
            WAIT,
            &format!("host {i}'s route withdrawn at the router"),
            || self.fabric.nexthops() == left,
        );
        let withdrawn = stop.elapsed();
        assert!(
            withdrawn < Duration::from_secs(3),
            "the route went {withdrawn:?} after SIGTERM: past withdraw_delay (3s)"
        );
        (stop, withdrawn)
    }

    /// Every host's drop counts, by reason, for a failure message.
    fn drops(&self) -> String {
        let mut out = Vec::new();
        for (i, p) in self.proxies.iter().enumerate() {
            let stats = p.stats();
            let mut by_reason: HashMap<String, u64> = HashMap::new();
            for w in stats["workers"].as_array().into_iter().flatten() {
                for (reason, n) in w["drops"].as_object().into_iter().flatten() {
                    *by_reason.entry(reason.clone()).or_default() += n.as_u64().unwrap_or(0);
                }
            }
            by_reason.retain(|_, n| *n > 0);
            out.push(format!("host {i} {by_reason:?}"));
        }
        out.join("; ")
    }

    fn carried(&self, i: usize) -> u64 {
        total(&self.proxies[i].stats(), "rx_packets")
    }
}

/// A process the test starts (`wrapper... program args...`), its output in
/// `log`; killed when dropped.
struct Daemon {
    child: std::process::Child,
}

impl Daemon {
    /// BIRD in namespace `ns` on config `conf`, its files in `dir` named
    /// `name`.*; and its control socket.
    fn bird(bird: &Path, dir: &Path, name: &str, ns: &str, conf: &str) -> (Daemon, PathBuf) {
        let file = |ext: &str| dir.join(format!("{name}.{ext}")).display().to_string();
        std::fs::write(file("conf"), conf).expect("write a BIRD config");
        let daemon = Daemon::start(
            Path::new(&file("log")),
            &["ip", "netns", "exec", ns],
            bird,
            &[
                "-f",
                "-c",
                &file("conf"),
                "-s",
                &file("ctl"),
                "-P",
                &file("pid"),
            ],
        );
        (daemon, PathBuf::from(file("ctl")))
    }

    fn start(log: &Path, wrapper: &[&str], program: &Path, args: &[&str]) -> Daemon {
        let out = File::create(log).expect("a log file");
        let err = out.try_clone().expect("a log file");
        let child = Command::new(wrapper[0])
            .args(&wrapper[1..])
            .arg(program)
            .args(args)
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        Daemon { child }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The speakers' logs in `dir`, for a failure message.
fn speaker_logs(dir: &Path) -> String {
    let mut out = String::new();
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        out += &format!("--- {}\n", log.display());
        for line in tail.iter().rev() {
            out += line;
            out += "\n";
        }
    }
    out
}

fn split(routes: &HashMap<u64, (HashSet<String>, HashSet<usize>)>) -> Vec<u64> {
    let mut v: Vec<u64> = routes
        .iter()
        .filter(|(_, (b, _))| b.len() > 1)
        .map(|(c, _)| *c)
        .collect();
    v.sort();
    v
}

fn maglev(backends: usize) -> Maglev {
    let names: Vec<(String, u32)> = (0..backends)
        .map(|b| (backend_addr(4001 + b as u16).to_string(), 1))
        .collect();
    Maglev::new(&names, 65537).unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_fleet_behind_ecmp_routes_every_cid_to_one_backend_through_drains_and_rolling_reloads() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let fleet = Fleet::start("m", &config(3, false));
    let cids: Vec<u64> = (1..=CIDS)
        .map(|c| c.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();

    // 1. Every datagram of a CID reaches one backend, whichever instance
    //    carried it, and that is the backend Maglev names for it.
    let first = fleet.drive(&cids, "one");
    assert!(
        split(&first).is_empty(),
        "CIDs split over backends: {:?}",
        split(&first)
    );
    let m3 = maglev(3);
    for (cid, (b, _)) in &first {
        let want = format!("b{}", m3.backend_for(&cid.to_be_bytes()) + 1);
        assert!(
            b.contains(&want),
            "CID {cid:x} at {b:?}, Maglev says {want}"
        );
    }
    // `udpshard route` on each host's own config says the same, no traffic
    // needed.
    for cid in cids.iter().take(12) {
        let hex = format!("{cid:016x}");
        let backend = first[cid].0.iter().next().unwrap().clone();
        let port = 4000 + backend[1..].parse::<u16>().unwrap();
        for p in &fleet.proxies {
            let out = Command::new(BIN)
                .args(["route", "--config"])
                .arg(&p.config_path)
                .arg(&hex)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout.contains(&format!(
                    "-> backend {} {}",
                    port - 4001,
                    backend_addr(port)
                )),
                "route {hex} on {}: {stdout}",
                p.config_path.display()
            );
        }
    }
    let crossed = first.values().filter(|(_, i)| i.len() > 1).count();
    eprintln!("{crossed} of {CIDS} CIDs crossed instances");
    assert!(
        crossed > CIDS as usize / 2,
        "the fabric moved too few CIDs: {crossed}"
    );
    for i in 0..INSTANCES {
        assert!(fleet.carried(i) > 0, "instance {i} carried nothing");
    }

    // 2. Instance 2 leaves the route (a drained host): its CIDs continue on
    //    the others, on the same backends.
    fleet.fabric.route_through(&[0, 1]);
    let drained = fleet.carried(2);
    let second = fleet.drive(&cids, "two");
    assert_eq!(fleet.carried(2), drained, "a drained instance got traffic");
    for (cid, (b, _)) in &second {
        assert_eq!(
            b, &first[cid].0,
            "CID {cid:x} changed backend after the drain"
        );
    }

    // 3. A rolling reload adds backend 4: instance 0 first. Live sessions
    //    keep their backends everywhere; new CIDs whose Maglev slot moved
    //    (about 1/4) split while the instances disagree.
    reload(&fleet.proxies[0], &config(4, false), 2);
    let third = fleet.drive(&cids, "three");
    for (cid, (b, _)) in &third {
        assert_eq!(
            b, &first[cid].0,
            "live CID {cid:x} moved in the rolling window"
        );
    }
    let m4 = maglev(4);
    let fresh: Vec<u64> = (1..=CIDS)
        .map(|c| c.wrapping_mul(0xd1b5_4a32_d192_ed03))
        .collect();
    let moved: Vec<u64> = fresh
        .iter()
        .copied()
        .filter(|c| m3.backend_for(&c.to_be_bytes()) != m4.backend_for(&c.to_be_bytes()))
        .collect();
    let window = fleet.drive(&fresh, "window");
    let split_window = split(&window);
    eprintln!(
        "rolling window: {} of {CIDS} new CIDs map elsewhere under 4 backends, {} split between instances",
        moved.len(),
        split_window.len()
    );
    let share = moved.len() as f64 / CIDS as f64;
    assert!(
        (0.15..=0.35).contains(&share),
        "Maglev moved {share:.2} of the keys"
    );
    assert!(
        split_window.iter().all(|c| moved.contains(c)),
        "only CIDs whose slot moved may split"
    );
    assert!(
        !split_window.is_empty(),
        "the window showed no disagreement"
    );
    // Once every instance runs the new list, new CIDs agree again.
    reload(&fleet.proxies[1], &config(4, false), 2);
    reload(&fleet.proxies[2], &config(4, false), 2);
    let later: Vec<u64> = (1..=CIDS)
        .map(|c| c.wrapping_mul(0xa076_1d64_78bd_642f))
        .collect();
    let after = fleet.drive(&later, "after");
    assert!(
        split(&after).is_empty(),
        "split after the rollout: {:?}",
        split(&after)
    );
    for (cid, (b, _)) in &after {
        let want = format!("b{}", m4.backend_for(&cid.to_be_bytes()) + 1);
        assert_eq!(b.iter().next(), Some(&want), "CID {cid:x}");
    }
}

#[test]
fn a_fleet_behind_ecmp_sends_quic_lb_server_ids_to_their_server_from_any_instance() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let fleet = Fleet::start("q", &config(4, true));
    // CIDs naming server k (first octet: config 0), a nonce after it.
    let cids: Vec<u64> = (0..CIDS)
        .map(|n| {
            let server = (n % 4) + 1;
            (server << 32) | (n.wrapping_mul(0x9e37_79b9) & 0xffff_ffff)
        })
        .collect();
    let routes = fleet.drive(&cids, "lb");
    for (cid, (b, instances)) in &routes {
        let want = format!("b{}", (cid >> 32) & 0xff);
        assert_eq!(b.len(), 1, "CID {cid:016x} split: {b:?}");
        assert!(
            b.contains(&want),
            "CID {cid:016x} at {b:?}, its server ID says {want}"
        );
        assert!(!instances.is_empty());
    }
    let crossed = routes.values().filter(|(_, i)| i.len() > 1).count();
    assert!(
        crossed > CIDS as usize / 2,
        "the fabric moved too few CIDs: {crossed}"
    );
    for i in 0..INSTANCES {
        assert!(fleet.carried(i) > 0, "instance {i} carried nothing");
    }
}

#[test]
fn a_fleet_announced_by_bgp_withdraws_a_stopping_host_before_it_drains_and_loses_nothing() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let Some(bird) = installed("/usr/sbin/bird", "bird2") else {
        return;
    };
    let exabgp = installed("/usr/sbin/exabgp", "exabgp");
    if exabgp.is_none() {
        eprintln!("host {EXABGP_HOST} runs BIRD instead of ExaBGP");
    }
    let speakers = Speakers { bird, exabgp };
    let text = format!(
        "withdraw_delay = \"3s\"\ndrain_timeout = \"1s\"\n{}",
        config(3, false)
    );
    let mut fleet = Fleet::start_bgp("g", &speakers, &text);
    let cids: Vec<u64> = (1..=CIDS)
        .map(|c| c.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let before = fleet.drive(&cids, "one");
    for i in 0..INSTANCES {
        assert!(fleet.carried(i) > 0, "host {i} carried nothing");
    }

    // A rolling binary upgrade, host by host, with every flow driven while
    // it runs: each host stays announced (ready) throughout, and every
    // datagram of every round is answered, on its flow's backend.
    for i in 0..INSTANCES {
        let began = Instant::now();
        let upgrade = fleet.proxies[i].begin_upgrade();
        let mut rounds = 0;
        loop {
            assert_eq!(
                fleet.fabric.nexthops(),
                (0..INSTANCES).collect::<Vec<_>>(),
                "host {i} left the route in its upgrade"
            );
            let round = fleet.drive(&cids, &format!("u{i}r{rounds:03}-"));
            for cid in &cids {
                assert_eq!(
                    round[cid].0, before[cid].0,
                    "CID {cid:x} changed backend in host {i}'s upgrade"
                );
            }
            rounds += 1;
            if rounds >= 2 && fleet.proxies[i].upgraded(&upgrade) {
                break;
            }
            assert!(began.elapsed() < WAIT, "host {i}'s upgrade never took over");
        }
        let taken = began.elapsed();
        let stats = fleet.proxies[i].finish_upgrade(upgrade, WAIT);
        assert_eq!(stats["upgrade_failures"], 0, "host {i}: {stats:#}");
        assert_eq!(
            fleet.fabric.nexthops(),
            (0..INSTANCES).collect::<Vec<_>>(),
            "host {i} left the route in its upgrade"
        );
        println!(
            "SIGUSR2 on host {i}: taken over within {taken:?}, {rounds} rounds of {} datagrams \
             answered meanwhile, the route unchanged",
            cids.len() * PORTS_PER_CID
        );
    }
    for (i, p) in fleet.proxies.iter().enumerate() {
        let stats = p.stats();
        for drop in ["stray", "worker_lost", "handoff", "draining"] {
            assert_eq!(
                total(&stats, &format!("drops.{drop}")),
                0,
                "host {i} after the rolling upgrade: {stats:#}"
            );
        }
    }

    // systemctl stop on host 1: not ready at once, still serving; its
    // follower disables the announcement, and the router drops the hop.
    let (stop, withdrawn) = fleet.stop_host(1, &[0, 2]);
    let during = fleet.drive(&cids, "two");
    // It is the upgraded supervisor, not this test's child: it is gone, and
    // its stats say it stopped (below).
    fleet.proxies[1].wait_gone(WAIT);
    let exited = stop.elapsed();
    let after = fleet.drive(&cids, "three");
    println!(
        "SIGTERM on host 1: its route left the router's ECMP route after {withdrawn:?}; \
         it drained and exited after {exited:?}"
    );
    // Every flow answered in every round (drive checks each datagram and
    // echo), each on the one backend it had, the last two without host 1.
    for cid in &cids {
        let (b0, _) = &before[cid];
        let (b1, i1) = &during[cid];
        let (b2, i2) = &after[cid];
        assert_eq!(b0.len(), 1, "CID {cid:x} split: {b0:?}");
        assert_eq!((b0, b0), (b1, b2), "CID {cid:x} changed backend");
        assert!(
            !i1.contains(&1) && !i2.contains(&1),
            "CID {cid:x} through host 1"
        );
    }
    // Its last counters (it has exited: `stats` says so, exit 3): no new
    // flow was refused while it withdrew, and none reached it while it
    // drained.
    let out = Command::new(BIN)
        .args(["stats", "--json", "--stats-file"])
        .arg(&fleet.proxies[1].stats_file)
        .output()
        .expect("udpshard stats");
    assert_eq!(out.status.code(), Some(3), "not running");
    let host1: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(total(&host1, "drops.draining"), 0, "{host1:#}");

    // The same on host 2, announced by ExaBGP's healthcheck (BIRD where
    // ExaBGP is missing): withdrawn within the delay, and every flow
    // answers through host 0 alone.
    let (_, withdrawn) = fleet.stop_host(EXABGP_HOST, &[0]);
    let last = fleet.drive(&cids, "four");
    fleet.proxies[EXABGP_HOST].wait_gone(WAIT);
    println!(
        "SIGTERM on host 2 ({}): its route left the router's ECMP route after {withdrawn:?}",
        if speakers.exabgp.is_some() {
            "ExaBGP"
        } else {
            "BIRD"
        }
    );
    for cid in &cids {
        let (b, i) = &last[cid];
        assert_eq!(b, &before[cid].0, "CID {cid:x} changed backend");
        assert_eq!(
            i,
            &HashSet::from([0]),
            "CID {cid:x} not through host 0 alone"
        );
    }
}
