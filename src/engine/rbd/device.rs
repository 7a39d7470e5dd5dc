//! An RBD image as a block device: the raw `rbd=` export, and a thin pool's data device.
//!
//! Frontends reach it through its queues (`queue.rs`: `rbd_aio_*`, completions into the
//! queue's eventfd); the synchronous methods, for the engine, tools and tests, wait for the
//! same calls. librbd's own cache (on by default, write-through until the first flush) sits
//! under both; a flush goes through it to the OSDs.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::error::ceph_error;
use super::image::RbdImage;
use super::queue::RbdQueue;
use super::{Cluster, RbdSpec};
use crate::engine::io::{FlushState, IoQueue, QueueOptions};
use crate::engine::iov::Piece;
use crate::engine::{check_range, BlockDevice, BlockError, Bufs, BufsMut, DataDevice};

/// The librbd calls a device's queues started: how many, and the most in flight at once.
/// For tests (that a thin device on RBD really keeps many requests in flight) and statistics.
#[derive(Debug, Default)]
pub struct AioCounts {
    started: AtomicU64,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

impl AioCounts {
    pub(super) fn begin(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(super) fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Calls started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// The most calls in flight at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

/// An open RBD image served byte for byte.
pub struct RbdDevice {
    image: Arc<RbdImage>,
    /// Bytes, a multiple of 512; changes only through `grow_to`.
    size: AtomicU64,
    read_only: bool,
    /// Sticky: once a flush failed, every later one fails (see `FlushState`).
    flushed: Arc<FlushState>,
    aio: AioCounts,
}

impl RbdDevice {
    /// Opens `spec` on `cluster` (which must exist). A read-only device opens the image
    /// read-only: it takes no lock and librbd refuses writes too.
    pub fn open(cluster: &Arc<Cluster>, spec: &RbdSpec, read_only: bool) -> io::Result<Self> {
        let io = cluster.ioctx(&spec.pool)?;
        let image = RbdImage::open(&io, &spec.image, read_only)?;
        RbdDevice::from_image(Arc::new(image))
    }

    /// A device on an image opened by the caller (a pool that holds its lock).
    pub fn from_image(image: Arc<RbdImage>) -> io::Result<Self> {
        let size = image.size()? & !511;
        Ok(RbdDevice {
            read_only: image.is_read_only(),
            image,
            size: AtomicU64::new(size),
            flushed: Arc::default(),
            aio: AioCounts::default(),
        })
    }

    pub fn image(&self) -> &Arc<RbdImage> {
        &self.image
    }

    /// The librbd calls its queues started.
    pub fn aio_counts(&self) -> &AioCounts {
        &self.aio
    }

    pub(super) fn flush_state(&self) -> &Arc<FlushState> {
        &self.flushed
    }

    pub(super) fn writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            Err(BlockError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

/// The pieces as iovecs, in runs of at most `IOV_MAX` (what one librbd call takes), each
/// with its byte offset from the start of the list and its length.
fn iov_runs(pieces: &[Piece]) -> impl Iterator<Item = (u64, u64, &[libc::iovec])> {
    // SAFETY: `Piece` is `#[repr(C)]` { *mut u8, usize }, the layout of `struct iovec`; the
    // slice borrows `pieces` for as long as it is used.
    let iov: &[libc::iovec] =
        unsafe { std::slice::from_raw_parts(pieces.as_ptr().cast(), pieces.len()) };
    let mut at = 0u64;
    iov.chunks(libc::UIO_MAXIOV as usize).map(move |run| {
        let len: u64 = run.iter().map(|v| v.iov_len as u64).sum();
        let start = at;
        at += len;
        (start, len, run)
    })
}

impl BlockDevice for RbdDevice {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        check_range(offset, bufs.len(), self.size())?;
        for (at, len, iov) in iov_runs(bufs.pieces()) {
            // SAFETY: the buffers are valid for writes for the lifetime of `bufs` (the buffer
            // lists' contract), which outlives this call.
            let got = unsafe { self.image.readv(offset + at, iov) }
                .map_err(|e| BlockError::io(offset + at, e))?;
            if got as u64 != len {
                return Err(BlockError::io(
                    offset + at,
                    ceph_error("rbd_aio_readv", libc::EIO),
                ));
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        self.writable()?;
        check_range(offset, bufs.len(), self.size())?;
        for (at, _, iov) in iov_runs(bufs.pieces()) {
            // SAFETY: the buffers are valid for reads for the lifetime of `bufs`.
            unsafe { self.image.writev(offset + at, iov) }
                .map_err(|e| BlockError::io(offset + at, e))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.flushed.check()?;
        self.flushed.record(self.image.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        self.image
            .discard(offset, len)
            .map_err(|e| BlockError::io(offset, e))
    }

    /// librbd zeroes what it can by releasing whole objects whether or not `may_unmap`
    /// allows it; either way the range reads as zeros and stays writable.
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        self.image
            .write_zeroes(offset, len)
            .map_err(|e| BlockError::io(offset, e))
    }

    fn open_queue(self: Arc<Self>, opts: &QueueOptions) -> io::Result<Box<dyn IoQueue>> {
        Ok(Box::new(RbdQueue::open(self, opts)?))
    }

    fn snapshot_internal(&self, name: &str) -> Result<(), BlockError> {
        self.image
            .snap_create(name)
            .map_err(|e| BlockError::io(0, e))
    }
}

impl DataDevice for RbdDevice {
    /// A thin pool's data I/O goes to this device's queues (`rbd_aio_*`), like a raw export's.
    fn through_queue(&self) -> bool {
        true
    }

    /// Resizes the image when it is smaller than `size` (RBD images are thin: growing costs
    /// nothing until written), then re-reads its size.
    fn grow_to(&self, size: u64) -> Result<u64, BlockError> {
        if size > self.size() {
            self.writable()?;
            self.image
                .resize(size)
                .map_err(|e| BlockError::io(size, e))?;
        }
        let now = self.image.size().map_err(|e| BlockError::io(0, e))? & !511;
        self.size.store(now, Ordering::Release);
        Ok(now)
    }
}
