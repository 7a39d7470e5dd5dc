//! Running a framed request against a [`BlockDevice`] and writing its status.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};

use log::{debug, warn};
use smallvec::SmallVec;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

use super::config::{MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, SECTOR_SIZE};
use super::request::{gather, Op, Request, Segment};
use crate::engine::{BlockDevice, BlockError};

const BAD_RANGE: &str = "sector range outside the device or not whole sectors";
const NOT_IN_MEMORY: &str = "buffer outside guest memory";

/// Longest serial GET_ID returns (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;
const RANGE_SEGMENT_LEN: u64 = 16;
const RANGE_FLAG_UNMAP: u32 = 1;

/// A request that failed, as the export's owner hears of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    pub op: Op,
    pub sector: u64,
    pub status: u8,
    /// The device ran out of space (a thin pool without free data blocks).
    pub nospace: bool,
    pub reason: &'static str,
}

/// Told about every failed request, from the queue worker that completes it: keep it short.
pub type FailureSink = std::sync::Arc<dyn Fn(&Failure) + Send + Sync>;

/// What a request runs against.
pub struct Target<'a> {
    pub dev: &'a dyn BlockDevice,
    pub read_only: bool,
    pub serial: &'a [u8],
    /// The guest's write cache mode: when off, writes are flushed before they complete.
    pub writeback: bool,
    /// Who hears of failed requests, besides the log.
    pub on_failure: Option<&'a (dyn Fn(&Failure) + Send + Sync)>,
}

/// Status and bytes written into device-writable buffers, excluding the status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub written: u32,
    /// Why the request failed, for the log.
    pub reason: &'static str,
    /// It failed because the device is out of space.
    pub nospace: bool,
}

impl Outcome {
    pub fn ok(written: u32) -> Self {
        Outcome {
            status: VIRTIO_BLK_S_OK as u8,
            written,
            reason: "",
            nospace: false,
        }
    }
    pub fn ioerr(reason: &'static str) -> Self {
        Outcome {
            status: VIRTIO_BLK_S_IOERR as u8,
            written: 0,
            reason,
            nospace: false,
        }
    }
    fn unsupp(reason: &'static str) -> Self {
        Outcome {
            status: VIRTIO_BLK_S_UNSUPP as u8,
            written: 0,
            reason,
            nospace: false,
        }
    }
}

pub fn from_block(err: &BlockError) -> Outcome {
    match err {
        BlockError::Unsupported(_) => Outcome::unsupp("unsupported by the device"),
        BlockError::NoSpace => Outcome {
            nospace: true,
            ..Outcome::ioerr("the device is out of space")
        },
        BlockError::ReadOnly => Outcome::ioerr("the device is read-only"),
        _ => Outcome::ioerr("the device failed"),
    }
}

/// Host views of a request's buffers: one per segment unless a segment crosses regions.
pub type HostSlices = SmallVec<[(*mut u8, usize); 4]>;

/// Host views of guest buffers, or `None` if any byte lies outside guest memory.
pub fn host_slices(mem: &GuestMemoryMmap, segs: &[Segment]) -> Option<HostSlices> {
    let mut out = HostSlices::new();
    for s in segs {
        let len = usize::try_from(s.len).ok()?;
        if len == 0 {
            continue;
        }
        // A buffer within one region, as nearly all are, costs one region lookup.
        if let Ok(slice) = GuestMemoryBackend::get_slice(mem, s.addr, len) {
            out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
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
            out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
        }
    }
    Some(out)
}

/// Runs `req` synchronously and stores its status byte. Returns the used length for the chain.
pub fn complete(mem: &GuestMemoryMmap, req: &Request, target: &Target<'_>) -> u32 {
    finish(mem, req, run(mem, req, target), target)
}

/// Stores a finished request's status byte. Returns the used length for the chain.
pub fn finish(mem: &GuestMemoryMmap, req: &Request, outcome: Outcome, t: &Target<'_>) -> u32 {
    if outcome.status != VIRTIO_BLK_S_OK as u8 {
        note_failure(req, &outcome);
        if let Some(sink) = t.on_failure {
            sink(&Failure {
                op: req.op,
                sector: req.sector,
                status: outcome.status,
                nospace: outcome.nospace,
                reason: outcome.reason,
            });
        }
    }
    // A volatile store of the one byte, rather than a general guest memory copy.
    let status = GuestMemoryBackend::get_slice(mem, req.status, 1).and_then(|s| {
        s.get_ref::<u8>(0)
            .map(|r| r.store(outcome.status))
            .map_err(Into::into)
    });
    match status {
        Ok(()) => outcome.written.saturating_add(1),
        Err(e) => {
            warn!("cannot write request status: {e}");
            0
        }
    }
}

/// Logs a failed request without letting a guest flood the log: the 1st, 2nd, 4th, 8th...
/// failure is a warning, the rest debug messages.
fn note_failure(req: &Request, outcome: &Outcome) {
    static FAILURES: AtomicU64 = AtomicU64::new(0);
    let n = FAILURES.fetch_add(1, Ordering::Relaxed) + 1;
    let (op, sector, status, why) = (req.op, req.sector, outcome.status, outcome.reason);
    if n.is_power_of_two() {
        warn!("{op:?} at sector {sector} failed with status {status}: {why} ({n} failures so far)");
    } else {
        debug!("{op:?} at sector {sector} failed with status {status}: {why}");
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

fn run(mem: &GuestMemoryMmap, req: &Request, t: &Target<'_>) -> Outcome {
    let mutates = matches!(req.op, Op::Write | Op::Discard | Op::WriteZeroes);
    if mutates && t.read_only {
        return Outcome::ioerr("write to a read-only export");
    }
    let result = match req.op {
        Op::Read => return read(mem, req, t),
        Op::GetId => return get_id(mem, req, t),
        Op::Write => write(mem, req, t),
        Op::Flush => t.dev.flush().map_err(|e| from_block(&e)),
        Op::Discard | Op::WriteZeroes => ranges(mem, req, t),
    };
    let result = result.and_then(|()| {
        if mutates && !t.writeback {
            t.dev.flush().map_err(|e| from_block(&e))
        } else {
            Ok(())
        }
    });
    result.map(|()| Outcome::ok(0)).unwrap_or_else(|o| o)
}

fn read(mem: &GuestMemoryMmap, req: &Request, t: &Target<'_>) -> Outcome {
    let Some((offset, len)) = io_range(req, t.dev) else {
        return Outcome::ioerr(BAD_RANGE);
    };
    let Some(slices) = host_slices(mem, &req.data) else {
        return Outcome::ioerr(NOT_IN_MEMORY);
    };
    let mut iovs: SmallVec<[IoSliceMut<'_>; 4]> = slices
        .iter()
        // SAFETY: each pointer comes from a guest memory region that `mem` keeps mapped for the
        // whole call, and spans exactly `n` bytes of it. The guest owns these buffers until the
        // chain is returned, so nothing else in this process touches them meanwhile.
        .map(|&(p, n)| IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p, n) }))
        .collect();
    match t.dev.read(offset, &mut iovs) {
        Ok(()) => Outcome::ok(u32::try_from(len).unwrap_or(u32::MAX)),
        Err(e) => {
            warn!("read of {len} bytes at {offset} failed: {e}");
            from_block(&e)
        }
    }
}

fn write(mem: &GuestMemoryMmap, req: &Request, t: &Target<'_>) -> Result<(), Outcome> {
    let (offset, len) = io_range(req, t.dev).ok_or(Outcome::ioerr(BAD_RANGE))?;
    let slices = host_slices(mem, &req.data).ok_or(Outcome::ioerr(NOT_IN_MEMORY))?;
    let iovs: SmallVec<[IoSlice<'_>; 4]> = slices
        .iter()
        // SAFETY: as in `read`: mapped for the call, `n` bytes long, owned by the request.
        .map(|&(p, n)| IoSlice::new(unsafe { std::slice::from_raw_parts(p, n) }))
        .collect();
    t.dev.write(offset, &iovs).map_err(|e| {
        warn!("write of {len} bytes at {offset} failed: {e}");
        from_block(&e)
    })
}

fn get_id(mem: &GuestMemoryMmap, req: &Request, t: &Target<'_>) -> Outcome {
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
        if mem.write_slice(&id[pos..pos + take], s.addr).is_err() {
            return Outcome::ioerr(NOT_IN_MEMORY);
        }
        pos += take;
    }
    Outcome::ok(pos as u32)
}

/// DISCARD and WRITE_ZEROES: every segment is checked before any of them runs.
fn ranges(mem: &GuestMemoryMmap, req: &Request, t: &Target<'_>) -> Result<(), Outcome> {
    let bad_list = Outcome::ioerr("malformed range list");
    let len = data_len(req).ok_or(bad_list)?;
    if len == 0 || len % RANGE_SEGMENT_LEN != 0 {
        return Err(bad_list);
    }
    let bytes = gather(
        mem,
        &req.data,
        u64::from(MAX_RANGE_SEGMENTS) * RANGE_SEGMENT_LEN,
    )
    .ok_or(bad_list)?;
    let mut work = Vec::new();
    for seg in bytes.chunks_exact(RANGE_SEGMENT_LEN as usize) {
        let field = |r: std::ops::Range<usize>| seg.get(r).unwrap_or(&[]).to_vec();
        let sector = u64::from_le_bytes(field(0..8).try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(field(8..12).try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(field(12..16).try_into().unwrap_or_default());
        let unmap = flags & RANGE_FLAG_UNMAP != 0;
        if flags & !RANGE_FLAG_UNMAP != 0 || (unmap && req.op == Op::Discard) {
            return Err(Outcome::unsupp("unknown range flags"));
        }
        if sectors > MAX_RANGE_SECTORS {
            return Err(Outcome::ioerr("range longer than the limit"));
        }
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(Outcome::ioerr(BAD_RANGE))?;
        let n = u64::from(sectors) * SECTOR_SIZE;
        match offset.checked_add(n) {
            Some(end) if end <= t.dev.size() => work.push((offset, n, unmap)),
            _ => return Err(Outcome::ioerr(BAD_RANGE)),
        }
    }
    for (offset, n, unmap) in work {
        let r = match req.op {
            Op::Discard => t.dev.discard(offset, n),
            _ => t.dev.write_zeroes(offset, n, unmap),
        };
        r.map_err(|e| {
            warn!("{:?} of {n} bytes at {offset} failed: {e}", req.op);
            from_block(&e)
        })?;
    }
    Ok(())
}
