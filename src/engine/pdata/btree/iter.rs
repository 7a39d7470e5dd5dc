//! Ordered iteration.

use super::{read_node, too_deep, unpack, MAX_DEPTH};
use crate::engine::pdata::error::{FormatError, Result};
use crate::engine::pdata::node::NodeView;
use crate::engine::pdata::tm::BlockSource;
use crate::engine::pdata::values::Value;

/// Calls `f(key, value)` for every entry with key `>= from`, in key order, until `f`
/// returns `Ok(false)`.
pub fn walk<V, S, F>(src: &S, root: u64, from: u64, mut f: F) -> Result<()>
where
    V: Value,
    S: BlockSource + ?Sized,
    F: FnMut(u64, V) -> Result<bool>,
{
    walk_rec::<V, S, F>(src, root, from, &mut f, 0, (0, None)).map(|_| ())
}

/// `bounds`: the keys the parent's slot allows this node, `[lo, hi)` (no `hi` at the root).
fn walk_rec<V, S, F>(
    src: &S,
    b: u64,
    from: u64,
    f: &mut F,
    depth: usize,
    bounds: (u64, Option<u64>),
) -> Result<bool>
where
    V: Value,
    S: BlockSource + ?Sized,
    F: FnMut(u64, V) -> Result<bool>,
{
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    let blk = read_node::<V, S>(src, b)?;
    let n = NodeView::new(&blk, b)?;
    // Ordered keys inside the parent's slot mean no node is reached along two paths: without
    // this, a node listing itself (or a shared child) twice makes the walk exponential.
    n.check_keys()?;
    let outside = |k: u64| k < bounds.0 || bounds.1.is_some_and(|hi| k >= hi);
    let ends = [
        n.key(0),
        n.nr_entries().checked_sub(1).and_then(|i| n.key(i)),
    ];
    if let Some(key) = ends.into_iter().flatten().find(|&k| outside(k)) {
        return Err(FormatError::KeyOutOfRange { block: b, key }.into());
    }
    if n.is_leaf() {
        let start = match n.lower_bound(from) {
            Some(i) if n.key(i) == Some(from) => i,
            Some(i) => i + 1,
            None => 0,
        };
        for i in start..n.nr_entries() {
            let (Some(k), Some(bytes)) = (n.key(i), n.value_bytes(i)) else {
                break;
            };
            if !f(k, unpack::<V>(bytes, b)?)? {
                return Ok(false);
            }
        }
        return Ok(true);
    }
    let start = n.lower_bound(from).unwrap_or(0);
    let children: Vec<(u64, (u64, Option<u64>))> = (start..n.nr_entries())
        .filter_map(|i| {
            let slot = (n.key(i)?, n.key(i + 1).or(bounds.1));
            Some((n.child(i)?, slot))
        })
        .collect();
    if children.len() != n.nr_entries() - start.min(n.nr_entries()) {
        return Err(FormatError::EmptyNode { block: b }.into());
    }
    drop(blk);
    for (c, slot) in children {
        if !walk_rec::<V, S, F>(src, c, from, f, depth + 1, slot)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Every entry with `from <= key < to`, in order.
pub fn range<V: Value, S: BlockSource + ?Sized>(
    src: &S,
    root: u64,
    from: u64,
    to: u64,
) -> Result<Vec<(u64, V)>> {
    let mut out = Vec::new();
    walk::<V, S, _>(src, root, from, |k, v| {
        if k >= to {
            return Ok(false);
        }
        out.push((k, v));
        Ok(true)
    })?;
    Ok(out)
}
