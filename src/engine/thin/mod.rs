//! Thin provisioning: a pool of data blocks shared by thin devices, in dm-thin's format.

pub mod error;
pub mod metadata;

pub use error::{Result, ThinError};
pub use metadata::{Lookup, MappedRange, PoolMetadata};

#[cfg(test)]
mod metadata_tests;
