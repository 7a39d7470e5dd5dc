//! What a COW device needs from an exception store (the kernel's dm_exception_store_type):
//! somewhere to put the next copied chunk, a way to make exceptions durable, invalidation,
//! usage, and for merging, the newest exceptions and a way to forget them.

use std::sync::Arc;

use super::runs::ExceptionTable;
use super::CowError;
use crate::engine::BlockDevice;

/// How much of a store is used, in chunks (header and metadata included for persistent ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub used: u64,
    pub total: u64,
}

pub trait ExceptionStore: Send {
    /// Bytes per chunk.
    fn chunk_size(&self) -> u64;

    /// The device holding the data chunks.
    fn device(&self) -> &Arc<dyn BlockDevice>;

    /// Whether exceptions survive a reopen.
    fn persistent(&self) -> bool;

    fn valid(&self) -> bool;

    /// A chunk for the next exception, or [`CowError::Full`].
    fn prepare(&mut self) -> Result<u64, CowError>;

    /// Makes every data write issued so far durable, then the exceptions `(old, new)` (in the
    /// order their chunks were prepared): a crash never leaves an exception pointing at a
    /// chunk whose data did not reach the disk.
    fn commit(&mut self, exceptions: &[(u64, u64)]) -> Result<(), CowError>;

    /// Marks the snapshot invalid for good (header valid = 0).
    fn invalidate(&mut self) -> Result<(), CowError>;

    fn usage(&self) -> Usage;

    /// Up to `max` of the newest committed exceptions, newest first (at least one if any).
    fn newest(&mut self, max: usize) -> Result<Vec<(u64, u64)>, CowError>;

    /// Durably forgets the `n` newest committed exceptions (after a merge copied them).
    fn forget_newest(&mut self, n: usize) -> Result<(), CowError>;
}

/// A store opened with the exceptions it holds.
pub struct Opened<S> {
    pub store: S,
    pub table: ExceptionTable,
}
