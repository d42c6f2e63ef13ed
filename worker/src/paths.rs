//! Upstream paths and the sockets they use. No I/O: sockets are opened and
//! closed through the [`Sockets`] the router is given.
//!
//! A path is one client address of a session with its own upstream 4-tuple:
//! (the socket's source address and port, the backend). An upstream socket is
//! bound to one (source, port) and unconnected, so it serves one path per
//! backend of its listener: its *slots*, indexed by backend. The capacity of
//! a listener is therefore `sources x ports x backends` paths, from about
//! `sessions / backends` descriptors.
//!
//! Every socket has a *home*: the worker holding its port lease, which reads
//! it. A session transferred to another worker takes its paths along as
//! borrowed copies of their sockets (`Home::Borrowed`): the new owner sends
//! on them, the home keeps reading them and relays their replies (a *relay*
//! path: one whose session lives elsewhere). The backend never sees a
//! 4-tuple change.
//!
//! A slot freed at its home cools for the listener's `port_reuse_delay`
//! before another path may use it toward the same backend, so a backend's
//! late datagrams for a closed path never reach a new one.
//!
//! A worker that takes over the flows of a worker that died binds each
//! flow's own port again when it can ([`Paths::inherited_slot`]): the flow
//! keeps its 4-tuple, and the socket's other slots are *inherited*: cooling
//! like any, except that the flow each one served may take it back first.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

use ahash::AHashMap;
use slab::Slab;
use udpshard_shared::owners::Owner;
use udpshard_shared::FlowKey;

/// An upstream socket's id: its slab index (the shell maps it to a
/// descriptor and a poll token).
pub type SockId = u32;
/// A path's id: its slab index.
pub type PathId = u32;
/// "None" for the ids above and for session ids stored as u32.
pub const NONE: u32 = u32::MAX;

const FREE: u32 = u32::MAX;
const COOLING: u32 = u32::MAX - 1;
/// Cooling, and reserved for the dead worker's flow that used it.
const INHERITED: u32 = u32::MAX - 2;

/// Whether a slot holds a path (not FREE, COOLING or INHERITED).
fn holds_path(slot: u32) -> bool {
    slot < INHERITED
}
/// The listener of a socket whose listener a reload removed: no route has
/// this index, so its datagrams are strays until it closes.
pub const GONE: usize = usize::MAX;

/// Why no socket could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// No (source, port) of the listener's ranges is free.
    NoPort,
    /// The process may open no more descriptors.
    NoFd,
    /// Any other failure of socket/bind.
    Other,
}

/// Opens and closes upstream sockets: in the worker, socket+bind on a
/// leased (source, port); in tests, an in-memory stand-in.
pub trait Sockets {
    /// Leases a free (source, port) of listener `listener`'s ranges for an
    /// address family (`ipv4`), binds socket `sock` on it and starts reading
    /// it; returns its local address.
    fn open(&mut self, sock: SockId, listener: usize, ipv4: bool) -> Result<SocketAddr, OpenError>;
    /// Closes `sock` (and returns its lease when this worker holds it).
    fn close(&mut self, sock: SockId);
    /// Takes over the lease of borrowed socket `sock`, bound to `local`,
    /// whose home is gone, and starts reading it. False when the lease is
    /// held by a process for which `serves` is true: that one took the
    /// socket first.
    fn adopt(&mut self, sock: SockId, local: SocketAddr, serves: &dyn Fn(Owner) -> bool) -> bool;
    /// Who holds the lease of the port `local` is bound to, or held it
    /// last (an orphan of a process that died holding it), if anyone.
    fn lease_holder(&self, local: SocketAddr) -> Option<Owner>;
    /// Takes the lease of the port `local` is bound to from `from`, who
    /// holds it (an upgrade's predecessor handing its socket over, or a
    /// successor whose upgrade was given up): false when `from` does not.
    fn take_lease(&mut self, local: SocketAddr, from: Owner) -> bool;
    /// Binds socket `sock` of `listener` on `local` again: the port of a
    /// path of dead worker `from`, for the flow that path served. Fails
    /// unless no one has leased the port since `from` held it. Returns how
    /// long (ms) its other 4-tuples still cool (`unreaped_cool_ms` when the
    /// supervisor has not yet reaped `from`).
    fn reclaim(
        &mut self,
        sock: SockId,
        listener: usize,
        local: SocketAddr,
        from: Owner,
        unreaped_cool_ms: u64,
    ) -> Result<u64, OpenError>;
    /// Whether new paths of `listener` may use a socket bound to `local`
    /// (a reload may have moved the listener's ranges).
    fn in_range(&self, listener: usize, local: SocketAddr) -> bool;
}

/// Who reads a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home {
    /// This worker holds its lease.
    Here,
    /// A copy of another worker's socket, for a session transferred here.
    Borrowed(Owner),
}

#[derive(Debug)]
pub struct UpSock {
    pub listener: usize,
    /// Its (source, port): names the socket across workers.
    pub local: SocketAddr,
    pub home: Home,
    /// By backend index: FREE, COOLING, INHERITED, or the path using it.
    slots: Vec<u32>,
    /// By backend index: until when a COOLING or INHERITED slot cools. The
    /// entry in `Paths::cooling` with this time frees it; an earlier one
    /// passes (its cooling ended when a path took the slot: a relay, or the
    /// flow an inherited slot waited for, which cools it anew when it
    /// closes).
    cool_until: Vec<u64>,
    /// Bound again for the flows of this dead worker: their INHERITED
    /// slots are theirs to take.
    heir_of: Option<Owner>,
    /// Slots not free.
    used: u32,
    pub idle_since_ms: u64,
    /// Outside its listener's ranges since a reload: no new paths.
    pub retired: bool,
    /// The kernel's drop count on it already counted.
    pub drops_seen: u32,
}

impl UpSock {
    fn new(listener: usize, local: SocketAddr, home: Home, backends: usize) -> UpSock {
        UpSock {
            listener,
            local,
            home,
            slots: vec![FREE; backends],
            cool_until: vec![0; backends],
            heir_of: None,
            used: 0,
            idle_since_ms: 0,
            retired: false,
            drops_seen: 0,
        }
    }

    pub fn is_free(&self, backend: u16) -> bool {
        self.slots.get(usize::from(backend)) == Some(&FREE)
    }
}

/// One client address of a session and its upstream 4-tuple.
#[derive(Debug, Clone)]
pub struct Path {
    pub listener: usize,
    pub backend: u16,
    pub sock: SockId,
    /// The session it belongs to here; NONE for a relay (the session lives
    /// at another worker, which sends on a borrowed copy of the socket).
    pub session: u32,
    /// The session's next path (NONE: the last).
    pub next: PathId,
    pub client: SocketAddr,
    /// The address the client wrote to (wildcard listeners only).
    pub local_ip: Option<IpAddr>,
    /// The session's primary key: a relay finds the session's owner by it.
    pub key: FlowKey,
    pub last_client_ms: u64,
    pub last_reply_ms: u64,
    /// Its backend has sent on it (`last_reply_ms` says when).
    pub answered: bool,
    /// When a relay last told the owner that replies flow.
    pub reported_ms: u64,
}

impl Path {
    /// A path not yet in any session's list (`session`, `next`: NONE), last
    /// heard from its client at `last_client_ms`.
    pub fn new(
        listener: usize,
        backend: u16,
        sock: SockId,
        client: SocketAddr,
        local_ip: Option<IpAddr>,
        key: FlowKey,
        last_client_ms: u64,
    ) -> Path {
        Path {
            listener,
            backend,
            sock,
            session: NONE,
            next: NONE,
            client,
            local_ip,
            key,
            last_client_ms,
            last_reply_ms: 0,
            answered: false,
            reported_ms: 0,
        }
    }

    pub fn is_relay(&self) -> bool {
        self.session == NONE
    }

    pub fn last_active_ms(&self) -> u64 {
        self.last_client_ms.max(self.last_reply_ms)
    }
}

/// A listener's sockets that have a free slot, by backend. Entries go
/// stale when the slot is taken by other means; they are checked on pop.
#[derive(Debug, Default)]
struct Pool {
    free: Vec<Vec<SockId>>,
}

#[derive(Debug, Default)]
pub struct Paths {
    pub socks: Slab<UpSock>,
    pub paths: Slab<Path>,
    pools: Vec<Pool>,
    /// Home slots cooling (COOLING or INHERITED): (until, socket, backend),
    /// in time order per listener delay (delays differ by listener, so the
    /// queue is checked in full order only at its front, where it is due
    /// first). An entry frees its slot only if the slot still cools until
    /// that time ([`UpSock`]'s `cool_until`).
    cooling: VecDeque<(u64, SockId, u16)>,
    /// Every socket held here, by its (source, port).
    by_local: AHashMap<SocketAddr, SockId>,
    /// Sockets to close at the next tick, when no queued send names them.
    doomed: Vec<SockId>,
    sock_cursor: usize,
    /// One past the highest path index ever used (the slab, pre-sized, is
    /// far larger): where sweeps stop.
    path_span: usize,
}

impl Paths {
    pub fn new(listeners: usize, expected_paths: usize) -> Paths {
        Paths {
            paths: Slab::with_capacity(expected_paths),
            pools: (0..listeners).map(|_| Pool::default()).collect(),
            ..Paths::default()
        }
    }

    /// The path indices a sweep covers.
    pub fn path_span(&self) -> usize {
        self.path_span
    }

    pub fn path(&self, id: PathId) -> Option<&Path> {
        self.paths.get(id as usize)
    }

    pub fn path_mut(&mut self, id: PathId) -> Option<&mut Path> {
        self.paths.get_mut(id as usize)
    }

    pub fn sock(&self, id: SockId) -> Option<&UpSock> {
        self.socks.get(id as usize)
    }

    pub fn sock_mut(&mut self, id: SockId) -> Option<&mut UpSock> {
        self.socks.get_mut(id as usize)
    }

    pub fn by_local(&self, local: SocketAddr) -> Option<SockId> {
        self.by_local.get(&local).copied()
    }

    /// The path on `sock` toward backend `backend` (a reply's demux).
    pub fn on_slot(&self, sock: SockId, backend: u16) -> Option<PathId> {
        let slot = *self.sock(sock)?.slots.get(usize::from(backend))?;
        holds_path(slot).then_some(slot)
    }

    /// The slot toward `backend` on the socket bound to `local`, for the
    /// flow whose path dead worker `from` had there: a socket this worker
    /// already bound again for `from`'s flows, whose slot still waits for
    /// its flow, or one it binds now (`sockets.reclaim`). The socket's other
    /// slots stay reserved while they cool. `None`: a new port it is.
    #[allow(clippy::too_many_arguments)]
    pub fn inherited_slot<S: Sockets>(
        &mut self,
        listener: usize,
        backend: u16,
        local: SocketAddr,
        from: Owner,
        backends: usize,
        now_ms: u64,
        cool_ms: u64,
        sockets: &mut S,
    ) -> Option<SockId> {
        let b = usize::from(backend);
        if b >= backends {
            return None;
        }
        if let Some(&sock) = self.by_local.get(&local) {
            let s = self.socks.get_mut(sock as usize)?;
            let ours = s.home == Home::Here
                && s.listener == listener
                && !s.retired
                && s.heir_of == Some(from);
            return match s.slots.get(b) {
                Some(&INHERITED) if ours => {
                    // Its cooling entry finds a path there, and passes.
                    s.slots[b] = FREE;
                    s.used -= 1;
                    Some(sock)
                }
                // Cooled meanwhile: anyone's, so the flow's as well.
                Some(&FREE) if ours => Some(sock),
                _ => None,
            };
        }
        let _ = self.pool(listener, backends);
        let entry = self.socks.vacant_entry();
        let sock = entry.key() as SockId;
        let left = sockets.reclaim(sock, listener, local, from, cool_ms).ok()?;
        let mut up = UpSock::new(listener, local, Home::Here, backends);
        up.heir_of = Some(from);
        for (i, slot) in up.slots.iter_mut().enumerate() {
            if i != b && left > 0 {
                *slot = INHERITED;
                up.cool_until[i] = now_ms + left;
                up.used += 1;
                self.cooling.push_back((now_ms + left, sock, i as u16));
            } else if i != b {
                push_free(&mut self.pools, listener, i as u16, sock);
            }
        }
        entry.insert(up);
        self.by_local.insert(local, sock);
        Some(sock)
    }

    /// A home socket of `listener` whose slot for `backend` is free,
    /// opening a new one when none is. `ipv4[b]` says backend b's family.
    pub fn free_slot<S: Sockets>(
        &mut self,
        listener: usize,
        backend: u16,
        ipv4: &[bool],
        sockets: &mut S,
    ) -> Result<SockId, OpenError> {
        let family = ipv4.get(usize::from(backend)).copied().unwrap_or(true);
        if let Some(pool) = self.pools.get_mut(listener) {
            if let Some(stack) = pool.free.get_mut(usize::from(backend)) {
                while let Some(sock) = stack.pop() {
                    let ok = self.socks.get(sock as usize).is_some_and(|s| {
                        s.home == Home::Here
                            && s.listener == listener
                            && s.local.is_ipv4() == family
                            && !s.retired
                            && s.is_free(backend)
                    });
                    if ok {
                        return Ok(sock);
                    }
                }
            }
        }
        let entry = self.socks.vacant_entry();
        let sock = entry.key() as SockId;
        let local = sockets.open(sock, listener, family)?;
        entry.insert(UpSock::new(listener, local, Home::Here, ipv4.len()));
        self.by_local.insert(local, sock);
        // Every other backend of its family may use it too.
        let pool = self.pool(listener, ipv4.len());
        for (b, stack) in pool.free.iter_mut().enumerate() {
            if b != usize::from(backend) && ipv4[b] == family {
                stack.push(sock);
            }
        }
        Ok(sock)
    }

    fn pool(&mut self, listener: usize, backends: usize) -> &mut Pool {
        if self.pools.len() <= listener {
            self.pools.resize_with(listener + 1, Pool::default);
        }
        let pool = &mut self.pools[listener];
        if pool.free.len() < backends {
            pool.free.resize_with(backends, Vec::new);
        }
        pool
    }

    /// A socket of another worker, borrowed for a transferred session.
    pub fn borrow_sock(
        &mut self,
        listener: usize,
        local: SocketAddr,
        home: Owner,
        backends: usize,
    ) -> SockId {
        let sock = self
            .socks
            .insert(UpSock::new(listener, local, Home::Borrowed(home), backends))
            as SockId;
        self.by_local.insert(local, sock);
        sock
    }

    /// Adds relay `path` on its socket's slot: a free one, or one cooling
    /// since the socket was adopted from a home that died (a worker that
    /// has a path there says it is in use). `None` when the slot holds a
    /// path or is reserved for a dead worker's flow.
    pub fn insert_relay(&mut self, path: Path) -> Option<PathId> {
        let key = (path.sock, path.backend);
        let slot = self.slot(key.0, key.1)?;
        if slot != FREE && slot != COOLING {
            return None;
        }
        Some(self.occupy(path, slot == FREE))
    }

    /// Adds `path` on its socket's slot, which must be free.
    pub fn insert(&mut self, path: Path) -> Option<PathId> {
        if self.slot(path.sock, path.backend)? != FREE {
            return None;
        }
        Some(self.occupy(path, true))
    }

    /// What slot `backend` of `sock` holds.
    fn slot(&self, sock: SockId, backend: u16) -> Option<u32> {
        self.socks
            .get(sock as usize)?
            .slots
            .get(usize::from(backend))
            .copied()
    }

    /// Puts `path` on its slot (`was_free`: the slot counts as used from
    /// now; a cooling one already does).
    fn occupy(&mut self, path: Path, was_free: bool) -> PathId {
        let (sock, backend) = (path.sock as usize, usize::from(path.backend));
        let id = self.paths.insert(path) as PathId;
        self.path_span = self.path_span.max(id as usize + 1);
        let s = &mut self.socks[sock];
        s.slots[backend] = id;
        if was_free {
            s.used += 1;
        }
        id
    }

    /// Removes a path. Its slot cools at the socket's home for `cool_ms`
    /// (free at once on a borrowed copy, whose home does its own cooling); a
    /// borrowed copy no path uses any more is closed at the next tick.
    pub fn remove(&mut self, id: PathId, now_ms: u64, cool_ms: u64) -> Option<Path> {
        let path = self.paths.try_remove(id as usize)?;
        let backend = usize::from(path.backend);
        if let Some(s) = self.socks.get_mut(path.sock as usize) {
            if s.slots.get(backend) == Some(&id) {
                match s.home {
                    Home::Here if cool_ms > 0 => {
                        s.slots[backend] = COOLING;
                        s.cool_until[backend] = now_ms + cool_ms;
                        self.cooling
                            .push_back((now_ms + cool_ms, path.sock, path.backend));
                    }
                    Home::Here => {
                        s.slots[backend] = FREE;
                        s.used -= 1;
                        push_free(&mut self.pools, s.listener, path.backend, path.sock);
                    }
                    Home::Borrowed(_) => {
                        s.slots[backend] = FREE;
                        s.used -= 1;
                    }
                }
                if s.used == 0 {
                    s.idle_since_ms = now_ms;
                    if matches!(s.home, Home::Borrowed(_)) {
                        self.doomed.push(path.sock);
                    }
                }
            }
        }
        Some(path)
    }

    /// Periodic work: cooled slots become free, and sockets that no queued
    /// send can name any more close: borrowed copies no path uses, and home
    /// sockets with nothing on them for `idle_close_ms`. Returns the sockets
    /// this slice of the sweep visited and kept, for a look at their leases:
    /// the borrowed copies with their homes, and the home sockets.
    pub fn tick<S: Sockets>(
        &mut self,
        now_ms: u64,
        idle_close_ms: u64,
        budget: usize,
        sockets: &mut S,
    ) -> (Vec<(SockId, Owner)>, Vec<SockId>) {
        let mut borrowed = Vec::new();
        let mut homes = Vec::new();
        while let Some(&(until, sock, backend)) = self.cooling.front() {
            if until > now_ms {
                break;
            }
            self.cooling.pop_front();
            if let Some(s) = self.socks.get_mut(sock as usize) {
                let b = usize::from(backend);
                let cooling = matches!(s.slots.get(b), Some(&(COOLING | INHERITED)));
                if cooling && s.cool_until.get(b) == Some(&until) {
                    s.slots[b] = FREE;
                    s.used -= 1;
                    if s.used == 0 {
                        s.idle_since_ms = now_ms;
                    }
                    push_free(&mut self.pools, s.listener, backend, sock);
                }
            }
        }
        let capacity = self.socks.capacity();
        for _ in 0..budget.min(capacity) {
            let id = self.sock_cursor % capacity.max(1);
            self.sock_cursor = id + 1;
            if let Some(s) = self.socks.get(id) {
                let idle = s.used == 0 && now_ms.saturating_sub(s.idle_since_ms) >= idle_close_ms;
                match s.home {
                    Home::Here if idle || (s.retired && s.used == 0) => {
                        self.doomed.push(id as SockId)
                    }
                    Home::Here => homes.push(id as SockId),
                    Home::Borrowed(home) => borrowed.push((id as SockId, home)),
                }
            }
        }
        for sock in std::mem::take(&mut self.doomed) {
            let gone = self.socks.get(sock as usize).is_some_and(|s| s.used == 0);
            if gone {
                let s = self.socks.remove(sock as usize);
                if self.by_local.get(&s.local) == Some(&sock) {
                    self.by_local.remove(&s.local);
                }
                sockets.close(sock);
            }
        }
        (borrowed, homes)
    }

    /// A borrowed copy whose home died became this worker's own: slots no
    /// path of ours uses were in use at the dead home a moment ago, so they
    /// cool before anything uses them.
    pub fn adopted(&mut self, sock: SockId, me_now_ms: u64, cool_ms: u64) {
        let Some((listener, backends)) = self.sock(sock).map(|s| (s.listener, s.slots.len()))
        else {
            return;
        };
        // Its slots join the pool when they are free (a worker that opened
        // no socket of the listener has no pool for it yet; a listener a
        // reload removed has none).
        if listener != GONE {
            let _ = self.pool(listener, backends);
        }
        let Some(s) = self.socks.get_mut(sock as usize) else {
            return;
        };
        s.home = Home::Here;
        for (b, slot) in s.slots.iter_mut().enumerate() {
            if *slot == FREE {
                if cool_ms > 0 {
                    *slot = COOLING;
                    s.cool_until[b] = me_now_ms + cool_ms;
                    s.used += 1;
                    self.cooling
                        .push_back((me_now_ms + cool_ms, sock, b as u16));
                } else {
                    push_free(&mut self.pools, s.listener, b as u16, sock);
                }
            }
        }
    }

    /// The paths on `sock`.
    pub fn on_sock(&self, sock: SockId) -> Vec<PathId> {
        self.sock(sock).map_or_else(Vec::new, |s| {
            s.slots.iter().copied().filter(|p| holds_path(*p)).collect()
        })
    }

    /// Follows a reload: listener `j` becomes `map[j]`; backend index `i` of
    /// old listener `j` becomes `backends[j][i]` (`None`: removed); listener
    /// `k` has `counts[k]` backends now. The caller has already removed the
    /// paths to removed backends and of removed listeners.
    pub fn remap(
        &mut self,
        map: &[Option<usize>],
        backends: &[Vec<Option<u16>>],
        counts: &[usize],
    ) {
        for (_, s) in self.socks.iter_mut() {
            let Some(Some(to)) = map.get(s.listener) else {
                // Its listener is gone (the caller closed its paths): its
                // cooling slots finish cooling, then it closes.
                s.retired = true;
                s.listener = GONE;
                continue;
            };
            let table = &backends[s.listener];
            let mut slots = vec![FREE; counts[*to]];
            let mut cool_until = vec![0; counts[*to]];
            for (i, slot) in s.slots.iter().enumerate() {
                if let Some(Some(j)) = table.get(i) {
                    slots[usize::from(*j)] = *slot;
                    cool_until[usize::from(*j)] = s.cool_until[i];
                }
            }
            s.used = slots.iter().filter(|x| **x != FREE).count() as u32;
            s.slots = slots;
            s.cool_until = cool_until;
            s.listener = *to;
        }
        for (_, p) in self.paths.iter_mut() {
            if let Some(Some(to)) = map.get(p.listener) {
                if let Some(Some(j)) = backends[p.listener].get(usize::from(p.backend)) {
                    p.backend = *j;
                }
                p.listener = *to;
            }
        }
        // Cooling entries and free stacks name old indices: rebuild.
        let cooling = std::mem::take(&mut self.cooling);
        self.pools = counts
            .iter()
            .map(|n| Pool {
                free: vec![Vec::new(); *n],
            })
            .collect();
        for (until, sock, b) in cooling {
            let new = self.socks.get(sock as usize).and_then(|s| {
                if s.listener == GONE {
                    // Not remapped: its slots keep their old indices.
                    return Some(b);
                }
                let old = map.iter().position(|m| *m == Some(s.listener))?;
                backends[old].get(usize::from(b)).copied().flatten()
            });
            // A slot toward a removed backend went with the remap.
            if let Some(b) = new {
                self.cooling.push_back((until, sock, b));
            }
        }
        for (id, s) in self.socks.iter() {
            if s.home == Home::Here && !s.retired {
                for (b, slot) in s.slots.iter().enumerate() {
                    if *slot == FREE {
                        push_free(&mut self.pools, s.listener, b as u16, id as SockId);
                    }
                }
            }
        }
    }

    /// Every path's id, for reloads and shutdown.
    pub fn ids(&self) -> Vec<PathId> {
        self.paths.iter().map(|(id, _)| id as PathId).collect()
    }

    /// Sockets held here: (home ones, borrowed copies).
    pub fn sock_counts(&self) -> (usize, usize) {
        let home = self
            .socks
            .iter()
            .filter(|(_, s)| s.home == Home::Here)
            .count();
        (home, self.socks.len() - home)
    }

    /// A socket that can take no new path, closed at the next tick once no
    /// path uses it.
    pub fn doom(&mut self, sock: SockId) {
        self.doomed.push(sock);
    }
}

fn push_free(pools: &mut [Pool], listener: usize, backend: u16, sock: SockId) {
    if let Some(stack) = pools
        .get_mut(listener)
        .and_then(|p| p.free.get_mut(usize::from(backend)))
    {
        stack.push(sock);
    }
}
