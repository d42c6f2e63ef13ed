//! The hash that decides which backend a flow goes to.
//!
//! Every proxy of a fleet behind ECMP must route a connection ID to the same
//! backend, whatever its CPU, build or version. `ahash` cannot promise that (its
//! output depends on CPU features and crate version); XXH3 is a specified
//! function whose scalar and SIMD paths agree bit for bit, so with a fixed seed
//! its output is a stable contract. The test vectors below pin it: changing
//! them breaks every fleet that mixes old and new proxies.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// "udpshard" in ASCII. Never change it: see the module comment.
pub const HASH_SEED: u64 = 0x7564_7073_6861_7264;

/// The fleet-stable 64-bit hash of `bytes`.
#[inline]
pub fn stable_hash(bytes: &[u8]) -> u64 {
    xxh3_64_with_seed(bytes, HASH_SEED)
}

/// A second, independent stable hash (Maglev needs two per backend).
#[inline]
pub fn stable_hash2(bytes: &[u8]) -> u64 {
    xxh3_64_with_seed(bytes, !HASH_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned forever: a fleet mixing versions must agree. The values were
    /// cross-checked against the reference C implementation (python-xxhash
    /// `xxh3_64_intdigest(bytes, seed=HASH_SEED)`).
    #[test]
    fn pinned_vectors() {
        let vectors: &[(&[u8], u64)] = &[
            (b"", PIN_EMPTY),
            (b"\x01", PIN_ONE),
            (
                &[0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08],
                PIN_RFC9001_DCID,
            ),
            (b"0123456789abcdefghij", PIN_20),
        ];
        for (input, want) in vectors {
            assert_eq!(
                stable_hash(input),
                *want,
                "stable_hash({input:02x?}) changed"
            );
        }
        assert_eq!(stable_hash2(b"10.0.0.1:443"), PIN_H2_BACKEND);
    }

    const PIN_EMPTY: u64 = 0x1e16_636a_6ec2_4f2d;
    const PIN_ONE: u64 = 0xd587_ae7b_58f7_95c9;
    const PIN_RFC9001_DCID: u64 = 0xc587_750c_3ed3_4bc1;
    const PIN_20: u64 = 0x2493_267a_b66b_2fa2;
    const PIN_H2_BACKEND: u64 = 0xa13f_933c_7a97_a140;

    #[test]
    fn seeds_differ() {
        assert_ne!(stable_hash(b"x"), stable_hash2(b"x"));
    }
}
