//! The queue of an RBD device: every request becomes one or more `rbd_aio_*` calls on the
//! worker's thread, and librbd's callbacks (on librbd's own threads) post `(slot, return
//! value)` to a list and wake the worker through the queue's eventfd. No thread per request
//! or per queue: the worker collects the list when it reaps.
//!
//! - Reads and writes: `rbd_aio_readv`/`rbd_aio_writev` straight on the request's buffers
//!   (one call per `IOV_MAX` buffers). The buffers stay valid until the request completes
//!   (`RawBufs`' contract), and so does the slot's iovec list, which librbd keeps pointing
//!   into for a read until it completes.
//! - Flush: `rbd_aio_flush`, its outcome recorded in the device's sticky `FlushState`.
//! - Discard and write-zeroes: one `rbd_aio_discard`/`rbd_aio_write_zeroes` per range.
//! - Write-through (`durable`) writes, discards and write-zeroes: after their calls
//!   succeed, an `rbd_aio_flush` in the same slot; the request completes after it.
//!
//! A slot (and its callback argument, boxed so librbd's pointer to it stays valid while the
//! slot list grows) is reused only after every call started for it has been posted and
//! collected; `drain` (and `Drop`) wait for that, so no callback outlives the queue's state.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::warn;
use parking_lot::{Condvar, Mutex};
use rbd_sys as sys;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::RbdDevice;
use super::error::ceph_error;
use crate::engine::io::{ByteRange, Completion, IoOp, IoQueue, IoRequest, QueueOptions};
use crate::engine::{check_range, BlockDevice, BlockError};

/// What librbd's callbacks hand to the queue.
struct Shared {
    /// `(slot, return value)` of finished librbd calls.
    done: Mutex<Vec<(u32, isize)>>,
    /// Signalled with every post, for `drain`.
    posted: Condvar,
    notify: EventFd,
    /// The notifier was written and not reset since: one write per wake-up, not per call.
    signalled: AtomicBool,
    /// `done` is not empty: what a polling worker looks at, without taking the lock that
    /// librbd's threads take to post.
    any: AtomicBool,
}

impl Shared {
    fn post(&self, slot: u32, rv: isize) {
        {
            let mut done = self.done.lock();
            done.push((slot, rv));
            self.any.store(true, Ordering::Release);
        }
        self.posted.notify_all();
        if !self.signalled.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.notify.write(1) {
                warn!("cannot signal an RBD completion: {e}");
            }
        }
    }
}

/// A slot's callback argument.
struct CallbackArg {
    shared: Arc<Shared>,
    slot: u32,
}

/// librbd's completion callback (on one of librbd's threads).
unsafe extern "C" fn completed(c: sys::rbd_completion_t, arg: *mut c_void) {
    let (shared, slot) = {
        // SAFETY: `arg` is the boxed `CallbackArg` of a slot with this call in flight; the
        // queue keeps the box, and does not reuse the slot, until this call's post has been
        // collected. Nothing of it is touched after the post below.
        let arg = unsafe { &*arg.cast::<CallbackArg>() };
        (arg.shared.clone(), arg.slot)
    };
    // SAFETY: librbd calls this once per completion, after it completed; the completion is
    // released here, once, and not used again.
    let rv = unsafe {
        let rv = sys::rbd_aio_get_return_value(c);
        sys::rbd_aio_release(c);
        rv
    };
    shared.post(slot, rv);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The request's own calls.
    Io,
    /// The flush of a flush request, or of a write-through request after its calls.
    Flush,
}

struct Slot {
    req: Option<IoRequest>,
    /// The iovecs of a read or write, which librbd may use until the call completes.
    iovecs: Vec<libc::iovec>,
    arg: Box<CallbackArg>,
    stage: Stage,
    /// Calls started and not yet collected.
    pending: u32,
    /// The name of the stage's calls, for errors.
    call: &'static str,
    /// The first failure (errno) of the stage.
    failed: Option<i32>,
    /// Bytes the stage's calls reported.
    transferred: u64,
}

// SAFETY: the iovecs point into memory the slot's request keeps valid (`RawBufs`); they are
// only handed to librbd, and the slot moves between threads only with its queue.
unsafe impl Send for Slot {}

pub struct RbdQueue {
    dev: Arc<RbdDevice>,
    shared: Arc<Shared>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    ready: VecDeque<Completion>,
    /// The collected posts, swapped with `Shared::done` (its buffer is reused).
    scratch: Vec<(u32, isize)>,
    /// Requests accepted and not yet reaped.
    accepted: usize,
    cap: usize,
    /// librbd calls started whose posts have not been collected.
    in_librbd: usize,
}

impl RbdQueue {
    pub fn open(dev: Arc<RbdDevice>, opts: &QueueOptions) -> io::Result<RbdQueue> {
        let cap = opts.entries.clamp(1, 1 << 15) as usize;
        Ok(RbdQueue {
            dev,
            shared: Arc::new(Shared {
                done: Mutex::new(Vec::with_capacity(cap)),
                posted: Condvar::new(),
                notify: EventFd::new(EFD_NONBLOCK)?,
                signalled: AtomicBool::new(false),
                any: AtomicBool::new(false),
            }),
            slots: Vec::new(),
            free: Vec::new(),
            ready: VecDeque::with_capacity(cap),
            scratch: Vec::with_capacity(cap),
            accepted: 0,
            cap,
            in_librbd: 0,
        })
    }

    /// What the device refuses before any call: writes to a read-only image, ranges past
    /// its end, a flush after a failed one.
    fn refuse(&self, req: &IoRequest) -> Result<(), BlockError> {
        if req.op.mutates() {
            self.dev.writable()?;
        }
        let size = self.dev.size();
        match &req.op {
            IoOp::Read | IoOp::Write => check_range(req.offset, req.bufs.len(), size),
            IoOp::Discard(ranges) | IoOp::WriteZeroes(ranges) => ranges
                .iter()
                .try_for_each(|r| check_range(r.offset, r.len, size)),
            IoOp::Flush => self.dev.flush_state().check(),
        }
    }

    fn slot_for(&mut self, req: IoRequest) -> u32 {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = self.slots.len() as u32;
                self.slots.push(Slot {
                    req: None,
                    iovecs: Vec::new(),
                    arg: Box::new(CallbackArg {
                        shared: self.shared.clone(),
                        slot: i,
                    }),
                    stage: Stage::Io,
                    pending: 0,
                    call: "",
                    failed: None,
                    transferred: 0,
                });
                i
            }
        };
        if let Some(slot) = self.slots.get_mut(index as usize) {
            slot.req = Some(req);
            slot.stage = Stage::Io;
            slot.failed = None;
            slot.transferred = 0;
        }
        index
    }

    /// Starts one librbd call for slot `index`: `start` gets a fresh completion whose
    /// callback posts to this queue. A call that cannot start counts as failed.
    fn launch(
        &mut self,
        index: u32,
        call: &'static str,
        start: impl FnOnce(sys::rbd_completion_t) -> c_int,
    ) {
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        slot.call = call;
        let arg: *const CallbackArg = &*slot.arg;
        let mut c: sys::rbd_completion_t = ptr::null_mut();
        // SAFETY: the callback and its argument stay valid until the completion is posted and
        // collected (see `completed`); `c` is a valid place.
        let rc = unsafe {
            sys::rbd_aio_create_completion(arg.cast_mut().cast(), Some(completed), &mut c)
        };
        if rc < 0 {
            slot.failed.get_or_insert(-rc);
            return;
        }
        let rc = start(c);
        if rc < 0 {
            // SAFETY: librbd did not take the completion; it is released once, here.
            unsafe { sys::rbd_aio_release(c) };
            slot.failed.get_or_insert(-rc);
            return;
        }
        slot.pending += 1;
        self.in_librbd += 1;
        self.dev.aio_counts().begin();
    }

    /// Starts the calls of a request's `Io` stage (or its flush).
    fn start(&mut self, index: u32) {
        // Held until every call is started: the image stays open meanwhile (see `image.rs`).
        let rbd = Arc::clone(self.dev.image());
        let handle = match rbd.handle() {
            Ok(handle) => handle,
            Err(e) => {
                self.fail(index, "rbd_aio_*", e.raw_os_error().unwrap_or(libc::EBADF));
                self.finish_if_idle(index);
                return;
            }
        };
        let image = *handle;
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        let Some(req) = slot.req.as_ref() else {
            return;
        };
        let offset = req.offset;
        match &req.op {
            IoOp::Read | IoOp::Write => {
                let read = req.op == IoOp::Read;
                slot.iovecs.clear();
                slot.iovecs
                    .extend(req.bufs.pieces().iter().map(|p| libc::iovec {
                        iov_base: p.ptr.cast(),
                        iov_len: p.len,
                    }));
                let total = slot.iovecs.len();
                let base = slot.iovecs.as_ptr();
                let max = libc::UIO_MAXIOV as usize;
                let (mut first, mut at) = (0usize, 0u64);
                // One call per IOV_MAX buffers (a virtqueue's chains have fewer).
                while first < total {
                    let count = (total - first).min(max);
                    // SAFETY: `first + count <= total`: the run lies within the slot's list,
                    // whose heap buffer stays put (and unchanged) until the slot is reused.
                    let run = unsafe { std::slice::from_raw_parts(base.add(first), count) };
                    let run_len: u64 = run.iter().map(|v| v.iov_len as u64).sum();
                    let iov = run.as_ptr().cast::<sys::iovec>();
                    let (n, off) = (count as c_int, offset + at);
                    if read {
                        self.launch(index, "rbd_aio_readv", |c| {
                            // SAFETY: an open image; the iovecs and their buffers stay valid
                            // until the call's completion is collected (see the module doc).
                            unsafe { sys::rbd_aio_readv(image, iov, n, off, c) }
                        });
                    } else {
                        self.launch(index, "rbd_aio_writev", |c| {
                            // SAFETY: as for reads.
                            unsafe { sys::rbd_aio_writev(image, iov, n, off, c) }
                        });
                    }
                    first += count;
                    at += run_len;
                }
            }
            IoOp::Flush => self.start_flush(index),
            IoOp::Discard(ranges) => {
                let ranges: Vec<ByteRange> = ranges.to_vec();
                for r in ranges {
                    self.launch(index, "rbd_aio_discard", |c| {
                        // SAFETY: an open image; no buffers.
                        unsafe { sys::rbd_aio_discard(image, r.offset, r.len, c) }
                    });
                }
            }
            IoOp::WriteZeroes(ranges) => {
                let ranges: Vec<ByteRange> = ranges.to_vec();
                for r in ranges {
                    let Ok(len) = usize::try_from(r.len) else {
                        self.fail(index, "rbd_aio_write_zeroes", libc::EINVAL);
                        continue;
                    };
                    self.launch(index, "rbd_aio_write_zeroes", |c| {
                        // SAFETY: an open image; no buffers.
                        unsafe { sys::rbd_aio_write_zeroes(image, r.offset, len, c, 0, 0) }
                    });
                }
            }
        }
        self.finish_if_idle(index);
    }

    fn start_flush(&mut self, index: u32) {
        let rbd = Arc::clone(self.dev.image());
        if let Some(slot) = self.slots.get_mut(index as usize) {
            slot.stage = Stage::Flush;
            slot.failed = None;
        }
        let handle = match rbd.handle() {
            Ok(handle) => handle,
            Err(e) => {
                self.fail(
                    index,
                    "rbd_aio_flush",
                    e.raw_os_error().unwrap_or(libc::EBADF),
                );
                return;
            }
        };
        let image = *handle;
        self.launch(index, "rbd_aio_flush", |c| {
            // SAFETY: an open image.
            unsafe { sys::rbd_aio_flush(image, c) }
        });
    }

    fn fail(&mut self, index: u32, call: &'static str, errno: i32) {
        if let Some(slot) = self.slots.get_mut(index as usize) {
            slot.call = call;
            slot.failed.get_or_insert(errno);
        }
    }

    /// Moves a slot whose calls have all been collected to its next stage, or completes it.
    fn finish_if_idle(&mut self, index: u32) {
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        if slot.pending > 0 {
            return;
        }
        let Some(req) = slot.req.as_ref() else {
            return;
        };
        let error = slot.failed.take().map(|errno| ceph_error(slot.call, errno));
        let result = match slot.stage {
            Stage::Io => match error {
                Some(e) => Err(BlockError::io(req.offset, e)),
                None if req.op == IoOp::Read && slot.transferred != req.bufs.len() => Err(
                    BlockError::io(req.offset, ceph_error("rbd_aio_readv", libc::EIO)),
                ),
                None if req.durable && req.op.mutates() => {
                    self.start_flush(index);
                    return self.finish_if_idle(index);
                }
                None => Ok(()),
            },
            Stage::Flush => self.dev.flush_state().record(error.map_or(Ok(()), Err)),
        };
        self.complete(index, result);
    }

    fn complete(&mut self, index: u32, result: Result<(), BlockError>) {
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        if let Some(req) = slot.req.take() {
            self.ready.push_back(Completion {
                tag: req.tag,
                result,
            });
        }
        slot.iovecs.clear();
        self.free.push(index);
    }

    /// Takes the posted completions and finishes the slots that have none left in flight.
    fn collect(&mut self) {
        let mut posts = std::mem::take(&mut self.scratch);
        {
            let mut done = self.shared.done.lock();
            std::mem::swap(&mut *done, &mut posts);
            self.shared.any.store(false, Ordering::Release);
        }
        for &(index, rv) in &posts {
            let Some(slot) = self.slots.get_mut(index as usize).filter(|s| s.pending > 0) else {
                warn!("RBD completion for an unknown request (slot {index})");
                continue;
            };
            self.in_librbd -= 1;
            self.dev.aio_counts().end();
            slot.pending -= 1;
            if rv < 0 {
                slot.failed
                    .get_or_insert(i32::try_from(-rv).unwrap_or(libc::EIO));
            } else {
                slot.transferred += rv as u64;
            }
            self.finish_if_idle(index);
        }
        posts.clear();
        self.scratch = posts;
    }
}

impl IoQueue for RbdQueue {
    fn submit(&mut self, req: IoRequest) {
        self.accepted += 1;
        let refused = if self.accepted > self.cap {
            Err(BlockError::Busy)
        } else {
            self.refuse(&req)
        };
        if let Err(e) = refused {
            self.ready.push_back(Completion {
                tag: req.tag,
                result: Err(e),
            });
            return;
        }
        let index = self.slot_for(req);
        self.start(index);
    }

    /// librbd takes every call as it is made.
    fn submit_pending(&mut self) {}

    fn notifier(&self) -> RawFd {
        self.shared.notify.as_raw_fd()
    }

    fn acknowledge(&mut self) {
        // Read first, then allow the next write: a post between the two is reaped by the
        // caller's next reap, and a post after them writes again.
        let _ = self.shared.notify.read();
        self.shared.signalled.store(false, Ordering::Release);
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty() || (self.in_librbd > 0 && self.shared.any.load(Ordering::Acquire))
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

    /// A request is a round trip to an OSD (hundreds of microseconds at best), completed by
    /// librbd's threads: a worker that spins meanwhile delays them (docs/benchmarks.md, "poll-us
    /// on RBD").
    fn completes_slowly(&self) -> bool {
        true
    }

    fn drain(&mut self) {
        loop {
            self.collect();
            if self.in_librbd == 0 {
                return;
            }
            let mut done = self.shared.done.lock();
            if done.is_empty() {
                // Bounded, in case a post raced with the check above.
                self.shared
                    .posted
                    .wait_for(&mut done, Duration::from_millis(100));
            }
        }
    }
}

impl Drop for RbdQueue {
    fn drop(&mut self) {
        // librbd may still write into the requests' buffers and call back into the slots.
        self.drain();
    }
}
