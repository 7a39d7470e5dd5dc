//! `thin-mirror` end to end in one daemon: a thin device written over its NBD export while
//! it is mirrored into another thin device's NBD export of the same daemon (standing in for
//! another host's), then switched over with `job-complete`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, Qmp};
use serde_json::{json, Value};
use thinblk::engine::memory::MemoryDevice;
use thinblk::engine::{BlockDevice, BlockError, Bufs, BufsMut};
use thinblk::nbd::client::NbdClient;
use thinblk::nbd::{NbdAddr, NbdExport, NbdServer};

const SIZE: u64 = 32 << 20;
const PIECE: u64 = 64 << 10;

fn setup(d: &Path) -> (Daemon, Qmp, String) {
    let nbd = d.join("nbd.sock");
    let control = d.join("control.sock");
    let args: Vec<String> = vec![
        "--dir".into(),
        d.display().to_string(),
        "--data-size".into(),
        "512M".into(),
        "--nbd".into(),
        nbd.display().to_string(),
    ];
    let daemon = Daemon::start(&args, &[&nbd, &control]);
    let mut qmp = Qmp::connect(&control);
    for name in ["src", "dst"] {
        qmp.ok("thin-create", json!({"name": name, "size": SIZE}));
        qmp.ok(
            "nbd-server-add",
            json!({"device": name, "name": name, "writable": true}),
        );
    }
    (daemon, qmp, nbd.display().to_string())
}

/// A daemon with thin disk `src` exported over vhost-user at `vm.sock`, its NBD server at
/// `nbd.sock` with the empty thin disk `dst` exported writable as `dst`: (daemon, QMP, NBD
/// socket, vhost socket).
fn guest_setup(d: &Path) -> (Daemon, Qmp, PathBuf, PathBuf) {
    let (nbd, control, vm) = (
        d.join("nbd.sock"),
        d.join("control.sock"),
        d.join("vm.sock"),
    );
    let args: Vec<String> = vec![
        "--dir".into(),
        d.display().to_string(),
        "--data-size".into(),
        "512M".into(),
        "--export".into(),
        format!("name=src,size={SIZE},socket={}", vm.display()),
        "--nbd".into(),
        nbd.display().to_string(),
    ];
    let daemon = Daemon::start(&args, &[&nbd, &control, &vm]);
    let mut qmp = Qmp::connect(&control);
    qmp.ok("thin-create", json!({"name": "dst", "size": SIZE}));
    qmp.ok(
        "nbd-server-add",
        json!({"device": "dst", "name": "dst", "writable": true}),
    );
    (daemon, qmp, nbd, vm)
}

fn uri(sock: &str, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={sock}")
}

fn piece(seed: u64) -> Vec<u8> {
    (0..PIECE)
        .map(|i| (seed * 7 + i / 4096) as u8 | 1)
        .collect()
}

/// Writes piece `i` at its slot and records it in the model.
fn write(c: &NbdClient, model: &Mutex<Vec<u8>>, slot: u64, seed: u64) {
    let data = piece(seed);
    c.write(slot * PIECE, &data).unwrap();
    let at = (slot * PIECE) as usize;
    model.lock().unwrap()[at..at + PIECE as usize].copy_from_slice(&data);
}

fn read_all(c: &NbdClient) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(4 << 20) {
        out.extend(c.read(off, 4 << 20).unwrap());
    }
    out
}

fn mapped(qmp: &mut Qmp, name: &str) -> u64 {
    let devs = qmp.ok("query-thin-devices", json!({}));
    let d: &Value = devs
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap();
    d["mapped-bytes"].as_u64().unwrap()
}

fn wait_for(qmp: &mut Qmp, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = qmp.ok("query-block-jobs", json!({}));
        if f(&jobs) {
            return jobs;
        }
        assert!(Instant::now() < deadline, "never {what}: {jobs}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_thin_disk_written_meanwhile_mirrors_and_switches_over() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, mut qmp, sock) = setup(dir.path());
    let src = Arc::new(NbdClient::connect_uri(&uri(&sock, "src"), 8).unwrap());
    let model = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    // A quarter of the disk has data before the mirror starts.
    for slot in (0..SIZE / PIECE).filter(|s| s % 4 == 1) {
        write(&src, &model, slot, slot);
    }
    // A writer goes on during the first pass and after.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (src, model, stop) = (src.clone(), model.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let slot = (n * 37 + 11) % (SIZE / PIECE);
                write(&src, &model, slot, 1000 + n);
                n += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            n
        })
    };
    qmp.ok(
        "thin-mirror",
        json!({"job-id": "m", "device": "src", "target": uri(&sock, "dst"), "sync": "full"}),
    );
    let dup = qmp.exec(
        "thin-mirror",
        json!({"job-id": "m2", "device": "src", "target": uri(&sock, "dst"), "sync": "full"}),
    );
    assert!(dup.get("error").is_some(), "{dup}");
    let jobs = wait_for(&mut qmp, "ready", |j| j[0]["ready"] == true);
    assert_eq!(jobs[0]["type"], "mirror");
    // The device cannot go or change size under its mirror.
    for (cmd, args) in [
        ("thin-delete", json!({"name": "src", "force": true})),
        ("block-resize", json!({"device": "src", "size": 2 * SIZE})),
    ] {
        let r = qmp.exec(cmd, args);
        assert!(
            r["error"]["desc"].as_str().unwrap().contains("mirrored"),
            "{r}"
        );
    }
    assert_eq!(jobs[0]["device"], "m");
    // Writes while ready are mirrored too.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert!(writes > 10, "only {writes} writes during the mirror");
    write(&src, &model, 3, 77);
    qmp.ok("job-complete", json!({"id": "m"}));
    wait_for(&mut qmp, "done", |j| j.as_array().unwrap().is_empty());
    // The source takes no writes after the switchover.
    assert!(src.write(0, &piece(5)).is_err());
    let dst = NbdClient::connect_uri(&uri(&sock, "dst"), 8).unwrap();
    let want = model.lock().unwrap().clone();
    assert!(read_all(&src) == want, "the source differs from the model");
    assert!(read_all(&dst) == want, "the target differs from the source");
    // Holes stayed holes: the target maps what the source maps.
    assert_eq!(mapped(&mut qmp, "dst"), mapped(&mut qmp, "src"));
    assert!(mapped(&mut qmp, "dst") < SIZE);
}

#[test]
fn an_incremental_mirror_copies_only_what_changed_since_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, mut qmp, sock) = setup(dir.path());
    let src = NbdClient::connect_uri(&uri(&sock, "src"), 8).unwrap();
    let model = Mutex::new(vec![0u8; SIZE as usize]);
    for slot in 0..8 {
        write(&src, &model, slot, slot);
    }
    // The target gets the base by a full mirror, stopped without switchover.
    qmp.ok(
        "thin-mirror",
        json!({"job-id": "full", "device": "src", "target": uri(&sock, "dst"), "sync": "full"}),
    );
    wait_for(&mut qmp, "ready", |j| j[0]["ready"] == true);
    qmp.ok("block-job-cancel", json!({"device": "full"}));
    wait_for(&mut qmp, "done", |j| j.as_array().unwrap().is_empty());
    qmp.ok("thin-snapshot", json!({"device": "src", "name": "base"}));
    write(&src, &model, 100, 100);
    write(&src, &model, 2, 200);
    qmp.ok(
        "thin-mirror",
        json!({"job-id": "inc", "device": "src", "target": uri(&sock, "dst"),
               "sync": "incremental", "base": "base"}),
    );
    let jobs = wait_for(&mut qmp, "ready", |j| j[0]["ready"] == true);
    qmp.ok("block-job-cancel", json!({"device": "inc"}));
    wait_for(&mut qmp, "done", |j| j.as_array().unwrap().is_empty());
    let dst = NbdClient::connect_uri(&uri(&sock, "dst"), 8).unwrap();
    assert!(read_all(&dst) == *model.lock().unwrap());
    // The first pass counts the whole device, as QEMU's len does (unchanged runs are
    // counted without being copied); by ready every byte counted was done.
    let len = jobs[0]["len"].as_u64().unwrap();
    assert!(len >= SIZE, "{jobs}");
    assert_eq!(jobs[0]["offset"], jobs[0]["len"], "{jobs}");
    // The source still takes writes: a cancel is no switchover.
    src.write(0, &piece(9)).unwrap();
}

/// The same through a guest's path: vhost-user-blk writes (libblkio) during the mirror go
/// through the export's queue wrapper, and after the switchover the guest's writes fail.
#[test]
fn guest_writes_over_vhost_are_mirrored_and_refused_after_switchover() {
    use common::Client;
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, mut qmp, nbd, vm) = guest_setup(dir.path());
    let sock = nbd.display().to_string();
    let mut guest = Client::connect(&vm, 1);
    let mut model = vec![0u8; SIZE as usize];
    let mut put = |guest: &mut Client, slot: u64, seed: u64| -> i32 {
        let data = piece(seed);
        guest.buf()[..PIECE as usize].copy_from_slice(&data);
        let p = guest.buf_ptr(0);
        let r = common::write(&mut guest.queues[0], p, slot * PIECE, PIECE as usize);
        if r == 0 {
            let at = (slot * PIECE) as usize;
            model[at..at + PIECE as usize].copy_from_slice(&data);
        }
        r
    };
    for slot in (0..SIZE / PIECE).filter(|s| s % 4 == 1) {
        assert_eq!(put(&mut guest, slot, slot), 0);
    }
    qmp.ok(
        "thin-mirror",
        json!({"job-id": "g", "device": "src", "target": uri(&sock, "dst"), "sync": "full"}),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0u64;
    loop {
        let slot = (n * 37 + 11) % (SIZE / PIECE);
        assert_eq!(put(&mut guest, slot, 2000 + n), 0);
        n += 1;
        if n.is_multiple_of(5) {
            let jobs = qmp.ok("query-block-jobs", json!({}));
            if jobs[0]["ready"] == true && n > 20 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "never ready");
    }
    for i in 0..5 {
        assert_eq!(put(&mut guest, 7 + i, 3000 + i), 0);
    }
    qmp.ok("job-complete", json!({"id": "g"}));
    wait_for(&mut qmp, "done", |j| j.as_array().unwrap().is_empty());
    assert_ne!(
        put(&mut guest, 0, 1),
        0,
        "a guest write after the switchover"
    );
    let dst = NbdClient::connect_uri(&uri(&sock, "dst"), 8).unwrap();
    let src = NbdClient::connect_uri(&uri(&sock, "src"), 8).unwrap();
    assert!(read_all(&src) == model, "the source differs from the model");
    assert!(
        read_all(&dst) == model,
        "the target differs from the source"
    );
    assert_eq!(mapped(&mut qmp, "dst"), mapped(&mut qmp, "src"));
}

/// Once the job is ready, the mirror is write-blocking: a write the source acknowledged is
/// on the target already. Checked at once after each write, on both write paths: NBD (the
/// node's synchronous writes) and a vhost-user guest (its queue, completion held until the
/// copy is done).
#[test]
fn once_ready_an_acknowledged_write_is_already_on_the_target() {
    use common::Client;
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, mut qmp, nbd, vm) = guest_setup(dir.path());
    // The vhost export's device is on the NBD server already, read-only: writable instead.
    qmp.ok("nbd-server-remove", json!({"name": "src"}));
    qmp.ok(
        "nbd-server-add",
        json!({"device": "src", "name": "src", "writable": true}),
    );
    let sock = nbd.display().to_string();
    let mut guest = Client::connect(&vm, 1);
    let src = NbdClient::connect_uri(&uri(&sock, "src"), 8).unwrap();
    let dst = NbdClient::connect_uri(&uri(&sock, "dst"), 8).unwrap();
    for slot in (0..SIZE / PIECE).filter(|s| s % 3 == 0) {
        src.write(slot * PIECE, &piece(slot)).unwrap();
    }
    // The target by its export name: this daemon's own NBD server.
    qmp.ok(
        "thin-mirror",
        json!({"job-id": "w", "device": "src", "target": "dst", "sync": "full"}),
    );
    wait_for(&mut qmp, "ready", |j| j[0]["ready"] == true);
    for n in 0..40u64 {
        let slot = (n * 13 + 5) % (SIZE / PIECE);
        let data = piece(5000 + n);
        if n % 2 == 0 {
            guest.buf()[..PIECE as usize].copy_from_slice(&data);
            let p = guest.buf_ptr(0);
            assert_eq!(
                common::write(&mut guest.queues[0], p, slot * PIECE, PIECE as usize),
                0
            );
        } else {
            src.write(slot * PIECE, &data).unwrap();
        }
        // No wait: the acknowledgement means both sides have it.
        assert!(
            dst.read(slot * PIECE, PIECE as u32).unwrap() == data,
            "write {n} (slot {slot}) acknowledged but not on the target"
        );
    }
    let jobs = qmp.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["ready"], true, "{jobs}");
    qmp.ok("job-complete", json!({"id": "w"}));
    wait_for(&mut qmp, "done", |j| j.as_array().unwrap().is_empty());
    assert!(read_all(&src) == read_all(&dst), "the target differs");
}

/// Reads QMP events on a connection of its own until `name` comes (or `limit` passes).
fn wait_event(control: &Path, name: &str, limit: Duration) -> Value {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(control).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    w.write_all(br#"{"execute": "qmp_capabilities"}"#).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        assert!(Instant::now() < deadline, "no {name} event");
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["event"] == name {
            return v;
        }
    }
}

/// A target that fails once the mirror is write-blocking fails the job; the guest's write
/// that met the failure, and those after, still succeed on the source.
#[test]
fn a_target_error_once_ready_fails_the_job_not_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, mut qmp, sock) = setup(dir.path());
    let control = dir.path().join("control.sock");
    let src = NbdClient::connect_uri(&uri(&sock, "src"), 8).unwrap();
    src.write(0, &piece(1)).unwrap();
    qmp.ok(
        "thin-mirror",
        json!({"job-id": "f", "device": "src", "target": uri(&sock, "dst"), "sync": "full"}),
    );
    wait_for(&mut qmp, "ready", |j| j[0]["ready"] == true);
    let events = {
        let control = control.clone();
        std::thread::spawn(move || {
            wait_event(&control, "BLOCK_JOB_COMPLETED", Duration::from_secs(60))
        })
    };
    // Give the event reader time to subscribe.
    std::thread::sleep(Duration::from_millis(200));
    // The target goes away under the mirror's connection.
    qmp.ok("nbd-server-remove", json!({"name": "dst", "mode": "hard"}));
    for n in 0..4u64 {
        src.write(n * PIECE, &piece(100 + n)).unwrap();
    }
    let ev = events.join().unwrap();
    assert!(ev["data"]["error"].is_string(), "{ev}");
    wait_for(&mut qmp, "gone", |j| j.as_array().unwrap().is_empty());
    // Not switched over: the source still takes writes and has them all.
    src.write(5 * PIECE, &piece(7)).unwrap();
    for n in 0..4u64 {
        assert!(src.read(n * PIECE, PIECE as u32).unwrap() == piece(100 + n));
    }
}

/// A target that takes writes at `BYTES_PER_SEC`, far slower than the daemon's writes.
struct SlowDisk(MemoryDevice);

impl SlowDisk {
    const BYTES_PER_SEC: u64 = 16 << 20;

    fn pace(len: u64) {
        std::thread::sleep(Duration::from_micros(len * 1_000_000 / Self::BYTES_PER_SEC));
    }
}

impl BlockDevice for SlowDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        self.0.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        Self::pace(bufs.len());
        self.0.write(offset, bufs)
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.0.write_zeroes(offset, len, may_unmap)
    }
}

/// A guest that writes faster than the target takes keeps every background sweep as large
/// as the one before: the mirror must then turn write-blocking (slowing the guest to the
/// target's pace) and get ready, not copy forever.
#[test]
fn a_mirror_to_a_target_slower_than_the_guest_still_gets_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, mut qmp, sock) = setup(dir.path());
    let path = dir.path().join("slow.sock");
    let server = NbdServer::start(NbdAddr::Unix(path.clone())).unwrap();
    let slow: Arc<dyn BlockDevice> = Arc::new(SlowDisk(MemoryDevice::new(SIZE).unwrap()));
    server
        .add(NbdExport {
            name: "slow".into(),
            description: String::new(),
            dev: slow.clone(),
            node: slow.clone(),
            writable: true,
            fast_zero: false,
            bitmap: None,
        })
        .unwrap();
    let src = Arc::new(NbdClient::connect_uri(&uri(&sock, "src"), 8).unwrap());
    let model = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (src, model, stop) = (src.clone(), model.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // Writer w owns the slots of its parity: the model stays exact.
                    let slot = ((n * 37 + 11) * 2 + w) % (SIZE / PIECE);
                    write(&src, &model, slot, 5000 + n * 2 + w);
                    n += 1;
                }
                n
            })
        })
        .collect();
    qmp.ok(
        "thin-mirror",
        json!({"job-id": "s", "device": "src", "sync": "full",
               "target": format!("nbd+unix:///slow?socket={}", path.display())}),
    );
    wait_for(&mut qmp, "ready", |j| j[0]["ready"] == true);
    stop.store(true, Ordering::SeqCst);
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(writes > 100, "only {writes} writes during the mirror");
    qmp.ok("job-complete", json!({"id": "s"}));
    wait_for(&mut qmp, "done", |j| j.as_array().unwrap().is_empty());
    let mut got = vec![0u8; SIZE as usize];
    slow.read(0, &mut BufsMut::one(&mut got)).unwrap();
    assert!(
        got == *model.lock().unwrap(),
        "the target differs from the source"
    );
}
