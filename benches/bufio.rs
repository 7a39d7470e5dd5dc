//! Latency of the metadata cache's hot paths: hits (the btree lookup path), and misses that
//! evict a clean block.

// A benchmark over a memory store: any error is a bug, and aborting the run is the right answer.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use thinblk::bufio::{BufferCache, BufioConfig, MemStore};

const BS: usize = 4096;

fn cache(nr_blocks: u64, limit_blocks: usize) -> BufferCache {
    let store = Arc::new(MemStore::new(BS, nr_blocks));
    BufferCache::new(
        store,
        BufioConfig {
            block_size: BS,
            memory_limit: limit_blocks * BS,
        },
    )
}

fn hits(c: &mut Criterion) {
    let cache = cache(1024, 1024);
    for b in 0..1024 {
        drop(cache.read(b).unwrap());
    }
    let mut b = 0u64;
    c.bench_function("read_hit", |bench| {
        bench.iter(|| {
            b = (b + 1) & 1023;
            black_box(cache.read(b).unwrap()[0])
        })
    });
    c.bench_function("get_hit", |bench| {
        bench.iter(|| {
            b = (b + 1) & 1023;
            black_box(cache.get(b).map(|g| g[0]))
        })
    });
    c.bench_function("write_hit", |bench| {
        bench.iter(|| {
            b = (b + 1) & 1023;
            cache.write(b).unwrap()[0] = 1;
        })
    });
}

fn misses(c: &mut Criterion) {
    // Sequential reads over four times the cache: every read evicts a clean block.
    let cache = cache(4096, 1024);
    let mut b = 0u64;
    c.bench_function("read_miss_evicting_clean", |bench| {
        bench.iter(|| {
            b = (b + 1) % 4096;
            black_box(cache.read(b).unwrap()[0])
        })
    });
}

fn shared_hits(c: &mut Criterion) {
    // Several threads reading the same hot blocks, as queue workers walk a btree's top levels.
    let cache = Arc::new(cache(64, 64));
    for b in 0..64 {
        drop(cache.read(b).unwrap());
    }
    c.bench_function("read_hit_4_threads_same_8_blocks", |bench| {
        bench.iter_custom(|iters| {
            let per_thread = iters / 4 + 1;
            let start = Instant::now();
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let cache = Arc::clone(&cache);
                    thread::spawn(move || {
                        for i in 0..per_thread {
                            black_box(cache.read(i & 7).unwrap()[0]);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            // Wall time over all threads' work: throughput, not per-call latency.
            start.elapsed()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = hits, misses, shared_hits
}
criterion_main!(benches);
