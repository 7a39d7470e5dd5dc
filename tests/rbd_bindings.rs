//! The librbd/librados bindings against a real (one-node) Ceph cluster: connection, image
//! lifetime, synchronous I/O, snapshots, the exclusive lock with fencing, and the device's
//! asynchronous queue. Needs THINBLK_CEPH_CONF (see tests/rbd_common).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod rbd_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rbd_common::*;
use thinblk::engine::io::{ByteRange, Completion, IoOp, IoQueue, IoRequest, QueueOptions};
use thinblk::engine::iov::RawBufs;
use thinblk::engine::rbd::{errno, Cluster, RbdDevice, RbdImage, RbdSpec, CREATE_FEATURES};
use thinblk::engine::{BlockDevice, BlockError, Bufs, BufsMut, DataDevice};

const MIB: u64 = 1 << 20;

#[test]
fn a_missing_image_is_created_once_and_then_opened() {
    let cluster = connect();
    let io = pool(&cluster);
    let name = unique_name("create");
    let (image, created) = RbdImage::open_or_create(&io, &name, 16 * MIB).unwrap();
    assert!(created);
    assert_eq!(image.size().unwrap(), 16 * MIB);
    assert_eq!(
        image.features().unwrap() & CREATE_FEATURES,
        CREATE_FEATURES,
        "exclusive-lock and the rest are on"
    );
    drop(image);
    let (again, created) = RbdImage::open_or_create(&io, &name, 64 * MIB).unwrap();
    assert!(!created);
    assert_eq!(
        again.size().unwrap(),
        16 * MIB,
        "an existing image keeps its size"
    );
    drop(again);
    RbdImage::remove(&io, &name).unwrap();
    let gone = RbdImage::open(&io, &name, false).err().expect("removed");
    assert_eq!(gone.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(errno(&gone), Some(libc::ENOENT));
    assert!(gone.to_string().contains("rbd_open"), "{gone}");
}

#[test]
fn a_missing_pool_or_conf_is_an_error_naming_the_call() {
    let cluster = connect();
    let e = cluster.ioctx("no-such-pool").err().expect("no such pool");
    assert!(e.to_string().starts_with("rados_ioctx_create"), "{e}");
    let opts = thinblk::engine::rbd::CephOptions {
        conf: Some("/nonexistent/ceph.conf".into()),
        id: None,
    };
    let e = Cluster::connect(&opts).err().expect("no such conf");
    assert!(e.to_string().starts_with("rados_conf_read_file"), "{e}");
}

#[test]
fn synchronous_io_reads_back_what_was_written_and_zeroed() {
    let cluster = connect();
    let io = pool(&cluster);
    let name = new_image(&io, "sync", 16 * MIB);
    let image = RbdImage::open(&io, &name, false).unwrap();
    let data: Vec<u8> = (0..3 * MIB as usize).map(|i| (i * 7 + 1) as u8).collect();
    image.write(MIB / 2, &data).unwrap();
    image.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    image.read(MIB / 2, &mut back).unwrap();
    assert!(back == data);

    image.discard(MIB, MIB).unwrap();
    image.write_zeroes(2 * MIB, 4096).unwrap();
    let mut back = vec![0xffu8; 3 * MIB as usize];
    image.read(MIB / 2, &mut back).unwrap();
    let at = |off: u64| (off - MIB / 2) as usize;
    assert!(back[..at(MIB)] == data[..at(MIB)], "before the discard");
    assert!(back[at(MIB)..at(2 * MIB + 4096)].iter().all(|&b| b == 0));
    assert!(back[at(2 * MIB + 4096)..] == data[at(2 * MIB + 4096)..]);

    image.resize(32 * MIB).unwrap();
    assert_eq!(image.size().unwrap(), 32 * MIB);
    let mut past = vec![0u8; 4096];
    assert!(
        image.read(32 * MIB, &mut past).is_err(),
        "read past the end"
    );
}

#[test]
fn snapshots_are_listed_by_name() {
    let cluster = connect();
    let io = pool(&cluster);
    let name = new_image(&io, "snap", 4 * MIB);
    let image = RbdImage::open(&io, &name, false).unwrap();
    assert!(image.snapshots().unwrap().is_empty());
    image.write(0, &[1u8; 4096]).unwrap();
    image.snap_create("first").unwrap();
    image.snap_create("second").unwrap();
    let mut snaps = image.snapshots().unwrap();
    snaps.sort();
    assert_eq!(snaps, ["first", "second"]);
    let e = image.snap_create("first").unwrap_err();
    assert_eq!(errno(&e), Some(libc::EEXIST));
}

/// Keeps trying `f` for up to 30 s until it returns `Some`.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_held_lock_refuses_other_writers_until_broken_and_then_fences_its_old_owner() {
    let (a_cluster, b_cluster) = (connect(), connect());
    let name = new_image(&pool(&a_cluster), "lock", 4 * MIB);
    let a = RbdImage::open(&pool(&a_cluster), &name, false).unwrap();
    let b = RbdImage::open(&pool(&b_cluster), &name, false).unwrap();
    assert!(b.lock_owners().unwrap().is_empty(), "nobody holds it yet");

    a.lock_acquire().unwrap();
    assert!(a.is_lock_owner().unwrap());
    a.write(0, &[0xa; 4096]).unwrap();
    a.flush().unwrap();
    let owners = b.lock_owners().unwrap();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert!(owners[0].exclusive);
    let e = b.write(0, &[0xb; 4096]).unwrap_err();
    assert_eq!(errno(&e), Some(libc::EROFS), "{e}");
    assert!(!b.is_lock_owner().unwrap());

    b.lock_break(&owners[0].owner).unwrap();
    b.lock_acquire().unwrap();
    b.write(0, &[0xb; 4096]).unwrap();
    b.flush().unwrap();
    // The old owner is blocklisted: whatever it tries now fails, it can never write again.
    let e = eventually("the old owner to be fenced", || {
        a.write(4096, &[0xa; 4096]).err()
    });
    // Ceph's EBLOCKLISTED is ESHUTDOWN.
    assert_eq!(errno(&e), Some(libc::ESHUTDOWN), "{e}");
    let mut back = [0u8; 8192];
    b.read(0, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&x| x == 0xb));
    assert!(
        back[4096..].iter().all(|&x| x == 0),
        "the fenced write did not land"
    );
    b.lock_release().unwrap();
}

/// A one-request-at-a-time driver of a device queue.
struct Driver {
    q: Box<dyn IoQueue>,
    tag: u64,
}

impl Driver {
    fn new(dev: &Arc<RbdDevice>) -> Driver {
        let opts = QueueOptions {
            entries: 64,
            submit_batch: 4,
        };
        Driver {
            q: dev.clone().open_queue(&opts).unwrap(),
            tag: 0,
        }
    }

    /// Waits on the notifier (as a worker's epoll would) until `n` requests completed.
    fn wait(&mut self, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < n {
            self.q.reap(&mut |c| out.push(c));
            if out.len() >= n {
                break;
            }
            let mut pfd = libc::pollfd {
                fd: self.q.notifier(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            self.q.acknowledge();
            assert!(Instant::now() < deadline, "completions did not arrive");
        }
        out
    }

    fn run(
        &mut self,
        op: IoOp,
        offset: u64,
        buf: Option<&mut [u8]>,
        durable: bool,
    ) -> Result<(), BlockError> {
        self.tag += 1;
        let bufs = match buf {
            // SAFETY: the buffer is the test's own and untouched until the request completed
            // (`wait` returns only then).
            Some(b) => unsafe { RawBufs::new([(b.as_mut_ptr(), b.len())], None) },
            None => RawBufs::default(),
        };
        self.q.submit(IoRequest {
            op,
            offset,
            bufs,
            durable,
            tag: self.tag,
        });
        self.q.submit_pending();
        let mut done = self.wait(1);
        let c = done.pop().unwrap();
        assert_eq!(c.tag, self.tag);
        c.result
    }
}

#[test]
fn the_device_queue_completes_through_its_eventfd() {
    let cluster = connect();
    let name = new_image(&pool(&cluster), "queue", 8 * MIB);
    let spec = RbdSpec {
        pool: POOL.into(),
        image: name.clone(),
    };
    let dev = Arc::new(RbdDevice::open(&cluster, &spec, false).unwrap());
    assert_eq!(dev.size(), 8 * MIB);
    let mut d = Driver::new(&dev);

    let mut data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    d.run(IoOp::Write, MIB, Some(&mut data[..]), false).unwrap();
    d.run(IoOp::Write, 3 * MIB, Some(&mut data[..]), true)
        .unwrap();
    d.run(IoOp::Flush, 0, None, false).unwrap();
    let mut back = vec![0u8; data.len()];
    d.run(IoOp::Read, MIB, Some(&mut back[..]), false).unwrap();
    assert!(back == data);
    let mut back2 = vec![0u8; data.len()];
    d.run(IoOp::Read, 3 * MIB, Some(&mut back2[..]), false)
        .unwrap();
    assert!(back2 == data);

    let ranges = |offset, len| -> Box<[ByteRange]> {
        vec![ByteRange {
            offset,
            len,
            may_unmap: true,
        }]
        .into()
    };
    d.run(IoOp::Discard(ranges(MIB, 4096)), 0, None, false)
        .unwrap();
    d.run(IoOp::WriteZeroes(ranges(MIB + 8192, 8192)), 0, None, true)
        .unwrap();
    d.run(IoOp::Read, MIB, Some(&mut back[..]), false).unwrap();
    // Discard is advisory (librbd skips pieces smaller than its 64 KiB granularity):
    // zeros or the old data, nothing else.
    assert!(back[..4096].iter().all(|&b| b == 0) || back[..4096] == data[..4096]);
    assert!(back[4096..8192] == data[4096..8192]);
    assert!(back[8192..16384].iter().all(|&b| b == 0));
    assert!(back[16384..] == data[16384..]);

    // Past the end: refused before librbd, and the queue goes on.
    let err = d
        .run(IoOp::Read, 8 * MIB, Some(&mut back[..]), false)
        .unwrap_err();
    assert!(matches!(err, BlockError::OutOfRange { .. }), "{err:?}");

    // Many in flight at once, completing in whatever order librbd finishes them.
    let mut bufs: Vec<Vec<u8>> = (0..32u8).map(|i| vec![i; 16384]).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        // SAFETY: each buffer is untouched until every request completed.
        let raw = unsafe { RawBufs::new([(b.as_mut_ptr(), b.len())], None) };
        d.q.submit(IoRequest {
            op: IoOp::Write,
            offset: 4 * MIB + i as u64 * 16384,
            bufs: raw,
            durable: false,
            tag: 1000 + i as u64,
        });
    }
    assert_eq!(d.q.in_flight(), 32);
    let done = d.wait(32);
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort();
    assert_eq!(tags, (1000..1032).collect::<Vec<_>>());
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert_eq!(d.q.in_flight(), 0);
    let mut all = vec![0u8; 32 * 16384];
    dev.read(4 * MIB, &mut BufsMut::one(&mut all)).unwrap();
    for (i, chunk) in all.chunks(16384).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8), "write {i}");
    }

    // The synchronous methods see the same image.
    dev.write(0, &Bufs::one(&[9u8; 512])).unwrap();
    dev.flush().unwrap();
    let mut first = [0u8; 512];
    d.run(IoOp::Read, 0, Some(&mut first[..]), false).unwrap();
    assert_eq!(first, [9u8; 512]);
    assert_eq!(dev.grow_to(16 * MIB).unwrap(), 16 * MIB);
    assert_eq!(dev.size(), 16 * MIB);
    dev.snapshot_internal("s1").unwrap();
    assert_eq!(dev.image().snapshots().unwrap(), ["s1"]);
}

#[test]
fn a_read_only_device_refuses_writes_before_librbd() {
    let cluster = connect();
    let name = new_image(&pool(&cluster), "ro", 4 * MIB);
    let spec = RbdSpec {
        pool: POOL.into(),
        image: name,
    };
    let dev = Arc::new(RbdDevice::open(&cluster, &spec, true).unwrap());
    let mut d = Driver::new(&dev);
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        d.run(IoOp::Write, 0, Some(&mut buf[..]), false),
        Err(BlockError::ReadOnly)
    ));
    d.run(IoOp::Read, 0, Some(&mut buf[..]), false).unwrap();
    assert!(matches!(
        dev.write(0, &Bufs::one(&buf)),
        Err(BlockError::ReadOnly)
    ));
}
