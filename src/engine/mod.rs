//! Block devices: what a virtual disk is, independent of how it is served.
//!
//! Everything a guest can do to a disk goes through [`BlockDevice`]; the vhost layer checks
//! requests against [`BlockDevice::size`] before calling it, and implementations check again
//! because a bounds error must never become an out-of-range host I/O.

mod aligned;
pub mod allocation;
pub mod cow;
mod error;
pub mod io;
pub mod iov;
pub mod limits;
pub mod memory;
pub mod null;
pub mod pdata;
pub mod raw;
pub mod rbd;
pub mod thin;

use std::sync::Arc;

pub use allocation::{Allocation, AllocationRun};
pub use error::BlockError;
pub use io::{Extent, FlushFd, Hold, IoQueue, MapOp, Mapping, QueueOptions};
pub use iov::{Bufs, BufsMut};

/// Turns an `Arc` of a device into a trait object, so that a default method can hand the
/// device itself to the queue it opens. Implemented for every sized device.
pub trait AsDynDevice {
    fn as_dyn(self: Arc<Self>) -> Arc<dyn BlockDevice>;
}

impl<T: BlockDevice + 'static> AsDynDevice for T {
    fn as_dyn(self: Arc<Self>) -> Arc<dyn BlockDevice> {
        self
    }
}

/// A virtual disk: byte-addressed, sector-granular I/O with scatter-gather buffers.
///
/// Frontends do their I/O through [`BlockDevice::open_queue`]; the synchronous methods are
/// for the engine itself, tools and tests.
pub trait BlockDevice: AsDynDevice + Send + Sync {
    /// Size in bytes, a multiple of 512.
    fn size(&self) -> u64;

    /// Fills `bufs`, in order, from the bytes starting at `offset`.
    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError>;

    /// Writes `bufs`, in order, at `offset`. Durable only after [`BlockDevice::flush`].
    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BlockError>;

    /// Tells the device the range is no longer needed: reads may return zeros or old data.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;

    /// Makes the range read as zeros; with `may_unmap` the space may be released as well.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError>;

    /// A queue for one frontend queue worker's asynchronous I/O (see [`io`]). By default
    /// io_uring for what [`BlockDevice::map`] maps, a blocking thread for the rest.
    fn open_queue(self: Arc<Self>, opts: &QueueOptions) -> std::io::Result<Box<dyn IoQueue>> {
        io::default_queue(self.as_dyn(), opts)
    }

    /// Where a range lives on host files, so the engine's ring can do the I/O itself.
    /// `None`: the range needs the synchronous methods (or the device has no such mapping).
    /// The descriptors stay valid for as long as the device lives; the mapping stays valid
    /// while its `hold` is kept, which the caller drops when the I/O has completed.
    fn map(&self, _op: MapOp, _offset: u64, _len: u64) -> Result<Option<Mapping>, BlockError> {
        Ok(None)
    }

    /// A host file whose fdatasync makes every completed write durable, if there is one,
    /// and where a failure of it is recorded (so that every later flush fails too).
    fn flush_fd(&self) -> Option<FlushFd> {
        None
    }

    /// Takes a snapshot named `name` of the device's own backing where it has them (an RBD
    /// image: `blockdev-snapshot-internal-sync` on a raw `rbd=` export). Thin devices take
    /// theirs through their pool instead.
    fn snapshot_internal(&self, _name: &str) -> Result<(), BlockError> {
        Err(BlockError::Unsupported("internal snapshots of this device"))
    }

    /// How `[offset, offset + len)` is allocated: consecutive runs from `offset`, covering at
    /// least one byte and at most `len` (an answer may stop short; ask again from its end).
    /// The range must lie within the device. By default everything is data.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<AllocationRun>, BlockError> {
        check_range(offset, len, self.size())?;
        Ok(vec![AllocationRun {
            len,
            state: Allocation::Data,
        }])
    }
}

/// Where a thin pool keeps its data blocks: a [`BlockDevice`] that can also grow. The pool
/// takes it as a trait object, so tests put fault-injecting and power-cut devices under it.
pub trait DataDevice: BlockDevice {
    /// Extends the device to at least `size` bytes where it can (a regular file), then re-reads
    /// its size and returns it. Never shrinks.
    fn grow_to(&self, size: u64) -> Result<u64, BlockError>;

    /// Whether the range reads as zeros without being written to (a hole, or space allocated
    /// but never written, as the host file system reports it). `false` when it cannot tell.
    fn reads_as_zeros(&self, _offset: u64, _len: u64) -> bool {
        false
    }

    /// Allocates host space for the range where it is a hole, leaving every byte as it reads
    /// now. Best effort: a device that cannot does nothing.
    fn preallocate(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Ok(())
    }

    /// Whether a pool's data I/O on this device goes through the device's own queue
    /// ([`BlockDevice::open_queue`]) by offset: a device without host files to map but with
    /// an asynchronous queue of its own (an RBD image). A thin device then maps its data to
    /// [`Extent::Below`] and its queue is an [`io::StackedQueue`] on this device's queue.
    fn through_queue(&self) -> bool {
        false
    }
}

pub use aligned::{direct_aligned, DIRECT_ALIGN};

/// Total length of a scatter-gather list, or `None` if it does not fit a `u64`.
pub fn iovec_len<T: std::ops::Deref<Target = [u8]>>(bufs: &[T]) -> Option<u64> {
    bufs.iter()
        .try_fold(0u64, |acc, b| acc.checked_add(u64::try_from(b.len()).ok()?))
}

/// Checks that `[offset, offset + len)` lies within a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
