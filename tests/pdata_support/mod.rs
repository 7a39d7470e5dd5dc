//! Shared helpers for the pdata integration tests: fixtures, in-memory devices, a dump of
//! what a pool's metadata holds, and the `thin_dump` XML parsed into the same shape.
#![allow(dead_code)]

#[path = "../external/mod.rs"]
mod external;
pub mod pool;
pub mod writer;

use external::fixture_bytes;
// Not every test uses every one.
#[allow(unused_imports)]
pub use external::{fixture_dir, fixture_text, tool};

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use thinblk::bufio::{BlockStore, BufferCache, BufioConfig, MemStore};
use thinblk::engine::pdata::block_manager::BlockManager;
use thinblk::engine::pdata::checksum::BlockKind;
use thinblk::engine::pdata::error::Result;
use thinblk::engine::pdata::superblock::{Superblock, BLOCK_SIZE};
use thinblk::engine::pdata::tm::BlockSource;

/// Decompresses a fixture image; fails when fixtures are absent.
pub fn fixture_image(rel: &str) -> Vec<u8> {
    fixture_bytes(rel)
}

/// A block manager over a memory copy of `image`.
pub fn mem_bm(image: &[u8], cache_bytes: usize) -> (Arc<MemStore>, Arc<BlockManager>) {
    let nr = (image.len() / BLOCK_SIZE) as u64;
    let store = Arc::new(MemStore::new(BLOCK_SIZE, nr));
    for (i, chunk) in image.chunks_exact(BLOCK_SIZE).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            store
                .write_block(i as u64, chunk)
                .expect("write to memory store");
        }
    }
    (store.clone(), bm_over(store, cache_bytes))
}

pub fn bm_over(store: Arc<dyn BlockStore>, cache_bytes: usize) -> Arc<BlockManager> {
    let nr = store.nr_blocks();
    let cache = BufferCache::new(
        store,
        BufioConfig {
            block_size: BLOCK_SIZE,
            memory_limit: cache_bytes,
        },
    );
    Arc::new(BlockManager::new(Arc::new(cache), nr))
}

pub fn read_superblock<S: BlockSource + ?Sized>(src: &S) -> Result<Superblock> {
    let blk = src.read_block(0, BlockKind::Superblock)?;
    Ok(Superblock::decode(&blk, 0)?)
}

/// What a pool's metadata says, in the shape `thin_dump` prints.
#[allow(unused_imports)]
pub use thinblk::tools::model::{DeviceContents as Device, PoolContents as Dump};

/// Reads every device and mapping reachable from the superblock.
pub fn dump<S: BlockSource + ?Sized>(src: &S, sb: &Superblock) -> Result<Dump> {
    thinblk::tools::model::read_pool(src, sb)
}

/// Parses `thin_dump`'s XML.
pub fn parse_xml(xml: &str) -> Dump {
    thinblk::tools::xml::parse(xml.as_bytes())
        .expect("valid thin_dump XML")
        .1
}

/// Runs `thin_dump` on a file and parses it.
pub fn thin_dump(path: &Path) -> Dump {
    let exe = tool("thin_dump");
    let out = Command::new(exe).arg(path).output().expect("run thin_dump");
    assert!(
        out.status.success(),
        "thin_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_xml(&String::from_utf8_lossy(&out.stdout))
}

/// Runs `thin_check` on a file; returns (success, combined output).
pub fn thin_check(path: &Path) -> (bool, String) {
    let exe = tool("thin_check");
    let out = Command::new(exe)
        .arg(path)
        .output()
        .expect("run thin_check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
