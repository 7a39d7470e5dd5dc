//! QMP on a thin pool with a real frontend (libblkio) writing: write thresholds, the pool's
//! low-water and mode events, I/O error reports, thin-delta between snapshots, resize.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::json;

const BLOCK: u64 = 64 << 10;

struct Pool {
    _dir: tempfile::TempDir,
    control: PathBuf,
    socket: PathBuf,
    _daemon: Daemon,
}

fn pool(data_size: &str, extra: &[&str]) -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let socket = dir.path().join("d.sock");
    let mut args: Vec<String> = vec![
        "--dir".into(),
        dir.path().join("pool").display().to_string(),
        "--data-size".into(),
        data_size.into(),
        "--metadata-size".into(),
        "8M".into(),
        "--control".into(),
        control.display().to_string(),
        "--export".into(),
        format!("name=d,size=64M,socket={},queues=1", socket.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let daemon = Daemon::start(&args, &[&socket, &control]);
    Pool {
        _dir: dir,
        control,
        socket,
        _daemon: daemon,
    }
}

fn write_at(c: &mut Client, offset: u64, len: usize, seed: u64) -> i32 {
    let data = pattern(seed, offset, len);
    c.buf()[..len].copy_from_slice(&data);
    let p = c.buf_ptr(0);
    write(&mut c.queues[0], p, offset, len)
}

#[test]
fn a_write_past_the_threshold_reports_once_and_disarms() {
    let p = pool("64M", &[]);
    let mut q = Qmp::connect(&p.control);
    let mut c = Client::connect(&p.socket, 1);
    q.ok(
        "block-set-write-threshold",
        json!({"node-name": "d", "write-threshold": 1 << 20}),
    );
    assert_eq!(write_at(&mut c, 0, 4096, 1), 0);
    assert_eq!(write_at(&mut c, 2 << 20, 8192, 2), 0);
    assert_eq!(write_at(&mut c, 3 << 20, 4096, 3), 0);
    let e = q.event("BLOCK_WRITE_THRESHOLD");
    assert_eq!(e["node-name"], "d");
    assert_eq!(e["write-threshold"], 1 << 20);
    assert_eq!(e["amount-exceeded"], (2 << 20) + 8192 - (1 << 20));
    // Disarmed: the third write sent nothing. A pool event after it proves the stream moved on.
    q.ok("pool-set-low-water", json!({"blocks": 1024}));
    q.event("THIN_POOL_LOW_SPACE");
    assert_eq!(q.count("BLOCK_WRITE_THRESHOLD"), 0);
    let err = q.exec(
        "block-set-write-threshold",
        json!({"node-name": "nope", "write-threshold": 1}),
    );
    assert_eq!(err["error"]["class"], "DeviceNotFound");
}

#[test]
fn a_full_pool_reports_low_space_mode_change_and_io_errors() {
    let p = pool("16M", &["--error-if-no-space"]);
    let mut q = Qmp::connect(&p.control);
    let mut c = Client::connect(&p.socket, 1);
    let total = q.ok("query-pool", json!({}))["data-blocks"]
        .as_u64()
        .unwrap();
    assert_eq!(total, 256);
    q.ok("pool-set-low-water", json!({"blocks": 250}));
    assert_eq!(write_at(&mut c, 0, 1 << 20, 1), 0);
    let low = q.event("THIN_POOL_LOW_SPACE");
    assert_eq!(low["space"], "data");
    // Sent as the first allocation crosses the mark.
    assert_eq!(low["free-blocks"], 249);
    assert_eq!(low["low-water"], 250);
    // Fill the pool: the write that finds no free block fails at once.
    let mut failed = None;
    for i in 1..20u64 {
        let r = write_at(&mut c, i << 20, 1 << 20, i);
        if r != 0 {
            failed = Some(i);
            break;
        }
    }
    assert!(failed.is_some(), "a 16 MiB pool took 20 MiB of writes");
    let mode = q.event("THIN_POOL_MODE_CHANGED");
    assert_eq!(mode["mode"], "out-of-data-space");
    let err = q.event("BLOCK_IO_ERROR");
    assert_eq!(err["device"], "d");
    assert_eq!(err["operation"], "write");
    assert_eq!(err["nospace"], true);
    assert_eq!(err["action"], "report");
    assert_eq!(q.ok("query-pool", json!({}))["mode"], "out-of-data-space");
}

#[test]
fn thin_delta_between_two_snapshots_is_what_was_written_between_them() {
    let p = pool("256M", &[]);
    let mut q = Qmp::connect(&p.control);
    let mut c = Client::connect(&p.socket, 1);
    for b in [0u64, 1, 2, 10, 40] {
        assert_eq!(write_at(&mut c, b * BLOCK, 4096, b), 0);
    }
    let r = q.ok("thin-snapshot", json!({"device": "d", "name": "s1"}));
    assert!(r["pause-us"].is_u64(), "{r}");
    // Between the snapshots: overwrite blocks 1-2 (shared: they break sharing), write new
    // blocks 3 and 20-22, and discard nothing.
    for (b, within) in [
        (1u64, 512u64),
        (2, 0),
        (3, 4096),
        (20, 0),
        (21, 0),
        (22, 60 << 10),
    ] {
        assert_eq!(write_at(&mut c, b * BLOCK + within, 4096, 100 + b), 0);
    }
    q.ok(
        "transaction",
        json!({"actions": [{"type": "blockdev-snapshot-internal-sync",
                            "data": {"device": "d", "name": "s2"}}]}),
    );
    let delta = q.ok("thin-delta", json!({"base": "s1", "target": "s2"}));
    assert_eq!(delta["block-size"], BLOCK);
    let ranges: Vec<(u64, u64, String)> = delta["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["start"].as_u64().unwrap() / BLOCK,
                r["length"].as_u64().unwrap() / BLOCK,
                r["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        ranges,
        vec![
            (1, 2, "different".to_string()),
            (3, 1, "right-only".to_string()),
            (20, 3, "right-only".to_string()),
        ]
    );
    // A snapshot is the same as its origin until either is written.
    let same = q.ok("thin-delta", json!({"base": "d", "target": "s2"}));
    assert_eq!(same["ranges"], json!([]));
    let devices = q.ok("query-thin-devices", json!({}));
    let s1 = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "s1")
        .unwrap();
    assert_eq!(s1["origin"], "d");
    assert_eq!(s1["mapped-blocks"], 5);
    // Blocks 1 and 2 are now s1's alone (d and s2 moved on); 0, 10, 40 are shared by all three.
    assert_eq!(s1["exclusive-blocks"], 2);
}

#[test]
fn a_grown_disk_shows_its_new_capacity_to_the_next_connection() {
    let p = pool("64M", &[]);
    let mut q = Qmp::connect(&p.control);
    {
        let c = Client::connect(&p.socket, 1);
        assert_eq!(c.capacity(), 64 << 20);
    }
    q.ok(
        "block-resize",
        json!({"node-name": "d", "size": 128u64 << 20}),
    );
    let err = q.exec(
        "block-resize",
        json!({"node-name": "d", "size": 32u64 << 20}),
    );
    assert!(
        err["error"]["desc"].as_str().unwrap().contains("shrink"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let mut c = Client::connect(&p.socket, 1);
    assert_eq!(c.capacity(), 128 << 20);
    assert_eq!(write_at(&mut c, (128 << 20) - 4096, 4096, 7), 0);
}

#[test]
fn the_largest_disk_qmp_creates_serves_its_last_sector_and_one_sector_more_is_refused() {
    use thinblk::engine::limits::MAX_DEVICE_BYTES;
    let p = pool("64M", &[]);
    let mut q = Qmp::connect(&p.control);
    let limit = MAX_DEVICE_BYTES.to_string();
    for (cmd, args) in [
        (
            "thin-create",
            json!({"name": "huge", "size": MAX_DEVICE_BYTES + 512}),
        ),
        ("thin-create", json!({"name": "huge", "size": 1u64 << 63})),
        (
            "block-resize",
            json!({"node-name": "d", "size": MAX_DEVICE_BYTES + 512}),
        ),
    ] {
        let err = q.exec(cmd, args.clone());
        let desc = err["error"]["desc"].as_str().unwrap_or_default();
        assert!(
            desc.contains("'size'") && desc.contains(&limit),
            "{cmd} {args}: {err}"
        );
    }
    q.ok(
        "thin-create",
        json!({"name": "huge", "size": MAX_DEVICE_BYTES}),
    );
    let socket = p.socket.with_file_name("huge.sock");
    q.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "huge", "node-name": "huge",
               "addr": {"type": "unix", "path": socket}, "writable": true, "num-queues": 1}),
    );
    let mut c = Client::connect(&socket, 1);
    assert_eq!(c.capacity(), MAX_DEVICE_BYTES);
    let last = MAX_DEVICE_BYTES - 512;
    assert_eq!(write_at(&mut c, last, 512, 9), 0);
    c.buf()[..512].fill(0);
    let ptr = c.buf_ptr(0);
    assert_eq!(read(&mut c.queues[0], ptr, last, 512), 0);
    assert_eq!(&c.buf()[..512], &pattern(9, last, 512)[..]);
    // One sector past the end is an I/O error, not a wrap-around.
    assert_ne!(write_at(&mut c, MAX_DEVICE_BYTES, 512, 10), 0);
    // The device is really that big: block-resize to the same size is accepted.
    q.ok(
        "block-resize",
        json!({"node-name": "huge", "size": MAX_DEVICE_BYTES}),
    );
}
