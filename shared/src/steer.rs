//! `kernel-cid` steering: which socket of a reuseport group the kernel hands
//! a datagram to, decided by its connection ID.
//!
//! The same function exists twice: as a classic BPF program the supervisor
//! attaches to the group (SO_ATTACH_REUSEPORT_CBPF: no eBPF, no privileges;
//! for UDP, offset 0 is the payload), and as [`kernel_cid_index`] in Rust.
//! Tests hold the two to each other through real sockets. The hash is
//! FNV-1a (32-bit): cBPF has 32-bit xor and multiply and no loops, so
//! bytes are hashed in unrolled steps. It only spreads connections over
//! local workers; backend choice uses the fleet-stable hash.
//!
//! Every load is preceded by a length check: a load past the end ends a
//! cBPF program with 0, which would send all short garbage to socket 0.
//! A datagram too short to hold its ID returns [`FALLBACK`] (an index no
//! group has), and the kernel falls back to its own 4-tuple hash.

use crate::flow::{Dissector, MAX_CID_LEN};

pub const FNV_OFFSET: u32 = 2_166_136_261;
pub const FNV_PRIME: u32 = 16_777_619;

/// Any index >= the group size makes the kernel use its own hash.
pub const FALLBACK: u32 = u32::MAX;

/// FNV-1a over `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The group index the kernel-cid program picks for `datagram` in a group
/// of `n` sockets; `None` where it falls back to the kernel's hash.
pub fn kernel_cid_index(dissector: &Dissector, datagram: &[u8], n: u32) -> Option<u32> {
    let cid = match *dissector {
        Dissector::Tuple => return None,
        Dissector::Quic { short_cid_len } => {
            let first = *datagram.first()?;
            if first & 0x80 == 0 {
                datagram.get(1..1 + short_cid_len)?
            } else {
                let len = *datagram.get(5)? as usize;
                if len == 0 || len > MAX_CID_LEN {
                    return None;
                }
                datagram.get(6..6 + len)?
            }
        }
        Dissector::Bytes {
            cid_offset,
            cid_len,
        } => datagram.get(cid_offset..cid_offset + cid_len)?,
    };
    Some(fnv1a(cid) % n)
}

/// One classic BPF instruction (struct sock_filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Opcodes (linux/filter.h, linux/bpf_common.h).
const LD_W_LEN: u16 = 0x80; // A = len
const LD_IMM: u16 = 0x00; // A = k
const LDB_ABS: u16 = 0x30; // A = pkt[k] (byte)
const LD_MEM: u16 = 0x60; // A = M[k]
const ST: u16 = 0x02; // M[k] = A
const TAX: u16 = 0x07; // X = A
const ALU_XOR_X: u16 = 0xac; // A ^= X
const ALU_MUL_K: u16 = 0x24; // A *= k
const ALU_ADD_K: u16 = 0x04; // A += k
const ALU_MOD_K: u16 = 0x94; // A %= k
const JA: u16 = 0x05; // pc += k
const JEQ_K: u16 = 0x15;
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
const JGE_X: u16 = 0x3d;
const JSET_K: u16 = 0x45;
const RET_A: u16 = 0x16;
const RET_K: u16 = 0x06;
const LDXB_MSH: u16 = 0xb1; // X = 4 * (pkt[k] & 0xf)
const LDB_IND: u16 = 0x50; // A = pkt[X + k]
const ALU_RSH_K: u16 = 0x74; // A >>= k

/// Classic BPF's window onto the network header (SKF_NET_OFF): loads at
/// `NET + off` read the IP header, where the payload loads cannot reach.
const NET: u32 = (-0x10_0000i32) as u32;
const M_PORT_HI: u32 = 2;
const M_PORT_LO: u32 = 3;

const M_HASH: u32 = 0;
const M_LEN: u32 = 1;

/// A tiny assembler: straight-line code with forward jumps to labels.
#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    /// (instruction index, label for jt, label for jf) of pending jumps.
    fixups: Vec<(usize, Option<Label>, Option<Label>)>,
    labels: Vec<Option<usize>>,
}

#[derive(Debug, Clone, Copy)]
struct Label(usize);

impl Asm {
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.code.len());
    }

    fn op(&mut self, code: u16, k: u32) {
        self.code.push(Insn {
            code,
            jt: 0,
            jf: 0,
            k,
        });
    }

    /// Conditional jump: to `jt` when true, `jf` when false (`None`: next).
    fn jump(&mut self, code: u16, k: u32, jt: Option<Label>, jf: Option<Label>) {
        self.fixups.push((self.code.len(), jt, jf));
        self.op(code, k);
    }

    fn ja(&mut self, to: Label) {
        self.fixups.push((self.code.len(), Some(to), None));
        self.op(JA, 0);
    }

    /// M[HASH] = FNV-1a step over pkt[offset].
    fn hash_byte(&mut self, offset: u32) {
        self.op(LDB_ABS, offset);
        self.op(TAX, 0);
        self.op(LD_MEM, M_HASH);
        self.op(ALU_XOR_X, 0);
        self.op(ALU_MUL_K, FNV_PRIME);
        self.op(ST, M_HASH);
    }

    /// M[HASH] = FNV-1a step over M[slot].
    fn hash_mem(&mut self, slot: u32) {
        self.op(LD_MEM, slot);
        self.op(TAX, 0);
        self.op(LD_MEM, M_HASH);
        self.op(ALU_XOR_X, 0);
        self.op(ALU_MUL_K, FNV_PRIME);
        self.op(ST, M_HASH);
    }

    fn finish(mut self) -> Vec<Insn> {
        for (at, jt, jf) in std::mem::take(&mut self.fixups) {
            let target = |l: Option<Label>| l.and_then(|l| self.labels[l.0]).map(|t| t - at - 1);
            let insn = &mut self.code[at];
            if insn.code == JA {
                insn.k = target(jt).expect("bound label") as u32;
            } else {
                // Every program below keeps conditional jumps short; the
                // unit tests build the longest ones.
                insn.jt = target(jt).map_or(0, |d| u8::try_from(d).expect("short jump"));
                insn.jf = target(jf).map_or(0, |d| u8::try_from(d).expect("short jump"));
            }
        }
        self.code
    }
}

/// The steering program for a group of `n` sockets; `None` for a
/// dissector with no connection ID.
pub fn program(dissector: &Dissector, n: u32) -> Option<Vec<Insn>> {
    let mut a = Asm::default();
    let fallback = a.label();
    let done = a.label();
    // The kernel's checker rejects a load from scratch memory that some
    // path (falling through a `ret` counts) reaches before a store.
    a.op(LD_IMM, 0);
    a.op(ST, M_HASH);
    a.op(ST, M_LEN);
    match *dissector {
        Dissector::Tuple => return None,
        Dissector::Bytes {
            cid_offset,
            cid_len,
        } => {
            a.op(LD_W_LEN, 0);
            a.jump(JGE_K, (cid_offset + cid_len) as u32, None, Some(fallback));
            a.op(LD_IMM, FNV_OFFSET);
            a.op(ST, M_HASH);
            for i in 0..cid_len {
                a.hash_byte((cid_offset + i) as u32);
            }
            a.ja(done);
        }
        Dissector::Quic { short_cid_len } => {
            // Conditional jumps reach at most 255 instructions, so each
            // branch ends with its own fallback.
            let long = a.label();
            let short_fallback = a.label();
            a.op(LD_W_LEN, 0);
            a.jump(JEQ_K, 0, Some(short_fallback), None);
            a.op(LDB_ABS, 0);
            a.jump(JSET_K, 0x80, Some(long), None);
            // Short header: short_cid_len bytes from offset 1.
            a.op(LD_W_LEN, 0);
            a.jump(JGE_K, 1 + short_cid_len as u32, None, Some(short_fallback));
            a.op(LD_IMM, FNV_OFFSET);
            a.op(ST, M_HASH);
            for i in 0..short_cid_len {
                a.hash_byte(1 + i as u32);
            }
            a.ja(done);
            a.bind(short_fallback);
            a.op(RET_K, FALLBACK);
            // Long header: DCID length at 5 (1..=20), DCID from 6.
            a.bind(long);
            let long_fallback = a.label();
            a.op(LD_W_LEN, 0);
            a.jump(JGE_K, 6, None, Some(long_fallback));
            a.op(LDB_ABS, 5);
            a.jump(JEQ_K, 0, Some(long_fallback), None);
            a.jump(JGT_K, MAX_CID_LEN as u32, Some(long_fallback), None);
            a.op(ST, M_LEN);
            a.op(ALU_ADD_K, 6);
            a.op(TAX, 0);
            a.op(LD_W_LEN, 0);
            a.jump(JGE_X, 0, None, Some(long_fallback));
            a.op(LD_IMM, FNV_OFFSET);
            a.op(ST, M_HASH);
            let long_done = a.label();
            for i in 0..MAX_CID_LEN as u32 {
                a.op(LD_MEM, M_LEN);
                a.jump(JGT_K, i, None, Some(long_done));
                a.hash_byte(6 + i);
            }
            a.bind(long_done);
            a.op(LD_MEM, M_HASH);
            a.op(ALU_MOD_K, n);
            a.op(RET_A, 0);
            a.bind(long_fallback);
            a.op(RET_K, FALLBACK);
        }
    }
    a.bind(done);
    a.op(LD_MEM, M_HASH);
    a.op(ALU_MOD_K, n);
    a.op(RET_A, 0);
    a.bind(fallback);
    a.op(RET_K, FALLBACK);
    Some(a.finish())
}

/// The group index [`tuple_program`] picks for a datagram from `client`.
pub fn tuple_index(client: std::net::SocketAddr, n: u32) -> u32 {
    let mut bytes = [0u8; 18];
    let len = match client.ip() {
        std::net::IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            4
        }
        std::net::IpAddr::V6(ip) => {
            bytes[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    bytes[len..len + 2].copy_from_slice(&client.port().to_be_bytes());
    fnv1a(&bytes[..len + 2]) % n
}

/// `reshuffle` steering as a program: FNV-1a over the client's address and
/// port, `% n`. It spreads flows as the kernel's own 4-tuple hash does, with
/// one difference that matters: `n` can be smaller than the group, so
/// sockets at the group's end can be retired (drained, then closed) while
/// no new datagram reaches them. IPv6 datagrams with extension headers, or
/// other surprises, fall back to the kernel's hash.
pub fn tuple_program(n: u32) -> Vec<Insn> {
    let mut a = Asm::default();
    let (v6, done, fallback) = (a.label(), a.label(), a.label());
    a.op(LD_IMM, 0);
    a.op(ST, M_LEN);
    a.op(ST, M_PORT_HI);
    a.op(ST, M_PORT_LO);
    a.op(LD_IMM, FNV_OFFSET);
    a.op(ST, M_HASH);
    a.op(LDB_ABS, NET);
    a.op(ALU_RSH_K, 4);
    a.jump(JEQ_K, 6, Some(v6), None);
    a.jump(JEQ_K, 4, None, Some(fallback));
    // IPv4: source address at 12..16, the UDP header after ihl * 4 bytes.
    a.op(LDXB_MSH, NET);
    a.op(LDB_IND, NET);
    a.op(ST, M_PORT_HI);
    a.op(LDB_IND, NET + 1);
    a.op(ST, M_PORT_LO);
    for i in 0..4 {
        a.hash_byte(NET + 12 + i);
    }
    a.ja(done);
    // IPv6: source address at 8..24; next header must be UDP (17), so
    // the UDP header is at 40.
    a.bind(v6);
    a.op(LDB_ABS, NET + 6);
    a.jump(JEQ_K, 17, None, Some(fallback));
    a.op(LDB_ABS, NET + 40);
    a.op(ST, M_PORT_HI);
    a.op(LDB_ABS, NET + 41);
    a.op(ST, M_PORT_LO);
    for i in 0..16 {
        a.hash_byte(NET + 8 + i);
    }
    a.bind(done);
    a.hash_mem(M_PORT_HI);
    a.hash_mem(M_PORT_LO);
    a.op(LD_MEM, M_HASH);
    a.op(ALU_MOD_K, n);
    a.op(RET_A, 0);
    a.bind(fallback);
    a.op(RET_K, FALLBACK);
    a.finish()
}

/// Runs a program the way the kernel does, for tests of the generator:
/// loads past the end return 0, as the kernel's do.
pub fn interpret(prog: &[Insn], pkt: &[u8]) -> u32 {
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    while let Some(i) = prog.get(pc) {
        pc += 1;
        match i.code {
            LD_W_LEN => a = pkt.len() as u32,
            LD_IMM => a = i.k,
            LDB_ABS => match pkt.get(i.k as usize) {
                Some(&b) => a = u32::from(b),
                None => return 0,
            },
            LD_MEM => a = mem[i.k as usize],
            ST => mem[i.k as usize] = a,
            TAX => x = a,
            ALU_XOR_X => a ^= x,
            ALU_MUL_K => a = a.wrapping_mul(i.k),
            ALU_ADD_K => a = a.wrapping_add(i.k),
            ALU_MOD_K => a %= i.k,
            JA => pc += i.k as usize,
            JEQ_K | JGT_K | JGE_K | JGE_X | JSET_K => {
                let taken = match i.code {
                    JEQ_K => a == i.k,
                    JGT_K => a > i.k,
                    JGE_K => a >= i.k,
                    JGE_X => a >= x,
                    _ => a & i.k != 0,
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            RET_A => return a,
            RET_K => return i.k,
            other => panic!("opcode {other:#x} not used by this generator"),
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    fn agree(d: &Dissector, pkt: &[u8], n: u32) {
        let prog = program(d, n).unwrap();
        let want = kernel_cid_index(d, pkt, n).unwrap_or(FALLBACK);
        assert_eq!(interpret(&prog, pkt), want, "{d:?} n={n} pkt={pkt:02x?}");
    }

    #[test]
    fn fnv_vectors() {
        // Published FNV-1a 32-bit test vectors.
        assert_eq!(fnv1a(b""), 0x811c_9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn program_matches_rust_on_random_quic_datagrams() {
        let mut seed = 0x1234_5678_9abc_def1;
        for short_cid_len in [1usize, 4, 8, 20] {
            let d = Dissector::Quic { short_cid_len };
            for n in [1u32, 2, 3, 16, 255] {
                for _ in 0..300 {
                    let len = (rng(&mut seed) % 40) as usize;
                    let mut pkt: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
                    if len > 5 && rng(&mut seed) % 2 == 0 {
                        pkt[0] |= 0x80;
                        pkt[5] = (rng(&mut seed) % 23) as u8; // lengths 0..=22
                    }
                    agree(&d, &pkt, n);
                }
            }
        }
    }

    #[test]
    fn every_long_header_cid_length_and_truncation() {
        let d = Dissector::Quic { short_cid_len: 8 };
        for cid_len in 0..=22u8 {
            for present in 0..=cid_len as usize + 1 {
                let mut pkt = vec![0xc0, 0, 0, 0, 1, cid_len];
                pkt.extend((0..present).map(|i| (i as u8).wrapping_mul(31).wrapping_add(7)));
                agree(&d, &pkt, 4);
            }
        }
        // Too short to hold the length byte.
        for len in 0..6 {
            agree(&d, &[0xc0; 6][..len], 4);
        }
    }

    #[test]
    fn short_garbage_falls_back_instead_of_landing_on_socket_0() {
        let d = Dissector::Quic { short_cid_len: 8 };
        let prog = program(&d, 4).unwrap();
        for pkt in [
            &[][..],
            &[0x40],
            &[0x40, 1, 2, 3],
            &[0xc0, 0, 0, 0, 1, 8, 1],
        ] {
            assert_eq!(interpret(&prog, pkt), FALLBACK, "{pkt:02x?}");
        }
    }

    #[test]
    fn bytes_dissector_program() {
        let d = Dissector::Bytes {
            cid_offset: 4,
            cid_len: 20,
        };
        let mut seed = 99;
        for _ in 0..500 {
            let len = (rng(&mut seed) % 30) as usize;
            let pkt: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
            agree(&d, &pkt, 7);
        }
    }

    #[test]
    fn tuple_has_no_program() {
        assert!(program(&Dissector::Tuple, 2).is_none());
    }

    #[test]
    fn programs_fit_the_kernel_limit() {
        let p = program(&Dissector::Quic { short_cid_len: 20 }, 2).unwrap();
        assert!(p.len() < 4096);
    }
}
