//! A listener as a worker holds it: its inherited group socket and the
//! routing state built from its config.

use std::net::{SocketAddr, UdpSocket};

use quinn_udp::{UdpSockRef, UdpSocketState};
use udpshard_config as config;
use udpshard_shared::quic_lb::QuicLbRouter;
use udpshard_shared::{Dissector, Maglev};

use crate::{sockio, WorkerError};

pub struct Listener {
    pub name: String,
    /// This worker's socket of the listener's reuseport group.
    pub socket: UdpSocket,
    pub io: UdpSocketState,
    pub dissector: Dissector,
    pub maglev: Maglev,
    pub backends: Vec<SocketAddr>,
    /// Bound to 0.0.0.0 or [::]: a reply must leave from the address the
    /// client wrote to, so sessions remember it (IP_PKTINFO).
    pub wildcard: bool,
    /// Server-encoded connection IDs route straight to their backend.
    pub quic_lb: Option<QuicLbRouter>,
    /// QUIC: learn the server's chosen connection IDs from its replies.
    pub learns_server_cids: bool,
}

impl Listener {
    pub fn new(cfg: &config::Listener, socket: UdpSocket) -> Result<Listener, WorkerError> {
        let local = socket.local_addr().map_err(|source| WorkerError::Socket {
            listener: cfg.name.clone(),
            source,
        })?;
        // Sets non-blocking mode, IP_PKTINFO and GRO on the shared socket.
        let io = UdpSocketState::new(UdpSockRef::from(&socket)).map_err(|source| {
            WorkerError::Socket {
                listener: cfg.name.clone(),
                source,
            }
        })?;
        let wildcard = local.ip().is_unspecified();
        // quinn-udp asks for the TOS byte (ECN) and, on IPv4, the
        // destination address of every datagram. A proxy relays ECN end to
        // end only where it is told to, and needs the destination only to
        // answer from the right address of a wildcard bind: skip the
        // control messages the kernel would otherwise build per datagram.
        sockio::set_recv_control(&socket, wildcard).map_err(|source| WorkerError::Socket {
            listener: cfg.name.clone(),
            source,
        })?;
        let names: Vec<(String, u32)> = cfg
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.weight))
            .collect();
        let maglev =
            Maglev::new(&names, cfg.maglev_table_size).map_err(|source| WorkerError::Routing {
                listener: cfg.name.clone(),
                source,
            })?;
        Ok(Listener {
            name: cfg.name.clone(),
            socket,
            io,
            dissector: cfg.dissector.into(),
            maglev,
            backends: cfg.backends.iter().map(|b| b.addr).collect(),
            wildcard,
            quic_lb: cfg.quic_lb.map(|lb| {
                QuicLbRouter::new(
                    lb,
                    cfg.backends
                        .iter()
                        .map(|b| b.server_id.clone().unwrap_or_default()),
                )
            }),
            learns_server_cids: matches!(cfg.dissector, config::Dissector::Quic { .. }),
        })
    }
}
