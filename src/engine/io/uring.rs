//! The default queue: reads, writes and flushes a device maps to host files go through an
//! io_uring whose completions wake the queue's worker through an eventfd in its epoll, so
//! one worker keeps many requests in flight. Everything else goes to the queue's blocking
//! thread (`blocking.rs`), which completes into the same eventfd:
//! - requests the device does not map, discard and write-zeroes;
//! - what the ring cannot take: unaligned O_DIRECT, more than `MAX_EXTENTS` extents, more
//!   than `MAX_SEGMENTS` buffers per extent, more operations than the completion queue has
//!   room for;
//! - reruns of transfers the ring failed or cut short: the device's own method decides what
//!   the error means (a thin pool turns read-only when a data write fails) and reports it;
//! - the flush that makes a write-through write durable, after its data is written.
//!
//! A mapping's hold is told how its I/O ended before the request completes (a thin first
//! write inserts its mappings there, and an error from it fails the request).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use log::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::blocking::{Blocking, Job};
use super::cursor::Cursor;
use super::{
    Completion, Extent, FlushState, Hold, IoOp, IoQueue, IoRequest, MapOp, QueueOptions,
    MAX_EXTENTS, MAX_SEGMENTS,
};
use crate::engine::{direct_aligned, BlockDevice, BlockError};

/// Slot index in the high half of an entry's user data, operation index in the low half.
const SLOT_SHIFT: u32 = 32;

/// One host operation of a request.
struct HostOp {
    fd: RawFd,
    offset: u64,
    /// Where its iovecs are in the slot's list.
    first: usize,
    count: usize,
    /// Bytes it must transfer (0 for fsync).
    expected: u64,
}

/// A request in the ring. Slots are reused, and so are their lists' heap buffers, so a
/// request costs no allocation here.
#[derive(Default)]
struct Slot {
    req: Option<IoRequest>,
    /// The iovecs the kernel reads; not touched until every operation has completed.
    iovecs: Vec<libc::iovec>,
    ops: Vec<HostOp>,
    pending: usize,
    /// The first error a host operation reported, or a short transfer (`Some(0)`).
    failed: Option<i32>,
    hold: Option<Box<dyn Hold>>,
    /// For an fsync: where its outcome is recorded.
    flush: Option<Arc<FlushState>>,
}

// SAFETY: the iovecs point into memory the slot's request keeps alive (its `RawBufs`); they
// are read by the kernel only, and the slot moves between threads only with its queue.
unsafe impl Send for Slot {}

/// Where a request goes.
enum Route {
    Ring,
    Sync(IoRequest),
    Done(Completion),
}

pub struct UringQueue {
    dev: Arc<dyn BlockDevice>,
    /// `None` where io_uring is unavailable: everything goes to the blocking thread.
    ring: Option<IoUring>,
    notify: Arc<EventFd>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Scratch list of slots whose operations have all completed.
    finished: Vec<usize>,
    ops_in_flight: usize,
    /// The completion queue's size: never more operations in flight than that.
    ops_cap: usize,
    sync: Blocking,
    ready: VecDeque<Completion>,
    /// Requests accepted and not yet reaped.
    accepted: usize,
    cap: usize,
    unsubmitted: usize,
    batch: usize,
}

impl UringQueue {
    pub fn open(dev: Arc<dyn BlockDevice>, opts: &QueueOptions) -> io::Result<Box<dyn IoQueue>> {
        let cap = opts.entries.clamp(1, 1 << 15) as usize;
        let notify = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        // Room for the largest request the ring takes, and two operations per request.
        let sq = (opts.entries.clamp(1, 1 << 14) * 2)
            .max(MAX_EXTENTS as u32)
            .next_power_of_two();
        let ring = match IoUring::builder().setup_cqsize(sq * 4).build(sq) {
            Ok(r) => match r.submitter().register_eventfd(notify.as_raw_fd()) {
                Ok(()) => Some(r),
                Err(e) => {
                    warn!("cannot register the queue's eventfd in io_uring ({e}); using synchronous I/O");
                    None
                }
            },
            Err(e) => {
                warn!("io_uring unavailable ({e}); using synchronous I/O");
                None
            }
        };
        let ops_cap = ring
            .as_ref()
            .map_or(0, |r| r.params().cq_entries() as usize);
        Ok(Box::new(UringQueue {
            sync: Blocking::new(dev.clone(), notify.clone()),
            dev,
            ring,
            notify,
            slots: Vec::new(),
            free: Vec::new(),
            finished: Vec::new(),
            ops_in_flight: 0,
            ops_cap,
            ready: VecDeque::with_capacity(cap),
            accepted: 0,
            cap,
            unsubmitted: 0,
            batch: usize::from(opts.submit_batch.max(1)),
        }))
    }

    /// Puts `req` in the ring, or says where it goes instead.
    fn start(&mut self, req: IoRequest) -> Route {
        let Some(ring) = self.ring.as_mut() else {
            return Route::Sync(req);
        };
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
        };
        let Some(slot) = self.slots.get_mut(index) else {
            return Route::Sync(req);
        };
        let planned = plan(slot, &*self.dev, &req);
        let fits = matches!(planned, Ok(Some(n))
            if n > 0 && self.ops_in_flight + n <= self.ops_cap && room(ring, n));
        if !fits {
            let hold = slot.hold.take();
            slot.flush = None;
            self.free.push(index);
            return match planned {
                Err(done) => Route::Done(Completion {
                    tag: req.tag,
                    result: Err(done),
                }),
                // Nothing to transfer (a read of ranges that read as zeros).
                Ok(Some(0)) => Route::Done(Completion {
                    tag: req.tag,
                    result: hold.map_or(Ok(()), |h| h.finish(true)),
                }),
                // Dropping the hold gives back what it held (a first write's new blocks).
                Ok(_) => Route::Sync(req),
            };
        }
        let is_read = req.op == IoOp::Read;
        for (i, op) in slot.ops.iter().enumerate() {
            let user_data = ((index as u64) << SLOT_SHIFT) | i as u64;
            let entry = if slot.flush.is_some() {
                opcode::Fsync::new(types::Fd(op.fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
            } else {
                let iov = slot.iovecs[op.first..].as_ptr();
                let n = op.count as u32;
                if is_read {
                    opcode::Readv::new(types::Fd(op.fd), iov, n)
                        .offset(op.offset)
                        .build()
                } else {
                    opcode::Writev::new(types::Fd(op.fd), iov, n)
                        .offset(op.offset)
                        .build()
                }
            };
            push(ring, &entry.user_data(user_data));
        }
        slot.pending = slot.ops.len();
        slot.failed = None;
        self.ops_in_flight += slot.ops.len();
        slot.req = Some(req);
        self.unsubmitted += 1;
        if self.unsubmitted >= self.batch {
            self.submit_pending();
        }
        Route::Ring
    }

    /// Counts finished operations, and finishes the requests that have none left.
    fn collect_ring(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        for cqe in ring.completion() {
            let index = (cqe.user_data() >> SLOT_SHIFT) as usize;
            let op = (cqe.user_data() & ((1 << SLOT_SHIFT) - 1)) as usize;
            let Some(slot) = self.slots.get_mut(index).filter(|s| s.pending > 0) else {
                warn!("completion for an unknown request {}", cqe.user_data());
                continue;
            };
            self.ops_in_flight -= 1;
            let res = cqe.result();
            if res < 0 {
                slot.failed.get_or_insert(-res);
            } else if slot.ops.get(op).is_some_and(|o| res as u64 != o.expected) {
                // Short transfers are rare (end of file, signals): redo the whole request.
                slot.failed.get_or_insert(0);
            }
            slot.pending -= 1;
            if slot.pending == 0 {
                self.finished.push(index);
            }
        }
        for index in std::mem::take(&mut self.finished).drain(..) {
            self.finish(index);
        }
    }

    /// A request whose host operations have all completed.
    fn finish(&mut self, index: usize) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let Some(req) = slot.req.take() else {
            return;
        };
        let failed = slot.failed.take();
        let hold = slot.hold.take();
        let flush = slot.flush.take();
        self.free.push(index);
        if let Some(state) = flush {
            let outcome = match failed {
                Some(errno) if errno > 0 => Err(io::Error::from_raw_os_error(errno)),
                _ => Ok(()),
            };
            let result = state.record(outcome);
            self.ready.push_back(Completion {
                tag: req.tag,
                result,
            });
            return;
        }
        if let Some(errno) = failed.filter(|&e| e > 0) {
            if !matches!(errno, libc::EINVAL | libc::EAGAIN | libc::EINTR) {
                warn!(
                    "{:?} failed: {}; redoing it synchronously",
                    req.op,
                    io::Error::from_raw_os_error(errno)
                );
            }
        }
        let finished = hold.map_or(Ok(()), |h| h.finish(failed.is_none()));
        if failed.is_some() {
            // Its own place in the device's I/O gate went with its hold.
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
        self.collect_ring();
        self.sync.collect(&mut self.ready);
    }
}

/// Whether the submission queue has room for `n` more entries, submitting to make some.
fn room(ring: &mut IoUring, n: usize) -> bool {
    let free = |r: &mut IoUring| {
        let sq = r.submission();
        sq.capacity() - sq.len()
    };
    if free(ring) >= n {
        return true;
    }
    if let Err(e) = ring.submit() {
        warn!("io_uring submit failed: {e}");
    }
    free(ring) >= n
}

fn push(ring: &mut IoUring, entry: &squeue::Entry) {
    // SAFETY: the iovec list and the memory it points into are owned by the slot and its
    // request, which are not released until every entry of the slot has completed (`drain`
    // and `Drop` wait for that); file descriptors outlive the device. Room was checked.
    if unsafe { ring.submission().push(entry) }.is_err() {
        warn!("io_uring submission queue full after a check");
    }
}

/// Plans `req` into `slot`: its host operations and iovecs. `Ok(Some(n))`: `n` operations
/// (0: none needed); `Ok(None)`: the synchronous path must do it; `Err`: it fails at once.
fn plan(
    slot: &mut Slot,
    dev: &dyn BlockDevice,
    req: &IoRequest,
) -> Result<Option<usize>, BlockError> {
    slot.iovecs.clear();
    slot.ops.clear();
    slot.hold = None;
    slot.flush = None;
    const SYNC: Result<Option<usize>, BlockError> = Ok(None);
    let map_op = match &req.op {
        IoOp::Read => MapOp::Read,
        IoOp::Write => MapOp::Write,
        IoOp::Flush => {
            let Some(target) = dev.flush_fd() else {
                return SYNC;
            };
            target.state.check()?;
            slot.ops.push(HostOp {
                fd: target.fd,
                offset: 0,
                first: 0,
                count: 0,
                expected: 0,
            });
            slot.flush = Some(target.state);
            return Ok(Some(1));
        }
        IoOp::Discard(_) | IoOp::WriteZeroes(_) => return SYNC,
    };
    let len = req.bufs.len();
    if len == 0 {
        return SYNC;
    }
    let Ok(Some(mapping)) = dev.map(map_op, req.offset, len) else {
        // An error is the synchronous method's to report.
        return SYNC;
    };
    slot.hold = mapping.hold;
    if mapping.extents.len() > MAX_EXTENTS {
        return SYNC;
    }
    let mut cursor = Cursor::new(req.bufs.pieces());
    for ext in mapping.extents {
        match ext {
            Extent::Zero { len } => {
                if map_op != MapOp::Read {
                    return SYNC;
                }
                let ok = cursor.each(len, |p| {
                    // SAFETY: the piece lies in memory the request keeps valid, within its
                    // own buffer, which nothing else in this process touches until it
                    // completes.
                    unsafe { std::ptr::write_bytes(p.ptr, 0, p.len) }
                });
                if !ok {
                    return SYNC;
                }
            }
            // Only a stacked queue submits to the device below.
            Extent::Below { .. } => return SYNC,
            Extent::File {
                fd,
                offset,
                len,
                direct,
            } => {
                let first = slot.iovecs.len();
                let iovecs = &mut slot.iovecs;
                let ok = cursor.each(len, |p| {
                    iovecs.push(libc::iovec {
                        iov_base: p.ptr.cast(),
                        iov_len: p.len,
                    })
                });
                let count = slot.iovecs.len() - first;
                if !ok || count > MAX_SEGMENTS {
                    return SYNC;
                }
                let pieces = slot.iovecs[first..]
                    .iter()
                    .map(|v| (v.iov_base as usize, v.iov_len));
                if direct && !direct_aligned(offset, pieces) {
                    return SYNC;
                }
                slot.ops.push(HostOp {
                    fd,
                    offset,
                    first,
                    count,
                    expected: len,
                });
            }
        }
    }
    if !cursor.at_end() {
        return SYNC;
    }
    Ok(Some(slot.ops.len()))
}

impl IoQueue for UringQueue {
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
            Route::Ring => {}
            Route::Sync(req) => self.sync.push(Job::Run(req)),
            Route::Done(c) => self.ready.push_back(c),
        }
    }

    fn submit_pending(&mut self) {
        if std::mem::take(&mut self.unsubmitted) == 0 {
            return;
        }
        if let Some(ring) = self.ring.as_mut() {
            if let Err(e) = ring.submit() {
                // What is queued goes with the next submission.
                warn!("io_uring submit failed: {e}");
            }
        }
    }

    fn notifier(&self) -> RawFd {
        self.notify.as_raw_fd()
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty()
            || self
                .ring
                .as_mut()
                .is_some_and(|r| self.ops_in_flight > 0 && !r.completion().is_empty())
            || self.sync.has_done()
    }

    fn acknowledge(&mut self) {
        // Nonblocking: nothing to read (EAGAIN) just means nothing signalled.
        let _ = self.notify.read();
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

    fn drain(&mut self) {
        self.submit_pending();
        loop {
            self.collect();
            if self.ready.len() >= self.accepted {
                return;
            }
            if self.ops_in_flight > 0 {
                if let Some(ring) = self.ring.as_mut() {
                    if let Err(e) = ring.submit_and_wait(1) {
                        if e.kind() != io::ErrorKind::Interrupted {
                            warn!("waiting for io_uring completions failed: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                    }
                }
            } else {
                self.sync.wait_one();
            }
        }
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // The kernel may still be using buffers the slots point into: wait for it.
        self.drain();
    }
}
