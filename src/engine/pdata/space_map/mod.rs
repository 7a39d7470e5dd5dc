//! Space maps: reference counts of blocks, 2 bits per block in bitmaps plus a btree for
//! counts above 2.

pub mod bitmap;
pub mod index;
