//! Two exports of one thin device, as a live migration uses them (the source QEMU on one
//! socket, the destination on another): both accept their frontend, at most one runs rings at
//! a time, and the destination's requests run only once the source stopped its rings.
//! Frontends are the `vhost` crate's (tests/frontend/).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod frontend;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{pattern, Daemon, Qmp};
use frontend::{r, w, Desc, Vm};
use serde_json::json;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const OK: u8 = VIRTIO_BLK_S_OK as u8;

struct Pool {
    dir: tempfile::TempDir,
    control: PathBuf,
    _daemon: Daemon,
}

impl Pool {
    fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A pool with thin device `d` exported as `src` (and, with `dst_on_cli`, as `dst` too).
fn pool(dst_on_cli: bool) -> Pool {
    pool_with(dst_on_cli, &[])
}

/// [`pool`], with more arguments for `thinblk serve` (and their sockets to wait for).
fn pool_with(dst_on_cli: bool, extra: &[(String, Option<PathBuf>)]) -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let src = dir.path().join("src.sock");
    let dst = dir.path().join("dst.sock");
    let mut args: Vec<String> = vec![
        "--dir".into(),
        dir.path().join("pool").display().to_string(),
        "--data-size".into(),
        "64M".into(),
        "--metadata-size".into(),
        "8M".into(),
        "--control".into(),
        control.display().to_string(),
        "--export".into(),
        format!("name=d,size=16M,socket={},id=src,queues=1", src.display()),
    ];
    let mut sockets: Vec<&Path> = vec![&src, &control];
    if dst_on_cli {
        args.push("--export".into());
        args.push(format!("name=d,socket={},id=dst,queues=1", dst.display()));
        sockets.push(&dst);
    }
    for (arg, socket) in extra {
        args.push(arg.clone());
        if let Some(socket) = socket {
            sockets.push(socket);
        }
    }
    let daemon = Daemon::start(&args, &sockets);
    Pool {
        dir,
        control,
        _daemon: daemon,
    }
}

/// Puts one request on queue 0 and kicks; returns its status byte's address.
fn submit(vm: &mut Vm, kind: u32, sector: u64, data: &[Desc]) -> u64 {
    let h = vm.alloc(16);
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    vm.put(h, &hdr);
    let st = vm.alloc(1);
    vm.put(st, &[0xFF]);
    let chain: Vec<Desc> = [r(h, 16)]
        .into_iter()
        .chain(data.iter().copied())
        .chain([w(st, 1)])
        .collect();
    vm.add(0, &chain);
    vm.kick(0);
    st
}

fn write(vm: &mut Vm, sector: u64, bytes: &[u8]) {
    let buf = vm.alloc(bytes.len() as u64);
    vm.put(buf, bytes);
    let st = submit(vm, VIRTIO_BLK_T_OUT, sector, &[r(buf, bytes.len() as u32)]);
    vm.wait_used(0, 1);
    assert_eq!(vm.get(st, 1)[0], OK);
}

fn read(vm: &mut Vm, sector: u64, len: usize) -> Vec<u8> {
    let buf = vm.alloc(len as u64);
    let st = submit(vm, VIRTIO_BLK_T_IN, sector, &[w(buf, len as u32)]);
    vm.wait_used(0, 1);
    assert_eq!(vm.get(st, 1)[0], OK);
    vm.get(buf, len)
}

/// Which exports `query-block-exports` says are active.
fn active(q: &mut Qmp) -> Vec<String> {
    let list = q.ok("query-block-exports", json!({}));
    list.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["active"] == json!(true))
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// `to` has a request pending while `from` runs; `from` stops its ring (GET_VRING_BASE, as
/// the source QEMU does at switchover); only then does the request of `to` run, and it sees
/// what `from` wrote.
fn hand_over(from: &mut Vm, to: &mut Vm, sector: u64, q: &mut Qmp, ids: (&str, &str)) {
    let data = pattern(sector, sector * 512, 4096);
    write(from, sector, &data);
    assert_eq!(active(q), vec![ids.0.to_string()]);

    let buf = to.alloc(4096);
    let before = to.used_idx(0);
    let st = submit(to, VIRTIO_BLK_T_IN, sector, &[w(buf, 4096)]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(to.used_idx(0), before, "{} ran beside {}", ids.1, ids.0);
    assert_eq!(active(q), vec![ids.0.to_string()]);

    from.fe.get_vring_base(0).unwrap();
    to.wait_used(0, 1);
    assert_eq!(to.get(st, 1)[0], OK);
    assert_eq!(
        to.get(buf, 4096),
        data,
        "{} reads what {} wrote",
        ids.1,
        ids.0
    );
    assert_eq!(active(q), vec![ids.1.to_string()]);
}

#[test]
fn a_second_export_on_the_command_line_runs_only_after_the_first_stops_its_rings() {
    let p = pool(true);
    let mut q = Qmp::connect(&p.control);
    assert!(active(&mut q).is_empty(), "no rings started yet");
    let mut src = Vm::connect(&p.socket("src.sock"), 1);
    let mut dst = Vm::connect(&p.socket("dst.sock"), 1);
    hand_over(&mut src, &mut dst, 8, &mut q, ("src", "dst"));
    // The destination runs on; the source's frontend goes away.
    drop(src);
    assert_eq!(read(&mut dst, 8, 4096), pattern(8, 8 * 512, 4096));
}

#[test]
fn block_export_add_of_an_exported_device_migrates_there_and_back() {
    let p = pool(false);
    let mut q = Qmp::connect(&p.control);
    let dst_sock = p.socket("dst.sock");
    q.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "dst", "node-name": "d",
               "addr": {"type": "unix", "path": dst_sock}, "writable": true, "num-queues": 1}),
    );
    let err = q.exec(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "dst", "node-name": "d",
               "addr": {"type": "unix", "path": p.socket("other.sock")}, "writable": true}),
    );
    assert!(
        err.get("error").is_some(),
        "a second export with the same id: {err}"
    );

    let mut src = Vm::connect(&p.socket("src.sock"), 1);
    let mut dst = Vm::connect(&dst_sock, 1);
    hand_over(&mut src, &mut dst, 16, &mut q, ("src", "dst"));
    // A -> B -> A: the source QEMU's frontend comes back on its socket.
    drop(src);
    let mut back = Vm::connect(&p.socket("src.sock"), 1);
    hand_over(&mut dst, &mut back, 24, &mut q, ("dst", "src"));
    assert_eq!(read(&mut back, 16, 4096), pattern(16, 16 * 512, 4096));
}

#[test]
fn a_source_that_disconnects_without_stopping_its_rings_frees_the_device() {
    let p = pool(true);
    let mut q = Qmp::connect(&p.control);
    let mut src = Vm::connect(&p.socket("src.sock"), 1);
    write(&mut src, 0, &pattern(1, 0, 4096));
    let mut dst = Vm::connect(&p.socket("dst.sock"), 1);
    let buf = dst.alloc(4096);
    submit(&mut dst, VIRTIO_BLK_T_IN, 0, &[w(buf, 4096)]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(active(&mut q), vec!["src".to_string()]);
    drop(src); // a crashed source QEMU
    dst.wait_used(0, 1);
    assert_eq!(dst.get(buf, 4096), pattern(1, 0, 4096));
    assert_eq!(active(&mut q), vec!["dst".to_string()]);
}

/// A destination whose request waits for the source says so to its queue worker at once: on
/// a daemon with one worker for every queue, another disk's guest is served meanwhile (a
/// worker that waited there stopped every disk it served for as long as the source ran).
#[test]
fn a_queue_waiting_for_its_device_leaves_its_worker_to_other_disks() {
    let dir = tempfile::tempdir().unwrap();
    let other_sock = dir.path().join("other.sock");
    let p = pool_with(
        true,
        &[
            ("--workers".into(), None),
            ("1".into(), None),
            ("--export".into(), None),
            (
                format!(
                    "name=e,size=16M,socket={},id=other,queues=1",
                    other_sock.display()
                ),
                Some(other_sock.clone()),
            ),
        ],
    );
    let mut q = Qmp::connect(&p.control);
    let mut src = Vm::connect(&p.socket("src.sock"), 1);
    let data = pattern(5, 0, 4096);
    write(&mut src, 0, &data);
    let mut dst = Vm::connect(&p.socket("dst.sock"), 1);
    let buf = dst.alloc(4096);
    let st = submit(&mut dst, VIRTIO_BLK_T_IN, 0, &[w(buf, 4096)]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(dst.used_idx(0), 0, "dst ran beside src");

    let mut other = Vm::connect(&other_sock, 1);
    for sector in [0u64, 64, 128] {
        let bytes = pattern(sector + 100, sector * 512, 4096);
        write(&mut other, sector, &bytes);
        assert_eq!(read(&mut other, sector, 4096), bytes);
    }
    assert_eq!(dst.used_idx(0), 0, "dst ran beside src");
    let mut running = active(&mut q);
    running.sort();
    assert_eq!(running, vec!["other".to_string(), "src".to_string()]);

    src.fe.get_vring_base(0).unwrap();
    dst.wait_used(0, 1);
    assert_eq!(dst.get(st, 1)[0], OK);
    assert_eq!(dst.get(buf, 4096), data);
}
