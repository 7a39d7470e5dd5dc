//! Persistent data in the Linux kernel's dm-thin on-disk format: block manager, transaction
//! manager, space maps and btrees.
//!
//! # Format (all little-endian, 4 KiB blocks)
//!
//! Every block but bitmaps' padding carries a checksum at offset 0 (crc32c of bytes 4..4096,
//! inverted, XOR a salt per kind: superblock 160774, node 121107, bitmap 240779, index
//! 160478) and its own block number at offset 8 ([`checksum`]).
//!
//! - [`superblock`]: block 0, magic 27022010, version 2, two 128-byte space-map roots of which
//!   the first 32 bytes mean something (nr_blocks, nr_allocated, bitmap root, ref-count root).
//! - [`node`]: btree nodes: a 32-byte header, `max_entries` keys then `max_entries` values,
//!   `max_entries = 3 * ((4064 / (8 + value_size)) / 3)`. Internal nodes hold child block
//!   numbers; leaves hold [`values`]. Non-root nodes stay at least a third full.
//! - [`space_map`]: 2-bit counts per block in bitmap blocks (entry `i` of a word: bit `2i`
//!   high, `2i+1` low; 3 = "see the ref-count btree"); the data map lists its bitmaps in an
//!   index btree, the metadata map in one index block of up to 255 entries.
//! - The thin pool's trees: device details (dev id -> [`values::DeviceDetails`]) and the
//!   two-level mapping tree (dev id -> subtree root; virtual block -> [`values::BlockTime`]).
//!
//! # Validation
//!
//! Nothing read is trusted. The [`block_manager`] checks checksum and location once per disk
//! read (recorded in the buffer's tag), and for nodes the header invariants and key order;
//! every lookup checks the value size it expects; descent stops at [`btree::MAX_DEPTH`].
//! Errors are [`FormatError`]s naming the block.
//!
//! # Transactions and commit
//!
//! The [`tm::TransactionManager`] never writes a block the last commit can reach: it shadows
//! (copies) such blocks, and a block freed in a transaction is not reused until the
//! transaction commits. The metadata space map keeps its counts in memory, so allocating
//! while it updates itself needs no recursion; it is written out at pre-commit, relocating
//! its own bitmaps and index block until nothing more changes. Commit order:
//!
//! 1. the caller commits the data space map ([`space_map::DiskSpaceMap::commit`]),
//! 2. [`tm::TransactionManager::pre_commit`] writes the metadata space map,
//! 3. [`tm::TransactionManager::commit`] writes every dirty block and flushes, then writes
//!    the superblock and flushes again.
//!
//! A power cut anywhere leaves either the old superblock (and everything it reaches,
//! untouched) or the new one (and everything it reaches, flushed before it).
//!
//! # Concurrency
//!
//! [`block_manager::BlockManager`] is shared (`Arc`) and lookups take `&BlockManager`, so
//! readers walk the last commit's roots while one writer runs a transaction. Blocks the
//! last commit reaches are not changed until a later transaction reuses them after the next
//! commit: readers must move to the new roots at each commit. [`tm::NonBlocking`] looks up
//! without I/O and reports [`PdataError::WouldBlock`] instead.

pub mod block_manager;
pub mod btree;
pub mod check;
pub mod checksum;
pub mod codec;
pub mod error;
pub mod node;
pub mod space_map;
pub mod superblock;
pub mod tm;
pub mod values;

pub use block_manager::BlockManager;
pub use error::{FormatError, PdataError, Result};
pub use space_map::{DiskSpaceMap, MetadataSpaceMap, SpaceMap};
pub use superblock::{SmRoot, Superblock};
pub use tm::TransactionManager;
