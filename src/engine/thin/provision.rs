//! First writes without waiting: a write into unmapped (or shared) blocks gets new data blocks
//! at once (the rest of each zeroed, unless it reads as zeros already) and is handed back as
//! host I/O like any mapped write; the new mappings go into the metadata when that I/O has
//! finished, so a commit never covers a mapping whose data was not written. Until then the
//! blocks' prison cells and the pool's provision gate stay held: another writer of the block
//! takes the synchronous path and waits, and no commit runs.

use std::sync::Arc;

use log::warn;

use super::device::data_extent;
use super::gate::Ticket;
use super::pool::Pool;
use super::prison::CellKey;
use crate::engine::{BlockError, Bufs, Extent, Hold, MapOp};

/// Largest buffer used to copy or zero inside one data block.
pub(super) const CHUNK: u64 = 1 << 20;

/// Reads `buf.len()` bytes at a byte offset within the block a first write replaces (the
/// shared block's bytes, or the external origin's).
pub(super) type Around<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<(), BlockError>;

/// Readies newly allocated data block `new` for a first write of `[within, within + len)`:
/// the rest of the block holds what `around` reads, or zeros without it. Both ways of
/// provisioning (the synchronous path in device.rs, and first writes in the ring below) go
/// through here, so a new block never shows what it held before.
pub(super) fn ready_new_block(
    pool: &Pool,
    new: u64,
    within: u64,
    len: u64,
    around: Option<Around<'_>>,
) -> Result<(), BlockError> {
    let Some(read_around) = around else {
        return pool.zero_around(new, within, len);
    };
    let bs = pool.block_size();
    let end = within + len;
    if within == 0 && end >= bs {
        return Ok(());
    }
    let mut buf = vec![0u8; CHUNK.min(bs) as usize];
    for (at, n) in [(0, within), (end, bs.saturating_sub(end))] {
        let mut done = 0;
        while done < n {
            let step = CHUNK.min(n - done) as usize;
            let chunk = buf.get_mut(..step).unwrap_or_default();
            read_around(at + done, chunk)?;
            pool.write_data(new, at + done, &Bufs::one(chunk))?;
            done += step as u64;
        }
    }
    Ok(())
}

/// A piece of a write that needs a new data block.
#[derive(Clone, Copy, Debug)]
pub(super) struct NewBlock {
    pub vblock: u64,
    pub within: u64,
    pub len: u64,
    /// The data block mapped there when the write was looked up (a shared one), if any.
    pub old: Option<u64>,
}

/// The new blocks of one write while its I/O is in flight.
pub(super) struct FirstWrites {
    pool: Arc<Pool>,
    dev: u64,
    /// (virtual block, new data block), not yet mapped.
    blocks: Vec<(u64, u64)>,
    cells: Vec<CellKey>,
    /// Dropped last: no commit until the mappings are in or the blocks given back.
    _provision: Ticket,
    _io: Ticket,
}

impl FirstWrites {
    pub fn new(pool: Arc<Pool>, dev: u64, io: Ticket, provision: Ticket) -> Self {
        FirstWrites {
            pool,
            dev,
            blocks: Vec::new(),
            cells: Vec::new(),
            _provision: provision,
            _io: io,
        }
    }

    /// Provisions the block of `p` and zeroes the rest of it; returns where the guest's bytes
    /// go. `None` when this write must take the synchronous path instead (the block is busy
    /// or changed, the pool is full, or the data device cannot be mapped). The zeroing is
    /// done here, not in the ring: on ext4 an asynchronous fallocate goes to a kernel worker
    /// and waits for the data write, which made 4 KiB first writes 2.5x slower.
    pub fn provision(&mut self, p: NewBlock) -> Result<Option<Extent>, BlockError> {
        let key = (self.dev, p.vblock);
        if !self.pool.prison.try_take(key) {
            return Ok(None);
        }
        self.cells.push(key);
        // Another writer may have provisioned it between the lookup and the cell.
        let now = self
            .pool
            .meta()
            .find_block(self.dev, p.vblock, true)
            .map_err(BlockError::from)?;
        if now.map(|l| l.block) != p.old {
            return Ok(None);
        }
        let new = match self.allocate(p.vblock) {
            Ok(b) => b,
            // Waiting for space is the synchronous path's job.
            Err(BlockError::NoSpace) => return Ok(None),
            Err(e) => return Err(e),
        };
        let bs = self.pool.block_size();
        let base = new * bs;
        let Some(ext) = data_extent(&self.pool, MapOp::Write, base + p.within, p.len)? else {
            return Ok(None);
        };
        ready_new_block(&self.pool, new, p.within, p.len, None)?;
        Ok(Some(ext))
    }

    /// Allocates a data block for virtual block `vblock`: mapped by [`Hold::finish`] once
    /// its data is written, given back if this is dropped first. Both ways of provisioning
    /// (this file's first writes in the ring, and the synchronous path in device.rs) allocate
    /// and map through here, under the provision gate and the block's cell they hold.
    pub fn allocate(&mut self, vblock: u64) -> Result<u64, BlockError> {
        let new = self.pool.alloc_data_block()?;
        self.blocks.push((vblock, new));
        Ok(new)
    }

    /// Gives back the blocks that were never mapped.
    fn release(&mut self) {
        for (_, block) in std::mem::take(&mut self.blocks) {
            if let Err(e) = self.pool.change(|m| m.dec_data_range(block, block + 1)) {
                warn!("cannot release data block {block} after a failed first write: {e}");
            }
        }
    }
}

impl Hold for FirstWrites {
    fn finish(mut self: Box<Self>, ok: bool) -> Result<(), BlockError> {
        if !ok {
            return Ok(());
        }
        while let Some(&(vblock, block)) = self.blocks.first() {
            let dev = self.dev;
            self.pool
                .change(|m| m.insert_block(dev, vblock, block))
                .map_err(BlockError::from)?;
            self.blocks.remove(0);
        }
        Ok(())
    }
}

impl Drop for FirstWrites {
    fn drop(&mut self) {
        self.release();
        for key in self.cells.drain(..) {
            self.pool.prison.give_back(key);
        }
    }
}
