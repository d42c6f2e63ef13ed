//! Supervisor <-> worker control messages over a Unix stream socketpair.
//!
//! Frames are `u32 LE length | u8 tag | body`; strings inside a body are
//! `u32 LE length | UTF-8`; numbers are LE. The codec is pure (bytes in,
//! messages out) so both ends can run it non-blocking in their event loops.
//! Messages that carry descriptors (`Reload`, `Peers`) say how many; the
//! descriptors travel as SCM_RIGHTS on the frame's first bytes, so a reader
//! has them by the time it decodes the frame ([`ControlChannel`]).

/// No control message comes near this; a larger length means a corrupt stream.
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMsg {
    /// Supervisor -> worker: the config to serve (TOML text and where it came
    /// from, for error messages). Listener sockets were inherited in the
    /// order of the config's listeners.
    Start { origin: String, config: String },
    /// Worker -> supervisor: every listener is registered, serving.
    Ready,
    /// Supervisor -> worker: stop reading clients, exit.
    Stop,
    /// Supervisor -> worker: serve this config from now on; the worker's
    /// socket of each listener, in config order, comes with it (`fds` of them).
    Reload {
        origin: String,
        config: String,
        fds: u32,
    },
    /// Supervisor -> worker: the sending ends of every worker's handoff
    /// inbox, by worker id, come with it (the group was resized).
    Peers { fds: u32 },
    /// Supervisor -> worker: take no new flows; keep serving live sessions
    /// for at most `timeout_ms`, then exit.
    Drain { timeout_ms: u64 },
    /// Worker -> supervisor: a `Reload` is applied.
    Reloaded,
    /// Supervisor -> worker: the answer to `Ready`: the slot is published as
    /// ready (its generation and state are the supervisor's word), so other
    /// workers take its ownership entries as live. Only then does it serve.
    Live,
    /// Supervisor -> worker, during a binary upgrade: stop reading the
    /// listener sockets (the new generation will); the sending end of the
    /// inbox of this slot's successor, generation `generation`, comes with it.
    Quiesce { generation: u64 },
    /// Worker -> supervisor: it reads no listener socket any more.
    Quiesced,
    /// Supervisor -> worker: hand every session, with its upstream sockets,
    /// to the successor named by `Quiesce`.
    HandOver,
    /// Worker -> supervisor: every session is handed over (`left` could not
    /// be: the successor refused them); it waits for `Stop`.
    HandedOver { left: u64 },
    /// Old supervisor -> new supervisor: what the new one inherits (a JSON
    /// object naming the inherited descriptors).
    Inherit { state: String },
    /// New supervisor -> old: its workers stand by, unread listeners; the
    /// sending ends of their inboxes, by slot, come with it (`fds` of them).
    Standby { fds: u32 },
    /// Old supervisor -> new: every old worker has handed over and exited;
    /// their slots are the new generation's.
    Handed,
    /// New supervisor -> old: it serves, and is the service's main process.
    Took,
    /// Supervisor -> a quiesced worker: the upgrade is given up; read the
    /// listeners again and serve on (sessions on offer stay).
    Resume,
    /// Old supervisor -> new, then new supervisor -> its workers: the old
    /// workers read no listener any more; the standby workers read them
    /// from now on (a datagram of a session not yet handed over goes to the
    /// old worker of its slot).
    ReadListeners,
    /// New supervisor -> old: it cannot take over, and why.
    UpgradeFailed { why: String },
}

const TAG_START: u8 = 1;
const TAG_READY: u8 = 2;
const TAG_STOP: u8 = 4;
const TAG_RELOAD: u8 = 5;
const TAG_PEERS: u8 = 6;
const TAG_DRAIN: u8 = 7;
const TAG_RELOADED: u8 = 8;
const TAG_LIVE: u8 = 9;
const TAG_QUIESCE: u8 = 10;
const TAG_QUIESCED: u8 = 11;
const TAG_HAND_OVER: u8 = 12;
const TAG_HANDED_OVER: u8 = 13;
const TAG_INHERIT: u8 = 14;
const TAG_STANDBY: u8 = 15;
const TAG_HANDED: u8 = 16;
const TAG_TOOK: u8 = 17;
const TAG_UPGRADE_FAILED: u8 = 18;
const TAG_READ_LISTENERS: u8 = 19;
const TAG_RESUME: u8 = 20;

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("control message announced descriptors that did not arrive")]
    MissingFds,
    #[error("control frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unknown control message tag {0}")]
    UnknownTag(u8),
    #[error("malformed control message body")]
    BadBody,
}

impl ControlMsg {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let tag = match self {
            ControlMsg::Start { origin, config } => {
                put_str(&mut body, origin);
                put_str(&mut body, config);
                TAG_START
            }
            ControlMsg::Ready => TAG_READY,
            ControlMsg::Stop => TAG_STOP,
            ControlMsg::Reload {
                origin,
                config,
                fds,
            } => {
                put_str(&mut body, origin);
                put_str(&mut body, config);
                body.extend_from_slice(&fds.to_le_bytes());
                TAG_RELOAD
            }
            ControlMsg::Peers { fds } => {
                body.extend_from_slice(&fds.to_le_bytes());
                TAG_PEERS
            }
            ControlMsg::Drain { timeout_ms } => {
                body.extend_from_slice(&timeout_ms.to_le_bytes());
                TAG_DRAIN
            }
            ControlMsg::Reloaded => TAG_RELOADED,
            ControlMsg::Live => TAG_LIVE,
            ControlMsg::Quiesce { generation } => {
                body.extend_from_slice(&generation.to_le_bytes());
                TAG_QUIESCE
            }
            ControlMsg::Quiesced => TAG_QUIESCED,
            ControlMsg::HandOver => TAG_HAND_OVER,
            ControlMsg::HandedOver { left } => {
                body.extend_from_slice(&left.to_le_bytes());
                TAG_HANDED_OVER
            }
            ControlMsg::Inherit { state } => {
                put_str(&mut body, state);
                TAG_INHERIT
            }
            ControlMsg::Standby { fds } => {
                body.extend_from_slice(&fds.to_le_bytes());
                TAG_STANDBY
            }
            ControlMsg::Handed => TAG_HANDED,
            ControlMsg::Took => TAG_TOOK,
            ControlMsg::ReadListeners => TAG_READ_LISTENERS,
            ControlMsg::Resume => TAG_RESUME,
            ControlMsg::UpgradeFailed { why } => {
                put_str(&mut body, why);
                TAG_UPGRADE_FAILED
            }
        };
        let mut frame = Vec::with_capacity(5 + body.len());
        frame.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
        frame.push(tag);
        frame.extend_from_slice(&body);
        frame
    }

    fn decode(tag: u8, mut body: &[u8]) -> Result<ControlMsg, ControlError> {
        let msg = match tag {
            TAG_START => ControlMsg::Start {
                origin: take_str(&mut body)?,
                config: take_str(&mut body)?,
            },
            TAG_READY => ControlMsg::Ready,
            TAG_STOP => ControlMsg::Stop,
            TAG_RELOAD => ControlMsg::Reload {
                origin: take_str(&mut body)?,
                config: take_str(&mut body)?,
                fds: u32::from_le_bytes(take_array(&mut body)?),
            },
            TAG_PEERS => ControlMsg::Peers {
                fds: u32::from_le_bytes(take_array(&mut body)?),
            },
            TAG_DRAIN => ControlMsg::Drain {
                timeout_ms: u64::from_le_bytes(take_array(&mut body)?),
            },
            TAG_RELOADED => ControlMsg::Reloaded,
            TAG_LIVE => ControlMsg::Live,
            TAG_QUIESCE => ControlMsg::Quiesce {
                generation: u64::from_le_bytes(take_array(&mut body)?),
            },
            TAG_QUIESCED => ControlMsg::Quiesced,
            TAG_HAND_OVER => ControlMsg::HandOver,
            TAG_HANDED_OVER => ControlMsg::HandedOver {
                left: u64::from_le_bytes(take_array(&mut body)?),
            },
            TAG_INHERIT => ControlMsg::Inherit {
                state: take_str(&mut body)?,
            },
            TAG_STANDBY => ControlMsg::Standby {
                fds: u32::from_le_bytes(take_array(&mut body)?),
            },
            TAG_HANDED => ControlMsg::Handed,
            TAG_TOOK => ControlMsg::Took,
            TAG_READ_LISTENERS => ControlMsg::ReadListeners,
            TAG_RESUME => ControlMsg::Resume,
            TAG_UPGRADE_FAILED => ControlMsg::UpgradeFailed {
                why: take_str(&mut body)?,
            },
            other => return Err(ControlError::UnknownTag(other)),
        };
        if !body.is_empty() {
            return Err(ControlError::BadBody);
        }
        Ok(msg)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn take_array<const N: usize>(body: &mut &[u8]) -> Result<[u8; N], ControlError> {
    let bytes: [u8; N] = body
        .get(..N)
        .and_then(|b| b.try_into().ok())
        .ok_or(ControlError::BadBody)?;
    *body = &body[N..];
    Ok(bytes)
}

fn take_str(body: &mut &[u8]) -> Result<String, ControlError> {
    let len_bytes: [u8; 4] = body
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(ControlError::BadBody)?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    let bytes = body.get(4..4 + len).ok_or(ControlError::BadBody)?;
    let s = std::str::from_utf8(bytes).map_err(|_| ControlError::BadBody)?;
    *body = &body[4 + len..];
    Ok(s.to_owned())
}

/// Accumulates stream bytes and yields whole messages.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one has arrived.
    pub fn next_msg(&mut self) -> Option<Result<ControlMsg, ControlError>> {
        let len_bytes: [u8; 4] = self.buf.get(..4)?.try_into().ok()?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len == 0 || len > MAX_FRAME {
            self.buf.clear();
            return Some(Err(ControlError::TooLarge(len)));
        }
        if self.buf.len() < 4 + len {
            return None;
        }
        let msg = ControlMsg::decode(self.buf[4], &self.buf[5..4 + len]);
        self.buf.drain(..4 + len);
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_byte_by_byte() {
        let msgs = [
            ControlMsg::Start {
                origin: "/etc/udpshard/udpshard.toml".into(),
                config: "workers = 2\nname = \"héllo\"\n".into(),
            },
            ControlMsg::Ready,
            ControlMsg::Stop,
            ControlMsg::Reload {
                origin: "f.toml".into(),
                config: "x = 1".into(),
                fds: 3,
            },
            ControlMsg::Peers { fds: 2 },
            ControlMsg::Drain { timeout_ms: 5000 },
            ControlMsg::Reloaded,
            ControlMsg::Live,
            ControlMsg::Quiesce { generation: 7 },
            ControlMsg::Quiesced,
            ControlMsg::HandOver,
            ControlMsg::HandedOver { left: 2 },
            ControlMsg::Inherit {
                state: "{\"protocol\": 1}".into(),
            },
            ControlMsg::Standby { fds: 2 },
            ControlMsg::Handed,
            ControlMsg::Took,
            ControlMsg::ReadListeners,
            ControlMsg::Resume,
            ControlMsg::UpgradeFailed { why: "no".into() },
        ];
        let stream: Vec<u8> = msgs.iter().flat_map(|m| m.encode()).collect();
        let mut reader = FrameReader::default();
        let mut got = Vec::new();
        for b in stream {
            reader.push(&[b]);
            while let Some(m) = reader.next_msg() {
                got.push(m.unwrap());
            }
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn rejects_garbage() {
        let mut r = FrameReader::default();
        r.push(&[2, 0, 0, 0, 99, 0]);
        assert_eq!(r.next_msg(), Some(Err(ControlError::UnknownTag(99))));
        r.push(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(r.next_msg(), Some(Err(ControlError::TooLarge(_)))));
        r.push(&[3, 0, 0, 0, TAG_START, 9, 9]);
        assert_eq!(r.next_msg(), Some(Err(ControlError::BadBody)));
    }
}

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
