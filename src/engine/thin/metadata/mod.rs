//! Thin-pool metadata: the operations of the kernel's dm-thin-metadata.h over the
//! persistent-data library, in the kernel's on-disk format.
//!
//! A transaction collects changes (new devices, mappings, device details kept in memory and
//! written back at commit, like the kernel's `changed` devices); `commit` makes them durable
//! with the superblock written last, `abort` returns to the last commit.

//!
//! One file per job: `open` (format, open), `transaction` (commit, abort, read-only mode,
//! needs_check, transaction id), `devices` (create, snapshot, delete, details), `mappings`
//! (find, insert, remove), `space` (data block counts, sizes, growing, the metadata
//! threshold), `restore` (building a pool from thin_dump XML), `snapshot` (the held metadata
//! snapshot).

mod devices;
mod mappings;
mod open;
mod restore;
mod snapshot;
mod space;
mod transaction;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::engine::pdata::block_manager::BlockManager;
use crate::engine::pdata::space_map::DiskSpaceMap;
use crate::engine::pdata::superblock::Superblock;
use crate::engine::pdata::tm::{BlockSource, TransactionManager};
use crate::engine::pdata::values::DeviceDetails;
use crate::engine::pdata::PdataError;

use super::error::{Result, ThinError};

/// Smallest and largest data block sizes dm-thin accepts, in 512-byte sectors (64 KiB, 1 GiB).
pub const MIN_BLOCK_SECTORS: u32 = 128;
pub const MAX_BLOCK_SECTORS: u32 = 2 * 1024 * 1024;

/// A mapping as a lookup sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub block: u64,
    /// Written before the device's latest snapshot: other devices may reference the block.
    pub shared: bool,
}

/// A run of consecutive virtual blocks mapped to consecutive data blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRange {
    pub thin_begin: u64,
    pub thin_end: u64,
    pub pool_begin: u64,
    pub maybe_shared: bool,
}

/// A device's details as held during a transaction.
#[derive(Clone, Copy, Debug)]
struct Device {
    details: DeviceDetails,
    changed: bool,
    open: bool,
}

/// Called with the number of free metadata blocks when it drops below the threshold.
pub type ThresholdCallback = Box<dyn FnMut(u64) + Send + Sync>;

/// The metadata of one thin pool.
pub struct PoolMetadata {
    bm: Arc<BlockManager>,
    tm: TransactionManager,
    data_sm: DiskSpaceMap,
    committed: Superblock,
    details_root: u64,
    mapping_root: u64,
    time: u32,
    trans_id: u64,
    held_root: u64,
    devices: BTreeMap<u64, Device>,
    /// Devices deleted in this transaction (their details leave the tree at commit).
    deleted: Vec<u64>,
    read_only: bool,
    needs_check: bool,
    threshold: Option<(u64, ThresholdCallback)>,
    threshold_fired: bool,
}

fn no_space(e: PdataError) -> ThinError {
    match e {
        PdataError::NoSpace("data") => ThinError::NoDataSpace,
        PdataError::NoSpace(_) => ThinError::NoMetadataSpace,
        e => ThinError::Pdata(e),
    }
}

impl PoolMetadata {
    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(ThinError::ReadOnly {
                needs_check: self.needs_check,
            })
        } else {
            Ok(())
        }
    }

    /// Blocks the last commit reaches are never changed; readers of the committed state
    /// (offline tools, a metadata snapshot) use this.
    pub fn committed_superblock(&self) -> &Superblock {
        &self.committed
    }

    pub fn block_manager(&self) -> &Arc<BlockManager> {
        &self.bm
    }

    /// Reads through the current transaction (for tools walking the pool as it is now).
    pub fn source(&self) -> &dyn BlockSource {
        &self.tm
    }

    /// The roots as of now (uncommitted changes included).
    pub fn roots(&self) -> (u64, u64) {
        (self.mapping_root, self.details_root)
    }
}
