//! The guest's write-cache mode (the config space's `writeback` byte, virtio 1.2 5.2.6): what
//! the guest set, kept for as long as its frontend remembers it.
//!
//! A driver that switched its disk to write-through (Linux: `cache_type`) sends no flushes and
//! expects every completed write to be durable. QEMU tells the backend once, with SET_CONFIG,
//! and then answers the guest from its own copy (`s->blkcfg` in hw/block/vhost-user-blk.c),
//! which it keeps:
//! - across a backend restart: a reconnect sends no SET_CONFIG (and no GET_CONFIG), only the
//!   inflight region it kept (SET_INFLIGHT_FD) and the rings;
//! - across a device reset (guest reboot): its reset only frees the inflight region, so the
//!   rebooted guest reads the mode it set before;
//! - across SET_FEATURES, which it sends again at every start and whenever dirty logging is
//!   switched (migration).
//!
//! So the mode here changes only when the guest writes it, and it is kept where QEMU keeps its
//! state for the backend: the device-state bytes of the inflight region (`inflight.rs`). A
//! region handed over on a reconnect brings the mode back; a fresh region (a new VM, or the
//! one QEMU asks for after a reset) is given the mode this process holds. A new frontend's
//! connection starts from the default, writeback, which is what a new VM reads in GET_CONFIG
//! when QEMU realizes the device.
//!
//! What this cannot keep: a mode set by a guest whose frontend never set up an inflight region
//! (no INFLIGHT_SHMFD, e.g. libblkio), or a backend killed between a guest reset and its
//! driver's next start (the region is gone then); those frontends start from writeback again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::info;
use parking_lot::Mutex;

use super::inflight::InflightRegion;

/// One export's write-cache mode and the region that keeps it for the next process.
pub struct CacheMode {
    writeback: AtomicBool,
    /// The connected frontend's inflight region, if it has one.
    kept: Mutex<Option<Arc<InflightRegion>>>,
}

impl Default for CacheMode {
    fn default() -> Self {
        CacheMode {
            writeback: AtomicBool::new(true),
            kept: Mutex::new(None),
        }
    }
}

fn name(writeback: bool) -> &'static str {
    if writeback {
        "writeback"
    } else {
        "write-through"
    }
}

impl CacheMode {
    /// Whether the guest lets completed writes sit in a volatile cache until it flushes.
    #[inline]
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Acquire)
    }

    /// The guest wrote the `writeback` byte. Kept in the region before the frontend's
    /// SET_CONFIG is answered, so a process killed right after still has it.
    pub fn set(&self, writeback: bool) {
        let kept = self.kept.lock();
        self.writeback.store(writeback, Ordering::Release);
        let saved = kept.as_ref().is_some_and(|r| r.save_writeback(writeback));
        info!(
            "guest set the write cache to {}{}",
            name(writeback),
            if saved {
                " (kept in the frontend's inflight region)"
            } else {
                ""
            }
        );
    }

    /// A region arrived (GET_INFLIGHT_FD or SET_INFLIGHT_FD): the mode it keeps, if a backend
    /// wrote one there, is the guest's; a fresh region is given this process's.
    pub fn attach(&self, region: &Arc<InflightRegion>) {
        let mut kept = self.kept.lock();
        match region.saved_writeback() {
            Some(writeback) => {
                if writeback != self.writeback() {
                    info!(
                        "write cache {}, as the guest set it before the reconnect",
                        name(writeback)
                    );
                }
                self.writeback.store(writeback, Ordering::Release);
            }
            None => {
                region.save_writeback(self.writeback());
            }
        }
        *kept = Some(region.clone());
    }

    /// The frontend went away (everything it had in flight is complete): the next frontend
    /// starts from the default unless its region says otherwise.
    pub fn detach(&self) {
        let mut kept = self.kept.lock();
        *kept = None;
        self.writeback.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::vhost::inflight::{region_size, DEVICE_STATE_LEN};

    fn region() -> (Arc<InflightRegion>, std::fs::File) {
        let (r, f) = InflightRegion::create(1, 8, 16, 1024).unwrap();
        (Arc::new(r), f)
    }

    fn reopen(file: &std::fs::File, size: usize) -> Arc<InflightRegion> {
        Arc::new(InflightRegion::open(file, size as u64, 0, (1, 8), (16, 1024)).unwrap())
    }

    #[test]
    fn the_mode_survives_the_process_in_the_frontends_region() {
        let first = CacheMode::default();
        let (r, file) = region();
        first.attach(&r);
        assert!(first.writeback(), "a fresh region gets the default");
        first.set(false);
        // Killed: the next process gets the fd back.
        let next = CacheMode::default();
        assert!(next.writeback());
        next.attach(&reopen(&file, region_size(1, 8) + DEVICE_STATE_LEN));
        assert!(!next.writeback(), "write-through, as the guest left it");
        next.set(true);
        let third = CacheMode::default();
        third.attach(&reopen(&file, region_size(1, 8) + DEVICE_STATE_LEN));
        assert!(third.writeback());
    }

    #[test]
    fn a_mode_set_before_the_region_goes_into_it_and_a_new_frontend_starts_from_writeback() {
        let mode = CacheMode::default();
        mode.set(false);
        let (r, file) = region();
        mode.attach(&r);
        assert!(
            !mode.writeback(),
            "a fresh region takes the mode, not the other way"
        );
        assert_eq!(
            reopen(&file, region_size(1, 8) + DEVICE_STATE_LEN).saved_writeback(),
            Some(false)
        );
        mode.detach();
        assert!(mode.writeback());
    }

    #[test]
    fn a_region_without_device_state_keeps_nothing() {
        let mode = CacheMode::default();
        let (_, file) = region();
        // The frontend hands back only the queues' bytes (as for a region of an older thinblk).
        let short = reopen(&file, region_size(1, 8));
        assert_eq!(short.saved_writeback(), None);
        mode.attach(&short);
        mode.set(false);
        assert_eq!(short.saved_writeback(), None);
        let next = CacheMode::default();
        next.attach(&reopen(&file, region_size(1, 8)));
        assert!(next.writeback());
    }
}
