//! Merging a snapshot into its origin: the result is the snapshot, an interrupted merge
//! finishes when run again, and a merge runs while the device serves.
#![allow(clippy::unwrap_used)]

mod cow_support;

use std::sync::Arc;
use thinblk::engine::Bufs;

use cow_support::{random_range, read_all, PowerCutDevice, Rng};
use thinblk::engine::cow::{CowDevice, CowEvent, MergeState, PersistentStore, TransientStore};
use thinblk::engine::memory::MemoryDevice;
use thinblk::engine::BlockDevice;

const CHUNK: u64 = 4096;
const ORIGIN: u64 = (1 << 20) + 1024;

fn scribble(rng: &mut Rng, dev: &CowDevice, model: &mut [u8], n: usize) {
    for _ in 0..n {
        let (off, len) = random_range(rng, dev.size(), 32 << 10);
        let data = rng.bytes(len as usize);
        dev.write(off, &Bufs::one(&data)).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
}

fn open(origin: Arc<dyn BlockDevice>, store: Arc<dyn BlockDevice>) -> CowDevice {
    let o = PersistentStore::open(store, Some(CHUNK)).unwrap();
    CowDevice::new(origin, Box::new(o.store), o.table)
}

#[test]
fn a_merged_origin_holds_the_snapshot() {
    let mut rng = Rng(21);
    let origin = Arc::new(PowerCutDevice::new(rng.bytes(ORIGIN as usize)));
    let store = Arc::new(MemoryDevice::new(4 << 20).unwrap());
    PersistentStore::create(store.clone(), CHUNK).unwrap();
    let dev = open(origin.clone(), store.clone());
    let events = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = events.clone();
    dev.subscribe(Arc::new(move |e: &CowEvent| sink.lock().push(e.clone())));
    let mut model = read_all(origin.as_ref());
    scribble(&mut rng, &dev, &mut model, 200);
    let before = dev.status().exceptions;
    let report = dev.merge(origin.clone()).unwrap();
    assert_eq!(report.chunks, before);
    assert_eq!(
        origin.durable(),
        model,
        "merged origin differs from the snapshot"
    );
    assert_eq!(dev.status().merge, MergeState::Done);
    assert_eq!(dev.status().exceptions, 0);
    // The device is the origin now.
    scribble(&mut rng, &dev, &mut model, 20);
    dev.flush().unwrap();
    assert_eq!(origin.durable(), model);
    assert!(matches!(
        events.lock().as_slice(),
        [CowEvent::MergeCompleted { .. }]
    ));
    // The store is empty: reopened, it is a fresh snapshot of the merged origin.
    let again = open(origin.clone(), store);
    assert_eq!(again.status().exceptions, 0);
    assert_eq!(read_all(&again), model);
}

#[test]
fn an_interrupted_merge_finishes_when_run_again() {
    let mut rng = Rng(77);
    for case in 0..30u64 {
        let origin = Arc::new(PowerCutDevice::new(rng.bytes(ORIGIN as usize)));
        let store = Arc::new(PowerCutDevice::new(vec![0xEE; 1200 * CHUNK as usize]));
        PersistentStore::create(store.clone(), CHUNK).unwrap();
        let dev = open(origin.clone(), store.clone());
        let mut model = read_all(origin.as_ref());
        scribble(&mut rng, &dev, &mut model, 150);
        dev.flush().unwrap();
        drop(dev);
        // Power fails part way through the merge, on the origin or on the store.
        let dev = open(origin.clone(), store.clone());
        let budget = 1 + rng.below(2 * dev.status().exceptions / 16 + 4);
        if case % 2 == 0 {
            origin.fail_after(budget * 8);
        } else {
            store.fail_after(budget);
        }
        let _ = dev.merge(origin.clone());
        drop(dev);
        origin.cut_power(Some(&mut rng));
        store.cut_power(Some(&mut rng));
        // The snapshot still reads as it was, over the partly merged origin ...
        let dev = open(origin.clone(), store.clone());
        assert_eq!(
            read_all(&dev),
            model,
            "case {case}: snapshot changed by a cut merge"
        );
        // ... and a second merge completes it.
        dev.merge(origin.clone()).unwrap();
        assert_eq!(origin.durable(), model, "case {case}: merge did not finish");
    }
}

#[test]
fn a_merge_runs_while_the_device_serves_writes() {
    let mut rng = Rng(1234);
    let origin = Arc::new(PowerCutDevice::new(rng.bytes(ORIGIN as usize)));
    let store = Arc::new(MemoryDevice::new(4 << 20).unwrap());
    PersistentStore::create(store.clone(), CHUNK).unwrap();
    let dev = Arc::new(open(origin.clone(), store));
    let mut model = read_all(origin.as_ref());
    scribble(&mut rng, &dev, &mut model, 300);
    let merging = {
        let dev = dev.clone();
        let target = origin.clone();
        std::thread::spawn(move || dev.merge(target).unwrap())
    };
    scribble(&mut rng, &dev, &mut model, 300);
    merging.join().unwrap();
    dev.flush().unwrap();
    assert_eq!(read_all(dev.as_ref()), model);
    assert_eq!(origin.durable(), model);
}

#[test]
fn a_transient_snapshot_merges_too() {
    let mut rng = Rng(8);
    let origin = Arc::new(PowerCutDevice::new(rng.bytes(ORIGIN as usize)));
    let store = Arc::new(MemoryDevice::new(4 << 20).unwrap());
    let s = TransientStore::new(store, CHUNK).unwrap();
    let dev = CowDevice::new(origin.clone(), Box::new(s), Default::default());
    let mut model = read_all(origin.as_ref());
    scribble(&mut rng, &dev, &mut model, 100);
    dev.merge(origin.clone()).unwrap();
    assert_eq!(origin.durable(), model);
}
