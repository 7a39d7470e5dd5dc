//! Corrupt metadata gives errors, never panics: a flipped byte in any referenced block is
//! reported, and garbage with a valid checksum is rejected by the structural checks.

mod pdata_support;

use std::sync::Arc;

use pdata_support::*;
use thinblk::engine::pdata::block_manager::BlockManager;
use thinblk::engine::pdata::check::check_pool;
use thinblk::engine::pdata::checksum::{self, BlockKind};
use thinblk::engine::pdata::space_map::{DiskSpaceMap, MetadataSpaceMap, SpaceMap};
use thinblk::engine::pdata::superblock::BLOCK_SIZE;

const OFFSETS: [usize; 8] = [0, 5, 9, 17, 21, 64, 1000, 4095];
const KINDS: [BlockKind; 4] = [
    BlockKind::Superblock,
    BlockKind::Node,
    BlockKind::Bitmap,
    BlockKind::Index,
];

fn kind_of(block: &[u8], location: u64) -> Option<BlockKind> {
    KINDS
        .into_iter()
        .find(|&k| checksum::verify(block, k, location).is_ok())
}

/// Everything a reader does with an image; errors are fine, panics are not.
fn read_everything(bm: &Arc<BlockManager>) -> bool {
    let mut ok = true;
    match read_superblock(&**bm) {
        Ok(sb) => {
            ok &= dump(&**bm, &sb).is_ok();
            ok &= MetadataSpaceMap::open(bm, &sb.metadata_sm_root).is_ok();
            match DiskSpaceMap::open(bm.clone(), &sb.data_sm_root) {
                Ok(sm) => {
                    for b in (0..sm.nr_blocks()).step_by(97) {
                        ok &= sm.count(b).is_ok();
                    }
                }
                Err(_) => ok = false,
            }
        }
        Err(_) => ok = false,
    }
    ok &= check_pool(bm).is_clean();
    ok
}

fn corrupt_each_block(image: &str, max_blocks: usize, offsets: &[usize]) {
    let img = fixture_image(image);
    let (_, bm) = mem_bm(&img, 16 << 20);
    let sb = read_superblock(&*bm).expect("superblock");
    let msm = MetadataSpaceMap::open(&bm, &sb.metadata_sm_root).expect("metadata sm");
    let used: Vec<u64> = (0..msm.nr_blocks())
        .filter(|&b| msm.count(b).unwrap_or(0) > 0)
        .collect();
    let stride = (used.len() / max_blocks).max(1);
    for &b in used.iter().step_by(stride) {
        let at = b as usize * BLOCK_SIZE;
        for &offset in offsets {
            let mut bad = img.clone();
            bad[at + offset] ^= 0x5a;
            let (_, bm) = mem_bm(&bad, 16 << 20);
            assert!(
                !read_everything(&bm),
                "{image}: flipping byte {offset} of referenced block {b} went unnoticed"
            );
        }
    }
}

fn resealed_garbage_in_each_block(image: &str, max_blocks: usize) {
    let img = fixture_image(image);
    let nr = img.len() / BLOCK_SIZE;
    let blocks: Vec<(usize, BlockKind)> = (0..nr)
        .filter_map(|b| {
            kind_of(&img[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE], b as u64).map(|k| (b, k))
        })
        .collect();
    let stride = (blocks.len() / max_blocks).max(1);
    let mut seed = 0x1234_5678_9abc_def0u64;
    for &(b, kind) in blocks.iter().step_by(stride) {
        for round in 0..8 {
            let mut bad = img.clone();
            let blk = &mut bad[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
            for _ in 0..4 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Aim at headers and the first keys/values most of the time.
                let span = if round % 3 == 0 { BLOCK_SIZE } else { 128 };
                let off = 4 + (seed >> 33) as usize % (span - 4);
                blk[off] = (seed >> 20) as u8;
            }
            checksum::seal(blk, kind, b as u64);
            let (_, bm) = mem_bm(&bad, 16 << 20);
            let _ = read_everything(&bm);
        }
    }
}

#[test]
fn flipped_byte_in_any_block_of_the_090_image_is_reported() {
    corrupt_each_block("meta.bin.zst", 64, &OFFSETS);
}

#[test]
fn flipped_byte_in_the_multilevel_image_is_reported() {
    corrupt_each_block("meta-multilevel.bin.zst", 16, &OFFSETS);
}

#[test]
fn flipped_byte_in_the_kernel_image_is_reported() {
    corrupt_each_block(
        "kernel/tmeta_with_shared_internals_and_leaves.bin.zst",
        6,
        &[0, 17, 200],
    );
}

#[test]
fn resealed_garbage_never_panics_the_readers() {
    resealed_garbage_in_each_block("meta.bin.zst", 16);
    resealed_garbage_in_each_block("meta-multilevel.bin.zst", 6);
}

#[test]
fn a_node_pointing_at_itself_is_an_error_not_a_hang() {
    let img = fixture_image("meta-multilevel.bin.zst");
    let nr = img.len() / BLOCK_SIZE;
    // Find an internal node and point its first child at itself.
    let internal = (0..nr).find(|&b| {
        let blk = &img[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
        kind_of(blk, b as u64) == Some(BlockKind::Node)
            && u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]) == 1
    });
    let Some(b) = internal else {
        panic!("the multilevel image has internal nodes")
    };
    let mut bad = img.clone();
    let blk = &mut bad[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
    let max = u32::from_le_bytes([blk[20], blk[21], blk[22], blk[23]]) as usize;
    let v0 = 32 + 8 * max;
    blk[v0..v0 + 8].copy_from_slice(&(b as u64).to_le_bytes());
    checksum::seal(blk, BlockKind::Node, b as u64);
    let (_, bm) = mem_bm(&bad, 16 << 20);
    assert!(!read_everything(&bm));
}
