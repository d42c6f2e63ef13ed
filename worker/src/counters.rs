//! The worker's counters: plain integers on the hot path, published to its
//! shared-memory slot once per loop iteration.

use std::cell::Cell;

use udpshard_shared::backends::{BackendCounter, BACKEND_ROWS, FIELDS};
use udpshard_shared::stats::{BackendCounts, Counter, StatsSlot};

/// Words the worker owns in its slot (the supervisor writes the identity
/// words: pid, cpu, generation, state, restarts), in slot order.
fn worker_owned() -> impl Iterator<Item = Counter> {
    Counter::all().filter(|c| c.worker_owned())
}

#[derive(Debug, Clone)]
pub struct Counters {
    words: [u64; Counter::COUNT],
    /// Per backend row (`udpshard_shared::backends`).
    backends: Vec<[u64; FIELDS]>,
    /// Rows changed since they were last published, one bit each.
    dirty: Cell<[u64; BACKEND_ROWS / 64]>,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            words: [0; Counter::COUNT],
            backends: vec![[0; FIELDS]; BACKEND_ROWS],
            dirty: Cell::new([0; BACKEND_ROWS / 64]),
        }
    }
}

impl Counters {
    /// Counters that continue from what the slot holds, so a replacement
    /// worker does not make the slot's totals go backwards.
    pub fn resume_from(slot: &StatsSlot<'_>) -> Counters {
        Counters::resume(|c| slot.get(c))
    }

    /// Counters that continue from the words `get` gives (a slot's): the
    /// gauges start again at zero, as this process's.
    pub fn resume(get: impl Fn(Counter) -> u64) -> Counters {
        let mut words = [0; Counter::COUNT];
        for c in worker_owned() {
            words[c as usize] = get(c);
        }
        // Gauges describe this process, not the slot's history.
        for gauge in [
            Counter::SessionsActive,
            Counter::SessionsEmbryonic,
            Counter::PathsActive,
            Counter::UpstreamSockets,
        ] {
            words[gauge as usize] = 0;
        }
        Counters {
            words,
            ..Counters::default()
        }
    }

    /// Backend counters that continue from what the slot holds (the
    /// session gauge starts again at zero, as this process's).
    pub fn resume_backends(&mut self, counts: &BackendCounts<'_>) {
        self.resume_backends_with(|row, c| counts.get(row, c));
    }

    /// [`Counters::resume_backends`] from what `get` gives (row, counter).
    pub fn resume_backends_with(&mut self, get: impl Fn(usize, BackendCounter) -> u64) {
        for (row, fields) in self.backends.iter_mut().enumerate() {
            for c in BackendCounter::ALL {
                fields[c as usize] = get(row, c);
            }
            fields[BackendCounter::SessionsActive as usize] = 0;
        }
        self.dirty.set([!0; BACKEND_ROWS / 64]);
    }

    /// A new generation going live on a slot its predecessor served: what
    /// this process counted while it stood by, on top of the slot's totals
    /// (which the predecessor left final). Gauges and readings of this
    /// process stay its own; the slot's listener-socket drop count is taken
    /// as it stands (the loop recounts it from the same sockets).
    pub fn rebase(&mut self, slot: &StatsSlot<'_>, counts: Option<&BackendCounts<'_>>) {
        self.rebase_with(|c| slot.get(c));
        if let Some(counts) = counts {
            self.rebase_backends_with(|row, c| counts.get(row, c));
        }
    }

    /// [`Counters::rebase`] on the slot words `get` gives.
    pub fn rebase_with(&mut self, get: impl Fn(Counter) -> u64) {
        for c in worker_owned() {
            let ours = self.words[c as usize];
            self.words[c as usize] = match c {
                Counter::SessionsActive
                | Counter::SessionsEmbryonic
                | Counter::PathsActive
                | Counter::UpstreamSockets
                | Counter::LoopMaxUs
                | Counter::Heartbeat
                | Counter::HealthApplied => ours,
                Counter::DropSocket | Counter::ListenerDropsSeen => get(c),
                _ => get(c).wrapping_add(ours),
            };
        }
    }

    /// [`Counters::rebase`] on the backend rows `get` gives (row, counter).
    pub fn rebase_backends_with(&mut self, get: impl Fn(usize, BackendCounter) -> u64) {
        for (row, fields) in self.backends.iter_mut().enumerate() {
            for c in BackendCounter::ALL {
                let (theirs, ours) = (get(row, c), fields[c as usize]);
                fields[c as usize] = match c {
                    BackendCounter::SessionsActive => ours,
                    BackendCounter::LastReplyMs => theirs.max(ours),
                    _ => theirs.wrapping_add(ours),
                };
            }
        }
        self.dirty.set([!0; BACKEND_ROWS / 64]);
    }

    /// Adds every word and backend counter of `other` (the in-memory
    /// world sums processes no slot kept).
    #[cfg(test)]
    pub fn add_all(&mut self, other: &Counters) {
        for (w, o) in self.words.iter_mut().zip(other.words) {
            *w = w.wrapping_add(o);
        }
        for (row, o) in self.backends.iter_mut().zip(&other.backends) {
            for (f, x) in row.iter_mut().zip(o) {
                *f = f.wrapping_add(*x);
            }
        }
    }

    fn touch(&self, row: usize) {
        let mut d = self.dirty.get();
        d[row / 64] |= 1 << (row % 64);
        self.dirty.set(d);
    }

    /// Adds `n` to backend row `row`'s counter `c`; no row, no count.
    #[inline]
    pub fn backend_add(&mut self, row: Option<u16>, c: BackendCounter, n: u64) {
        self.backend_update(row, c, |x| x.wrapping_add(n));
    }

    /// Takes back `n` of what [`Counters::backend_add`] added: a send that
    /// failed in the flush that counted it, before anything was published.
    #[inline]
    pub fn backend_sub(&mut self, row: Option<u16>, c: BackendCounter, n: u64) {
        self.backend_update(row, c, |x| x.wrapping_sub(n));
    }

    pub fn backend_set(&mut self, row: Option<u16>, c: BackendCounter, v: u64) {
        self.backend_update(row, c, |_| v);
    }

    /// Row `row`'s counter `c` becomes `f` of itself, marked for publishing
    /// when it changed.
    #[inline]
    fn backend_update(&mut self, row: Option<u16>, c: BackendCounter, f: impl Fn(u64) -> u64) {
        let Some(r) = row.map(usize::from) else {
            return;
        };
        if let Some(fields) = self.backends.get_mut(r) {
            let new = f(fields[c as usize]);
            if new != fields[c as usize] {
                fields[c as usize] = new;
                self.touch(r);
            }
        }
    }

    pub fn backend_get(&self, row: usize, c: BackendCounter) -> u64 {
        self.backends.get(row).map_or(0, |f| f[c as usize])
    }

    /// Writes the backend rows changed since the last call.
    pub fn publish_backends(&self, counts: &BackendCounts<'_>) {
        let dirty = self.dirty.replace([0; BACKEND_ROWS / 64]);
        for (i, mut bits) in dirty.into_iter().enumerate() {
            while bits != 0 {
                let row = i * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                for c in BackendCounter::ALL {
                    counts.set(row, c, self.backends[row][c as usize]);
                }
            }
        }
    }

    #[inline]
    pub fn add(&mut self, c: Counter, n: u64) {
        self.words[c as usize] = self.words[c as usize].wrapping_add(n);
    }

    /// Takes back `n` of what [`Counters::add`] added (see
    /// [`Counters::backend_sub`]).
    #[inline]
    pub fn sub(&mut self, c: Counter, n: u64) {
        self.words[c as usize] = self.words[c as usize].wrapping_sub(n);
    }

    #[inline]
    pub fn incr(&mut self, c: Counter) {
        self.add(c, 1);
    }

    #[inline]
    pub fn set(&mut self, c: Counter, v: u64) {
        self.words[c as usize] = v;
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.words[c as usize]
    }

    pub fn publish(&self, slot: &StatsSlot<'_>) {
        for c in worker_owned() {
            slot.set(c, self.words[c as usize]);
        }
    }
}
