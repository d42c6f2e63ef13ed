//! Turns the router's actions into syscalls, batched: the forwards of a
//! flush go out as raw IP packets, 32 per sendmmsg whatever their upstream
//! ports, where the worker has a raw socket ([`crate::rawtx`]); else every
//! datagram for one upstream socket in one sendmmsg (each with its own
//! destination). Every reply of one listener goes in one sendmmsg (each with
//! its own client and source address). Frames between workers go one by one, in
//! the order they were decided. A control frame is a barrier: the sends
//! decided before it go out before it, those decided after it, after it.
//! Failed sends are reported back to the router, which counts them.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::handoff::{Handoff, Sent};
use udpshard_shared::proxy_v2::Header;
use udpshard_shared::stats::Counter;

use crate::listener::Listener;
use crate::rawtx::{RawMsg, RawTx};
use crate::router::{Action, DatagramRef, Owners, Router};
use crate::sockio::{send_batch, Coalesced, Gso, OutMsg, SendBatch};
use crate::upstream::Upstream;

/// Reusable buffers for one flush.
pub(crate) struct Executor {
    actions: Vec<Action>,
    failed: Vec<usize>,
    send: SendBatch,
    raw: RawTx,
    /// Whether forwards use `raw` (`upstream_send = "auto"`).
    use_raw: bool,
    /// Whether sends use UDP_SEGMENT runs (`offload = "auto"`), and how,
    /// for forwards on upstream sockets (replies: each listener's own).
    offload: bool,
    fwd_gso: Gso,
    /// The flush's forwards, (socket, backend, datagram, PROXY v2 header),
    /// in the order decided.
    fwd: Vec<(u32, SocketAddr, DatagramRef, Option<u32>)>,
    /// The PROXY v2 headers the flush's forwards name (the router's).
    prefixes: Vec<Header>,
    /// Forwards with a header, written whole: header then datagram, each
    /// forward's range in it.
    joined: Vec<u8>,
    joined_at: Vec<std::ops::Range<usize>>,
    /// Per forward: whether it goes out on its own socket.
    own: Vec<bool>,
    /// The raw sends: their source addresses, and their indexes in `fwd`.
    raw_src: Vec<SocketAddr>,
    raw_of: Vec<usize>,
}

impl Executor {
    /// Forwards through `raw` where it carries their family, while
    /// `use_raw`.
    pub(crate) fn new(raw: RawTx, use_raw: bool, offload: bool) -> Executor {
        Executor {
            actions: Vec::new(),
            failed: Vec::new(),
            send: SendBatch::default(),
            raw,
            use_raw,
            offload,
            fwd_gso: Gso::probe(),
            fwd: Vec::new(),
            prefixes: Vec::new(),
            joined: Vec::new(),
            joined_at: Vec::new(),
            own: Vec::new(),
            raw_src: Vec::new(),
            raw_of: Vec::new(),
        }
    }

    /// Whether forwards go out as raw IP packets (some family at least).
    pub(crate) fn sends_raw(&self) -> bool {
        self.use_raw && self.raw.is_on()
    }

    /// Whether raw sockets are open (a reload may then turn them on).
    pub(crate) fn has_raw(&self) -> bool {
        self.raw.is_on()
    }

    /// Raw sends on (`upstream_send = "auto"`) or off, from the next flush.
    pub(crate) fn use_raw(&mut self, on: bool) {
        self.use_raw = on;
    }

    /// Segmented sends on (`offload = "auto"`) or off, from the next flush.
    pub(crate) fn use_offload(&mut self, on: bool) {
        self.offload = on;
    }

    /// Sends `msgs` on `fd`, in UDP_SEGMENT runs where `gso` (kept across
    /// flushes) and the config allow; counts the runs.
    fn send<O: Owners>(
        &mut self,
        router: &mut Router<O, Upstream>,
        fd: std::os::fd::RawFd,
        msgs: &[OutMsg<'_>],
        gso: &mut Gso,
    ) {
        let mut off = Gso::off();
        let gso = if self.offload { gso } else { &mut off };
        let Coalesced {
            messages,
            datagrams,
        } = send_batch(fd, msgs, &mut self.send, gso, &mut self.failed);
        if messages > 0 {
            router.counters.add(Counter::TxGsoMessages, messages);
            router.counters.add(Counter::TxGsoDatagrams, datagrams);
        }
    }

    /// Executes every action the router has decided. `bytes` resolves a
    /// datagram the actions name; `fds` are the descriptors that came with
    /// the frame just read (taken by `Keep`).
    pub(crate) fn flush<'a, O: Owners>(
        &mut self,
        router: &mut Router<O, Upstream>,
        listeners: &[Listener],
        handoff: &mut Handoff,
        fds: &mut [Option<OwnedFd>],
        bytes: &dyn Fn(DatagramRef) -> &'a [u8],
    ) {
        if !router.has_actions() {
            return;
        }
        self.actions.clear();
        self.actions.extend(router.actions());
        router.swap_prefixes(&mut self.prefixes);
        // Taken and put back: the vector keeps its capacity across flushes.
        let mut actions = std::mem::take(&mut self.actions);
        // In runs, each ending at a control frame or a kept descriptor:
        // what was decided before one goes out before it, and what was
        // decided after it goes out after it. A moved path's home then
        // re-points its relay before the backend can answer a later
        // datagram of that path, which went straight out of this worker.
        for run in runs(&mut actions) {
            self.run(router, listeners, handoff, fds, run, bytes);
        }
        actions.clear();
        self.actions = actions;
    }

    /// One run of the flush: its forwards, its replies, then its frames in
    /// the order decided.
    fn run<'a, O: Owners>(
        &mut self,
        router: &mut Router<O, Upstream>,
        listeners: &[Listener],
        handoff: &mut Handoff,
        fds: &mut [Option<OwnedFd>],
        actions: &mut [Action],
        bytes: &dyn Fn(DatagramRef) -> &'a [u8],
    ) {
        self.forwards(router, actions, bytes);
        self.replies(router, listeners, actions, bytes);
        for action in actions {
            match action {
                Action::Handoff {
                    to,
                    header,
                    datagram,
                } => {
                    if handoff
                        .send_datagram(*to, header, bytes(*datagram))
                        .is_err()
                    {
                        router.handoff_failed();
                    }
                }
                Action::Control {
                    to,
                    frame,
                    socks,
                    payload,
                } => {
                    let raw: Vec<_> = socks
                        .iter()
                        .filter_map(|s| router.sockets().fd(*s))
                        .collect();
                    if let Some(d) = payload {
                        frame.extend_from_slice(bytes(*d));
                    }
                    let sent = if raw.len() == socks.len() {
                        handoff
                            .send_control(*to, frame.clone(), &raw, payload.is_some())
                            .ok()
                    } else {
                        None
                    };
                    if sent == Some(Sent::Queued) && payload.is_some() {
                        router.handoff_queued();
                    }
                    if sent.is_none() {
                        match payload {
                            Some(_) => router.handoff_failed(),
                            None => router.transfer_failed(frame),
                        }
                    }
                }
                Action::Keep { index, sock } => {
                    if let Some(fd) = fds.get_mut(*index).and_then(Option::take) {
                        router.sockets().keep(*sock, fd);
                    }
                }
                Action::Forward { .. } | Action::Reply { .. } => {}
            }
        }
    }

    /// Forwards: on the raw socket where it can, in the order decided;
    /// the rest grouped by upstream socket, in the order decided within each.
    fn forwards<'a, O: Owners>(
        &mut self,
        router: &mut Router<O, Upstream>,
        actions: &[Action],
        bytes: &dyn Fn(DatagramRef) -> &'a [u8],
    ) {
        self.fwd.clear();
        self.fwd.extend(actions.iter().filter_map(|a| match a {
            Action::Forward {
                sock,
                to,
                datagram,
                prefix,
            } => Some((*sock, *to, *datagram, *prefix)),
            _ => None,
        }));
        if self.fwd.is_empty() {
            return;
        }
        // Forwards with a PROXY v2 header go out as one buffer each (the
        // header, then the datagram): written here, once.
        let mut joined = std::mem::take(&mut self.joined);
        let mut joined_at = std::mem::take(&mut self.joined_at);
        joined.clear();
        joined_at.clear();
        if self.fwd.iter().any(|f| f.3.is_some()) {
            for &(_, _, d, prefix) in &self.fwd {
                let start = joined.len();
                if let Some(h) = prefix.and_then(|i| self.prefixes.get(i as usize)) {
                    joined.extend_from_slice(h.as_bytes());
                    joined.extend_from_slice(bytes(d));
                }
                joined_at.push(start..joined.len());
            }
        }
        let fwd = std::mem::take(&mut self.fwd);
        let payload = |k: usize| -> &[u8] {
            match joined_at.get(k) {
                Some(r) if !r.is_empty() => &joined[r.clone()],
                _ => bytes(fwd[k].2),
            }
        };
        let mut own = std::mem::take(&mut self.own);
        own.clear();
        if self.sends_raw() {
            self.forward_raw(router, &fwd, &payload, &mut own);
        } else {
            own.resize(fwd.len(), true);
        }
        if own.contains(&true) {
            let mut out: Vec<(u32, OutMsg<'_>)> = fwd
                .iter()
                .enumerate()
                .zip(&own)
                .filter(|(_, own)| **own)
                .map(|((k, &(sock, to, _, _)), _)| {
                    (
                        sock,
                        OutMsg {
                            to,
                            from_ip: None,
                            bytes: payload(k),
                        },
                    )
                })
                .collect();
            // Stable: each socket's datagrams keep the order they were decided.
            out.sort_by_key(|(sock, _)| *sock);
            let (socks, msgs): (Vec<u32>, Vec<OutMsg<'_>>) = out.into_iter().unzip();
            let mut at = 0;
            for group in socks.chunk_by(|a, b| a == b) {
                let msgs = &msgs[at..at + group.len()];
                at += group.len();
                self.failed.clear();
                match router.sockets().fd(group[0]) {
                    Some(fd) => {
                        let mut gso = self.fwd_gso;
                        self.send(router, fd, msgs, &mut gso);
                        self.fwd_gso = gso;
                    }
                    None => self.failed.extend(0..msgs.len()),
                }
                for &f in &self.failed {
                    router.forward_failed(group[0], msgs[f].to, msgs[f].bytes.len());
                }
            }
        }
        self.own = own;
        self.fwd = fwd;
        self.joined = joined;
        self.joined_at = joined_at;
    }

    /// Sends what it can of `fwd` on the raw socket, in the order decided;
    /// marks in `own` the rest (no source address known, refused by the
    /// raw socket), for their own sockets. `payload(k)`: forward k's bytes.
    fn forward_raw<'p, O: Owners>(
        &mut self,
        router: &mut Router<O, Upstream>,
        fwd: &[(u32, SocketAddr, DatagramRef, Option<u32>)],
        payload: &dyn Fn(usize) -> &'p [u8],
        own: &mut Vec<bool>,
    ) {
        let now = router.now_ms();
        own.resize(fwd.len(), false);
        self.raw_src.clear();
        self.raw_of.clear();
        for (k, &(sock, to, _, _)) in fwd.iter().enumerate() {
            let src = if self.raw.carries(to.is_ipv4()) {
                router.sockets().source_toward(sock, to, now)
            } else {
                None
            };
            match src {
                Some(src) => {
                    self.raw_src.push(src);
                    self.raw_of.push(k);
                }
                None => own[k] = true,
            }
        }
        if self.raw_of.is_empty() {
            return;
        }
        self.failed.clear();
        let (raw_src, raw_of) = (&self.raw_src, &self.raw_of);
        self.raw.send(
            raw_of.len(),
            |i| RawMsg {
                src: raw_src[i],
                dst: fwd[raw_of[i]].1,
                bytes: payload(raw_of[i]),
            },
            &mut self.failed,
        );
        let sent = self.raw_of.len() - self.failed.len();
        router.counters.add(Counter::TxRaw, sent as u64);
        router
            .counters
            .add(Counter::TxRawRefused, self.failed.len() as u64);
        for &f in &self.failed {
            own[self.raw_of[f]] = true;
        }
    }

    /// Replies grouped by listener socket.
    fn replies<'a, O: Owners>(
        &mut self,
        router: &mut Router<O, Upstream>,
        listeners: &[Listener],
        actions: &[Action],
        bytes: &dyn Fn(DatagramRef) -> &'a [u8],
    ) {
        for (l, listener) in listeners.iter().enumerate() {
            let msgs: Vec<OutMsg<'a>> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Reply {
                        listener,
                        to,
                        from_ip,
                        datagram,
                    } if *listener == l => Some(OutMsg {
                        to: *to,
                        from_ip: *from_ip,
                        bytes: bytes(*datagram),
                    }),
                    _ => None,
                })
                .collect();
            if msgs.is_empty() {
                continue;
            }
            self.failed.clear();
            let mut gso = listener.gso.get();
            self.send(router, listener.socket.as_raw_fd(), &msgs, &mut gso);
            listener.gso.set(gso);
            for _ in &self.failed {
                router.reply_failed();
            }
        }
    }
}

/// The runs of a flush, each ending just past a control frame or a kept
/// descriptor (the last may end without one).
fn runs(actions: &mut [Action]) -> impl Iterator<Item = &mut [Action]> {
    actions.split_inclusive_mut(|a| matches!(a, Action::Control { .. } | Action::Keep { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(n: u32) -> Action {
        Action::Forward {
            sock: 0,
            to: "127.0.0.1:9".parse().unwrap(),
            datagram: DatagramRef(n),
            prefix: None,
        }
    }

    fn moved(n: u32) -> Action {
        Action::Control {
            to: 1,
            frame: Vec::new(),
            socks: Vec::new(),
            payload: Some(DatagramRef(n)),
        }
    }

    /// The length of each run.
    fn lengths(mut actions: Vec<Action>) -> Vec<usize> {
        runs(&mut actions).map(|run| run.len()).collect()
    }

    #[test]
    fn a_control_frame_ends_a_run_so_later_forwards_wait_for_it() {
        // A moved path's first datagram goes to its home in a frame; the
        // next ones, straight out: they must leave after the frame.
        let actions = vec![forward(0), moved(1), forward(2), forward(3)];
        assert_eq!(lengths(actions), vec![2, 2]);
        let kept = Action::Keep { index: 0, sock: 0 };
        assert_eq!(lengths(vec![kept, forward(0)]), vec![1, 1]);
    }

    #[test]
    fn a_flush_without_frames_is_one_run() {
        let handoff = Action::Handoff {
            to: 1,
            header: [0; udpshard_shared::handoff::HEADER_LEN],
            datagram: DatagramRef(1),
        };
        let actions = vec![forward(0), handoff, forward(2)];
        assert_eq!(lengths(actions), vec![3]);
        assert_eq!(lengths(Vec::new()), Vec::<usize>::new());
        assert_eq!(lengths(vec![moved(0)]), vec![1]);
    }
}
