//! Space-map bitmap blocks: a 16-byte header then 2 bits per block.
//!
//! Within each little-endian u64 word, entry `i` uses bit `2i` as the HIGH bit and bit `2i+1`
//! as the LOW bit of its count. A count of 3 means "look in the ref-count btree".

use crate::engine::pdata::codec::{on_disk, u64_at};
use crate::engine::pdata::superblock::BLOCK_SIZE;

on_disk! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct BitmapHeader {
        pub csum: u32,
        pub not_used: u32,
        pub blocknr: u64,
    }
}

pub const BITMAP_HEADER_SIZE: usize = BitmapHeader::SIZE;
/// Blocks described by one bitmap block.
pub const ENTRIES_PER_BITMAP: u64 = ((BLOCK_SIZE - BITMAP_HEADER_SIZE) * 4) as u64;
/// The 2-bit value meaning "count is in the ref-count btree".
pub const OVERFLOW: u8 = 3;

fn word_pos(entry: u64) -> (usize, u32) {
    let word = BITMAP_HEADER_SIZE + 8 * (entry / 32) as usize;
    let shift = 2 * (entry % 32) as u32;
    (word, shift)
}

/// The 2-bit count of `entry` (0..=3); 0 if beyond the block.
pub fn get(block: &[u8], entry: u64) -> u8 {
    let (at, shift) = word_pos(entry);
    let Some(w) = u64_at(block, at) else { return 0 };
    let high = (w >> shift) & 1;
    let low = (w >> (shift + 1)) & 1;
    ((high << 1) | low) as u8
}

/// Sets the 2-bit count of `entry` (values above 3 are stored as 3).
pub fn set(block: &mut [u8], entry: u64, value: u8) {
    let (at, shift) = word_pos(entry);
    let Some(bytes) = block.get_mut(at..at + 8) else {
        return;
    };
    let Ok(arr) = <[u8; 8]>::try_from(&*bytes) else {
        return;
    };
    let mut w = u64::from_le_bytes(arr);
    let v = u64::from(value.min(OVERFLOW));
    w &= !(3u64 << shift);
    w |= ((v >> 1) & 1) << shift;
    w |= (v & 1) << (shift + 1);
    bytes.copy_from_slice(&w.to_le_bytes());
}

/// Decodes the first `n` 2-bit entries.
pub fn decode_entries(block: &[u8], n: u64) -> Vec<u8> {
    let n = n.min(ENTRIES_PER_BITMAP);
    let mut out = Vec::with_capacity(n as usize);
    let words = block.get(BITMAP_HEADER_SIZE..).unwrap_or(&[]);
    for chunk in words.chunks_exact(8) {
        let Ok(arr) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let w = u64::from_le_bytes(arr);
        for j in 0..32 {
            if out.len() as u64 >= n {
                return out;
            }
            let high = (w >> (2 * j)) & 1;
            let low = (w >> (2 * j + 1)) & 1;
            out.push(((high << 1) | low) as u8);
        }
    }
    out
}

/// Finds the first entry in `[from, to)` whose count is 0.
pub fn find_free(block: &[u8], from: u64, to: u64) -> Option<u64> {
    let to = to.min(ENTRIES_PER_BITMAP);
    let mut e = from;
    while e < to {
        let (at, shift) = word_pos(e);
        let w = u64_at(block, at)?;
        if shift == 0 && e + 32 <= to && w == u64::MAX {
            e += 32;
            continue;
        }
        if (w >> shift) & 3 == 0 {
            return Some(e);
        }
        e += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_per_bitmap_is_16320() {
        assert_eq!(ENTRIES_PER_BITMAP, 16320);
    }

    #[test]
    fn entry_uses_even_bit_as_high_bit() {
        let mut b = vec![0u8; BLOCK_SIZE];
        set(&mut b, 0, 2);
        assert_eq!(b[16], 0b01);
        set(&mut b, 1, 1);
        assert_eq!(b[16], 0b1001);
        assert_eq!(get(&b, 0), 2);
        assert_eq!(get(&b, 1), 1);
        set(&mut b, 33, 3);
        assert_eq!(get(&b, 33), 3);
        assert_eq!(decode_entries(&b, 34)[33], 3);
        assert_eq!(find_free(&b, 0, 100), Some(2));
        assert_eq!(get(&b, ENTRIES_PER_BITMAP + 5), 0);
    }
}
