//! Whole trees: an empty tree, sharing a tree (snapshots), and dropping a reference to one.

use super::{new_node, too_deep, unpack, RefCounter, MAX_DEPTH};
use crate::engine::pdata::checksum::BlockKind;
use crate::engine::pdata::error::Result;
use crate::engine::pdata::node::{Node, NodeView};
use crate::engine::pdata::tm::TransactionManager;
use crate::engine::pdata::values::Value;

/// A new empty tree (one empty leaf); returns its root.
pub fn empty<V: Value>(tm: &mut TransactionManager) -> Result<u64> {
    new_node(tm, &Node::new(true, V::SIZE))
}

/// Shares the tree at `root`: one more holder of its root block. Changing either copy
/// later shadows the shared nodes.
pub fn clone_root(tm: &mut TransactionManager, root: u64) -> Result<()> {
    tm.inc(root)
}

/// Drops one reference to the tree at `root`; nodes nobody else holds are freed and their
/// values lose a reference.
pub fn del<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    root: u64,
) -> Result<()> {
    del_rec::<V>(tm, rc, root, 0)
}

fn del_rec<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    b: u64,
    depth: usize,
) -> Result<()> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    if tm.ref_count(b)? > 1 {
        return tm.dec(b);
    }
    let node = {
        let blk = tm.read(b, BlockKind::Node)?;
        let view = NodeView::new(&blk, b)?;
        view.expect_value_size(V::SIZE)?;
        Node::from_view(&view)
    };
    tm.dec(b)?;
    for i in 0..node.len() {
        if node.leaf {
            let v = unpack::<V>(node.value(i), b)?;
            rc.dec(tm, &v)?;
        } else {
            del_rec::<V>(tm, rc, node.child(i), depth + 1)?;
        }
    }
    Ok(())
}
