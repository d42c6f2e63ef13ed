//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights.
//!
//! Each backend walks its own permutation of the table, derived from two
//! stable hashes of its name, and claims the next free entry on its turn; a
//! backend of weight w takes w turns a round. Tables are balanced to within a
//! weight's worth of entries, and removing a backend moves little beyond its
//! own keys. Names and keys hash with [`crate::hash`], so every proxy of a
//! fleet builds the same table from the same backend list.

use udpshard_config::is_prime;

use crate::hash::{stable_hash, stable_hash2};

/// The default table size: a prime well above 100x any sane backend count.
pub const DEFAULT_TABLE_SIZE: usize = 65537;

/// The most backends a table can index (entries are u16; one value is "empty").
pub const MAX_BACKENDS: usize = u16::MAX as usize - 1;

const EMPTY: u16 = u16::MAX;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("Maglev needs at least one backend")]
    NoBackends,
    #[error("Maglev supports at most {MAX_BACKENDS} backends, got {0}")]
    TooManyBackends(usize),
    #[error("Maglev table size {0} must be a prime larger than the number of backends")]
    BadSize(usize),
    #[error("backend weight must be at least 1")]
    ZeroWeight,
}

/// A built lookup table: key hash -> backend index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u16>,
}

impl Maglev {
    /// Builds the table for `backends` given as (stable name, weight).
    pub fn new<N: AsRef<[u8]>>(backends: &[(N, u32)], size: usize) -> Result<Maglev, MaglevError> {
        if backends.is_empty() {
            return Err(MaglevError::NoBackends);
        }
        if backends.len() > MAX_BACKENDS {
            return Err(MaglevError::TooManyBackends(backends.len()));
        }
        if size <= backends.len() || !is_prime(size) {
            return Err(MaglevError::BadSize(size));
        }
        if backends.iter().any(|(_, w)| *w == 0) {
            return Err(MaglevError::ZeroWeight);
        }
        let m = size as u64;
        let mut walks: Vec<(u64, u64, u64)> = backends
            .iter()
            .map(|(name, _)| {
                let name = name.as_ref();
                let offset = stable_hash(name) % m;
                let skip = stable_hash2(name) % (m - 1) + 1;
                (offset, skip, 0)
            })
            .collect();
        let mut table = vec![EMPTY; size];
        let mut filled = 0;
        'fill: loop {
            for (i, (_, weight)) in backends.iter().enumerate() {
                for _ in 0..*weight {
                    let (offset, skip, next) = &mut walks[i];
                    let slot = loop {
                        let c = ((*offset + *next * *skip) % m) as usize;
                        *next += 1;
                        if table[c] == EMPTY {
                            break c;
                        }
                    };
                    table[slot] = i as u16;
                    filled += 1;
                    if filled == size {
                        break 'fill;
                    }
                }
            }
        }
        Ok(Maglev { table })
    }

    /// The backend index for a key hash.
    #[inline]
    pub fn backend_for_hash(&self, key_hash: u64) -> usize {
        self.table[(key_hash % self.table.len() as u64) as usize] as usize
    }

    /// The table slot of a key hash, and the table's size.
    pub fn slot_for_hash(&self, key_hash: u64) -> (usize, usize) {
        (
            (key_hash % self.table.len() as u64) as usize,
            self.table.len(),
        )
    }

    /// The backend index for a flow key's bytes.
    #[inline]
    pub fn backend_for(&self, key: &[u8]) -> usize {
        self.backend_for_hash(stable_hash(key))
    }

    /// How many entries each of `n` backends owns.
    pub fn shares(&self, n: usize) -> Vec<usize> {
        let mut shares = vec![0; n];
        for &b in &self.table {
            shares[b as usize] += 1;
        }
        shares
    }

    #[cfg(test)]
    fn entries(&self) -> &[u16] {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<(String, u32)> {
        (0..n)
            .map(|i| (format!("10.0.0.{}:443", i + 1), 1))
            .collect()
    }

    #[test]
    fn rejects_bad_input() {
        let none: Vec<(String, u32)> = vec![];
        assert_eq!(Maglev::new(&none, 65537), Err(MaglevError::NoBackends));
        assert_eq!(
            Maglev::new(&names(2), 65536),
            Err(MaglevError::BadSize(65536))
        );
        assert_eq!(Maglev::new(&names(13), 13), Err(MaglevError::BadSize(13)));
        assert_eq!(Maglev::new(&[("a", 0)], 101), Err(MaglevError::ZeroWeight));
    }

    #[test]
    fn balanced_within_one_percent() {
        for n in [1, 2, 3, 7, 10, 64, 100, 655] {
            let m = Maglev::new(&names(n), DEFAULT_TABLE_SIZE).unwrap();
            let fair = DEFAULT_TABLE_SIZE as f64 / n as f64;
            for (i, share) in m.shares(n).into_iter().enumerate() {
                let off = (share as f64 - fair).abs() / fair;
                assert!(
                    off <= 0.01,
                    "{n} backends: backend {i} has {share}, fair {fair:.1}"
                );
            }
        }
    }

    #[test]
    fn keys_balanced_within_one_percent() {
        // Through the real key hash: 8-byte CIDs, as a QUIC fleet sees them.
        let n = 10;
        let m = Maglev::new(&names(n), DEFAULT_TABLE_SIZE).unwrap();
        let keys = 2_000_000u64;
        let mut counts = vec![0u64; n];
        for k in 0..keys {
            counts[m.backend_for(&k.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes())] += 1;
        }
        let fair = keys as f64 / n as f64;
        for c in counts {
            assert!((c as f64 - fair).abs() / fair <= 0.01, "{c} vs fair {fair}");
        }
    }

    #[test]
    fn weights_are_proportional() {
        let backends = [("a:1", 1), ("b:1", 2), ("c:1", 5)];
        let m = Maglev::new(&backends, DEFAULT_TABLE_SIZE).unwrap();
        let shares = m.shares(3);
        let fair_unit = DEFAULT_TABLE_SIZE as f64 / 8.0;
        for (i, (_, w)) in backends.iter().enumerate() {
            let fair = fair_unit * *w as f64;
            assert!((shares[i] as f64 - fair).abs() / fair <= 0.01, "{shares:?}");
        }
    }

    #[test]
    fn removing_one_of_ten_moves_little_else() {
        let all = names(10);
        let before = Maglev::new(&all, DEFAULT_TABLE_SIZE).unwrap();
        for removed in 0..10 {
            let rest: Vec<_> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, b)| b.clone())
                .collect();
            let after = Maglev::new(&rest, DEFAULT_TABLE_SIZE).unwrap();
            // Map new indices back to the original backend numbering.
            let orig = |i: u16| if (i as usize) < removed { i } else { i + 1 };
            let extra_moves = before
                .entries()
                .iter()
                .zip(after.entries())
                .filter(|(&b, &a)| b as usize != removed && b != orig(a))
                .count();
            let ratio = extra_moves as f64 / DEFAULT_TABLE_SIZE as f64;
            assert!(
                ratio <= 0.01,
                "removing {removed}: {ratio:.4} of entries moved needlessly"
            );
        }
    }

    /// Pinned forever: proxies of a fleet, of any version, must agree.
    #[test]
    fn pinned_backend_choice() {
        let backends = [
            ("10.0.0.1:443", 1),
            ("10.0.0.2:443", 1),
            ("10.0.0.3:443", 2),
        ];
        let m = Maglev::new(&backends, DEFAULT_TABLE_SIZE).unwrap();
        let cids: [&[u8]; 10] = [
            &[0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08],
            &[0, 0, 0, 0, 0, 0, 0, 0],
            &[0xff; 8],
            &[1, 2, 3, 4],
            &[0x07, 0xc4, 0x60, 0x5e, 0x45, 0x04, 0xcc, 0x4f],
            &[0xaa; 20],
            b"client-1",
            b"client-2",
            b"client-3",
            b"client-4",
        ];
        let got: Vec<usize> = cids.iter().map(|c| m.backend_for(c)).collect();
        assert_eq!(got, PINNED_CHOICES);
    }
    const PINNED_CHOICES: [usize; 10] = [2, 2, 2, 2, 0, 0, 0, 0, 1, 1];
}
