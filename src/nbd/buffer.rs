//! The data buffer of one request: page-aligned (so a device's O_DIRECT path can take it),
//! owned by the connection while the request is in flight, and only ever reached through raw
//! pointers (the device writes into it from another thread while it is in flight).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

const ALIGN: usize = 4096;

pub struct DataBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain heap memory owned by this value; it is reached only through
// raw pointers whose users (the device, the socket) the connection orders.
unsafe impl Send for DataBuf {}

impl DataBuf {
    /// A zeroed buffer of `len` bytes (`len` > 0), or `None` if memory is short.
    pub fn new(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(DataBuf { ptr, len })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for DataBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout (which was valid then).
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len.max(1), ALIGN),
            )
        };
    }
}
