//! Read-only questions about devices that walk their mappings: how much of a device is its
//! own, and where two devices differ (for incremental backup).

use std::cmp::Ordering;

use super::volumes::{VolumeError, Volumes};
use crate::engine::allocation::MAX_QUERY_BYTES;
use crate::engine::pdata::values::BlockTime;

/// How a run of blocks differs between a base device and a target device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaKind {
    /// Both map the blocks, to different data blocks.
    Different,
    /// Only the base maps them.
    LeftOnly,
    /// Only the target maps them.
    RightOnly,
}

impl DeltaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeltaKind::Different => "different",
            DeltaKind::LeftOnly => "left-only",
            DeltaKind::RightOnly => "right-only",
        }
    }
}

/// `len` consecutive virtual blocks from `begin` that differ the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaRun {
    pub begin: u64,
    pub len: u64,
    pub kind: DeltaKind,
}

/// Appends block `vblock` of `kind`, extending the last run when it continues it.
fn push(runs: &mut Vec<DeltaRun>, vblock: u64, kind: DeltaKind) {
    if let Some(last) = runs.last_mut() {
        if last.kind == kind && last.begin + last.len == vblock {
            last.len += 1;
            return;
        }
    }
    runs.push(DeltaRun {
        begin: vblock,
        len: 1,
        kind,
    });
}

/// The runs where two sorted mapping lists differ. Blocks mapped to the same data block are
/// the same; blocks neither maps are the same (both read zeros).
pub fn diff_mappings(left: &[(u64, BlockTime)], right: &[(u64, BlockTime)]) -> Vec<DeltaRun> {
    let mut runs = Vec::new();
    let (mut l, mut r) = (left.iter().peekable(), right.iter().peekable());
    loop {
        match (l.peek(), r.peek()) {
            (None, None) => break,
            (Some((lv, _)), None) => {
                push(&mut runs, *lv, DeltaKind::LeftOnly);
                l.next();
            }
            (None, Some((rv, _))) => {
                push(&mut runs, *rv, DeltaKind::RightOnly);
                r.next();
            }
            (Some((lv, lb)), Some((rv, rb))) => match lv.cmp(rv) {
                Ordering::Less => {
                    push(&mut runs, *lv, DeltaKind::LeftOnly);
                    l.next();
                }
                Ordering::Greater => {
                    push(&mut runs, *rv, DeltaKind::RightOnly);
                    r.next();
                }
                Ordering::Equal => {
                    if lb.block != rb.block {
                        push(&mut runs, *lv, DeltaKind::Different);
                    }
                    l.next();
                    r.next();
                }
            },
        }
    }
    runs
}

impl Volumes {
    /// Blocks mapped by `name` that no other device (or held metadata snapshot) references:
    /// what deleting it would free.
    pub fn exclusive_blocks(&self, name: &str) -> Result<u64, VolumeError> {
        let id = self.id_of(name)?;
        let meta = self.pool().meta();
        let mut n = 0;
        for (_, bt) in meta.mappings(id, 0, u64::MAX)? {
            if meta.data_block_count(bt.block)? == 1 {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Where `target` differs from `base`, in data blocks, as of now (uncommitted writes
    /// included). Both are read under one metadata lock, so the answer is one instant.
    pub fn delta(&self, base: &str, target: &str) -> Result<Vec<DeltaRun>, VolumeError> {
        let (left, right) = (self.id_of(base)?, self.id_of(target)?);
        let meta = self.pool().meta();
        let l = meta.mappings(left, 0, u64::MAX)?;
        let r = meta.mappings(right, 0, u64::MAX)?;
        drop(meta);
        Ok(diff_mappings(&l, &r))
    }

    /// Which bytes of `[offset, offset + len)` of `target` differ from `base` (whole blocks
    /// at a time): consecutive `(length, changed)` runs from `offset`, at most
    /// [`MAX_QUERY_BYTES`] of them. What an incremental backup reads (NBD's dirty bitmap
    /// context). The range must lie within `target`.
    pub fn changed_runs(
        &self,
        base: &str,
        target: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, bool)>, VolumeError> {
        let (left, right) = (self.id_of(base)?, self.id_of(target)?);
        let len = len.min(MAX_QUERY_BYTES);
        let end = offset.saturating_add(len);
        let block = self.pool().block_size();
        let (first, last) = (offset / block, end.div_ceil(block));
        let meta = self.pool().meta();
        let l = meta.mappings(left, first, last)?;
        let r = meta.mappings(right, first, last)?;
        drop(meta);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let push = |runs: &mut Vec<(u64, bool)>, n: u64, changed: bool| match runs.last_mut() {
            _ if n == 0 => {}
            Some(last) if last.1 == changed => last.0 += n,
            _ => runs.push((n, changed)),
        };
        let mut pos = offset;
        for run in diff_mappings(&l, &r) {
            let start = run.begin.saturating_mul(block).clamp(pos, end);
            let stop = (run.begin.saturating_add(run.len))
                .saturating_mul(block)
                .clamp(start, end);
            push(&mut runs, start - pos, false);
            push(&mut runs, stop - start, true);
            pos = stop;
        }
        push(&mut runs, end - pos, false);
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(v: &[(u64, u64)]) -> Vec<(u64, BlockTime)> {
        v.iter()
            .map(|&(vb, block)| (vb, BlockTime { block, time: 0 }))
            .collect()
    }

    fn run(begin: u64, len: u64, kind: DeltaKind) -> DeltaRun {
        DeltaRun { begin, len, kind }
    }

    #[test]
    fn shared_blocks_are_the_same_and_runs_coalesce() {
        let base = maps(&[(0, 10), (1, 11), (2, 12), (5, 15), (6, 16)]);
        let target = maps(&[(0, 10), (1, 21), (2, 22), (3, 23), (6, 16), (9, 29)]);
        assert_eq!(
            diff_mappings(&base, &target),
            vec![
                run(1, 2, DeltaKind::Different),
                run(3, 1, DeltaKind::RightOnly),
                run(5, 1, DeltaKind::LeftOnly),
                run(9, 1, DeltaKind::RightOnly),
            ]
        );
    }

    #[test]
    fn identical_or_empty_devices_have_no_delta() {
        let a = maps(&[(4, 1), (5, 2)]);
        assert!(diff_mappings(&a, &a).is_empty());
        assert!(diff_mappings(&[], &[]).is_empty());
        assert_eq!(diff_mappings(&a, &[]), vec![run(4, 2, DeltaKind::LeftOnly)]);
    }
}
