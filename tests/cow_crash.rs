//! Power cuts at many points under a persistent COW device: whatever survives, reopening never
//! shows a sector that holds neither its last flushed contents nor something written since,
//! so an exception never points at data that did not reach the store.
#![allow(clippy::unwrap_used)]

mod cow_support;

use std::collections::HashMap;
use std::sync::Arc;
use thinblk::engine::Bufs;

use cow_support::{random_range, read_all, PowerCutDevice, Rng};
use thinblk::engine::cow::{CowDevice, PersistentStore};
use thinblk::engine::memory::MemoryDevice;
use thinblk::engine::BlockDevice;

const CHUNK: u64 = 4096;
const ORIGIN: u64 = 2 << 20;

/// What each sector may hold after a power cut.
struct Model {
    current: Vec<u8>,
    flushed: Vec<u8>,
    /// Sector -> every contents written to it since the last successful flush.
    since_flush: HashMap<usize, Vec<Vec<u8>>>,
}

impl Model {
    fn write(&mut self, off: u64, data: &[u8]) {
        let o = off as usize;
        self.current[o..o + data.len()].copy_from_slice(data);
        for (i, s) in data.chunks(512).enumerate() {
            self.since_flush
                .entry(o / 512 + i)
                .or_default()
                .push(s.to_vec());
        }
    }

    fn flushed(&mut self) {
        self.flushed = self.current.clone();
        self.since_flush.clear();
    }

    fn check(&self, got: &[u8], what: &str) {
        for (s, sector) in got.chunks(512).enumerate() {
            let old = &self.flushed[s * 512..s * 512 + 512];
            let ok = sector == old
                || self
                    .since_flush
                    .get(&s)
                    .is_some_and(|v| v.iter().any(|w| w == sector));
            assert!(ok, "{what}: sector {s} holds data nobody wrote there");
        }
    }
}

fn open(origin: &Arc<MemoryDevice>, store: &Arc<PowerCutDevice>) -> CowDevice {
    let o = PersistentStore::open(store.clone(), Some(CHUNK)).unwrap();
    CowDevice::new(origin.clone(), Box::new(o.store), o.table)
}

/// Runs random requests until the store loses power after `budget` writes and flushes.
fn run_until_dead(rng: &mut Rng, dev: &CowDevice, store: &PowerCutDevice, model: &mut Model) {
    for _ in 0..400 {
        let (off, len) = random_range(rng, dev.size(), 24 << 10);
        let ok = if rng.below(6) == 0 {
            let r = dev.flush().is_ok();
            if r {
                model.flushed();
            }
            r
        } else {
            let data = rng.bytes(len as usize);
            // Whether or not it completes, its sectors may now hold it.
            model.write(off, &data);
            dev.write(off, &Bufs::one(&data)).is_ok()
        };
        if !ok || store.is_dead() {
            return;
        }
    }
}

#[test]
fn power_cuts_never_expose_unwritten_store_chunks() {
    let mut rng = Rng(0x5eed);
    let origin = Arc::new(MemoryDevice::new(ORIGIN).unwrap());
    origin
        .write(0, &Bufs::one(&rng.bytes(ORIGIN as usize)))
        .unwrap();
    let pristine = read_all(origin.as_ref());
    let mut crossed = 0;
    for case in 0..120u64 {
        // Junk everywhere a chunk was never written: exposing it is detectable.
        let store = Arc::new(PowerCutDevice::new(vec![0xEE; 700 * CHUNK as usize]));
        PersistentStore::create(store.clone(), CHUNK).unwrap();
        let mut model = Model {
            current: pristine.clone(),
            flushed: pristine.clone(),
            since_flush: HashMap::new(),
        };
        // Most of metadata area 0 used up front, so the lives cross into area 1.
        let dev = open(&origin, &store);
        for i in 0..240 {
            let data = rng.bytes(512);
            let at = i * 2 * CHUNK + 512 * rng.below(8);
            dev.write(at, &Bufs::one(&data)).unwrap();
            model.write(at, &data);
        }
        dev.flush().unwrap();
        model.flushed();
        drop(dev);
        // Several lives per case: each ends in a cut, the next starts from what survived.
        for life in 0..3 {
            let dev = open(&origin, &store);
            model.check(&read_all(&dev), &format!("case {case} life {life}"));
            // What survived is now what is on disk, as if flushed.
            model.current = read_all(&dev);
            model.flushed();
            store.fail_after(1 + rng.below(60));
            run_until_dead(&mut rng, &dev, &store, &mut model);
            drop(dev);
            let torn = rng.below(2) == 0;
            store.cut_power(if torn { Some(&mut rng) } else { None });
        }
        let dev = open(&origin, &store);
        model.check(&read_all(&dev), &format!("case {case} end"));
        // 256 pairs fill metadata area 0 of a 4 KiB-chunk store.
        if dev.status().exceptions > 256 {
            crossed += 1;
        }
    }
    assert!(
        crossed > 10,
        "only {crossed} cases reached a second metadata area"
    );
    assert_eq!(read_all(origin.as_ref()), pristine);
}
