//! Growing a running pool (QMP `pool-resize`): the data device, the metadata device, or both.
//! Never shrinks.

use super::*;
use crate::engine::BlockError;

/// Why a resize was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("cannot shrink the {what} device from {from} to {to} bytes")]
    Shrink {
        what: &'static str,
        from: u64,
        to: u64,
    },
    #[error("growing the data device: {0}")]
    Data(#[source] BlockError),
    #[error("growing the metadata device: {0}")]
    Metadata(#[source] ThinError),
}

/// Bytes of a metadata block.
const METADATA_BLOCK: u64 = 4096;

impl Pool {
    /// How long commits have taken.
    pub fn commit_times(&self) -> CommitTimes {
        self.commit_stats.get()
    }

    /// Grows the data device to `bytes` (whole blocks), or with `None` takes up whatever the
    /// device has grown to underneath. Writes waiting for space go on at once.
    pub fn resize_data(&self, bytes: Option<u64>) -> Result<(), ResizeError> {
        let now = self.meta.read().data_dev_size() * self.block_size;
        if let Some(to) = bytes.filter(|&b| b / self.block_size * self.block_size < now) {
            return Err(ResizeError::Shrink {
                what: "data",
                from: now,
                to,
            });
        }
        self.grow_data(bytes.unwrap_or(0))
            .map_err(ResizeError::Data)
    }

    /// Grows the metadata device to `bytes` (whole 4 KiB blocks; a block device must already
    /// be that big). The metadata low-water event is armed again.
    pub fn resize_metadata(&self, bytes: u64) -> Result<(), ResizeError> {
        let now = self.meta.read().metadata_dev_size();
        let nr = bytes / METADATA_BLOCK;
        if nr < now {
            return Err(ResizeError::Shrink {
                what: "metadata",
                from: now * METADATA_BLOCK,
                to: bytes,
            });
        }
        if nr == now {
            return Ok(());
        }
        self.change(|m| m.resize_metadata_dev(nr))
            .map_err(ResizeError::Metadata)
    }
}
