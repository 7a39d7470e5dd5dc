//! The block manager: typed, validated access to metadata blocks through the buffer cache.
//!
//! A block read from disk is checked once (checksum, stored location and, for btree nodes,
//! the header and key order); the buffer's tag then records that it was checked. A block
//! written through a [`WriteBlock`] is sealed (location and checksum) when the guard drops.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bufio::{BufferCache, ReadGuard, WriteGuard};

use super::checksum::{self, BlockKind};
use super::error::{PdataError, Result};
use super::node::NodeView;

/// Typed access to the metadata device's blocks. Shareable between threads.
pub struct BlockManager {
    cache: Arc<BufferCache>,
    nr_blocks: AtomicU64,
}

/// A validated block, shared for reading.
pub struct ReadBlock {
    guard: ReadGuard,
}

/// A block locked for writing; sealed with its kind's checksum when dropped.
pub struct WriteBlock {
    guard: WriteGuard,
    kind: BlockKind,
}

impl BlockManager {
    /// Wraps a cache over a device of `nr_blocks` 4 KiB blocks.
    pub fn new(cache: Arc<BufferCache>, nr_blocks: u64) -> BlockManager {
        BlockManager {
            cache,
            nr_blocks: AtomicU64::new(nr_blocks),
        }
    }

    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks.load(Ordering::Acquire)
    }

    /// Grows the metadata device to `nr_blocks`; the space map follows with
    /// [`TransactionManager::extend_to_device`](super::tm::TransactionManager::extend_to_device).
    pub fn grow(&self, nr_blocks: u64) -> Result<()> {
        let now = self.nr_blocks();
        if nr_blocks < now {
            return Err(PdataError::CannotShrink {
                what: "metadata device",
                from: now,
                to: nr_blocks,
            });
        }
        self.cache
            .store()
            .resize(nr_blocks)
            .map_err(|source| crate::bufio::BufioError::Io {
                block: nr_blocks,
                source,
            })?;
        self.nr_blocks.store(nr_blocks, Ordering::Release);
        Ok(())
    }

    pub fn cache(&self) -> &Arc<BufferCache> {
        &self.cache
    }

    fn check_range(&self, b: u64) -> Result<()> {
        let nr_blocks = self.nr_blocks();
        if b >= nr_blocks {
            return Err(PdataError::BlockOutOfRange {
                what: "metadata",
                block: b,
                nr_blocks,
            });
        }
        Ok(())
    }

    fn validate(guard: &ReadGuard, kind: BlockKind) -> Result<()> {
        if guard.tag() == kind.tag() {
            return Ok(());
        }
        let b = guard.block();
        checksum::verify(guard, kind, b)?;
        if kind == BlockKind::Node {
            let view = NodeView::new(guard, b)?;
            view.check_keys()?;
        }
        guard.set_tag(kind.tag());
        Ok(())
    }

    /// Reads and validates block `b` as `kind`, doing I/O if it is not cached.
    pub fn read(&self, b: u64, kind: BlockKind) -> Result<ReadBlock> {
        self.check_range(b)?;
        // The cache-only path is the cheaper one when the block is there.
        let guard = match self.cache.get(b) {
            Some(g) => g,
            None => self.cache.read(b)?,
        };
        Self::validate(&guard, kind)?;
        Ok(ReadBlock { guard })
    }

    /// Like [`read`](Self::read) but never does I/O: a block that is not cached gives
    /// [`PdataError::WouldBlock`].
    pub fn try_read(&self, b: u64, kind: BlockKind) -> Result<ReadBlock> {
        self.check_range(b)?;
        let guard = self
            .cache
            .get(b)
            .ok_or(PdataError::WouldBlock { block: b })?;
        Self::validate(&guard, kind)?;
        Ok(ReadBlock { guard })
    }

    /// Locks block `b` for writing, zeroed, without reading it.
    pub fn write_zeroed(&self, b: u64, kind: BlockKind) -> Result<WriteBlock> {
        self.check_range(b)?;
        let guard = self.cache.new_block(b)?;
        Ok(WriteBlock { guard, kind })
    }

    /// Locks block `b` for writing its current (validated) contents.
    pub fn write(&self, b: u64, kind: BlockKind) -> Result<WriteBlock> {
        self.check_range(b)?;
        let guard = self.cache.write(b)?;
        if guard.tag() != kind.tag() {
            checksum::verify(&guard, kind, b)?;
            if kind == BlockKind::Node {
                let view = NodeView::new(&guard, b)?;
                view.check_keys()?;
            }
        }
        Ok(WriteBlock { guard, kind })
    }

    /// Writes every dirty block and flushes the device.
    pub fn flush(&self) -> Result<()> {
        self.cache.write_dirty()?;
        Ok(())
    }

    /// Drops every dirty block without writing it (abort).
    pub fn discard_dirty(&self) {
        self.cache.discard_dirty();
    }

    /// Hints that these blocks will be read soon.
    pub fn prefetch(&self, blocks: &[u64]) {
        self.cache.prefetch(blocks);
    }
}

impl ReadBlock {
    pub fn location(&self) -> u64 {
        self.guard.block()
    }
}

impl Deref for ReadBlock {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.guard
    }
}

impl WriteBlock {
    pub fn location(&self) -> u64 {
        self.guard.block()
    }
}

impl Deref for WriteBlock {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.guard
    }
}

impl DerefMut for WriteBlock {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.guard
    }
}

impl Drop for WriteBlock {
    fn drop(&mut self) {
        let b = self.guard.block();
        checksum::seal(&mut self.guard, self.kind, b);
        self.guard.set_tag(self.kind.tag());
    }
}
