//! The metadata space map: counts for every metadata block, held in memory during a
//! transaction; on disk a single index block (up to 255 bitmaps) and a ref-count btree.

use std::collections::{BTreeSet, HashSet};

use super::bitmap::{self, ENTRIES_PER_BITMAP};
use super::index::{self, MAX_METADATA_BITMAPS};
use super::SpaceMap;
use crate::engine::pdata::block_manager::BlockManager;
use crate::engine::pdata::btree;
use crate::engine::pdata::checksum::BlockKind;
use crate::engine::pdata::error::{FormatError, PdataError, Result};
use crate::engine::pdata::superblock::SmRoot;
use crate::engine::pdata::values::IndexEntry;

const WHAT: &str = "metadata";

/// The metadata device's reference counts.
#[derive(Debug, Clone)]
pub struct MetadataSpaceMap {
    counts: Vec<u32>,
    nr_allocated: u64,
    /// One entry per bitmap; `blocknr == 0` means "not yet on disk".
    pub(crate) entries: Vec<IndexEntry>,
    /// The index block, 0 before the first commit.
    pub(crate) index_block: u64,
    /// The ref-count btree root, 0 before the first commit.
    pub(crate) ref_count_root: u64,
    /// Bitmaps whose counts changed since the last commit.
    pub(crate) dirty: BTreeSet<usize>,
    /// Blocks whose count went above 2, changed while above 2, or came back down.
    pub(crate) overflow_changed: BTreeSet<u64>,
    freed: HashSet<u64>,
    cursor: u64,
}

/// Most metadata blocks the single index block can describe.
pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP;

fn nr_bitmaps(nr_blocks: u64) -> usize {
    nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize
}

impl MetadataSpaceMap {
    /// A new map of `nr_blocks`, all free, nothing on disk yet.
    pub fn create(nr_blocks: u64) -> Result<MetadataSpaceMap> {
        if nr_blocks > MAX_METADATA_BLOCKS {
            return Err(PdataError::BlockOutOfRange {
                what: WHAT,
                block: nr_blocks,
                nr_blocks: MAX_METADATA_BLOCKS,
            });
        }
        let n = nr_bitmaps(nr_blocks);
        Ok(MetadataSpaceMap {
            counts: vec![0; nr_blocks as usize],
            nr_allocated: 0,
            entries: vec![IndexEntry::default(); n],
            index_block: 0,
            ref_count_root: 0,
            dirty: (0..n).collect(),
            overflow_changed: BTreeSet::new(),
            freed: HashSet::new(),
            cursor: 0,
        })
    }

    /// Loads the map described by `root` from disk.
    pub fn open(bm: &BlockManager, root: &SmRoot) -> Result<MetadataSpaceMap> {
        let bad = |what| FormatError::BadSpaceMapRoot { block: 0, what };
        if root.nr_blocks > bm.nr_blocks() || root.nr_blocks > MAX_METADATA_BLOCKS {
            return Err(bad("metadata space map is larger than the metadata device").into());
        }
        let n = nr_bitmaps(root.nr_blocks);
        let ib = bm.read(root.bitmap_root, BlockKind::Index)?;
        let entries = index::decode(&ib, root.bitmap_root, n as u64)?;
        drop(ib);
        if entries.len() != n {
            return Err(bad("index block has too few entries").into());
        }
        let mut counts = Vec::with_capacity(root.nr_blocks as usize);
        for (i, e) in entries.iter().enumerate() {
            let b = bm.read(e.blocknr, BlockKind::Bitmap)?;
            let want = (root.nr_blocks - i as u64 * ENTRIES_PER_BITMAP).min(ENTRIES_PER_BITMAP);
            counts.extend(bitmap::decode_entries(&b, want).into_iter().map(u32::from));
        }
        let overflowing = counts
            .iter()
            .filter(|&&c| c == u32::from(bitmap::OVERFLOW))
            .count();
        let mut matched = 0usize;
        let mut stray = false;
        btree::walk::<u32, _, _>(bm, root.ref_count_root, 0, |k, v| {
            match counts.get_mut(k as usize) {
                Some(c) if *c == u32::from(bitmap::OVERFLOW) && v >= 3 => {
                    *c = v;
                    matched += 1;
                }
                _ => stray = true,
            }
            Ok(true)
        })?;
        if stray || matched != overflowing {
            return Err(bad("ref-count btree disagrees with the bitmaps").into());
        }
        let nr_allocated = counts.iter().filter(|&&c| c > 0).count() as u64;
        Ok(MetadataSpaceMap {
            counts,
            nr_allocated,
            entries,
            index_block: root.bitmap_root,
            ref_count_root: root.ref_count_root,
            dirty: BTreeSet::new(),
            overflow_changed: BTreeSet::new(),
            freed: HashSet::new(),
            cursor: 0,
        })
    }

    /// The root describing what the last pre-commit wrote.
    pub fn root(&self) -> SmRoot {
        SmRoot {
            nr_blocks: self.counts.len() as u64,
            nr_allocated: self.nr_allocated,
            bitmap_root: self.index_block,
            ref_count_root: self.ref_count_root,
        }
    }

    /// Whether anything changed since the last commit.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty() || !self.overflow_changed.is_empty()
    }

    /// Forgets the blocks freed in the transaction that just committed: they may be reused.
    pub(crate) fn committed(&mut self) {
        self.freed.clear();
    }

    /// Encodes bitmap `i` from the in-memory counts; returns its index entry (location kept).
    pub(crate) fn encode_bitmap(&self, i: usize, block: &mut [u8]) -> IndexEntry {
        block.fill(0);
        let start = i as u64 * ENTRIES_PER_BITMAP;
        let end = (start + ENTRIES_PER_BITMAP).min(self.counts.len() as u64);
        let mut nr_free = 0u32;
        let mut first_free = None;
        for b in start..end {
            let c = self.counts.get(b as usize).copied().unwrap_or(0);
            if c == 0 {
                nr_free += 1;
                first_free.get_or_insert(b - start);
            } else {
                bitmap::set(block, b - start, c.min(3) as u8);
            }
        }
        IndexEntry {
            blocknr: self.entries.get(i).map_or(0, |e| e.blocknr),
            nr_free,
            none_free_before: first_free.unwrap_or(end - start) as u32,
        }
    }

    pub(crate) fn count_of(&self, b: u64) -> u32 {
        self.counts.get(b as usize).copied().unwrap_or(0)
    }

    fn check(&self, b: u64) -> Result<usize> {
        if b >= self.counts.len() as u64 {
            return Err(PdataError::BlockOutOfRange {
                what: WHAT,
                block: b,
                nr_blocks: self.counts.len() as u64,
            });
        }
        Ok(b as usize)
    }
}

impl SpaceMap for MetadataSpaceMap {
    fn nr_blocks(&self) -> u64 {
        self.counts.len() as u64
    }

    fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }

    fn count(&self, b: u64) -> Result<u32> {
        let i = self.check(b)?;
        Ok(self.counts.get(i).copied().unwrap_or(0))
    }

    fn set_count(&mut self, b: u64, new: u32) -> Result<()> {
        let i = self.check(b)?;
        let Some(slot) = self.counts.get_mut(i) else {
            return Ok(());
        };
        let old = *slot;
        if old == new {
            return Ok(());
        }
        *slot = new;
        if old >= 3 || new >= 3 {
            self.overflow_changed.insert(b);
        }
        if old == 0 {
            self.nr_allocated += 1;
        } else if new == 0 {
            self.nr_allocated -= 1;
            self.freed.insert(b);
        }
        let bi = (b / ENTRIES_PER_BITMAP) as usize;
        self.dirty.insert(bi);
        if let Some(e) = self.entries.get_mut(bi) {
            if old == 0 {
                e.nr_free = e.nr_free.saturating_sub(1);
            } else if new == 0 {
                e.nr_free += 1;
            }
        }
        Ok(())
    }

    fn what(&self) -> &'static str {
        WHAT
    }

    fn new_block(&mut self) -> Result<u64> {
        let n = self.counts.len() as u64;
        for step in 0..n {
            let b = (self.cursor + step) % n;
            if self.counts.get(b as usize) == Some(&0) && !self.freed.contains(&b) {
                self.cursor = (b + 1) % n;
                self.set_count(b, 1)?;
                return Ok(b);
            }
        }
        Err(PdataError::NoSpace(WHAT))
    }

    fn extend(&mut self, extra: u64) -> Result<()> {
        let old = self.counts.len() as u64;
        let new = old.saturating_add(extra);
        if new > MAX_METADATA_BLOCKS {
            return Err(PdataError::BlockOutOfRange {
                what: WHAT,
                block: new,
                nr_blocks: MAX_METADATA_BLOCKS,
            });
        }
        self.counts.resize(new as usize, 0);
        let (ob, nb) = (nr_bitmaps(old), nr_bitmaps(new));
        self.entries.resize(nb, IndexEntry::default());
        // The last old bitmap gains entries too.
        self.dirty.extend(ob.saturating_sub(1)..nb);
        Ok(())
    }
}
