//! Running a request through a device's synchronous methods.

use std::io::{IoSlice, IoSliceMut};

use smallvec::SmallVec;

use super::{IoOp, IoRequest};
use crate::engine::{BlockDevice, BlockError};

/// Runs `req` to its end, flushing afterwards when it must be durable.
pub(super) fn run(dev: &dyn BlockDevice, req: &IoRequest) -> Result<(), BlockError> {
    match &req.op {
        IoOp::Read => {
            let mut bufs: SmallVec<[IoSliceMut<'_>; 4]> = req
                .bufs
                .pieces()
                .iter()
                // SAFETY: per `RawBufs::new`'s contract the piece is valid and nothing else in
                // this process uses it until the request completes, which is after this call.
                .map(|p| IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p.ptr, p.len) }))
                .collect();
            dev.read(req.offset, &mut bufs)?;
        }
        IoOp::Write => {
            let bufs: SmallVec<[IoSlice<'_>; 4]> = req
                .bufs
                .pieces()
                .iter()
                // SAFETY: as for reads.
                .map(|p| IoSlice::new(unsafe { std::slice::from_raw_parts(p.ptr, p.len) }))
                .collect();
            dev.write(req.offset, &bufs)?;
        }
        IoOp::Flush => dev.flush()?,
        IoOp::Discard(ranges) => {
            for r in ranges {
                dev.discard(r.offset, r.len)?;
            }
        }
        IoOp::WriteZeroes(ranges) => {
            for r in ranges {
                dev.write_zeroes(r.offset, r.len, r.may_unmap)?;
            }
        }
    }
    if req.durable && req.op.mutates() {
        dev.flush()?;
    }
    Ok(())
}
