//! A listener socket as a worker holds it: its inherited socket of the
//! listener's reuseport group, kept across reloads. Its routing lives in
//! the router ([`crate::router::Route`]).

use std::cell::Cell;
use std::net::UdpSocket;

use quinn_udp::{UdpSockRef, UdpSocketState};
use udpshard_config as config;

use crate::{sockio, WorkerError};

pub(crate) struct Listener {
    pub name: String,
    /// This worker's socket of the listener's reuseport group.
    pub socket: UdpSocket,
    /// The socket's inode: the same socket passed again on reload is
    /// recognised and kept, with its sessions.
    pub inode: u64,
    pub io: UdpSocketState,
    /// Bound to 0.0.0.0 or [::]: a reply must leave from the address the
    /// client wrote to (IP_PKTINFO).
    pub wildcard: bool,
    /// Whether replies go out in UDP_SEGMENT runs: off for good once a
    /// device refused one.
    pub gso: Cell<sockio::Gso>,
    /// The kernel stamps each datagram's arrival (`queue_delay`).
    pub stamped: bool,
}

impl Listener {
    pub(crate) fn new(cfg: &config::Listener, socket: UdpSocket) -> Result<Listener, WorkerError> {
        let err = |source| WorkerError::Socket {
            listener: cfg.name.clone(),
            source,
        };
        let local = socket.local_addr().map_err(err)?;
        // Sets non-blocking mode, IP_PKTINFO and GRO on the shared socket.
        let io = UdpSocketState::new(UdpSockRef::from(&socket)).map_err(err)?;
        let wildcard = local.ip().is_unspecified();
        // quinn-udp asks for the TOS byte (ECN), timestamps and, on IPv4,
        // the destination address of every datagram. A proxy relays ECN end
        // to end only where it is told to, and needs the destination only
        // to answer from the right address of a wildcard bind: skip those
        // control messages. The timestamp stays, for the queue delay,
        // unless the config turns it off.
        sockio::set_recv_control(&socket, wildcard, cfg.queue_delay).map_err(err)?;
        let inode = socket_inode(&socket).map_err(err)?;
        Ok(Listener {
            name: cfg.name.clone(),
            socket,
            inode,
            io,
            wildcard,
            gso: Cell::new(sockio::Gso::probe()),
            stamped: cfg.queue_delay,
        })
    }

    /// The listener kept across a reload, under `cfg`: its name, and the
    /// arrival stamps turned on or off as `cfg` says. A socket that refuses
    /// the change keeps serving as it was (the reload must not lose it).
    pub(crate) fn reconfigure(&mut self, cfg: &config::Listener) {
        self.name = cfg.name.clone();
        if self.stamped == cfg.queue_delay {
            return;
        }
        match sockio::set_recv_control(&self.socket, self.wildcard, cfg.queue_delay) {
            Ok(()) => self.stamped = cfg.queue_delay,
            Err(e) => tracing::warn!(
                listener = %cfg.name,
                "queue_delay = {:?} not applied, the socket keeps its arrival stamps {}: {e}",
                if cfg.queue_delay { "on" } else { "off" },
                if self.stamped { "on" } else { "off" },
            ),
        }
    }
}

pub(crate) fn socket_inode(socket: &UdpSocket) -> std::io::Result<u64> {
    nix::sys::stat::fstat(socket)
        .map(|st| st.st_ino)
        .map_err(std::io::Error::from)
}
