//! `thinblk ls`: one line per thin device, with `thin_ls` 0.9's columns and layout (each
//! cell right-justified to its column's widest cell and followed by a space).
//!
//! A mapping is exclusive when no other mapping, of this device or another, points at the
//! same data block; the rest of `mapped_blocks` is shared. That is `thin_ls`'s definition,
//! and what a user deleting the device gets back. (The data space map's count is not used:
//! a leaf shared between a snapshot and its origin holds one reference for both.)

use std::collections::HashMap;
use std::io::Write;
use std::str::FromStr;

use super::dump::{devices, for_each_mapping};
use super::error::{Result, ToolError};
use super::Metadata;
use crate::engine::pdata::values::DeviceDetails;

/// A column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Dev,
    MappedBlocks,
    ExclusiveBlocks,
    SharedBlocks,
    MappedSectors,
    ExclusiveSectors,
    SharedSectors,
    MappedBytes,
    ExclusiveBytes,
    SharedBytes,
    Mapped,
    Exclusive,
    Shared,
    Transaction,
    CreateTime,
    SnapTime,
}

const ALL: [(Field, &str); 16] = [
    (Field::Dev, "DEV"),
    (Field::MappedBlocks, "MAPPED_BLOCKS"),
    (Field::ExclusiveBlocks, "EXCLUSIVE_BLOCKS"),
    (Field::SharedBlocks, "SHARED_BLOCKS"),
    (Field::MappedSectors, "MAPPED_SECTORS"),
    (Field::ExclusiveSectors, "EXCLUSIVE_SECTORS"),
    (Field::SharedSectors, "SHARED_SECTORS"),
    (Field::MappedBytes, "MAPPED_BYTES"),
    (Field::ExclusiveBytes, "EXCLUSIVE_BYTES"),
    (Field::SharedBytes, "SHARED_BYTES"),
    (Field::Mapped, "MAPPED"),
    (Field::Exclusive, "EXCLUSIVE"),
    (Field::Shared, "SHARED"),
    (Field::Transaction, "TRANSACTION"),
    (Field::CreateTime, "CREATE_TIME"),
    (Field::SnapTime, "SNAP_TIME"),
];

/// `thin_ls`'s columns when none are asked for.
pub const DEFAULT_FIELDS: [Field; 4] = [
    Field::Dev,
    Field::Mapped,
    Field::CreateTime,
    Field::SnapTime,
];

impl Field {
    pub fn name(self) -> &'static str {
        ALL.iter()
            .find(|(f, _)| *f == self)
            .map_or("?", |(_, n)| *n)
    }

    fn needs_exclusive(self) -> bool {
        !matches!(
            self,
            Field::Dev
                | Field::MappedBlocks
                | Field::MappedSectors
                | Field::MappedBytes
                | Field::Mapped
                | Field::Transaction
                | Field::CreateTime
                | Field::SnapTime
        )
    }
}

impl FromStr for Field {
    type Err = ToolError;
    fn from_str(s: &str) -> Result<Field> {
        ALL.iter()
            .find(|(_, n)| *n == s)
            .map(|(f, _)| *f)
            .ok_or_else(|| ToolError::UnknownField(s.to_string()))
    }
}

/// Parses a comma-separated list of field names.
pub fn parse_fields(s: &str) -> Result<Vec<Field>> {
    s.split(',').map(str::parse).collect()
}

/// What to list.
#[derive(Debug, Clone)]
pub struct LsOptions {
    pub fields: Vec<Field>,
    pub headers: bool,
    pub metadata_snap: bool,
}

/// A size the way `thin_ls` prints it: bytes reduced by 1024 while above 1 MiB of the
/// current unit, then once more (rounded) if still above 8 of the next unit.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut n = bytes;
    let mut i = 0usize;
    while n > 1 << 20 {
        n /= 1024;
        i += 1;
    }
    if n > 8 * 1024 {
        n = (n + 512) / 1024;
        i += 1;
    }
    format!("{n}{}", UNITS.get(i).copied().unwrap_or("?"))
}

/// How many mappings point at each data block, saturating at 2 ("shared").
enum Usage {
    /// Two bits per block, for pools of up to 2^28 data blocks.
    Dense(Vec<u64>),
    Sparse(HashMap<u64, u8>),
}

const DENSE_LIMIT: u64 = 1 << 28;

impl Usage {
    fn new(nr_data_blocks: u64) -> Usage {
        if nr_data_blocks > 0 && nr_data_blocks <= DENSE_LIMIT {
            Usage::Dense(vec![0; nr_data_blocks.div_ceil(32) as usize])
        } else {
            Usage::Sparse(HashMap::new())
        }
    }

    fn get(&self, b: u64) -> u8 {
        match self {
            Usage::Dense(words) => words
                .get((b / 32) as usize)
                .map_or(0, |w| ((w >> (2 * (b % 32))) & 3) as u8),
            Usage::Sparse(m) => m.get(&b).copied().unwrap_or(0),
        }
    }

    fn inc(&mut self, b: u64) {
        let n = self.get(b).saturating_add(1).min(2);
        match self {
            Usage::Dense(words) => {
                if let Some(w) = words.get_mut((b / 32) as usize) {
                    let shift = 2 * (b % 32);
                    *w = (*w & !(3 << shift)) | (u64::from(n) << shift);
                } else {
                    // Beyond the data device: remember it anyway.
                    let mut sparse = HashMap::new();
                    sparse.insert(b, n);
                    self.spill(sparse);
                }
            }
            Usage::Sparse(m) => {
                m.insert(b, n);
            }
        }
    }

    /// Turns a dense map into a sparse one holding `extra` too.
    fn spill(&mut self, mut extra: HashMap<u64, u8>) {
        if let Usage::Dense(words) = self {
            for (i, w) in words.iter().enumerate() {
                for j in 0..32u64 {
                    let c = ((w >> (2 * j)) & 3) as u8;
                    if c != 0 {
                        extra.insert(i as u64 * 32 + j, c);
                    }
                }
            }
        }
        *self = Usage::Sparse(extra);
    }
}

fn cell(f: Field, dev: u64, d: &DeviceDetails, exclusive: u64, block_sectors: u64) -> String {
    let shared = d.mapped_blocks.saturating_sub(exclusive);
    let sectors = |blocks: u64| blocks.saturating_mul(block_sectors);
    let bytes = |blocks: u64| sectors(blocks).saturating_mul(512);
    match f {
        Field::Dev => dev.to_string(),
        Field::MappedBlocks => d.mapped_blocks.to_string(),
        Field::ExclusiveBlocks => exclusive.to_string(),
        Field::SharedBlocks => shared.to_string(),
        Field::MappedSectors => sectors(d.mapped_blocks).to_string(),
        Field::ExclusiveSectors => sectors(exclusive).to_string(),
        Field::SharedSectors => sectors(shared).to_string(),
        Field::MappedBytes => bytes(d.mapped_blocks).to_string(),
        Field::ExclusiveBytes => bytes(exclusive).to_string(),
        Field::SharedBytes => bytes(shared).to_string(),
        Field::Mapped => human(bytes(d.mapped_blocks)),
        Field::Exclusive => human(bytes(exclusive)),
        Field::Shared => human(bytes(shared)),
        Field::Transaction => d.transaction_id.to_string(),
        Field::CreateTime => d.creation_time.to_string(),
        Field::SnapTime => d.snapshotted_time.to_string(),
    }
}

/// Writes rows of cells, each right-justified to its column and followed by a space.
pub fn render(rows: &[Vec<String>], out: &mut dyn Write) -> std::io::Result<()> {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(c.len()),
                None => widths.push(c.len()),
            }
        }
    }
    for row in rows {
        for (c, w) in row.iter().zip(&widths) {
            write!(out, "{c:>w$} ")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// Lists the devices of the metadata at `md`.
pub fn ls(md: &Metadata, opts: &LsOptions, out: &mut dyn Write) -> Result<()> {
    let live = md.superblock()?;
    let sb = md.roots(opts.metadata_snap)?;
    let devs = devices(&md.bm, &sb)?;
    let mut exclusive: Vec<u64> = vec![0; devs.len()];
    if opts.fields.iter().any(|f| f.needs_exclusive()) {
        let mut usage = Usage::new(live.data_sm_root.nr_blocks);
        for (dev, _) in &devs {
            for_each_mapping(&md.bm, &sb, *dev, |_, v| {
                usage.inc(v.block);
                Ok(())
            })?;
        }
        for ((dev, _), ex) in devs.iter().zip(exclusive.iter_mut()) {
            for_each_mapping(&md.bm, &sb, *dev, |_, v| {
                if usage.get(v.block) == 1 {
                    *ex += 1;
                }
                Ok(())
            })?;
        }
    }
    let mut rows = Vec::with_capacity(devs.len() + 1);
    if opts.headers {
        rows.push(opts.fields.iter().map(|f| f.name().to_string()).collect());
    }
    let block_sectors = u64::from(live.data_block_size);
    for ((dev, d), ex) in devs.iter().zip(&exclusive) {
        rows.push(
            opts.fields
                .iter()
                .map(|&f| cell(f, *dev, d, *ex, block_sectors))
                .collect(),
        );
    }
    render(&rows, out).map_err(ToolError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_thin_ls() {
        assert_eq!(human(4_194_304), "4096KiB");
        assert_eq!(human(702_087_168), "670MiB");
        assert_eq!(human(131_072), "128KiB");
        assert_eq!(human(4_294_967_296), "4096MiB");
        assert_eq!(human(1_114_112), "1088KiB");
        assert_eq!(human(65_536), "64KiB");
        assert_eq!(human(0), "0");
    }

    #[test]
    fn usage_saturates_at_shared() {
        for mut u in [Usage::new(100), Usage::new(0)] {
            u.inc(5);
            assert_eq!(u.get(5), 1);
            u.inc(5);
            u.inc(5);
            assert_eq!(u.get(5), 2);
            u.inc(1000);
            assert_eq!(u.get(1000), 1);
            assert_eq!(u.get(5), 2);
        }
    }

    #[test]
    fn unknown_fields_are_named() {
        assert!(matches!(
            parse_fields("DEV,BOGUS"),
            Err(ToolError::UnknownField(f)) if f == "BOGUS"
        ));
        assert_eq!(
            parse_fields("DEV,SNAP_TIME").ok(),
            Some(vec![Field::Dev, Field::SnapTime])
        );
    }
}
