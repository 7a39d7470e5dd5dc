//! Dirty logging as QEMU turns it on at migration start (SET_LOG_BASE with a sealed memfd,
//! VHOST_F_LOG_ALL, the used ring logged), and a QD32 load of 4 KiB requests: shared by
//! tests/dirty_log.rs and the bench suite's dirty-logging section (benches/vhost_blk).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

use super::{r, w, Vm, GUEST_BASE, GUEST_SIZE};

pub const PAGE: u64 = 4096;
pub const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
/// Log bytes that cover all of the test guest's memory: one bit per page up to its end.
pub const LOG_BYTES: u64 = (GUEST_BASE + GUEST_SIZE) / PAGE / 8;
/// Requests one connection of [`qd32`] runs at most: past the avail index's wrap (65536) the
/// driver (or the device) loses a chain (a known, separate problem).
pub const MAX_REQUESTS: u64 = 60_000;

/// A memfd of `len` bytes, sealed against shrinking and growing as QEMU seals its log.
pub fn log_memfd(len: u64, seal: bool) -> File {
    let flags = libc::MFD_CLOEXEC | if seal { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"test-vhost-log".as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    if seal {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a descriptor we own.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }, 0);
    }
    file
}

pub fn set_log(vm: &Vm, file: &File, size: u64, offset: u64) -> vhost::Result<()> {
    vm.fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: offset,
            mmap_handle: file.as_raw_fd(),
        }),
    )
}

/// Starts logging as QEMU does at migration start: the log, LOG_ALL, the used ring logged.
pub fn start_logging(vm: &mut Vm) -> File {
    let log = log_memfd(LOG_BYTES, true);
    set_log(vm, &log, LOG_BYTES, 0).unwrap();
    vm.fe.set_features(vm.acked_features | LOG_ALL).unwrap();
    let used = vm.used_ring(0);
    vm.set_ring_log(0, Some(used)).unwrap();
    log
}

/// How long a batch may take before `qd32` calls it stalled.
pub const STALL: Duration = Duration::from_secs(10);

/// 4 KiB random reads (`kind` VIRTIO_BLK_T_IN) or writes at queue depth 32 on queue 0 of a
/// disk of `disk` bytes, for `limit` or [`MAX_REQUESTS`] requests, whichever comes first;
/// returns the requests done, the seconds they took, and whether a batch stalled: a chain
/// not used within [`STALL`] ends the run there (a lost completion never comes; a batch on
/// a busy machine can take well over a second).
pub fn qd32(vm: &mut Vm, kind: u32, disk: u64, limit: Duration) -> (u64, f64, bool) {
    const DEPTH: usize = 32;
    let slots: Vec<(u64, u64, u64)> = (0..DEPTH)
        .map(|_| (vm.alloc(16), vm.alloc(PAGE), vm.alloc(1)))
        .collect();
    let mut rng = 0x2545F4914F6CDD1Du64;
    // Everything earlier on the queue is used: the used index counts from here.
    let base = vm.used_idx(0);
    let started = Instant::now();
    let mut done = 0u64;
    let mut last = started;
    while started.elapsed() < limit && done + DEPTH as u64 <= MAX_REQUESTS {
        for &(h, buf, st) in &slots {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let sector = (rng % (disk / PAGE)) * 8;
            let mut hdr = [0u8; 16];
            hdr[..4].copy_from_slice(&kind.to_le_bytes());
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
            vm.put(h, &hdr);
            let data = if kind == VIRTIO_BLK_T_IN {
                w(buf, PAGE as u32)
            } else {
                r(buf, PAGE as u32)
            };
            vm.add(0, &[r(h, 16), data, w(st, 1)]);
        }
        vm.kick(0);
        // Watch the used index rather than sleep on the call eventfd: a batch's interrupt can
        // come seconds late on a busy machine (see tests/dirty_log.rs), which would measure
        // that, not the device. `wait_used` then only collects the entries.
        let want = base.wrapping_add((done + DEPTH as u64) as u16);
        let deadline = Instant::now() + STALL;
        while vm.used_idx(0) != want && Instant::now() < deadline {
            std::thread::yield_now();
        }
        if vm.used_idx(0) != want {
            eprintln!(
                "qd32: a chain was not used: {}",
                vm.ring_state(0, DEPTH as u16)
            );
            return (done, (last - started).as_secs_f64(), true);
        }
        vm.wait_used(0, DEPTH as u16);
        done += DEPTH as u64;
        last = Instant::now();
    }
    (done, (last - started).as_secs_f64(), false)
}
