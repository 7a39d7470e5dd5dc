//! Space maps: reference counts of blocks, 2 bits per block in bitmaps plus a btree for
//! counts above 2.
//!
//! - [`MetadataSpaceMap`] counts the metadata device's blocks. It keeps every count in memory
//!   during a transaction, so allocating while it updates itself needs no recursion; the
//!   transaction manager writes it out (bitmaps, ref-count btree, index block) at pre-commit.
//! - [`DiskSpaceMap`] counts data blocks. It reads its bitmaps through the block manager and
//!   keeps a transaction's changes in memory until [`DiskSpaceMap::commit`].
//!
//! Both refuse to hand out a block freed in the current transaction: the last commit may
//! still reference it.

pub mod bitmap;
pub mod disk;
pub mod index;
pub mod metadata;

pub use disk::DiskSpaceMap;
pub use metadata::MetadataSpaceMap;

use super::error::{PdataError, Result};

/// Reference counts of a device's blocks.
pub trait SpaceMap {
    /// Blocks described.
    fn nr_blocks(&self) -> u64;
    /// Blocks whose count is not zero.
    fn nr_allocated(&self) -> u64;
    /// Blocks whose count is zero.
    fn nr_free(&self) -> u64 {
        self.nr_blocks().saturating_sub(self.nr_allocated())
    }
    /// The count of block `b`.
    fn count(&self, b: u64) -> Result<u32>;
    /// Sets the count of block `b`.
    fn set_count(&mut self, b: u64, count: u32) -> Result<()>;
    /// Which space map this is, for errors.
    fn what(&self) -> &'static str;
    /// Adds one to the count of `b`.
    fn inc(&mut self, b: u64) -> Result<()> {
        let n = self
            .count(b)?
            .checked_add(1)
            .ok_or(PdataError::CountOverflow {
                what: self.what(),
                block: b,
            })?;
        self.set_count(b, n)
    }
    /// Takes one from the count of `b`.
    fn dec(&mut self, b: u64) -> Result<()> {
        let n = self
            .count(b)?
            .checked_sub(1)
            .ok_or(PdataError::CountUnderflow {
                what: self.what(),
                block: b,
            })?;
        self.set_count(b, n)
    }
    /// Finds a block free now and at the last commit, and sets its count to 1.
    fn new_block(&mut self) -> Result<u64>;
    /// Grows the map by `extra` blocks, all free.
    fn extend(&mut self, extra: u64) -> Result<()>;
}
