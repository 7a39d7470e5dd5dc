//! Space: data block reference counts, the sizes of the data and metadata devices, growing
//! them, and the callback when free metadata runs low.

use crate::engine::pdata::space_map::SpaceMap;

use super::{PoolMetadata, ThresholdCallback};
use crate::engine::thin::error::{Result, ThinError};

impl PoolMetadata {
    pub fn data_block_count(&self, b: u64) -> Result<u32> {
        Ok(self.data_sm.count(b)?)
    }

    /// Whether more than one mapping references data block `b`.
    pub fn block_is_shared(&self, b: u64) -> Result<bool> {
        Ok(self.data_sm.count(b)? > 1)
    }

    pub fn inc_data_range(&mut self, begin: u64, end: u64) -> Result<()> {
        self.writable()?;
        for b in begin..end {
            self.data_sm.inc(b)?;
        }
        Ok(())
    }

    pub fn dec_data_range(&mut self, begin: u64, end: u64) -> Result<()> {
        self.writable()?;
        for b in begin..end {
            self.data_sm.dec(b)?;
        }
        Ok(())
    }

    /// Data block size in 512-byte sectors.
    pub fn data_block_size(&self) -> u32 {
        self.committed.data_block_size
    }

    pub fn data_dev_size(&self) -> u64 {
        self.data_sm.nr_blocks()
    }

    pub fn free_data_blocks(&self) -> u64 {
        self.data_sm.nr_free()
    }

    pub fn metadata_dev_size(&self) -> u64 {
        self.bm.nr_blocks()
    }

    pub fn free_metadata_blocks(&self) -> u64 {
        self.tm.nr_free()
    }

    /// Grows the data device to `nr_blocks` blocks; shrinking is refused.
    pub fn resize_data_dev(&mut self, nr_blocks: u64) -> Result<()> {
        self.writable()?;
        let old = self.data_sm.nr_blocks();
        if nr_blocks < old {
            return Err(ThinError::CannotShrink {
                what: "data",
                from: old,
                to: nr_blocks,
            });
        }
        if nr_blocks > old {
            self.data_sm.extend(nr_blocks - old)?;
        }
        Ok(())
    }

    /// Grows the metadata device to `nr_blocks` blocks (the store must already be that big).
    pub fn resize_metadata_dev(&mut self, nr_blocks: u64) -> Result<()> {
        self.writable()?;
        let old = self.bm.nr_blocks();
        if nr_blocks < old {
            return Err(ThinError::CannotShrink {
                what: "metadata",
                from: old,
                to: nr_blocks,
            });
        }
        self.bm.grow(nr_blocks)?;
        self.grow_metadata_space()
    }

    pub(super) fn grow_metadata_space(&mut self) -> Result<()> {
        self.tm.extend_to_device()?;
        self.threshold_fired = false;
        Ok(())
    }

    /// Calls `callback` once when free metadata blocks drop below `threshold` (again after
    /// the metadata device grows).
    pub fn register_metadata_threshold(&mut self, threshold: u64, callback: ThresholdCallback) {
        self.threshold = Some((threshold, callback));
        self.threshold_fired = false;
        self.check_threshold();
    }

    pub(super) fn check_threshold(&mut self) {
        let free = self.tm.nr_free();
        if let Some((threshold, callback)) = &mut self.threshold {
            if free < *threshold && !self.threshold_fired {
                self.threshold_fired = true;
                callback(free);
            }
        }
    }
}
