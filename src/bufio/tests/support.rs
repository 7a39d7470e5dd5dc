//! Helpers shared by the cache tests.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::bufio::{BlockStore, BufferCache, BufioConfig, MemStore};

pub const BS: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read(u64),
    Write(u64),
    Flush,
}

/// Wraps a store, recording every operation and optionally slowing reads down so that
/// threads overlap.
pub struct TraceStore {
    pub inner: Arc<dyn BlockStore>,
    pub ops: Mutex<Vec<Op>>,
    pub read_delay: Duration,
    /// While true, reads wait: lets a test hold a load in flight for as long as it needs.
    gate_closed: Mutex<bool>,
    gate: Condvar,
}

impl TraceStore {
    pub fn new(inner: Arc<dyn BlockStore>) -> Self {
        TraceStore {
            inner,
            ops: Mutex::new(Vec::new()),
            read_delay: Duration::ZERO,
            gate_closed: Mutex::new(false),
            gate: Condvar::new(),
        }
    }

    pub fn close_gate(&self) {
        *self.gate_closed.lock() = true;
    }

    pub fn open_gate(&self) {
        *self.gate_closed.lock() = false;
        self.gate.notify_all();
    }

    pub fn take_ops(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock())
    }
}

impl BlockStore for TraceStore {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn nr_blocks(&self) -> u64 {
        self.inner.nr_blocks()
    }
    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        self.ops.lock().push(Op::Read(block));
        let mut closed = self.gate_closed.lock();
        while *closed {
            self.gate.wait(&mut closed);
        }
        drop(closed);
        if !self.read_delay.is_zero() {
            std::thread::sleep(self.read_delay);
        }
        self.inner.read_block(block, buf)
    }
    fn write_block(&self, block: u64, buf: &[u8]) -> io::Result<()> {
        self.ops.lock().push(Op::Write(block));
        self.inner.write_block(block, buf)
    }
    fn flush(&self) -> io::Result<()> {
        self.ops.lock().push(Op::Flush);
        self.inner.flush()
    }
    fn resize(&self, nr_blocks: u64) -> io::Result<()> {
        self.inner.resize(nr_blocks)
    }
}

pub fn config(limit_blocks: usize) -> BufioConfig {
    BufioConfig {
        block_size: BS,
        memory_limit: limit_blocks * BS,
    }
}

/// A cache of `limit_blocks` blocks over a memory store of `nr_blocks`.
pub fn mem_cache(nr_blocks: u64, limit_blocks: usize) -> (Arc<MemStore>, BufferCache) {
    let store = Arc::new(MemStore::new(BS, nr_blocks));
    let cache = BufferCache::new(store.clone(), config(limit_blocks));
    (store, cache)
}

/// A cache over a tracing memory store.
pub fn traced_cache(nr_blocks: u64, limit_blocks: usize) -> (Arc<TraceStore>, BufferCache) {
    let store = Arc::new(TraceStore::new(Arc::new(MemStore::new(BS, nr_blocks))));
    let cache = BufferCache::new(store.clone(), config(limit_blocks));
    (store, cache)
}

pub fn filled(v: u8) -> Vec<u8> {
    vec![v; BS]
}

/// Writes `v` into every byte of `block` through the cache.
pub fn put(cache: &BufferCache, block: u64, v: u8) {
    cache.write(block).unwrap().fill(v);
}

/// Waits (briefly) until `cond` holds; for effects of the background thread.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..2500 {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}
