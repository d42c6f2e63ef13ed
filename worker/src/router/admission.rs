//! Admission: what an unauthenticated datagram may create. Anyone can send
//! any connection ID from any address, so:
//! - on a `quic` listener only a client's first flight (an Initial of at
//!   least 1200 bytes) opens a session from a long header
//!   (`udpshard_shared::flow::quic_may_open`);
//! - new sessions and new paths go through token buckets per source prefix
//!   (`rate_limited`), and new paths through one per session (`path_limit`);
//! - a session is embryonic until its backend first sends on it: embryonic
//!   sessions are bounded, given up after `embryonic_timeout`, and the first
//!   to make room when sessions or ports run short (never an established
//!   one);
//! - a path its backend answered (the last one it sent on, or any within
//!   `path_idle`) is never closed to make room for one it never answered.
//!
//! Each refusal comes before the ownership table is written or a socket is
//! opened, and costs less than a forward.

use std::net::IpAddr;

use udpshard_config as config;
use udpshard_shared::stats::Counter;

use super::{Owners, Router, Sockets};
use crate::paths::PathId;
use crate::session::SessionId;

/// Buckets per table: a hash of the source prefix picks one, so a flood
/// from many forged sources costs no memory (sources that share a bucket
/// share its rate).
const BUCKETS: usize = 4096;

/// Token buckets by source prefix, for one kind of new state.
#[derive(Debug)]
pub(crate) struct SourceBuckets {
    /// Empty: no limit.
    buckets: Vec<Bucket>,
    /// Tokens per millisecond, and at most.
    per_ms: f32,
    burst: f32,
    prefix_v4: u8,
    prefix_v6: u8,
    /// Keyed per process, so that forged sources cannot be chosen to drain
    /// a given client's bucket.
    hasher: ahash::RandomState,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f32,
    at_ms: u64,
}

impl SourceBuckets {
    /// `rate` a second and `burst` at once per source prefix (rate 0: no
    /// limit).
    pub(crate) fn new(rate: u32, burst: u32, prefix_v4: u8, prefix_v6: u8) -> SourceBuckets {
        let burst = burst.max(1) as f32;
        SourceBuckets {
            buckets: match rate {
                0 => Vec::new(),
                _ => vec![
                    Bucket {
                        tokens: burst,
                        at_ms: 0,
                    };
                    BUCKETS
                ],
            },
            per_ms: rate as f32 / 1000.0,
            burst,
            prefix_v4,
            prefix_v6,
            hasher: ahash::RandomState::new(),
        }
    }

    /// Takes a token of `ip`'s prefix; false when it has none left.
    pub(crate) fn take(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        if self.buckets.is_empty() {
            return true;
        }
        let prefix = match ip {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4) & (u32::MAX << (32 - u32::from(self.prefix_v4)));
                (false, u128::from(bits))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX << (128 - u32::from(self.prefix_v6));
                (true, u128::from(v6) & mask)
            }
        };
        let i = (self.hasher.hash_one(prefix) as usize) % self.buckets.len();
        let b = &mut self.buckets[i];
        let elapsed = now_ms.saturating_sub(b.at_ms) as f32;
        b.at_ms = now_ms;
        b.tokens = (b.tokens + elapsed * self.per_ms).min(self.burst);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A listener's admission, as the router applies it.
#[derive(Debug)]
pub(crate) struct Admission {
    /// Long headers open a session only as a first flight (QUIC).
    pub(crate) quic: bool,
    pub(crate) max_embryonic: usize,
    pub(crate) embryonic_timeout_ms: u64,
    pub(crate) new_sessions: SourceBuckets,
    pub(crate) new_paths: SourceBuckets,
    pub(crate) paths_per_session: u32,
    pub(crate) paths_per_session_burst: u32,
}

impl Admission {
    pub(crate) fn new(cfg: &config::Listener) -> Admission {
        let a = &cfg.admission;
        let (v4, v6) = (a.source_prefix_v4, a.source_prefix_v6);
        Admission {
            quic: matches!(cfg.dissector, config::Dissector::Quic { .. }),
            max_embryonic: a.max_embryonic,
            embryonic_timeout_ms: a.embryonic_timeout.as_millis() as u64,
            new_sessions: SourceBuckets::new(
                a.new_sessions_per_source,
                a.new_sessions_burst,
                v4,
                v6,
            ),
            new_paths: SourceBuckets::new(a.new_paths_per_source, a.new_paths_burst, v4, v6),
            paths_per_session: a.new_paths_per_session,
            paths_per_session_burst: a.new_paths_per_session_burst,
        }
    }
}

/// Evictions tried for one new flow before it is refused.
pub(super) const MAX_EVICTIONS: usize = 16;

impl<O: Owners, S: Sockets> Router<O, S> {
    /// Makes room in `listener` for one more session, closing its oldest
    /// embryonic ones while the listener is at `max_sessions` or its
    /// embryonic sessions at their bound; false when no room could be made.
    pub(super) fn room_for_session(&mut self, listener: usize) -> bool {
        let max_embryonic = self.routes[listener].admission.max_embryonic;
        for _ in 0..MAX_EVICTIONS {
            let full = self.sessions.admit(listener).is_err();
            if !full && self.sessions.embryonic(listener) < max_embryonic {
                return true;
            }
            if !self.evict_embryonic(listener) {
                // Only established sessions left: at max_sessions the flow
                // is refused; under the embryonic bound there is room.
                return !full;
            }
        }
        false
    }

    /// Closes `listener`'s oldest embryonic session (not `keep`): its ports
    /// come back at once (its backend never sent on them); false when it
    /// has none.
    pub(super) fn evict_embryonic(&mut self, listener: usize) -> bool {
        let Some(sid) = self.sessions.oldest_embryonic(listener) else {
            return false;
        };
        self.close_session(sid);
        self.counters.incr(Counter::SessionsEvicted);
        true
    }

    /// Gives up the embryonic sessions whose backend has not answered
    /// within `embryonic_timeout`, up to `budget` of them.
    pub(super) fn expire_embryonic(&mut self, budget: usize) {
        for l in 0..self.routes.len() {
            let timeout = self.routes[l].admission.embryonic_timeout_ms;
            let before = self.now_ms.saturating_sub(timeout);
            for sid in self.sessions.embryonic_before(l, before, budget) {
                self.close_session(sid);
                self.counters.incr(Counter::SessionsEvicted);
            }
        }
    }

    /// Session `sid`'s backend sent on it: it is established.
    pub(super) fn established(&mut self, sid: SessionId) {
        self.sessions.establish(sid);
    }

    /// Whether path `pid` is one its backend answered lately: the last one
    /// it sent on of its session (`newest_reply_ms`), or one it sent on
    /// within `path_idle`.
    pub(super) fn trusted(&self, pid: PathId, newest_reply_ms: u64) -> bool {
        let Some(p) = self.paths.path(pid) else {
            return false;
        };
        let path_idle = self.routes.get(p.listener).map_or(0, |r| r.path_idle_ms);
        p.answered
            && (p.last_reply_ms == newest_reply_ms
                || self.now_ms.saturating_sub(p.last_reply_ms) <= path_idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_prefix_gets_its_burst_then_its_rate() {
        let mut b = SourceBuckets::new(10, 3, 24, 64);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let same_24: IpAddr = "192.0.2.200".parse().unwrap();
        assert!((0..3).all(|_| b.take(a, 1000)), "the burst");
        assert!(!b.take(same_24, 1000), "the /24 shares it");
        assert!(b.take(a, 1100), "one more after 100 ms at 10/s");
        assert!(!b.take(a, 1100));
        let mut off = SourceBuckets::new(0, 0, 32, 64);
        assert!((0..10_000).all(|_| off.take(a, 0)), "rate 0: no limit");
    }
}
