//! Running a request through a device's synchronous methods.

use super::{IoOp, IoRequest};
use crate::engine::{BlockDevice, BlockError, Bufs, BufsMut};

/// Runs `req` to its end, flushing afterwards when it must be durable.
pub(super) fn run(dev: &dyn BlockDevice, req: &IoRequest) -> Result<(), BlockError> {
    match &req.op {
        IoOp::Read => {
            // SAFETY: per `RawBufs::new`'s contract the pieces are valid, and reached through
            // no reference in this process, until the request completes, after this call.
            let mut bufs = unsafe { BufsMut::from_raw(req.bufs.pieces()) };
            dev.read(req.offset, &mut bufs)?;
        }
        IoOp::Write => {
            // SAFETY: as for reads.
            let bufs = unsafe { Bufs::from_raw(req.bufs.pieces()) };
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
