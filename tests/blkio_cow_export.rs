//! COW and thin external-origin exports driven by libblkio's vhost-user-blk driver: the
//! guest's writes land in the store or the pool, the origin file never changes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use blkio::ReqFlags;
use common::*;

const ORIGIN: u64 = 8 << 20;

fn write_at(c: &mut Client, offset: u64, data: &[u8]) {
    c.buf()[..data.len()].copy_from_slice(data);
    let p = c.buf_ptr(0);
    assert_eq!(write(&mut c.queues[0], p, offset, data.len()), 0);
}

fn read_at(c: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    let p = c.buf_ptr(0);
    assert_eq!(read(&mut c.queues[0], p, offset, len), 0);
    c.buf()[..len].to_vec()
}

fn flush(c: &mut Client) {
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
}

fn golden(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("golden.raw");
    let bytes = pattern(77, 0, ORIGIN as usize);
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

/// Writes through the export at `sock`, checks, restarts with `args`, checks again.
/// Returns what the disk holds.
fn writes_survive_and_spare_the_origin(
    args: Vec<String>,
    sock: &Path,
    origin: &Path,
    bytes: &[u8],
) -> Vec<u8> {
    let daemon = Daemon::start(&args, &[sock]);
    let mut c = Client::connect(sock, 1);
    assert_eq!(c.capacity(), ORIGIN);
    assert_eq!(read_at(&mut c, 0, 1 << 20), bytes[..1 << 20]);
    let mut model = bytes.to_vec();
    for (i, &(off, len)) in [
        (512u64, 512usize),
        (100 << 10, 200 << 10),
        (ORIGIN - 4096, 4096),
    ]
    .iter()
    .enumerate()
    {
        let data = pattern(i as u64 + 1, off, len);
        write_at(&mut c, off, &data);
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    flush(&mut c);
    assert_eq!(read_at(&mut c, 0, 1 << 20), model[..1 << 20]);
    drop(c);
    drop(daemon);
    let _daemon = Daemon::start(&args, &[sock]);
    let mut c = Client::connect(sock, 1);
    for at in (0..ORIGIN).step_by(1 << 20) {
        let got = read_at(&mut c, at, 1 << 20);
        assert_eq!(
            got,
            model[at as usize..at as usize + (1 << 20)],
            "after restart at {at}"
        );
    }
    assert_eq!(std::fs::read(origin).unwrap(), bytes, "the origin changed");
    model
}

#[test]
fn a_cow_export_keeps_writes_in_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (origin, bytes) = golden(d);
    let sock = d.join("cow.sock");
    let spec = format!(
        "cow={},store={},chunk-size=16K,socket={}",
        origin.display(),
        d.join("snap.cow").display(),
        sock.display()
    );
    let model =
        writes_survive_and_spare_the_origin(vec!["--export".into(), spec], &sock, &origin, &bytes);
    let header = std::fs::read(d.join("snap.cow")).unwrap();
    assert_eq!(&header[..4], b"SnAp");
    // With no daemon serving it, the snapshot folds into its origin.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .args(["merge", "--origin"])
        .arg(&origin)
        .arg("--store")
        .arg(d.join("snap.cow"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&origin).unwrap(), model);
}

#[test]
fn a_thin_export_with_an_external_origin_reads_it_until_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (origin, bytes) = golden(d);
    let sock = d.join("vm.sock");
    let args = vec![
        "--dir".to_string(),
        d.join("pool").display().to_string(),
        "--metadata-size".into(),
        "16M".into(),
        "--data-size".into(),
        "64M".into(),
        "--export".into(),
        format!(
            "name=vm,origin={},socket={}",
            origin.display(),
            sock.display()
        ),
    ];
    writes_survive_and_spare_the_origin(args, &sock, &origin, &bytes);
}
