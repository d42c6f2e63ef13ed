//! `[listener.admission]` and the health keys that keep garbage from taking
//! backends down: validated with their defaults.

use std::ops::RangeInclusive;
use std::time::Duration;

use toml::Spanned;

use crate::error::SpanError;
use crate::file::FileAdmission;
use crate::validate::{at, duration_in, int_in};
use crate::Admission;

type Result<T> = std::result::Result<T, SpanError>;

/// An unanswered session older than this is given up: a QUIC handshake
/// that has had no answer for 10 s is dead (quinn's and quiche's handshake
/// timeouts are 10 s to 30 s of idle).
const DEFAULT_EMBRYONIC_TIMEOUT: Duration = Duration::from_secs(10);
const RATE: RangeInclusive<i64> = 0..=10_000_000;
/// The defaults, per worker: generous for one address (a carrier's NAT
/// opens thousands of connections a second), bounded for one that floods.
const DEFAULT_SESSIONS_PER_SOURCE: u32 = 10_000;
const DEFAULT_PATHS_PER_SOURCE: u32 = 2000;
/// A client migrates now and then, not many times a second.
const DEFAULT_PATHS_PER_SESSION: u32 = 1;
const DEFAULT_PATHS_PER_SESSION_BURST: u32 = 4;

/// `[listener.admission]` for a listener of `max_sessions` and
/// `session_idle`; `v` absent: every default.
pub(crate) fn admission(
    v: Option<&Spanned<FileAdmission>>,
    max_sessions: usize,
    session_idle: Duration,
    ctx: &str,
) -> Result<Admission> {
    let default = FileAdmission::default();
    let a = v.map_or(&default, |v| v.get_ref());
    let actx = format!("{ctx}: admission");
    let max_embryonic = match &a.max_embryonic {
        // Most of the capacity stays with the sessions a backend answered.
        None => (max_sessions / 4).max(1),
        Some(v) => int_in(
            v,
            1..=max_sessions as i64,
            &format!("{actx}.max_embryonic (at most max_sessions)"),
        )?,
    };
    let embryonic_timeout = match &a.embryonic_timeout {
        None => DEFAULT_EMBRYONIC_TIMEOUT.min(session_idle),
        Some(v) => {
            let d = duration_in(
                v,
                Duration::from_secs(1)..=Duration::from_secs(24 * 3600),
                "1s..=24h",
                &format!("{actx}.embryonic_timeout"),
            )?;
            if d > session_idle {
                return Err(at(
                    v,
                    format!(
                        "{actx}.embryonic_timeout = {} is longer than session_idle ({session_idle:?})",
                        v.get_ref()
                    ),
                ));
            }
            d
        }
    };
    let rate = |v: &Option<Spanned<crate::file::Int>>, key: &str, default: u32| match v {
        None => Ok(default),
        Some(v) => int_in::<u32>(v, RATE, &format!("{actx}.{key}")),
    };
    let new_sessions_per_source = rate(
        &a.new_sessions_per_source,
        "new_sessions_per_source",
        DEFAULT_SESSIONS_PER_SOURCE,
    )?;
    let new_paths_per_source = rate(
        &a.new_paths_per_source,
        "new_paths_per_source",
        DEFAULT_PATHS_PER_SOURCE,
    )?;
    let new_paths_per_session = rate(
        &a.new_paths_per_session,
        "new_paths_per_session",
        DEFAULT_PATHS_PER_SESSION,
    )?;
    Ok(Admission {
        max_embryonic,
        embryonic_timeout,
        source_prefix_v4: match &a.source_prefix_v4 {
            None => 32,
            Some(v) => int_in(v, 1..=32, &format!("{actx}.source_prefix_v4"))?,
        },
        source_prefix_v6: match &a.source_prefix_v6 {
            None => 64,
            Some(v) => int_in(v, 1..=128, &format!("{actx}.source_prefix_v6"))?,
        },
        new_sessions_per_source,
        new_sessions_burst: rate(
            &a.new_sessions_burst,
            "new_sessions_burst",
            new_sessions_per_source.saturating_mul(2),
        )?,
        new_paths_per_source,
        new_paths_burst: rate(
            &a.new_paths_burst,
            "new_paths_burst",
            new_paths_per_source.saturating_mul(2),
        )?,
        new_paths_per_session,
        new_paths_per_session_burst: rate(
            &a.new_paths_per_session_burst,
            "new_paths_per_session_burst",
            DEFAULT_PATHS_PER_SESSION_BURST,
        )?,
    })
}
