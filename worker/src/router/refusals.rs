//! Flows refused a moment ago (no port, no descriptor): their further
//! datagrams are dropped without a try, so a refused flow costs no more
//! than a forwarded one.

use udpshard_shared::{DropReason, FlowKey};

/// How long a refused flow's further datagrams are dropped without a try.
const REFUSAL_MS: u64 = 1_000;
const MAX_REFUSALS: usize = 1 << 16;

/// Flows refused a moment ago, and why.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    map: ahash::AHashMap<(usize, FlowKey), (DropReason, u64)>,
}

impl Refusals {
    pub(super) fn check(
        &mut self,
        listener: usize,
        key: &FlowKey,
        now_ms: u64,
    ) -> Option<DropReason> {
        if self.map.is_empty() {
            return None;
        }
        match self.map.get(&(listener, *key)) {
            Some(&(reason, until)) if until > now_ms => Some(reason),
            Some(_) => {
                self.map.remove(&(listener, *key));
                None
            }
            None => None,
        }
    }

    pub(super) fn remember(
        &mut self,
        listener: usize,
        key: FlowKey,
        reason: DropReason,
        now_ms: u64,
    ) {
        // Bounded: a flood of refused flows forgets the oldest all at once.
        if self.map.len() >= MAX_REFUSALS {
            self.map.clear();
        }
        self.map
            .insert((listener, key), (reason, now_ms + REFUSAL_MS));
    }
}
