//! A pool held still for a metadata operation that is not guest I/O (a snapshot, a delete):
//! no provisioning, no data I/O in flight, the metadata locked for change, and everything
//! completed before committed, so that taking the operation back (going back to that commit)
//! takes back nothing else. See `Pool::quiesce_committed` and `Pool::undo`.

use std::ops::{Deref, DerefMut};
use std::time::Instant;

use parking_lot::RwLockWriteGuard;

use super::gate::Closed;
use super::metadata::PoolMetadata;

/// Dropped in field order: the metadata lock, then data I/O resumes, then provisioning.
pub struct Quiesced<'a> {
    pub(super) meta: RwLockWriteGuard<'a, PoolMetadata>,
    pub(super) _io: Closed<'a>,
    pub(super) _provisioning: Closed<'a>,
    /// When data I/O was asked to stop (in-flight I/O drains, new I/O waits).
    pub(super) io_held_since: Instant,
}

impl Quiesced<'_> {
    /// When data I/O was asked to stop: reads and writes of mapped blocks wait from then on
    /// (first writes waited from the commit before).
    pub fn io_held_since(&self) -> Instant {
        self.io_held_since
    }
}

impl Deref for Quiesced<'_> {
    type Target = PoolMetadata;

    fn deref(&self) -> &PoolMetadata {
        &self.meta
    }
}

impl DerefMut for Quiesced<'_> {
    fn deref_mut(&mut self) -> &mut PoolMetadata {
        &mut self.meta
    }
}
