//! Batched datagram I/O (`recvmmsg`/`sendmmsg`) over a fixed set of buffers, for the sink and
//! the socket-floor proxy. The two syscalls are the only `unsafe` in the load generator.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

/// `capacity` datagram slots of `slot_size` bytes each, with the headers the kernel fills.
///
/// Holds raw pointers into its own buffers, so it is neither `Send` nor `Sync`: create it on
/// the thread that uses it.
pub struct Batch {
    bufs: Vec<u8>,
    slot_size: usize,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// Length of each datagram of the last receive (at most `slot_size`).
    lens: Vec<usize>,
    /// The sender of each datagram of the last receive, for [`Batch::send_back`].
    names: Vec<libc::sockaddr_storage>,
    /// Datagrams held after the last [`Batch::recv`].
    len: usize,
}

#[derive(Clone, Copy)]
enum Io {
    Recv,
    Send,
    /// Each datagram to the address it came from.
    SendBack,
}

impl Batch {
    pub fn new(capacity: usize, slot_size: usize) -> Batch {
        let capacity = capacity.clamp(1, 1024);
        let slot_size = slot_size.max(1);
        let iov = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        let hdr = libc::mmsghdr {
            msg_hdr: libc::msghdr {
                msg_name: ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: ptr::null_mut(),
                msg_iovlen: 0,
                msg_control: ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            },
            msg_len: 0,
        };
        Batch {
            bufs: vec![0; capacity * slot_size],
            slot_size,
            iovs: vec![iov; capacity],
            hdrs: vec![hdr; capacity],
            lens: vec![0; capacity],
            // SAFETY: an all-zero sockaddr_storage is a valid (AF_UNSPEC) value.
            names: vec![unsafe { std::mem::zeroed() }; capacity],
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Datagrams received by the last [`Batch::recv`].
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the batch, to fill it with [`Batch::push_with`].
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends a datagram of `len` bytes (at most the slot size) written by `fill` into its
    /// slot; `None` when the batch is full or `fill` fails.
    pub fn push_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Option<()>,
    ) -> Option<()> {
        if self.len >= self.capacity() || len > self.slot_size {
            return None;
        }
        let start = self.len * self.slot_size;
        fill(&mut self.bufs[start..start + len])?;
        self.lens[self.len] = len;
        self.len += 1;
        Some(())
    }

    /// Datagram `i` of the last receive (truncated to the slot size), empty if out of range.
    pub fn datagram(&self, i: usize) -> &[u8] {
        if i >= self.len {
            return &[];
        }
        let start = i * self.slot_size;
        &self.bufs[start..start + self.lens[i]]
    }

    /// Points header `i` at slot `i` with no control data: the whole slot and room for the
    /// sender's address when receiving, the received length when sending (to the address
    /// received with it for [`Io::SendBack`], none otherwise).
    fn aim(&mut self, count: usize, io: Io) {
        let base = self.bufs.as_mut_ptr();
        for i in 0..count {
            let iov = &mut self.iovs[i];
            // `wrapping_add` keeps this safe code; the offset is inside `bufs` by construction.
            iov.iov_base = base.wrapping_add(i * self.slot_size).cast();
            iov.iov_len = match io {
                Io::Recv => self.slot_size,
                Io::Send | Io::SendBack => self.lens[i],
            };
            let hdr = &mut self.hdrs[i];
            match io {
                Io::Recv => {
                    hdr.msg_hdr.msg_name =
                        (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                    hdr.msg_hdr.msg_namelen =
                        std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                }
                // The kernel left msg_namelen at the sender's address length.
                Io::SendBack => {
                    hdr.msg_hdr.msg_name =
                        (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                }
                Io::Send => {
                    hdr.msg_hdr.msg_name = ptr::null_mut();
                    hdr.msg_hdr.msg_namelen = 0;
                }
            }
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
    }

    /// Receives up to `capacity` datagrams with one `recvmmsg`, waiting for the first one as
    /// the socket's blocking mode and `SO_RCVTIMEO` allow and taking the rest only if already
    /// queued (`MSG_WAITFORONE`). Returns how many arrived.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.len = 0;
        let capacity = self.capacity();
        self.aim(capacity, Io::Recv);
        // SAFETY: `aim` just pointed each of the `capacity` headers at its own iovec and its
        // own sockaddr_storage (with its size), and each iovec at its own `slot_size`-byte slot
        // inside `self.bufs`; none of the four vectors is touched until the call returns, and
        // `fd` is a live descriptor for the call.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                capacity as libc::c_uint,
                libc::MSG_WAITFORONE,
                ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (len, hdr) in self.lens.iter_mut().zip(&self.hdrs).take(n) {
            *len = (hdr.msg_len as usize).min(self.slot_size);
        }
        self.len = n;
        Ok(n)
    }

    /// Sends the datagrams held (the last receive, or what was pushed) on the connected socket
    /// `fd`, with as many `sendmmsg` calls as the kernel needs. Stops at the first error:
    /// returns how many were sent and the error, if any.
    pub fn send_connected(&mut self, fd: BorrowedFd<'_>) -> (usize, Option<io::Error>) {
        self.send(fd, Io::Send)
    }

    /// Sends each datagram of the last receive back to its sender on `fd` (an echo), as
    /// [`Batch::send_connected`] does.
    pub fn send_back(&mut self, fd: BorrowedFd<'_>) -> (usize, Option<io::Error>) {
        self.send(fd, Io::SendBack)
    }

    fn send(&mut self, fd: BorrowedFd<'_>, io: Io) -> (usize, Option<io::Error>) {
        let count = self.len;
        self.aim(count, io);
        let mut sent = 0;
        while sent < count {
            // SAFETY: `aim` pointed headers `0..count` at their own iovecs and slots inside
            // `self` (and, for a send back, at their own sockaddr_storage with the length the
            // kernel wrote there), which stays untouched during the call; the call reads
            // `count - sent` headers starting at `sent`, all within `self.hdrs`.
            let n = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.hdrs.as_mut_ptr().add(sent),
                    (count - sent) as libc::c_uint,
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return (sent, Some(err));
            }
            sent += n as usize;
        }
        (sent, None)
    }
}
