//! The dm-thin superblock (block 0) and the space-map roots it embeds.

use super::checksum::{self, BlockKind};
use super::codec::on_disk;
use super::error::FormatError;

/// Metadata blocks are 4 KiB.
pub const BLOCK_SIZE: usize = 4096;
/// Where the superblock lives.
pub const SUPERBLOCK_LOCATION: u64 = 0;
pub const SUPERBLOCK_MAGIC: u64 = 27_022_010;
/// The version this library writes; it reads 1 and 2.
pub const SUPERBLOCK_VERSION: u32 = 2;
/// Metadata block size in 512-byte sectors.
pub const METADATA_BLOCK_SECTORS: u32 = 8;
/// Superblock flag: the pool needs checking before use.
pub const FLAG_NEEDS_CHECK: u32 = 1;
/// Bytes reserved for each space-map root inside the superblock.
pub const SPACE_MAP_ROOT_SIZE: usize = 128;

on_disk! {
    /// The meaningful first 32 bytes of a space-map root.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct SmRoot {
        pub nr_blocks: u64,
        pub nr_allocated: u64,
        /// Disk space map: root of the index btree. Metadata space map: the index block.
        pub bitmap_root: u64,
        pub ref_count_root: u64,
    }
}

impl SmRoot {
    /// The 128-byte field as written into a superblock (zero after the first 32 bytes).
    pub fn to_field(&self) -> [u8; SPACE_MAP_ROOT_SIZE] {
        let mut out = [0u8; SPACE_MAP_ROOT_SIZE];
        self.encode(&mut out);
        out
    }

    /// Parses a 128-byte field; bytes after the first 32 are ignored (the kernel leaves garbage).
    pub fn from_field(field: &[u8; SPACE_MAP_ROOT_SIZE]) -> SmRoot {
        SmRoot::decode(field).unwrap_or_default()
    }
}

on_disk! {
    /// The superblock exactly as on disk.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct RawSuperblock {
        pub csum: u32,
        pub flags: u32,
        pub blocknr: u64,
        pub uuid: [u8; 16],
        pub magic: u64,
        pub version: u32,
        pub time: u32,
        pub trans_id: u64,
        pub held_root: u64,
        pub data_space_map_root: [u8; SPACE_MAP_ROOT_SIZE],
        pub metadata_space_map_root: [u8; SPACE_MAP_ROOT_SIZE],
        pub data_mapping_root: u64,
        pub device_details_root: u64,
        pub data_block_size: u32,
        pub metadata_block_size: u32,
        pub metadata_nr_blocks: u64,
        pub compat_flags: u32,
        pub compat_ro_flags: u32,
        pub incompat_flags: u32,
    }
}

/// A validated superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub flags: u32,
    pub uuid: [u8; 16],
    pub version: u32,
    pub time: u32,
    pub trans_id: u64,
    /// Root of a held metadata snapshot (a copy of a superblock), 0 if none.
    pub held_root: u64,
    pub data_sm_root: SmRoot,
    pub metadata_sm_root: SmRoot,
    pub data_mapping_root: u64,
    pub device_details_root: u64,
    /// Data block size in 512-byte sectors.
    pub data_block_size: u32,
    pub metadata_nr_blocks: u64,
    pub compat_flags: u32,
    pub compat_ro_flags: u32,
    pub incompat_flags: u32,
}

/// Incompat features this library understands (none).
pub const INCOMPAT_SUPPORTED: u32 = 0;

impl Superblock {
    /// Decodes and validates the superblock read from `location`.
    pub fn decode(block: &[u8], location: u64) -> Result<Superblock, FormatError> {
        if block.len() != BLOCK_SIZE {
            return Err(FormatError::BadLength {
                block: location,
                len: block.len(),
                expected: BLOCK_SIZE,
            });
        }
        checksum::verify(block, BlockKind::Superblock, location)?;
        let raw = RawSuperblock::decode(block).ok_or(FormatError::BadLength {
            block: location,
            len: block.len(),
            expected: RawSuperblock::SIZE,
        })?;
        if raw.magic != SUPERBLOCK_MAGIC {
            return Err(FormatError::BadMagic {
                block: location,
                magic: raw.magic,
            });
        }
        if !(1..=2).contains(&raw.version) {
            return Err(FormatError::BadVersion {
                block: location,
                version: raw.version,
            });
        }
        if raw.metadata_block_size != METADATA_BLOCK_SECTORS {
            return Err(FormatError::BadMetadataBlockSize {
                block: location,
                sectors: raw.metadata_block_size,
            });
        }
        if raw.incompat_flags & !INCOMPAT_SUPPORTED != 0 {
            return Err(FormatError::IncompatFlags {
                block: location,
                flags: raw.incompat_flags,
            });
        }
        Ok(Superblock {
            flags: raw.flags,
            uuid: raw.uuid,
            version: raw.version,
            time: raw.time,
            trans_id: raw.trans_id,
            held_root: raw.held_root,
            data_sm_root: SmRoot::from_field(&raw.data_space_map_root),
            metadata_sm_root: SmRoot::from_field(&raw.metadata_space_map_root),
            data_mapping_root: raw.data_mapping_root,
            device_details_root: raw.device_details_root,
            data_block_size: raw.data_block_size,
            metadata_nr_blocks: raw.metadata_nr_blocks,
            compat_flags: raw.compat_flags,
            compat_ro_flags: raw.compat_ro_flags,
            incompat_flags: raw.incompat_flags,
        })
    }

    /// Encodes into a whole block (zeroing the rest) and seals it for `location`.
    pub fn encode(&self, block: &mut [u8], location: u64) {
        block.fill(0);
        let raw = RawSuperblock {
            csum: 0,
            flags: self.flags,
            blocknr: location,
            uuid: self.uuid,
            magic: SUPERBLOCK_MAGIC,
            version: self.version,
            time: self.time,
            trans_id: self.trans_id,
            held_root: self.held_root,
            data_space_map_root: self.data_sm_root.to_field(),
            metadata_space_map_root: self.metadata_sm_root.to_field(),
            data_mapping_root: self.data_mapping_root,
            device_details_root: self.device_details_root,
            data_block_size: self.data_block_size,
            metadata_block_size: METADATA_BLOCK_SECTORS,
            metadata_nr_blocks: self.metadata_nr_blocks,
            compat_flags: self.compat_flags,
            compat_ro_flags: self.compat_ro_flags,
            incompat_flags: self.incompat_flags,
        };
        raw.encode(block);
        checksum::seal(block, BlockKind::Superblock, location);
    }

    pub fn needs_check(&self) -> bool {
        self.flags & FLAG_NEEDS_CHECK != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            flags: 0,
            uuid: [0; 16],
            version: 2,
            time: 3,
            trans_id: 9,
            held_root: 0,
            data_sm_root: SmRoot {
                nr_blocks: 1024,
                nr_allocated: 5,
                bitmap_root: 4,
                ref_count_root: 5,
            },
            metadata_sm_root: SmRoot {
                nr_blocks: 1024,
                nr_allocated: 12,
                bitmap_root: 1,
                ref_count_root: 2,
            },
            data_mapping_root: 7,
            device_details_root: 6,
            data_block_size: 128,
            metadata_nr_blocks: 1024,
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
        }
    }

    #[test]
    fn raw_superblock_fields_sit_at_documented_offsets() {
        assert_eq!(RawSuperblock::SIZE, 364);
        let mut b = vec![0u8; BLOCK_SIZE];
        sample().encode(&mut b, 0);
        assert_eq!(&b[32..40], &SUPERBLOCK_MAGIC.to_le_bytes());
        assert_eq!(&b[320..328], &7u64.to_le_bytes());
        assert_eq!(&b[336..340], &128u32.to_le_bytes());
        assert_eq!(&b[340..344], &8u32.to_le_bytes());
        assert_eq!(&b[192..200], &1024u64.to_le_bytes());
    }

    #[test]
    fn superblock_round_trips() {
        let mut b = vec![0u8; BLOCK_SIZE];
        sample().encode(&mut b, 0);
        assert_eq!(Superblock::decode(&b, 0), Ok(sample()));
    }

    #[test]
    fn bad_magic_is_reported_with_its_block() {
        let mut b = vec![0u8; BLOCK_SIZE];
        sample().encode(&mut b, 0);
        b[32] ^= 1;
        checksum::seal(&mut b, BlockKind::Superblock, 0);
        assert!(matches!(
            Superblock::decode(&b, 0),
            Err(FormatError::BadMagic { block: 0, .. })
        ));
    }
}
