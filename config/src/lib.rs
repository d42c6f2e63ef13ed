//! udpshard configuration.
//!
//! The pipeline is: TOML text -> [`file::FileConfig`] (the serde shape,
//! unknown keys rejected) -> validation that fills defaults -> [`Config`],
//! which the rest of the program trusts without re-checking. Every error
//! carries `origin:line:col` like `nginx -t`.

mod admission;
mod error;
mod file;
mod units;
mod validate;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::ConfigError;
pub use validate::is_prime;

/// The configuration `udpshard run` uses when no `--config` is given.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default.toml");
/// The origin shown in errors about [`DEFAULT_CONFIG_TOML`].
pub const DEFAULT_CONFIG_ORIGIN: &str = "<embedded default>";
pub const DEFAULT_STATS_FILE: &str = "/run/udpshard/stats";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub workers: Workers,
    /// Always absolute.
    pub stats_file: PathBuf,
    /// Never empty; names are unique, and so are binds with a non-zero port.
    pub listeners: Vec<Listener>,
    /// How long SIGTERM lets live sessions finish, in `0s..=1h`.
    pub drain_timeout: Duration,
    /// How long SIGTERM first keeps serving, new flows included, while
    /// saying it is not ready (`/ready`, `udpshard health`): a BGP speaker
    /// that follows it withdraws the service route, and the fabric stops
    /// sending new flows, before the drain. In `0s..=1h`; 0 (the default)
    /// drains at once.
    pub withdraw_delay: Duration,
    /// What `/ready` and `udpshard health` require besides a serving
    /// worker.
    pub readiness: Readiness,
    /// How long a binary upgrade (SIGUSR2) lets the new binary take to
    /// start, validate its config and stand ready, in `1s..=10m`; past it
    /// the old generation keeps serving.
    pub upgrade_timeout: Duration,
    /// Where the Prometheus text endpoint listens; `None` (the default): off.
    pub metrics: Option<SocketAddr>,
    /// How workers put forwarded datagrams on the wire.
    pub upstream_send: UpstreamSend,
    /// Whether workers use the kernel's UDP segmentation offloads: GSO on
    /// every send (runs of datagrams to one address as one message), GRO
    /// on upstream sockets (a backend's flight read as one buffer).
    pub offload: Offload,
    /// Whether workers run under their system-call allowlist (seccomp), from
    /// their next start.
    pub syscall_filter: bool,
    /// Started as root, the user every udpshard process runs as once the
    /// supervisor has bound its sockets; `None`: the user it was started as.
    pub user: Option<String>,
}

/// When the proxy says it is ready (`/ready`, `udpshard health`), for a BGP
/// speaker that announces the host while it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// While a worker serves (`"serving"`, the default).
    Serving,
    /// Also only while every listener has a backend up (`"backend_up"`):
    /// a host whose backends are all down is withdrawn from the fabric,
    /// and serves on meanwhile.
    BackendUp,
}

/// The kernel's UDP segmentation offloads (GSO out, GRO in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offload {
    /// Where the kernel offers them (Linux 4.18 for GSO, 5.0 for GRO); a
    /// device that refuses a segmented send turns GSO off for that socket.
    Auto,
    /// One datagram per message on every send, and one per read on
    /// upstream sockets (listener sockets keep the GRO quinn-udp sets: their
    /// buffers are split as always).
    Off,
}

/// How a worker sends datagrams to backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamSend {
    /// Whole IP packets on one raw socket per family, many upstream ports
    /// per sendmmsg, where the worker may open one (CAP_NET_RAW); else
    /// [`UpstreamSend::Socket`]. A datagram the raw socket refuses (too
    /// large for the device, a full buffer) goes out on its own socket.
    Auto,
    /// Each datagram on its path's upstream socket.
    Socket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// One worker per CPU in the process's affinity mask.
    Auto,
    /// In `1..=1024`.
    Count(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// `[A-Za-z0-9_.-]{1,32}`.
    pub name: String,
    /// Port 0 lets the OS pick one.
    pub bind: SocketAddr,
    pub dissector: Dissector,
    /// Never [`Steering::KernelCid`] together with [`Dissector::Tuple`].
    pub steering: Steering,
    /// Bytes, in `4KiB..=1GiB`.
    pub recv_buffer: usize,
    /// In `1s..=24h`.
    pub session_idle: Duration,
    /// In `1..=100_000_000`.
    pub max_sessions: usize,
    /// A prime in `101..=10_000_019`, at least 10x `backends.len()`.
    pub maglev_table_size: usize,
    /// Never empty, no duplicate addresses, no port 0.
    pub backends: Vec<Backend>,
    /// Only with the quic dissector; then every backend has a server ID.
    pub quic_lb: Option<QuicLb>,
    /// What a datagram with a live session's key from a new client address
    /// does.
    pub migration: Migration,
    /// A PROXY protocol v2 header in front of every forwarded datagram.
    pub proxy_protocol: ProxyProtocol,
    /// Log one session in this many (by its key's hash, so every host of a
    /// fleet picks the same ones) when it opens and when it closes; 0: off.
    pub session_log: u32,
    /// Measure how long each datagram waited in the listener socket (the
    /// kernel stamps it on arrival: SO_TIMESTAMPNS); `queue_delay = "off"`
    /// saves that per-datagram cost.
    pub queue_delay: bool,
    /// A path that is not its session's last closes after this long without
    /// a datagram either way; in `1s..=session_idle`.
    pub path_idle: Duration,
    /// Paths a session may have at once, in `1..=16` (1 with `follow`); past
    /// it the least recently used closes.
    pub max_paths: usize,
    /// The local addresses upstream sockets bind, unique; empty: the
    /// wildcard of each backend's family (the route to the backend picks the
    /// address). Otherwise it has an address of every backend's family.
    pub upstream_sources: Vec<IpAddr>,
    /// The ports upstream sockets bind (`lo <= hi`, `lo >= 1`); `None`: the
    /// kernel's ephemeral range (`net.ipv4.ip_local_port_range`) at start.
    pub upstream_ports: Option<(u16, u16)>,
    /// How long a (source, port) freed from a backend waits before it is
    /// used toward that backend again, in `0s..=1h`.
    pub port_reuse_delay: Duration,
    /// Passive health: a backend is down for new sessions after this many
    /// ICMP unreachable reports with no reply between them, or (QUIC) this
    /// many new sessions in a row with no reply within `reply_timeout`; in
    /// `1..=1000`.
    pub fall: u32,
    /// In `100ms..=60s`.
    pub reply_timeout: Duration,
    /// A down backend is tried again after this long, in `1s..=1h`.
    pub revive_after: Duration,
    pub on_backend_down: OnBackendDown,
    /// The share of the backends passive evidence may hold down at once, in
    /// `0..=100` (rounded down; active probes are not capped).
    pub max_ejection_percent: u32,
    /// `[listener.health]`: active probes, if configured.
    pub health: Option<Health>,
    /// `[listener.admission]`: what an unauthenticated datagram may create.
    pub admission: Admission,
}

/// What an unauthenticated datagram may create. A session is embryonic
/// until its backend first sends on it; new sessions and new paths go
/// through token buckets per source prefix, and new paths through one per
/// session. Rates are per second and per worker; 0 turns a limit off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Embryonic sessions a worker may hold per listener, in
    /// `1..=max_sessions`; past it the oldest makes room.
    pub max_embryonic: usize,
    /// How long a session may wait for its backend's first datagram, in
    /// `1s..=session_idle`.
    pub embryonic_timeout: Duration,
    /// The prefix lengths a source is counted by (`1..=32`, `1..=128`).
    pub source_prefix_v4: u8,
    pub source_prefix_v6: u8,
    pub new_sessions_per_source: u32,
    pub new_sessions_burst: u32,
    pub new_paths_per_source: u32,
    pub new_paths_burst: u32,
    pub new_paths_per_session: u32,
    pub new_paths_per_session_burst: u32,
}

/// Active health: every `interval` each backend is sent `probe` from a
/// socket of its own; a reply within `timeout` that starts with `expect`
/// is a good probe. `fall` bad probes in a row take a backend down, `rise`
/// good ones bring it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// 1 to 1400 bytes (`0x...` in the file: hex; else the text's bytes),
    /// or the built-in QUIC probe.
    pub probe: Probe,
    /// A prefix the reply must start with; empty: any reply.
    pub expect: Vec<u8>,
    /// In `100ms..=1h`.
    pub interval: Duration,
    /// In `10ms..=interval`.
    pub timeout: Duration,
    /// In `1..=100`.
    pub rise: u32,
    /// In `1..=100`.
    pub fall: u32,
}

/// What an active health probe sends, and what answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// These bytes; a reply that starts with `expect` is good.
    Bytes(Vec<u8>),
    /// `probe = "quic"`: a 1200-byte QUIC long header with a reserved
    /// version (RFC 9000 15), which every QUIC server answers with a
    /// Version Negotiation packet, statelessly and without keys; that
    /// answer is good.
    Quic,
}

/// What a backend going down does to its live sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBackendDown {
    /// They stay (a backend that lost one port may still serve them).
    Keep,
    /// They move to the backend their key maps to now (`sessions_rerouted`).
    Reroute,
}

/// What goes in front of each datagram forwarded to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// Nothing: the datagram as the client sent it.
    Off,
    /// A PROXY protocol v2 header naming the client's address and the one
    /// it reached (`udpshard_shared::proxy_v2`), for backends that read it.
    V2,
}

/// How a session treats a client address it has not seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migration {
    /// The new address gets a path of its own (its own upstream 4-tuple):
    /// the backend sees the peer address change and validates the new path
    /// itself (RFC 9000 8.2, 9). Replies on a path go to its address only,
    /// so one spoofed datagram cannot redirect a session.
    Path,
    /// One upstream 4-tuple whose client address follows the latest
    /// datagram: for trusted networks and backends that cannot cope with a
    /// peer changing address. Anyone who can send a datagram with a live
    /// connection ID can redirect that session's replies.
    Follow,
}

/// Plaintext QUIC-LB routing: a connection ID whose first octet's top three
/// bits equal `config_id` carries `server_id_len` bytes of server ID after
/// that octet, naming its backend directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicLb {
    /// In `0..=6` (7 marks an unroutable ID).
    pub config_id: u8,
    /// In `1..=15`.
    pub server_id_len: usize,
}

/// How a datagram's connection identity is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dissector {
    /// `short_cid_len` in `1..=20`: the length of the destination connection
    /// ID in short-header packets, which carry no length field.
    Quic { short_cid_len: usize },
    /// `cid_offset` in `0..=1400`, `cid_len` in `1..=20`.
    Bytes { cid_offset: usize, cid_len: usize },
    /// The 4-tuple only; no connection ID.
    Tuple,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    Auto,
    KernelCid,
    Reshuffle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    /// In `1..=1000`.
    pub weight: u32,
    /// QUIC-LB server ID (`server_id_len` bytes); set exactly when the
    /// listener has `quic_lb`, unique within it.
    pub server_id: Option<Vec<u8>>,
}

/// Parses and validates config text; `origin` names it in error messages.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let file: file::FileConfig = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        ConfigError::at(origin, text, offset, error::toml_message(&e, text))
    })?;
    validate::validate(file).map_err(|e| ConfigError::at(origin, text, e.span.start, e.message))
}

/// Reads and parses the file at `path`; errors name the path as given.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &origin),
        Err(source) => Err(ConfigError::Io { origin, source }),
    }
}

/// An error about the `bind` of listener number `index` (in file order) of
/// config `text`, positioned at that value (or at the file's start when the
/// text no longer parses): for problems found after validation, such as an
/// address that cannot be bound.
pub fn error_at_bind(text: &str, origin: &str, index: usize, message: String) -> ConfigError {
    let offset = toml::from_str::<file::FileConfig>(text)
        .ok()
        .and_then(|f| {
            let list = f.listener?.into_inner().0;
            let l = list.into_iter().nth(index)?;
            let l = l.into_inner();
            l.bind.map(|b| b.span().start)
        })
        .unwrap_or(0);
    ConfigError::at(origin, text, offset, message)
}

/// `message` about the top-level `user` of `text`, at its value.
pub fn error_at_user(text: &str, origin: &str, message: String) -> ConfigError {
    let offset = toml::from_str::<file::FileConfig>(text)
        .ok()
        .and_then(|f| f.user.map(|u| u.span().start))
        .unwrap_or(0);
    ConfigError::at(origin, text, offset, message)
}

/// The parsed [`DEFAULT_CONFIG_TOML`].
pub fn default_config() -> Config {
    match parse(DEFAULT_CONFIG_TOML, DEFAULT_CONFIG_ORIGIN) {
        Ok(config) => config,
        // The text is compiled in and `tests::default_parses` parses it, so
        // this is a build defect, not a runtime condition to handle.
        Err(e) => panic!("embedded default config is invalid: {e}"),
    }
}

#[cfg(test)]
mod tests;
