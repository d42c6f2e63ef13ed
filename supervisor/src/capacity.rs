//! What a config can hold on this host: upstream ports (and whether they
//! take the host's ephemeral ports from other programs), descriptors, and
//! the ownership table. The supervisor logs these at start; `doctor`
//! prints them with their fixes. Judging is a pure function of the config
//! and the host's figures.

use std::ops::RangeInclusive;

use udpshard_config::Config;

/// Descriptors a worker needs besides its upstream sockets.
pub(crate) const FD_OVERHEAD: u64 = 1024;

/// The host's figures that bound a config's capacity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Host {
    /// net.ipv4.ip_local_port_range.
    pub ephemeral: (u16, u16),
    /// net.ipv4.ip_local_reserved_ports.
    pub reserved: Vec<RangeInclusive<u16>>,
    /// RLIMIT_NOFILE (soft, hard) after udpshard raised the soft limit.
    pub nofile: Option<(u64, u64)>,
    /// Whether the proxy runs as a systemd service (limits are set there).
    pub systemd: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    pub saw: String,
    pub fix: String,
}

/// "1000-2000,3000" (ip_local_reserved_ports) as ranges.
pub(crate) fn parse_port_list(text: &str) -> Vec<RangeInclusive<u16>> {
    text.trim()
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .filter_map(|p| match p.trim().split_once('-') {
            Some((a, b)) => Some(a.trim().parse().ok()?..=b.trim().parse().ok()?),
            None => {
                let n = p.trim().parse().ok()?;
                Some(n..=n)
            }
        })
        .collect()
}

fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

impl Host {
    pub(crate) fn read(systemd: bool) -> Host {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Host {
            ephemeral: parse_range(&read("/proc/sys/net/ipv4/ip_local_port_range"))
                .unwrap_or((32768, 60999)),
            reserved: parse_port_list(&read("/proc/sys/net/ipv4/ip_local_reserved_ports")),
            nofile: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok(),
            systemd,
        }
    }
}

/// Upstream sockets a worker may need for `config`: one serves one path per
/// backend, so a listener needs about max_sessions / backends of them (one
/// path per session), and as many again for the copies it borrows for
/// sessions other workers hand it.
pub(crate) fn fds_needed(config: &Config) -> u64 {
    let sockets: u64 = config
        .listeners
        .iter()
        .map(|l| (l.max_sessions as u64).div_ceil(l.backends.len().max(1) as u64))
        .sum();
    sockets.saturating_mul(2).saturating_add(FD_OVERHEAD)
}

/// Every capacity finding for `config` on `host`.
pub(crate) fn findings(config: &Config, host: &Host) -> Vec<Finding> {
    let mut out = Vec::new();
    let (elo, ehi) = host.ephemeral;
    for l in &config.listeners {
        let (lo, hi) = l.upstream_ports.unwrap_or(host.ephemeral);
        let overlap_lo = lo.max(elo);
        let overlap_hi = hi.min(ehi);
        if overlap_lo > overlap_hi {
            continue;
        }
        let unreserved = (overlap_lo..=overlap_hi)
            .filter(|p| !host.reserved.iter().any(|r| r.contains(p)))
            .count();
        if unreserved == 0 {
            continue;
        }
        let set = if l.upstream_ports.is_none() {
            "upstream_ports is not set, so it is"
        } else {
            "upstream_ports is"
        };
        out.push(Finding {
            saw: format!(
                "listener {:?}: {set} {lo}-{hi}, which overlaps the kernel's ephemeral range {elo}-{ehi}: \
                 udpshard may take up to {unreserved} of the host's {} ephemeral ports, and then other \
                 programs' connect() and DNS lookups fail",
                l.name,
                u32::from(ehi - elo) + 1
            ),
            fix: format!(
                "sysctl -w net.ipv4.ip_local_reserved_ports={overlap_lo}-{overlap_hi}   # or upstream_ports outside {elo}-{ehi}, e.g. \"20000-29999\""
            ),
        });
    }
    if let Some((soft, hard)) = host.nofile {
        let need = fds_needed(config);
        if soft < need {
            let backends: usize = config
                .listeners
                .iter()
                .map(|l| l.backends.len())
                .sum::<usize>()
                .max(1);
            let sessions = soft.saturating_sub(FD_OVERHEAD) / 2 * backends as u64
                / config.listeners.len().max(1) as u64;
            let fix = if host.systemd {
                format!("systemctl edit udpshard   # [Service] LimitNOFILE={need}")
            } else if need <= hard {
                format!("ulimit -n {need}   # before udpshard starts")
            } else {
                format!(
                    "ulimit -Hn {need} && ulimit -n {need}   # as root before udpshard starts (the hard limit is {hard}); containers: --ulimit nofile={need}:{need}"
                )
            };
            out.push(Finding {
                saw: format!(
                    "RLIMIT_NOFILE is {soft}, but max_sessions can need {need} descriptors per worker \
                     (an upstream socket serves one path per backend): past about {sessions} sessions \
                     per worker, new ones are refused (drops.no_fd)"
                ),
                fix,
            });
        }
    }
    out
}

/// What `config`'s ranges and tables can hold against what max_sessions
/// allows on `workers` workers (for `doctor`: a config that can never fill
/// its max_sessions is not wrong, but the operator should know where the
/// ceiling is).
pub(crate) fn ceilings(config: &Config, workers: usize, ephemeral: (u16, u16)) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut total_sessions: u64 = 0;
    for l in &config.listeners {
        let sessions = l.max_sessions as u64 * workers as u64;
        total_sessions += sessions;
        let (lo, hi) = l.upstream_ports.unwrap_or(ephemeral);
        let ports = u64::from(hi - lo) + 1;
        let sources = |v4: bool| {
            if l.upstream_sources.is_empty() {
                1
            } else {
                l.upstream_sources
                    .iter()
                    .filter(|ip| ip.is_ipv4() == v4)
                    .count() as u64
            }
        };
        let paths: u64 = l
            .backends
            .iter()
            .map(|b| sources(b.addr.is_ipv4()) * ports)
            .sum();
        if paths < sessions {
            out.push(Finding {
                saw: format!(
                    "listener {:?}: its upstream ports hold {paths} paths (sources x {ports} ports x {} \
                     backends), fewer than max_sessions x {workers} workers = {sessions}: past that, new \
                     flows are refused (drops.no_port)",
                    l.name,
                    l.backends.len()
                ),
                fix: {
                    let per_port = paths / ports;
                    let needed = sessions.div_ceil(per_port.max(1));
                    let new_lo = u64::from(hi).saturating_sub(needed.saturating_sub(1)).max(1025);
                    if u64::from(hi) + 1 - new_lo >= needed {
                        format!("upstream_ports = \"{new_lo}-{hi}\"   # outside the ephemeral range, or reserve it")
                    } else {
                        format!(
                            "upstream_sources = [...]   # more local addresses: each adds {ports} paths per backend"
                        )
                    }
                },
            });
        }
    }
    let table = udpshard_shared::owners::capacity_for(
        config.listeners.iter().map(|l| l.max_sessions).sum(),
        workers,
    ) as u64;
    // The table works at half load; each session's key and its alias take
    // an entry each.
    if total_sessions * 4 > table {
        out.push(Finding {
            saw: format!(
                "the ownership table has {table} entries, room for about {} sessions, but max_sessions \
                 x {workers} workers allows {total_sessions}: past it flows are tracked by their worker \
                 only (owners_full), and a migrating one may get a second session",
                table / 4
            ),
            fix: format!("max_sessions = {}   # per listener and worker", table / 2 / workers.max(1) as u64 / config.listeners.len().max(1) as u64),
        });
    }
    out
}

/// Raises the soft fd limit to the hard one, and the hard one to what
/// `config` can need where the process may (CAP_SYS_RESOURCE), then logs
/// every capacity finding once.
pub(crate) fn warn_at_start(config: &Config, _workers: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = fds_needed(config);
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = need.max(hard);
        if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() && soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    let systemd = std::env::var_os("INVOCATION_ID").is_some();
    for f in findings(config, &Host::read(systemd)) {
        tracing::warn!("{}; fix: {}", f.saw, f.fix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listener: &str) -> Config {
        udpshard_config::parse(
            &format!(
                "[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:4433\"\ndissector = \"quic\"\nmax_sessions = 100000\n{listener}\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n"
            ),
            "t",
        )
        .unwrap()
    }

    fn host() -> Host {
        Host {
            ephemeral: (32768, 60999),
            reserved: vec![],
            nofile: Some((1_000_000, 1_000_000)),
            systemd: false,
        }
    }

    #[test]
    fn ports_outside_or_reserved_are_fine_and_overlap_is_counted() {
        assert_eq!(
            findings(&config("upstream_ports = \"1025-32767\""), &host()),
            vec![]
        );
        let f = findings(&config(""), &host());
        assert_eq!(f.len(), 1);
        assert!(
            f[0].saw
                .contains("up to 28232 of the host's 28232 ephemeral ports"),
            "{f:?}"
        );
        assert_eq!(
            f[0].fix,
            "sysctl -w net.ipv4.ip_local_reserved_ports=32768-60999   # or upstream_ports outside 32768-60999, e.g. \"20000-29999\""
        );
        let mut h = host();
        h.reserved = parse_port_list("30000-40000,41000\n");
        let f = findings(&config("upstream_ports = \"30000-40000\""), &h);
        assert_eq!(f, vec![], "reserved: {:?}", h.reserved);
        let f = findings(&config("upstream_ports = \"30000-41001\""), &h);
        assert!(f[0].saw.contains("up to 1000 of"), "{f:?}");
    }

    #[test]
    fn ceilings_compare_ports_and_the_table_with_max_sessions() {
        // 100000 sessions x 2 workers over 2 backends and 31743 ports: 63486 paths.
        let c = config("upstream_ports = \"1025-32767\"");
        let f = ceilings(&c, 2, (32768, 60999));
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].saw.contains("hold 63486 paths"), "{f:?}");
        assert!(f[0].saw.contains("= 200000"), "{f:?}");
        let small = config("upstream_ports = \"1025-32767\"").listeners[0].clone();
        let mut c = config("");
        c.listeners[0] = udpshard_config::Listener {
            max_sessions: 20_000,
            upstream_ports: Some((1025, 32767)),
            ..small
        };
        assert_eq!(ceilings(&c, 2, (32768, 60999)), vec![]);
        // A table capped below what max_sessions allows.
        let mut huge = c.clone();
        huge.listeners[0].max_sessions = 100_000_000;
        let f = ceilings(&huge, 64, (32768, 60999));
        assert!(
            f.iter()
                .any(|f| f.saw.contains("the ownership table has 33554432 entries")),
            "{f:?}"
        );
    }

    #[test]
    fn the_fd_limit_is_checked_against_sessions_over_backends() {
        let c = config("upstream_ports = \"1025-32767\"");
        // 100000 sessions over 2 backends: 50000 sockets, twice that with
        // borrowed copies, plus the overhead.
        assert_eq!(fds_needed(&c), 101_024);
        let mut h = host();
        h.nofile = Some((20_000, 20_000));
        let f = findings(&c, &h);
        assert_eq!(f.len(), 1);
        assert!(f[0].saw.contains("RLIMIT_NOFILE is 20000"), "{f:?}");
        assert!(f[0].fix.starts_with("ulimit -Hn 101024"), "{f:?}");
        h.nofile = Some((20_000, 200_000));
        assert!(findings(&c, &h)[0].fix.starts_with("ulimit -n 101024"));
        h.systemd = true;
        assert!(findings(&c, &h)[0].fix.contains("LimitNOFILE=101024"));
    }
}
