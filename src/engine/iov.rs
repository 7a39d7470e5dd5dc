//! Buffer lists: raw pieces of memory a request reads into or writes from, and cutting
//! scatter-gather lists at byte offsets for devices that split a request across blocks.

use std::any::Any;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use smallvec::SmallVec;

/// Whatever keeps foreign memory (a guest's) mapped while a request uses it.
pub type KeepAlive = Arc<dyn Any + Send + Sync>;

/// One buffer: laid out as `struct iovec`, so a list of them goes to preadv/pwritev as is.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Piece {
    pub ptr: *mut u8,
    pub len: usize,
}

/// The buffers of a request handed to a queue: raw pieces, never Rust references (the memory
/// may belong to a guest that changes it at any time), and what keeps them mapped.
#[derive(Default)]
pub struct RawBufs {
    pieces: SmallVec<[Piece; 4]>,
    len: u64,
    /// Only held: dropped with the request, after the memory was last used.
    _keepalive: Option<KeepAlive>,
}

// SAFETY: the pieces are plain addresses of memory that `keepalive` (or, per `RawBufs::new`'s
// contract, the caller) keeps valid until the request completes, on whichever thread.
unsafe impl Send for RawBufs {}

impl RawBufs {
    /// Buffers made of `pieces` (address, length).
    ///
    /// # Safety
    /// Every piece must stay valid for reads and writes, and must not be reached through a
    /// Rust reference in this process, until the request that carries it has completed; the
    /// memory must stay mapped at least while `keepalive` lives.
    pub unsafe fn new(
        pieces: impl IntoIterator<Item = (*mut u8, usize)>,
        keepalive: Option<KeepAlive>,
    ) -> Self {
        let mut out = RawBufs {
            _keepalive: keepalive,
            ..RawBufs::default()
        };
        for (ptr, len) in pieces {
            if len > 0 {
                out.len = out.len.saturating_add(len as u64);
                out.pieces.push(Piece { ptr, len });
            }
        }
        out
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }
}

/// A caller's buffers as raw pieces, so sub-ranges can be handed out one at a time.
pub struct IovCursor {
    pieces: Vec<(*mut u8, usize)>,
    index: usize,
    within: usize,
}

impl IovCursor {
    pub fn from_mut(bufs: &mut [IoSliceMut<'_>]) -> Self {
        IovCursor {
            pieces: bufs.iter_mut().map(|b| (b.as_mut_ptr(), b.len())).collect(),
            index: 0,
            within: 0,
        }
    }

    pub fn from_ref(bufs: &[IoSlice<'_>]) -> Self {
        IovCursor {
            pieces: bufs
                .iter()
                .map(|b| (b.as_ptr().cast_mut(), b.len()))
                .collect(),
            index: 0,
            within: 0,
        }
    }

    /// The next `len` bytes as (pointer, length) pieces.
    fn take(&mut self, mut len: usize) -> Vec<(*mut u8, usize)> {
        let mut out = Vec::new();
        while len > 0 {
            let Some(&(base, size)) = self.pieces.get(self.index) else {
                break;
            };
            let n = (size - self.within).min(len);
            if n > 0 {
                out.push((base.wrapping_add(self.within), n));
            }
            len -= n;
            self.within += n;
            if self.within == size {
                self.index += 1;
                self.within = 0;
            }
        }
        out
    }

    /// The next `len` bytes for reading into.
    ///
    /// # Safety
    /// The cursor must come from `from_mut` on buffers that are still borrowed by the caller
    /// and not otherwise used while the returned slices live; ranges taken never overlap.
    pub unsafe fn take_mut<'a>(&mut self, len: usize) -> Vec<IoSliceMut<'a>> {
        self.take(len)
            .into_iter()
            // SAFETY: per this function's contract the piece is live, writable and unaliased.
            .map(|(p, n)| IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p, n) }))
            .collect()
    }

    /// The next `len` bytes for writing from.
    ///
    /// # Safety
    /// The buffers the cursor was made from must still be borrowed by the caller.
    pub unsafe fn take_ref<'a>(&mut self, len: usize) -> Vec<IoSlice<'a>> {
        self.take(len)
            .into_iter()
            // SAFETY: per this function's contract the piece is live and readable.
            .map(|(p, n)| IoSlice::new(unsafe { std::slice::from_raw_parts(p, n) }))
            .collect()
    }
}

/// Copies scattered buffers into one contiguous slice at `at`.
pub fn gather_into(dst: &mut [u8], at: usize, src: &[IoSlice<'_>]) {
    let mut pos = at;
    for s in src {
        if let Some(d) = dst.get_mut(pos..pos + s.len()) {
            d.copy_from_slice(s);
        }
        pos += s.len();
    }
}

/// Fills scattered buffers with zeros.
pub fn zero(bufs: &mut [IoSliceMut<'_>]) {
    for b in bufs {
        b.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cut_across_buffer_boundaries() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let mut cur = IovCursor::from_mut(&mut bufs);
        // SAFETY: the buffers are borrowed for the whole test and the ranges are disjoint.
        let (mut first, mut second) = unsafe { (cur.take_mut(4), cur.take_mut(4)) };
        assert_eq!(
            first.iter().map(|s| s.len()).collect::<Vec<_>>(),
            vec![3, 1]
        );
        assert_eq!(second.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![4]);
        first[1].fill(1);
        second[0].fill(2);
        drop((first, second));
        assert_eq!(b, [1, 2, 2, 2, 2]);
    }
}
