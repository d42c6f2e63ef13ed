//! A listener's SO_REUSEPORT group: one socket per worker slot, created by
//! the supervisor before any worker exists and held for its whole life, so
//! a worker that dies leaves its socket (and the datagrams queued in it) in
//! place for its replacement.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};
use udpshard_config as config;

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("listener {listener}: cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("listener {listener}: {what}: {source}")]
    Socket {
        listener: String,
        what: &'static str,
        source: io::Error,
    },
}

pub struct ReuseportGroup {
    pub name: String,
    /// The bound address (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    /// Socket k belongs to worker slot k.
    pub sockets: Vec<UdpSocket>,
    /// The receive buffer the kernel granted (what SO_RCVBUF reads back,
    /// halved: the kernel doubles requests for its bookkeeping).
    pub effective_recv_buffer: usize,
}

impl ReuseportGroup {
    pub fn bind(cfg: &config::Listener, size: usize) -> Result<ReuseportGroup, GroupError> {
        let mut group = ReuseportGroup {
            name: cfg.name.clone(),
            addr: cfg.bind,
            sockets: Vec::with_capacity(size),
            effective_recv_buffer: 0,
        };
        for _ in 0..size {
            group.push(cfg.recv_buffer)?;
        }
        Ok(group)
    }

    /// Adds a socket at the end of the group (the only place one may be
    /// added: the kernel numbers group members by position).
    pub fn push(&mut self, recv_buffer: usize) -> Result<(), GroupError> {
        let err = |what, source| GroupError::Socket {
            listener: self.name.clone(),
            what,
            source,
        };
        let socket = Socket::new(
            Domain::for_address(self.addr),
            Type::DGRAM,
            Some(Protocol::UDP),
        )
        .map_err(|e| err("socket", e))?;
        socket
            .set_reuse_port(true)
            .map_err(|e| err("SO_REUSEPORT", e))?;
        socket
            .set_recv_buffer_size(recv_buffer)
            .map_err(|e| err("SO_RCVBUF", e))?;
        // Every member binds the port the first one got (port 0 in the
        // config means "any", chosen once for the whole group).
        socket
            .bind(&self.addr.into())
            .map_err(|source| GroupError::Bind {
                listener: self.name.clone(),
                addr: self.addr,
                source,
            })?;
        if self.sockets.is_empty() {
            let local = socket.local_addr().map_err(|e| err("getsockname", e))?;
            self.addr = local.as_socket().unwrap_or(self.addr);
            self.effective_recv_buffer =
                socket.recv_buffer_size().map_err(|e| err("SO_RCVBUF", e))? / 2;
        }
        self.sockets.push(socket.into());
        Ok(())
    }
}

/// The line that lets the kernel grant `requested` bytes, when it clamped
/// the request (SO_RCVBUF is silently limited to net.core.rmem_max).
pub fn rmem_fix(requested: usize, effective: usize) -> Option<String> {
    (effective < requested).then(|| format!("sysctl -w net.core.rmem_max={requested}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(bind: &str, recv_buffer: usize) -> config::Listener {
        let mut cfg = config::default_config().listeners.remove(0);
        cfg.bind = bind.parse().unwrap();
        cfg.recv_buffer = recv_buffer;
        cfg
    }

    #[test]
    fn group_shares_one_port() {
        let g = ReuseportGroup::bind(&listener("127.0.0.1:0", 65536), 3).unwrap();
        assert_ne!(g.addr.port(), 0);
        for s in &g.sockets {
            assert_eq!(s.local_addr().unwrap(), g.addr);
        }
        assert!(g.effective_recv_buffer >= 65536);
    }

    #[test]
    fn clamp_is_reported_with_its_fix() {
        assert_eq!(
            rmem_fix(8 << 20, 4 << 20).as_deref(),
            Some("sysctl -w net.core.rmem_max=8388608")
        );
        assert_eq!(rmem_fix(4 << 20, 4 << 20), None);
    }

    #[test]
    fn a_taken_port_is_a_clear_error() {
        let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = ReuseportGroup::bind(&listener(&addr, 65536), 1)
            .err()
            .unwrap();
        assert!(err.to_string().contains("cannot bind"), "{err}");
    }
}
