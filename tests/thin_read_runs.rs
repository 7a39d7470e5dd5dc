//! The synchronous read of a thin device (the mirror's source reads, tools) asks its pool's
//! data device for each run of mapped blocks that lie one after another there in one
//! request, not block by block, and still returns every byte where it belongs: mapped
//! blocks out of order in the pool, holes between them, partial blocks at the ends.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::PowerCutDevice;
use thinblk::bufio::CrashStore;
use thinblk::engine::thin::{Pool, PoolGeometry, PoolOptions, ThinDevice, Volumes};
use thinblk::engine::{BlockDevice, BlockError, Bufs, BufsMut, DataDevice};

const BS: u64 = 64 << 10;
const DATA: u64 = 8 << 20;
const META_BLOCKS: u64 = 1024;
const DISK: u64 = 2 << 20;

/// A data device that counts the reads it is asked for.
struct Counting {
    inner: Arc<PowerCutDevice>,
    reads: AtomicU64,
}

impl BlockDevice for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        self.inner.write(offset, bufs)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
}

impl DataDevice for Counting {
    fn grow_to(&self, size: u64) -> Result<u64, BlockError> {
        self.inner.grow_to(size)
    }
}

fn rig() -> (tempfile::TempDir, Arc<Counting>, Arc<ThinDevice>) {
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(Counting {
        inner: PowerCutDevice::new(DATA, None),
        reads: AtomicU64::new(0),
    });
    let geometry = PoolGeometry {
        block_size: BS,
        metadata_size: META_BLOCKS * 4096,
        data_size: DATA,
    };
    let options = PoolOptions {
        commit_interval: Duration::from_secs(3600),
        ..PoolOptions::default()
    };
    let store = Arc::new(CrashStore::new(4096, META_BLOCKS));
    let pool = Pool::open_with(store, data.clone(), &geometry, options).unwrap();
    let volumes = Volumes::open(pool, &dir.path().join("devices.json")).unwrap();
    volumes.create("a", DISK).unwrap();
    let dev = volumes.device("a").unwrap();
    (dir, data, dev)
}

/// Block `vblock` of the disk, filled with bytes that say which block and which byte.
fn block_bytes(vblock: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| (vblock.wrapping_mul(31) ^ (i / 512)) as u8)
        .collect()
}

fn write_blocks(dev: &ThinDevice, vblocks: std::ops::Range<u64>) {
    let bytes: Vec<u8> = vblocks.clone().flat_map(block_bytes).collect();
    dev.write(vblocks.start * BS, &Bufs::one(&bytes)).unwrap();
}

#[test]
fn blocks_that_follow_on_in_the_pool_are_one_read() {
    let (_dir, data, dev) = rig();
    // One write of 8 blocks into an empty pool: they are handed out in order.
    write_blocks(&dev, 0..8);
    let mut buf = vec![0u8; (8 * BS) as usize];
    let before = data.reads.load(Ordering::Relaxed);
    dev.read(0, &mut BufsMut::one(&mut buf)).unwrap();
    assert_eq!(data.reads.load(Ordering::Relaxed) - before, 1);
    let want: Vec<u8> = (0..8).flat_map(block_bytes).collect();
    assert!(buf == want, "the read returned other bytes than written");
}

#[test]
fn out_of_order_blocks_holes_and_partial_ends_read_back_exactly() {
    let (_dir, data, dev) = rig();
    // Pool order: vblocks 0-2, then 9, then 5, then 6-7; 3, 4 and 8 are holes.
    write_blocks(&dev, 0..3);
    write_blocks(&dev, 9..10);
    write_blocks(&dev, 5..6);
    write_blocks(&dev, 6..8);
    let mapped = |v: u64| matches!(v, 0..=2 | 5..=7 | 9);
    let want: Vec<u8> = (0..10)
        .flat_map(|v| {
            if mapped(v) {
                block_bytes(v)
            } else {
                vec![0; BS as usize]
            }
        })
        .collect();
    // From inside block 0 to inside block 9, and a few other windows.
    for (start, len) in [(512, 10 * BS - 1024), (0, 10 * BS), (BS + 4096, 6 * BS)] {
        let mut buf = vec![0xeeu8; len as usize];
        let before = data.reads.load(Ordering::Relaxed);
        dev.read(start, &mut BufsMut::one(&mut buf)).unwrap();
        let reads = data.reads.load(Ordering::Relaxed) - before;
        assert!(
            buf[..] == want[start as usize..(start + len) as usize],
            "read of {len} bytes at {start}: other bytes than written"
        );
        // Never more requests than mapped blocks in the range, never more than the runs
        // (0-2, 5-7 and 9 at most: 5-7 may be two runs if 5 and 6 are apart in the pool).
        assert!(
            reads <= 4,
            "read of {len} bytes at {start}: {reads} data reads"
        );
    }
}
