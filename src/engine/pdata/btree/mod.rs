//! Btrees of u64 keys in the kernel's node format.
//!
//! Functions take a root block and return the new root after a change; the tree's leaf
//! values are a [`Value`]. Reference counts: a [`RefCounter`] says what a leaf value holds a
//! reference to (nothing, a data block, a subtree), and is told when a value gains a holder
//! (its leaf was copied from a shared one) or loses one (removed, overwritten, tree deleted).

mod del;
mod insert;
mod iter;
mod lookup;
mod nested;
mod remove;

pub use del::{clone_root, del, empty};
pub use insert::{insert, insert_keep_old};
pub use iter::{range, walk};
pub use lookup::{first_at_or_after, highest_key, lookup, lowest_key};
pub use nested::{
    insert_nested, lookup_nested, remove_nested, remove_range_nested, DataRefs, SubtreeRefs,
};
pub use remove::{remove, remove_range};

use super::block_manager::WriteBlock;
use super::checksum::BlockKind;
use super::error::{FormatError, Result};
use super::node::{Node, NodeView};
use super::tm::TransactionManager;
use super::values::Value;

/// Deepest tree accepted: a cyclic or corrupt image stops here instead of looping.
pub const MAX_DEPTH: usize = 32;

/// What a leaf value holds a reference to.
pub trait RefCounter<V> {
    /// `v` gained a holder.
    fn inc(&mut self, tm: &mut TransactionManager, v: &V) -> Result<()>;
    /// `v` lost a holder.
    fn dec(&mut self, tm: &mut TransactionManager, v: &V) -> Result<()>;
}

/// Values that reference nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRefs;

impl<V> RefCounter<V> for NoRefs {
    fn inc(&mut self, _: &mut TransactionManager, _: &V) -> Result<()> {
        Ok(())
    }
    fn dec(&mut self, _: &mut TransactionManager, _: &V) -> Result<()> {
        Ok(())
    }
}

pub(crate) fn unpack<V: Value>(bytes: &[u8], block: u64) -> Result<V> {
    V::unpack(bytes).ok_or_else(|| {
        FormatError::BadValueSize {
            block,
            found: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
            expected: u32::try_from(V::SIZE).unwrap_or(u32::MAX),
        }
        .into()
    })
}

pub(crate) fn pack<V: Value>(v: &V) -> Vec<u8> {
    let mut out = vec![0u8; V::SIZE];
    v.pack(&mut out);
    out
}

fn too_deep(block: u64) -> super::error::PdataError {
    FormatError::TooDeep {
        block,
        max: MAX_DEPTH,
    }
    .into()
}

/// Shadows node `b`, decodes it, and gives the children of a copied shared node their extra
/// reference. Returns the node's (possibly new) location and its contents; no lock is kept.
pub(crate) fn shadow_node<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    b: u64,
) -> Result<(u64, Node)> {
    let (w, shared) = tm.shadow(b, BlockKind::Node)?;
    let loc = w.location();
    let node = {
        let view = NodeView::new(&w, loc)?;
        view.expect_value_size(V::SIZE)?;
        Node::from_view(&view)
    };
    drop(w);
    if shared {
        inc_children(tm, rc, &node, loc)?;
    }
    Ok((loc, node))
}

pub(crate) fn inc_children<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    node: &Node,
    loc: u64,
) -> Result<()> {
    for i in 0..node.len() {
        if node.leaf {
            let v = unpack::<V>(node.value(i), loc)?;
            rc.inc(tm, &v)?;
        } else {
            tm.inc(node.child(i))?;
        }
    }
    Ok(())
}

/// Overwrites block `loc` (already this transaction's) with `node`.
pub(crate) fn write_node(tm: &mut TransactionManager, loc: u64, node: &Node) -> Result<()> {
    let mut w: WriteBlock = tm.rewrite(loc, BlockKind::Node)?;
    node.encode(&mut w);
    Ok(())
}

/// Writes `node` to a new block.
pub(crate) fn new_node(tm: &mut TransactionManager, node: &Node) -> Result<u64> {
    let mut w = tm.new_block(BlockKind::Node)?;
    node.encode(&mut w);
    Ok(w.location())
}

/// Reads node `b` through `src` and checks its value size.
pub(crate) fn read_node<V: Value, S: super::tm::BlockSource + ?Sized>(
    src: &S,
    b: u64,
) -> Result<super::block_manager::ReadBlock> {
    let blk = src.read_block(b, BlockKind::Node)?;
    NodeView::new(&blk, b)?.expect_value_size(V::SIZE)?;
    Ok(blk)
}
