//! A whole pool in memory, in the shape `thin_dump` prints: what tests and comparisons use.
//! Tools that may meet large pools stream instead ([`super::dump`]).

use std::collections::BTreeMap;

use crate::engine::pdata::btree;
use crate::engine::pdata::error::Result;
use crate::engine::pdata::superblock::Superblock;
use crate::engine::pdata::tm::BlockSource;
use crate::engine::pdata::values::{BlockTime, DeviceDetails};

/// What a pool's metadata says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolContents {
    pub time: u32,
    pub transaction: u64,
    pub data_block_size: u32,
    pub nr_data_blocks: u64,
    pub devices: BTreeMap<u64, DeviceContents>,
}

/// One thin device: its details and every mapping.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceContents {
    pub details: DeviceDetails,
    pub mappings: BTreeMap<u64, BlockTime>,
}

/// Reads every device and mapping reachable from `sb`'s roots. A device in the mapping tree
/// without details gets default details.
pub fn read_pool<S: BlockSource + ?Sized>(src: &S, sb: &Superblock) -> Result<PoolContents> {
    let mut devices = BTreeMap::new();
    btree::walk::<DeviceDetails, S, _>(src, sb.device_details_root, 0, |dev, details| {
        devices.insert(
            dev,
            DeviceContents {
                details,
                mappings: BTreeMap::new(),
            },
        );
        Ok(true)
    })?;
    let mut roots = Vec::new();
    btree::walk::<u64, S, _>(src, sb.data_mapping_root, 0, |dev, root| {
        roots.push((dev, root));
        Ok(true)
    })?;
    for (dev, root) in roots {
        let d = devices.entry(dev).or_default();
        btree::walk::<BlockTime, S, _>(src, root, 0, |k, v| {
            d.mappings.insert(k, v);
            Ok(true)
        })?;
    }
    Ok(PoolContents {
        time: sb.time,
        transaction: sb.trans_id,
        data_block_size: sb.data_block_size,
        nr_data_blocks: sb.data_sm_root.nr_blocks,
        devices,
    })
}
