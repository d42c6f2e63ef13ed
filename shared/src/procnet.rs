//! The kernel's tables of UDP sockets, `/proc/net/udp` and `/proc/net/udp6`,
//! parsed: for the bind probe, the tests and the benchmarks, which look for
//! a port's holders, a proxy's sockets, or repeated 4-tuples.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// One UDP socket of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSocketEntry {
    pub local: SocketAddr,
    /// The connected peer; the unspecified address and port 0 when none.
    pub remote: SocketAddr,
    /// The owner's uid.
    pub uid: u32,
    pub inode: u64,
}

/// Every UDP socket in both tables (a table that cannot be read adds none).
pub fn udp_sockets() -> Vec<UdpSocketEntry> {
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(t).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(parse_udp_line)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One line of either table; `None` for the header or a line that does not
/// parse. Addresses are the kernel's in-memory words printed in hex, so each
/// 32-bit word is read back in native byte order.
pub fn parse_udp_line(line: &str) -> Option<UdpSocketEntry> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    Some(UdpSocketEntry {
        local: parse_addr(fields.get(1)?)?,
        remote: parse_addr(fields.get(2)?)?,
        uid: fields.get(7)?.parse().ok()?,
        inode: fields.get(9)?.parse().ok()?,
    })
}

fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = field.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip_hex.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_udp_lines() {
        let v4 = "  123: 0100007F:115C 0200007F:01BB 07 00000000:00000000 00:00000000 00000000   998        0 41234 2 0000000000000000 0";
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_udp_line(v4),
                Some(UdpSocketEntry {
                    local: "127.0.0.1:4444".parse().unwrap(),
                    remote: "127.0.0.2:443".parse().unwrap(),
                    uid: 998,
                    inode: 41234,
                })
            );
        }
        let v6 = "  5: 00000000000000000000000001000000:01BB 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 555 2 0000000000000000 0";
        if cfg!(target_endian = "little") {
            let e = parse_udp_line(v6).unwrap();
            assert_eq!(e.local, "[::1]:443".parse().unwrap());
            assert_eq!(e.remote, "[::]:0".parse().unwrap());
            assert_eq!((e.uid, e.inode), (0, 555));
        }
        assert_eq!(parse_udp_line("  sl  local_address rem_address"), None);
    }

    #[test]
    fn a_bound_socket_is_in_the_table() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        assert_eq!(udp_sockets().iter().filter(|e| e.local == addr).count(), 1);
    }
}
