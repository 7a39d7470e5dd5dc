//! [`BufferCache`]: the public face of the metadata block cache.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;

use super::core::{Inner, Pressure};
use super::error::Result;
use super::guard::{ReadGuard, WriteGuard};
use super::stats::CacheStats;
use super::store::BlockStore;
use super::worker::{Job, Worker};

/// How a [`BufferCache`] is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufioConfig {
    /// Bytes per block. The store's own block size wins if they differ.
    pub block_size: usize,
    /// Most bytes of block data to keep cached (per-buffer bookkeeping, about 200 bytes, is not
    /// counted). At least one block is always allowed.
    pub memory_limit: usize,
}

impl Default for BufioConfig {
    fn default() -> Self {
        BufioConfig {
            block_size: 4096,
            memory_limit: 64 << 20,
        }
    }
}

/// A cache of a block store's blocks, shared between threads as `Arc<BufferCache>`.
///
/// Deadlock rules for callers, as in Linux's dm-bufio: a thread may hold several guards, but
/// must not ask for a write guard on a block it already holds, and must not call
/// [`BufferCache::write_dirty`] while it holds a write guard (that call waits for every write
/// guard on a dirty block to be released). Read guards on one block may be nested: a read
/// never queues behind a waiting writer while other reads of that block are held, which keeps
/// a thread re-reading a block it holds from deadlocking, at the price that a steady stream of
/// overlapping readers can delay a writer of that block.
///
/// When the limit is reached and every buffer is held, `read`, `write` and `new_block` fail
/// with [`super::BufioError::CacheFull`] rather than wait: size the limit for the guards your
/// threads hold at once.
///
/// Dropping the cache discards dirty buffers without writing them, like an aborted
/// transaction: commit with `write_dirty` first.
pub struct BufferCache {
    inner: Arc<Inner>,
    worker: Mutex<Option<Worker>>,
}

impl BufferCache {
    pub fn new(store: Arc<dyn BlockStore>, cfg: BufioConfig) -> Self {
        let block_size = store.block_size();
        if cfg.block_size != block_size {
            log::warn!(
                "bufio configured for {}-byte blocks but the store has {block_size}; using the store's",
                cfg.block_size
            );
        }
        let limit = cfg.memory_limit.max(block_size);
        BufferCache {
            inner: Arc::new(Inner::new(store, block_size, limit)),
            worker: Mutex::new(None),
        }
    }

    /// The block, from the cache or else read from the store. Several threads asking for the
    /// same uncached block share one read.
    pub fn read(&self, block: u64) -> Result<ReadGuard> {
        self.inner.read(block)
    }

    /// The block if it is cached and nobody is loading or modifying it; never does I/O or
    /// waits for a lock.
    pub fn get(&self, block: u64) -> Option<ReadGuard> {
        self.inner.get(block)
    }

    /// The block for modification, read from the store if not cached. Dirty once released.
    pub fn write(&self, block: u64) -> Result<WriteGuard> {
        self.inner.write(block)
    }

    /// The block for overwriting: zero-filled, never read, dirty once released.
    pub fn new_block(&self, block: u64) -> Result<WriteGuard> {
        self.inner.new_block(block, Pressure::WriteBack)
    }

    /// Writes every buffer that was dirty when called, in ascending block order, then flushes
    /// the store. On a write error the failing block (named in the error) and those after it
    /// stay dirty and nothing is flushed; a later call retries them. Also reports the first
    /// error of any asynchronous write-back since the last call.
    ///
    /// A failed flush is final: this and every later call fail (`Poisoned`), because what the
    /// device kept is unknown. Reads go on working.
    pub fn write_dirty(&self) -> Result<()> {
        self.inner.write_dirty()
    }

    /// Starts writing dirty buffers on the background thread and returns at once; errors are
    /// reported by the next [`BufferCache::write_dirty`]. Nothing is flushed.
    pub fn write_dirty_async(&self) {
        if self.inner.async_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        if !self.send(Job::WriteDirty) {
            self.inner.async_pending.store(false, Ordering::Release);
        }
    }

    /// Gives the guard's contents to `new_block` (dirty, with the guard's tag), and forgets the
    /// old block: its cached copy and any unwritten change to it are dropped. If the guard
    /// cannot be moved (`new_block` out of range), the old block is forgotten all the same, so
    /// a half-made change never reaches the old location.
    ///
    /// May exceed the memory limit by one block for the moment between creating the new
    /// buffer and dropping the old, when nothing clean can be evicted. Waits for other holders
    /// of `new_block` to release it, so the caller must not hold it itself.
    pub fn release_move(&self, guard: WriteGuard, new_block: u64) -> Result<()> {
        if new_block == guard.block() {
            return Ok(());
        }
        let moved = self
            .inner
            .new_block(new_block, Pressure::Overshoot)
            .map(|mut target| {
                target.copy_from_slice(&guard);
                target.set_tag(guard.tag());
            });
        // Detached while still write-locked: nobody can be writing the old buffer back.
        self.inner.detach(guard.pin());
        guard.release_clean();
        moved
    }

    /// Reads the blocks into the cache on the background thread. Stops early rather than evict
    /// dirty buffers; read errors are left for a later `read` to report.
    pub fn prefetch(&self, blocks: &[u64]) {
        let nr_blocks = self.inner.store.nr_blocks();
        let mut wanted: Vec<u64> = blocks
            .iter()
            .copied()
            .filter(|&b| b < nr_blocks && !self.inner.contains(b))
            .collect();
        if wanted.is_empty() {
            return;
        }
        wanted.sort_unstable();
        wanted.dedup();
        self.send(Job::Prefetch(wanted));
    }

    /// Drops the block from the cache unless someone holds it. A dirty block's changes are
    /// discarded: the caller knows they are no longer wanted.
    pub fn forget(&self, block: u64) {
        self.inner.forget(block);
    }

    /// Drops every dirty buffer without writing it, for aborting a transaction. Buffers still
    /// held leave the cache too; their holders' later changes are never written.
    pub fn discard_dirty(&self) {
        self.inner.discard_dirty();
    }

    /// Another name for [`BufferCache::discard_dirty`].
    pub fn forget_all_dirty(&self) {
        self.inner.discard_dirty();
    }

    pub fn stats(&self) -> CacheStats {
        self.inner.stats()
    }

    pub fn store(&self) -> &Arc<dyn BlockStore> {
        &self.inner.store
    }

    pub fn block_size(&self) -> usize {
        self.inner.block_size
    }

    /// Blocks on the store now.
    pub fn nr_blocks(&self) -> u64 {
        self.inner.store.nr_blocks()
    }

    /// Whether a flush has failed, so `write_dirty` will refuse from now on.
    pub fn is_poisoned(&self) -> bool {
        self.inner.poisoned.load(Ordering::Acquire)
    }

    /// The memory limit in effect, in bytes.
    pub fn memory_limit(&self) -> usize {
        self.inner.limit
    }

    /// Whether the block is cached (loaded or loading), without touching its recency.
    pub fn contains(&self, block: u64) -> bool {
        self.inner.contains(block)
    }

    fn send(&self, job: Job) -> bool {
        let mut worker = self.worker.lock();
        if worker.is_none() {
            match Worker::spawn(Arc::clone(&self.inner)) {
                Ok(w) => *worker = Some(w),
                Err(err) => {
                    log::warn!("cannot start the bufio worker thread: {err}");
                    return false;
                }
            }
        }
        worker.as_ref().is_some_and(|w| w.send(job))
    }
}

impl Drop for BufferCache {
    fn drop(&mut self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        drop(self.worker.lock().take());
        let dirty = self.inner.stats().dirty_blocks;
        if dirty > 0 {
            log::debug!("bufio dropped with {dirty} dirty blocks unwritten");
        }
    }
}
