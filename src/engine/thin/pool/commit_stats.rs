//! How long the pool's metadata commits take, for monitoring (`--metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Commits so far, their total time and the last one's.
#[derive(Default)]
pub struct CommitStats {
    count: AtomicU64,
    total_ns: AtomicU64,
    last_ns: AtomicU64,
}

/// What [`CommitStats`] held at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitTimes {
    pub count: u64,
    pub total_ns: u64,
    pub last_ns: u64,
}

impl CommitStats {
    pub fn record(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.last_ns.store(ns, Ordering::Relaxed);
    }

    pub fn get(&self) -> CommitTimes {
        CommitTimes {
            count: self.count.load(Ordering::Relaxed),
            total_ns: self.total_ns.load(Ordering::Relaxed),
            last_ns: self.last_ns.load(Ordering::Relaxed),
        }
    }
}
