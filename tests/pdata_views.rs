//! Lookups beside a running transaction: a read-only view of the last commit, and lookups
//! that refuse to do I/O.

mod pdata_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pdata_support::pool::TestPool;
use pdata_support::*;
use thinblk::bufio::MemStore;
use thinblk::engine::pdata::btree;
use thinblk::engine::pdata::error::PdataError;
use thinblk::engine::pdata::superblock::BLOCK_SIZE;
use thinblk::engine::pdata::tm::NonBlocking;
use thinblk::engine::pdata::values::BlockTime;

#[test]
fn non_blocking_lookup_reports_would_block_until_the_path_is_cached() {
    let img = fixture_image("meta-multilevel.bin.zst");
    let (_store, bm) = mem_bm(&img, 1 << 20);
    let sb = read_superblock(&*bm).expect("superblock");
    let nb = NonBlocking(&bm);
    let first = btree::lookup_nested::<BlockTime, _>(&nb, sb.data_mapping_root, 1, 500);
    assert!(
        matches!(first, Err(PdataError::WouldBlock { .. })),
        "{first:?}"
    );
    let blocking =
        btree::lookup_nested::<BlockTime, _>(&*bm, sb.data_mapping_root, 1, 500).expect("lookup");
    let again = btree::lookup_nested::<BlockTime, _>(&nb, sb.data_mapping_root, 1, 500)
        .expect("cached now");
    assert_eq!(again, blocking);
}

#[test]
fn readers_see_the_last_commit_while_a_transaction_changes_the_trees() {
    let store = Arc::new(MemStore::new(BLOCK_SIZE, 4096));
    let mut pool = TestPool::create(store, 50_000, 64 << 20).expect("create");
    pool.create_thin(1).expect("create thin");
    for v in 0..3000 {
        pool.map(1, v).expect("map");
    }
    pool.commit().expect("commit");
    let root = pool.mapping_root;
    let want: Vec<Option<BlockTime>> = (0..3000)
        .map(|v| pool.lookup(1, v).expect("lookup"))
        .collect();
    let bm = pool.bm.clone();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (bm, want, done) = (&bm, &want, &done);
            s.spawn(move || {
                let mut i = t;
                while !done.load(Ordering::Acquire) {
                    let v = (i * 7919) % 3000;
                    let got = btree::lookup_nested::<BlockTime, _>(&**bm, root, 1, v)
                        .expect("reader lookup");
                    assert_eq!(got, want[v as usize], "reader saw uncommitted state at {v}");
                    i += 1;
                }
            });
        }
        for v in 0..3000 {
            if v % 3 == 0 {
                pool.unmap(1, v).expect("unmap");
            } else {
                pool.map(1, v + 5000).expect("map");
                pool.map(1, v).expect("remap");
            }
        }
        pool.snapshot(2, 1).expect("snapshot");
        pool.unmap_range(1, 0, 1500).expect("unmap range");
        done.store(true, Ordering::Release);
    });
    pool.commit().expect("commit");
}
