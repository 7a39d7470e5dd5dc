//! Writing dirty buffers to the store: one buffer at a time, whole passes in ascending block
//! order, and the error bookkeeping for passes run in the background.

use std::sync::atomic::Ordering;

use super::buffer::Buffer;
use super::core::Inner;
use super::error::{BufioError, Result};
use super::stats::Counters;

/// Whether a write-back may wait for a buffer that someone is modifying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// Wait for the writer to release it (write_dirty: it promises every dirty buffer).
    Block,
    /// Skip it (eviction: waiting could deadlock with a caller that holds it).
    Try,
}

impl Inner {
    /// Writes one buffer if it is still cached, dirty and loaded. Returns whether it wrote.
    pub(super) fn write_back(&self, buf: &Buffer, wait: Wait) -> Result<bool> {
        let lock = match wait {
            Wait::Block => buf.data.read_recursive(),
            Wait::Try => match buf.data.try_read_recursive() {
                Some(lock) => lock,
                None => return Ok(false),
            },
        };
        // Checked under `io`: a buffer forgotten or discarded after this check is waited for
        // by whoever removed it (see buffer.rs), so this write cannot outlive its removal.
        let _io = buf.io.lock();
        if !buf.is_cached() || !buf.is_dirty() || !lock.valid {
            return Ok(false);
        }
        self.store
            .write_block(buf.block, &lock.bytes)
            .map_err(|source| BufioError::Io {
                block: buf.block,
                source,
            })?;
        Counters::bump(&self.counters.writes);
        // Still under the read lock: no writer can have changed the bytes since they were
        // written, so clearing the bit loses nothing.
        buf.dirty.store(false, Ordering::Release);
        Ok(true)
    }

    /// Writes every buffer dirty at the start, lowest block first, stopping at the first error
    /// (that buffer and the ones after it stay dirty). The caller holds `self.pass`.
    fn write_pass(&self, wait: Wait) -> Result<()> {
        for buf in self.dirty_buffers() {
            self.write_back(&buf, wait)?;
        }
        Ok(())
    }

    pub(super) fn write_dirty(&self) -> Result<()> {
        let _pass = self.pass.lock();
        if self.poisoned.load(Ordering::Acquire) {
            return Err(BufioError::Poisoned);
        }
        let pass = self.write_pass(Wait::Block);
        let earlier = self.async_error.lock().take();
        pass?;
        if let Err(source) = self.store.flush() {
            self.poisoned.store(true, Ordering::Release);
            log::error!("metadata flush failed ({source}); no further commits from this cache");
            return Err(BufioError::Flush { source });
        }
        Counters::bump(&self.counters.flushes);
        // Reported even though this pass rewrote whatever it left dirty: the caller must
        // learn that the device failed a write, as Linux's dm-bufio reports it.
        match earlier {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// One pass on behalf of `write_dirty_async`; its first error waits for `write_dirty`.
    pub(super) fn write_dirty_in_background(&self) {
        // Cleared first, so a request made while this pass runs queues another one.
        self.async_pending.store(false, Ordering::Release);
        let _pass = self.pass.lock();
        if self.poisoned.load(Ordering::Acquire) {
            return;
        }
        // Buffers being modified are skipped, not waited for: the pass promises nothing, and
        // waiting could hang dropping the cache while a guard is still out.
        if let Err(err) = self.write_pass(Wait::Try) {
            log::warn!("background metadata write-back failed: {err}");
            let mut slot = self.async_error.lock();
            if slot.is_none() {
                *slot = Some(err);
            }
        }
    }

    /// Reads blocks into the cache for `prefetch`, giving up when that would need eviction of
    /// anything dirty. Read errors are left for the reader who really needs the block.
    pub(super) fn prefetch_now(&self, blocks: &[u64]) {
        for &block in blocks {
            if self.shutting_down.load(Ordering::Acquire) {
                return;
            }
            if self.check_range(block).is_err() || self.contains(block) {
                continue;
            }
            match self.load(block, false, super::core::Pressure::CleanOnly) {
                Ok(_) => {}
                Err(BufioError::CacheFull) => return,
                Err(err) => log::debug!("metadata prefetch skipped: {err}"),
            }
        }
    }
}
