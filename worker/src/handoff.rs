//! Handoff sockets: every worker's inbox is a Unix datagram socket; every
//! worker holds a sending end to each inbox. Sends never block. A datagram
//! that finds an inbox full is dropped (counted as `drops.handoff`); a
//! control frame waits in a bounded queue and goes when there is room.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use udpshard_shared::handoff::{HEADER_LEN, MAX_TRANSFER_PATHS};

/// The largest UDP payload: nothing is ever truncated.
pub(crate) const MAX_DATAGRAM: usize = 65_536;

/// Control frames that may wait for room in an inbox, and their bytes;
/// past either the oldest go (a worker whose inbox stays full that long is
/// stuck or gone), counted.
const MAX_PENDING: usize = 1 << 16;
const MAX_PENDING_BYTES: usize = 16 << 20;
/// Room in a frame buffer for the largest control header (a transfer with
/// all its paths and aliases, or a moved path's header before the datagram
/// it carries).
const MAX_CONTROL_HEADER: usize = 4096;

/// A control frame waiting for room in worker `to`'s inbox.
struct Pending {
    to: usize,
    frame: Vec<u8>,
    /// It carries a client datagram: losing it loses the datagram.
    carries: bool,
}

pub(crate) struct Handoff {
    pub inbox: UnixDatagram,
    /// Sending ends, by worker id.
    peers: Vec<UnixDatagram>,
    /// During a binary upgrade, this worker's id and the inbox of the other
    /// generation of its slot (its successor, or its predecessor): frames
    /// to its own id go there; once it is gone (`None`), nowhere.
    twin: Option<(usize, Option<UnixDatagram>)>,
    cmsg: Vec<u8>,
    /// Control frames that found their inbox full, in order.
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// Control frames given up (the queue overflowed, or the send failed)
    /// since the last [`Handoff::take_outcomes`], and of them those that
    /// carried a client datagram.
    lost: u64,
    lost_datagrams: u64,
    /// Queued frames carrying a client datagram that went since then.
    sent_datagrams: u64,
}

/// What [`Handoff::send_control`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    Now,
    /// Queued behind a full inbox: it goes, or is given up, later.
    Queued,
}

/// What became of queued frames since the last [`Handoff::take_outcomes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Outcomes {
    /// Frames given up.
    pub lost: u64,
    /// Of them, those that carried a client datagram.
    pub lost_datagrams: u64,
    /// Frames carrying a client datagram that went.
    pub sent_datagrams: u64,
}

impl Handoff {
    pub(crate) fn new(inbox: UnixDatagram, peers: Vec<UnixDatagram>) -> io::Result<Handoff> {
        inbox.set_nonblocking(true)?;
        for p in &peers {
            p.set_nonblocking(true)?;
        }
        Ok(Handoff {
            inbox,
            peers,
            twin: None,
            cmsg: nix::cmsg_space!([RawFd; MAX_TRANSFER_PATHS]),
            pending: VecDeque::new(),
            pending_bytes: 0,
            lost: 0,
            lost_datagrams: 0,
            sent_datagrams: 0,
        })
    }

    /// The group was resized: these are every worker's inboxes now.
    pub(crate) fn set_peers(&mut self, peers: Vec<UnixDatagram>) -> io::Result<()> {
        for p in &peers {
            p.set_nonblocking(true)?;
        }
        self.peers = peers;
        Ok(())
    }

    /// Frames to worker `me` (this one) go to `twin` from now on: the
    /// inbox of the other generation of this slot (`None`: it is gone, and
    /// they fail, counted, rather than loop back into this inbox).
    pub(crate) fn set_twin(&mut self, me: usize, twin: Option<UnixDatagram>) -> io::Result<()> {
        if let Some(t) = &twin {
            t.set_nonblocking(true)?;
        }
        self.twin = Some((me, twin));
        Ok(())
    }

    fn peer(&self, to: usize) -> io::Result<RawFd> {
        if let Some((me, twin)) = &self.twin {
            if *me == to {
                return twin
                    .as_ref()
                    .map(|t| t.as_raw_fd())
                    .ok_or_else(|| io::Error::other("the other generation of this slot is gone"));
            }
        }
        self.peers
            .get(to)
            .map(|p| p.as_raw_fd())
            .ok_or_else(|| io::Error::other(format!("no handoff socket for worker {to}")))
    }

    /// Hands a client datagram to worker `to`.
    pub(crate) fn send_datagram(
        &self,
        to: usize,
        header: &[u8; HEADER_LEN],
        payload: &[u8],
    ) -> io::Result<()> {
        let iov = [IoSlice::new(header), IoSlice::new(payload)];
        sendmsg(
            self.peer(to)?,
            &iov,
            &[],
            MsgFlags::MSG_DONTWAIT,
            None::<&UnixAddr>,
        )?;
        Ok(())
    }

    /// Sends a control frame to worker `to`, `fds` beside it (`carries`:
    /// it holds a client datagram). A frame without descriptors that finds
    /// the inbox full is queued and goes later ([`Handoff::flush_pending`]);
    /// one with descriptors is not (they name sockets that may be gone by
    /// then), nor may it overtake what waits for that inbox: its error is
    /// returned.
    pub(crate) fn send_control(
        &mut self,
        to: usize,
        frame: Vec<u8>,
        fds: &[RawFd],
        carries: bool,
    ) -> io::Result<Sent> {
        if self.pending.iter().any(|p| p.to == to) {
            if !fds.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            // Keep the order: behind what already waits for this inbox.
            self.enqueue(to, frame, carries);
            return Ok(Sent::Queued);
        }
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(&frame)];
        match sendmsg(
            self.peer(to)?,
            &iov,
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
            None::<&UnixAddr>,
        ) {
            Ok(_) => Ok(Sent::Now),
            Err(nix::errno::Errno::EAGAIN) if fds.is_empty() => {
                self.enqueue(to, frame, carries);
                Ok(Sent::Queued)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn enqueue(&mut self, to: usize, frame: Vec<u8>, carries: bool) {
        while !self.pending.is_empty()
            && (self.pending.len() >= MAX_PENDING
                || self.pending_bytes + frame.len() > MAX_PENDING_BYTES)
        {
            if let Some(old) = self.pending.pop_front() {
                self.pending_bytes -= old.frame.len();
                self.give_up(&old);
            }
        }
        self.pending_bytes += frame.len();
        self.pending.push_back(Pending { to, frame, carries });
    }

    fn give_up(&mut self, p: &Pending) {
        self.lost += 1;
        self.lost_datagrams += u64::from(p.carries);
    }

    /// What became of queued frames since the last call.
    pub(crate) fn take_outcomes(&mut self) -> Outcomes {
        let out = Outcomes {
            lost: self.lost,
            lost_datagrams: self.lost_datagrams,
            sent_datagrams: self.sent_datagrams,
        };
        (self.lost, self.lost_datagrams, self.sent_datagrams) = (0, 0, 0);
        out
    }

    /// Sends what waits, in order, as far as the inboxes have room.
    pub(crate) fn flush_pending(&mut self) {
        let mut blocked: Vec<usize> = Vec::new();
        let mut keep = VecDeque::new();
        while let Some(p) = self.pending.pop_front() {
            if blocked.contains(&p.to) {
                keep.push_back(p);
                continue;
            }
            self.pending_bytes -= p.frame.len();
            let Ok(fd) = self.peer(p.to) else {
                // The worker is gone with its slot (the group shrank).
                self.give_up(&p);
                continue;
            };
            let iov = [IoSlice::new(&p.frame)];
            match sendmsg(fd, &iov, &[], MsgFlags::MSG_DONTWAIT, None::<&UnixAddr>) {
                Ok(_) => self.sent_datagrams += u64::from(p.carries),
                Err(nix::errno::Errno::EAGAIN) => {
                    blocked.push(p.to);
                    self.pending_bytes += p.frame.len();
                    keep.push_back(p);
                }
                Err(_) => self.give_up(&p),
            }
        }
        self.pending = keep;
    }

    /// Whether control frames wait for room.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A buffer that holds any frame.
    pub(crate) fn frame_buffer() -> Vec<u8> {
        vec![0; HEADER_LEN.max(MAX_CONTROL_HEADER) + MAX_DATAGRAM]
    }

    /// Reads one frame into `frame` (a [`Handoff::frame_buffer`]): its
    /// length and the descriptors that came with it. `Ok(None)` when the
    /// inbox is empty.
    pub(crate) fn recv(&mut self, frame: &mut [u8]) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
        let mut iov = [IoSliceMut::new(frame)];
        let msg = match recvmsg::<()>(
            self.inbox.as_raw_fd(),
            &mut iov,
            Some(&mut self.cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel just installed this descriptor
                        // in our table for us (SCM_RIGHTS); nothing else
                        // owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        // Descriptors that did not fit (MSG_CTRUNC) were closed by the
        // kernel: the frame then counts fewer than it announces. A frame
        // cut short (it cannot be, with a frame buffer) reads as empty: a
        // bad frame, never a shortened datagram.
        if msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Ok(Some((0, fds)));
        }
        Ok(Some((msg.bytes, fds)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_descriptors_cross_and_a_full_inbox_queues_control() {
        let (inbox, tx) = UnixDatagram::pair().unwrap();
        socket2::SockRef::from(&tx)
            .set_send_buffer_size(4096)
            .unwrap();
        let mut rx = Handoff::new(inbox, vec![]).unwrap();
        let mut frame = Handoff::frame_buffer();
        let (other, _) = UnixDatagram::pair().unwrap();
        let mut h = Handoff::new(other, vec![tx]).unwrap();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        h.send_control(0, b"with fd".to_vec(), &[sock.as_raw_fd()], false)
            .unwrap();
        let (n, fds) = rx.recv(&mut frame).unwrap().unwrap();
        assert_eq!((&frame[..n], fds.len()), (&b"with fd"[..], 1));
        // Fill the inbox, then queue control frames behind it.
        let header = [1u8; HEADER_LEN];
        let mut sent = 0;
        while h.send_datagram(0, &header, &[0u8; 512]).is_ok() {
            sent += 1;
        }
        assert!(sent > 0);
        let queued = h.send_control(0, b"later 1".to_vec(), &[], false);
        assert_eq!(queued.unwrap(), Sent::Queued);
        h.send_control(0, b"later 2".to_vec(), &[], true).unwrap();
        assert!(h.has_pending());
        // Descriptors do not overtake what waits: refused, to be retried.
        let err = h
            .send_control(0, b"fd".to_vec(), &[sock.as_raw_fd()], false)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let mut datagrams = 0;
        while let Some((n, _)) = rx.recv(&mut frame).unwrap() {
            assert_eq!(n, HEADER_LEN + 512);
            datagrams += 1;
        }
        assert_eq!(datagrams, sent);
        h.flush_pending();
        assert!(!h.has_pending());
        let (n, _) = rx.recv(&mut frame).unwrap().unwrap();
        assert_eq!(&frame[..n], b"later 1", "in order");
        let (n, _) = rx.recv(&mut frame).unwrap().unwrap();
        assert_eq!(&frame[..n], b"later 2");
        let went = Outcomes {
            sent_datagrams: 1,
            ..Outcomes::default()
        };
        assert_eq!(h.take_outcomes(), went, "the datagram it carried went");
    }

    #[test]
    fn the_pending_queue_is_bounded_in_bytes_and_counts_what_it_gives_up() {
        let (inbox, tx) = UnixDatagram::pair().unwrap();
        socket2::SockRef::from(&tx)
            .set_send_buffer_size(4096)
            .unwrap();
        let (other, _) = UnixDatagram::pair().unwrap();
        let mut h = Handoff::new(other, vec![tx]).unwrap();
        let header = [1u8; HEADER_LEN];
        while h.send_datagram(0, &header, &[0u8; 512]).is_ok() {}
        // 2 KiB frames: the queue holds 16 MiB of them; one more pushes the
        // first out.
        let frame = vec![7u8; 2048];
        let fit = MAX_PENDING_BYTES / frame.len();
        for n in 0..=fit {
            h.send_control(0, frame.clone(), &[], n == 0).unwrap();
        }
        let lost = Outcomes {
            lost: 1,
            lost_datagrams: 1,
            sent_datagrams: 0,
        };
        assert_eq!(h.take_outcomes(), lost, "one frame, carrying a datagram");
        assert_eq!(h.take_outcomes(), Outcomes::default(), "taken once");
        assert_eq!(h.pending_bytes, MAX_PENDING_BYTES);
        drop(inbox);
        // The inbox is gone: what waits is given up, counted.
        h.flush_pending();
        let given_up = h.take_outcomes();
        assert_eq!((given_up.lost, given_up.lost_datagrams), (fit as u64, 0));
        assert!(!h.has_pending());
        assert_eq!(h.pending_bytes, 0);
    }
}
