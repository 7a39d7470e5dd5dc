//! An open RBD image: size, resize, synchronous I/O (for a metadata store and the device's
//! synchronous methods), snapshots, and the exclusive lock (managed by the caller: after
//! `lock_acquire` librbd does not hand the lock to another client that asks for it).
//!
//! The asynchronous I/O of a device queue goes through [`RbdImage::handle`] and the
//! completions of `queue.rs`.
//!
//! An image can be closed while references to it remain ([`RbdImage::close`]): a daemon's
//! clean stop closes the images of its pool, so their watches go with the process, while its
//! QMP sessions and threads may still hold the pool. Every call holds the handle's read lock
//! for its duration; `close` takes the write lock, so it waits for calls under way, and calls
//! after it fail with EBADF instead of using a closed handle.

use std::ffi::CStr;
use std::io;
use std::os::raw::{c_char, c_int};
use std::ptr;
use std::sync::Arc;

use parking_lot::{RwLock, RwLockReadGuard};
use rbd_sys as sys;

use super::cluster::IoCtx;
use super::error::{c_string, ceph_error, check, check_len};

/// The features of images thinblk creates: librbd's default set. `exclusive-lock` is what
/// ownership and fencing stand on; object-map and fast-diff keep discards and resizes cheap.
pub const CREATE_FEATURES: u64 = (sys::RBD_FEATURE_LAYERING
    | sys::RBD_FEATURE_EXCLUSIVE_LOCK
    | sys::RBD_FEATURE_OBJECT_MAP
    | sys::RBD_FEATURE_FAST_DIFF
    | sys::RBD_FEATURE_DEEP_FLATTEN) as u64;

/// The largest piece one synchronous librbd call moves: lengths are `size_t` there, but a
/// bound keeps one call from pinning gigabytes of buffers in librbd at once.
const SYNC_CHUNK: u64 = 32 << 20;

/// One holder of an image's lock, as librbd reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockOwner {
    pub exclusive: bool,
    /// The owner's client address (`IP:PORT/NONCE`): what `lock_break` and a blocklist take.
    pub owner: String,
}

/// An open image; closed by [`RbdImage::close`] or when dropped.
pub struct RbdImage {
    /// Null once closed.
    handle: RwLock<sys::rbd_image_t>,
    name: String,
    read_only: bool,
    io: Arc<IoCtx>,
}

// SAFETY: librbd image handles are internally synchronized: every call may come from any
// thread, concurrently with others (QEMU and rbd-nbd issue I/O from several threads); only
// `rbd_close` must be the last call, which the handle's lock guarantees (`close` and `Drop`
// take it for writing; every other call holds it for reading).
unsafe impl Send for RbdImage {}
// SAFETY: as above.
unsafe impl Sync for RbdImage {}

impl RbdImage {
    /// Opens the image `name` of `io`'s pool. A read-only open takes no lock and refuses
    /// writes in librbd itself.
    pub fn open(io: &Arc<IoCtx>, name: &str, read_only: bool) -> io::Result<RbdImage> {
        let c_name = c_string("the image name", name)?;
        let mut handle: sys::rbd_image_t = ptr::null_mut();
        // SAFETY: `io` is a live I/O context, `c_name` is NUL-terminated, `handle` a valid
        // place, and NULL names no snapshot (the image's head).
        let rc = unsafe {
            if read_only {
                sys::rbd_open_read_only(io.raw(), c_name.as_ptr(), &mut handle, ptr::null())
            } else {
                sys::rbd_open(io.raw(), c_name.as_ptr(), &mut handle, ptr::null())
            }
        };
        check(
            if read_only {
                "rbd_open_read_only"
            } else {
                "rbd_open"
            },
            rc,
        )?;
        Ok(RbdImage {
            handle: RwLock::new(handle),
            name: name.into(),
            read_only,
            io: io.clone(),
        })
    }

    /// Creates the image `name` of `size` bytes with [`CREATE_FEATURES`] (the default
    /// object size, 4 MiB). Fails with `AlreadyExists` if there is one.
    pub fn create(io: &IoCtx, name: &str, size: u64) -> io::Result<()> {
        let c_name = c_string("the image name", name)?;
        let mut order: c_int = 0;
        // SAFETY: `io` is a live I/O context, `c_name` NUL-terminated, `order` a valid place
        // (0: the default object size).
        let rc = unsafe {
            sys::rbd_create2(io.raw(), c_name.as_ptr(), size, CREATE_FEATURES, &mut order)
        };
        check("rbd_create2", rc).map(drop)
    }

    /// Opens `name` writable, creating it with `size` bytes if it does not exist. Returns
    /// whether it was created. An existing image keeps its own size.
    pub fn open_or_create(io: &Arc<IoCtx>, name: &str, size: u64) -> io::Result<(RbdImage, bool)> {
        match RbdImage::open(io, name, false) {
            Ok(image) => return Ok((image, false)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let created = match RbdImage::create(io, name, size) {
            Ok(()) => true,
            // Another client created it in between: open theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        };
        Ok((RbdImage::open(io, name, false)?, created))
    }

    /// Removes the image `name` (it must have no snapshots and no other opener).
    pub fn remove(io: &IoCtx, name: &str) -> io::Result<()> {
        let c_name = c_string("the image name", name)?;
        // SAFETY: a live I/O context and a NUL-terminated name.
        check("rbd_remove", unsafe {
            sys::rbd_remove(io.raw(), c_name.as_ptr())
        })
        .map(drop)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pool(&self) -> &str {
        self.io.pool()
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The librbd handle, open while the guard lives (for the asynchronous calls of a device
    /// queue: librbd holds what they need itself once they return). EBADF once closed.
    pub(crate) fn handle(&self) -> io::Result<Handle<'_>> {
        // Recursive: a waiting `close` does not block a thread that holds the lock already.
        let guard = self.handle.read_recursive();
        if guard.is_null() {
            return Err(ceph_error("the closed image", libc::EBADF));
        }
        Ok(Handle(guard))
    }

    /// Closes the image now: waits for the calls under way (librbd finishes its in-flight
    /// I/O and unregisters the image's watch), then every later call fails with EBADF.
    /// Closing a closed image does nothing.
    pub fn close(&self) {
        let mut handle = self.handle.write();
        if handle.is_null() {
            return;
        }
        // SAFETY: an open handle, closed once (set to null under the write lock, so no call
        // uses it now or later).
        let rc = unsafe { sys::rbd_close(*handle) };
        *handle = ptr::null_mut();
        if let Err(e) = check("rbd_close", rc) {
            log::warn!("closing RBD image {}/{}: {e}", self.pool(), self.name);
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> io::Result<u64> {
        let h = self.handle()?;
        let mut size = 0u64;
        // SAFETY: an open image and a valid place for the size.
        check("rbd_get_size", unsafe { sys::rbd_get_size(*h, &mut size) })?;
        Ok(size)
    }

    /// The image's feature bits (`RBD_FEATURE_*`).
    pub fn features(&self) -> io::Result<u64> {
        let h = self.handle()?;
        let mut features = 0u64;
        // SAFETY: an open image and a valid place for the bits.
        check("rbd_get_features", unsafe {
            sys::rbd_get_features(*h, &mut features)
        })?;
        Ok(features)
    }

    /// Grows or shrinks the image to `size` bytes.
    pub fn resize(&self, size: u64) -> io::Result<()> {
        let h = self.handle()?;
        // SAFETY: an open image.
        check("rbd_resize", unsafe { sys::rbd_resize(*h, size) }).map(drop)
    }

    /// Fills `buf` from `offset`; a read past the end of the image is an error.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let h = self.handle()?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(SYNC_CHUNK as usize);
            let chunk = &mut buf[done..done + n];
            // SAFETY: an open image; `chunk` is valid for writes of `n` bytes for the call.
            let rc = unsafe {
                sys::rbd_read2(
                    *h,
                    offset + done as u64,
                    n,
                    chunk.as_mut_ptr().cast::<c_char>(),
                    0,
                )
            };
            let got = check_len("rbd_read2", rc)?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += got.min(n);
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; durable after [`RbdImage::flush`].
    pub fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let h = self.handle()?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(SYNC_CHUNK as usize);
            let chunk = &buf[done..done + n];
            // SAFETY: an open image; `chunk` is valid for reads of `n` bytes for the call.
            let rc = unsafe {
                sys::rbd_write2(
                    *h,
                    offset + done as u64,
                    n,
                    chunk.as_ptr().cast::<c_char>(),
                    0,
                )
            };
            let put = check_len("rbd_write2", rc)?;
            if put == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += put.min(n);
        }
        Ok(())
    }

    /// Makes every completed write durable (librbd's cache written back, the OSDs' replies
    /// received).
    pub fn flush(&self) -> io::Result<()> {
        let h = self.handle()?;
        // SAFETY: an open image.
        check("rbd_flush", unsafe { sys::rbd_flush(*h) }).map(drop)
    }

    /// Releases the range; reads of it return zeros afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let h = self.handle()?;
        // SAFETY: an open image.
        check("rbd_discard", unsafe { sys::rbd_discard(*h, offset, len) }).map(drop)
    }

    /// Makes the range read as zeros (librbd may release whole objects).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let h = self.handle()?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(SYNC_CHUNK);
            // SAFETY: an open image; no buffers are involved.
            let rc = unsafe { sys::rbd_write_zeroes(*h, offset + done, n as usize, 0, 0) };
            check_len("rbd_write_zeroes", rc)?;
            done += n;
        }
        Ok(())
    }

    /// Reads into raw buffers (laid out as `struct iovec`), waiting for librbd.
    ///
    /// # Safety
    /// Every iovec must be valid for writes of its length until this call returns.
    pub unsafe fn readv(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<usize> {
        let h = self.handle()?;
        let count = iov_count(iov)?;
        self.wait_for("rbd_aio_readv", |c| {
            // SAFETY: per this function's contract the buffers stay valid, and the iovec list
            // outlives the wait; `c` is a fresh completion.
            unsafe { sys::rbd_aio_readv(*h, iov.as_ptr().cast(), count, offset, c) }
        })
    }

    /// Writes raw buffers (laid out as `struct iovec`), waiting for librbd.
    ///
    /// # Safety
    /// Every iovec must be valid for reads of its length until this call returns.
    pub unsafe fn writev(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<usize> {
        let h = self.handle()?;
        let count = iov_count(iov)?;
        self.wait_for("rbd_aio_writev", |c| {
            // SAFETY: as in `readv`, for reads.
            unsafe { sys::rbd_aio_writev(*h, iov.as_ptr().cast(), count, offset, c) }
        })
    }

    /// Starts an asynchronous call with a completion of its own and waits for it.
    fn wait_for(
        &self,
        call: &'static str,
        start: impl FnOnce(sys::rbd_completion_t) -> c_int,
    ) -> io::Result<usize> {
        let mut c: sys::rbd_completion_t = ptr::null_mut();
        // SAFETY: no callback and no argument: the completion is only waited for.
        check("rbd_aio_create_completion", unsafe {
            sys::rbd_aio_create_completion(ptr::null_mut(), None, &mut c)
        })?;
        let started = check(call, start(c));
        let result = started.and_then(|_| {
            // SAFETY: `c` was handed to librbd by a call that succeeded: it completes.
            unsafe { sys::rbd_aio_wait_for_complete(c) };
            // SAFETY: a completed completion.
            check_len(call, unsafe { sys::rbd_aio_get_return_value(c) })
        });
        // SAFETY: complete (or never started); released once, nobody uses it afterwards.
        unsafe { sys::rbd_aio_release(c) };
        result
    }

    /// Takes a snapshot named `name` of the image's current contents.
    pub fn snap_create(&self, name: &str) -> io::Result<()> {
        let h = self.handle()?;
        let c_name = c_string("the snapshot name", name)?;
        // SAFETY: an open image and a NUL-terminated name.
        check("rbd_snap_create", unsafe {
            sys::rbd_snap_create(*h, c_name.as_ptr())
        })
        .map(drop)
    }

    /// The names of the image's snapshots.
    pub fn snapshots(&self) -> io::Result<Vec<String>> {
        let h = self.handle()?;
        let mut max: c_int = 16;
        // librbd raises `max` when it is too small; a few rounds settle it even while
        // snapshots are being added.
        for _ in 0..8 {
            let mut infos: Vec<sys::rbd_snap_info_t> = Vec::with_capacity(max.max(1) as usize);
            // SAFETY: `infos` has room for `max` entries, which librbd fills (or says it
            // needs more with ERANGE and a new `max`).
            let rc = unsafe { sys::rbd_snap_list(*h, infos.as_mut_ptr(), &mut max) };
            if rc == -libc::ERANGE {
                continue;
            }
            let n = check("rbd_snap_list", rc)? as usize;
            // SAFETY: librbd initialized the first `n` entries (n <= capacity).
            unsafe { infos.set_len(n.min(infos.capacity())) };
            let names = infos
                .iter()
                .filter(|i| !i.name.is_null())
                .map(|i| {
                    // SAFETY: each name is a NUL-terminated string librbd allocated, valid
                    // until rbd_snap_list_end.
                    unsafe { CStr::from_ptr(i.name) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: the entries librbd filled, released once.
            unsafe { sys::rbd_snap_list_end(infos.as_mut_ptr()) };
            return Ok(names);
        }
        Err(ceph_error("rbd_snap_list", libc::ERANGE))
    }

    /// Takes the exclusive lock and keeps it: librbd then refuses to hand it to another
    /// client that asks (no automatic transitions), until [`RbdImage::lock_release`] or a
    /// `lock_break` by another client (which blocklists this one).
    pub fn lock_acquire(&self) -> io::Result<()> {
        let h = self.handle()?;
        // SAFETY: an open image.
        check("rbd_lock_acquire", unsafe {
            sys::rbd_lock_acquire(*h, sys::rbd_lock_mode_t::RBD_LOCK_MODE_EXCLUSIVE)
        })
        .map(drop)
    }

    /// Releases a lock taken with [`RbdImage::lock_acquire`].
    pub fn lock_release(&self) -> io::Result<()> {
        let h = self.handle()?;
        // SAFETY: an open image.
        check("rbd_lock_release", unsafe { sys::rbd_lock_release(*h) }).map(drop)
    }

    /// Whether this handle holds the exclusive lock now.
    pub fn is_lock_owner(&self) -> io::Result<bool> {
        let h = self.handle()?;
        let mut owner: c_int = 0;
        // SAFETY: an open image and a valid place for the answer.
        check("rbd_is_exclusive_lock_owner", unsafe {
            sys::rbd_is_exclusive_lock_owner(*h, &mut owner)
        })?;
        Ok(owner != 0)
    }

    /// Who holds the image's lock (empty: nobody).
    pub fn lock_owners(&self) -> io::Result<Vec<LockOwner>> {
        let h = self.handle()?;
        let mut max: usize = 4;
        for _ in 0..8 {
            let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); max.max(1)];
            let mut mode = sys::rbd_lock_mode_t::RBD_LOCK_MODE_EXCLUSIVE;
            let mut count = owners.len();
            // SAFETY: `owners` has room for `count` pointers; librbd fills them (or sets
            // `count` to what it needs and returns ERANGE).
            let rc =
                unsafe { sys::rbd_lock_get_owners(*h, &mut mode, owners.as_mut_ptr(), &mut count) };
            match rc {
                rc if rc == -libc::ENOENT => return Ok(Vec::new()),
                rc if rc == -libc::ERANGE && count > max => {
                    max = count;
                    continue;
                }
                rc => check("rbd_lock_get_owners", rc)?,
            };
            let count = count.min(owners.len());
            let exclusive = mode == sys::rbd_lock_mode_t::RBD_LOCK_MODE_EXCLUSIVE;
            let list = owners[..count]
                .iter()
                .filter(|p| !p.is_null())
                .map(|&p| LockOwner {
                    exclusive,
                    // SAFETY: librbd filled the pointer with a NUL-terminated string, valid
                    // until the cleanup below.
                    owner: unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned(),
                })
                .collect();
            // SAFETY: the `count` strings librbd allocated, released once.
            unsafe { sys::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), count) };
            return Ok(list);
        }
        Err(ceph_error("rbd_lock_get_owners", libc::ERANGE))
    }

    /// Breaks `owner`'s exclusive lock. With Ceph's default
    /// (`rbd_blocklist_on_break_lock = true`) the owner's client is blocklisted first, so it
    /// can never write to the image again, even if it is alive and does not know.
    pub fn lock_break(&self, owner: &str) -> io::Result<()> {
        let h = self.handle()?;
        let c_owner = c_string("the lock owner", owner)?;
        // SAFETY: an open image and a NUL-terminated owner string.
        check("rbd_lock_break", unsafe {
            sys::rbd_lock_break(
                *h,
                sys::rbd_lock_mode_t::RBD_LOCK_MODE_EXCLUSIVE,
                c_owner.as_ptr(),
            )
        })
        .map(drop)
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        // Every queue of a device on it holds an `Arc` of it and drains its I/O before
        // letting go, so nothing is in flight.
        self.close();
    }
}

/// An open image's handle, kept open while this lives (see [`RbdImage::handle`]).
pub(crate) struct Handle<'a>(RwLockReadGuard<'a, sys::rbd_image_t>);

impl std::ops::Deref for Handle<'_> {
    type Target = sys::rbd_image_t;

    fn deref(&self) -> &sys::rbd_image_t {
        &self.0
    }
}

/// An iovec count as librbd takes it; more than `IOV_MAX` is the caller's to split.
pub(crate) fn iov_count(iov: &[libc::iovec]) -> io::Result<c_int> {
    match c_int::try_from(iov.len()) {
        Ok(n) if n > 0 && n <= libc::UIO_MAXIOV => Ok(n),
        _ => Err(ceph_error("rbd_aio_readv", libc::EINVAL)),
    }
}
