//! A framed request becomes a request of the device's I/O queue; its completion becomes the
//! status byte. Nothing here does host I/O.

use std::sync::atomic::{AtomicU64, Ordering};

use log::{debug, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};

use super::config::{MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, SECTOR_SIZE};
use super::dirty_log::GuestMemoryMmap;
use super::request::{gather, Op, Request, Segment};
use crate::engine::io::{ByteRange, IoOp, IoRequest};
use crate::engine::iov::RawBufs;
use crate::engine::{BlockDevice, BlockError};

/// Longest serial GET_ID returns (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;
const RANGE_SEGMENT_LEN: u64 = 16;
const RANGE_FLAG_UNMAP: u32 = 1;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error("sector range outside the device or not whole sectors")]
    BadRange,
    #[error("buffer outside guest memory")]
    NotInMemory,
    #[error("write to a read-only export")]
    ReadOnlyExport,
    #[error("malformed range list")]
    BadRangeList,
    #[error("unknown range flags")]
    UnknownRangeFlags,
    #[error("range longer than the limit")]
    RangeTooLong,
    #[error("no I/O queue for this virtqueue")]
    NoQueue,
    #[error("the device failed: {0}")]
    Device(#[from] BlockError),
}

impl ExecuteError {
    /// The virtio status the guest sees.
    pub fn status(&self) -> u8 {
        match self {
            ExecuteError::UnknownRangeFlags | ExecuteError::Device(BlockError::Unsupported(_)) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// It failed because the device is out of space.
    pub fn nospace(&self) -> bool {
        matches!(self, ExecuteError::Device(BlockError::NoSpace))
    }

    /// The request was refused before it reached the device (QEMU's "invalid" operations).
    pub fn invalid(&self) -> bool {
        !matches!(self, ExecuteError::Device(_) | ExecuteError::NoQueue)
    }
}

/// A request that failed, as the export's owner hears of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub op: Op,
    pub sector: u64,
    pub status: u8,
    /// The device ran out of space (a thin pool without free data blocks).
    pub nospace: bool,
    /// Refused before the device saw it (out of range, malformed ranges...).
    pub invalid: bool,
    pub reason: String,
}

/// Told about every failed request, from the queue worker that completes it: keep it short.
pub type FailureSink = std::sync::Arc<dyn Fn(&Failure) + Send + Sync>;

/// What a request runs against.
pub struct Target<'a> {
    pub dev: &'a dyn BlockDevice,
    pub read_only: bool,
    pub serial: &'a [u8],
    /// The guest's write cache mode: when off, writes complete only once durable.
    pub writeback: bool,
    /// Who hears of failed requests, besides the log.
    pub on_failure: Option<&'a (dyn Fn(&Failure) + Send + Sync)>,
}

/// What becomes of a framed request.
pub enum Prepared {
    /// Finished without the device (GET_ID, or refused): used bytes or why it failed.
    Done(Result<u32, ExecuteError>),
    /// For the device's queue (its tag still to be set), and the bytes it writes on success.
    Submit(IoRequest, u32),
}

/// The host pieces of guest buffers (one per segment unless a segment crosses regions),
/// built straight into the request's buffers rather than through a list of their own; `None`
/// if any byte lies outside guest memory.
///
/// # Safety
/// As for [`RawBufs::new`]: the caller keeps `mem`'s mappings alive until the request that
/// carries the buffers has completed, and makes no Rust reference over them meanwhile.
unsafe fn host_bufs(mem: &GuestMemoryMmap, segs: &[Segment]) -> Option<RawBufs> {
    let mut out = RawBufs::default();
    for s in segs {
        let len = usize::try_from(s.len).ok()?;
        if len == 0 {
            continue;
        }
        // A buffer within one region, as nearly all are, costs one region lookup.
        if let Ok(slice) = GuestMemoryBackend::get_slice(mem, s.addr, len) {
            // SAFETY: a piece of a region of `mem`, under this function's own contract.
            unsafe { out.push(slice.ptr_guard_mut().as_ptr(), slice.len()) };
            continue;
        }
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, len) {
            let slice = match slice {
                Ok(s) => s,
                Err(e) => {
                    debug!(
                        "guest buffer {:#x}+{len} is not in guest memory: {e}",
                        s.addr.0
                    );
                    return None;
                }
            };
            // SAFETY: as above.
            unsafe { out.push(slice.ptr_guard_mut().as_ptr(), slice.len()) };
        }
    }
    Some(out)
}

/// Checks a framed request and turns it into a request of the device's queue.
///
/// # Safety
/// The request's buffers point into `mem`'s regions and carry nothing that keeps them mapped:
/// the caller must keep `mem` (its mappings) alive until the request has completed, or until
/// the queue it was submitted to is drained or dropped.
pub unsafe fn prepare(mem: &GuestMemoryMmap, req: &Request, t: &Target<'_>) -> Prepared {
    match prepare_io(mem, req, t) {
        Ok(Some((io, written))) => Prepared::Submit(io, written),
        Ok(None) => Prepared::Done(get_id(mem, req, t)),
        Err(e) => Prepared::Done(Err(e)),
    }
}

fn prepare_io(
    mem: &GuestMemoryMmap,
    req: &Request,
    t: &Target<'_>,
) -> Result<Option<(IoRequest, u32)>, ExecuteError> {
    let mutates = matches!(req.op, Op::Write | Op::Discard | Op::WriteZeroes);
    if mutates && t.read_only {
        return Err(ExecuteError::ReadOnlyExport);
    }
    let durable = mutates && !t.writeback;
    let (op, written) = match req.op {
        Op::GetId => return Ok(None),
        Op::Read => (IoOp::Read, 0),
        Op::Write => (IoOp::Write, 0),
        Op::Flush => return Ok(Some((IoRequest::unbuffered(IoOp::Flush, false, 0), 0))),
        Op::Discard => {
            let ranges = ranges(mem, req, t)?;
            let io = IoRequest::unbuffered(IoOp::Discard(ranges.into()), durable, 0);
            return Ok(Some((io, 0)));
        }
        Op::WriteZeroes => {
            let ranges = ranges(mem, req, t)?;
            let io = IoRequest::unbuffered(IoOp::WriteZeroes(ranges.into()), durable, 0);
            return Ok(Some((io, 0)));
        }
    };
    let (offset, len) = io_range(req, t.dev).ok_or(ExecuteError::BadRange)?;
    // SAFETY: each piece lies in a guest memory region of `mem`, which the caller keeps
    // mapped until the request completes (`prepare`'s contract): no keepalive per request,
    // which would be two atomic operations on a count both queues' workers share. The guest
    // gave these buffers to the device until the chain is returned, which is after the request
    // completes, and nothing in this process makes a Rust reference over them.
    let bufs = unsafe { host_bufs(mem, &req.data) }.ok_or(ExecuteError::NotInMemory)?;
    let written = if op == IoOp::Read {
        u32::try_from(len).map_err(|_| ExecuteError::BadRange)?
    } else {
        written
    };
    let io = IoRequest {
        op,
        offset,
        bufs,
        durable,
        tag: 0,
    };
    Ok(Some((io, written)))
}

/// Runs `req` to its end on this thread, through the device's synchronous methods, and
/// stores its status byte; returns the used length. For fuzzing and tests: a queue worker
/// submits to the device's queue instead.
pub fn complete(mem: &GuestMemoryMmap, req: &Request, t: &Target<'_>) -> u32 {
    // SAFETY: the request runs to its end on this thread while `mem` is borrowed.
    let result = match unsafe { prepare(mem, req, t) } {
        Prepared::Done(result) => result,
        Prepared::Submit(io, written) => crate::engine::io::run_now(t.dev, &io)
            .map(|()| written)
            .map_err(ExecuteError::from),
    };
    finish(mem, req.op, req.sector, req.status, result, t)
}

/// Stores a finished request's status byte and tells of a failure. Returns the used length
/// for the chain.
pub fn finish(
    mem: &GuestMemoryMmap,
    op: Op,
    sector: u64,
    status_at: GuestAddress,
    result: Result<u32, ExecuteError>,
    t: &Target<'_>,
) -> u32 {
    let (status, written) = match &result {
        Ok(n) => (VIRTIO_BLK_S_OK as u8, *n),
        Err(e) => {
            note_failure(op, sector, e);
            if let Some(sink) = t.on_failure {
                sink(&Failure {
                    op,
                    sector,
                    status: e.status(),
                    nospace: e.nospace(),
                    invalid: e.invalid(),
                    reason: e.to_string(),
                });
            }
            (e.status(), 0)
        }
    };
    // A volatile store of the one byte, rather than a general guest memory copy.
    let stored = GuestMemoryBackend::get_slice(mem, status_at, 1).and_then(|s| {
        s.get_ref::<u8>(0)
            .map(|r| r.store(status))
            .map_err(Into::into)
    });
    match stored {
        Ok(()) => written.saturating_add(1),
        Err(e) => {
            warn!("cannot write request status: {e}");
            0
        }
    }
}

/// Logs a failed request without letting a guest flood the log: the 1st, 2nd, 4th, 8th...
/// failure is a warning, the rest debug messages.
fn note_failure(op: Op, sector: u64, e: &ExecuteError) {
    static FAILURES: AtomicU64 = AtomicU64::new(0);
    let n = FAILURES.fetch_add(1, Ordering::Relaxed) + 1;
    let status = e.status();
    if n.is_power_of_two() {
        warn!("{op:?} at sector {sector} failed with status {status}: {e} ({n} failures so far)");
    } else {
        debug!("{op:?} at sector {sector} failed with status {status}: {e}");
    }
}

fn data_len(req: &Request) -> Option<u64> {
    req.data.iter().try_fold(0u64, |a, s| a.checked_add(s.len))
}

/// The byte range a read or write covers, if it is whole sectors within the device.
pub fn io_range(req: &Request, dev: &dyn BlockDevice) -> Option<(u64, u64)> {
    let len = data_len(req)?;
    let offset = req.sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (len % SECTOR_SIZE == 0 && end <= dev.size()).then_some((offset, len))
}

fn get_id(mem: &GuestMemoryMmap, req: &Request, t: &Target<'_>) -> Result<u32, ExecuteError> {
    let mut id = [0u8; ID_BYTES];
    let n = t.serial.len().min(ID_BYTES);
    id[..n].copy_from_slice(&t.serial[..n]);
    let mut pos = 0usize;
    for s in &req.data {
        let take = usize::try_from(s.len)
            .unwrap_or(usize::MAX)
            .min(ID_BYTES - pos);
        if take == 0 {
            break;
        }
        mem.write_slice(&id[pos..pos + take], s.addr)
            .map_err(|_| ExecuteError::NotInMemory)?;
        pos += take;
    }
    Ok(pos as u32)
}

/// The segments of DISCARD and WRITE_ZEROES: every one is checked before any of them runs.
fn ranges(
    mem: &GuestMemoryMmap,
    req: &Request,
    t: &Target<'_>,
) -> Result<Vec<ByteRange>, ExecuteError> {
    let len = data_len(req).ok_or(ExecuteError::BadRangeList)?;
    if len == 0 || len % RANGE_SEGMENT_LEN != 0 {
        return Err(ExecuteError::BadRangeList);
    }
    let bytes = gather(
        mem,
        &req.data,
        u64::from(MAX_RANGE_SEGMENTS) * RANGE_SEGMENT_LEN,
    )
    .ok_or(ExecuteError::BadRangeList)?;
    let mut work = Vec::with_capacity(bytes.len() / RANGE_SEGMENT_LEN as usize);
    for seg in bytes.chunks_exact(RANGE_SEGMENT_LEN as usize) {
        let field = |r: std::ops::Range<usize>| seg.get(r).unwrap_or(&[]).to_vec();
        let sector = u64::from_le_bytes(field(0..8).try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(field(8..12).try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(field(12..16).try_into().unwrap_or_default());
        let unmap = flags & RANGE_FLAG_UNMAP != 0;
        if flags & !RANGE_FLAG_UNMAP != 0 || (unmap && req.op == Op::Discard) {
            return Err(ExecuteError::UnknownRangeFlags);
        }
        if sectors > MAX_RANGE_SECTORS {
            return Err(ExecuteError::RangeTooLong);
        }
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(ExecuteError::BadRange)?;
        let n = u64::from(sectors) * SECTOR_SIZE;
        match offset.checked_add(n) {
            Some(end) if end <= t.dev.size() => work.push(ByteRange {
                offset,
                len: n,
                may_unmap: unmap,
            }),
            _ => return Err(ExecuteError::BadRange),
        }
    }
    Ok(work)
}
