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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{error, warn};
use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard};

use super::gate::IoGate;

use super::error::ThinError;
use super::metadata::PoolMetadata;
use super::prison::Prison;
use crate::engine::DataDevice;

mod commit;
mod commit_stats;
mod open;
mod resize;
mod space;

pub use commit_stats::CommitTimes;
pub use open::PoolOpenError;
pub use resize::ResizeError;

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

/// The dm-thin pool itself: the metadata (mappings, space maps) and the data device, with
/// commits, modes and the gates of provisioning. Devices are ids here; names are [`Volumes`]'.
///
/// [`Volumes`]: super::Volumes
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
    /// How long commits take.
    commit_stats: commit_stats::CommitStats,
    stopping: Arc<AtomicBool>,
    /// The commit timer, joined by `close` so that the pool is gone (and its metadata lock
    /// released) as soon as its owner drops it.
    timer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Pool {
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
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close();
    }
}
