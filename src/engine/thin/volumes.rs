//! Named thin devices in a pool: create, snapshot, delete, resize, open, list.
//!
//! Every change commits the metadata before the catalog is saved, so a crash in between
//! leaves a device without a name (it is named after its id at the next start) or a name
//! without a device (dropped at the next start), never a name pointing at the wrong device.
//!
//! An operation that fails part way leaves what it found: a snapshot or delete whose metadata
//! change fails is taken back alone, after what guest I/O changed was committed (so no
//! completed write goes with it); a create or snapshot whose names cannot be saved deletes
//! the devices it made; a resize changes nothing until its size is saved.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use parking_lot::Mutex;

use super::catalog::{Catalog, CatalogError, Entry};
use super::device::ThinDevice;
use super::error::ThinError;
use super::metadata::PoolMetadata;
use super::pool::Pool;
use crate::engine::raw::{RawDevice, RawOptions};
use crate::engine::{BlockDevice, BlockError};

/// dm-thin device ids are 24-bit.
pub const MAX_DEVICE_ID: u64 = (1 << 24) - 1;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("no thin device named '{0}'")]
    NoSuchDisk(String),
    #[error("a thin device named '{0}' already exists")]
    DiskExists(String),
    #[error("thin device '{0}' is in use")]
    InUse(String),
    #[error("'{0}' is not a valid device name (1-64 characters: letters, digits, '-', '_', '.')")]
    BadName(String),
    #[error("size {size} is not a positive multiple of 512 bytes")]
    BadSize { size: u64 },
    #[error("thin device '{name}' cannot shrink from {from} to {to} bytes")]
    Shrink { name: String, from: u64, to: u64 },
    #[error("external origin {path}: {source}")]
    Origin {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the pool has no free device ids")]
    NoIds,
    #[error(transparent)]
    Size(#[from] crate::engine::limits::SizeError),
    #[error(transparent)]
    Thin(#[from] ThinError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// What a listing shows of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    pub name: String,
    pub id: u64,
    pub size: u64,
    pub mapped_blocks: u64,
    pub creation_time: u32,
    pub snapshotted_time: u32,
    pub origin: Option<String>,
    pub created: u64,
    pub open: bool,
}

/// What a snapshot cost the devices' I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotTiming {
    /// The new devices' ids, in the order asked.
    pub ids: Vec<u64>,
    /// From asking for the quiesce until I/O may run again: in-flight I/O drains, new I/O
    /// waits, the snapshots are created.
    pub pause: Duration,
    /// The commits around it: of what guest I/O changed before (so that a snapshot failing
    /// part way is taken back alone), and of the snapshots after. Like every commit they hold
    /// back first writes (not reads or writes of mapped blocks) while they run.
    pub commit: Duration,
}

/// A pool's thin devices by name (the catalog beside the metadata), over the [`Pool`] that
/// holds their mappings and data: what `thinblk serve` and QMP manage disks through.
pub struct Volumes {
    pool: Arc<Pool>,
    catalog_path: PathBuf,
    catalog: Mutex<Catalog>,
    devices: Mutex<HashMap<String, Weak<ThinDevice>>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

impl Volumes {
    /// Opens the named view of `pool`, reconciling the catalog with the metadata.
    pub fn open(pool: Arc<Pool>, catalog_path: &Path) -> Result<Arc<Volumes>, VolumeError> {
        let mut catalog = Catalog::load(catalog_path)?;
        let ids = pool.meta().device_ids();
        let before = catalog.clone();
        catalog.devices.retain(|name, e| {
            let keep = ids.contains(&e.id);
            if !keep {
                warn!(
                    "catalog names '{name}' (device {}), which the pool does not have",
                    e.id
                );
            }
            keep
        });
        for id in ids {
            if catalog.name_of(id).is_none() {
                let name = format!("dev{id}");
                let meta = pool.meta();
                let blocks = meta.highest_mapped_block(id)?.map_or(0, |b| b + 1);
                drop(meta);
                let size = (blocks * pool.block_size()).max(pool.block_size());
                warn!("device {id} has no name in the catalog; calling it '{name}'");
                catalog.devices.insert(
                    name,
                    Entry {
                        id,
                        size,
                        origin: None,
                        created: 0,
                        origin_path: None,
                    },
                );
            }
        }
        if catalog != before {
            catalog.save(catalog_path)?;
        }
        info!("thin pool: {} devices", catalog.devices.len());
        Ok(Arc::new(Volumes {
            pool,
            catalog_path: catalog_path.to_path_buf(),
            catalog: Mutex::new(catalog),
            devices: Mutex::new(HashMap::new()),
        }))
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn exists(&self, name: &str) -> bool {
        self.catalog.lock().devices.contains_key(name)
    }

    fn next_id(&self) -> Result<u64, VolumeError> {
        let ids = self.pool.meta().device_ids();
        let next = ids.iter().max().map_or(1, |m| m + 1);
        if next > MAX_DEVICE_ID {
            return Err(VolumeError::NoIds);
        }
        Ok(next)
    }

    fn check_new(&self, name: &str, catalog: &Catalog) -> Result<(), VolumeError> {
        if !valid_name(name) {
            return Err(VolumeError::BadName(name.into()));
        }
        if catalog.devices.contains_key(name) {
            return Err(VolumeError::DiskExists(name.into()));
        }
        Ok(())
    }

    /// Creates an empty thin device of `size` bytes.
    pub fn create(&self, name: &str, size: u64) -> Result<u64, VolumeError> {
        self.create_entry(name, size, None)
    }

    /// Creates a thin device whose unmapped blocks read from the file or block device at
    /// `origin_path` (opened read-only, never written). Its size defaults to the origin's.
    pub fn create_with_origin(
        &self,
        name: &str,
        origin_path: &Path,
        size: Option<u64>,
    ) -> Result<u64, VolumeError> {
        let origin = self.open_origin(origin_path)?;
        // Recorded absolute: the daemon may restart elsewhere.
        let path = std::path::absolute(origin_path).unwrap_or_else(|_| origin_path.into());
        self.create_entry(name, size.unwrap_or(origin.size()), Some(&path))
    }

    fn open_origin(&self, path: &Path) -> Result<RawDevice, VolumeError> {
        let opts = RawOptions {
            read_only: true,
            direct: self.pool.options().direct,
        };
        RawDevice::open(path, opts).map_err(|source| VolumeError::Origin {
            path: path.display().to_string(),
            source,
        })
    }

    fn create_entry(
        &self,
        name: &str,
        size: u64,
        origin_path: Option<&Path>,
    ) -> Result<u64, VolumeError> {
        if size == 0 || !size.is_multiple_of(512) {
            return Err(VolumeError::BadSize { size });
        }
        crate::engine::limits::check_device_size(size)?;
        let mut catalog = self.catalog.lock();
        self.check_new(name, &catalog)?;
        let id = self.next_id()?;
        self.change_alone(|m| m.create_thin(id))?;
        self.pool.commit()?;
        let entry = Entry {
            id,
            size,
            origin: None,
            created: now(),
            origin_path: origin_path.map(Path::to_path_buf),
        };
        let saved = self.save_changed(&mut catalog, |c| {
            c.devices.insert(name.into(), entry);
        });
        if let Err(e) = saved {
            self.take_back(&[id]);
            return Err(e);
        }
        info!("created thin device {name} (id {id}, {size} bytes)");
        Ok(id)
    }

    /// Snapshots `origin` as `name`. Atomic with respect to I/O: every write completed before
    /// this call is in the snapshot, none that starts after it.
    pub fn snapshot(&self, origin: &str, name: &str) -> Result<u64, VolumeError> {
        self.snapshot_many(&[(origin, name)])
            .map(|ids| ids.first().copied().unwrap_or(0))
    }

    /// Snapshots several devices at one instant, all or nothing.
    pub fn snapshot_many(&self, pairs: &[(&str, &str)]) -> Result<Vec<u64>, VolumeError> {
        self.snapshot_many_timed(pairs).map(|t| t.ids)
    }

    /// [`Volumes::snapshot_many`], telling how long I/O was held.
    pub fn snapshot_many_timed(
        &self,
        pairs: &[(&str, &str)],
    ) -> Result<SnapshotTiming, VolumeError> {
        let mut catalog = self.catalog.lock();
        let mut planned = Vec::new();
        for (i, (origin, name)) in pairs.iter().enumerate() {
            self.check_new(name, &catalog)?;
            if pairs.iter().take(i).any(|(_, n)| n == name) {
                return Err(VolumeError::DiskExists((*name).into()));
            }
            let entry = catalog
                .devices
                .get(*origin)
                .ok_or_else(|| VolumeError::NoSuchDisk((*origin).into()))?;
            planned.push((
                entry.id,
                entry.size,
                *origin,
                *name,
                entry.origin_path.clone(),
            ));
        }
        let first_id = self.next_id()?;
        let ids: Vec<u64> = (0..planned.len() as u64).map(|i| first_id + i).collect();
        // What guest I/O changed is committed before the snapshots change anything, so that
        // taking back a snapshot that fails part way takes back nothing else. Then in-flight
        // I/O drains and new I/O waits while the snapshots are taken.
        let start = Instant::now();
        let (commit_before, pause) = {
            let mut quiesced = self.pool.quiesce_committed()?;
            let io_held_since = quiesced.io_held_since();
            for ((origin_id, ..), id) in planned.iter().zip(&ids) {
                if let Err(e) = quiesced.create_snap(*id, *origin_id) {
                    self.pool.undo(quiesced, &e);
                    return Err(e.into());
                }
            }
            drop(quiesced);
            (io_held_since - start, io_held_since.elapsed())
        };
        self.pool.note_change();
        let commit_start = Instant::now();
        self.pool.commit()?;
        let commit = commit_before + commit_start.elapsed();
        let saved = self.save_changed(&mut catalog, |c| {
            for ((_, size, origin, name, origin_path), id) in planned.iter().zip(&ids) {
                let entry = Entry {
                    id: *id,
                    size: *size,
                    origin: Some((*origin).into()),
                    created: now(),
                    origin_path: origin_path.clone(),
                };
                c.devices.insert((*name).into(), entry);
            }
        });
        if let Err(e) = saved {
            self.take_back(&ids);
            return Err(e);
        }
        for ((_, _, origin, name, _), id) in planned.iter().zip(&ids) {
            info!("snapshot {name} (id {id}) of {origin}");
        }
        Ok(SnapshotTiming { ids, pause, commit })
    }

    /// Deletes a device; refused while it is open unless `force`.
    pub fn delete(&self, name: &str, force: bool) -> Result<(), VolumeError> {
        let mut catalog = self.catalog.lock();
        let entry = catalog
            .devices
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::NoSuchDisk(name.into()))?;
        if !force && self.is_open(name) {
            return Err(VolumeError::InUse(name.into()));
        }
        self.delete_ids(&[entry.id])?;
        // The device is gone whether or not the catalog is saved: a name left in the file is
        // dropped at the next start.
        catalog.devices.remove(name);
        self.devices.lock().remove(name);
        catalog.save(&self.catalog_path)?;
        info!("deleted thin device {name} (id {})", entry.id);
        Ok(())
    }

    /// Deletes devices from the metadata and commits. As for a snapshot, a delete that fails
    /// part way is taken back alone.
    fn delete_ids(&self, ids: &[u64]) -> Result<(), VolumeError> {
        self.change_alone(|m| ids.iter().try_for_each(|id| m.delete_thin(*id)))?;
        self.pool.commit()?;
        Ok(())
    }

    /// Makes a change to the metadata that is not guest I/O (a device created or deleted, a
    /// metadata snapshot reserved) so that if it fails part way it is taken back alone: what
    /// guest I/O changed is committed first, then `f` runs with I/O quiesced
    /// ([`Pool::quiesce_committed`]).
    pub(super) fn change_alone<T>(
        &self,
        f: impl FnOnce(&mut PoolMetadata) -> Result<T, ThinError>,
    ) -> Result<T, VolumeError> {
        let mut quiesced = self.pool.quiesce_committed()?;
        match f(&mut quiesced) {
            Ok(v) => {
                drop(quiesced);
                self.pool.note_change();
                Ok(v)
            }
            Err(e) => {
                self.pool.undo(quiesced, &e);
                Err(e.into())
            }
        }
    }

    /// Deletes devices just made whose names could not be saved, so that the failed create
    /// or snapshot leaves nothing behind. If that fails too, they are named after their ids
    /// at the next start.
    fn take_back(&self, ids: &[u64]) {
        if let Err(e) = self.delete_ids(ids) {
            warn!("cannot delete devices {ids:?}, whose names were not saved: {e}");
        }
    }

    /// Saves the catalog with `change` made to it, and makes that the catalog only once it
    /// is saved: a failed save changes nothing, in memory or on disk.
    fn save_changed(
        &self,
        catalog: &mut Catalog,
        change: impl FnOnce(&mut Catalog),
    ) -> Result<(), VolumeError> {
        let mut next = catalog.clone();
        change(&mut next);
        next.save(&self.catalog_path)?;
        *catalog = next;
        Ok(())
    }

    /// Grows a device.
    pub fn resize(&self, name: &str, size: u64) -> Result<(), VolumeError> {
        if size == 0 || !size.is_multiple_of(512) {
            return Err(VolumeError::BadSize { size });
        }
        crate::engine::limits::check_device_size(size)?;
        let mut catalog = self.catalog.lock();
        let entry = catalog
            .devices
            .get(name)
            .ok_or_else(|| VolumeError::NoSuchDisk(name.into()))?;
        if size < entry.size {
            return Err(VolumeError::Shrink {
                name: name.into(),
                from: entry.size,
                to: size,
            });
        }
        self.save_changed(&mut catalog, |c| {
            if let Some(e) = c.devices.get_mut(name) {
                e.size = size;
            }
        })?;
        if let Some(dev) = self.devices.lock().get(name).and_then(Weak::upgrade) {
            dev.set_size(size);
        }
        Ok(())
    }

    /// The dm-thin id of the device called `name`.
    pub fn id_of(&self, name: &str) -> Result<u64, VolumeError> {
        self.catalog
            .lock()
            .devices
            .get(name)
            .map(|e| e.id)
            .ok_or_else(|| VolumeError::NoSuchDisk(name.into()))
    }

    fn is_open(&self, name: &str) -> bool {
        self.devices
            .lock()
            .get(name)
            .is_some_and(|w| w.strong_count() > 0)
    }

    /// The device called `name`, shared by everyone who opens it.
    pub fn device(&self, name: &str) -> Result<Arc<ThinDevice>, VolumeError> {
        let catalog = self.catalog.lock();
        let entry = catalog
            .devices
            .get(name)
            .ok_or_else(|| VolumeError::NoSuchDisk(name.into()))?;
        let mut devices = self.devices.lock();
        if let Some(dev) = devices.get(name).and_then(Weak::upgrade) {
            return Ok(dev);
        }
        let mut dev = ThinDevice::new(self.pool.clone(), entry.id, entry.size);
        if let Some(path) = &entry.origin_path {
            dev = dev.with_origin(Arc::new(self.open_origin(path)?));
        }
        let dev = Arc::new(dev);
        devices.insert(name.into(), Arc::downgrade(&dev));
        Ok(dev)
    }

    pub fn list(&self) -> Result<Vec<DiskInfo>, VolumeError> {
        let catalog = self.catalog.lock();
        let meta = self.pool.meta();
        let mut out = Vec::new();
        for (name, e) in &catalog.devices {
            let d = meta.details(e.id)?;
            out.push(DiskInfo {
                name: name.clone(),
                id: e.id,
                size: e.size,
                mapped_blocks: d.mapped_blocks,
                creation_time: d.creation_time,
                snapshotted_time: d.snapshotted_time,
                origin: e.origin.clone(),
                created: e.created,
                open: self.is_open(name),
            });
        }
        Ok(out)
    }
}

impl Drop for Volumes {
    /// Closing stops the pool's commit timer, so that the pool (and its lock on the metadata)
    /// goes with this, not whenever the timer next lets go of it.
    fn drop(&mut self) {
        self.pool.close();
    }
}
