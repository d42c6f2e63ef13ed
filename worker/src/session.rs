//! The session table: flow key -> session, per listener, with a
//! per-listener limit. A session is a connection: its keys (the client's
//! connection ID and the server's, learned as aliases), its backend (fixed
//! for life) and its paths (one per client address, in the path table).
//! No I/O.

use std::collections::VecDeque;
use std::net::SocketAddr;

use slab::Slab;
use udpshard_shared::handoff::MAX_ALIASES;
use udpshard_shared::FlowKey;

use crate::keyindex::KeyIndex;
use crate::paths::{PathId, NONE};

/// A session's index in the table; stable for the session's life.
pub(crate) type SessionId = usize;

#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub listener: usize,
    pub key: FlowKey,
    /// Other keys of this connection: connection IDs the server chose,
    /// learned from its long-header packets (at most `MAX_ALIASES`).
    pub aliases: Vec<FlowKey>,
    /// The backend's index in its listener's list.
    pub backend: u16,
    /// The first of its paths (linked through `Path::next`); NONE: none
    /// (its backend was removed by a reload; the next datagram opens one).
    pub first_path: PathId,
    pub path_count: u8,
    /// The last datagram either way, on any path.
    pub last_active_ms: u64,
    /// Whether it is on offer to another worker; changed only through
    /// the methods below.
    transfer: TransferState,
    /// Until its backend first answers (passive health): when it began;
    /// `None` once judged (answered, timed out, or not to be judged).
    pub awaiting_since_ms: Option<u64>,
    /// Its backend has sent on it: established. Until then it is
    /// embryonic: bounded, given up after `embryonic_timeout`, and the
    /// first to make room. Changed only through [`SessionTable::establish`].
    answered: bool,
    pub created_ms: u64,
    /// Its place in its listener's queue of embryonic sessions.
    seq: u32,
    /// New paths it may open now (a token bucket), as of `paths_at_ms`.
    path_tokens: f32,
    paths_at_ms: u64,
    /// A session its listener's `session_log` samples: what its close
    /// line reports. `None` for every other (one pointer's room).
    pub sample: Option<Box<Sample>>,
}

/// What a sampled session's log lines report, as this worker saw it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample {
    /// Datagrams and bytes forwarded to its backend (bytes as sent: with
    /// a PROXY v2 header where the listener adds one).
    pub forwarded: (u64, u64),
    /// Replies and bytes sent on to its clients.
    pub replied: (u64, u64),
    /// Its datagrams dropped here (a path it could not have, a header
    /// past the MTU).
    pub drops: u64,
    /// Its clients' addresses, in the order they appeared (at most
    /// [`Sample::CLIENTS`]), and how many paths it opened.
    pub clients: Vec<std::net::SocketAddr>,
    pub paths: u32,
}

impl Sample {
    pub(crate) const CLIENTS: usize = 8;

    /// Notes a client address its session forwarded for.
    pub(crate) fn client(&mut self, client: std::net::SocketAddr) {
        if self.clients.len() < Sample::CLIENTS && !self.clients.contains(&client) {
            self.clients.push(client);
        }
    }
}

/// A session's transfer to another worker. Lifecycle:
///
/// ```text
/// Here { run } --(TRANSFER_AFTER datagrams in a row handed over by one
///                 worker, or an upgrade's handover)--> Offered
/// Offered --(refused, taken back, or never sent)--> Here, with no run
/// Offered --(its receiver died and no answer came)--> Here, remembering it
/// Offered --(accepted)--> the session leaves this worker
/// Here, remembering it --(a late yes from its receiver's slot)--> the
///                          session leaves this worker, reconciled
/// Here, remembering it --(a late no, or a new offer)--> forgotten
/// ```
#[derive(Debug, Clone)]
enum TransferState {
    /// Served here. `run`: how many datagrams in a row worker `from` handed
    /// over (it is where the kernel delivers this flow now). `given_up`:
    /// an offer whose receiver died unanswered, which its replacement may
    /// still read and accept.
    Here {
        from: u16,
        run: u8,
        given_up: Option<Box<Offer>>,
    },
    /// Sent to another worker, which has not answered yet.
    Offered(Box<Offer>),
}

impl TransferState {
    /// Served here with no run of handoffs, remembering `given_up`.
    fn here(given_up: Option<Box<Offer>>) -> TransferState {
        TransferState::Here {
            from: 0,
            run: 0,
            given_up,
        }
    }
}

/// A transfer offered and not yet answered: what the receiver was sent,
/// so that what changed here meanwhile can be put right when it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Offer {
    pub to: u16,
    pub since_ms: u64,
    /// The backend offered: the session's, unless a reload moved it since.
    pub backend: SocketAddr,
    /// The paths offered: their upstream sockets' local addresses and
    /// their clients.
    pub paths: Vec<(SocketAddr, SocketAddr)>,
    /// The aliases offered (the first this many of the session's).
    pub aliases: usize,
}

impl Session {
    pub(crate) fn new(listener: usize, key: FlowKey, backend: u16, now_ms: u64) -> Session {
        Session {
            listener,
            key,
            aliases: Vec::new(),
            backend,
            first_path: NONE,
            path_count: 0,
            last_active_ms: now_ms,
            transfer: TransferState::here(None),
            awaiting_since_ms: None,
            answered: false,
            created_ms: now_ms,
            seq: 0,
            path_tokens: f32::MAX,
            paths_at_ms: now_ms,
            sample: None,
        }
    }

    /// A session taken over from another worker, which its backend had
    /// (`answered`) or had not yet sent on.
    pub(crate) fn transferred(
        listener: usize,
        key: FlowKey,
        backend: u16,
        now_ms: u64,
        answered: bool,
    ) -> Session {
        Session {
            answered,
            ..Session::new(listener, key, backend, now_ms)
        }
    }

    /// Whether its backend has sent on it.
    #[cfg(test)]
    pub(crate) fn answered(&self) -> bool {
        self.answered
    }

    /// Takes one of the new paths it may open: `rate` a second, up to
    /// `burst` at once (0: no limit).
    pub(crate) fn take_path_token(&mut self, now_ms: u64, rate: u32, burst: u32) -> bool {
        if rate == 0 {
            return true;
        }
        let elapsed = now_ms.saturating_sub(self.paths_at_ms) as f32 / 1000.0;
        self.paths_at_ms = now_ms;
        let cap = burst.max(1) as f32;
        self.path_tokens = (self.path_tokens.min(cap) + elapsed * rate as f32).min(cap);
        if self.path_tokens >= 1.0 {
            self.path_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Its key, then its aliases.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &FlowKey> {
        std::iter::once(&self.key).chain(&self.aliases)
    }

    /// The transfer on offer, if any.
    pub(crate) fn offer(&self) -> Option<&Offer> {
        match &self.transfer {
            TransferState::Offered(offer) => Some(offer),
            TransferState::Here { .. } => None,
        }
    }

    /// A datagram handed over by worker `from`: how many in a row it has
    /// handed over now (0 while the session is on offer).
    pub(crate) fn handed_over_by(&mut self, from: u16) -> u8 {
        match &mut self.transfer {
            TransferState::Here { from: f, run, .. } if *f == from => {
                *run = run.saturating_add(1);
                *run
            }
            TransferState::Here { from: f, run, .. } => {
                (*f, *run) = (from, 1);
                1
            }
            TransferState::Offered(_) => 0,
        }
    }

    /// A datagram arrived another way: any run of handoffs ends.
    pub(crate) fn end_run(&mut self) {
        if let TransferState::Here { run, .. } = &mut self.transfer {
            *run = 0;
        }
    }

    /// Offered to another worker.
    pub(crate) fn set_offered(&mut self, offer: Offer) {
        self.transfer = TransferState::Offered(Box::new(offer));
    }

    /// The offer is settled here (refused, taken back, never sent): served
    /// here again, with no run of handoffs. Returns the offer.
    pub(crate) fn take_offer(&mut self) -> Option<Box<Offer>> {
        match std::mem::replace(&mut self.transfer, TransferState::here(None)) {
            TransferState::Offered(offer) => Some(offer),
            TransferState::Here { .. } => None,
        }
    }

    /// The offer's receiver died and none answered for it: served here
    /// again, the offer kept for a late yes ([`Session::answered_late`]).
    pub(crate) fn give_up_offer(&mut self) {
        let given_up = self.take_offer();
        self.transfer = TransferState::here(given_up);
    }

    /// The offer given up to slot `from`, if any, now that its answer came.
    pub(crate) fn answered_late(&mut self, from: u16) -> Option<Box<Offer>> {
        match &mut self.transfer {
            TransferState::Here { given_up, .. }
                if given_up.as_ref().is_some_and(|o| o.to == from) =>
            {
                given_up.take()
            }
            _ => None,
        }
    }

    /// Whether `key` is one of its keys.
    #[inline]
    pub(crate) fn has_key(&self, key: &FlowKey) -> bool {
        self.key == *key || self.aliases.contains(key)
    }
}

/// Why a new session could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The listener already holds `max_sessions`.
    SessionLimit,
}

#[derive(Debug)]
struct ListenerTable {
    /// Its sessions' keys (ids of sessions in the slab, which hold the keys).
    keys: KeyIndex,
    sessions: usize,
    max_sessions: usize,
    /// Its sessions by backend index.
    by_backend: Vec<u32>,
    /// Its embryonic sessions, and the queue they were made in: (id, seq),
    /// oldest first; an entry whose session is gone or established is
    /// skipped when it comes to the front.
    embryonic: usize,
    fifo: VecDeque<(u32, u32)>,
}

impl ListenerTable {
    fn new(max_sessions: usize) -> ListenerTable {
        ListenerTable {
            keys: KeyIndex::new(),
            sessions: 0,
            max_sessions,
            by_backend: Vec::new(),
            embryonic: 0,
            fifo: VecDeque::new(),
        }
    }

    fn count(&mut self, backend: u16, up: bool) {
        let b = usize::from(backend);
        if self.by_backend.len() <= b {
            self.by_backend.resize(b + 1, 0);
        }
        if up {
            self.by_backend[b] += 1;
        } else {
            self.by_backend[b] = self.by_backend[b].saturating_sub(1);
        }
    }
}

/// All sessions of one worker, across its listeners.
#[derive(Debug)]
pub(crate) struct SessionTable {
    sessions: Slab<Session>,
    listeners: Vec<ListenerTable>,
    /// Where the incremental sweep resumes.
    sweep_cursor: usize,
    /// One past the highest slab index ever used: the slab reuses freed
    /// indices, so every session is below it (its capacity, pre-sized, is
    /// far larger).
    span: usize,
    /// The next session's place in its embryonic queue.
    next_seq: u32,
}

/// Sessions the slab is sized for up front (address space: untouched
/// capacity costs no memory), so it never moves them all while the loop
/// waits. The key indexes grow shard by shard instead ([`KeyIndex`]).
const PRESIZE_CAP: usize = 1 << 20;

/// Sessions a table may hold at once: the key index files ids as u32.
const MAX_IDS: usize = u32::MAX as usize;

impl SessionTable {
    /// A table for listeners with these `max_sessions`. The slab is sized
    /// for their limit (up to [`PRESIZE_CAP`]); the key maps start small,
    /// so a few sessions stay in cache, and grow a shard at a time.
    pub(crate) fn new(limits: impl IntoIterator<Item = usize>) -> Self {
        let listeners: Vec<ListenerTable> = limits.into_iter().map(ListenerTable::new).collect();
        let total: usize = listeners
            .iter()
            .map(|l| l.max_sessions.min(PRESIZE_CAP))
            .sum();
        SessionTable {
            sessions: Slab::with_capacity(total.min(PRESIZE_CAP)),
            listeners,
            sweep_cursor: 0,
            span: 0,
            next_seq: 0,
        }
    }

    pub(crate) fn lookup(&self, listener: usize, key: &FlowKey) -> Option<SessionId> {
        let sessions = &self.sessions;
        let id = self.listeners.get(listener)?.keys.get(key, |id| {
            sessions
                .get(id as usize)
                .is_some_and(|s| s.listener == listener && s.has_key(key))
        })?;
        Some(id as usize)
    }

    /// Starts loading the index line a lookup of `key` reads first.
    #[inline]
    pub(crate) fn prefetch(&self, listener: usize, key: &FlowKey) {
        if let Some(l) = self.listeners.get(listener) {
            l.keys.prefetch(key);
        }
    }

    /// Whether `listener` may take one more session.
    pub(crate) fn admit(&self, listener: usize) -> Result<(), Refused> {
        match self.listeners.get(listener) {
            // The index holds ids as u32.
            Some(l) if l.sessions < l.max_sessions && self.sessions.len() < MAX_IDS => Ok(()),
            _ => Err(Refused::SessionLimit),
        }
    }

    /// Adds a session under its keys; the caller has checked
    /// [`SessionTable::admit`]. Keys another session holds stay with it.
    pub(crate) fn insert(&mut self, mut session: Session) -> SessionId {
        let listener = session.listener;
        session.seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let (answered, seq) = (session.answered, session.seq);
        let id = self.sessions.insert(session);
        self.span = self.span.max(id + 1);
        if !answered {
            let l = &mut self.listeners[listener];
            l.embryonic += 1;
            l.fifo.push_back((id as u32, seq));
        }
        let keys: Vec<FlowKey> = self.sessions[id].keys().copied().collect();
        let backend = self.sessions[id].backend;
        self.listeners[listener].sessions += 1;
        self.listeners[listener].count(backend, true);
        for key in keys {
            if self.lookup(listener, &key).is_none() {
                self.listeners[listener].keys.insert(&key, id as u32);
            }
        }
        id
    }

    pub(crate) fn get(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(id)
    }

    pub(crate) fn get_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        self.sessions.get_mut(id)
    }

    pub(crate) fn remove(&mut self, id: SessionId) -> Option<Session> {
        let session = self.sessions.try_remove(id)?;
        if let Some(l) = self.listeners.get_mut(session.listener) {
            l.sessions -= 1;
            if !session.answered {
                l.embryonic -= 1;
            }
            l.count(session.backend, false);
            for key in session.keys() {
                l.keys.remove(key, id as u32);
            }
        }
        Some(session)
    }

    /// Makes `alias` another key of session `id`; false when the key is
    /// already taken (by this session or another) or the session is full.
    pub(crate) fn add_alias(&mut self, id: SessionId, alias: FlowKey) -> bool {
        let Some(session) = self.sessions.get(id) else {
            return false;
        };
        let listener = session.listener;
        if session.aliases.len() >= MAX_ALIASES || self.lookup(listener, &alias).is_some() {
            return false;
        }
        self.listeners[listener].keys.insert(&alias, id as u32);
        self.sessions[id].aliases.push(alias);
        true
    }

    pub(crate) fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Session `id`'s backend has sent on it; true when that makes it
    /// established.
    pub(crate) fn establish(&mut self, id: SessionId) -> bool {
        let Some(s) = self.sessions.get_mut(id).filter(|s| !s.answered) else {
            return false;
        };
        s.answered = true;
        let listener = s.listener;
        if let Some(l) = self.listeners.get_mut(listener) {
            l.embryonic -= 1;
        }
        true
    }

    /// Embryonic sessions of `listener`.
    pub(crate) fn embryonic(&self, listener: usize) -> usize {
        self.listeners.get(listener).map_or(0, |l| l.embryonic)
    }

    /// Embryonic sessions of every listener.
    pub(crate) fn embryonic_total(&self) -> usize {
        self.listeners.iter().map(|l| l.embryonic).sum()
    }

    /// Whether queue entry `(id, seq)` still names an embryonic session.
    fn waiting(&self, (id, seq): (u32, u32)) -> bool {
        self.sessions
            .get(id as usize)
            .is_some_and(|s| s.seq == seq && !s.answered)
    }

    /// The oldest embryonic session of `listener` not on offer to another
    /// worker (one on offer may not close): what makes room for a new flow.
    pub(crate) fn oldest_embryonic(&mut self, listener: usize) -> Option<SessionId> {
        self.oldest_embryonic_where(listener, |_| true)
    }

    /// [`SessionTable::oldest_embryonic`], preferring among the oldest few
    /// one that `prefer` likes (one whose port slot a new path can take),
    /// else the oldest.
    pub(crate) fn oldest_embryonic_where(
        &mut self,
        listener: usize,
        prefer: impl Fn(&Session) -> bool,
    ) -> Option<SessionId> {
        loop {
            let l = self.listeners.get(listener)?;
            let &front = l.fifo.front()?;
            if self.waiting(front) {
                break;
            }
            self.listeners[listener].fifo.pop_front();
        }
        let l = &self.listeners[listener];
        // Offers are rare and short: look a little way past them.
        let mut candidates = l
            .fifo
            .iter()
            .take(16)
            .filter(|&&e| self.waiting(e))
            .map(|&(id, _)| id as usize)
            .filter(|&id| self.sessions.get(id).is_some_and(|s| s.offer().is_none()));
        let first = candidates.next()?;
        if self.sessions.get(first).is_some_and(&prefer) {
            return Some(first);
        }
        Some(
            candidates
                .find(|&id| self.sessions.get(id).is_some_and(&prefer))
                .unwrap_or(first),
        )
    }

    /// Embryonic sessions of `listener` made before `before_ms`, oldest
    /// first, up to `budget` (they are given up).
    pub(crate) fn embryonic_before(
        &mut self,
        listener: usize,
        before_ms: u64,
        budget: usize,
    ) -> Vec<SessionId> {
        let mut out = Vec::new();
        while out.len() < budget {
            let Some(&front) = self.listeners.get(listener).and_then(|l| l.fifo.front()) else {
                break;
            };
            if !self.waiting(front) {
                self.listeners[listener].fifo.pop_front();
                continue;
            }
            let Some(s) = self.sessions.get(front.0 as usize) else {
                break;
            };
            // On offer: it closes when the offer is settled (the sweep).
            if s.created_ms >= before_ms || s.offer().is_some() {
                break;
            }
            self.listeners[listener].fifo.pop_front();
            out.push(front.0 as usize);
        }
        out
    }

    /// Sessions of `listener` with backend `backend`.
    pub(crate) fn on_backend(&self, listener: usize, backend: usize) -> u32 {
        self.listeners
            .get(listener)
            .and_then(|l| l.by_backend.get(backend))
            .copied()
            .unwrap_or(0)
    }

    /// Counts sessions by backend again (after a reload moved listener and
    /// backend indices, or sessions to other backends).
    pub(crate) fn recount(&mut self) {
        for l in &mut self.listeners {
            l.by_backend.clear();
        }
        for (_, s) in self.sessions.iter() {
            if let Some(l) = self.listeners.get_mut(s.listener) {
                l.count(s.backend, true);
            }
        }
    }

    /// The slab indices a sweep covers.
    pub(crate) fn span(&self) -> usize {
        self.span
    }

    /// The next `budget` slab slots from where the last sweep stopped that
    /// hold a session: called every tick with a budget sized so the whole
    /// table is visited about once a second, without a pause proportional
    /// to the table.
    pub(crate) fn sweep(&mut self, budget: usize) -> Vec<SessionId> {
        let span = self.span;
        let mut out = Vec::new();
        if span == 0 {
            return out;
        }
        for _ in 0..budget.min(span) {
            let id = self.sweep_cursor % span;
            self.sweep_cursor = (id + 1) % span;
            if self.sessions.contains(id) {
                out.push(id);
            }
        }
        out
    }

    /// Follows a reload: listener `j` becomes `map[j]` (its sessions must
    /// already be gone when it is `None`), and listeners take `limits`.
    pub(crate) fn remap(&mut self, map: &[Option<usize>], limits: &[usize]) {
        let mut old: Vec<Option<ListenerTable>> = std::mem::take(&mut self.listeners)
            .into_iter()
            .map(Some)
            .collect();
        self.listeners = limits
            .iter()
            .map(|&max_sessions| ListenerTable::new(max_sessions))
            .collect();
        for (j, to) in map.iter().enumerate() {
            if let (Some(i), Some(table)) = (to, old.get_mut(j).and_then(Option::take)) {
                let l = &mut self.listeners[*i];
                l.keys = table.keys;
                l.sessions = table.sessions;
                l.embryonic = table.embryonic;
                l.fifo = table.fifo;
            }
        }
        for (_, s) in self.sessions.iter_mut() {
            if let Some(Some(i)) = map.get(s.listener) {
                s.listener = *i;
            }
        }
    }

    /// Every session's id.
    pub(crate) fn ids(&self) -> Vec<SessionId> {
        self.sessions.iter().map(|(id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(cid: u8) -> FlowKey {
        FlowKey::new(&[cid; 8]).unwrap()
    }

    #[test]
    fn lookup_is_per_listener() {
        let mut t = SessionTable::new([10, 10]);
        let id = t.insert(Session::new(0, key(1), 0, 0));
        assert_eq!(t.lookup(0, &key(1)), Some(id));
        assert_eq!(t.lookup(1, &key(1)), None);
    }

    #[test]
    fn limit_is_enforced_and_freed_by_removal() {
        let mut t = SessionTable::new([2]);
        let a = t.insert(Session::new(0, key(1), 0, 0));
        t.insert(Session::new(0, key(2), 0, 0));
        assert_eq!(t.admit(0), Err(Refused::SessionLimit));
        t.remove(a);
        assert_eq!(t.admit(0), Ok(()));
    }

    #[test]
    fn the_sweep_visits_every_session_in_slices() {
        let mut t = SessionTable::new([100]);
        for cid in 0..10 {
            t.insert(Session::new(0, key(cid), 0, 0));
        }
        let mut seen = t.sweep(4);
        assert_eq!(seen.len(), 4);
        seen.extend(t.sweep(100));
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 10);
    }

    #[test]
    fn aliases_find_the_session_and_leave_with_it() {
        let mut t = SessionTable::new([100]);
        let id = t.insert(Session::new(0, key(1), 0, 0));
        assert!(t.add_alias(id, key(9)));
        assert!(!t.add_alias(id, key(9)), "an alias is added once");
        let other = t.insert(Session::new(0, key(2), 0, 0));
        assert!(!t.add_alias(other, key(9)), "a key names one session");
        assert_eq!(t.lookup(0, &key(9)), Some(id));
        t.remove(id);
        assert_eq!(t.lookup(0, &key(9)), None);
        assert_eq!(t.lookup(0, &key(2)), Some(other));
    }

    #[test]
    fn remap_follows_renumbered_listeners() {
        let mut t = SessionTable::new([10, 10, 10]);
        let a = t.insert(Session::new(0, key(1), 0, 0));
        let b = t.insert(Session::new(1, key(2), 0, 0));
        let c = t.insert(Session::new(2, key(3), 0, 0));
        t.remove(a);
        // Listener 0 is removed, 1 becomes 0, 2 becomes 1; limits change.
        t.remap(&[None, Some(0), Some(1)], &[1, 10]);
        assert_eq!(t.lookup(0, &key(2)), Some(b));
        assert_eq!(t.lookup(1, &key(3)), Some(c));
        assert_eq!(t.admit(0), Err(Refused::SessionLimit), "new limit applies");
        assert_eq!(t.get(b).unwrap().listener, 0);
    }

    #[test]
    fn ids_are_reused_without_stale_keys() {
        let mut t = SessionTable::new([100]);
        let a = t.insert(Session::new(0, key(1), 0, 0));
        t.remove(a);
        let b = t.insert(Session::new(0, key(2), 0, 0));
        assert_eq!(a, b, "slab reuses the slot");
        assert_eq!(t.lookup(0, &key(1)), None);
        assert_eq!(t.lookup(0, &key(2)), Some(b));
    }
}
