//! The memory limit, eviction order and write-back under pressure.

use super::support::*;
use crate::bufio::BufioError;

#[test]
fn memory_limit_holds_under_a_workload_larger_than_the_limit() {
    let limit_blocks = 8;
    let (store, cache) = mem_cache(256, limit_blocks);
    let limit = (limit_blocks * BS) as u64;
    let mut x: u64 = 12345;
    for i in 0..3000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let block = (x >> 33) % 256;
        match i % 4 {
            0 => put(&cache, block, (i % 251) as u8),
            1 => drop(cache.new_block(block).unwrap()),
            _ => drop(cache.read(block).unwrap()),
        }
        let stats = cache.stats();
        assert!(
            stats.cached_bytes <= limit,
            "{} cached bytes over a {limit}-byte limit",
            stats.cached_bytes
        );
        assert_eq!(stats.cached_bytes, stats.cached_blocks * BS as u64);
    }
    let stats = cache.stats();
    assert!(stats.evictions > 0);
    assert!(
        store.io_counts().writes > 0,
        "dirty blocks were written back to make room"
    );
}

#[test]
fn lru_evicts_the_coldest_block() {
    let (_store, cache) = mem_cache(16, 4);
    for b in 0..4 {
        drop(cache.read(b).unwrap());
    }
    for b in [0, 2, 3] {
        drop(cache.read(b).unwrap());
    }
    drop(cache.read(4).unwrap());
    assert!(!cache.contains(1), "block 1 was the least recently used");
    for b in [0, 2, 3, 4] {
        assert!(cache.contains(b), "block {b} should still be cached");
    }
}

#[test]
fn blocks_read_once_go_before_blocks_read_twice() {
    let (_store, cache) = mem_cache(16, 4);
    drop(cache.read(0).unwrap());
    drop(cache.read(0).unwrap());
    for b in 1..4 {
        drop(cache.read(b).unwrap());
    }
    drop(cache.read(4).unwrap());
    drop(cache.read(5).unwrap());
    assert!(cache.contains(0));
    assert!(!cache.contains(1) && !cache.contains(2));
}

#[test]
fn dirty_buffers_are_written_back_before_they_are_evicted() {
    let (store, cache) = mem_cache(64, 4);
    for b in 0..4 {
        put(&cache, b, b as u8 + 1);
    }
    drop(cache.read(10).unwrap());
    assert!(store.io_counts().writes >= 1);
    for b in 0..4 {
        assert_eq!(&cache.read(b).unwrap()[..], &filled(b as u8 + 1)[..]);
    }
    assert!(cache.stats().cached_bytes <= (4 * BS) as u64);
}

#[test]
fn the_cache_is_full_when_every_buffer_is_held() {
    let (_store, cache) = mem_cache(16, 3);
    let a = cache.read(0).unwrap();
    let b = cache.write(1).unwrap();
    let c = cache.new_block(2).unwrap();
    assert!(matches!(cache.read(3), Err(BufioError::CacheFull)));
    assert!(matches!(cache.new_block(3), Err(BufioError::CacheFull)));
    drop(a);
    assert!(cache.read(3).is_ok());
    drop((b, c));
}

#[test]
fn held_guards_are_never_evicted() {
    let (_store, cache) = mem_cache(64, 4);
    let held = cache.read(0).unwrap();
    for b in 1..40 {
        drop(cache.read(b).unwrap());
    }
    assert!(cache.contains(0));
    drop(held);
}

#[test]
fn prefetch_never_evicts_dirty_buffers() {
    let (store, cache) = mem_cache(64, 4);
    for b in 0..4 {
        put(&cache, b, 1);
    }
    cache.prefetch(&[10, 11, 12]);
    // The worker runs jobs in order: once the write-back is done, so is the prefetch.
    cache.write_dirty_async();
    assert!(eventually(|| cache.stats().dirty_blocks == 0));
    assert_eq!(
        store.io_counts().reads,
        4,
        "only the four reads that put() made"
    );
    for b in 0..4 {
        assert_eq!(store.peek(b), filled(1));
    }
}

#[test]
fn a_limit_below_one_block_still_caches_one() {
    let (_store, cache) = mem_cache(16, 0);
    assert_eq!(cache.memory_limit(), BS);
    drop(cache.read(1).unwrap());
    drop(cache.read(2).unwrap());
    assert_eq!(cache.stats().cached_blocks, 1);
}

#[test]
fn release_move_at_the_limit_overshoots_by_at_most_one_block_and_recovers() {
    let (_store, cache) = mem_cache(16, 2);
    let keep = cache.read(0).unwrap();
    let mut moving = cache.write(1).unwrap();
    moving.fill(3);
    cache.release_move(moving, 2).unwrap();
    let stats = cache.stats();
    assert!(stats.cached_bytes <= (2 * BS) as u64);
    assert_eq!(&cache.read(2).unwrap()[..], &filled(3)[..]);
    drop(keep);
}
