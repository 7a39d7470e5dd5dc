//! Pool operations that fail part way (a snapshot, a transaction of several, a delete) never
//! take completed guest writes with them. Writes a guest saw complete since the last commit
//! are only in memory (writeback mode); going back to the last commit to undo a failed
//! operation must not drop them, whether the pool stays writable (a refusal) or turns
//! read-only (a metadata error).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use thinblk::bufio::{CrashStore, WriteFault};
use thinblk::engine::thin::{Pool, PoolGeometry, PoolMode, PoolOptions, VolumeError, Volumes};
use thinblk::engine::{BlockDevice, Bufs, BufsMut};

const BS: u64 = 64 << 10;
const DISK: u64 = 1 << 20;
const META_BLOCKS: u64 = 1024;

/// The only places that know how a device is read and written.
fn write_at(dev: &dyn BlockDevice, offset: u64, byte: u8) {
    dev.write(offset, &Bufs::one(&[byte; 4096])).unwrap();
}

fn read_at(dev: &dyn BlockDevice, offset: u64) -> Vec<u8> {
    let mut out = vec![0u8; 4096];
    dev.read(offset, &mut BufsMut::one(&mut out)).unwrap();
    out
}

/// A pool whose only commits are the ones a test asks for (no timer), with a metadata cache
/// of `cache_blocks` blocks.
fn open(dir: &Path, store: &Arc<CrashStore>, cache_blocks: usize) -> Arc<Volumes> {
    let geometry = PoolGeometry {
        block_size: BS,
        metadata_size: META_BLOCKS * 4096,
        data_size: 64 * BS,
    };
    let options = PoolOptions {
        direct: false,
        commit_interval: Duration::from_secs(3600),
        metadata_cache: cache_blocks * 4096,
        ..PoolOptions::default()
    };
    let pool = Pool::open_on(store.clone(), &dir.join("data"), &geometry, options).unwrap();
    Volumes::open(pool, &dir.join("devices.json")).unwrap()
}

/// Devices "a", "b", "c"; "a" with block 0 committed, then blocks 1-3 written and completed but not
/// committed (no FLUSH).
fn pool_with_uncommitted_writes(dir: &Path, store: &Arc<CrashStore>, cache: usize) -> Arc<Volumes> {
    let thin = open(dir, store, cache);
    thin.create("a", DISK).unwrap();
    thin.create("b", DISK).unwrap();
    thin.create("c", DISK).unwrap();
    let a = thin.device("a").unwrap();
    write_at(&*a, 0, 1);
    a.flush().unwrap();
    for blk in 1..4u64 {
        write_at(&*a, blk * BS, 10 + blk as u8);
    }
    thin
}

/// Whether the block at `offset` holds only `byte` (a failure says what it holds instead,
/// without printing 4096 bytes).
fn holds(dev: &dyn BlockDevice, offset: u64, byte: u8) -> Result<(), String> {
    let got = read_at(dev, offset);
    match got.iter().position(|&b| b != byte) {
        None => Ok(()),
        Some(at) => Err(format!("byte {at} is {}, not {byte}", got[at])),
    }
}

/// Makes the mapping tree's root (as it is now, uncommitted changes included) unreadable from
/// the store and drops it from the cache, so that the next lookup fails.
fn fail_mapping_root_reads(thin: &Volumes, store: &CrashStore) {
    let meta = thin.pool().meta();
    let (mapping_root, _) = meta.roots();
    let cache = meta.block_manager().cache();
    cache.write_dirty().unwrap();
    cache.forget(mapping_root);
    store.fail_read(mapping_root);
}

fn assert_writes_readable(thin: &Volumes, when: &str) {
    let a = thin.device("a").unwrap();
    if let Err(e) = holds(&*a, 0, 1) {
        panic!("{when}: committed write lost: {e}");
    }
    for blk in 1..4u64 {
        if let Err(e) = holds(&*a, blk * BS, 10 + blk as u8) {
            panic!("{when}: completed write to block {blk} lost: {e}");
        }
    }
}

#[test]
fn a_transaction_whose_second_action_is_invalid_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, META_BLOCKS));
    let thin = pool_with_uncommitted_writes(dir.path(), &store, 4096);
    for bad in [("nope", "s2"), ("b", "s1"), ("b", "a")] {
        assert!(thin.snapshot_many(&[("a", "s1"), bad]).is_err());
        assert!(!thin.exists("s1"), "a refused transaction left a snapshot");
    }
    assert_eq!(thin.pool().mode(), PoolMode::Write);
    assert_writes_readable(&thin, "after the refused transaction");
    thin.device("a").unwrap().flush().unwrap();
    drop(thin);
    let thin = open(dir.path(), &store, 4096);
    assert_writes_readable(&thin, "after a flush and a reopen");
}

/// The catalog still names a device the metadata no longer has ("b", not the highest id, so
/// that no new device reuses its id), so the second snapshot fails in the metadata after the
/// first was made.
#[test]
fn a_snapshot_failing_after_another_was_made_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, META_BLOCKS));
    let thin = pool_with_uncommitted_writes(dir.path(), &store, 4096);
    let b = thin.id_of("b").unwrap();
    thin.pool().change(|m| m.delete_thin(b)).unwrap();
    let err = thin.snapshot_many(&[("a", "s1"), ("b", "s2")]).unwrap_err();
    assert!(matches!(err, VolumeError::Thin(_)), "{err}");
    assert!(!thin.exists("s1") && !thin.exists("s2"));
    assert_eq!(thin.pool().mode(), PoolMode::Write);
    assert_writes_readable(&thin, "after the failed snapshot");
    // The pool goes on: a snapshot of what is there works.
    thin.snapshot("a", "s3").unwrap();
    thin.device("a").unwrap().flush().unwrap();
    drop(thin);
    let thin = open(dir.path(), &store, 4096);
    assert_writes_readable(&thin, "after a flush and a reopen");
    let s3 = thin.device("s3").unwrap();
    holds(&*s3, 3 * BS, 13).unwrap();
}

/// The mapping tree's root can no longer be read when the snapshot looks its origin up: a
/// metadata error part way. The pool turns read-only, and every completed write stays.
#[test]
fn a_snapshot_hitting_a_metadata_read_error_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, META_BLOCKS));
    // A small cache, so that the snapshot reads the tree from the store.
    let thin = pool_with_uncommitted_writes(dir.path(), &store, 16);
    fail_mapping_root_reads(&thin, &store);
    assert!(thin.snapshot("a", "s1").is_err());
    assert!(!thin.exists("s1"));
    assert_eq!(
        thin.pool().mode(),
        PoolMode::ReadOnly,
        "a metadata error left the pool writable"
    );
    store.clear_faults();
    assert_writes_readable(&thin, "after the failed snapshot");
    drop(thin);
    let thin = open(dir.path(), &store, 4096);
    assert_writes_readable(&thin, "after a reopen");
}

/// Creating a device when the mapping tree cannot be read: a metadata error part way.
#[test]
fn a_create_hitting_a_metadata_read_error_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, META_BLOCKS));
    let thin = pool_with_uncommitted_writes(dir.path(), &store, 16);
    fail_mapping_root_reads(&thin, &store);
    assert!(thin.create("x", DISK).is_err());
    assert!(!thin.exists("x"));
    assert_eq!(thin.pool().mode(), PoolMode::ReadOnly);
    store.clear_faults();
    assert_writes_readable(&thin, "after the failed create");
    drop(thin);
    let thin = open(dir.path(), &store, 4096);
    assert_writes_readable(&thin, "after a reopen");
}

/// Deleting a device whose metadata cannot be read fails part way; other devices' completed
/// writes stay.
#[test]
fn a_delete_hitting_a_metadata_read_error_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, META_BLOCKS));
    let thin = pool_with_uncommitted_writes(dir.path(), &store, 16);
    fail_mapping_root_reads(&thin, &store);
    assert!(thin.delete("b", false).is_err());
    // Half a delete may be in the metadata: the pool must stop changing it.
    assert_eq!(
        thin.pool().mode(),
        PoolMode::ReadOnly,
        "a metadata error left the pool writable"
    );
    store.clear_faults();
    assert!(thin.exists("b"));
    assert_writes_readable(&thin, "after the failed delete");
    drop(thin);
    let thin = open(dir.path(), &store, 4096);
    assert_writes_readable(&thin, "after a reopen");
}

/// Makes the next catalog save fail: its temporary file's name is taken by a directory.
fn break_catalog(dir: &Path) -> std::path::PathBuf {
    let tmp = dir.join("devices.json.tmp");
    std::fs::create_dir(&tmp).unwrap();
    tmp
}

fn names(thin: &Volumes) -> Vec<(String, u64)> {
    let list = thin.list().unwrap();
    list.into_iter().map(|d| (d.name, d.size)).collect()
}

#[test]
fn a_create_or_snapshot_whose_names_cannot_be_saved_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, META_BLOCKS));
    let thin = pool_with_uncommitted_writes(dir.path(), &store, 4096);
    let before = names(&thin);
    let ids_before = thin.pool().meta().device_ids();
    let tmp = break_catalog(dir.path());
    assert!(thin.create("x", DISK).is_err());
    assert!(thin.snapshot_many(&[("a", "s1"), ("b", "s2")]).is_err());
    assert_eq!(
        names(&thin),
        before,
        "a failed create or snapshot is listed"
    );
    assert_eq!(thin.pool().meta().device_ids(), ids_before);
    assert_eq!(thin.pool().mode(), PoolMode::Write);
    assert_writes_readable(&thin, "after the failed create and snapshot");
    std::fs::remove_dir(&tmp).unwrap();
    // The names are free, and nothing nameless turns up at the next start.
    thin.create("x", DISK).unwrap();
    thin.snapshot("a", "s1").unwrap();
    drop(thin);
    let thin = open(dir.path(), &store, 4096);
    let mut want = before.clone();
    want.push(("s1".into(), DISK));
    want.push(("x".into(), DISK));
    want.sort();
    assert_eq!(names(&thin), want);
    assert_writes_readable(&thin, "after a reopen");
}

#[test]
fn a_resize_whose_size_cannot_be_saved_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, META_BLOCKS));
    let thin = pool_with_uncommitted_writes(dir.path(), &store, 4096);
    let a = thin.device("a").unwrap();
    let tmp = break_catalog(dir.path());
    assert!(thin.resize("a", 2 * DISK).is_err());
    let listed = names(&thin).into_iter().find(|(n, _)| n == "a").unwrap().1;
    assert_eq!(listed, DISK, "the listing shows a size that was not saved");
    assert_eq!(a.size(), DISK);
    std::fs::remove_dir(&tmp).unwrap();
    thin.resize("a", 2 * DISK).unwrap();
    assert_eq!(a.size(), 2 * DISK);
}

/// The metadata device fails after the reservation's first commit: half a reservation may be
/// in the metadata, so the pool must stop changing it, and say so.
#[test]
fn a_metadata_snapshot_reservation_failing_part_way_turns_the_pool_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CrashStore::new(4096, META_BLOCKS));
    let thin = pool_with_uncommitted_writes(dir.path(), &store, 4096);
    thin.device("a").unwrap().flush().unwrap();
    // The first commit has nothing to write but the superblock.
    store.fail_after_writes(1, WriteFault::Error);
    assert!(thin.reserve_metadata_snap().is_err());
    assert!(thin.pool().meta().is_read_only());
    assert_eq!(
        thin.pool().mode(),
        PoolMode::ReadOnly,
        "the metadata stopped changing but the pool says it is writable"
    );
    store.clear_faults();
    assert_writes_readable(&thin, "after the failed reservation");
    drop(thin);
    let thin = open(dir.path(), &store, 4096);
    assert!(thin.pool().meta().metadata_snap().is_none());
    assert_writes_readable(&thin, "after a reopen");
}
