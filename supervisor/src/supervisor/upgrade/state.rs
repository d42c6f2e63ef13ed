//! What the old supervisor hands the new one across a binary upgrade, as
//! JSON in the `Inherit` message: the running config, where the stats file
//! is, and the descriptors it passes (open across exec), by number.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

/// The state a new binary takes over. Field names are the protocol's:
/// renaming one needs a new [`super::PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(in crate::supervisor) struct UpgradeState {
    pub(in crate::supervisor) protocol: u64,
    /// The old binary's version ([`crate::version_word`]).
    pub(in crate::supervisor) version: u64,
    pub(in crate::supervisor) origin: String,
    /// The config text the old generation runs.
    pub(in crate::supervisor) config: String,
    pub(in crate::supervisor) config_generation: u64,
    pub(in crate::supervisor) stats_path: String,
    pub(in crate::supervisor) stats_fd: RawFd,
    pub(in crate::supervisor) state_fd: RawFd,
    pub(in crate::supervisor) metrics_fd: Option<RawFd>,
    pub(in crate::supervisor) listeners: Vec<ListenerState>,
    /// The sending end of each old worker's inbox, by slot.
    pub(in crate::supervisor) inboxes: Vec<RawFd>,
    /// Each slot's CPU.
    pub(in crate::supervisor) cpus: Vec<usize>,
}

/// One listener's reuseport group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(in crate::supervisor) struct ListenerState {
    pub(in crate::supervisor) name: String,
    pub(in crate::supervisor) configured: SocketAddr,
    pub(in crate::supervisor) addr: SocketAddr,
    pub(in crate::supervisor) recv_buffer: usize,
    pub(in crate::supervisor) effective_recv_buffer: usize,
    /// Its sockets, one per slot.
    pub(in crate::supervisor) fds: Vec<RawFd>,
}

/// Just the protocol: read first, so that a state of another protocol is
/// refused by its number rather than by a field it lacks.
#[derive(Deserialize)]
pub(in crate::supervisor) struct Protocol {
    pub(in crate::supervisor) protocol: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON the previous release wrote (`json!` with these keys) reads
    /// into the struct, and the struct writes the same keys back.
    #[test]
    fn the_state_keeps_the_protocols_field_names() {
        let text = r#"{"protocol":1,"version":72057594306363392,"origin":"/etc/udpshard/udpshard.toml",
            "config":"[[listener]]","config_generation":3,"stats_path":"/run/udpshard/stats",
            "stats_fd":5,"state_fd":6,"metrics_fd":null,
            "listeners":[{"name":"q","configured":"0.0.0.0:443","addr":"0.0.0.0:443",
              "recv_buffer":4194304,"effective_recv_buffer":8388608,"fds":[7,8]}],
            "inboxes":[9,10],"cpus":[0,1]}"#;
        let s: UpgradeState = serde_json::from_str(text).unwrap();
        assert_eq!(s.listeners[0].fds, [7, 8]);
        assert_eq!(s.listeners[0].configured, "0.0.0.0:443".parse().unwrap());
        assert_eq!(s.metrics_fd, None);
        let back: serde_json::Value = serde_json::to_value(&s).unwrap();
        let want: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(back, want);
    }
}
