//! The sequence numbers a sink has seen, so that a datagram a proxy delivered twice counts as
//! a duplicate instead of hiding a loss. A bitmap indexed by sequence number; it grows (rarely,
//! doubling) up to [`MAX_SEQ`], above which numbers are not tracked.

/// Sequence numbers at or above this are not tracked (the bitmap would pass 16 MiB).
pub const MAX_SEQ: u64 = 1 << 27;

#[derive(Clone, Debug, Default)]
pub struct SeqSet {
    words: Vec<u64>,
}

impl SeqSet {
    pub fn new() -> SeqSet {
        SeqSet::default()
    }

    /// Marks `seq` seen. Returns `false` if it had been seen already; numbers at or above
    /// [`MAX_SEQ`] are always new.
    pub fn insert(&mut self, seq: u64) -> bool {
        if seq >= MAX_SEQ {
            return true;
        }
        let word = (seq / 64) as usize;
        if word >= self.words.len() {
            let len = (word + 1).next_power_of_two().max(1024);
            self.words.resize(len, 0);
        }
        let bit = 1u64 << (seq % 64);
        let fresh = self.words[word] & bit == 0;
        self.words[word] |= bit;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_sight_is_a_duplicate() {
        let mut seen = SeqSet::new();
        assert!(seen.insert(0));
        assert!(seen.insert(63));
        assert!(seen.insert(64));
        assert!(seen.insert(1_000_000));
        assert!(!seen.insert(0));
        assert!(!seen.insert(64));
        assert!(!seen.insert(1_000_000));
        assert!(seen.insert(999_999));
    }

    #[test]
    fn untracked_numbers_are_always_new() {
        let mut seen = SeqSet::new();
        assert!(seen.insert(MAX_SEQ));
        assert!(seen.insert(MAX_SEQ));
        assert!(seen.insert(u64::MAX));
        assert!(seen.words.is_empty());
        assert!(seen.insert(MAX_SEQ - 1));
        assert!(!seen.insert(MAX_SEQ - 1));
        assert_eq!(seen.words.len() as u64 * 64, MAX_SEQ);
    }
}
