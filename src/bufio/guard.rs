//! The owned guards handed to callers. Releasing is dropping; there is no release call to forget.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering;

use parking_lot::lock_api::{ArcRwLockReadGuard, ArcRwLockWriteGuard};
use parking_lot::RawRwLock;

use super::buffer::{Data, Pin};

/// Shared access to a cached block. Many may exist for one block at once.
///
/// Not `Send`: the lock must be released by the thread that took it.
pub struct ReadGuard {
    // Field order matters: the lock is released before the pin, so an evictor that sees the
    // buffer unpinned also sees it unlocked.
    lock: ArcRwLockReadGuard<RawRwLock, Data>,
    pin: Pin,
}

/// Exclusive access to a cached block. The buffer is marked dirty when the guard is dropped.
///
/// Not `Send`: the lock must be released by the thread that took it.
pub struct WriteGuard {
    lock: ArcRwLockWriteGuard<RawRwLock, Data>,
    pin: Pin,
    mark_dirty: bool,
}

impl ReadGuard {
    pub(super) fn new(lock: ArcRwLockReadGuard<RawRwLock, Data>, pin: Pin) -> Self {
        ReadGuard { lock, pin }
    }

    /// The block number this buffer caches.
    pub fn block(&self) -> u64 {
        self.pin.block
    }

    /// The validation tag: 0 after the block is read from the store or created, then whatever
    /// the last `set_tag` stored.
    pub fn tag(&self) -> u32 {
        self.pin.tag.load(Ordering::Acquire)
    }

    /// Records that the contents passed some validation, so later users can skip it.
    pub fn set_tag(&self, tag: u32) {
        self.pin.tag.store(tag, Ordering::Release);
    }
}

impl WriteGuard {
    pub(super) fn new(lock: ArcRwLockWriteGuard<RawRwLock, Data>, pin: Pin) -> Self {
        WriteGuard {
            lock,
            pin,
            mark_dirty: true,
        }
    }

    /// The block number this buffer caches.
    pub fn block(&self) -> u64 {
        self.pin.block
    }

    /// See [`ReadGuard::tag`].
    pub fn tag(&self) -> u32 {
        self.pin.tag.load(Ordering::Acquire)
    }

    /// See [`ReadGuard::set_tag`].
    pub fn set_tag(&self, tag: u32) {
        self.pin.tag.store(tag, Ordering::Release);
    }

    /// Release without marking the buffer dirty: for callers that hand the contents elsewhere.
    pub(super) fn release_clean(mut self) {
        self.mark_dirty = false;
    }

    pub(super) fn pin(&self) -> &Pin {
        &self.pin
    }
}

impl Deref for ReadGuard {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.lock.bytes
    }
}

impl Deref for WriteGuard {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.lock.bytes
    }
}

impl DerefMut for WriteGuard {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.lock.bytes
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if self.mark_dirty {
            // Set while the write lock is still held (fields drop after this body), so a
            // write-back that later takes the read lock sees the bit.
            self.pin.dirty.store(true, Ordering::Release);
        }
    }
}

impl fmt::Debug for ReadGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadGuard")
            .field("block", &self.block())
            .field("tag", &self.tag())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for WriteGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteGuard")
            .field("block", &self.block())
            .field("tag", &self.tag())
            .finish_non_exhaustive()
    }
}
