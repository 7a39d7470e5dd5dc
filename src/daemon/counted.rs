//! An export's device seen through its statistics: every request any frontend submits to a
//! queue is counted when it completes (see `stats.rs`). The synchronous methods are not
//! frontends' traffic and pass straight through.

use std::os::fd::RawFd;
use std::sync::Arc;

use log::debug;

use super::stats::{Done, ExportStats, Kind, QueueStats};
use crate::engine::io::{Completion, IoOp, IoQueue, IoRequest, QueueOptions};
use crate::engine::{BlockDevice, BlockError, Bufs, BufsMut};

pub struct Counted {
    inner: Arc<dyn BlockDevice>,
    stats: Arc<ExportStats>,
}

impl Counted {
    pub fn new(inner: Arc<dyn BlockDevice>, stats: Arc<ExportStats>) -> Self {
        Counted { inner, stats }
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
    /// When it was submitted, in ns since the export's epoch.
    start: u64,
}

struct CountedQueue {
    inner: Box<dyn IoQueue>,
    stats: QueueStats,
    /// Whether requests are timed: a device that finishes inside `submit` (null, memory) is
    /// not, so that it costs one clock read per completion batch and nothing per request.
    timed: bool,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
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

impl IoQueue for CountedQueue {
    fn submit(&mut self, mut req: IoRequest) {
        let (bytes, end) = request_bytes(&req);
        let start = if self.timed { self.stats.now() } else { 0 };
        let slot = Slot {
            tag: req.tag,
            kind: Kind::of(&req.op),
            bytes,
            end,
            start,
        };
        req.tag = self.insert(slot);
        self.inner.submit(req)
    }
    fn submit_pending(&mut self) {
        self.inner.submit_pending()
    }
    fn notifier(&self) -> RawFd {
        self.inner.notifier()
    }
    fn has_completions(&mut self) -> bool {
        self.inner.has_completions()
    }
    fn reap(&mut self, out: &mut dyn FnMut(Completion)) -> usize {
        self.stats.refresh();
        let CountedQueue {
            inner,
            stats,
            timed,
            slots,
            free,
        } = self;
        // One clock read for the whole batch, taken when its first completion comes.
        let mut now = None;
        inner.reap(&mut |c: Completion| {
            let index = usize::try_from(c.tag).unwrap_or(usize::MAX);
            let Some(slot) = slots.get_mut(index).and_then(Option::take) else {
                debug!("completion for a request this queue never took ({})", c.tag);
                return;
            };
            free.push(index);
            let at = *now.get_or_insert_with(|| stats.now());
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
        self.inner.in_flight()
    }
    fn drain(&mut self) {
        self.inner.drain()
    }
    fn completes_at_submit(&self) -> bool {
        self.inner.completes_at_submit()
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
        let counted = Arc::new(Counted::new(dev, stats.clone()));
        let mut q = counted.open_queue(&opts()).unwrap();
        let flush = IoRequest::unbuffered(IoOp::Flush, false, 77);
        q.submit(flush);
        let range = ByteRange {
            offset: 4096,
            len: 8192,
            may_unmap: false,
        };
        q.submit(IoRequest::unbuffered(IoOp::Discard(vec![range]), false, 5));
        q.submit(IoRequest::unbuffered(
            IoOp::WriteZeroes(vec![range]),
            false,
            5,
        ));
        let range = ByteRange {
            offset: 1 << 30,
            len: 512,
            may_unmap: false,
        };
        q.submit(IoRequest::unbuffered(IoOp::Discard(vec![range]), false, 9));
        let mut tags = Vec::new();
        q.reap(&mut |c| tags.push((c.tag, c.result.is_ok())));
        assert_eq!(tags, [(77, true), (5, true), (5, true), (9, false)]);
        let s = stats.snapshot();
        assert_eq!(s.ops, [0, 1, 1, 1]);
        assert_eq!(s.bytes, [0, 8192, 0, 8192]);
        assert_eq!(s.failed, [0, 0, 0, 1]);
        assert_eq!(s.wr_highest_offset, 12288);
    }
}
