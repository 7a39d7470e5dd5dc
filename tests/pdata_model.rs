//! Random operations on a small pool against a BTreeMap model: contents after every step,
//! and after every commit, abort and reopen, the checker's reference counts.

mod pdata_support;

use std::collections::BTreeMap;
use std::sync::Arc;

use pdata_support::pool::TestPool;

use proptest::prelude::*;
use thinblk::bufio::MemStore;
use thinblk::engine::pdata::check::check_pool;
use thinblk::engine::pdata::superblock::BLOCK_SIZE;

const DEVS: u64 = 4;
const SPAN: u64 = 1500;

#[derive(Debug, Clone)]
enum Op {
    Map(u64, u64),
    MapRun(u64, u64, u64),
    Unmap(u64, u64),
    UnmapRange(u64, u64, u64),
    Create(u64),
    Snapshot(u64, u64),
    Delete(u64),
    Commit,
    Abort,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..DEVS, 0..SPAN).prop_map(|(d, b)| Op::Map(d, b)),
        3 => (0..DEVS, 0..SPAN, 1..400u64).prop_map(|(d, b, n)| Op::MapRun(d, b, n)),
        4 => (0..DEVS, 0..SPAN).prop_map(|(d, b)| Op::Unmap(d, b)),
        2 => (0..DEVS, 0..SPAN, 1..600u64).prop_map(|(d, b, n)| Op::UnmapRange(d, b, n)),
        1 => (0..DEVS).prop_map(Op::Create),
        2 => (0..DEVS, 0..DEVS).prop_map(|(d, o)| Op::Snapshot(d, o)),
        1 => (0..DEVS).prop_map(Op::Delete),
        2 => Just(Op::Commit),
        1 => Just(Op::Abort),
        1 => Just(Op::Reopen),
    ]
}

type Model = BTreeMap<u64, BTreeMap<u64, u64>>;

fn assert_pool_matches(pool: &TestPool, model: &Model) {
    let dump = pool.dump().expect("dump");
    let got: Model = dump
        .devices
        .iter()
        .map(|(d, dev)| {
            (
                *d,
                dev.mappings.iter().map(|(k, v)| (*k, v.block)).collect(),
            )
        })
        .collect();
    assert_eq!(&got, model);
    for (d, dev) in &dump.devices {
        assert_eq!(
            dev.details.mapped_blocks,
            dev.mappings.len() as u64,
            "mapped_blocks of {d}"
        );
    }
}

fn assert_checks_clean(pool: &TestPool) {
    let report = check_pool(&pool.bm);
    let shown: Vec<String> = report
        .problems
        .iter()
        .take(8)
        .map(|p| p.to_string())
        .collect();
    assert!(
        report.is_clean(),
        "{} problems: {shown:#?}",
        report.problems.len()
    );
}

fn run(ops: Vec<Op>) {
    let store = Arc::new(MemStore::new(BLOCK_SIZE, 2048));
    let mut pool = TestPool::create(store.clone(), 50_000, 1 << 20).expect("create");
    let mut model: Model = BTreeMap::new();
    let mut committed = model.clone();
    for op in ops {
        match op {
            Op::Map(d, b) if model.contains_key(&d) => {
                let block = pool.map(d, b).expect("map");
                model.entry(d).or_default().insert(b, block);
                assert_eq!(
                    pool.lookup(d, b).expect("lookup").map(|v| v.block),
                    Some(block)
                );
            }
            Op::MapRun(d, b, n) if model.contains_key(&d) => {
                for v in b..b + n {
                    let block = pool.map(d, v).expect("map");
                    model.entry(d).or_default().insert(v, block);
                }
            }
            Op::Unmap(d, b) if model.contains_key(&d) => {
                let had = pool.unmap(d, b).expect("unmap");
                let m = model.entry(d).or_default();
                assert_eq!(had, m.remove(&b).is_some());
                assert_eq!(pool.lookup(d, b).expect("lookup"), None);
            }
            Op::UnmapRange(d, b, n) if model.contains_key(&d) => {
                let gone = pool.unmap_range(d, b, b + n).expect("unmap range");
                let m = model.entry(d).or_default();
                let keys: Vec<u64> = m.range(b..b + n).map(|(k, _)| *k).collect();
                for k in &keys {
                    m.remove(k);
                }
                assert_eq!(gone, keys.len() as u64);
            }
            Op::Create(d) if !model.contains_key(&d) => {
                pool.create_thin(d).expect("create thin");
                model.insert(d, BTreeMap::new());
            }
            Op::Snapshot(d, o) if !model.contains_key(&d) && model.contains_key(&o) => {
                pool.snapshot(d, o).expect("snapshot");
                let copy = model.get(&o).cloned().unwrap_or_default();
                model.insert(d, copy);
            }
            Op::Delete(d) if model.contains_key(&d) => {
                pool.delete(d).expect("delete");
                model.remove(&d);
            }
            Op::Commit => {
                pool.commit().expect("commit");
                committed = model.clone();
                assert_checks_clean(&pool);
            }
            Op::Abort => {
                pool.abort().expect("abort");
                model = committed.clone();
                assert_pool_matches(&pool, &model);
                assert_checks_clean(&pool);
            }
            Op::Reopen => {
                drop(pool);
                pool = TestPool::open(store.clone(), 1 << 20).expect("reopen");
                model = committed.clone();
                assert_pool_matches(&pool, &model);
            }
            _ => {}
        }
    }
    assert_pool_matches(&pool, &model);
    pool.commit().expect("final commit");
    assert_checks_clean(&pool);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_pool_operations_match_the_model_and_keep_counts_exact(
        ops in proptest::collection::vec(op(), 1..120)
    ) {
        run(ops);
    }
}

#[test]
fn snapshot_then_rewrite_keeps_both_devices_apart() {
    let mut ops = vec![
        Op::Create(0),
        Op::MapRun(0, 0, 900),
        Op::Commit,
        Op::Snapshot(1, 0),
        Op::Commit,
    ];
    ops.extend((0..300).map(|i| Op::Map(1, i * 3)));
    ops.push(Op::Commit);
    ops.push(Op::UnmapRange(0, 100, 800));
    ops.push(Op::Commit);
    ops.push(Op::Delete(0));
    ops.push(Op::Reopen);
    run(ops);
}

#[test]
fn many_mappings_build_deep_trees_that_shrink_back_cleanly() {
    let mut ops = vec![Op::Create(0)];
    for i in 0..40 {
        ops.push(Op::MapRun(0, i * 1000, 1000));
    }
    ops.push(Op::Commit);
    ops.push(Op::Snapshot(2, 0));
    ops.push(Op::UnmapRange(0, 0, 39_000));
    ops.push(Op::Commit);
    ops.push(Op::Abort);
    ops.push(Op::Delete(2));
    ops.push(Op::Commit);
    run(ops);
}
