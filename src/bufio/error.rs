//! Errors of the metadata block cache. Every variant that concerns one block names it, so a
//! failing commit can say which metadata block the device refused.

use std::io;

/// What went wrong in the block cache.
#[derive(Debug, thiserror::Error)]
pub enum BufioError {
    /// The metadata device failed to read or write this block.
    #[error("I/O error on metadata block {block}")]
    Io {
        block: u64,
        #[source]
        source: io::Error,
    },
    /// The metadata device failed to flush its write cache.
    #[error("flushing the metadata device failed")]
    Flush {
        #[source]
        source: io::Error,
    },
    /// A flush failed earlier. Blocks written since the last good flush may or may not be
    /// durable, and a retried flush can succeed without them (the kernel drops pages whose
    /// write-back failed), so this cache will not vouch for durability again. Reopen the pool.
    #[error("an earlier flush of the metadata device failed; refusing to commit again")]
    Poisoned,
    /// The block lies past the end of the metadata device.
    #[error("metadata block {block} is past the end of the device ({nr_blocks} blocks)")]
    OutOfRange { block: u64, nr_blocks: u64 },
    /// Every cached buffer is in use, so nothing can be evicted to make room.
    #[error("metadata cache is full: every buffer is in use")]
    CacheFull,
}

/// Shorthand used throughout the cache.
pub type Result<T> = std::result::Result<T, BufioError>;
