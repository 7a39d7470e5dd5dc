//! Several threads at once: shared loads, readers against writers, pressure.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use super::support::*;
use crate::bufio::{BlockStore, BufferCache, MemStore};

#[test]
fn concurrent_readers_of_an_uncached_block_share_one_read() {
    let mut trace = TraceStore::new(Arc::new(MemStore::new(BS, 16)));
    trace.read_delay = Duration::from_millis(20);
    let store = Arc::new(trace);
    let cache = Arc::new(BufferCache::new(store.clone(), config(8)));
    let barrier = Arc::new(Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (cache, barrier) = (Arc::clone(&cache), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                cache.read(7).unwrap().block()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 7);
    }
    assert_eq!(store.take_ops(), vec![Op::Read(7)]);
    assert_eq!(cache.stats().cached_blocks, 1);
}

#[test]
fn readers_never_see_a_half_written_block() {
    let (_store, cache) = mem_cache(8, 8);
    let cache = Arc::new(cache);
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let cache = Arc::clone(&cache);
            thread::spawn(move || {
                for i in 0..300u32 {
                    let mut g = cache.write(u64::from(i % 8)).unwrap();
                    let v = g[0].wrapping_add(1 + w);
                    g.fill(v);
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let cache = Arc::clone(&cache);
            thread::spawn(move || {
                for i in 0..600u64 {
                    let g = cache.read(i % 8).unwrap();
                    assert!(g.iter().all(|&b| b == g[0]), "torn block {}", g.block());
                }
            })
        })
        .collect();
    for t in writers.into_iter().chain(readers) {
        t.join().unwrap();
    }
}

#[test]
fn threads_under_memory_pressure_keep_every_write() {
    let nr_threads = 4u64;
    let per_thread = 24u64;
    let (store, cache) = mem_cache(nr_threads * per_thread, 12);
    let cache = Arc::new(cache);
    let threads: Vec<_> = (0..nr_threads)
        .map(|t| {
            let cache = Arc::clone(&cache);
            thread::spawn(move || {
                // Each thread owns its own blocks, so the final contents are known.
                for round in 1..=4u8 {
                    for i in 0..per_thread {
                        let block = t * per_thread + i;
                        cache.write(block).unwrap().fill(round + t as u8 * 16);
                        let g = cache.read(t * per_thread + (i * 7) % per_thread).unwrap();
                        assert!(g.iter().all(|&b| b == g[0]));
                    }
                    if round == 2 {
                        cache.write_dirty_async();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(cache.stats().cached_bytes <= (12 * BS) as u64);
    cache.write_dirty().unwrap();
    for t in 0..nr_threads {
        for i in 0..per_thread {
            assert_eq!(store.peek(t * per_thread + i), filled(4 + t as u8 * 16));
        }
    }
    assert!(cache.stats().evictions > 0);
    let _ = store.nr_blocks();
}

#[test]
fn write_dirty_waits_for_a_writer_on_another_thread() {
    let (store, cache) = mem_cache(8, 8);
    let cache = Arc::new(cache);
    put(&cache, 1, 1);
    let mut guard = cache.write(1).unwrap();
    let c2 = Arc::clone(&cache);
    let flusher = thread::spawn(move || c2.write_dirty().unwrap());
    thread::sleep(Duration::from_millis(30));
    guard.fill(2);
    drop(guard);
    flusher.join().unwrap();
    assert_eq!(store.peek(1), filled(2));
}
