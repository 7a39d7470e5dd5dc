//! A failed data flush is sticky.
//!
//! Linux reports a writeback error once per file description: after a failed fsync the pages
//! that could not be written may be marked clean and forgotten, and the next fsync succeeds.
//! A device that says "durable" after that lies, so once any flush of it failed (through
//! its synchronous method or through a ring), every later flush fails.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::error;

use crate::engine::BlockError;

/// Whether a data flush of one device ever failed.
#[derive(Debug, Default)]
pub struct FlushState {
    failed: AtomicBool,
}

impl FlushState {
    /// `Err` once a flush has failed.
    pub fn check(&self) -> Result<(), BlockError> {
        if self.failed.load(Ordering::Acquire) {
            Err(BlockError::io(
                0,
                io::Error::other("an earlier flush of this device failed"),
            ))
        } else {
            Ok(())
        }
    }

    /// Records how a flush ended, and fails it if an earlier one (or this one) failed.
    pub fn record(&self, result: io::Result<()>) -> Result<(), BlockError> {
        match result {
            Ok(()) => self.check(),
            Err(e) => {
                if !self.failed.swap(true, Ordering::AcqRel) {
                    error!("flush failed; every later flush of this device fails: {e}");
                }
                Err(BlockError::io(0, e))
            }
        }
    }
}

/// A host file whose fdatasync makes every completed write of a device durable, and where
/// the outcome is recorded.
#[derive(Clone, Debug)]
pub struct FlushFd {
    pub fd: RawFd,
    pub state: Arc<FlushState>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_failed_flush_every_later_one_fails_even_if_the_host_says_ok() {
        let s = FlushState::default();
        assert!(s.record(Ok(())).is_ok());
        assert!(s.check().is_ok());
        assert!(s
            .record(Err(io::Error::from_raw_os_error(libc::EIO)))
            .is_err());
        assert!(s.record(Ok(())).is_err(), "the second fsync succeeded");
        assert!(s.check().is_err());
    }
}
