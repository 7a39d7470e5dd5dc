//! Thin devices with an external origin: unmapped blocks read the origin, a first partial
//! write copies the origin block around itself, and the origin file is never written.
#![allow(clippy::unwrap_used)]

mod cow_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use thinblk::engine::{Bufs, BufsMut};

use cow_support::{random_range, read_all, Rng};
use thinblk::engine::thin::{Pool, PoolGeometry, PoolOptions, Volumes};
use thinblk::engine::BlockDevice;

const BS: u64 = 64 << 10;
/// Not a whole number of blocks: the last block is partly past the origin's end.
const ORIGIN: u64 = (1 << 20) + 7 * 512;

struct Files {
    dir: tempfile::TempDir,
    origin: PathBuf,
}

fn files(rng: &mut Rng) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("golden.raw");
    std::fs::write(&origin, rng.bytes(ORIGIN as usize)).unwrap();
    Files { dir, origin }
}

fn open(dir: &Path) -> Arc<Volumes> {
    let geometry = PoolGeometry {
        block_size: BS,
        metadata_size: 4 << 20,
        data_size: 16 << 20,
    };
    let options = PoolOptions {
        direct: false,
        error_if_no_space: true,
        ..PoolOptions::default()
    };
    let pool = Pool::open(&dir.join("metadata"), &dir.join("data"), &geometry, options).unwrap();
    Volumes::open(pool, &dir.join("devices.json")).unwrap()
}

fn write(dev: &dyn BlockDevice, model: &mut [u8], off: u64, data: &[u8]) {
    dev.write(off, &Bufs::one(data)).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

#[test]
fn unmapped_blocks_read_the_origin_and_first_writes_copy_it() {
    let mut rng = Rng(41);
    let f = files(&mut rng);
    let golden = std::fs::read(&f.origin).unwrap();
    let thin = open(f.dir.path());
    thin.create_with_origin("vm", &f.origin, None).unwrap();
    let dev = thin.device("vm").unwrap();
    assert_eq!(dev.size(), ORIGIN);
    assert_eq!(read_all(dev.as_ref()), golden);
    let mut model = golden.clone();
    // A partial write in the middle of a block, and one in the last, partial block.
    write(dev.as_ref(), &mut model, BS + 4096, &[0xAA; 512]);
    write(dev.as_ref(), &mut model, ORIGIN - 1024, &[0xBB; 1024]);
    assert_eq!(read_all(dev.as_ref()), model);
    // Zeroed ranges read zeros even where the origin has data, unmap or not.
    dev.write_zeroes(3 * BS, 2 * BS, true).unwrap();
    model[3 * BS as usize..5 * BS as usize].fill(0);
    dev.write_zeroes(8 * BS + 512, 1024, false).unwrap();
    model[(8 * BS + 512) as usize..(8 * BS + 1536) as usize].fill(0);
    assert_eq!(read_all(dev.as_ref()), model);
    dev.flush().unwrap();
    drop(dev);
    drop(thin);
    // The origin is recorded: a restart opens it again.
    let thin = open(f.dir.path());
    let dev = thin.device("vm").unwrap();
    assert_eq!(read_all(dev.as_ref()), model);
    assert_eq!(
        std::fs::read(&f.origin).unwrap(),
        golden,
        "the origin was written"
    );
}

#[test]
fn a_device_larger_than_its_origin_reads_zeros_past_the_end() {
    let mut rng = Rng(42);
    let f = files(&mut rng);
    let golden = std::fs::read(&f.origin).unwrap();
    let thin = open(f.dir.path());
    thin.create_with_origin("big", &f.origin, Some(4 << 20))
        .unwrap();
    let dev = thin.device("big").unwrap();
    let mut model = golden.clone();
    model.resize(4 << 20, 0);
    assert_eq!(read_all(dev.as_ref()), model);
    // The block holding the origin's end: the copy stops there, zeros follow.
    let last = ORIGIN / BS * BS;
    write(dev.as_ref(), &mut model, last + 100 * 512, &[0xCC; 512]);
    write(dev.as_ref(), &mut model, 3 << 20, &[0xDD; 4096]);
    assert_eq!(read_all(dev.as_ref()), model);
    assert_eq!(std::fs::read(&f.origin).unwrap(), golden);
}

#[test]
fn a_snapshot_of_a_device_with_an_origin_reads_the_same_origin() {
    let mut rng = Rng(43);
    let f = files(&mut rng);
    let golden = std::fs::read(&f.origin).unwrap();
    let thin = open(f.dir.path());
    thin.create_with_origin("base", &f.origin, None).unwrap();
    let base = thin.device("base").unwrap();
    let mut model = golden.clone();
    write(base.as_ref(), &mut model, 0, &[1u8; 4096]);
    thin.snapshot("base", "snap").unwrap();
    let snap = thin.device("snap").unwrap();
    assert_eq!(read_all(snap.as_ref()), model);
    write(snap.as_ref(), &mut model.clone(), 2 * BS, &[2u8; 512]);
    assert_eq!(read_all(base.as_ref()), model);
}

#[test]
fn random_requests_match_a_model_across_restarts() {
    let mut rng = Rng(44);
    let f = files(&mut rng);
    let golden = std::fs::read(&f.origin).unwrap();
    let mut thin = open(f.dir.path());
    thin.create_with_origin("vm", &f.origin, None).unwrap();
    let mut model = golden.clone();
    for round in 0..4 {
        let dev = thin.device("vm").unwrap();
        for _ in 0..150 {
            let (off, len) = random_range(&mut rng, dev.size(), 96 << 10);
            match rng.below(8) {
                0 => {
                    dev.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                1 => {
                    let mut buf = vec![0u8; len as usize];
                    dev.read(off, &mut BufsMut::one(&mut buf)).unwrap();
                    assert_eq!(buf, model[off as usize..(off + len) as usize]);
                }
                _ => write(dev.as_ref(), &mut model, off, &rng.bytes(len as usize)),
            }
        }
        dev.flush().unwrap();
        assert_eq!(read_all(dev.as_ref()), model, "round {round}");
        drop(dev);
        drop(thin);
        thin = open(f.dir.path());
    }
    assert_eq!(read_all(thin.device("vm").unwrap().as_ref()), model);
    assert_eq!(std::fs::read(&f.origin).unwrap(), golden);
}

#[test]
fn the_asynchronous_read_map_of_unmapped_blocks_points_at_the_origin() {
    use thinblk::engine::{Extent, MapOp};
    let mut rng = Rng(45);
    let f = files(&mut rng);
    let thin = open(f.dir.path());
    thin.create_with_origin("vm", &f.origin, Some(4 << 20))
        .unwrap();
    let dev = thin.device("vm").unwrap();
    let m = dev.map(MapOp::Read, BS, 2 * BS).unwrap();
    if let Some(m) = m {
        assert!(
            m.extents
                .iter()
                .all(|e| matches!(e, Extent::File { offset, .. } if *offset >= BS)),
            "unmapped blocks of a device with an origin mapped as {:?}",
            m.extents
        );
    }
    // Past the origin's end, unmapped blocks are zeros.
    let m = dev.map(MapOp::Read, 2 << 20, BS).unwrap().unwrap();
    assert!(m.extents.iter().all(|e| matches!(e, Extent::Zero { .. })));
}
