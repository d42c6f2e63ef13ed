//! Handoff sockets: every worker's inbox is a Unix datagram socket; every
//! worker holds a sending end to each inbox. Sends never block: a full
//! inbox drops the datagram, counted as `drops.handoff` by the caller.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use udpshard_shared::handoff::{Header, Transfer, HEADER_LEN};

use crate::datapath::MAX_DATAGRAM;

pub struct Handoff {
    pub inbox: UnixDatagram,
    /// Sending ends, by worker id.
    peers: Vec<UnixDatagram>,
    /// One received frame.
    pub frame: Vec<u8>,
    cmsg: Vec<u8>,
    scratch: Vec<u8>,
}

impl Handoff {
    pub fn new(inbox: UnixDatagram, peers: Vec<UnixDatagram>) -> io::Result<Handoff> {
        inbox.set_nonblocking(true)?;
        for p in &peers {
            p.set_nonblocking(true)?;
        }
        Ok(Handoff {
            inbox,
            peers,
            frame: vec![0; HEADER_LEN + MAX_DATAGRAM],
            cmsg: nix::cmsg_space!([RawFd; 1]),
            scratch: Vec::with_capacity(256),
        })
    }

    /// The group was resized: these are every worker's inboxes now.
    pub fn set_peers(&mut self, peers: Vec<UnixDatagram>) -> io::Result<()> {
        for p in &peers {
            p.set_nonblocking(true)?;
        }
        self.peers = peers;
        Ok(())
    }

    fn peer(&self, to: usize) -> io::Result<RawFd> {
        self.peers
            .get(to)
            .map(|p| p.as_raw_fd())
            .ok_or_else(|| io::Error::other(format!("no handoff socket for worker {to}")))
    }

    /// Hands a client datagram to worker `to`.
    pub fn send_datagram(&self, to: usize, header: &Header, payload: &[u8]) -> io::Result<()> {
        let head = header.encode();
        let iov = [IoSlice::new(&head), IoSlice::new(payload)];
        sendmsg(
            self.peer(to)?,
            &iov,
            &[],
            MsgFlags::MSG_DONTWAIT,
            None::<&UnixAddr>,
        )?;
        Ok(())
    }

    /// Sends a session to worker `to`, its upstream socket beside it.
    pub fn send_transfer(
        &mut self,
        to: usize,
        header: &Header,
        transfer: &Transfer,
        fd: RawFd,
    ) -> io::Result<()> {
        self.scratch.clear();
        self.scratch.extend_from_slice(&header.encode());
        transfer.encode(&mut self.scratch);
        let fds = [fd];
        let iov = [IoSlice::new(&self.scratch)];
        sendmsg(
            self.peer(to)?,
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_DONTWAIT,
            None::<&UnixAddr>,
        )?;
        Ok(())
    }

    /// Reads one frame into `self.frame`: its length and any descriptor
    /// that came with it. `Ok(None)` when the inbox is empty.
    pub fn recv(&mut self) -> io::Result<Option<(usize, Option<OwnedFd>)>> {
        let mut iov = [IoSliceMut::new(&mut self.frame)];
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
        let mut fd = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for raw in fds {
                        // SAFETY: the kernel just installed this descriptor
                        // in our table for us (SCM_RIGHTS); nothing else
                        // owns it. Extra ones (never sent) are closed.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        if fd.is_none() {
                            fd = Some(owned);
                        }
                    }
                }
            }
        }
        Ok(Some((msg.bytes, fd)))
    }
}
