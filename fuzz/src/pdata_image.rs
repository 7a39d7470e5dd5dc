//! Whole metadata images: opened and walked by `pdata::check::check_pool`, which must report
//! problems, never panic, and never loop.
//!
//! Input: a mode byte, then
//! - mode bit 0 clear: edits to a small committed pool ([`super::pool_image`]), each
//!   a block number (u8), an offset (u16), a length (u8) and that many bytes;
//! - mode bit 0 set: the image itself, up to 16 blocks.
//!
//! Unless mode bit 1 is set, every block is then resealed with the checksum of the kind it
//! was (edits), or of the kind named by the block's last byte modulo 5 (raw images), so
//! the walk gets past checksums to the structure.

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
            .map(|(b, blk)| kind_of(blk, b as u64))
            .collect();
        (img, kinds)
    })
}

const MAX_RAW_BLOCKS: usize = 16;

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.u8();
    let reseal = mode & 2 == 0;
    let (image, kinds) = if mode & 1 == 0 {
        let (img, kinds) = template();
        let mut img = img.clone();
        let nr = img.len() / BLOCK_SIZE;
        while !input.rest().is_empty() {
            let block = usize::from(input.u8()) % nr;
            let offset = usize::from(input.u16()) % BLOCK_SIZE;
            let len = usize::from(input.u8()).min(BLOCK_SIZE - offset);
            let at = block * BLOCK_SIZE + offset;
            for b in &mut img[at..at + len] {
                *b = input.u8();
            }
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
