//! INFLIGHT_SHMFD with the `vhost` crate's frontend: requests in flight when `thinblk serve` is
//! killed are resubmitted, exactly those, by the next process the frontend reconnects to,
//! although the killed one completed later requests first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod frontend;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::Daemon;
use frontend::{r, w, Desc, Vm, QUEUE_SIZE};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const INFLIGHT: VhostUserProtocolFeatures = VhostUserProtocolFeatures::INFLIGHT_SHMFD;
const BLOCK: u64 = 64 << 10;
const OK: u8 = VIRTIO_BLK_S_OK as u8;

/// The frontend's copy of the inflight region (QEMU keeps it across backend restarts).
struct Region {
    msg: VhostUserInflight,
    file: File,
}

impl Region {
    /// Asks the backend for a region for one queue and hands it back, as QEMU does at start.
    fn get_and_set(fe: &mut Frontend) -> Region {
        let ask = VhostUserInflight::new(0, 0, 1, QUEUE_SIZE);
        let (msg, file) = fe.get_inflight_fd(&ask).expect("GET_INFLIGHT_FD");
        assert_eq!((msg.num_queues, msg.queue_size), (1, QUEUE_SIZE));
        assert!(msg.mmap_size >= 16 + 16 * u64::from(QUEUE_SIZE));
        fe.set_inflight_fd(&msg, file.as_raw_fd())
            .expect("SET_INFLIGHT_FD");
        Region { msg, file }
    }

    fn set(&self, fe: &mut Frontend) {
        fe.set_inflight_fd(&self.msg, self.file.as_raw_fd())
            .expect("SET_INFLIGHT_FD");
    }

    fn bytes(&self, at: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.file
            .read_exact_at(&mut v, self.msg.mmap_offset + at)
            .unwrap();
        v
    }

    fn used_idx(&self) -> u16 {
        let b = self.bytes(14, 2);
        u16::from_ne_bytes([b[0], b[1]])
    }

    fn inflight(&self, head: u16) -> bool {
        self.bytes(16 + 16 * u64::from(head), 1)[0] == 1
    }

    fn counter(&self, head: u16) -> u64 {
        let b = self.bytes(16 + 16 * u64::from(head) + 8, 8);
        u64::from_ne_bytes(b.try_into().unwrap())
    }
}

/// Puts header, data and status in guest memory; returns the chain and the status address.
fn chain(vm: &mut Vm, kind: u32, sector: u64, data: Desc) -> (Vec<Desc>, u64) {
    let h = vm.alloc(16);
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    vm.put(h, &header);
    let st = vm.alloc(1);
    vm.put(st, &[0xFF]);
    (vec![r(h, 16), data, w(st, 1)], st)
}

/// A write of `bytes` at byte `offset`, not yet kicked: its head and status address.
fn add_write(vm: &mut Vm, offset: u64, bytes: &[u8]) -> (u16, u64) {
    let buf = vm.alloc(bytes.len() as u64);
    vm.put(buf, bytes);
    let (c, st) = chain(
        vm,
        VIRTIO_BLK_T_OUT,
        offset / 512,
        r(buf, bytes.len() as u32),
    );
    (vm.add(0, &c), st)
}

/// A read of `len` bytes at byte `offset`, not yet kicked: its head, status and buffer.
fn add_read(vm: &mut Vm, offset: u64, len: u32) -> (u16, u64, u64) {
    let buf = vm.alloc(u64::from(len));
    let (c, st) = chain(vm, VIRTIO_BLK_T_IN, offset / 512, w(buf, len));
    (vm.add(0, &c), st, buf)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

fn thin_daemon(dir: &Path, socket: &Path) -> Daemon {
    let args: Vec<String> = [
        "--dir",
        &dir.join("pool").display().to_string(),
        "--data-size",
        "256K",
        "--block-size",
        "64K",
        "--export",
        &format!("name=d,size=16M,socket={}", socket.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Daemon::start(&args, &[socket])
}

#[test]
fn requests_in_flight_at_a_kill_are_resubmitted_after_the_reconnect_and_only_they() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("disk.sock");
    let daemon = thin_daemon(dir.path(), &socket);
    let mut region = None;
    let mut vm = Vm::connect_with(&socket, 1, INFLIGHT, &mut |fe| {
        region = Some(Region::get_and_set(fe));
    });
    let region = region.unwrap();
    assert!(vm.negotiated.protocol_features.contains(INFLIGHT));

    // Fill the pool's four data blocks: first writes elsewhere then wait for space.
    for block in 0..4u8 {
        let (_, st) = add_write(&mut vm, u64::from(block) * BLOCK, &pattern(block, 65536));
        vm.kick(0);
        vm.wait_used(0, 1);
        assert_eq!(vm.get(st, 1)[0], OK);
    }
    assert_eq!(region.used_idx(), 4);

    // Taken in this order; the reads finish while the writes wait for space.
    let w1 = pattern(0x40, 4096);
    let w2 = pattern(0x80, 4096);
    let (head_w1, st_w1) = add_write(&mut vm, 4 * BLOCK, &w1);
    let (head_r1, st_r1, _) = add_read(&mut vm, 0, 4096);
    let (head_w2, st_w2) = add_write(&mut vm, 5 * BLOCK, &w2);
    let (head_r2, st_r2, buf_r2) = add_read(&mut vm, BLOCK, 4096);
    vm.kick(0);
    let used: Vec<u32> = vm.wait_used(0, 2).iter().map(|u| u.id).collect();
    let mut reads = vec![u32::from(head_r1), u32::from(head_r2)];
    reads.sort_unstable();
    let mut got = used.clone();
    got.sort_unstable();
    assert_eq!(got, reads, "the reads completed, past the waiting writes");
    assert_eq!((vm.get(st_r1, 1)[0], vm.get(st_r2, 1)[0]), (OK, OK));
    assert_eq!(vm.get(buf_r2, 4096), pattern(1, 4096));
    // What the region says now: the writes inflight, the reads returned, in step with the
    // used ring.
    assert!(region.inflight(head_w1) && region.inflight(head_w2));
    assert!(!region.inflight(head_r1) && !region.inflight(head_r2));
    assert!(region.counter(head_w1) < region.counter(head_w2));
    assert_eq!(region.used_idx(), 6);
    assert_eq!(vm.used_idx(0), 6);

    daemon.kill9();
    assert_eq!(vm.get(st_w1, 1)[0], 0xFF, "never completed");

    // The next backend (a raw file this time, so the writes can finish) gets the region back.
    let image = dir.path().join("disk.raw");
    File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let export = format!("raw={},socket={}", image.display(), socket.display());
    let _daemon = Daemon::start(&["--export".into(), export], &[&socket]);
    vm.reconnect(&socket, INFLIGHT, &mut |fe| region.set(fe));

    let mut resubmitted: Vec<u32> = vm.wait_used(0, 2).iter().map(|u| u.id).collect();
    resubmitted.sort_unstable();
    let mut writes = vec![u32::from(head_w1), u32::from(head_w2)];
    writes.sort_unstable();
    assert_eq!(
        resubmitted, writes,
        "exactly the two writes, without a kick"
    );
    assert_eq!((vm.get(st_w1, 1)[0], vm.get(st_w2, 1)[0]), (OK, OK));
    let mut on_disk = vec![0; 4096];
    let f = File::open(&image).unwrap();
    f.read_exact_at(&mut on_disk, 4 * BLOCK).unwrap();
    assert_eq!(on_disk, w1);
    f.read_exact_at(&mut on_disk, 5 * BLOCK).unwrap();
    assert_eq!(on_disk, w2);
    assert!(!region.inflight(head_w1) && !region.inflight(head_w2));
    assert_eq!(region.used_idx(), 8);

    // New requests go on from the avail ring where the first backend left it.
    let (head, st, buf) = add_read(&mut vm, 5 * BLOCK, 4096);
    vm.kick(0);
    let used = vm.wait_used(0, 1);
    assert_eq!(used[0].id, u32::from(head));
    assert_eq!(vm.get(st, 1)[0], OK);
    assert_eq!(vm.get(buf, 4096), w2);
}

fn raw_daemon(image: &Path, socket: &Path) -> Daemon {
    let export = format!("raw={},socket={}", image.display(), socket.display());
    Daemon::start(&["--export".into(), export], &[socket])
}

/// The `writeback` byte of the config space (1: writeback, 0: write-through).
fn cache_byte(vm: &mut Vm) -> u8 {
    vm.config(32, 1)[0]
}

/// A guest that switched its disk to write-through sends no flushes: the next process must
/// serve it write-through too, although QEMU sends no SET_CONFIG when it reconnects (only the
/// inflight region it kept, and SET_FEATURES again). A new frontend starts from writeback.
#[test]
fn write_through_set_by_the_guest_survives_kills_and_a_new_frontend_gets_writeback() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("disk.sock");
    let image = dir.path().join("disk.raw");
    File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let daemon = raw_daemon(&image, &socket);
    let mut region = None;
    let mut vm = Vm::connect_with(&socket, 1, INFLIGHT, &mut |fe| {
        region = Some(Region::get_and_set(fe));
    });
    let region = region.unwrap();
    assert_eq!(cache_byte(&mut vm), 1, "writeback by default");
    vm.fe
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(cache_byte(&mut vm), 0);
    let acked = vm.acked_features;
    // QEMU sends SET_FEATURES again whenever dirty logging is switched (a migration starts).
    vm.fe.set_features(acked).unwrap();
    assert_eq!(
        cache_byte(&mut vm),
        0,
        "SET_FEATURES keeps the guest's mode"
    );

    let mut daemon = Some(daemon);
    for round in 0..2u8 {
        daemon.take().unwrap().kill9();
        daemon = Some(raw_daemon(&image, &socket));
        // What QEMU sends on a reconnect: the region, SET_FEATURES, the memory and rings.
        vm.reconnect(&socket, INFLIGHT, &mut |fe| {
            region.set(fe);
            fe.set_features(acked).unwrap();
        });
        assert_eq!(
            cache_byte(&mut vm),
            0,
            "write-through after restart {round}"
        );
        let data = pattern(round, 4096);
        let (_, st) = add_write(&mut vm, u64::from(round) * BLOCK, &data);
        vm.kick(0);
        vm.wait_used(0, 1);
        assert_eq!(vm.get(st, 1)[0], OK);
    }

    // The guest switches back; the next process serves writeback again.
    vm.fe
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[1])
        .unwrap();
    daemon.take().unwrap().kill9();
    let _daemon = raw_daemon(&image, &socket);
    vm.reconnect(&socket, INFLIGHT, &mut |fe| region.set(fe));
    assert_eq!(
        cache_byte(&mut vm),
        1,
        "writeback, as the guest last set it"
    );
    vm.fe
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();

    // A new VM on the same export: its own region, the default mode.
    drop(vm);
    let mut fresh = Vm::connect_with(&socket, 1, INFLIGHT, &mut |fe| {
        Region::get_and_set(fe);
    });
    assert_eq!(
        cache_byte(&mut fresh),
        1,
        "a new frontend starts from writeback"
    );
}

#[test]
fn a_region_that_could_shrink_under_the_backend_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("disk.sock");
    let _daemon = thin_daemon(dir.path(), &socket);
    let mut fe = Frontend::connect(&socket, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let offered = fe.get_protocol_features().unwrap();
    assert!(offered.contains(INFLIGHT));
    fe.set_protocol_features(INFLIGHT | VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    fe.set_features(features).unwrap();
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    // SAFETY: a fresh fd.
    let file = unsafe { File::from_raw_fd(fd) };
    let size = 16 + 16 * u64::from(QUEUE_SIZE) + 48;
    file.set_len(size).unwrap();
    let msg = VhostUserInflight::new(size, 0, 1, QUEUE_SIZE);
    assert!(fe.set_inflight_fd(&msg, file.as_raw_fd()).is_err());
}
