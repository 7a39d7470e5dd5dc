//! The transaction manager: copy-on-write of metadata blocks with reference counts.
//!
//! A block may be changed in place only if this transaction created it (it is a "shadow")
//! and nothing else references it; otherwise it is copied first (shadowed), and if it was
//! shared the copy's children gain a reference. Nothing the last committed superblock can
//! reach is ever overwritten, and a block freed in a transaction is not reused before that
//! transaction commits. Commit writes every dirty block, flushes, then writes the superblock
//! and flushes again.

use std::collections::HashSet;
use std::sync::Arc;

use super::block_manager::{BlockManager, ReadBlock, WriteBlock};
use super::btree::{self, NoRefs};
use super::checksum::BlockKind;
use super::error::{PdataError, Result};
use super::node::Node;
use super::space_map::{index, MetadataSpaceMap, SpaceMap};
use super::superblock::{SmRoot, Superblock, SUPERBLOCK_LOCATION};

/// Where btree code reads nodes from: the blocking block manager, the transaction manager,
/// or a [`NonBlocking`] view.
pub trait BlockSource {
    fn read_block(&self, b: u64, kind: BlockKind) -> Result<ReadBlock>;
}

impl BlockSource for BlockManager {
    fn read_block(&self, b: u64, kind: BlockKind) -> Result<ReadBlock> {
        self.read(b, kind)
    }
}

impl BlockSource for Arc<BlockManager> {
    fn read_block(&self, b: u64, kind: BlockKind) -> Result<ReadBlock> {
        self.read(b, kind)
    }
}

/// Reads only what is cached: anything else fails with [`PdataError::WouldBlock`].
pub struct NonBlocking<'a>(pub &'a BlockManager);

impl BlockSource for NonBlocking<'_> {
    fn read_block(&self, b: u64, kind: BlockKind) -> Result<ReadBlock> {
        self.0.try_read(b, kind)
    }
}

impl BlockSource for TransactionManager {
    fn read_block(&self, b: u64, kind: BlockKind) -> Result<ReadBlock> {
        self.bm.read(b, kind)
    }
}

/// Copy-on-write access to the metadata device, with its space map.
pub struct TransactionManager {
    bm: Arc<BlockManager>,
    sm: MetadataSpaceMap,
    /// Blocks created in this transaction and referenced once: writable in place.
    shadows: HashSet<u64>,
}

impl TransactionManager {
    /// Starts a fresh metadata device: every block free but the superblock.
    pub fn create(bm: Arc<BlockManager>) -> Result<TransactionManager> {
        let mut sm = MetadataSpaceMap::create(bm.nr_blocks())?;
        sm.inc(SUPERBLOCK_LOCATION)?;
        Ok(TransactionManager {
            bm,
            sm,
            shadows: HashSet::new(),
        })
    }

    /// Opens the metadata space map described by a committed superblock's root.
    pub fn open(bm: Arc<BlockManager>, metadata_sm_root: &SmRoot) -> Result<TransactionManager> {
        let sm = MetadataSpaceMap::open(&bm, metadata_sm_root)?;
        Ok(TransactionManager {
            bm,
            sm,
            shadows: HashSet::new(),
        })
    }

    pub fn block_manager(&self) -> &Arc<BlockManager> {
        &self.bm
    }

    pub fn metadata_sm(&self) -> &MetadataSpaceMap {
        &self.sm
    }

    /// Reads a validated block.
    pub fn read(&self, b: u64, kind: BlockKind) -> Result<ReadBlock> {
        self.bm.read(b, kind)
    }

    /// Allocates a block and locks it for writing, zeroed.
    pub fn new_block(&mut self, kind: BlockKind) -> Result<WriteBlock> {
        let b = self.sm.new_block()?;
        match self.bm.write_zeroed(b, kind) {
            Ok(w) => {
                self.shadows.insert(b);
                Ok(w)
            }
            Err(e) => {
                self.sm.dec(b)?;
                Err(e)
            }
        }
    }

    /// Gets block `b` ready for writing: in place if this transaction made it and nothing
    /// else references it, else a copy. The flag says whether the original was shared, in
    /// which case the caller must give every child of the copy one more reference.
    pub fn shadow(&mut self, b: u64, kind: BlockKind) -> Result<(WriteBlock, bool)> {
        let count = self.sm.count(b)?;
        if count == 0 {
            return Err(PdataError::UnreferencedBlock { block: b });
        }
        let shared = count > 1;
        if !shared && self.shadows.contains(&b) {
            return Ok((self.bm.write(b, kind)?, false));
        }
        let src = self.bm.read(b, kind)?;
        let new = self.sm.new_block()?;
        self.sm.dec(b)?;
        let mut w = self.bm.write_zeroed(new, kind)?;
        w.copy_from_slice(&src);
        drop(src);
        self.shadows.insert(new);
        Ok((w, shared))
    }

    /// Locks a block this transaction already shadowed, to overwrite all of it.
    pub fn rewrite(&mut self, b: u64, kind: BlockKind) -> Result<WriteBlock> {
        self.bm.write_zeroed(b, kind)
    }

    pub fn is_shadow(&self, b: u64) -> bool {
        self.shadows.contains(&b)
    }

    pub fn inc(&mut self, b: u64) -> Result<()> {
        self.sm.inc(b)
    }

    pub fn dec(&mut self, b: u64) -> Result<()> {
        self.sm.dec(b)
    }

    pub fn ref_count(&self, b: u64) -> Result<u32> {
        self.sm.count(b)
    }

    /// Blocks of the metadata device still free.
    pub fn nr_free(&self) -> u64 {
        self.sm.nr_free()
    }

    /// Grows the metadata space map to the block manager's size.
    pub fn extend_to_device(&mut self) -> Result<()> {
        let extra = self.bm.nr_blocks().saturating_sub(self.sm.nr_blocks());
        if extra > 0 {
            self.sm.extend(extra)?;
        }
        Ok(())
    }

    /// Moves a space-map block out of the last commit's reach if it is not already ours.
    fn relocate(&mut self, b: u64) -> Result<Option<u64>> {
        if b != 0 && self.shadows.contains(&b) {
            return Ok(None);
        }
        let new = self.sm.new_block()?;
        if b != 0 {
            self.sm.dec(b)?;
        }
        self.shadows.insert(new);
        Ok(Some(new))
    }

    /// Writes the metadata space map out (its allocations included) and returns its root
    /// for the superblock. Nothing may allocate after this until [`commit`](Self::commit).
    pub fn pre_commit(&mut self) -> Result<SmRoot> {
        if self.sm.ref_count_root == 0 {
            let mut w = self.new_block(BlockKind::Node)?;
            Node::new(true, 4).encode(&mut w);
            self.sm.ref_count_root = w.location();
        }
        if !self.sm.is_dirty() && self.sm.index_block != 0 {
            return Ok(self.sm.root());
        }
        loop {
            let mut progress = false;
            for b in std::mem::take(&mut self.sm.overflow_changed) {
                progress = true;
                let c = self.sm.count_of(b);
                let root = self.sm.ref_count_root;
                let new_root = if c >= 3 {
                    btree::insert::<u32>(self, &mut NoRefs, root, b, &c)?
                } else {
                    btree::remove::<u32>(self, &mut NoRefs, root, b)?.0
                };
                self.sm.ref_count_root = new_root;
            }
            if let Some(new) = self.relocate(self.sm.index_block)? {
                self.sm.index_block = new;
                progress = true;
            }
            let dirty: Vec<usize> = self.sm.dirty.iter().copied().collect();
            for i in dirty {
                let loc = self.sm.entries.get(i).map_or(0, |e| e.blocknr);
                if let Some(new) = self.relocate(loc)? {
                    if let Some(e) = self.sm.entries.get_mut(i) {
                        e.blocknr = new;
                    }
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
        for i in std::mem::take(&mut self.sm.dirty) {
            let Some(loc) = self.sm.entries.get(i).map(|e| e.blocknr) else {
                continue;
            };
            let mut w = self.bm.write_zeroed(loc, BlockKind::Bitmap)?;
            let entry = self.sm.encode_bitmap(i, &mut w);
            drop(w);
            if let Some(e) = self.sm.entries.get_mut(i) {
                *e = entry;
            }
        }
        let mut w = self
            .bm
            .write_zeroed(self.sm.index_block, BlockKind::Index)?;
        index::encode(&mut w, &self.sm.entries);
        drop(w);
        Ok(self.sm.root())
    }

    /// Writes every dirty block, flushes, then writes `sb` to block 0 and flushes again.
    pub fn commit(&mut self, sb: &Superblock) -> Result<()> {
        if self.sm.is_dirty() {
            return Err(PdataError::CommitWithoutPreCommit);
        }
        self.bm.flush()?;
        let mut w = self
            .bm
            .write_zeroed(SUPERBLOCK_LOCATION, BlockKind::Superblock)?;
        sb.encode(&mut w, SUPERBLOCK_LOCATION);
        drop(w);
        self.bm.flush()?;
        self.shadows.clear();
        self.sm.committed();
        Ok(())
    }

    /// Drops every uncommitted change and reloads the space map of the last commit.
    pub fn abort(&mut self, committed_metadata_sm_root: &SmRoot) -> Result<()> {
        self.bm.discard_dirty();
        self.shadows.clear();
        self.sm = MetadataSpaceMap::open(&self.bm, committed_metadata_sm_root)?;
        Ok(())
    }
}
