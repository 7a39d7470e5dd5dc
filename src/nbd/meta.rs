//! Meta contexts: which a client may select (NBD_OPT_LIST/SET_META_CONTEXT), and the block
//! status descriptors each answers (NBD_CMD_BLOCK_STATUS).
//!
//! - `base:allocation`: the device's allocation ([`crate::engine::BlockDevice::allocation`]);
//!   a hole is HOLE|ZERO (an unmapped thin block reads as zeros), data is 0.
//! - `qemu:dirty-bitmap:NAME`: QEMU's context for a dirty bitmap, here the blocks where the
//!   export differs from the base snapshot NAME (thin-delta); changed is DIRTY (1). Clients
//!   that do incremental backups with QEMU (`qemu-img map --image-opts
//!   ...x-dirty-bitmap=qemu:dirty-bitmap:NAME`, libnbd) read only those.

use super::export::NbdExport;
use super::proto::*;
use crate::engine::{Allocation, BlockError};

/// A context a connection selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    Allocation,
    DirtyBitmap,
}

/// Ids handed to the client (opaque to it; fixed per context here).
pub fn context_id(c: Context) -> u32 {
    match c {
        Context::Allocation => 1,
        Context::DirtyBitmap => 2,
    }
}

pub const ALLOCATION: &str = "base:allocation";
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// The contexts `export` has, with their names.
pub fn available(export: &NbdExport) -> Vec<(Context, String)> {
    let mut out = vec![(Context::Allocation, ALLOCATION.to_string())];
    if let Some(b) = &export.bitmap {
        out.push((
            Context::DirtyBitmap,
            format!("{DIRTY_BITMAP_PREFIX}{}", b.name),
        ));
    }
    out
}

/// The contexts `query` names. For listing (`wildcards`), a namespace alone (`base:`,
/// `qemu:`) or `qemu:dirty-bitmap:` matches every context under it; for selecting, only a
/// full name does. Unknown namespaces and names match nothing (never an error).
pub fn matching(export: &NbdExport, query: &str, wildcards: bool) -> Vec<(Context, String)> {
    available(export)
        .into_iter()
        .filter(|(_, name)| {
            name == query
                || (wildcards
                    && matches!(query, "base:" | "qemu:" | DIRTY_BITMAP_PREFIX)
                    && name.starts_with(query))
        })
        .collect()
}

/// Most descriptors in one reply chunk (the spec asks for at most 2^20; fewer keeps one
/// reply small, and the client asks again from where it ends).
const MAX_DESCRIPTORS: usize = 1 << 16;
/// The longest descriptor: a 32-bit length, kept a multiple of the minimum block.
const MAX_DESCRIPTOR: u64 = (u32::MAX as u64) & !(MIN_BLOCK as u64 - 1);

/// The block status of `[offset, offset + len)` in context `c`: (length, flags) descriptors
/// from `offset`, at least one, none empty, together at most `len` long. With `req_one`,
/// exactly one.
pub fn block_status(
    export: &NbdExport,
    c: Context,
    offset: u64,
    len: u64,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, BlockError> {
    let runs: Vec<(u64, u32)> = match c {
        Context::Allocation => export
            .node
            .allocation(offset, len)?
            .into_iter()
            .map(|r| {
                let flags = match r.state {
                    Allocation::Data => 0,
                    Allocation::Hole => STATE_HOLE | STATE_ZERO,
                };
                (r.len, flags)
            })
            .collect(),
        Context::DirtyBitmap => match &export.bitmap {
            Some(b) => (b.changed)(offset, len)?
                .into_iter()
                .map(|(n, changed)| (n, if changed { STATE_DIRTY } else { 0 }))
                .collect(),
            None => vec![(len, 0)],
        },
    };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut total = 0u64;
    for (n, flags) in runs {
        let mut left = n.min(len - total);
        while left > 0 && out.len() < MAX_DESCRIPTORS {
            let piece = left.min(MAX_DESCRIPTOR);
            // `piece` fits: MAX_DESCRIPTOR < 2^32.
            out.push((piece as u32, flags));
            left -= piece;
            total += piece;
        }
        if req_one && !out.is_empty() {
            out.truncate(1);
            break;
        }
    }
    if out.is_empty() {
        // A device answered nothing for a non-empty range: say "data, not known zero",
        // which is always true.
        out.push((len.clamp(1, MAX_DESCRIPTOR) as u32, 0));
    }
    Ok(out)
}
