//! One cached block: its bytes behind a reader/writer lock, and the bookkeeping the cache reads
//! without taking that lock.
//!
//! Invariants the rest of the cache relies on:
//! - `pins` counts the guards lent out (and a loader's hold while it reads the block in). It
//!   only goes up while the caller holds the block's shard lock, so a thread holding that shard
//!   lock for writing and seeing `pins == 0` knows no guard can appear before it removes the
//!   buffer. Write-back does not pin: it only writes dirty buffers, which eviction leaves alone,
//!   and forgetting one is covered by `io` below.
//! - `dirty` is set when a write guard is released and cleared by write-back while it holds the
//!   read lock, so a change made after a write started can never be marked clean by that write.
//! - `cached` is cleared, under the shard lock, when the buffer leaves the map. Write-back checks
//!   it under `io`, and whoever removes a buffer that might be in flight takes `io` once
//!   afterwards, so no write of a forgotten buffer can land after a newer buffer's write.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

/// The bytes of a block and whether they hold the block's contents yet.
pub(super) struct Data {
    pub bytes: Box<[u8]>,
    /// False while the first read from the store is in flight, and for good if it failed: a
    /// thread that waited on the lock must then look the block up again.
    pub valid: bool,
}

pub(super) struct Buffer {
    pub block: u64,
    pub data: Arc<RwLock<Data>>,
    pub tag: AtomicU32,
    pub pins: AtomicUsize,
    pub dirty: AtomicBool,
    /// The clock's "used since the hand last passed" bit.
    pub referenced: AtomicBool,
    pub cached: AtomicBool,
    /// Held for the duration of one store write of this buffer.
    pub io: Mutex<()>,
}

impl Buffer {
    pub fn new(block: u64, block_size: usize, valid: bool) -> Self {
        Buffer {
            block,
            data: Arc::new(RwLock::new(Data {
                bytes: vec![0u8; block_size].into_boxed_slice(),
                valid,
            })),
            tag: AtomicU32::new(0),
            pins: AtomicUsize::new(0),
            dirty: AtomicBool::new(false),
            referenced: AtomicBool::new(false),
            cached: AtomicBool::new(false),
            io: Mutex::new(()),
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    pub fn is_pinned(&self) -> bool {
        self.pins.load(Ordering::Acquire) != 0
    }

    pub fn is_cached(&self) -> bool {
        self.cached.load(Ordering::Acquire)
    }
}

/// A counted reference that keeps a buffer from being evicted or forgotten.
///
/// Create one only while holding the buffer's shard lock (see the module comment).
pub(super) struct Pin(Arc<Buffer>);

impl Pin {
    pub fn new(buf: &Arc<Buffer>) -> Self {
        buf.pins.fetch_add(1, Ordering::AcqRel);
        Pin(Arc::clone(buf))
    }
}

impl Deref for Pin {
    type Target = Buffer;

    fn deref(&self) -> &Buffer {
        &self.0
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        // Release pairs with the evictor's Acquire load: a dirty bit set before unpinning is
        // seen by whoever then finds the buffer unpinned.
        self.0.pins.fetch_sub(1, Ordering::Release);
    }
}
