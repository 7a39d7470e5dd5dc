//! The exception table in memory: an ordered map of runs of consecutive chunks, so a store
//! copied in order costs one entry however large it is (the kernel keeps the run length in
//! the top byte of new_chunk; a map of runs does the same without the 255-chunk limit).

use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    new: u64,
    len: u64,
}

/// old chunk -> new chunk, coalesced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExceptionTable {
    runs: BTreeMap<u64, Run>,
    chunks: u64,
}

impl ExceptionTable {
    /// Where `old` lives in the store, if it was copied.
    pub fn lookup(&self, old: u64) -> Option<u64> {
        let (&start, run) = self.runs.range(..=old).next_back()?;
        (old - start < run.len).then(|| run.new + (old - start))
    }

    /// Records `old -> new`. Returns false (and changes nothing) if `old` is already there.
    pub fn insert(&mut self, old: u64, new: u64) -> bool {
        if self.lookup(old).is_some() {
            return false;
        }
        let before = self
            .runs
            .range(..old)
            .next_back()
            .map(|(&s, &r)| (s, r))
            .filter(|(s, r)| {
                s.checked_add(r.len) == Some(old) && r.new.checked_add(r.len) == Some(new)
            });
        let after = old
            .checked_add(1)
            .and_then(|next| self.runs.get(&next).map(|&r| (next, r)))
            .filter(|(_, r)| new.checked_add(1) == Some(r.new));
        match (before, after) {
            (Some((s, r)), Some((n, a))) => {
                self.runs.remove(&n);
                self.runs.insert(
                    s,
                    Run {
                        new: r.new,
                        len: r.len + 1 + a.len,
                    },
                );
            }
            (Some((s, r)), None) => {
                self.runs.insert(
                    s,
                    Run {
                        new: r.new,
                        len: r.len + 1,
                    },
                );
            }
            (None, Some((n, a))) => {
                self.runs.remove(&n);
                self.runs.insert(
                    old,
                    Run {
                        new,
                        len: a.len + 1,
                    },
                );
            }
            (None, None) => {
                self.runs.insert(old, Run { new, len: 1 });
            }
        }
        self.chunks += 1;
        true
    }

    /// Forgets `old`, splitting its run. Returns where it lived.
    pub fn remove(&mut self, old: u64) -> Option<u64> {
        let (&start, &run) = self.runs.range(..=old).next_back()?;
        let k = old - start;
        if k >= run.len {
            return None;
        }
        self.runs.remove(&start);
        if k > 0 {
            self.runs.insert(
                start,
                Run {
                    new: run.new,
                    len: k,
                },
            );
        }
        if k + 1 < run.len {
            self.runs.insert(
                old + 1,
                Run {
                    new: run.new + k + 1,
                    len: run.len - k - 1,
                },
            );
        }
        self.chunks -= 1;
        Some(run.new + k)
    }

    /// Chunks held.
    pub fn len(&self) -> u64 {
        self.chunks
    }

    pub fn is_empty(&self) -> bool {
        self.chunks == 0
    }

    /// Entries in memory: one per run.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn consecutive_chunks_become_one_run() {
        let mut t = ExceptionTable::default();
        for i in 0..100 {
            assert!(t.insert(10 + i, 500 + i));
        }
        assert_eq!((t.runs(), t.len()), (1, 100));
        assert_eq!(t.lookup(50), Some(540));
        assert_eq!(t.lookup(110), None);
        assert!(!t.insert(20, 7));
        assert_eq!(t.remove(50), Some(540));
        assert_eq!((t.runs(), t.len()), (2, 99));
        assert_eq!(t.lookup(50), None);
        assert_eq!(t.lookup(51), Some(541));
        assert!(t.insert(50, 540));
        assert_eq!(t.runs(), 1);
    }

    proptest! {
        #[test]
        fn the_table_agrees_with_a_hash_map(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 0u64..64), 1..300)) {
            let mut t = ExceptionTable::default();
            let mut m = HashMap::new();
            for (insert, old, new) in ops {
                if insert {
                    let fresh = !m.contains_key(&old);
                    prop_assert_eq!(t.insert(old, new), fresh);
                    m.entry(old).or_insert(new);
                } else {
                    prop_assert_eq!(t.remove(old), m.remove(&old));
                }
                prop_assert_eq!(t.len(), m.len() as u64);
            }
            for old in 0..66 {
                prop_assert_eq!(t.lookup(old), m.get(&old).copied());
            }
        }
    }
}
