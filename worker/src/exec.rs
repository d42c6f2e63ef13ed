//! Turns the router's actions into syscalls, batched: the forwards of a
//! flush go out as raw IP packets in one sendmmsg where the worker has a raw
//! socket ([`crate::rawtx`]), else every datagram for one upstream socket in
//! one sendmmsg (each with its own destination); every reply of one listener
//! in one sendmmsg (each with its own client and source address). Frames between workers go one by one, in
//! the order they were decided. Failed sends are reported back to the
//! router, which counts them.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::handoff::Handoff;
use udpshard_shared::clock::monotonic_ms;
use udpshard_shared::stats::Counter;

use crate::listener::Listener;
use crate::rawtx::{RawMsg, RawTx};
use crate::router::{Action, DatagramRef, Owners, Router};
use crate::sockio::{send_batch, OutMsg, SendBatch};
use crate::upstream::Upstream;

/// Reusable buffers for one flush.
pub struct Executor {
    actions: Vec<Action>,
    failed: Vec<usize>,
    send: SendBatch,
    raw: RawTx,
}

impl Executor {
    /// Forwards through `raw` where it carries their family.
    pub fn new(raw: RawTx) -> Executor {
        Executor {
            actions: Vec::new(),
            failed: Vec::new(),
            send: SendBatch::default(),
            raw,
        }
    }

    /// Whether forwards go out as raw IP packets (some family at least).
    pub fn sends_raw(&self) -> bool {
        self.raw.is_on()
    }

    pub fn set_raw(&mut self, raw: RawTx) {
        self.raw = raw;
    }

    /// Executes every action the router has decided. `bytes` resolves a
    /// datagram the actions name; `fds` are the descriptors that came with
    /// the frame just read (taken by `Keep`).
    pub fn flush<'a, O: Owners>(
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
        self.forwards(router, bytes);
        self.replies(router, listeners, bytes);
        for action in std::mem::take(&mut self.actions) {
            match action {
                Action::Handoff {
                    to,
                    header,
                    datagram,
                } => {
                    if handoff.send_datagram(to, &header, bytes(datagram)).is_err() {
                        router.handoff_failed();
                    }
                }
                Action::Control {
                    to,
                    mut frame,
                    socks,
                    payload,
                } => {
                    let raw: Vec<_> = socks
                        .iter()
                        .filter_map(|s| router.sockets().fd(*s))
                        .collect();
                    if let Some(d) = payload {
                        frame.extend_from_slice(bytes(d));
                    }
                    let sent = raw.len() == socks.len()
                        && handoff
                            .send_control(to, frame.clone(), &raw, payload.is_some())
                            .is_ok();
                    if !sent {
                        match payload {
                            Some(_) => router.handoff_failed(),
                            None => router.transfer_failed(&frame),
                        }
                    }
                }
                Action::Keep { index, sock } => {
                    if let Some(fd) = fds.get_mut(index).and_then(Option::take) {
                        router.sockets().keep(sock, fd);
                    }
                }
                Action::Forward { .. } | Action::Reply { .. } => {}
            }
        }
    }

    /// Forwards grouped by upstream socket, in the order decided within each.
    fn forwards<'a, O: Owners>(
        &mut self,
        router: &mut Router<O, Upstream>,
        bytes: &dyn Fn(DatagramRef) -> &'a [u8],
    ) {
        let mut out: Vec<(u32, OutMsg<'a>)> = self
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Forward { sock, to, datagram } => Some((
                    *sock,
                    OutMsg {
                        to: *to,
                        from_ip: None,
                        bytes: bytes(*datagram),
                    },
                )),
                _ => None,
            })
            .collect();
        if self.raw.is_on() {
            out = self.forward_raw(router, out);
        }
        // Stable: each socket's datagrams keep the order they were decided.
        out.sort_by_key(|(sock, _)| *sock);
        let (socks, msgs): (Vec<u32>, Vec<OutMsg<'a>>) = out.into_iter().unzip();
        let mut at = 0;
        for group in socks.chunk_by(|a, b| a == b) {
            let msgs = &msgs[at..at + group.len()];
            at += group.len();
            self.failed.clear();
            match router.sockets().fd(group[0]) {
                Some(fd) => send_batch(fd, msgs, &mut self.send, &mut self.failed),
                None => self.failed.extend(0..msgs.len()),
            }
            for &f in &self.failed {
                router.forward_failed(msgs[f].bytes.len());
            }
        }
    }

    /// Sends what it can of `out` on the raw socket, in the order decided;
    /// returns the rest (no source address known, refused by the raw
    /// socket) for their own sockets.
    fn forward_raw<'a, O: Owners>(
        &mut self,
        router: &mut Router<O, Upstream>,
        out: Vec<(u32, OutMsg<'a>)>,
    ) -> Vec<(u32, OutMsg<'a>)> {
        let now = monotonic_ms();
        let mut raw: Vec<RawMsg<'a>> = Vec::with_capacity(out.len());
        let mut raw_of: Vec<usize> = Vec::with_capacity(out.len());
        let mut own = vec![false; out.len()];
        for (k, (sock, m)) in out.iter().enumerate() {
            let src = if self.raw.carries(m.to.is_ipv4()) {
                router.sockets().source_toward(*sock, m.to, now)
            } else {
                None
            };
            match src {
                Some(src) => {
                    raw.push(RawMsg {
                        src,
                        dst: m.to,
                        bytes: m.bytes,
                    });
                    raw_of.push(k);
                }
                None => own[k] = true,
            }
        }
        if !raw.is_empty() {
            self.failed.clear();
            self.raw.send(&raw, &mut self.failed);
            let sent = raw.len() - self.failed.len();
            router.counters.add(Counter::TxRaw, sent as u64);
            for &f in &self.failed {
                own[raw_of[f]] = true;
            }
        }
        out.into_iter()
            .zip(own)
            .filter_map(|(o, own)| own.then_some(o))
            .collect()
    }

    /// Replies grouped by listener socket.
    fn replies<'a, O: Owners>(
        &mut self,
        router: &mut Router<O, Upstream>,
        listeners: &[Listener],
        bytes: &dyn Fn(DatagramRef) -> &'a [u8],
    ) {
        for (l, listener) in listeners.iter().enumerate() {
            let msgs: Vec<OutMsg<'a>> = self
                .actions
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
            send_batch(
                listener.socket.as_raw_fd(),
                &msgs,
                &mut self.send,
                &mut self.failed,
            );
            for _ in &self.failed {
                router.reply_failed();
            }
        }
    }
}
