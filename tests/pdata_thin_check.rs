//! Metadata written by this library passes Debian's thin_check and reads back through
//! thin_dump as what the library holds.

mod pdata_support;

use std::sync::Arc;

use pdata_support::pool::TestPool;
use pdata_support::{thin_check, thin_dump};
use thinblk::bufio::MemStore;
use thinblk::engine::pdata::check::check_pool;
use thinblk::engine::pdata::superblock::BLOCK_SIZE;

/// SplitMix64: a small deterministic generator for workloads.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn random_range(&mut self, r: std::ops::Range<u64>) -> u64 {
        r.start + self.next() % (r.end - r.start)
    }
}

fn random_workload(seed: u64, steps: usize) -> TestPool {
    let mut rng = Rng(seed);
    let store = Arc::new(MemStore::new(BLOCK_SIZE, 4096));
    let mut pool = TestPool::create(store, 100_000, 4 << 20).expect("create");
    let mut devs: Vec<u64> = Vec::new();
    let mut next_dev = 1u64;
    for step in 0..steps {
        let roll = rng.random_range(0..100);
        if devs.is_empty() || roll < 2 {
            pool.create_thin(next_dev).expect("create thin");
            devs.push(next_dev);
            next_dev += 1;
            continue;
        }
        let dev = devs[rng.random_range(0..devs.len() as u64) as usize];
        match roll {
            2..=4 if devs.len() < 8 => {
                pool.snapshot(next_dev, dev).expect("snapshot");
                devs.push(next_dev);
                next_dev += 1;
            }
            5 if devs.len() > 2 => {
                pool.delete(dev).expect("delete");
                devs.retain(|&d| d != dev);
            }
            6..=59 => {
                let start = rng.random_range(0..20_000u64);
                for v in start..start + rng.random_range(1..64u64) {
                    pool.map(dev, v).expect("map");
                }
            }
            60..=84 => {
                let v = rng.random_range(0..20_000u64);
                pool.unmap(dev, v).expect("unmap");
            }
            85..=89 => {
                let b = rng.random_range(0..20_000u64);
                pool.unmap_range(dev, b, b + rng.random_range(1..2_000u64))
                    .expect("unmap range");
            }
            _ => {}
        }
        if step % 97 == 0 {
            pool.commit().expect("commit");
        }
    }
    pool.commit().expect("commit");
    pool
}

#[test]
fn metadata_built_by_thousands_of_random_operations_passes_thin_check() {
    let pool = random_workload(7, 3_000);
    let report = check_pool(&pool.bm);
    assert!(
        report.is_clean(),
        "own checker: {:?}",
        report.problems.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        report.mappings > 1_000,
        "workload too small: {} mappings",
        report.mappings
    );
    eprintln!(
        "{} devices, {} mappings, {} metadata blocks",
        report.devices, report.mappings, report.metadata_blocks_used
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.bin");
    pool.write_image(&path);
    let (ok, out) = thin_check(&path);
    assert!(ok, "thin_check failed:\n{out}");
    let dumped = thin_dump(&path);
    assert_eq!(dumped, pool.dump().expect("dump"));
}

#[test]
fn fresh_pool_with_one_empty_device_passes_thin_check() {
    let store = Arc::new(MemStore::new(BLOCK_SIZE, 256));
    let mut pool = TestPool::create(store, 1024, 1 << 20).expect("create");
    pool.create_thin(0).expect("create thin");
    pool.commit().expect("commit");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.bin");
    pool.write_image(&path);
    let (ok, out) = thin_check(&path);
    assert!(ok, "thin_check failed:\n{out}");
    assert_eq!(thin_dump(&path), pool.dump().expect("dump"));
}

#[test]
fn held_metadata_snapshot_keeps_its_view_and_passes_thin_check() {
    let mut pool = random_workload(11, 400);
    let before = pool.dump().expect("dump");
    let held = pool.reserve_metadata_snap().expect("reserve");
    let devs: Vec<u64> = before.devices.keys().copied().collect();
    for &d in &devs {
        pool.unmap_range(d, 0, 10_000).expect("unmap range");
        for v in 0..50 {
            pool.map(d, v * 11).expect("map");
        }
    }
    pool.commit().expect("commit");
    let report = check_pool(&pool.bm);
    assert!(
        report.is_clean(),
        "{:?}",
        report
            .problems
            .iter()
            .take(5)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    );
    let blk = pool
        .bm
        .read(
            held,
            thinblk::engine::pdata::checksum::BlockKind::Superblock,
        )
        .expect("held");
    let held_sb = thinblk::engine::pdata::Superblock::decode(&blk, held).expect("held superblock");
    drop(blk);
    let mut snap = pdata_support::dump(&*pool.bm, &held_sb).expect("dump held");
    snap.nr_data_blocks = before.nr_data_blocks;
    assert_eq!(snap.devices, before.devices);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.bin");
    pool.write_image(&path);
    let (ok, out) = thin_check(&path);
    assert!(ok, "thin_check with a held root:\n{out}");
    pool.release_metadata_snap().expect("release");
    pool.commit().expect("commit");
    let report = check_pool(&pool.bm);
    assert!(
        report.is_clean(),
        "{:?}",
        report
            .problems
            .iter()
            .take(5)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    );
    pool.write_image(&path);
    let (ok, out) = thin_check(&path);
    assert!(ok, "thin_check after release:\n{out}");
}

#[test]
fn growing_both_devices_across_a_bitmap_boundary_passes_thin_check() {
    let store = Arc::new(MemStore::new(BLOCK_SIZE, 300));
    let mut pool = TestPool::create(store, 16_000, 8 << 20).expect("create");
    pool.create_thin(1).expect("create thin");
    for v in 0..2_000 {
        pool.map(1, v).expect("map");
    }
    pool.commit().expect("commit");
    pool.bm.grow(17_000).expect("grow metadata device");
    pool.tm
        .extend_to_device()
        .expect("extend metadata space map");
    thinblk::engine::pdata::SpaceMap::extend(&mut pool.data_sm, 4_000)
        .expect("extend data space map");
    for v in 2_000..19_000 {
        pool.map(1, v).expect("map after growing");
    }
    pool.committed.metadata_nr_blocks = 17_000;
    pool.commit().expect("commit");
    let report = check_pool(&pool.bm);
    assert!(
        report.is_clean(),
        "{:?}",
        report
            .problems
            .iter()
            .take(5)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.bin");
    pool.write_image(&path);
    let (ok, out) = thin_check(&path);
    assert!(ok, "thin_check after growing:\n{out}");
    assert_eq!(thin_dump(&path), pool.dump().expect("dump"));
    let reopened = TestPool::open(pool.store.clone(), 8 << 20).expect("reopen");
    assert_eq!(reopened.dump().expect("dump"), pool.dump().expect("dump"));
}
