//! Point lookups and the ends of a tree.

use super::{read_node, too_deep, unpack, MAX_DEPTH};
use crate::engine::pdata::error::{FormatError, Result};
use crate::engine::pdata::node::NodeView;
use crate::engine::pdata::tm::BlockSource;
use crate::engine::pdata::values::Value;

fn missing_child(block: u64) -> crate::engine::pdata::error::PdataError {
    FormatError::EmptyNode { block }.into()
}

/// The value under `key`, if any.
pub fn lookup<V: Value, S: BlockSource + ?Sized>(
    src: &S,
    root: u64,
    key: u64,
) -> Result<Option<V>> {
    let mut b = root;
    for _ in 0..MAX_DEPTH {
        let blk = read_node::<V, S>(src, b)?;
        let n = NodeView::new(&blk, b)?;
        if n.is_leaf() {
            return match n.find_exact(key).and_then(|i| n.value_bytes(i)) {
                Some(bytes) => Ok(Some(unpack::<V>(bytes, b)?)),
                None => Ok(None),
            };
        }
        match n.lower_bound(key) {
            None => return Ok(None),
            Some(i) => b = n.child(i).ok_or_else(|| missing_child(b))?,
        }
    }
    Err(too_deep(root))
}

/// The first entry whose key is `>= key`.
pub fn first_at_or_after<V: Value, S: BlockSource + ?Sized>(
    src: &S,
    root: u64,
    key: u64,
) -> Result<Option<(u64, V)>> {
    let mut found = None;
    super::walk::<V, S, _>(src, root, key, |k, v| {
        found = Some((k, v));
        Ok(false)
    })?;
    Ok(found)
}

fn end_key<V: Value, S: BlockSource + ?Sized>(
    src: &S,
    root: u64,
    highest: bool,
) -> Result<Option<u64>> {
    let mut b = root;
    for _ in 0..MAX_DEPTH {
        let blk = read_node::<V, S>(src, b)?;
        let n = NodeView::new(&blk, b)?;
        let nr = n.nr_entries();
        if nr == 0 {
            return if n.is_leaf() {
                Ok(None)
            } else {
                Err(missing_child(b))
            };
        }
        let i = if highest { nr - 1 } else { 0 };
        if n.is_leaf() {
            return Ok(n.key(i));
        }
        b = n.child(i).ok_or_else(|| missing_child(b))?;
    }
    Err(too_deep(root))
}

/// The smallest key, `None` if the tree is empty.
pub fn lowest_key<V: Value, S: BlockSource + ?Sized>(src: &S, root: u64) -> Result<Option<u64>> {
    end_key::<V, S>(src, root, false)
}

/// The largest key, `None` if the tree is empty.
pub fn highest_key<V: Value, S: BlockSource + ?Sized>(src: &S, root: u64) -> Result<Option<u64>> {
    end_key::<V, S>(src, root, true)
}
