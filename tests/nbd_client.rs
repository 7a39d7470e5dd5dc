//! thinblk's NBD client (the mirror's) against servers written by others: qemu-nbd over a
//! unix socket and over TCP, and a thinblk daemon's thin export in another process. Each test
//! fails when qemu-nbd is missing (THINBLK_SKIP_MISSING=1 skips instead).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod external;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Qmp};
use serde_json::json;
use thinblk::nbd::client::{ClientError, Command as Req, NbdClient, DEFAULT_IN_FLIGHT};

const SIZE: u64 = 16 << 20;

/// A `qemu-nbd` child serving a raw file, killed when dropped.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves `file` as export `disk` with holes punched on TRIM and zero-writes that may unmap
/// (`--discard=unmap`), over `listen` (`-k PATH` or `-b HOST -p PORT`).
fn qemu_nbd(file: &Path, listen: &[&str]) -> QemuNbd {
    let tool = external::tool("qemu-nbd");
    let child = Command::new(tool)
        .args(["-f", "raw", "-x", "disk", "--persistent", "--shared=4"])
        .args(["--discard=unmap", "--cache=none", "--aio=threads"])
        .args(listen)
        .arg(file)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    QemuNbd(child)
}

/// Connects to `uri`, retrying while the server starts.
fn connect(uri: &str) -> NbdClient {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match NbdClient::connect_uri(uri, DEFAULT_IN_FLIGHT) {
            Ok(c) => return c,
            Err(ClientError::Connect(..)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("connecting to {uri}: {e}"),
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (seed.wrapping_mul(31) ^ (i / 512)) as u8 | 1)
        .collect()
}

fn scratch_file(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
    p
}

/// Writes 4 MiB in 64 KiB pieces, all in flight at once, then makes the first MiB a hole
/// with TRIM and the second with WRITE_ZEROES, and checks what it reads back.
fn exercise(c: &NbdClient) {
    assert_eq!(c.size(), SIZE);
    let chunk = 64 << 10;
    for i in 0..64u64 {
        let data = pattern(i, chunk);
        c.submit(
            Req::Write {
                offset: i * chunk as u64,
                data: &data,
                fua: false,
            },
            Box::new(|r| assert!(r.is_ok(), "write: {r:?}")),
        )
        .unwrap();
    }
    c.drain();
    c.flush().unwrap();
    for i in (0..64u64).step_by(9) {
        assert_eq!(
            c.read(i * chunk as u64, chunk as u32).unwrap(),
            pattern(i, chunk)
        );
    }
    c.trim(0, 1 << 20).unwrap();
    c.write_zeroes(1 << 20, 1 << 20).unwrap();
    c.flush().unwrap();
    assert_eq!(c.read(0, 2 << 20).unwrap(), vec![0u8; 2 << 20]);
    assert_eq!(c.read(2 << 20, chunk as u32).unwrap(), pattern(32, chunk));
}

#[test]
fn the_client_writes_through_qemu_nbd_on_a_unix_socket_and_leaves_holes() {
    let dir = tempfile::tempdir().unwrap();
    let file = scratch_file(dir.path());
    let sock = dir.path().join("nbd.sock");
    let _server = qemu_nbd(&file, &["-k", sock.to_str().unwrap()]);
    let c = connect(&format!("nbd+unix:///disk?socket={}", sock.display()));
    exercise(&c);
    c.close().unwrap();
    // The trimmed and zeroed MiBs take no space in the file: 2 MiB of data are left.
    let used = std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(used <= (2 << 20) + (64 << 10), "{used} bytes allocated");
    let content = std::fs::read(&file).unwrap();
    assert_eq!(&content[3 << 20..(3 << 20) + 4096], &pattern(48, 4096)[..]);
}

#[test]
fn the_client_writes_through_qemu_nbd_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let file = scratch_file(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let _server = qemu_nbd(&file, &["-b", "127.0.0.1", "-p", &port]);
    let c = connect(&format!("nbd://127.0.0.1:{port}/disk"));
    exercise(&c);
    c.close().unwrap();
}

#[test]
fn the_client_writes_into_another_thinblks_thin_export_and_holes_stay_unmapped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let nbd = d.join("nbd.sock");
    let control = d.join("control.sock");
    let args: Vec<String> = vec![
        "--dir".into(),
        d.display().to_string(),
        "--data-size".into(),
        "256M".into(),
        "--nbd".into(),
        nbd.display().to_string(),
    ];
    let _daemon = Daemon::start(&args, &[&nbd, &control]);
    let mut qmp = Qmp::connect(&control);
    qmp.ok("thin-create", json!({"name": "dst", "size": SIZE}));
    qmp.ok(
        "nbd-server-add",
        json!({"device": "dst", "name": "disk", "writable": true}),
    );
    let c = connect(&format!("nbd+unix:///disk?socket={}", nbd.display()));
    exercise(&c);
    c.close().unwrap();
    // Only the 2 MiB of data past the hole and the zeroes are mapped.
    let devs = qmp.ok("query-thin-devices", json!({}));
    let dst = devs
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "dst")
        .unwrap()
        .clone();
    let mapped = dst["mapped-bytes"].as_u64().expect("mapped-bytes");
    assert_eq!(mapped, 2 << 20, "{dst}");
}
