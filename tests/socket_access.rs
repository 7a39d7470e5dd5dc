//! Socket owner, group and mode from the command line and QMP, and `serve` leaving the
//! working directory alone when every path is given.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn mode_and_group(p: &Path) -> (u32, u32) {
    let m = std::fs::metadata(p).unwrap();
    (m.mode() & 0o777, m.gid())
}

fn own_gid() -> u32 {
    // SAFETY: getegid takes nothing and cannot fail.
    unsafe { libc::getegid() }
}

#[test]
fn serve_with_every_path_given_creates_no_pool_directory_and_sets_socket_modes() {
    let cwd = tempfile::tempdir().unwrap();
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let gid = own_gid().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .current_dir(cwd.path())
        .args(["serve", "--metadata", &p("meta"), "--data", &p("data")])
        .args(["--metadata-size", "16M", "--data-size", "64M"])
        .args(["--control", &p("c.sock"), "--control-mode", "0640"])
        .args(["--control-group", &gid])
        .args(["--socket-mode", "0660", "--socket-group", &gid])
        .arg("--export")
        .arg(format!("name=vm,size=1M,socket={}", p("vm.sock")))
        .arg("--export")
        .arg(format!(
            "name=w,size=1M,socket={},socket-mode=0600",
            p("w.sock")
        ))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let ready = wait_for_sockets(
        &mut child,
        &[&d.path().join("c.sock"), &d.path().join("w.sock")],
    );
    let got = ready.then(|| {
        (
            mode_and_group(&d.path().join("vm.sock")),
            mode_and_group(&d.path().join("w.sock")),
            mode_and_group(&d.path().join("c.sock")),
            std::fs::read_dir(cwd.path()).unwrap().count(),
        )
    });
    let _ = child.kill();
    let _ = child.wait();
    let (vm, w, c, in_cwd) = got.expect("thinblk never listened");
    let gid = own_gid();
    assert_eq!(vm, (0o660, gid), "the daemon default applies");
    assert_eq!(w.0, 0o600, "the export's own socket-mode wins");
    assert_eq!(c, (0o640, gid), "the control socket has its own mode");
    assert_eq!(
        in_cwd, 0,
        "serve created something in its working directory"
    );
}

#[test]
fn block_export_add_takes_socket_mode_and_group() {
    let d = tempfile::tempdir().unwrap();
    let ctl = d.path().join("control.sock");
    let args: Vec<String> = [
        "--dir",
        d.path().to_str().unwrap(),
        "--metadata-size",
        "16M",
        "--data-size",
        "64M",
        "--export",
        "name=vm,size=1M",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _daemon = Daemon::start(&args, &[&ctl]);
    let mut qmp = Qmp::connect(&ctl);
    let sock = d.path().join("q.sock");
    qmp.ok(
        "block-export-add",
        serde_json::json!({"type": "vhost-user-blk", "id": "q", "node-name": "vm",
            "addr": {"type": "unix", "path": sock}, "writable": true,
            "socket-mode": "0660", "socket-group": own_gid().to_string()}),
    );
    assert_eq!(mode_and_group(&sock), (0o660, own_gid()));
    let e = qmp.exec(
        "block-export-add",
        serde_json::json!({"type": "vhost-user-blk", "id": "r", "node-name": "vm",
            "addr": {"type": "unix", "path": d.path().join("r.sock")},
            "socket-mode": "0999"}),
    );
    let desc = e["error"]["desc"].as_str().unwrap_or_default().to_string();
    assert!(desc.contains("socket-mode"), "{e}");
    assert_eq!(mode_and_group(&d.path().join("vm.sock")).0, 0o600);
}

/// Waits (up to 20 s) until every socket accepts; false if the daemon exits first or time
/// runs out.
fn wait_for_sockets(child: &mut std::process::Child, sockets: &[&Path]) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for s in sockets {
        while std::os::unix::net::UnixStream::connect(s).is_err() {
            if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    true
}
