//! The NBD server with clients written by others: qemu-img, qemu-io (QEMU's nbd block
//! driver), nbdinfo and nbdcopy (libnbd). Each test fails when its tool is missing
//! (scripts/install-deps.sh installs them; a missing one fails the test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod external;

use std::path::PathBuf;
use std::process::Command;

use common::{Daemon, Qmp};
use serde_json::json;

const SIZE: u64 = 64 << 20;

struct Setup {
    dir: tempfile::TempDir,
    _daemon: Daemon,
    qmp: Qmp,
}

impl Setup {
    fn nbd_socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }
    fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket().display()
        )
    }
}

/// A daemon with thin disk `vm` (64 MiB), its NBD server on a unix socket (which exports
/// `vm` read-only, as `--nbd` does) and its QMP socket.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args: Vec<String> = vec![
        "--dir".into(),
        d.display().to_string(),
        "--data-size".into(),
        "1G".into(),
        "--export".into(),
        format!("name=vm,size={SIZE},socket={}", d.join("vm.sock").display()),
        "--nbd".into(),
        d.join("nbd.sock").display().to_string(),
    ];
    let control = d.join("control.sock");
    let daemon = Daemon::start(&args, &[&d.join("nbd.sock"), &control]);
    let qmp = Qmp::connect(&control);
    Setup {
        dir,
        _daemon: daemon,
        qmp,
    }
}

/// Runs `tool ARGS`; its stdout. A missing tool fails the test.
fn run(tool: &str, args: &[&str]) -> String {
    let path = external::tool(tool);
    let out = Command::new(&path).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io` commands on an export through QEMU's nbd block driver; each must succeed.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_opts(uri, &[], cmds)
}

fn qemu_io_opts(uri: &str, opts: &[&str], cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    args.extend(opts);
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = run("qemu-io", &args);
    // qemu-io reports a failed command on stdout and still exits 0.
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification") && !out.contains("error"),
        "qemu-io: {out}"
    );
    out
}

/// The data ranges of `nbdinfo --map` (merged), in bytes.
fn data_ranges(map: &str) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, kind): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        if kind & 1 == 0 {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => out.push((off, len)),
            }
        }
    }
    out
}

/// The byte ranges `thin-delta` reports (merged).
fn delta_ranges(qmp: &mut Qmp, base: &str, target: &str) -> Vec<(u64, u64)> {
    let d = qmp.ok("thin-delta", json!({"base": base, "target": target}));
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in d["ranges"].as_array().unwrap() {
        let (off, len) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// Scattered writes: whole blocks, parts of blocks, one across a block boundary.
const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 1M 4k",
    "write -P 0x33 5M 200k",
    "write -P 0x44 20M 512",
    "write -P 0x55 63M 1M",
];

#[test]
fn qemu_io_writes_and_reads_back_through_a_writable_export() {
    let mut s = setup();
    s.qmp.ok(
        "nbd-server-add",
        json!({"device": "vm", "name": "rw", "writable": true}),
    );
    let uri = s.uri("rw");
    qemu_io(&uri, WRITES);
    qemu_io(
        &uri,
        &[
            "read -P 0x11 0 64k",
            "read -P 0x22 1M 4k",
            "read -P 0 1052672 60k",
            "read -P 0x33 5M 200k",
            "read -P 0x44 20M 512",
            "read -P 0x55 63M 1M",
            // FUA writes, write-zeroes (unmapping, and NO_HOLE), discard, flush.
            "write -f -P 0x66 2M 128k",
            "read -P 0x66 2M 128k",
            "write -z -u 5M 64k",
            "read -P 0 5M 64k",
            "read -P 0x33 5308416 136k",
            "write -z 20M 4k",
            "read -P 0 20M 4k",
            "discard 63M 1M",
            "flush",
        ],
    );
    // The vhost export's disk is the same device: a second client sees what the first wrote.
    // (read-only, as `--nbd` exports it).
    qemu_io_opts(&s.uri("vm"), &["-r"], &["read -P 0x66 2M 128k"]);
}

#[test]
fn nbdinfo_map_of_a_snapshot_equals_its_thin_mapping() {
    let mut s = setup();
    s.qmp.ok(
        "nbd-server-add",
        json!({"device": "vm", "name": "rw", "writable": true}),
    );
    qemu_io(&s.uri("rw"), WRITES);
    s.qmp
        .ok("thin-snapshot", json!({"device": "vm", "name": "snap"}));
    s.qmp
        .ok("thin-create", json!({"name": "empty", "size": SIZE}));
    s.qmp.ok("nbd-server-add", json!({"device": "snap"}));
    let map = run("nbdinfo", &["--map", &s.uri("snap")]);
    let mapped = delta_ranges(&mut s.qmp, "empty", "snap");
    assert!(!mapped.is_empty());
    assert_eq!(data_ranges(&map), mapped, "nbdinfo --map:\n{map}");
}

#[test]
fn an_incremental_map_lists_only_what_changed_since_the_base() {
    let mut s = setup();
    s.qmp.ok(
        "nbd-server-add",
        json!({"device": "vm", "name": "rw", "writable": true}),
    );
    qemu_io(&s.uri("rw"), WRITES);
    s.qmp
        .ok("thin-snapshot", json!({"device": "vm", "name": "base"}));
    qemu_io(
        &s.uri("rw"),
        &[
            "write -P 0x77 1M 4k",
            "write -P 0x78 30M 128k",
            "discard 63M 1M",
        ],
    );
    s.qmp
        .ok("thin-snapshot", json!({"device": "vm", "name": "now"}));
    s.qmp.ok(
        "nbd-server-add",
        json!({"device": "now", "name": "inc", "bitmap": "base"}),
    );
    let map = run("nbdinfo", &["--map=qemu:dirty-bitmap:base", &s.uri("inc")]);
    // Dirty is flag 1 in this context: the "data" ranges of `data_ranges` are the clean ones,
    // so collect the dirty ones directly.
    let mut dirty: Vec<(u64, u64)> = Vec::new();
    for line in map.lines() {
        let f: Vec<u64> = line
            .split_whitespace()
            .take(3)
            .map(|x| x.parse().unwrap())
            .collect();
        if f[2] & 1 == 1 {
            match dirty.last_mut() {
                Some(last) if last.0 + last.1 == f[0] => last.1 += f[1],
                _ => dirty.push((f[0], f[1])),
            }
        }
    }
    assert_eq!(
        dirty,
        delta_ranges(&mut s.qmp, "base", "now"),
        "map:\n{map}"
    );
    assert_eq!(dirty.len(), 3, "map:\n{map}");
}

#[test]
fn qemu_img_and_nbdcopy_copy_a_snapshot_export_exactly() {
    let mut s = setup();
    s.qmp.ok(
        "nbd-server-add",
        json!({"device": "vm", "name": "rw", "writable": true}),
    );
    qemu_io(&s.uri("rw"), WRITES);
    s.qmp
        .ok("thin-snapshot", json!({"device": "vm", "name": "snap"}));
    s.qmp.ok("nbd-server-add", json!({"device": "snap"}));
    let uri = s.uri("snap");
    let info = run("qemu-img", &["info", &uri]);
    assert!(info.contains(&format!("{SIZE} bytes")), "{info}");
    let raw = s.dir.path().join("copy.raw");
    let raw_s = raw.display().to_string();
    run("qemu-img", &["convert", "-O", "raw", &uri, &raw_s]);
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &uri, &raw_s],
    );
    let copy2 = s.dir.path().join("copy2.raw");
    run("nbdcopy", &[&uri, &copy2.display().to_string()]);
    assert_eq!(std::fs::read(&raw).unwrap(), std::fs::read(&copy2).unwrap());
    // And back into a writable export of a fresh disk: the same bytes.
    s.qmp
        .ok("thin-create", json!({"name": "restored", "size": SIZE}));
    s.qmp.ok(
        "nbd-server-add",
        json!({"device": "restored", "writable": true}),
    );
    run("nbdcopy", &[&raw_s, &s.uri("restored")]);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &s.uri("restored"),
            &raw_s,
        ],
    );
}

#[test]
fn the_server_restarts_on_tcp_and_qemu_img_reads_over_it() {
    let mut s = setup();
    s.qmp.ok("nbd-server-stop", json!({}));
    // A port unlikely to be taken; the test fails clearly if it is.
    let port = 20000 + (std::process::id() % 20000);
    let addr = json!({"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}});
    s.qmp.ok("nbd-server-start", json!({"addr": addr}));
    let r = s.qmp.exec("nbd-server-start", json!({"addr": addr}));
    assert!(r.get("error").is_some(), "a second server: {r}");
    s.qmp.ok("nbd-server-add", json!({"device": "vm"}));
    let uri = format!("nbd://127.0.0.1:{port}/vm");
    let info = run("qemu-img", &["info", &uri]);
    assert!(info.contains(&format!("{SIZE} bytes")), "{info}");
    let map = run("nbdinfo", &["--map", &uri]);
    assert_eq!(data_ranges(&map), vec![], "a fresh disk is all hole: {map}");
    let r = s.qmp.exec(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "/x"}}, "tls-creds": "tls0"}),
    );
    assert!(r["error"]["desc"].as_str().unwrap().contains("TLS"), "{r}");
}
