//! The fuzz targets' bodies (one module each; `fuzz_targets/<name>.rs` only hands libFuzzer's
//! input to `<name>::run`) and what they share: guest memory from fuzzer bytes, and a small
//! thin pool image to mutate. Everything here is deterministic and single-threaded (no
//! threads, sockets, files or clocks) except `vhost_user`, which drives the real vhost-user
//! daemon, threads and socket included (and `stall_report`, which says what its threads were
//! doing when an input hangs).
//!
//! The main crate's `tests/fuzz_regressions.rs` includes this file as a module and replays
//! every input under `fuzz/regressions/<target>/` through [`run`], so a crash found here stays
//! fixed without libFuzzer. Hence modules refer to each other through `super::`, not `crate::`.

pub mod nbd;
pub mod nbd_client;
pub mod pdata_blocks;
pub mod pdata_image;
pub mod qmp;
pub mod stall_report;
pub mod vhost_user;
pub mod virtio_queue;
pub mod virtio_request;
pub mod xml_restore;

use std::sync::Arc;

use thinblk::bufio::{BlockStore, BufferCache, BufioConfig, MemStore};
use thinblk::engine::pdata::block_manager::BlockManager;
use thinblk::engine::pdata::btree::{self, DataRefs, NoRefs};
use thinblk::engine::pdata::checksum::{self, BlockKind};
use thinblk::engine::pdata::space_map::{DiskSpaceMap, SpaceMap};
use thinblk::engine::pdata::superblock::{Superblock, BLOCK_SIZE};
use thinblk::engine::pdata::tm::TransactionManager;
use thinblk::engine::pdata::values::{BlockTime, DeviceDetails};
use thinblk::vhost::dirty_log::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// A target's body: takes libFuzzer's input, panics on a bug.
pub type Target = fn(&[u8]);

/// Every target, by the name of its directory under `corpus/` and `regressions/`.
pub const TARGETS: [(&str, Target); 9] = [
    ("virtio_request", virtio_request::run),
    ("virtio_queue", virtio_queue::run),
    ("qmp", qmp::run),
    ("pdata_blocks", pdata_blocks::run),
    ("pdata_image", pdata_image::run),
    ("xml_restore", xml_restore::run),
    ("vhost_user", vhost_user::run),
    ("nbd", nbd::run),
    ("nbd_client", nbd_client::run),
];

/// Runs target `name` on `data`; false if there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, f)) => {
            f(data);
            true
        }
        None => false,
    }
}

/// A little-endian reader over fuzzer bytes that yields zeros once they run out.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    pub fn rest(&self) -> &[u8] {
        self.0
    }
}

/// Guest RAM for the virtio targets: two regions with a hole between, so buffers can cross
/// or fall into it.
pub const RAM: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];

/// Guest memory holding `bytes` from address 0 (zero after them, and in the second region).
pub fn guest_memory(bytes: &[u8]) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> =
        RAM.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let n = bytes.len().min(RAM[0].1);
    mem.write_slice(&bytes[..n], GuestAddress(0))
        .expect("fill guest memory");
    mem
}

/// The kinds a metadata block can be sealed as.
pub const KINDS: [BlockKind; 4] = [
    BlockKind::Superblock,
    BlockKind::Node,
    BlockKind::Bitmap,
    BlockKind::Index,
];

/// The kind whose checksum `block` carries for `location`, if any.
pub fn kind_of(block: &[u8], location: u64) -> Option<BlockKind> {
    KINDS
        .into_iter()
        .find(|&k| checksum::verify(block, k, location).is_ok())
}

/// A block manager over a memory store holding `image` (whole blocks; a partial tail is
/// dropped). The cache is small enough that walks evict, as on a real pool.
pub fn block_manager(image: &[u8]) -> Arc<BlockManager> {
    let nr = (image.len() / BLOCK_SIZE) as u64;
    let store = Arc::new(MemStore::new(BLOCK_SIZE, nr));
    for (i, chunk) in image.chunks_exact(BLOCK_SIZE).enumerate() {
        store
            .write_block(i as u64, chunk)
            .expect("write to memory store");
    }
    let cache = BufferCache::new(
        store,
        BufioConfig {
            block_size: BLOCK_SIZE,
            memory_limit: 8 * BLOCK_SIZE,
        },
    );
    Arc::new(BlockManager::new(Arc::new(cache), nr))
}

/// Metadata blocks in [`pool_image`].
pub const POOL_BLOCKS: u64 = 24;
/// Data blocks in [`pool_image`]: two bitmaps' worth, so the data space map has an index btree
/// of two entries.
pub const POOL_DATA_BLOCKS: u64 = 20_000;

/// A committed thin pool: thin device 1 with mappings, device 2 a snapshot of it with one
/// block remapped, and both space maps. The same bytes every time.
pub fn pool_image() -> Vec<u8> {
    let store = Arc::new(MemStore::new(BLOCK_SIZE, POOL_BLOCKS));
    let cache = BufferCache::new(
        store.clone(),
        BufioConfig {
            block_size: BLOCK_SIZE,
            memory_limit: 1 << 20,
        },
    );
    let bm = Arc::new(BlockManager::new(Arc::new(cache), POOL_BLOCKS));
    build_pool(&bm).expect("build the seed pool");
    let mut out = vec![0u8; POOL_BLOCKS as usize * BLOCK_SIZE];
    for (b, chunk) in out.chunks_exact_mut(BLOCK_SIZE).enumerate() {
        store
            .read_block(b as u64, chunk)
            .expect("read memory store");
    }
    out
}

fn build_pool(bm: &Arc<BlockManager>) -> thinblk::engine::pdata::Result<()> {
    let mut tm = TransactionManager::create(bm.clone())?;
    let mut data_sm = DiskSpaceMap::create(bm.clone(), POOL_DATA_BLOCKS);
    let mut details = btree::empty::<DeviceDetails>(&mut tm)?;
    let mut mapping = btree::empty::<u64>(&mut tm)?;
    let mut time = 0u32;
    for dev in [1u64, 2] {
        let sub = if dev == 1 {
            btree::empty::<BlockTime>(&mut tm)?
        } else {
            // A snapshot shares its origin's subtree.
            time += 1;
            let origin = btree::lookup::<u64, _>(&tm, mapping, 1)?.unwrap_or(0);
            btree::clone_root(&mut tm, origin)?;
            origin
        };
        mapping = btree::insert::<u64>(&mut tm, &mut NoRefs, mapping, dev, &sub)?;
        let vblocks: &[u64] = if dev == 1 {
            &[0, 1, 2, 7, 100, 16_400]
        } else {
            &[2, 3]
        };
        for &vblock in vblocks {
            let block = data_sm.new_block()?;
            let v = BlockTime { block, time };
            let mut refs = DataRefs(&mut data_sm);
            mapping = btree::insert_nested(&mut tm, &mut refs, mapping, dev, vblock, &v)?;
        }
        let mapped = if dev == 1 { 6 } else { 7 };
        let d = DeviceDetails {
            mapped_blocks: mapped,
            transaction_id: dev,
            creation_time: time,
            snapshotted_time: time,
        };
        details = btree::insert(&mut tm, &mut NoRefs, details, dev, &d)?;
    }
    let data_root = data_sm.commit(&mut tm)?;
    let meta_root = tm.pre_commit()?;
    let sb = Superblock {
        flags: 0,
        uuid: *b"thinblk-fuzzseed",
        version: 2,
        time,
        trans_id: 2,
        held_root: 0,
        data_sm_root: data_root,
        metadata_sm_root: meta_root,
        data_mapping_root: mapping,
        device_details_root: details,
        data_block_size: 128,
        metadata_nr_blocks: POOL_BLOCKS,
        compat_flags: 0,
        compat_ro_flags: 0,
        incompat_flags: 0,
    };
    tm.commit(&sb)
}
