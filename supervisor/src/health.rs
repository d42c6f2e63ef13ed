//! Passive health: the supervisor decides, from the counters every worker
//! publishes for each backend, whether the backend takes new sessions, and
//! writes the state where every worker reads it (so a connection ID picks
//! the same backend on every worker).
//!
//! A backend goes down after `fall` ICMP unreachable reports with no reply
//! from it between them, or (QUIC listeners) after `fall` new sessions in a
//! row that got no reply within `reply_timeout`. After `revive_after` down,
//! it is up again on trial: new sessions reach it, and the same rules take
//! it down again should it still fail (one more `fall`'s worth).

use std::collections::HashMap;
use std::net::SocketAddr;

use udpshard_config::Config;
use udpshard_shared::backends::{BackendCounter, BackendState};
use udpshard_shared::stats::StatsRegion;

/// How often the supervisor looks.
pub const CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// One backend's evidence, as of the last look.
#[derive(Debug, Default, Clone)]
struct Track {
    /// Unreachable reports and replies when the current streak began.
    unreachable_base: u64,
    replies_seen: u64,
    unanswered_base: u64,
    answered_seen: u64,
    down_since_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Health {
    tracks: HashMap<(String, SocketAddr), Track>,
}

/// A change of a backend's state, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub listener: String,
    pub addr: SocketAddr,
    pub down: bool,
    pub why: String,
}

impl Health {
    /// Looks at the workers' counters in `region` and applies what `config`
    /// says to its rows; returns the changes made.
    pub fn check(&mut self, config: &Config, region: &StatsRegion, now_ms: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        for l in &config.listeners {
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
                }
                if answered != t.answered_seen {
                    t.answered_seen = answered;
                    t.unanswered_base = unanswered;
                }
                let fall = u64::from(l.fall);
                let state = region.backend_state(row);
                if b.weight == 0 {
                    t.down_since_ms = None;
                    continue;
                }
                match (state, t.down_since_ms) {
                    (Some(BackendState::Down), Some(since)) => {
                        if now_ms.saturating_sub(since) >= l.revive_after.as_millis() as u64 {
                            t.down_since_ms = None;
                            t.unreachable_base = unreachable;
                            t.unanswered_base = unanswered;
                            region.set_backend(row, true, BackendState::Up, b.weight);
                            region.note_backend_change(row, false, now_ms);
                            changes.push(Change {
                                listener: l.name.clone(),
                                addr: b.addr,
                                down: false,
                                why: format!(
                                    "down for {:?} (revive_after): new sessions try it again",
                                    l.revive_after
                                ),
                            });
                        }
                    }
                    // Down without a record (the supervisor restarted it? a
                    // reload): start its revive clock now.
                    (Some(BackendState::Down), None) => t.down_since_ms = Some(now_ms),
                    _ => {
                        let why = if unreachable - t.unreachable_base >= fall {
                            Some(format!(
                                "{} ICMP unreachable reports in a row with no reply (fall = {fall})",
                                unreachable - t.unreachable_base
                            ))
                        } else if unanswered - t.unanswered_base >= fall {
                            Some(format!(
                                "{} new sessions in a row without a reply within {:?} (fall = {fall})",
                                unanswered - t.unanswered_base,
                                l.reply_timeout
                            ))
                        } else {
                            None
                        };
                        if let Some(why) = why {
                            t.down_since_ms = Some(now_ms);
                            region.set_backend(row, true, BackendState::Down, b.weight);
                            region.note_backend_change(row, true, now_ms);
                            changes.push(Change {
                                listener: l.name.clone(),
                                addr: b.addr,
                                down: true,
                                why,
                            });
                        }
                    }
                }
            }
        }
        changes
    }
}
