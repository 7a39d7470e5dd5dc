//! The asynchronous I/O seam between a frontend (virtio today, NBD later) and a device.
//!
//! A frontend's queue worker gets one [`IoQueue`] per queue from its device
//! ([`crate::engine::BlockDevice::open_queue`]): it submits requests with raw buffers and a
//! tag of its own, waits on the queue's eventfd in its epoll, and collects completions
//! `(tag, result)`. How the device does the I/O is its own business:
//! - `uring.rs`: an io_uring for the reads, writes and flushes a device maps to host files
//!   ([`crate::engine::BlockDevice::map`]), with everything else handed to
//! - `blocking.rs`: a thread of the queue that runs the device's synchronous methods (devices
//!   without a mapping, discard, write-zeroes, first writes that copy, reruns of transfers
//!   the ring failed, and the flushes of write-through writes). It completes into the same
//!   eventfd. A synchronous method may wait (a thin pool's commit waits for the I/O the ring
//!   has in flight), so it never runs on the queue worker: the worker keeps reaping the ring
//!   and the wait ends.
//! - `inline.rs`: devices that never wait (null, memory) run on the worker itself.
//! - `stacked.rs`: a device stacked on another device's queue (a thin device on a pool whose
//!   data device is an RBD image): what it maps to [`Extent::Below`] goes to that queue as
//!   requests of their own, everything else to a blocking thread as above.
//!
//! Bounds a guest cannot break: a queue accepts at most [`QueueOptions::entries`] requests
//! in flight (more complete at once with an error), and a request the ring cannot take
//! whole (more than [`MAX_EXTENTS`] extents, more than [`MAX_SEGMENTS`] buffers per host
//! operation, or more operations than the completion queue has room for) runs through the
//! synchronous methods instead, which cut transfers into pieces of at most `IOV_MAX` buffers.

mod blocking;
mod cursor;
mod flush_state;
mod inline;
mod map;
mod run;
mod stacked;
mod uring;

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

pub use flush_state::{FlushFd, FlushState};
pub use inline::InlineQueue;
pub use map::{Extent, Hold, MapOp, Mapping};
pub use stacked::StackedQueue;

use super::iov::RawBufs;
use super::{BlockDevice, BlockError};

/// Host operations (extents) one request may become in the ring; a request that maps to
/// more runs through the device's synchronous methods.
pub const MAX_EXTENTS: usize = 64;

/// Buffers per host operation (`IOV_MAX`): what one readv or writev takes.
pub const MAX_SEGMENTS: usize = 1024;

/// How a queue is set up.
#[derive(Clone, Copy, Debug)]
pub struct QueueOptions {
    /// Requests in flight at most (a frontend's queue size); more complete with an error.
    pub entries: u32,
    /// Requests handed to the kernel per system call at most.
    pub submit_batch: u16,
}

/// A byte range of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
    /// For write-zeroes: the space may be released as well.
    pub may_unmap: bool,
}

/// What a request does.
#[derive(Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Fills the request's buffers from `offset`.
    Read,
    /// Writes the request's buffers at `offset`.
    Write,
    /// Makes every completed write durable.
    Flush,
    /// Each range in turn (all of them were checked by the frontend first). Boxed slices,
    /// not vectors: a request is moved through every queue that wraps another, and at 128
    /// bytes or less a move is a few register copies instead of a call to memcpy (see
    /// `a_request_moves_without_memcpy` in `tests.rs`).
    Discard(Box<[ByteRange]>),
    WriteZeroes(Box<[ByteRange]>),
}

impl IoOp {
    pub fn mutates(&self) -> bool {
        matches!(self, IoOp::Write | IoOp::Discard(_) | IoOp::WriteZeroes(_))
    }
}

/// One request handed to a queue.
pub struct IoRequest {
    pub op: IoOp,
    /// Byte offset of a read or write.
    pub offset: u64,
    /// The buffers of a read or write, and what keeps their memory mapped.
    pub bufs: RawBufs,
    /// Write-through: the request completes only once what it changed is durable.
    pub durable: bool,
    /// The caller's own name for it, handed back with its completion (never trusted to be
    /// unique: the queue keeps its own slots).
    pub tag: u64,
}

impl IoRequest {
    /// A request without buffers (flush, discard, write-zeroes).
    pub fn unbuffered(op: IoOp, durable: bool, tag: u64) -> Self {
        IoRequest {
            op,
            offset: 0,
            bufs: RawBufs::default(),
            durable,
            tag,
        }
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: Result<(), BlockError>,
}

/// One queue's asynchronous I/O, owned by one worker thread.
pub trait IoQueue: Send {
    /// Takes a request. It completes later, through [`IoQueue::reap`] (possibly at the next
    /// call, when it could be done at once or was refused).
    fn submit(&mut self, req: IoRequest);

    /// Hands the kernel what was submitted since the last call (submissions otherwise go
    /// in batches of `submit_batch`).
    fn submit_pending(&mut self);

    /// An eventfd that becomes readable when completions are waiting, for the worker's epoll.
    fn notifier(&self) -> RawFd;

    /// Resets the notifier. [`IoQueue::reap`] leaves it alone, so a polling worker reaps
    /// without a system call; a worker calls this when its epoll reported the notifier, and
    /// before it goes back to sleep after reaping without it (then reaps once more: what
    /// came before the reset no longer wakes it). A queue that wraps another must pass it on.
    fn acknowledge(&mut self);

    /// Whether completions are waiting, as cheaply as the queue can tell (for polling).
    fn has_completions(&mut self) -> bool;

    /// Hands every finished request to `out`; returns how many. Does not touch the notifier.
    fn reap(&mut self, out: &mut dyn FnMut(Completion)) -> usize;

    /// Requests accepted and not yet handed back by [`IoQueue::reap`].
    fn in_flight(&self) -> usize;

    /// Waits until every accepted request has finished (their completions are then waiting
    /// for [`IoQueue::reap`]). For a frontend taking its queue back, and for shutdown.
    fn drain(&mut self);

    /// Whether every request is finished by the time `submit` returns (the device never
    /// waits): the frontend then hands each back at once instead of at the end of its pass.
    fn completes_at_submit(&self) -> bool {
        false
    }

    /// Whether a request takes long enough (a network round trip, as RBD's) that a worker
    /// spinning for its completion, or for the guest's next request after it, spends more CPU
    /// than the wakeup it saves, and takes the CPU from the threads that complete it.
    fn completes_slowly(&self) -> bool {
        false
    }
}

/// Runs `req` through the device's synchronous methods on this thread (for tools, fuzzing
/// and tests; a frontend submits to a queue instead).
pub fn run_now(dev: &dyn BlockDevice, req: &IoRequest) -> Result<(), BlockError> {
    run::run(dev, req)
}

/// The queue a device gets unless it chooses otherwise: io_uring for what it maps to host
/// files, a blocking thread for the rest; only the thread where io_uring is unavailable.
pub fn default_queue(
    dev: Arc<dyn BlockDevice>,
    opts: &QueueOptions,
) -> io::Result<Box<dyn IoQueue>> {
    uring::UringQueue::open(dev, opts)
}

#[cfg(test)]
mod tests;
