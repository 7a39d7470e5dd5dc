//! `--metrics ADDR`: scraped over HTTP by a real HTTP client (Python's urllib) while a real
//! frontend (libblkio) writes to a thin export.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

/// GETs (or with `post`, POSTs) `url` with urllib: the status and the body.
fn fetch(url: &str, post: bool) -> (u16, String) {
    let script = r#"
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], data=b"x" if sys.argv[2] == "1" else None)
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.status); sys.stdout.write(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code)
"#;
    let out = Command::new("python3")
        .args(["-c", script, url, if post { "1" } else { "0" }])
        .output()
        .expect("python3 (the HTTP client of this test) must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, body) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    (status.trim().parse().unwrap(), body.to_string())
}

/// The value of the sample whose name and labels are `key`, exactly.
fn sample(body: &str, key: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {key} in\n{body}"))
        .parse()
        .unwrap()
}

#[test]
fn a_scrape_shows_export_counters_and_pool_gauges() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let socket = dir.path().join("d.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args: Vec<String> = vec![
        "--dir".into(),
        dir.path().join("pool").display().to_string(),
        "--data-size".into(),
        "64M".into(),
        "--metadata-size".into(),
        "8M".into(),
        "--control".into(),
        control.display().to_string(),
        "--metrics".into(),
        format!("127.0.0.1:{port}"),
        "--export".into(),
        format!("name=d,size=64M,socket={},queues=1", socket.display()),
    ];
    let _daemon = Daemon::start(&args, &[&socket, &control]);
    let url = format!("http://127.0.0.1:{port}/metrics");

    let (status, before) = fetch(&url, false);
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &before,
            r#"thinblk_export_operations_total{export="d",node="d",op="write"}"#
        ),
        0.0
    );
    assert!(
        !before.contains("thinblk_export_idle_seconds{"),
        "no I/O yet"
    );
    let free_before = sample(&before, "thinblk_pool_data_free_blocks");
    assert_eq!(sample(&before, "thinblk_pool_data_blocks"), 1024.0);

    let mut c = Client::connect(&socket, 1);
    let p = c.buf_ptr(0);
    for i in 0..4u64 {
        assert_eq!(write(&mut c.queues[0], p, i << 20, 4096), 0);
    }
    assert_eq!(read(&mut c.queues[0], p, 0, 8192), 0);
    c.queues[0].flush(0, blkio::ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);

    let (_, after) = fetch(&url, false);
    let key = |op: &str, what: &str| {
        format!(r#"thinblk_export_{what}_total{{export="d",node="d",op="{op}"}}"#)
    };
    assert_eq!(sample(&after, &key("write", "operations")), 4.0);
    assert_eq!(sample(&after, &key("write", "bytes")), 4.0 * 4096.0);
    assert_eq!(sample(&after, &key("read", "operations")), 1.0);
    assert_eq!(sample(&after, &key("read", "bytes")), 8192.0);
    assert_eq!(sample(&after, &key("flush", "operations")), 1.0);
    assert!(sample(&after, &key("write", "io_time_seconds")) > 0.0);
    assert!(
        sample(
            &after,
            r#"thinblk_export_idle_seconds{export="d",node="d"}"#
        ) >= 0.0
    );
    assert_eq!(
        sample(&after, "thinblk_pool_data_free_blocks"),
        free_before - 4.0,
        "four 64 KiB blocks provisioned"
    );
    assert_eq!(sample(&after, r#"thinblk_pool_mode{mode="write"}"#), 1.0);
    assert_eq!(
        sample(&after, r#"thinblk_pool_mode{mode="out-of-data-space"}"#),
        0.0
    );
    assert!(
        sample(&after, "thinblk_pool_commits_total") >= 1.0,
        "the flush committed"
    );
    assert!(sample(&after, "thinblk_pool_last_commit_seconds") > 0.0);
    assert!(after.contains("# TYPE thinblk_export_operations counter"));
    assert!(after.trim_end().ends_with("# EOF"));

    assert_eq!(
        fetch(&format!("http://127.0.0.1:{port}/nope"), false).0,
        404
    );
    assert_eq!(fetch(&url, true).0, 405);
}
