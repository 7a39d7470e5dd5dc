//! Errors of the persistent-data layer.
//!
//! [`FormatError`] says what was wrong with the bytes of one block; [`PdataError`] is what every
//! operation of this layer returns.

use thiserror::Error;

/// A block whose bytes break a rule of the on-disk format. Every variant names the block.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("block {block}: buffer is {len} bytes, expected {expected}")]
    BadLength {
        block: u64,
        len: usize,
        expected: usize,
    },
    #[error("block {block}: {kind} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        block: u64,
        kind: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("block {block}: {kind} says it is block {stored}")]
    WrongLocation {
        block: u64,
        kind: &'static str,
        stored: u64,
    },
    #[error("block {block}: superblock magic {magic} is not 27022010")]
    BadMagic { block: u64, magic: u64 },
    #[error("block {block}: unsupported superblock version {version}")]
    BadVersion { block: u64, version: u32 },
    #[error("block {block}: metadata block size {sectors} sectors is not 8")]
    BadMetadataBlockSize { block: u64, sectors: u32 },
    #[error("block {block}: unsupported incompat flags {flags:#x}")]
    IncompatFlags { block: u64, flags: u32 },
    #[error("block {block}: btree node flags {flags:#x} are neither internal nor leaf")]
    BadNodeFlags { block: u64, flags: u32 },
    #[error("block {block}: btree node max_entries {max_entries} is not a multiple of 3 or does not fit value size {value_size}")]
    BadMaxEntries {
        block: u64,
        max_entries: u32,
        value_size: u32,
    },
    #[error("block {block}: btree node nr_entries {nr_entries} exceeds max_entries {max_entries}")]
    TooManyEntries {
        block: u64,
        nr_entries: u32,
        max_entries: u32,
    },
    #[error("block {block}: btree node value size {found}, expected {expected}")]
    BadValueSize {
        block: u64,
        found: u32,
        expected: u32,
    },
    #[error("block {block}: btree keys not strictly increasing at entry {index}")]
    KeysOutOfOrder { block: u64, index: usize },
    #[error("block {block}: btree node is empty but not a root leaf")]
    EmptyNode { block: u64 },
    #[error(
        "block {block}: btree node has {nr_entries} entries, fewer than a third of {max_entries}"
    )]
    Underfull {
        block: u64,
        nr_entries: u32,
        max_entries: u32,
    },
    #[error("block {block}: btree deeper than {max} levels (cycle?)")]
    TooDeep { block: u64, max: usize },
    #[error("block {block}: key {key} outside the range given by its parent")]
    KeyOutOfRange { block: u64, key: u64 },
    #[error("block {block}: leaves at different depths")]
    UnevenLeaves { block: u64 },
    #[error("block {block}: reference to block {target} beyond the device ({nr_blocks} blocks)")]
    OutOfBounds {
        block: u64,
        target: u64,
        nr_blocks: u64,
    },
    #[error("block {block}: space map root is inconsistent: {what}")]
    BadSpaceMapRoot { block: u64, what: &'static str },
    #[error("block {block}: space map index has {nr_bitmaps} bitmaps, more than {max}")]
    TooManyBitmaps {
        block: u64,
        nr_bitmaps: u64,
        max: u64,
    },
}

/// What an operation of the persistent-data layer can fail with.
#[derive(Debug, Error)]
pub enum PdataError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("metadata block cache")]
    Bufio(#[from] crate::bufio::BufioError),
    /// A non-blocking lookup needed a block that is not in the cache.
    #[error("lookup would block on block {block}")]
    WouldBlock { block: u64 },
    #[error("no free blocks in the {0} space map")]
    NoSpace(&'static str),
    #[error("block {block} is beyond the {what} space map ({nr_blocks} blocks)")]
    BlockOutOfRange {
        what: &'static str,
        block: u64,
        nr_blocks: u64,
    },
    #[error("reference count of block {block} in the {what} space map would drop below zero")]
    CountUnderflow { what: &'static str, block: u64 },
    #[error("reference count of block {block} in the {what} space map would overflow")]
    CountOverflow { what: &'static str, block: u64 },
    #[error("cannot shrink the {what} space map from {from} to {to} blocks")]
    CannotShrink {
        what: &'static str,
        from: u64,
        to: u64,
    },
    #[error("multi-level key has {found} parts, the tree has {levels} levels")]
    BadKeyLength { found: usize, levels: usize },
    #[error("block {block} has no references and cannot be shadowed")]
    UnreferencedBlock { block: u64 },
    #[error("commit called with space-map changes not written by pre_commit")]
    CommitWithoutPreCommit,
    #[error("the transaction manager is read-only after an earlier failure")]
    ReadOnly,
}

pub type Result<T, E = PdataError> = std::result::Result<T, E>;
