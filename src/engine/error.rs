use std::io;

/// Why a block device could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("range {offset}+{len} lies outside the device ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    #[error("too many requests in flight on the queue")]
    Busy,
    #[error("the pool is out of data space")]
    NoSpace,
    #[error("thin pool: {0}")]
    Thin(#[source] Box<crate::engine::thin::ThinError>),
    #[error("snapshot: {0}")]
    Cow(#[source] Box<crate::engine::cow::CowError>),
    #[error("host I/O failed at byte {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
}

impl BlockError {
    pub(crate) fn io(offset: u64, source: io::Error) -> Self {
        BlockError::Io { offset, source }
    }
}
