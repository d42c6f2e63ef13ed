//! Handlers for the signals a process turns into a diagnosis or a repair
//! (SIGSYS from a worker's system-call filter, SIGBUS from a cut stats
//! file): installing one, and dying of the signal as without it.

use std::io;

/// A handler that is given the signal's siginfo (SA_SIGINFO).
pub type SiginfoHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Installs `handler` for `signal`, with SA_SIGINFO.
///
/// # Safety
/// `handler` runs wherever the signal lands: it must do async-signal-safe
/// work only (no allocation, no locks).
pub unsafe fn set_siginfo_handler(signal: libc::c_int, handler: SiginfoHandler) -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; sigaction copies the struct; the
    // handler's own safety is the caller's promise.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// From a handler: puts back the default action for `signal` and raises it
/// again, so the process dies of it as it would have without the handler.
/// Async-signal-safe.
pub fn die_of(signal: libc::c_int) {
    // SAFETY: signal(2) and raise(3) with integer arguments, both
    // async-signal-safe.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}
