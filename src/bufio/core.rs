//! The shared state behind a [`super::BufferCache`]: the block map, the memory accounting and
//! eviction. Write-back lives in `writeback.rs`, the background thread in `worker.rs`.
//!
//! Lock order, outermost first: the clock, then a shard, then (only in write-back) a buffer's
//! data lock, then its `io` mutex. Nothing here blocks on a buffer's data lock while holding
//! the clock or a shard, and eviction never blocks on a data lock at all, so a caller holding
//! guards can always ask for more without the cache itself deadlocking it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::lock_api::ArcRwLockWriteGuard;
use parking_lot::{Mutex, RawRwLock, RwLock};

use super::buffer::{Buffer, Data, Pin};
use super::error::{BufioError, Result};
use super::guard::{ReadGuard, WriteGuard};
use super::lru::{Clock, Verdict};
use super::stats::{CacheStats, Counters};
use super::store::BlockStore;

/// Shards of the block map, so lookups from many queue workers rarely meet on one lock.
const NR_SHARDS: usize = 16;

/// Dirty buffers written back together when eviction finds nothing clean: enough to amortise
/// the sweep, few enough that one reader does not stall behind a long write-back.
const WRITEBACK_BATCH: usize = 16;

type Map = HashMap<u64, Arc<Buffer>, BuildBlockHasher>;

/// Block numbers are not chosen by an adversary who could exploit a weak hash to flood one
/// bucket (a corrupt image can only name blocks the cache then reads one by one), so a
/// multiply-and-fold hash replaces SipHash on the lookup path.
#[derive(Default, Clone, Copy)]
struct BuildBlockHasher;

#[derive(Default)]
struct BlockHasher(u64);

impl std::hash::BuildHasher for BuildBlockHasher {
    type Hasher = BlockHasher;

    fn build_hasher(&self) -> BlockHasher {
        BlockHasher(0)
    }
}

impl std::hash::Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        // Fold the well-mixed high half down: a shard's keys share their low bits.
        let h = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// How hard a new buffer may push to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pressure {
    /// Evict clean buffers, and write dirty ones back when no clean one is left.
    WriteBack,
    /// Evict clean buffers only; used by prefetch, which must not cause writes.
    CleanOnly,
    /// Evict clean buffers if possible, else exceed the limit by this one block; used by
    /// `release_move`, which frees the block it moves from straight afterwards.
    Overshoot,
}

/// What one sweep of the clock achieved.
enum Sweep {
    Evicted,
    /// Nothing clean was evictable; these cold dirty buffers could be written back.
    Dirty(Vec<Arc<Buffer>>),
    Nothing,
}

enum Evict {
    Done,
    Stale,
    Busy,
}

/// A freshly inserted buffer, write-locked by the thread that created it.
pub(super) type Loaded = (ArcRwLockWriteGuard<RawRwLock, Data>, Pin);

pub(super) struct Inner {
    pub store: Arc<dyn BlockStore>,
    pub block_size: usize,
    pub limit: usize,
    shards: Box<[RwLock<Map>]>,
    clock: Mutex<Clock>,
    cached_bytes: AtomicUsize,
    pub counters: Counters,
    /// Serialises write-back passes, so each pass writes in ascending order and a synchronous
    /// `write_dirty` sees the outcome of an asynchronous one that ran before it.
    pub pass: Mutex<()>,
    pub async_error: Mutex<Option<BufioError>>,
    pub async_pending: AtomicBool,
    pub shutting_down: AtomicBool,
    /// Set for good when a flush fails; see `BufioError::Poisoned`.
    pub poisoned: AtomicBool,
}

impl Inner {
    pub fn new(store: Arc<dyn BlockStore>, block_size: usize, limit: usize) -> Self {
        Inner {
            store,
            block_size,
            limit,
            shards: (0..NR_SHARDS)
                .map(|_| RwLock::new(Map::default()))
                .collect(),
            clock: Mutex::new(Clock::default()),
            cached_bytes: AtomicUsize::new(0),
            counters: Counters::default(),
            pass: Mutex::new(()),
            async_error: Mutex::new(None),
            async_pending: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
        }
    }

    fn shard(&self, block: u64) -> &RwLock<Map> {
        // The modulus keeps the index in range; consecutive blocks land on different shards.
        &self.shards[(block % NR_SHARDS as u64) as usize]
    }

    pub fn check_range(&self, block: u64) -> Result<()> {
        let nr_blocks = self.store.nr_blocks();
        if block >= nr_blocks {
            return Err(BufioError::OutOfRange { block, nr_blocks });
        }
        Ok(())
    }

    fn lookup(&self, block: u64) -> Option<Pin> {
        let map = self.shard(block).read();
        let buf = map.get(&block)?;
        // Load first: hot blocks (btree roots) are hit from every core, and an unconditional
        // store would bounce their cache line between them.
        if !buf.referenced.load(Ordering::Relaxed) {
            buf.referenced.store(true, Ordering::Relaxed);
        }
        Some(Pin::new(buf))
    }

    pub fn contains(&self, block: u64) -> bool {
        self.shard(block).read().contains_key(&block)
    }

    pub fn read(&self, block: u64) -> Result<ReadGuard> {
        self.check_range(block)?;
        loop {
            if let Some(pin) = self.lookup(block) {
                // Recursive: a thread that already holds this block for reading (a btree walk
                // over a corrupt, cyclic image, say) must not queue behind a waiting writer.
                let lock = pin.data.read_arc_recursive();
                if lock.valid {
                    Counters::bump(&self.counters.hits);
                    return Ok(ReadGuard::new(lock, pin));
                }
                // Its load failed and it has left the map: look again, and read it ourselves.
                continue;
            }
            if let Some((lock, pin)) = self.load(block, false, Pressure::WriteBack)? {
                Counters::bump(&self.counters.misses);
                return Ok(ReadGuard::new(ArcRwLockWriteGuard::downgrade(lock), pin));
            }
        }
    }

    pub fn write(&self, block: u64) -> Result<WriteGuard> {
        self.check_range(block)?;
        loop {
            if let Some(pin) = self.lookup(block) {
                let lock = pin.data.write_arc();
                if lock.valid {
                    Counters::bump(&self.counters.hits);
                    return Ok(WriteGuard::new(lock, pin));
                }
                continue;
            }
            if let Some((lock, pin)) = self.load(block, false, Pressure::WriteBack)? {
                Counters::bump(&self.counters.misses);
                return Ok(WriteGuard::new(lock, pin));
            }
        }
    }

    pub fn new_block(&self, block: u64, pressure: Pressure) -> Result<WriteGuard> {
        self.check_range(block)?;
        loop {
            if let Some(pin) = self.lookup(block) {
                let mut lock = pin.data.write_arc();
                if !lock.valid {
                    continue;
                }
                lock.bytes.fill(0);
                pin.tag.store(0, Ordering::Release);
                return Ok(WriteGuard::new(lock, pin));
            }
            if let Some((lock, pin)) = self.load(block, true, pressure)? {
                return Ok(WriteGuard::new(lock, pin));
            }
        }
    }

    pub fn get(&self, block: u64) -> Option<ReadGuard> {
        let found = self.lookup(block).and_then(|pin| {
            let lock = pin.data.try_read_recursive_arc()?;
            lock.valid.then(|| ReadGuard::new(lock, pin))
        });
        let counter = match found {
            Some(_) => &self.counters.hits,
            None => &self.counters.misses,
        };
        Counters::bump(counter);
        found
    }

    /// Inserts a buffer for `block`, write-locked before anyone else can see it, and reads it
    /// from the store unless `new`. Returns `None` if another thread inserted the block first:
    /// the caller looks it up again and uses (or waits for) that one.
    pub fn load(&self, block: u64, new: bool, pressure: Pressure) -> Result<Option<Loaded>> {
        self.reserve(pressure)?;
        let buf = Arc::new(Buffer::new(block, self.block_size, new));
        let mut lock = buf.data.write_arc();
        let pin = {
            let mut map = self.shard(block).write();
            if map.contains_key(&block) {
                drop(map);
                self.unreserve();
                return Ok(None);
            }
            buf.cached.store(true, Ordering::Release);
            map.insert(block, Arc::clone(&buf));
            Pin::new(&buf)
        };
        self.clock.lock().insert(&buf, self.cached_blocks());
        if !new {
            Counters::bump(&self.counters.reads);
            if let Err(source) = self.store.read_block(block, &mut lock.bytes) {
                // Leave the map before the lock is released, so waiters find the block absent.
                self.detach(&pin);
                return Err(BufioError::Io { block, source });
            }
            lock.valid = true;
        }
        Ok(Some((lock, pin)))
    }

    pub fn cached_bytes(&self) -> usize {
        self.cached_bytes.load(Ordering::Acquire)
    }

    fn cached_blocks(&self) -> usize {
        self.cached_bytes() / self.block_size
    }

    fn unreserve(&self) {
        self.cached_bytes
            .fetch_sub(self.block_size, Ordering::AcqRel);
    }

    /// Accounts for one more block, evicting (and, under `WriteBack`, writing back) to stay
    /// within the limit.
    fn reserve(&self, pressure: Pressure) -> Result<()> {
        let bs = self.block_size;
        let mut fruitless_writebacks = 0;
        loop {
            let cur = self.cached_bytes();
            if cur.saturating_add(bs) <= self.limit {
                if self
                    .cached_bytes
                    .compare_exchange_weak(cur, cur + bs, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Ok(());
                }
                continue;
            }
            match self.sweep(pressure == Pressure::WriteBack) {
                Sweep::Evicted => {}
                Sweep::Dirty(victims) => {
                    if !self.write_back_victims(victims)? {
                        // Every victim was busy; give the holders a few chances, not forever.
                        fruitless_writebacks += 1;
                        if fruitless_writebacks > 3 {
                            return Err(BufioError::CacheFull);
                        }
                    }
                }
                Sweep::Nothing => {
                    if self.cached_bytes().saturating_add(bs) <= self.limit {
                        continue;
                    }
                    if pressure == Pressure::Overshoot {
                        self.cached_bytes.fetch_add(bs, Ordering::AcqRel);
                        return Ok(());
                    }
                    return Err(BufioError::CacheFull);
                }
            }
        }
    }

    /// Runs the clock hand until it evicts one clean buffer, or has seen every buffer twice.
    fn sweep(&self, gather_dirty: bool) -> Sweep {
        let mut dirty = Vec::new();
        let mut clock = self.clock.lock();
        let budget = 2 * clock.len() + 1;
        let evicted = clock.sweep(budget, |buf| {
            if buf.is_pinned() {
                return (Verdict::Keep, None);
            }
            if buf.is_dirty() {
                if gather_dirty {
                    dirty.push(Arc::clone(buf));
                }
                // A full batch is worth writing now rather than sweeping on.
                let stop = (dirty.len() >= WRITEBACK_BATCH).then_some(false);
                return (Verdict::Keep, stop);
            }
            match self.try_evict(buf) {
                Evict::Done => (Verdict::Gone, Some(true)),
                Evict::Stale => (Verdict::Gone, None),
                Evict::Busy => (Verdict::Keep, None),
            }
        });
        drop(clock);
        if evicted == Some(true) {
            Sweep::Evicted
        } else if !dirty.is_empty() {
            Sweep::Dirty(dirty)
        } else {
            Sweep::Nothing
        }
    }

    fn try_evict(&self, buf: &Arc<Buffer>) -> Evict {
        let mut map = self.shard(buf.block).write();
        match map.get(&buf.block) {
            Some(b) if Arc::ptr_eq(b, buf) => {}
            _ => return Evict::Stale,
        }
        // The shard lock stops new pins, so these checks cannot be overtaken.
        if buf.is_pinned() || buf.is_dirty() {
            return Evict::Busy;
        }
        map.remove(&buf.block);
        buf.cached.store(false, Ordering::Release);
        drop(map);
        self.unreserve();
        Counters::bump(&self.counters.evictions);
        Evict::Done
    }

    /// Writes back cold dirty buffers without waiting for any buffer lock, then evicts those
    /// that are clean now (written here, or by a write-back pass running alongside). Returns
    /// whether that made any progress.
    fn write_back_victims(&self, mut victims: Vec<Arc<Buffer>>) -> Result<bool> {
        victims.sort_by_key(|buf| buf.block);
        let mut progress = false;
        for buf in &victims {
            progress |= self.write_back(buf, super::writeback::Wait::Try)?;
        }
        for buf in &victims {
            progress |= matches!(self.try_evict(buf), Evict::Done);
        }
        Ok(progress)
    }

    /// Removes this exact buffer from the map, whoever holds it. Returns whether it was there.
    pub fn detach(&self, buf: &Buffer) -> bool {
        let mut map = self.shard(buf.block).write();
        let ours = map
            .get(&buf.block)
            .is_some_and(|b| std::ptr::eq(Arc::as_ptr(b), buf));
        if ours {
            map.remove(&buf.block);
            buf.cached.store(false, Ordering::Release);
            drop(map);
            self.unreserve();
        }
        ours
    }

    pub fn forget(&self, block: u64) {
        let mut map = self.shard(block).write();
        let unheld = map.get(&block).is_some_and(|buf| !buf.is_pinned());
        if unheld {
            if let Some(buf) = map.remove(&block) {
                buf.cached.store(false, Ordering::Release);
                drop(map);
                self.unreserve();
                // A write-back may have picked it up already: see `discard_dirty`.
                drop(buf.io.lock());
            }
        }
    }

    pub fn discard_dirty(&self) {
        let mut dropped = Vec::new();
        for shard in self.shards.iter() {
            shard.write().retain(|_, buf| {
                if !buf.is_dirty() {
                    return true;
                }
                buf.cached.store(false, Ordering::Release);
                dropped.push(Arc::clone(buf));
                false
            });
        }
        for buf in &dropped {
            self.unreserve();
            // A write-back that began before the buffer left the map may still be writing it;
            // wait for it, so nothing older lands after a newer buffer for the same block.
            drop(buf.io.lock());
        }
    }

    pub fn stats(&self) -> CacheStats {
        let mut stats = CacheStats::default();
        self.counters.fill(&mut stats);
        for shard in self.shards.iter() {
            let map = shard.read();
            stats.cached_blocks += map.len() as u64;
            stats.dirty_blocks += map.values().filter(|b| b.is_dirty()).count() as u64;
        }
        stats.cached_bytes = self.cached_bytes() as u64;
        stats.memory_limit = self.limit as u64;
        stats
    }

    /// Every cached dirty buffer, in ascending block order. Not pinned: a write-back must not
    /// stop eviction of what it has already cleaned, and is safe without (see buffer.rs).
    pub fn dirty_buffers(&self) -> Vec<Arc<Buffer>> {
        let mut dirty = Vec::new();
        for shard in self.shards.iter() {
            let map = shard.read();
            dirty.extend(map.values().filter(|b| b.is_dirty()).cloned());
        }
        dirty.sort_by_key(|buf| buf.block);
        dirty
    }
}
