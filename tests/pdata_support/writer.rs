//! A pool writer for the persistent-data tests: the device details tree, the two-level mapping
//! tree and both space maps over one transaction manager, with every field reachable so the
//! tests can drive the trees directly. (thinblk itself uses `engine::thin::PoolMetadata`.)
#![allow(dead_code)]

use std::sync::Arc;

use thinblk::engine::pdata::block_manager::BlockManager;
use thinblk::engine::pdata::btree::{self, DataRefs, NoRefs};
use thinblk::engine::pdata::error::Result;
use thinblk::engine::pdata::space_map::{DiskSpaceMap, SpaceMap};
use thinblk::engine::pdata::superblock::{Superblock, SUPERBLOCK_LOCATION, SUPERBLOCK_VERSION};
use thinblk::engine::pdata::tm::TransactionManager;
use thinblk::engine::pdata::values::{BlockTime, DeviceDetails};

/// An open pool being written. Fields are public so tests can drive the trees directly.
pub struct PoolWriter {
    pub bm: Arc<BlockManager>,
    pub tm: TransactionManager,
    pub data_sm: DiskSpaceMap,
    pub details_root: u64,
    pub mapping_root: u64,
    pub time: u32,
    pub trans_id: u64,
    /// The last committed superblock; the next commit starts from it (flags, uuid, version,
    /// data block size, held root).
    pub committed: Superblock,
}

/// A superblock of an empty pool, before its roots are known.
pub fn empty_superblock(data_block_size: u32, metadata_nr_blocks: u64) -> Superblock {
    Superblock {
        flags: 0,
        uuid: [0; 16],
        version: SUPERBLOCK_VERSION,
        time: 0,
        trans_id: 0,
        held_root: 0,
        data_sm_root: Default::default(),
        metadata_sm_root: Default::default(),
        data_mapping_root: 0,
        device_details_root: 0,
        data_block_size,
        metadata_nr_blocks,
        compat_flags: 0,
        compat_ro_flags: 0,
        incompat_flags: 0,
    }
}

impl PoolWriter {
    /// Starts a new pool on the whole metadata device (every block but the superblock free)
    /// with `nr_data_blocks` free data blocks. Nothing is on disk until [`commit`](Self::commit).
    pub fn create(
        bm: Arc<BlockManager>,
        nr_data_blocks: u64,
        data_block_size: u32,
    ) -> Result<PoolWriter> {
        let mut tm = TransactionManager::create(bm.clone())?;
        let data_sm = DiskSpaceMap::create(bm.clone(), nr_data_blocks);
        let details_root = btree::empty::<DeviceDetails>(&mut tm)?;
        let mapping_root = btree::empty::<u64>(&mut tm)?;
        let committed = empty_superblock(data_block_size, bm.nr_blocks());
        Ok(PoolWriter {
            bm,
            tm,
            data_sm,
            details_root,
            mapping_root,
            time: 0,
            trans_id: 0,
            committed,
        })
    }

    /// Opens the pool committed at block 0.
    pub fn open(bm: Arc<BlockManager>) -> Result<PoolWriter> {
        let blk = bm.read(
            SUPERBLOCK_LOCATION,
            thinblk::engine::pdata::checksum::BlockKind::Superblock,
        )?;
        let sb = Superblock::decode(&blk, SUPERBLOCK_LOCATION)?;
        drop(blk);
        let tm = TransactionManager::open(bm.clone(), &sb.metadata_sm_root)?;
        let data_sm = DiskSpaceMap::open(bm.clone(), &sb.data_sm_root)?;
        Ok(PoolWriter {
            bm,
            tm,
            data_sm,
            details_root: sb.device_details_root,
            mapping_root: sb.data_mapping_root,
            time: sb.time,
            trans_id: sb.trans_id,
            committed: sb,
        })
    }

    /// Commits: data space map, metadata space map, then the superblock.
    pub fn commit(&mut self) -> Result<()> {
        let data_root = self.data_sm.commit(&mut self.tm)?;
        let meta_root = self.tm.pre_commit()?;
        let mut sb = self.committed.clone();
        sb.time = self.time;
        sb.trans_id = self.trans_id;
        sb.data_sm_root = data_root;
        sb.metadata_sm_root = meta_root;
        sb.data_mapping_root = self.mapping_root;
        sb.device_details_root = self.details_root;
        self.tm.commit(&sb)?;
        self.committed = sb;
        Ok(())
    }

    /// Drops everything since the last commit.
    pub fn abort(&mut self) -> Result<()> {
        let sb = self.committed.clone();
        self.tm.abort(&sb.metadata_sm_root)?;
        self.data_sm = DiskSpaceMap::open(self.bm.clone(), &sb.data_sm_root)?;
        self.details_root = sb.device_details_root;
        self.mapping_root = sb.data_mapping_root;
        self.time = sb.time;
        self.trans_id = sb.trans_id;
        Ok(())
    }

    pub fn details(&self, dev: u64) -> Result<Option<DeviceDetails>> {
        btree::lookup::<DeviceDetails, _>(&self.tm, self.details_root, dev)
    }

    pub fn set_details(&mut self, dev: u64, d: &DeviceDetails) -> Result<()> {
        self.details_root = btree::insert(&mut self.tm, &mut NoRefs, self.details_root, dev, d)?;
        Ok(())
    }

    /// Adds a device whose mapping tree is `subtree` (a tree this pool now holds).
    pub fn add_device(&mut self, dev: u64, details: &DeviceDetails, subtree: u64) -> Result<()> {
        self.mapping_root =
            btree::insert::<u64>(&mut self.tm, &mut NoRefs, self.mapping_root, dev, &subtree)?;
        self.set_details(dev, details)
    }

    /// A new, empty mapping tree for a device.
    pub fn new_mapping_tree(&mut self) -> Result<u64> {
        btree::empty::<BlockTime>(&mut self.tm)
    }

    /// Maps `vblock` to `v` in the mapping tree at `root`, giving the data block one more
    /// reference (an overwritten mapping loses its own). Returns the new root.
    pub fn insert_mapping(&mut self, root: u64, vblock: u64, v: &BlockTime) -> Result<u64> {
        self.data_sm.inc(v.block)?;
        let mut refs = DataRefs(&mut self.data_sm);
        btree::insert::<BlockTime>(&mut self.tm, &mut refs, root, vblock, v)
    }
}
