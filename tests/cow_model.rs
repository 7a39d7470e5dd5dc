//! COW devices against a byte model: random writes, zeroes and discards, reads, reopens.
#![allow(clippy::unwrap_used)]

mod cow_support;

use std::sync::Arc;
use thinblk::engine::{Bufs, BufsMut};

use cow_support::{random_range, read_all, Rng};
use thinblk::engine::cow::{CowDevice, CowError, CowEvent, PersistentStore, TransientStore};
use thinblk::engine::memory::MemoryDevice;
use thinblk::engine::{BlockDevice, BlockError};

/// An origin of odd size (the last chunk is partial) full of recognisable bytes.
fn origin(rng: &mut Rng, size: u64) -> Arc<MemoryDevice> {
    let dev = MemoryDevice::new(size).unwrap();
    dev.write(0, &Bufs::one(&rng.bytes(size as usize))).unwrap();
    Arc::new(dev)
}

fn persistent(origin: &Arc<MemoryDevice>, store: &Arc<MemoryDevice>, chunk: u64) -> CowDevice {
    let o = PersistentStore::open_or_create(store.clone(), Some(chunk), chunk).unwrap();
    CowDevice::new(origin.clone(), Box::new(o.store), o.table)
}

/// One random request, applied to the device and the model alike.
fn random_op(rng: &mut Rng, dev: &CowDevice, model: &mut [u8]) {
    let (off, len) = random_range(rng, dev.size(), 48 << 10);
    let (o, l) = (off as usize, len as usize);
    match rng.below(10) {
        0 => {
            dev.write_zeroes(off, len, rng.below(2) == 0).unwrap();
            model[o..o + l].fill(0);
        }
        1 => dev.flush().unwrap(),
        2 => {
            let got = read_all(dev);
            assert_eq!(got, model, "whole-device read differs from the model");
        }
        _ => {
            let data = rng.bytes(l);
            let (a, b) = data.split_at(l / 3);
            dev.write(
                off,
                &Bufs::from(&[std::io::IoSlice::new(a), std::io::IoSlice::new(b)][..]),
            )
            .unwrap();
            model[o..o + l].copy_from_slice(&data);
        }
    }
}

#[test]
fn a_persistent_snapshot_matches_the_model_across_reopens() {
    for (seed, chunk) in [(1u64, 4096u64), (2, 16 << 10), (3, 64 << 10)] {
        let mut rng = Rng(seed * 7919);
        let size = (1 << 20) + 3 * 512;
        let origin = origin(&mut rng, size);
        let pristine = read_all(origin.as_ref());
        let store = Arc::new(MemoryDevice::new(3 << 20).unwrap());
        let mut model = pristine.clone();
        let mut dev = persistent(&origin, &store, chunk);
        for round in 0..6 {
            for _ in 0..120 {
                random_op(&mut rng, &dev, &mut model);
            }
            dev.flush().unwrap();
            drop(dev);
            dev = persistent(&origin, &store, chunk);
            assert_eq!(read_all(&dev), model, "chunk {chunk}, after reopen {round}");
        }
        let st = dev.status();
        assert!(st.valid && st.persistent && st.exceptions > 0);
        assert!(st.runs as u64 <= st.exceptions);
        assert_eq!(
            read_all(origin.as_ref()),
            pristine,
            "the origin was modified"
        );
    }
}

#[test]
fn a_transient_snapshot_matches_the_model_and_forgets_on_reopen() {
    let mut rng = Rng(99);
    let size = 1 << 20;
    let origin = origin(&mut rng, size);
    let pristine = read_all(origin.as_ref());
    let store = Arc::new(MemoryDevice::new(2 << 20).unwrap());
    for _ in 0..3 {
        let s = TransientStore::new(store.clone(), 8192).unwrap();
        let dev = CowDevice::new(origin.clone(), Box::new(s), Default::default());
        assert_eq!(read_all(&dev), pristine);
        let mut model = pristine.clone();
        for _ in 0..300 {
            random_op(&mut rng, &dev, &mut model);
        }
        assert_eq!(read_all(&dev), model);
        assert!(!dev.status().persistent);
    }
    assert_eq!(read_all(origin.as_ref()), pristine);
}

#[test]
fn consecutive_first_writes_coalesce_into_one_run() {
    let mut rng = Rng(5);
    let origin = origin(&mut rng, 1 << 20);
    let store = Arc::new(MemoryDevice::new(2 << 20).unwrap());
    let dev = persistent(&origin, &store, 4096);
    dev.write(0, &Bufs::one(&vec![7u8; 200 << 10])).unwrap();
    let st = dev.status();
    assert_eq!((st.exceptions, st.runs), (50, 1));
}

#[test]
fn a_full_store_invalidates_the_snapshot_and_spares_the_origin() {
    let mut rng = Rng(11);
    let origin = origin(&mut rng, 1 << 20);
    let pristine = read_all(origin.as_ref());
    // 16 chunks of 4 KiB: header, area 0 and 14 data chunks.
    let store = Arc::new(MemoryDevice::new(16 * 4096).unwrap());
    let dev = persistent(&origin, &store, 4096);
    let events = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = events.clone();
    dev.subscribe(Arc::new(move |e: &CowEvent| sink.lock().push(e.clone())));
    let mut failed_at = None;
    for i in 0..20u64 {
        match dev.write(i * 8192, &Bufs::one(&[1u8; 512])) {
            Ok(()) => {}
            Err(BlockError::Cow(e)) if matches!(*e, CowError::Invalid) => {
                failed_at = Some(i);
                break;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(failed_at, Some(14));
    assert!((dev.status().fraction_full() - 1.0).abs() < 1e-9);
    assert!(!dev.status().valid);
    let mut buf = [0u8; 512];
    assert!(dev.read(0, &mut BufsMut::one(&mut buf)).is_err());
    assert!(dev.flush().is_err());
    assert!(matches!(
        events.lock().as_slice(),
        [CowEvent::Invalidated { .. }]
    ));
    assert_eq!(read_all(origin.as_ref()), pristine);
    let reopened = persistent(&origin, &store, 4096);
    assert!(!reopened.status().valid);
    assert!(reopened.write(0, &Bufs::one(&[0u8; 512])).is_err());
}

#[test]
fn fraction_full_counts_used_chunks() {
    let mut rng = Rng(3);
    let origin = origin(&mut rng, 1 << 20);
    let store = Arc::new(MemoryDevice::new(100 * 4096).unwrap());
    let dev = persistent(&origin, &store, 4096);
    assert_eq!(dev.status().used_chunks, 2); // header and area 0
    dev.write(0, &Bufs::one(&[1u8; 8192])).unwrap();
    let st = dev.status();
    assert_eq!((st.used_chunks, st.total_chunks), (4, 100));
    assert!((st.fraction_full() - 0.04).abs() < 1e-9);
}

#[test]
fn racing_first_writes_to_one_chunk_keep_both_writers_data() {
    let mut rng = Rng(17);
    let origin = origin(&mut rng, 1 << 20);
    let pristine = read_all(origin.as_ref());
    let store = Arc::new(MemoryDevice::new(2 << 20).unwrap());
    let dev = Arc::new(persistent(&origin, &store, 64 << 10));
    // Each thread owns every other sector of the first 8 chunks.
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for s in (t..1024).step_by(2) {
                    dev.write(s * 512, &Bufs::one(&[t as u8 + 1; 512])).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let got = read_all(dev.as_ref());
    for s in 0..1024usize {
        let want = (s % 2) as u8 + 1;
        assert!(
            got[s * 512..s * 512 + 512].iter().all(|&b| b == want),
            "sector {s}"
        );
    }
    assert_eq!(got[512 << 10..], pristine[512 << 10..]);
    assert_eq!(dev.status().exceptions, 8);
}
