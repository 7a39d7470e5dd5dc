//! Thin devices: their details, creating one (empty, or a snapshot sharing its origin's
//! mappings), deleting one, and opening one once.

use crate::engine::pdata::btree::{self, DataRefs, NoRefs, SubtreeRefs};
use crate::engine::pdata::values::{BlockTime, DeviceDetails};

use super::{no_space, Device, PoolMetadata};
use crate::engine::thin::error::{Result, ThinError};

impl PoolMetadata {
    pub fn device_ids(&self) -> Vec<u64> {
        self.devices.keys().copied().collect()
    }

    pub fn details(&self, dev: u64) -> Result<DeviceDetails> {
        self.devices
            .get(&dev)
            .map(|d| d.details)
            .ok_or(ThinError::NoSuchDevice(dev))
    }

    pub(super) fn device_mut(&mut self, dev: u64) -> Result<&mut Device> {
        self.devices
            .get_mut(&dev)
            .ok_or(ThinError::NoSuchDevice(dev))
    }

    pub(super) fn new_device(&mut self, dev: u64, details: DeviceDetails) {
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

    pub(super) fn adjust_mapped(&mut self, dev: u64, delta: i64) -> Result<()> {
        let d = self.device_mut(dev)?;
        d.details.mapped_blocks = d.details.mapped_blocks.saturating_add_signed(delta);
        d.changed = true;
        Ok(())
    }
}
