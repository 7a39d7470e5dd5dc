//! Guest memory in a memfd that the test maps too, and just enough of a split virtqueue driver
//! to put one request on queue 0 and see it come back.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::wire::*;

pub const GUEST: u64 = 0x1_0000_0000;
/// Where the (pretend) frontend process has the memory mapped.
pub const USER: u64 = 0x7f00_0000_0000;
pub const SIZE: u64 = 4 << 20;
pub const QUEUE: u32 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x1_1000;
const STATUS: u64 = 0x1_3000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;

/// A memfd of `len` bytes, sealable or not.
pub fn memfd(len: u64, sealable: bool) -> File {
    let flags = if sealable { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: a NUL-terminated name; the result is a fresh fd we then own.
    let fd = unsafe { libc::memfd_create(c"hostile-guest".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is fresh and owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a fresh fd we then own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: fd is fresh and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A blocking eventfd, as libblkio creates them.
pub fn blocking_eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a fresh fd we then own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: fd is fresh and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe fills two fresh fds we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// The guest memory: one memfd region, mapped here as well.
pub struct Guest {
    pub file: File,
    base: *mut u8,
}

impl Guest {
    /// In a sealable memfd, as QEMU's memory-backend-memfd.
    pub fn new() -> Guest {
        Guest::with_file(memfd(SIZE, true))
    }

    /// In `file`, which is made `SIZE` bytes long.
    pub fn with_file(file: File) -> Guest {
        file.set_len(SIZE).unwrap();
        // SAFETY: a fresh shared mapping of the whole memfd; unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        Guest {
            file,
            base: base as *mut u8,
        }
    }

    /// Where the request header, data and status of [`Guest::submit`] begin: truncating the
    /// file here keeps the rings and loses the request's buffers.
    pub const BUFFERS: u64 = HEADER;

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn region(&self) -> RegionMsg {
        RegionMsg {
            guest: GUEST,
            size: SIZE,
            user: USER,
            offset: 0,
        }
    }

    fn put(&self, at: u64, bytes: &[u8]) {
        assert!(at + bytes.len() as u64 <= SIZE);
        // SAFETY: within the mapping (checked above); the daemon does not use these bytes
        // while the test writes them (the request is not yet published).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(at as usize), bytes.len())
        };
    }

    fn get(&self, at: u64, len: usize) -> Vec<u8> {
        assert!(at + len as u64 <= SIZE);
        let mut v = vec![0u8; len];
        // SAFETY: within the mapping; volatile-free copy is fine for a test that only reads
        // after the daemon published the used entry.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(at as usize), v.as_mut_ptr(), len) };
        v
    }

    fn desc(&self, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.put(DESC + 16 * i, &d);
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: an aligned u16 inside the mapping, written by the daemon: read volatile.
        unsafe { std::ptr::read_volatile(self.base.add((USED + 2) as usize) as *const u16) }
    }

    /// The rings' addresses as the frontend sees them (SET_VRING_ADDR).
    pub fn ring_addr(&self) -> Vec<u8> {
        vring_addr(0, USER + DESC, USER + USED, USER + AVAIL)
    }

    /// Queue 0 set up (as [`Guest::set_up_queue`]) with its available ring on top of its used
    /// ring and a used index `QUEUE` ahead of the base: every used index the device writes is
    /// then an available index a queue ahead of the device, and the heads it reads are the ids
    /// it wrote (chain 0, which is malformed and comes back at once). The ring refills itself
    /// for as long as the device serves it, without the guest doing anything.
    pub fn set_up_self_refilling_queue(&self, w: &mut Wire, kick: RawFd, call: RawFd) {
        self.put(USED + 2, &(QUEUE as u16).to_le_bytes());
        w.ok(SET_MEM_TABLE, &mem_table(&[self.region()]), &[self.fd()]);
        w.ok(SET_VRING_NUM, &vring_state(0, QUEUE), &[]);
        w.ok(SET_VRING_BASE, &vring_state(0, 0), &[]);
        w.ok(
            SET_VRING_ADDR,
            &vring_addr(0, USER + DESC, USER + USED, USER + USED),
            &[],
        );
        w.ok(SET_VRING_KICK, &u64_payload(0), &[kick]);
        w.ok(SET_VRING_CALL, &u64_payload(0), &[call]);
        w.ok(SET_VRING_ENABLE, &vring_state(0, 1), &[]);
    }

    /// The used index the device last wrote.
    pub fn device_used_idx(&self) -> u16 {
        self.used_idx()
    }

    /// Mem table, then queue 0 of `QUEUE` entries with the given kick and call fds, enabled.
    pub fn set_up_queue(&self, w: &mut Wire, kick: RawFd, call: RawFd) {
        w.ok(SET_MEM_TABLE, &mem_table(&[self.region()]), &[self.fd()]);
        w.ok(SET_VRING_NUM, &vring_state(0, QUEUE), &[]);
        w.ok(SET_VRING_BASE, &vring_state(0, 0), &[]);
        w.ok(SET_VRING_ADDR, &self.ring_addr(), &[]);
        w.ok(SET_VRING_KICK, &u64_payload(0), &[kick]);
        w.ok(SET_VRING_CALL, &u64_payload(0), &[call]);
        w.ok(SET_VRING_ENABLE, &vring_state(0, 1), &[]);
    }

    /// Puts request number `n` (0, 1, ...) of type `kind` on queue 0 at `sector`, with `data`
    /// (written for T_OUT, the length read for T_IN) and returns once it is published.
    pub fn submit(&self, n: u16, kind: u32, sector: u64, data: &mut [u8]) {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.put(HEADER, &h);
        self.put(STATUS, &[0xff]);
        if kind == T_OUT {
            self.put(DATA, data);
        }
        self.desc(0, GUEST + HEADER, 16, F_NEXT, 1);
        if data.is_empty() {
            self.desc(1, GUEST + STATUS, 1, F_WRITE, 0);
        } else {
            let flags = if kind == T_IN {
                F_NEXT | F_WRITE
            } else {
                F_NEXT
            };
            self.desc(1, GUEST + DATA, data.len() as u32, flags, 2);
            self.desc(2, GUEST + STATUS, 1, F_WRITE, 0);
        }
        let slot = u64::from(n % QUEUE as u16);
        self.put(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.put(AVAIL + 2, &(n.wrapping_add(1)).to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until request number `n` is used; returns its status byte and, for T_IN, the
    /// data. `None` if it never completes in time.
    pub fn complete(&self, n: u16, len: usize) -> Option<(u8, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx() != n.wrapping_add(1) {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Some((self.get(STATUS, 1)[0], self.get(DATA, len)))
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.base as *mut libc::c_void, SIZE as usize) };
    }
}

pub fn kick(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an fd the caller owns.
    let n = unsafe { libc::write(fd, one.as_ptr() as *const libc::c_void, 8) };
    assert_eq!(n, 8, "kick");
}
