//! The seam's bounds and error handling, on small devices made for each case.

use crate::engine::{Bufs, BufsMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::*;
use crate::engine::iov::RawBufs;
use crate::engine::raw::{RawDevice, RawOptions};

/// Reaps until `n` completions came, or fails after a few seconds.
fn reap_n(q: &mut dyn IoQueue, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} completions",
            out.len()
        );
        q.submit_pending();
        q.acknowledge();
        q.reap(&mut |c| out.push(c));
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

/// A device whose flushes wait until it is opened.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
    flushes: AtomicUsize,
}

impl BlockDevice for Gate {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read(&self, _: u64, _: &mut BufsMut<'_>) -> Result<(), BlockError> {
        Ok(())
    }
    fn write(&self, _: u64, _: &Bufs<'_>) -> Result<(), BlockError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        let mut open = self.open.lock();
        while !*open {
            self.opened.wait(&mut open);
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), BlockError> {
        Ok(())
    }
}

#[test]
fn requests_past_the_in_flight_cap_fail_at_once_and_the_others_complete() {
    let dev = Arc::new(Gate::default());
    let opts = QueueOptions {
        entries: 4,
        submit_batch: 4,
    };
    let mut q = dev.clone().open_queue(&opts).unwrap();
    for tag in 0..6 {
        q.submit(IoRequest::unbuffered(IoOp::Flush, false, tag));
    }
    // The device holds the first four; the two past the cap are refused without waiting.
    let refused = reap_n(q.as_mut(), 2);
    let tags: Vec<u64> = refused.iter().map(|c| c.tag).collect();
    assert_eq!(tags, vec![4, 5]);
    assert!(refused
        .iter()
        .all(|c| matches!(c.result, Err(BlockError::Busy))));
    assert_eq!(q.in_flight(), 4);
    *dev.open.lock() = true;
    dev.opened.notify_all();
    q.drain();
    let done = reap_n(q.as_mut(), 4);
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert_eq!(dev.flushes.load(Ordering::SeqCst), 4);
    assert_eq!(q.in_flight(), 0);
    // The same tag twice is two requests: the queue never trusts a caller's tags.
    q.submit(IoRequest::unbuffered(IoOp::Flush, false, 9));
    q.submit(IoRequest::unbuffered(IoOp::Flush, false, 9));
    q.drain();
    assert_eq!(reap_n(q.as_mut(), 2).len(), 2);
}

/// A raw file whose mapping is cut into one extent per sector, so a request can map to more
/// extents than the ring takes.
struct Scattered {
    raw: RawDevice,
    sync_reads: AtomicUsize,
    /// Whether to cut the mapping (else it is the raw device's one extent).
    split: bool,
}

impl BlockDevice for Scattered {
    fn size(&self) -> u64 {
        self.raw.size()
    }
    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        self.sync_reads.fetch_add(1, Ordering::SeqCst);
        self.raw.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        self.raw.write(offset, bufs)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.raw.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.raw.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.raw.write_zeroes(offset, len, may_unmap)
    }
    fn map(&self, op: MapOp, offset: u64, len: u64) -> Result<Option<Mapping>, BlockError> {
        let Some(m) = self.raw.map(op, offset, len)? else {
            return Ok(None);
        };
        if !self.split {
            return Ok(Some(m));
        }
        let mut extents = Vec::new();
        for e in m.extents {
            if let Extent::File {
                fd,
                offset,
                len,
                direct,
            } = e
            {
                for at in (0..len).step_by(512) {
                    extents.push(Extent::File {
                        fd,
                        offset: offset + at,
                        len: 512,
                        direct,
                    });
                }
            }
        }
        Ok(Some(Mapping::unheld(extents)))
    }
}

fn scattered(split: bool) -> (tempfile::TempDir, Arc<Scattered>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    RawDevice::create_sparse(&path, 4 << 20).unwrap();
    let raw = RawDevice::open(&path, RawOptions::default()).unwrap();
    let dev = Arc::new(Scattered {
        raw,
        sync_reads: AtomicUsize::new(0),
        split,
    });
    (dir, dev)
}

/// Reads `len` bytes at 0 into `pieces` equal buffers through a queue of `dev`.
fn read_through_queue(dev: &Arc<Scattered>, len: usize, pieces: usize) -> Vec<u8> {
    let opts = QueueOptions {
        entries: 8,
        submit_batch: 1,
    };
    let mut q = dev.clone().open_queue(&opts).unwrap();
    // Aligned for O_DIRECT, so that only the bounds decide whether the ring takes it.
    let mut backing = vec![0u8; len + 4096];
    let skip = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skip..skip + len];
    let piece = len / pieces;
    let base = buf.as_mut_ptr();
    // SAFETY: `buf` outlives the request (drained below) and is not touched meanwhile.
    let bufs = unsafe {
        RawBufs::new(
            (0..pieces).map(|i| (base.wrapping_add(i * piece), piece)),
            None,
        )
    };
    q.submit(IoRequest {
        op: IoOp::Read,
        offset: 0,
        bufs,
        durable: false,
        tag: 1,
    });
    q.drain();
    let done = reap_n(q.as_mut(), 1);
    assert!(done[0].result.is_ok(), "{:?}", done[0].result);
    buf.to_vec()
}

#[test]
fn a_request_of_more_extents_than_the_ring_takes_is_served_synchronously() {
    let (_dir, dev) = scattered(true);
    let data: Vec<u8> = (0..(MAX_EXTENTS + 1) * 512)
        .map(|i| (i / 512) as u8)
        .collect();
    dev.write(0, &Bufs::one(&data)).unwrap();
    assert_eq!(read_through_queue(&dev, data.len(), 1), data);
    assert_eq!(dev.sync_reads.load(Ordering::SeqCst), 1);
    // At the cap the ring takes it.
    let within = &data[..MAX_EXTENTS * 512];
    assert_eq!(read_through_queue(&dev, within.len(), 1), within);
    assert_eq!(dev.sync_reads.load(Ordering::SeqCst), 1);
}

#[test]
fn a_request_of_more_buffers_than_iov_max_is_served_in_pieces() {
    let (_dir, dev) = scattered(false);
    // One extent of 2 MiB, but 2048 buffers of 1 KiB: more than one readv takes.
    let len = 2 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i / 1024) as u8).collect();
    dev.write(0, &Bufs::one(&data)).unwrap();
    assert_eq!(read_through_queue(&dev, len, 2048), data);
    assert_eq!(
        dev.sync_reads.load(Ordering::SeqCst),
        1,
        "refused by the ring"
    );
    // 1024 buffers go through the ring.
    assert_eq!(read_through_queue(&dev, len, 1024), data);
    assert_eq!(dev.sync_reads.load(Ordering::SeqCst), 1);
}

/// A device whose ring flushes go to a pipe, where fdatasync fails (EINVAL), and whose own
/// flush succeeds unless a flush failed before, as a file's second fsync after a lost
/// writeback error does.
struct FailingFsync {
    state: Arc<FlushState>,
    pipe: (OwnedFd, OwnedFd),
}

impl BlockDevice for FailingFsync {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read(&self, _: u64, _: &mut BufsMut<'_>) -> Result<(), BlockError> {
        Ok(())
    }
    fn write(&self, _: u64, _: &Bufs<'_>) -> Result<(), BlockError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.state.check()?;
        self.state.record(Ok(()))
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), BlockError> {
        Ok(())
    }
    fn flush_fd(&self) -> Option<FlushFd> {
        Some(FlushFd {
            fd: self.pipe.0.as_raw_fd(),
            state: self.state.clone(),
        })
    }
}

#[test]
fn a_flush_that_failed_in_the_ring_makes_every_later_flush_fail() {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array, which outlives the call.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let pipe = unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    let dev = Arc::new(FailingFsync {
        state: Arc::default(),
        pipe,
    });
    assert!(dev.flush().is_ok());
    let opts = QueueOptions {
        entries: 4,
        submit_batch: 1,
    };
    let mut q = dev.clone().open_queue(&opts).unwrap();
    q.submit(IoRequest::unbuffered(IoOp::Flush, false, 1));
    q.drain();
    let first = reap_n(q.as_mut(), 1);
    assert!(first[0].result.is_err(), "the ring's fsync failed");
    assert!(dev.flush().is_err(), "a later synchronous flush succeeded");
    q.submit(IoRequest::unbuffered(IoOp::Flush, false, 2));
    q.drain();
    assert!(reap_n(q.as_mut(), 1)[0].result.is_err());
}

#[test]
fn a_raw_device_flush_after_a_failed_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    RawDevice::create_sparse(&path, 1 << 20).unwrap();
    let dev = RawDevice::open(&path, RawOptions::default()).unwrap();
    assert!(dev.flush().is_ok());
    let target = dev.flush_fd().unwrap();
    // What a ring reports when the host's fsync fails.
    assert!(target
        .state
        .record(Err(std::io::Error::from_raw_os_error(libc::EIO)))
        .is_err());
    assert!(
        dev.flush().is_err(),
        "the second fsync hid the first one's error"
    );
}

/// A request is moved by value through every queue that wraps another (counting, write
/// thresholds): at 128 bytes or less the compiler moves it with a few register copies, above
/// that with a call to memcpy each time, which was a measurable part of a null device's cost
/// per request.
#[test]
fn a_request_moves_without_memcpy() {
    assert!(std::mem::size_of::<super::IoRequest>() <= 128);
}
