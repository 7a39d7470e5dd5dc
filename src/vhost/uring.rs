//! Asynchronous host I/O for one queue: an io_uring whose completions wake the queue's worker
//! through an eventfd in its epoll, so one worker keeps many requests in flight.
//!
//! Only reads, writes and flushes of devices that map their ranges to host files go through the
//! ring; everything else, and anything the ring refuses (unaligned O_DIRECT, short transfers),
//! runs synchronously through the `BlockDevice` methods. So does a transfer the ring failed:
//! the device's own method decides what the error means (a thin pool turns read-only when a
//! data write fails) and reports it. Such a rerun waits until nothing else of the queue is in
//! flight, since a synchronous thin I/O may wait for a commit, which waits for those.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use log::warn;
use smallvec::SmallVec;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::execute::{complete, finish, from_block, host_slices, io_range, Outcome, Target};
use super::request::{Op, Request};
use crate::engine::{direct_aligned, Extent, Hold, MapOp};

/// A request whose host I/O is in the ring.
struct InFlight {
    vring: VringRwLock,
    head: u16,
    /// Keeps guest memory mapped while the kernel reads or writes it.
    mem: Arc<GuestMemoryMmap>,
    req: Request,
    /// One iovec array per submission; their heap buffers stay put until the request ends.
    iovecs: Vec<Vec<libc::iovec>>,
    /// Bytes each submission must transfer.
    expected: Vec<u64>,
    pending: usize,
    /// Something the ring could not do, or failed: rerun the request synchronously.
    retry_sync: bool,
    /// Used length on success (data bytes written to the guest).
    written: u32,
    /// Keeps the device's mapping valid until the I/O is done, and is told how it ended.
    hold: Option<Box<dyn Hold>>,
}

// SAFETY: the only non-Send fields are the iovec pointers, which point into guest memory that
// `mem` (an Arc) keeps mapped; they are dereferenced only by the kernel, and the struct is only
// reached through its queue's mutex.
unsafe impl Send for InFlight {}

/// One queue's ring and its requests in flight.
pub struct QueueRing {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Requests to rerun synchronously once nothing is in flight.
    reruns: Vec<InFlight>,
    /// Requests pushed since the last submit.
    unsubmitted: usize,
    /// Submit once this many requests are waiting.
    batch: usize,
}

/// What happened to a request handed to the ring.
pub enum Started {
    /// In the ring; it completes later.
    Queued,
    /// The ring cannot take it: run it synchronously.
    NotTaken(Request),
    /// Nothing to submit (a read of ranges that read as zeros): complete, used length given.
    Done(u32),
}

const SLOT_SHIFT: u32 = 16;

impl QueueRing {
    pub fn new(entries: u32, batch: u16) -> io::Result<QueueRing> {
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(QueueRing {
            ring,
            eventfd,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            reruns: Vec::new(),
            unsubmitted: 0,
            batch: usize::from(batch.max(1)),
        })
    }

    /// Readable when completions are waiting.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether completions are waiting (looks at the shared ring only, no system call).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Hands a request to the ring if it is a read, write or flush the device maps to host files.
    pub fn start(
        &mut self,
        vring: &VringRwLock,
        head: u16,
        mem: &Arc<GuestMemoryMmap>,
        req: Request,
        t: &Target<'_>,
    ) -> io::Result<Started> {
        let plan = match req.op {
            Op::Read | Op::Write => plan_rw(mem, &req, t),
            Op::Flush => t.dev.flush_fd().map(|fd| Plan {
                ops: vec![PlannedOp::Fsync { fd }],
                written: 0,
                hold: None,
            }),
            _ => None,
        };
        let Some(plan) = plan else {
            return Ok(Started::NotTaken(req));
        };
        if plan.ops.is_empty() {
            return Ok(Started::Done(finish(
                mem,
                &req,
                Outcome::ok(plan.written),
                t,
            )));
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let mut inflight = InFlight {
            vring: vring.clone(),
            head,
            mem: mem.clone(),
            req,
            iovecs: Vec::new(),
            expected: Vec::new(),
            pending: 0,
            retry_sync: false,
            written: plan.written,
            hold: plan.hold,
        };
        let mut entries = Vec::with_capacity(plan.ops.len());
        for (i, op) in plan.ops.into_iter().enumerate() {
            let user_data = ((slot as u64) << SLOT_SHIFT) | i as u64;
            let entry = match op {
                PlannedOp::Fsync { fd } => {
                    inflight.expected.push(0);
                    opcode::Fsync::new(types::Fd(fd))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                }
                PlannedOp::Rw { fd, offset, iov } => {
                    let len: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
                    inflight.expected.push(len);
                    let ptr = iov.as_ptr();
                    let n = iov.len() as u32;
                    inflight.iovecs.push(iov);
                    if inflight.req.op == Op::Read {
                        opcode::Readv::new(types::Fd(fd), ptr, n)
                            .offset(offset)
                            .build()
                    } else {
                        opcode::Writev::new(types::Fd(fd), ptr, n)
                            .offset(offset)
                            .build()
                    }
                }
            };
            entries.push(entry.user_data(user_data));
        }
        inflight.pending = entries.len();
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(inflight);
        }
        self.in_flight += 1;
        for entry in entries {
            loop {
                // SAFETY: the iovec arrays and the guest memory they point into are owned by the
                // slot, which is not freed until every submission of it has completed (and the
                // ring's Drop waits for that); file descriptors outlive the device.
                let pushed = unsafe { self.ring.submission().push(&entry) };
                if pushed.is_ok() {
                    break;
                }
                self.ring.submit()?;
            }
        }
        self.unsubmitted += 1;
        if self.unsubmitted >= self.batch {
            self.submit()?;
        }
        Ok(Started::Queued)
    }

    /// Submits everything queued so far, in one system call.
    pub fn submit(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.unsubmitted) > 0 {
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Counts finished submissions; returns the slots whose requests have no I/O left.
    fn collect(&mut self) -> Vec<usize> {
        let mut finished = Vec::new();
        for cqe in self.ring.completion() {
            let slot = (cqe.user_data() >> SLOT_SHIFT) as usize;
            let op = (cqe.user_data() & ((1 << SLOT_SHIFT) - 1)) as usize;
            let Some(Some(f)) = self.slots.get_mut(slot) else {
                warn!("completion for an unknown request {}", cqe.user_data());
                continue;
            };
            let res = cqe.result();
            if res < 0 {
                let errno = -res;
                if !matches!(errno, libc::EINVAL | libc::EAGAIN | libc::EINTR) {
                    warn!(
                        "{:?} failed: {}; redoing it synchronously",
                        f.req.op,
                        io::Error::from_raw_os_error(errno)
                    );
                }
                f.retry_sync = true;
            } else if f.expected.get(op).is_some_and(|&e| res as u64 != e) {
                // Short transfers are rare (end of file, signals): redo the whole request.
                f.retry_sync = true;
            }
            f.pending = f.pending.saturating_sub(1);
            if f.pending == 0 {
                finished.push(slot);
            }
        }
        finished
    }

    fn release(&mut self, slot: usize) -> Option<InFlight> {
        let f = self.slots.get_mut(slot).and_then(Option::take)?;
        self.free.push(slot);
        self.in_flight -= 1;
        Some(f)
    }

    /// Completes every request whose I/O has finished; returns whether any chain was used.
    pub fn reap(&mut self, t: &Target<'_>) -> io::Result<bool> {
        let _ = self.eventfd.read();
        let mut last_vring = None;
        for slot in self.collect() {
            let Some(mut f) = self.release(slot) else {
                continue;
            };
            let finished = f.hold.take().map_or(Ok(()), |h| h.finish(!f.retry_sync));
            if f.retry_sync {
                // Its own place in the device's I/O gate went with its hold, the others' go
                // as they finish.
                self.reruns.push(f);
                continue;
            }
            let outcome = if let Err(e) = finished {
                warn!("{:?} could not be completed: {e}", f.req.op);
                from_block(&e)
            } else if f.req.op == Op::Write && !t.writeback {
                match t.dev.flush() {
                    Ok(()) => Outcome::ok(f.written),
                    Err(_) => Outcome::ioerr("flush after a write-through write failed"),
                }
            } else {
                Outcome::ok(f.written)
            };
            let len = finish(&f.mem, &f.req, outcome, t);
            if let Err(e) = f.vring.add_used(f.head, len) {
                warn!("cannot return chain {}: {e}", f.head);
            }
            last_vring = Some(f.vring);
        }
        if self.in_flight == 0 {
            for f in std::mem::take(&mut self.reruns) {
                let len = complete(&f.mem, &f.req, t);
                if let Err(e) = f.vring.add_used(f.head, len) {
                    warn!("cannot return chain {}: {e}", f.head);
                }
                last_vring = Some(f.vring);
            }
        }
        // One worker serves one queue, so one notification covers the whole batch.
        let Some(vring) = last_vring else {
            return Ok(false);
        };
        if vring.needs_notification().unwrap_or(true) {
            vring.signal_used_queue()?;
        }
        Ok(true)
    }

    /// Waits until nothing is in flight, completing what finishes.
    pub fn drain(&mut self, t: &Target<'_>) -> io::Result<()> {
        while self.in_flight > 0 {
            self.ring.submit_and_wait(1)?;
            self.reap(t)?;
        }
        Ok(())
    }
}

impl Drop for QueueRing {
    fn drop(&mut self) {
        // The kernel may still be writing into buffers the slots own: wait for it.
        while self.in_flight > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            for slot in self.collect() {
                self.release(slot);
            }
        }
    }
}

enum PlannedOp {
    Rw {
        fd: i32,
        offset: u64,
        iov: Vec<libc::iovec>,
    },
    Fsync {
        fd: i32,
    },
}

struct Plan {
    ops: Vec<PlannedOp>,
    written: u32,
    hold: Option<Box<dyn Hold>>,
}

/// Splits a read or write along the device's extents, or `None` if the ring cannot do it.
fn plan_rw(mem: &GuestMemoryMmap, req: &Request, t: &Target<'_>) -> Option<Plan> {
    let (offset, len) = io_range(req, t.dev)?;
    if len == 0 {
        return None;
    }
    let map_op = if req.op == Op::Read {
        MapOp::Read
    } else {
        MapOp::Write
    };
    // Write-through writes are flushed before they complete: the synchronous path does that.
    if map_op == MapOp::Write && (t.read_only || !t.writeback) {
        return None;
    }
    let mapping = t.dev.map(map_op, offset, len).ok()??;
    let slices = host_slices(mem, &req.data)?;
    let mut ops = Vec::with_capacity(mapping.extents.len());
    let mut cursor = SliceCursor::new(&slices);
    for ext in mapping.extents {
        match ext {
            Extent::Zero { len } => {
                if map_op != MapOp::Read {
                    return None;
                }
                // Zeroed in place, so the pieces need no lasting list.
                for v in cursor.take::<SmallVec<[libc::iovec; 4]>>(len)? {
                    // SAFETY: the piece lies in guest memory that `mem` keeps mapped, within
                    // this request's own buffer, which nothing else touches until it completes.
                    unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                }
            }
            Extent::File {
                fd,
                offset: host_offset,
                len: ext_len,
                direct,
            } => {
                // A heap list: its address goes to the kernel and must not move with the plan.
                let iov = cursor.take::<Vec<libc::iovec>>(ext_len)?;
                let pieces = iov.iter().map(|v| (v.iov_base as usize, v.iov_len));
                if direct && !direct_aligned(host_offset, pieces) {
                    return None;
                }
                ops.push(PlannedOp::Rw {
                    fd,
                    offset: host_offset,
                    iov,
                });
            }
        }
    }
    let written = if req.op == Op::Read {
        u32::try_from(len).ok()?
    } else {
        0
    };
    Some(Plan {
        ops,
        written,
        hold: mapping.hold,
    })
}

/// Walks host buffers, cutting them into iovec lists of given byte lengths.
struct SliceCursor<'a> {
    slices: &'a [(*mut u8, usize)],
    index: usize,
    within: usize,
}

impl<'a> SliceCursor<'a> {
    fn new(slices: &'a [(*mut u8, usize)]) -> Self {
        SliceCursor {
            slices,
            index: 0,
            within: 0,
        }
    }

    fn take<L: Default + Extend<libc::iovec>>(&mut self, mut len: u64) -> Option<L> {
        let mut out = L::default();
        while len > 0 {
            let &(base, size) = self.slices.get(self.index)?;
            let avail = size - self.within;
            let n = (avail as u64).min(len) as usize;
            out.extend(Some(libc::iovec {
                iov_base: base.wrapping_add(self.within).cast(),
                iov_len: n,
            }));
            len -= n as u64;
            self.within += n;
            if self.within == size {
                self.index += 1;
                self.within = 0;
            }
        }
        Some(out)
    }
}
