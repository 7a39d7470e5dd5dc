//! `WriteHook`: what a node's write path (`daemon::watch::Watched` and its queues) asks of
//! a mirror of that node: where to mark the bytes a write changed, and whether writes are
//! refused (after a mirror's switchover the target is the disk; the source must not move
//! on). While no mirror runs, a write costs two relaxed loads here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::DirtyMap;

#[derive(Default)]
pub struct WriteHook {
    /// A mirror is tracking writes (`map` is set).
    active: AtomicBool,
    map: RwLock<Option<Arc<DirtyMap>>>,
    /// Writes fail with "read-only": the node was switched over to a mirror's target.
    refused: AtomicBool,
    /// Tracked writes submitted and not yet marked at completion: a switchover waits for
    /// none to be left, so its last pass sees every mark.
    writes: AtomicU64,
}

impl WriteHook {
    /// Whether a write must be recorded (its ranges kept until it completes).
    pub fn tracking(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Records that `[offset, offset + len)` changed; call it once the data is written.
    pub fn mark(&self, offset: u64, len: u64) {
        if !self.tracking() {
            return;
        }
        if let Some(m) = &*self.map.read() {
            m.mark(offset, len);
        }
    }

    /// A tracked write starts (marked now too: a pass that takes the mark before the data
    /// lands is followed by the mark at completion).
    pub fn begin(&self, offset: u64, len: u64) {
        self.writes.fetch_add(1, Ordering::AcqRel);
        self.mark(offset, len);
    }

    /// A tracked write ended: marks what it changed (whatever its result: a failed write
    /// may have changed part of its range).
    pub fn end(&self, offset: u64, len: u64) {
        self.mark(offset, len);
    }

    /// The last range of a tracked write was marked at its end.
    pub fn ended(&self) {
        self.writes.fetch_sub(1, Ordering::AcqRel);
    }

    /// Waits until no tracked write is in flight; false if that took longer than `limit`.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.writes.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    pub fn refuses(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }

    /// Starts tracking into `map`; false if a mirror already tracks this node.
    pub fn start(&self, map: Arc<DirtyMap>) -> bool {
        let mut m = self.map.write();
        if m.is_some() {
            return false;
        }
        *m = Some(map);
        self.active.store(true, Ordering::Release);
        true
    }

    pub fn stop(&self) {
        let mut m = self.map.write();
        self.active.store(false, Ordering::Release);
        *m = None;
    }

    /// Refuses (or accepts again) every later write to the node.
    pub fn set_refused(&self, refused: bool) {
        self.refused.store(refused, Ordering::Release);
    }
}
