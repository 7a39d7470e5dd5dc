use std::sync::Arc;

use crate::bufio::{BufferCache, BufioConfig, MemStore};
use crate::engine::pdata::check::check_pool;

use super::PoolMetadata;
use crate::engine::thin::ThinError;

fn cache(store: &Arc<MemStore>) -> Arc<BufferCache> {
    Arc::new(BufferCache::new(store.clone(), BufioConfig::default()))
}

fn new_pool(nr_data: u64) -> (Arc<MemStore>, PoolMetadata) {
    let store = Arc::new(MemStore::new(4096, 1024));
    let pool = PoolMetadata::format(cache(&store), 128, nr_data).unwrap();
    (store, pool)
}

fn assert_consistent(pool: &PoolMetadata) {
    let report = check_pool(pool.block_manager());
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn mappings_survive_commit_and_reopen() {
    let (store, mut pool) = new_pool(100);
    pool.create_thin(1).unwrap();
    for v in [0, 5, 6, 1000] {
        let b = pool.alloc_data_block().unwrap();
        pool.insert_block(1, v, b).unwrap();
    }
    pool.commit().unwrap();
    assert_consistent(&pool);
    let reopened = PoolMetadata::open(cache(&store)).unwrap();
    assert_eq!(reopened.mapped_count(1).unwrap(), 4);
    assert!(reopened.find_block(1, 5, true).unwrap().is_some());
    assert!(reopened.find_block(1, 7, true).unwrap().is_none());
    assert_eq!(reopened.free_data_blocks(), 96);
}

#[test]
fn snapshots_share_blocks_until_either_side_is_rewritten() {
    let (_store, mut pool) = new_pool(100);
    pool.create_thin(1).unwrap();
    let b = pool.alloc_data_block().unwrap();
    pool.insert_block(1, 0, b).unwrap();
    pool.create_snap(2, 1).unwrap();
    let o = pool.find_block(1, 0, true).unwrap().unwrap();
    let s = pool.find_block(2, 0, true).unwrap().unwrap();
    assert_eq!(o.block, s.block);
    assert!(o.shared && s.shared);
    // Sharing is told by time: the data block's count only rises when a shared leaf is copied.
    let nb = pool.alloc_data_block().unwrap();
    pool.insert_block(1, 0, nb).unwrap();
    assert!(!pool.find_block(1, 0, true).unwrap().unwrap().shared);
    assert_eq!(pool.find_block(2, 0, true).unwrap().unwrap().block, b);
    assert!(!pool.block_is_shared(b).unwrap());
    pool.commit().unwrap();
    assert_consistent(&pool);
    pool.delete_thin(2).unwrap();
    pool.commit().unwrap();
    assert_eq!(pool.data_block_count(b).unwrap(), 0);
    assert_consistent(&pool);
}

#[test]
fn abort_returns_to_the_last_commit() {
    let (_store, mut pool) = new_pool(100);
    pool.create_thin(1).unwrap();
    pool.commit().unwrap();
    let b = pool.alloc_data_block().unwrap();
    pool.insert_block(1, 3, b).unwrap();
    pool.create_thin(2).unwrap();
    pool.abort().unwrap();
    assert!(pool.find_block(1, 3, true).unwrap().is_none());
    assert!(matches!(pool.details(2), Err(ThinError::NoSuchDevice(2))));
    assert_eq!(pool.free_data_blocks(), 100);
    assert_consistent(&pool);
}

#[test]
fn data_space_runs_out_cleanly_and_grows() {
    let (_store, mut pool) = new_pool(2);
    pool.create_thin(1).unwrap();
    for v in 0..2 {
        let b = pool.alloc_data_block().unwrap();
        pool.insert_block(1, v, b).unwrap();
    }
    assert!(matches!(
        pool.alloc_data_block(),
        Err(ThinError::NoDataSpace)
    ));
    assert!(matches!(
        pool.resize_data_dev(1),
        Err(ThinError::CannotShrink { .. })
    ));
    pool.resize_data_dev(4).unwrap();
    assert!(pool.alloc_data_block().is_ok());
}

#[test]
fn transaction_ids_are_compare_and_set_and_devices_open_once() {
    let (_store, mut pool) = new_pool(10);
    pool.set_transaction_id(0, 7).unwrap();
    assert!(matches!(
        pool.set_transaction_id(0, 8),
        Err(ThinError::TransactionIdMismatch {
            expected: 0,
            found: 7
        })
    ));
    pool.create_thin(1).unwrap();
    pool.open_device(1).unwrap();
    assert!(matches!(pool.open_device(1), Err(ThinError::DeviceOpen(1))));
    pool.close_device(1);
    pool.open_device(1).unwrap();
}

#[test]
fn a_metadata_snapshot_is_held_and_released() {
    let (_store, mut pool) = new_pool(100);
    pool.create_thin(1).unwrap();
    let b = pool.alloc_data_block().unwrap();
    pool.insert_block(1, 0, b).unwrap();
    let held = pool.reserve_metadata_snap().unwrap();
    assert_eq!(pool.metadata_snap(), Some(held));
    assert!(matches!(
        pool.reserve_metadata_snap(),
        Err(ThinError::MetadataSnapHeld)
    ));
    pool.remove_block(1, 0).unwrap();
    pool.commit().unwrap();
    assert_consistent(&pool);
    pool.release_metadata_snap().unwrap();
    pool.commit().unwrap();
    assert_eq!(pool.metadata_snap(), None);
    assert_consistent(&pool);
}

#[test]
fn mapped_ranges_stop_at_gaps_and_sharing_changes() {
    let (_store, mut pool) = new_pool(100);
    pool.create_thin(1).unwrap();
    for v in 10..14 {
        let b = pool.alloc_data_block().unwrap();
        pool.insert_block(1, v, b).unwrap();
    }
    let r = pool.find_mapped_range(1, 0, 100).unwrap().unwrap();
    assert_eq!((r.thin_begin, r.thin_end, r.maybe_shared), (10, 14, false));
    assert_eq!(pool.highest_mapped_block(1).unwrap(), Some(13));
    assert_eq!(pool.remove_range(1, 11, 13).unwrap(), 2);
    let r = pool.find_mapped_range(1, 0, 100).unwrap().unwrap();
    assert_eq!((r.thin_begin, r.thin_end), (10, 11));
    assert_eq!(pool.mapped_count(1).unwrap(), 2);
}

#[test]
fn the_threshold_callback_fires_when_metadata_runs_low() {
    let (_store, mut pool) = new_pool(10);
    let fired = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let f = fired.clone();
    pool.register_metadata_threshold(
        2000,
        Box::new(move |free| f.store(free, std::sync::atomic::Ordering::SeqCst)),
    );
    assert!(fired.load(std::sync::atomic::Ordering::SeqCst) < 2000);
}
