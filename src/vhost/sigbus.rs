//! Survives a frontend that truncates its guest memory file after the daemon mapped it.
//!
//! Memory a frontend cannot shrink (a memfd sealed with `F_SEAL_SHRINK`) is safe, but libblkio's
//! memfds cannot be sealed and QEMU's `memory-backend-file` is a plain file: after such a file is
//! truncated, the daemon's next access to a page past the new end raises SIGBUS, which would
//! end the whole process and every export with it. So:
//! - every guest memory mapping's host range is registered here, in a fixed table that a
//!   signal handler can read without locks or allocation ([`Table::register`], [`Table::release_owner`]);
//! - a SIGBUS at an address inside a registered range (and only a `BUS_ADRERR`, the code of an
//!   access past the end of a file mapping) replaces the page there with anonymous zero memory
//!   (`mmap` with `MAP_FIXED`, an async-signal-safe system call), marks the range poisoned and
//!   returns: the faulting access is retried and succeeds on the new page;
//! - the connection that owns the range sees the mark ([`Table::poisoned`]) and ends its session, so
//!   only that frontend loses its disk.
//!
//! Any other SIGBUS is a real bug: the handler puts the previous disposition back and returns,
//! the fault repeats and ends the process as it would have without this module.
//!
//! Only file mappings raise `BUS_ADRERR`, and the daemon maps no file but guest memory (vm-memory
//! for the vhost-user regions; the io_uring rings are anonymous-inode mappings, the engines use
//! read/write and no mmap), so a range can be trusted to be guest memory while it is registered.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Registered ranges at most, over all connections. Each region of a frontend's memory table
/// takes one (QEMU sends up to 8, or up to the 509 slots of GET_MAX_MEM_SLOTS with
/// ADD_MEM_REG), so 32 frontends could use every slot at once; a region that finds the table
/// full is refused rather than mapped untracked. 16384 slots of 32 bytes: 512 KiB of zeroed
/// static memory, scanned only on memory messages, on a SIGBUS and when one was caught.
pub const SLOTS: usize = 16384;

/// `owner` of a free slot.
const FREE: u64 = 0;
/// `owner` of a slot being filled in or emptied: the handler skips it.
const BUSY: u64 = u64::MAX;

struct Slot {
    owner: AtomicU64,
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to fill the table below
const EMPTY: Slot = Slot {
    owner: AtomicU64::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    poisoned: AtomicBool::new(false),
};

/// A fixed set of slots; [`TABLE`] is the daemon's, tests make small ones.
pub struct Table<const N: usize> {
    slots: [Slot; N],
}

impl<const N: usize> Table<N> {
    pub const fn new() -> Self {
        Table { slots: [EMPTY; N] }
    }
}

impl<const N: usize> Default for Table<N> {
    fn default() -> Self {
        Self::new()
    }
}

static TABLE: Table<SLOTS> = Table::new();
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);
/// SIGBUS faults caught so far: a connection scans the table for its mark only when this
/// changed since it last looked.
static CAUGHT: AtomicU64 = AtomicU64::new(0);
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS disposition before ours, put back for a fault that is not in guest memory.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// The table is full: the region cannot be tracked, so it must not be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFull;

impl std::fmt::Display for TableFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "all {SLOTS} guest memory slots of the daemon are in use")
    }
}

impl std::error::Error for TableFull {}

/// A new owner id (one per connection); never [`FREE`] or [`BUSY`].
pub fn new_owner() -> u64 {
    NEXT_OWNER.fetch_add(1, Ordering::Relaxed)
}

/// A slot taken for a range that is about to be mapped; fill it in with [`Reserved::set`].
/// Dropping it unset frees it again.
pub struct Reserved<'t, const N: usize> {
    table: &'t Table<N>,
    index: usize,
    owner: u64,
    set: bool,
}

impl<const N: usize> Table<N> {
    /// Takes a free slot for `owner`.
    pub fn reserve(&self, owner: u64) -> Result<Reserved<'_, N>, TableFull> {
        for (index, slot) in self.slots.iter().enumerate() {
            if slot
                .owner
                .compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(Reserved {
                    table: self,
                    index,
                    owner,
                    set: false,
                });
            }
        }
        Err(TableFull)
    }

    /// Registers one range for `owner` (a reserve and set in one).
    pub fn register(&self, owner: u64, start: usize, len: usize) -> Result<usize, TableFull> {
        Ok(self.reserve(owner)?.set(start, len))
    }

    /// Frees slot `index` if `owner` holds it.
    pub fn unregister(&self, owner: u64, index: usize) {
        if let Some(slot) = self.slots.get(index) {
            if slot
                .owner
                .compare_exchange(owner, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.start.store(0, Ordering::Relaxed);
                slot.len.store(0, Ordering::Relaxed);
                slot.poisoned.store(false, Ordering::Relaxed);
                slot.owner.store(FREE, Ordering::Release);
            }
        }
    }

    /// Frees every slot of `owner`.
    pub fn release_owner(&self, owner: u64) {
        for index in 0..N {
            self.unregister(owner, index);
        }
    }

    /// Whether `owner` has a range registered that holds `addr`.
    pub fn holds(&self, owner: u64, addr: usize) -> bool {
        self.matches(addr)
            .any(|(slot, _, _)| slot.owner.load(Ordering::Acquire) == owner)
    }

    /// Whether a SIGBUS hit one of `owner`'s ranges. Scans the table: callers that poll check
    /// [`caught`] first.
    pub fn poisoned(&self, owner: u64) -> bool {
        self.slots
            .iter()
            .any(|s| s.owner.load(Ordering::Acquire) == owner && s.poisoned.load(Ordering::Acquire))
    }

    /// The registered range holding `addr`, as (slot, start, len). Ranges of live mappings
    /// never overlap; an entry of an unmapped region is kept until its owner ends (see
    /// `guest_memory_guard.rs`), so if its addresses were mapped again for another region the
    /// first match is taken: the page is replaced all the same, and the poison mark may reach
    /// the older owner, which costs that frontend its session, never the daemon.
    fn lookup(&self, addr: usize) -> Option<(&Slot, usize, usize)> {
        self.matches(addr).next()
    }

    /// Every registered range holding `addr`.
    fn matches(&self, addr: usize) -> impl Iterator<Item = (&Slot, usize, usize)> {
        self.slots.iter().filter_map(move |slot| {
            let owner = slot.owner.load(Ordering::Acquire);
            if owner == FREE || owner == BUSY {
                return None;
            }
            let start = slot.start.load(Ordering::Relaxed);
            let len = slot.len.load(Ordering::Relaxed);
            (addr >= start && addr - start < len).then_some((slot, start, len))
        })
    }
}

impl<const N: usize> Reserved<'_, N> {
    /// Publishes the range `start..start + len` as the owner's guest memory; returns the slot
    /// index for [`Table::unregister`].
    pub fn set(mut self, start: usize, len: usize) -> usize {
        let slot = &self.table.slots[self.index];
        slot.start.store(start, Ordering::Relaxed);
        slot.len.store(len, Ordering::Relaxed);
        slot.poisoned.store(false, Ordering::Relaxed);
        // Release: a handler that sees the owner sees the range.
        slot.owner.store(self.owner, Ordering::Release);
        self.set = true;
        self.index
    }
}

impl<const N: usize> Drop for Reserved<'_, N> {
    fn drop(&mut self) {
        if !self.set {
            self.table.slots[self.index]
                .owner
                .store(FREE, Ordering::Release);
        }
    }
}

/// How many SIGBUS faults in guest memory were caught so far; see [`Table::poisoned`].
pub fn caught() -> u64 {
    CAUGHT.load(Ordering::Acquire)
}

/// The daemon's table, which the SIGBUS handler reads.
pub fn table() -> &'static Table<SLOTS> {
    &TABLE
}

/// Installs the SIGBUS handler once for the process.
pub fn install() -> std::io::Result<()> {
    static RESULT: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = RESULT.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(page) = usize::try_from(page) {
            if page.is_power_of_two() {
                PAGE_SIZE.store(page, Ordering::Relaxed);
            }
        }
        // SAFETY: an all-zero sigaction is a valid value to be filled in below.
        let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
        ours.sa_sigaction = on_sigbus as *const () as usize;
        // SA_ONSTACK: Rust gives each thread an alternate signal stack; use it when there.
        ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sa_mask is ours to initialise.
        unsafe { libc::sigemptyset(&mut ours.sa_mask) };
        // SAFETY: as above, filled in by sigaction below.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // Read the previous disposition first so the handler never runs without it.
        // SAFETY: a null new action only reads the current one into `previous`.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) } != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        let _ = PREVIOUS.set(previous);
        // SAFETY: `ours` is a valid action whose handler is async-signal-safe (see on_sigbus).
        if unsafe { libc::sigaction(libc::SIGBUS, &ours, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        Ok(())
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

/// The handler. Async-signal-safe: it reads atomics, calls mmap and sigaction, and nothing
/// else (no allocation, no locks, no logging).
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The interrupted code may be between a system call and its read of errno: keep it.
    // SAFETY: __errno_location returns this thread's errno, valid for the thread's lifetime.
    let errno = unsafe { *libc::__errno_location() };
    handle(sig, info, ctx);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

fn handle(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t; si_addr is valid for SIGBUS.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR {
        if let Some((_, start, len)) = TABLE.lookup(addr) {
            if replace_with_zeros(addr, start, len) {
                // A stale entry may hold the address too (see `Table::lookup`): mark them all,
                // so that the connection the memory belongs to now is among them.
                for (slot, _, _) in TABLE.matches(addr) {
                    slot.poisoned.store(true, Ordering::Release);
                }
                CAUGHT.fetch_add(1, Ordering::Release);
                return;
            }
        }
    }
    // Not guest memory: put back the disposition from before (Rust's own handler, which tells
    // a stack overflow from other faults, or the default); the fault repeats under it.
    let restored = match PREVIOUS.get() {
        Some(prev) => {
            // SAFETY: sigaction is async-signal-safe; `prev` is the disposition saved at install.
            let rc = unsafe { libc::sigaction(libc::SIGBUS, prev, std::ptr::null_mut()) };
            rc == 0
        }
        None => false,
    };
    if !restored {
        // SAFETY: signal() with SIG_DFL only changes the disposition.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }
}

/// Maps anonymous zero memory over the page at `addr`, or over the whole range if the page
/// cannot be replaced alone (a hugetlbfs mapping only splits at its huge page size).
fn replace_with_zeros(addr: usize, start: usize, len: usize) -> bool {
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    let page_start = addr & !(page - 1);
    map_zeros(page_start, page) || map_zeros(start, len)
}

fn map_zeros(at: usize, len: usize) -> bool {
    // SAFETY: MAP_FIXED replaces only pages of a registered guest memory mapping (the caller
    // checked the range), which the daemon reads and writes through volatile accesses only;
    // the new pages are readable and writable as the old ones were.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    p as usize == at
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};

    use super::*;

    #[test]
    fn ranges_are_found_while_registered_and_only_then() {
        let t = Table::<8>::new();
        let a = t.register(1, 0x1000_0000, 0x2000).unwrap();
        let b = t.register(1, 0x2000_0000, 0x1000).unwrap();
        assert_ne!(a, b);
        assert!(t
            .lookup(0x1000_1fff)
            .is_some_and(|(_, s, l)| s == 0x1000_0000 && l == 0x2000));
        assert!(t.lookup(0x1000_2000).is_none());
        assert!(t.lookup(0x0fff_ffff).is_none());
        t.unregister(1, a);
        assert!(t.lookup(0x1000_0000).is_none());
        // Another owner cannot free what it does not hold.
        t.unregister(2, b);
        assert!(t.lookup(0x2000_0000).is_some());
        t.release_owner(1);
        assert!(t.lookup(0x2000_0000).is_none());
        assert!(!t.poisoned(1));
    }

    #[test]
    fn a_stale_entry_and_a_new_one_for_the_same_addresses_both_match() {
        let t = Table::<8>::new();
        t.register(1, 0x1000_0000, 0x4000).unwrap();
        t.register(2, 0x1000_2000, 0x1000).unwrap();
        assert_eq!(t.matches(0x1000_2800).count(), 2);
        for (slot, _, _) in t.matches(0x1000_2800) {
            slot.poisoned.store(true, Ordering::Release);
        }
        assert!(t.poisoned(1) && t.poisoned(2));
        t.release_owner(1);
        assert!(!t.poisoned(1) && t.poisoned(2));
    }

    #[test]
    fn a_full_table_refuses_and_frees_on_release() {
        let t = Table::<4>::new();
        for i in 0..4 {
            t.register(7, 0x7000_0000 + i * 0x1000, 0x1000).unwrap();
        }
        assert_eq!(t.reserve(8).err(), Some(TableFull));
        assert_eq!(t.register(8, 0x9000_0000, 0x1000), Err(TableFull));
        t.release_owner(7);
        // A reservation dropped before it was set gives its slot back.
        let slots: Vec<_> = (0..4).map(|_| t.reserve(8).unwrap()).collect();
        assert!(t.reserve(8).is_err());
        drop(slots);
        assert!(t.lookup(0x7000_0000).is_none());
        t.register(8, 0x7000_0000, 0x1000).unwrap();
        assert!(t.lookup(0x7000_0000).is_some());
    }

    fn memfd(len: usize) -> File {
        // SAFETY: memfd_create with a NUL-terminated name returns a new fd we then own.
        let fd = unsafe { libc::memfd_create(c"sigbus-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len as u64).unwrap();
        f
    }

    #[test]
    fn a_truncated_registered_mapping_reads_zeros_and_is_poisoned() {
        install().unwrap();
        let len = 4 * PAGE_SIZE.load(Ordering::Relaxed);
        let f = memfd(len);
        // SAFETY: a fresh shared mapping of our own memfd, unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as usize;
        let owner = new_owner();
        table().register(owner, base, len).unwrap();
        let before = caught();
        f.set_len(0).unwrap();
        let last = (base + len - 1) as *mut u8;
        // SAFETY: the page is mapped; the handler replaces it when the access faults.
        unsafe {
            assert_eq!(std::ptr::read_volatile(last), 0);
            std::ptr::write_volatile(last, 7);
            assert_eq!(std::ptr::read_volatile(last), 7);
        }
        assert!(table().poisoned(owner));
        assert!(caught() > before, "the serve loops are told to look");
        table().release_owner(owner);
        assert!(!table().poisoned(owner));
        // SAFETY: our mapping, no longer used.
        assert_eq!(unsafe { libc::munmap(p, len) }, 0);
    }
}
