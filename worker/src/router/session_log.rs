//! `session_log = N`: one session in N, picked by a hash of its key (so
//! every host of a fleet picks the same connections), is logged when it
//! opens and when it closes, as structured fields (`--log-format json`
//! gives one JSON object per line): what the seed's author had to bolt on
//! by hand ("only connections where Connection ID % 10000 == 1"). A session
//! that moves to another worker says so where it leaves; the worker it
//! reaches counts on from there and logs its close.

use std::net::SocketAddr;

use super::{Owners, Router, Sockets};
use crate::session::{Sample, SessionId};

impl<O: Owners, S: Sockets> Router<O, S> {
    /// Session `sid` just opened (here, or `moved_from` another worker):
    /// sampled if its listener samples its key; an opening is logged.
    pub(super) fn sample_session(&mut self, sid: SessionId, moved_from: Option<usize>) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let route = &self.routes[s.listener];
        if !route.samples(s.key.as_bytes()) {
            return;
        }
        let mut sample = Sample::default();
        let first = self.paths.path(s.first_path).map(|p| p.client);
        if let Some(client) = first {
            sample.client(client);
        }
        sample.paths = u32::from(s.path_count);
        s.sample = Some(Box::new(sample));
        if moved_from.is_some() {
            return;
        }
        tracing::info!(
            target: "udpshard::session",
            event = "open",
            listener = %route.name,
            // FlowKey's Debug is its bytes in hex.
            key = ?s.key,
            client = %first.map_or_else(String::new, |c| c.to_string()),
            backend = %route.backends[usize::from(s.backend)],
            worker = self.id,
            "session opened"
        );
    }

    /// Sampled session `sid` closes here (`moved_to`: it goes on at
    /// another worker): its line, with what this worker saw of it.
    pub(super) fn log_session_end(&self, sid: SessionId, moved_to: Option<usize>) {
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        let Some(sample) = s.sample.as_deref() else {
            return;
        };
        let route = &self.routes[s.listener];
        let clients = sample
            .clients
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let event = if moved_to.is_some() { "moved" } else { "close" };
        tracing::info!(
            target: "udpshard::session",
            event,
            listener = %route.name,
            // FlowKey's Debug is its bytes in hex.
            key = ?s.key,
            clients = %clients,
            backend = %route.backends[usize::from(s.backend)],
            worker = self.id,
            moved_to = moved_to.map_or(-1, |w| w as i64),
            paths = sample.paths,
            forwarded = sample.forwarded.0,
            forwarded_bytes = sample.forwarded.1,
            replied = sample.replied.0,
            replied_bytes = sample.replied.1,
            drops = sample.drops,
            duration_ms = self.now_ms.saturating_sub(s.created_ms),
            "{}",
            if moved_to.is_some() {
                "session moved to another worker"
            } else {
                "session closed"
            }
        );
    }
}
