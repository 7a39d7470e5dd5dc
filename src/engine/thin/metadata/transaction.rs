//! Transactions: commit (the superblock written last), abort (back to the last commit), the
//! read-only mode and needs_check that follow a metadata error, and the transaction id.

use std::collections::BTreeMap;

use crate::engine::pdata::btree::{self, NoRefs};
use crate::engine::pdata::space_map::DiskSpaceMap;
use crate::engine::pdata::superblock::FLAG_NEEDS_CHECK;
use crate::engine::pdata::values::DeviceDetails;

use super::{no_space, Device, PoolMetadata};
use crate::engine::thin::error::{Result, ThinError};

impl PoolMetadata {
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
}
