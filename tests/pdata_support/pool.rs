//! A minimal thin pool over the pdata library, for tests: device details tree, two-level
//! mapping tree, data and metadata space maps, commit/abort/reopen.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use super::writer::PoolWriter;
use thinblk::bufio::BlockStore;
use thinblk::engine::pdata::btree::{self, DataRefs, NoRefs, SubtreeRefs};
use thinblk::engine::pdata::error::Result;
use thinblk::engine::pdata::space_map::SpaceMap;
use thinblk::engine::pdata::superblock::{Superblock, BLOCK_SIZE};
use thinblk::engine::pdata::values::{BlockTime, DeviceDetails};

use super::{bm_over, Dump};

/// A pool for tests: a [`PoolWriter`] (its fields reachable through `Deref`), the store
/// under it, and the thin-pool operations tests drive.
pub struct TestPool {
    pub store: Arc<dyn BlockStore>,
    pub w: PoolWriter,
}

impl Deref for TestPool {
    type Target = PoolWriter;
    fn deref(&self) -> &PoolWriter {
        &self.w
    }
}

impl DerefMut for TestPool {
    fn deref_mut(&mut self) -> &mut PoolWriter {
        &mut self.w
    }
}

impl TestPool {
    pub fn create(
        store: Arc<dyn BlockStore>,
        nr_data_blocks: u64,
        cache_bytes: usize,
    ) -> Result<TestPool> {
        let bm = bm_over(store.clone(), cache_bytes);
        let w = PoolWriter::create(bm, nr_data_blocks, 128)?;
        let mut pool = TestPool { store, w };
        pool.commit()?;
        Ok(pool)
    }

    pub fn open(store: Arc<dyn BlockStore>, cache_bytes: usize) -> Result<TestPool> {
        let bm = bm_over(store.clone(), cache_bytes);
        let w = PoolWriter::open(bm)?;
        Ok(TestPool { store, w })
    }

    /// Holds a read-only copy of the committed metadata (the kernel's metadata snapshot).
    pub fn reserve_metadata_snap(&mut self) -> Result<u64> {
        self.commit()?;
        self.w.tm.inc(0)?;
        let (mut w, _) = self
            .tm
            .shadow(0, thinblk::engine::pdata::checksum::BlockKind::Superblock)?;
        let loc = w.location();
        let mut copy = Superblock::decode(&w, 0)?;
        copy.data_sm_root = Default::default();
        copy.metadata_sm_root = Default::default();
        copy.encode(&mut w, loc);
        drop(w);
        self.w.tm.inc(copy.data_mapping_root)?;
        self.w.tm.inc(copy.device_details_root)?;
        self.w.committed.held_root = loc;
        self.commit()?;
        Ok(loc)
    }

    /// Drops the held metadata snapshot.
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        let held = self.w.committed.held_root;
        let blk = self.w.tm.read(
            held,
            thinblk::engine::pdata::checksum::BlockKind::Superblock,
        )?;
        let copy = Superblock::decode(&blk, held)?;
        drop(blk);
        let mut data = DataRefs(&mut self.w.data_sm);
        let mut top = SubtreeRefs { leaf: &mut data };
        btree::del::<u64>(&mut self.w.tm, &mut top, copy.data_mapping_root)?;
        btree::del::<DeviceDetails>(&mut self.w.tm, &mut NoRefs, copy.device_details_root)?;
        self.w.tm.dec(held)?;
        self.w.committed.held_root = 0;
        Ok(())
    }

    pub fn create_thin(&mut self, dev: u64) -> Result<()> {
        let sub = btree::empty::<BlockTime>(&mut self.w.tm)?;
        self.w.mapping_root =
            btree::insert::<u64>(&mut self.w.tm, &mut NoRefs, self.w.mapping_root, dev, &sub)?;
        self.w.trans_id += 1;
        let d = DeviceDetails {
            mapped_blocks: 0,
            transaction_id: self.w.trans_id,
            creation_time: self.w.time,
            snapshotted_time: self.w.time,
        };
        self.set_details(dev, &d)
    }

    pub fn snapshot(&mut self, dev: u64, origin: u64) -> Result<()> {
        let sub = btree::lookup::<u64, _>(&self.w.tm, self.w.mapping_root, origin)?
            .expect("origin exists");
        let mut od = self.details(origin)?.expect("origin details");
        self.w.time += 1;
        btree::clone_root(&mut self.w.tm, sub)?;
        self.w.mapping_root =
            btree::insert::<u64>(&mut self.w.tm, &mut NoRefs, self.w.mapping_root, dev, &sub)?;
        od.snapshotted_time = self.w.time;
        self.set_details(origin, &od)?;
        self.w.trans_id += 1;
        let d = DeviceDetails {
            mapped_blocks: od.mapped_blocks,
            transaction_id: self.w.trans_id,
            creation_time: self.w.time,
            snapshotted_time: self.w.time,
        };
        self.set_details(dev, &d)
    }

    pub fn delete(&mut self, dev: u64) -> Result<()> {
        let mut data = DataRefs(&mut self.w.data_sm);
        let mut top = SubtreeRefs { leaf: &mut data };
        let (root, _) = btree::remove::<u64>(&mut self.w.tm, &mut top, self.w.mapping_root, dev)?;
        self.w.mapping_root = root;
        let (root, _) =
            btree::remove::<DeviceDetails>(&mut self.w.tm, &mut NoRefs, self.w.details_root, dev)?;
        self.w.details_root = root;
        Ok(())
    }

    /// Maps `vblock` of `dev` to a newly allocated data block; returns it.
    pub fn map(&mut self, dev: u64, vblock: u64) -> Result<u64> {
        let block = self.w.data_sm.new_block()?;
        let had = self.lookup(dev, vblock)?.is_some();
        let v = BlockTime {
            block,
            time: self.w.time,
        };
        let mut data = DataRefs(&mut self.w.data_sm);
        self.w.mapping_root = btree::insert_nested(
            &mut self.w.tm,
            &mut data,
            self.w.mapping_root,
            dev,
            vblock,
            &v,
        )?;
        if !had {
            self.adjust_mapped(dev, 1)?;
        }
        Ok(block)
    }

    pub fn unmap(&mut self, dev: u64, vblock: u64) -> Result<bool> {
        let mut data = DataRefs(&mut self.w.data_sm);
        let (root, old) = btree::remove_nested::<BlockTime>(
            &mut self.w.tm,
            &mut data,
            self.w.mapping_root,
            dev,
            vblock,
        )?;
        self.w.mapping_root = root;
        if old.is_some() {
            self.adjust_mapped(dev, -1)?;
        }
        Ok(old.is_some())
    }

    pub fn unmap_range(&mut self, dev: u64, begin: u64, end: u64) -> Result<u64> {
        let mut data = DataRefs(&mut self.w.data_sm);
        let (root, n) = btree::remove_range_nested::<BlockTime>(
            &mut self.w.tm,
            &mut data,
            self.w.mapping_root,
            dev,
            begin,
            end,
        )?;
        self.w.mapping_root = root;
        self.adjust_mapped(dev, -(n as i64))?;
        Ok(n)
    }

    fn adjust_mapped(&mut self, dev: u64, delta: i64) -> Result<()> {
        if delta == 0 {
            return Ok(());
        }
        let mut d = self.details(dev)?.expect("device details");
        d.mapped_blocks = d
            .mapped_blocks
            .checked_add_signed(delta)
            .expect("mapped_blocks stays >= 0");
        self.set_details(dev, &d)
    }

    pub fn lookup(&self, dev: u64, vblock: u64) -> Result<Option<BlockTime>> {
        btree::lookup_nested::<BlockTime, _>(&self.w.tm, self.w.mapping_root, dev, vblock)
    }

    /// Everything the pool holds now (uncommitted changes included).
    pub fn dump(&self) -> Result<Dump> {
        let mut sb = self.w.committed.clone();
        sb.device_details_root = self.w.details_root;
        sb.data_mapping_root = self.w.mapping_root;
        sb.time = self.w.time;
        sb.trans_id = self.w.trans_id;
        sb.data_sm_root.nr_blocks = self.w.data_sm.nr_blocks();
        super::dump(&self.w.tm, &sb)
    }

    /// Copies the device into a file (for thin_check / thin_dump).
    pub fn write_image(&self, path: &std::path::Path) {
        let mut buf = vec![0u8; BLOCK_SIZE];
        let mut out = Vec::with_capacity(self.store.nr_blocks() as usize * BLOCK_SIZE);
        for b in 0..self.store.nr_blocks() {
            self.store.read_block(b, &mut buf).expect("read store");
            out.extend_from_slice(&buf);
        }
        std::fs::write(path, out).expect("write image");
    }
}
