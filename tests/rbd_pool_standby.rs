//! A daemon standing by for a pool on RBD (`serve --standby`) takes it over when told to over
//! QMP (`pool-take-over`): before, `query-pool` names the owner and the pool's thin exports do
//! not run; the take-over fences the owner, the thin exports of the command line come up and
//! serve every flushed write, and `block-export-add` serves the pool's other volumes. Refused
//! take-overs are QMP errors on a connection that lives on.
//!
//! Needs a Ceph cluster: THINBLK_CEPH_CONF names its ceph.conf (scripts/test.sh starts one with
//! scripts/ceph-cluster.sh, pool `thinblk`). A test fails when it is not set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod external;
mod rbd_common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const DISK: u64 = 32 << 20;

/// `serve` arguments for a pool on the images `meta` and `data` (catalog in `dir`) exporting
/// the thin disk `vm` at `sock`, QMP at `control`.
fn serve_args(
    dir: &Path,
    meta: &str,
    data: &str,
    sock: &Path,
    control: &Path,
    extra: &[&str],
) -> Vec<String> {
    let conf = rbd_common::ceph_conf().display().to_string();
    let mut args: Vec<String> = [
        "--dir",
        &dir.display().to_string(),
        "--metadata",
        &format!("rbd:{}/{meta}", rbd_common::POOL),
        "--data",
        &format!("rbd:{}/{data}", rbd_common::POOL),
        "--metadata-size",
        "16M",
        "--data-size",
        "128M",
        "--ceph-conf",
        &conf,
        "--control",
        &control.display().to_string(),
        "--export",
        &format!("name=vm,size={DISK},socket={}", sock.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The client address of `image`'s exclusive lock owner (`rbd lock ls`).
fn lock_owner(image: &str) -> String {
    let out = Command::new(external::tool("rbd"))
        .args(["--conf"])
        .arg(rbd_common::ceph_conf())
        .args(["lock", "ls", "--format", "json"])
        .arg(format!("{}/{image}", rbd_common::POOL))
        .output()
        .expect("run rbd lock ls");
    assert!(out.status.success(), "rbd lock ls {image}");
    let locks: Value = serde_json::from_slice(&out.stdout).unwrap();
    locks[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no lock owner of {image}: {locks}"))
        .to_string()
}

fn error_of(reply: &Value) -> String {
    reply["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error reply: {reply}"))
        .to_string()
}

#[test]
fn a_standby_takes_the_pool_over_when_told_to_and_serves_every_flushed_write() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tag = rbd_common::unique_name("standby");
    let (meta, data) = (format!("{tag}-meta"), format!("{tag}-data"));
    let (sock_a, control_a) = (d.join("a.sock"), d.join("a-control.sock"));
    let (sock_b, control_b) = (d.join("b.sock"), d.join("b-control.sock"));

    let owner = Daemon::start(
        &serve_args(d, &meta, &data, &sock_a, &control_a, &[]),
        &[&sock_a],
    );
    let mut c = Client::connect(&sock_a, 1);
    let flushed = pattern(1, 64 << 10, 128 << 10);
    assert_eq!(write_at(&mut c, 64 << 10, &flushed), 0);
    assert_eq!(flush(&mut c), 0);
    drop(c);
    let owner_client = lock_owner(&meta);

    // The owner is no standby: told to take over its own pool, it says so, and goes on.
    let mut qa = Qmp::connect(&control_a);
    let err = error_of(&qa.exec("pool-take-over", json!({})));
    assert!(err.contains("owns its pool already"), "{err}");
    assert!(qa.ok("query-pool", json!({}))["transaction-id"].is_u64());

    // The standby runs its QMP socket only: the thin export waits for the pool.
    let standby = Daemon::start(
        &serve_args(d, &meta, &data, &sock_b, &control_b, &["--standby"]),
        &[&control_b],
    );
    assert!(!sock_b.exists(), "the standby serves the thin disk already");
    let mut qb = Qmp::connect(&control_b);
    let status = qb.ok("query-pool", json!({}));
    assert_eq!(status["mode"], "standby", "{status}");
    assert_eq!(status["owners"], json!([owner_client]), "{status}");
    assert_eq!(
        status["images"][0]["image"],
        format!("rbd:{}/{meta}", rbd_common::POOL)
    );
    assert_eq!(status["images"][0]["exists"], true);
    let err = error_of(&qb.exec(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "early", "node-name": "vm",
               "addr": {"type": "unix", "path": d.join("early.sock")}, "writable": true}),
    ));
    assert!(err.contains("vm"), "{err}");

    // Told to: the owner is fenced (still running, as a host cut off would be).
    let taken = qb.ok("pool-take-over", json!({}));
    assert_eq!(taken["fenced"], json!([owner_client]), "{taken}");
    assert_eq!(taken["exports"], json!(["vm"]), "{taken}");
    assert_eq!(taken["failed-exports"], json!([]), "{taken}");
    assert_ne!(lock_owner(&meta), owner_client);
    let status = qb.ok("query-pool", json!({}));
    assert_eq!(status["mode"], "write", "{status}");
    let err = error_of(&qb.exec("pool-take-over", json!({})));
    assert!(err.contains("owns the pool already"), "{err}");

    let mut c = Client::connect(&sock_b, 1);
    assert_eq!(c.capacity(), DISK);
    let got = read_at(&mut c, 64 << 10, 128 << 10);
    assert!(
        got == flushed,
        "the flushed write is not there after the take-over"
    );
    let mine = pattern(2, 1 << 20, 65536);
    assert_eq!(write_at(&mut c, 1 << 20, &mine), 0);
    assert_eq!(flush(&mut c), 0);
    drop(c);

    // The pool's other volumes are served as any owner's.
    qb.ok("thin-create", json!({"name": "vm2", "size": 4 << 20}));
    let sock_2 = d.join("vm2.sock");
    qb.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "vm2", "node-name": "vm2",
               "addr": {"type": "unix", "path": sock_2}, "writable": true}),
    );
    let mut c2 = Client::connect(&sock_2, 1);
    assert_eq!(c2.capacity(), 4 << 20);
    let second = pattern(3, 0, 4096);
    assert_eq!(write_at(&mut c2, 0, &second), 0);
    assert_eq!(flush(&mut c2), 0);
    assert!(read_at(&mut c2, 0, 4096) == second);
    drop(c2);

    drop(qa);
    owner.kill9();
    drop(qb);
    drop(standby);
    // A clean stop gave the images back: they are removed at once.
    let cluster = rbd_common::connect();
    let io = rbd_common::pool(&cluster);
    for name in [&meta, &data] {
        thinblk::engine::rbd::RbdImage::remove(&io, name)
            .unwrap_or_else(|e| panic!("removing {name}: {e}"));
    }
}

#[test]
fn a_take_over_that_cannot_reach_the_cluster_is_a_qmp_error_and_the_standby_stays() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Monitors nobody listens at: every connection attempt times out (30 s).
    let conf = d.join("unreachable.conf");
    std::fs::write(
        &conf,
        "[global]\nmon host = 127.0.0.1:9\nauth supported = none\n",
    )
    .unwrap();
    let control = d.join("control.sock");
    let args: Vec<String> = [
        "--dir",
        &d.display().to_string(),
        "--metadata",
        "rbd:thinblk/nowhere-meta",
        "--data",
        "rbd:thinblk/nowhere-data",
        "--ceph-conf",
        &conf.display().to_string(),
        "--control",
        &control.display().to_string(),
        "--standby",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let daemon = Daemon::start(&args, &[&control]);
    let mut q = Qmp::connect(&control);
    let err = error_of(&q.exec("pool-take-over", json!({})));
    assert!(err.contains("connecting to the Ceph cluster"), "{err}");
    // The connection lives, and the daemon still stands by.
    let reply = q.exec("query-version", json!({}));
    assert!(reply.get("return").is_some(), "{reply}");
    assert!(
        !dir.path().join("disk0.sock").exists(),
        "the default thin export runs"
    );
    drop(q);
    drop(daemon);
}

#[test]
fn a_daemon_without_a_pool_on_rbd_refuses_to_take_over() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let sock = dir.path().join("null.sock");
    let args: Vec<String> = vec![
        "--control".into(),
        control.display().to_string(),
        "--export".into(),
        format!("null=1M,socket={}", sock.display()),
    ];
    let daemon = Daemon::start(&args, &[&control]);
    let mut q = Qmp::connect(&control);
    let err = error_of(&q.exec("pool-take-over", json!({})));
    assert!(err.contains("no pool on RBD"), "{err}");
    let reply = q.exec("query-version", json!({}));
    assert!(reply.get("return").is_some(), "{reply}");
    drop(q);
    drop(daemon);
}

/// Whether process `pid` has exec'd for an upgrade (with handed-over sockets).
fn upgraded(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| {
            env.split(|&b| b == 0)
                .any(|v| v.starts_with(b"THINBLK_LISTEN_FDS="))
        })
        .unwrap_or(false)
}

#[test]
fn a_standby_that_took_a_free_pool_over_keeps_it_through_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tag = rbd_common::unique_name("standby-upgrade");
    let (meta, data) = (format!("{tag}-meta"), format!("{tag}-data"));
    let (sock, control) = (d.join("vm.sock"), d.join("control.sock"));
    let daemon = Daemon::start(
        &serve_args(d, &meta, &data, &sock, &control, &["--standby"]),
        &[&control],
    );
    let mut q = Qmp::connect(&control);
    // No images yet: nobody owns the pool.
    let status = q.ok("query-pool", json!({}));
    assert_eq!(status["owners"], json!([]), "{status}");
    assert_eq!(status["images"][1]["exists"], false, "{status}");
    // A free pool is taken (created) without fencing anyone.
    let taken = q.ok("pool-take-over", json!({}));
    assert_eq!(taken["fenced"], json!([]), "{taken}");
    assert_eq!(taken["exports"], json!(["vm"]), "{taken}");
    let mut c = Client::connect(&sock, 1);
    let mine = pattern(5, 0, 65536);
    assert_eq!(write_at(&mut c, 0, &mine), 0);
    assert_eq!(flush(&mut c), 0);
    drop(c);

    // The new process runs with the same --standby, and owns the pool at once.
    let pid = daemon.pid();
    let r = q.exec("x-thinblk-upgrade", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !upgraded(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "no upgrade within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut q = Qmp::connect(&control);
    let status = q.ok("query-pool", json!({}));
    assert_eq!(status["mode"], "write", "after the upgrade: {status}");
    let mut c = Client::connect(&sock, 1);
    assert!(
        read_at(&mut c, 0, 65536) == mine,
        "the write is gone after the upgrade"
    );
    drop(c);
    drop(q);
    drop(daemon);
    let cluster = rbd_common::connect();
    let io = rbd_common::pool(&cluster);
    for name in [&meta, &data] {
        thinblk::engine::rbd::RbdImage::remove(&io, name)
            .unwrap_or_else(|e| panic!("removing {name}: {e}"));
    }
}
