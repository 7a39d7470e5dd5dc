//! Mappings of virtual blocks to data blocks: lookups (one block, a run, a range) and
//! changes (allocate, insert, remove).

use crate::engine::pdata::btree::{self, DataRefs};
use crate::engine::pdata::space_map::SpaceMap;
use crate::engine::pdata::tm::NonBlocking;
use crate::engine::pdata::values::BlockTime;

use super::{no_space, Lookup, MappedRange, PoolMetadata};
use crate::engine::thin::error::{Result, ThinError};

impl PoolMetadata {
    pub(super) fn sub_root(&self, dev: u64) -> Result<u64> {
        btree::lookup::<u64, _>(&self.tm, self.mapping_root, dev)?
            .ok_or(ThinError::NoSuchDevice(dev))
    }

    /// The data block `vblock` of `dev` maps to. With `can_block` false, a lookup that would
    /// need metadata I/O fails with `PdataError::WouldBlock` instead of waiting.
    pub fn find_block(&self, dev: u64, vblock: u64, can_block: bool) -> Result<Option<Lookup>> {
        let snap_time = self.details(dev)?.snapshotted_time;
        let found = if can_block {
            btree::lookup_nested::<BlockTime, _>(&self.tm, self.mapping_root, dev, vblock)?
        } else {
            let src = NonBlocking(&self.bm);
            btree::lookup_nested::<BlockTime, _>(&src, self.mapping_root, dev, vblock)?
        };
        Ok(found.map(|bt| Lookup {
            block: bt.block,
            shared: snap_time > bt.time,
        }))
    }

    /// The first run of mapped blocks in `[begin, end)`: consecutive virtual blocks on
    /// consecutive data blocks with the same sharing.
    pub fn find_mapped_range(&self, dev: u64, begin: u64, end: u64) -> Result<Option<MappedRange>> {
        let snap_time = self.details(dev)?.snapshotted_time;
        let sub = self.sub_root(dev)?;
        let mut run: Option<MappedRange> = None;
        btree::walk::<BlockTime, _, _>(&self.tm, sub, begin, |vblock, bt| {
            if vblock >= end {
                return Ok(false);
            }
            let shared = snap_time > bt.time;
            match &mut run {
                None => {
                    run = Some(MappedRange {
                        thin_begin: vblock,
                        thin_end: vblock + 1,
                        pool_begin: bt.block,
                        maybe_shared: shared,
                    });
                    Ok(true)
                }
                Some(r) => {
                    let next = r.pool_begin + (r.thin_end - r.thin_begin);
                    if vblock == r.thin_end && bt.block == next && shared == r.maybe_shared {
                        r.thin_end += 1;
                        Ok(true)
                    } else {
                        Ok(false)
                    }
                }
            }
        })?;
        Ok(run)
    }

    /// Every mapping of `dev` in `[begin, end)`, in order.
    pub fn mappings(&self, dev: u64, begin: u64, end: u64) -> Result<Vec<(u64, BlockTime)>> {
        let sub = self.sub_root(dev)?;
        Ok(btree::range::<BlockTime, _>(&self.tm, sub, begin, end)?)
    }

    /// Allocates a free data block (count 1). It must be inserted or released.
    pub fn alloc_data_block(&mut self) -> Result<u64> {
        self.writable()?;
        self.data_sm.new_block().map_err(no_space)
    }

    /// Maps `vblock` of `dev` to `data_block`. The mapping takes over the reference the caller
    /// holds (the one `alloc_data_block` gave); the old mapping's block loses one.
    pub fn insert_block(&mut self, dev: u64, vblock: u64, data_block: u64) -> Result<()> {
        self.writable()?;
        let had = self.find_block(dev, vblock, true)?.is_some();
        let v = BlockTime {
            block: data_block,
            time: self.time,
        };
        let mut data = DataRefs(&mut self.data_sm);
        self.mapping_root =
            btree::insert_nested(&mut self.tm, &mut data, self.mapping_root, dev, vblock, &v)
                .map_err(no_space)?;
        if !had {
            self.adjust_mapped(dev, 1)?;
        }
        self.check_threshold();
        Ok(())
    }

    /// Unmaps `vblock`; returns the data block it was mapped to.
    pub fn remove_block(&mut self, dev: u64, vblock: u64) -> Result<Option<u64>> {
        self.writable()?;
        let mut data = DataRefs(&mut self.data_sm);
        let (root, old) = btree::remove_nested::<BlockTime>(
            &mut self.tm,
            &mut data,
            self.mapping_root,
            dev,
            vblock,
        )
        .map_err(no_space)?;
        self.mapping_root = root;
        if old.is_some() {
            self.adjust_mapped(dev, -1)?;
        }
        Ok(old.map(|bt| bt.block))
    }

    /// Unmaps every block in `[begin, end)`; returns how many were mapped.
    pub fn remove_range(&mut self, dev: u64, begin: u64, end: u64) -> Result<u64> {
        self.writable()?;
        let mut data = DataRefs(&mut self.data_sm);
        let (root, n) = btree::remove_range_nested::<BlockTime>(
            &mut self.tm,
            &mut data,
            self.mapping_root,
            dev,
            begin,
            end,
        )
        .map_err(no_space)?;
        self.mapping_root = root;
        self.adjust_mapped(dev, -(n as i64))?;
        Ok(n)
    }

    pub fn highest_mapped_block(&self, dev: u64) -> Result<Option<u64>> {
        let sub = self.sub_root(dev)?;
        Ok(btree::highest_key::<BlockTime, _>(&self.tm, sub)?)
    }
}
