//! Two-level trees (the thin mapping tree: device id -> subtree root, block -> mapping) and
//! the reference counters of their values.

use super::{del, empty, insert, insert_keep_old, lookup, remove, NoRefs, RefCounter};
use crate::engine::pdata::error::Result;
use crate::engine::pdata::space_map::SpaceMap;
use crate::engine::pdata::tm::{BlockSource, TransactionManager};
use crate::engine::pdata::values::{BlockTime, Value};

/// Mapping values hold a reference to their data block.
pub struct DataRefs<'a>(pub &'a mut dyn SpaceMap);

impl RefCounter<BlockTime> for DataRefs<'_> {
    fn inc(&mut self, _: &mut TransactionManager, v: &BlockTime) -> Result<()> {
        self.0.inc(v.block)
    }
    fn dec(&mut self, _: &mut TransactionManager, v: &BlockTime) -> Result<()> {
        self.0.dec(v.block)
    }
}

/// Values that are the roots of subtrees whose leaves hold `V`.
pub struct SubtreeRefs<'a, V> {
    pub leaf: &'a mut dyn RefCounter<V>,
}

impl<V: Value> RefCounter<u64> for SubtreeRefs<'_, V> {
    fn inc(&mut self, tm: &mut TransactionManager, root: &u64) -> Result<()> {
        tm.inc(*root)
    }
    fn dec(&mut self, tm: &mut TransactionManager, root: &u64) -> Result<()> {
        del::<V>(tm, self.leaf, *root)
    }
}

/// The value under `(k0, k1)` of a two-level tree.
pub fn lookup_nested<V: Value, S: BlockSource + ?Sized>(
    src: &S,
    root: u64,
    k0: u64,
    k1: u64,
) -> Result<Option<V>> {
    match lookup::<u64, S>(src, root, k0)? {
        Some(sub) => lookup::<V, S>(src, sub, k1),
        None => Ok(None),
    }
}

/// Makes the top-level path to `k0` this transaction's (so a shared top level is copied,
/// and the subtree gains its holder, before the subtree itself is changed); returns the
/// new top root and the subtree root, if `k0` is present.
fn own_top<V: Value>(
    tm: &mut TransactionManager,
    leaf_rc: &mut dyn RefCounter<V>,
    root: u64,
    k0: u64,
) -> Result<(u64, Option<u64>)> {
    match lookup::<u64, _>(tm, root, k0)? {
        Some(sub) => {
            let mut top_rc = SubtreeRefs { leaf: leaf_rc };
            let (root, _) = insert_keep_old::<u64>(tm, &mut top_rc, root, k0, &sub)?;
            // Shadowing a shared top-level leaf may have given `sub` another holder; the
            // entry at k0 still names it.
            Ok((root, lookup::<u64, _>(tm, root, k0)?))
        }
        None => Ok((root, None)),
    }
}

/// Inserts `(k0, k1) -> v`, creating the subtree for `k0` if needed. Returns the new root.
pub fn insert_nested<V: Value>(
    tm: &mut TransactionManager,
    leaf_rc: &mut dyn RefCounter<V>,
    root: u64,
    k0: u64,
    k1: u64,
    v: &V,
) -> Result<u64> {
    let (root, sub) = own_top(tm, leaf_rc, root, k0)?;
    let sub = match sub {
        Some(s) => s,
        None => empty::<V>(tm)?,
    };
    let new_sub = insert::<V>(tm, leaf_rc, sub, k1, v)?;
    let mut top_rc = SubtreeRefs { leaf: leaf_rc };
    let (root, _) = insert_keep_old::<u64>(tm, &mut top_rc, root, k0, &new_sub)?;
    Ok(root)
}

/// Removes `(k0, k1)`. Returns the new root and the removed value.
pub fn remove_nested<V: Value>(
    tm: &mut TransactionManager,
    leaf_rc: &mut dyn RefCounter<V>,
    root: u64,
    k0: u64,
    k1: u64,
) -> Result<(u64, Option<V>)> {
    let Some(sub) = lookup::<u64, _>(tm, root, k0)? else {
        return Ok((root, None));
    };
    if lookup::<V, _>(tm, sub, k1)?.is_none() {
        return Ok((root, None));
    }
    let (root, sub) = own_top(tm, leaf_rc, root, k0)?;
    let Some(sub) = sub else {
        return Ok((root, None));
    };
    let (new_sub, old) = remove::<V>(tm, leaf_rc, sub, k1)?;
    let (root, _) = insert_keep_old::<u64>(tm, &mut NoRefs, root, k0, &new_sub)?;
    Ok((root, old))
}

/// Removes every `(k0, k1)` with `begin <= k1 < end`. Returns the new root and how many
/// entries went.
pub fn remove_range_nested<V: Value>(
    tm: &mut TransactionManager,
    leaf_rc: &mut dyn RefCounter<V>,
    root: u64,
    k0: u64,
    begin: u64,
    end: u64,
) -> Result<(u64, u64)> {
    let Some(sub) = lookup::<u64, _>(tm, root, k0)? else {
        return Ok((root, 0));
    };
    match super::first_at_or_after::<V, _>(tm, sub, begin)? {
        Some((k, _)) if k < end => {}
        _ => return Ok((root, 0)),
    }
    let (root, sub) = own_top(tm, leaf_rc, root, k0)?;
    let Some(sub) = sub else { return Ok((root, 0)) };
    let (new_sub, n) = super::remove_range::<V>(tm, leaf_rc, sub, begin, end)?;
    let (root, _) = insert_keep_old::<u64>(tm, &mut NoRefs, root, k0, &new_sub)?;
    Ok((root, n))
}
