//! Read, write, new, get, tags, forget, release_move, discard and write-back order.

use std::sync::Arc;

use super::support::*;
use crate::bufio::{BlockStore, BufferCache, BufioError, IoCounts, MemStore};

#[test]
fn reads_of_a_cached_block_do_no_io() {
    let (store, cache) = mem_cache(16, 8);
    drop(cache.read(3).unwrap());
    let before = store.io_counts();
    for _ in 0..10 {
        assert_eq!(cache.read(3).unwrap().len(), BS);
    }
    assert_eq!(store.io_counts(), before);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.reads), (10, 1, 1));
}

#[test]
fn an_uncached_read_returns_the_store_contents() {
    let (store, cache) = mem_cache(16, 8);
    store.write_block(5, &filled(0xab)).unwrap();
    let guard = cache.read(5).unwrap();
    assert_eq!(&guard[..], &filled(0xab)[..]);
    assert_eq!(guard.block(), 5);
}

#[test]
fn get_returns_only_cached_blocks_and_never_does_io() {
    let (store, cache) = mem_cache(16, 8);
    assert!(cache.get(2).is_none());
    assert_eq!(store.io_counts().reads, 0);
    drop(cache.read(2).unwrap());
    assert_eq!(cache.get(2).unwrap().block(), 2);
    assert!(cache.get(99).is_none());
    assert_eq!(store.io_counts().reads, 1);
}

#[test]
fn get_does_not_wait_for_a_block_being_modified() {
    let (_store, cache) = mem_cache(16, 8);
    let guard = cache.write(1).unwrap();
    assert!(cache.get(1).is_none());
    drop(guard);
    assert!(cache.get(1).is_some());
}

#[test]
fn new_block_is_zero_filled_and_dirty_without_reading() {
    let (store, cache) = mem_cache(16, 8);
    store.write_block(4, &filled(9)).unwrap();
    let mut guard = cache.new_block(4).unwrap();
    assert!(guard.iter().all(|&b| b == 0));
    guard[0] = 1;
    drop(guard);
    assert_eq!(store.io_counts().reads, 0);
    assert_eq!(cache.stats().dirty_blocks, 1);
    cache.write_dirty().unwrap();
    assert_eq!(store.peek(4)[..2], [1, 0]);
}

#[test]
fn new_block_over_a_cached_block_zeroes_it_and_clears_its_tag() {
    let (store, cache) = mem_cache(16, 8);
    store.write_block(4, &filled(9)).unwrap();
    cache.read(4).unwrap().set_tag(77);
    let guard = cache.new_block(4).unwrap();
    assert!(guard.iter().all(|&b| b == 0));
    assert_eq!(guard.tag(), 0);
}

#[test]
fn changes_are_visible_to_readers_before_write_back() {
    let (store, cache) = mem_cache(16, 8);
    put(&cache, 7, 0x5a);
    assert_eq!(&cache.read(7).unwrap()[..], &filled(0x5a)[..]);
    assert_eq!(store.peek(7), filled(0));
}

#[test]
fn a_released_write_guard_leaves_the_buffer_dirty_until_write_dirty() {
    let (store, cache) = mem_cache(16, 8);
    let guard = cache.write(2).unwrap();
    assert_eq!(cache.stats().dirty_blocks, 0, "dirty only once released");
    drop(guard);
    assert_eq!(cache.stats().dirty_blocks, 1);
    cache.write_dirty().unwrap();
    assert_eq!(cache.stats().dirty_blocks, 0);
    assert_eq!(store.io_counts().writes, 1);
    cache.write_dirty().unwrap();
    assert_eq!(
        store.io_counts().writes,
        1,
        "clean buffers are not rewritten"
    );
}

#[test]
fn write_dirty_writes_in_ascending_block_order_then_flushes() {
    let (store, cache) = traced_cache(64, 32);
    for block in [40, 3, 17, 9, 63, 0, 22] {
        cache.new_block(block).unwrap()[0] = block as u8;
    }
    store.take_ops();
    cache.write_dirty().unwrap();
    let expected: Vec<Op> = [0, 3, 9, 17, 22, 40, 63]
        .into_iter()
        .map(Op::Write)
        .chain([Op::Flush])
        .collect();
    assert_eq!(store.take_ops(), expected);
}

#[test]
fn write_dirty_with_nothing_dirty_still_flushes() {
    let (store, cache) = mem_cache(16, 8);
    cache.write_dirty().unwrap();
    assert_eq!(
        store.io_counts(),
        IoCounts {
            reads: 0,
            writes: 0,
            flushes: 1
        }
    );
}

#[test]
fn blocks_past_the_end_are_rejected_naming_the_device_size() {
    let (_store, cache) = mem_cache(16, 8);
    for result in [
        cache.read(16).map(drop),
        cache.write(16).map(drop),
        cache.new_block(u64::MAX).map(drop),
    ] {
        match result {
            Err(BufioError::OutOfRange { block, nr_blocks }) => {
                assert!(block >= 16);
                assert_eq!(nr_blocks, 16);
            }
            other => panic!("expected OutOfRange, got {other:?}"),
        }
    }
}

#[test]
fn resizing_the_store_extends_the_usable_range() {
    let (store, cache) = mem_cache(16, 8);
    assert!(cache.read(20).is_err());
    store.resize(32).unwrap();
    assert_eq!(cache.nr_blocks(), 32);
    put(&cache, 20, 3);
    cache.write_dirty().unwrap();
    assert_eq!(store.peek(20), filled(3));
}

#[test]
fn tag_is_zero_after_a_read_from_disk_and_kept_across_hits() {
    let (_store, cache) = mem_cache(16, 8);
    let guard = cache.read(1).unwrap();
    assert_eq!(guard.tag(), 0);
    guard.set_tag(0xfeed);
    drop(guard);
    assert_eq!(cache.read(1).unwrap().tag(), 0xfeed);
    assert_eq!(cache.write(1).unwrap().tag(), 0xfeed);
}

#[test]
fn tag_is_cleared_when_a_forgotten_block_is_read_again() {
    let (_store, cache) = mem_cache(16, 8);
    cache.read(1).unwrap().set_tag(5);
    cache.forget(1);
    assert_eq!(cache.read(1).unwrap().tag(), 0);
}

#[test]
fn forget_drops_an_unheld_block_and_discards_its_changes() {
    let (store, cache) = mem_cache(16, 8);
    store.write_block(3, &filled(1)).unwrap();
    put(&cache, 3, 2);
    cache.forget(3);
    assert!(!cache.contains(3));
    assert_eq!(cache.stats().cached_bytes, 0);
    assert_eq!(&cache.read(3).unwrap()[..], &filled(1)[..]);
    cache.write_dirty().unwrap();
    assert_eq!(store.peek(3), filled(1));
}

#[test]
fn forget_leaves_a_held_block_cached() {
    let (_store, cache) = mem_cache(16, 8);
    let guard = cache.read(3).unwrap();
    cache.forget(3);
    assert!(cache.contains(3));
    drop(guard);
    cache.forget(3);
    assert!(!cache.contains(3));
}

#[test]
fn release_move_gives_the_contents_to_the_new_block_and_forgets_the_old() {
    let (store, cache) = mem_cache(16, 8);
    store.write_block(2, &filled(1)).unwrap();
    let mut guard = cache.write(2).unwrap();
    guard.fill(7);
    guard.set_tag(42);
    cache.release_move(guard, 9).unwrap();
    assert!(!cache.contains(2));
    let moved = cache.read(9).unwrap();
    assert_eq!(&moved[..], &filled(7)[..]);
    assert_eq!(moved.tag(), 42);
    drop(moved);
    assert_eq!(&cache.read(2).unwrap()[..], &filled(1)[..]);
    cache.write_dirty().unwrap();
    assert_eq!(store.peek(9), filled(7));
    assert_eq!(store.peek(2), filled(1), "the old block is never written");
    assert_eq!(cache.stats().cached_blocks, 2);
}

#[test]
fn release_move_onto_a_cached_block_replaces_its_contents() {
    let (store, cache) = mem_cache(16, 8);
    put(&cache, 5, 5);
    let mut guard = cache.write(6).unwrap();
    guard.fill(6);
    cache.release_move(guard, 5).unwrap();
    assert_eq!(&cache.read(5).unwrap()[..], &filled(6)[..]);
    cache.write_dirty().unwrap();
    assert_eq!(store.peek(5), filled(6));
    assert_eq!(store.peek(6), filled(0));
}

#[test]
fn release_move_to_the_same_block_just_dirties_it() {
    let (store, cache) = mem_cache(16, 8);
    let mut guard = cache.write(4).unwrap();
    guard.fill(4);
    cache.release_move(guard, 4).unwrap();
    cache.write_dirty().unwrap();
    assert_eq!(store.peek(4), filled(4));
}

#[test]
fn release_move_out_of_range_fails_and_discards_the_change() {
    let (store, cache) = mem_cache(16, 8);
    let mut guard = cache.write(4).unwrap();
    guard.fill(4);
    let err = cache.release_move(guard, 100).unwrap_err();
    assert!(matches!(err, BufioError::OutOfRange { block: 100, .. }));
    cache.write_dirty().unwrap();
    assert_eq!(store.peek(4), filled(0));
    assert_eq!(&cache.read(4).unwrap()[..], &filled(0)[..]);
}

#[test]
fn discard_dirty_drops_dirty_buffers_without_writing() {
    let (store, cache) = mem_cache(16, 8);
    store.write_block(1, &filled(1)).unwrap();
    drop(cache.read(0).unwrap());
    put(&cache, 1, 9);
    cache.new_block(2).unwrap().fill(9);
    cache.discard_dirty();
    let stats = cache.stats();
    assert_eq!((stats.cached_blocks, stats.dirty_blocks), (1, 0));
    assert_eq!(stats.cached_bytes, BS as u64);
    cache.write_dirty().unwrap();
    assert_eq!(store.io_counts().writes, 1, "only the test's own write");
    assert_eq!(&cache.read(1).unwrap()[..], &filled(1)[..]);
    cache.forget_all_dirty();
}

#[test]
fn write_dirty_async_writes_in_the_background() {
    let (store, cache) = mem_cache(16, 8);
    for b in 0..4 {
        put(&cache, b, b as u8 + 1);
    }
    cache.write_dirty_async();
    assert!(eventually(|| cache.stats().dirty_blocks == 0));
    assert_eq!(store.peek(3), filled(4));
    assert_eq!(
        store.io_counts().flushes,
        0,
        "async write-back does not flush"
    );
    cache.write_dirty().unwrap();
}

#[test]
fn prefetched_blocks_are_read_once_and_then_hit() {
    let (store, cache) = mem_cache(64, 32);
    cache.prefetch(&[10, 11, 12, 11, 500]);
    assert!(eventually(|| (10..13).all(|b| cache.contains(b))));
    assert_eq!(store.io_counts().reads, 3);
    for b in 10..13 {
        drop(cache.read(b).unwrap());
    }
    assert_eq!(store.io_counts().reads, 3);
    assert_eq!(cache.stats().hits, 3);
}

#[test]
fn the_cache_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<BufferCache>();
    shareable::<crate::bufio::CrashStore>();
    shareable::<crate::bufio::FileStore>();
    let cache: Arc<BufferCache> = Arc::new(mem_cache(4, 4).1);
    let c2 = Arc::clone(&cache);
    std::thread::spawn(move || drop(c2.read(1).unwrap()))
        .join()
        .unwrap();
    assert!(cache.contains(1));
}

#[test]
fn a_file_store_works_under_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    let store = Arc::new(crate::bufio::FileStore::create(&path, 4096, 32).unwrap());
    let cache = BufferCache::new(store, crate::bufio::BufioConfig::default());
    cache.new_block(31).unwrap().fill(0xee);
    cache.write_dirty().unwrap();
    drop(cache);
    let store = crate::bufio::FileStore::open(&path, 4096).unwrap();
    let mut buf = vec![0; 4096];
    store.read_block(31, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xee));
}

#[test]
fn a_store_with_another_block_size_wins_over_the_config() {
    let store = Arc::new(MemStore::new(1024, 4));
    let cache = BufferCache::new(store, config(4));
    assert_eq!(cache.block_size(), 1024);
    assert_eq!(cache.read(0).unwrap().len(), 1024);
}
