//! The metadata snapshot: a read-only copy of the committed metadata held for userspace
//! readers (backup, delta), as dm-thin's `reserve_metadata_snap` / `release_metadata_snap`.
//! (A thin device's snapshot is in `devices`.)

use crate::engine::pdata::btree::{self, DataRefs, NoRefs, SubtreeRefs};
use crate::engine::pdata::checksum::BlockKind;
use crate::engine::pdata::superblock::{Superblock, SUPERBLOCK_LOCATION};
use crate::engine::pdata::values::DeviceDetails;
use crate::engine::pdata::PdataError;

use super::PoolMetadata;
use crate::engine::thin::error::{Result, ThinError};

impl PoolMetadata {
    /// The held metadata snapshot's superblock copy, if any.
    pub fn metadata_snap(&self) -> Option<u64> {
        (self.held_root != 0).then_some(self.held_root)
    }

    /// Holds a read-only copy of the committed metadata for userspace readers (backup, delta):
    /// the superblock is copied and its trees gain a reference so no commit frees them.
    pub fn reserve_metadata_snap(&mut self) -> Result<u64> {
        self.writable()?;
        if self.held_root != 0 {
            return Err(ThinError::MetadataSnapHeld);
        }
        self.commit()?;
        self.tm.inc(SUPERBLOCK_LOCATION)?;
        let (mut w, _) = self.tm.shadow(SUPERBLOCK_LOCATION, BlockKind::Superblock)?;
        let loc = w.location();
        let mut copy = Superblock::decode(&w, SUPERBLOCK_LOCATION).map_err(PdataError::from)?;
        copy.data_sm_root = Default::default();
        copy.metadata_sm_root = Default::default();
        copy.held_root = 0;
        copy.encode(&mut w, loc);
        drop(w);
        self.tm.inc(copy.data_mapping_root)?;
        self.tm.inc(copy.device_details_root)?;
        self.held_root = loc;
        self.commit()?;
        Ok(loc)
    }

    /// Drops the held metadata snapshot; what only it referenced is freed.
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        self.writable()?;
        let held = self.held_root;
        if held == 0 {
            return Err(ThinError::NoMetadataSnap);
        }
        let copy = {
            let blk = self.tm.read(held, BlockKind::Superblock)?;
            Superblock::decode(&blk, held).map_err(PdataError::from)?
        };
        let mut data = DataRefs(&mut self.data_sm);
        let mut top = SubtreeRefs { leaf: &mut data };
        btree::del::<u64>(&mut self.tm, &mut top, copy.data_mapping_root)?;
        btree::del::<DeviceDetails>(&mut self.tm, &mut NoRefs, copy.device_details_root)?;
        self.tm.dec(held)?;
        self.held_root = 0;
        Ok(())
    }
}
