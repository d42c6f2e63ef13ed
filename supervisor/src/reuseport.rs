//! A listener's SO_REUSEPORT group: one socket per worker slot, created by
//! the supervisor before any worker exists and held for its whole life, so
//! a worker that dies leaves its socket (and the datagrams queued in it) in
//! place for its replacement.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};
use udpshard_config::{self as config, Steering};
use udpshard_shared::steer;

#[derive(Debug, thiserror::Error)]
pub(crate) enum GroupError {
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

pub(crate) struct ReuseportGroup {
    pub name: String,
    /// The bound address (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    /// The address as configured: a reload that keeps it keeps the group.
    pub configured: SocketAddr,
    pub recv_buffer: usize,
    /// Socket k belongs to worker slot k.
    pub sockets: Vec<UdpSocket>,
    /// The receive buffer the kernel granted (what SO_RCVBUF reads back,
    /// halved: the kernel doubles requests for its bookkeeping).
    pub effective_recv_buffer: usize,
}

impl ReuseportGroup {
    pub(crate) fn bind(cfg: &config::Listener, size: usize) -> Result<ReuseportGroup, GroupError> {
        let mut group = ReuseportGroup {
            name: cfg.name.clone(),
            addr: cfg.bind,
            configured: cfg.bind,
            recv_buffer: cfg.recv_buffer,
            sockets: Vec::with_capacity(size),
            effective_recv_buffer: 0,
        };
        for _ in 0..size {
            group.push()?;
        }
        Ok(group)
    }

    /// Removes the last socket (the only place one may be removed from).
    pub(crate) fn pop(&mut self) {
        self.sockets.pop();
    }

    /// Applies a new receive buffer size to every socket of the group.
    pub(crate) fn set_recv_buffer(&mut self, bytes: usize) -> Result<(), GroupError> {
        for s in &self.sockets {
            socket2::SockRef::from(s)
                .set_recv_buffer_size(bytes)
                .map_err(|source| GroupError::Socket {
                    listener: self.name.clone(),
                    what: "SO_RCVBUF",
                    source,
                })?;
        }
        self.recv_buffer = bytes;
        Ok(())
    }

    /// Adds a socket at the end of the group (the only place one may be
    /// added: the kernel numbers group members by position).
    pub(crate) fn push(&mut self) -> Result<(), GroupError> {
        let recv_buffer = self.recv_buffer;
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

/// Waits until no datagram the kernel is delivering can still reach a
/// socket that the last [`ReuseportGroup::steer`] took out of the choice:
/// the kernel picks a group's socket and queues the datagram there within
/// one RCU read-side section, and membarrier(MEMBARRIER_CMD_GLOBAL) returns
/// after a grace period (it is synchronize_rcu). Then a retiring worker's
/// last read finds everything ever steered to it. Where the call is refused
/// (nohz_full CPUs, a system-call filter), a sleep far longer than a grace
/// period usually is stands in.
pub(crate) fn settle_steering() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: membarrier(2) takes no pointers; it only blocks the caller.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl ReuseportGroup {
    /// Applies the listener's `steering` to the group and says which mode
    /// it got, and why, in the log.
    /// `active` is how many sockets, from the start, take datagrams (fewer
    /// than the group while retiring sockets drain at its end).
    pub(crate) fn steer(&self, cfg: &config::Listener, active: usize) -> Result<(), GroupError> {
        let dissector: udpshard_shared::Dissector = cfg.dissector.into();
        let n = active.clamp(1, self.sockets.len().max(1)) as u32;
        let attach = |prog: &[steer::Insn]| match self.sockets.first() {
            Some(socket) => attach_reuseport_cbpf(socket, prog),
            None => Ok(()),
        };
        let kernel_cid = |why: &str| {
            tracing::info!(
                "listener {}: kernel-cid steering ({why}): connection IDs pick the worker in the kernel",
                self.name
            );
        };
        // Reshuffle spreads by 4-tuple with a program of ours rather than the
        // kernel's own hash, so the group can shrink without loss (see
        // `steer::tuple_program`); without it, the kernel's hash serves.
        let reshuffle = |why: &str| {
            let how = match attach(&steer::tuple_program(n)) {
                Ok(()) => "the client's address and port pick the worker".to_string(),
                Err(e) => {
                    format!("the kernel's 4-tuple hash (the 4-tuple program was refused: {e})")
                }
            };
            tracing::info!(
                "listener {}: reshuffle steering ({why}): {how}; a migrated client's datagrams are \
                 handed to the worker that owns its session",
                self.name
            );
        };
        match (cfg.steering, steer::program(&dissector, n)) {
            (Steering::Reshuffle, _) => reshuffle("as configured"),
            // A QUIC connection leaves its first connection ID (the
            // client's) for the server's after the handshake, and a client
            // that migrates takes a fresh one: steering on the ID would
            // move most connections once, just after they open (a handoff
            // per datagram until the session follows). Its 4-tuple stays.
            (Steering::Auto, _) if matches!(dissector, udpshard_shared::Dissector::Quic { .. }) => {
                reshuffle(
                    "auto: QUIC connection IDs change after the handshake, the client's address \
                     and port do not",
                )
            }
            (Steering::Auto, None) | (Steering::KernelCid, None) => reshuffle(&format!(
                "the {:?} dissector has no connection ID to steer on",
                cfg.dissector
            )),
            (Steering::KernelCid, Some(prog)) => {
                attach(&prog).map_err(|source| GroupError::Socket {
                    listener: self.name.clone(),
                    what: "attaching the kernel-cid steering program (SO_ATTACH_REUSEPORT_CBPF)",
                    source,
                })?;
                kernel_cid("as configured")
            }
            (Steering::Auto, Some(prog)) => match attach(&prog) {
                Ok(()) => kernel_cid("auto"),
                Err(e) => reshuffle(&format!(
                    "auto: the kernel refused the kernel-cid program: {e}"
                )),
            },
        }
        Ok(())
    }
}

/// Attaches a classic BPF program to the reuseport group `socket` belongs
/// to; attaching again replaces the group's program.
pub(crate) fn attach_reuseport_cbpf(socket: &UdpSocket, prog: &[steer::Insn]) -> io::Result<()> {
    let mut filters: Vec<libc::sock_filter> = prog
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: u16::try_from(filters.len()).map_err(|_| io::Error::other("program too long"))?,
        filter: filters.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `filters`, alive and unmoved for the call;
    // the kernel copies the program and keeps no pointer to it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The line that lets the kernel grant `requested` bytes, when it clamped
/// the request (SO_RCVBUF is silently limited to net.core.rmem_max).
pub(crate) fn rmem_fix(requested: usize, effective: usize) -> Option<String> {
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

    /// The kernel and the Rust function agree: a datagram for connection ID
    /// c arrives at group socket `fnv1a(c) % N`, for thousands of random
    /// IDs of every length, short and long headers.
    #[test]
    fn kernel_cid_program_and_rust_hash_agree_through_real_sockets() {
        const N: usize = 4;
        let mut cfg = listener("127.0.0.1:0", 1 << 20);
        cfg.steering = Steering::KernelCid;
        let group = ReuseportGroup::bind(&cfg, N).unwrap();
        group.steer(&cfg, N).unwrap();
        for s in &group.sockets {
            s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
                .unwrap();
        }
        let dissector: udpshard_shared::Dissector = cfg.dissector.into();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut expected = vec![Vec::new(); N];
        for i in 0..3000u32 {
            let mut d: Vec<u8> = if i % 2 == 0 {
                // Long header, DCID of every length 1..=20.
                let len = (i / 2 % 20 + 1) as u8;
                let mut d = vec![0xc0, 0, 0, 0, 1, len];
                d.extend((0..len).map(|_| next() as u8));
                d
            } else {
                let cid: Vec<u8> = (0..8).map(|_| next() as u8).collect();
                udpshard_shared::flow::quic_short(&cid, &[])
            };
            d.extend_from_slice(&i.to_be_bytes());
            let k = steer::kernel_cid_index(&dissector, &d, N as u32).unwrap() as usize;
            expected[k].push(i);
            client.send_to(&d, group.addr).unwrap();
            // Keep well inside the receive buffers.
            if i % 500 == 499 {
                drain_into(&group, &mut expected);
            }
        }
        drain_into(&group, &mut expected);
        assert!(
            expected.iter().all(|e| e.is_empty()),
            "datagrams never arrived: {expected:?}"
        );
    }

    fn drain_into(group: &ReuseportGroup, expected: &mut [Vec<u32>]) {
        let mut buf = [0u8; 64];
        for (k, s) in group.sockets.iter().enumerate() {
            while !expected[k].is_empty() {
                let n = s
                    .recv(&mut buf)
                    .unwrap_or_else(|e| panic!("socket {k}: {e}"));
                let i = u32::from_be_bytes(buf[n - 4..n].try_into().unwrap());
                let at = expected[k].iter().position(|&x| x == i);
                assert!(
                    at.is_some(),
                    "datagram {i} arrived at socket {k}, not where the Rust hash says"
                );
                expected[k].remove(at.unwrap());
            }
        }
    }

    #[test]
    fn short_garbage_is_spread_by_the_kernel_not_piled_on_socket_0() {
        const N: usize = 4;
        let mut cfg = listener("127.0.0.1:0", 1 << 20);
        cfg.steering = Steering::KernelCid;
        let group = ReuseportGroup::bind(&cfg, N).unwrap();
        group.steer(&cfg, N).unwrap();
        for s in &group.sockets {
            s.set_nonblocking(true).unwrap();
        }
        // 64 client ports, each sending a datagram too short to hold a CID.
        for _ in 0..64 {
            let c = UdpSocket::bind("127.0.0.1:0").unwrap();
            c.send_to(&[0x40, 1], group.addr).unwrap();
        }
        let mut buf = [0u8; 8];
        let mut counts = vec![0usize; N];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while counts.iter().sum::<usize>() < 64 && std::time::Instant::now() < deadline {
            for (k, s) in group.sockets.iter().enumerate() {
                counts[k] += std::iter::from_fn(|| s.recv(&mut buf).ok()).count();
            }
        }
        assert_eq!(counts.iter().sum::<usize>(), 64);
        assert!(counts.iter().filter(|&&c| c > 0).count() > 1, "{counts:?}");
    }

    /// Reshuffle's program and `steer::tuple_index` agree, for IPv4 and
    /// IPv6 clients on many ports; and with 3 of 4 sockets active, nothing
    /// reaches the fourth (it can be retired without loss).
    #[test]
    fn tuple_program_and_rust_hash_agree_through_real_sockets() {
        for (bind, client_ip) in [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "::1")] {
            const N: usize = 4;
            let mut cfg = listener(bind, 1 << 20);
            cfg.steering = Steering::Reshuffle;
            let group = ReuseportGroup::bind(&cfg, N).unwrap();
            for active in [N, N - 1] {
                group.steer(&cfg, active).unwrap();
                for s in &group.sockets {
                    s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
                        .unwrap();
                }
                let mut expected = vec![Vec::new(); N];
                for i in 0..300u32 {
                    let c = UdpSocket::bind((client_ip, 0)).unwrap();
                    let k = steer::tuple_index(c.local_addr().unwrap(), active as u32) as usize;
                    expected[k].push(i);
                    c.send_to(&i.to_be_bytes(), group.addr).unwrap();
                }
                assert!(expected[N - 1].is_empty() || active == N);
                drain_into(&group, &mut expected);
                assert!(
                    expected.iter().all(|e| e.is_empty()),
                    "{bind}: never arrived: {expected:?}"
                );
            }
        }
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
