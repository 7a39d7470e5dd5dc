//! The dirty log of guest memory, for live migration (`VHOST_F_LOG_ALL`,
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! While a frontend migrates its guest, it copies guest memory in passes and must learn which
//! pages the device wrote since it copied them. It hands over a log (SET_LOG_BASE: a sealed memfd
//! with one bit per 4 KiB page of guest physical memory) and acks `VHOST_F_LOG_ALL`; from then
//! on, every page the device writes gets its bit set, atomically, after the bytes landed.
//!
//! The log itself is vhost-user-backend's: its handler maps the fd (`MmapLogReg`) and gives
//! each region a view of it (`AtomicBitmapMmap`) through [`BitmapReplace`]. [`GuestLog`] is
//! the per-region bitmap vm-memory calls on every write it makes (the used ring through
//! virtio-queue, GET_ID, status bytes): it forwards to the crate's `BitmapMmapRegion` only
//! while the frontend has `VHOST_F_LOG_ALL` acked, so a log left mapped after a cancelled
//! migration stops being written (the crate's handler keeps logging; see its TODO), and when
//! no log is on a write costs one relaxed load. Its slices borrow it instead of cloning an
//! `Arc` as the crate's type does, so the many small guest memory accesses of the hot path
//! touch no shared reference count.
//!
//! Reads are different: the device's I/O queue fills guest buffers through raw iovecs, which
//! vm-memory never sees. [`mark_device_writes`] marks those buffers when the request completes,
//! before its used ring entry is published; a daemon-wide count of logging connections keeps
//! that to one relaxed load per request while nobody migrates.
//!
//! What the frontend sends is checked in `frontend_checks.rs`: the log fd must lie within its
//! file and be sealed against shrinking (QEMU's is), so touching it can never raise SIGBUS;
//! the handler refuses a log too small for the memory table; guest regions must start on a
//! log page, as the crate's page arithmetic assumes.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserLog;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::memory_table::{self, Proposed, RegionError, UnsealedMemory};
use super::request::{Op, Segment, Segments};

/// Guest memory as thinblk maps it: vm-memory's mapping with the dirty log as its bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<GuestLog>;
/// A virtqueue over that memory.
pub type VringRwLock =
    vhost_user_backend::VringRwLock<vm_memory::GuestMemoryAtomic<GuestMemoryMmap>>;

/// The page size of the vhost-user log: one bit per 4 KiB of guest physical memory.
pub const LOG_PAGE: u64 = 4096;
/// The virtio feature bit a frontend acks to turn logging on (`VHOST_F_LOG_ALL`).
pub const LOG_ALL: u64 = 1 << 26;

/// Connections of this daemon that have logging on: while zero, completions skip marking.
static LOGGING: AtomicUsize = AtomicUsize::new(0);

/// One guest memory region's dirty log bitmap.
#[derive(Clone, Debug, Default)]
pub struct GuestLog {
    state: Arc<RegionLog>,
}

#[derive(Debug, Default)]
struct RegionLog {
    /// The frontend acked `VHOST_F_LOG_ALL`.
    logging: AtomicBool,
    /// The frontend's log as the crate maps it; empty until SET_LOG_BASE.
    log: BitmapMmapRegion,
}

impl GuestLog {
    fn set_logging(&self, on: bool) {
        self.state.logging.store(on, Ordering::Release);
    }
}

impl Bitmap for GuestLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.state.logging.load(Ordering::Relaxed) {
            // Whatever was written before this store is visible before its bit is.
            fence(Ordering::Release);
            self.state.log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.state.log.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> GuestLogSlice<'_> {
        GuestLogSlice { log: self, offset }
    }
}

impl<'a> WithBitmapSlice<'a> for GuestLog {
    type S = GuestLogSlice<'a>;
}

impl NewBitmap for GuestLog {
    fn with_len(_len: usize) -> Self {
        GuestLog::default()
    }
}

impl BitmapReplace for GuestLog {
    type InnerBitmap = AtomicBitmapMmap;

    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.state.log.replace(bitmap);
    }
}

/// A part of a region's bitmap, from `offset` bytes into the region.
#[derive(Clone, Copy, Debug)]
pub struct GuestLogSlice<'a> {
    log: &'a GuestLog,
    offset: usize,
}

impl Bitmap for GuestLogSlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(at) = self.offset.checked_add(offset) {
            self.log.mark_dirty(at, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.offset
            .checked_add(offset)
            .is_some_and(|at| self.log.dirty_at(at))
    }

    fn slice_at(&self, offset: usize) -> Self {
        GuestLogSlice {
            log: self.log,
            offset: self.offset.saturating_add(offset),
        }
    }
}

impl<'b> WithBitmapSlice<'b> for GuestLogSlice<'_> {
    type S = Self;
}

impl BitmapSlice for GuestLogSlice<'_> {}

/// Whether one connection's frontend has `VHOST_F_LOG_ALL` acked; applied to every region of
/// the memory table it is given. Dropping it (or turning it off) stops the logging.
#[derive(Debug, Default)]
pub struct LogSwitch {
    on: AtomicBool,
}

impl LogSwitch {
    /// After SET_FEATURES: logging follows `LOG_ALL` in `features`, on every region of `mem`.
    pub fn set_features(&self, features: u64, mem: Option<&GuestMemoryMmap>) {
        let on = features & LOG_ALL != 0;
        if let Some(mem) = mem {
            apply(mem, on);
        }
        if self.on.swap(on, Ordering::AcqRel) != on {
            if on {
                LOGGING.fetch_add(1, Ordering::AcqRel);
            } else {
                LOGGING.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// After a new memory table: its regions log as the ones before did.
    pub fn memory_changed(&self, mem: &GuestMemoryMmap) {
        apply(mem, self.on.load(Ordering::Acquire));
    }

    /// The frontend went away.
    pub fn off(&self) {
        self.set_features(0, None);
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }
}

impl Drop for LogSwitch {
    fn drop(&mut self) {
        self.off();
    }
}

fn apply(mem: &GuestMemoryMmap, on: bool) {
    for region in mem.iter() {
        // The region's own bitmap (vm-memory's trait method gives a slice of it).
        let map: &vm_memory::MmapRegion<GuestLog> = region;
        map.bitmap().set_logging(on);
    }
}

/// The buffers a request has the device fill through raw iovecs (a read's data): kept with
/// the request until it completes, when they are marked.
pub fn device_writes(op: Op, data: Segments) -> Segments {
    if op == Op::Read {
        data
    } else {
        Segments::new()
    }
}

/// Marks the pages of `writes` dirty in the log of `mem`'s regions if logging is on. Call it
/// after the device wrote them and before the request's used ring entry is published.
///
/// Inlined down to the check: it runs for every completion, and logging is rarely on.
#[inline]
pub fn mark_device_writes(mem: &GuestMemoryMmap, writes: &[Segment]) {
    if writes.is_empty() || LOGGING.load(Ordering::Relaxed) == 0 {
        return;
    }
    mark_segments(mem, writes);
}

/// Kept out of line so that the check above stays small where it is inlined.
#[inline(never)]
fn mark_segments(mem: &GuestMemoryMmap, writes: &[Segment]) {
    for s in writes {
        mark_range(mem, s.addr, s.len);
    }
}

/// Marks `len` bytes from `addr`, across regions; bytes outside guest memory are skipped
/// (framing already refused such buffers).
fn mark_range(mem: &GuestMemoryMmap, mut addr: GuestAddress, mut len: u64) {
    while len > 0 {
        let Some(region) = mem.find_region(addr) else {
            return;
        };
        let offset = addr.unchecked_offset_from(region.start_addr());
        let n = len.min(region.len().saturating_sub(offset));
        if n == 0 {
            return;
        }
        if let (Ok(o), Ok(l)) = (usize::try_from(offset), usize::try_from(n)) {
            region.bitmap().mark_dirty(o, l);
        }
        let Some(next) = addr.checked_add(n) else {
            return;
        };
        addr = next;
        len -= n;
    }
}

/// Whether every region starts on a log page: the log's page arithmetic counts pages from
/// each region's start, so a region that does not would be logged one page off.
pub fn regions_on_log_pages(starts: impl IntoIterator<Item = u64>) -> bool {
    starts.into_iter().all(|g| g % LOG_PAGE == 0)
}

/// The log a frontend gave last (SET_LOG_BASE), kept so that regions mapped after it (a new
/// memory table while logging, which QEMU sends without a new log unless the log must grow)
/// log into it too.
#[derive(Default)]
pub struct LogBase {
    last: Option<(VhostUserLog, File)>,
}

/// Why a log is refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0}")]
    File(#[from] RegionError),
    #[error("a guest memory region does not start on a {LOG_PAGE}-byte log page")]
    Unaligned,
    #[error("cannot keep the log fd: {0}")]
    Dup(std::io::Error),
}

impl LogBase {
    /// Checks a log before it is mapped: it must lie within its file and the file must not be
    /// able to shrink (a memfd sealed with `F_SEAL_SHRINK`, as QEMU's is, or one that can
    /// still be sealed and is sealed here), so that no access to it can raise SIGBUS; the
    /// regions of `region_starts` must start on log pages.
    pub fn check(
        log: &VhostUserLog,
        file: &File,
        region_starts: impl IntoIterator<Item = u64>,
    ) -> Result<(), LogError> {
        let whole = Proposed {
            guest: 0,
            size: log.mmap_size,
            user: 0,
            offset: log.mmap_offset,
        };
        memory_table::check(whole, file.as_fd(), UnsealedMemory::Refuse)?;
        if !regions_on_log_pages(region_starts) {
            return Err(LogError::Unaligned);
        }
        Ok(())
    }

    /// Remembers the log the handler accepted (`file`: a duplicate of its fd).
    pub fn keep(&mut self, log: &VhostUserLog, file: File) {
        self.last = Some((*log, file));
    }

    /// The last log again, for regions mapped since, if there is one.
    pub fn again(&self) -> Option<Result<(VhostUserLog, File), LogError>> {
        let (log, file) = self.last.as_ref()?;
        Some(file.try_clone().map(|f| (*log, f)).map_err(LogError::Dup))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use vhost_user_backend::bitmap::MemRegionBitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;

    /// A memory table of `pages` pages at guest 0, in two regions that log into a fresh log;
    /// returns the memory and the log's file.
    fn logged_memory(pages: u64) -> (GuestMemoryMmap, File) {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), (pages / 2 * LOG_PAGE) as usize),
            (
                GuestAddress(pages / 2 * LOG_PAGE),
                (pages / 2 * LOG_PAGE) as usize,
            ),
        ])
        .unwrap();
        // SAFETY: memfd_create with a static name; the fd is owned by the File from here on.
        let fd = unsafe { libc::memfd_create(c"test-log".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(pages.div_ceil(8)).unwrap();
        let logmem = Arc::new(
            vhost_user_backend::bitmap::MmapLogReg::from_file(file.as_fd(), 0, pages.div_ceil(8))
                .unwrap(),
        );
        for region in mem.iter() {
            let b = AtomicBitmapMmap::new(region, logmem.clone()).unwrap();
            let map: &vm_memory::MmapRegion<GuestLog> = region;
            map.bitmap().replace(b);
        }
        (mem, file)
    }

    fn bits(file: &File) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn writes_are_logged_only_while_log_all_is_acked() {
        let (mem, log) = logged_memory(16);
        let switch = LogSwitch::default();
        mem.write_obj(1u8, GuestAddress(3 * LOG_PAGE)).unwrap();
        assert_eq!(bits(&log), vec![0, 0], "mapped but LOG_ALL not acked");
        switch.set_features(LOG_ALL, Some(&mem));
        mem.write_obj(1u8, GuestAddress(3 * LOG_PAGE)).unwrap();
        mem.write_obj(1u8, GuestAddress(9 * LOG_PAGE + 17)).unwrap();
        assert_eq!(bits(&log), vec![1 << 3, 1 << 1]);
        switch.set_features(0, Some(&mem));
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        assert_eq!(
            bits(&log),
            vec![1 << 3, 1 << 1],
            "LOG_ALL dropped: no more bits"
        );
    }

    #[test]
    fn device_writes_across_a_region_boundary_mark_every_page_they_touch() {
        let (mem, log) = logged_memory(16);
        let switch = LogSwitch::default();
        let read = [Segment {
            addr: GuestAddress(7 * LOG_PAGE + 100),
            len: 2 * LOG_PAGE,
        }];
        mark_device_writes(&mem, &read);
        assert_eq!(bits(&log), vec![0, 0], "logging off");
        switch.set_features(LOG_ALL, Some(&mem));
        mark_device_writes(&mem, &read);
        assert_eq!(bits(&log), vec![1 << 7, 0b11]);
    }

    /// What logging adds per request, in nanoseconds: marking a 4 KiB read buffer, and a
    /// one-byte store through vm-memory (a status byte; a used ring entry is two such writes).
    /// A measurement, not a check: `cargo test --release --lib dirty_log -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "a measurement; run by hand with --ignored --nocapture"]
    fn cost_of_marking_per_request() {
        const PAGES: u64 = 1 << 16;
        const N: u64 = 2_000_000;
        let (mem, _log) = logged_memory(PAGES);
        let switch = LogSwitch::default();
        let time = |what: &str| {
            let started = std::time::Instant::now();
            let mut page = 1u64;
            for _ in 0..N {
                page = (page * 48271) % (PAGES - 1);
                let seg = [Segment {
                    addr: GuestAddress(page * LOG_PAGE),
                    len: LOG_PAGE,
                }];
                mark_device_writes(&mem, std::hint::black_box(&seg));
                mem.write_obj(0u8, GuestAddress(page * LOG_PAGE + 7))
                    .unwrap();
            }
            let ns = started.elapsed().as_nanos() as f64 / N as f64;
            println!("DIRTY-LOG-COST {what}: {ns:.1} ns per request (4 KiB buffer + status byte)");
        };
        time("off");
        switch.set_features(LOG_ALL, Some(&mem));
        time("on");
    }

    #[test]
    fn only_reads_keep_their_buffers() {
        let segs: Segments = [Segment {
            addr: GuestAddress(0),
            len: 512,
        }]
        .into_iter()
        .collect();
        assert_eq!(device_writes(Op::Read, segs.clone()).len(), 1);
        assert!(device_writes(Op::Write, segs).is_empty());
    }
}
