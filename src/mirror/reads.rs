//! The mirror's source reads through the device's own I/O queue (the engine's io_uring path,
//! `engine::io`), several at once within a window counted in bytes, so the job's thread walks
//! the allocation and sends finished pieces to the target while the next reads are on the
//! disk. Synchronous reads on the job's thread (or a few threads) left the source's disk idle
//! whenever they sent, and the target's disk idle whenever they read.
//!
//! The queue maps a thin read as it maps a guest's (`MapOp::Read` with a pool ticket held
//! until the read completed), so a block a concurrent guest write remaps is not reused while
//! the read is on it: the same guarantee as `ThinDevice::read`'s I/O gate. What such a read
//! returns may predate the guest's write; that write marks the dirty map once it completed,
//! and the mirror copies its range again.
//!
//! Buffers are page-aligned (the O_DIRECT data files take them straight) and reused; a read's
//! buffer is not touched until its completion was reaped, and dropping `QueuedReads` waits
//! for every read still in flight before the buffers go.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;

use super::MirrorError;
use crate::engine::io::{Completion, IoOp, IoQueue, IoRequest, QueueOptions};
use crate::engine::iov::RawBufs;
use crate::engine::BlockDevice;

/// Alignment of read buffers: a page, which every O_DIRECT path takes.
pub const BUF_ALIGN: usize = 4096;
/// Requests the queue holds at most: a window of small pieces (single pool blocks) is cut
/// by this as well as by its bytes.
const QUEUE_ENTRIES: u32 = 256;
/// How long one wait for the queue's notifier lasts before it looks again (a missed wake-up
/// costs at most this, never a hang).
const POLL_MS: i32 = 100;

/// A buffer of at least `n` bytes at a `BUF_ALIGN` boundary inside `storage` (grown as
/// needed). The slice starts at most `BUF_ALIGN - 1` bytes in.
pub fn aligned(storage: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if storage.len() < n + BUF_ALIGN {
        storage.resize(n + BUF_ALIGN, 0);
    }
    // usize::MAX if it cannot be aligned: the slice then starts at 0 and the read goes
    // through the synchronous path, still correct.
    let skip = match storage.as_ptr().align_offset(BUF_ALIGN) {
        s if s < BUF_ALIGN => s,
        _ => 0,
    };
    &mut storage[skip..skip + n]
}

/// Takes a finished read: its offset, its buffer and length (the data is
/// `aligned(&mut buffer, len)`). The buffer comes back through `give_back` once sent; until
/// then its bytes count against the window.
pub type Deliver<'a> = dyn FnMut(u64, Vec<u8>, usize) -> Result<(), MirrorError> + 'a;

/// A read in flight: where it reads and the buffer it fills.
struct InFlight {
    offset: u64,
    len: usize,
    storage: Vec<u8>,
}

/// Reads of one source through its own queue, at most `window` bytes read and not given
/// back (in flight, or delivered and not yet done with).
pub struct QueuedReads {
    queue: Box<dyn IoQueue>,
    window: u64,
    /// Bytes of reads in flight, and of finished reads not given back yet.
    bytes: u64,
    held: u64,
    next_tag: u64,
    in_flight: HashMap<u64, InFlight>,
    /// Buffers of finished reads, reused by the next ones.
    spare: Vec<Vec<u8>>,
}

impl QueuedReads {
    pub fn open(source: Arc<dyn BlockDevice>, window: u64) -> std::io::Result<QueuedReads> {
        let queue = source.open_queue(&QueueOptions {
            entries: QUEUE_ENTRIES,
            submit_batch: 16,
        })?;
        Ok(QueuedReads {
            queue,
            window: window.max(1),
            bytes: 0,
            held: 0,
            next_tag: 0,
            in_flight: HashMap::new(),
            spare: Vec::new(),
        })
    }

    /// Whether a read of `len` bytes may start now (one read always may, however long).
    pub fn has_room(&self, len: u64) -> bool {
        (self.in_flight.is_empty() && self.held == 0)
            || (self.bytes + self.held + len <= self.window
                && self.in_flight.len() < QUEUE_ENTRIES as usize)
    }

    pub fn reading(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Bytes of finished reads whose buffers were not given back yet.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// A delivered buffer, done with: its bytes leave the window.
    pub fn give_back(&mut self, storage: Vec<u8>, len: usize) {
        self.held = self.held.saturating_sub(len as u64);
        self.spare.push(storage);
    }

    #[cfg(test)]
    pub fn bytes_in_flight(&self) -> u64 {
        self.bytes
    }

    /// Starts reading `len` bytes at `offset` (the caller checked `has_room`).
    pub fn start(&mut self, offset: u64, len: usize) {
        let mut storage = self.spare.pop().unwrap_or_default();
        let buf = aligned(&mut storage, len);
        let ptr = buf.as_mut_ptr();
        // SAFETY: `ptr..ptr + len` lies in `storage`'s heap buffer, which moves into
        // `in_flight` with the request (moving a Vec keeps its heap buffer where it is) and
        // is neither touched nor freed until the request's completion was reaped (`Drop`
        // drains the queue first).
        let bufs = unsafe { RawBufs::new([(ptr, len)], None) };
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        self.in_flight.insert(
            tag,
            InFlight {
                offset,
                len,
                storage,
            },
        );
        self.bytes += len as u64;
        self.queue.submit(IoRequest {
            op: IoOp::Read,
            offset,
            bufs,
            durable: false,
            tag,
        });
        self.queue.submit_pending();
    }

    /// Waits until at least one read finished (if any is in flight), and hands each finished
    /// one to `deliver`. The first error, the source's or `deliver`'s, is
    /// returned after every finished read was handled.
    pub fn wait_some(&mut self, deliver: &mut Deliver<'_>) -> Result<(), MirrorError> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let mut done: Vec<Completion> = Vec::new();
        loop {
            self.queue.submit_pending();
            self.queue.reap(&mut |c| done.push(c));
            if !done.is_empty() {
                break;
            }
            // Reset the notifier, then look once more: a completion that came before the
            // reset no longer wakes the poll.
            self.queue.acknowledge();
            self.queue.reap(&mut |c| done.push(c));
            if !done.is_empty() {
                break;
            }
            wait_readable(self.queue.notifier(), POLL_MS);
        }
        let mut first_err = None;
        for c in done {
            let Some(r) = self.in_flight.remove(&c.tag) else {
                continue;
            };
            self.bytes -= r.len as u64;
            // After an error nothing more is sent: the copy stops.
            if let Err(e) = c.result {
                first_err.get_or_insert(e.into());
            }
            if first_err.is_some() {
                self.spare.push(r.storage);
                continue;
            }
            self.held += r.len as u64;
            if let Err(e) = deliver(r.offset, r.storage, r.len) {
                // The buffer did not go anywhere to come back from.
                self.held -= r.len as u64;
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Hands every read in flight to `deliver` as it finishes; the first error.
    pub fn finish_all(&mut self, deliver: &mut Deliver<'_>) -> Result<(), MirrorError> {
        let mut first_err = None;
        while !self.in_flight.is_empty() {
            if let Err(e) = self.wait_some(deliver) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for QueuedReads {
    fn drop(&mut self) {
        // The kernel may still write into the buffers of reads in flight.
        self.queue.drain();
        self.queue.reap(&mut |_| {});
    }
}

/// Waits up to `ms` for `fd` to become readable (an interrupted or failed poll just returns:
/// the caller looks at the queue again).
fn wait_readable(fd: RawFd, ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut pfd, 1, ms);
    }
}
