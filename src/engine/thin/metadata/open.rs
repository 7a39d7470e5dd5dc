//! Writing an empty pool and opening an existing one.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::bufio::BufferCache;
use crate::engine::pdata::block_manager::BlockManager;
use crate::engine::pdata::btree;
use crate::engine::pdata::checksum::BlockKind;
use crate::engine::pdata::space_map::DiskSpaceMap;
use crate::engine::pdata::superblock::{Superblock, SUPERBLOCK_LOCATION, SUPERBLOCK_VERSION};
use crate::engine::pdata::tm::TransactionManager;
use crate::engine::pdata::values::DeviceDetails;
use crate::engine::pdata::PdataError;

use super::{Device, PoolMetadata, MAX_BLOCK_SECTORS, MIN_BLOCK_SECTORS};
use crate::engine::thin::error::{Result, ThinError};

impl PoolMetadata {
    /// Writes an empty pool: `nr_data_blocks` blocks of `block_sectors` sectors each.
    pub fn format(
        cache: Arc<BufferCache>,
        block_sectors: u32,
        nr_data_blocks: u64,
    ) -> Result<Self> {
        if !(MIN_BLOCK_SECTORS..=MAX_BLOCK_SECTORS).contains(&block_sectors)
            || !block_sectors.is_multiple_of(MIN_BLOCK_SECTORS)
        {
            return Err(ThinError::BadBlockSize(block_sectors));
        }
        let nr_meta = cache.nr_blocks();
        let bm = Arc::new(BlockManager::new(cache, nr_meta));
        let mut tm = TransactionManager::create(bm.clone())?;
        let data_sm = DiskSpaceMap::create(bm.clone(), nr_data_blocks);
        let details_root = btree::empty::<DeviceDetails>(&mut tm)?;
        let mapping_root = btree::empty::<u64>(&mut tm)?;
        let committed = Superblock {
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
            data_block_size: block_sectors,
            metadata_nr_blocks: nr_meta,
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
        };
        let mut pool = PoolMetadata {
            bm,
            tm,
            data_sm,
            committed,
            details_root,
            mapping_root,
            time: 0,
            trans_id: 0,
            held_root: 0,
            devices: BTreeMap::new(),
            deleted: Vec::new(),
            read_only: false,
            needs_check: false,
            threshold: None,
            threshold_fired: false,
        };
        pool.commit()?;
        Ok(pool)
    }

    /// Opens the pool whose superblock is block 0 of the cache's store.
    pub fn open(cache: Arc<BufferCache>) -> Result<Self> {
        let nr_meta = cache.nr_blocks();
        let bm = Arc::new(BlockManager::new(cache, nr_meta));
        let sb = {
            let blk = bm.read(SUPERBLOCK_LOCATION, BlockKind::Superblock)?;
            Superblock::decode(&blk, SUPERBLOCK_LOCATION).map_err(PdataError::from)?
        };
        let tm = TransactionManager::open(bm.clone(), &sb.metadata_sm_root)?;
        let data_sm = DiskSpaceMap::open(bm.clone(), &sb.data_sm_root)?;
        let mut devices = BTreeMap::new();
        btree::walk::<DeviceDetails, _, _>(&*bm, sb.device_details_root, 0, |dev, details| {
            devices.insert(
                dev,
                Device {
                    details,
                    changed: false,
                    open: false,
                },
            );
            Ok(true)
        })?;
        let mut pool = PoolMetadata {
            bm,
            tm,
            data_sm,
            details_root: sb.device_details_root,
            mapping_root: sb.data_mapping_root,
            time: sb.time,
            trans_id: sb.trans_id,
            held_root: sb.held_root,
            needs_check: sb.needs_check(),
            committed: sb,
            devices,
            deleted: Vec::new(),
            read_only: false,
            threshold: None,
            threshold_fired: false,
        };
        if pool.needs_check {
            pool.read_only = true;
        }
        if pool.tm.block_manager().nr_blocks() > pool.committed.metadata_nr_blocks {
            // The metadata file grew while the pool was closed: use the new space.
            pool.grow_metadata_space()?;
        }
        Ok(pool)
    }
}
