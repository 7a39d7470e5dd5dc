//! The metadata space map's index block: up to 255 bitmap entries in one block.

use crate::engine::pdata::checksum::{self, BlockKind};
use crate::engine::pdata::codec::on_disk;
use crate::engine::pdata::error::FormatError;
use crate::engine::pdata::superblock::BLOCK_SIZE;
use crate::engine::pdata::values::IndexEntry;

on_disk! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct IndexHeader {
        pub csum: u32,
        pub padding: u32,
        pub blocknr: u64,
    }
}

/// Bitmaps one metadata index block can describe.
pub const MAX_METADATA_BITMAPS: usize = 255;

/// Decodes the first `nr_bitmaps` entries of the index block read from `location`.
pub fn decode(
    block: &[u8],
    location: u64,
    nr_bitmaps: u64,
) -> Result<Vec<IndexEntry>, FormatError> {
    if block.len() != BLOCK_SIZE {
        return Err(FormatError::BadLength {
            block: location,
            len: block.len(),
            expected: BLOCK_SIZE,
        });
    }
    checksum::verify(block, BlockKind::Index, location)?;
    if nr_bitmaps > MAX_METADATA_BITMAPS as u64 {
        return Err(FormatError::TooManyBitmaps {
            block: location,
            nr_bitmaps,
            max: MAX_METADATA_BITMAPS as u64,
        });
    }
    let entries = block.get(IndexHeader::SIZE..).unwrap_or(&[]);
    Ok(entries
        .chunks_exact(IndexEntry::SIZE)
        .take(nr_bitmaps as usize)
        .filter_map(IndexEntry::decode)
        .collect())
}

/// Encodes `entries` into a whole index block (checksum and location are sealed later).
pub fn encode(block: &mut [u8], entries: &[IndexEntry]) {
    block.fill(0);
    let body = block.get_mut(IndexHeader::SIZE..).unwrap_or(&mut []);
    for (chunk, e) in body.chunks_exact_mut(IndexEntry::SIZE).zip(entries) {
        e.encode(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_block_holds_255_entries_exactly() {
        assert_eq!(
            IndexHeader::SIZE + MAX_METADATA_BITMAPS * IndexEntry::SIZE,
            BLOCK_SIZE
        );
        let entries: Vec<_> = (0..255u64)
            .map(|i| IndexEntry {
                blocknr: i + 3,
                nr_free: 7,
                none_free_before: 1,
            })
            .collect();
        let mut b = vec![0u8; BLOCK_SIZE];
        encode(&mut b, &entries);
        checksum::seal(&mut b, BlockKind::Index, 1);
        assert_eq!(decode(&b, 1, 255), Ok(entries));
        assert!(decode(&b, 1, 256).is_err());
    }
}
