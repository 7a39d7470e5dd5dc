//! Opening a pool: its files, a new pool's format, checks against the data device, and the
//! commit timer.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use log::{error, info};
use parking_lot::{Condvar, Mutex, RwLock};

use super::*;
use crate::bufio::{BlockStore, BufferCache, BufioConfig, FileStore};
use crate::engine::raw::{RawDevice, RawOptions};
use crate::engine::thin::error::ThinError;
use crate::engine::thin::gate::IoGate;
use crate::engine::thin::metadata::PoolMetadata;
use crate::engine::thin::prison::Prison;
use crate::engine::DataDevice;

impl Pool {
    /// Opens the pool in these files, formatting a new one if the metadata is all zeros
    /// (a file just created). Missing files are created sparse with `geometry`'s sizes.
    pub fn open(
        metadata_path: &Path,
        data_path: &Path,
        geometry: &PoolGeometry,
        options: PoolOptions,
    ) -> Result<Arc<Pool>, PoolOpenError> {
        if !metadata_path.exists() {
            let nr = geometry.metadata_size / 4096;
            FileStore::create(metadata_path, 4096, nr)
                .map_err(|e| PoolOpenError::file(metadata_path, e))?;
        }
        let store = FileStore::open(metadata_path, 4096)
            .map_err(|e| PoolOpenError::file(metadata_path, e))?;
        store
            .lock_exclusive()
            .map_err(|e| PoolOpenError::file(metadata_path, e))?;
        Pool::open_on(Arc::new(store), data_path, geometry, options)
    }

    /// Opens (or formats, when block 0 is all zeros) the pool whose metadata is `store` and
    /// whose data is the file `data_path` (created sparse with `geometry`'s size if missing).
    pub fn open_on(
        store: Arc<dyn BlockStore>,
        data_path: &Path,
        geometry: &PoolGeometry,
        options: PoolOptions,
    ) -> Result<Arc<Pool>, PoolOpenError> {
        RawDevice::create_sparse(data_path, geometry.data_size)
            .map_err(|e| PoolOpenError::file(data_path, e))?;
        let data = RawDevice::open(
            data_path,
            RawOptions {
                read_only: false,
                direct: options.direct,
            },
        )
        .map_err(|e| PoolOpenError::file(data_path, e))?;
        Pool::open_with(store, Arc::new(data), geometry, options)
    }

    /// Opens (or formats, when block 0 is all zeros) the pool whose metadata is `store` and
    /// whose data blocks live on `data`.
    pub fn open_with(
        store: Arc<dyn BlockStore>,
        data: Arc<dyn DataDevice>,
        geometry: &PoolGeometry,
        options: PoolOptions,
    ) -> Result<Arc<Pool>, PoolOpenError> {
        let block_sectors = u32::try_from(geometry.block_size / 512)
            .map_err(|_| ThinError::BadBlockSize(u32::MAX))?;
        let mut first = vec![0u8; 4096];
        store
            .read_block(0, &mut first)
            .map_err(PoolOpenError::MetadataRead)?;
        let cache = Arc::new(BufferCache::new(
            store,
            BufioConfig {
                block_size: 4096,
                memory_limit: options.metadata_cache,
            },
        ));
        let meta = if first.iter().all(|&b| b == 0) {
            let nr_data = data.size() / geometry.block_size;
            info!(
                "formatting a new pool: {nr_data} data blocks of {} KiB",
                geometry.block_size >> 10
            );
            PoolMetadata::format(cache, block_sectors, nr_data)?
        } else {
            PoolMetadata::open(cache)?
        };
        let block_size = u64::from(meta.data_block_size()) * 512;
        let nr_data = data.size() / block_size;
        let mut meta = meta;
        if nr_data > meta.data_dev_size() {
            info!("data device grew to {nr_data} blocks");
            meta.resize_data_dev(nr_data)?;
            meta.commit()?;
        } else if nr_data < meta.data_dev_size() {
            return Err(PoolOpenError::DataTooSmall {
                blocks: nr_data,
                needed: meta.data_dev_size(),
            });
        }
        let mode = if meta.is_read_only() {
            PoolMode::ReadOnly
        } else {
            PoolMode::Write
        };
        let pool = Arc::new(Pool {
            meta: RwLock::new(meta),
            data,
            block_size,
            io_gate: Arc::new(IoGate::default()),
            provision_gate: Arc::new(IoGate::default()),
            prison: Prison::default(),
            changes: AtomicU64::new(0),
            commit_state: Mutex::new(CommitState { committed: 0 }),
            mode: Mutex::new(mode),
            space_grown: Condvar::new(),
            options,
            events: Mutex::new(Vec::new()),
            data_low_water: AtomicU64::new(0),
            data_low_fired: AtomicBool::new(false),
            preallocated: AtomicU64::new(0),
            commit_stats: Default::default(),
            stopping: Arc::new(AtomicBool::new(false)),
            timer: Mutex::new(None),
        });
        start_commit_timer(&pool);
        Ok(pool)
    }
}

fn start_commit_timer(pool: &Arc<Pool>) {
    let weak: Weak<Pool> = Arc::downgrade(pool);
    let stopping = pool.stopping.clone();
    let interval = pool.options.commit_interval;
    let spawned = std::thread::Builder::new()
        .name("thin-commit".into())
        .spawn(move || {
            let mut last = Instant::now();
            while !stopping.load(Ordering::Acquire) {
                // Short naps so that closing the pool does not wait a whole interval.
                std::thread::sleep(interval.min(Duration::from_millis(100)));
                if last.elapsed() < interval {
                    continue;
                }
                last = Instant::now();
                let Some(pool) = weak.upgrade() else { break };
                let writable = matches!(pool.mode(), PoolMode::Write | PoolMode::OutOfDataSpace);
                if writable && pool.has_uncommitted() {
                    if let Err(e) = pool.commit() {
                        error!("periodic commit failed: {e}");
                    }
                }
            }
        });
    match spawned {
        Ok(t) => *pool.timer.lock() = Some(t),
        Err(e) => error!("cannot start the commit timer: {e}; commits happen only on FLUSH"),
    }
}

/// Why a pool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PoolOpenError {
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metadata(#[from] ThinError),
    #[error("reading the metadata superblock: {0}")]
    MetadataRead(#[source] std::io::Error),
    #[error("the data device holds {blocks} blocks but the metadata describes {needed}")]
    DataTooSmall { blocks: u64, needed: u64 },
}

impl PoolOpenError {
    fn file(path: &Path, source: std::io::Error) -> Self {
        PoolOpenError::File {
            path: path.display().to_string(),
            source,
        }
    }
}

impl From<crate::engine::pdata::PdataError> for PoolOpenError {
    fn from(e: crate::engine::pdata::PdataError) -> Self {
        PoolOpenError::Metadata(ThinError::Pdata(e))
    }
}
