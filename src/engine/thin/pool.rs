//! A running thin pool: metadata behind a lock, the data device, commits (on FLUSH, on a
//! timer, grouped), the pool's mode, and what thin devices need to provision blocks.
//!
//! Locking, in the order taken:
//! - `provision_gate` (see gate.rs): held from a data block's allocation until its mapping is
//!   inserted (or the block given back), and while blocks are unmapped. A commit closes it
//!   for its whole duration: it then commits no allocation without its mapping, flushes the
//!   data of every mapping it commits, and no block is freed while it runs.
//! - `io_gate`: every data I/O of a thin device holds a ticket from its lookup to its
//!   completion. A commit waits for a grace period on it (the I/O that began before the
//!   commit), so no I/O that looked up a block freed in the transaction is in flight when the
//!   commit makes the block reusable. Reads and writes into mapped blocks never wait for a
//!   commit. A quiesce (snapshots) closes it.
//! - the prison cell of a virtual block, while it is being provisioned;
//! - `meta`: shared for lookups, exclusive for changes, never held across data I/O.

use crate::engine::{Bufs, BufsMut};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::gate::{Closed, IoGate, Ticket};
use super::quiesce::Quiesced;

use super::error::ThinError;
use super::metadata::PoolMetadata;
use super::prison::Prison;
use crate::bufio::{BlockStore, BufferCache, BufioConfig, FileStore};
use crate::engine::raw::{RawDevice, RawOptions};
use crate::engine::{BlockError, DataDevice};

/// What the pool can do right now, as dm-thin reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// Normal operation.
    Write,
    /// No free data blocks: writes that need one wait (or fail with `error_if_no_space`).
    OutOfDataSpace,
    /// Metadata cannot change (out of metadata space, or after a metadata error).
    ReadOnly,
    /// Nothing works but reads of what is committed.
    Fail,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Write => "write",
            PoolMode::OutOfDataSpace => "out-of-data-space",
            PoolMode::ReadOnly => "read-only",
            PoolMode::Fail => "fail",
        }
    }
}

/// Things a pool tells its owner about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolEvent {
    ModeChanged(PoolMode),
    /// Free data blocks dropped below the low-water mark.
    DataLowWater {
        free: u64,
    },
    /// Free metadata blocks dropped below the low-water mark.
    MetadataLowWater {
        free: u64,
    },
}

pub type EventSink = Arc<dyn Fn(&PoolEvent) + Send + Sync>;

/// How a pool behaves.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Fail writes at once when the data device is full, instead of waiting for it to grow.
    pub error_if_no_space: bool,
    /// How long writes wait for space before they fail.
    pub no_space_timeout: Duration,
    /// Commit at least this often while there are changes.
    pub commit_interval: Duration,
    /// Memory for cached metadata blocks.
    pub metadata_cache: usize,
    /// O_DIRECT on the data device.
    pub direct: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            error_if_no_space: false,
            no_space_timeout: Duration::from_secs(60),
            commit_interval: Duration::from_secs(1),
            metadata_cache: 64 << 20,
            direct: true,
        }
    }
}

/// Where a new pool's files go and how big they are.
#[derive(Clone, Debug)]
pub struct PoolGeometry {
    /// Data block size in bytes: 64 KiB to 1 GiB, a multiple of 64 KiB.
    pub block_size: u64,
    pub metadata_size: u64,
    pub data_size: u64,
}

/// How much of the data device a first write preallocates ahead of its block.
const PREALLOCATE_AHEAD: u64 = 64 << 20;

struct CommitState {
    /// The change generation the last commit covered.
    committed: u64,
}

pub struct Pool {
    meta: RwLock<PoolMetadata>,
    data: Arc<dyn DataDevice>,
    block_size: u64,
    io_gate: Arc<IoGate>,
    provision_gate: Arc<IoGate>,
    pub(super) prison: Prison,
    /// Bumped by every metadata change; a commit records the value it covered.
    changes: AtomicU64,
    commit_state: Mutex<CommitState>,
    mode: Mutex<PoolMode>,
    space_grown: Condvar,
    options: PoolOptions,
    events: Mutex<Vec<EventSink>>,
    data_low_water: AtomicU64,
    data_low_fired: AtomicBool,
    /// Where the last preallocation of the data device ended. Blocks below it are not
    /// preallocated again: one handed out there that is still a hole only makes its first
    /// write allocate its own space.
    preallocated: AtomicU64,
    stopping: Arc<AtomicBool>,
    /// The commit timer, joined by `close` so that the pool is gone (and its metadata lock
    /// released) as soon as its owner drops it.
    timer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

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
            stopping: Arc::new(AtomicBool::new(false)),
            timer: Mutex::new(None),
        });
        start_commit_timer(&pool);
        Ok(pool)
    }

    /// Data block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn mode(&self) -> PoolMode {
        *self.mode.lock()
    }

    pub fn options(&self) -> &PoolOptions {
        &self.options
    }

    pub fn subscribe(&self, sink: EventSink) {
        self.events.lock().push(sink);
    }

    fn emit(&self, event: PoolEvent) {
        let sinks = self.events.lock().clone();
        for s in sinks {
            s(&event);
        }
    }

    fn set_mode(&self, mode: PoolMode) {
        let changed = {
            let mut m = self.mode.lock();
            let changed = *m != mode;
            *m = mode;
            changed
        };
        if changed {
            warn!("pool mode: {}", mode.as_str());
            self.emit(PoolEvent::ModeChanged(mode));
        }
    }

    /// Read access to the metadata (lookups, queries).
    pub fn meta(&self) -> RwLockReadGuard<'_, PoolMetadata> {
        self.meta.read()
    }

    /// Changes metadata; a fatal error turns the pool read-only.
    pub fn change<T>(
        &self,
        f: impl FnOnce(&mut PoolMetadata) -> Result<T, ThinError>,
    ) -> Result<T, ThinError> {
        let mut meta = self.meta.write();
        let result = f(&mut meta);
        self.changes.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = &result {
            if e.is_fatal() {
                error!("metadata error, the pool becomes read-only: {e}");
                meta.fail();
                drop(meta);
                self.set_mode(PoolMode::ReadOnly);
            }
        }
        result
    }

    /// Records a metadata change made through `quiesce`, so the next commit covers it.
    pub fn note_change(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// Quiesces all thin I/O (held while a snapshot is taken, for example).
    pub fn quiesce(&self) -> (Closed<'_>, RwLockWriteGuard<'_, PoolMetadata>) {
        let gate = self.io_gate.close();
        (gate, self.meta.write())
    }

    /// Holds the pool still for a metadata operation that is not guest I/O, with everything
    /// completed so far committed: an operation that fails part way is then taken back by
    /// [`Pool::undo`], which drops its changes and no completed write.
    ///
    /// The commit runs as any commit does (first writes wait, reads and writes of mapped
    /// blocks go on); provisioning stays stopped after it, so nothing is left to commit when
    /// data I/O is then quiesced, and that pause stays as short as a plain [`Pool::quiesce`].
    pub fn quiesce_committed(&self) -> Result<Quiesced<'_>, BlockError> {
        let state = self.commit_state.lock();
        let provisioning = self.provision_gate.close();
        let covered = self.changes.load(Ordering::Acquire);
        if self.meta.read().has_changes() {
            // As in `commit`: the I/O that may use blocks this commit frees ends first, the
            // data is durable before the metadata that points at it.
            self.io_gate.grace();
            self.flush_data()?;
            self.commit_locked(&mut self.meta.write())?;
        }
        let mut state = state;
        state.committed = state.committed.max(covered);
        drop(state);
        let io_held_since = Instant::now();
        let io = self.io_gate.close();
        let mut meta = self.meta.write();
        if meta.has_changes() {
            // A change that is not guest I/O slipped in (the pool grew, say): commit it too,
            // now with I/O held. Nothing can be in flight, so no grace period is needed.
            if let Err(e) = self.data.flush() {
                // Before anyone else can commit what this flush may have lost.
                meta.set_read_only();
                drop(meta);
                drop(io);
                self.data_failed(&e);
                return Err(e);
            }
            self.commit_locked(&mut meta)?;
        }
        Ok(Quiesced {
            meta,
            _io: io,
            _provisioning: provisioning,
            io_held_since,
        })
    }

    /// Commits the metadata (the data already flushed); a fatal error turns the pool
    /// read-only.
    fn commit_locked(&self, meta: &mut PoolMetadata) -> Result<(), BlockError> {
        meta.commit().map_err(|e| {
            if e.is_fatal() {
                // `commit` already went back to the last commit and stopped changes.
                error!("commit failed, the pool becomes read-only: {e}");
                self.set_mode(PoolMode::ReadOnly);
            }
            BlockError::from(e)
        })
    }

    /// Takes back a metadata operation that failed with `e` under
    /// [`Pool::quiesce_committed`]: back to the last commit, which holds every completed
    /// write. After an error that says the metadata cannot be trusted (or when going back
    /// fails), the pool turns read-only, as after any other metadata error.
    pub fn undo(&self, mut quiesced: Quiesced<'_>, e: &ThinError) {
        let fatal = e.is_fatal()
            || match quiesced.abort() {
                Ok(()) => false,
                Err(e2) => {
                    error!("cannot take back a failed metadata operation: {e2}");
                    true
                }
            };
        if fatal {
            error!("metadata error, the pool becomes read-only: {e}");
            quiesced.fail();
            drop(quiesced);
            self.set_mode(PoolMode::ReadOnly);
        }
    }

    /// A ticket for one synchronous data I/O; waits while a commit runs.
    pub(super) fn io_gate(&self) -> Ticket {
        self.io_gate.enter()
    }

    /// A ticket for one asynchronous data I/O, or `None` while the pool is quiesced.
    pub(super) fn try_ticket(&self) -> Option<Ticket> {
        self.io_gate.try_enter()
    }

    /// A ticket to allocate or unmap blocks; waits while a commit runs. Taken before any
    /// I/O ticket.
    pub(super) fn provision_ticket(&self) -> Ticket {
        self.provision_gate.enter()
    }

    /// A ticket to allocate blocks, or `None` while a commit runs.
    pub(super) fn try_provision_ticket(&self) -> Option<Ticket> {
        self.provision_gate.try_enter()
    }

    pub(super) fn data(&self) -> &dyn DataDevice {
        &*self.data
    }

    /// After a failed write or flush of the data device: what the guest wrote since the last
    /// commit may be lost or torn, so no mapping made since then may ever be committed. The
    /// pool turns read-only (reads of what is mapped keep working) until it is reopened.
    fn data_failed(&self, e: &BlockError) {
        if !matches!(e, BlockError::Io { .. }) {
            return;
        }
        error!("data device failed, the pool becomes read-only: {e}");
        self.meta.write().set_read_only();
        self.set_mode(PoolMode::ReadOnly);
    }

    /// Flushes the data device; a failure turns the pool read-only.
    fn flush_data(&self) -> Result<(), BlockError> {
        let result = self.data.flush();
        if let Err(e) = &result {
            self.data_failed(e);
        }
        result
    }

    /// Allocates a data block, waiting for the pool to grow when it is full (unless the
    /// pool fails at once). The caller must hold no cell or gate while this waits: the
    /// `release` closure drops them and the caller retries from the start on `Ok(None)`.
    pub(super) fn alloc_data_block(&self) -> Result<u64, BlockError> {
        match self.change(|m| m.alloc_data_block()) {
            Ok(b) => {
                self.check_data_low_water();
                Ok(b)
            }
            Err(ThinError::NoDataSpace) => {
                self.set_mode(PoolMode::OutOfDataSpace);
                Err(BlockError::NoSpace)
            }
            Err(e) => Err(BlockError::from(e)),
        }
    }

    /// After a failed allocation: waits for the pool to grow. Returns whether to retry.
    pub(super) fn wait_for_space(&self, since: Instant) -> bool {
        if self.options.error_if_no_space {
            return false;
        }
        let deadline = since + self.options.no_space_timeout;
        let mut mode = self.mode.lock();
        while *mode == PoolMode::OutOfDataSpace {
            if self.space_grown.wait_until(&mut mode, deadline).timed_out() {
                return *mode != PoolMode::OutOfDataSpace;
            }
        }
        *mode == PoolMode::Write
    }

    /// Sets the free-block count below which a low-water event is sent (0: never).
    pub fn set_data_low_water(&self, blocks: u64) {
        self.data_low_water.store(blocks, Ordering::Release);
        self.data_low_fired.store(false, Ordering::Release);
        self.check_data_low_water();
    }

    /// The free-block count below which a low-water event is sent (0: none).
    pub fn data_low_water(&self) -> u64 {
        self.data_low_water.load(Ordering::Acquire)
    }

    fn check_data_low_water(&self) {
        let mark = self.data_low_water.load(Ordering::Acquire);
        if mark == 0 {
            return;
        }
        let free = self.meta.read().free_data_blocks();
        if free < mark && !self.data_low_fired.swap(true, Ordering::AcqRel) {
            self.emit(PoolEvent::DataLowWater { free });
        }
    }

    /// Grows the pool to the data device's current size (after the file was extended).
    pub fn grow_data(&self, new_size: u64) -> Result<(), BlockError> {
        let size = self.data.grow_to(new_size)?;
        let nr = size / self.block_size;
        self.change(|m| m.resize_data_dev(nr))
            .map_err(BlockError::from)?;
        self.data_low_fired.store(false, Ordering::Release);
        let mut mode = self.mode.lock();
        if *mode == PoolMode::OutOfDataSpace {
            *mode = PoolMode::Write;
            drop(mode);
            self.emit(PoolEvent::ModeChanged(PoolMode::Write));
        }
        self.space_grown.notify_all();
        Ok(())
    }

    /// Makes everything completed so far durable: data first, then the metadata that points
    /// at it. Concurrent callers share one commit.
    pub fn commit(&self) -> Result<(), BlockError> {
        let wanted = self.changes.load(Ordering::Acquire);
        let mut state = self.commit_state.lock();
        if state.committed >= wanted {
            // A commit that began after our changes covered them; the data still needs flushing
            // for writes into blocks that were already mapped.
            drop(state);
            return self.flush_data();
        }
        // Provisioning stops: every mapping in the metadata now has its data written, every
        // allocation its mapping, and nothing is freed until the commit is done.
        let _provisioning = self.provision_gate.close();
        let covered = self.changes.load(Ordering::Acquire);
        // The blocks this commit frees become reusable once it is done: first, the I/O that
        // might still use them (it began before the blocks were freed) must be over.
        self.io_gate.grace();
        self.flush_data()?;
        let mut meta = self.meta.write();
        match meta.commit() {
            Ok(()) => {
                state.committed = covered;
                Ok(())
            }
            Err(e) => {
                if e.is_fatal() {
                    error!("commit failed, the pool becomes read-only: {e}");
                    meta.fail();
                    drop(meta);
                    self.set_mode(PoolMode::ReadOnly);
                }
                Err(BlockError::from(e))
            }
        }
    }

    fn has_uncommitted(&self) -> bool {
        self.commit_state.lock().committed < self.changes.load(Ordering::Acquire)
    }

    /// Stops the commit timer and commits what is left.
    pub fn close(&self) {
        self.stopping.store(true, Ordering::Release);
        let timer = self.timer.lock().take();
        if let Some(t) = timer {
            // The timer may itself be closing the pool (it held the last reference).
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        if self.mode() != PoolMode::ReadOnly && self.has_uncommitted() {
            if let Err(e) = self.commit() {
                error!("final commit failed: {e}");
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close();
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

/// Data I/O helpers for thin devices.
impl Pool {
    pub(super) fn read_data(
        &self,
        block: u64,
        within: u64,
        bufs: &mut BufsMut<'_>,
    ) -> Result<(), BlockError> {
        self.data.read(block * self.block_size + within, bufs)
    }

    /// Zeroes `len` bytes at `within` of data block `block`; a failure turns the pool
    /// read-only.
    /// Readies a newly allocated data block for a first write of `[within, within + len)`:
    /// the rest of it must read as zeros. It is zeroed only if it may hold data.
    ///
    /// A block in a hole of a sparse data file reads as zeros, but a file system allocates
    /// it on the first write into it, inside the write (on ext4 a 4 KiB write into a hole ran
    /// at 0.6x an overwrite). So the data file is allocated, unwritten, a stretch ahead of the
    /// blocks handed out: one file system transaction for many first writes instead of one
    /// zeroing each.
    pub(super) fn zero_around(&self, block: u64, within: u64, len: u64) -> Result<(), BlockError> {
        let start = block * self.block_size;
        self.preallocate_ahead(start);
        let end = within + len;
        let around = [(0, within), (end, self.block_size.saturating_sub(end))];
        if around.iter().all(|&(_, n)| n == 0) || self.data.reads_as_zeros(start, self.block_size) {
            return Ok(());
        }
        for (at, n) in around {
            if n > 0 {
                self.zero_data(block, at, n)?;
            }
        }
        Ok(())
    }

    /// Preallocates the data device from `start` on unless an earlier call covered it.
    fn preallocate_ahead(&self, start: u64) {
        if start + self.block_size > self.preallocated.load(Ordering::Acquire) {
            let len = PREALLOCATE_AHEAD
                .max(self.block_size)
                .min(self.data.size().saturating_sub(start));
            if let Err(e) = self.data.preallocate(start, len) {
                // The first writes still work, each allocating its own space.
                debug!("cannot preallocate the data device at {start}: {e}");
            }
            self.preallocated.fetch_max(start + len, Ordering::AcqRel);
        }
    }

    fn zero_data(&self, block: u64, within: u64, len: u64) -> Result<(), BlockError> {
        let result = self
            .data
            .write_zeroes(block * self.block_size + within, len, false);
        if let Err(e) = &result {
            self.data_failed(e);
        }
        result
    }

    pub(super) fn write_data(
        &self,
        block: u64,
        within: u64,
        bufs: &Bufs<'_>,
    ) -> Result<(), BlockError> {
        let result = self.data.write(block * self.block_size + within, bufs);
        if let Err(e) = &result {
            self.data_failed(e);
        }
        result
    }
}
