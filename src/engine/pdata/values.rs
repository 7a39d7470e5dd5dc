//! Values stored in btree leaves.

use std::fmt::Debug;

use super::codec::{on_disk, LeField};

/// A fixed-size value kept in btree leaves.
pub trait Value: Sized + Copy + Debug + PartialEq {
    /// Bytes on disk.
    const SIZE: usize;
    /// Decodes from the first `SIZE` bytes; `None` if too short.
    fn unpack(bytes: &[u8]) -> Option<Self>;
    /// Encodes into the first `SIZE` bytes of `out`.
    fn pack(&self, out: &mut [u8]);
}

impl Value for u64 {
    const SIZE: usize = 8;
    fn unpack(bytes: &[u8]) -> Option<Self> {
        <u64 as LeField>::get(bytes)
    }
    fn pack(&self, out: &mut [u8]) {
        LeField::put(self, out)
    }
}

impl Value for u32 {
    const SIZE: usize = 4;
    fn unpack(bytes: &[u8]) -> Option<Self> {
        <u32 as LeField>::get(bytes)
    }
    fn pack(&self, out: &mut [u8]) {
        LeField::put(self, out)
    }
}

/// Bits of a mapping value that hold the time.
pub const TIME_BITS: u32 = 24;

/// A thin mapping: the data block and the pool time at which it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockTime {
    pub block: u64,
    /// 24 bits on disk.
    pub time: u32,
}

impl BlockTime {
    pub fn to_raw(self) -> u64 {
        (self.block << TIME_BITS) | u64::from(self.time & ((1 << TIME_BITS) - 1))
    }
    pub fn from_raw(v: u64) -> BlockTime {
        BlockTime {
            block: v >> TIME_BITS,
            time: (v & ((1 << TIME_BITS) - 1)) as u32,
        }
    }
}

impl Value for BlockTime {
    const SIZE: usize = 8;
    fn unpack(bytes: &[u8]) -> Option<Self> {
        <u64 as LeField>::get(bytes).map(BlockTime::from_raw)
    }
    fn pack(&self, out: &mut [u8]) {
        LeField::put(&self.to_raw(), out)
    }
}

on_disk! {
    /// Per-thin-device details, the value of the device details tree.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct DeviceDetails {
        pub mapped_blocks: u64,
        pub transaction_id: u64,
        pub creation_time: u32,
        pub snapshotted_time: u32,
    }
}

impl Value for DeviceDetails {
    const SIZE: usize = DeviceDetails::SIZE;
    fn unpack(bytes: &[u8]) -> Option<Self> {
        DeviceDetails::decode(bytes)
    }
    fn pack(&self, out: &mut [u8]) {
        self.encode(out)
    }
}

on_disk! {
    /// One bitmap's entry in a space-map index.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct IndexEntry {
        pub blocknr: u64,
        pub nr_free: u32,
        pub none_free_before: u32,
    }
}

impl Value for IndexEntry {
    const SIZE: usize = IndexEntry::SIZE;
    fn unpack(bytes: &[u8]) -> Option<Self> {
        IndexEntry::decode(bytes)
    }
    fn pack(&self, out: &mut [u8]) {
        self.encode(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_value_packs_block_above_24_bits_of_time() {
        let bt = BlockTime { block: 48, time: 1 };
        assert_eq!(bt.to_raw(), (48 << 24) | 1);
        let mut b = [0u8; 8];
        bt.pack(&mut b);
        assert_eq!(BlockTime::unpack(&b), Some(bt));
    }

    #[test]
    fn device_details_are_24_bytes() {
        assert_eq!(<DeviceDetails as Value>::SIZE, 24);
        assert_eq!(<IndexEntry as Value>::SIZE, 16);
        assert_eq!(DeviceDetails::unpack(&[0u8; 23]), None);
    }
}
