//! Commits (grouped, on FLUSH and on the timer), quiescing for metadata operations, taking a
//! failed operation back, and what a data device failure does to the pool.

use std::sync::atomic::Ordering;
use std::time::Instant;

use log::error;
use parking_lot::RwLockWriteGuard;

use super::*;
use crate::engine::thin::error::ThinError;
use crate::engine::thin::gate::{Closed, Ticket};
use crate::engine::thin::metadata::PoolMetadata;
use crate::engine::thin::quiesce::Quiesced;
use crate::engine::{BlockError, DataDevice};

impl Pool {
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
    pub(in crate::engine::thin) fn commit_locked(
        &self,
        meta: &mut PoolMetadata,
    ) -> Result<(), BlockError> {
        let started = Instant::now();
        let committed = meta.commit();
        self.commit_stats.record(started.elapsed());
        committed.map_err(|e| {
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

    /// Waits until every data I/O that began before this call has ended (a grace period;
    /// new I/O neither waits nor is waited for). A mirror starts tracking writes, then waits
    /// for this, so no write it did not see can land after it read the blocks.
    pub fn wait_for_earlier_io(&self) {
        self.io_gate.grace();
    }

    /// A ticket for one synchronous data I/O; waits while a commit runs.
    pub(in crate::engine::thin) fn io_gate(&self) -> Ticket {
        self.io_gate.enter()
    }

    /// A ticket for one asynchronous data I/O, or `None` while the pool is quiesced.
    pub(in crate::engine::thin) fn try_ticket(&self) -> Option<Ticket> {
        self.io_gate.try_enter()
    }

    /// A ticket to allocate or unmap blocks; waits while a commit runs. Taken before any
    /// I/O ticket.
    pub(in crate::engine::thin) fn provision_ticket(&self) -> Ticket {
        self.provision_gate.enter()
    }

    /// A ticket to allocate blocks, or `None` while a commit runs.
    pub(in crate::engine::thin) fn try_provision_ticket(&self) -> Option<Ticket> {
        self.provision_gate.try_enter()
    }

    pub(in crate::engine::thin) fn data(&self) -> &dyn DataDevice {
        &*self.data
    }

    /// The data device itself, for a thin device's queue to open one of its own on it.
    pub(in crate::engine::thin) fn data_device(&self) -> Arc<dyn DataDevice> {
        self.data.clone()
    }

    /// After a failed write or flush of the data device: what the guest wrote since the last
    /// commit may be lost or torn, so no mapping made since then may ever be committed. The
    /// pool turns read-only (reads of what is mapped keep working) until it is reopened.
    pub(in crate::engine::thin) fn data_failed(&self, e: &BlockError) {
        if !matches!(e, BlockError::Io { .. }) {
            return;
        }
        error!("data device failed, the pool becomes read-only: {e}");
        self.meta.write().set_read_only();
        self.set_mode(PoolMode::ReadOnly);
    }

    /// Flushes the data device; a failure turns the pool read-only.
    pub(in crate::engine::thin) fn flush_data(&self) -> Result<(), BlockError> {
        let result = self.data.flush();
        if let Err(e) = &result {
            self.data_failed(e);
        }
        result
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
        let started = Instant::now();
        let committed = meta.commit();
        self.commit_stats.record(started.elapsed());
        match committed {
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

    pub(in crate::engine::thin) fn has_uncommitted(&self) -> bool {
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
