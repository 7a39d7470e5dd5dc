//! The disk space map (data blocks): bitmaps listed by an index btree, counts above 2 in a
//! ref-count btree. A transaction's changes stay in memory until [`DiskSpaceMap::commit`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::bitmap::{self, ENTRIES_PER_BITMAP, OVERFLOW};
use super::SpaceMap;
use crate::engine::pdata::block_manager::BlockManager;
use crate::engine::pdata::btree::{self, NoRefs};
use crate::engine::pdata::checksum::BlockKind;
use crate::engine::pdata::error::{FormatError, PdataError, Result};
use crate::engine::pdata::superblock::SmRoot;
use crate::engine::pdata::tm::TransactionManager;
use crate::engine::pdata::values::IndexEntry;

const WHAT: &str = "data";

/// Reference counts of the data device's blocks.
pub struct DiskSpaceMap {
    bm: Arc<BlockManager>,
    nr_blocks: u64,
    nr_allocated: u64,
    /// Root of the index btree (bitmap number -> entry); 0 before the first commit.
    index_root: u64,
    /// Root of the ref-count btree; 0 before the first commit.
    ref_count_root: u64,
    /// Every bitmap's entry; `blocknr == 0` means "not yet on disk" (all free). `nr_free`
    /// includes this transaction's changes.
    entries: Vec<IndexEntry>,
    /// Counts changed in this transaction.
    changes: HashMap<u64, u32>,
    /// Bitmaps to rewrite at commit besides those with changes.
    dirty: BTreeSet<usize>,
    freed: HashSet<u64>,
    cursor: u64,
}

fn entries_in(nr_blocks: u64, i: usize) -> u64 {
    let start = i as u64 * ENTRIES_PER_BITMAP;
    nr_blocks.saturating_sub(start).min(ENTRIES_PER_BITMAP)
}

impl DiskSpaceMap {
    /// A map of `nr_blocks` free blocks; written on the first commit.
    pub fn create(bm: Arc<BlockManager>, nr_blocks: u64) -> DiskSpaceMap {
        let n = nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
        let entries = (0..n)
            .map(|i| IndexEntry {
                blocknr: 0,
                nr_free: entries_in(nr_blocks, i) as u32,
                none_free_before: 0,
            })
            .collect();
        DiskSpaceMap {
            bm,
            nr_blocks,
            nr_allocated: 0,
            index_root: 0,
            ref_count_root: 0,
            entries,
            changes: HashMap::new(),
            dirty: (0..n).collect(),
            freed: HashSet::new(),
            cursor: 0,
        }
    }

    /// Opens the map a committed superblock describes.
    pub fn open(bm: Arc<BlockManager>, root: &SmRoot) -> Result<DiskSpaceMap> {
        let n = root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
        let mut entries = Vec::new();
        let mut bad = None;
        btree::walk::<IndexEntry, _, _>(&*bm, root.bitmap_root, 0, |k, e| {
            if k != entries.len() as u64 || k >= n || e.blocknr >= bm.nr_blocks() {
                bad = Some("index btree keys or bitmap locations are wrong");
                return Ok(false);
            }
            entries.push(e);
            Ok(true)
        })?;
        if bad.is_none() && entries.len() as u64 != n {
            bad = Some("index btree does not list every bitmap");
        }
        if let Some(what) = bad {
            return Err(FormatError::BadSpaceMapRoot {
                block: root.bitmap_root,
                what,
            }
            .into());
        }
        // The kernel counts a whole last bitmap as free in its index entry, so the root's
        // figure is the one to keep.
        let nr_allocated = root.nr_allocated.min(root.nr_blocks);
        Ok(DiskSpaceMap {
            bm,
            nr_blocks: root.nr_blocks,
            nr_allocated,
            index_root: root.bitmap_root,
            ref_count_root: root.ref_count_root,
            entries,
            changes: HashMap::new(),
            dirty: BTreeSet::new(),
            freed: HashSet::new(),
            cursor: 0,
        })
    }

    /// The root as of the last commit.
    pub fn root(&self) -> SmRoot {
        SmRoot {
            nr_blocks: self.nr_blocks,
            nr_allocated: self.nr_allocated,
            bitmap_root: self.index_root,
            ref_count_root: self.ref_count_root,
        }
    }

    /// Whether this transaction changed anything.
    pub fn is_dirty(&self) -> bool {
        !self.changes.is_empty() || !self.dirty.is_empty()
    }

    fn check(&self, b: u64) -> Result<()> {
        if b >= self.nr_blocks {
            return Err(PdataError::BlockOutOfRange {
                what: WHAT,
                block: b,
                nr_blocks: self.nr_blocks,
            });
        }
        Ok(())
    }

    /// The count as of the last commit.
    fn disk_count(&self, b: u64) -> Result<u32> {
        let i = (b / ENTRIES_PER_BITMAP) as usize;
        let loc = self.entries.get(i).map_or(0, |e| e.blocknr);
        if loc == 0 {
            return Ok(0);
        }
        let blk = self.bm.read(loc, BlockKind::Bitmap)?;
        let c = bitmap::get(&blk, b % ENTRIES_PER_BITMAP);
        drop(blk);
        if c < OVERFLOW {
            return Ok(u32::from(c));
        }
        btree::lookup::<u32, _>(&*self.bm, self.ref_count_root, b)?.ok_or_else(|| {
            FormatError::BadSpaceMapRoot {
                block: self.ref_count_root,
                what: "overflowed count missing from ref-count btree",
            }
            .into()
        })
    }

    /// The counts of blocks `[begin, end)`, reading each bitmap once.
    pub fn counts(&self, begin: u64, end: u64) -> Result<Vec<u32>> {
        let end = end.min(self.nr_blocks);
        let mut out = Vec::with_capacity(end.saturating_sub(begin) as usize);
        let mut b = begin;
        while b < end {
            let i = (b / ENTRIES_PER_BITMAP) as usize;
            let start = i as u64 * ENTRIES_PER_BITMAP;
            let stop = (start + ENTRIES_PER_BITMAP).min(end);
            let loc = self.entries.get(i).map_or(0, |e| e.blocknr);
            let disk: Vec<u8> = if loc == 0 {
                vec![0; (stop - start) as usize]
            } else {
                bitmap::decode_entries(&self.bm.read(loc, BlockKind::Bitmap)?, stop - start)
            };
            for x in b..stop {
                let c = match self.changes.get(&x) {
                    Some(&c) => c,
                    None => match disk.get((x - start) as usize).copied().unwrap_or(0) {
                        OVERFLOW => self.disk_count(x)?,
                        c => u32::from(c),
                    },
                };
                out.push(c);
            }
            b = stop;
        }
        Ok(out)
    }

    /// Writes this transaction's changes (bitmaps, index and ref-count btrees) through `tm`
    /// and returns the root for the superblock. Blocks freed before this may be reused
    /// after it: allocate nothing until the superblock is committed.
    pub fn commit(&mut self, tm: &mut TransactionManager) -> Result<SmRoot> {
        if self.index_root == 0 {
            self.index_root = btree::empty::<IndexEntry>(tm)?;
        }
        if self.ref_count_root == 0 {
            self.ref_count_root = btree::empty::<u32>(tm)?;
        }
        let mut by_bitmap: BTreeMap<usize, Vec<(u64, u32)>> = BTreeMap::new();
        for (&b, &c) in &self.changes {
            by_bitmap
                .entry((b / ENTRIES_PER_BITMAP) as usize)
                .or_default()
                .push((b, c));
        }
        for i in std::mem::take(&mut self.dirty) {
            by_bitmap.entry(i).or_default();
        }
        let mut overflow: Vec<(u64, Option<u32>)> = Vec::new();
        for (i, changes) in by_bitmap {
            let Some(entry) = self.entries.get(i).copied() else {
                continue;
            };
            let mut w = if entry.blocknr == 0 {
                tm.new_block(BlockKind::Bitmap)?
            } else {
                tm.shadow(entry.blocknr, BlockKind::Bitmap)?.0
            };
            for (b, c) in changes {
                let off = b % ENTRIES_PER_BITMAP;
                let was = bitmap::get(&w, off);
                if c >= 3 {
                    bitmap::set(&mut w, off, OVERFLOW);
                    overflow.push((b, Some(c)));
                } else {
                    bitmap::set(&mut w, off, c as u8);
                    if was == OVERFLOW {
                        overflow.push((b, None));
                    }
                }
            }
            let n = entries_in(self.nr_blocks, i);
            let counts = bitmap::decode_entries(&w, n);
            let nr_free = counts.iter().filter(|&&c| c == 0).count() as u32;
            let none_free_before =
                counts.iter().position(|&c| c == 0).unwrap_or(counts.len()) as u32;
            let e = IndexEntry {
                blocknr: w.location(),
                nr_free,
                none_free_before,
            };
            drop(w);
            if let Some(slot) = self.entries.get_mut(i) {
                *slot = e;
            }
            self.index_root =
                btree::insert::<IndexEntry>(tm, &mut NoRefs, self.index_root, i as u64, &e)?;
        }
        overflow.sort_unstable();
        for (b, c) in overflow {
            self.ref_count_root = match c {
                Some(c) => btree::insert::<u32>(tm, &mut NoRefs, self.ref_count_root, b, &c)?,
                None => btree::remove::<u32>(tm, &mut NoRefs, self.ref_count_root, b)?.0,
            };
        }
        self.changes.clear();
        self.freed.clear();
        Ok(self.root())
    }

    fn find_free_in(&self, i: usize, from: u64) -> Result<Option<u64>> {
        let Some(e) = self.entries.get(i) else {
            return Ok(None);
        };
        if e.nr_free == 0 {
            return Ok(None);
        }
        let start = i as u64 * ENTRIES_PER_BITMAP;
        let n = entries_in(self.nr_blocks, i);
        let blk = if e.blocknr == 0 {
            None
        } else {
            Some(self.bm.read(e.blocknr, BlockKind::Bitmap)?)
        };
        let mut off = from;
        while off < n {
            let cand = match &blk {
                Some(b) => bitmap::find_free(b, off, n),
                None => Some(off),
            };
            let Some(c) = cand else { return Ok(None) };
            let b = start + c;
            let taken = self.changes.get(&b).is_some_and(|&x| x > 0) || self.freed.contains(&b);
            if !taken {
                return Ok(Some(b));
            }
            off = c + 1;
        }
        Ok(None)
    }
}

impl SpaceMap for DiskSpaceMap {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }

    fn count(&self, b: u64) -> Result<u32> {
        self.check(b)?;
        match self.changes.get(&b) {
            Some(&c) => Ok(c),
            None => self.disk_count(b),
        }
    }

    fn set_count(&mut self, b: u64, new: u32) -> Result<()> {
        let old = self.count(b)?;
        if old == new {
            return Ok(());
        }
        self.changes.insert(b, new);
        let i = (b / ENTRIES_PER_BITMAP) as usize;
        if old == 0 {
            self.nr_allocated += 1;
            if let Some(e) = self.entries.get_mut(i) {
                e.nr_free = e.nr_free.saturating_sub(1);
            }
        } else if new == 0 {
            self.nr_allocated -= 1;
            self.freed.insert(b);
            if let Some(e) = self.entries.get_mut(i) {
                e.nr_free += 1;
            }
        }
        Ok(())
    }

    fn what(&self) -> &'static str {
        WHAT
    }

    fn new_block(&mut self) -> Result<u64> {
        let n = self.entries.len();
        if n == 0 {
            return Err(PdataError::NoSpace(WHAT));
        }
        let first = ((self.cursor / ENTRIES_PER_BITMAP) as usize).min(n - 1);
        for step in 0..=n {
            let i = (first + step) % n;
            let from = if step == 0 {
                self.cursor % ENTRIES_PER_BITMAP
            } else {
                0
            };
            if let Some(b) = self.find_free_in(i, from)? {
                self.set_count(b, 1)?;
                self.cursor = b + 1;
                return Ok(b);
            }
        }
        Err(PdataError::NoSpace(WHAT))
    }

    fn extend(&mut self, extra: u64) -> Result<()> {
        let old = self.nr_blocks;
        let new = old.checked_add(extra).ok_or(PdataError::CannotShrink {
            what: WHAT,
            from: old,
            to: old,
        })?;
        let n = new.div_ceil(ENTRIES_PER_BITMAP) as usize;
        let old_n = self.entries.len();
        if let Some(last) = old_n.checked_sub(1) {
            let gained = entries_in(new, last) - entries_in(old, last);
            if let Some(e) = self.entries.get_mut(last) {
                e.nr_free += gained as u32;
            }
            if gained > 0 {
                self.dirty.insert(last);
            }
        }
        for i in old_n..n {
            self.entries.push(IndexEntry {
                blocknr: 0,
                nr_free: entries_in(new, i) as u32,
                none_free_before: 0,
            });
            self.dirty.insert(i);
        }
        self.nr_blocks = new;
        Ok(())
    }
}
