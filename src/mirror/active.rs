//! Write-blocking once ready (QEMU's `copy-mode: write-blocking`): from the moment a mirror
//! is about to report ready, a guest write completes only once its range is on the target
//! too. `ActiveSync` copies a completed write's range from the source to the target:
//!
//! - at once on the caller's thread (`copy_now`: synchronous writes, e.g. the NBD server's),
//! - or on its own thread (`copy_later`: a vhost queue's completion, which must not block
//!   the queue's worker), the guest's completion then handed back by the callback.
//!
//! Every copy reads the source after the write completed and holds the mirror's copy lock
//! (shared with the job's sweeps) from that read until the target answered, so copies of
//! one range land in the order they read it: the last copy of a range has the source's last
//! content, whatever the order of the guest's overlapping writes.
//!
//! A target error does not fail the guest's write (the source has it): it is recorded, the
//! job fails on it, and later copies are not tried (their ranges are marked dirty instead).

use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::Mutex;
use smallvec::SmallVec;

use super::copy::{copy_range, Holes};
use crate::engine::BlockDevice;
use crate::nbd::client::NbdClient;

/// Called once a `copy_later` is done: whether its ranges are on the target.
pub type Synced = Box<dyn FnOnce(bool) + Send>;

/// Ranges (offset, length) of one write.
pub type Ranges = SmallVec<[(u64, u64); 1]>;

struct Copier {
    source: Arc<dyn BlockDevice>,
    target: Arc<NbdClient>,
    lock: Arc<Mutex<()>>,
    failed: Mutex<Option<String>>,
}

impl Copier {
    fn copy(&self, ranges: &[(u64, u64)]) -> bool {
        if self.failed.lock().is_some() {
            return false;
        }
        let _copying = self.lock.lock();
        for &(offset, len) in ranges {
            if len == 0 {
                continue;
            }
            let r = copy_range(
                &*self.source,
                &self.target,
                offset,
                len,
                Holes::Zero,
                &|_| {},
            );
            if let Err(e) = r {
                self.failed.lock().get_or_insert(e.to_string());
                return false;
            }
        }
        true
    }
}

pub struct ActiveSync {
    copier: Arc<Copier>,
    /// The copy thread's queue; the thread ends once this is dropped and its queue is empty.
    queue: Mutex<mpsc::Sender<(Ranges, Synced)>>,
}

impl ActiveSync {
    /// Starts copying into `target` (`lock` is the mirror's copy lock, see above).
    pub fn start(
        source: Arc<dyn BlockDevice>,
        target: Arc<NbdClient>,
        lock: Arc<Mutex<()>>,
    ) -> std::io::Result<Arc<ActiveSync>> {
        let copier = Arc::new(Copier {
            source,
            target,
            lock,
            failed: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel::<(Ranges, Synced)>();
        let c = copier.clone();
        std::thread::Builder::new()
            .name("mirror-sync".into())
            .spawn(move || {
                for (ranges, then) in rx {
                    then(c.copy(&ranges));
                }
            })?;
        Ok(Arc::new(ActiveSync {
            copier,
            queue: Mutex::new(tx),
        }))
    }

    /// Copies `[offset, offset + len)` now; whether it is on the target.
    pub fn copy_now(&self, offset: u64, len: u64) -> bool {
        self.copier.copy(&[(offset, len)])
    }

    /// Copies `ranges` on the copy thread, then calls `then` (at once with false if the
    /// thread is gone).
    pub fn copy_later(&self, ranges: Ranges, then: Synced) {
        if let Err(mpsc::SendError((_, then))) = self.queue.lock().send((ranges, then)) {
            then(false);
        }
    }

    /// The target's first error, if a copy failed.
    pub fn failure(&self) -> Option<String> {
        self.copier.failed.lock().clone()
    }
}
