use crate::engine::BlockError;

/// Why a snapshot store or a COW device could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    #[error("chunk size {0} is not a power of two from 4 KiB to 512 KiB")]
    BadChunkSize(u64),
    #[error("not a snapshot store: chunk 0 holds magic {0:#010x}, not \"SnAp\"")]
    NotAStore(u32),
    #[error("snapshot store version {0} is not supported (only 1)")]
    BadVersion(u32),
    #[error("the store's chunk size is {found} bytes, not the {asked} asked for")]
    ChunkSizeMismatch { found: u64, asked: u64 },
    #[error("the store ({size} bytes) is too small for chunks of {chunk} bytes")]
    TooSmall { size: u64, chunk: u64 },
    #[error("corrupt store: metadata area {area}, entry {index}: {why}")]
    Corrupt {
        area: u64,
        index: u64,
        why: &'static str,
    },
    #[error("the snapshot store is full")]
    Full,
    #[error("the snapshot is invalid: its store filled up or failed")]
    Invalid,
    #[error("a merge of this snapshot is already running")]
    MergeRunning,
    #[error("the merge target ({target} bytes) is smaller than the snapshot ({size} bytes)")]
    MergeTarget { target: u64, size: u64 },
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot store I/O: {0}")]
    Io(#[source] Box<BlockError>),
}

impl From<BlockError> for CowError {
    fn from(e: BlockError) -> Self {
        CowError::Io(Box::new(e))
    }
}

impl From<CowError> for BlockError {
    fn from(e: CowError) -> Self {
        match e {
            CowError::Io(inner) => *inner,
            e => BlockError::Cow(Box::new(e)),
        }
    }
}
