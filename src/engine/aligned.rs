//! Alignment rules for O_DIRECT I/O.

use std::io::{IoSlice, IoSliceMut};

/// Memory and offset alignment that O_DIRECT needs on nearly every host device (the logical
/// sector). A host whose device wants more makes the direct path fail with EINVAL, and the
/// caller then falls back to buffered I/O, so this is a fast-path hint, not a correctness rule.
pub const DIRECT_ALIGN: usize = 512;

fn aligned(addr: usize, len: usize) -> bool {
    addr.is_multiple_of(DIRECT_ALIGN) && len.is_multiple_of(DIRECT_ALIGN)
}

pub fn read_bufs_aligned(offset: u64, bufs: &[IoSliceMut<'_>]) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64)
        && bufs.iter().all(|b| aligned(b.as_ptr() as usize, b.len()))
}

pub fn write_bufs_aligned(offset: u64, bufs: &[IoSlice<'_>]) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64)
        && bufs.iter().all(|b| aligned(b.as_ptr() as usize, b.len()))
}
