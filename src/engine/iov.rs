//! Buffer lists: raw pieces of memory a request reads into or writes from, and cutting
//! scatter-gather lists at byte offsets for devices that split a request across blocks.

use std::any::Any;
use std::io::{IoSlice, IoSliceMut};
use std::marker::PhantomData;
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
    /// Three inline, as a request's segments (drivers hand over one to three for ordinary
    /// transfers), and so that a request stays within 128 bytes (see `IoOp`).
    pieces: SmallVec<[Piece; 3]>,
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

    /// Adds a piece at the end (nothing if it is empty): for a frontend that builds its
    /// buffers piece by piece rather than collecting them for [`RawBufs::new`] first.
    ///
    /// # Safety
    /// As for [`RawBufs::new`], for this piece; without a keepalive, the caller keeps the
    /// memory mapped until the request completes.
    #[inline]
    pub unsafe fn push(&mut self, ptr: *mut u8, len: usize) {
        if len > 0 {
            self.len = self.len.saturating_add(len as u64);
            self.pieces.push(Piece { ptr, len });
        }
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

/// Buffers a device reads from (the data of a write): raw pieces, valid for `'a`.
///
/// Devices never turn them into `&[u8]`: the memory may be a guest's, which it can change at
/// any time. They hand the pieces to the kernel (pwritev) or copy them out with
/// [`Bufs::copy_to`].
pub struct Bufs<'a> {
    pieces: SmallVec<[Piece; 4]>,
    len: u64,
    _life: PhantomData<&'a [u8]>,
}

/// Buffers a device writes into (the data of a read): raw pieces, valid for `'a`.
pub struct BufsMut<'a> {
    pieces: SmallVec<[Piece; 4]>,
    len: u64,
    _life: PhantomData<&'a mut [u8]>,
}

fn total(pieces: &[Piece]) -> u64 {
    pieces.iter().map(|p| p.len as u64).sum()
}

/// The pieces covering `[at, at + len)` of `pieces` (fewer bytes if they end first).
fn cut(pieces: &[Piece], mut at: u64, mut len: u64) -> SmallVec<[Piece; 4]> {
    let mut out = SmallVec::new();
    for p in pieces {
        if len == 0 {
            break;
        }
        let plen = p.len as u64;
        if at >= plen {
            at -= plen;
            continue;
        }
        let n = (plen - at).min(len);
        out.push(Piece {
            ptr: p.ptr.wrapping_add(at as usize),
            len: n as usize,
        });
        len -= n;
        at = 0;
    }
    out
}

impl<'a> Bufs<'a> {
    /// One buffer of the caller's own.
    pub fn one(b: &'a [u8]) -> Self {
        let pieces: SmallVec<[Piece; 4]> = smallvec::smallvec![Piece {
            ptr: b.as_ptr().cast_mut(),
            len: b.len(),
        }];
        Bufs {
            len: b.len() as u64,
            pieces,
            _life: PhantomData,
        }
    }

    /// Buffers made of raw pieces.
    ///
    /// # Safety
    /// Every piece must be valid for reads for `'a`.
    pub unsafe fn from_raw(pieces: &[Piece]) -> Self {
        Bufs {
            len: total(pieces),
            // A slice copy, not an element-by-element collect: this runs for every request.
            pieces: SmallVec::from_slice(pieces),
            _life: PhantomData,
        }
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Laid out as `struct iovec`.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The bytes `[at, at + len)` of these buffers.
    pub fn range(&self, at: u64, len: u64) -> Bufs<'_> {
        let pieces = cut(&self.pieces, at, len);
        Bufs {
            len: total(&pieces),
            pieces,
            _life: PhantomData,
        }
    }

    /// Copies the buffers, in order, to the start of `dst` (as much as fits).
    pub fn copy_to(&self, dst: &mut [u8]) {
        let mut at = 0usize;
        for p in &self.pieces {
            let n = p.len.min(dst.len() - at);
            if n == 0 {
                break;
            }
            // SAFETY: the piece is valid for reads for 'a (constructors' contract) and `dst`
            // has `n` bytes left at `at`; `dst` is the caller's own memory, so they do not
            // overlap.
            unsafe { std::ptr::copy_nonoverlapping(p.ptr, dst[at..].as_mut_ptr(), n) };
            at += n;
        }
    }
}

impl<'a> From<&'a [IoSlice<'a>]> for Bufs<'a> {
    fn from(bufs: &'a [IoSlice<'a>]) -> Self {
        let pieces: SmallVec<[Piece; 4]> = bufs
            .iter()
            .map(|b| Piece {
                ptr: b.as_ptr().cast_mut(),
                len: b.len(),
            })
            .collect();
        Bufs {
            len: total(&pieces),
            pieces,
            _life: PhantomData,
        }
    }
}

impl<'a> BufsMut<'a> {
    /// One buffer of the caller's own.
    pub fn one(b: &'a mut [u8]) -> Self {
        let pieces: SmallVec<[Piece; 4]> = smallvec::smallvec![Piece {
            ptr: b.as_mut_ptr(),
            len: b.len(),
        }];
        BufsMut {
            len: b.len() as u64,
            pieces,
            _life: PhantomData,
        }
    }

    /// Buffers made of raw pieces.
    ///
    /// # Safety
    /// Every piece must be valid for writes for `'a`, and not reached through any Rust
    /// reference meanwhile.
    pub unsafe fn from_raw(pieces: &[Piece]) -> Self {
        BufsMut {
            len: total(pieces),
            // A slice copy, not an element-by-element collect: this runs for every request.
            pieces: SmallVec::from_slice(pieces),
            _life: PhantomData,
        }
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Laid out as `struct iovec`.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The bytes `[at, at + len)` of these buffers, borrowed for writing.
    pub fn range_mut(&mut self, at: u64, len: u64) -> BufsMut<'_> {
        let pieces = cut(&self.pieces, at, len);
        BufsMut {
            len: total(&pieces),
            pieces,
            _life: PhantomData,
        }
    }

    /// Fills the buffers with zeros.
    pub fn zero(&mut self) {
        for p in &self.pieces {
            // SAFETY: the piece is valid for writes (constructors' contract).
            unsafe { std::ptr::write_bytes(p.ptr, 0, p.len) };
        }
    }

    /// Copies `src` into the buffers, in order (as much as fits).
    pub fn copy_from(&mut self, src: &[u8]) {
        let mut at = 0usize;
        for p in &self.pieces {
            let n = p.len.min(src.len() - at);
            if n == 0 {
                break;
            }
            // SAFETY: the piece is valid for writes (constructors' contract) and `src` has `n`
            // bytes left at `at`; `src` is a shared reference, so nothing writes it and a
            // piece (exclusively ours) cannot be it.
            unsafe { std::ptr::copy_nonoverlapping(src[at..].as_ptr(), p.ptr, n) };
            at += n;
        }
    }
}

impl<'a> From<&'a mut [IoSliceMut<'a>]> for BufsMut<'a> {
    fn from(bufs: &'a mut [IoSliceMut<'a>]) -> Self {
        let pieces: SmallVec<[Piece; 4]> = bufs
            .iter_mut()
            .map(|b| Piece {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            })
            .collect();
        BufsMut {
            len: total(&pieces),
            pieces,
            _life: PhantomData,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cut_across_buffer_boundaries() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let mut raw = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let mut bufs = BufsMut::from(&mut raw[..]);
        assert_eq!(bufs.len(), 8);
        let first = bufs.range_mut(0, 4);
        assert_eq!(
            first.pieces().iter().map(|p| p.len).collect::<Vec<_>>(),
            vec![3, 1]
        );
        drop(first);
        bufs.range_mut(3, 1).copy_from(&[1]);
        bufs.range_mut(4, 4).copy_from(&[2; 4]);
        drop(bufs);
        assert_eq!(b, [1, 2, 2, 2, 2]);
        let src = [IoSlice::new(&a), IoSlice::new(&b)];
        let from = Bufs::from(&src[..]);
        let mut out = [9u8; 6];
        from.range(2, 6).copy_to(&mut out);
        assert_eq!(out, [0, 1, 2, 2, 2, 2]);
    }
}
