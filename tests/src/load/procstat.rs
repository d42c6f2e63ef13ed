//! What the kernel says about processes and UDP: the CPU time of a process tree (for "CPU per
//! forwarded datagram") and the host's UDP counters (where datagrams were dropped).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::time::Duration;

/// One line of `/proc/PID/stat`, the fields we use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    /// The command name (`comm`), without the parentheses.
    pub comm: String,
    pub ppid: u32,
    /// User and system time of all the process's threads, in clock ticks.
    pub utime: u64,
    pub stime: u64,
}

impl ProcStat {
    fn ticks(&self) -> u64 {
        self.utime + self.stime
    }
}

/// Parses `/proc/PID/stat`. The command name (field 2) may hold spaces and parentheses, so
/// the fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, tail) = text.rsplit_once(')')?;
    let (pid, comm) = head.split_once('(')?;
    // After the name: state(3) ppid(4) pgrp session tty_nr tpgid flags minflt cminflt majflt
    // cmajflt utime(14) stime(15).
    let fields: Vec<&str> = tail.split_whitespace().take(13).collect();
    Some(ProcStat {
        pid: pid.trim().parse().ok()?,
        comm: comm.to_string(),
        ppid: fields.get(1)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on every Linux we know of).
pub fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as u64,
        _ => 100,
    }
}

/// Every live process, from `/proc/*/stat`. Processes that exit during the scan are left out.
pub fn all_processes() -> io::Result<Vec<ProcStat>> {
    let mut stats = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(stat) = read_stat(pid) {
            stats.push(stat);
        }
    }
    Ok(stats)
}

/// Sum of user and system CPU time of `root` and every live descendant (children whose
/// parent chain leads to `root`). Resolution is one clock tick (10 ms at 100 Hz).
pub fn tree_cpu_time(root: u32) -> io::Result<Duration> {
    read_stat(root)?;
    let stats = all_processes()?;
    let ticks = tree_pids(root, &stats)
        .iter()
        .filter_map(|pid| stats.iter().find(|s| s.pid == *pid))
        .map(ProcStat::ticks)
        .sum();
    Ok(ticks_to_duration(ticks, clock_ticks()))
}

/// `root` and its descendants among `stats` (empty if `root` is not there).
pub fn tree_pids(root: u32, stats: &[ProcStat]) -> HashSet<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for stat in stats.iter().filter(|s| s.pid != root) {
        children.entry(stat.ppid).or_default().push(stat.pid);
    }
    let mut tree = HashSet::new();
    if !stats.iter().any(|s| s.pid == root) {
        return tree;
    }
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        if tree.insert(pid) {
            todo.extend(children.get(&pid).into_iter().flatten().copied());
        }
    }
    tree
}

/// The parent of every kernel thread.
const KTHREADD: u32 = 2;

/// Every process's CPU ticks and the host's busy ticks at one moment.
#[derive(Clone, Debug)]
pub struct CpuSnapshot {
    procs: Vec<ProcStat>,
    host: HostTicks,
}

/// Where the CPU time between two snapshots went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuUse {
    /// The process tree under test (a proxy and its workers).
    pub tree: Duration,
    /// The observing process itself (a load generator and its sink).
    pub own: Duration,
    /// The `ksoftirqd/N` threads: packet processing the kernel moved out of the senders'
    /// context under load, nobody's process time.
    pub softirq_threads: Duration,
    /// Other kernel threads (children of kthreadd): kworkers, RCU, memory management.
    pub kernel_threads: Duration,
    /// Every other process: a compiler, another test. Large values mean disturbed figures.
    pub other_processes: Duration,
    /// Host busy time in no live process: interrupts and softirqs that ran on an idle CPU,
    /// and processes that exited between the snapshots (their time left /proc with them).
    pub unattributed: Duration,
    /// Time the hypervisor ran something else while this machine had work for its CPUs
    /// (`steal` in /proc/stat), summed over the CPUs. Nobody here spent it, but it disturbs
    /// every figure: the generator slips and the queues it feeds grow meanwhile.
    pub steal: Duration,
    /// The biggest of `other_processes`, by command name, largest first (at most 3).
    pub top_others: Vec<(String, Duration)>,
}

impl CpuSnapshot {
    pub fn take() -> io::Result<CpuSnapshot> {
        let text = fs::read_to_string("/proc/stat")?;
        let host = parse_host_ticks(&text).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "no cpu line in /proc/stat")
        })?;
        Ok(CpuSnapshot {
            procs: all_processes()?,
            host,
        })
    }

    /// Splits the CPU time since `earlier` between the tree under `tree_root`, the process
    /// `own`, the softirq threads and the rest. The tree is the one alive now; a process that
    /// exited in between is not counted (its time is not in /proc any more).
    pub fn since(&self, earlier: &CpuSnapshot, tree_root: u32, own: u32) -> CpuUse {
        let before: HashMap<u32, &ProcStat> = earlier.procs.iter().map(|s| (s.pid, s)).collect();
        let tree = tree_pids(tree_root, &self.procs);
        let (mut in_tree, mut in_own, mut in_softirq, mut in_kernel, mut in_others) =
            (0, 0, 0, 0, 0);
        let mut others: HashMap<&str, u64> = HashMap::new();
        for stat in &self.procs {
            // A reused pid (different command) is a new process: all its time is new.
            let then = before
                .get(&stat.pid)
                .filter(|b| b.comm == stat.comm)
                .map_or(0, |b| b.ticks());
            let ticks = stat.ticks().saturating_sub(then);
            if tree.contains(&stat.pid) {
                in_tree += ticks;
            } else if stat.pid == own {
                in_own += ticks;
            } else if stat.comm.starts_with("ksoftirqd/") {
                in_softirq += ticks;
            } else if stat.pid == KTHREADD || stat.ppid == KTHREADD {
                in_kernel += ticks;
            } else if ticks > 0 {
                in_others += ticks;
                *others.entry(stat.comm.as_str()).or_default() += ticks;
            }
        }
        let host = self.host.busy.saturating_sub(earlier.host.busy);
        let attributed = in_tree + in_own + in_softirq + in_kernel + in_others;
        let hz = clock_ticks();
        let mut top_others: Vec<(&str, u64)> = others.into_iter().collect();
        top_others.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        CpuUse {
            tree: ticks_to_duration(in_tree, hz),
            own: ticks_to_duration(in_own, hz),
            softirq_threads: ticks_to_duration(in_softirq, hz),
            kernel_threads: ticks_to_duration(in_kernel, hz),
            other_processes: ticks_to_duration(in_others, hz),
            unattributed: ticks_to_duration(host.saturating_sub(attributed), hz),
            steal: ticks_to_duration(self.host.steal.saturating_sub(earlier.host.steal), hz),
            top_others: top_others
                .into_iter()
                .take(3)
                .map(|(comm, ticks)| (comm.to_string(), ticks_to_duration(ticks, hz)))
                .collect(),
        }
    }
}

/// The host's CPU ticks at one moment, summed over its CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostTicks {
    /// Time this machine ran something: user, nice, system, irq and softirq.
    pub busy: u64,
    /// Time the hypervisor gave this machine's CPUs to another guest while they had work.
    pub steal: u64,
}

/// The aggregate `cpu` line: user nice system idle iowait irq softirq steal ...
pub fn parse_host_ticks(text: &str) -> Option<HostTicks> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    Some(HostTicks {
        busy: field(0) + field(1) + field(2) + field(5) + field(6),
        steal: field(7),
    })
}

/// Reads and parses `/proc/PID/stat`.
pub fn read_stat(pid: u32) -> io::Result<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse /proc/{pid}/stat"),
        )
    })
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    let per_second = per_second.max(1);
    Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

/// The host's UDP counters from `/proc/net/snmp` (this network namespace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpCounters {
    pub in_datagrams: u64,
    pub no_ports: u64,
    pub in_errors: u64,
    pub out_datagrams: u64,
    /// Datagrams dropped because a socket's receive buffer was full.
    pub rcvbuf_errors: u64,
    pub sndbuf_errors: u64,
}

impl UdpCounters {
    pub fn read() -> io::Result<UdpCounters> {
        let text = fs::read_to_string("/proc/net/snmp")?;
        parse_snmp_udp(&text).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "no Udp lines in /proc/net/snmp")
        })
    }

    pub fn since(&self, earlier: &UdpCounters) -> UdpCounters {
        UdpCounters {
            in_datagrams: self.in_datagrams.saturating_sub(earlier.in_datagrams),
            no_ports: self.no_ports.saturating_sub(earlier.no_ports),
            in_errors: self.in_errors.saturating_sub(earlier.in_errors),
            out_datagrams: self.out_datagrams.saturating_sub(earlier.out_datagrams),
            rcvbuf_errors: self.rcvbuf_errors.saturating_sub(earlier.rcvbuf_errors),
            sndbuf_errors: self.sndbuf_errors.saturating_sub(earlier.sndbuf_errors),
        }
    }
}

/// Reads the `Udp:` header line and the value line after it.
pub fn parse_snmp_udp(text: &str) -> Option<UdpCounters> {
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?.split_whitespace().skip(1);
    let values = udp.next()?.split_whitespace().skip(1);
    let fields: HashMap<&str, u64> = names
        .zip(values)
        .filter_map(|(n, v)| Some((n, v.parse().ok()?)))
        .collect();
    let get = |name: &str| fields.get(name).copied().unwrap_or(0);
    Some(UdpCounters {
        in_datagrams: get("InDatagrams"),
        no_ports: get("NoPorts"),
        in_errors: get("InErrors"),
        out_datagrams: get("OutDatagrams"),
        rcvbuf_errors: get("RcvbufErrors"),
        sndbuf_errors: get("SndbufErrors"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(pid: u32, ppid: u32, comm: &str, ticks: u64) -> ProcStat {
        ProcStat {
            pid,
            comm: comm.into(),
            ppid,
            utime: ticks,
            stime: 0,
        }
    }

    #[test]
    fn stat_with_a_hostile_command_name() {
        let line = "4242 (my (odd) proc) S 17 4242 4242 0 -1 4194560 120 0 0 0 250 75 0 0 20 0 \
                    3 0 12345 1000000 100 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                pid: 4242,
                comm: "my (odd) proc".into(),
                ppid: 17,
                utime: 250,
                stime: 75
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S"), None);
    }

    #[test]
    fn tree_holds_descendants_only() {
        let stats = [
            stat(10, 1, "udpshard", 100),
            stat(11, 10, "udpshard", 200),
            stat(12, 10, "udpshard", 300),
            stat(13, 12, "sh", 5),
            stat(20, 1, "rustc", 9999),
            stat(21, 20, "cc", 9999),
        ];
        assert_eq!(tree_pids(10, &stats), HashSet::from([10, 11, 12, 13]));
        assert_eq!(tree_pids(12, &stats), HashSet::from([12, 13]));
        assert!(tree_pids(99, &stats).is_empty());
    }

    #[test]
    fn cpu_time_is_split_between_tree_own_softirq_and_others() {
        let before = CpuSnapshot {
            procs: vec![
                stat(10, 1, "udpshard", 100),
                stat(11, 10, "udpshard", 50),
                stat(5, 1, "bench", 10),
                stat(3, 2, "ksoftirqd/0", 7),
                stat(4, 2, "kworker/0:1-events", 3),
                stat(40, 1, "old", 1000),
            ],
            host: HostTicks {
                busy: 10_000,
                steal: 500,
            },
        };
        let after = CpuSnapshot {
            procs: vec![
                stat(10, 1, "udpshard", 150),
                stat(11, 10, "udpshard", 80),
                stat(12, 10, "udpshard", 20), // a worker started meanwhile
                stat(5, 1, "bench", 70),
                stat(3, 2, "ksoftirqd/0", 9),
                stat(4, 2, "kworker/0:1-events", 7),
                stat(40, 1, "rustc", 30), // pid 40 reused by another program
            ],
            host: HostTicks {
                busy: 10_000 + 50 + 30 + 20 + 60 + 2 + 4 + 30 + 8,
                steal: 500 + 45,
            },
        };
        let hz = clock_ticks();
        let d = |ticks| ticks_to_duration(ticks, hz);
        assert_eq!(
            after.since(&before, 10, 5),
            CpuUse {
                tree: d(100),
                own: d(60),
                softirq_threads: d(2),
                kernel_threads: d(4),
                other_processes: d(30),
                unattributed: d(8),
                steal: d(45),
                top_others: vec![("rustc".into(), d(30))],
            }
        );
    }

    #[test]
    fn this_process_has_a_cpu_time() {
        let pid = std::process::id();
        assert!(tree_cpu_time(pid).is_ok());
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        let snapshot = CpuSnapshot::take().unwrap();
        assert!(snapshot.procs.iter().any(|s| s.pid == pid));
    }

    #[test]
    fn host_busy_leaves_out_idle_iowait_and_steal() {
        let text = "cpu  100 2 30 5000 7 1 4 3 0 0\ncpu0 50 1 15 2500 3 0 2 1 0 0\n";
        assert_eq!(
            parse_host_ticks(text),
            Some(HostTicks {
                busy: 100 + 2 + 30 + 1 + 4,
                steal: 3
            })
        );
        assert_eq!(parse_host_ticks("intr 1 2\n"), None);
    }

    #[test]
    fn snmp_udp_counters() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
                    Udp: 100 2 7 90 5 1 0\n\
                    UdpLite: InDatagrams NoPorts\nUdpLite: 0 0\n";
        let c = parse_snmp_udp(text).unwrap();
        assert_eq!(c.in_datagrams, 100);
        assert_eq!(c.rcvbuf_errors, 5);
        assert_eq!(c.in_errors, 7);
        assert_eq!(parse_snmp_udp("Ip: x\n"), None);
    }
}
