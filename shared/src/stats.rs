//! The shared-memory stats region: a versioned header, then one slot of
//! counters per worker. Counters only: what workers coordinate through (the
//! ownership table, port leases) lives in the state region (`crate::state`),
//! which is not a file anyone can read.
//!
//! The supervisor creates the region as a file, mode 0640 and group
//! `udpshard` where that group exists (so `udpshard stats` can read it as
//! root or as a member of the group, with no connection to the running
//! proxy) and passes
//! its descriptor to every worker, which maps it and writes only its own slot.
//! Every word has one writer, so writers use relaxed atomic stores and readers
//! read words; no locks. Layout, in little-endian u64 words:
//!
//! ```text
//! [0, HEADER_WORDS)               header: see `Header`
//! [HEADER_WORDS + k*SLOT_WORDS)   slot k: see `Counter`
//! then BACKEND_ROWS rows of backend metadata (`crate::backends`)
//! then, per slot, BACKEND_ROWS x FIELDS backend counters
//! then, per slot, `delay::WORDS` words of queue delay (`delay`), where
//!   the header's `DelayWords` says so (a region an older binary created
//!   has none, and is served without)
//! ```
//! A slot is 512 bytes, so slots never share a cache line.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

use crate::backends::{
    self, BackendCounter, BackendMeta, BackendState, BACKEND_ROWS, FIELDS, META_WORDS,
};
pub use crate::counter::{Counter, Entry, Kind};
use crate::owners::Owner;
use crate::DropReason;

pub mod delay;
pub mod guard;

/// "UDPSHRD" and the layout version in the top byte.
pub const MAGIC: u64 = u64::from_le_bytes(*b"UDPSHRD\x03");
pub const HEADER_WORDS: usize = 64;
pub const SLOT_WORDS: usize = 64;

/// Header words, written by the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Header {
    Magic = 0,
    SlotCapacity,
    SlotWords,
    /// Worker slots in use (the reuseport group size).
    Workers,
    SupervisorPid,
    /// Unix time in seconds when the region was created.
    StartedAt,
    /// Successful config loads, the first one included.
    ConfigGeneration,
    ReloadFailures,
    /// The supervisor's start time as /proc/PID/stat counts it (field 22,
    /// clock ticks since boot): with SupervisorPid it names the process, so
    /// a reader can tell it from a later process that reuses the PID.
    SupervisorStartTicks,
    /// Unix time in seconds when the supervisor exited after a stop; 0 while
    /// it runs, and when it died without stopping.
    StoppedAt,
    /// The inode of the supervisor's PID namespace (/proc/self/ns/pid): a
    /// reader in another namespace (the host, reading a container's file)
    /// cannot check SupervisorPid, and goes by the heartbeat.
    SupervisorPidNs,
    /// CLOCK_MONOTONIC (ns) at the supervisor's latest loop iteration, at
    /// least every 2 s while it runs.
    SupervisorHeartbeat,
    /// Slots that have ever served (at least `Workers`): a slot a resize
    /// retired keeps its counters, so totals over these never go backwards,
    /// and a slot that serves again continues them.
    SlotsUsed,
    /// Backend rows given out (`crate::backends`).
    BackendRows,
    /// Bumped by the supervisor whenever passive health changes a
    /// backend's state; each worker says which it has applied
    /// (`Counter::HealthApplied`).
    HealthGeneration,
    /// Binary upgrades (SIGUSR2) that did not take over: the old
    /// generation kept serving.
    UpgradeFailures,
    /// Binary upgrades that took over, carried from supervisor to supervisor.
    Upgrades,
    /// The supervisor's version ([`pack_version`]).
    SupervisorVersion,
    /// Times a process found the file cut short under its mapping and put
    /// its length back (`guard`).
    Repairs,
    /// Words per slot of the queue-delay tail ([`delay::WORDS`]); 0 in a
    /// region without one.
    DelayWords,
    /// Whether the proxy should be sent new flows ([`Readiness`]), as
    /// `/ready` and `udpshard health` say.
    Readiness,
}

/// What the supervisor tells whatever steers traffic to this host (a BGP
/// speaker following `/ready` or `udpshard health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Readiness {
    /// Not written: a supervisor from before the word runs (a reader then
    /// goes by the slots' states).
    Unknown = 0,
    /// Its workers are starting: not yet every one serves.
    Starting = 1,
    Ready = 2,
    /// SIGTERM with `withdraw_delay`: still serving, new flows included,
    /// until the route is gone; then it drains.
    Withdrawing = 3,
    /// Stopping: new flows are refused, live sessions finish.
    Draining = 4,
    /// Serving, but no worker is: every one is being restarted.
    NoWorker = 5,
    /// Serving, but a listener has no backend up (`readiness =
    /// "backend_up"`).
    NoBackend = 6,
}

impl Readiness {
    pub fn from_word(w: u64) -> Readiness {
        match w {
            1 => Readiness::Starting,
            2 => Readiness::Ready,
            3 => Readiness::Withdrawing,
            4 => Readiness::Draining,
            5 => Readiness::NoWorker,
            6 => Readiness::NoBackend,
            _ => Readiness::Unknown,
        }
    }

    /// Why it is not ready, in a few words (`None` when it is, or when the
    /// word says nothing).
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Readiness::Ready | Readiness::Unknown => None,
            Readiness::Starting => Some("starting: not every worker serves yet"),
            Readiness::Withdrawing => {
                Some("withdrawing: stopping soon, still serving until the drain begins")
            }
            Readiness::Draining => Some("draining: stopping, new flows are refused"),
            Readiness::NoWorker => Some("no worker serves: every one is being restarted"),
            Readiness::NoBackend => {
                Some("no backend up: every backend of a listener is down; still serving")
            }
        }
    }
}

/// A version `major.minor.patch` and the first 7 hex digits of its commit
/// in one word: major 8 bits, minor 12, patch 16, commit 28 (0: unknown).
pub fn pack_version(version: &str, commit: &str) -> u64 {
    let mut parts = version
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor, patch) = (
        parts.next().unwrap_or(0) & 0xff,
        parts.next().unwrap_or(0) & 0xfff,
        parts.next().unwrap_or(0) & 0xffff,
    );
    let commit = commit
        .get(..7)
        .and_then(|c| u64::from_str_radix(c, 16).ok())
        .unwrap_or(0);
    major << 56 | minor << 44 | patch << 28 | commit
}

/// `0.1.0+1a2b3c4` from a [`pack_version`] word ("" for 0: not written).
pub fn version_text(word: u64) -> String {
    if word == 0 {
        return String::new();
    }
    let base = format!(
        "{}.{}.{}",
        word >> 56,
        (word >> 44) & 0xfff,
        (word >> 28) & 0xffff
    );
    match word & 0xfff_ffff {
        0 => base,
        commit => format!("{base}+{commit:07x}"),
    }
}

/// The client datagrams a worker's slot has taken in: read from its
/// listener sockets, or handed to it by other workers.
pub fn client_arrived(get: impl Fn(Counter) -> u64) -> u64 {
    get(Counter::RxPackets).wrapping_add(get(Counter::HandoffIn))
}

/// The client datagrams a worker's slot has settled: forwarded, handed on,
/// or dropped after it read them (kernel drops on the listener socket came
/// before, and are not in `client_arrived`).
pub fn client_settled(get: impl Fn(Counter) -> u64) -> u64 {
    settled(
        &get,
        [Counter::TxPackets, Counter::HandoffOut],
        DropReason::client(),
    )
}

/// The replies a worker's slot has read from backends, and those it has
/// settled (sent on, relayed, or dropped after it read them).
pub fn replies_ledger(get: impl Fn(Counter) -> u64) -> (u64, u64) {
    let settled = settled(&get, [Counter::RepliesOut], DropReason::reply());
    (get(Counter::RepliesIn), settled)
}

/// `sent` plus the drops of `reasons` that came after a worker read the
/// datagram.
fn settled<const N: usize>(
    get: &impl Fn(Counter) -> u64,
    sent: [Counter; N],
    reasons: impl Iterator<Item = DropReason>,
) -> u64 {
    let dropped = reasons
        .filter(|r| !r.before_read())
        .map(DropReason::counter);
    sent.into_iter()
        .chain(dropped)
        .fold(0u64, |sum, c| sum.wrapping_add(get(c)))
}

/// What a slot's process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum SlotState {
    Empty = 0,
    Starting = 1,
    Ready = 2,
    Draining = 3,
    Exited = 4,
    /// Still running, leaving: its ownership entries are stale.
    Retiring = 5,
}

impl SlotState {
    pub fn from_word(w: u64) -> SlotState {
        match w {
            1 => SlotState::Starting,
            2 => SlotState::Ready,
            3 => SlotState::Draining,
            4 => SlotState::Exited,
            5 => SlotState::Retiring,
            _ => SlotState::Empty,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SlotState::Empty => "empty",
            SlotState::Starting => "starting",
            SlotState::Ready => "ready",
            SlotState::Draining => "draining",
            SlotState::Exited => "exited",
            SlotState::Retiring => "retiring",
        }
    }
}

const _: () = assert!(Counter::COUNT <= SLOT_WORDS);

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("not a udpshard stats file (bad magic or layout version)")]
    BadMagic,
    #[error("stats file is truncated: {len} bytes, layout needs {need}")]
    Truncated { len: usize, need: usize },
    #[error(
        "{path}: permission denied: the stats file is readable by its owner and the {STATS_GROUP} \
         group (sudo usermod -aG {STATS_GROUP} $USER, then log in again)"
    )]
    NoAccess { path: String },
}

/// The group that may read the stats file (the package creates it).
pub const STATS_GROUP: &str = "udpshard";

/// The mapped region, as the supervisor or a worker holds it.
pub struct StatsRegion {
    map: MmapMut,
    /// Its range in the truncation guard (`guard`), if guarded.
    guarded: Option<usize>,
}

impl Drop for StatsRegion {
    fn drop(&mut self) {
        if let Some(slot) = self.guarded {
            guard::unguard(slot);
        }
    }
}

impl StatsRegion {
    /// Creates (or replaces) the file at `path` for `slots` workers, and
    /// maps it.
    pub fn create(path: &Path, slots: usize) -> Result<(StatsRegion, File), StatsError> {
        let io_err = |source| StatsError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        // A new inode every start: a reader that still maps the previous
        // run's file keeps a consistent, if stale, view.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(path)
            .map_err(io_err)?;
        share_with_group(&file);
        file.set_len(region_bytes(slots) as u64).map_err(io_err)?;
        let region = StatsRegion::map(&file).map_err(io_err)?;
        region.set_header(Header::SlotCapacity, slots as u64);
        region.set_header(Header::SlotWords, SLOT_WORDS as u64);
        region.set_header(Header::DelayWords, delay::WORDS as u64);
        region.set_header(Header::Readiness, Readiness::Starting as u64);
        region.set_header(Header::Magic, MAGIC);
        Ok((region, file))
    }

    /// Maps a region created by [`StatsRegion::create`] (a worker's view).
    pub fn open(file: &File) -> Result<StatsRegion, StatsError> {
        let region = StatsRegion::map(file).map_err(|source| StatsError::Io {
            path: "stats region".into(),
            source,
        })?;
        let need = HEADER_WORDS * 8;
        if region.map.len() < need {
            return Err(StatsError::Truncated {
                len: region.map.len(),
                need,
            });
        }
        if region.header(Header::Magic) != MAGIC {
            return Err(StatsError::BadMagic);
        }
        if region.slot_capacity() > region.map.len() / (SLOT_WORDS * 8) {
            return Err(StatsError::Truncated {
                len: region.map.len(),
                need: region.slot_capacity().saturating_mul(SLOT_WORDS * 8),
            });
        }
        let need = region.expected_bytes();
        if region.map.len() < need {
            return Err(StatsError::Truncated {
                len: region.map.len(),
                need,
            });
        }
        Ok(region)
    }

    fn map(file: &File) -> io::Result<StatsRegion> {
        // SAFETY: the file is created at its final size, which no udpshard
        // process changes (one cut by another program is put back by the
        // guard on the first access past the cut, below); every access goes
        // through the atomic views below, so concurrent writers in other
        // processes cannot cause a data race.
        let map = unsafe { MmapMut::map_mut(file)? };
        let guarded = guard::guard(map.as_ptr(), map.len(), file);
        Ok(StatsRegion { map, guarded })
    }

    /// The words a repair writes back ([`StatsRegion::restore`]): the
    /// header, every slot, the backend metadata (not the backend counters,
    /// which workers write).
    pub fn save(&self, into: &mut Vec<u64>) {
        let end = backend_counts_at(self.slot_capacity(), 0).min(self.words().len());
        into.clear();
        into.extend(
            self.words()[..end]
                .iter()
                .map(|w| w.load(Ordering::Relaxed)),
        );
    }

    /// After the file was cut short and its length put back (zeros where
    /// it was cut): writes back what [`StatsRegion::save`] saved of the
    /// supervisor's words (the header but its heartbeat and repair count,
    /// the slots' supervisor-written words, the backend metadata). Workers
    /// put theirs back at their next publish.
    pub fn restore(&self, saved: &[u64]) {
        let words = self.words();
        let Some(&capacity) = saved.get(Header::SlotCapacity as usize) else {
            return;
        };
        let slots_end = slot_words_end(capacity as usize).min(saved.len());
        for (i, &value) in saved.iter().enumerate().take(words.len()) {
            let keep = if i < HEADER_WORDS {
                i == Header::SupervisorHeartbeat as usize || i == Header::Repairs as usize
            } else if i < slots_end {
                Counter::all()
                    .find(|c| *c as usize == (i - HEADER_WORDS) % SLOT_WORDS)
                    .is_some_and(Counter::worker_owned)
            } else {
                false
            };
            if !keep {
                words[i].store(value, Ordering::Relaxed);
            }
        }
    }

    /// The length the header describes: the base layout, and the
    /// queue-delay tail where the header names one.
    fn expected_bytes(&self) -> usize {
        let slots = self.slot_capacity();
        match self.header(Header::DelayWords) as usize {
            delay::WORDS => region_bytes(slots),
            _ => base_bytes(slots),
        }
    }

    /// Slot `k`'s queue-delay words; `None` where the region has none (an
    /// older binary created it) or beyond its capacity.
    pub fn delay(&self, k: usize) -> Option<&[AtomicU64]> {
        let slots = self.slot_capacity();
        if k >= slots || self.header(Header::DelayWords) != delay::WORDS as u64 {
            return None;
        }
        let at = delay_at(slots, k);
        self.words().get(at..at + delay::WORDS)
    }

    /// The region's length in bytes (the file's, when whole).
    pub fn bytes(&self) -> usize {
        self.map.len()
    }

    fn words(&self) -> &[AtomicU64] {
        let ptr = self.map.as_ptr() as *const AtomicU64;
        // SAFETY: the mapping is page-aligned (so 8-byte aligned), lives as
        // long as `self`, and AtomicU64 has u64's size; shared-memory words are
        // only ever accessed atomically, here or in other processes.
        unsafe { std::slice::from_raw_parts(ptr, self.map.len() / 8) }
    }

    pub fn header(&self, h: Header) -> u64 {
        self.words()[h as usize].load(Ordering::Relaxed)
    }

    pub fn set_header(&self, h: Header, value: u64) {
        self.words()[h as usize].store(value, Ordering::Relaxed);
    }

    /// Puts `n` slots in service; slots that served before stay counted
    /// ([`Header::SlotsUsed`]).
    pub fn set_workers(&self, n: usize) {
        self.set_header(Header::Workers, n as u64);
        let used = self.header(Header::SlotsUsed).max(n as u64);
        self.set_header(Header::SlotsUsed, used);
    }

    pub fn slot_capacity(&self) -> usize {
        self.header(Header::SlotCapacity) as usize
    }

    /// Slot `k`; `None` beyond the region's capacity.
    pub fn slot(&self, k: usize) -> Option<StatsSlot<'_>> {
        if k >= self.slot_capacity() {
            return None;
        }
        let start = HEADER_WORDS + k * SLOT_WORDS;
        self.words()
            .get(start..start + SLOT_WORDS)
            .map(|words| StatsSlot { words })
    }
}

impl StatsRegion {
    fn meta_words(&self, row: usize) -> Option<&[AtomicU64]> {
        if row >= BACKEND_ROWS {
            return None;
        }
        let at = backend_meta_at(self.slot_capacity()) + row * META_WORDS;
        self.words().get(at..at + META_WORDS)
    }

    /// The row of `listener`'s backend `addr`, given by the supervisor.
    pub fn backend_row(&self, listener: &str, addr: SocketAddr) -> Option<usize> {
        let want = backends::identity_words(listener, addr);
        let used = (self.header(Header::BackendRows) as usize).min(BACKEND_ROWS);
        (0..used).find(|&row| {
            self.meta_words(row).is_some_and(|w| {
                w[0].load(Ordering::Acquire) & 1 != 0
                    && want
                        .iter()
                        .zip(&w[1..])
                        .all(|(x, y)| *x == y.load(Ordering::Relaxed))
            })
        })
    }

    /// Gives `listener`'s backend `addr` a row (the supervisor; the same
    /// one as before for a backend a reload keeps) and sets its standing.
    /// `None`: every row is taken.
    pub fn register_backend(
        &self,
        listener: &str,
        addr: SocketAddr,
        state: BackendState,
        weight: u32,
    ) -> Option<usize> {
        let row = match self.backend_row(listener, addr) {
            Some(row) => row,
            None => {
                let row = self.header(Header::BackendRows) as usize;
                let w = self.meta_words(row)?;
                for (word, v) in w[1..].iter().zip(backends::identity_words(listener, addr)) {
                    word.store(v, Ordering::Relaxed);
                }
                self.set_header(Header::BackendRows, row as u64 + 1);
                row
            }
        };
        self.set_backend(row, true, state, weight);
        Some(row)
    }

    /// Sets row `row`'s standing (word 0, last: a reader that sees it sees
    /// the identity).
    pub fn set_backend(&self, row: usize, in_config: bool, state: BackendState, weight: u32) {
        if let Some(w) = self.meta_words(row) {
            w[0].store(
                backends::status_word(in_config, state, weight),
                Ordering::Release,
            );
        }
    }

    /// Counter `c` of row `row` summed over every slot that has served.
    pub fn backend_total(&self, row: usize, c: BackendCounter) -> u64 {
        let used = (self.header(Header::SlotsUsed) as usize).min(self.slot_capacity());
        (0..used)
            .filter_map(|k| self.backend_counts(k))
            .fold(0u64, |sum, counts| sum.wrapping_add(counts.get(row, c)))
    }

    /// Row `row`'s state (one word read: a worker's tick reads it).
    pub fn backend_state(&self, row: usize) -> Option<BackendState> {
        let w = self.meta_words(row)?;
        let word = w[0].load(Ordering::Acquire);
        (word & 1 != 0).then(|| backends::state_of(word))
    }

    /// Passive health changed row `row`'s state at `now_ms`
    /// (CLOCK_MONOTONIC): counts a fall, and notes when (the supervisor).
    pub fn note_backend_change(&self, row: usize, went_down: bool, now_ms: u64) {
        if let Some(w) = self.meta_words(row) {
            if went_down {
                w[backends::DOWNS_WORD].fetch_add(1, Ordering::Relaxed);
            }
            w[backends::CHANGED_WORD].store(now_ms, Ordering::Relaxed);
        }
    }

    /// Rows given out so far, with their metadata.
    pub fn backend_rows(&self) -> Vec<(usize, BackendMeta)> {
        let used = (self.header(Header::BackendRows) as usize).min(BACKEND_ROWS);
        (0..used)
            .filter_map(|row| {
                let w = self.meta_words(row)?;
                let words: Vec<u64> = w.iter().map(|x| x.load(Ordering::Acquire)).collect();
                backends::decode_meta(&words).map(|m| (row, m))
            })
            .collect()
    }

    /// Slot `k`'s backend counters.
    pub fn backend_counts(&self, k: usize) -> Option<BackendCounts<'_>> {
        let slots = self.slot_capacity();
        if k >= slots {
            return None;
        }
        let at = backend_counts_at(slots, k);
        self.words()
            .get(at..at + BACKEND_ROWS * FIELDS)
            .map(|words| BackendCounts { words })
    }

    /// Whether `owner` is the process serving its slot now: entries of an
    /// older generation, or of a slot not serving, are stale.
    pub fn is_live(&self, owner: Owner) -> bool {
        self.live_owner(owner.worker as usize) == Some(owner)
    }

    /// The process serving slot `worker` now (ready or draining), if any.
    pub fn live_owner(&self, worker: usize) -> Option<Owner> {
        let (generation, state) = self.slot(worker)?.life();
        matches!(state, SlotState::Ready | SlotState::Draining)
            .then(|| Owner::new(worker, generation))
    }
}

/// One worker's backend counters in the region (that worker writes them).
#[derive(Clone, Copy)]
pub struct BackendCounts<'a> {
    words: &'a [AtomicU64],
}

impl BackendCounts<'_> {
    pub fn get(&self, row: usize, c: BackendCounter) -> u64 {
        self.words
            .get(row * FIELDS + c as usize)
            .map_or(0, |w| w.load(Ordering::Relaxed))
    }

    pub fn set(&self, row: usize, c: BackendCounter, value: u64) {
        if let Some(w) = self.words.get(row * FIELDS + c as usize) {
            w.store(value, Ordering::Relaxed);
        }
    }
}

/// One worker's counters in the region.
#[derive(Clone, Copy)]
pub struct StatsSlot<'a> {
    words: &'a [AtomicU64],
}

impl StatsSlot<'_> {
    pub fn get(&self, c: Counter) -> u64 {
        self.words[c as usize].load(Ordering::Relaxed)
    }

    pub fn set(&self, c: Counter, value: u64) {
        self.words[c as usize].store(value, Ordering::Relaxed);
    }

    pub fn add(&self, c: Counter, delta: u64) {
        self.words[c as usize].fetch_add(delta, Ordering::Relaxed);
    }

    /// The slot's generation and state, from one word.
    pub fn life(&self) -> (u64, SlotState) {
        let word = self.get(Counter::Life);
        (word >> 8, SlotState::from_word(word & 0xff))
    }

    /// Publishes the slot's generation and state (the supervisor's word):
    /// the packed word first, then its display copies.
    pub fn set_life(&self, generation: u64, state: SlotState) {
        self.set(Counter::Life, (generation << 8) | state as u64);
        self.set(Counter::Generation, generation);
        self.set(Counter::State, state as u64);
    }

    /// Moves the slot to `state`, keeping its generation.
    pub fn set_state(&self, state: SlotState) {
        self.set_life(self.life().0, state);
    }
}

/// Gives the stats file to the [`STATS_GROUP`] group where it exists and
/// this process may (root, or a member): its mode (0640) then lets the
/// group's operators read it, and nobody else. Otherwise it keeps the
/// creator's group.
fn share_with_group(file: &File) {
    use std::os::fd::AsFd;
    let Ok(Some(group)) = nix::unistd::Group::from_name(STATS_GROUP) else {
        return;
    };
    // EPERM (not root, not a member): the file keeps the creator's group.
    let _ = nix::unistd::fchown(file.as_fd(), None, Some(group.gid));
}

fn slot_words_end(slots: usize) -> usize {
    HEADER_WORDS + slots * SLOT_WORDS
}

fn backend_meta_at(slots: usize) -> usize {
    slot_words_end(slots)
}

fn backend_counts_at(slots: usize, slot: usize) -> usize {
    backend_meta_at(slots) + BACKEND_ROWS * META_WORDS + slot * BACKEND_ROWS * FIELDS
}

/// Where slot `slot`'s queue-delay words begin, in a region that has them.
fn delay_at(slots: usize, slot: usize) -> usize {
    backend_counts_at(slots, slots) + slot * delay::WORDS
}

/// A region's length without the queue-delay tail (what every layout of
/// this version has).
fn base_bytes(slots: usize) -> usize {
    backend_counts_at(slots, slots) * 8
}

/// A region's length, with the queue-delay tail.
fn region_bytes(slots: usize) -> usize {
    delay_at(slots, slots) * 8
}

/// A point-in-time copy of a stats file, read without mapping it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    header: Vec<u64>,
    /// Every backend row given out, with its counters by slot.
    backends: Vec<BackendSnapshot>,
    /// Every slot that has served: those in use, then those a resize retired.
    slots: Vec<Vec<u64>>,
    /// Each of those slots' queue delay (empty where the region has none).
    delays: Vec<delay::Histogram>,
    in_use: usize,
}

impl Snapshot {
    pub fn read(path: &Path) -> Result<Snapshot, StatsError> {
        let bytes = std::fs::read(path).map_err(|source| match source.kind() {
            io::ErrorKind::PermissionDenied => StatsError::NoAccess {
                path: path.display().to_string(),
            },
            _ => StatsError::Io {
                path: path.display().to_string(),
                source,
            },
        })?;
        Snapshot::parse(&bytes)
    }

    pub fn parse(bytes: &[u8]) -> Result<Snapshot, StatsError> {
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        if words.len() < HEADER_WORDS {
            return Err(StatsError::Truncated {
                len: bytes.len(),
                need: HEADER_WORDS * 8,
            });
        }
        if words[Header::Magic as usize] != MAGIC
            || words[Header::SlotWords as usize] != SLOT_WORDS as u64
        {
            return Err(StatsError::BadMagic);
        }
        let capacity = words[Header::SlotCapacity as usize] as usize;
        // A capacity no file this long could hold (a damaged or hostile
        // file): refused before any length is computed from it.
        if capacity > words.len() / SLOT_WORDS {
            return Err(StatsError::Truncated {
                len: bytes.len(),
                need: capacity.saturating_mul(SLOT_WORDS * 8),
            });
        }
        let with_delay = words[Header::DelayWords as usize] == delay::WORDS as u64;
        let need = if with_delay {
            region_bytes(capacity)
        } else {
            base_bytes(capacity)
        };
        if bytes.len() < need {
            return Err(StatsError::Truncated {
                len: bytes.len(),
                need,
            });
        }
        let in_use = (words[Header::Workers as usize] as usize).min(capacity);
        let used = (words[Header::SlotsUsed as usize] as usize).clamp(in_use, capacity);
        let slots = (0..used)
            .map(|k| {
                let start = HEADER_WORDS + k * SLOT_WORDS;
                words[start..start + SLOT_WORDS].to_vec()
            })
            .collect();
        let delays = (0..used)
            .map(|k| match with_delay {
                true => {
                    let at = delay_at(capacity, k);
                    delay::Histogram::from_words(&words[at..at + delay::WORDS])
                }
                false => delay::Histogram::default(),
            })
            .collect();
        let rows = (words[Header::BackendRows as usize] as usize).min(BACKEND_ROWS);
        let backends = (0..rows)
            .filter_map(|row| {
                let at = backend_meta_at(capacity) + row * META_WORDS;
                let meta = backends::decode_meta(&words[at..at + META_WORDS])?;
                let by_slot = (0..used)
                    .map(|k| {
                        let at = backend_counts_at(capacity, k) + row * FIELDS;
                        let mut counts = [0u64; FIELDS];
                        counts.copy_from_slice(&words[at..at + FIELDS]);
                        counts
                    })
                    .collect();
                Some(BackendSnapshot {
                    meta,
                    by_slot,
                    in_use,
                })
            })
            .collect();
        Ok(Snapshot {
            header: words[..HEADER_WORDS].to_vec(),
            backends,
            slots,
            delays,
            in_use,
        })
    }

    pub fn header(&self, h: Header) -> u64 {
        self.header[h as usize]
    }

    /// The slots in use, in worker order.
    pub fn workers(&self) -> impl Iterator<Item = WorkerSnapshot<'_>> {
        self.slots().take(self.in_use)
    }

    /// Every slot that has served, in use or retired by a resize, in order.
    pub fn slots(&self) -> impl Iterator<Item = WorkerSnapshot<'_>> {
        self.slots
            .iter()
            .zip(&self.delays)
            .enumerate()
            .map(|(id, (words, delay))| WorkerSnapshot { id, words, delay })
    }

    /// Every backend the run has had, in the order rows were given out
    /// (config order, then what reloads added).
    pub fn backends(&self) -> &[BackendSnapshot] {
        &self.backends
    }

    /// Counter `c` over every slot that has served: what the proxy did
    /// since it started, through restarts and resizes.
    pub fn total(&self, c: Counter) -> u64 {
        self.slots().fold(0u64, |sum, w| sum.wrapping_add(w.get(c)))
    }
}

/// One backend in a [`Snapshot`].
#[derive(Debug, Clone)]
pub struct BackendSnapshot {
    pub meta: BackendMeta,
    by_slot: Vec<[u64; FIELDS]>,
    in_use: usize,
}

impl BackendSnapshot {
    /// Counter `c` over the workers: summed over every slot that has
    /// served (the gauge over the slots in use; the latest reply's time is
    /// the latest of any).
    pub fn total(&self, c: BackendCounter) -> u64 {
        let field = |s: &[u64; FIELDS]| s[c as usize];
        match c {
            BackendCounter::SessionsActive => {
                self.by_slot.iter().take(self.in_use).map(field).sum()
            }
            BackendCounter::LastReplyMs => self.by_slot.iter().map(field).max().unwrap_or(0),
            _ => self
                .by_slot
                .iter()
                .fold(0u64, |sum, s| sum.wrapping_add(field(s))),
        }
    }
}

/// One worker's slot in a [`Snapshot`].
#[derive(Debug, Clone, Copy)]
pub struct WorkerSnapshot<'a> {
    pub id: usize,
    words: &'a [u64],
    /// Its queue delay ([`delay`]).
    pub delay: &'a delay::Histogram,
}

impl WorkerSnapshot<'_> {
    pub fn get(&self, c: Counter) -> u64 {
        self.words[c as usize]
    }

    pub fn state(&self) -> SlotState {
        SlotState::from_word(self.get(Counter::State))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_word_reads_back_as_its_version_and_commit() {
        let word = pack_version("0.1.0", "6fb97e8bbe33");
        assert_eq!(version_text(word), "0.1.0+6fb97e8");
        assert_eq!(
            version_text(pack_version("12.345.6789", "unknown")),
            "12.345.6789"
        );
        assert_eq!(version_text(0), "", "not written");
        assert_ne!(
            pack_version("0.1.0", "aaaaaaa"),
            pack_version("0.1.1", "aaaaaaa")
        );
        assert_ne!(
            pack_version("0.1.0", "aaaaaaa"),
            pack_version("0.1.0", "aaaaaab")
        );
    }

    #[test]
    fn region_round_trip_through_file() {
        let dir = std::env::temp_dir().join(format!("udpshard-stats-test-{}", std::process::id()));
        let path = dir.join("stats");
        let (region, file) = StatsRegion::create(&path, 4).unwrap();
        region.set_header(Header::Workers, 2);
        let worker_view = StatsRegion::open(&file).unwrap();
        let slot = worker_view.slot(1).unwrap();
        slot.set(Counter::Pid, 4242);
        slot.add(Counter::RxPackets, 7);
        slot.add(Counter::RxPackets, 3);
        assert!(worker_view.slot(4).is_none());
        // Liveness follows the slot's generation and state.
        slot.set_life(3, SlotState::Ready);
        assert!(region.is_live(Owner::new(1, 3)));
        assert!(!region.is_live(Owner::new(1, 2)));
        slot.set_state(SlotState::Exited);
        assert!(!region.is_live(Owner::new(1, 3)));
        assert_eq!(slot.get(Counter::Generation), 3);

        let snap = Snapshot::read(&path).unwrap();
        let workers: Vec<_> = snap.workers().collect();
        assert_eq!(workers.len(), 2);
        assert_eq!(workers[1].get(Counter::Pid), 4242);
        assert_eq!(workers[1].get(Counter::RxPackets), 10);
        assert_eq!(workers[0].get(Counter::RxPackets), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn totals_keep_what_retired_slots_counted() {
        let dir =
            std::env::temp_dir().join(format!("udpshard-stats-retired-{}", std::process::id()));
        let path = dir.join("stats");
        let (region, _file) = StatsRegion::create(&path, 4).unwrap();
        region.set_workers(3);
        for k in 0..3 {
            region
                .slot(k)
                .unwrap()
                .set(Counter::RxPackets, 10 * (k as u64 + 1));
        }
        region.set_workers(1);
        let snap = Snapshot::read(&path).unwrap();
        assert_eq!(snap.workers().count(), 1, "one in use");
        assert_eq!(snap.slots().count(), 3, "two retired, still read");
        assert_eq!(snap.total(Counter::RxPackets), 60);
        // Growing back continues the slots; never past what ever served.
        region.set_workers(2);
        assert_eq!(region.header(Header::SlotsUsed), 3);
        assert_eq!(Snapshot::read(&path).unwrap().workers().count(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn backend_rows_outlive_reloads_and_sum_over_workers() {
        let dir =
            std::env::temp_dir().join(format!("udpshard-stats-backends-{}", std::process::id()));
        let path = dir.join("stats");
        let (region, _file) = StatsRegion::create(&path, 4).unwrap();
        region.set_workers(2);
        let a: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let b: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        let ra = region
            .register_backend("q", a, BackendState::Up, 1)
            .unwrap();
        let rb = region
            .register_backend("q", b, BackendState::Up, 2)
            .unwrap();
        assert_eq!((ra, rb), (0, 1));
        assert_eq!(
            region.register_backend("other", a, BackendState::Up, 1),
            Some(2)
        );
        // A reload that keeps `a` keeps its row; a removed one stays, marked.
        assert_eq!(
            region.register_backend("q", a, BackendState::Draining, 0),
            Some(ra)
        );
        region.set_backend(rb, false, BackendState::Up, 2);
        assert_eq!(region.backend_row("q", b), Some(rb));
        for (k, n) in [(0, 3u64), (1, 4)] {
            let c = region.backend_counts(k).unwrap();
            c.set(ra, BackendCounter::TxPackets, n);
            c.set(ra, BackendCounter::SessionsActive, n);
            c.set(ra, BackendCounter::LastReplyMs, 100 * n);
        }
        region.set_workers(1);
        let snap = Snapshot::read(&path).unwrap();
        let rows = snap.backends();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (rows[0].meta.addr, rows[0].meta.state),
            (a, BackendState::Draining)
        );
        assert_eq!(rows[0].meta.weight, 0);
        assert_eq!(
            rows[0].total(BackendCounter::TxPackets),
            7,
            "over every slot that served"
        );
        assert_eq!(
            rows[0].total(BackendCounter::SessionsActive),
            3,
            "the gauge: slots in use"
        );
        assert_eq!(
            rows[0].total(BackendCounter::LastReplyMs),
            400,
            "the latest"
        );
        assert!(!rows[1].meta.in_config);
        assert_eq!(rows[2].meta.listener, "other");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_ledger_of_a_slot() {
        let words: Vec<u64> = {
            let mut w = vec![0u64; SLOT_WORDS];
            w[Counter::RxPackets as usize] = 100;
            w[Counter::HandoffIn as usize] = 5;
            w[Counter::TxPackets as usize] = 90;
            w[Counter::HandoffOut as usize] = 3;
            w[Counter::DropMalformed as usize] = 2;
            w[Counter::DropSocket as usize] = 7; // before the read: not in it
            w[Counter::RepliesIn as usize] = 50;
            w[Counter::RepliesOut as usize] = 45;
            w[Counter::DropStray as usize] = 1;
            w
        };
        let get = |c: Counter| words[c as usize];
        assert_eq!(client_arrived(get), 105);
        assert_eq!(client_settled(get), 95);
        assert_eq!(replies_ledger(get), (50, 46));
    }

    #[test]
    fn rejects_foreign_files() {
        assert!(matches!(
            Snapshot::parse(&[0u8; 16]),
            Err(StatsError::Truncated { .. })
        ));
        assert!(matches!(
            Snapshot::parse(&vec![0u8; HEADER_WORDS * 8]),
            Err(StatsError::BadMagic)
        ));
        let mut header = vec![0u8; HEADER_WORDS * 8];
        header[..8].copy_from_slice(&MAGIC.to_le_bytes());
        header[8..16].copy_from_slice(&4u64.to_le_bytes()); // 4 slots promised
        header[16..24].copy_from_slice(&(SLOT_WORDS as u64).to_le_bytes());
        assert!(matches!(
            Snapshot::parse(&header),
            Err(StatsError::Truncated { .. })
        ));
    }
}
