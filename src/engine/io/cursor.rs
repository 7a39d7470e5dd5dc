//! A cursor over a request's buffer pieces, shared by the queues that cut a request into
//! extents (io_uring's and the stacked queue).

use crate::engine::iov::Piece;

/// Walks buffer pieces, cutting them at byte lengths.
pub(super) struct Cursor<'a> {
    pieces: &'a [Piece],
    index: usize,
    within: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(pieces: &'a [Piece]) -> Self {
        Cursor {
            pieces,
            index: 0,
            within: 0,
        }
    }

    pub(super) fn at_end(&self) -> bool {
        self.index >= self.pieces.len()
    }

    /// Calls `f` with each piece of the next `len` bytes; `false` if there are fewer.
    pub(super) fn each(&mut self, mut len: u64, mut f: impl FnMut(Piece)) -> bool {
        while len > 0 {
            let Some(&p) = self.pieces.get(self.index) else {
                return false;
            };
            let n = ((p.len - self.within) as u64).min(len) as usize;
            f(Piece {
                ptr: p.ptr.wrapping_add(self.within),
                len: n,
            });
            len -= n as u64;
            self.within += n;
            if self.within == p.len {
                self.index += 1;
                self.within = 0;
            }
        }
        true
    }
}
