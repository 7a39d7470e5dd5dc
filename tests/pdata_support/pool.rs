//! A minimal thin pool over the pdata library, for tests: device details tree, two-level
//! mapping tree, data and metadata space maps, commit/abort/reopen.

use std::sync::Arc;

use thinblk::bufio::BlockStore;
use thinblk::engine::pdata::block_manager::BlockManager;
use thinblk::engine::pdata::btree::{self, DataRefs, NoRefs, SubtreeRefs};
use thinblk::engine::pdata::error::Result;
use thinblk::engine::pdata::space_map::{DiskSpaceMap, SpaceMap};
use thinblk::engine::pdata::superblock::{Superblock, BLOCK_SIZE};
use thinblk::engine::pdata::tm::TransactionManager;
use thinblk::engine::pdata::values::{BlockTime, DeviceDetails};

use super::{bm_over, read_superblock, Dump};

pub struct TestPool {
    pub store: Arc<dyn BlockStore>,
    pub bm: Arc<BlockManager>,
    pub tm: TransactionManager,
    pub data_sm: DiskSpaceMap,
    pub details_root: u64,
    pub mapping_root: u64,
    pub time: u32,
    pub trans_id: u64,
    pub committed: Superblock,
}

fn base_superblock(data_block_size: u32, metadata_nr_blocks: u64) -> Superblock {
    Superblock {
        flags: 0,
        uuid: [0; 16],
        version: 2,
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

impl TestPool {
    pub fn create(
        store: Arc<dyn BlockStore>,
        nr_data_blocks: u64,
        cache_bytes: usize,
    ) -> Result<TestPool> {
        let bm = bm_over(store.clone(), cache_bytes);
        let mut tm = TransactionManager::create(bm.clone())?;
        let data_sm = DiskSpaceMap::create(bm.clone(), nr_data_blocks);
        let details_root = btree::empty::<DeviceDetails>(&mut tm)?;
        let mapping_root = btree::empty::<u64>(&mut tm)?;
        let committed = base_superblock(128, bm.nr_blocks());
        let mut pool = TestPool {
            store,
            bm,
            tm,
            data_sm,
            details_root,
            mapping_root,
            time: 0,
            trans_id: 0,
            committed,
        };
        pool.commit()?;
        Ok(pool)
    }

    pub fn open(store: Arc<dyn BlockStore>, cache_bytes: usize) -> Result<TestPool> {
        let bm = bm_over(store.clone(), cache_bytes);
        let sb = read_superblock(&*bm)?;
        let tm = TransactionManager::open(bm.clone(), &sb.metadata_sm_root)?;
        let data_sm = DiskSpaceMap::open(bm.clone(), &sb.data_sm_root)?;
        Ok(TestPool {
            store,
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

    /// Holds a read-only copy of the committed metadata (the kernel's metadata snapshot).
    pub fn reserve_metadata_snap(&mut self) -> Result<u64> {
        self.commit()?;
        self.tm.inc(0)?;
        let (mut w, _) = self
            .tm
            .shadow(0, thinblk::engine::pdata::checksum::BlockKind::Superblock)?;
        let loc = w.location();
        let mut copy = Superblock::decode(&w, 0)?;
        copy.data_sm_root = Default::default();
        copy.metadata_sm_root = Default::default();
        copy.encode(&mut w, loc);
        drop(w);
        self.tm.inc(copy.data_mapping_root)?;
        self.tm.inc(copy.device_details_root)?;
        self.committed.held_root = loc;
        self.commit()?;
        Ok(loc)
    }

    /// Drops the held metadata snapshot.
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        let held = self.committed.held_root;
        let blk = self.tm.read(
            held,
            thinblk::engine::pdata::checksum::BlockKind::Superblock,
        )?;
        let copy = Superblock::decode(&blk, held)?;
        drop(blk);
        let mut data = DataRefs(&mut self.data_sm);
        let mut top = SubtreeRefs { leaf: &mut data };
        btree::del::<u64>(&mut self.tm, &mut top, copy.data_mapping_root)?;
        btree::del::<DeviceDetails>(&mut self.tm, &mut NoRefs, copy.device_details_root)?;
        self.tm.dec(held)?;
        self.committed.held_root = 0;
        Ok(())
    }

    pub fn details(&self, dev: u64) -> Result<Option<DeviceDetails>> {
        btree::lookup::<DeviceDetails, _>(&self.tm, self.details_root, dev)
    }

    fn set_details(&mut self, dev: u64, d: &DeviceDetails) -> Result<()> {
        self.details_root = btree::insert(&mut self.tm, &mut NoRefs, self.details_root, dev, d)?;
        Ok(())
    }

    pub fn create_thin(&mut self, dev: u64) -> Result<()> {
        let sub = btree::empty::<BlockTime>(&mut self.tm)?;
        self.mapping_root =
            btree::insert::<u64>(&mut self.tm, &mut NoRefs, self.mapping_root, dev, &sub)?;
        self.trans_id += 1;
        let d = DeviceDetails {
            mapped_blocks: 0,
            transaction_id: self.trans_id,
            creation_time: self.time,
            snapshotted_time: self.time,
        };
        self.set_details(dev, &d)
    }

    pub fn snapshot(&mut self, dev: u64, origin: u64) -> Result<()> {
        let sub =
            btree::lookup::<u64, _>(&self.tm, self.mapping_root, origin)?.expect("origin exists");
        let mut od = self.details(origin)?.expect("origin details");
        self.time += 1;
        btree::clone_root(&mut self.tm, sub)?;
        self.mapping_root =
            btree::insert::<u64>(&mut self.tm, &mut NoRefs, self.mapping_root, dev, &sub)?;
        od.snapshotted_time = self.time;
        self.set_details(origin, &od)?;
        self.trans_id += 1;
        let d = DeviceDetails {
            mapped_blocks: od.mapped_blocks,
            transaction_id: self.trans_id,
            creation_time: self.time,
            snapshotted_time: self.time,
        };
        self.set_details(dev, &d)
    }

    pub fn delete(&mut self, dev: u64) -> Result<()> {
        let mut data = DataRefs(&mut self.data_sm);
        let mut top = SubtreeRefs { leaf: &mut data };
        let (root, _) = btree::remove::<u64>(&mut self.tm, &mut top, self.mapping_root, dev)?;
        self.mapping_root = root;
        let (root, _) =
            btree::remove::<DeviceDetails>(&mut self.tm, &mut NoRefs, self.details_root, dev)?;
        self.details_root = root;
        Ok(())
    }

    /// Maps `vblock` of `dev` to a newly allocated data block; returns it.
    pub fn map(&mut self, dev: u64, vblock: u64) -> Result<u64> {
        let block = self.data_sm.new_block()?;
        let had = self.lookup(dev, vblock)?.is_some();
        let v = BlockTime {
            block,
            time: self.time,
        };
        let mut data = DataRefs(&mut self.data_sm);
        self.mapping_root =
            btree::insert_nested(&mut self.tm, &mut data, self.mapping_root, dev, vblock, &v)?;
        if !had {
            self.adjust_mapped(dev, 1)?;
        }
        Ok(block)
    }

    pub fn unmap(&mut self, dev: u64, vblock: u64) -> Result<bool> {
        let mut data = DataRefs(&mut self.data_sm);
        let (root, old) = btree::remove_nested::<BlockTime>(
            &mut self.tm,
            &mut data,
            self.mapping_root,
            dev,
            vblock,
        )?;
        self.mapping_root = root;
        if old.is_some() {
            self.adjust_mapped(dev, -1)?;
        }
        Ok(old.is_some())
    }

    pub fn unmap_range(&mut self, dev: u64, begin: u64, end: u64) -> Result<u64> {
        let mut data = DataRefs(&mut self.data_sm);
        let (root, n) = btree::remove_range_nested::<BlockTime>(
            &mut self.tm,
            &mut data,
            self.mapping_root,
            dev,
            begin,
            end,
        )?;
        self.mapping_root = root;
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
        btree::lookup_nested::<BlockTime, _>(&self.tm, self.mapping_root, dev, vblock)
    }

    /// Everything the pool holds now (uncommitted changes included).
    pub fn dump(&self) -> Result<Dump> {
        let mut sb = self.committed.clone();
        sb.device_details_root = self.details_root;
        sb.data_mapping_root = self.mapping_root;
        sb.time = self.time;
        sb.trans_id = self.trans_id;
        sb.data_sm_root.nr_blocks = self.data_sm.nr_blocks();
        super::dump(&self.tm, &sb)
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
