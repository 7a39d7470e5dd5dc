//! A thin device's allocation, from its mappings: a mapped block is data, an unmapped one a
//! hole that reads as zeros (or, on a device with an external origin, the origin's data).

use super::ThinDevice;
use crate::engine::allocation::{push_run, Allocation, AllocationRun, MAX_QUERY_BYTES};
use crate::engine::{check_range, BlockDevice, BlockError};

impl ThinDevice {
    /// See [`BlockDevice::allocation`]: one walk of the device's mapping btree over the
    /// blocks the range touches (at most [`MAX_QUERY_BYTES`] of them at once).
    pub(super) fn allocation_runs(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<AllocationRun>, BlockError> {
        check_range(offset, len, self.size())?;
        let len = len.min(MAX_QUERY_BYTES);
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        let block = self.pool.block_size();
        let (first, last) = (offset / block, end.div_ceil(block));
        let mapped = self.pool.meta().mappings(self.dev, first, last)?;
        // Unmapped blocks below the origin's end read the origin: data, not holes.
        let origin_end = self.origin_size();
        let mut runs = Vec::new();
        let mut pos = offset;
        let unmapped_until = |runs: &mut Vec<AllocationRun>, pos: &mut u64, to: u64| {
            let to = to.min(end);
            if *pos >= to {
                return;
            }
            let from_origin = origin_end.clamp(*pos, to);
            push_run(runs, from_origin - *pos, Allocation::Data);
            push_run(runs, to - from_origin, Allocation::Hole);
            *pos = to;
        };
        for (vblock, _) in mapped {
            let start = vblock.saturating_mul(block).max(offset);
            unmapped_until(&mut runs, &mut pos, start);
            let stop = vblock.saturating_add(1).saturating_mul(block).min(end);
            if stop > pos {
                push_run(&mut runs, stop - pos, Allocation::Data);
                pos = stop;
            }
        }
        unmapped_until(&mut runs, &mut pos, end);
        Ok(runs)
    }
}
