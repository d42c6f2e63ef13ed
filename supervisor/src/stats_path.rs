//! Where the stats file goes when the config leaves it at the default.
//!
//! The default, /run/udpshard/stats, is what a packaged service uses (its
//! RuntimeDirectory). A newcomer running `udpshard run` as an ordinary user
//! cannot create /run/udpshard; rather than refuse to start, the supervisor
//! falls back to a per-user directory and says so, and `udpshard stats`
//! without --stats-file looks in the same places in the same order.

use std::path::PathBuf;

use udpshard_config::DEFAULT_STATS_FILE;

/// The default path, then the per-user fallbacks, in order.
pub(crate) fn default_candidates() -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from(DEFAULT_STATS_FILE)];
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        out.push(PathBuf::from(dir).join("udpshard/stats"));
    }
    out.push(std::env::temp_dir().join(format!("udpshard-{}/stats", nix::unistd::getuid())));
    out
}

/// For `udpshard stats` with no --stats-file: the first candidate that exists
/// (the default when none does, so the error names it).
pub(crate) fn find_default() -> PathBuf {
    let candidates = default_candidates();
    candidates
        .iter()
        .find(|p| p.exists())
        .unwrap_or(&candidates[0])
        .clone()
}
