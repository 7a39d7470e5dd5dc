//! `thin-mirror` end to end in one daemon: a thin device written over its NBD export while
//! it is mirrored into another thin device's NBD export of the same daemon (standing in for
//! another host's), then switched over with `job-complete`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, Qmp};
use serde_json::{json, Value};
use thinblk::nbd::client::NbdClient;

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
    let d = dir.path();
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
    let _daemon = Daemon::start(&args, &[&nbd, &control, &vm]);
    let mut qmp = Qmp::connect(&control);
    qmp.ok("thin-create", json!({"name": "dst", "size": SIZE}));
    qmp.ok(
        "nbd-server-add",
        json!({"device": "dst", "name": "dst", "writable": true}),
    );
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
