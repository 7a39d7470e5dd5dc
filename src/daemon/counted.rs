//! An export's device seen through its statistics and limits: every request any frontend
//! submits to a queue is counted when it completes (see `stats.rs`), and while the export is
//! throttled (`throttle.rs`) a read or write over its limits waits here, in the queue, until
//! the throttle timer wakes the worker; completions keep flowing meanwhile. The synchronous
//! methods are not frontends' traffic and pass straight through.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};

use super::stats::{coarse_now, now, Done, ExportStats, Kind, QueueStats};
use super::throttle::ThrottleSlot;
use super::throttle_timer::{wake_at, Waker};
use crate::engine::io::{Completion, IoOp, IoQueue, IoRequest, QueueOptions};
use crate::engine::{BlockDevice, BlockError, Bufs, BufsMut};

pub struct Counted {
    inner: Arc<dyn BlockDevice>,
    stats: Arc<ExportStats>,
    throttle: Arc<ThrottleSlot>,
}

impl Counted {
    pub fn new(
        inner: Arc<dyn BlockDevice>,
        stats: Arc<ExportStats>,
        throttle: Arc<ThrottleSlot>,
    ) -> Self {
        Counted {
            inner,
            stats,
            throttle,
        }
    }
}

impl BlockDevice for Counted {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        self.inner.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        self.inner.write(offset, bufs)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn open_queue(self: Arc<Self>, opts: &QueueOptions) -> std::io::Result<Box<dyn IoQueue>> {
        let inner = self.inner.clone().open_queue(opts)?;
        Ok(Box::new(CountedQueue {
            timed: !inner.completes_at_submit(),
            inner,
            stats: self.stats.queue(),
            slots: Vec::new(),
            free: Vec::new(),
            throttle: self.throttle.clone(),
            delayed: Default::default(),
            waker: None,
            armed: None,
        }))
    }
}

/// What a queue keeps of a request until it completes.
struct Slot {
    /// The frontend's tag, handed back with the completion.
    tag: u64,
    kind: Kind,
    bytes: u64,
    end: u64,
    /// When it was submitted ([`now`]), if timed.
    start: u64,
}

struct CountedQueue {
    inner: Box<dyn IoQueue>,
    stats: QueueStats,
    /// Whether requests are timed: a device that finishes inside `submit` (null, memory) is
    /// not, so that it costs one coarse clock read per completion batch and nothing per
    /// request.
    timed: bool,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    throttle: Arc<ThrottleSlot>,
    /// Reads and writes waiting for their limits, in order, each direction apart (a read is
    /// never held up behind a write only writes are limited for).
    delayed: [VecDeque<IoRequest>; 2],
    /// Wakes this queue's worker when the first of them may go.
    waker: Option<Arc<Waker>>,
    /// When the timer will wake it.
    armed: Option<Instant>,
}

/// The direction a throttle limits a request in (0 read, 1 write), if it limits it.
fn direction(op: &IoOp) -> Option<usize> {
    match op {
        IoOp::Read => Some(0),
        IoOp::Write | IoOp::WriteZeroes(_) => Some(1),
        IoOp::Flush | IoOp::Discard(_) => None,
    }
}

fn request_bytes(req: &IoRequest) -> (u64, u64) {
    match &req.op {
        IoOp::Read | IoOp::Write => {
            let len = req.bufs.len();
            (len, req.offset.saturating_add(len))
        }
        IoOp::Flush => (0, 0),
        IoOp::Discard(r) | IoOp::WriteZeroes(r) => r.iter().fold((0, 0), |(n, end), r| {
            (
                n.saturating_add(r.len),
                end.max(r.offset.saturating_add(r.len)),
            )
        }),
    }
}

impl CountedQueue {
    fn insert(&mut self, slot: Slot) -> u64 {
        match self.free.pop() {
            Some(i) => {
                if let Some(s) = self.slots.get_mut(i) {
                    *s = Some(slot);
                }
                i as u64
            }
            None => {
                self.slots.push(Some(slot));
                (self.slots.len() - 1) as u64
            }
        }
    }
}

impl CountedQueue {
    fn bytes_of(&self, req: &IoRequest) -> u64 {
        let slot = usize::try_from(req.tag)
            .ok()
            .and_then(|i| self.slots.get(i));
        slot.and_then(Option::as_ref).map_or(0, |s| s.bytes)
    }

    /// Has the timer wake the worker at `at`, unless it already will by then.
    fn arm(&mut self, at: Instant) {
        if self.armed.is_some_and(|a| a <= at) {
            return;
        }
        if self.waker.is_none() {
            match Waker::new(self.inner.notifier()) {
                Ok(w) => self.waker = Some(w),
                Err(e) => {
                    warn!("cannot set up the throttle's wakeup ({e}); throttled requests wait for the next completion or kick");
                    return;
                }
            }
        }
        if let Some(w) = &self.waker {
            wake_at(at, w);
            self.armed = Some(at);
        }
    }

    /// Submits a read or write of a throttled export now if its limits allow and nothing of
    /// its direction waits before it; else it waits.
    fn submit_throttled(&mut self, dir: usize, req: IoRequest) {
        let group = self.throttle.group();
        let waiting = self.delayed.get(dir).is_some_and(|d| !d.is_empty());
        if let (Some(g), false) = (&group, waiting) {
            match g.admit(dir == 1, self.bytes_of(&req), Instant::now()) {
                None => return self.inner.submit(req),
                Some(at) => self.arm(at),
            }
        } else if group.is_none() {
            return self.inner.submit(req);
        }
        if let Some(d) = self.delayed.get_mut(dir) {
            d.push_back(req);
        }
    }

    /// Submits the waiting requests the limits now allow (all of them when `all`: a drain,
    /// or the limits were lifted).
    fn release(&mut self, all: bool) {
        if self.delayed.iter().all(VecDeque::is_empty) {
            return;
        }
        let now = Instant::now();
        if self.armed.is_some_and(|a| a <= now) {
            self.armed = None;
        }
        let group = self.throttle.group().filter(|_| !all);
        let mut submitted = false;
        for dir in 0..2 {
            while let Some(front) = self.delayed.get(dir).and_then(VecDeque::front) {
                if let Some(g) = &group {
                    if let Some(at) = g.admit(dir == 1, self.bytes_of(front), now) {
                        self.arm(at);
                        break;
                    }
                }
                if let Some(req) = self.delayed.get_mut(dir).and_then(VecDeque::pop_front) {
                    self.inner.submit(req);
                    submitted = true;
                }
            }
        }
        if submitted {
            self.inner.submit_pending();
        }
    }

    fn delayed_len(&self) -> usize {
        self.delayed.iter().map(VecDeque::len).sum()
    }
}

impl IoQueue for CountedQueue {
    fn submit(&mut self, mut req: IoRequest) {
        let (bytes, end) = request_bytes(&req);
        let start = if self.timed { now() } else { 0 };
        let slot = Slot {
            tag: req.tag,
            kind: Kind::of(&req.op),
            bytes,
            end,
            start,
        };
        req.tag = self.insert(slot);
        if self.throttle.enabled() {
            if let Some(dir) = direction(&req.op) {
                return self.submit_throttled(dir, req);
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
        self.inner.has_completions()
            || (self.delayed_len() > 0 && self.armed.is_none_or(|a| a <= Instant::now()))
    }
    fn reap(&mut self, out: &mut dyn FnMut(Completion)) -> usize {
        if let Some(w) = &self.waker {
            w.take();
        }
        // Checked here so that an unthrottled queue (nearly all of them) does not pay a call
        // per reap, which with a device that completes at submit is a call per request.
        if self.delayed_len() > 0 {
            let lifted = !self.throttle.enabled();
            self.release(lifted);
        }
        self.stats.refresh();
        let CountedQueue {
            inner,
            stats,
            timed,
            slots,
            free,
            ..
        } = self;
        // One clock read for the whole batch, taken when its first completion comes; a
        // coarse one when requests are not timed (it only tells when the export was last
        // busy).
        let mut at = None;
        inner.reap(&mut |c: Completion| {
            let index = usize::try_from(c.tag).unwrap_or(usize::MAX);
            let Some(slot) = slots.get_mut(index).and_then(Option::take) else {
                debug!("completion for a request this queue never took ({})", c.tag);
                return;
            };
            free.push(index);
            let at = *at.get_or_insert_with(|| if *timed { now() } else { coarse_now() });
            stats.record(&Done {
                kind: slot.kind,
                bytes: slot.bytes,
                end: slot.end,
                ok: c.result.is_ok(),
                latency_ns: if *timed {
                    at.saturating_sub(slot.start)
                } else {
                    0
                },
                at,
            });
            out(Completion {
                tag: slot.tag,
                result: c.result,
            });
        })
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.delayed_len()
    }
    fn drain(&mut self) {
        // As QEMU does when it drains: what waits for its limits goes at once.
        self.release(true);
        self.inner.drain()
    }
    fn completes_at_submit(&self) -> bool {
        self.inner.completes_at_submit()
    }
    fn completes_slowly(&self) -> bool {
        self.inner.completes_slowly()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::io::ByteRange;
    use crate::engine::memory::MemoryDevice;

    fn opts() -> QueueOptions {
        QueueOptions {
            entries: 16,
            submit_batch: 4,
        }
    }

    #[test]
    fn completions_come_back_with_the_frontends_tags_and_are_counted() {
        let stats = ExportStats::new();
        let dev = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let counted = Arc::new(Counted::new(dev, stats.clone(), Default::default()));
        let mut q = counted.open_queue(&opts()).unwrap();
        let flush = IoRequest::unbuffered(IoOp::Flush, false, 77);
        q.submit(flush);
        let range = ByteRange {
            offset: 4096,
            len: 8192,
            may_unmap: false,
        };
        q.submit(IoRequest::unbuffered(
            IoOp::Discard(vec![range].into()),
            false,
            5,
        ));
        q.submit(IoRequest::unbuffered(
            IoOp::WriteZeroes(vec![range].into()),
            false,
            5,
        ));
        let range = ByteRange {
            offset: 1 << 30,
            len: 512,
            may_unmap: false,
        };
        q.submit(IoRequest::unbuffered(
            IoOp::Discard(vec![range].into()),
            false,
            9,
        ));
        let mut tags = Vec::new();
        q.reap(&mut |c| tags.push((c.tag, c.result.is_ok())));
        assert_eq!(tags, [(77, true), (5, true), (5, true), (9, false)]);
        let s = stats.snapshot();
        assert_eq!(s.ops, [0, 1, 1, 1]);
        assert_eq!(s.bytes, [0, 8192, 0, 8192]);
        assert_eq!(s.failed, [0, 0, 0, 1]);
        assert_eq!(s.wr_highest_offset, 12288);
    }

    /// Nanoseconds per request of `submit` + `reap` through `q`, the best of 40 runs of 50k
    /// flushes of a null device (no data moved: what is left is the queue's own cost).
    fn ns_per_request(q: &mut dyn IoQueue) -> f64 {
        let mut best = f64::MAX;
        for _ in 0..40 {
            let n = 50_000u64;
            let start = std::time::Instant::now();
            for i in 0..n {
                q.submit(IoRequest::unbuffered(IoOp::Flush, false, i));
                q.reap(&mut |c| {
                    std::hint::black_box(c);
                });
            }
            best = best.min(start.elapsed().as_nanos() as f64 / n as f64);
        }
        best
    }

    /// The counters' cost per request, printed (run by hand: `cargo test --release --lib
    /// daemon::counted -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost_of_counting_per_request() {
        use crate::engine::null::NullDevice;
        let null: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(1 << 30));
        let mut plain = null.clone().open_queue(&opts()).unwrap();
        let counted = Arc::new(Counted::new(
            null.clone(),
            ExportStats::new(),
            Default::default(),
        ));
        let mut wrapped = counted.open_queue(&opts()).unwrap();
        // The timed path (as for io_uring devices): one clock read per submit.
        let inner = null.open_queue(&opts()).unwrap();
        let mut timed_q = CountedQueue {
            inner,
            stats: ExportStats::new().queue(),
            timed: true,
            slots: Vec::new(),
            free: Vec::new(),
            throttle: Default::default(),
            delayed: Default::default(),
            waker: None,
            armed: None,
        };
        for round in 0..3 {
            let p = ns_per_request(&mut *plain);
            let w = ns_per_request(&mut *wrapped);
            let t = ns_per_request(&mut timed_q);
            println!(
                "round {round}: inline null queue {p:.1} ns/request, counted {w:.1} (+{:.1}), counted and timed {t:.1} (+{:.1})",
                w - p,
                t - p
            );
        }
    }
}
