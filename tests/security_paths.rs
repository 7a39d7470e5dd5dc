//! Paths a QMP client or the command line hands the daemon: sockets are created 0600 in a
//! 0700 directory; a path that is a regular file, a directory or a symlink is never replaced;
//! paths too long for a unix socket or holding NUL are refused; and a refusal costs the
//! client one error reply, not its connection.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Daemon, Qmp};
use serde_json::{json, Value};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn export_at(q: &mut Qmp, id: &str, path: &str) -> Value {
    q.exec(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": id, "node-name": "vm",
               "addr": {"type": "unix", "path": path}, "writable": true}),
    )
}

#[test]
fn sockets_are_private_and_qmp_socket_paths_never_replace_files() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let control = pool.join("control.sock");
    let args: Vec<String> = [
        "--dir",
        pool.to_str().unwrap(),
        "--metadata-size",
        "8M",
        "--data-size",
        "64M",
        "--export",
        "name=vm,size=1M",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let vm_sock = pool.join("vm.sock");
    let _daemon = Daemon::start(&args, &[&vm_sock, &control]);
    assert_eq!(mode(&pool), 0o700, "the pool directory");
    assert_eq!(mode(&vm_sock), 0o600, "the export socket");
    assert_eq!(mode(&control), 0o600, "the control socket");

    let mut q = Qmp::connect(&control);
    let precious = dir.path().join("precious");
    std::fs::write(&precious, b"precious").unwrap();
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let long = format!("{}/{}", dir.path().display(), "x".repeat(120));
    let cases = [
        ("a regular file", precious.display().to_string()),
        ("a directory", dir.path().display().to_string()),
        ("a symlink to a file", link.display().to_string()),
        ("too long for sun_path", long),
        ("holding NUL", format!("{}/a\u{0}b", dir.path().display())),
        ("empty", String::new()),
    ];
    for (i, (what, path)) in cases.iter().enumerate() {
        let r = export_at(&mut q, &format!("bad{i}"), path);
        assert!(r.get("error").is_some(), "{what}: {r}");
    }
    assert_eq!(std::fs::read(&precious).unwrap(), b"precious");
    assert!(dir.path().is_dir());
    // The connection lives on and a good path works.
    let good = dir.path().join("good.sock");
    let r = export_at(&mut q, "good", good.to_str().unwrap());
    assert!(r.get("return").is_some(), "{r}");
    assert_eq!(mode(&good), 0o600, "a socket QMP created");
}
