//! The queue of a device stacked on another device's queue: a thin device whose pool keeps
//! its data on a device without host files (an RBD image). What the device maps to
//! [`Extent::Below`] goes, as requests of their own, to the queue of the device below, which
//! does them asynchronously (`rbd_aio_*`) and completes into its eventfd, the eventfd this
//! queue's worker waits on. Everything else runs on the queue's blocking thread, as in the
//! default queue (`uring.rs`): requests the device does not map (first writes that copy,
//! ranges its mapping cannot take), flush (a thin pool's commit), discard, write-zeroes,
//! reruns of transfers that failed below, and the flushes of write-through writes.
//!
//! The engine's rules are the default queue's, through the same [`Hold`]: the hold (the
//! request's place in the pool's I/O gate, and a first write's new blocks) is kept while the
//! request's I/O is in flight below, so a commit's grace period waits for it; it is told how
//! the I/O ended before the request completes, and a first write's mappings go in only then.
//! A flush commits on the blocking thread while the worker keeps reaping the queue below.
//! A request of more than [`MAX_EXTENTS`] pieces takes the synchronous path.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::Arc;

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use super::blocking::{Blocking, Job};
use super::cursor::Cursor;
use super::{Completion, Extent, Hold, IoOp, IoQueue, IoRequest, MapOp, QueueOptions, MAX_EXTENTS};
use crate::engine::iov::RawBufs;
use crate::engine::{BlockDevice, BlockError};

/// A request whose pieces are in flight below.
#[derive(Default)]
struct Slot {
    req: Option<IoRequest>,
    hold: Option<Box<dyn Hold>>,
    /// Pieces submitted below and not yet reaped.
    pending: usize,
    /// A piece failed: the whole request is rerun synchronously.
    failed: bool,
}

/// Where a request goes.
enum Route {
    Below,
    Sync(IoRequest),
    Done(Completion),
}

pub struct StackedQueue {
    dev: Arc<dyn BlockDevice>,
    below: Box<dyn IoQueue>,
    sync: Blocking,
    slots: Vec<Slot>,
    free: Vec<usize>,
    ready: VecDeque<Completion>,
    /// Completions reaped from below (the buffer is reused).
    landed: Vec<Completion>,
    /// The pieces of the request being planned (the buffer is reused).
    plan: Vec<(u64, RawBufs)>,
    /// Requests accepted and not yet reaped.
    accepted: usize,
    cap: usize,
}

impl StackedQueue {
    /// A queue for `dev` whose [`Extent::Below`] pieces go to `below`. The notifier is
    /// `below`'s, which the blocking thread signals too: `below` must consume it in
    /// [`IoQueue::acknowledge`] (the RBD and io_uring queues do).
    pub fn open(
        dev: Arc<dyn BlockDevice>,
        below: Box<dyn IoQueue>,
        opts: &QueueOptions,
    ) -> io::Result<Box<dyn IoQueue>> {
        let cap = opts.entries.clamp(1, 1 << 15) as usize;
        // SAFETY: `dup` of a valid descriptor; on success the new descriptor is ours alone
        // and handed to the EventFd, which closes it.
        let notify = unsafe {
            let fd = libc::dup(below.notifier());
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            EventFd::from_raw_fd(fd)
        };
        Ok(Box::new(StackedQueue {
            sync: Blocking::new(dev.clone(), Arc::new(notify)),
            dev,
            below,
            slots: Vec::new(),
            free: Vec::new(),
            ready: VecDeque::with_capacity(cap),
            landed: Vec::with_capacity(cap),
            plan: Vec::new(),
            accepted: 0,
            cap,
        }))
    }

    /// Submits `req`'s pieces below, or says where it goes instead.
    fn start(&mut self, req: IoRequest) -> Route {
        let op = match req.op {
            IoOp::Read => MapOp::Read,
            IoOp::Write => MapOp::Write,
            _ => return Route::Sync(req),
        };
        let len = req.bufs.len();
        if len == 0 {
            return Route::Sync(req);
        }
        // An error is the synchronous method's to report.
        let Ok(Some(mapping)) = self.dev.map(op, req.offset, len) else {
            return Route::Sync(req);
        };
        self.plan.clear();
        if mapping.extents.len() > MAX_EXTENTS
            || !plan(&mut self.plan, &mapping.extents, &req.bufs, op)
        {
            // Dropping the hold gives back what it held (a first write's new blocks).
            return Route::Sync(req);
        }
        if self.plan.is_empty() {
            // Nothing to transfer (a read of ranges that read as zeros).
            return Route::Done(Completion {
                tag: req.tag,
                result: mapping.hold.map_or(Ok(()), |h| h.finish(true)),
            });
        }
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            self.slots.len() - 1
        });
        let read = op == MapOp::Read;
        let Some(slot) = self.slots.get_mut(index) else {
            return Route::Sync(req);
        };
        slot.pending = self.plan.len();
        slot.failed = false;
        slot.hold = mapping.hold;
        slot.req = Some(req);
        for (offset, bufs) in self.plan.drain(..) {
            self.below.submit(IoRequest {
                op: if read { IoOp::Read } else { IoOp::Write },
                offset,
                bufs,
                durable: false,
                tag: index as u64,
            });
        }
        Route::Below
    }

    /// A piece came back from below.
    fn piece_done(&mut self, c: Completion) {
        let index = c.tag as usize;
        let Some(slot) = self.slots.get_mut(index).filter(|s| s.pending > 0) else {
            warn!("completion from below for an unknown request {}", c.tag);
            return;
        };
        if let Err(e) = c.result {
            if !slot.failed {
                warn!("I/O below failed: {e}; redoing the request synchronously");
            }
            slot.failed = true;
        }
        slot.pending -= 1;
        if slot.pending == 0 {
            self.finish(index);
        }
    }

    /// A request whose pieces have all come back.
    fn finish(&mut self, index: usize) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let Some(req) = slot.req.take() else {
            return;
        };
        let hold = slot.hold.take();
        let failed = slot.failed;
        self.free.push(index);
        let finished = hold.map_or(Ok(()), |h| h.finish(!failed));
        if failed {
            // The device's own method decides what the error means (a thin pool turns
            // read-only when a data write fails) and reports it.
            self.sync.push(Job::Run(req));
        } else if let Err(e) = finished {
            warn!("{:?} could not be completed: {e}", req.op);
            self.ready.push_back(Completion {
                tag: req.tag,
                result: Err(e),
            });
        } else if req.durable && req.op.mutates() {
            self.sync.push(Job::MakeDurable(req));
        } else {
            self.ready.push_back(Completion {
                tag: req.tag,
                result: Ok(()),
            });
        }
    }

    fn collect(&mut self) {
        let mut landed = std::mem::take(&mut self.landed);
        self.below.reap(&mut |c| landed.push(c));
        for c in landed.drain(..) {
            self.piece_done(c);
        }
        self.landed = landed;
        self.sync.collect(&mut self.ready);
    }
}

/// Cuts `bufs` along `extents` into the pieces to submit below (`(offset below, buffers)`),
/// zero-filling what reads as zeros. `false`: the request must take the synchronous path
/// (an extent this queue cannot do, or a mapping that does not cover the buffers exactly).
fn plan(out: &mut Vec<(u64, RawBufs)>, extents: &[Extent], bufs: &RawBufs, op: MapOp) -> bool {
    let mut cursor = Cursor::new(bufs.pieces());
    for ext in extents {
        match *ext {
            Extent::Zero { len } if op == MapOp::Read => {
                let ok = cursor.each(len, |p| {
                    // SAFETY: the piece lies within the request's own buffer, valid and
                    // touched by nothing else in this process until the request completes.
                    unsafe { std::ptr::write_bytes(p.ptr, 0, p.len) }
                });
                if !ok {
                    return false;
                }
            }
            Extent::Below { offset, len } => {
                let mut pieces: smallvec::SmallVec<[(*mut u8, usize); 3]> = Default::default();
                if !cursor.each(len, |p| pieces.push((p.ptr, p.len))) {
                    return false;
                }
                // SAFETY: the pieces lie within the request's buffers, which stay valid (the
                // request's own `RawBufs` keeps them mapped) until the request completes; it
                // completes only after every piece submitted below has come back.
                out.push((offset, unsafe { RawBufs::new(pieces, None) }));
            }
            Extent::Zero { .. } | Extent::File { .. } => return false,
        }
    }
    cursor.at_end()
}

impl IoQueue for StackedQueue {
    fn submit(&mut self, req: IoRequest) {
        self.accepted += 1;
        if self.accepted > self.cap {
            self.ready.push_back(Completion {
                tag: req.tag,
                result: Err(BlockError::Busy),
            });
            return;
        }
        match self.start(req) {
            Route::Below => {}
            Route::Sync(req) => self.sync.push(Job::Run(req)),
            Route::Done(c) => self.ready.push_back(c),
        }
    }

    fn submit_pending(&mut self) {
        self.below.submit_pending();
    }

    fn notifier(&self) -> RawFd {
        self.below.notifier()
    }

    /// The blocking thread signals the same eventfd, which `below` consumes.
    fn acknowledge(&mut self) {
        self.below.acknowledge();
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty() || self.below.has_completions() || self.sync.has_done()
    }

    fn reap(&mut self, out: &mut dyn FnMut(Completion)) -> usize {
        self.collect();
        let n = self.ready.len();
        self.accepted -= n;
        for c in self.ready.drain(..) {
            out(c);
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.accepted
    }

    fn completes_slowly(&self) -> bool {
        self.below.completes_slowly()
    }

    fn drain(&mut self) {
        self.submit_pending();
        loop {
            self.collect();
            if self.ready.len() >= self.accepted {
                return;
            }
            if self.below.in_flight() > 0 {
                self.below.drain();
            } else {
                // What is left runs on the blocking thread (a commit may wait there for
                // pieces that were in flight below: they were collected above).
                self.sync.wait_one();
            }
        }
    }
}

impl Drop for StackedQueue {
    fn drop(&mut self) {
        // The device below may still use the requests' buffers: wait for it.
        self.drain();
    }
}
