//! Passive health: the supervisor decides, from the counters every worker
//! publishes for each backend, whether the backend takes new sessions, and
//! writes the state where every worker reads it (so a connection ID picks
//! the same backend on every worker).
//!
//! A backend goes down after `fall` ICMP unreachable reports with no reply
//! from it between them, or (QUIC listeners) after `fall` new sessions in a
//! row that got no reply within `reply_timeout`. After `revive_after` down,
//! it is up again on trial: new sessions reach it; its first reply ends the
//! trial, and its first failure (one unreachable report or unanswered
//! session) takes it down again.
//!
//! Garbage can look like evidence (a QUIC server ignores what it cannot
//! decrypt, so a flood of junk Initials reads as unanswered sessions), so
//! passive evidence may hold at most `max_ejection_percent` of a listener's
//! backends down at once.
//!
//! Active health (`[listener.health]`): every `interval` each backend is
//! sent the probe from a socket of its own (connected, so ICMP errors come
//! back on it). A reply within `timeout` that starts with `expect` is good
//! (with `probe = "quic"`: a Version Negotiation packet that echoes the
//! probe's connection IDs); silence, an error or any other reply is bad.
//! `fall` bad probes in a row take a backend down, `rise` good ones bring it
//! back. Probes decide: passive evidence then only asks for a probe at once
//! (and `revive_after` plays no part).

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};

use udpshard_config::{Config, Probe};
use udpshard_shared::backends::{BackendCounter, BackendState};
use udpshard_shared::stats::StatsRegion;

/// How often the supervisor looks.
pub(crate) const CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// One backend's evidence, as of the last look.
#[derive(Debug, Default, Clone)]
struct Track {
    /// Unreachable reports and replies when the current streak began.
    unreachable_base: u64,
    replies_seen: u64,
    unanswered_base: u64,
    answered_seen: u64,
    down_since_ms: Option<u64>,
    /// Revived by `revive_after`: the first failure takes it down again,
    /// the first reply ends the trial.
    on_trial: bool,
}

/// Active probes of one backend.
#[derive(Debug)]
struct Prober {
    socket: UdpSocket,
    /// The datagram it sends (for the QUIC probe, with its own random
    /// connection IDs, which the answer must echo).
    probe: Vec<u8>,
    /// Where the probe's own bytes start (after a PROXY v2 LOCAL header).
    body_at: usize,
    /// What it was made for: the listener's probe and whether it sends
    /// PROXY v2 headers (a reload that changes either makes a new one).
    made_for: (Probe, bool),
    /// When the probe in flight went out.
    sent_ms: Option<u64>,
    next_ms: u64,
    good: u32,
    bad: u32,
    /// The last bad probe's cause, for the log.
    why: String,
}

impl Prober {
    /// `proxied`: the listener sends PROXY v2 headers, so the probe carries
    /// a LOCAL one (a backend that reads them expects one on every
    /// datagram, and answers a LOCAL one as from the proxy itself).
    fn new(to: SocketAddr, probe_of: &Probe, proxied: bool) -> io::Result<Prober> {
        let any: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap_or(to)
        } else {
            "[::]:0".parse().unwrap_or(to)
        };
        let socket = UdpSocket::bind(any)?;
        socket.connect(to)?;
        socket.set_nonblocking(true)?;
        let body = match probe_of {
            Probe::Bytes(b) => b.clone(),
            Probe::Quic => quic_probe(rand_cid(), rand_cid()),
        };
        let mut probe = Vec::with_capacity(16 + body.len());
        if proxied {
            probe.extend_from_slice(udpshard_shared::proxy_v2::Header::local().as_bytes());
        }
        let body_at = probe.len();
        probe.extend_from_slice(&body);
        Ok(Prober {
            socket,
            probe,
            body_at,
            made_for: (probe_of.clone(), proxied),
            sent_ms: None,
            next_ms: 0,
            good: 0,
            bad: 0,
            why: String::new(),
        })
    }

    fn verdict(&mut self, good: bool, why: &str) {
        if good {
            self.good += 1;
            self.bad = 0;
        } else {
            self.bad += 1;
            self.good = 0;
            self.why = why.to_string();
        }
    }

    /// Reads what came back, judges the probe in flight, and sends the next
    /// one when it is due.
    fn step(&mut self, h: &udpshard_config::Health, now_ms: u64) {
        let mut buf = [0u8; 2048];
        loop {
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    if self.sent_ms.take().is_some() {
                        let (ok, why) = match h.probe {
                            Probe::Bytes(_) => (
                                buf[..n].starts_with(&h.expect),
                                "a reply that does not start with `expect`",
                            ),
                            Probe::Quic => (
                                answers_quic_probe(&buf[..n], &self.probe[self.body_at..]),
                                "a reply that is no Version Negotiation for the probe",
                            ),
                        };
                        self.verdict(ok, why);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ECONNREFUSED and the like: the ICMP answer to a probe.
                    if self.sent_ms.take().is_some() {
                        self.verdict(false, &format!("the probe got {e}"));
                    }
                }
            }
        }
        let timeout = h.timeout.as_millis() as u64;
        if self
            .sent_ms
            .is_some_and(|t| now_ms.saturating_sub(t) >= timeout)
        {
            self.sent_ms = None;
            self.verdict(false, &format!("no reply within {:?}", h.timeout));
        }
        if now_ms >= self.next_ms {
            self.next_ms = now_ms + h.interval.as_millis() as u64;
            match self.socket.send(&self.probe) {
                Ok(_) => self.sent_ms = Some(now_ms),
                Err(e) => self.verdict(false, &format!("the probe could not be sent: {e}")),
            }
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Health {
    tracks: HashMap<(String, SocketAddr), Track>,
    probers: HashMap<(String, SocketAddr), Prober>,
}

/// A change of a backend's state, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub listener: String,
    pub addr: SocketAddr,
    pub down: bool,
    pub why: String,
}

impl Health {
    /// Looks at the workers' counters in `region` and applies what `config`
    /// says to its rows; returns the changes made.
    pub(crate) fn check(
        &mut self,
        config: &Config,
        region: &StatsRegion,
        now_ms: u64,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        // Probers of backends no longer probed close.
        self.probers.retain(|(name, addr), _| {
            config.listeners.iter().any(|l| {
                &l.name == name && l.health.is_some() && l.backends.iter().any(|b| b.addr == *addr)
            })
        });
        for l in &config.listeners {
            // Passive evidence may hold this many of the listener's
            // backends down at once (those of weight 0 take no sessions).
            let taking: Vec<_> = l.backends.iter().filter(|b| b.weight > 0).collect();
            let cap = taking.len() * l.max_ejection_percent as usize / 100;
            let mut down = taking
                .iter()
                .filter(|b| {
                    region
                        .backend_row(&l.name, b.addr)
                        .and_then(|row| region.backend_state(row))
                        == Some(BackendState::Down)
                })
                .count();
            for b in &l.backends {
                let Some(row) = region.backend_row(&l.name, b.addr) else {
                    continue;
                };
                let get = |c| region.backend_total(row, c);
                let (unreachable, replies) = (
                    get(BackendCounter::Unreachable),
                    get(BackendCounter::Replies),
                );
                let (unanswered, answered) =
                    (get(BackendCounter::NoReply), get(BackendCounter::Answered));
                // Every streak starts at the row's first count: reports that
                // came before the first look count too.
                let t = self.tracks.entry((l.name.clone(), b.addr)).or_default();
                // A reply ends an unreachable streak; an answered session
                // ends a streak of unanswered ones.
                if replies != t.replies_seen {
                    t.replies_seen = replies;
                    t.unreachable_base = unreachable;
                    t.on_trial = false;
                }
                if answered != t.answered_seen {
                    t.answered_seen = answered;
                    t.unanswered_base = unanswered;
                    t.on_trial = false;
                }
                let fall = if t.on_trial { 1 } else { u64::from(l.fall) };
                let state = region.backend_state(row);
                if b.weight == 0 {
                    t.down_since_ms = None;
                    continue;
                }
                // What passive evidence says, if it says down.
                let evidence = if unreachable.saturating_sub(t.unreachable_base) >= fall {
                    Some(format!(
                        "{} ICMP unreachable reports in a row with no reply (fall = {fall})",
                        unreachable.saturating_sub(t.unreachable_base)
                    ))
                } else if unanswered.saturating_sub(t.unanswered_base) >= fall {
                    Some(format!(
                        "{} new sessions in a row without a reply within {:?} (fall = {fall})",
                        unanswered.saturating_sub(t.unanswered_base),
                        l.reply_timeout
                    ))
                } else {
                    None
                };
                let key = (l.name.clone(), b.addr);
                let probed = match &l.health {
                    None => None,
                    Some(h) => {
                        let proxied = l.proxy_protocol == udpshard_config::ProxyProtocol::V2;
                        if self
                            .probers
                            .get(&key)
                            .is_some_and(|p| p.made_for.0 != h.probe || p.made_for.1 != proxied)
                        {
                            // A reload changed what the probe sends.
                            self.probers.remove(&key);
                        }
                        if !self.probers.contains_key(&key) {
                            match Prober::new(b.addr, &h.probe, proxied) {
                                Ok(p) => {
                                    self.probers.insert(key.clone(), p);
                                }
                                Err(e) => tracing::warn!(
                                    "listener {}: cannot probe backend {}: {e}",
                                    l.name,
                                    b.addr
                                ),
                            }
                        }
                        self.probers.get_mut(&key).map(|p| (h, p))
                    }
                };
                if let Some((h, p)) = probed {
                    // Probes decide; evidence asks for one at once.
                    if evidence.is_some() && state != Some(BackendState::Down) {
                        p.next_ms = now_ms;
                        t.unreachable_base = unreachable;
                        t.unanswered_base = unanswered;
                    }
                    p.step(h, now_ms);
                    let mut set = |is_down: bool, why: String| {
                        changes.push(change(region, row, l, b, is_down, why, now_ms));
                    };
                    if state == Some(BackendState::Down) {
                        if p.good >= h.rise {
                            t.down_since_ms = None;
                            t.unreachable_base = unreachable;
                            t.unanswered_base = unanswered;
                            down = down.saturating_sub(1);
                            set(
                                false,
                                format!("{} good probes in a row (rise = {})", p.good, h.rise),
                            );
                        }
                    } else if p.bad >= h.fall {
                        t.down_since_ms = Some(now_ms);
                        down += 1;
                        set(
                            true,
                            format!(
                                "{} probes failed in a row (fall = {}): {}",
                                p.bad, h.fall, p.why
                            ),
                        );
                    }
                    continue;
                }
                match (state, t.down_since_ms) {
                    (Some(BackendState::Down), Some(since)) => {
                        if now_ms.saturating_sub(since) >= l.revive_after.as_millis() as u64 {
                            t.down_since_ms = None;
                            t.on_trial = true;
                            t.unreachable_base = unreachable;
                            t.unanswered_base = unanswered;
                            down = down.saturating_sub(1);
                            let why = format!(
                                "down for {:?} (revive_after): on trial, the next reply keeps \
                                 it up and the next failure takes it down",
                                l.revive_after
                            );
                            changes.push(change(region, row, l, b, false, why, now_ms));
                        }
                    }
                    // Down without a record (the supervisor restarted it? a
                    // reload): start its revive clock now.
                    (Some(BackendState::Down), None) => t.down_since_ms = Some(now_ms),
                    _ => {
                        let Some(why) = evidence else { continue };
                        t.unreachable_base = unreachable;
                        t.unanswered_base = unanswered;
                        if down >= cap {
                            tracing::warn!(
                                "listener {}: backend {} stays up although {why}: {down} of {} \
                                 backends are down already, the most passive evidence may hold \
                                 down (max_ejection_percent = {})",
                                l.name,
                                b.addr,
                                taking.len(),
                                l.max_ejection_percent
                            );
                            continue;
                        }
                        t.down_since_ms = Some(now_ms);
                        down += 1;
                        changes.push(change(region, row, l, b, true, why, now_ms));
                    }
                }
            }
        }
        changes
    }
}

/// Writes backend `b`'s new state into its row, notes the change, and says
/// what it was, for the log.
fn change(
    region: &StatsRegion,
    row: usize,
    l: &udpshard_config::Listener,
    b: &udpshard_config::Backend,
    down: bool,
    why: String,
    now_ms: u64,
) -> Change {
    let state = if down {
        BackendState::Down
    } else {
        BackendState::Up
    };
    region.set_backend(row, true, state, b.weight);
    region.note_backend_change(row, down, now_ms);
    Change {
        listener: l.name.clone(),
        addr: b.addr,
        down,
        why,
    }
}

/// A QUIC long header with a reserved version (0x?a?a?a?a: RFC 9000 15),
/// connection IDs `dcid` and `scid`, padded to 1200 bytes (RFC 9000 14.1):
/// every QUIC server answers it with Version Negotiation.
fn quic_probe(dcid: [u8; 8], scid: [u8; 8]) -> Vec<u8> {
    let mut d = udpshard_shared::flow::quic_initial(&dcid, &scid, &[]);
    d[1..5].copy_from_slice(&[0x1a, 0x2a, 0x3a, 0x4a]);
    d.resize(1200, 0);
    d
}

/// Whether `reply` is the Version Negotiation packet that answers `probe`:
/// a long header of version 0 whose connection IDs are the probe's, swapped
/// (RFC 9000 17.2.1).
fn answers_quic_probe(reply: &[u8], probe: &[u8]) -> bool {
    let ids = |d: &[u8]| -> Option<(Vec<u8>, Vec<u8>)> {
        let dlen = usize::from(*d.get(5)?);
        let dcid = d.get(6..6 + dlen)?.to_vec();
        let slen = usize::from(*d.get(6 + dlen)?);
        let scid = d.get(7 + dlen..7 + dlen + slen)?.to_vec();
        Some((dcid, scid))
    };
    let long = reply.first().is_some_and(|b| b & 0x80 != 0);
    let negotiation = reply.get(1..5) == Some(&[0, 0, 0, 0][..]);
    match (ids(reply), ids(probe)) {
        (Some((rd, rs)), Some((pd, ps))) => long && negotiation && rd == ps && rs == pd,
        _ => false,
    }
}

/// Connection ID bytes no one can guess, from the kernel's generator.
fn rand_cid() -> [u8; 8] {
    let mut b = [0u8; 8];
    // SAFETY: getrandom(2) writes at most `b.len()` bytes into `b`, which
    // is valid for that many.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // The time will do: the IDs only have to match the answer.
        let t = udpshard_shared::clock::monotonic_ns();
        b = t.to_le_bytes();
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quic_probe_is_an_initial_sized_long_header_of_a_reserved_version() {
        let p = quic_probe([1; 8], [2; 8]);
        assert_eq!(p.len(), 1200);
        assert_eq!(p[0] & 0xc0, 0xc0);
        assert!(p[1..5].iter().all(|b| b & 0x0f == 0x0a), "0x?a?a?a?a");
        let mut vn = vec![0x80, 0, 0, 0, 0, 8];
        vn.extend_from_slice(&[2; 8]);
        vn.push(8);
        vn.extend_from_slice(&[1; 8]);
        vn.extend_from_slice(&1u32.to_be_bytes());
        assert!(answers_quic_probe(&vn, &p));
        let mut other = vn.clone();
        other[6] = 9;
        assert!(!answers_quic_probe(&other, &p), "another probe's answer");
        let mut v1 = vn.clone();
        v1[4] = 1;
        assert!(!answers_quic_probe(&v1, &p), "not Version Negotiation");
        assert!(!answers_quic_probe(&[], &p));
    }
}
