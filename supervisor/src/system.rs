//! The host's own drop counters, in the order a datagram meets them before
//! it reaches a udpshard socket: the NIC (/sys/class/net/*/statistics), the
//! per-CPU backlog (/proc/net/softnet_stat), then UDP as a whole
//! (/proc/net/snmp, /proc/net/snmp6).
//!
//! Parsing is split from reading so it can be tested on sample text; every
//! reader treats a missing or unreadable file as "not available here" (a
//! container may lack /sys/class/net entries or IPv6), never as an error.

use std::path::Path;

use serde_json::{json, Value};

/// UDP's counters for one address family (`Udp:` in /proc/net/snmp,
/// `Udp6*` in /proc/net/snmp6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct UdpCounters {
    pub in_datagrams: u64,
    /// Every datagram UDP dropped after it was addressed to a socket:
    /// receive buffer full (RcvbufErrors), bad checksum, and so on.
    pub in_errors: u64,
    pub rcvbuf_errors: u64,
    pub sndbuf_errors: u64,
    /// Datagrams for a port nobody listens on.
    pub no_ports: u64,
}

/// /proc/net/softnet_stat summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Softnet {
    /// The per-CPU input backlog was full (netdev_max_backlog).
    pub dropped: u64,
    /// The softirq ran out of budget with work left (not a drop by itself).
    pub time_squeeze: u64,
}

/// One interface's counters from /sys/class/net/NAME/statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Nic {
    pub name: String,
    pub rx_dropped: u64,
    pub rx_errors: u64,
    pub tx_dropped: u64,
}

/// Everything the host counts; `None` / empty where this host does not say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SystemCounters {
    pub nics: Vec<Nic>,
    pub softnet: Option<Softnet>,
    pub udp: Option<UdpCounters>,
    pub udp6: Option<UdpCounters>,
}

impl SystemCounters {
    /// Reads the current process's network namespace's counters.
    pub(crate) fn read() -> SystemCounters {
        let text = |p: &str| std::fs::read_to_string(p).ok();
        SystemCounters {
            nics: read_nics(Path::new("/sys/class/net")),
            softnet: text("/proc/net/softnet_stat").and_then(|t| parse_softnet(&t)),
            udp: text("/proc/net/snmp").and_then(|t| parse_snmp_udp(&t)),
            udp6: text("/proc/net/snmp6").and_then(|t| parse_snmp6_udp(&t)),
        }
    }

    /// Drops before the UDP layer at the NIC: received packets the
    /// interfaces dropped or found in error.
    pub(crate) fn nic_drops(&self) -> u64 {
        self.nics
            .iter()
            .map(|n| n.rx_dropped.saturating_add(n.rx_errors))
            .fold(0, u64::saturating_add)
    }

    pub(crate) fn softnet_drops(&self) -> u64 {
        self.softnet.map_or(0, |s| s.dropped)
    }

    /// UDP InErrors over both families (includes the drops on udpshard's
    /// own sockets: the kernel counts those here too).
    pub(crate) fn udp_in_errors(&self) -> u64 {
        [self.udp, self.udp6]
            .iter()
            .flatten()
            .map(|u| u.in_errors)
            .fold(0, u64::saturating_add)
    }

    pub(crate) fn to_json(&self) -> Value {
        let udp = |u: &Option<UdpCounters>| match u {
            None => Value::Null,
            Some(u) => json!({
                "in_datagrams": u.in_datagrams,
                "in_errors": u.in_errors,
                "rcvbuf_errors": u.rcvbuf_errors,
                "sndbuf_errors": u.sndbuf_errors,
                "no_ports": u.no_ports,
            }),
        };
        let nics: serde_json::Map<String, Value> = self
            .nics
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    json!({
                        "rx_dropped": n.rx_dropped,
                        "rx_errors": n.rx_errors,
                        "tx_dropped": n.tx_dropped,
                    }),
                )
            })
            .collect();
        json!({
            "nics": nics,
            "softnet": self.softnet.map_or(Value::Null, |s| json!({
                "dropped": s.dropped,
                "time_squeeze": s.time_squeeze,
            })),
            "udp": udp(&self.udp),
            "udp6": udp(&self.udp6),
        })
    }
}

/// The `Udp:` header/value line pair of /proc/net/snmp (not `UdpLite:`).
pub(crate) fn parse_snmp_udp(text: &str) -> Option<UdpCounters> {
    let mut lines = text.lines().filter(|l| l.starts_with("Udp: "));
    let names: Vec<&str> = lines.next()?.split_whitespace().skip(1).collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().skip(1).collect();
    let get = |key: &str| {
        names
            .iter()
            .position(|n| *n == key)
            .and_then(|i| values.get(i))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    if names.len() != values.len() {
        return None;
    }
    Some(UdpCounters {
        in_datagrams: get("InDatagrams"),
        in_errors: get("InErrors"),
        rcvbuf_errors: get("RcvbufErrors"),
        sndbuf_errors: get("SndbufErrors"),
        no_ports: get("NoPorts"),
    })
}

/// `Udp6InErrors   12` lines of /proc/net/snmp6.
pub(crate) fn parse_snmp6_udp(text: &str) -> Option<UdpCounters> {
    let mut out = UdpCounters::default();
    let mut seen = false;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some(key) = key.strip_prefix("Udp6") else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        let field = match key {
            "InDatagrams" => &mut out.in_datagrams,
            "InErrors" => &mut out.in_errors,
            "RcvbufErrors" => &mut out.rcvbuf_errors,
            "SndbufErrors" => &mut out.sndbuf_errors,
            "NoPorts" => &mut out.no_ports,
            _ => continue,
        };
        *field = value;
        seen = true;
    }
    seen.then_some(out)
}

/// One line per CPU of hex columns: processed, dropped, time_squeeze, ...
pub(crate) fn parse_softnet(text: &str) -> Option<Softnet> {
    let mut out = Softnet::default();
    let mut seen = false;
    for line in text.lines() {
        let cols: Vec<u64> = line
            .split_whitespace()
            .map_while(|c| u64::from_str_radix(c, 16).ok())
            .collect();
        if cols.len() < 3 {
            continue;
        }
        out.dropped = out.dropped.saturating_add(cols[1]);
        out.time_squeeze = out.time_squeeze.saturating_add(cols[2]);
        seen = true;
    }
    seen.then_some(out)
}

/// Every interface under `dir` (/sys/class/net) that has statistics;
/// sorted by name. Missing files count as 0, a missing `dir` as none.
pub(crate) fn read_nics(dir: &Path) -> Vec<Nic> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut nics: Vec<Nic> = entries
        .flatten()
        .filter_map(|e| {
            let stats = e.path().join("statistics");
            if !stats.is_dir() {
                return None;
            }
            let read = |f: &str| read_u64(&stats.join(f)).unwrap_or(0);
            Some(Nic {
                name: e.file_name().to_string_lossy().into_owned(),
                rx_dropped: read("rx_dropped"),
                rx_errors: read("rx_errors"),
                tx_dropped: read("tx_dropped"),
            })
        })
        .collect();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// A file holding one decimal number (sysfs, /proc/sys).
pub(crate) fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "\
Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 100
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 124149744 29 9623300 133801504 9623299 3 1 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 7 7 7 7 7 7 7 7 7
";

    #[test]
    fn snmp_udp_line() {
        assert_eq!(
            parse_snmp_udp(SNMP),
            Some(UdpCounters {
                in_datagrams: 124149744,
                in_errors: 9623300,
                rcvbuf_errors: 9623299,
                sndbuf_errors: 3,
                no_ports: 29,
            })
        );
        assert_eq!(parse_snmp_udp(""), None);
        assert_eq!(parse_snmp_udp("Udp: InDatagrams\n"), None);
        // A truncated value line is not misread as other columns.
        assert_eq!(parse_snmp_udp("Udp: A B\nUdp: 1\n"), None);
    }

    #[test]
    fn snmp6_udp_lines() {
        let text = "Ip6InReceives 5\nUdp6InDatagrams                 \t10\nUdp6NoPorts 2\n\
                    Udp6InErrors 4\nUdp6RcvbufErrors 3\nUdp6SndbufErrors 1\nUdpLite6InErrors 99\n";
        assert_eq!(
            parse_snmp6_udp(text),
            Some(UdpCounters {
                in_datagrams: 10,
                in_errors: 4,
                rcvbuf_errors: 3,
                sndbuf_errors: 1,
                no_ports: 2,
            })
        );
        assert_eq!(parse_snmp6_udp("Ip6InReceives 5\n"), None);
        assert_eq!(parse_snmp6_udp(""), None);
    }

    #[test]
    fn softnet_sums_hex_columns() {
        let text = "041435af 00000000 0000000a 00000000\n\
                    03e5afde 00000010 0000000d 00000000\n\
                    garbage\n";
        assert_eq!(
            parse_softnet(text),
            Some(Softnet {
                dropped: 16,
                time_squeeze: 23,
            })
        );
        assert_eq!(parse_softnet(""), None);
        assert_eq!(parse_softnet("zz 1 2\n"), None);
    }

    #[test]
    fn nics_from_a_sysfs_tree() {
        let dir = std::env::temp_dir().join(format!("udpshard-system-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (nic, rx_dropped) in [("eth0", "5\n"), ("lo", "0\n")] {
            let stats = dir.join(nic).join("statistics");
            std::fs::create_dir_all(&stats).unwrap();
            std::fs::write(stats.join("rx_dropped"), rx_dropped).unwrap();
        }
        std::fs::write(dir.join("eth0/statistics/rx_errors"), "2").unwrap();
        // An entry without statistics (bonding_masters) is skipped.
        std::fs::write(dir.join("bonding_masters"), "").unwrap();
        let nics = read_nics(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(nics.len(), 2);
        assert_eq!((nics[0].name.as_str(), nics[0].rx_dropped), ("eth0", 5));
        assert_eq!(nics[0].rx_errors, 2);
        assert_eq!(nics[0].tx_dropped, 0);
        let counters = SystemCounters {
            nics,
            ..SystemCounters::default()
        };
        assert_eq!(counters.nic_drops(), 7);
        assert_eq!(read_nics(Path::new("/nonexistent/udpshard")), Vec::new());
    }

    #[test]
    fn reading_this_host_never_fails() {
        let c = SystemCounters::read();
        let v = c.to_json();
        assert!(v["nics"].is_object());
    }
}
