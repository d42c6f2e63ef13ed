//! `udpshard doctor`: reads what an operator would read by hand when UDP
//! drops (the buffer sysctls, UDP's drop counters, the CPU set and quota, the
//! fd limit, conntrack) and prints, for each problem, what it saw and the
//! exact line that fixes it.
//!
//! Gathering (`Facts::gather`, files and syscalls) is separate from judging
//! (`diagnose`, a pure function of the config and the facts), so every rule
//! is unit-tested without touching the host.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use udpshard_config::{self as config, Config, Workers};

use crate::system::{parse_snmp6_udp, parse_snmp_udp, read_u64};

/// What the packaged sysctl.d drop-in sets (packaging/sysctl.d): the values
/// the fixes propose.
pub(crate) const RMEM_DEFAULT: u64 = 2 << 20;
pub(crate) const NETDEV_MAX_BACKLOG: u64 = 50_000;
/// Below this the per-CPU backlog overflows at modest packet rates.
const NETDEV_BACKLOG_FLOOR: u64 = 10_000;
/// conntrack this full is about to drop new flows.
const CONNTRACK_FULL: f64 = 0.8;
const SAMPLE: Duration = Duration::from_secs(1);

/// The host as doctor saw it; `None` where the host does not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Facts {
    pub rmem_max: Option<u64>,
    pub rmem_default: Option<u64>,
    pub netdev_max_backlog: Option<u64>,
    /// net.ipv4.udp_mem: min, pressure, max, in pages.
    pub udp_mem: Option<[u64; 3]>,
    pub page_size: u64,
    /// UDP RcvbufErrors gained (IPv4 + IPv6) over `SAMPLE`.
    pub rcvbuf_errors_growth: Option<u64>,
    pub allowed_cpus: usize,
    /// The CPU quota, in CPUs, and the file it came from.
    pub cpu_quota: Option<(f64, String)>,
    /// RLIMIT_NOFILE (soft, hard).
    pub nofile: Option<(u64, u64)>,
    /// net.ipv4.ip_local_port_range and ip_local_reserved_ports.
    pub ephemeral: (u16, u16),
    pub reserved: Vec<std::ops::RangeInclusive<u16>>,
    /// nf_conntrack_count, nf_conntrack_max.
    pub conntrack: Option<(u64, u64)>,
    /// The proxy runs (or, when none runs, this doctor runs) as a systemd
    /// service: limits are set in the unit, not in a shell.
    pub systemd: bool,
    /// Sockets of other programs inside a listener's `upstream_ports`.
    pub foreign_ports: Vec<ForeignPort>,
}

/// A socket another program holds on a port of a listener's range, where
/// the proxy's bind of that port would fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ForeignPort {
    pub listener: String,
    pub local: std::net::SocketAddr,
    /// "pid N (comm)", or who owns it where the process is not visible.
    pub owner: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    pub saw: String,
    pub fix: String,
    /// How to keep the fix across reboots, where `fix` does not.
    pub keep: Option<String>,
}

/// The sysctl.d file doctor's `keep:` lines write to: read after the
/// package's own /usr/lib/sysctl.d/60-udpshard.conf, so it wins.
const LOCAL_SYSCTL: &str = "/etc/sysctl.d/99-udpshard-local.conf";

/// A sysctl finding: `sysctl -w` now, a line in sysctl.d for the next boot.
fn sysctl_finding(saw: String, key: &str, value: &str) -> Finding {
    Finding {
        saw,
        fix: format!("sysctl -w {key}={value}"),
        keep: Some(format!("echo '{key} = {value}' >> {LOCAL_SYSCTL}")),
    }
}

/// Full-size (1472-byte) datagrams a receive buffer of `bytes` holds: each
/// is charged its kernel buffer, about 2304 bytes (measured on loopback:
/// 92 in the kernel's default 212992).
pub(crate) fn full_size_datagrams(bytes: u64) -> u64 {
    bytes / 2304
}

pub(crate) fn run(path: Option<&Path>) -> ExitCode {
    let (cfg, origin) = match path {
        Some(p) => match config::load(p) {
            Ok(cfg) => (cfg, p.display().to_string()),
            Err(e) => {
                eprintln!("udpshard doctor: {e}");
                return ExitCode::from(2);
            }
        },
        None => (
            config::default_config(),
            config::DEFAULT_CONFIG_ORIGIN.to_string(),
        ),
    };
    println!(
        "udpshard doctor: checking this host for {origin} (sampling UDP drops for {}s)",
        SAMPLE.as_secs()
    );
    let facts = Facts::gather(&cfg);
    let findings = diagnose(&cfg, &facts);
    for f in &findings {
        println!("finding: {}\n    fix: {}", f.saw, f.fix);
        if let Some(keep) = &f.keep {
            println!("   keep: {keep}");
        }
    }
    if findings.is_empty() {
        println!("no findings");
        ExitCode::SUCCESS
    } else {
        println!("{} finding(s)", findings.len());
        ExitCode::FAILURE
    }
}

fn workers_for(cfg: &Config, allowed_cpus: usize) -> usize {
    match cfg.workers {
        Workers::Auto => allowed_cpus.max(1),
        Workers::Count(n) => n,
    }
}

/// Every finding, in path order (buffers, drops, CPUs, limits).
pub(crate) fn diagnose(cfg: &Config, facts: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    let workers = workers_for(cfg, facts.allowed_cpus) as u64;

    if let (Some(max), Some(l)) = (
        facts.rmem_max,
        cfg.listeners.iter().max_by_key(|l| l.recv_buffer),
    ) {
        let want = l.recv_buffer as u64;
        if max < want {
            out.push(sysctl_finding(
                format!(
                    "listener {:?} asks for recv_buffer = {want} bytes, but net.core.rmem_max = {max}: \
                     SO_RCVBUF is silently clamped to {max} (unless udpshard runs with CAP_NET_ADMIN)",
                    l.name
                ),
                "net.core.rmem_max",
                &want.to_string(),
            ));
        }
    }
    if let Some(d) = facts.rmem_default.filter(|d| *d < RMEM_DEFAULT) {
        out.push(sysctl_finding(
            format!(
                "net.core.rmem_default = {d}: every session's upstream socket gets this receive buffer, \
                 about {} full-size replies before a backend's burst is dropped",
                full_size_datagrams(d)
            ),
            "net.core.rmem_default",
            &RMEM_DEFAULT.to_string(),
        ));
    }
    if let Some(b) = facts
        .netdev_max_backlog
        .filter(|b| *b < NETDEV_BACKLOG_FLOOR)
    {
        out.push(sysctl_finding(
            format!(
                "net.core.netdev_max_backlog = {b}: a CPU's input backlog overflows (softnet_stat dropped) under bursts"
            ),
            "net.core.netdev_max_backlog",
            &NETDEV_MAX_BACKLOG.to_string(),
        ));
    }
    if let Some([min, pressure, max]) = facts.udp_mem {
        // A full listener socket holds about twice recv_buffer of kernel
        // memory (SO_RCVBUF is doubled for bookkeeping).
        let bytes: u64 = cfg
            .listeners
            .iter()
            .map(|l| 2 * l.recv_buffer as u64 * workers)
            .sum();
        let need = bytes.div_ceil(facts.page_size.max(1));
        if max < need {
            out.push(sysctl_finding(
                format!(
                    "net.ipv4.udp_mem max = {max} pages, but {workers} workers' full listener buffers need {need} pages: \
                     past it UDP drops on every socket"
                ),
                "net.ipv4.udp_mem",
                &format!("\"{} {} {}\"", min.min(need), pressure.max(need), 2 * need),
            ));
        }
    }
    if let Some(n) = facts.rcvbuf_errors_growth.filter(|n| *n > 0) {
        out.push(Finding {
            saw: format!(
                "UDP RcvbufErrors grew by {n} in {}s: some socket's receive buffer is overflowing right now",
                SAMPLE.as_secs()
            ),
            fix: "udpshard stats --watch 1   # marks the first stage whose drops grow; `ss -uamn` shows each socket's d<drops>".into(),
            keep: None,
        });
    }
    if let Workers::Count(n) = cfg.workers {
        if n > facts.allowed_cpus {
            out.push(Finding {
                saw: format!(
                    "workers = {n} but this process may run on {} CPUs (sched_getaffinity): workers share CPUs and compete",
                    facts.allowed_cpus
                ),
                fix: "workers = \"auto\"".into(),
                keep: None,
            });
        }
    }
    if let Some((quota, source)) = &facts.cpu_quota {
        if let Some((saw, fix)) = quota_finding(*quota, source, workers as usize) {
            out.push(Finding {
                saw,
                fix,
                keep: None,
            });
        }
    }
    // What the config can hold: upstream ports (and the host's ephemeral
    // ones), descriptors, the ownership table.
    let host = crate::capacity::Host {
        ephemeral: facts.ephemeral,
        reserved: facts.reserved.clone(),
        nofile: facts.nofile,
        systemd: facts.systemd,
    };
    let ceilings = crate::capacity::ceilings(cfg, workers as usize, facts.ephemeral);
    for f in crate::capacity::findings(cfg, &host)
        .into_iter()
        .chain(ceilings)
    {
        out.push(Finding {
            saw: f.saw,
            fix: f.fix,
            keep: None,
        });
    }
    for l in &cfg.listeners {
        let held: Vec<&ForeignPort> = facts
            .foreign_ports
            .iter()
            .filter(|f| f.listener == l.name)
            .collect();
        let (Some((lo, hi)), false) = (l.upstream_ports, held.is_empty()) else {
            continue;
        };
        out.push(Finding {
            saw: format!(
                "listener {:?}: {} port(s) of upstream_ports {lo}-{hi} are held by other programs: {}; \
                 the proxy's binds of them fail, and it leaves each alone a minute at a time",
                l.name,
                held.len(),
                listed(&held),
            ),
            fix: "stop or move those programs, or give udpshard a range nobody else binds \
                  (upstream_ports); keep other services off it (systemd: SocketBindDeny=)"
                .into(),
            keep: None,
        });
    }
    if let Some((count, max)) = facts.conntrack {
        if max > 0 && count as f64 >= CONNTRACK_FULL * max as f64 {
            out.push(sysctl_finding(
                format!(
                    "conntrack holds {count} of {max} entries: when full, new flows are dropped (dmesg: \"table full\")"
                ),
                "net.netfilter.nf_conntrack_max",
                &(max * 2).to_string(),
            ));
        }
    }
    out
}

impl Facts {
    /// Reads the host; takes `SAMPLE` (two readings of UDP's counters).
    pub(crate) fn gather(cfg: &Config) -> Facts {
        let sys = |p: &str| read_u64(Path::new(p));
        let host = crate::capacity::Host::read(false);
        let rcvbuf_before = rcvbuf_errors();
        std::thread::sleep(SAMPLE);
        let rcvbuf_after = rcvbuf_errors();
        Facts {
            rmem_max: sys("/proc/sys/net/core/rmem_max"),
            rmem_default: sys("/proc/sys/net/core/rmem_default"),
            netdev_max_backlog: sys("/proc/sys/net/core/netdev_max_backlog"),
            udp_mem: std::fs::read_to_string("/proc/sys/net/ipv4/udp_mem")
                .ok()
                .and_then(|t| parse_udp_mem(&t)),
            page_size: nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
                .ok()
                .flatten()
                .map_or(4096, |p| p as u64),
            rcvbuf_errors_growth: rcvbuf_before
                .zip(rcvbuf_after)
                .map(|(b, a)| a.saturating_sub(b)),
            allowed_cpus: crate::cpus::allowed_cpus().map_or(1, |c| c.len()),
            cpu_quota: cpu_quota(),
            nofile: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok(),
            ephemeral: host.ephemeral,
            reserved: host.reserved.clone(),
            conntrack: sys("/proc/sys/net/netfilter/nf_conntrack_count")
                .zip(sys("/proc/sys/net/netfilter/nf_conntrack_max")),
            systemd: under_systemd(&cfg.stats_file),
            foreign_ports: foreign_ports(cfg),
        }
    }
}

/// Logs the ports of each listener's `upstream_ports` that other programs
/// hold (at start: the proxy leaves each alone a minute at a time when its
/// bind fails there).
pub(crate) fn warn_foreign_ports(cfg: &Config) {
    let held = foreign_ports(cfg);
    if held.is_empty() {
        return;
    }
    tracing::warn!(
        "{} port(s) of upstream_ports are held by other programs: {}; binds there fail \
         (`udpshard doctor` lists them)",
        held.len(),
        listed(&held.iter().collect::<Vec<_>>()),
    );
}

/// The first five of `held`, each with its owner, then "..." if more.
fn listed(held: &[&ForeignPort]) -> String {
    let shown: Vec<String> = held
        .iter()
        .take(5)
        .map(|f| format!("{} ({})", f.local, f.owner))
        .collect();
    let more = if held.len() > shown.len() {
        ", ..."
    } else {
        ""
    };
    format!("{}{more}", shown.join(", "))
}

/// The UDP sockets of programs other than udpshard on ports of each
/// listener's `upstream_ports` (the ephemeral range, when unset, is
/// everybody's), on an address where a bind by the proxy would collide.
fn foreign_ports(cfg: &Config) -> Vec<ForeignPort> {
    let sockets = udpshard_shared::procnet::udp_sockets();
    let mut owners: Option<std::collections::HashMap<u64, (u32, String)>> = None;
    let mut out = Vec::new();
    for l in &cfg.listeners {
        let Some((lo, hi)) = l.upstream_ports else {
            continue;
        };
        let sources = udpshard_worker::upstream_sources(l);
        for s in &sockets {
            let port = s.local.port();
            let collides = sources.iter().any(|ip| {
                ip.is_ipv4() == s.local.is_ipv4()
                    && (ip.is_unspecified() || s.local.ip().is_unspecified() || *ip == s.local.ip())
            });
            if !(lo..=hi).contains(&port) || !collides {
                continue;
            }
            let owners = owners.get_or_insert_with(socket_owners);
            let owner = match owners.get(&s.inode) {
                Some((_, comm)) if comm == "udpshard" => continue,
                Some((pid, comm)) => format!("pid {pid} {comm}"),
                None => format!("uid {}, process not visible", s.uid),
            };
            out.push(ForeignPort {
                listener: l.name.clone(),
                local: s.local,
                owner,
            });
        }
    }
    out
}

/// Socket inode -> (pid, command name), for every process this one may see.
fn socket_owners() -> std::collections::HashMap<u64, (u32, String)> {
    let mut owners = std::collections::HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let comm = std::fs::read_to_string(p.path().join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            {
                owners.insert(inode, (pid, comm.clone()));
            }
        }
    }
    owners
}

/// Whether the proxy of this config runs as a systemd service (its
/// supervisor's cgroup is a system `.service`); with none running, whether
/// this doctor does (systemd sets INVOCATION_ID for its services).
fn under_systemd(stats_file: &Path) -> bool {
    let path = if stats_file == Path::new(config::DEFAULT_STATS_FILE) {
        crate::stats_path::find_default()
    } else {
        stats_file.to_path_buf()
    };
    let running = udpshard_shared::stats::Snapshot::read(&path)
        .ok()
        .filter(|snap| crate::stats_cmd::Liveness::of(snap) == crate::stats_cmd::Liveness::Running)
        .map(|snap| snap.header(udpshard_shared::stats::Header::SupervisorPid));
    match running {
        Some(pid) => std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|cg| is_system_service_cgroup(&cg)),
        None => std::env::var_os("INVOCATION_ID").is_some(),
    }
}

/// A cgroup (as /proc/PID/cgroup lists it) of a system service: the last
/// path component is a `.service` outside any user's manager.
fn is_system_service_cgroup(cgroup: &str) -> bool {
    cgroup.lines().any(|l| {
        let path = l.rsplit(':').next().unwrap_or("");
        !path.contains("/user@")
            && path
                .rsplit('/')
                .next()
                .is_some_and(|c| c.ends_with(".service"))
    })
}

fn rcvbuf_errors() -> Option<u64> {
    let v4 = std::fs::read_to_string("/proc/net/snmp")
        .ok()
        .and_then(|t| parse_snmp_udp(&t));
    let v6 = std::fs::read_to_string("/proc/net/snmp6")
        .ok()
        .and_then(|t| parse_snmp6_udp(&t));
    if v4.is_none() && v6.is_none() {
        return None;
    }
    Some([v4, v6].iter().flatten().map(|u| u.rcvbuf_errors).sum())
}

/// "575799\t767732\t1151598"
pub(crate) fn parse_udp_mem(text: &str) -> Option<[u64; 3]> {
    let v: Vec<u64> = text
        .split_whitespace()
        .map(|s| s.parse().ok())
        .collect::<Option<_>>()?;
    v.try_into().ok()
}

/// cgroup v2 cpu.max: "50000 100000" -> 0.5 CPUs; "max 100000" -> none.
pub(crate) fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let quota: u64 = parts.next()?.parse().ok()?;
    let period: u64 = parts.next().map_or(Some(100_000), |p| p.parse().ok())?;
    (period > 0).then(|| quota as f64 / period as f64)
}

/// cgroup v1: cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us.
pub(crate) fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let quota: i64 = quota.trim().parse().ok()?;
    let period: u64 = period.trim().parse().ok()?;
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

/// The directories of this process's cgroup and its ancestors, for the
/// hierarchy whose /proc/self/cgroup line matches `controller` (v2: the
/// `0::` line), under `mount`; the mount's root last. Inside a container the
/// listed path may not exist under the mount (the container sees its own
/// cgroup as the root), which the root entry covers.
fn cgroup_dirs(cgroup: &str, v2: bool, mount: &Path) -> Vec<PathBuf> {
    let path = cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if v2 {
            l.starts_with("0::")
        } else {
            controllers.split(',').any(|c| c == "cpu")
        };
        hit.then(|| path.to_string())
    });
    let mut dirs = Vec::new();
    if let Some(path) = path {
        let mut p = Path::new(path.trim_start_matches('/'));
        loop {
            dirs.push(mount.join(p));
            match p.parent() {
                Some(parent) if p != Path::new("") => p = parent,
                _ => break,
            }
        }
    }
    if !dirs.contains(&mount.to_path_buf()) {
        dirs.push(mount.to_path_buf());
    }
    dirs
}

/// At start: a CPU quota smaller than the workers started is logged as the
/// jitter it causes, with what `udpshard doctor` would say.
pub(crate) fn warn_cpu_quota(workers: usize) {
    if let Some((quota, source)) = cpu_quota() {
        if let Some((saw, fix)) = quota_finding(quota, &source, workers) {
            tracing::warn!("{saw}; fix: {fix}, or a CPU set instead of a quota (--cpuset-cpus)");
        }
    }
}

/// What a quota of `quota` CPUs over `workers` pinned workers causes, and
/// the fix; none when the quota covers them.
fn quota_finding(quota: f64, source: &str, workers: usize) -> Option<(String, String)> {
    (quota < workers as f64).then(|| {
        let fit = (quota.floor() as u64).max(1);
        (
            format!(
                "{source} allows {quota:.2} CPUs, but {workers} workers are pinned one per CPU: \
                 they will be throttled in bursts (queues fill while they sleep)"
            ),
            format!("workers = {fit}"),
        )
    })
}

/// The tightest CPU quota on this process's cgroup or its ancestors.
fn cpu_quota() -> Option<(f64, String)> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut best: Option<(f64, String)> = None;
    let mut consider = |q: Option<f64>, file: PathBuf| {
        if let Some(q) = q {
            if best.as_ref().is_none_or(|(b, _)| q < *b) {
                best = Some((q, file.display().to_string()));
            }
        }
    };
    for dir in cgroup_dirs(&cgroup, true, Path::new("/sys/fs/cgroup")) {
        let file = dir.join("cpu.max");
        let q = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| parse_cpu_max(&t));
        consider(q, file);
    }
    for mount in ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"] {
        for dir in cgroup_dirs(&cgroup, false, Path::new(mount)) {
            let file = dir.join("cpu.cfs_quota_us");
            let q = std::fs::read_to_string(&file).ok().and_then(|quota| {
                let period = std::fs::read_to_string(dir.join("cpu.cfs_period_us")).ok()?;
                parse_cfs(&quota, &period)
            });
            consider(q, file);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> Facts {
        Facts {
            rmem_max: Some(32 << 20),
            rmem_default: Some(2 << 20),
            netdev_max_backlog: Some(50_000),
            udp_mem: Some([575_799, 767_732, 1_151_598]),
            page_size: 4096,
            rcvbuf_errors_growth: Some(0),
            allowed_cpus: 2,
            cpu_quota: None,
            nofile: Some((2_000_000, 2_000_000)),
            ephemeral: (32768, 60999),
            reserved: vec![],
            conntrack: Some((10, 262_144)),
            systemd: false,
            foreign_ports: vec![],
        }
    }

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "{extra}\n[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"quic\"\n\
             recv_buffer = \"8MiB\"\nmax_sessions = 1000\nupstream_ports = \"20000-29999\"\nbackends = [\"127.0.0.1:4434\"]\n"
        );
        config::parse(&text, "t.toml").unwrap()
    }

    fn fixes(cfg: &Config, facts: &Facts) -> Vec<String> {
        diagnose(cfg, facts).into_iter().map(|f| f.fix).collect()
    }

    #[test]
    fn ports_other_programs_hold_in_the_range_are_named() {
        let c = cfg("");
        let mut f = clean();
        f.foreign_ports = (0..7)
            .map(|i| ForeignPort {
                listener: "q".into(),
                local: format!("127.0.0.1:{}", 20_000 + i).parse().unwrap(),
                owner: format!("pid {} nc", 100 + i),
            })
            .collect();
        let found = diagnose(&c, &f);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].saw.starts_with(
                "listener \"q\": 7 port(s) of upstream_ports 20000-29999 are held by other programs: \
                 127.0.0.1:20000 (pid 100 nc), 127.0.0.1:20001 (pid 101 nc)"
            ),
            "{}",
            found[0].saw
        );
        assert!(found[0].saw.contains("(pid 104 nc), ...;"), "five shown");
        // Another listener's ports are not this one's.
        f.foreign_ports[0].listener = "other".into();
        f.foreign_ports.truncate(1);
        assert_eq!(diagnose(&c, &f), vec![]);
    }

    #[test]
    fn a_clean_host_has_no_findings() {
        assert_eq!(diagnose(&cfg(""), &clean()), vec![]);
        // A host that says nothing has nothing to report either.
        let silent = Facts {
            allowed_cpus: 2,
            ..Facts::default()
        };
        assert_eq!(diagnose(&cfg(""), &silent), vec![]);
    }

    #[test]
    fn each_rule_prints_its_fix() {
        let c = cfg("");
        let mut f = clean();
        f.rmem_max = Some(212_992);
        assert_eq!(fixes(&c, &f), ["sysctl -w net.core.rmem_max=8388608"]);
        assert_eq!(
            diagnose(&c, &f)[0].keep.as_deref(),
            Some("echo 'net.core.rmem_max = 8388608' >> /etc/sysctl.d/99-udpshard-local.conf")
        );
        let mut f = clean();
        f.rmem_default = Some(212_992);
        assert_eq!(fixes(&c, &f), ["sysctl -w net.core.rmem_default=2097152"]);
        assert!(diagnose(&c, &f)[0]
            .saw
            .contains("about 92 full-size replies"));
        let mut f = clean();
        f.netdev_max_backlog = Some(1000);
        assert_eq!(
            fixes(&c, &f),
            ["sysctl -w net.core.netdev_max_backlog=50000"]
        );
        let mut f = clean();
        // 2 workers x 2 x 8MiB = 32MiB = 8192 pages.
        f.udp_mem = Some([1000, 2000, 4000]);
        assert_eq!(
            fixes(&c, &f),
            ["sysctl -w net.ipv4.udp_mem=\"1000 8192 16384\""]
        );
        let mut f = clean();
        f.rcvbuf_errors_growth = Some(12);
        assert!(fixes(&c, &f)[0].starts_with("udpshard stats --watch 1"));
        let f = clean();
        assert_eq!(fixes(&cfg("workers = 4"), &f)[0], "workers = \"auto\"");
        let mut f = clean();
        f.cpu_quota = Some((1.5, "/sys/fs/cgroup/cpu.max".into()));
        assert_eq!(fixes(&c, &f), ["workers = 1"]);
        // 1000 sessions, one backend: 1000 sockets, twice that with borrowed
        // copies, plus the overhead.
        let mut f = clean();
        f.nofile = Some((1024, 4096));
        assert!(fixes(&c, &f)[0].starts_with("ulimit -n 3024   #"));
        f.nofile = Some((1024, 1024));
        assert!(fixes(&c, &f)[0].starts_with("ulimit -Hn 3024 && ulimit -n 3024"));
        f.systemd = true;
        assert!(
            fixes(&c, &f)[0].starts_with("systemctl edit udpshard   # [Service] LimitNOFILE=3024")
        );
        // Upstream ports in the ephemeral range, unreserved.
        let mut f = clean();
        let c2 = cfg("").listeners[0].clone();
        let mut wide = cfg("");
        wide.listeners[0] = udpshard_config::Listener {
            upstream_ports: Some((30000, 40000)),
            ..c2
        };
        assert!(fixes(&wide, &f)[0]
            .starts_with("sysctl -w net.ipv4.ip_local_reserved_ports=32768-40000"));
        f.reserved = vec![32768..=40000];
        assert!(fixes(&wide, &f).is_empty());
        let mut f = clean();
        f.conntrack = Some((250_000, 262_144));
        assert_eq!(
            fixes(&c, &f),
            ["sysctl -w net.netfilter.nf_conntrack_max=524288"]
        );
    }

    #[test]
    fn system_services_are_told_from_user_sessions() {
        assert!(is_system_service_cgroup(
            "0::/system.slice/udpshard.service\n"
        ));
        assert!(!is_system_service_cgroup(
            "0::/user.slice/user-1000.slice/session-3.scope\n"
        ));
        assert!(!is_system_service_cgroup(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-term.service\n"
        ));
        assert!(!is_system_service_cgroup("0::/\n"));
    }

    #[test]
    fn parsers() {
        assert_eq!(
            parse_udp_mem("575799\t767732\t1151598\n"),
            Some([575_799, 767_732, 1_151_598])
        );
        assert_eq!(parse_udp_mem("1 2"), None);
        assert_eq!(parse_udp_mem("a b c"), None);
        assert_eq!(parse_cpu_max("50000 100000\n"), Some(0.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("200000\n", "100000\n"), Some(2.0));
        assert_eq!(parse_cfs("x", "100000"), None);
    }

    #[test]
    fn cgroup_paths() {
        let v2 = "0::/system.slice/udpshard.service\n";
        let dirs = cgroup_dirs(v2, true, Path::new("/sys/fs/cgroup"));
        assert_eq!(
            dirs,
            [
                PathBuf::from("/sys/fs/cgroup/system.slice/udpshard.service"),
                PathBuf::from("/sys/fs/cgroup/system.slice"),
                PathBuf::from("/sys/fs/cgroup"),
            ]
        );
        let v1 = "4:memory:/a\n2:cpu,cpuacct:/docker/abc\n";
        let dirs = cgroup_dirs(v1, false, Path::new("/m"));
        assert_eq!(dirs[0], PathBuf::from("/m/docker/abc"));
        assert_eq!(dirs.last(), Some(&PathBuf::from("/m")));
        assert_eq!(
            cgroup_dirs("", true, Path::new("/m")),
            [PathBuf::from("/m")]
        );
    }
}
