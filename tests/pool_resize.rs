//! pool-resize while a real frontend (libblkio) writes: a write waiting in out-of-data-space
//! mode goes on once the pool grows, shrinking is refused, THIN_POOL_LOW_SPACE fires again.
#![allow(clippy::unwrap_used)]

mod common;

use std::mem::MaybeUninit;
use std::time::Duration;

use blkio::{Completion, ReqFlags};
use common::{pattern, wait_one, write, Client, Daemon, Qmp};
use serde_json::json;

fn write_mib(c: &mut Client, mib: u64) -> i32 {
    let data = pattern(mib, mib << 20, 1 << 20);
    c.buf()[..1 << 20].copy_from_slice(&data);
    let p = c.buf_ptr(0);
    write(&mut c.queues[0], p, mib << 20, 1 << 20)
}

#[test]
fn a_write_waiting_for_space_goes_on_when_the_pool_grows() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let socket = dir.path().join("d.sock");
    let args: Vec<String> = vec![
        "--dir".into(),
        dir.path().join("pool").display().to_string(),
        "--data-size".into(),
        "16M".into(),
        "--metadata-size".into(),
        "4M".into(),
        "--control".into(),
        control.display().to_string(),
        "--export".into(),
        format!("name=d,size=128M,socket={},queues=1", socket.display()),
    ];
    let _daemon = Daemon::start(&args, &[&socket, &control]);
    let mut q = Qmp::connect(&control);
    let mut c = Client::connect(&socket, 1);
    let before = q.ok("query-pool", json!({}));
    assert_eq!(before["data-blocks"], 256);
    assert_eq!(before["metadata-blocks"], 1024);

    for mib in 0..16 {
        assert_eq!(write_mib(&mut c, mib), 0);
    }
    // The pool is full: this write waits for space.
    let p = c.buf_ptr(0);
    c.queues[0].write(16 << 20, p, 1 << 20, 0, ReqFlags::empty());
    // Submits it (libblkio hands requests over in do_io) without waiting.
    let mut done = [MaybeUninit::<Completion>::uninit()];
    let mut zero = Duration::ZERO;
    let n = c.queues[0]
        .do_io(&mut done, 0, Some(&mut zero), None)
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(
        q.event("THIN_POOL_MODE_CHANGED")["mode"],
        "out-of-data-space"
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut zero = Duration::ZERO;
    let n = c.queues[0]
        .do_io(&mut done, 0, Some(&mut zero), None)
        .unwrap();
    assert_eq!(n, 0, "the write waits while the pool is full");

    let err = q.exec("pool-resize", json!({"data-size": 8 << 20}));
    let desc = err["error"]["desc"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(desc.contains("cannot shrink"), "{err}");
    let err = q.exec("pool-resize", json!({"metadata-size": 1 << 20}));
    assert!(err["error"]["desc"]
        .as_str()
        .unwrap_or_default()
        .contains("cannot shrink"));

    let r = q.ok(
        "pool-resize",
        json!({"data-size": 32 << 20, "metadata-size": 8 << 20}),
    );
    assert_eq!(r["data-blocks"], 512);
    assert_eq!(wait_one(&mut c.queues[0]), 0, "the waiting write went on");
    assert_eq!(q.event("THIN_POOL_MODE_CHANGED")["mode"], "write");
    let after = q.ok("query-pool", json!({}));
    assert_eq!(after["data-blocks"], 512);
    assert_eq!(after["metadata-blocks"], 2048);
    assert_eq!(after["mode"], "write");
    assert_eq!(after["data-free-blocks"], 512 - 272);
    assert_eq!(
        std::fs::metadata(dir.path().join("pool/data"))
            .unwrap()
            .len(),
        32 << 20
    );

    // Low space fires once below the mark, and again after the pool grows past it.
    q.ok("pool-set-low-water", json!({"blocks": 250}));
    assert_eq!(q.event("THIN_POOL_LOW_SPACE")["free-blocks"], 240);
    q.ok("pool-resize", json!({"data-size": 48 << 20}));
    for mib in 17..35 {
        assert_eq!(write_mib(&mut c, mib), 0);
    }
    let again = q.event("THIN_POOL_LOW_SPACE");
    assert_eq!(again["space"], "data");
    assert!(again["free-blocks"].as_u64().unwrap() < 250, "{again}");
    // With no size, the data device's size is read again: unchanged here.
    assert_eq!(q.ok("pool-resize", json!({}))["data-blocks"], 768);
}
