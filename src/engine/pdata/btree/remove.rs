//! Removal: shadow the path to the leaf holding the first key of the range, drop the keys of
//! the range found there, and on the way back up rebalance any non-root node left with fewer
//! than a third of its capacity (merge with a sibling when both fit in one node, else share
//! entries evenly). A root left with a single child is replaced by that child.

use super::{shadow_node, too_deep, unpack, write_node, RefCounter, MAX_DEPTH};
use crate::engine::pdata::error::Result;
use crate::engine::pdata::node::Node;
use crate::engine::pdata::tm::TransactionManager;
use crate::engine::pdata::values::Value;

/// Removes `key`; its value loses its reference. Returns the new root and the removed value.
pub fn remove<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    root: u64,
    key: u64,
) -> Result<(u64, Option<V>)> {
    let Some(v) = super::lookup::<V, _>(tm, root, key)? else {
        return Ok((root, None));
    };
    let (root, _) = remove_run::<V>(tm, rc, root, key, key)?;
    Ok((root, Some(v)))
}

/// Removes every key in `[begin, end)`; their values lose their references. Returns the
/// new root and how many entries went.
pub fn remove_range<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    mut root: u64,
    begin: u64,
    end: u64,
) -> Result<(u64, u64)> {
    let mut removed = 0u64;
    if begin >= end {
        return Ok((root, 0));
    }
    let last = end - 1;
    let mut from = begin;
    while let Some((k, _)) = super::first_at_or_after::<V, _>(tm, root, from)? {
        if k > last {
            break;
        }
        let (r, n) = remove_run::<V>(tm, rc, root, k, last)?;
        root = r;
        removed += n as u64;
        from = k.saturating_add(1);
        if k == u64::MAX {
            break;
        }
    }
    Ok((root, removed))
}

/// Removes the keys in `[first, last]` held by the leaf that holds `first`.
fn remove_run<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    root: u64,
    first: u64,
    last: u64,
) -> Result<(u64, usize)> {
    let mut removed = 0;
    let (mut loc, mut node) = remove_rec::<V>(tm, rc, root, first, last, 0, &mut removed)?;
    while !node.leaf && node.len() == 1 {
        let child = node.child(0);
        tm.dec(loc)?;
        loc = child;
        let blk = tm.read(loc, crate::engine::pdata::checksum::BlockKind::Node)?;
        let view = crate::engine::pdata::node::NodeView::new(&blk, loc)?;
        node = Node::from_view(&view);
    }
    Ok((loc, removed))
}

fn underfull(n: &Node) -> bool {
    n.len() < n.max_entries / 3
}

fn remove_rec<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    b: u64,
    first: u64,
    last: u64,
    depth: usize,
    removed: &mut usize,
) -> Result<(u64, Node)> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    let (loc, mut node) = shadow_node::<V>(tm, rc, b)?;
    if node.leaf {
        let from = node.keys.partition_point(|&k| k < first);
        let to = node.keys.partition_point(|&k| k <= last);
        let mut gone = Vec::with_capacity(to.saturating_sub(from));
        for i in from..to {
            gone.push(unpack::<V>(node.value(i), loc)?);
        }
        node.remove_range(from, to);
        *removed += gone.len();
        write_node(tm, loc, &node)?;
        for v in &gone {
            rc.dec(tm, v)?;
        }
        return Ok((loc, node));
    }
    let Some(i) = node
        .lower_bound(first)
        .or(if node.is_empty() { None } else { Some(0) })
    else {
        return Ok((loc, node));
    };
    let (cloc, child) = remove_rec::<V>(tm, rc, node.child(i), first, last, depth + 1, removed)?;
    node.set_value(i, &cloc.to_le_bytes());
    if let (Some(&fk), Some(k)) = (child.keys.first(), node.keys.get_mut(i)) {
        *k = fk;
    }
    if underfull(&child) && node.len() > 1 {
        rebalance::<V>(tm, rc, &mut node, i, cloc, child)?;
    }
    write_node(tm, loc, &node)?;
    Ok((loc, node))
}

/// Fixes the underfull child at `i` of `parent` with its right (or, for the last child,
/// left) sibling.
fn rebalance<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    parent: &mut Node,
    i: usize,
    cloc: u64,
    child: Node,
) -> Result<()> {
    let (li, ri) = if i + 1 < parent.len() {
        (i, i + 1)
    } else {
        (i - 1, i)
    };
    let sib = if li == i { ri } else { li };
    let (sloc, sibling) = shadow_node::<V>(tm, rc, parent.child(sib))?;
    parent.set_value(sib, &sloc.to_le_bytes());
    let ((lloc, mut left), (rloc, mut right)) = if li == i {
        ((cloc, child), (sloc, sibling))
    } else {
        ((sloc, sibling), (cloc, child))
    };
    let cap = left.max_entries.min(right.max_entries);
    if left.len() + right.len() <= cap {
        left.append(&mut right);
        write_node(tm, lloc, &left)?;
        parent.remove_at(ri);
        tm.dec(rloc)?;
    } else {
        let target = (left.len() + right.len()) / 2;
        if left.len() < target {
            let n = target - left.len();
            left.take_front(&mut right, n);
        } else {
            let n = left.len() - target;
            left.give_back(&mut right, n);
        }
        write_node(tm, lloc, &left)?;
        write_node(tm, rloc, &right)?;
        if let (Some(&fk), Some(k)) = (right.keys.first(), parent.keys.get_mut(ri)) {
            *k = fk;
        }
    }
    if let (Some(&fk), Some(k)) = (left.keys.first(), parent.keys.get_mut(li)) {
        *k = fk;
    }
    Ok(())
}
