//! Btree costs at 10^4, 10^5 and 10^6 mappings: cached lookup, insert, remove, commit.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use thinblk::bufio::{BufferCache, BufioConfig, MemStore};
use thinblk::engine::pdata::block_manager::BlockManager;
use thinblk::engine::pdata::btree::{self, NoRefs};
use thinblk::engine::pdata::superblock::{Superblock, BLOCK_SIZE};
use thinblk::engine::pdata::tm::{NonBlocking, TransactionManager};
use thinblk::engine::pdata::values::BlockTime;

const SIZES: [u64; 3] = [10_000, 100_000, 1_000_000];

struct Tree {
    tm: TransactionManager,
    bm: Arc<BlockManager>,
    root: u64,
}

fn superblock(tm: &mut TransactionManager, root: u64) -> Superblock {
    let meta = tm.pre_commit().expect("pre-commit");
    Superblock {
        flags: 0,
        uuid: [0; 16],
        version: 2,
        time: 0,
        trans_id: 0,
        held_root: 0,
        data_sm_root: Default::default(),
        metadata_sm_root: meta,
        data_mapping_root: root,
        device_details_root: root,
        data_block_size: 128,
        metadata_nr_blocks: tm.block_manager().nr_blocks(),
        compat_flags: 0,
        compat_ro_flags: 0,
        incompat_flags: 0,
    }
}

fn commit(t: &mut Tree) {
    let sb = superblock(&mut t.tm, t.root);
    t.tm.commit(&sb).expect("commit");
}

/// A committed tree of `n` mappings at keys 0, 2, 4, ... (odd keys stay free for inserts).
fn build(n: u64) -> Tree {
    let store = Arc::new(MemStore::new(BLOCK_SIZE, 65_536));
    let cache = BufferCache::new(
        store,
        BufioConfig {
            block_size: BLOCK_SIZE,
            memory_limit: 512 << 20,
        },
    );
    let bm = Arc::new(BlockManager::new(Arc::new(cache), 65_536));
    let mut tm = TransactionManager::create(bm.clone()).expect("tm");
    let mut root = btree::empty::<BlockTime>(&mut tm).expect("empty");
    for k in 0..n {
        root = btree::insert(
            &mut tm,
            &mut NoRefs,
            root,
            2 * k,
            &BlockTime { block: k, time: 0 },
        )
        .expect("insert");
    }
    let mut t = Tree { tm, bm, root };
    commit(&mut t);
    t
}

fn next(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 20
}

fn benches(c: &mut Criterion) {
    for n in SIZES {
        let mut t = build(n);
        let mut seed = 42u64;
        let mut g = c.benchmark_group("pdata");
        g.measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_secs(1))
            .sample_size(20);
        g.bench_with_input(BenchmarkId::new("cached_lookup", n), &n, |b, &n| {
            b.iter(|| {
                let k = 2 * (next(&mut seed) % n);
                btree::lookup::<BlockTime, _>(&*t.bm, t.root, k).expect("lookup")
            })
        });
        g.bench_with_input(BenchmarkId::new("nonblocking_lookup", n), &n, |b, &n| {
            b.iter(|| {
                let k = 2 * (next(&mut seed) % n);
                btree::lookup::<BlockTime, _>(&NonBlocking(&t.bm), t.root, k).expect("lookup")
            })
        });
        g.bench_with_input(BenchmarkId::new("insert_in_transaction", n), &n, |b, &n| {
            b.iter(|| {
                let k = 2 * (next(&mut seed) % n) + 1;
                t.root = btree::insert(
                    &mut t.tm,
                    &mut NoRefs,
                    t.root,
                    k,
                    &BlockTime { block: k, time: 1 },
                )
                .expect("insert");
            })
        });
        g.bench_with_input(BenchmarkId::new("remove_in_transaction", n), &n, |b, &n| {
            b.iter(|| {
                let k = 2 * (next(&mut seed) % n) + 1;
                t.root = btree::remove::<BlockTime>(&mut t.tm, &mut NoRefs, t.root, k)
                    .expect("remove")
                    .0;
            })
        });
        commit(&mut t);
        g.bench_with_input(
            BenchmarkId::new("100_inserts_then_commit", n),
            &n,
            |b, &n| {
                b.iter_batched(
                    || (),
                    |_| {
                        for _ in 0..100 {
                            let k = 2 * (next(&mut seed) % n) + 1;
                            t.root = btree::insert(
                                &mut t.tm,
                                &mut NoRefs,
                                t.root,
                                k,
                                &BlockTime { block: k, time: 2 },
                            )
                            .expect("insert");
                        }
                        commit(&mut t);
                    },
                    BatchSize::SmallInput,
                )
            },
        );
        g.finish();
    }
}

criterion_group!(pdata, benches);
criterion_main!(pdata);
