//! The body of a `thin-mirror` job (on its own thread, see `daemon::jobs`):
//!
//! 1. The node's `WriteHook` already tracks writes into a `DirtyMap` (the command started
//!    it, so a second mirror of the node is refused at once). The pool's grace period then
//!    lets every write that began untracked land before anything is read.
//! 2. The first pass: the whole device (`full`: holes zeroed on the target), only its
//!    mapped blocks (`top`), or only what differs from snapshot `base` (`incremental`).
//! 3. Dirty runs are copied until a sweep copies at most `CONVERGED` bytes (waiting for one
//!    that copies nothing never ends while a guest writes steadily: each sweep finds what was
//!    written during the one before), or copies no less than the sweep before, or
//!    `BACKGROUND_SWEEPS` sweeps were made (a guest that writes faster than the target
//!    takes keeps every sweep large: only write-blocking slows it to the target's pace, as
//!    QEMU's `write-blocking` copy mode does from the start; see `Convergence`). Then the
//!    mirror turns write-blocking
//!    (`active.rs`): writes that start from then on complete only once they are on the
//!    target; the writes that started before are waited for and what they marked copied;
//!    then the job is `ready` (BLOCK_JOB_READY): every write completed from then on is on
//!    the target. A failed copy of a guest write fails the job.
//! 4. `job-complete`: the node refuses writes from now on, the writes in flight finish and
//!    are marked, the last dirty runs are copied, the target is flushed: the target is the
//!    disk as of the switchover. `block-job-cancel` of a ready job stops with the source
//!    still writable; `job-cancel` stops at once (both stop tracking).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::copy::{CopyStream, Holes};
use super::{ActiveSync, DirtyMap, MirrorError, WriteHook};
use crate::daemon::jobs::{Job, Outcome, Request};
use crate::engine::thin::Volumes;
use crate::engine::BlockDevice;
use crate::nbd::client::NbdClient;

/// What the first pass copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncMode {
    Full,
    Top,
    /// What differs from this snapshot (the target holds the snapshot already).
    Incremental(String),
}

/// Everything a mirror job needs, made by the command before the job starts.
pub struct Mirror {
    pub device: String,
    pub source: Arc<dyn BlockDevice>,
    pub target: Arc<NbdClient>,
    pub volumes: Arc<Volumes>,
    pub hook: Arc<WriteHook>,
    pub dirty: Arc<DirtyMap>,
    pub sync: SyncMode,
    /// Held by a copy from its read of the source until the target answered (the job's
    /// copies and the write-blocking ones of guest writes, see `active.rs`).
    pub copying: Arc<Mutex<()>>,
}

/// The first pass goes in windows of this size, so a cancel is seen between them.
const WINDOW: u64 = 256 << 20;
/// A dirty run copied at once is at most this long.
const DIRTY_RUN: u64 = 16 << 20;
/// A sweep that copied no more than this has converged: the mirror turns write-blocking.
const CONVERGED: u64 = 4 << 20;
/// Sweeps after the first pass before the mirror turns write-blocking whatever they copied.
const BACKGROUND_SWEEPS: u32 = 8;
/// How long a switchover waits for the writes in flight to finish.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// Stops tracking when the job ends, however it ends.
struct Tracking(Arc<WriteHook>);

impl Drop for Tracking {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// When background sweeps stop paying: the mirror then turns write-blocking, after which
/// guest writes no longer mark anything and the next sweeps drain what is left.
#[derive(Default)]
struct Convergence {
    sweeps: u32,
    last: Option<u64>,
}

impl Convergence {
    /// After a sweep that copied `copied` bytes: whether to turn write-blocking now.
    fn done_after(&mut self, copied: u64) -> bool {
        self.sweeps += 1;
        let not_shrinking = self.last.is_some_and(|last| copied >= last);
        self.last = Some(copied);
        copied <= CONVERGED || not_shrinking || self.sweeps >= BACKGROUND_SWEEPS
    }
}

fn cancelled(job: &Job) -> bool {
    job.request() == Request::Cancel
}

impl Mirror {
    pub fn run(self, job: &Arc<Job>) -> Result<Outcome, String> {
        let _tracking = Tracking(self.hook.clone());
        // A cancel hangs up on the target: a copy waiting for a server that stopped
        // answering then fails at once instead of holding the cancel (and shutdown).
        if let Ok(h) = self.target.hang_up_handle() {
            job.set_on_cancel(Box::new(move || h.hang_up()));
        }
        match self.run_tracked(job) {
            Err(_) if cancelled(job) => Ok(Outcome::Cancelled),
            r => r.map_err(|e| e.to_string()),
        }
    }

    /// Copies a range and waits until it is on the target, holding the copy lock meanwhile.
    fn copy(
        &self,
        job: &Job,
        stream: &mut CopyStream<'_>,
        offset: u64,
        len: u64,
    ) -> Result<(), MirrorError> {
        let progress = |n| job.add_progress(n);
        let _copying = self.copying.lock();
        let r = stream.range(offset, len, Holes::Zero, &progress);
        // Even after an error, what was started is answered before the lock goes.
        let settled = stream.settle(&progress);
        r?;
        settled
    }

    fn first_pass(&self, job: &Job, stream: &mut CopyStream<'_>) -> Result<bool, MirrorError> {
        // Nothing else copies before the mirror turns write-blocking, but the lock says so.
        let _copying = self.copying.lock();
        let r = self.first_pass_windows(job, stream);
        // The windows' reads and writes are answered before the first pass ends, even after
        // an error.
        let waited = stream.settle(&|n| job.add_progress(n));
        let done = r?;
        waited?;
        Ok(done)
    }

    /// The first pass's windows (and `incremental`'s changed runs), streamed into `stream`:
    /// no wait for the reads or replies between them.
    fn first_pass_windows(
        &self,
        job: &Job,
        stream: &mut CopyStream<'_>,
    ) -> Result<bool, MirrorError> {
        let size = self.source.size();
        job.set_total(size);
        let progress = |n| job.add_progress(n);
        let mut at = 0;
        while at < size {
            if cancelled(job) {
                return Ok(false);
            }
            let n = WINDOW.min(size - at);
            match &self.sync {
                SyncMode::Full => {
                    stream.range(at, n, Holes::Zero, &progress)?;
                }
                SyncMode::Top => {
                    stream.range(at, n, Holes::Skip, &progress)?;
                }
                SyncMode::Incremental(base) => {
                    let mut off = at;
                    while off < at + n {
                        let runs = self
                            .volumes
                            .changed_runs(base, &self.device, off, at + n - off)
                            .map_err(|e| MirrorError::Source(e.to_string()))?;
                        if runs.is_empty() {
                            return Err(MirrorError::Source("no delta answer".into()));
                        }
                        for (len, changed) in runs {
                            let len = len.min(at + n - off);
                            if changed {
                                stream.range(off, len, Holes::Zero, &progress)?;
                            } else {
                                job.add_progress(len);
                            }
                            off += len;
                        }
                    }
                }
            }
            at += n;
        }
        Ok(true)
    }

    /// Copies the dirty runs of one pass over the device; how many bytes it copied (`None`
    /// on a cancel).
    fn sweep(&self, job: &Job, stream: &mut CopyStream<'_>) -> Result<Option<u64>, MirrorError> {
        let mut copied = 0;
        let mut from = 0;
        while let Some((off, len)) = self.dirty.take(from, DIRTY_RUN) {
            if cancelled(job) {
                return Ok(None);
            }
            copied += len;
            job.add_total(len);
            self.copy(job, stream, off, len)?;
            from = off + len;
        }
        Ok(Some(copied))
    }

    fn run_tracked(&self, job: &Arc<Job>) -> Result<Outcome, MirrorError> {
        if self.target.size() != self.source.size() {
            return Err(MirrorError::Source(format!(
                "the target has {} bytes, the source {}",
                self.target.size(),
                self.source.size()
            )));
        }
        self.volumes.pool().wait_for_earlier_io();
        // One stream, with its queue of source reads, for the first pass and the sweeps.
        let mut stream = CopyStream::queued(&self.source, &self.target);
        let r = self.passes(job, &mut stream);
        let finished = stream.finish(&|n| job.add_progress(n));
        let outcome = r?;
        finished?;
        Ok(outcome)
    }

    fn passes(&self, job: &Arc<Job>, stream: &mut CopyStream<'_>) -> Result<Outcome, MirrorError> {
        if !self.first_pass(job, stream)? {
            return Ok(Outcome::Cancelled);
        }
        let mut active: Option<Arc<ActiveSync>> = None;
        let mut convergence = Convergence::default();
        loop {
            let copied = self.sweep(job, stream)?;
            if cancelled(job) {
                return Ok(Outcome::Cancelled);
            }
            let clean = copied == Some(0);
            if active.is_none() && copied.is_some_and(|n| convergence.done_after(n)) {
                active = Some(self.become_write_blocking()?);
                // Sweep again: what the writes that started before marked.
                continue;
            }
            if let Some(e) = active.as_ref().and_then(|a| a.failure()) {
                return Err(MirrorError::Active(e));
            }
            if clean {
                job.ready();
            }
            match job.request() {
                Request::Complete => return self.switch_over(job, stream, active.as_deref()),
                Request::Stop => {
                    self.target.flush()?;
                    return Ok(Outcome::Completed);
                }
                Request::Cancel => return Ok(Outcome::Cancelled),
                Request::None if clean => {
                    job.wait_request(Duration::from_millis(20));
                }
                Request::None => {}
            }
        }
    }

    /// Writes that start from now on are synced; waits for those that started before.
    fn become_write_blocking(&self) -> Result<Arc<ActiveSync>, MirrorError> {
        let active = ActiveSync::start(
            self.source.clone(),
            self.target.clone(),
            self.copying.clone(),
        )?;
        self.hook.start_sync(active.clone());
        if !self.hook.wait_unsynced(DRAIN_LIMIT) {
            return Err(MirrorError::Source(
                "writes in flight did not finish to turn write-blocking".into(),
            ));
        }
        Ok(active)
    }

    fn switch_over(
        &self,
        job: &Job,
        stream: &mut CopyStream<'_>,
        active: Option<&ActiveSync>,
    ) -> Result<Outcome, MirrorError> {
        self.hook.set_refused(true);
        let result = (|| {
            if !self.hook.wait_idle(DRAIN_LIMIT) {
                return Err(MirrorError::Source(
                    "writes in flight did not finish for the switchover".into(),
                ));
            }
            // Synced writes are counted until they are on the target: none is left.
            if let Some(e) = active.and_then(|a| a.failure()) {
                return Err(MirrorError::Active(e));
            }
            loop {
                match self.sweep(job, stream)? {
                    Some(0) => break,
                    Some(_) => {}
                    None => return Ok(Outcome::Cancelled),
                }
            }
            self.target.flush()?;
            Ok(Outcome::Completed)
        })();
        // Only a finished switchover leaves the source refusing writes.
        if !matches!(result, Ok(Outcome::Completed)) {
            self.hook.set_refused(false);
        }
        result
    }
}

#[cfg(test)]
mod convergence_tests {
    use super::{Convergence, BACKGROUND_SWEEPS, CONVERGED};

    #[test]
    fn a_small_sweep_converges_at_once() {
        assert!(Convergence::default().done_after(CONVERGED));
        assert!(Convergence::default().done_after(0));
    }

    #[test]
    fn shrinking_sweeps_go_on_until_one_is_small_or_the_limit() {
        let mut c = Convergence::default();
        let mut n = 64 * CONVERGED;
        let mut made = 0;
        while !c.done_after(n) {
            made += 1;
            n -= CONVERGED;
        }
        assert_eq!(made + 1, BACKGROUND_SWEEPS);
    }

    #[test]
    fn a_sweep_no_smaller_than_the_one_before_stops_the_background_copy() {
        let mut c = Convergence::default();
        assert!(!c.done_after(32 * CONVERGED));
        assert!(c.done_after(32 * CONVERGED));
    }
}
