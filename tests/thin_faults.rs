//! The thin pool when space runs out or the metadata device fails.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};
use thinblk::engine::{Bufs, BufsMut};

use thinblk::bufio::{BlockStore, CrashStore, WriteFault};
use thinblk::engine::thin::{Pool, PoolGeometry, PoolMode, PoolOptions, Volumes};
use thinblk::engine::{BlockDevice, BlockError};

const BS: u64 = 64 << 10;

fn geometry(data_blocks: u64) -> PoolGeometry {
    PoolGeometry {
        block_size: BS,
        metadata_size: 4 << 20,
        data_size: data_blocks * BS,
    }
}

fn options(timeout: Duration, error_if_no_space: bool) -> PoolOptions {
    PoolOptions {
        direct: false,
        error_if_no_space,
        no_space_timeout: timeout,
        ..PoolOptions::default()
    }
}

fn pool_on(
    dir: &std::path::Path,
    store: Arc<dyn BlockStore>,
    data_blocks: u64,
    opts: PoolOptions,
) -> Arc<Volumes> {
    let pool = Pool::open_on(store, &dir.join("data"), &geometry(data_blocks), opts).unwrap();
    Volumes::open(pool, &dir.join("devices.json")).unwrap()
}

fn read_at(dev: &dyn BlockDevice, offset: u64) -> Vec<u8> {
    let mut out = vec![0u8; 512];
    dev.read(offset, &mut BufsMut::one(&mut out)).unwrap();
    out
}

#[test]
fn writes_wait_for_space_and_go_on_when_the_pool_grows() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, 1024));
    let thin = pool_on(
        dir.path(),
        store,
        2,
        options(Duration::from_secs(20), false),
    );
    thin.create("a", 1 << 20).unwrap();
    let a = thin.device("a").unwrap();
    a.write(0, &Bufs::one(&[1; 512])).unwrap();
    a.write(BS, &Bufs::one(&[2; 512])).unwrap();
    let writer = {
        let a = a.clone();
        std::thread::spawn(move || a.write(2 * BS, &Bufs::one(&[3; 512])))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!writer.is_finished(), "the write did not wait for space");
    assert_eq!(thin.pool().mode(), PoolMode::OutOfDataSpace);
    // Reads and a FLUSH still work while the write waits.
    assert_eq!(read_at(&*a, 0), vec![1; 512]);
    a.flush().unwrap();
    thin.pool().grow_data(4 * BS).unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(thin.pool().mode(), PoolMode::Write);
    assert_eq!(read_at(&*a, 2 * BS), vec![3; 512]);
}

#[test]
fn waiting_writes_fail_after_the_timeout_and_reads_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, 1024));
    let thin = pool_on(
        dir.path(),
        store,
        1,
        options(Duration::from_millis(300), false),
    );
    thin.create("a", 1 << 20).unwrap();
    let a = thin.device("a").unwrap();
    a.write(0, &Bufs::one(&[1; 512])).unwrap();
    let t0 = Instant::now();
    let err = a.write(BS, &Bufs::one(&[2; 512])).unwrap_err();
    assert!(matches!(err, BlockError::NoSpace));
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(read_at(&*a, 0), vec![1; 512]);
}

#[test]
fn error_if_no_space_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, 1024));
    let thin = pool_on(dir.path(), store, 1, options(Duration::from_secs(60), true));
    thin.create("a", 1 << 20).unwrap();
    let a = thin.device("a").unwrap();
    a.write(0, &Bufs::one(&[1; 512])).unwrap();
    let t0 = Instant::now();
    assert!(matches!(
        a.write(BS, &Bufs::one(&[2; 512])),
        Err(BlockError::NoSpace)
    ));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_failing_metadata_device_turns_the_pool_read_only_and_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, 1024));
    let thin = pool_on(
        dir.path(),
        store.clone(),
        64,
        options(Duration::from_secs(1), true),
    );
    thin.create("a", 1 << 20).unwrap();
    let a = thin.device("a").unwrap();
    a.write(0, &Bufs::one(&[7; 512])).unwrap();
    a.flush().unwrap();
    store.fail_after_writes(0, WriteFault::Error);
    a.write(BS, &Bufs::one(&[8; 512])).unwrap();
    assert!(
        a.flush().is_err(),
        "a commit onto a failing device succeeded"
    );
    assert_eq!(thin.pool().mode(), PoolMode::ReadOnly);
    assert!(matches!(
        a.write(2 * BS, &Bufs::one(&[9; 512])),
        Err(BlockError::ReadOnly)
    ));
    assert_eq!(read_at(&*a, 0), vec![7; 512]);
    drop(a);
    drop(thin);
    store.clear_faults();
    let thin = pool_on(dir.path(), store, 64, options(Duration::from_secs(1), true));
    let a = thin.device("a").unwrap();
    assert_eq!(read_at(&*a, 0), vec![7; 512], "committed data lost");
}

#[test]
fn running_out_of_metadata_space_turns_the_pool_read_only() {
    let dir = tempfile::tempdir().unwrap();
    // 48 metadata blocks: enough to create a device, not to map thousands of blocks.
    let store = Arc::new(CrashStore::new(4096, 48));
    let thin = pool_on(
        dir.path(),
        store,
        20000,
        options(Duration::from_secs(1), true),
    );
    thin.create("a", 20000 * BS).unwrap();
    let a = thin.device("a").unwrap();
    a.write(0, &Bufs::one(&[5; 512])).unwrap();
    a.flush().unwrap();
    let mut failed = None;
    for blk in 1..20000u64 {
        // Every other block, so leaves fill with scattered keys.
        if let Err(e) = a.write(blk * 2 * BS % (20000 * BS), &Bufs::one(&[6; 512])) {
            failed = Some(e);
            break;
        }
        if blk % 64 == 0 && a.flush().is_err() {
            break;
        }
    }
    let _ = failed;
    assert_eq!(thin.pool().mode(), PoolMode::ReadOnly);
    assert_eq!(read_at(&*a, 0), vec![5; 512]);
}
