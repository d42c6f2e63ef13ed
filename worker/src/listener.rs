//! A listener as a worker holds it: its inherited group socket and the
//! routing state built from its config (replaced on reload; the socket
//! stays).

use std::net::{SocketAddr, UdpSocket};

use quinn_udp::{UdpSockRef, UdpSocketState};
use udpshard_config as config;
use udpshard_shared::quic_lb::QuicLbRouter;
use udpshard_shared::{stable_hash, Dissector, Maglev};

use crate::{sockio, WorkerError};

pub struct Listener {
    pub name: String,
    /// Stable identity across reloads (its name's hash): ownership table
    /// keys use it, so renumbered listeners keep their entries.
    pub ident: u64,
    /// This worker's socket of the listener's reuseport group.
    pub socket: UdpSocket,
    /// The socket's inode: the same socket passed again on reload is
    /// recognised and kept, with its sessions.
    pub inode: u64,
    pub io: UdpSocketState,
    /// Bound to 0.0.0.0 or [::]: a reply must leave from the address the
    /// client wrote to, so sessions remember it (IP_PKTINFO).
    pub wildcard: bool,
    pub dissector: Dissector,
    pub maglev: Maglev,
    pub backends: Vec<SocketAddr>,
    /// Server-encoded connection IDs route straight to their backend.
    pub quic_lb: Option<QuicLbRouter>,
    /// QUIC: learn the server's chosen connection IDs from its replies.
    pub learns_server_cids: bool,
}

impl Listener {
    pub fn new(cfg: &config::Listener, socket: UdpSocket) -> Result<Listener, WorkerError> {
        let err = |source| WorkerError::Socket {
            listener: cfg.name.clone(),
            source,
        };
        let local = socket.local_addr().map_err(err)?;
        // Sets non-blocking mode, IP_PKTINFO and GRO on the shared socket.
        let io = UdpSocketState::new(UdpSockRef::from(&socket)).map_err(err)?;
        let wildcard = local.ip().is_unspecified();
        // quinn-udp asks for the TOS byte (ECN) and, on IPv4, the
        // destination address of every datagram. A proxy relays ECN end to
        // end only where it is told to, and needs the destination only to
        // answer from the right address of a wildcard bind: skip the
        // control messages the kernel would otherwise build per datagram.
        sockio::set_recv_control(&socket, wildcard).map_err(err)?;
        let inode = socket_inode(&socket).map_err(err)?;
        let mut listener = Listener {
            name: String::new(),
            ident: 0,
            socket,
            inode,
            io,
            wildcard,
            dissector: cfg.dissector.into(),
            maglev: Maglev::new(&[("", 1)], 101).map_err(|source| WorkerError::Routing {
                listener: cfg.name.clone(),
                source,
            })?,
            backends: Vec::new(),
            quic_lb: None,
            learns_server_cids: false,
        };
        listener.configure(cfg)?;
        Ok(listener)
    }

    /// Applies `cfg`'s routing: name, dissector, backends, QUIC-LB.
    pub fn configure(&mut self, cfg: &config::Listener) -> Result<(), WorkerError> {
        let names: Vec<(String, u32)> = cfg
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.weight))
            .collect();
        self.maglev =
            Maglev::new(&names, cfg.maglev_table_size).map_err(|source| WorkerError::Routing {
                listener: cfg.name.clone(),
                source,
            })?;
        self.name = cfg.name.clone();
        self.ident = stable_hash(cfg.name.as_bytes());
        self.dissector = cfg.dissector.into();
        self.backends = cfg.backends.iter().map(|b| b.addr).collect();
        self.quic_lb = cfg.quic_lb.map(|lb| {
            QuicLbRouter::new(
                lb,
                cfg.backends
                    .iter()
                    .map(|b| b.server_id.clone().unwrap_or_default()),
            )
        });
        self.learns_server_cids = matches!(cfg.dissector, config::Dissector::Quic { .. });
        Ok(())
    }

    /// The backend for a new flow: its QUIC-LB server ID, else Maglev.
    pub fn route(&self, key: &[u8]) -> usize {
        self.quic_lb
            .as_ref()
            .and_then(|lb| lb.route(key))
            .unwrap_or_else(|| self.maglev.backend_for(key))
    }
}

fn socket_inode(socket: &UdpSocket) -> std::io::Result<u64> {
    nix::sys::stat::fstat(socket)
        .map(|st| st.st_ino)
        .map_err(std::io::Error::from)
}
