//! Per-export I/O statistics with QEMU's meaning (`query-blockstats`): operations, bytes,
//! total time, failed and invalid operations, idle time and latency histograms.
//!
//! Every queue worker counts into counters of its own ([`QueueCounters`], a cache line apart
//! from every other queue's), with relaxed loads and stores (one writer each, so no locked
//! instruction); a query adds the queues up. Requests that a frontend refuses before the
//! device sees them (out of range, malformed range lists) are counted as invalid through the
//! export's failure sink, which is rare enough to share one counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::histogram::{validate, Bins, HistogramError};
use crate::engine::io::IoOp;
use crate::vhost::request::Op;
use crate::vhost::{Failure, FailureSink};

/// QEMU's accounting types, in its order (zone append has no place here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read = 0,
    Write = 1,
    Flush = 2,
    Unmap = 3,
}

pub const KINDS: usize = 4;

/// Histograms QEMU keeps: read, write and flush.
pub const HISTOGRAMS: usize = 3;

impl Kind {
    /// How QEMU's virtio-blk accounts a request: write-zeroes as a write, discard as unmap.
    pub fn of(op: &IoOp) -> Kind {
        match op {
            IoOp::Read => Kind::Read,
            IoOp::Write | IoOp::WriteZeroes(_) => Kind::Write,
            IoOp::Flush => Kind::Flush,
            IoOp::Discard(_) => Kind::Unmap,
        }
    }

    /// The same for a virtio request type; GET_ID is not an I/O.
    pub fn of_virtio(op: Op) -> Option<Kind> {
        match op {
            Op::Read => Some(Kind::Read),
            Op::Write | Op::WriteZeroes => Some(Kind::Write),
            Op::Flush => Some(Kind::Flush),
            Op::Discard => Some(Kind::Unmap),
            Op::GetId => None,
        }
    }

    fn histogram(self) -> Option<usize> {
        match self {
            Kind::Read => Some(0),
            Kind::Write => Some(1),
            Kind::Flush => Some(2),
            Kind::Unmap => None,
        }
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live local; with a clock every Linux
    // has it cannot fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let ns = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.wrapping_mul(1_000_000_000).wrapping_add(ns)
}

/// The monotonic clock in ns (what `Instant` reads): for latencies.
pub fn now() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// The same clock as of its last tick (a few ms behind at most), at a fraction of the cost:
/// good enough for idle time, which is all it is used for.
pub fn coarse_now() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

/// Adds `n` to a counter only its owner writes: a load and a store, no locked instruction.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// One queue's counters. Aligned so that no two queues' counters share a cache line (128
/// bytes: adjacent-line prefetch pairs lines).
#[repr(align(128))]
#[derive(Default)]
pub struct QueueCounters {
    ops: [AtomicU64; KINDS],
    bytes: [AtomicU64; KINDS],
    time_ns: [AtomicU64; KINDS],
    failed: [AtomicU64; KINDS],
    /// The end of the furthest successful write.
    wr_highest: AtomicU64,
    /// When the last request finished ([`now`] or [`coarse_now`]); 0: never.
    last_done: AtomicU64,
    /// The histograms this queue counts into, for readers (the worker keeps its own copy).
    bins: Mutex<[Option<Arc<Bins>>; HISTOGRAMS]>,
}

/// A finished request, as the queue saw it.
pub struct Done {
    pub kind: Kind,
    pub bytes: u64,
    /// The end of a write's range (for `wr_highest_offset`).
    pub end: u64,
    pub ok: bool,
    pub latency_ns: u64,
    /// When it finished ([`now`], or [`coarse_now`] when not timed).
    pub at: u64,
}

/// What one queue worker holds of its export's statistics.
pub struct QueueStats {
    export: Arc<ExportStats>,
    mine: Arc<QueueCounters>,
    /// The histogram setting the local copy is of.
    generation: u64,
    bins: [Option<Arc<Bins>>; HISTOGRAMS],
}

impl QueueStats {
    /// Picks up a new histogram setting, if there is one (one load otherwise: inlined, as a
    /// worker calls it on every reap).
    #[inline]
    pub fn refresh(&mut self) {
        let current = self.export.generation.load(Ordering::Acquire);
        if current != self.generation {
            self.pick_up(current);
        }
    }

    #[cold]
    fn pick_up(&mut self, current: u64) {
        let settings = self.export.histograms.lock();
        let mut published = self.mine.bins.lock();
        for (i, setting) in settings.iter().enumerate() {
            let fresh = match (setting, published.get(i).and_then(Option::as_ref)) {
                (None, _) => None,
                (Some(s), Some(b)) if b.generation == s.generation => Some(b.clone()),
                (Some(s), _) => Some(Arc::new(Bins::new(s.generation, s.boundaries.clone()))),
            };
            if let Some(slot) = published.get_mut(i) {
                slot.clone_from(&fresh);
            }
            if let Some(slot) = self.bins.get_mut(i) {
                *slot = fresh;
            }
        }
        self.generation = current;
    }

    #[inline]
    pub fn record(&self, d: &Done) {
        let k = d.kind as usize;
        let c = &self.mine;
        if d.ok {
            if let (Some(ops), Some(bytes)) = (c.ops.get(k), c.bytes.get(k)) {
                bump(ops, 1);
                bump(bytes, d.bytes);
            }
            if d.kind == Kind::Write && d.end > c.wr_highest.load(Ordering::Relaxed) {
                c.wr_highest.store(d.end, Ordering::Relaxed);
            }
        } else if let Some(failed) = c.failed.get(k) {
            bump(failed, 1);
        }
        if let Some(t) = c.time_ns.get(k) {
            bump(t, d.latency_ns);
        }
        c.last_done.store(d.at.max(1), Ordering::Relaxed);
        if let Some(Some(b)) = d.kind.histogram().and_then(|h| self.bins.get(h)) {
            b.record(d.latency_ns);
        }
    }
}

impl Drop for QueueStats {
    fn drop(&mut self) {
        // The counters stay (they are the export's history) for the next queue to reuse.
        let mut queues = self.export.queues.lock();
        if let Some(q) = queues.iter_mut().find(|q| Arc::ptr_eq(&q.0, &self.mine)) {
            q.1 = false;
        }
    }
}

/// One histogram's setting.
#[derive(Clone)]
struct Setting {
    generation: u64,
    boundaries: Arc<[u64]>,
}

/// Boundaries asked for by `block-latency-histogram-set` (all `None`: remove every histogram).
#[derive(Default, Debug, Clone)]
pub struct HistogramRequest {
    pub boundaries: Option<Vec<u64>>,
    pub read: Option<Vec<u64>>,
    pub write: Option<Vec<u64>>,
    pub flush: Option<Vec<u64>>,
}

/// One export's statistics.
pub struct ExportStats {
    /// Every queue's counters, and whether a queue owns them now.
    queues: Mutex<Vec<(Arc<QueueCounters>, bool)>>,
    invalid: [AtomicU64; KINDS],
    /// When the last invalid request came, as `last_done`.
    last_invalid: AtomicU64,
    /// Bumped on every histogram change, so workers notice with one load.
    generation: AtomicU64,
    histograms: Mutex<[Option<Setting>; HISTOGRAMS]>,
}

/// A histogram's totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    pub boundaries: Vec<u64>,
    pub bins: Vec<u64>,
}

/// An export's totals at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub ops: [u64; KINDS],
    pub bytes: [u64; KINDS],
    pub time_ns: [u64; KINDS],
    pub failed: [u64; KINDS],
    pub invalid: [u64; KINDS],
    pub wr_highest_offset: u64,
    /// Since the last request finished; `None` before the first.
    pub idle_time_ns: Option<u64>,
    pub histograms: [Option<Histogram>; HISTOGRAMS],
}

impl Default for ExportStats {
    fn default() -> Self {
        ExportStats {
            queues: Mutex::default(),
            invalid: Default::default(),
            last_invalid: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            histograms: Mutex::default(),
        }
    }
}

impl ExportStats {
    pub fn new() -> Arc<ExportStats> {
        Arc::new(ExportStats::default())
    }

    /// Counters for a new queue: those of a queue that is gone if there are any (so an
    /// export whose frontend reconnects often keeps a bounded set), else fresh ones.
    pub fn queue(self: &Arc<Self>) -> QueueStats {
        let mine = {
            let mut queues = self.queues.lock();
            match queues.iter_mut().find(|q| !q.1) {
                Some(q) => {
                    q.1 = true;
                    q.0.clone()
                }
                None => {
                    let c = Arc::new(QueueCounters::default());
                    queues.push((c.clone(), true));
                    c
                }
            }
        };
        let bins = mine.bins.lock().clone();
        let generation = bins
            .iter()
            .flatten()
            .map(|b| b.generation)
            .max()
            .unwrap_or(0);
        let mut q = QueueStats {
            export: self.clone(),
            mine,
            // Forces a look at the settings on the first refresh.
            generation: generation.wrapping_sub(1),
            bins,
        };
        q.refresh();
        q
    }

    /// Counts a request refused before it reached the device.
    pub fn count_invalid(&self, kind: Kind) {
        if let Some(c) = self.invalid.get(kind as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let at = coarse_now();
        self.last_invalid.fetch_max(at.max(1), Ordering::Relaxed);
    }

    /// Sets histograms as QEMU's `block-latency-histogram-set` does: nothing given removes
    /// them all; `boundaries` (re)creates all three, except those given their own; a type's
    /// own boundaries (re)create that one only. Every histogram set starts empty.
    pub fn set_histograms(&self, req: &HistogramRequest) -> Result<(), HistogramError> {
        let own = [
            ("boundaries-read", &req.read),
            ("boundaries-write", &req.write),
            ("boundaries-flush", &req.flush),
        ];
        if let Some(b) = &req.boundaries {
            validate("boundaries", b)?;
        }
        for (which, b) in own {
            if let Some(b) = b {
                validate(which, b)?;
            }
        }
        let mut settings = self.histograms.lock();
        let mut generation = self.generation.load(Ordering::Relaxed);
        let nothing = req.boundaries.is_none() && own.iter().all(|(_, b)| b.is_none());
        for (slot, (_, b)) in settings.iter_mut().zip(own) {
            if nothing {
                *slot = None;
                continue;
            }
            if let Some(b) = b.as_ref().or(req.boundaries.as_ref()) {
                generation += 1;
                *slot = Some(Setting {
                    generation,
                    boundaries: Arc::from(b.as_slice()),
                });
            }
        }
        self.generation.store(generation + 1, Ordering::Release);
        Ok(())
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        let settings = self.histograms.lock().clone();
        let mut hist: [Option<Histogram>; HISTOGRAMS] = Default::default();
        for (h, setting) in hist.iter_mut().zip(settings.iter()) {
            *h = setting.as_ref().map(|st| Histogram {
                boundaries: st.boundaries.to_vec(),
                bins: vec![0; st.boundaries.len() + 1],
            });
        }
        let mut last = self.last_invalid.load(Ordering::Relaxed);
        for (q, _) in self.queues.lock().iter() {
            let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
            for k in 0..KINDS {
                let add = |into: &mut [u64; KINDS], from: &[AtomicU64; KINDS]| {
                    if let (Some(i), Some(f)) = (into.get_mut(k), from.get(k)) {
                        *i = i.wrapping_add(load(f));
                    }
                };
                add(&mut s.ops, &q.ops);
                add(&mut s.bytes, &q.bytes);
                add(&mut s.time_ns, &q.time_ns);
                add(&mut s.failed, &q.failed);
            }
            s.wr_highest_offset = s.wr_highest_offset.max(load(&q.wr_highest));
            last = last.max(load(&q.last_done));
            let bins = q.bins.lock();
            for ((h, setting), b) in hist.iter_mut().zip(settings.iter()).zip(bins.iter()) {
                if let (Some(h), Some(st), Some(b)) = (h, setting, b) {
                    // A queue that has not seen the newest setting yet has nothing in it.
                    if b.generation == st.generation {
                        b.add_to(&mut h.bins);
                    }
                }
            }
        }
        for (i, c) in s.invalid.iter_mut().zip(self.invalid.iter()) {
            *i = c.load(Ordering::Relaxed);
        }
        let now = now();
        s.idle_time_ns = (last > 0).then(|| now.saturating_sub(last));
        s.histograms = hist;
        s
    }
}

/// The export's failure sink with invalid requests counted first.
pub fn counting_invalid(stats: Arc<ExportStats>, then: FailureSink) -> FailureSink {
    Arc::new(move |f: &Failure| {
        if f.invalid {
            if let Some(kind) = Kind::of_virtio(f.op) {
                stats.count_invalid(kind);
            }
        }
        then(f)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(kind: Kind, ok: bool, latency_ns: u64) -> Done {
        Done {
            kind,
            bytes: 4096,
            end: 8192,
            ok,
            latency_ns,
            at: 5,
        }
    }

    #[test]
    fn queues_add_up_and_failures_count_apart_from_operations() {
        let stats = ExportStats::new();
        let a = stats.queue();
        let b = stats.queue();
        a.record(&done(Kind::Read, true, 100));
        b.record(&done(Kind::Read, true, 50));
        b.record(&done(Kind::Write, false, 7));
        stats.count_invalid(Kind::Unmap);
        let s = stats.snapshot();
        assert_eq!(s.ops, [2, 0, 0, 0]);
        assert_eq!(s.bytes, [8192, 0, 0, 0]);
        assert_eq!(s.time_ns, [150, 7, 0, 0], "failed requests' time counts");
        assert_eq!(s.failed, [0, 1, 0, 0]);
        assert_eq!(s.invalid, [0, 0, 0, 1]);
        assert_eq!(s.wr_highest_offset, 0, "the write failed");
        assert!(s.idle_time_ns.is_some());
    }

    #[test]
    fn no_idle_time_before_the_first_request() {
        let stats = ExportStats::new();
        let _q = stats.queue();
        assert_eq!(stats.snapshot().idle_time_ns, None);
    }

    #[test]
    fn histograms_follow_qemus_set_semantics() {
        let stats = ExportStats::new();
        let mut q = stats.queue();
        let all = HistogramRequest {
            boundaries: Some(vec![10, 100]),
            write: Some(vec![1000]),
            ..Default::default()
        };
        stats.set_histograms(&all).unwrap();
        q.refresh();
        q.record(&done(Kind::Read, true, 50));
        q.record(&done(Kind::Write, true, 5000));
        q.record(&done(Kind::Flush, true, 1));
        let h = stats.snapshot().histograms;
        assert_eq!(h[0].as_ref().unwrap().bins, [0, 1, 0]);
        assert_eq!(h[1].as_ref().unwrap().boundaries, [1000]);
        assert_eq!(h[1].as_ref().unwrap().bins, [0, 1]);
        assert_eq!(h[2].as_ref().unwrap().bins, [1, 0, 0]);

        // Only the read histogram is reset; the others keep counting.
        let read = HistogramRequest {
            read: Some(vec![20]),
            ..Default::default()
        };
        stats.set_histograms(&read).unwrap();
        let h = stats.snapshot().histograms;
        assert_eq!(h[0].as_ref().unwrap().bins, [0, 0], "new and empty");
        assert_eq!(h[1].as_ref().unwrap().bins, [0, 1], "untouched");
        q.refresh();
        q.record(&done(Kind::Read, true, 50));
        q.record(&done(Kind::Write, true, 5000));
        let h = stats.snapshot().histograms;
        assert_eq!(h[0].as_ref().unwrap().bins, [0, 1]);
        assert_eq!(h[1].as_ref().unwrap().bins, [0, 2]);

        stats.set_histograms(&HistogramRequest::default()).unwrap();
        assert!(stats.snapshot().histograms.iter().all(Option::is_none));
        let bad = HistogramRequest {
            flush: Some(vec![5, 5]),
            ..Default::default()
        };
        assert!(stats.set_histograms(&bad).is_err());
    }

    #[test]
    fn a_new_queue_reuses_the_counters_of_one_that_is_gone() {
        let stats = ExportStats::new();
        let q = stats.queue();
        q.record(&done(Kind::Read, true, 1));
        drop(q);
        let q = stats.queue();
        q.record(&done(Kind::Read, true, 1));
        assert_eq!(stats.queues.lock().len(), 1);
        assert_eq!(stats.snapshot().ops[0], 2, "history kept");
    }

    #[test]
    fn queue_counters_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<QueueCounters>(), 128);
    }
}
