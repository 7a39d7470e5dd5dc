//! A store that simulates power loss and failing hardware, for crash tests in any module.
//!
//! It keeps two images: the durable one (what survives a power cut) and the writes issued
//! since the last flush, in order. Reads see the latest write. A power cut throws the unflushed
//! writes away, or, when torn, keeps a random subset of them, as a disk with a volatile write
//! cache may.

use std::collections::{HashMap, HashSet};
use std::io;

use parking_lot::Mutex;

use super::store::{check_request, BlockStore, IoCounts};

/// What a write past the limit set by [`CrashStore::fail_after_writes`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// The write returns EIO and changes nothing.
    Error,
    /// The write reports success but changes nothing: a device that lies.
    Drop,
}

/// An in-memory store with power cuts and fault injection.
#[derive(Debug)]
pub struct CrashStore {
    block_size: usize,
    state: Mutex<CrashState>,
}

#[derive(Debug)]
struct CrashState {
    nr_blocks: u64,
    durable: HashMap<u64, Box<[u8]>>,
    /// Unflushed writes in the order they were issued.
    pending: Vec<(u64, Box<[u8]>)>,
    /// The newest unflushed contents of each block, for reads.
    latest: HashMap<u64, Box<[u8]>>,
    /// Writes still allowed before the fault applies; `None` means no fault.
    writes_left: Option<u64>,
    write_fault: WriteFault,
    failing_reads: HashSet<u64>,
    fail_flush: bool,
    counts: IoCounts,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected EIO: {what}"))
}

impl CrashStore {
    /// A store of `nr_blocks` zeroed blocks, all durable.
    pub fn new(block_size: usize, nr_blocks: u64) -> Self {
        CrashStore {
            block_size,
            state: Mutex::new(CrashState {
                nr_blocks,
                durable: HashMap::new(),
                pending: Vec::new(),
                latest: HashMap::new(),
                writes_left: None,
                write_fault: WriteFault::Error,
                failing_reads: HashSet::new(),
                fail_flush: false,
                counts: IoCounts::default(),
            }),
        }
    }

    /// Loses every write not yet flushed. The store stays usable, as after a reboot.
    pub fn cut_power(&self) {
        let mut st = self.state.lock();
        st.pending.clear();
        st.latest.clear();
    }

    /// Like [`CrashStore::cut_power`], but each unflushed write independently survives with
    /// probability one half, applied in issue order. The same seed gives the same outcome.
    /// Returns how many unflushed writes survived.
    pub fn cut_power_torn(&self, seed: u64) -> usize {
        let mut st = self.state.lock();
        let mut rng = SplitMix(seed);
        let pending = std::mem::take(&mut st.pending);
        let mut kept = 0;
        for (block, data) in pending {
            if rng.next() & 1 == 1 {
                st.durable.insert(block, data);
                kept += 1;
            }
        }
        st.latest.clear();
        kept
    }

    /// The next `n` writes succeed; every write after them fails as `fault` says.
    pub fn fail_after_writes(&self, n: u64, fault: WriteFault) {
        let mut st = self.state.lock();
        st.writes_left = Some(n);
        st.write_fault = fault;
    }

    /// Reads of `block` return EIO until [`CrashStore::clear_faults`].
    pub fn fail_read(&self, block: u64) {
        self.state.lock().failing_reads.insert(block);
    }

    /// Flushes return EIO (and make nothing durable) while `fail` is set.
    pub fn fail_flush(&self, fail: bool) {
        self.state.lock().fail_flush = fail;
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        let mut st = self.state.lock();
        st.writes_left = None;
        st.failing_reads.clear();
        st.fail_flush = false;
    }

    /// What a power cut now would certainly keep of `block` (zeros if never made durable).
    pub fn durable_block(&self, block: u64) -> Vec<u8> {
        let st = self.state.lock();
        match st.durable.get(&block) {
            Some(data) => data.to_vec(),
            None => vec![0; self.block_size],
        }
    }

    /// The block's current contents, as a read would return them, without counting a read or
    /// applying read faults.
    pub fn peek(&self, block: u64) -> Vec<u8> {
        let st = self.state.lock();
        match st.latest.get(&block).or_else(|| st.durable.get(&block)) {
            Some(data) => data.to_vec(),
            None => vec![0; self.block_size],
        }
    }

    /// Writes issued since the last flush.
    pub fn unflushed_writes(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// How many reads, writes and flushes the store has served (failed ones included).
    pub fn io_counts(&self) -> IoCounts {
        self.state.lock().counts
    }
}

impl BlockStore for CrashStore {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn nr_blocks(&self) -> u64 {
        self.state.lock().nr_blocks
    }

    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut st = self.state.lock();
        check_request(block, buf.len(), self.block_size, st.nr_blocks)?;
        st.counts.reads += 1;
        if st.failing_reads.contains(&block) {
            return Err(eio(&format!("read of block {block}")));
        }
        match st.latest.get(&block).or_else(|| st.durable.get(&block)) {
            Some(data) => buf.copy_from_slice(data),
            None => buf.fill(0),
        }
        Ok(())
    }

    fn write_block(&self, block: u64, buf: &[u8]) -> io::Result<()> {
        let mut st = self.state.lock();
        check_request(block, buf.len(), self.block_size, st.nr_blocks)?;
        st.counts.writes += 1;
        match st.writes_left {
            Some(0) => match st.write_fault {
                WriteFault::Error => return Err(eio(&format!("write of block {block}"))),
                WriteFault::Drop => return Ok(()),
            },
            Some(n) => st.writes_left = Some(n - 1),
            None => {}
        }
        st.pending.push((block, buf.into()));
        st.latest.insert(block, buf.into());
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut st = self.state.lock();
        st.counts.flushes += 1;
        if st.fail_flush {
            return Err(eio("flush"));
        }
        let latest = std::mem::take(&mut st.latest);
        st.durable.extend(latest);
        st.pending.clear();
        Ok(())
    }

    fn resize(&self, nr_blocks: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        if nr_blocks < st.nr_blocks {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot shrink a crash store",
            ));
        }
        st.nr_blocks = nr_blocks;
        Ok(())
    }
}

/// A tiny deterministic generator, so torn cuts are reproducible without a dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(v: u8) -> Vec<u8> {
        vec![v; 512]
    }

    fn read(store: &CrashStore, b: u64) -> Vec<u8> {
        let mut buf = vec![0; 512];
        store.read_block(b, &mut buf).unwrap();
        buf
    }

    #[test]
    fn reads_see_unflushed_writes_before_a_cut() {
        let store = CrashStore::new(512, 4);
        store.write_block(1, &block(5)).unwrap();
        assert_eq!(read(&store, 1), block(5));
        assert_eq!(store.durable_block(1), block(0));
    }

    #[test]
    fn cut_power_drops_unflushed_writes_and_keeps_flushed_ones() {
        let store = CrashStore::new(512, 4);
        store.write_block(0, &block(1)).unwrap();
        store.flush().unwrap();
        store.write_block(0, &block(2)).unwrap();
        store.write_block(1, &block(3)).unwrap();
        assert_eq!(store.unflushed_writes(), 2);
        store.cut_power();
        assert_eq!(read(&store, 0), block(1));
        assert_eq!(read(&store, 1), block(0));
        assert_eq!(store.unflushed_writes(), 0);
    }

    #[test]
    fn torn_cut_keeps_some_unflushed_writes_and_only_written_versions() {
        let mut kept_counts = HashSet::new();
        for seed in 0..16 {
            let store = CrashStore::new(512, 8);
            for b in 0..8u64 {
                store.write_block(b, &block(1)).unwrap();
                store.write_block(b, &block(2)).unwrap();
            }
            kept_counts.insert(store.cut_power_torn(seed));
            for b in 0..8u64 {
                let v = read(&store, b);
                assert!(v == block(0) || v == block(1) || v == block(2));
            }
        }
        assert!(
            kept_counts.len() > 1,
            "different seeds should tear differently"
        );
        assert!(!kept_counts.contains(&16) || kept_counts.len() > 2);
    }

    #[test]
    fn torn_cut_is_reproducible_from_its_seed() {
        let images: Vec<Vec<Vec<u8>>> = (0..2)
            .map(|_| {
                let store = CrashStore::new(512, 8);
                for b in 0..8u64 {
                    store.write_block(b, &block(b as u8 + 1)).unwrap();
                }
                store.cut_power_torn(42);
                (0..8).map(|b| read(&store, b)).collect()
            })
            .collect();
        assert_eq!(images[0], images[1]);
    }

    #[test]
    fn writes_after_the_limit_fail_with_eio_and_change_nothing() {
        let store = CrashStore::new(512, 4);
        store.fail_after_writes(1, WriteFault::Error);
        store.write_block(0, &block(1)).unwrap();
        assert!(store.write_block(1, &block(1)).is_err());
        assert!(store.write_block(2, &block(1)).is_err());
        assert_eq!(read(&store, 1), block(0));
        store.clear_faults();
        store.write_block(1, &block(1)).unwrap();
        assert_eq!(read(&store, 1), block(1));
    }

    #[test]
    fn dropped_writes_report_success_but_vanish() {
        let store = CrashStore::new(512, 4);
        store.fail_after_writes(0, WriteFault::Drop);
        store.write_block(0, &block(9)).unwrap();
        store.flush().unwrap();
        assert_eq!(read(&store, 0), block(0));
    }

    #[test]
    fn injected_read_errors_hit_only_their_block() {
        let store = CrashStore::new(512, 4);
        store.fail_read(2);
        let mut buf = vec![0; 512];
        assert!(store.read_block(2, &mut buf).is_err());
        assert!(store.read_block(1, &mut buf).is_ok());
    }

    #[test]
    fn failed_flush_makes_nothing_durable() {
        let store = CrashStore::new(512, 4);
        store.write_block(0, &block(1)).unwrap();
        store.fail_flush(true);
        assert!(store.flush().is_err());
        store.cut_power();
        assert_eq!(read(&store, 0), block(0));
    }
}
