//! The on-disk shape of the config file, exactly as serde sees it.
//!
//! Everything a user can get wrong is `Option<Spanned<_>>` so validation,
//! not serde, decides what is required and can point at the offending value
//! (or at the `[[listener]]` header when a key is missing) with its own
//! message.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub workers: Option<Spanned<IntOrStr>>,
    pub stats_file: Option<Spanned<String>>,
    pub drain_timeout: Option<Spanned<IntOrStr>>,
    pub withdraw_delay: Option<Spanned<IntOrStr>>,
    pub readiness: Option<Spanned<String>>,
    pub upgrade_timeout: Option<Spanned<IntOrStr>>,
    pub metrics: Option<Spanned<String>>,
    pub upstream_send: Option<Spanned<String>>,
    pub offload: Option<Spanned<String>>,
    pub syscall_filter: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub listener: Option<Spanned<ArrayOf<Spanned<FileListener>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileListener {
    pub name: Option<Spanned<String>>,
    pub bind: Option<Spanned<String>>,
    pub dissector: Option<Spanned<String>>,
    pub short_cid_len: Option<Spanned<Int>>,
    pub cid_offset: Option<Spanned<Int>>,
    pub cid_len: Option<Spanned<Int>>,
    pub steering: Option<Spanned<String>>,
    pub recv_buffer: Option<Spanned<IntOrStr>>,
    pub session_idle: Option<Spanned<IntOrStr>>,
    pub max_sessions: Option<Spanned<Int>>,
    pub maglev_table_size: Option<Spanned<Int>>,
    pub backends: Option<Spanned<ArrayOf<Spanned<FileBackend>>>>,
    pub quic_lb: Option<Spanned<FileQuicLb>>,
    pub migration: Option<Spanned<String>>,
    pub path_idle: Option<Spanned<IntOrStr>>,
    pub max_paths: Option<Spanned<Int>>,
    pub upstream_sources: Option<Spanned<ArrayOf<Spanned<String>>>>,
    pub upstream_ports: Option<Spanned<String>>,
    pub port_reuse_delay: Option<Spanned<IntOrStr>>,
    pub fall: Option<Spanned<Int>>,
    pub reply_timeout: Option<Spanned<IntOrStr>>,
    pub revive_after: Option<Spanned<IntOrStr>>,
    pub on_backend_down: Option<Spanned<String>>,
    pub max_ejection_percent: Option<Spanned<Int>>,
    pub health: Option<Spanned<FileHealth>>,
    pub admission: Option<Spanned<FileAdmission>>,
    pub proxy_protocol: Option<Spanned<String>>,
    pub session_log: Option<Spanned<Int>>,
    pub queue_delay: Option<Spanned<String>>,
}

/// `[listener.admission]`: what an unauthenticated datagram may create.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileAdmission {
    pub max_embryonic: Option<Spanned<Int>>,
    pub embryonic_timeout: Option<Spanned<IntOrStr>>,
    pub source_prefix_v4: Option<Spanned<Int>>,
    pub source_prefix_v6: Option<Spanned<Int>>,
    pub new_sessions_per_source: Option<Spanned<Int>>,
    pub new_sessions_burst: Option<Spanned<Int>>,
    pub new_paths_per_source: Option<Spanned<Int>>,
    pub new_paths_burst: Option<Spanned<Int>>,
    pub new_paths_per_session: Option<Spanned<Int>>,
    pub new_paths_per_session_burst: Option<Spanned<Int>>,
}

/// `[listener.health]`: active probes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileHealth {
    pub probe: Option<Spanned<String>>,
    pub expect: Option<Spanned<String>>,
    pub interval: Option<Spanned<IntOrStr>>,
    pub timeout: Option<Spanned<IntOrStr>>,
    pub rise: Option<Spanned<Int>>,
    pub fall: Option<Spanned<Int>>,
}

/// `[listener.quic_lb]`: plaintext QUIC-LB routing
/// (draft-ietf-quic-load-balancers-21).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileQuicLb {
    pub config_id: Option<Spanned<Int>>,
    pub server_id_len: Option<Spanned<Int>>,
}

/// An integer, kept wide so a negative value is reported as out of range
/// rather than as a type error. Not plain `i64`, whose type errors say
/// "expected i64".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Int(pub i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                i64::try_from(v)
                    .map(Int)
                    .map_err(|_| E::custom(format!("integer {v} is too large")))
            }
        }
        d.deserialize_any(V)
    }
}

/// An array whose type errors say what it should contain, instead of serde's
/// "expected a sequence" (which, for `[listener]` written instead of
/// `[[listener]]`, hides the actual mistake).
#[derive(Debug)]
pub(crate) struct ArrayOf<T>(pub Vec<T>);

pub(crate) trait Element {
    const ARRAY_DESCRIPTION: &'static str;
}

impl Element for Spanned<FileListener> {
    const ARRAY_DESCRIPTION: &'static str = "an array of tables, written as [[listener]]";
}

impl Element for Spanned<FileBackend> {
    const ARRAY_DESCRIPTION: &'static str = r#"an array of backends, e.g. ["10.0.0.1:443"]"#;
}

impl Element for Spanned<String> {
    const ARRAY_DESCRIPTION: &'static str =
        r#"an array of IP addresses, e.g. ["10.0.0.5", "10.0.0.6"]"#;
}

impl<'de, T: Deserialize<'de> + Element> Deserialize<'de> for ArrayOf<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Element> Visitor<'de> for V<T> {
            type Value = ArrayOf<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::ARRAY_DESCRIPTION)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ArrayOf<T>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(item) = seq.next_element()? {
                    out.push(item);
                }
                Ok(ArrayOf(out))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// A backend is either a bare address string or a table with a weight.
#[derive(Debug)]
pub(crate) enum FileBackend {
    Addr(String),
    Table(FileBackendTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileBackendTable {
    pub addr: Option<Spanned<String>>,
    pub weight: Option<Spanned<Int>>,
    /// Hex; only with `[listener.quic_lb]`.
    pub server_id: Option<Spanned<String>>,
}

/// Values that are legitimately either an integer or a string (`workers`,
/// sizes) or where an integer is a likely mistake worth a tailored message
/// (durations without a unit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IntOrStr {
    Int(i64),
    Str(String),
}

impl fmt::Display for IntOrStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrStr::Int(n) => write!(f, "{n}"),
            IntOrStr::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrStr {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrStr, E> {
                i64::try_from(v)
                    .map(IntOrStr::Int)
                    .map_err(|_| E::custom(format!("integer {v} is too large")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Str(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for FileBackend {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Hand-written rather than `#[serde(untagged)]`: untagged buffers the
        // value and collapses every failure (including unknown keys in the
        // table) into "did not match any variant", losing key and position.
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FileBackend;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    r#"a backend address string or a table { addr = "ip:port", weight = n }"#,
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FileBackend, E> {
                Ok(FileBackend::Addr(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FileBackend, A::Error> {
                FileBackendTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(FileBackend::Table)
            }
        }
        d.deserialize_any(V)
    }
}
