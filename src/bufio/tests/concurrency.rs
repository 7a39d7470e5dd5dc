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

#[test]
fn forget_and_release_move_racing_write_back_never_resurrect_old_data() {
    let nr_threads = 3u64;
    let per_thread = 8u64;
    let (store, cache) = mem_cache(nr_threads * per_thread, 10);
    let cache = Arc::new(cache);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let (cache, stop) = (Arc::clone(&cache), Arc::clone(&stop));
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                cache.write_dirty_async();
                cache.write_dirty().unwrap();
            }
        })
    };
    let workers: Vec<_> = (0..nr_threads)
        .map(|t| {
            let (cache, store) = (Arc::clone(&cache), Arc::clone(&store));
            thread::spawn(move || {
                let base = t * per_thread;
                let mut model = vec![0u8; per_thread as usize];
                let mut x = t + 1;
                for i in 0..400u32 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let a = (x >> 33) % per_thread;
                    let b = (x >> 40) % per_thread;
                    let v = (i % 250) as u8 + 1;
                    match i % 5 {
                        0 | 1 => {
                            cache.write(base + a).unwrap().fill(v);
                            model[a as usize] = v;
                        }
                        2 => {
                            cache.forget(base + a);
                            model[a as usize] = store.peek(base + a)[0];
                        }
                        3 => {
                            let mut g = cache.write(base + a).unwrap();
                            g.fill(v);
                            cache.release_move(g, base + b).unwrap();
                            model[b as usize] = v;
                            if a != b {
                                model[a as usize] = store.peek(base + a)[0];
                            }
                        }
                        _ => {
                            let g = cache.read(base + a).unwrap();
                            assert_eq!(
                                &g[..],
                                &filled(model[a as usize])[..],
                                "block {}",
                                base + a
                            );
                        }
                    }
                }
                model
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flusher.join().unwrap();
    cache.write_dirty().unwrap();
    for (t, model) in models.iter().enumerate() {
        for (i, &v) in model.iter().enumerate() {
            let block = t as u64 * per_thread + i as u64;
            assert_eq!(store.peek(block), filled(v), "block {block}");
        }
    }
}

#[test]
fn get_returns_nothing_while_a_block_is_being_read_in() {
    let store = Arc::new(TraceStore::new(Arc::new(MemStore::new(BS, 16))));
    let cache = Arc::new(BufferCache::new(store.clone(), config(8)));
    store.close_gate();
    let reader = {
        let cache = Arc::clone(&cache);
        thread::spawn(move || drop(cache.read(3).unwrap()))
    };
    assert!(eventually(|| cache.contains(3)));
    assert!(cache.get(3).is_none(), "get must not wait for the read");
    store.open_gate();
    reader.join().unwrap();
    assert!(cache.get(3).is_some());
}

#[test]
fn every_waiter_on_a_failing_read_gets_an_error_naming_the_block() {
    let store = Arc::new(crate::bufio::CrashStore::new(BS, 16));
    store.fail_read(9);
    let cache = Arc::new(BufferCache::new(store.clone(), config(8)));
    let barrier = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (cache, barrier) = (Arc::clone(&cache), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                match cache.read(9) {
                    Err(crate::bufio::BufioError::Io { block, .. }) => block,
                    other => panic!("expected an Io error, got {other:?}"),
                }
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 9);
    }
    assert_eq!(cache.stats().cached_bytes, 0);
    store.clear_faults();
    assert!(cache.read(9).is_ok());
}
