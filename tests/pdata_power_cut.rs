//! Power cuts: whatever writes are lost, reopening yields exactly the last committed state,
//! and the image passes both checkers.

mod pdata_support;

use std::sync::Arc;

use pdata_support::pool::TestPool;
use pdata_support::{thin_check, Dump};
use thinblk::bufio::{BlockStore, CrashStore, WriteFault};
use thinblk::engine::pdata::check::check_pool;
use thinblk::engine::pdata::superblock::BLOCK_SIZE;

const META_BLOCKS: u64 = 1024;

/// One transaction of the workload: deterministic, snapshot and sharing included.
fn transaction(pool: &mut TestPool, t: u64) -> thinblk::engine::pdata::Result<()> {
    match t {
        0 => {
            pool.create_thin(1)?;
            for v in 0..400 {
                pool.map(1, v)?;
            }
        }
        1 => pool.snapshot(2, 1)?,
        2 => {
            for v in (0..400).step_by(3) {
                pool.map(2, v)?;
            }
        }
        3 => {
            pool.unmap_range(1, 50, 350)?;
            pool.create_thin(3)?;
            for v in 1000..1300 {
                pool.map(3, v)?;
            }
        }
        4 => {
            pool.snapshot(4, 2)?;
            pool.delete(1)?;
        }
        _ => {
            for v in 0..200 {
                pool.map(4, v * 7 + t)?;
                pool.unmap(2, v + t)?;
            }
        }
    }
    Ok(())
}

const TRANSACTIONS: u64 = 8;

/// Runs the workload; returns the dump after each commit with the store's write count then.
fn run_workload(pool: &mut TestPool, store: &CrashStore) -> Vec<(u64, Dump)> {
    let mut commits = Vec::new();
    for t in 0..TRANSACTIONS {
        if transaction(pool, t).is_err() {
            break;
        }
        let Ok(dump) = pool.dump() else { break };
        if pool.commit().is_err() {
            break;
        }
        commits.push((store.io_counts().writes, dump));
    }
    commits
}

fn fresh(cache: usize) -> (Arc<CrashStore>, TestPool, Dump, u64) {
    let store = Arc::new(CrashStore::new(BLOCK_SIZE, META_BLOCKS));
    let pool = TestPool::create(store.clone(), 10_000, cache).expect("create");
    let dump = pool.dump().expect("dump");
    let writes = store.io_counts().writes;
    (store, pool, dump, writes)
}

fn assert_reopens_as(store: &Arc<CrashStore>, want: &Dump, run_thin_check: bool) {
    let pool = TestPool::open(store.clone(), 1 << 20).expect("reopen after power cut");
    assert_eq!(&pool.dump().expect("dump"), want);
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
    if run_thin_check {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.bin");
        let mut img = Vec::new();
        let mut buf = vec![0u8; BLOCK_SIZE];
        for b in 0..store.nr_blocks() {
            store.read_block(b, &mut buf).expect("read");
            img.extend_from_slice(&buf);
        }
        std::fs::write(&path, img).expect("write image");
        let (ok, out) = thin_check(&path);
        assert!(ok, "thin_check after power cut:\n{out}");
    }
}

#[test]
fn reopening_after_power_cut_yields_last_commit() {
    // Learn how many writes the whole workload issues.
    let (store, mut pool, _, base) = fresh(8 << 20);
    let total = run_workload(&mut pool, &store)
        .last()
        .map(|(w, _)| *w)
        .expect("commits")
        - base;
    drop(pool);
    let step = (total / 40).max(1);
    let mut n = 0;
    let mut runs = 0;
    while n <= total + 1 {
        let (store, mut pool, initial, base) = fresh(8 << 20);
        store.fail_after_writes(n, WriteFault::Drop);
        let commits = run_workload(&mut pool, &store);
        drop(pool);
        store.cut_power();
        store.clear_faults();
        let want = commits
            .iter()
            .rev()
            .find(|(w, _)| *w - base <= n)
            .map(|(_, d)| d)
            .unwrap_or(&initial);
        assert_reopens_as(&store, want, runs % 10 == 0);
        n += step;
        runs += 1;
    }
    assert!(runs > 30);
}

#[test]
fn torn_power_cut_in_the_middle_of_a_transaction_yields_last_commit() {
    for seed in 0..16u64 {
        // A small cache makes the cache write back mid-transaction.
        let (store, mut pool, _, _) = fresh(64 * BLOCK_SIZE);
        let mut last = pool.dump().expect("dump");
        let stop = seed % TRANSACTIONS;
        for t in 0..TRANSACTIONS {
            transaction(&mut pool, t).expect("transaction");
            if t == stop {
                break;
            }
            pool.commit().expect("commit");
            last = pool.dump().expect("dump");
        }
        drop(pool);
        store.cut_power_torn(seed);
        assert_reopens_as(&store, &last, seed % 4 == 0);
    }
}

#[test]
fn abort_after_failed_commit_returns_to_last_commit() {
    let (store, mut pool, _, _) = fresh(8 << 20);
    transaction(&mut pool, 0).expect("t0");
    pool.commit().expect("commit");
    let committed = pool.dump().expect("dump");
    transaction(&mut pool, 1).expect("t1");
    transaction(&mut pool, 2).expect("t2");
    store.fail_flush(true);
    assert!(
        pool.commit().is_err(),
        "commit must report the failed flush"
    );
    store.fail_flush(false);
    pool.abort().expect("abort");
    assert_eq!(pool.dump().expect("dump"), committed);
    drop(pool);
    store.cut_power();
    assert_reopens_as(&store, &committed, true);
}
