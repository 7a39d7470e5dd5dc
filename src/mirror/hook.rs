//! `WriteHook`: what a node's write path (`daemon::watch::Watched` and its queues) asks of
//! a mirror of that node: where to mark the bytes a write changed, and whether writes are
//! refused (after a mirror's switchover the target is the disk; the source must not move
//! on). While no mirror runs, a write costs two relaxed loads here.
//!
//! Once a mirror is about to be ready it turns write-blocking (`start_sync`): a write that
//! starts from then on is "synced": not marked dirty, and completed only once its range was
//! copied to the target (`active_sync`, see `active.rs`). Writes that started before are
//! counted (`unsynced`) so the job can wait for them and copy what they marked before it
//! reports ready.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::{ActiveSync, DirtyMap};

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
    /// Writes that start now are synced (see above).
    syncing: AtomicBool,
    sync: RwLock<Option<Arc<ActiveSync>>>,
    /// Writes in flight that started before `syncing` was set (and are marked instead).
    unsynced: AtomicU64,
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

    /// A tracked write request starts: whether it is synced (copied to the target before it
    /// completes) or marked. Once per request, before its `begin`s; `finish_write` after.
    pub fn start_write(&self) -> bool {
        // Counted before `syncing` is read, and `start_sync` sets it before it reads the
        // count (both SeqCst): either the write sees it set, or the job sees the write.
        self.unsynced.fetch_add(1, Ordering::SeqCst);
        if self.syncing.load(Ordering::SeqCst) {
            self.unsynced.fetch_sub(1, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// The request `start_write` answered `synced` for has ended (its ranges' `ended` done).
    pub fn finish_write(&self, synced: bool) {
        if !synced {
            self.unsynced.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A range of a tracked write starts (marked now too unless synced: a pass that takes
    /// the mark before the data lands is followed by the mark at completion).
    pub fn begin(&self, offset: u64, len: u64, synced: bool) {
        self.writes.fetch_add(1, Ordering::AcqRel);
        if !synced {
            self.mark(offset, len);
        }
    }

    /// A range of a tracked write ended: marks what it changed unless it is on the target
    /// already (whatever the write's result: a failed write may have changed part of it).
    pub fn end(&self, offset: u64, len: u64, on_target: bool) {
        if !on_target {
            self.mark(offset, len);
        }
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
        self.syncing.store(false, Ordering::SeqCst);
        *self.sync.write() = None;
        let mut m = self.map.write();
        self.active.store(false, Ordering::Release);
        *m = None;
    }

    /// Write-blocking from now on: writes that start are synced through `active`.
    pub fn start_sync(&self, active: Arc<ActiveSync>) {
        *self.sync.write() = Some(active);
        self.syncing.store(true, Ordering::SeqCst);
    }

    /// Where a synced write is copied, while the mirror lasts (after it, none: the write
    /// completes as it is).
    pub fn active_sync(&self) -> Option<Arc<ActiveSync>> {
        self.sync.read().clone()
    }

    /// Waits until no write that started before `start_sync` is in flight; false if that
    /// took longer than `limit`.
    pub fn wait_unsynced(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.unsynced.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Refuses (or accepts again) every later write to the node.
    pub fn set_refused(&self, refused: bool) {
        self.refused.store(refused, Ordering::Release);
    }
}
