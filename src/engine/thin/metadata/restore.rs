//! Restoring a pool from a description (thin_dump XML): devices, mappings and the header
//! exactly as given.

use crate::engine::pdata::btree::{self, DataRefs};
use crate::engine::pdata::space_map::SpaceMap;
use crate::engine::pdata::superblock::FLAG_NEEDS_CHECK;
use crate::engine::pdata::values::{BlockTime, DeviceDetails};

use super::{no_space, PoolMetadata};
use crate::engine::thin::error::Result;

impl PoolMetadata {
    /// Adds device `dev` with exactly these details and no mappings yet (for restore; a live
    /// pool uses `create_thin` and `create_snap`).
    pub fn restore_device(&mut self, dev: u64, details: DeviceDetails) -> Result<()> {
        self.create_thin(dev)?;
        let d = self.device_mut(dev)?;
        d.details = details;
        d.details.mapped_blocks = 0;
        Ok(())
    }

    /// Maps `vblock` of a restored device to `mapping` as given (block and time); the data
    /// block gains a reference.
    pub fn restore_mapping(&mut self, dev: u64, vblock: u64, mapping: BlockTime) -> Result<()> {
        self.writable()?;
        self.data_sm.inc(mapping.block).map_err(no_space)?;
        let mut data = DataRefs(&mut self.data_sm);
        self.mapping_root = btree::insert_nested(
            &mut self.tm,
            &mut data,
            self.mapping_root,
            dev,
            vblock,
            &mapping,
        )
        .map_err(no_space)?;
        self.adjust_mapped(dev, 1)
    }

    /// Sets the superblock fields a restore copies from its input.
    pub fn restore_header(
        &mut self,
        uuid: [u8; 16],
        flags: u32,
        version: u32,
        time: u32,
        trans_id: u64,
    ) {
        self.committed.uuid = uuid;
        self.committed.flags = flags;
        self.needs_check = flags & FLAG_NEEDS_CHECK != 0;
        self.committed.version = version;
        self.time = time;
        self.trans_id = trans_id;
    }
}
