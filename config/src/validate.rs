//! Turns the raw [`FileConfig`] into a [`Config`]: checks every value,
//! fills defaults, and reports the first problem at its position.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use crate::error::SpanError;
use crate::file::{
    ArrayOf, FileBackend, FileConfig, FileHealth, FileListener, FileQuicLb, Int, IntOrStr,
};
use crate::units::{self, UnitError, DURATION_FORMS, SIZE_FORMS};
use crate::{
    Backend, Config, Dissector, Listener, Migration, Offload, ProxyProtocol, QuicLb, Readiness,
    Steering, UpstreamSend, Workers, DEFAULT_STATS_FILE,
};
use crate::{Health, OnBackendDown, Probe};

type Result<T> = std::result::Result<T, SpanError>;
type Span = Range<usize>;

const WORKERS: RangeInclusive<i64> = 1..=1024;
// A QUIC connection ID is at most 20 bytes (RFC 9000 §17.2).
const CID_LEN: RangeInclusive<i64> = 1..=20;
// Keeps the connection ID inside a single unfragmented datagram.
const CID_OFFSET: RangeInclusive<i64> = 0..=1400;
/// 0 drains a backend: no new sessions, live ones stay.
const WEIGHT: RangeInclusive<i64> = 0..=1000;
const MAX_SESSIONS: RangeInclusive<i64> = 1..=100_000_000;
const MAGLEV_TABLE_SIZE: RangeInclusive<i64> = 101..=10_000_019;
// Below ~10 slots per backend Maglev's load imbalance becomes noticeable.
const MAGLEV_SLOTS_PER_BACKEND: usize = 10;
const RECV_BUFFER: RangeInclusive<u64> = (4 << 10)..=(1 << 30);
const RECV_BUFFER_TEXT: &str = "4KiB..=1GiB";
const SESSION_IDLE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);
const SESSION_IDLE_TEXT: &str = "1s..=24h";

const DEFAULT_SHORT_CID_LEN: usize = 8;
const DEFAULT_RECV_BUFFER: usize = 4 << 20;
const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(60);
const DRAIN_TIMEOUT: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(3600);
const DRAIN_TIMEOUT_TEXT: &str = "0s..=1h";
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const UPGRADE_TIMEOUT: RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(600);
const UPGRADE_TIMEOUT_TEXT: &str = "1s..=10m";
const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_SESSIONS: usize = 1_000_000;
const DEFAULT_MAGLEV_TABLE_SIZE: usize = 65_537;
const DEFAULT_WEIGHT: u32 = 1;
const DEFAULT_PATH_IDLE: Duration = Duration::from_secs(30);
const DEFAULT_MAX_PATHS: usize = 4;
/// Passive evidence may hold down half the backends (one of two, one of
/// three, five of ten): garbage cannot empty a listener.
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;
const MAX_PATHS: RangeInclusive<i64> = 1..=16;
const MAX_SOURCES: usize = 64;
const DEFAULT_PORT_REUSE_DELAY: Duration = Duration::from_secs(60);
const FALL: RangeInclusive<i64> = 1..=1000;
const DEFAULT_FALL: u32 = 3;
const REPLY_TIMEOUT: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(60);
const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
const REVIVE_AFTER: RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(3600);
const DEFAULT_REVIVE_AFTER: Duration = Duration::from_secs(10);
const PORT_REUSE_DELAY: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(3600);
const PORT_REUSE_DELAY_TEXT: &str = "0s..=1h";
const NAME_MAX: usize = 32;

pub(crate) fn validate(file: FileConfig) -> Result<Config> {
    let workers = match &file.workers {
        None => Workers::Auto,
        Some(v) => workers(v)?,
    };
    let stats_file = match &file.stats_file {
        None => PathBuf::from(DEFAULT_STATS_FILE),
        Some(v) => stats_file(v)?,
    };
    let drain_timeout = match &file.drain_timeout {
        None => DEFAULT_DRAIN_TIMEOUT,
        Some(v) => duration_in(v, DRAIN_TIMEOUT, DRAIN_TIMEOUT_TEXT, "drain_timeout")?,
    };
    let withdraw_delay = match &file.withdraw_delay {
        None => Duration::ZERO,
        Some(v) => duration_in(v, DRAIN_TIMEOUT, DRAIN_TIMEOUT_TEXT, "withdraw_delay")?,
    };
    let readiness = one_of(
        file.readiness.as_ref(),
        "readiness",
        Readiness::Serving,
        &[
            ("serving", Readiness::Serving),
            ("backend_up", Readiness::BackendUp),
        ],
    )?;
    let upgrade_timeout = match &file.upgrade_timeout {
        None => DEFAULT_UPGRADE_TIMEOUT,
        Some(v) => duration_in(v, UPGRADE_TIMEOUT, UPGRADE_TIMEOUT_TEXT, "upgrade_timeout")?,
    };
    let metrics = match &file.metrics {
        None => None,
        Some(v) => Some(metrics(v)?),
    };
    let upstream_send = one_of(
        file.upstream_send.as_ref(),
        "upstream_send",
        UpstreamSend::Auto,
        &[
            ("auto", UpstreamSend::Auto),
            ("socket", UpstreamSend::Socket),
        ],
    )?;
    let offload = one_of(
        file.offload.as_ref(),
        "offload",
        Offload::Auto,
        &[("auto", Offload::Auto), ("off", Offload::Off)],
    )?;
    let syscall_filter = one_of(
        file.syscall_filter.as_ref(),
        "syscall_filter",
        true,
        &[("on", true), ("off", false)],
    )?;
    let user = match &file.user {
        None => None,
        Some(v) => Some(user(v)?),
    };
    let Some(list) = file.listener else {
        // Nothing to point at; the top of the file is where one would go.
        return Err(SpanError::new(
            0..0,
            "no [[listener]] is defined; at least one is required",
        ));
    };
    if list.get_ref().0.is_empty() {
        return Err(SpanError::new(
            list.span(),
            "listener list is empty; at least one [[listener]] is required",
        ));
    }
    let mut listeners: Vec<Listener> = Vec::with_capacity(list.get_ref().0.len());
    for (index, l) in list.into_inner().0.into_iter().enumerate() {
        let l = listener(index, l, &listeners)?;
        listeners.push(l);
    }
    Ok(Config {
        workers,
        stats_file,
        listeners,
        drain_timeout,
        withdraw_delay,
        readiness,
        upgrade_timeout,
        metrics,
        upstream_send,
        offload,
        syscall_filter,
        user,
    })
}

/// A user name as passwd holds one (whether this host has it is the
/// supervisor's check, at start).
fn user(v: &Spanned<String>) -> Result<String> {
    let name = v.get_ref();
    let valid = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !valid {
        return Err(at(
            v,
            format!(
                "user = {name:?} is not a user name (1 to 32 of a-z, A-Z, 0-9, '_', '-', '.', \
                 not starting with '-')"
            ),
        ));
    }
    Ok(name.clone())
}

/// The Prometheus endpoint's address; port 0 would leave scrapers guessing.
fn metrics(v: &Spanned<String>) -> Result<SocketAddr> {
    let addr = socket_addr(v, "metrics", &format!("{:?}", v.get_ref()))?;
    if addr.port() == 0 {
        return Err(at(
            v,
            format!(
                "metrics: {:?} has port 0; scrapers need a fixed port",
                v.get_ref()
            ),
        ));
    }
    Ok(addr)
}

fn workers(v: &Spanned<IntOrStr>) -> Result<Workers> {
    match v.get_ref() {
        IntOrStr::Str(s) if s == "auto" => Ok(Workers::Auto),
        IntOrStr::Int(n) => {
            int_in(&Spanned::new(v.span(), Int(*n)), WORKERS, "workers").map(Workers::Count)
        }
        IntOrStr::Str(s) => Err(at(
            v,
            format!(
                "workers = {s:?} is invalid (expected \"auto\" or an integer {})",
                fmt_range(&WORKERS)
            ),
        )),
    }
}

fn stats_file(v: &Spanned<String>) -> Result<PathBuf> {
    let path = PathBuf::from(v.get_ref());
    // The supervisor and `udpshard stats` may run with different working
    // directories, so a relative path would name two different files.
    if !path.is_absolute() {
        return Err(at(
            v,
            format!("stats_file = {:?} must be an absolute path", v.get_ref()),
        ));
    }
    Ok(path)
}

fn listener(index: usize, l: Spanned<FileListener>, earlier: &[Listener]) -> Result<Listener> {
    let header = l.span();
    let l = l.into_inner();

    // Until the name is known, messages identify the listener by position.
    let anon = format!("listener #{}", index + 1);
    let name_v = required(l.name.as_ref(), &header, &anon, "name")?;
    let name = listener_name(name_v, &anon)?;
    if earlier.iter().any(|e| e.name == name) {
        return Err(at(name_v, format!("listener name {name:?} is used twice")));
    }
    let ctx = format!("listener {name:?}");

    let bind_v = required(l.bind.as_ref(), &header, &ctx, "bind")?;
    let bind = socket_addr(bind_v, &ctx, &format!("bind = {:?}", bind_v.get_ref()))?;
    // Port 0 asks the OS for a fresh port, so two such listeners never clash.
    if bind.port() != 0 {
        if let Some(other) = earlier.iter().find(|e| e.bind == bind) {
            return Err(at(
                bind_v,
                format!(
                    "{ctx}: bind = \"{bind}\" is already used by listener {:?}",
                    other.name
                ),
            ));
        }
    }

    let dissector_v = required(l.dissector.as_ref(), &header, &ctx, "dissector")?;
    let dissector = dissector(dissector_v, &l, &header, &ctx)?;
    let steering = steering(l.steering.as_ref(), dissector, &ctx)?;

    let recv_buffer = match &l.recv_buffer {
        None => DEFAULT_RECV_BUFFER,
        Some(v) => recv_buffer(v, &ctx)?,
    };
    let session_idle = match &l.session_idle {
        None => DEFAULT_SESSION_IDLE,
        Some(v) => session_idle(v, &ctx)?,
    };
    let max_sessions = match &l.max_sessions {
        None => DEFAULT_MAX_SESSIONS,
        Some(v) => int_in(v, MAX_SESSIONS, &format!("{ctx}: max_sessions"))?,
    };
    let maglev_table_size = match &l.maglev_table_size {
        None => DEFAULT_MAGLEV_TABLE_SIZE,
        Some(v) => maglev_table_size(v, &ctx)?,
    };

    let quic_lb = match &l.quic_lb {
        None => None,
        Some(v) => Some(quic_lb(v, dissector, &ctx)?),
    };
    let backends_v = required(l.backends.as_ref(), &header, &ctx, "backends")?;
    let backends = backends(backends_v, quic_lb, &ctx)?;
    let needed = backends.len().saturating_mul(MAGLEV_SLOTS_PER_BACKEND);
    if maglev_table_size < needed {
        // Blame the table size if the user set it, else the list that outgrew the default.
        let span = l
            .maglev_table_size
            .as_ref()
            .map_or_else(|| backends_v.span(), |v| v.span());
        return Err(SpanError::new(
            span,
            format!(
                "{ctx}: maglev_table_size = {maglev_table_size} is too small for {} backends \
                 (needs at least {MAGLEV_SLOTS_PER_BACKEND}x the backend count: {needed})",
                backends.len()
            ),
        ));
    }

    let migration = one_of(
        l.migration.as_ref(),
        &format!("{ctx}: migration"),
        Migration::Path,
        &[("path", Migration::Path), ("follow", Migration::Follow)],
    )?;
    let proxy_protocol = one_of(
        l.proxy_protocol.as_ref(),
        &format!("{ctx}: proxy_protocol"),
        ProxyProtocol::Off,
        &[("v2", ProxyProtocol::V2), ("off", ProxyProtocol::Off)],
    )?;
    let queue_delay = one_of(
        l.queue_delay.as_ref(),
        &format!("{ctx}: queue_delay"),
        true,
        &[("on", true), ("off", false)],
    )?;
    let session_log = match &l.session_log {
        None => 0,
        Some(v) => int_in(v, 0..=1_000_000_000, &format!("{ctx}: session_log"))?,
    };
    let max_paths = match (&l.max_paths, migration) {
        (None, Migration::Path) => DEFAULT_MAX_PATHS,
        (None, Migration::Follow) => 1,
        (Some(v), Migration::Follow) => {
            return Err(at(
                v,
                format!("{ctx}: max_paths needs migration = \"path\" (with \"follow\" a session has one path)"),
            ))
        }
        (Some(v), Migration::Path) => int_in(v, MAX_PATHS, &format!("{ctx}: max_paths"))?,
    };
    let path_idle = match &l.path_idle {
        None => DEFAULT_PATH_IDLE.min(session_idle),
        Some(v) => {
            let d = duration_in(
                v,
                SESSION_IDLE,
                SESSION_IDLE_TEXT,
                &format!("{ctx}: path_idle"),
            )?;
            if d > session_idle {
                return Err(at(
                    v,
                    format!(
                        "{ctx}: path_idle = {} is longer than session_idle ({session_idle:?}): a session \
                         closes with its last path",
                        v.get_ref()
                    ),
                ));
            }
            d
        }
    };
    let port_reuse_delay = match &l.port_reuse_delay {
        None => DEFAULT_PORT_REUSE_DELAY,
        Some(v) => duration_in(
            v,
            PORT_REUSE_DELAY,
            PORT_REUSE_DELAY_TEXT,
            &format!("{ctx}: port_reuse_delay"),
        )?,
    };
    let fall = match &l.fall {
        None => DEFAULT_FALL,
        Some(v) => int_in(v, FALL, &format!("{ctx}: fall"))?,
    };
    let reply_timeout = match &l.reply_timeout {
        None => DEFAULT_REPLY_TIMEOUT,
        Some(v) => duration_in(
            v,
            REPLY_TIMEOUT,
            "100ms..=60s",
            &format!("{ctx}: reply_timeout"),
        )?,
    };
    let revive_after = match &l.revive_after {
        None => DEFAULT_REVIVE_AFTER,
        Some(v) => duration_in(v, REVIVE_AFTER, "1s..=1h", &format!("{ctx}: revive_after"))?,
    };
    let on_backend_down = one_of(
        l.on_backend_down.as_ref(),
        &format!("{ctx}: on_backend_down"),
        OnBackendDown::Keep,
        &[
            ("keep", OnBackendDown::Keep),
            ("reroute", OnBackendDown::Reroute),
        ],
    )?;
    let health = match &l.health {
        None => None,
        Some(v) => Some(health(v, &ctx)?),
    };
    let max_ejection_percent = match &l.max_ejection_percent {
        None => DEFAULT_MAX_EJECTION_PERCENT,
        Some(v) => int_in(v, 0..=100, &format!("{ctx}: max_ejection_percent"))?,
    };
    let admission =
        crate::admission::admission(l.admission.as_ref(), max_sessions, session_idle, &ctx)?;
    let upstream_ports = match &l.upstream_ports {
        None => None,
        Some(v) => Some(port_range(v, &ctx)?),
    };
    let upstream_sources = match &l.upstream_sources {
        None => Vec::new(),
        Some(v) => sources(v, &backends, &ctx)?,
    };

    Ok(Listener {
        name,
        bind,
        dissector,
        steering,
        recv_buffer,
        session_idle,
        max_sessions,
        maglev_table_size,
        backends,
        quic_lb,
        migration,
        path_idle,
        max_paths,
        upstream_sources,
        upstream_ports,
        port_reuse_delay,
        fall,
        reply_timeout,
        revive_after,
        on_backend_down,
        max_ejection_percent,
        health,
        admission,
        proxy_protocol,
        session_log,
        queue_delay,
    })
}

/// `probe = "0x0102"` (hex) or `probe = "PING"` (its bytes).
fn payload(v: &Spanned<String>, what: &str) -> Result<Vec<u8>> {
    let text = v.get_ref();
    let Some(hex) = text.strip_prefix("0x") else {
        return Ok(text.as_bytes().to_vec());
    };
    let bad = |why: &str| at(v, format!("{what} = {text:?} is not valid hex: {why}"));
    if hex.len() % 2 == 1 {
        return Err(bad("an odd number of digits"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| bad("expected digits 0-9 a-f"))
        })
        .collect()
}

fn health(v: &Spanned<FileHealth>, ctx: &str) -> Result<Health> {
    let t = v.get_ref();
    let hctx = format!("{ctx}: health");
    let probe_v = required(t.probe.as_ref(), &v.span(), &hctx, "probe")?;
    let probe = if probe_v.get_ref() == "quic" {
        if let Some(e) = &t.expect {
            return Err(at(
                e,
                format!(
                    "{hctx}.expect has no place with probe = \"quic\": a Version Negotiation \
                     packet is the answer it expects"
                ),
            ));
        }
        Probe::Quic
    } else {
        let probe = payload(probe_v, &format!("{hctx}.probe"))?;
        if probe.is_empty() || probe.len() > 1400 {
            return Err(at(probe_v, format!("{hctx}.probe must be 1 to 1400 bytes")));
        }
        Probe::Bytes(probe)
    };
    let expect = match &t.expect {
        None => Vec::new(),
        Some(e) => payload(e, &format!("{hctx}.expect"))?,
    };
    let interval = match &t.interval {
        None => Duration::from_secs(2),
        Some(i) => duration_in(
            i,
            Duration::from_millis(100)..=Duration::from_secs(3600),
            "100ms..=1h",
            &format!("{hctx}.interval"),
        )?,
    };
    let timeout = match &t.timeout {
        None => Duration::from_secs(1).min(interval),
        Some(d) => {
            let timeout = duration_in(
                d,
                Duration::from_millis(10)..=Duration::from_secs(3600),
                "10ms..=1h",
                &format!("{hctx}.timeout"),
            )?;
            if timeout > interval {
                return Err(at(
                    d,
                    format!(
                        "{hctx}.timeout = {} is longer than its interval ({interval:?}): a probe \
                         would still wait when the next goes",
                        d.get_ref()
                    ),
                ));
            }
            timeout
        }
    };
    let count = |c: &Option<Spanned<Int>>, name: &str, default: u32| match c {
        None => Ok(default),
        Some(c) => int_in(c, 1..=100, &format!("{hctx}.{name}")),
    };
    Ok(Health {
        probe,
        expect,
        interval,
        timeout,
        rise: count(&t.rise, "rise", 2)?,
        fall: count(&t.fall, "fall", 3)?,
    })
}

/// `upstream_ports = "20000-29999"`: an inclusive range of port numbers.
fn port_range(v: &Spanned<String>, ctx: &str) -> Result<(u16, u16)> {
    let text = v.get_ref().trim();
    let bad = |why: &str| {
        at(
            v,
            format!("{ctx}: upstream_ports = {text:?} {why} (expected \"LO-HI\" with 1 <= LO <= HI <= 65535, e.g. \"20000-29999\")"),
        )
    };
    let (lo, hi) = text.split_once('-').ok_or_else(|| bad("is not a range"))?;
    let port = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p >= 1);
    match (port(lo), port(hi)) {
        (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
        (Some(_), Some(_)) => Err(bad("is empty")),
        _ => Err(bad("is not a range of ports")),
    }
}

/// `upstream_sources`: unique IP addresses, one of every backend's family.
fn sources(
    v: &Spanned<ArrayOf<Spanned<String>>>,
    backends: &[Backend],
    ctx: &str,
) -> Result<Vec<std::net::IpAddr>> {
    let list = &v.get_ref().0;
    if list.is_empty() || list.len() > MAX_SOURCES {
        return Err(at(
            v,
            format!("{ctx}: upstream_sources needs 1 to {MAX_SOURCES} addresses (leave it out for the wildcard)"),
        ));
    }
    let mut out: Vec<std::net::IpAddr> = Vec::with_capacity(list.len());
    for s in list {
        let ip: std::net::IpAddr = s.get_ref().trim().parse().map_err(|_| {
            at(
                s,
                format!(
                    "{ctx}: upstream_sources entry {:?} is not an IP address",
                    s.get_ref()
                ),
            )
        })?;
        if out.contains(&ip) {
            return Err(at(s, format!("{ctx}: upstream_sources lists {ip} twice")));
        }
        out.push(ip);
    }
    for b in backends {
        if !out.iter().any(|ip| ip.is_ipv4() == b.addr.is_ipv4()) {
            let family = if b.addr.is_ipv4() { "IPv4" } else { "IPv6" };
            return Err(at(
                v,
                format!(
                    "{ctx}: backend {} is {family}, but upstream_sources has no {family} address",
                    b.addr
                ),
            ));
        }
    }
    Ok(out)
}

fn quic_lb(v: &Spanned<FileQuicLb>, dissector: Dissector, ctx: &str) -> Result<QuicLb> {
    let Dissector::Quic { short_cid_len } = dissector else {
        return Err(at(v, format!("{ctx}: quic_lb needs dissector = \"quic\"")));
    };
    let t = v.get_ref();
    let span = v.span();
    let table_ctx = format!("{ctx}: quic_lb");
    let config_id = int_in(
        required(t.config_id.as_ref(), &span, &table_ctx, "config_id")?,
        0..=6,
        &format!("{table_ctx}.config_id"),
    )?;
    let server_id_len_v = required(t.server_id_len.as_ref(), &span, &table_ctx, "server_id_len")?;
    let server_id_len: usize = int_in(
        server_id_len_v,
        1..=15,
        &format!("{table_ctx}.server_id_len"),
    )?;
    if 1 + server_id_len > short_cid_len {
        return Err(at(
            server_id_len_v,
            format!(
                "{table_ctx}.server_id_len = {server_id_len} does not fit in short_cid_len = {short_cid_len} \
                 (a routable connection ID is 1 + server_id_len bytes or longer)"
            ),
        ));
    }
    Ok(QuicLb {
        config_id,
        server_id_len,
    })
}

fn server_id(v: &Spanned<String>, len: usize, ctx: &str) -> Result<Vec<u8>> {
    let hex = v.get_ref().trim();
    let bytes: Option<Vec<u8>> = (hex.len() % 2 == 0 && hex.is_ascii())
        .then(|| {
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
                .collect()
        })
        .flatten();
    match bytes {
        Some(b) if b.len() == len => Ok(b),
        _ => Err(at(
            v,
            format!(
                "{ctx}: server_id = {hex:?} must be {len} bytes of hex ({} digits)",
                2 * len
            ),
        )),
    }
}

fn listener_name(v: &Spanned<String>, ctx: &str) -> Result<String> {
    let name = v.get_ref();
    // Names end up in stats keys and log fields, so keep them shell- and
    // parser-safe.
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        return Err(at(
            v,
            format!(
                "{ctx}: name = {name:?} is invalid (expected 1 to {NAME_MAX} characters from A-Z a-z 0-9 _ . -)"
            ),
        ));
    }
    Ok(name.clone())
}

fn dissector(
    kind: &Spanned<String>,
    l: &FileListener,
    header: &Span,
    ctx: &str,
) -> Result<Dissector> {
    let kind_str = kind.get_ref().as_str();
    // A key that the chosen dissector ignores is almost certainly a mistake
    // (wrong dissector, or a leftover), so it is an error, not a no-op.
    let reject = |v: &Option<Spanned<Int>>, key: &str, valid_for: &str| match v {
        Some(v) => Err(at(
            v,
            format!("{ctx}: {key} is only valid with dissector = {valid_for:?}, not {kind_str:?}"),
        )),
        None => Ok(()),
    };
    match kind_str {
        "quic" => {
            reject(&l.cid_offset, "cid_offset", "bytes")?;
            reject(&l.cid_len, "cid_len", "bytes")?;
            let short_cid_len = match &l.short_cid_len {
                None => DEFAULT_SHORT_CID_LEN,
                Some(v) => int_in(v, CID_LEN, &format!("{ctx}: short_cid_len"))?,
            };
            Ok(Dissector::Quic { short_cid_len })
        }
        "bytes" => {
            reject(&l.short_cid_len, "short_cid_len", "quic")?;
            let bytes_ctx = format!("{ctx} (dissector = \"bytes\")");
            let cid_offset = required(l.cid_offset.as_ref(), header, &bytes_ctx, "cid_offset")?;
            let cid_offset = int_in(cid_offset, CID_OFFSET, &format!("{ctx}: cid_offset"))?;
            let cid_len = required(l.cid_len.as_ref(), header, &bytes_ctx, "cid_len")?;
            let cid_len = int_in(cid_len, CID_LEN, &format!("{ctx}: cid_len"))?;
            Ok(Dissector::Bytes {
                cid_offset,
                cid_len,
            })
        }
        "tuple" => {
            reject(&l.short_cid_len, "short_cid_len", "quic")?;
            reject(&l.cid_offset, "cid_offset", "bytes")?;
            reject(&l.cid_len, "cid_len", "bytes")?;
            Ok(Dissector::Tuple)
        }
        other => Err(at(
            kind,
            format!("{ctx}: dissector = {other:?} is invalid (expected \"quic\", \"bytes\" or \"tuple\")"),
        )),
    }
}

/// A key that takes one of a few words: absent, `default`; any other word
/// is an error that names them all, in order.
fn one_of<T: Copy>(
    v: Option<&Spanned<String>>,
    key: &str,
    default: T,
    words: &[(&str, T)],
) -> Result<T> {
    let Some(v) = v else {
        return Ok(default);
    };
    let word = v.get_ref().as_str();
    if let Some((_, value)) = words.iter().find(|(w, _)| *w == word) {
        return Ok(*value);
    }
    let quoted: Vec<String> = words.iter().map(|(w, _)| format!("{w:?}")).collect();
    let expected = match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(at(
        v,
        format!("{key} = {word:?} is invalid (expected {expected})"),
    ))
}

fn steering(v: Option<&Spanned<String>>, dissector: Dissector, ctx: &str) -> Result<Steering> {
    let words = [
        ("auto", Steering::Auto),
        ("kernel-cid", Steering::KernelCid),
        ("reshuffle", Steering::Reshuffle),
    ];
    let steering = one_of(v, &format!("{ctx}: steering"), Steering::Auto, &words)?;
    let Some(v) = v else {
        return Ok(steering);
    };
    if steering == Steering::KernelCid && dissector == Dissector::Tuple {
        return Err(at(
            v,
            format!(
                "{ctx}: steering = \"kernel-cid\" needs a connection ID, which dissector = \"tuple\" \
                 does not provide (use \"auto\" or \"reshuffle\")"
            ),
        ));
    }
    Ok(steering)
}

fn recv_buffer(v: &Spanned<IntOrStr>, ctx: &str) -> Result<usize> {
    let what = format!("{ctx}: recv_buffer = {}", v.get_ref());
    let out_of_range = || at(v, format!("{what} is out of range ({RECV_BUFFER_TEXT})"));
    match units::parse_size(v.get_ref()) {
        Ok(n) if RECV_BUFFER.contains(&n) => usize::try_from(n).map_err(|_| out_of_range()),
        Ok(_) | Err(UnitError::Overflow) => Err(out_of_range()),
        Err(UnitError::Malformed | UnitError::MissingUnit) => Err(at(
            v,
            format!("{what} is not a size (expected {SIZE_FORMS})"),
        )),
    }
}

fn session_idle(v: &Spanned<IntOrStr>, ctx: &str) -> Result<Duration> {
    duration_in(
        v,
        SESSION_IDLE,
        SESSION_IDLE_TEXT,
        &format!("{ctx}: session_idle"),
    )
}

/// A duration key within `range`; `what` names the key in messages.
pub(crate) fn duration_in(
    v: &Spanned<IntOrStr>,
    range: RangeInclusive<Duration>,
    range_text: &str,
    what: &str,
) -> Result<Duration> {
    let what = format!("{what} = {}", v.get_ref());
    match units::parse_duration(v.get_ref()) {
        Ok(d) if range.contains(&d) => Ok(d),
        Ok(_) | Err(UnitError::Overflow) => {
            Err(at(v, format!("{what} is out of range ({range_text})")))
        }
        Err(UnitError::MissingUnit) => Err(at(
            v,
            format!("{what} has no unit (expected {DURATION_FORMS})"),
        )),
        Err(UnitError::Malformed) => Err(at(
            v,
            format!("{what} is not a duration (expected {DURATION_FORMS})"),
        )),
    }
}

fn maglev_table_size(v: &Spanned<Int>, ctx: &str) -> Result<usize> {
    let n: usize = int_in(v, MAGLEV_TABLE_SIZE, &format!("{ctx}: maglev_table_size"))?;
    // Maglev derives each backend's slot permutation from (offset + j * skip)
    // mod M; only a prime M guarantees every permutation visits every slot.
    if !is_prime(n) {
        return Err(at(
            v,
            format!("{ctx}: maglev_table_size = {n} is not a prime (e.g. 65537, 655373)"),
        ));
    }
    Ok(n)
}

fn backends(
    v: &Spanned<ArrayOf<Spanned<FileBackend>>>,
    quic_lb: Option<QuicLb>,
    ctx: &str,
) -> Result<Vec<Backend>> {
    if v.get_ref().0.is_empty() {
        return Err(at(
            v,
            format!("{ctx}: backends is empty; at least one backend is required"),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(v.get_ref().0.len());
    let mut server_ids = HashSet::new();
    for entry in &v.get_ref().0 {
        let mut server_id_v = None;
        let (addr_v, weight) = match entry.get_ref() {
            FileBackend::Addr(s) => (Spanned::new(entry.span(), s.clone()), DEFAULT_WEIGHT),
            FileBackend::Table(t) => {
                let addr = required(
                    t.addr.as_ref(),
                    &entry.span(),
                    &format!("{ctx}: backend table"),
                    "addr",
                )?;
                let weight = match &t.weight {
                    None => DEFAULT_WEIGHT,
                    Some(w) => int_in(
                        w,
                        WEIGHT,
                        &format!("{ctx}: backend {:?} weight", addr.get_ref()),
                    )?,
                };
                server_id_v = t.server_id.as_ref();
                (addr.clone(), weight)
            }
        };
        let addr = socket_addr(&addr_v, ctx, &format!("backend {:?}", addr_v.get_ref()))?;
        // sendto() rejects port 0, so such a backend could never be reached.
        if addr.port() == 0 {
            return Err(at(
                &addr_v,
                format!("{ctx}: backend {addr} has port 0, which cannot be sent to"),
            ));
        }
        if !seen.insert(addr) {
            return Err(at(
                &addr_v,
                format!("{ctx}: backend {addr} is listed twice"),
            ));
        }
        let server_id = match (quic_lb, server_id_v) {
            (None, None) => None,
            (None, Some(sid)) => {
                return Err(at(
                    sid,
                    format!("{ctx}: backend {addr} has a server_id but the listener has no [listener.quic_lb]"),
                ))
            }
            (Some(_), None) => {
                return Err(at(
                    entry,
                    format!(
                        "{ctx}: backend {addr} needs a server_id (the listener routes by QUIC-LB), \
                         e.g. {{ addr = \"{addr}\", server_id = \"c4605e\" }}"
                    ),
                ))
            }
            (Some(lb), Some(sid)) => {
                let id = server_id(sid, lb.server_id_len, ctx)?;
                if !server_ids.insert(id.clone()) {
                    return Err(at(sid, format!("{ctx}: server_id {:?} is used twice", sid.get_ref())));
                }
                Some(id)
            }
        };
        out.push(Backend {
            addr,
            weight,
            server_id,
        });
    }
    if !out.is_empty() && out.iter().all(|b| b.weight == 0) {
        return Err(at(
            v,
            format!(
                "{ctx}: every backend has weight = 0, so no new session could go anywhere \
                 (weight 0 drains one backend while the others take its new sessions)"
            ),
        ));
    }
    Ok(out)
}

fn socket_addr(v: &Spanned<String>, ctx: &str, what: &str) -> Result<SocketAddr> {
    let text = v.get_ref().trim();
    text.parse().map_err(|_| {
        // "localhost:443": a name would be resolved once, at start, and never
        // again, so the config takes addresses only.
        let hostname = text.rsplit_once(':').is_some_and(|(host, port)| {
            port.parse::<u16>().is_ok()
                && host.parse::<std::net::IpAddr>().is_err()
                && !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        });
        let hint = if hostname {
            " (host names are not accepted: write an IP address, e.g. \"127.0.0.1:443\")"
        } else {
            " (expected \"ip:port\" or \"[ipv6]:port\")"
        };
        at(v, format!("{ctx}: {what} is not a socket address{hint}"))
    })
}

fn required<'a, T>(
    v: Option<&'a Spanned<T>>,
    header: &Span,
    ctx: &str,
    key: &str,
) -> Result<&'a Spanned<T>> {
    v.ok_or_else(|| {
        SpanError::new(
            header.clone(),
            format!("{ctx}: missing required key `{key}`"),
        )
    })
}

/// `what` is the message prefix naming the key, e.g. `listener "a": cid_len`.
pub(crate) fn int_in<T: TryFrom<i64>>(
    v: &Spanned<Int>,
    range: RangeInclusive<i64>,
    what: &str,
) -> Result<T> {
    let n = v.get_ref().0;
    let out_of_range = || {
        at(
            v,
            format!("{what} = {n} is out of range ({})", fmt_range(&range)),
        )
    };
    if !range.contains(&n) {
        return Err(out_of_range());
    }
    T::try_from(n).map_err(|_| out_of_range())
}

pub(crate) fn at<T>(v: &Spanned<T>, message: String) -> SpanError {
    SpanError::new(v.span(), message)
}

fn fmt_range(r: &RangeInclusive<i64>) -> String {
    format!("{}..={}", group_digits(*r.start()), group_digits(*r.end()))
}

/// `100000000` -> `100_000_000`, matching how the limits are documented.
fn group_digits(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    if digits.len() <= 4 {
        return n.to_string();
    }
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('_');
        }
        out.push(c);
    }
    out
}

/// Trial division: table sizes are at most ~10^7, so this is instant.
pub fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::{group_digits, is_prime};

    #[test]
    fn primes() {
        let small: Vec<usize> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65_537));
        assert!(is_prime(10_000_019));
        assert!(!is_prime(65_536));
        assert!(!is_prime(10_000_017));
    }

    #[test]
    fn digit_grouping() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(1024), "1024");
        assert_eq!(group_digits(10_000_019), "10_000_019");
        assert_eq!(group_digits(100_000_000), "100_000_000");
        assert_eq!(group_digits(-12_345), "-12_345");
    }
}
