//! Persistent data in the Linux kernel's dm-thin on-disk format: block manager, transaction
//! manager, space maps and btrees.
//!
//! The byte layout is described in `docs/format.md` and the fixtures' README; every decoder
//! here validates what it reads and reports [`FormatError`]s naming the block.

pub mod check;
pub mod checksum;
pub mod codec;
pub mod error;
pub mod node;
pub mod space_map;
pub mod superblock;
pub mod values;

pub use error::{FormatError, PdataError, Result};
pub mod block_manager;
pub mod btree;
pub mod tm;
