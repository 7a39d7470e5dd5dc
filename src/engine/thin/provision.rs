//! First writes without waiting: a write into unmapped (or shared) blocks gets new data blocks
//! at once (the rest of each zeroed, unless it reads as zeros already) and is handed back as
//! host I/O like any mapped write; the new mappings go into the metadata when that I/O has
//! finished, so a commit never covers a mapping whose data was not written. Until then the
//! blocks' prison cells and the pool's provision gate stay held: another writer of the block
//! takes the synchronous path and waits, and no commit runs.

use std::sync::Arc;

use log::warn;

use super::gate::Ticket;
use super::pool::Pool;
use super::prison::CellKey;
use crate::engine::{BlockError, Extent, Hold, MapOp};

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

/// The one file extent a data device maps `[offset, offset + len)` to, if it does.
fn one_extent(pool: &Pool, op: MapOp, offset: u64, len: u64) -> Result<Option<Extent>, BlockError> {
    let mapped = pool.data().map(op, offset, len)?;
    Ok(mapped
        .and_then(|m| m.extents.into_iter().next())
        .filter(|e| matches!(e, Extent::File { len: l, .. } if *l == len)))
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
        let new = match self.pool.alloc_data_block() {
            Ok(b) => b,
            // Waiting for space is the synchronous path's job.
            Err(BlockError::NoSpace) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.blocks.push((p.vblock, new));
        let bs = self.pool.block_size();
        let base = new * bs;
        let Some(ext) = one_extent(&self.pool, MapOp::Write, base + p.within, p.len)? else {
            return Ok(None);
        };
        self.pool.zero_around(new, p.within, p.len)?;
        Ok(Some(ext))
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
