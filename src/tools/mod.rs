//! Offline tools on a pool that no daemon holds, in the spirit of thin-provisioning-tools:
//! `thinblk check | dump | restore | ls | delta`.
//!
//! - [`check`]: everything `thin_check` 0.9 checks, plus data reference counts, each
//!   device's `mapped_blocks`, the superblock's magic, version and location, and the
//!   `needs_check` flag (built on [`crate::engine::pdata::check::check_pool`]).
//! - [`dump`]: the pool as `thin_dump` 0.9 writes it (XML) or the same structure as JSON
//!   ([`json`]); streams mappings, so memory does not grow with the pool.
//! - [`xml`]: a strict reader of that XML (line numbers in every error, never a panic).
//! - [`restore`]: writes a pool from the XML through the transaction manager ([`pool`]).
//! - [`ls`], [`delta`]: `thin_ls` and `thin_delta` 0.9 output.
//! - [`model`]: a whole pool in memory, for comparisons and tests.
//!
//! Readers take a shared `flock` on the metadata file and writers an exclusive one, so a
//! tool refuses a pool a daemon holds (the daemon locks exclusively).

pub mod check;
pub mod cli;
pub mod delta;
pub mod dump;
pub mod error;
pub mod json;
pub mod ls;
pub mod model;
pub mod progress;

pub mod restore;
pub mod xml;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{Result, ToolError};

use crate::bufio::{BlockStore, BufferCache, BufioConfig, FileStore};
use crate::engine::pdata::block_manager::BlockManager;
use crate::engine::pdata::checksum::BlockKind;
use crate::engine::pdata::space_map::metadata::MAX_METADATA_BLOCKS;
use crate::engine::pdata::superblock::{Superblock, BLOCK_SIZE, SUPERBLOCK_LOCATION};

/// Metadata blocks the tools keep cached.
const CACHE_BYTES: usize = 64 << 20;

/// An opened, locked metadata device.
pub struct Metadata {
    pub path: PathBuf,
    pub bm: Arc<BlockManager>,
    /// Holds the flock for as long as the tool runs.
    pub store: Arc<FileStore>,
}

/// How to open a metadata device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only, shared lock: several readers, no daemon.
    Read,
    /// Read and write, exclusive lock.
    Write,
}

impl Metadata {
    /// Opens and locks `path` without waiting for the lock.
    pub fn open(path: &Path, access: Access) -> Result<Metadata> {
        let open_err = |source| ToolError::Open {
            path: path.to_path_buf(),
            source,
        };
        let store = match access {
            Access::Read => FileStore::open_read_only(path, BLOCK_SIZE),
            Access::Write => FileStore::open(path, BLOCK_SIZE),
        }
        .map_err(open_err)?;
        let locked = match access {
            Access::Read => store.lock_shared(),
            Access::Write => store.lock_exclusive(),
        };
        locked.map_err(|source| lock_error(path, source))?;
        let store = Arc::new(store);
        if store.nr_blocks() == 0 {
            return Err(ToolError::TooSmall {
                path: path.to_path_buf(),
                bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            });
        }
        Ok(Metadata {
            path: path.to_path_buf(),
            bm: block_manager(store.clone()),
            store,
        })
    }

    /// The superblock at block 0.
    pub fn superblock(&self) -> Result<Superblock> {
        read_superblock(&self.bm, SUPERBLOCK_LOCATION)
    }

    /// The superblock whose trees a tool should read: block 0's, or with `metadata_snap` the
    /// held metadata snapshot's (a copy of an earlier superblock).
    pub fn roots(&self, metadata_snap: bool) -> Result<Superblock> {
        let sb = self.superblock()?;
        if !metadata_snap {
            return Ok(sb);
        }
        if sb.held_root == 0 {
            return Err(ToolError::NoMetadataSnap);
        }
        read_superblock(&self.bm, sb.held_root)
    }
}

/// A block manager over `store`, using at most the blocks one metadata space map can count.
pub fn block_manager(store: Arc<dyn BlockStore>) -> Arc<BlockManager> {
    let nr_blocks = store.nr_blocks().min(MAX_METADATA_BLOCKS);
    let cache = BufferCache::new(
        store,
        BufioConfig {
            block_size: BLOCK_SIZE,
            memory_limit: CACHE_BYTES,
        },
    );
    Arc::new(BlockManager::new(Arc::new(cache), nr_blocks))
}

/// Reads and validates the superblock (or a held copy) at `location`.
pub fn read_superblock(bm: &BlockManager, location: u64) -> Result<Superblock> {
    let what = if location == SUPERBLOCK_LOCATION {
        "superblock".to_string()
    } else {
        format!("metadata snapshot superblock at block {location}")
    };
    let blk = bm
        .read(location, BlockKind::Superblock)
        .map_err(ToolError::metadata(what.clone()))?;
    Superblock::decode(&blk, location).map_err(|e| ToolError::Metadata {
        what,
        source: e.into(),
    })
}

/// Whether a data block size (in 512-byte sectors) is one the kernel accepts: a multiple of
/// 64 KiB up to 1 GiB.
pub fn data_block_size_ok(sectors: u32) -> bool {
    sectors != 0 && sectors.is_multiple_of(128) && sectors <= 2_097_152
}

fn lock_error(path: &Path, source: io::Error) -> ToolError {
    if source.kind() == io::ErrorKind::WouldBlock {
        ToolError::Locked {
            path: path.to_path_buf(),
            source,
        }
    } else {
        ToolError::Open {
            path: path.to_path_buf(),
            source,
        }
    }
}
