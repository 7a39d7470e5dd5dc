//! Thin provisioning: a pool of data blocks shared by thin devices, in dm-thin's format.

pub mod catalog;
pub mod device;
pub mod error;
mod gate;
pub mod metadata;
pub mod pool;
mod prison;
pub mod thin_pool;

pub use device::ThinDevice;
pub use error::{Result, ThinError};
pub use metadata::{Lookup, MappedRange, PoolMetadata};
pub use pool::{Pool, PoolEvent, PoolGeometry, PoolMode, PoolOpenError, PoolOptions};
pub use thin_pool::{DiskInfo, ThinPool, VolumeError};

#[cfg(test)]
mod metadata_tests;
