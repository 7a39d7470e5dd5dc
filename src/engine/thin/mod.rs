//! Thin provisioning: a pool of data blocks shared by thin devices, in dm-thin's format.

pub mod catalog;
pub mod device;
pub mod error;
mod gate;
pub mod metadata;
mod metadata_snap;
pub mod pool;
mod prison;
mod provision;
pub mod query;
pub mod quiesce;
pub mod volumes;

pub use device::ThinDevice;
pub use error::{Result, ThinError};
pub use metadata::{Lookup, MappedRange, PoolMetadata};
pub use pool::{
    CommitTimes, Pool, PoolEvent, PoolGeometry, PoolMode, PoolOpenError, PoolOptions, ResizeError,
};
pub use query::{DeltaKind, DeltaRun};
pub use volumes::{DiskInfo, SnapshotTiming, VolumeError, Volumes};
