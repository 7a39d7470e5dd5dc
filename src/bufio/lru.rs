//! Which buffer to evict: a clock (second-chance) approximation of least-recently-used.
//!
//! Exact LRU needs a shared list updated on every hit, which would put a lock on the read path
//! that every queue worker takes. The clock needs only a relaxed store of a "referenced" bit on
//! a hit; the list is touched on insertion and eviction. Linux's dm-bufio made the same trade.
//!
//! The queue holds every cached buffer once, plus stale entries for buffers that left the cache
//! some other way (forget, discard); those are dropped when the hand reaches them, or when they
//! outnumber the live ones.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

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
    queue: VecDeque<Arc<Buffer>>,
}

impl Clock {
    /// Adds a newly cached buffer. It starts unreferenced: one use is not yet a reason to keep
    /// it over buffers used twice.
    pub fn insert(&mut self, buf: Arc<Buffer>, live_blocks: usize) {
        self.queue.push_back(buf);
        if self.queue.len() > 2 * live_blocks + 64 {
            self.queue.retain(|b| b.is_cached());
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
            let buf = self.queue.pop_front()?;
            if !buf.is_cached() {
                continue;
            }
            if buf.referenced.swap(false, Ordering::Relaxed) {
                self.queue.push_back(buf);
                continue;
            }
            let (verdict, stop) = decide(&buf);
            if let Verdict::Keep = verdict {
                self.queue.push_back(buf);
            }
            if stop.is_some() {
                return stop;
            }
        }
        None
    }
}
