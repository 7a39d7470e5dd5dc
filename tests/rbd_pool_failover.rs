//! A thin pool whose metadata and data devices are RBD images, driven through libblkio's
//! vhost-user-blk driver: it serves a thin disk; a second daemon told to take it over (after
//! the owner was killed, or while the owner is alive but stopped) sees every flushed write;
//! the old owner is refused, or, fenced while stopped, cannot write once it runs again; and the
//! metadata image, exported with `rbd export`, passes thin_check.
//!
//! Needs a Ceph cluster: THINBLK_CEPH_CONF names its ceph.conf (scripts/test.sh starts one with
//! scripts/ceph-cluster.sh, pool `thinblk`). A test fails when it is not set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod external;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CEPH_CONF: &str = "THINBLK_CEPH_CONF";
/// The pool scripts/ceph-cluster.sh creates.
const RBD_POOL: &str = "thinblk";
const DISK: u64 = 32 << 20;

fn ceph_conf() -> String {
    std::env::var(CEPH_CONF).unwrap_or_else(|_| {
        panic!(
            "{CEPH_CONF} is not set: it names the ceph.conf of a test cluster \
             (bash scripts/ceph-cluster.sh start DIR; scripts/test.sh does it)"
        )
    })
}

/// A pool's two images, named for this test and process so runs never share them.
struct Images {
    meta: String,
    data: String,
}

fn images(test: &str) -> Images {
    let tag = format!("{test}-{}", std::process::id());
    Images {
        meta: format!("{RBD_POOL}/{tag}-meta"),
        data: format!("{RBD_POOL}/{tag}-data"),
    }
}

/// `serve` arguments for the pool in `imgs` (catalog in `dir`), exporting the thin disk `vm`
/// at `sock`, with its QMP socket at `control`.
fn serve_args(
    dir: &Path,
    imgs: &Images,
    sock: &Path,
    control: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--dir".into(),
        dir.display().to_string(),
        "--metadata".into(),
        format!("rbd:{}", imgs.meta),
        "--data".into(),
        format!("rbd:{}", imgs.data),
        "--metadata-size".into(),
        "16M".into(),
        "--data-size".into(),
        "256M".into(),
        "--ceph-conf".into(),
        ceph_conf(),
        "--control".into(),
        control.display().to_string(),
        "--export".into(),
        format!("name=vm,size={DISK},socket={}", sock.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Asserts `got == want`, naming the first byte that differs (not printing megabytes).
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {i} of {} is {} instead of {}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill with the pid of a child we have not reaped and a valid signal number has no
    // memory effects.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill {pid} {sig}");
}

/// Whether the process runs (or is stopped), rather than being gone or a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// Runs `thinblk serve ARGS` expecting it to refuse to start: returns what it printed on
/// stderr once it exited unsuccessfully (within 60 s).
fn refused(args: &[String]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn thinblk");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("thinblk was not refused: still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "thinblk started: {err}");
    err
}

/// The client address of `image`'s exclusive lock owner (`rbd lock ls`).
fn lock_owner(image: &str) -> String {
    let rbd = external::tool("rbd");
    let out = Command::new(rbd)
        .args([
            "--conf",
            &ceph_conf(),
            "lock",
            "ls",
            "--format",
            "json",
            image,
        ])
        .output()
        .expect("run rbd lock ls");
    assert!(out.status.success(), "rbd lock ls {image}");
    let locks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    locks[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no lock owner of {image}: {locks}"))
        .to_string()
}

/// The cluster's blocklist, as `ceph osd blocklist ls` prints it.
fn blocklist() -> String {
    let ceph = external::tool("ceph");
    let out = Command::new(ceph)
        .args(["--conf", &ceph_conf(), "osd", "blocklist", "ls"])
        .output()
        .expect("run ceph osd blocklist ls");
    assert!(out.status.success(), "ceph osd blocklist ls");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exports the metadata image with `rbd export` and runs thin_check on the copy.
fn thin_check_image(dir: &Path, image: &str) {
    let rbd = external::tool("rbd");
    let thin_check = external::tool("thin_check");
    let copy: PathBuf = dir.join("metadata.export");
    let out = Command::new(rbd)
        .args(["--conf", &ceph_conf(), "export", image])
        .arg(&copy)
        .output()
        .expect("run rbd export");
    assert!(
        out.status.success(),
        "rbd export {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(thin_check).arg(&copy).output().unwrap();
    assert!(
        out.status.success(),
        "thin_check on rbd:{image}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_take_over_after_the_owner_is_killed_sees_every_flushed_write_and_the_old_owner_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let imgs = images("killed");
    let (sock_a, control_a) = (d.join("a.sock"), d.join("a-control.sock"));
    let (sock_b, control_b) = (d.join("b.sock"), d.join("b-control.sock"));
    let args_a = serve_args(d, &imgs, &sock_a, &control_a, &[]);

    let owner = Daemon::start(&args_a, &[&sock_a]);
    let mut c = Client::connect(&sock_a, 1);
    assert_eq!(c.capacity(), DISK);
    assert_same(
        &read_at(&mut c, 0, 1 << 20),
        &vec![0; 1 << 20],
        "a new disk",
    );
    // Whole blocks, pieces of blocks, and a piece across a block boundary.
    let cases: &[(u64, usize)] = &[
        (128 << 10, 64 << 10),
        (512, 512),
        ((1 << 20) - 4096, 8192),
        (3 << 20, 300 << 10),
        (DISK - 4096, 4096),
    ];
    let mut flushed = Vec::new();
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, off, len);
        assert_eq!(write_at(&mut c, off, &data), 0, "write at {off}");
        flushed.push((off, data));
    }
    // Overwrites of what is there already, and first writes, then the FLUSH that makes them
    // all durable.
    let again = pattern(99, 512, 512);
    assert_eq!(write_at(&mut c, 512, &again), 0);
    flushed[1].1 = again;
    assert_eq!(flush(&mut c), 0, "flush");
    // Written after the last FLUSH: may or may not survive, so not checked.
    assert_eq!(write_at(&mut c, 8 << 20, &pattern(7, 8 << 20, 65536)), 0);
    drop(c);
    owner.kill9();

    let taker = Daemon::start(
        &serve_args(d, &imgs, &sock_b, &control_b, &["--take-over"]),
        &[&sock_b],
    );
    let mut c = Client::connect(&sock_b, 1);
    for (off, data) in &flushed {
        let got = read_at(&mut c, *off, data.len());
        assert_same(&got, data, &format!("after the take-over, at {off}"));
    }
    // The new owner writes and flushes as any owner does.
    let mine = pattern(42, 5 << 20, 65536);
    assert_eq!(write_at(&mut c, 5 << 20, &mine), 0);
    assert_eq!(flush(&mut c), 0);
    drop(c);

    // The old owner, started again as it was (no --take-over), is refused and says by whom.
    let err = refused(&args_a);
    assert!(
        err.contains("is owned by") && err.contains("--take-over"),
        "refusal does not name the owner: {err}"
    );

    drop(taker);
    thin_check_image(d, &imgs.meta);
    // A clean stop gave the locks up: the next daemon starts without --take-over.
    let again = Daemon::start(&args_a, &[&sock_a]);
    let mut c = Client::connect(&sock_a, 1);
    assert_same(
        &read_at(&mut c, 5 << 20, 65536),
        &mine,
        "after a clean stop",
    );
    drop(c);
    drop(again);
}

#[test]
fn a_stopped_owner_is_fenced_by_a_take_over_and_cannot_write_when_it_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let imgs = images("stopped");
    let (sock_a, control_a) = (d.join("a.sock"), d.join("a-control.sock"));
    let (sock_b, control_b) = (d.join("b.sock"), d.join("b-control.sock"));

    let owner = Daemon::start(&serve_args(d, &imgs, &sock_a, &control_a, &[]), &[&sock_a]);
    let mut old = Client::connect(&sock_a, 1);
    let first = pattern(1, 0, 65536);
    assert_eq!(write_at(&mut old, 0, &first), 0);
    assert_eq!(flush(&mut old), 0);

    let old_client = lock_owner(&imgs.meta);
    assert_eq!(
        lock_owner(&imgs.data),
        old_client,
        "one client owns both images"
    );

    // Alive but not running: as a host that lost its network, or hangs.
    signal(owner.pid(), libc::SIGSTOP);
    let taker = Daemon::start(
        &serve_args(d, &imgs, &sock_b, &control_b, &["--take-over"]),
        &[&sock_b],
    );
    // Fenced before the new owner served anything (not later, by librbd on a timeout).
    assert!(
        blocklist().contains(&old_client),
        "{old_client} is not blocklisted once the take-over serves"
    );
    assert_ne!(lock_owner(&imgs.meta), old_client);
    let mut new = Client::connect(&sock_b, 1);
    assert_same(&read_at(&mut new, 0, 65536), &first, "after the take-over");
    let second = pattern(2, 1 << 20, 65536);
    assert_eq!(write_at(&mut new, 1 << 20, &second), 0);
    assert_eq!(flush(&mut new), 0);

    signal(owner.pid(), libc::SIGCONT);
    // An overwrite of a mapped block, and a first write: neither may reach the pool, so one of
    // the writes or the FLUSH after them fails.
    let stale = pattern(3, 0, 65536);
    let results = [
        write_at(&mut old, 0, &stale),
        write_at(&mut old, 2 << 20, &stale),
        flush(&mut old),
    ];
    assert!(
        results.iter().any(|&r| r != 0),
        "the fenced owner completed its writes and FLUSH: {results:?}"
    );
    // Its commit timer has had time to try; the pool is the new owner's.
    std::thread::sleep(Duration::from_secs(2));
    assert_same(
        &read_at(&mut new, 0, 65536),
        &first,
        "block 0 after the fenced write",
    );
    assert_same(
        &read_at(&mut new, 1 << 20, 65536),
        &second,
        "the new owner's write",
    );
    assert_same(
        &read_at(&mut new, 2 << 20, 65536),
        &[0; 65536],
        "the fenced first write",
    );
    assert!(alive(owner.pid()), "the fenced daemon died");
    drop(old);
    drop(owner);

    assert_eq!(flush(&mut new), 0, "the new owner still commits");
    drop(new);
    drop(taker);
    thin_check_image(d, &imgs.meta);
}
