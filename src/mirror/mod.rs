//! The mirror: copying a live thin disk into another server's NBD export (issue 15's
//! "Mirror" part). Built so far:
//!
//! - `dirty.rs`: `DirtyMap`, granules written since they were last copied (lock-free marks
//!   from the write path, runs taken by the copier).
//! - `hook.rs`: `WriteHook`, the node's write path marking the dirty map (once a write's
//!   data is written) and refusing writes after a switchover.
//! - `copy.rs`: `copy_range`, a range of a device into an `NbdClient`: data read and written
//!   with several writes in flight, holes as WRITE_ZEROES that may stay holes; `CopyStream`,
//!   ranges copied one after another without waiting in between.
//! - `reads.rs`: `QueuedReads`, a stream's source reads through the device's own I/O queue,
//!   several in flight within a window of bytes; `sender.rs`: `PieceSender`, the stream's
//!   thread sending the pieces read to the target.
//! - `active.rs`: `ActiveSync`, write-blocking once ready: a write's range copied to the
//!   target before the write completes.
//! - `job.rs`: `Mirror::run`, the body of a `thin-mirror` job: first pass, dirty passes
//!   until ready, switchover on `job-complete`.
//!
//! The NBD client is `nbd::client`; the QEMU-style job layer `daemon::jobs`. What is left
//! to make `thin-mirror` (the job body, the write-path hook, switchover) is listed in
//! docs/mirror.md.

pub mod active;
pub mod copy;
pub mod dirty;
pub mod hook;
pub mod job;
pub(crate) mod reads;
mod sender;
#[cfg(test)]
mod tests;

pub use active::ActiveSync;
pub use copy::{copy_range, Copied, Holes, TARGET_IN_FLIGHT};
pub use dirty::DirtyMap;
pub use hook::WriteHook;
pub use job::{Mirror, SyncMode};

use crate::engine::BlockError;
use crate::nbd::client::{ClientError, ReplyError};

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("reading the source: {0}")]
    Source(String),
    #[error("mirror target: {0}")]
    Target(#[from] ClientError),
    #[error("mirror target: {0}")]
    Reply(#[from] ReplyError),
    /// A guest write's copy to the target failed once the mirror was write-blocking.
    #[error("mirror target, copying a guest write: {0}")]
    Active(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<BlockError> for MirrorError {
    fn from(e: BlockError) -> Self {
        MirrorError::Source(e.to_string())
    }
}
