//! A thin device on a pool whose data device is an RBD image submits its data I/O to the
//! image's asynchronous queue (`rbd_aio_*`): 32 requests handed to one queue at once are in
//! flight in librbd together, not run one after the other through the synchronous methods.
//! Their data, first writes (new blocks), write-through writes and a flush (a commit) come
//! back right.
//!
//! Needs a Ceph cluster: THINBLK_CEPH_CONF names its ceph.conf (scripts/test.sh starts one with
//! scripts/ceph-cluster.sh, pool `thinblk`). A test fails when it is not set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod rbd_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use thinblk::bufio::RbdStore;
use thinblk::engine::io::{Completion, IoOp, IoQueue, IoRequest, QueueOptions};
use thinblk::engine::iov::RawBufs;
use thinblk::engine::rbd::{RbdDevice, RbdImage};
use thinblk::engine::thin::{Pool, PoolGeometry, PoolOptions, ThinDevice};
use thinblk::engine::{BlockDevice, DataDevice};

const BLOCK: u64 = 64 << 10;
const DEPTH: u64 = 32;

/// A pool on two new images, its data device, and thin device 1 of 64 MiB on it.
fn thin_on_rbd() -> (Arc<RbdDevice>, Arc<ThinDevice>) {
    let cluster = rbd_common::connect();
    let io = rbd_common::pool(&cluster);
    let meta = rbd_common::new_image(&io, "async-meta", 16 << 20);
    let data = rbd_common::new_image(&io, "async-data", 256 << 20);
    let meta = Arc::new(RbdImage::open(&io, &meta, false).unwrap());
    let store = RbdStore::new(meta, "async-meta", 4096).unwrap();
    let data_dev = Arc::new(
        RbdDevice::from_image(Arc::new(RbdImage::open(&io, &data, false).unwrap())).unwrap(),
    );
    let pool = Pool::open_with(
        Arc::new(store),
        data_dev.clone() as Arc<dyn DataDevice>,
        &PoolGeometry {
            block_size: BLOCK,
            metadata_size: 16 << 20,
            data_size: 256 << 20,
        },
        PoolOptions::default(),
    )
    .unwrap();
    pool.change(|m| m.create_thin(1)).unwrap();
    let thin = Arc::new(ThinDevice::new(pool, 1, 64 << 20));
    (data_dev, thin)
}

fn request(op: IoOp, offset: u64, buf: &mut [u8], durable: bool, tag: u64) -> IoRequest {
    IoRequest {
        op,
        offset,
        // SAFETY: each buffer outlives its request (the test waits for every completion
        // before it touches or drops them) and is not otherwise used meanwhile.
        bufs: unsafe { RawBufs::new([(buf.as_mut_ptr(), buf.len())], None) },
        durable,
        tag,
    }
}

/// Waits for `n` completions (generously: the machine may be loaded); all must succeed.
fn wait_all(q: &mut dyn IoQueue, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut got: Vec<Completion> = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} completed",
            got.len()
        );
        q.submit_pending();
        q.reap(&mut |c| got.push(c));
        if got.len() < n {
            q.acknowledge();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    for c in got {
        assert!(c.result.is_ok(), "request {} failed: {:?}", c.tag, c.result);
    }
}

fn pattern(i: u64) -> u8 {
    (i * 7 + 1) as u8
}

#[test]
fn thin_io_on_rbd_is_in_flight_in_librbd_at_once() {
    let (data, thin) = thin_on_rbd();
    let mut q = thin
        .clone()
        .open_queue(&QueueOptions {
            entries: 128,
            submit_batch: 32,
        })
        .unwrap();

    // First writes of whole blocks (new blocks, mapped once written), all at once.
    let mut bufs: Vec<Vec<u8>> = (0..DEPTH)
        .map(|i| vec![pattern(i); BLOCK as usize])
        .collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        let i = i as u64;
        q.submit(request(IoOp::Write, i * 2 * BLOCK, b, false, i));
    }
    wait_all(&mut *q, DEPTH as usize);
    let after_writes = data.aio_counts().started();
    assert!(
        after_writes >= DEPTH,
        "{after_writes} asynchronous RBD calls for {DEPTH} writes: the writes went through the synchronous path"
    );

    // A flush commits the new mappings.
    q.submit(IoRequest::unbuffered(IoOp::Flush, false, 100));
    wait_all(&mut *q, 1);

    // 4 KiB reads of every block (mapped now), all at once.
    let mut reads: Vec<Vec<u8>> = (0..DEPTH).map(|_| vec![0u8; 4096]).collect();
    for (i, b) in reads.iter_mut().enumerate() {
        let i = i as u64;
        q.submit(request(IoOp::Read, i * 2 * BLOCK + 8192, b, false, 200 + i));
    }
    wait_all(&mut *q, DEPTH as usize);
    for (i, b) in reads.iter().enumerate() {
        assert!(
            b.iter().all(|&x| x == pattern(i as u64)),
            "read of block {i} has the wrong data"
        );
    }
    assert!(
        data.aio_counts().started() >= after_writes + DEPTH,
        "the reads went through the synchronous path"
    );
    // The submissions of a pass take microseconds, librbd's calls milliseconds.
    let peak = data.aio_counts().peak();
    assert!(
        peak >= 8,
        "at most {peak} RBD calls were in flight at once for {DEPTH} requests"
    );

    // Overwrites of mapped blocks, write-through, and unmapped space reads as zeros.
    let mut over = vec![0xabu8; 4096];
    q.submit(request(IoOp::Write, BLOCK * 2 + 4096, &mut over, true, 300));
    let mut hole = vec![0xffu8; 4096];
    q.submit(request(IoOp::Read, BLOCK, &mut hole, false, 301));
    wait_all(&mut *q, 2);
    assert!(
        hole.iter().all(|&x| x == 0),
        "an unmapped block did not read as zeros"
    );
    let mut back = vec![0u8; 8192];
    q.submit(request(IoOp::Read, BLOCK * 2, &mut back, false, 302));
    wait_all(&mut *q, 1);
    assert!(back[..4096].iter().all(|&x| x == pattern(1)));
    assert!(back[4096..].iter().all(|&x| x == 0xab));

    // A partial first write takes the synchronous path and still reads back around zeros.
    let mut part = vec![0x5au8; 4096];
    q.submit(request(
        IoOp::Write,
        BLOCK * 3 + 4096,
        &mut part,
        false,
        400,
    ));
    wait_all(&mut *q, 1);
    let mut whole = vec![0xffu8; BLOCK as usize];
    q.submit(request(IoOp::Read, BLOCK * 3, &mut whole, false, 401));
    wait_all(&mut *q, 1);
    assert!(whole[..4096].iter().all(|&x| x == 0));
    assert!(whole[4096..8192].iter().all(|&x| x == 0x5a));
    assert!(whole[8192..].iter().all(|&x| x == 0));
    q.drain();
    drop(q);
    assert!(thin.flush().is_ok());
}
