//! The guest flips its disk's write cache while first writes are in flight (issue 13).
//!
//! Before the I/O seam moved into the engine, the queue worker flushed a write-through write
//! itself when its completion arrived; on a thin disk that flush is a commit, which waits for
//! a grace period on the tickets of the other requests in the same worker's ring, which only
//! that worker could reap: the queue, first writes to every other disk of the pool and
//! snapshots all hung for good. Now the flush runs on the queue's blocking thread and the
//! worker goes on reaping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod frontend;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{pattern, Daemon, Qmp};
use frontend::{r, w, Vm};
use serde_json::json;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};

const DISK: u64 = 128 << 20;
const BLOCK: u64 = 64 << 10;
/// Requests in flight when the cache flips: a Linux guest's fio at iodepth 32.
const DEPTH: usize = 32;
const ROUNDS: u64 = 40;
/// The test frontend's rings misbehave past about 128 chains per connection (on the code
/// before this change too): start a new connection before that.
const CHAINS_PER_CONNECTION: u64 = 96;
/// Far more than any round takes; a hang shows as this passing.
const DEADLINE: Duration = Duration::from_secs(90);
const WRITEBACK: u32 = 32;
/// How long one round, or one write of the other disk, may take.
const STEP_DEADLINE: Duration = Duration::from_secs(20);

struct Pool {
    _dir: tempfile::TempDir,
    daemon: Option<Daemon>,
    root: PathBuf,
    control: PathBuf,
}

fn pool() -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pool");
    let control = dir.path().join("control.sock");
    let mut args: Vec<String> = [
        "--dir",
        root.to_str().unwrap(),
        "--metadata-size",
        "32M",
        "--data-size",
        "1G",
        "--control",
        control.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // No polling: the worker sleeps between a submission and its completions, which is when
    // the frontend's config write lands.
    for name in ["a", "b"] {
        args.push("--export".into());
        args.push(format!("name={name},size={DISK},poll-us=0"));
    }
    let (a, b) = (root.join("a.sock"), root.join("b.sock"));
    let daemon = Daemon::start(&args, &[&a, &b, &control]);
    Pool {
        _dir: dir,
        daemon: Some(daemon),
        root,
        control,
    }
}

/// Waits until queue 0's used index reaches `target`, looking at it rather than waiting for
/// interrupts: what is asserted is that requests complete, whatever the notifications do.
fn wait_used_idx(vm: &Vm, target: u16) {
    let deadline = std::time::Instant::now() + STEP_DEADLINE;
    while vm.used_idx(0) != target {
        assert!(
            std::time::Instant::now() < deadline,
            "used index {} after {STEP_DEADLINE:?}, expected {target}",
            vm.used_idx(0)
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn set_writeback(vm: &mut Vm, on: bool) {
    vm.fe
        .set_config(WRITEBACK, VhostUserConfigFlags::WRITABLE, &[u8::from(on)])
        .unwrap();
}

/// `DEPTH` first writes (4 KiB into fresh 64 KiB blocks) per round; each round flips the
/// cache to write-through right after the kick, while they are in flight, then back.
fn flip_under_load(socket: &Path) {
    for first in (0..ROUNDS).step_by((CHAINS_PER_CONNECTION / DEPTH as u64) as usize) {
        let last = (first + CHAINS_PER_CONNECTION / DEPTH as u64).min(ROUNDS);
        flip_rounds(socket, first..last);
    }
}

fn flip_rounds(socket: &Path, rounds: std::ops::Range<u64>) {
    let mut vm = Vm::connect(socket, 1);
    let data = vm.alloc(4096);
    vm.put(data, &pattern(7, 0, 4096));
    let slots: Vec<(u64, u64)> = (0..DEPTH).map(|_| (vm.alloc(16), vm.alloc(1))).collect();
    for round in rounds {
        for (i, &(hdr, status)) in slots.iter().enumerate() {
            let block = round * DEPTH as u64 + i as u64;
            let sector = (block * BLOCK + 4096) / 512;
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            vm.put(hdr, &h);
            vm.put(status, &[0xFF]);
            vm.add(0, &[r(hdr, 16), r(data, 4096), w(status, 1)]);
        }
        let target = vm.used_idx(0).wrapping_add(DEPTH as u16);
        vm.kick(0);
        set_writeback(&mut vm, false);
        wait_used_idx(&vm, target);
        for &(_, status) in &slots {
            assert_eq!(vm.get(status, 1)[0], VIRTIO_BLK_S_OK as u8, "round {round}");
        }
        set_writeback(&mut vm, true);
    }
}

/// First writes to another disk of the pool, and snapshots, for as long as `busy` says.
fn other_disk_and_snapshots(socket: &Path, control: &Path, busy: &AtomicBool) -> u64 {
    let mut qmp = Qmp::connect(control);
    let mut done = 0u64;
    while busy.load(Ordering::Acquire) && done < DISK / BLOCK {
        done += other_disk_writes(socket, &mut qmp, done, busy);
    }
    done
}

fn other_disk_writes(socket: &Path, qmp: &mut Qmp, from: u64, busy: &AtomicBool) -> u64 {
    let mut vm = Vm::connect(socket, 1);
    let data = vm.alloc(4096);
    vm.put(data, &pattern(9, 0, 4096));
    let (hdr, status) = (vm.alloc(16), vm.alloc(1));
    let mut done = from;
    while busy.load(Ordering::Acquire) && done < DISK / BLOCK && done < from + CHAINS_PER_CONNECTION
    {
        let sector = done * BLOCK / 512;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        vm.put(hdr, &h);
        let target = vm.used_idx(0).wrapping_add(1);
        vm.add(0, &[r(hdr, 16), r(data, 4096), w(status, 1)]);
        vm.kick(0);
        wait_used_idx(&vm, target);
        assert_eq!(vm.get(status, 1)[0], VIRTIO_BLK_S_OK as u8);
        if done.is_multiple_of(16) {
            let name = format!("snap{done}");
            qmp.ok("thin-snapshot", json!({"device": "a", "name": name}));
        }
        done += 1;
    }
    done - from
}

#[test]
fn flipping_the_write_cache_with_first_writes_in_flight_never_blocks_the_pool() {
    let mut p = pool();
    let (tx, rx) = mpsc::channel();
    let busy = Arc::new(AtomicBool::new(true));
    let a = p.root.join("a.sock");
    let flipper = {
        let tx = tx.clone();
        let busy = busy.clone();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(|| flip_under_load(&a));
            busy.store(false, Ordering::Release);
            let _ = tx.send(("flips", outcome.map(|()| 0)));
        })
    };
    let (b, control) = (p.root.join("b.sock"), p.control.clone());
    let other = std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(|| other_disk_and_snapshots(&b, &control, &busy));
        let _ = tx.send(("other disk", outcome));
    });
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut others_writes = None;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((who, Ok(n))) => {
                if who == "other disk" {
                    others_writes = Some(n);
                }
            }
            Ok((who, Err(e))) => {
                // A hung daemon ignores SIGTERM: kill it so that the test ends.
                if let Some(d) = p.daemon.take() {
                    d.kill9();
                }
                std::panic::resume_unwind(Box::new(format!("{who} failed: {e:?}")));
            }
            Err(_) => {
                if let Some(d) = p.daemon.take() {
                    d.kill9();
                }
                panic!("the pool hung: requests did not complete within {DEADLINE:?}");
            }
        }
    }
    flipper.join().unwrap();
    other.join().unwrap();
    assert!(
        others_writes.unwrap_or(0) > 0,
        "the other disk wrote nothing"
    );
}
