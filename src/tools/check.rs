//! `thinblk check`: `thin_check` 0.9's checks (checksums, btree shape, metadata reference
//! counts) and what it skips: data reference counts, each device's `mapped_blocks`, the
//! superblock's magic, version and location, its sizes, and the `needs_check` flag.
//!
//! Like `thin_check`, progress goes to one stream ("examining superblock", ...) with each
//! problem indented under the stage that found it, and `TRANSACTION_ID=` /
//! `METADATA_FREE_BLOCKS=` to the other. The walk itself is
//! [`check_pool`](crate::engine::pdata::check::check_pool): it collects every problem
//! instead of stopping at the first.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use super::error::{Result, ToolError};
use super::{read_superblock, Access, Metadata};
use crate::engine::pdata::block_manager::BlockManager;
use crate::engine::pdata::check::{check_pool, Problem};
use crate::engine::pdata::checksum::BlockKind;
use crate::engine::pdata::space_map::{MetadataSpaceMap, SpaceMap};
use crate::engine::pdata::superblock::{Superblock, FLAG_NEEDS_CHECK, SUPERBLOCK_LOCATION};

/// Problems printed per stage before the rest are only counted.
const MAX_LISTED: usize = 100;

/// What to check and whether to clear `needs_check`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Only the superblock.
    pub super_block_only: bool,
    /// Clear the `needs_check` flag if everything else is consistent (opens read-write).
    pub clear_needs_check: bool,
    /// Print nothing.
    pub quiet: bool,
}

/// What the check found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckOutcome {
    /// Inconsistencies found (the `needs_check` flag is not one).
    pub problems: usize,
    /// The flag was set when the check started.
    pub needs_check: bool,
    /// The flag was cleared.
    pub cleared: bool,
}

impl CheckOutcome {
    /// Whether the pool may be used as it is now.
    pub fn passed(&self) -> bool {
        self.problems == 0 && (!self.needs_check || self.cleared)
    }
}

/// The stage of the report a problem belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Devices,
    Mappings,
    SpaceMaps,
}

fn stage_of(p: &Problem) -> Stage {
    match p {
        Problem::Read { context, .. } => match *context {
            "device details tree" => Stage::Devices,
            "top-level mapping tree" | "mapping tree" | "held metadata snapshot" => Stage::Mappings,
            _ => Stage::SpaceMaps,
        },
        Problem::MappedBlocks { .. }
        | Problem::DeviceMismatch { .. }
        | Problem::DataBlockOutOfRange { .. } => Stage::Mappings,
        Problem::MetadataCount { .. } | Problem::DataCount { .. } => Stage::SpaceMaps,
    }
}

/// Checks of the superblock beyond what decoding it checks (checksum, location, magic,
/// version, metadata block size, incompat flags).
fn superblock_problems(sb: &Superblock, device_blocks: u64) -> Vec<String> {
    let mut out = Vec::new();
    let dbs = sb.data_block_size;
    if !super::data_block_size_ok(dbs) {
        out.push(format!(
            "superblock (block 0): data_block_size {dbs} is not a multiple of 128 sectors in 128..=2097152"
        ));
    }
    let sm_blocks = sb.metadata_sm_root.nr_blocks;
    if sb.metadata_nr_blocks != sm_blocks {
        out.push(format!(
            "superblock (block 0): metadata_nr_blocks {} differs from the metadata space map's {sm_blocks} blocks",
            sb.metadata_nr_blocks
        ));
    }
    if sm_blocks > device_blocks {
        out.push(format!(
            "superblock (block 0): the metadata space map covers {sm_blocks} blocks, the device has {device_blocks}"
        ));
    }
    if sb.held_root != 0 && sb.held_root >= device_blocks {
        out.push(format!(
            "superblock (block 0): held metadata snapshot at block {} is beyond the device",
            sb.held_root
        ));
    }
    out
}

struct Printer<'a> {
    progress: &'a mut dyn Write,
    values: &'a mut dyn Write,
    quiet: bool,
}

impl Printer<'_> {
    fn stage(&mut self, s: &str) -> io::Result<()> {
        if self.quiet {
            return Ok(());
        }
        writeln!(self.progress, "{s}")
    }

    fn problems<T: std::fmt::Display>(&mut self, list: &[T]) -> io::Result<()> {
        if self.quiet {
            return Ok(());
        }
        for p in list.iter().take(MAX_LISTED) {
            writeln!(self.progress, "  {p}")?;
        }
        if list.len() > MAX_LISTED {
            writeln!(self.progress, "  ... and {} more", list.len() - MAX_LISTED)?;
        }
        Ok(())
    }

    fn value(&mut self, s: String) -> io::Result<()> {
        if self.quiet {
            return Ok(());
        }
        writeln!(self.values, "{s}")
    }
}

/// Checks the metadata at `path`. Progress and problems go to `progress`, the
/// `KEY=value` lines to `values`.
pub fn check(
    path: &Path,
    opts: &CheckOptions,
    progress: &mut dyn Write,
    values: &mut dyn Write,
) -> Result<CheckOutcome> {
    let access = if opts.clear_needs_check {
        Access::Write
    } else {
        Access::Read
    };
    let md = Metadata::open(path, access)?;
    check_metadata(&md.bm, opts, progress, values)
}

/// [`check`] on metadata already open, in a file or in memory (the restore fuzzer checks
/// what it restored with this).
pub fn check_metadata(
    bm: &Arc<BlockManager>,
    opts: &CheckOptions,
    progress: &mut dyn Write,
    values: &mut dyn Write,
) -> Result<CheckOutcome> {
    let mut pr = Printer {
        progress,
        values,
        quiet: opts.quiet,
    };
    run(bm, opts, &mut pr).map_err(ToolError::Output)
}

fn run(
    bm: &Arc<BlockManager>,
    opts: &CheckOptions,
    pr: &mut Printer<'_>,
) -> io::Result<CheckOutcome> {
    let mut outcome = CheckOutcome::default();
    pr.stage("examining superblock")?;
    let sb = match read_superblock(bm, SUPERBLOCK_LOCATION) {
        Ok(sb) => sb,
        Err(e) => {
            pr.problems(&[e])?;
            outcome.problems = 1;
            return Ok(outcome);
        }
    };
    let sb_problems = superblock_problems(&sb, bm.nr_blocks());
    pr.problems(&sb_problems)?;
    outcome.problems += sb_problems.len();
    outcome.needs_check = sb.needs_check();
    if outcome.needs_check {
        pr.problems(&["the needs_check flag is set"])?;
    }
    pr.value(format!("TRANSACTION_ID={}", sb.trans_id))?;
    match MetadataSpaceMap::open(bm, &sb.metadata_sm_root) {
        Ok(sm) => pr.value(format!("METADATA_FREE_BLOCKS={}", sm.nr_free()))?,
        Err(e) => {
            pr.problems(&[format!("metadata space map: {e}")])?;
            outcome.problems += 1;
        }
    }
    if opts.super_block_only {
        return finish(bm, opts, pr, outcome);
    }
    let report = check_pool(bm);
    let mut by_stage: [Vec<&Problem>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for p in &report.problems {
        let i = match stage_of(p) {
            Stage::Devices => 0,
            Stage::Mappings => 1,
            Stage::SpaceMaps => 2,
        };
        if let Some(v) = by_stage.get_mut(i) {
            v.push(p);
        }
    }
    let names = [
        "examining devices tree",
        "examining mapping tree",
        "checking space map counts",
    ];
    for (name, list) in names.iter().zip(&by_stage) {
        pr.stage(name)?;
        pr.problems(list)?;
    }
    outcome.problems += report.problems.len();
    finish(bm, opts, pr, outcome)
}

fn finish(
    bm: &BlockManager,
    opts: &CheckOptions,
    pr: &mut Printer<'_>,
    mut outcome: CheckOutcome,
) -> io::Result<CheckOutcome> {
    if outcome.needs_check && opts.clear_needs_check && outcome.problems == 0 {
        match clear_needs_check(bm) {
            Ok(()) => {
                outcome.cleared = true;
                pr.stage("cleared the needs_check flag")?;
            }
            Err(e) => {
                pr.problems(&[format!("clearing needs_check: {e}")])?;
                outcome.problems += 1;
            }
        }
    }
    Ok(outcome)
}

/// Rewrites block 0 with the flag cleared, everything else byte for byte.
fn clear_needs_check(bm: &BlockManager) -> crate::engine::pdata::Result<()> {
    let mut w = bm.write(SUPERBLOCK_LOCATION, BlockKind::Superblock)?;
    if let Some(field) = w.get_mut(4..8) {
        let mut flags = [0u8; 4];
        flags.copy_from_slice(field);
        let cleared = u32::from_le_bytes(flags) & !FLAG_NEEDS_CHECK;
        field.copy_from_slice(&cleared.to_le_bytes());
    }
    drop(w);
    bm.flush()
}
