//! Alignment rules for O_DIRECT I/O.

/// Memory and offset alignment that O_DIRECT needs on nearly every host device (the logical
/// sector). A host whose device wants more makes the direct path fail with EINVAL, and the
/// caller then falls back to buffered I/O, so this is a fast-path hint, not a correctness rule.
pub const DIRECT_ALIGN: usize = 512;

/// Whether I/O at `offset` into buffers of (address, length) may use an O_DIRECT descriptor.
pub fn direct_aligned(offset: u64, mut bufs: impl Iterator<Item = (usize, usize)>) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64)
        && bufs.all(|(addr, len)| {
            addr.is_multiple_of(DIRECT_ALIGN) && len.is_multiple_of(DIRECT_ALIGN)
        })
}

/// Whether I/O at `offset` into raw pieces may use an O_DIRECT descriptor.
pub fn pieces_aligned(offset: u64, pieces: &[super::iov::Piece]) -> bool {
    direct_aligned(offset, pieces.iter().map(|p| (p.ptr as usize, p.len)))
}
