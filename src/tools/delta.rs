//! `thinblk delta`: how two thin devices differ, as `thin_delta` 0.9 prints it.
//!
//! Each virtual block mapped in either device is `same` (both map it to the same data
//! block), `different`, `left_only` or `right_only`. Consecutive blocks of one kind form a
//! run. With `verbose`, runs also need consecutive data blocks, carry them, and
//! consecutive runs of one kind are grouped under one element.

use std::io::{self, Write};

use super::dump::for_each_mapping;
use super::error::{Result, ToolError};
use super::Metadata;
use crate::engine::pdata::superblock::Superblock;
use crate::engine::pdata::values::BlockTime;

/// What to compare.
#[derive(Debug, Clone, Copy)]
pub struct DeltaOptions {
    pub snap1: u64,
    pub snap2: u64,
    pub verbose: bool,
    pub metadata_snap: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Same,
    Different,
    LeftOnly,
    RightOnly,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Same => "same",
            Kind::Different => "different",
            Kind::LeftOnly => "left_only",
            Kind::RightOnly => "right_only",
        }
    }
}

/// A run of blocks of one kind; data blocks are those of the first block (0 where the side
/// has no mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffRun {
    pub kind: Kind,
    pub begin: u64,
    pub length: u64,
    pub left_data: u64,
    pub right_data: u64,
}

impl DiffRun {
    fn extends(&self, next: &DiffRun, verbose: bool) -> bool {
        let follows = |a: u64, b: u64| a.checked_add(self.length) == Some(b);
        if self.kind != next.kind || !follows(self.begin, next.begin) {
            return false;
        }
        if !verbose {
            return true;
        }
        let left = matches!(self.kind, Kind::RightOnly) || follows(self.left_data, next.left_data);
        let right =
            matches!(self.kind, Kind::LeftOnly) || follows(self.right_data, next.right_data);
        left && right
    }
}

/// Compares two mapping lists, each in increasing block order.
pub fn diff(left: &[(u64, BlockTime)], right: &[(u64, BlockTime)], verbose: bool) -> Vec<DiffRun> {
    let mut out: Vec<DiffRun> = Vec::new();
    let (mut l, mut r) = (left.iter().peekable(), right.iter().peekable());
    loop {
        let next = match (l.peek(), r.peek()) {
            (None, None) => break,
            (Some(&&(lk, lv)), Some(&&(rk, rv))) if lk == rk => {
                l.next();
                r.next();
                let kind = if lv.block == rv.block {
                    Kind::Same
                } else {
                    Kind::Different
                };
                (kind, lk, lv.block, rv.block)
            }
            (Some(&&(lk, lv)), Some(&&(rk, _))) if lk < rk => {
                l.next();
                (Kind::LeftOnly, lk, lv.block, 0)
            }
            (Some(&&(lk, lv)), None) => {
                l.next();
                (Kind::LeftOnly, lk, lv.block, 0)
            }
            (_, Some(&&(rk, rv))) => {
                r.next();
                (Kind::RightOnly, rk, 0, rv.block)
            }
        };
        let (kind, begin, left_data, right_data) = next;
        let run = DiffRun {
            kind,
            begin,
            length: 1,
            left_data,
            right_data,
        };
        match out.last_mut() {
            Some(last) if last.extends(&run, verbose) => last.length += 1,
            _ => out.push(run),
        }
    }
    out
}

fn write_runs(out: &mut dyn Write, runs: &[DiffRun], verbose: bool) -> io::Result<()> {
    if !verbose {
        for r in runs {
            writeln!(
                out,
                "    <{} begin=\"{}\" length=\"{}\"/>",
                r.kind.name(),
                r.begin,
                r.length
            )?;
        }
        return Ok(());
    }
    let mut open: Option<Kind> = None;
    for r in runs {
        if open != Some(r.kind) {
            if let Some(k) = open {
                writeln!(out, "    </{}>", k.name())?;
            }
            writeln!(out, "    <{}>", r.kind.name())?;
            open = Some(r.kind);
        }
        match r.kind {
            Kind::Different => writeln!(
                out,
                "      <range begin=\"{}\" left_data_begin=\"{}\" right_data_begin=\"{}\" length=\"{}\"/>",
                r.begin, r.left_data, r.right_data, r.length
            )?,
            Kind::Same | Kind::LeftOnly => writeln!(
                out,
                "      <range begin=\"{}\" data_begin=\"{}\" length=\"{}\"/>",
                r.begin, r.left_data, r.length
            )?,
            Kind::RightOnly => writeln!(
                out,
                "      <range begin=\"{}\" data_begin=\"{}\" length=\"{}\"/>",
                r.begin, r.right_data, r.length
            )?,
        }
    }
    if let Some(k) = open {
        writeln!(out, "    </{}>", k.name())?;
    }
    Ok(())
}

fn mappings(md: &Metadata, sb: &Superblock, dev: u64) -> Result<Vec<(u64, BlockTime)>> {
    let mut v = Vec::new();
    for_each_mapping(&md.bm, sb, dev, |k, bt| {
        v.push((k, bt));
        Ok(())
    })?;
    Ok(v)
}

/// Writes the difference between `opts.snap1` and `opts.snap2`.
pub fn delta(md: &Metadata, opts: &DeltaOptions, out: &mut dyn Write) -> Result<()> {
    let sb = md.roots(opts.metadata_snap)?;
    let left = mappings(md, &sb, opts.snap1)?;
    let right = mappings(md, &sb, opts.snap2)?;
    let runs = diff(&left, &right, opts.verbose);
    let write = |out: &mut dyn Write| -> io::Result<()> {
        write!(
            out,
            "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}\"",
            sb.time, sb.trans_id, sb.data_block_size, sb.data_sm_root.nr_blocks
        )?;
        if sb.held_root != 0 {
            write!(out, " metadata_snap=\"{}\"", sb.held_root)?;
        }
        writeln!(out, ">")?;
        writeln!(
            out,
            "  <diff left=\"{}\" right=\"{}\">",
            opts.snap1, opts.snap2
        )?;
        write_runs(out, &runs, opts.verbose)?;
        writeln!(out, "  </diff>")?;
        writeln!(out, "</superblock>")?;
        out.flush()
    };
    write(out).map_err(ToolError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(u64, u64)]) -> Vec<(u64, BlockTime)> {
        pairs
            .iter()
            .map(|&(k, b)| (k, BlockTime { block: b, time: 0 }))
            .collect()
    }

    #[test]
    fn runs_merge_by_virtual_block_unless_verbose() {
        let left = m(&[(0, 0), (1, 1), (2, 9), (3, 3), (7, 7)]);
        let right = m(&[(0, 0), (1, 1), (2, 9), (3, 3), (8, 8)]);
        let plain = diff(&left, &right, false);
        assert_eq!(plain.len(), 3);
        assert_eq!((plain[0].kind, plain[0].length), (Kind::Same, 4));
        assert_eq!(plain[1].kind, Kind::LeftOnly);
        assert_eq!(plain[2].kind, Kind::RightOnly);
        let verbose = diff(&left, &right, true);
        assert_eq!(verbose.len(), 5);
    }
}
