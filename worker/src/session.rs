//! The session table: flow key -> session, per listener, with idle expiry and
//! a per-listener limit. No I/O: the upstream handle is a type parameter, so
//! the table is tested without sockets.

use std::net::{IpAddr, SocketAddr};

use ahash::AHashMap;
use slab::Slab;
use udpshard_shared::FlowKey;

/// A session's index in the table; stable for the session's life (it names
/// the upstream socket's poll token).
pub type SessionId = usize;

/// One flow's state: where its client is now and how to reach its backend.
#[derive(Debug)]
pub struct Session<U> {
    pub listener: usize,
    pub key: FlowKey,
    /// The client's current address: replies go here, and a migrated client
    /// moves it.
    pub client: SocketAddr,
    /// The local address the client sent to (for replies from a wildcard
    /// listener); `None` when the listener is bound to one address.
    pub local_ip: Option<IpAddr>,
    pub upstream: U,
    /// Coarse clock (ms) of the last datagram in either direction.
    pub last_active_ms: u64,
    /// The kernel's drop count on the upstream socket when last read.
    pub upstream_drops_seen: u32,
    /// Replies arrived faster than one read budget: when the socket is
    /// empty again, ask the kernel for its drop count (datagrams queued
    /// before a drop carry no count).
    pub reply_burst: bool,
    /// The backend's index in its listener's list.
    pub backend: u16,
    /// Other keys of this flow: connection IDs the server chose, learned
    /// from its long-header packets (bounded by `handoff::MAX_ALIASES`).
    pub aliases: Vec<FlowKey>,
    /// Consecutive datagrams handed over by one other worker (which, then,
    /// is where the kernel delivers this flow now): (worker, count).
    pub handoff_streak: (u16, u8),
}

/// Why a new session could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener already holds `max_sessions`.
    SessionLimit,
}

#[derive(Debug)]
struct ListenerTable {
    keys: AHashMap<FlowKey, SessionId>,
    max_sessions: usize,
    idle_ms: u64,
}

/// All sessions of one worker, across its listeners.
#[derive(Debug)]
pub struct SessionTable<U> {
    sessions: Slab<Session<U>>,
    listeners: Vec<ListenerTable>,
    /// Where the incremental expiry sweep resumes.
    sweep_cursor: usize,
}

impl<U> SessionTable<U> {
    /// A table for listeners given as (max_sessions, idle timeout in ms).
    pub fn new(limits: impl IntoIterator<Item = (usize, u64)>) -> Self {
        SessionTable {
            sessions: Slab::new(),
            listeners: limits
                .into_iter()
                .map(|(max_sessions, idle_ms)| ListenerTable {
                    keys: AHashMap::new(),
                    max_sessions,
                    idle_ms,
                })
                .collect(),
            sweep_cursor: 0,
        }
    }

    pub fn lookup(&self, listener: usize, key: &FlowKey) -> Option<SessionId> {
        self.listeners[listener].keys.get(key).copied()
    }

    /// Whether `listener` may take one more session.
    pub fn admit(&self, listener: usize) -> Result<(), Refused> {
        let l = &self.listeners[listener];
        if l.keys.len() >= l.max_sessions {
            return Err(Refused::SessionLimit);
        }
        Ok(())
    }

    /// Adds a session under its key and aliases; the caller has checked
    /// [`SessionTable::admit`].
    pub fn insert(&mut self, session: Session<U>) -> SessionId {
        let listener = session.listener;
        let id = self.sessions.insert(session);
        let session = &self.sessions[id];
        let keys = &mut self.listeners[listener].keys;
        for key in std::iter::once(&session.key).chain(&session.aliases) {
            keys.insert(*key, id);
        }
        id
    }

    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut Session<U>> {
        self.sessions.get_mut(id)
    }

    pub fn remove(&mut self, id: SessionId) -> Option<Session<U>> {
        let session = self.sessions.try_remove(id)?;
        let keys = &mut self.listeners[session.listener].keys;
        for key in std::iter::once(&session.key).chain(&session.aliases) {
            if keys.get(key) == Some(&id) {
                keys.remove(key);
            }
        }
        Some(session)
    }

    /// Makes `alias` another key of session `id`; false when the key is
    /// already taken (by this session or another) or the session is full.
    pub fn add_alias(&mut self, id: SessionId, alias: FlowKey) -> bool {
        let Some(session) = self.sessions.get_mut(id) else {
            return false;
        };
        let keys = &mut self.listeners[session.listener].keys;
        if session.aliases.len() >= udpshard_shared::handoff::MAX_ALIASES
            || keys.contains_key(&alias)
        {
            return false;
        }
        keys.insert(alias, id);
        session.aliases.push(alias);
        true
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Visits up to `budget` slab slots from where the last sweep stopped and
    /// removes sessions idle for longer than their listener's timeout,
    /// handing each to `expired`. Called every tick with a budget sized so
    /// the whole table is swept within about a second, without a pause
    /// proportional to the table.
    pub fn sweep(
        &mut self,
        now_ms: u64,
        budget: usize,
        mut expired: impl FnMut(SessionId, Session<U>),
    ) {
        let capacity = self.sessions.capacity();
        if capacity == 0 {
            return;
        }
        for _ in 0..budget.min(capacity) {
            let id = self.sweep_cursor % capacity;
            self.sweep_cursor = (id + 1) % capacity;
            let Some(s) = self.sessions.get(id) else {
                continue;
            };
            let idle_ms = self.listeners[s.listener].idle_ms;
            if now_ms.saturating_sub(s.last_active_ms) > idle_ms {
                if let Some(session) = self.remove(id) {
                    expired(id, session);
                }
            }
        }
    }

    /// Follows a reload: listener `j` becomes `map[j]` (or is gone, and
    /// its sessions go to `closed`), and listeners take `limits`.
    pub fn remap(
        &mut self,
        map: &[Option<usize>],
        limits: Vec<(usize, u64)>,
        mut closed: impl FnMut(Session<U>),
    ) {
        let mut old: Vec<Option<ListenerTable>> = std::mem::take(&mut self.listeners)
            .into_iter()
            .map(Some)
            .collect();
        self.listeners = limits
            .into_iter()
            .map(|(max_sessions, idle_ms)| ListenerTable {
                keys: AHashMap::new(),
                max_sessions,
                idle_ms,
            })
            .collect();
        for (j, to) in map.iter().enumerate() {
            if let (Some(i), Some(table)) = (to, old.get_mut(j).and_then(Option::take)) {
                self.listeners[*i].keys = table.keys;
            }
        }
        let gone: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| map.get(s.listener).copied().flatten().is_none())
            .map(|(id, _)| id)
            .collect();
        for id in gone {
            if let Some(s) = self.sessions.try_remove(id) {
                closed(s);
            }
        }
        for (_, s) in self.sessions.iter_mut() {
            if let Some(Some(i)) = map.get(s.listener) {
                s.listener = *i;
            }
        }
    }

    /// Every session, mutably (reload re-resolves their backends).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (SessionId, &mut Session<U>)> {
        self.sessions.iter_mut()
    }

    /// Every session, for shutdown.
    pub fn drain(&mut self) -> impl Iterator<Item = Session<U>> + '_ {
        for l in &mut self.listeners {
            l.keys.clear();
        }
        self.sessions.drain()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(listener: usize, cid: u8, now: u64) -> Session<()> {
        Session {
            listener,
            key: FlowKey::new(&[cid; 8]).unwrap(),
            client: "127.0.0.1:9".parse().unwrap(),
            local_ip: None,
            upstream: (),
            last_active_ms: now,
            upstream_drops_seen: 0,
            reply_burst: false,
            backend: 0,
            aliases: Vec::new(),
            handoff_streak: (0, 0),
        }
    }

    #[test]
    fn lookup_is_per_listener() {
        let mut t = SessionTable::new([(10, 1000), (10, 1000)]);
        let id = t.insert(session(0, 1, 0));
        let key = FlowKey::new(&[1; 8]).unwrap();
        assert_eq!(t.lookup(0, &key), Some(id));
        assert_eq!(t.lookup(1, &key), None);
    }

    #[test]
    fn limit_is_enforced_and_freed_by_removal() {
        let mut t = SessionTable::new([(2, 1000)]);
        let a = t.insert(session(0, 1, 0));
        t.insert(session(0, 2, 0));
        assert_eq!(t.admit(0), Err(Refused::SessionLimit));
        t.remove(a);
        assert_eq!(t.admit(0), Ok(()));
    }

    #[test]
    fn sweep_expires_only_idle_sessions_within_budget() {
        let mut t = SessionTable::new([(100, 1000)]);
        for cid in 0..10 {
            // Even CIDs idle since 0, odd ones active at 1500.
            t.insert(session(0, cid, if cid % 2 == 0 { 0 } else { 1500 }));
        }
        let mut gone = Vec::new();
        t.sweep(2001, 4, |_, s| gone.push(s.key.as_bytes()[0]));
        assert_eq!(gone, vec![0, 2]);
        t.sweep(2001, 100, |_, s| gone.push(s.key.as_bytes()[0]));
        assert_eq!(gone, vec![0, 2, 4, 6, 8]);
        assert_eq!(t.len(), 5);
        assert_eq!(t.lookup(0, &FlowKey::new(&[4; 8]).unwrap()), None);
    }

    #[test]
    fn aliases_find_the_session_and_leave_with_it() {
        let mut t = SessionTable::new([(100, 1000)]);
        let id = t.insert(session(0, 1, 0));
        let alias = FlowKey::new(&[9; 8]).unwrap();
        assert!(t.add_alias(id, alias));
        assert!(!t.add_alias(id, alias), "an alias is added once");
        let other = t.insert(session(0, 2, 0));
        assert!(!t.add_alias(other, alias), "a key names one session");
        assert_eq!(t.lookup(0, &alias), Some(id));
        t.remove(id);
        assert_eq!(t.lookup(0, &alias), None);
        assert_eq!(t.lookup(0, &FlowKey::new(&[2; 8]).unwrap()), Some(other));
    }

    #[test]
    fn remap_follows_renumbered_listeners_and_closes_removed_ones() {
        let mut t = SessionTable::new([(10, 1000), (10, 1000), (10, 1000)]);
        let a = t.insert(session(0, 1, 0));
        let b = t.insert(session(1, 2, 0));
        let c = t.insert(session(2, 3, 0));
        let mut closed = Vec::new();
        // Listener 0 is removed, 1 becomes 0, 2 becomes 1; limits change.
        t.remap(&[None, Some(0), Some(1)], vec![(1, 5), (10, 5)], |s| {
            closed.push(s.key)
        });
        assert_eq!(closed, vec![FlowKey::new(&[1; 8]).unwrap()]);
        assert_eq!(t.lookup(0, &FlowKey::new(&[2; 8]).unwrap()), Some(b));
        assert_eq!(t.lookup(1, &FlowKey::new(&[3; 8]).unwrap()), Some(c));
        assert_eq!(t.admit(0), Err(Refused::SessionLimit), "new limit applies");
        assert!(t.get_mut(a).is_none());
    }

    #[test]
    fn ids_are_reused_without_stale_keys() {
        let mut t = SessionTable::new([(100, 1000)]);
        let a = t.insert(session(0, 1, 0));
        t.remove(a);
        let b = t.insert(session(0, 2, 0));
        assert_eq!(a, b, "slab reuses the slot");
        assert_eq!(t.lookup(0, &FlowKey::new(&[1; 8]).unwrap()), None);
        assert_eq!(t.lookup(0, &FlowKey::new(&[2; 8]).unwrap()), Some(b));
    }
}
