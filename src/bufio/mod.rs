//! A cache of fixed-size metadata blocks: the only code that reads or writes the metadata device.
//!
//! Modelled on Linux's dm-bufio. Callers take [`ReadGuard`]s (shared) and [`WriteGuard`]s
//! (exclusive; the buffer is dirty once released) from a [`BufferCache`]; dirty buffers reach
//! the store when [`BufferCache::write_dirty`] runs, or earlier if memory runs short. The
//! persistent-data layer builds its transactions on exactly that: it writes new blocks, then
//! calls `write_dirty`, then writes the superblock and calls `write_dirty` again.
//!
//! - `store.rs`: the [`BlockStore`] seam and its file and memory versions; `rbd_store.rs`
//!   (feature `rbd`): an RBD image through librbd.
//! - `crash.rs`: [`CrashStore`], power cuts and injected faults for tests anywhere.
//! - `core.rs`: the block map, memory accounting and eviction; `lru.rs` picks victims.
//! - `writeback.rs`, `worker.rs`: writing dirty buffers, in the caller's thread or behind it.
//! - `buffer.rs`, `guard.rs`: one cached block and the guards that lend it out.

mod buffer;
mod cache;
mod core;
mod crash;
mod error;
mod guard;
mod lru;
#[cfg(feature = "rbd")]
mod rbd_store;
mod stats;
mod store;
mod worker;
mod writeback;

#[cfg(test)]
mod tests;

pub use cache::{BufferCache, BufioConfig};
pub use crash::{CrashStore, WriteFault};
pub use error::{BufioError, Result};
pub use guard::{ReadGuard, WriteGuard};
#[cfg(feature = "rbd")]
pub use rbd_store::RbdStore;
pub use stats::CacheStats;
pub use store::{BlockStore, FileStore, IoCounts, MemStore};
