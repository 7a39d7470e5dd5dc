//! query-blockstats and block-latency-histogram-set over QMP, with a real frontend (libblkio)
//! doing the I/O they count.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use blkio::ReqFlags;
use common::*;
use serde_json::{json, Value};

struct Setup {
    _dir: tempfile::TempDir,
    control: PathBuf,
    socket: PathBuf,
    other: PathBuf,
    _daemon: Daemon,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let socket = dir.path().join("a.sock");
    let other = dir.path().join("b.sock");
    let image = dir.path().join("a.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let args: Vec<String> = vec![
        "--control".into(),
        control.display().to_string(),
        "--export".into(),
        format!(
            "raw={},socket={},id=a,queues=2",
            image.display(),
            socket.display()
        ),
        "--export".into(),
        format!("null=64M,socket={},id=b", other.display()),
    ];
    let daemon = Daemon::start(&args, &[&socket, &other, &control]);
    Setup {
        _dir: dir,
        control,
        socket,
        other,
        _daemon: daemon,
    }
}

fn stats_of(q: &mut Qmp, id: &str) -> Value {
    let all = q.ok("query-blockstats", json!({}));
    let e = all
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["device"] == id)
        .unwrap_or_else(|| panic!("no {id} in {all}"))
        .clone();
    e["stats"].clone()
}

#[test]
fn blockstats_count_what_a_frontend_did_per_export() {
    let s = setup();
    let mut q = Qmp::connect(&s.control);
    let before = stats_of(&mut q, "a");
    assert_eq!(before["rd_operations"], 0);
    assert!(before.get("idle_time_ns").is_none(), "{before}");

    let mut c = Client::connect(&s.socket, 2);
    let p = c.buf_ptr(0);
    for i in 0..3 {
        assert_eq!(write(&mut c.queues[0], p, i * 8192, 8192), 0);
    }
    for i in 0..5 {
        assert_eq!(read(&mut c.queues[1], p, i * 4096, 4096), 0);
    }
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    c.queues[1].discard(1 << 20, 128 << 10, 0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[1]), 0);
    // Past the end: refused before the device sees it.
    let end = c.capacity();
    assert_ne!(read(&mut c.queues[0], p, end, 4096), 0);
    assert_ne!(write(&mut c.queues[1], p, end - 512, 4096), 0);

    let st = stats_of(&mut q, "a");
    assert_eq!(st["wr_operations"], 3, "{st}");
    assert_eq!(st["wr_bytes"], 3 * 8192);
    assert_eq!(st["rd_operations"], 5);
    assert_eq!(st["rd_bytes"], 5 * 4096);
    assert_eq!(st["flush_operations"], 1);
    assert_eq!(st["unmap_operations"], 1);
    assert_eq!(st["unmap_bytes"], 128 << 10);
    assert_eq!(st["wr_highest_offset"], 3 * 8192);
    assert_eq!(st["invalid_rd_operations"], 1);
    assert_eq!(st["invalid_wr_operations"], 1);
    assert_eq!(st["failed_rd_operations"], 0);
    assert!(st["rd_total_time_ns"].as_u64().unwrap() > 0);
    assert!(st["wr_total_time_ns"].as_u64().unwrap() > 0);
    let idle = st["idle_time_ns"].as_u64().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let later = stats_of(&mut q, "a")["idle_time_ns"].as_u64().unwrap();
    assert!(later >= idle + 50_000_000, "{idle} then {later}");

    // The other export saw none of it.
    let b = stats_of(&mut q, "b");
    assert_eq!(b["rd_operations"], 0);
    assert_eq!(b["invalid_rd_operations"], 0);
}

#[test]
fn latency_histograms_are_set_filled_and_removed_as_in_qemu() {
    let s = setup();
    let mut q = Qmp::connect(&s.control);
    let err = q.exec("block-latency-histogram-set", json!({"id": "nope"}));
    assert_eq!(err["error"]["class"], "DeviceNotFound", "{err}");
    let err = q.exec(
        "block-latency-histogram-set",
        json!({"id": "a", "boundaries": [100, 10]}),
    );
    assert!(err.get("error").is_some(), "{err}");
    q.ok(
        "block-latency-histogram-set",
        json!({"id": "a", "boundaries": [10, 1000000000], "boundaries-flush": [1]}),
    );
    let st = stats_of(&mut q, "a");
    assert_eq!(
        st["rd_latency_histogram"]["boundaries"],
        json!([10, 1000000000])
    );
    assert_eq!(st["rd_latency_histogram"]["bins"], json!([0, 0, 0]));
    assert_eq!(st["flush_latency_histogram"]["boundaries"], json!([1]));

    let mut c = Client::connect(&s.socket, 2);
    let p = c.buf_ptr(0);
    for i in 0..4 {
        assert_eq!(read(&mut c.queues[(i % 2) as usize], p, i * 4096, 4096), 0);
    }
    assert_eq!(write(&mut c.queues[0], p, 0, 4096), 0);
    let st = stats_of(&mut q, "a");
    let bins = &st["rd_latency_histogram"]["bins"];
    // Every read took more than 10 ns and less than a second. Not more than a microsecond:
    // the latency is the daemon's, from submit to reap, and a read of a hole in a raw file
    // can come back from io_uring within a microsecond (it did in about one run in ten).
    assert_eq!(bins, &json!([0, 4, 0]), "{st}");
    assert_eq!(st["wr_latency_histogram"]["bins"], json!([0, 1, 0]));
    assert_eq!(st["flush_latency_histogram"]["bins"], json!([0, 0]));

    q.ok("block-latency-histogram-set", json!({"id": "a"}));
    let st = stats_of(&mut q, "a");
    for h in [
        "rd_latency_histogram",
        "wr_latency_histogram",
        "flush_latency_histogram",
    ] {
        assert!(st.get(h).is_none(), "{h} still there: {st}");
    }
    let _ = &s.other;
}
