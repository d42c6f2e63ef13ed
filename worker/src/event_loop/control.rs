//! The supervisor's control messages, and the phase steps they make: a
//! reload, a drain, and a binary upgrade's quiesce, hand-over, resume and
//! take-over.

use std::net::UdpSocket;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use udpshard_config::{Offload, UpstreamSend};
use udpshard_shared::control::ControlMsg;
use udpshard_shared::owners::Owner;
use udpshard_shared::stats::Counter;

use super::start::{build_listeners, build_routes, deregister_listeners, register_listeners};
use super::{drops_from, Loop};
use crate::listener::Listener;
use crate::phase::{HandingOver, Phase, HAND_OVER_TIMEOUT_MS};
use crate::WorkerError;

/// Sessions offered to the successor per loop iteration, and at most on
/// offer at once: the successor's inbox holds a few thousand frames.
const HAND_OVER_BATCH: usize = 256;
const HAND_OVER_IN_FLIGHT: usize = 1024;

impl Loop {
    /// Handles control messages; true when the worker is to exit now.
    pub(super) fn read_control(&mut self) -> Result<bool, WorkerError> {
        // What could not be sent before goes first.
        self.control
            .flush()
            .map_err(|e| WorkerError::Control(e.to_string()))?;
        let open = self
            .control
            .read_available()
            .map_err(|e| WorkerError::Control(e.to_string()))?;
        while let Some(msg) = self.control.next_msg() {
            let (msg, fds) = msg.map_err(|e| WorkerError::Control(e.to_string()))?;
            if self.handle_control(msg, fds) {
                return Ok(true);
            }
        }
        if !open {
            tracing::info!("supervisor closed the control channel; exiting");
            return Ok(true);
        }
        Ok(false)
    }

    /// One control message; true when the worker is to exit now.
    pub(super) fn handle_control(&mut self, msg: ControlMsg, fds: Vec<OwnedFd>) -> bool {
        let standby = self.router.phase().predecessor().is_some();
        let handing_over = self.router.phase().successor().is_some();
        {
            match msg {
                ControlMsg::Stop => return true,
                ControlMsg::Reload { origin, config, .. } => {
                    match self.reload(&origin, &config, fds) {
                        Ok(()) => {
                            let _ = self.control.send(&ControlMsg::Reloaded, &[]);
                        }
                        // The supervisor validated the same text: this is a
                        // socket-level failure; keep serving what we have.
                        Err(e) => tracing::error!(worker = self.id, "reload failed: {e}"),
                    }
                }
                ControlMsg::Peers { .. } => {
                    let peers = fds.into_iter().map(UnixDatagram::from).collect();
                    if let Err(e) = self.handoff.set_peers(peers) {
                        tracing::error!(worker = self.id, "handoff peers: {e}");
                    }
                }
                ControlMsg::Drain { timeout_ms } => {
                    let deadline_ms = self.now_ms().saturating_add(timeout_ms);
                    if let Err(e) = self.enter(Phase::Draining { deadline_ms }) {
                        tracing::error!(worker = self.id, "draining: {e}");
                        return true;
                    }
                }
                ControlMsg::Live if standby => {
                    if let Err(e) = self.take_over() {
                        tracing::error!(worker = self.id, "taking the slot over: {e}");
                        return true;
                    }
                }
                ControlMsg::ReadListeners if standby => {
                    let next = match *self.router.phase() {
                        Phase::Standby {
                            predecessor,
                            listening: false,
                        } => Some(Phase::Standby {
                            predecessor,
                            listening: true,
                        }),
                        _ => None,
                    };
                    if let Some(Err(e)) = next.map(|next| self.enter(next)) {
                        tracing::error!(worker = self.id, "reading the listeners: {e}");
                        return true;
                    }
                }
                ControlMsg::Quiesce { generation } => {
                    if let Err(e) = self.quiesce(generation, fds.into_iter().next()) {
                        tracing::error!(worker = self.id, "quiescing: {e}");
                        return true;
                    }
                }
                ControlMsg::Resume if handing_over => {
                    if let Err(e) = self.resume() {
                        tracing::error!(worker = self.id, "resuming: {e}");
                        return true;
                    }
                }
                ControlMsg::HandOver if handing_over => {
                    tracing::debug!(
                        worker = self.id,
                        sessions = self.router.sessions(),
                        "handing over"
                    );
                    let now = self.now_ms();
                    self.router.start_handing_over(now);
                }
                other => tracing::warn!("unexpected control message {other:?}"),
            }
        }
        false
    }

    /// Before exiting on `Stop`. A retiring worker's sockets leave their
    /// groups when it exits: it forwards what is queued in them, and what
    /// other workers handed it meanwhile. One that handed its slot over
    /// leaves the listeners to its successor, and one standing by (its
    /// upgrade given up) to its predecessor, which serves on: what a standby
    /// worker reads is counted nowhere, and its replies would come to a
    /// process that is gone (its supervisor's death SIGKILLs it mid-batch).
    pub(super) fn leave(&mut self) {
        self.read_inbox();
        if self.router.phase().drains_listeners_on_exit() {
            for l in 0..self.listeners.len() {
                while !self.drain_listener(l) {}
            }
        }
        self.read_inbox();
        // The sockets' drops up to now are this process's to count (a
        // successor counts from where this leaves them).
        if self.router.phase().publishes() {
            self.note_listener_drops();
        }
        // Frames that wait for room in an inbox go with a last try or two.
        for _ in 0..50 {
            self.handoff.flush_pending();
            if !self.handoff.has_pending() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Moves the router to phase `next`, and the listeners' registration
    /// with it; false when `next` is no step from the phase it is in.
    fn enter(&mut self, next: Phase) -> Result<bool, WorkerError> {
        if !self.router.phase().may_become(&next) {
            tracing::warn!(
                worker = self.id,
                "no step from {} to {}: ignored",
                self.router.phase().name(),
                next.name()
            );
            return Ok(false);
        }
        self.router.set_phase(next);
        let read = self.router.phase().reads_listeners();
        if read != self.registered {
            if read {
                register_listeners(self.poll.registry(), &self.listeners)?;
            } else {
                deregister_listeners(self.poll.registry(), &self.listeners);
            }
            self.registered = read;
            // Read what waits at once; edges raised before are not raised
            // again.
            self.undrained.iter_mut().for_each(|u| *u = read);
        }
        Ok(true)
    }

    /// A binary upgrade: stop reading the listeners, which the successor
    /// (generation `generation` of this slot, whose inbox is `twin`) will
    /// read; from now on no session is made here.
    fn quiesce(&mut self, generation: u64, twin: Option<OwnedFd>) -> Result<(), WorkerError> {
        let next = HandingOver::to(Owner::new(self.id, generation));
        if !self.router.phase().may_become(&next) {
            tracing::error!(
                worker = self.id,
                "upgrade: asked to quiesce while {}",
                self.router.phase().name()
            );
            return Ok(());
        }
        let Some(twin) = twin else {
            tracing::error!(worker = self.id, "upgrade: no successor inbox came");
            return Ok(());
        };
        if let Err(e) = self
            .handoff
            .set_twin(self.id, Some(UnixDatagram::from(twin)))
        {
            tracing::error!(worker = self.id, "upgrade: successor inbox: {e}");
            return Ok(());
        }
        self.enter(next)?;
        tracing::debug!(
            worker = self.id,
            "quiesced: the listeners are the successor's"
        );
        let _ = self.control.send(&ControlMsg::Quiesced, &[]);
        Ok(())
    }

    /// The upgrade is given up: read the listeners again and serve on.
    fn resume(&mut self) -> Result<(), WorkerError> {
        self.enter(Phase::Serving)?;
        let _ = self.handoff.set_twin(self.id, None);
        tracing::warn!(
            worker = self.id,
            sessions = self.router.sessions(),
            "upgrade given up: reading the listeners again"
        );
        Ok(())
    }

    /// While handing over: offers the next sessions; once none is left
    /// (or the time is up), tells the supervisor.
    pub(super) fn hand_over_step(&mut self) -> Result<(), WorkerError> {
        let since_ms = match self.router.phase() {
            Phase::HandingOver(h) if !h.reported => match h.since_ms {
                Some(since_ms) => since_ms,
                None => return Ok(()),
            },
            _ => return Ok(()),
        };
        let timed_out = self.now_ms().saturating_sub(since_ms) >= HAND_OVER_TIMEOUT_MS;
        if !timed_out && self.router.offer_next(HAND_OVER_IN_FLIGHT, HAND_OVER_BATCH) > 0 {
            self.flush(&mut []);
        }
        if !self.router.handed_over() && !timed_out {
            return Ok(());
        }
        let left = self.router.sessions() as u64;
        if left > 0 {
            tracing::warn!(
                worker = self.id,
                "upgrade: {left} sessions could not be handed over in {} s; \
                 their flows start afresh at the new generation",
                HAND_OVER_TIMEOUT_MS / 1000
            );
        }
        self.router.handover_reported();
        self.publish();
        self.control
            .send(&ControlMsg::HandedOver { left }, &[])
            .map_err(|e| WorkerError::Control(e.to_string()))
    }

    /// A binary upgrade: the predecessor is gone and the slot is this
    /// process's. Its counters continue the slot's, it reads the listeners,
    /// and it takes over the sockets of the sessions it was handed.
    fn take_over(&mut self) -> Result<(), WorkerError> {
        if self.router.phase().publishes() {
            return Ok(());
        }
        if let Some(slot) = self.region.slot(self.id) {
            let counts = self.region.backend_counts(self.id);
            self.router.counters.rebase(&slot, counts.as_ref());
        }
        self.queue_delay.rebase(self.region.delay(self.id));
        // Wall time goes on from the slot's (this loop's clock keeps running).
        let since_start = self.start.elapsed().as_nanos() as u64;
        self.wall_base = self
            .router
            .counters
            .get(Counter::WallNs)
            .saturating_sub(since_start);
        (self.socket_drops_seen, self.socket_drops_base) = drops_from(&self.router.counters);
        let _ = self.handoff.set_twin(self.id, None);
        self.enter(Phase::Serving)?;
        self.router.adopt_orphans();
        self.flush(&mut []);
        tracing::info!(
            worker = self.id,
            sessions = self.router.sessions(),
            "took the slot over"
        );
        Ok(())
    }

    /// Serves a new config: listeners added, removed, or re-routed; live
    /// sessions kept.
    fn reload(&mut self, origin: &str, text: &str, fds: Vec<OwnedFd>) -> Result<(), WorkerError> {
        let config = udpshard_config::parse(text, origin)?;
        let sockets: Vec<UdpSocket> = fds.into_iter().map(UdpSocket::from).collect();
        // Listeners are read only while the phase says (a reload is
        // refused during an upgrade, but a drain may be under way).
        let registry = self.poll.registry();
        let read = self.registered;
        let register = |listeners: &[Listener]| match read {
            true => register_listeners(registry, listeners),
            false => Ok(()),
        };
        if read {
            deregister_listeners(registry, &self.listeners);
        }
        let old: Vec<Listener> = std::mem::take(&mut self.listeners);
        let inodes: Vec<u64> = old.iter().map(|l| l.inode).collect();
        let mut current: Vec<Option<Listener>> = old.into_iter().map(Some).collect();
        let listeners = match build_listeners(&config, sockets, &mut current) {
            Ok(l) => l,
            Err(e) => {
                // Put back what we had.
                self.listeners = current.into_iter().flatten().collect();
                register(&self.listeners)?;
                return Err(e);
            }
        };
        let routes = match build_routes(&config, &listeners, &self.region) {
            Ok(r) => r,
            Err(e) => {
                self.listeners = current.into_iter().flatten().collect();
                register(&self.listeners)?;
                return Err(e);
            }
        };
        let map: Vec<Option<usize>> = inodes
            .iter()
            .map(|ino| listeners.iter().position(|l| l.inode == *ino))
            .collect();
        // Removed listeners' sockets close with `current`; the supervisor
        // has closed its copies, so the kernel drops them from their group.
        drop(current);
        register(&listeners)?;
        self.undrained = vec![read; listeners.len()];
        self.listeners = listeners;
        self.router.sockets().configure(&config);
        self.router.reconfigure(routes, &map);
        let want_raw = config.upstream_send == UpstreamSend::Auto;
        if want_raw && !self.exec.has_raw() && self.id == 0 {
            tracing::info!(
                "upstream_send = \"auto\": this worker opened no raw socket at start, so forwards \
                 still go out on their own sockets (the workers are restarted with the supervisor)"
            );
        }
        self.exec.use_raw(want_raw);
        self.exec.use_offload(config.offload == Offload::Auto);
        tracing::info!(worker = self.id, "reloaded {origin}");
        Ok(())
    }
}
