//! What the daemon watches on behalf of QMP clients: write thresholds of block nodes, failed
//! requests of exports, and the thin pool's own events. Each becomes a QMP event.

use crate::engine::{Bufs, BufsMut};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use log::info;
use parking_lot::Mutex;
use serde_json::json;

use super::state::State;
use std::collections::HashMap;

use smallvec::SmallVec;

use super::mirror_writes::{finish, write_completed, Held, HeldState, Tracked};
use crate::engine::io::{ByteRange, Completion, IoOp, IoQueue, IoRequest, QueueOptions};
use crate::engine::thin::{PoolEvent, Volumes};
use crate::engine::{BlockDevice, BlockError};
use crate::mirror::WriteHook;
use crate::vhost::request::Op;
use crate::vhost::{Failure, FailureSink};

/// A node's write threshold: armed while non-zero, disarmed once a write passes it.
#[derive(Default)]
pub struct WriteThreshold {
    bytes: AtomicU64,
}

impl WriteThreshold {
    #[inline]
    pub fn get(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Arms the threshold at `bytes` (0 disarms it).
    pub fn set(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::Release);
    }

    /// If a write ending at `end` passes the armed threshold, disarms it and returns the
    /// threshold it passed. Only one of several concurrent writers wins.
    fn passed(&self, end: u64) -> Option<u64> {
        let t = self.get();
        if t == 0 || end <= t {
            return None;
        }
        self.bytes
            .compare_exchange(t, 0, Ordering::AcqRel, Ordering::Acquire)
            .ok()
    }
}

/// A node's device seen through its write threshold: every write, synchronous or submitted
/// to a queue, is checked before it starts.
pub struct Watched {
    inner: Arc<dyn BlockDevice>,
    check: Arc<Check>,
}

/// What a write is checked against, shared by the device and its queues.
struct Check {
    node: String,
    threshold: Arc<WriteThreshold>,
    /// A mirror of the node: marks what writes changed, or refuses them after switchover.
    hook: Arc<WriteHook>,
    state: Weak<State>,
}

impl Watched {
    pub fn new(
        inner: Arc<dyn BlockDevice>,
        node: &str,
        threshold: Arc<WriteThreshold>,
        hook: Arc<WriteHook>,
        state: Weak<State>,
    ) -> Self {
        Watched {
            inner,
            check: Arc::new(Check {
                node: node.into(),
                threshold,
                hook,
                state,
            }),
        }
    }

    /// Refuses a write after a mirror's switchover; otherwise checks its threshold, runs
    /// it, and marks what it changed for a mirror once it is written.
    fn mutate(
        &self,
        offset: u64,
        len: u64,
        threshold: bool,
        f: impl FnOnce() -> Result<(), BlockError>,
    ) -> Result<(), BlockError> {
        if self.check.hook.refuses() {
            return Err(BlockError::ReadOnly);
        }
        if threshold {
            self.check(offset, len);
        }
        let hook = &self.check.hook;
        if !hook.tracking() {
            return f();
        }
        let synced = hook.start_write();
        hook.begin(offset, len, synced);
        let r = f();
        // Write-blocking: the write returns once it is on the target too (a failed copy
        // fails the mirror, not the write: the range is marked instead).
        let on_target =
            synced && r.is_ok() && hook.active_sync().is_some_and(|a| a.copy_now(offset, len));
        hook.end(offset, len, on_target);
        hook.ended();
        hook.finish_write(synced);
        r
    }

    fn check(&self, offset: u64, len: u64) {
        self.check.write(offset, len);
    }
}

impl Check {
    /// Inlined down to one load: nearly every write finds no threshold armed.
    #[inline]
    fn write(&self, offset: u64, len: u64) {
        if self.threshold.get() != 0 {
            self.armed_write(offset, len);
        }
    }

    #[cold]
    fn armed_write(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let Some(threshold) = self.threshold.passed(end) else {
            return;
        };
        info!(
            "node {}: a write up to byte {end} passed the write threshold {threshold}",
            self.node
        );
        if let Some(state) = self.state.upgrade() {
            state.emit(
                "BLOCK_WRITE_THRESHOLD",
                json!({
                    "node-name": self.node,
                    "amount-exceeded": end - threshold,
                    "write-threshold": threshold,
                }),
            );
        }
    }
}

impl BlockDevice for Watched {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        self.inner.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        self.mutate(offset, bufs.len(), true, || self.inner.write(offset, bufs))
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.mutate(offset, len, false, || self.inner.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.mutate(offset, len, true, || {
            self.inner.write_zeroes(offset, len, may_unmap)
        })
    }
    /// The inner device's own queue, with every write checked as it is submitted.
    fn open_queue(self: Arc<Self>, opts: &QueueOptions) -> std::io::Result<Box<dyn IoQueue>> {
        let inner = self.inner.clone().open_queue(opts)?;
        let held = Arc::new(Held {
            notifier: inner.notifier(),
            waiting: Default::default(),
            state: Mutex::new(HeldState {
                done: Vec::new(),
                count: 0,
                open: true,
            }),
            drained: Default::default(),
        });
        Ok(Box::new(WatchedQueue {
            inner,
            check: self.check.clone(),
            changing: HashMap::new(),
            refused: Vec::new(),
            held,
        }))
    }
}

/// A device's queue seen through a node's write threshold and mirror hook.
struct WatchedQueue {
    inner: Box<dyn IoQueue>,
    check: Arc<Check>,
    /// While a mirror tracks the node: the writes in flight, by tag, marked dirty when they
    /// complete (marking at submission could let the mirror copy a block before the write
    /// lands in it, and clear its mark), or copied to the target if synced.
    changing: HashMap<u64, Tracked>,
    /// Writes refused after a switchover, handed back at the next reap.
    refused: Vec<u64>,
    /// Synced writes done on the source and being copied to a mirror's target.
    held: Arc<Held>,
}

impl WatchedQueue {
    /// Completes `tag` with an error at the next reap, and wakes the worker for it.
    fn refuse(&mut self, tag: u64) {
        self.refused.push(tag);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the queue's eventfd (an eventfd
        // write of 1 only fails if the counter would overflow, which leaves it readable).
        unsafe { libc::write(self.inner.notifier(), one.as_ptr().cast(), one.len()) };
    }
}

impl IoQueue for WatchedQueue {
    fn submit(&mut self, req: IoRequest) {
        let changes: SmallVec<[ByteRange; 1]> = match &req.op {
            IoOp::Write => smallvec::smallvec![ByteRange {
                offset: req.offset,
                len: req.bufs.len(),
                may_unmap: false,
            }],
            IoOp::WriteZeroes(ranges) | IoOp::Discard(ranges) => ranges.iter().copied().collect(),
            _ => SmallVec::new(),
        };
        if !changes.is_empty() && self.check.hook.refuses() {
            return self.refuse(req.tag);
        }
        if !matches!(req.op, IoOp::Discard(_)) {
            for r in &changes {
                self.check.write(r.offset, r.len);
            }
        }
        if !changes.is_empty() && self.check.hook.tracking() {
            let synced = self.check.hook.start_write();
            for r in &changes {
                self.check.hook.begin(r.offset, r.len, synced);
            }
            // Each range counted once; `ended` once per range at completion too.
            let t = Tracked {
                ranges: changes,
                synced,
            };
            if let Some(old) = self.changing.insert(req.tag, t) {
                finish(&self.check.hook, old);
            }
        }
        self.inner.submit(req)
    }
    fn submit_pending(&mut self) {
        self.inner.submit_pending()
    }
    fn notifier(&self) -> RawFd {
        self.inner.notifier()
    }
    fn acknowledge(&mut self) {
        self.inner.acknowledge()
    }
    fn has_completions(&mut self) -> bool {
        !self.refused.is_empty()
            || self.inner.has_completions()
            || (self.held.waiting.load(Ordering::Acquire) > 0
                && !self.held.state.lock().done.is_empty())
    }
    fn reap(&mut self, out: &mut dyn FnMut(Completion)) -> usize {
        let mut n = self.refused.len();
        for tag in self.refused.drain(..) {
            out(Completion {
                tag,
                result: Err(BlockError::ReadOnly),
            });
        }
        if self.held.waiting.load(Ordering::Acquire) > 0 {
            let copied = std::mem::take(&mut self.held.state.lock().done);
            self.held.waiting.fetch_sub(copied.len(), Ordering::AcqRel);
            n += copied.len();
            copied.into_iter().for_each(&mut *out);
        }
        let (changing, hook, held) = (&mut self.changing, &self.check.hook, &self.held);
        self.inner.reap(&mut |c| {
            let c = match changing.remove(&c.tag) {
                Some(t) => write_completed(hook, held, t, c),
                None => Some(c),
            };
            if let Some(c) = c {
                n += 1;
                out(c)
            }
        });
        n
    }
    fn in_flight(&self) -> usize {
        self.refused.len() + self.inner.in_flight() + self.held.waiting.load(Ordering::Acquire)
    }
    fn drain(&mut self) {
        self.inner.drain();
        // What the inner queue completed may be a synced write now being copied: reap it
        // so it is handed to the copy, then wait for the copies.
        if !self.changing.is_empty() {
            let (changing, hook, held) = (&mut self.changing, &self.check.hook, &self.held);
            let mut back = Vec::new();
            self.inner.reap(&mut |c| {
                let c = match changing.remove(&c.tag) {
                    Some(t) => write_completed(hook, held, t, c),
                    None => Some(c),
                };
                back.extend(c);
            });
            self.held.waiting.fetch_add(back.len(), Ordering::AcqRel);
            self.held.state.lock().done.extend(back);
        }
        self.held.wait();
    }
    fn completes_at_submit(&self) -> bool {
        self.inner.completes_at_submit()
    }
    fn completes_slowly(&self) -> bool {
        self.inner.completes_slowly()
    }
}

impl Drop for WatchedQueue {
    /// Writes never reaped (the frontend went away) still count as changes; copies of
    /// synced writes no longer wake the queue.
    fn drop(&mut self) {
        self.held.state.lock().open = false;
        if self.changing.is_empty() {
            return;
        }
        // Their data must be written before they are marked.
        self.inner.drain();
        for (_, t) in std::mem::take(&mut self.changing) {
            finish(&self.check.hook, t);
        }
    }
}

/// At most this many BLOCK_IO_ERROR events per export per second; the rest are counted.
const IO_ERRORS_PER_SECOND: u64 = 4;

struct ErrorWindow {
    start: Instant,
    sent: u64,
    suppressed: u64,
}

fn operation(op: Op) -> &'static str {
    match op {
        Op::Read | Op::GetId => "read",
        Op::Write => "write",
        Op::Flush => "flush",
        Op::Discard => "discard",
        Op::WriteZeroes => "write-zeroes",
    }
}

/// The sink an export's failed requests go to: BLOCK_IO_ERROR events, rate-limited.
pub fn io_error_sink(state: Weak<State>, export: &str, node: &str) -> FailureSink {
    let (export, node) = (export.to_string(), node.to_string());
    let window = Mutex::new(ErrorWindow {
        start: Instant::now(),
        sent: 0,
        suppressed: 0,
    });
    Arc::new(move |f: &Failure| {
        let suppressed = {
            let mut w = window.lock();
            if w.start.elapsed().as_secs() >= 1 {
                w.start = Instant::now();
                w.sent = 0;
            }
            if w.sent >= IO_ERRORS_PER_SECOND {
                w.suppressed += 1;
                return;
            }
            w.sent += 1;
            std::mem::take(&mut w.suppressed)
        };
        if let Some(state) = state.upgrade() {
            state.emit(
                "BLOCK_IO_ERROR",
                json!({
                    "device": export,
                    "node-name": node,
                    "operation": operation(f.op),
                    "action": "report",
                    "nospace": f.nospace,
                    "reason": f.reason,
                    "sector": f.sector,
                    "suppressed": suppressed,
                }),
            );
        }
    })
}

/// Turns the pool's events into QMP events for as long as the state lives.
pub fn forward_pool_events(thin: &Volumes, state: Weak<State>) {
    let block_size = thin.pool().block_size();
    let low_water = Arc::downgrade(thin.pool());
    thin.pool().subscribe(Arc::new(move |e: &PoolEvent| {
        let Some(state) = state.upgrade() else { return };
        match e {
            PoolEvent::ModeChanged(mode) => {
                state.emit("THIN_POOL_MODE_CHANGED", json!({ "mode": mode.as_str() }))
            }
            PoolEvent::DataLowWater { free } => {
                let mark = low_water.upgrade().map_or(0, |p| p.data_low_water());
                state.emit(
                    "THIN_POOL_LOW_SPACE",
                    json!({
                        "space": "data",
                        "free-blocks": free,
                        "low-water": mark,
                        "block-size": block_size,
                    }),
                )
            }
            PoolEvent::MetadataLowWater { free } => state.emit(
                "THIN_POOL_LOW_SPACE",
                json!({ "space": "metadata", "free-blocks": free }),
            ),
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_fires_once_for_the_first_write_past_it() {
        let t = WriteThreshold::default();
        assert_eq!(t.passed(u64::MAX), None, "disarmed by default");
        t.set(4096);
        assert_eq!(
            t.passed(4096),
            None,
            "ending at the threshold is not past it"
        );
        assert_eq!(t.passed(4097), Some(4096));
        assert_eq!(t.get(), 0);
        assert_eq!(t.passed(1 << 30), None);
    }

    #[test]
    fn an_io_error_sink_outliving_its_state_is_harmless() {
        // The state is gone (the daemon is stopping): failures are dropped quietly.
        let sink = io_error_sink(Weak::new(), "e", "n");
        let f = Failure {
            op: Op::Write,
            sector: 0,
            status: 1,
            nospace: true,
            invalid: false,
            reason: "test".into(),
        };
        for _ in 0..100 {
            sink(&f);
        }
    }
}
