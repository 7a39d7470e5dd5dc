//! Thin-pool metadata: the operations of the kernel's dm-thin-metadata.h over the
//! persistent-data library, in the kernel's on-disk format.
//!
//! A transaction collects changes (new devices, mappings, device details kept in memory and
//! written back at commit, like the kernel's `changed` devices); `commit` makes them durable
//! with the superblock written last, `abort` returns to the last commit.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::bufio::BufferCache;
use crate::engine::pdata::block_manager::BlockManager;
use crate::engine::pdata::btree::{self, DataRefs, NoRefs, SubtreeRefs};
use crate::engine::pdata::checksum::BlockKind;
use crate::engine::pdata::space_map::{DiskSpaceMap, SpaceMap};
use crate::engine::pdata::superblock::{
    Superblock, FLAG_NEEDS_CHECK, SUPERBLOCK_LOCATION, SUPERBLOCK_VERSION,
};
use crate::engine::pdata::tm::{BlockSource, NonBlocking, TransactionManager};
use crate::engine::pdata::values::{BlockTime, DeviceDetails};
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

    // ---- transactions -------------------------------------------------------------------

    /// Makes every change since the last commit durable.
    pub fn commit(&mut self) -> Result<()> {
        self.writable()?;
        let result = self.try_commit();
        if let Err(e) = &result {
            if e.is_fatal() {
                self.fail();
            }
        }
        result
    }

    fn try_commit(&mut self) -> Result<()> {
        for dev in std::mem::take(&mut self.deleted) {
            let (root, _) =
                btree::remove::<DeviceDetails>(&mut self.tm, &mut NoRefs, self.details_root, dev)?;
            self.details_root = root;
        }
        let changed: Vec<(u64, DeviceDetails)> = self
            .devices
            .iter()
            .filter(|(_, d)| d.changed)
            .map(|(id, d)| (*id, d.details))
            .collect();
        for (dev, details) in changed {
            self.details_root =
                btree::insert(&mut self.tm, &mut NoRefs, self.details_root, dev, &details)
                    .map_err(no_space)?;
        }
        let data_root = self.data_sm.commit(&mut self.tm).map_err(no_space)?;
        let meta_root = self.tm.pre_commit().map_err(no_space)?;
        let mut sb = self.committed.clone();
        sb.time = self.time;
        sb.trans_id = self.trans_id;
        sb.held_root = self.held_root;
        sb.data_sm_root = data_root;
        sb.metadata_sm_root = meta_root;
        sb.data_mapping_root = self.mapping_root;
        sb.device_details_root = self.details_root;
        sb.metadata_nr_blocks = self.bm.nr_blocks();
        sb.flags = if self.needs_check {
            FLAG_NEEDS_CHECK
        } else {
            0
        };
        self.tm.commit(&sb)?;
        self.committed = sb;
        for d in self.devices.values_mut() {
            d.changed = false;
        }
        self.check_threshold();
        Ok(())
    }

    /// Whether anything changed since the last commit (or abort).
    pub fn has_changes(&self) -> bool {
        let sb = &self.committed;
        self.tm.metadata_sm().is_dirty()
            || self.data_sm.is_dirty()
            || !self.deleted.is_empty()
            || self.devices.values().any(|d| d.changed)
            || self.mapping_root != sb.data_mapping_root
            || self.details_root != sb.device_details_root
            || self.time != sb.time
            || self.trans_id != sb.trans_id
            || self.held_root != sb.held_root
            || self.bm.nr_blocks() != sb.metadata_nr_blocks
    }

    /// Drops every change since the last commit.
    pub fn abort(&mut self) -> Result<()> {
        let sb = self.committed.clone();
        self.tm.abort(&sb.metadata_sm_root)?;
        self.data_sm = DiskSpaceMap::open(self.bm.clone(), &sb.data_sm_root)?;
        self.details_root = sb.device_details_root;
        self.mapping_root = sb.data_mapping_root;
        self.time = sb.time;
        self.trans_id = sb.trans_id;
        self.held_root = sb.held_root;
        self.deleted.clear();
        let open: Vec<u64> = self
            .devices
            .iter()
            .filter(|(_, d)| d.open)
            .map(|(id, _)| *id)
            .collect();
        self.devices.clear();
        let mut devices = BTreeMap::new();
        btree::walk::<DeviceDetails, _, _>(
            &*self.bm,
            sb.device_details_root,
            0,
            |dev, details| {
                devices.insert(
                    dev,
                    Device {
                        details,
                        changed: false,
                        open: open.contains(&dev),
                    },
                );
                Ok(true)
            },
        )?;
        self.devices = devices;
        Ok(())
    }

    /// After an error that may have left metadata half-changed: stop changing it, go back to
    /// the last commit (which lookups keep serving) and ask for a check.
    pub fn fail(&mut self) {
        self.read_only = true;
        if let Err(e) = self.abort() {
            log::error!("cannot return to the last commit: {e}");
        }
        self.set_needs_check();
    }

    pub fn set_read_only(&mut self) {
        self.read_only = true;
    }

    /// Allows changes again (after a read-only period that was not caused by damage).
    pub fn set_read_write(&mut self) -> Result<()> {
        if self.needs_check {
            return Err(ThinError::ReadOnly { needs_check: true });
        }
        self.read_only = false;
        Ok(())
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn needs_check(&self) -> bool {
        self.needs_check
    }

    /// Records on disk, best effort, that the metadata must be checked before it is trusted:
    /// the last commit's superblock is rewritten with the flag set. Uncommitted changes are
    /// dropped first, since only the superblock may change.
    pub fn set_needs_check(&mut self) {
        self.needs_check = true;
        if let Err(e) = self.abort() {
            log::error!("cannot return to the last commit: {e}");
            return;
        }
        let mut sb = self.committed.clone();
        sb.flags |= FLAG_NEEDS_CHECK;
        match self.tm.commit(&sb) {
            Ok(()) => self.committed = sb,
            Err(e) => log::error!("cannot record needs_check in the superblock: {e}"),
        }
    }

    pub fn transaction_id(&self) -> u64 {
        self.trans_id
    }

    /// Compare-and-set of the pool's transaction id.
    pub fn set_transaction_id(&mut self, current: u64, new: u64) -> Result<()> {
        self.writable()?;
        if self.trans_id != current {
            return Err(ThinError::TransactionIdMismatch {
                expected: current,
                found: self.trans_id,
            });
        }
        self.trans_id = new;
        Ok(())
    }

    // ---- devices ---------------------------------------------------------------------------

    pub fn device_ids(&self) -> Vec<u64> {
        self.devices.keys().copied().collect()
    }

    pub fn details(&self, dev: u64) -> Result<DeviceDetails> {
        self.devices
            .get(&dev)
            .map(|d| d.details)
            .ok_or(ThinError::NoSuchDevice(dev))
    }

    fn device_mut(&mut self, dev: u64) -> Result<&mut Device> {
        self.devices
            .get_mut(&dev)
            .ok_or(ThinError::NoSuchDevice(dev))
    }

    fn new_device(&mut self, dev: u64, details: DeviceDetails) {
        self.devices.insert(
            dev,
            Device {
                details,
                changed: true,
                open: false,
            },
        );
        self.deleted.retain(|d| *d != dev);
    }

    pub fn create_thin(&mut self, dev: u64) -> Result<()> {
        self.writable()?;
        if self.devices.contains_key(&dev) {
            return Err(ThinError::DeviceExists(dev));
        }
        let sub = btree::empty::<BlockTime>(&mut self.tm).map_err(no_space)?;
        self.mapping_root =
            btree::insert::<u64>(&mut self.tm, &mut NoRefs, self.mapping_root, dev, &sub)
                .map_err(no_space)?;
        let details = DeviceDetails {
            mapped_blocks: 0,
            transaction_id: self.trans_id,
            creation_time: self.time,
            snapshotted_time: self.time,
        };
        self.new_device(dev, details);
        Ok(())
    }

    /// A snapshot of `origin`: shares its mapping tree, so it costs O(1) whatever the depth.
    /// The origin must be quiesced (no I/O in flight) by the caller.
    pub fn create_snap(&mut self, dev: u64, origin: u64) -> Result<()> {
        self.writable()?;
        if self.devices.contains_key(&dev) {
            return Err(ThinError::DeviceExists(dev));
        }
        let origin_details = self.details(origin)?;
        let sub = btree::lookup::<u64, _>(&self.tm, self.mapping_root, origin)?
            .ok_or(ThinError::NoSuchDevice(origin))?;
        // Mappings written from now on carry the new time, so both devices see every older
        // mapping as shared.
        self.time = self.time.wrapping_add(1);
        btree::clone_root(&mut self.tm, sub)?;
        self.mapping_root =
            btree::insert::<u64>(&mut self.tm, &mut NoRefs, self.mapping_root, dev, &sub)
                .map_err(no_space)?;
        let time = self.time;
        let o = self.device_mut(origin)?;
        o.details.snapshotted_time = time;
        o.changed = true;
        let details = DeviceDetails {
            mapped_blocks: origin_details.mapped_blocks,
            transaction_id: self.trans_id,
            creation_time: time,
            snapshotted_time: time,
        };
        self.new_device(dev, details);
        Ok(())
    }

    /// Deletes a device; its data blocks are freed as their last references go.
    pub fn delete_thin(&mut self, dev: u64) -> Result<()> {
        self.writable()?;
        if !self.devices.contains_key(&dev) {
            return Err(ThinError::NoSuchDevice(dev));
        }
        let mut data = DataRefs(&mut self.data_sm);
        let mut top = SubtreeRefs { leaf: &mut data };
        let (root, _) = btree::remove::<u64>(&mut self.tm, &mut top, self.mapping_root, dev)
            .map_err(no_space)?;
        self.mapping_root = root;
        self.devices.remove(&dev);
        self.deleted.push(dev);
        Ok(())
    }

    /// Marks a device open; a second open is refused until it is closed.
    pub fn open_device(&mut self, dev: u64) -> Result<()> {
        let d = self.device_mut(dev)?;
        if d.open {
            return Err(ThinError::DeviceOpen(dev));
        }
        d.open = true;
        Ok(())
    }

    pub fn close_device(&mut self, dev: u64) {
        if let Some(d) = self.devices.get_mut(&dev) {
            d.open = false;
        }
    }

    pub fn mapped_count(&self, dev: u64) -> Result<u64> {
        Ok(self.details(dev)?.mapped_blocks)
    }

    fn adjust_mapped(&mut self, dev: u64, delta: i64) -> Result<()> {
        let d = self.device_mut(dev)?;
        d.details.mapped_blocks = d.details.mapped_blocks.saturating_add_signed(delta);
        d.changed = true;
        Ok(())
    }

    // ---- mappings --------------------------------------------------------------------------

    fn sub_root(&self, dev: u64) -> Result<u64> {
        btree::lookup::<u64, _>(&self.tm, self.mapping_root, dev)?
            .ok_or(ThinError::NoSuchDevice(dev))
    }

    /// The data block `vblock` of `dev` maps to. With `can_block` false, a lookup that would
    /// need metadata I/O fails with `PdataError::WouldBlock` instead of waiting.
    pub fn find_block(&self, dev: u64, vblock: u64, can_block: bool) -> Result<Option<Lookup>> {
        let snap_time = self.details(dev)?.snapshotted_time;
        let found = if can_block {
            btree::lookup_nested::<BlockTime, _>(&self.tm, self.mapping_root, dev, vblock)?
        } else {
            let src = NonBlocking(&self.bm);
            btree::lookup_nested::<BlockTime, _>(&src, self.mapping_root, dev, vblock)?
        };
        Ok(found.map(|bt| Lookup {
            block: bt.block,
            shared: snap_time > bt.time,
        }))
    }

    /// The first run of mapped blocks in `[begin, end)`: consecutive virtual blocks on
    /// consecutive data blocks with the same sharing.
    pub fn find_mapped_range(&self, dev: u64, begin: u64, end: u64) -> Result<Option<MappedRange>> {
        let snap_time = self.details(dev)?.snapshotted_time;
        let sub = self.sub_root(dev)?;
        let mut run: Option<MappedRange> = None;
        btree::walk::<BlockTime, _, _>(&self.tm, sub, begin, |vblock, bt| {
            if vblock >= end {
                return Ok(false);
            }
            let shared = snap_time > bt.time;
            match &mut run {
                None => {
                    run = Some(MappedRange {
                        thin_begin: vblock,
                        thin_end: vblock + 1,
                        pool_begin: bt.block,
                        maybe_shared: shared,
                    });
                    Ok(true)
                }
                Some(r) => {
                    let next = r.pool_begin + (r.thin_end - r.thin_begin);
                    if vblock == r.thin_end && bt.block == next && shared == r.maybe_shared {
                        r.thin_end += 1;
                        Ok(true)
                    } else {
                        Ok(false)
                    }
                }
            }
        })?;
        Ok(run)
    }

    /// Every mapping of `dev` in `[begin, end)`, in order.
    pub fn mappings(&self, dev: u64, begin: u64, end: u64) -> Result<Vec<(u64, BlockTime)>> {
        let sub = self.sub_root(dev)?;
        Ok(btree::range::<BlockTime, _>(&self.tm, sub, begin, end)?)
    }

    /// Allocates a free data block (count 1). It must be inserted or released.
    pub fn alloc_data_block(&mut self) -> Result<u64> {
        self.writable()?;
        self.data_sm.new_block().map_err(no_space)
    }

    /// Maps `vblock` of `dev` to `data_block`. The mapping takes over the reference the caller
    /// holds (the one `alloc_data_block` gave); the old mapping's block loses one.
    pub fn insert_block(&mut self, dev: u64, vblock: u64, data_block: u64) -> Result<()> {
        self.writable()?;
        let had = self.find_block(dev, vblock, true)?.is_some();
        let v = BlockTime {
            block: data_block,
            time: self.time,
        };
        let mut data = DataRefs(&mut self.data_sm);
        self.mapping_root =
            btree::insert_nested(&mut self.tm, &mut data, self.mapping_root, dev, vblock, &v)
                .map_err(no_space)?;
        if !had {
            self.adjust_mapped(dev, 1)?;
        }
        self.check_threshold();
        Ok(())
    }

    /// Unmaps `vblock`; returns the data block it was mapped to.
    pub fn remove_block(&mut self, dev: u64, vblock: u64) -> Result<Option<u64>> {
        self.writable()?;
        let mut data = DataRefs(&mut self.data_sm);
        let (root, old) = btree::remove_nested::<BlockTime>(
            &mut self.tm,
            &mut data,
            self.mapping_root,
            dev,
            vblock,
        )
        .map_err(no_space)?;
        self.mapping_root = root;
        if old.is_some() {
            self.adjust_mapped(dev, -1)?;
        }
        Ok(old.map(|bt| bt.block))
    }

    /// Unmaps every block in `[begin, end)`; returns how many were mapped.
    pub fn remove_range(&mut self, dev: u64, begin: u64, end: u64) -> Result<u64> {
        self.writable()?;
        let mut data = DataRefs(&mut self.data_sm);
        let (root, n) = btree::remove_range_nested::<BlockTime>(
            &mut self.tm,
            &mut data,
            self.mapping_root,
            dev,
            begin,
            end,
        )
        .map_err(no_space)?;
        self.mapping_root = root;
        self.adjust_mapped(dev, -(n as i64))?;
        Ok(n)
    }

    pub fn highest_mapped_block(&self, dev: u64) -> Result<Option<u64>> {
        let sub = self.sub_root(dev)?;
        Ok(btree::highest_key::<BlockTime, _>(&self.tm, sub)?)
    }

    // ---- data blocks -----------------------------------------------------------------------

    pub fn data_block_count(&self, b: u64) -> Result<u32> {
        Ok(self.data_sm.count(b)?)
    }

    /// Whether more than one mapping references data block `b`.
    pub fn block_is_shared(&self, b: u64) -> Result<bool> {
        Ok(self.data_sm.count(b)? > 1)
    }

    pub fn inc_data_range(&mut self, begin: u64, end: u64) -> Result<()> {
        self.writable()?;
        for b in begin..end {
            self.data_sm.inc(b)?;
        }
        Ok(())
    }

    pub fn dec_data_range(&mut self, begin: u64, end: u64) -> Result<()> {
        self.writable()?;
        for b in begin..end {
            self.data_sm.dec(b)?;
        }
        Ok(())
    }

    // ---- sizes -----------------------------------------------------------------------------

    /// Data block size in 512-byte sectors.
    pub fn data_block_size(&self) -> u32 {
        self.committed.data_block_size
    }

    pub fn data_dev_size(&self) -> u64 {
        self.data_sm.nr_blocks()
    }

    pub fn free_data_blocks(&self) -> u64 {
        self.data_sm.nr_free()
    }

    pub fn metadata_dev_size(&self) -> u64 {
        self.bm.nr_blocks()
    }

    pub fn free_metadata_blocks(&self) -> u64 {
        self.tm.nr_free()
    }

    /// Grows the data device to `nr_blocks` blocks; shrinking is refused.
    pub fn resize_data_dev(&mut self, nr_blocks: u64) -> Result<()> {
        self.writable()?;
        let old = self.data_sm.nr_blocks();
        if nr_blocks < old {
            return Err(ThinError::CannotShrink {
                what: "data",
                from: old,
                to: nr_blocks,
            });
        }
        if nr_blocks > old {
            self.data_sm.extend(nr_blocks - old)?;
        }
        Ok(())
    }

    /// Grows the metadata device to `nr_blocks` blocks (the store must already be that big).
    pub fn resize_metadata_dev(&mut self, nr_blocks: u64) -> Result<()> {
        self.writable()?;
        let old = self.bm.nr_blocks();
        if nr_blocks < old {
            return Err(ThinError::CannotShrink {
                what: "metadata",
                from: old,
                to: nr_blocks,
            });
        }
        self.bm.grow(nr_blocks)?;
        self.grow_metadata_space()
    }

    fn grow_metadata_space(&mut self) -> Result<()> {
        self.tm.extend_to_device()?;
        self.threshold_fired = false;
        Ok(())
    }

    /// Calls `callback` once when free metadata blocks drop below `threshold` (again after
    /// the metadata device grows).
    pub fn register_metadata_threshold(&mut self, threshold: u64, callback: ThresholdCallback) {
        self.threshold = Some((threshold, callback));
        self.threshold_fired = false;
        self.check_threshold();
    }

    fn check_threshold(&mut self) {
        let free = self.tm.nr_free();
        if let Some((threshold, callback)) = &mut self.threshold {
            if free < *threshold && !self.threshold_fired {
                self.threshold_fired = true;
                callback(free);
            }
        }
    }

    // ---- restoring a pool from a description (thin_dump XML) --------------------------------

    /// Adds device `dev` with exactly these details and no mappings yet (for restore; a live
    /// pool uses `create_thin` and `create_snap`).
    pub fn restore_device(&mut self, dev: u64, details: DeviceDetails) -> Result<()> {
        self.create_thin(dev)?;
        let d = self.device_mut(dev)?;
        d.details = details;
        d.details.mapped_blocks = 0;
        Ok(())
    }

    /// Maps `vblock` of a restored device to `mapping` as given (block and time); the data
    /// block gains a reference.
    pub fn restore_mapping(&mut self, dev: u64, vblock: u64, mapping: BlockTime) -> Result<()> {
        self.writable()?;
        self.data_sm.inc(mapping.block).map_err(no_space)?;
        let mut data = DataRefs(&mut self.data_sm);
        self.mapping_root = btree::insert_nested(
            &mut self.tm,
            &mut data,
            self.mapping_root,
            dev,
            vblock,
            &mapping,
        )
        .map_err(no_space)?;
        self.adjust_mapped(dev, 1)
    }

    /// Sets the superblock fields a restore copies from its input.
    pub fn restore_header(
        &mut self,
        uuid: [u8; 16],
        flags: u32,
        version: u32,
        time: u32,
        trans_id: u64,
    ) {
        self.committed.uuid = uuid;
        self.committed.flags = flags;
        self.needs_check = flags & FLAG_NEEDS_CHECK != 0;
        self.committed.version = version;
        self.time = time;
        self.trans_id = trans_id;
    }

    // ---- metadata snapshot -----------------------------------------------------------------

    /// The held metadata snapshot's superblock copy, if any.
    pub fn metadata_snap(&self) -> Option<u64> {
        (self.held_root != 0).then_some(self.held_root)
    }

    /// Holds a read-only copy of the committed metadata for userspace readers (backup, delta):
    /// the superblock is copied and its trees gain a reference so no commit frees them.
    pub fn reserve_metadata_snap(&mut self) -> Result<u64> {
        self.writable()?;
        if self.held_root != 0 {
            return Err(ThinError::MetadataSnapHeld);
        }
        self.commit()?;
        self.tm.inc(SUPERBLOCK_LOCATION)?;
        let (mut w, _) = self.tm.shadow(SUPERBLOCK_LOCATION, BlockKind::Superblock)?;
        let loc = w.location();
        let mut copy = Superblock::decode(&w, SUPERBLOCK_LOCATION).map_err(PdataError::from)?;
        copy.data_sm_root = Default::default();
        copy.metadata_sm_root = Default::default();
        copy.held_root = 0;
        copy.encode(&mut w, loc);
        drop(w);
        self.tm.inc(copy.data_mapping_root)?;
        self.tm.inc(copy.device_details_root)?;
        self.held_root = loc;
        self.commit()?;
        Ok(loc)
    }

    /// Drops the held metadata snapshot; what only it referenced is freed.
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        self.writable()?;
        let held = self.held_root;
        if held == 0 {
            return Err(ThinError::NoMetadataSnap);
        }
        let copy = {
            let blk = self.tm.read(held, BlockKind::Superblock)?;
            Superblock::decode(&blk, held).map_err(PdataError::from)?
        };
        let mut data = DataRefs(&mut self.data_sm);
        let mut top = SubtreeRefs { leaf: &mut data };
        btree::del::<u64>(&mut self.tm, &mut top, copy.data_mapping_root)?;
        btree::del::<DeviceDetails>(&mut self.tm, &mut NoRefs, copy.device_details_root)?;
        self.tm.dec(held)?;
        self.held_root = 0;
        Ok(())
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
