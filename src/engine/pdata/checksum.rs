//! Block checksums: crc32c over bytes 4.. of the block, inverted, XORed with a per-kind salt.
//! Every checksummed block stores the checksum at offset 0 and its own block number at 8.

use super::codec::{u32_at, u64_at};
use super::error::FormatError;

/// What a metadata block holds: decides the checksum salt and how it is validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    Superblock,
    Node,
    Bitmap,
    Index,
}

impl BlockKind {
    pub const fn salt(self) -> u32 {
        match self {
            BlockKind::Superblock => 160_774,
            BlockKind::Node => 121_107,
            BlockKind::Bitmap => 240_779,
            BlockKind::Index => 160_478,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            BlockKind::Superblock => "superblock",
            BlockKind::Node => "btree node",
            BlockKind::Bitmap => "bitmap",
            BlockKind::Index => "space map index",
        }
    }

    /// The buffer tag meaning "validated as this kind" (0 means "not validated").
    pub const fn tag(self) -> u32 {
        match self {
            BlockKind::Superblock => 1,
            BlockKind::Node => 2,
            BlockKind::Bitmap => 3,
            BlockKind::Index => 4,
        }
    }
}

/// Offset of the stored checksum.
pub const CSUM_OFFSET: usize = 0;
/// Offset of the stored block number.
pub const BLOCKNR_OFFSET: usize = 8;

/// The checksum of `block` (all of it, checksum field included in length but not in the sum).
pub fn checksum(block: &[u8], salt: u32) -> u32 {
    let body = block.get(4..).unwrap_or(&[]);
    (crc32c::crc32c(body) ^ 0xffff_ffff) ^ salt
}

/// Checks the stored checksum and block number of a block read from `location`.
pub fn verify(block: &[u8], kind: BlockKind, location: u64) -> Result<(), FormatError> {
    let stored = u32_at(block, CSUM_OFFSET).ok_or(FormatError::BadLength {
        block: location,
        len: block.len(),
        expected: 4096,
    })?;
    let computed = checksum(block, kind.salt());
    if stored != computed {
        return Err(FormatError::BadChecksum {
            block: location,
            kind: kind.name(),
            stored,
            computed,
        });
    }
    let blocknr = u64_at(block, BLOCKNR_OFFSET).ok_or(FormatError::BadLength {
        block: location,
        len: block.len(),
        expected: 4096,
    })?;
    if blocknr != location {
        return Err(FormatError::WrongLocation {
            block: location,
            kind: kind.name(),
            stored: blocknr,
        });
    }
    Ok(())
}

/// Stores `location` and then the checksum into `block`: the last step before it is written.
pub fn seal(block: &mut [u8], kind: BlockKind, location: u64) {
    if let Some(b) = block.get_mut(BLOCKNR_OFFSET..BLOCKNR_OFFSET + 8) {
        b.copy_from_slice(&location.to_le_bytes());
    }
    let csum = checksum(block, kind.salt());
    if let Some(b) = block.get_mut(CSUM_OFFSET..CSUM_OFFSET + 4) {
        b.copy_from_slice(&csum.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_block_verifies_at_its_location_only() {
        let mut b = vec![0u8; 4096];
        b[100] = 42;
        seal(&mut b, BlockKind::Node, 17);
        assert_eq!(verify(&b, BlockKind::Node, 17), Ok(()));
        assert!(matches!(
            verify(&b, BlockKind::Node, 18),
            Err(FormatError::WrongLocation { .. })
        ));
        assert!(matches!(
            verify(&b, BlockKind::Bitmap, 17),
            Err(FormatError::BadChecksum { .. })
        ));
        b[200] ^= 1;
        assert!(matches!(
            verify(&b, BlockKind::Node, 17),
            Err(FormatError::BadChecksum { .. })
        ));
    }

    #[test]
    fn short_buffer_is_an_error_not_a_panic() {
        assert!(verify(&[1, 2], BlockKind::Node, 0).is_err());
        let mut tiny = [0u8; 3];
        seal(&mut tiny, BlockKind::Node, 1);
    }
}
