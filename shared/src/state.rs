//! The state region: what workers coordinate through, shared by the
//! supervisor and its workers only.
//!
//! It is an anonymous memory file (memfd): it has no path, so nothing but
//! the processes that inherited its descriptor can read or write it. Its
//! pages are allocated as they are first touched, so a table sized for the
//! config's `max_sessions` costs memory only as it fills.
//!
//! Layout, in little-endian u64 words:
//!
//! ```text
//! [0, HEADER_WORDS)          header: see `Word`
//! [SourcesOffset, ...)       the source registry: SourceRows entries of 3 words
//!                            (1 + family, address high, address low), 0 unused
//! [OwnersOffset, ...)        the ownership table (`crate::owners`)
//! [HintsOffset, ...)         its port hints, one per entry
//! [LeasesOffset, ...)        the port leases (`crate::leases`), SourceRows rows
//! ```

use std::fs::File;
use std::io::{self, Read};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

use crate::leases::{LeaseTable, PORTS};
use crate::owners::OwnerTable;

pub const MAGIC: u64 = u64::from_le_bytes(*b"UDPSTAT\x01");
const HEADER_WORDS: usize = 16;
const SOURCE_WORDS: usize = 3;

/// Source addresses the region can lease ports for, over the supervisor's
/// life (reloads may add some).
pub const SOURCE_ROWS: usize = 64;

#[derive(Debug, Clone, Copy)]
#[repr(usize)]
enum Word {
    Magic = 0,
    /// The ownership table's index key (random per run): crafted connection
    /// IDs cannot aim at one probe chain.
    Key0,
    Key1,
    SourcesOffset,
    SourceRows,
    OwnersOffset,
    OwnersCapacity,
    LeasesOffset,
    HintsOffset,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state region: {0}")]
    Io(#[from] io::Error),
    #[error("not a udpshard state region (bad magic or layout)")]
    BadLayout,
}

/// The mapped region, as the supervisor or a worker holds it.
pub struct StateRegion {
    map: MmapMut,
}

impl StateRegion {
    /// A new region with an ownership table of `owners` entries (rounded up
    /// to a power of two) and lease rows for [`SOURCE_ROWS`] sources. The
    /// descriptor is close-on-exec: pass it on deliberately.
    pub fn create(owners: usize) -> Result<(StateRegion, OwnedFd), StateError> {
        let owners = owners.next_power_of_two();
        let sources = HEADER_WORDS;
        let owners_at = sources + SOURCE_ROWS * SOURCE_WORDS;
        let hints_at = owners_at + owners;
        let leases_at = hints_at + owners;
        let words = leases_at + SOURCE_ROWS * PORTS;
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(
            c"udpshard-state",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(io::Error::from)?;
        let file = File::from(fd);
        file.set_len((words * 8) as u64)?;
        // Its size for good: a process holding the descriptor (a worker gone
        // wrong) cannot shrink it under the others' mappings, which would
        // raise SIGBUS in every one of them, nor grow it, nor lift the seals.
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(io::Error::from)?;
        let region = StateRegion::map(&file)?;
        let mut key = [0u8; 16];
        File::open("/dev/urandom")?.read_exact(&mut key)?;
        let w = region.words();
        let set = |word: Word, v: u64| w[word as usize].store(v, Ordering::Relaxed);
        set(
            Word::Key0,
            u64::from_le_bytes(key[..8].try_into().unwrap_or_default()),
        );
        set(
            Word::Key1,
            u64::from_le_bytes(key[8..].try_into().unwrap_or_default()),
        );
        set(Word::SourcesOffset, sources as u64);
        set(Word::SourceRows, SOURCE_ROWS as u64);
        set(Word::OwnersOffset, owners_at as u64);
        set(Word::OwnersCapacity, owners as u64);
        set(Word::LeasesOffset, leases_at as u64);
        set(Word::HintsOffset, hints_at as u64);
        w[Word::Magic as usize].store(MAGIC, Ordering::Release);
        Ok((region, OwnedFd::from(file)))
    }

    /// Maps a region created by [`StateRegion::create`] (a worker's view).
    pub fn open(fd: &impl AsRawFd) -> Result<StateRegion, StateError> {
        let region = StateRegion::map(fd)?;
        let words = region.words();
        let get = |w: Word| words.get(w as usize).map(|a| a.load(Ordering::Acquire));
        if get(Word::Magic) != Some(MAGIC) {
            return Err(StateError::BadLayout);
        }
        let end = get(Word::LeasesOffset).unwrap_or(0) as usize
            + get(Word::SourceRows).unwrap_or(0) as usize * PORTS;
        let capacity = get(Word::OwnersCapacity).unwrap_or(0) as usize;
        let hints_end = get(Word::HintsOffset).unwrap_or(u64::MAX) as usize + capacity;
        if end > words.len() || hints_end > words.len() || !capacity.is_power_of_two() {
            return Err(StateError::BadLayout);
        }
        Ok(region)
    }

    fn map(fd: &impl AsRawFd) -> io::Result<StateRegion> {
        // SAFETY: the memfd is created at its final size and sealed against
        // shrinking, so the mapping stays backed; every access goes through
        // the atomic views below, so concurrent writers in other processes
        // cannot cause a data race.
        let map = unsafe { MmapMut::map_mut(fd.as_raw_fd())? };
        Ok(StateRegion { map })
    }

    fn words(&self) -> &[AtomicU64] {
        let ptr = self.map.as_ptr() as *const AtomicU64;
        // SAFETY: the mapping is page-aligned (so 8-byte aligned), lives as
        // long as `self`, and AtomicU64 has u64's size; shared words are only
        // ever accessed atomically, here or in other processes.
        unsafe { std::slice::from_raw_parts(ptr, self.map.len() / 8) }
    }

    fn get(&self, w: Word) -> usize {
        self.words()[w as usize].load(Ordering::Relaxed) as usize
    }

    /// The ownership table's index key.
    pub fn index_key(&self) -> [u64; 2] {
        [self.get(Word::Key0) as u64, self.get(Word::Key1) as u64]
    }

    pub fn owners(&self) -> OwnerTable<'_> {
        let (at, len) = (self.get(Word::OwnersOffset), self.get(Word::OwnersCapacity));
        let hints = self.get(Word::HintsOffset);
        OwnerTable::with_hints(
            &self.words()[at..at + len],
            &self.words()[hints..hints + len],
        )
    }

    pub fn leases(&self) -> LeaseTable<'_> {
        let at = self.get(Word::LeasesOffset);
        let rows = self.get(Word::SourceRows);
        LeaseTable::new(&self.words()[at..at + rows * PORTS])
    }

    fn source_words(&self, row: usize) -> &[AtomicU64] {
        let at = self.get(Word::SourcesOffset) + row * SOURCE_WORDS;
        &self.words()[at..at + SOURCE_WORDS]
    }

    /// The lease row of source address `ip`, registered by the supervisor.
    pub fn source_row(&self, ip: IpAddr) -> Option<usize> {
        let want = encode_source(ip);
        (0..self.get(Word::SourceRows)).find(|&row| {
            let w = self.source_words(row);
            (0..SOURCE_WORDS).all(|i| w[i].load(Ordering::Acquire) == want[i])
        })
    }

    /// The source address registered for lease row `row`.
    pub fn source_ip(&self, row: usize) -> Option<IpAddr> {
        if row >= self.get(Word::SourceRows) {
            return None;
        }
        let w = self.source_words(row);
        let words = [0, 1, 2].map(|i| w[i].load(Ordering::Acquire));
        decode_source(words)
    }

    /// Gives `ip` a lease row (the supervisor, before any worker needs it);
    /// `None` when every row is taken.
    pub fn register_source(&self, ip: IpAddr) -> Option<usize> {
        if let Some(row) = self.source_row(ip) {
            return Some(row);
        }
        let want = encode_source(ip);
        let row = (0..self.get(Word::SourceRows))
            .find(|&row| self.source_words(row)[0].load(Ordering::Acquire) == 0)?;
        let w = self.source_words(row);
        w[1].store(want[1], Ordering::Relaxed);
        w[2].store(want[2], Ordering::Relaxed);
        // The tag last: a reader that sees it sees the address.
        w[0].store(want[0], Ordering::Release);
        Some(row)
    }
}

fn encode_source(ip: IpAddr) -> [u64; 3] {
    let (family, v6) = match ip {
        IpAddr::V4(v4) => (4u64, v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => (6, v6),
    };
    let bits = u128::from_be_bytes(v6.octets());
    [1 + family, (bits >> 64) as u64, bits as u64]
}

fn decode_source(w: [u64; 3]) -> Option<IpAddr> {
    let v6 = std::net::Ipv6Addr::from_bits(u128::from(w[1]) << 64 | u128::from(w[2]));
    match w[0] {
        5 => v6.to_ipv4_mapped().map(IpAddr::V4),
        7 => Some(IpAddr::V6(v6)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owners::{Claim, Owner};

    #[test]
    fn a_worker_sees_what_the_supervisor_wrote() {
        let (sup, fd) = StateRegion::create(1000).unwrap();
        let v4: IpAddr = "0.0.0.0".parse().unwrap();
        let v6: IpAddr = "::".parse().unwrap();
        assert_eq!(sup.register_source(v4), Some(0));
        assert_eq!(sup.register_source(v6), Some(1), "families are apart");
        assert_eq!(sup.register_source(v4), Some(0), "once per address");
        let worker = StateRegion::open(&fd).unwrap();
        assert_eq!(worker.source_row(v6), Some(1));
        assert_eq!(worker.source_row("10.0.0.1".parse().unwrap()), None);
        assert_eq!(worker.source_ip(0), Some(v4));
        assert_eq!(worker.source_ip(1), Some(v6));
        assert_eq!(worker.source_ip(2), None, "unused");
        assert_eq!(worker.source_ip(SOURCE_ROWS), None);
        assert_eq!(worker.owners().capacity(), 1024);
        assert_eq!(worker.index_key(), sup.index_key());
        assert_ne!(sup.index_key(), [0, 0], "a random key");
        let me = Owner::new(1, 3);
        assert_eq!(worker.owners().claim(77 << 30, me, |_| true), Claim::Mine);
        assert_eq!(sup.owners().lookup(77 << 30), Some(me));
        assert!(worker.owners().set_hint(77 << 30, me, 1, 5000, 9));
        assert_eq!(sup.owners().hint(77 << 30).map(|h| h.port), Some(5000));
        assert!(worker.leases().lease(1, 5000, me, 0));
        assert!(!sup.leases().lease(1, 5000, Owner::new(0, 1), 0));
    }

    #[test]
    fn rows_run_out_cleanly() {
        let (sup, _fd) = StateRegion::create(16).unwrap();
        for i in 0..SOURCE_ROWS {
            let ip = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
            assert_eq!(sup.register_source(ip), Some(i));
        }
        assert_eq!(sup.register_source("10.1.0.0".parse().unwrap()), None);
    }

    #[test]
    fn the_region_cannot_be_resized_or_unsealed() {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        let (_region, fd) = StateRegion::create(1024).unwrap();
        let file = File::from(fd);
        let len = file.metadata().unwrap().len();
        for to in [0, len / 2, len * 2] {
            let err = file.set_len(to).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "set_len({to})");
        }
        assert_eq!(file.metadata().unwrap().len(), len);
        let seals = SealFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GET_SEALS).unwrap());
        assert_eq!(
            seals,
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL
        );
    }

    #[test]
    fn garbage_is_not_a_region() {
        let file = tempfile_with(&[0u8; 4096]);
        assert!(matches!(
            StateRegion::open(&file),
            Err(StateError::BadLayout)
        ));
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        use std::io::Write;
        let fd =
            nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let mut f = File::from(fd);
        f.write_all(bytes).unwrap();
        f
    }
}
