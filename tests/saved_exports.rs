//! Exports and snapshot nodes made over QMP come back after a restart of the daemon
//! (saved in exports.json beside the pool); `persistent: false` ones do not, deleted ones
//! do not, and the command line's own export of the same id wins without an error.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use serde_json::json;

fn pool_args(dir: &Path, exports: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["--metadata-size", "16M", "--data-size", "64M", "--dir"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(dir.to_str().unwrap().into());
    for e in exports {
        a.push("--export".into());
        a.push(e.to_string());
    }
    a
}

fn export_ids(qmp: &mut Qmp) -> Vec<String> {
    let mut ids: Vec<String> = qmp
        .ok("query-block-exports", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn add(qmp: &mut Qmp, id: &str, node: &str, socket: &Path, extra: serde_json::Value) {
    let mut args = json!({"type": "vhost-user-blk", "id": id, "node-name": node,
        "addr": {"type": "unix", "path": socket}, "writable": true});
    for (k, v) in extra.as_object().unwrap() {
        args[k] = v.clone();
    }
    qmp.ok("block-export-add", args);
}

#[test]
fn exports_made_over_qmp_are_served_again_after_a_restart() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("pool");
    let ctl = dir.join("control.sock");
    let args = pool_args(&dir, &["name=vm,size=1M"]);
    {
        let _daemon = Daemon::start(&args, &[&ctl]);
        let mut qmp = Qmp::connect(&ctl);
        qmp.ok("thin-create", json!({"name": "w", "size": 1 << 20}));
        add(
            &mut qmp,
            "w",
            "w",
            &dir.join("qw.sock"),
            json!({"socket-mode": "0660"}),
        );
        add(&mut qmp, "gone", "w", &dir.join("g.sock"), json!({}));
        add(
            &mut qmp,
            "t",
            "vm",
            &dir.join("t.sock"),
            json!({"persistent": false}),
        );
        qmp.ok("block-export-del", json!({"id": "gone"}));
    } // SIGTERM
    let _daemon = Daemon::start(&args, &[&ctl, &dir.join("qw.sock")]);
    let mut qmp = Qmp::connect(&ctl);
    assert_eq!(export_ids(&mut qmp), ["vm", "w"]);
    let mode = std::fs::metadata(dir.join("qw.sock")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o660, "the saved socket mode applies again");
    assert!(!dir.join("t.sock").exists() && !dir.join("g.sock").exists());
    // The restored export serves its device.
    let mut client = Client::connect(&dir.join("qw.sock"), 1);
    assert_eq!(client.capacity(), 1 << 20);
    let p = client.buf_ptr(0);
    assert_eq!(write(&mut client.queues[0], p, 0, 4096), 0);
}

#[test]
fn a_command_line_export_of_a_saved_id_wins_without_an_error() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("pool");
    let ctl = dir.join("control.sock");
    {
        let _daemon = Daemon::start(&pool_args(&dir, &["name=vm,size=1M"]), &[&ctl]);
        let mut qmp = Qmp::connect(&ctl);
        qmp.ok("thin-create", json!({"name": "w", "size": 1 << 20}));
        add(&mut qmp, "w", "w", &dir.join("qw.sock"), json!({}));
    }
    // Now the command line exports w too, at its default socket DIR/w.sock.
    let args = pool_args(&dir, &["name=vm,size=1M", "name=w"]);
    {
        let _daemon = Daemon::start(&args, &[&ctl, &dir.join("w.sock")]);
        let mut qmp = Qmp::connect(&ctl);
        assert_eq!(export_ids(&mut qmp), ["vm", "w"]);
        assert!(
            !dir.join("qw.sock").exists(),
            "the saved export also started"
        );
    }
    // It stays saved: without the command line's export it comes back.
    let _daemon = Daemon::start(
        &pool_args(&dir, &["name=vm,size=1M"]),
        &[&ctl, &dir.join("qw.sock")],
    );
}

#[test]
fn the_state_file_is_replaced_whole() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("pool");
    let ctl = dir.join("control.sock");
    let _daemon = Daemon::start(&pool_args(&dir, &["name=vm,size=1M"]), &[&ctl]);
    let mut qmp = Qmp::connect(&ctl);
    for i in 0..5 {
        add(
            &mut qmp,
            &format!("e{i}"),
            "vm",
            &dir.join(format!("e{i}.sock")),
            json!({}),
        );
    }
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("exports.json")).unwrap()).unwrap();
    assert_eq!(saved["exports"].as_object().unwrap().len(), 5);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
