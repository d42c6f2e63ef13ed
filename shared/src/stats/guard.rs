//! A stats file truncated under its mappings (an operator's `: > file`, a
//! program that opens it with O_TRUNC) would kill every process that maps
//! it with SIGBUS at its next counter update: the proxy would die of a
//! file meant for reading. Each process that maps the file installs this
//! guard instead: a SIGBUS inside one of its mappings of the file puts the
//! file's length back (the lost pages come back as zeros), counts the
//! repair in the header ([`Header::Repairs`]) and lets the access go on.
//! The supervisor sees the repair, logs it and writes back what it holds;
//! workers publish their counters again at their next publish.
//!
//! Everything the handler reads is in atomics written before the mapping
//! is used, and it makes one system call (ftruncate); a SIGBUS anywhere
//! else kills the process as it would without the guard.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

use super::Header;

/// Mappings of the stats file a process holds at once (a worker maps it
/// three times, the supervisor once). The guard serves one file per
/// process, the first it is given (each process maps only its proxy's).
const RANGES: usize = 8;

/// Per range: its first byte's address (0: unused) and its length.
static STARTS: [AtomicUsize; RANGES] = [const { AtomicUsize::new(0) }; RANGES];
static LENS: [AtomicUsize; RANGES] = [const { AtomicUsize::new(0) }; RANGES];
/// The guard's own descriptor of the file (-1: none yet), the file's
/// length, and its inode (every mapping must be of that one file).
static FD: AtomicI32 = AtomicI32::new(-1);
static FILE_LEN: AtomicU64 = AtomicU64::new(0);
static INODE: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The one system call the handler makes, for a seccomp rule:
/// ftruncate(fd, len). `None` before a mapping is guarded.
pub fn repair_call() -> Option<(RawFd, u64)> {
    let fd = FD.load(Ordering::Acquire);
    (fd >= 0).then(|| (fd, FILE_LEN.load(Ordering::Acquire)))
}

/// Guards the mapping `[start, start + len)` of `file` (mapped from offset
/// 0, `len` its whole length); returns the range's index for
/// [`unguard`]. The first call keeps a descriptor of the file for the
/// process's life (the handler's; `file` may close) and installs the
/// handler. `None`: not guarded (another file, or no room), which only
/// means a truncation is not survived.
pub(super) fn guard(start: *const u8, len: usize, file: &File) -> Option<usize> {
    use std::os::unix::fs::MetadataExt;
    let inode = file.metadata().ok()?.ino();
    if FD.load(Ordering::Acquire) < 0 {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor `file` holds open;
        // the new descriptor is kept for the process's life.
        let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
        if fd < 0 {
            return None;
        }
        INODE.store(inode, Ordering::Release);
        FILE_LEN.store(len as u64, Ordering::Release);
        FD.store(fd, Ordering::Release);
    }
    if INODE.load(Ordering::Acquire) != inode || FILE_LEN.load(Ordering::Acquire) != len as u64 {
        return None;
    }
    if !INSTALLED.swap(true, Ordering::AcqRel) && install().is_err() {
        INSTALLED.store(false, Ordering::Release);
        return None;
    }
    let slot = STARTS.iter().position(|s| {
        s.compare_exchange(0, start as usize, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })?;
    LENS[slot].store(len, Ordering::Release);
    Some(slot)
}

/// The mapping of range `slot` is about to go.
pub(super) fn unguard(slot: usize) {
    LENS[slot].store(0, Ordering::Release);
    STARTS[slot].store(0, Ordering::Release);
}

/// The guarded range holding `addr`: its start.
fn range_of(addr: usize) -> Option<usize> {
    (0..RANGES).find_map(|i| {
        let start = STARTS[i].load(Ordering::Acquire);
        let len = LENS[i].load(Ordering::Acquire);
        (start != 0 && addr >= start && addr < start + len).then_some(start)
    })
}

fn install() -> io::Result<()> {
    extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        /// si_code of a SIGBUS for an access past the end of a mapped file.
        const BUS_ADRERR: libc::c_int = 2;
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO; si_addr
        // is the faulting address for a SIGBUS it raised (si_code says so:
        // one sent by kill(2) names no address).
        let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
        let fd = FD.load(Ordering::Acquire);
        let len = FILE_LEN.load(Ordering::Acquire) as libc::off_t;
        if let Some(start) = range_of(addr).filter(|_| code == BUS_ADRERR) {
            // SAFETY: ftruncate(2) on the guard's own descriptor, to the
            // length every mapping of it was made with: async-signal-safe.
            if fd >= 0 && unsafe { libc::ftruncate(fd, len) } == 0 {
                // SAFETY: `start` is a live mapping of the whole file, now
                // of its full length again; its header words are u64s,
                // only ever accessed atomically.
                let repairs =
                    unsafe { &*(start as *const AtomicU64).add(Header::Repairs as usize) };
                repairs.fetch_add(1, Ordering::Relaxed);
                // The faulting access runs again, on a page that exists.
                return;
            }
        }
        // Not the stats file's, or not repairable: die of it, as without
        // the guard.
        crate::signal::die_of(libc::SIGBUS);
    }
    // SAFETY: the handler only does async-signal-safe work (above).
    unsafe { crate::signal::set_siginfo_handler(libc::SIGBUS, on_sigbus) }
}
