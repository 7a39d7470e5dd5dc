//! Insertion: shadow the path from the root, put the entry in its leaf, split full nodes
//! into two halves on the way back up (so every non-root node stays at least half full
//! after a split), and grow a new root when the old one splits.

use super::{new_node, pack, shadow_node, too_deep, unpack, write_node, RefCounter, MAX_DEPTH};
use crate::engine::pdata::error::Result;
use crate::engine::pdata::node::Node;
use crate::engine::pdata::tm::TransactionManager;
use crate::engine::pdata::values::Value;

/// Inserts or overwrites `key`; an overwritten different value loses its reference.
/// The tree takes over the reference `value` carries. Returns the new root.
pub fn insert<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    root: u64,
    key: u64,
    value: &V,
) -> Result<u64> {
    let (root, old) = insert_keep_old(tm, rc, root, key, value)?;
    if let Some(old) = old {
        if old != *value {
            rc.dec(tm, &old)?;
        }
    }
    Ok(root)
}

/// Like [`insert`] but hands back the overwritten value without touching its reference.
pub fn insert_keep_old<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    root: u64,
    key: u64,
    value: &V,
) -> Result<(u64, Option<V>)> {
    let packed = pack(value);
    let (parts, old) = insert_rec::<V>(tm, rc, root, key, &packed, 0)?;
    let new_root = match parts.as_slice() {
        [(_, only)] => *only,
        _ => {
            let mut n = Node::new(false, 8);
            for (k, loc) in &parts {
                n.insert_at(n.len(), *k, &loc.to_le_bytes());
            }
            new_node(tm, &n)?
        }
    };
    Ok((new_root, old))
}

type Parts = Vec<(u64, u64)>;

fn insert_rec<V: Value>(
    tm: &mut TransactionManager,
    rc: &mut dyn RefCounter<V>,
    b: u64,
    key: u64,
    packed: &[u8],
    depth: usize,
) -> Result<(Parts, Option<V>)> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    let (loc, mut node) = shadow_node::<V>(tm, rc, b)?;
    let mut old = None;
    if node.leaf {
        match node.keys.binary_search(&key) {
            Ok(i) => {
                old = Some(unpack::<V>(node.value(i), loc)?);
                node.set_value(i, packed);
            }
            Err(i) => node.insert_at(i, key, packed),
        }
    } else {
        if node.is_empty() {
            return Err(crate::engine::pdata::error::FormatError::EmptyNode { block: loc }.into());
        }
        let i = match node.lower_bound(key) {
            Some(i) => i,
            None => {
                if let Some(k0) = node.keys.first_mut() {
                    *k0 = key;
                }
                0
            }
        };
        let (parts, o) = insert_rec::<V>(tm, rc, node.child(i), key, packed, depth + 1)?;
        old = o;
        let mut at = i;
        for (n, (k, child)) in parts.into_iter().enumerate() {
            if n == 0 {
                node.set_value(at, &child.to_le_bytes());
            } else {
                at += 1;
                node.insert_at(at, k, &child.to_le_bytes());
            }
        }
    }
    if node.len() > node.max_entries {
        let right = node.split_off(node.len() / 2);
        write_node(tm, loc, &node)?;
        let rloc = new_node(tm, &right)?;
        let lk = node.keys.first().copied().unwrap_or(key);
        let rk = right.keys.first().copied().unwrap_or(key);
        return Ok((vec![(lk, loc), (rk, rloc)], old));
    }
    write_node(tm, loc, &node)?;
    Ok((vec![(node.keys.first().copied().unwrap_or(key), loc)], old))
}
