//! Data space: allocation (waiting when the pool is full), the low-water mark, growth, and
//! readying and moving the data of blocks for thin devices.

use std::sync::atomic::Ordering;
use std::time::Instant;

use log::debug;

use super::*;
use crate::engine::thin::error::ThinError;
use crate::engine::{BlockError, Bufs, BufsMut};

impl Pool {
    /// Allocates a data block, waiting for the pool to grow when it is full (unless the
    /// pool fails at once). The caller must hold no cell or gate while this waits: the
    /// `release` closure drops them and the caller retries from the start on `Ok(None)`.
    pub(in crate::engine::thin) fn alloc_data_block(&self) -> Result<u64, BlockError> {
        match self.change(|m| m.alloc_data_block()) {
            Ok(b) => {
                self.check_data_low_water();
                Ok(b)
            }
            Err(ThinError::NoDataSpace) => {
                self.set_mode(PoolMode::OutOfDataSpace);
                Err(BlockError::NoSpace)
            }
            Err(e) => Err(BlockError::from(e)),
        }
    }

    /// After a failed allocation: waits for the pool to grow. Returns whether to retry.
    pub(in crate::engine::thin) fn wait_for_space(&self, since: Instant) -> bool {
        if self.options.error_if_no_space {
            return false;
        }
        let deadline = since + self.options.no_space_timeout;
        let mut mode = self.mode.lock();
        while *mode == PoolMode::OutOfDataSpace {
            if self.space_grown.wait_until(&mut mode, deadline).timed_out() {
                return *mode != PoolMode::OutOfDataSpace;
            }
        }
        *mode == PoolMode::Write
    }

    /// Sets the free-block count below which a low-water event is sent (0: never).
    pub fn set_data_low_water(&self, blocks: u64) {
        self.data_low_water.store(blocks, Ordering::Release);
        self.data_low_fired.store(false, Ordering::Release);
        self.check_data_low_water();
    }

    /// The free-block count below which a low-water event is sent (0: none).
    pub fn data_low_water(&self) -> u64 {
        self.data_low_water.load(Ordering::Acquire)
    }

    pub(in crate::engine::thin) fn check_data_low_water(&self) {
        let mark = self.data_low_water.load(Ordering::Acquire);
        if mark == 0 {
            return;
        }
        let free = self.meta.read().free_data_blocks();
        if free < mark && !self.data_low_fired.swap(true, Ordering::AcqRel) {
            self.emit(PoolEvent::DataLowWater { free });
        }
    }

    /// Grows the pool to the data device's current size (after the file was extended).
    pub fn grow_data(&self, new_size: u64) -> Result<(), BlockError> {
        let size = self.data.grow_to(new_size)?;
        let nr = size / self.block_size;
        self.change(|m| m.resize_data_dev(nr))
            .map_err(BlockError::from)?;
        self.data_low_fired.store(false, Ordering::Release);
        let mut mode = self.mode.lock();
        if *mode == PoolMode::OutOfDataSpace {
            *mode = PoolMode::Write;
            drop(mode);
            self.emit(PoolEvent::ModeChanged(PoolMode::Write));
        }
        self.space_grown.notify_all();
        Ok(())
    }
}

/// Data I/O helpers for thin devices.
impl Pool {
    pub(in crate::engine::thin) fn read_data(
        &self,
        block: u64,
        within: u64,
        bufs: &mut BufsMut<'_>,
    ) -> Result<(), BlockError> {
        self.data.read(block * self.block_size + within, bufs)
    }

    /// Zeroes `len` bytes at `within` of data block `block`; a failure turns the pool
    /// read-only.
    /// Readies a newly allocated data block for a first write of `[within, within + len)`:
    /// the rest of it must read as zeros. It is zeroed only if it may hold data.
    ///
    /// A block in a hole of a sparse data file reads as zeros, but a file system allocates
    /// it on the first write into it, inside the write (on ext4 a 4 KiB write into a hole ran
    /// at 0.6x an overwrite). So the data file is allocated, unwritten, a stretch ahead of the
    /// blocks handed out: one file system transaction for many first writes instead of one
    /// zeroing each.
    pub(in crate::engine::thin) fn zero_around(
        &self,
        block: u64,
        within: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let start = block * self.block_size;
        self.preallocate_ahead(start);
        let end = within + len;
        let around = [(0, within), (end, self.block_size.saturating_sub(end))];
        if around.iter().all(|&(_, n)| n == 0) || self.data.reads_as_zeros(start, self.block_size) {
            return Ok(());
        }
        for (at, n) in around {
            if n > 0 {
                self.zero_data(block, at, n)?;
            }
        }
        Ok(())
    }

    /// Preallocates the data device from `start` on unless an earlier call covered it.
    pub(in crate::engine::thin) fn preallocate_ahead(&self, start: u64) {
        if start + self.block_size > self.preallocated.load(Ordering::Acquire) {
            let len = PREALLOCATE_AHEAD
                .max(self.block_size)
                .min(self.data.size().saturating_sub(start));
            if let Err(e) = self.data.preallocate(start, len) {
                // The first writes still work, each allocating its own space.
                debug!("cannot preallocate the data device at {start}: {e}");
            }
            self.preallocated.fetch_max(start + len, Ordering::AcqRel);
        }
    }

    pub(in crate::engine::thin) fn zero_data(
        &self,
        block: u64,
        within: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let result = self
            .data
            .write_zeroes(block * self.block_size + within, len, false);
        if let Err(e) = &result {
            self.data_failed(e);
        }
        result
    }

    pub(in crate::engine::thin) fn write_data(
        &self,
        block: u64,
        within: u64,
        bufs: &Bufs<'_>,
    ) -> Result<(), BlockError> {
        let result = self.data.write(block * self.block_size + within, bufs);
        if let Err(e) = &result {
            self.data_failed(e);
        }
        result
    }
}
