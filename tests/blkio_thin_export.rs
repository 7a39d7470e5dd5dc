//! Thin exports driven by libblkio's vhost-user-blk driver.

mod common;

use std::path::{Path, PathBuf};

use blkio::ReqFlags;
use common::*;

const DISK: u64 = 32 << 20;

fn thin_args(dir: &Path, exports: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--dir".to_string(),
        dir.display().to_string(),
        "--metadata-size".into(),
        "16M".into(),
        "--data-size".into(),
        "256M".into(),
    ];
    for e in exports {
        args.push("--export".into());
        args.push((*e).to_string());
    }
    args
}

fn sock(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// A daemon serving one new thin disk `vm` of DISK bytes with `queues` queues, and a client.
fn one_new_disk(queues: i32) -> (tempfile::TempDir, Daemon, Client) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let d = dir.path();
    let spec = format!("name=vm,size={DISK},queues={queues}");
    let daemon = Daemon::start(&thin_args(d, &[&spec]), &[&sock(d, "vm")]);
    let c = Client::connect(&sock(d, "vm"), queues);
    (dir, daemon, c)
}

fn write_at(c: &mut Client, q: usize, at: usize, offset: u64, data: &[u8]) {
    c.buf()[at..at + data.len()].copy_from_slice(data);
    let p = c.buf_ptr(at);
    assert_eq!(
        write(&mut c.queues[q], p, offset, data.len()),
        0,
        "write at {offset}"
    );
}

fn read_at(c: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    let p = c.buf_ptr(0);
    assert_eq!(
        read(&mut c.queues[0], p, offset, len),
        0,
        "read at {offset}"
    );
    c.buf()[..len].to_vec()
}

#[test]
fn a_thin_disk_reads_zeros_until_written_and_keeps_data_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = format!("name=vm,size={DISK}");
    let daemon = Daemon::start(&thin_args(d, &[&spec]), &[&sock(d, "vm")]);
    let mut c = Client::connect(&sock(d, "vm"), 1);
    assert_eq!(c.capacity(), DISK);
    assert_eq!(read_at(&mut c, 0, 1 << 20), vec![0; 1 << 20]);
    // Pieces that start and end inside 64 KiB blocks, and one that spans several.
    let cases: &[(u64, usize)] = &[
        (512, 512),
        (65536 - 512, 1024),
        (3 << 20, 300 << 10),
        (DISK - 4096, 4096),
    ];
    let mut written = Vec::new();
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, off, len);
        write_at(&mut c, 0, 0, off, &data);
        written.push((off, data));
    }
    for (off, data) in &written {
        assert_eq!(&read_at(&mut c, *off, data.len()), data);
    }
    // Around the first write, the rest of its block reads zeros.
    assert_eq!(read_at(&mut c, 0, 512), vec![0; 512]);
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    drop(c);
    drop(daemon);
    let _daemon = Daemon::start(&thin_args(d, &["name=vm"]), &[&sock(d, "vm")]);
    let mut c = Client::connect(&sock(d, "vm"), 1);
    for (off, data) in &written {
        assert_eq!(&read_at(&mut c, *off, data.len()), data, "after restart");
    }
}

#[test]
fn discard_and_write_zeroes_give_blocks_back() {
    let (_dir, _daemon, mut c) = one_new_disk(1);
    let data = pattern(9, 0, 1 << 20);
    write_at(&mut c, 0, 0, 0, &data);
    c.queues[0].discard(0, 256 << 10, 0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    c.queues[0].write_zeroes(512 << 10, 100 << 10, 0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    let got = read_at(&mut c, 0, 1 << 20);
    assert!(got[..256 << 10].iter().all(|&b| b == 0));
    assert_eq!(got[256 << 10..512 << 10], data[256 << 10..512 << 10]);
    assert!(got[512 << 10..612 << 10].iter().all(|&b| b == 0));
    assert_eq!(got[612 << 10..], data[612 << 10..]);
}

#[test]
fn first_writes_from_two_queues_into_the_same_blocks_lose_nothing() {
    let (_dir, _daemon, mut c) = one_new_disk(2);
    let base = c.region.addr;
    let mut queues = std::mem::take(&mut c.queues);
    let q1 = queues.pop().unwrap();
    let q0 = queues.pop().unwrap();
    // Each queue writes its own 4 KiB half of every 8 KiB in unprovisioned blocks, so both
    // race to provision the same 64 KiB blocks.
    let workers: Vec<_> = [q0, q1]
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || {
                let buf = (base + qi * (REGION_LEN / 2)) as *mut u8;
                for i in 0..256u64 {
                    let off = i * 8192 + qi as u64 * 4096;
                    let data = pattern(qi as u64, off, 4096);
                    // SAFETY: this thread alone uses its half of the mapped region.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, 4096) };
                    assert_eq!(write(&mut q, buf, off, 4096), 0);
                }
                q
            })
        })
        .collect();
    c.queues = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let got = read_at(&mut c, 0, 256 * 8192);
    for i in 0..256u64 {
        for qi in 0..2u64 {
            let off = i * 8192 + qi * 4096;
            assert_eq!(
                &got[off as usize..off as usize + 4096],
                &pattern(qi, off, 4096)[..],
                "at {off}"
            );
        }
    }
}

#[test]
fn a_snapshot_export_keeps_the_data_of_when_it_was_taken() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let origin = pattern(1, 0, 256 << 10);
    {
        let _daemon = Daemon::start(
            &thin_args(d, &[&format!("name=vm,size={DISK}")]),
            &[&sock(d, "vm")],
        );
        let mut c = Client::connect(&sock(d, "vm"), 1);
        write_at(&mut c, 0, 0, 0, &origin);
    }
    let _daemon = Daemon::start(
        &thin_args(d, &["name=vm", "name=snap,snapshot-of=vm,readonly=on"]),
        &[&sock(d, "vm"), &sock(d, "snap")],
    );
    let mut vm = Client::connect(&sock(d, "vm"), 1);
    write_at(&mut vm, 0, 0, 4096, &[0xEE; 8192]);
    let mut snap = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    snap.set_str("path", sock(d, "snap").to_str().unwrap())
        .unwrap();
    snap.set_bool("read-only", true).unwrap();
    snap.connect().unwrap();
    let mut q = snap.start().unwrap().queues.pop().unwrap();
    let region = snap.alloc_mem_region(1 << 20).unwrap();
    snap.map_mem_region(&region).unwrap();
    assert_eq!(read(&mut q, region.addr as *mut u8, 0, 256 << 10), 0);
    // SAFETY: the region is mapped for the client's lifetime and no request is in flight.
    let got = unsafe { std::slice::from_raw_parts(region.addr as *const u8, 256 << 10) };
    assert_eq!(
        got,
        &origin[..],
        "the snapshot changed when its origin was written"
    );
    assert_eq!(&read_at(&mut vm, 4096, 8192), &[0xEE; 8192]);
}

#[test]
fn first_writes_in_flight_together_land_whole_with_zeros_around() {
    let (_dir, _daemon, mut c) = one_new_disk(1);
    const BS: u64 = 64 << 10;
    // Partial writes into fresh blocks, several into one block at once, and whole blocks:
    // all submitted before any is waited for.
    let mut writes: Vec<(u64, usize)> = (0..24u64)
        .map(|i| (i * BS + (i * 12288) % BS, 4096))
        .collect();
    writes.extend((0..12u64).map(|k| (30 * BS + k * 4096 + 1024, 1024)));
    writes.extend((0..6u64).map(|k| ((40 + k) * BS, BS as usize)));
    writes.push((47 * BS + BS / 2, BS as usize));
    let mut expect = vec![0u8; (50 * BS) as usize];
    let mut at = 0usize;
    for (seed, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(seed as u64 + 7, off, len);
        expect[off as usize..off as usize + len].copy_from_slice(&data);
        c.buf()[at..at + len].copy_from_slice(&data);
        let p = c.buf_ptr(at);
        c.queues[0].write(off, p, len, 0, ReqFlags::empty());
        at += len;
    }
    assert!(at <= REGION_LEN);
    for _ in &writes {
        assert_eq!(wait_one(&mut c.queues[0]), 0);
    }
    let mut got = Vec::new();
    for part in 0..(50 * BS / (1 << 20)) + 1 {
        let off = part * (1 << 20);
        let len = (1u64 << 20).min(50 * BS - off) as usize;
        if len > 0 {
            got.extend(read_at(&mut c, off, len));
        }
    }
    for (i, (g, e)) in got.chunks(4096).zip(expect.chunks(4096)).enumerate() {
        assert_eq!(g, e, "4 KiB piece {i} (block {})", i as u64 * 4096 / BS);
    }
}
