//! Which buffer to evict: a clock (second-chance) approximation of least-recently-used.
//!
//! Exact LRU needs a shared list updated on every hit, which would put a lock on the read path
//! that every queue worker takes. The clock needs only a relaxed store of a "referenced" bit on
//! a hit; the list is touched on insertion and eviction. Linux's dm-bufio made the same trade.
//!
//! The queue holds every cached buffer once, plus stale entries for buffers that left the cache
//! some other way (forget, discard); those are dropped when the hand reaches them, or when they
//! outnumber the live ones. Entries are weak, so a stale one does not keep its block's memory.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::buffer::Buffer;

/// What the sweep's caller decided about an unreferenced buffer.
pub(super) enum Verdict {
    /// It stays cached: put it back behind the hand.
    Keep,
    /// It is gone from the cache (evicted or already stale): forget the entry.
    Gone,
}

#[derive(Default)]
pub(super) struct Clock {
    queue: VecDeque<Weak<Buffer>>,
}

impl Clock {
    /// Adds a newly cached buffer. It starts unreferenced: one use is not yet a reason to keep
    /// it over buffers used twice.
    pub fn insert(&mut self, buf: &Arc<Buffer>, live_blocks: usize) {
        self.queue.push_back(Arc::downgrade(buf));
        if self.queue.len() > 2 * live_blocks + 64 {
            self.queue
                .retain(|b| b.upgrade().is_some_and(|b| b.is_cached()));
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Moves the hand over at most `budget` entries. Referenced buffers lose their bit and are
    /// passed over; each unreferenced live buffer is offered to `decide`, which returns `None` to
    /// go on or `Some(result)` to stop the sweep there.
    pub fn sweep<T>(
        &mut self,
        budget: usize,
        mut decide: impl FnMut(&Arc<Buffer>) -> (Verdict, Option<T>),
    ) -> Option<T> {
        for _ in 0..budget {
            let entry = self.queue.pop_front()?;
            let Some(buf) = entry.upgrade().filter(|b| b.is_cached()) else {
                continue;
            };
            if buf.referenced.swap(false, Ordering::Relaxed) {
                self.queue.push_back(entry);
                continue;
            }
            let (verdict, stop) = decide(&buf);
            if let Verdict::Keep = verdict {
                self.queue.push_back(entry);
            }
            if stop.is_some() {
                return stop;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(block: u64) -> Arc<Buffer> {
        let buf = Arc::new(Buffer::new(block, 8, true));
        buf.cached.store(true, Ordering::Release);
        buf
    }

    fn evict_first(clock: &mut Clock) -> Option<u64> {
        clock.sweep(2 * clock.len() + 1, |b| (Verdict::Gone, Some(b.block)))
    }

    #[test]
    fn the_hand_passes_over_referenced_buffers_once() {
        let bufs: Vec<_> = (0..3).map(cached).collect();
        let mut clock = Clock::default();
        for b in &bufs {
            clock.insert(b, 3);
        }
        bufs[0].referenced.store(true, Ordering::Relaxed);
        assert_eq!(evict_first(&mut clock), Some(1));
        assert_eq!(evict_first(&mut clock), Some(2));
        assert_eq!(evict_first(&mut clock), Some(0));
        assert_eq!(evict_first(&mut clock), None);
    }

    #[test]
    fn entries_for_buffers_that_left_the_cache_are_skipped_and_hold_no_memory() {
        let mut clock = Clock::default();
        let gone = cached(1);
        clock.insert(&gone, 2);
        let forgotten = cached(2);
        clock.insert(&forgotten, 2);
        forgotten.cached.store(false, Ordering::Release);
        let weak = Arc::downgrade(&gone);
        drop(gone);
        assert!(
            weak.upgrade().is_none(),
            "the clock must not keep a buffer alive"
        );
        assert_eq!(evict_first(&mut clock), None);
        assert_eq!(clock.len(), 0);
    }

    #[test]
    fn stale_entries_are_compacted_away_without_a_sweep() {
        let mut clock = Clock::default();
        let live = cached(0);
        clock.insert(&live, 1);
        for block in 1..1000 {
            clock.insert(&cached(block), 1);
        }
        assert!(clock.len() <= 2 + 64, "queue grew to {}", clock.len());
    }
}
