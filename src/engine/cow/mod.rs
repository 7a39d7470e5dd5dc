//! Snapshots of an external origin: the classic dm-snapshot exception store (old chunk ->
//! new chunk) and a writable COW device over a read-only origin.
//!
//! - `format.rs`: dm-snapshot's persistent on-disk layout (header, metadata areas, pairs).
//! - `runs.rs`: the exceptions in memory, as runs of consecutive chunks.
//! - `store.rs`: the store interface; `persistent.rs` and `transient.rs` implement it.
//! - `device.rs`: the `BlockDevice`; `merge.rs` folds exceptions into the origin;
//!   `status.rs` reports; `open.rs` opens one from files.

mod device;
mod error;
pub mod format;
mod merge;
mod open;
mod persistent;
pub mod runs;
mod status;
mod store;
mod transient;

pub use device::{CowDevice, CowEvent, CowEventSink, COMMIT_EVERY};
pub use error::CowError;
pub use merge::MergeReport;
pub use open::{merge_offline, open_cow, store_size_for, CowFiles, CowOptions};
pub use persistent::PersistentStore;
pub use runs::ExceptionTable;
pub use status::{CowStatus, MergeState};
pub use store::{ExceptionStore, Opened, Usage};
pub use transient::TransientStore;
