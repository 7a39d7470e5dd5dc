//! Counters kept with atomics so the read path never takes a lock to count.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the cache's counters and occupancy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups (`read`, `write`, `get`) satisfied from the cache.
    pub hits: u64,
    /// Lookups that found nothing usable in the cache (`read`/`write` then read the store).
    pub misses: u64,
    /// Blocks read from the store, including prefetches.
    pub reads: u64,
    /// Blocks written to the store, by `write_dirty` or by eviction under memory pressure.
    pub writes: u64,
    /// Store flushes issued by `write_dirty`.
    pub flushes: u64,
    /// Clean buffers dropped to stay within the memory limit.
    pub evictions: u64,
    /// Bytes of block data currently cached.
    pub cached_bytes: u64,
    /// Blocks currently cached.
    pub cached_blocks: u64,
    /// Cached blocks that are dirty (released by a write guard and not yet written back).
    pub dirty_blocks: u64,
    /// The memory limit in effect, in bytes.
    pub memory_limit: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub evictions: AtomicU64,
}

impl Counters {
    // Relaxed is enough: the counters are statistics and order nothing.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fill(&self, stats: &mut CacheStats) {
        stats.hits = self.hits.load(Ordering::Relaxed);
        stats.misses = self.misses.load(Ordering::Relaxed);
        stats.reads = self.reads.load(Ordering::Relaxed);
        stats.writes = self.writes.load(Ordering::Relaxed);
        stats.flushes = self.flushes.load(Ordering::Relaxed);
        stats.evictions = self.evictions.load(Ordering::Relaxed);
    }
}
