//! Inflight I/O tracking (vhost-user protocol feature INFLIGHT_SHMFD, split rings): a shared
//! memory region, kept by the frontend across backend restarts, that says which chains the
//! backend took from a ring and has not yet returned, so that a new backend process resubmits
//! exactly those, in the order they were taken, even when the old one completed others out of
//! order (the avail ring no longer holds them then).
//!
//! The region is the one the vhost-user specification ("Inflight I/O tracking") defines: one
//! queue region per virtqueue, each a 16-byte header (`features` u64, `version` u16,
//! `desc_num` u16, `last_batch_head` u16, `used_idx` u16) and `desc_num` 16-byte descriptor
//! states (`inflight` u8, 5 bytes padding, `next` u16, `counter` u64), native byte order.
//! Queue regions follow each other every [`queue_stride`] bytes (header and states rounded up
//! to 64 bytes, which is where libvhost-user puts them too).
//!
//! The order of the writes is what makes a crash anywhere recoverable:
//! - taking a chain: pop it from the avail ring, then `counter` then `inflight = 1`. A crash
//!   before `inflight` leaves the chain in the avail ring, where it is taken again (the next
//!   avail index is rebuilt from the used index and the inflight count, see below).
//! - returning a chain: `next = last_batch_head`, `last_batch_head = head`, publish the used
//!   entry and index (one chain per batch), then `inflight = 0`, then `used_idx` = the used
//!   index. A crash before the used index moves leaves the chain inflight: it is resubmitted.
//!   A crash after it but before `used_idx` is caught up shows as `used_idx` != the used
//!   ring's index, and the batch list from `last_batch_head` names the chains to clear.
//! - starting a ring on a region that already has version 1 (a reconnect): clear the last
//!   batch if `used_idx` lags, set `used_idx`, then resubmit every chain still inflight by
//!   increasing `counter`, before anything new; every chain taken is either used or
//!   inflight, so the next avail index is the used index plus the number inflight, and the
//!   frontend's SET_VRING_BASE (which after a crash is only its guess, the used index) is
//!   overridden.
//!
//! After the queue regions, a region this backend made has [`DEVICE_STATE_LEN`] bytes of its
//! own: device state the guest set that must outlive the process like the inflight chains do,
//! and that QEMU does not send again when it reconnects (the write-cache mode,
//! `cache_mode.rs`). The specification leaves the region's size to the backend
//! (GET_INFLIGHT_FD's `mmap_size`), and the frontend keeps and hands back all of it. A region
//! without those bytes (made by an older thinblk) simply keeps no state.
//!
//! The region comes from the frontend (SET_INFLIGHT_FD) and the frontend can write it at any
//! time: its size, seals and geometry are checked before it is mapped, its pages are
//! populated at once (no fault later), every index read from it is checked, and all access
//! goes through atomics on the shared mapping (never a Rust reference to plain data).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use log::{info, warn};
use parking_lot::{Mutex, MutexGuard};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use super::cache_mode::CacheMode;
use super::dirty_log::{GuestMemoryMmap, VringRwLock};

/// The region version this code writes and reads.
pub const VERSION: u16 = 1;
const HEADER: usize = 16;
const DESC_STATE: usize = 16;
const QUEUE_ALIGN: usize = 64;
// Offsets in a queue region's header and in a descriptor state.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
const NEXT_AT: usize = 6;
const COUNTER_AT: usize = 8;

/// Bytes after the queue regions that keep device state (a multiple of 64, like a queue's).
pub const DEVICE_STATE_LEN: usize = 64;
/// Marks device state as written by this backend (a fresh region reads zero there).
const STATE_MAGIC: u64 = u64::from_le_bytes(*b"thinblk1");
// Offsets in the device state.
const STATE_MAGIC_AT: usize = 0;
const STATE_WRITEBACK_AT: usize = 8;

/// Bytes from one queue region to the next, for rings of `queue_size` entries.
pub const fn queue_stride(queue_size: u16) -> usize {
    (HEADER + DESC_STATE * queue_size as usize).next_multiple_of(QUEUE_ALIGN)
}

/// Bytes of a region for `num_queues` rings of `queue_size` entries.
pub const fn region_size(num_queues: u16, queue_size: u16) -> usize {
    num_queues as usize * queue_stride(queue_size)
}

/// Why a frontend's inflight message or region is refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("{num_queues} queues of {queue_size} entries: the device has at most {max_queues} queues of at most {max_queue_size} (a power of two)")]
    Geometry {
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_queue_size: u16,
    },
    #[error("mmap size {given} is less than the {needed} bytes the queues need")]
    TooSmall { given: u64, needed: u64 },
    #[error("mmap offset {0:#x} is not page aligned")]
    Unaligned(u64),
    #[error("the region ends at {end:#x}, past the file's {file_size} bytes")]
    PastEof { end: u64, file_size: u64 },
    #[error("the fd is not a regular file")]
    NotAFile,
    #[error("the file can shrink (no F_SEAL_SHRINK)")]
    Unsealed,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A mapped inflight region: `num_queues` queue regions for rings of `queue_size` entries.
pub struct InflightRegion {
    base: NonNull<u8>,
    len: usize,
    num_queues: u16,
    queue_size: u16,
    /// Whether the device state follows the queue regions in the mapping.
    has_state: bool,
}

// SAFETY: the mapping is shared memory accessed only through atomics (see `QueueView`); the
// pointer is valid for as long as the region lives, from any thread.
unsafe impl Send for InflightRegion {}
// SAFETY: as above; nothing hands out plain references into the mapping.
unsafe impl Sync for InflightRegion {}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly the mapping made in `map`, unmapped once, here.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn check_geometry(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_queue_size: u16,
) -> Result<(), InflightError> {
    if num_queues == 0
        || num_queues > max_queues
        || !queue_size.is_power_of_two()
        || queue_size > max_queue_size
    {
        return Err(InflightError::Geometry {
            num_queues,
            queue_size,
            max_queues,
            max_queue_size,
        });
    }
    Ok(())
}

impl InflightRegion {
    /// A fresh, zeroed region in a sealed memfd (it can neither shrink nor grow), for
    /// GET_INFLIGHT_FD: the region and the fd to hand to the frontend.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<(InflightRegion, File), InflightError> {
        check_geometry(num_queues, queue_size, max_queues, max_queue_size)?;
        let len = region_size(num_queues, queue_size) + DEVICE_STATE_LEN;
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"thinblk-inflight".as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS changes only the seals of the file we just created.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let region = Self::map(&file, 0, len, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// The region a frontend hands back with SET_INFLIGHT_FD (made by this process or an
    /// earlier one), checked before it is mapped: geometry within the device's, the
    /// queues' bytes within `mmap_size` and within the file, a page-aligned offset, a regular
    /// file sealed against shrinking.
    pub fn open(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        (num_queues, queue_size): (u16, u16),
        (max_queues, max_queue_size): (u16, u16),
    ) -> Result<InflightRegion, InflightError> {
        check_geometry(num_queues, queue_size, max_queues, max_queue_size)?;
        let len = region_size(num_queues, queue_size);
        let needed = len as u64;
        if mmap_size < needed {
            return Err(InflightError::TooSmall {
                given: mmap_size,
                needed,
            });
        }
        // SAFETY: sysconf has no memory effects.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        if !mmap_offset.is_multiple_of(page.max(1)) {
            return Err(InflightError::Unaligned(mmap_offset));
        }
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(InflightError::NotAFile);
        }
        let end = mmap_offset.saturating_add(needed);
        if end > meta.len() {
            return Err(InflightError::PastEof {
                end,
                file_size: meta.len(),
            });
        }
        // SAFETY: F_GET_SEALS only reads the file's seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::Unsealed);
        }
        let offset = libc::off_t::try_from(mmap_offset).map_err(|_| InflightError::PastEof {
            end,
            file_size: meta.len(),
        })?;
        // The device state too, where the region has room for it (one this backend made).
        let with_state = needed + DEVICE_STATE_LEN as u64;
        let fits = mmap_size >= with_state && mmap_offset.saturating_add(with_state) <= meta.len();
        let len = if fits { len + DEVICE_STATE_LEN } else { len };
        Self::map(file, offset, len, num_queues, queue_size)
    }

    fn map(
        file: &File,
        offset: libc::off_t,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        // SAFETY: a new shared mapping of a file we checked covers [offset, offset + len); it
        // overlaps nothing of ours.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        let Some(base) = NonNull::new(ptr.cast::<u8>()) else {
            return Err(io::Error::other("mmap returned null").into());
        };
        let region = InflightRegion {
            base,
            len,
            num_queues,
            queue_size,
            has_state: len >= region_size(num_queues, queue_size) + DEVICE_STATE_LEN,
        };
        // Allocate every page now: a page the file system cannot provide later would be a
        // SIGBUS in a worker; here it is an error the frontend gets.
        // SAFETY: madvise on the mapping just made; it only faults its pages in.
        if unsafe { libc::madvise(ptr, len, libc::MADV_POPULATE_WRITE) } < 0 {
            let e = io::Error::last_os_error();
            // Kernels before 5.14 do not know the advice; the seal check stands alone there.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e.into());
            }
        }
        Ok(region)
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Bytes mapped (what GET_INFLIGHT_FD reports as `mmap_size`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device state's bytes, if the region has them (accessed like a queue's).
    fn state(&self) -> Option<QueueView<'_>> {
        self.has_state.then(|| QueueView {
            region: self,
            offset: region_size(self.num_queues, self.queue_size),
        })
    }

    /// The write-cache mode kept here (true: writeback), if this backend (this process or an
    /// earlier one) wrote one. Anything else the frontend may have put there reads as none.
    pub fn saved_writeback(&self) -> Option<bool> {
        let state = self.state()?;
        if state.u64_at(STATE_MAGIC_AT)?.load(Ordering::Acquire) != STATE_MAGIC {
            return None;
        }
        match state.u8_at(STATE_WRITEBACK_AT)?.load(Ordering::Acquire) {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// Keeps the write-cache mode `writeback` for the next process; the mode goes before the
    /// mark that makes it valid. Returns whether the region has room for it.
    pub fn save_writeback(&self, writeback: bool) -> bool {
        let Some(state) = self.state() else {
            return false;
        };
        let (Some(mode), Some(magic)) = (
            state.u8_at(STATE_WRITEBACK_AT),
            state.u64_at(STATE_MAGIC_AT),
        ) else {
            return false;
        };
        mode.store(u8::from(writeback), Ordering::Release);
        magic.store(STATE_MAGIC, Ordering::Release);
        true
    }

    fn queue(&self, index: usize) -> Option<QueueView<'_>> {
        if index >= usize::from(self.num_queues) {
            return None;
        }
        Some(QueueView {
            region: self,
            offset: index * queue_stride(self.queue_size),
        })
    }
}

/// One queue's part of a mapped region. Every accessor is bounds-checked against the mapping
/// and aligned (queue regions start on 64-byte boundaries of a page-aligned mapping, and each
/// field sits at a multiple of its size).
struct QueueView<'a> {
    region: &'a InflightRegion,
    offset: usize,
}

impl QueueView<'_> {
    fn at<T>(&self, at: usize) -> Option<NonNull<T>> {
        let start = self.offset.checked_add(at)?;
        if start.checked_add(std::mem::size_of::<T>())? > self.region.len {
            return None;
        }
        // SAFETY: start + size_of::<T>() is within the mapping (checked just above).
        let p = unsafe { self.region.base.as_ptr().add(start) };
        if !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        NonNull::new(p.cast::<T>())
    }

    fn u16_at(&self, at: usize) -> Option<&AtomicU16> {
        // SAFETY: in bounds and aligned (`at`); the mapping outlives `self`; the memory is
        // only ever accessed atomically by this process.
        self.at::<u16>(at)
            .map(|p| unsafe { AtomicU16::from_ptr(p.as_ptr()) })
    }

    fn u64_at(&self, at: usize) -> Option<&AtomicU64> {
        // SAFETY: as in `u16_at`.
        self.at::<u64>(at)
            .map(|p| unsafe { AtomicU64::from_ptr(p.as_ptr()) })
    }

    fn u8_at(&self, at: usize) -> Option<&AtomicU8> {
        // SAFETY: as in `u16_at`.
        self.at::<u8>(at)
            .map(|p| unsafe { AtomicU8::from_ptr(p.as_ptr()) })
    }

    fn desc(&self, head: u16, field: usize) -> usize {
        HEADER + DESC_STATE * usize::from(head) + field
    }

    fn get16(&self, at: usize) -> u16 {
        self.u16_at(at).map_or(0, |a| a.load(Ordering::Acquire))
    }

    fn set16(&self, at: usize, v: u16) {
        if let Some(a) = self.u16_at(at) {
            a.store(v, Ordering::Release);
        }
    }

    fn inflight(&self, head: u16) -> bool {
        self.u8_at(self.desc(head, 0))
            .is_some_and(|a| a.load(Ordering::Acquire) == 1)
    }

    fn set_inflight(&self, head: u16, on: bool) {
        if let Some(a) = self.u8_at(self.desc(head, 0)) {
            a.store(u8::from(on), Ordering::Release);
        }
    }

    fn counter(&self, head: u16) -> u64 {
        self.u64_at(self.desc(head, COUNTER_AT))
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    fn set_counter(&self, head: u16, v: u64) {
        if let Some(a) = self.u64_at(self.desc(head, COUNTER_AT)) {
            a.store(v, Ordering::Release);
        }
    }

    /// Zeroes the queue region and writes a version 1 header for `desc_num` descriptors whose
    /// used ring index is `used`; the version goes last.
    fn initialize(&self, desc_num: u16, used: u16) {
        self.set16(VERSION_AT, 0);
        for head in 0..desc_num {
            self.set_inflight(head, false);
            self.set16(self.desc(head, NEXT_AT), 0);
            self.set_counter(head, 0);
        }
        if let Some(a) = self.u64_at(0) {
            a.store(0, Ordering::Release);
        }
        self.set16(DESC_NUM_AT, desc_num);
        self.set16(LAST_BATCH_HEAD_AT, 0);
        self.set16(USED_IDX_AT, used);
        self.set16(VERSION_AT, VERSION);
    }
}

/// Where a ring restarts after recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restart {
    /// The next avail ring entry to take: the used index plus the chains still inflight.
    pub next_avail: u16,
    /// The used ring's index as the guest sees it.
    pub next_used: u16,
    /// Chains to resubmit first.
    pub resubmit: usize,
}

/// One virtqueue's inflight tracking, touched only by the queue's worker (and by the
/// connection when a region is attached or forgotten).
pub struct QueueInflight {
    index: usize,
    region: Option<Arc<InflightRegion>>,
    /// Orders the chains taken (the region's `counter`).
    counter: u64,
    /// Heads to hand to the device before anything new, by increasing counter.
    resubmit: VecDeque<u16>,
    /// Whether the ring was recovered since it last started.
    recovered: bool,
}

impl QueueInflight {
    fn new(index: usize) -> Self {
        QueueInflight {
            index,
            region: None,
            counter: 0,
            resubmit: VecDeque::new(),
            recovered: false,
        }
    }

    fn view(&self) -> Option<QueueView<'_>> {
        self.region.as_deref()?.queue(self.index)
    }

    /// Makes the region right for a ring of `ring_size` entries whose used ring index is
    /// `used`, as the ring starts. `None`: the ring starts where the frontend said (a fresh
    /// region, or one made for another ring size, which is reinitialized). Otherwise the ring
    /// must restart at the returned indices, and [`Self::take_resubmit`] hands out the
    /// chains that were inflight.
    pub fn recover(&mut self, ring_size: u16, used: u16) -> Option<Restart> {
        self.recovered = true;
        self.resubmit.clear();
        let view = self.view()?;
        let desc_num = view.get16(DESC_NUM_AT);
        let version = view.get16(VERSION_AT);
        if version != VERSION || desc_num != ring_size || ring_size > self.region_queue_size() {
            if version != 0 {
                warn!(
                    "queue {}: inflight region version {version} for {desc_num} descriptors \
                     does not fit a ring of {ring_size}: starting it afresh",
                    self.index
                );
            }
            let usable = ring_size.min(self.region_queue_size());
            view.initialize(usable, used);
            self.counter = 0;
            return None;
        }
        let done = view.get16(USED_IDX_AT);
        if done != used {
            // The last batch was published but not cleared: `used - done` chains, linked
            // from `last_batch_head` through `next`. A frontend's garbage stops at an index
            // out of range or after at most `desc_num` steps.
            let batch = used.wrapping_sub(done).min(desc_num);
            let mut head = view.get16(LAST_BATCH_HEAD_AT);
            for _ in 0..batch {
                if head >= desc_num {
                    break;
                }
                view.set_inflight(head, false);
                head = view.get16(view.desc(head, NEXT_AT));
            }
            view.set16(USED_IDX_AT, used);
        }
        let mut inflight: Vec<(u64, u16)> = (0..desc_num)
            .filter(|&h| view.inflight(h))
            .map(|h| (view.counter(h), h))
            .collect();
        inflight.sort_unstable();
        self.counter = inflight.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        self.resubmit = inflight.iter().map(|&(_, h)| h).collect();
        let n = u16::try_from(inflight.len()).unwrap_or(u16::MAX);
        Some(Restart {
            next_avail: used.wrapping_add(n),
            next_used: used,
            resubmit: inflight.len(),
        })
    }

    fn region_queue_size(&self) -> u16 {
        self.region.as_ref().map_or(0, |r| r.queue_size())
    }

    /// The next chain to resubmit, if any is left.
    pub fn take_resubmit(&mut self) -> Option<u16> {
        self.resubmit.pop_front()
    }

    /// Records that chain `head` was taken from the avail ring.
    pub fn taken(&mut self, head: u16) {
        let Some(view) = self.view() else { return };
        if head >= view.get16(DESC_NUM_AT) {
            return;
        }
        view.set_counter(head, self.counter);
        view.set_inflight(head, true);
        self.counter = self.counter.wrapping_add(1);
    }

    /// Before chain `head`'s used entry is published: it becomes the last batch.
    pub fn returning(&mut self, head: u16) {
        let Some(view) = self.view() else { return };
        if head >= view.get16(DESC_NUM_AT) {
            return;
        }
        let last = view.get16(LAST_BATCH_HEAD_AT);
        view.set16(view.desc(head, NEXT_AT), last);
        view.set16(LAST_BATCH_HEAD_AT, head);
    }

    /// After chain `head`'s used entry is published and the used index is `used`.
    pub fn returned(&mut self, head: u16, used: u16) {
        let Some(view) = self.view() else { return };
        if head < view.get16(DESC_NUM_AT) {
            view.set_inflight(head, false);
        }
        view.set16(USED_IDX_AT, used);
    }

    /// Recovers the ring on its first use since it started: reads its used index from guest
    /// memory and moves its indices if the region says so.
    fn recover_ring(&mut self, vring: &VringRwLock, mem: &GuestMemoryMmap) {
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let used = match queue.used_idx(mem, Ordering::Acquire) {
            Ok(u) => u.0,
            Err(e) => {
                warn!("queue {}: cannot read the used index: {e}", self.index);
                self.recovered = true;
                return;
            }
        };
        let base = queue.next_avail();
        let restart = self.recover(queue.size(), used);
        log::debug!(
            "queue {}: ring starts at avail {base}, used {used}; inflight region: {restart:?}",
            self.index
        );
        if let Some(r) = restart {
            queue.set_next_avail(r.next_avail);
            queue.set_next_used(r.next_used);
            if r.resubmit > 0 {
                info!(
                    "queue {}: resubmitting {} requests that were in flight",
                    self.index, r.resubmit
                );
            }
        }
    }
}

/// Every queue's inflight tracking of one export, for the frontend connected now.
pub struct Tracker {
    /// Whether a region is attached: without one, the hot path takes no lock here.
    active: AtomicBool,
    queues: Vec<Mutex<QueueInflight>>,
    /// The guest's write-cache mode, kept in the region with the chains.
    cache: CacheMode,
}

impl Tracker {
    pub fn new(num_queues: u16) -> Tracker {
        Tracker {
            active: AtomicBool::new(false),
            queues: (0..usize::from(num_queues))
                .map(|q| Mutex::new(QueueInflight::new(q)))
                .collect(),
            cache: CacheMode::default(),
        }
    }

    /// The guest's write-cache mode, which lives as long as the frontend's region does.
    #[inline]
    pub fn cache_mode(&self) -> &CacheMode {
        &self.cache
    }

    /// Tracks every queue the region has from now on; each recovers when its ring next
    /// starts.
    pub fn attach(&self, region: Arc<InflightRegion>) {
        self.cache.attach(&region);
        for q in &self.queues {
            let mut q = q.lock();
            q.region = (q.index < usize::from(region.num_queues())).then(|| region.clone());
            q.recovered = false;
            q.resubmit.clear();
        }
        self.active.store(true, Ordering::Release);
    }

    /// Whether a region is attached.
    #[inline]
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Forgets the region (the frontend went away; it keeps the region for the next one).
    pub fn detach(&self) {
        self.active.store(false, Ordering::Release);
        self.cache.detach();
        for q in &self.queues {
            let mut q = q.lock();
            q.region = None;
            q.recovered = false;
            q.resubmit.clear();
        }
    }

    /// Queue `queue` stopped (GET_VRING_BASE): it recovers again when it restarts, so chains
    /// not yet resubmitted stay inflight and are found then.
    pub fn stopped(&self, queue: usize) {
        if let Some(q) = self.queues.get(queue) {
            let mut q = q.lock();
            q.recovered = false;
            q.resubmit.clear();
        }
    }

    /// Queue `queue`'s tracking, locked, if a region covers it. The queue's worker holds it
    /// over a pass (after the queue's own lock).
    #[inline]
    pub fn queue(&self, queue: usize) -> Option<MutexGuard<'_, QueueInflight>> {
        if !self.is_active() {
            return None;
        }
        let q = self.queues.get(queue)?.lock();
        q.region.is_some().then_some(q)
    }
}

/// The next chain head for the device: with a region, a recovering ring's inflight chains
/// first, then the avail ring's, each recorded as taken.
#[inline]
pub fn next_head(
    inflight: Option<&mut QueueInflight>,
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
) -> Option<u16> {
    let Some(q) = inflight else {
        return vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem)
            .map(|c| c.head_index());
    };
    next_tracked_head(q, vring, mem)
}

/// [`next_head`] with a region (apart so that the common case without one inlines small).
fn next_tracked_head(
    q: &mut QueueInflight,
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
) -> Option<u16> {
    if !q.recovered {
        q.recover_ring(vring, mem);
        // The process before may have published used entries and died (or been stopped)
        // before the frontend saw their interrupt: the guest would wait for it forever, with
        // nothing left for this process to complete. An extra interrupt costs nothing.
        if let Err(e) = vring.signal_used_queue() {
            warn!("queue {}: cannot signal the guest: {e}", q.index);
        }
    }
    if let Some(head) = q.take_resubmit() {
        return Some(head);
    }
    let head = vring
        .get_mut()
        .get_queue_mut()
        .pop_descriptor_chain(mem)?
        .head_index();
    q.taken(head);
    Some(head)
}

/// Returns chain `head` to the guest (`len` bytes written), in the order the region needs.
#[inline]
pub fn add_used(
    inflight: Option<&mut QueueInflight>,
    vring: &VringRwLock,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    let Some(q) = inflight else {
        return vring.add_used(head, len);
    };
    add_tracked_used(q, vring, head, len)
}

/// [`add_used`] with a region.
fn add_tracked_used(
    q: &mut QueueInflight,
    vring: &VringRwLock,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    q.returning(head);
    vring.add_used(head, len)?;
    let used = vring.get_ref().get_queue().next_used();
    q.returned(head, used);
    Ok(())
}

#[cfg(test)]
#[path = "inflight_tests.rs"]
mod tests;
