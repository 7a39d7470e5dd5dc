//! Latency histograms as QEMU's `block-latency-histogram-set` defines them: boundaries in
//! nanoseconds, strictly ascending and above zero; `[10, 50]` makes the bins `[0, 10)`,
//! `[10, 50)` and `[50, +inf)`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why boundaries were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HistogramError {
    #[error("{which}: boundaries must be above zero and strictly ascending")]
    NotAscending { which: &'static str },
    #[error("{which}: at most {MAX_BOUNDARIES} boundaries")]
    TooMany { which: &'static str },
}

/// More than this and a histogram costs more memory than it tells.
pub const MAX_BOUNDARIES: usize = 256;

/// Checks one list of boundaries.
pub fn validate(which: &'static str, b: &[u64]) -> Result<(), HistogramError> {
    if b.len() > MAX_BOUNDARIES {
        return Err(HistogramError::TooMany { which });
    }
    let mut prev = 0;
    for &x in b {
        if x <= prev {
            return Err(HistogramError::NotAscending { which });
        }
        prev = x;
    }
    Ok(())
}

/// One queue's counts for one histogram. Only the queue's worker writes them; readers add
/// them up with the other queues'.
pub struct Bins {
    /// Which setting of the export's histogram these count for.
    pub generation: u64,
    pub boundaries: Arc<[u64]>,
    counts: Box<[AtomicU64]>,
}

impl Bins {
    pub fn new(generation: u64, boundaries: Arc<[u64]>) -> Self {
        let counts = (0..=boundaries.len()).map(|_| AtomicU64::new(0)).collect();
        Bins {
            generation,
            boundaries,
            counts,
        }
    }

    /// Counts one request of `ns` nanoseconds. Single writer: a load and a store, no locked
    /// instruction.
    pub fn record(&self, ns: u64) {
        let i = self.boundaries.partition_point(|&b| b <= ns);
        if let Some(c) = self.counts.get(i) {
            c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        }
    }

    /// Adds these counts into `into` (as long as the boundaries).
    pub fn add_to(&self, into: &mut [u64]) {
        for (sum, c) in into.iter_mut().zip(self.counts.iter()) {
            *sum = sum.wrapping_add(c.load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_must_be_positive_and_strictly_ascending() {
        assert!(validate("b", &[]).is_ok());
        assert!(validate("b", &[1, 10, 100]).is_ok());
        assert!(validate("b", &[0, 10]).is_err());
        assert!(validate("b", &[10, 10]).is_err());
        assert!(validate("b", &[10, 5]).is_err());
        assert!(validate("b", &vec![1; MAX_BOUNDARIES + 1]).is_err());
    }

    #[test]
    fn a_latency_lands_in_the_bin_whose_interval_holds_it() {
        let b = Bins::new(1, Arc::from(vec![10u64, 50]));
        for ns in [0, 9, 10, 49, 50, 1 << 40] {
            b.record(ns);
        }
        let mut sum = vec![0; 3];
        b.add_to(&mut sum);
        assert_eq!(sum, [2, 2, 2], "[0,10) [10,50) [50,inf)");
    }
}
