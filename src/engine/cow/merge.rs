//! Merging: folding a snapshot's exceptions back into its origin.
//!
//! Newest exceptions first, a batch at a time: copy each exception's chunk to its old place
//! in the origin, flush the origin, then clear the batch's pairs in the store and flush it.
//! A crash anywhere leaves a store whose remaining exceptions, over the partly merged
//! origin, still read as the snapshot: merging again finishes the job (copying a chunk twice
//! is harmless). While a merge runs the device keeps serving: chunks with an exception are
//! read and written in the store, every other chunk in the origin directly, so no new
//! exceptions appear and the merge ends.

use crate::engine::{Bufs, BufsMut};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::info;

use super::device::{CowDevice, CowEvent, Mode};
use super::CowError;
use crate::engine::BlockDevice;

/// Exceptions copied between two flushes of the origin.
const MERGE_BATCH: usize = 16;

/// What a finished merge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeReport {
    pub chunks: u64,
}

/// Clears the running flag however the merge ends.
struct Running<'a>(&'a CowDevice);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.merge_running.store(false, Ordering::Release);
    }
}

impl CowDevice {
    /// Folds every exception into `target`, the origin opened writable (the same bytes the
    /// device reads as its origin). Runs to the end; call it from a thread of its own while
    /// the device serves. Afterwards the device reads and writes `target` directly.
    pub fn merge(&self, target: Arc<dyn BlockDevice>) -> Result<MergeReport, CowError> {
        if target.size() < self.size {
            return Err(CowError::MergeTarget {
                target: target.size(),
                size: self.size,
            });
        }
        if self.merge_running.swap(true, Ordering::AcqRel) {
            return Err(CowError::MergeRunning);
        }
        let _running = Running(self);
        {
            // No copy-up is half done once the mode says merging.
            let _copy = self.copy_lock().lock();
            let mut mode = self.mode.write();
            match &*mode {
                Mode::Invalid => return Err(CowError::Invalid),
                Mode::Merged(_) => return Ok(MergeReport { chunks: 0 }),
                Mode::Normal | Mode::Merging(_) => *mode = Mode::Merging(target.clone()),
            }
        }
        self.commit()?;
        let mut chunks = 0u64;
        let mut buf = vec![0u8; self.chunk as usize];
        loop {
            let batch = self.store.lock().newest(MERGE_BATCH)?;
            if batch.is_empty() {
                break;
            }
            let _gate = self.io_gate.write();
            for &(old, new) in &batch {
                let at = old * self.chunk;
                let n = self.size.saturating_sub(at).min(self.chunk) as usize;
                let Some(part) = buf.get_mut(..n).filter(|p| !p.is_empty()) else {
                    continue; // past the origin's end: nothing to fold
                };
                self.data.read(new * self.chunk, &mut BufsMut::one(part))?;
                target.write(at, &Bufs::one(part))?;
            }
            target.flush()?;
            {
                let mut t = self.tables.write();
                for &(old, _) in &batch {
                    t.table.remove(old);
                }
            }
            self.store.lock().forget_newest(batch.len())?;
            chunks += batch.len() as u64;
        }
        *self.mode.write() = Mode::Merged(target);
        info!("merge complete: {chunks} chunks folded into the origin");
        self.emit(CowEvent::MergeCompleted { chunks });
        Ok(MergeReport { chunks })
    }
}
