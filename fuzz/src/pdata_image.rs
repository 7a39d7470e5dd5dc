//! Whole metadata images: opened and walked by `pdata::check::check_pool`, which must report
//! problems, never panic, and never loop.
//!
//! Input: a mode byte, then
//! - mode bit 0 clear: edits to a small committed pool ([`super::pool_image`]), each a block
//!   number (u8), an offset (u16) and an op (u8): below 0x80, that many literal bytes follow;
//!   otherwise one u64 follows and is written to `(op & 0x3f) + 1` consecutive u64 slots,
//!   incremented from slot to slot if op bit 0x40 is set (btree keys, runs of children);
//! - mode bit 0 set: the image itself, up to 16 blocks.
//!
//! Unless mode bit 1 is set, every block is then resealed with the checksum of the kind it
//! was (edits; unused blocks become nodes), or of the kind named by the block's last byte
//! modulo 5 (raw images), so the walk gets past checksums to the structure.

use std::sync::OnceLock;

use super::{block_manager, kind_of, pool_image, Input, KINDS};
use thinblk::engine::pdata::check::check_pool;
use thinblk::engine::pdata::checksum::{self, BlockKind};
use thinblk::engine::pdata::superblock::BLOCK_SIZE;

/// The seed pool and each block's kind.
fn template() -> &'static (Vec<u8>, Vec<Option<BlockKind>>) {
    static T: OnceLock<(Vec<u8>, Vec<Option<BlockKind>>)> = OnceLock::new();
    T.get_or_init(|| {
        let img = pool_image();
        let kinds = img
            .chunks_exact(BLOCK_SIZE)
            .enumerate()
            .map(|(b, blk)| kind_of(blk, b as u64).or(Some(BlockKind::Node)))
            .collect();
        (img, kinds)
    })
}

/// Applies one edit (see the module comment) to `img`.
fn edit(img: &mut [u8], input: &mut Input<'_>) {
    let nr = img.len() / BLOCK_SIZE;
    let block = usize::from(input.u8()) % nr;
    let offset = usize::from(input.u16()) % BLOCK_SIZE;
    let op = input.u8();
    let blk = &mut img[block * BLOCK_SIZE..(block + 1) * BLOCK_SIZE];
    if op < 0x80 {
        for b in blk.iter_mut().skip(offset).take(usize::from(op)) {
            *b = input.u8();
        }
        return;
    }
    let mut value = input.u64();
    let step = u64::from(op & 0x40 != 0);
    for slot in blk
        .get_mut(offset..)
        .unwrap_or(&mut [])
        .chunks_exact_mut(8)
        .take(usize::from(op & 0x3f) + 1)
    {
        slot.copy_from_slice(&value.to_le_bytes());
        value = value.wrapping_add(step);
    }
}

const MAX_RAW_BLOCKS: usize = 16;

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.u8();
    let reseal = mode & 2 == 0;
    let (image, kinds) = if mode & 1 == 0 {
        let (img, kinds) = template();
        let mut img = img.clone();
        while !input.rest().is_empty() {
            edit(&mut img, &mut input);
        }
        (img, kinds.clone())
    } else {
        let raw = input.rest();
        let nr = raw.len().div_ceil(BLOCK_SIZE).clamp(1, MAX_RAW_BLOCKS);
        let mut img = raw.get(..nr * BLOCK_SIZE).unwrap_or(raw).to_vec();
        img.resize(nr * BLOCK_SIZE, 0);
        let kinds = img
            .chunks_exact(BLOCK_SIZE)
            .map(|blk| KINDS.get(usize::from(blk[BLOCK_SIZE - 1] % 5)).copied())
            .collect();
        (img, kinds)
    };
    let mut image = image;
    if reseal {
        for (b, (blk, kind)) in image.chunks_exact_mut(BLOCK_SIZE).zip(&kinds).enumerate() {
            if let Some(kind) = kind {
                checksum::seal(blk, *kind, b as u64);
            }
        }
    }
    let bm = block_manager(&image);
    let report = check_pool(&bm);
    let _ = (report.is_clean(), report.problems.len());
}
