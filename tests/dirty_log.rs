//! Dirty logging for live migration, driven by the `vhost` crate's frontend (the code
//! cloud-hypervisor uses): SET_LOG_BASE with a sealed memfd as QEMU sends it, VHOST_F_LOG_ALL
//! acked and the used rings logged, then requests; the log must hold exactly the pages thinblk
//! wrote into guest memory (read data, GET_ID, status bytes, the used ring), and nothing while
//! logging is off. A hostile log (short, unsealed, not a file, too small for the memory) is
//! refused without harm to the daemon. What logging costs is measured in the bench suite
//! (`cargo bench --bench vhost_blk -- --suite --sections dirtylog`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod frontend;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;

use common::{pattern, raw_export, scratch, Daemon, Scratch};
use frontend::logging::{log_memfd, qd32, set_log, start_logging, LOG_ALL, LOG_BYTES, PAGE};
use frontend::{r, w, Desc, Vm};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
#[allow(unused_imports)]
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

const DISK: u64 = 16 << 20;

/// The daemon must stop before the scratch directory goes (see tests/vhost_frontend.rs).
struct Served {
    _daemon: Daemon,
    s: Scratch,
}

fn serve() -> Served {
    let s = scratch(DISK);
    std::fs::write(&s.image, pattern(7, 0, DISK as usize)).unwrap();
    let daemon = Daemon::start(&raw_export(&s, ",id=migrating"), &[&s.socket]);
    Served { s, _daemon: daemon }
}

impl Served {
    fn connect(&self) -> Vm {
        Vm::connect_with(
            &self.s.socket,
            1,
            VhostUserProtocolFeatures::LOG_SHMFD,
            &mut |_| {},
        )
    }
}

/// The guest pages whose bits are set in `log`; clears them (as QEMU's sync does).
fn take_dirty(log: &File) -> BTreeSet<u64> {
    let mut bytes = vec![0u8; LOG_BYTES as usize];
    log.read_exact_at(&mut bytes, 0).unwrap();
    log.write_all_at(&vec![0u8; LOG_BYTES as usize], 0).unwrap();
    let mut pages = BTreeSet::new();
    for (i, b) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.insert(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

fn pages_of(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
    gpa / PAGE..(gpa + len).div_ceil(PAGE)
}

/// One request: header, `data`, status; returns the status byte and the pages the device
/// may write (the writable buffers and the status byte).
fn request(vm: &mut Vm, kind: u32, sector: u64, data: &[Desc]) -> (u8, BTreeSet<u64>) {
    let h = vm.alloc(16);
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    vm.put(h, &hdr);
    let st = vm.alloc(1);
    let chain: Vec<Desc> = [r(h, 16)]
        .into_iter()
        .chain(data.iter().copied())
        .chain([w(st, 1)])
        .collect();
    let (_, used) = vm.run(0, &[&chain]);
    assert_eq!(used.len(), 1);
    let mut written: BTreeSet<u64> = pages_of(st, 1).collect();
    for d in data.iter().filter(|d| d.writable) {
        written.extend(pages_of(d.addr, u64::from(d.len)));
    }
    (vm.get(st, 1)[0], written)
}

fn used_ring_pages(vm: &Vm) -> BTreeSet<u64> {
    // Flags, index, 256 elements, avail_event: everything the device may write there.
    pages_of(vm.used_ring(0), 4 + 8 * 256 + 2).collect()
}

#[test]
fn reads_mark_exactly_the_pages_thinblk_wrote() {
    let d = serve();
    let mut vm = d.connect();
    // A worker that looked at the ring when it started polls for `poll-us` and then writes
    // the used ring's avail_event as it re-enables notifications: a write the log rightly
    // marks if logging is on by then (1 run in 5 failed here without this wait).
    std::thread::sleep(std::time::Duration::from_millis(100));
    let log = start_logging(&mut vm);
    assert_eq!(take_dirty(&log), BTreeSet::new(), "nothing written yet");

    // A read into two buffers, one of them crossing a page boundary.
    let a = vm.alloc(3 * PAGE);
    let b = vm.alloc(PAGE);
    let data = [w(a + PAGE / 2, 2 * PAGE as u32), w(b, 512)];
    let (status, mut expected) = request(&mut vm, VIRTIO_BLK_T_IN, 8, &data);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(
        vm.get(a + PAGE / 2, 2 * PAGE as usize),
        pattern(7, 8 * 512, 2 * PAGE as usize),
        "the read landed"
    );
    expected.extend(used_ring_pages(&vm));
    assert_eq!(
        take_dirty(&log),
        expected,
        "pages of the read, its status, the used ring"
    );

    // GET_ID writes through vm-memory, a write only its status.
    let id = vm.alloc(20);
    let (status, mut expected) = request(&mut vm, VIRTIO_BLK_T_GET_ID, 0, &[w(id, 20)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    let src = vm.alloc(PAGE);
    let (status, more) = request(&mut vm, VIRTIO_BLK_T_OUT, 0, &[r(src, PAGE as u32)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert!(!more.contains(&(src / PAGE)));
    expected.extend(more);
    expected.extend(used_ring_pages(&vm));
    assert_eq!(
        take_dirty(&log),
        expected,
        "GET_ID's buffer and both status bytes"
    );
}

#[test]
fn nothing_is_marked_while_logging_is_off() {
    let d = serve();
    let mut vm = d.connect();
    // The log is mapped but LOG_ALL not acked: as before migration starts.
    let log = log_memfd(LOG_BYTES, true);
    set_log(&vm, &log, LOG_BYTES, 0).unwrap();
    let buf = vm.alloc(PAGE);
    let (status, _) = request(&mut vm, VIRTIO_BLK_T_IN, 0, &[w(buf, PAGE as u32)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert!(take_dirty(&log).is_empty(), "LOG_ALL not acked");

    // On, then off again (a cancelled migration): nothing after the off is marked.
    vm.fe.set_features(vm.acked_features | LOG_ALL).unwrap();
    let (_, written) = request(&mut vm, VIRTIO_BLK_T_IN, 0, &[w(buf, PAGE as u32)]);
    assert!(take_dirty(&log).is_superset(&written));
    vm.fe.set_features(vm.acked_features).unwrap();
    // What the worker wrote just after the last request (EVENT_IDX's avail_event) was logged
    // before the off, if at all.
    take_dirty(&log);
    let (status, _) = request(&mut vm, VIRTIO_BLK_T_IN, 0, &[w(buf, PAGE as u32)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert!(take_dirty(&log).is_empty(), "LOG_ALL dropped");
}

/// After a refused log message the session is gone; the daemon serves the next one.
fn still_serves(d: &Served) {
    let mut vm = d.connect();
    let buf = vm.alloc(512);
    let (status, _) = request(&mut vm, VIRTIO_BLK_T_IN, 1, &[w(buf, 512)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(vm.get(buf, 512), pattern(7, 512, 512));
}

#[test]
fn hostile_logs_are_refused_and_the_daemon_lives_on() {
    let d = serve();
    let sealed = |len| log_memfd(len, true);
    let cases: Vec<(&str, File, u64, u64)> = vec![
        ("file shorter than the log", sealed(PAGE), LOG_BYTES, 0),
        (
            "offset past the file",
            sealed(LOG_BYTES),
            LOG_BYTES,
            1 << 40,
        ),
        (
            "offset + size wraps",
            sealed(LOG_BYTES),
            LOG_BYTES,
            u64::MAX - PAGE + 1,
        ),
        ("log too small for the memory", sealed(PAGE), PAGE, 0),
        ("log of zero bytes", sealed(LOG_BYTES), 0, 0),
        (
            "memfd that can shrink",
            log_memfd(LOG_BYTES, false),
            LOG_BYTES,
            0,
        ),
        (
            "directory",
            File::open(d.s.dir.path()).unwrap(),
            LOG_BYTES,
            0,
        ),
    ];
    for (what, file, size, offset) in cases {
        let vm = d.connect();
        assert!(
            set_log(&vm, &file, size, offset).is_err(),
            "{what}: SET_LOG_BASE accepted"
        );
        drop(vm);
        still_serves(&d);
    }
}

/// QEMU sends SET_VRING_ADDR again, with the used ring logged, to rings that run requests
/// when a migration starts (and without, when it ends). vhost-user-backend's handler then
/// re-reads the used index from guest memory and sets it as the ring's next used index, apart
/// from the worker adding used entries: a completion added in between is overwritten and the
/// guest waits forever. Toggled here while QD32 reads run; every one must complete.
#[test]
fn the_used_ring_log_toggled_on_a_busy_ring_loses_no_completion() {
    let d = serve();
    let mut vm = d.connect();
    let log = log_memfd(LOG_BYTES, true);
    set_log(&vm, &log, LOG_BYTES, 0).unwrap();
    vm.fe.set_features(vm.acked_features | LOG_ALL).unwrap();
    let used = vm.used_ring(0);
    let (on, off) = (vm.ring_config(0, Some(used)), vm.ring_config(0, None));
    let fe = vm.fe.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let toggler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                fe.set_vring_addr(0, if n.is_multiple_of(2) { &on } else { &off })
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    let limit = std::time::Duration::from_millis(1500);
    let (done, _, stalled) = qd32(&mut vm, VIRTIO_BLK_T_IN, DISK, limit);
    assert!(
        !stalled,
        "a chain was not used within {:?}",
        frontend::logging::STALL
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let toggles = toggler.join().unwrap();
    assert!(done > 0 && toggles > 0);
}

/// The race above made certain. What lost a completion was the handler taking the used index
/// from guest memory while the worker was ahead of it; here guest memory holds a stale index
/// when the repeated SET_VRING_ADDR arrives (as it does inside that window): a running ring
/// must keep its own, so the next completion lands after the ones before.
#[test]
fn a_repeated_ring_address_keeps_the_running_rings_used_index() {
    let d = serve();
    let mut vm = d.connect();
    let buf = vm.alloc(512);
    for sector in 0..3 {
        let (status, _) = request(&mut vm, VIRTIO_BLK_T_IN, sector, &[w(buf, 512)]);
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    }
    let used_idx_at = vm.used_ring(0) + 2;
    let now = vm.used_idx(0);
    assert_eq!(now, 3);
    vm.put(used_idx_at, &0u16.to_le_bytes());
    vm.set_ring_log(0, None).unwrap();
    vm.put(used_idx_at, &now.to_le_bytes());
    let (status, _) = request(&mut vm, VIRTIO_BLK_T_IN, 1, &[w(buf, 512)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(vm.used_idx(0), now + 1);
    assert_eq!(vm.get(buf, 512), pattern(7, 512, 512));
}

#[test]
fn a_used_ring_log_address_elsewhere_is_refused() {
    let d = serve();
    let mut vm = d.connect();
    let log = log_memfd(LOG_BYTES, true);
    set_log(&vm, &log, LOG_BYTES, 0).unwrap();
    let wrong = vm.used_ring(0) + PAGE;
    assert!(vm.set_ring_log(0, Some(wrong)).is_err());
    drop(vm);
    still_serves(&d);
}
