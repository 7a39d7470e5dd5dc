//! The cache as another crate sees it: everything a block manager needs is exported, and a
//! power-cut test can be written from outside the bufio module.

use std::sync::Arc;

use thinblk::bufio::{
    BlockStore, BufferCache, BufioConfig, BufioError, CacheStats, CrashStore, FileStore, ReadGuard,
    WriteFault, WriteGuard,
};

fn stamp(guard: &mut WriteGuard, value: u8) {
    guard.fill(value);
    guard.set_tag(u32::from(value));
}

fn first_byte(guard: &ReadGuard) -> u8 {
    guard.first().copied().unwrap_or_default()
}

#[test]
fn a_transaction_commits_or_vanishes_across_a_power_cut() -> Result<(), BufioError> {
    let store = Arc::new(CrashStore::new(4096, 64));
    let cache = BufferCache::new(store.clone(), BufioConfig::default());

    // Commit 1: a data block, then the "superblock" pointing at it.
    stamp(&mut cache.new_block(10)?, 1);
    cache.write_dirty()?;
    stamp(&mut cache.new_block(0)?, 1);
    cache.write_dirty()?;

    // Transaction 2 never commits: shadow block 10 to 11, then the power goes.
    let old = cache.write(10)?;
    cache.release_move(old, 11)?;
    stamp(&mut cache.write(11)?, 2);
    cache.write_dirty_async();
    drop(cache);
    store.cut_power();

    let cache = BufferCache::new(store.clone(), BufioConfig::default());
    assert_eq!(first_byte(&cache.read(0)?), 1);
    assert_eq!(first_byte(&cache.read(10)?), 1);
    assert_eq!(first_byte(&cache.read(11)?), 0);
    assert_eq!(
        cache.read(10)?.tag(),
        0,
        "tags start at zero after a read from disk"
    );
    let stats: CacheStats = cache.stats();
    assert_eq!(stats.reads, 3);
    Ok(())
}

#[test]
fn a_device_that_stops_writing_is_reported_with_the_block() {
    let store = Arc::new(CrashStore::new(4096, 8));
    let cache = BufferCache::new(store.clone(), BufioConfig::default());
    store.fail_after_writes(0, WriteFault::Error);
    drop(cache.new_block(5));
    let err = cache.write_dirty().err();
    assert!(
        matches!(err, Some(BufioError::Io { block: 5, .. })),
        "{err:?}"
    );
    assert!(err.is_some_and(|e| e.to_string().contains("block 5")));
}

#[test]
fn a_file_backed_cache_survives_reopening() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("metadata");
    {
        let store: Arc<dyn BlockStore> = Arc::new(FileStore::create(&path, 4096, 16)?);
        let cache = BufferCache::new(store, BufioConfig::default());
        stamp(&mut cache.new_block(15)?, 7);
        cache.write_dirty()?;
    }
    let store = FileStore::open_read_only(&path, 4096)?;
    store.lock_shared()?;
    let cache = BufferCache::new(Arc::new(store), BufioConfig::default());
    assert_eq!(first_byte(&cache.read(15)?), 7);
    assert!(cache.read(16).is_err());
    Ok(())
}
