//! A disk never reads another disk's data: after a disk is filled and deleted, its data
//! blocks go to other disks, whose unmapped blocks read zeros and whose newly provisioned
//! blocks hold only what they wrote (zeros around a partial write, the origin's data around
//! a write that breaks sharing with a snapshot). Real files under the pool, so the host's
//! zero-range and hole punching are what is tested. (The power-cut and kill tests check the
//! same after crashes.)
#![allow(clippy::unwrap_used)]

mod support;

use std::alloc::Layout;
use thinblk::engine::{Bufs, BufsMut};

use support::*;
use thinblk::engine::thin::{Pool, PoolGeometry, PoolOptions, ThinDevice, Volumes};
use thinblk::engine::{BlockDevice, Extent, MapOp};

const BS: u64 = 64 << 10;
const PER_BLOCK: u64 = BS / STAMP as u64;
/// Data blocks: few, so every cycle reuses the blocks of the disk deleted before it.
const DATA_BLOCKS: u64 = 24;
const DISK_BLOCKS: u64 = 12;

fn read_block(dev: &ThinDevice, vblock: u64) -> Vec<Content> {
    let mut buf = vec![0u8; BS as usize];
    dev.read(vblock * BS, &mut BufsMut::one(&mut buf)).unwrap();
    buf.chunks(STAMP).map(parse).collect()
}

/// A buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn copy_of(data: &[u8]) -> Aligned {
        let layout = Layout::from_size_align(data.len().max(1), 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `ptr` holds `data.len()` bytes just allocated.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
        Aligned { ptr, layout }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `copy_of` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Writes the way the vhost layer's io_uring path does when the device maps the write: the
/// data to the extents, then the hold is told. Falls back to the synchronous write when the device does not map it; returns
/// whether it was mapped.
fn write_as_queue_does(dev: &ThinDevice, offset: u64, data: &[u8]) -> bool {
    let Some(m) = dev.map(MapOp::Write, offset, data.len() as u64).unwrap() else {
        dev.write(offset, &Bufs::one(data)).unwrap();
        return false;
    };
    let buf = Aligned::copy_of(data);
    let mut at = 0usize;
    for ext in &m.extents {
        let Extent::File {
            fd, offset, len, ..
        } = *ext
        else {
            panic!("a write mapped to {ext:?}");
        };
        // SAFETY: `buf` holds `data.len()` bytes and the extents cover exactly that many.
        let n = unsafe { libc::pwrite(fd, buf.ptr.add(at).cast(), len as usize, offset as i64) };
        assert_eq!(
            n,
            len as isize,
            "pwrite: {}",
            std::io::Error::last_os_error()
        );
        at += len as usize;
    }
    assert_eq!(at, data.len());
    if let Some(h) = m.hold {
        h.finish(true).unwrap();
    }
    true
}

/// Returns whether the write was mapped.
fn write_stamp(dev: &ThinDevice, tag: u64, stamp: u64, gen: u64, mapped: bool) -> bool {
    let c = Content::Stamp {
        tag,
        block: stamp,
        gen,
    };
    let bytes = content_bytes(c);
    if mapped {
        write_as_queue_does(dev, stamp * STAMP as u64, &bytes)
    } else {
        dev.write(stamp * STAMP as u64, &Bufs::one(&bytes)).unwrap();
        false
    }
}

#[test]
fn deleted_disks_data_never_shows_through_new_or_unmapped_blocks() {
    let seed = seed(0x5EC0_0001);
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let geometry = PoolGeometry {
        block_size: BS,
        metadata_size: 4 << 20,
        data_size: DATA_BLOCKS * BS,
    };
    let pool = Pool::open(
        &dir.path().join("metadata"),
        &dir.path().join("data"),
        &geometry,
        PoolOptions {
            error_if_no_space: true,
            ..PoolOptions::default()
        },
    )
    .unwrap();
    let thin = Volumes::open(pool, &dir.path().join("devices.json")).unwrap();
    let size = DISK_BLOCKS * BS;
    let mut checked = 0u64;
    let mut first_writes_mapped = 0u64;
    for cycle in 0..12u64 {
        // A disk fills every data block it can with its own stamps, then goes away.
        let old_tag = 1000 + cycle;
        thin.create("old", size).unwrap();
        let old = thin.device("old").unwrap();
        let full: Vec<u8> = (0..DISK_BLOCKS * PER_BLOCK)
            .flat_map(|s| {
                content_bytes(Content::Stamp {
                    tag: old_tag,
                    block: s,
                    gen: 1,
                })
            })
            .collect();
        // Each cycle's writes go one way or the other: synchronous, or mapped as the queue's
        // io_uring path does them (new blocks provisioned in map, mapped when done).
        let mapped = cycle % 2 == 1;
        if mapped {
            assert!(
                write_as_queue_does(&old, 0, &full),
                "whole new blocks are provisioned in map"
            );
        } else {
            old.write(0, &Bufs::one(&full)).unwrap();
        }
        old.flush().unwrap();
        drop(old);
        thin.delete("old", false).unwrap();

        // A new disk gets those blocks: one stamp written per block, the rest must be zero.
        let tag = cycle + 1;
        thin.create("new", size).unwrap();
        let new = thin.device("new").unwrap();
        let mut written = vec![None; DISK_BLOCKS as usize];
        for vb in 0..DISK_BLOCKS {
            if rng.chance(75) {
                let at = vb * PER_BLOCK + rng.below(PER_BLOCK);
                if write_stamp(&new, tag, at, 1, mapped) {
                    first_writes_mapped += 1;
                }
                written[vb as usize] = Some(at);
            }
        }
        // Half the time, a snapshot, then writes that break sharing.
        let snap = rng.chance(50);
        if snap {
            thin.snapshot("new", "snap").unwrap();
            for vb in 0..DISK_BLOCKS {
                if let Some(at) = written[vb as usize] {
                    let other = vb * PER_BLOCK + (at + 1) % PER_BLOCK;
                    write_stamp(&new, tag, other, 2, mapped);
                }
            }
        }
        // Zeroing part of a block and discarding whole ones leave zeros, not old data.
        let zb = rng.below(DISK_BLOCKS);
        new.write_zeroes(zb * BS + 4096, 8192, rng.chance(50))
            .unwrap();
        new.flush().unwrap();
        for dev_name in ["new", "snap"] {
            if dev_name == "snap" && !snap {
                continue;
            }
            let dev = thin.device(dev_name).unwrap();
            for vb in 0..DISK_BLOCKS {
                for (i, got) in read_block(&dev, vb).into_iter().enumerate() {
                    checked += 1;
                    match got {
                        Content::Zero => {}
                        Content::Stamp { tag: t, block, .. } => assert!(
                            t == tag && block == vb * PER_BLOCK + i as u64,
                            "seed {seed} cycle {cycle}: {dev_name} block {vb} stamp {i} \
                             shows {got:?}"
                        ),
                        Content::Garbage => {
                            panic!("seed {seed} cycle {cycle}: {dev_name} block {vb} stamp {i} is garbage")
                        }
                    }
                }
            }
        }
        drop(new);
        if snap {
            thin.delete("snap", false).unwrap();
        }
        thin.delete("new", false).unwrap();
    }
    assert!(checked > 0);
    assert!(
        first_writes_mapped > 0,
        "partial first writes were provisioned in map"
    );
    drop(thin);
    assert_checks_pass(&dir.path().join("metadata"), &format!("seed {seed}"));
}
