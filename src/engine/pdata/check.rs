//! A checker for a pool's metadata: walks every tree reachable from the superblock with a
//! visitor that validates each node once and counts the references to every metadata and
//! data block, then compares those counts with both space maps. Problems are collected,
//! not fatal.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use super::block_manager::BlockManager;
use super::btree::MAX_DEPTH;
use super::checksum::BlockKind;
use super::error::{FormatError, PdataError};
use super::node::{Node, NodeView};
use super::space_map::{index, DiskSpaceMap, MetadataSpaceMap, SpaceMap};
use super::superblock::{SmRoot, Superblock, SUPERBLOCK_LOCATION};
use super::values::{BlockTime, DeviceDetails, IndexEntry, Value};

/// One thing wrong with the metadata.
#[derive(Debug)]
pub enum Problem {
    /// A block could not be read or decoded.
    Read {
        context: &'static str,
        error: PdataError,
    },
    /// A metadata block's count in the space map differs from the references found.
    MetadataCount {
        block: u64,
        in_space_map: u32,
        referenced: u32,
    },
    /// A data block's count in the space map differs from the references found.
    DataCount {
        block: u64,
        in_space_map: u32,
        referenced: u32,
    },
    /// A device's `mapped_blocks` differs from its mappings.
    MappedBlocks { dev: u64, recorded: u64, found: u64 },
    /// A device has details but no mapping tree, or the other way round.
    DeviceMismatch { dev: u64 },
    /// A mapping points beyond the data device.
    DataBlockOutOfRange { dev: u64, vblock: u64, block: u64 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Read { context, error } => write!(f, "{context}: {error}"),
            Problem::MetadataCount {
                block,
                in_space_map,
                referenced,
            } => {
                write!(f, "metadata block {block}: space map count {in_space_map}, {referenced} references")
            }
            Problem::DataCount {
                block,
                in_space_map,
                referenced,
            } => {
                write!(
                    f,
                    "data block {block}: space map count {in_space_map}, {referenced} references"
                )
            }
            Problem::MappedBlocks {
                dev,
                recorded,
                found,
            } => {
                write!(
                    f,
                    "device {dev}: mapped_blocks {recorded}, {found} mappings"
                )
            }
            Problem::DeviceMismatch { dev } => {
                write!(f, "device {dev}: details and mapping tree disagree")
            }
            Problem::DataBlockOutOfRange { dev, vblock, block } => {
                write!(
                    f,
                    "device {dev} block {vblock}: data block {block} beyond the data device"
                )
            }
        }
    }
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<Problem>,
    pub devices: u64,
    pub mappings: u64,
    pub metadata_blocks_used: u64,
    pub data_blocks_used: u64,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Walker<'a> {
    bm: &'a BlockManager,
    meta_refs: HashMap<u64, u32>,
    data_refs: HashMap<u64, u32>,
    visited: HashMap<u64, ()>,
    problems: Vec<Problem>,
}

/// A tree's leaf values, handed over once per distinct leaf.
trait LeafVisitor<V> {
    fn leaf(&mut self, w: &mut Walker<'_>, entries: &[(u64, V)]);
}

struct Ignore;
impl<V> LeafVisitor<V> for Ignore {
    fn leaf(&mut self, _: &mut Walker<'_>, _: &[(u64, V)]) {}
}

impl Walker<'_> {
    fn reference(&mut self, b: u64) -> bool {
        *self.meta_refs.entry(b).or_insert(0) += 1;
        self.visited.insert(b, ()).is_none()
    }

    fn read_err(&mut self, context: &'static str, error: impl Into<PdataError>) {
        self.problems.push(Problem::Read {
            context,
            error: error.into(),
        });
    }

    /// Counts one reference to the tree at `root` and walks it if not yet seen.
    fn tree<V: Value>(&mut self, context: &'static str, root: u64, vis: &mut dyn LeafVisitor<V>) {
        let mut leaf_depth = None;
        self.node::<V>(context, root, true, 0, (0, u64::MAX), &mut leaf_depth, vis);
    }

    #[allow(clippy::too_many_arguments)]
    fn node<V: Value>(
        &mut self,
        context: &'static str,
        b: u64,
        is_root: bool,
        depth: usize,
        bounds: (u64, u64),
        leaf_depth: &mut Option<usize>,
        vis: &mut dyn LeafVisitor<V>,
    ) {
        if !self.reference(b) {
            return;
        }
        if depth >= MAX_DEPTH {
            self.read_err(
                context,
                FormatError::TooDeep {
                    block: b,
                    max: MAX_DEPTH,
                },
            );
            return;
        }
        let node = match self.bm.read(b, BlockKind::Node) {
            Ok(blk) => match NodeView::new(&blk, b).and_then(|v| {
                v.expect_value_size(V::SIZE)?;
                Ok(Node::from_view(&v))
            }) {
                Ok(n) => n,
                Err(e) => return self.read_err(context, e),
            },
            Err(e) => return self.read_err(context, e),
        };
        if !is_root && node.len() < node.max_entries / 3 {
            let (nr_entries, max_entries) = (node.len() as u32, node.max_entries as u32);
            self.read_err(
                context,
                FormatError::Underfull {
                    block: b,
                    nr_entries,
                    max_entries,
                },
            );
        }
        if !is_root && node.is_empty() {
            self.read_err(context, FormatError::EmptyNode { block: b });
            return;
        }
        for &k in &node.keys {
            if k < bounds.0 || k >= bounds.1 {
                self.read_err(context, FormatError::KeyOutOfRange { block: b, key: k });
                return;
            }
        }
        if node.leaf {
            match *leaf_depth {
                None => *leaf_depth = Some(depth),
                Some(d) if d != depth => {
                    self.read_err(context, FormatError::UnevenLeaves { block: b })
                }
                Some(_) => {}
            }
            let mut entries = Vec::with_capacity(node.len());
            for i in 0..node.len() {
                if let (Some(&k), Some(v)) = (node.keys.get(i), V::unpack(node.value(i))) {
                    entries.push((k, v));
                }
            }
            vis.leaf(self, &entries);
            return;
        }
        for i in 0..node.len() {
            let lo = node.keys.get(i).copied().unwrap_or(0);
            let hi = node.keys.get(i + 1).copied().unwrap_or(bounds.1);
            self.node::<V>(
                context,
                node.child(i),
                false,
                depth + 1,
                (lo, hi),
                leaf_depth,
                vis,
            );
        }
    }
}

struct Mappings {
    dev: u64,
    nr_data_blocks: u64,
}

impl LeafVisitor<BlockTime> for Mappings {
    fn leaf(&mut self, w: &mut Walker<'_>, entries: &[(u64, BlockTime)]) {
        for &(k, v) in entries {
            if v.block >= self.nr_data_blocks {
                w.problems.push(Problem::DataBlockOutOfRange {
                    dev: self.dev,
                    vblock: k,
                    block: v.block,
                });
            }
            *w.data_refs.entry(v.block).or_insert(0) += 1;
        }
    }
}

struct Collect<V>(Vec<(u64, V)>);
impl<V: Copy> LeafVisitor<V> for Collect<V> {
    fn leaf(&mut self, _: &mut Walker<'_>, entries: &[(u64, V)]) {
        self.0.extend_from_slice(entries);
    }
}

/// Counts every mapping of the tree at `root` (each entry, shared leaves included).
fn count_mappings(bm: &BlockManager, root: u64) -> Result<u64, PdataError> {
    let mut n = 0;
    super::btree::walk::<BlockTime, _, _>(bm, root, 0, |_, _| {
        n += 1;
        Ok(true)
    })?;
    Ok(n)
}

fn walk_pool_trees(w: &mut Walker<'_>, sb: &Superblock, report: &mut Report, nr_data_blocks: u64) {
    let mut details = Collect::<DeviceDetails>(Vec::new());
    w.tree::<DeviceDetails>("device details tree", sb.device_details_root, &mut details);
    let mut top = Collect::<u64>(Vec::new());
    w.tree::<u64>("top-level mapping tree", sb.data_mapping_root, &mut top);
    let details: BTreeMap<u64, DeviceDetails> = details.0.into_iter().collect();
    // Subtree roots are referenced once per distinct top-level leaf; `Collect` saw each
    // leaf once, so each collected entry is one reference.
    for &(dev, root) in &top.0 {
        let mut vis = Mappings {
            dev,
            nr_data_blocks,
        };
        w.tree::<BlockTime>("mapping tree", root, &mut vis);
        match count_mappings(w.bm, root) {
            Ok(found) => {
                report.mappings += found;
                match details.get(&dev) {
                    Some(d) if d.mapped_blocks != found => w.problems.push(Problem::MappedBlocks {
                        dev,
                        recorded: d.mapped_blocks,
                        found,
                    }),
                    Some(_) => {}
                    None => w.problems.push(Problem::DeviceMismatch { dev }),
                }
            }
            Err(e) => w.read_err("mapping tree", e),
        }
    }
    let with_trees: BTreeMap<u64, u64> = top.0.iter().copied().collect();
    for dev in details.keys() {
        if !with_trees.contains_key(dev) {
            w.problems.push(Problem::DeviceMismatch { dev: *dev });
        }
    }
    report.devices = details.len() as u64;
}

/// Checks the pool whose superblock is at block 0 of `bm`.
pub fn check_pool(bm: &Arc<BlockManager>) -> Report {
    let mut report = Report::default();
    let mut w = Walker {
        bm,
        meta_refs: HashMap::new(),
        data_refs: HashMap::new(),
        visited: HashMap::new(),
        problems: Vec::new(),
    };
    let sb = match bm.read(SUPERBLOCK_LOCATION, BlockKind::Superblock) {
        Ok(blk) => match Superblock::decode(&blk, SUPERBLOCK_LOCATION) {
            Ok(sb) => sb,
            Err(e) => {
                report.problems.push(Problem::Read {
                    context: "superblock",
                    error: e.into(),
                });
                return report;
            }
        },
        Err(e) => {
            report.problems.push(Problem::Read {
                context: "superblock",
                error: e,
            });
            return report;
        }
    };
    w.reference(SUPERBLOCK_LOCATION);
    let nr_data_blocks = sb.data_sm_root.nr_blocks;
    walk_pool_trees(&mut w, &sb, &mut report, nr_data_blocks);
    if sb.held_root != 0 {
        w.reference(sb.held_root);
        match bm
            .read(sb.held_root, BlockKind::Superblock)
            .and_then(|b| Ok(Superblock::decode(&b, sb.held_root)?))
        {
            Ok(held) => {
                let mut ignore = Report::default();
                walk_pool_trees(&mut w, &held, &mut ignore, nr_data_blocks);
            }
            Err(e) => w.read_err("held metadata snapshot", e),
        }
    }
    walk_space_map_blocks(&mut w, &sb.data_sm_root, &sb.metadata_sm_root);
    compare_metadata(&mut w, bm, &sb.metadata_sm_root, &mut report);
    compare_data(&mut w, bm, &sb.data_sm_root, &mut report);
    report.problems.append(&mut w.problems);
    report
}

fn walk_space_map_blocks(w: &mut Walker<'_>, data: &SmRoot, meta: &SmRoot) {
    let mut entries = Collect::<IndexEntry>(Vec::new());
    w.tree::<IndexEntry>("data space map index", data.bitmap_root, &mut entries);
    for (_, e) in entries.0 {
        w.reference(e.blocknr);
    }
    w.tree::<u32>("data ref-count tree", data.ref_count_root, &mut Ignore);
    w.reference(meta.bitmap_root);
    match w.bm.read(meta.bitmap_root, BlockKind::Index) {
        Ok(blk) => {
            let n = meta
                .nr_blocks
                .div_ceil(super::space_map::bitmap::ENTRIES_PER_BITMAP);
            match index::decode(&blk, meta.bitmap_root, n) {
                Ok(es) => {
                    drop(blk);
                    for e in es {
                        w.reference(e.blocknr);
                    }
                }
                Err(e) => w.read_err("metadata space map index", e),
            }
        }
        Err(e) => w.read_err("metadata space map index", e),
    }
    w.tree::<u32>("metadata ref-count tree", meta.ref_count_root, &mut Ignore);
}

fn compare_metadata(
    w: &mut Walker<'_>,
    bm: &Arc<BlockManager>,
    root: &SmRoot,
    report: &mut Report,
) {
    let sm = match MetadataSpaceMap::open(bm, root) {
        Ok(sm) => sm,
        Err(e) => return w.read_err("metadata space map", e),
    };
    report.metadata_blocks_used = sm.nr_allocated();
    for b in 0..sm.nr_blocks() {
        let in_sm = sm.count(b).unwrap_or(0);
        let referenced = w.meta_refs.get(&b).copied().unwrap_or(0);
        if in_sm != referenced {
            w.problems.push(Problem::MetadataCount {
                block: b,
                in_space_map: in_sm,
                referenced,
            });
        }
    }
    for &b in w.meta_refs.keys() {
        if b >= sm.nr_blocks() {
            w.problems.push(Problem::MetadataCount {
                block: b,
                in_space_map: 0,
                referenced: 1,
            });
        }
    }
}

fn compare_data(w: &mut Walker<'_>, bm: &Arc<BlockManager>, root: &SmRoot, report: &mut Report) {
    let sm = match DiskSpaceMap::open(bm.clone(), root) {
        Ok(sm) => sm,
        Err(e) => return w.read_err("data space map", e),
    };
    report.data_blocks_used = sm.nr_allocated();
    let counts = match sm.counts(0, sm.nr_blocks()) {
        Ok(c) => c,
        Err(e) => return w.read_err("data space map", e),
    };
    for (b, &in_sm) in (0u64..).zip(&counts) {
        let referenced = w.data_refs.get(&b).copied().unwrap_or(0);
        if in_sm != referenced {
            w.problems.push(Problem::DataCount {
                block: b,
                in_space_map: in_sm,
                referenced,
            });
        }
    }
}
