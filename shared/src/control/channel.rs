//! One end of a control channel over a Unix stream socket: framed messages
//! with their descriptors (SCM_RIGHTS on a frame's first bytes), sends that
//! never wait (what the socket has no room for is queued, bounded), and
//! reads that return whole messages.

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use super::codec::{ControlError, ControlMsg, FrameReader};

/// One end of a control channel: framed messages with descriptors.
/// Sending never waits: what the socket has no room for is queued, in
/// order, and written by [`ControlChannel::flush`] when it has.
pub struct ControlChannel {
    pub stream: UnixStream,
    frames: FrameReader,
    fds: VecDeque<OwnedFd>,
    cmsg: Vec<u8>,
    out: VecDeque<Outgoing>,
    queued_bytes: usize,
}

/// A frame not yet written whole.
struct Outgoing {
    frame: Vec<u8>,
    sent: usize,
    /// Copies of its descriptors, so that it can wait; they go with its
    /// first byte.
    fds: Vec<OwnedFd>,
}

/// Bytes a channel may hold queued; past this, a send fails (the peer has
/// stopped reading): memory stays bounded.
pub const MAX_QUEUED_BYTES: usize = 4 << 20;

/// Descriptors one control read can carry (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;

impl ControlChannel {
    pub fn new(stream: UnixStream) -> ControlChannel {
        ControlChannel {
            stream,
            frames: FrameReader::default(),
            fds: VecDeque::new(),
            cmsg: nix::cmsg_space!([RawFd; MAX_FDS]),
            out: VecDeque::new(),
            queued_bytes: 0,
        }
    }

    /// Sends `msg` with `fds` attached, after what is queued: as much as
    /// the socket takes now, the rest queued for [`ControlChannel::flush`].
    /// Fails, queueing nothing, when the queue is full; fails when the peer
    /// is gone (what is queued then goes nowhere).
    pub fn send(&mut self, msg: &ControlMsg, fds: &[RawFd]) -> io::Result<()> {
        let frame = msg.encode();
        // One frame of any size may always wait (a large config); more only
        // within the bound.
        if !self.out.is_empty() && self.queued_bytes + frame.len() > MAX_QUEUED_BYTES {
            return Err(io::Error::other(format!(
                "control channel: {} bytes queued, the peer is not reading",
                self.queued_bytes
            )));
        }
        let fds = fds
            .iter()
            .map(|&fd| {
                // SAFETY: `fd` is open for the length of this call (the
                // caller's); the copy is ours.
                let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                borrowed.try_clone_to_owned()
            })
            .collect::<io::Result<Vec<OwnedFd>>>()?;
        self.queued_bytes += frame.len();
        self.out.push_back(Outgoing {
            frame,
            sent: 0,
            fds,
        });
        self.flush().map(|_| ())
    }

    /// Writes what is queued, as far as the socket takes it; true when
    /// nothing is left.
    pub fn flush(&mut self) -> io::Result<bool> {
        let fd = self.stream.as_raw_fd();
        while let Some(o) = self.out.front_mut() {
            let raw: Vec<RawFd> = o.fds.iter().map(|f| f.as_raw_fd()).collect();
            let cmsgs: &[ControlMessage<'_>] = &[ControlMessage::ScmRights(&raw)];
            let with = if o.sent == 0 && !raw.is_empty() {
                cmsgs
            } else {
                &[]
            };
            match sendmsg(
                fd,
                &[IoSlice::new(&o.frame[o.sent..])],
                with,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None::<&UnixAddr>,
            ) {
                Ok(n) => {
                    o.sent += n;
                    // The descriptors went with the first byte.
                    o.fds.clear();
                    if o.sent == o.frame.len() {
                        self.queued_bytes -= o.frame.len();
                        self.out.pop_front();
                    }
                }
                Err(Errno::EAGAIN) => return Ok(false),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Whether frames wait for room.
    pub fn has_queued(&self) -> bool {
        !self.out.is_empty()
    }

    /// Reads what has arrived; `Ok(false)` once the peer has closed.
    pub fn read_available(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 16384];
        loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut self.cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => msg,
                Err(Errno::EAGAIN) => return Ok(true),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        // SAFETY: the kernel just installed these
                        // descriptors in our table for us; nothing else
                        // owns them.
                        self.fds.extend(
                            fds.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
            }
            let n = msg.bytes;
            if n == 0 {
                return Ok(false);
            }
            self.frames.push(&buf[..n]);
        }
    }

    /// Waits up to `timeout` for the next message (before an event loop
    /// exists: a worker waiting for its config). Bytes that follow it stay
    /// buffered for [`ControlChannel::next_msg`].
    pub fn recv_timeout(
        &mut self,
        timeout: std::time::Duration,
    ) -> io::Result<(ControlMsg, Vec<OwnedFd>)> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(msg) = self.next_msg() {
                return msg.map_err(io::Error::other);
            }
            // What this end still has to say goes out meanwhile.
            let flags = if self.flush()? {
                PollFlags::POLLIN
            } else {
                PollFlags::POLLIN | PollFlags::POLLOUT
            };
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let wait = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.stream.as_fd(), flags)];
            match poll(&mut fds, wait) {
                Ok(0) => return Err(io::ErrorKind::TimedOut.into()),
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            if !self.read_available()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// The next whole message and the descriptors it announced.
    pub fn next_msg(&mut self) -> Option<Result<(ControlMsg, Vec<OwnedFd>), ControlError>> {
        let msg = match self.frames.next_msg()? {
            Ok(msg) => msg,
            Err(e) => return Some(Err(e)),
        };
        let want = match &msg {
            ControlMsg::Reload { fds, .. }
            | ControlMsg::Peers { fds }
            | ControlMsg::Standby { fds } => *fds as usize,
            ControlMsg::Quiesce { .. } => 1,
            _ => 0,
        };
        if self.fds.len() < want {
            return Some(Err(ControlError::MissingFds));
        }
        let fds = self.fds.drain(..want).collect();
        Some(Ok((msg, fds)))
    }
}

#[cfg(test)]
mod channel_tests {
    use super::*;

    #[test]
    fn recv_timeout_waits_times_out_and_keeps_what_follows() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut tx, mut rx) = (ControlChannel::new(a), ControlChannel::new(b));
        let short = std::time::Duration::from_millis(50);
        assert_eq!(
            rx.recv_timeout(short).unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        // Two messages in one burst: the second stays buffered, its
        // descriptor with it.
        let f = std::fs::File::open("/dev/null").unwrap();
        tx.send(
            &ControlMsg::Start {
                origin: "o".into(),
                config: "c".into(),
            },
            &[],
        )
        .unwrap();
        tx.send(&ControlMsg::Peers { fds: 1 }, &[f.as_raw_fd()])
            .unwrap();
        let (first, _) = rx.recv_timeout(short).unwrap();
        assert!(matches!(first, ControlMsg::Start { .. }));
        let (second, fds) = rx.recv_timeout(short).unwrap();
        assert_eq!((second, fds.len()), (ControlMsg::Peers { fds: 1 }, 1));
        drop(tx);
        assert_eq!(
            rx.recv_timeout(short).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn descriptors_travel_with_their_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut tx, mut rx) = (ControlChannel::new(a), ControlChannel::new(b));
        let f1 = std::fs::File::open("/dev/null").unwrap();
        let f2 = std::fs::File::open("/dev/zero").unwrap();
        tx.send(&ControlMsg::Ready, &[]).unwrap();
        tx.send(
            &ControlMsg::Reload {
                origin: "o".into(),
                config: "c".repeat(100_000),
                fds: 2,
            },
            &[f1.as_raw_fd(), f2.as_raw_fd()],
        )
        .unwrap();
        // The sender's copies: the originals may close while it waits.
        drop((f1, f2));
        let mut got = Vec::new();
        while got.len() < 2 {
            tx.flush().unwrap();
            rx.read_available().unwrap();
            while let Some(m) = rx.next_msg() {
                got.push(m.unwrap());
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, ControlMsg::Ready);
        assert!(
            matches!(&got[1].0, ControlMsg::Reload { config, fds: 2, .. } if config.len() == 100_000)
        );
        assert_eq!(got[1].1.len(), 2);
    }

    #[test]
    fn a_full_socket_queues_frames_in_order_and_a_send_never_waits() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut tx, mut rx) = (ControlChannel::new(a), ControlChannel::new(b));
        let big = "x".repeat(100_000);
        // Far more than the socket holds, with nobody reading: every send
        // returns, the rest waits in the queue.
        for i in 0..30 {
            let msg = ControlMsg::Start {
                origin: i.to_string(),
                config: big.clone(),
            };
            tx.send(&msg, &[]).unwrap();
        }
        assert!(tx.has_queued());
        let f = std::fs::File::open("/dev/null").unwrap();
        tx.send(&ControlMsg::Peers { fds: 1 }, &[f.as_raw_fd()])
            .unwrap();
        drop(f);
        // Past the bound, a send fails and queues nothing.
        let huge = ControlMsg::Start {
            origin: "huge".into(),
            config: "y".repeat(MAX_QUEUED_BYTES),
        };
        assert!(tx.send(&huge, &[]).is_err());
        let mut got = Vec::new();
        while got.len() < 31 {
            tx.flush().unwrap();
            rx.read_available().unwrap();
            while let Some(m) = rx.next_msg() {
                got.push(m.unwrap());
            }
        }
        assert!(tx.flush().unwrap(), "all written");
        for (i, (msg, _)) in got.iter().take(30).enumerate() {
            assert!(
                matches!(msg, ControlMsg::Start { origin, config } if *origin == i.to_string() && config.len() == 100_000),
                "frame {i} out of order or cut"
            );
        }
        assert_eq!(got[30].0, ControlMsg::Peers { fds: 1 });
        assert_eq!(got[30].1.len(), 1, "the descriptor came with its frame");
    }
}
