//! `thinblk check` passes the fixtures and names what is wrong in damaged copies of them,
//! including what thin_check 0.9 does not look at (data reference counts, mapped_blocks,
//! the superblock's magic and location).

mod tools_support;

use std::path::Path;

use thinblk::engine::pdata::checksum::{self, BlockKind};
use thinblk::engine::pdata::node::{Node, NodeView};
use thinblk::engine::pdata::space_map::bitmap;
use thinblk::engine::pdata::values::{DeviceDetails, Value};
use tools_support::*;

const BLOCK: usize = 4096;

/// Rewrites block `b` of the file at `path` with `f`, then reseals it as `kind`.
fn edit_block(path: &Path, b: u64, kind: BlockKind, f: impl FnOnce(&mut [u8])) {
    let mut bytes = std::fs::read(path).expect("read image");
    let at = b as usize * BLOCK;
    let blk = &mut bytes[at..at + BLOCK];
    f(blk);
    checksum::seal(blk, kind, b);
    std::fs::write(path, bytes).expect("write image");
}

fn check(meta: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["check"];
    args.extend_from_slice(extra);
    args.push(s(meta));
    let out = thinblk(&args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn passes(rel: &str) {
    let (_dir, meta) = image(rel);
    let (ok, text) = check(&meta, &[]);
    assert!(ok, "{rel}: {text}");
    for stage in [
        "examining superblock",
        "examining devices tree",
        "examining mapping tree",
        "checking space map counts",
    ] {
        assert!(text.contains(stage), "{rel}: no {stage:?} in {text}");
    }
}

#[test]
fn the_thin_restore_090_image_passes() {
    passes("meta.bin.zst");
}

#[test]
fn the_thin_restore_133_image_passes() {
    passes("meta-rust133.bin.zst");
}

#[test]
fn the_multilevel_image_passes() {
    passes("meta-multilevel.bin.zst");
}

#[test]
fn kernel_written_images_pass() {
    passes("kernel/tmeta.bin.zst");
    passes("kernel/tmeta_with_metadata_snap.bin.zst");
    passes("kernel/tmeta_with_shared_internals_and_leaves.bin.zst");
}

#[test]
fn check_reports_the_transaction_id_like_thin_check() {
    let (_dir, meta) = image("meta.bin.zst");
    let out = thinblk(&["check", s(&meta)]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("TRANSACTION_ID=2\nMETADATA_FREE_BLOCKS=")
    );
}

#[test]
fn a_flipped_byte_in_a_mapping_leaf_fails_naming_the_block() {
    let (_dir, meta) = image("meta.bin.zst");
    let mut bytes = std::fs::read(&meta).expect("read");
    bytes[10 * BLOCK + 100] ^= 0x40;
    std::fs::write(&meta, bytes).expect("write");
    let (ok, text) = check(&meta, &[]);
    assert!(!ok);
    assert!(text.contains("block 10"), "{text}");
    assert!(text.contains("checksum"), "{text}");
}

#[test]
fn a_wrong_data_reference_count_fails_naming_the_data_block() {
    let (_dir, meta) = image("meta.bin.zst");
    // Block 9 is the data bitmap; data block 100 (device 2) has one reference.
    edit_block(&meta, 9, BlockKind::Bitmap, |b| bitmap::set(b, 100, 2));
    let thin_check = tool("thin_check");
    let (ok, _, _) = run_tool(&thin_check, &[s(&meta)]);
    assert!(ok, "thin_check 0.9 does not look at data counts");
    let (ok, text) = check(&meta, &[]);
    assert!(!ok);
    assert!(
        text.contains("data block 100: space map count 2, 1 references"),
        "{text}"
    );
}

#[test]
fn a_wrong_mapped_blocks_fails_naming_the_device() {
    let (_dir, meta) = image("meta.bin.zst");
    // Block 6 is the device details leaf.
    edit_block(&meta, 6, BlockKind::Node, |b| {
        let mut node = Node::from_view(&NodeView::new(b, 6).expect("node"));
        let i = node.keys.binary_search(&2).expect("device 2");
        let mut d = DeviceDetails::unpack(node.value(i)).expect("details");
        d.mapped_blocks = 9;
        let mut v = [0u8; 24];
        d.pack(&mut v);
        node.set_value(i, &v);
        node.encode(b);
    });
    let (ok, text) = check(&meta, &[]);
    assert!(!ok);
    assert!(
        text.contains("device 2: mapped_blocks 9, 8 mappings"),
        "{text}"
    );
}

#[test]
fn a_wrong_superblock_magic_fails() {
    let (_dir, meta) = image("meta.bin.zst");
    edit_block(&meta, 0, BlockKind::Superblock, |b| b[32] ^= 1);
    let (ok, text) = check(&meta, &[]);
    assert!(!ok);
    assert!(text.contains("magic"), "{text}");
}

#[test]
fn a_superblock_that_names_another_block_fails() {
    let (_dir, meta) = image("meta.bin.zst");
    let mut bytes = std::fs::read(&meta).expect("read");
    bytes[8] = 5;
    let csum = checksum::checksum(&bytes[..BLOCK], BlockKind::Superblock.salt());
    bytes[..4].copy_from_slice(&csum.to_le_bytes());
    std::fs::write(&meta, bytes).expect("write");
    let (ok, text) = check(&meta, &[]);
    assert!(!ok);
    assert!(text.contains("block 0"), "{text}");
}

#[test]
fn a_set_needs_check_flag_fails_until_cleared() {
    let (_dir, meta) = image("meta.bin.zst");
    edit_block(&meta, 0, BlockKind::Superblock, |b| b[4] |= 1);
    let (ok, text) = check(&meta, &[]);
    assert!(!ok);
    assert!(text.contains("needs_check"), "{text}");
    let (ok, text) = check(&meta, &["--clear-needs-check"]);
    assert!(ok, "{text}");
    let (ok, text) = check(&meta, &[]);
    assert!(ok, "{text}");
    let thin_check = tool("thin_check");
    let (ok, _, err) = run_tool(&thin_check, &[s(&meta)]);
    assert!(ok, "{err}");
}

#[test]
fn clear_needs_check_leaves_a_damaged_pool_flagged() {
    let (_dir, meta) = image("meta.bin.zst");
    edit_block(&meta, 0, BlockKind::Superblock, |b| b[4] |= 1);
    edit_block(&meta, 9, BlockKind::Bitmap, |b| bitmap::set(b, 100, 2));
    let (ok, _) = check(&meta, &["--clear-needs-check"]);
    assert!(!ok);
    let bytes = std::fs::read(&meta).expect("read");
    assert_eq!(bytes[4] & 1, 1, "flag still set");
}

#[test]
fn check_refuses_metadata_a_daemon_holds() {
    let (_dir, meta) = image("meta.bin.zst");
    let held = thinblk::bufio::FileStore::open(&meta, BLOCK).expect("open");
    held.lock_exclusive().expect("lock");
    let (ok, text) = check(&meta, &[]);
    assert!(!ok);
    assert!(text.contains("in use"), "{text}");
    drop(held);
    let (ok, text) = check(&meta, &[]);
    assert!(ok, "{text}");
}

#[test]
fn super_block_only_stops_after_the_superblock() {
    let (_dir, meta) = image("meta.bin.zst");
    let mut bytes = std::fs::read(&meta).expect("read");
    bytes[10 * BLOCK + 100] ^= 0x40;
    std::fs::write(&meta, bytes).expect("write");
    let (ok, text) = check(&meta, &["--super-block-only"]);
    assert!(ok, "{text}");
    assert!(!text.contains("examining devices tree"), "{text}");
}

#[test]
fn no_tool_panics_on_a_damaged_block_anywhere() {
    let (dir, meta) = image("meta.bin.zst");
    let good = std::fs::read(&meta).expect("read");
    for b in 0..13 {
        let mut bytes = good.clone();
        bytes[b * BLOCK + 40] ^= 0x01;
        let path = dir.path().join(format!("damaged-{b}.bin"));
        std::fs::write(&path, bytes).expect("write");
        let p = s(&path);
        for args in [
            vec!["check", p],
            vec!["dump", p],
            vec!["ls", "-o", "DEV,EXCLUSIVE_BLOCKS", p],
            vec!["delta", "--snap1", "1", "--snap2", "3", p],
        ] {
            let out = thinblk(&args);
            assert_ne!(out.status.code(), Some(101), "{args:?} panicked");
            if b != 8 && args[0] == "check" {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "damaged block {b} passed: {err}");
                assert!(err.contains(&format!("block {b}")), "block {b}: {err}");
            }
        }
    }
}
