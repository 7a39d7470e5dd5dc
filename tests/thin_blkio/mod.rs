//! The scenarios of a thin export driven through libblkio's vhost-user-blk driver, written once
//! for any pool: tests/blkio_thin_export.rs runs them on a pool of files, tests/blkio_rbd_pool.rs
//! on a pool whose devices are RBD images. A scenario gets the `serve` arguments that open its
//! pool and adds the exports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use blkio::ReqFlags;

use crate::common::*;

/// The `serve` arguments that open a test's pool, given the test's own directory (its files,
/// or the catalog beside RBD images). The same on every call within one test, so a restarted
/// daemon opens the same pool.
pub type PoolArgs<'a> = &'a dyn Fn(&Path) -> Vec<String>;

const DISK: u64 = 32 << 20;

fn thin_args(pool: PoolArgs, dir: &Path, exports: &[&str]) -> Vec<String> {
    let mut args = pool(dir);
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
fn one_new_disk(pool: PoolArgs, queues: i32) -> (tempfile::TempDir, Daemon, Client) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let d = dir.path();
    let spec = format!("name=vm,size={DISK},queues={queues}");
    let daemon = Daemon::start(&thin_args(pool, d, &[&spec]), &[&sock(d, "vm")]);
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

pub fn a_thin_disk_reads_zeros_until_written_and_keeps_data_across_restarts(pool: PoolArgs) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = format!("name=vm,size={DISK}");
    let daemon = Daemon::start(&thin_args(pool, d, &[&spec]), &[&sock(d, "vm")]);
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
    let _daemon = Daemon::start(&thin_args(pool, d, &["name=vm"]), &[&sock(d, "vm")]);
    let mut c = Client::connect(&sock(d, "vm"), 1);
    for (off, data) in &written {
        assert_eq!(&read_at(&mut c, *off, data.len()), data, "after restart");
    }
}

pub fn discard_and_write_zeroes_give_blocks_back(pool: PoolArgs) {
    let (_dir, _daemon, mut c) = one_new_disk(pool, 1);
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

pub fn first_writes_from_two_queues_into_the_same_blocks_lose_nothing(pool: PoolArgs) {
    let (_dir, _daemon, mut c) = one_new_disk(pool, 2);
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

pub fn a_snapshot_export_keeps_the_data_of_when_it_was_taken(pool: PoolArgs) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let origin = pattern(1, 0, 256 << 10);
    {
        let _daemon = Daemon::start(
            &thin_args(pool, d, &[&format!("name=vm,size={DISK}")]),
            &[&sock(d, "vm")],
        );
        let mut c = Client::connect(&sock(d, "vm"), 1);
        write_at(&mut c, 0, 0, 0, &origin);
    }
    let _daemon = Daemon::start(
        &thin_args(
            pool,
            d,
            &["name=vm", "name=snap,snapshot-of=vm,readonly=on"],
        ),
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

pub fn first_writes_in_flight_together_land_whole_with_zeros_around(pool: PoolArgs) {
    let (_dir, _daemon, mut c) = one_new_disk(pool, 1);
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

/// Asserts `got == want`, naming the first byte that differs rather than printing megabytes.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: byte {i} is {} instead of {}", got[i], want[i]);
    }
}

/// Reads the first `len` bytes of the disk (in pieces the buffer holds) and compares them.
fn assert_disk(c: &mut Client, want: &[u8], what: &str) {
    const PIECE: usize = 1 << 20;
    for (i, w) in want.chunks(PIECE).enumerate() {
        let off = (i * PIECE) as u64;
        assert_same(&read_at(c, off, w.len()), w, &format!("{what}, at {off}"));
    }
}

/// A small deterministic generator (xorshift64*), so a failing run can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random writes, write-zeroes, discards, flushes and reads on a thin disk, each checked against
/// a byte image of what the disk must hold; then the whole disk is compared after the client
/// reconnects and again after the daemon restarts. The span is small (8 MiB) so that requests
/// overlap, split 64 KiB blocks and land on blocks provisioned, discarded and provisioned again.
pub fn random_requests_match_a_byte_image_of_the_disk(pool: PoolArgs) {
    const SPAN: u64 = 8 << 20;
    const BS: u64 = 64 << 10;
    let seed = 0x0074_6869_6e62_6c6b ^ u64::from(std::process::id());
    eprintln!("model seed {seed:#x}");
    let mut rng = Rng(seed);
    let (dir, daemon, mut c) = one_new_disk(pool, 1);
    let mut model = vec![0u8; SPAN as usize];
    for step in 0..400u64 {
        let kind = rng.below(100);
        if kind < 45 {
            let len = (1 + rng.below(512)) as usize * 512;
            let off = rng.below((SPAN - len as u64) / 512 + 1) * 512;
            let data = pattern(step + 1, off, len);
            write_at(&mut c, 0, 0, off, &data);
            model[off as usize..off as usize + len].copy_from_slice(&data);
        } else if kind < 60 {
            let len = (1 + rng.below(512)) * 512;
            let off = rng.below((SPAN - len) / 512 + 1) * 512;
            c.queues[0].write_zeroes(off, len, 0, ReqFlags::empty());
            assert_eq!(wait_one(&mut c.queues[0]), 0, "write-zeroes at {off}");
            model[off as usize..(off + len) as usize].fill(0);
        } else if kind < 70 {
            // Whole blocks: a thin device promises zeros after a discard only for those.
            let blocks = 1 + rng.below(4);
            let off = rng.below(SPAN / BS - blocks + 1) * BS;
            c.queues[0].discard(off, blocks * BS, 0, ReqFlags::empty());
            assert_eq!(wait_one(&mut c.queues[0]), 0, "discard at {off}");
            model[off as usize..(off + blocks * BS) as usize].fill(0);
        } else if kind < 75 {
            c.queues[0].flush(0, ReqFlags::empty());
            assert_eq!(wait_one(&mut c.queues[0]), 0, "flush");
        } else {
            let len = (1 + rng.below(512)) as usize * 512;
            let off = rng.below((SPAN - len as u64) / 512 + 1) * 512;
            let want = &model[off as usize..off as usize + len];
            assert_same(
                &read_at(&mut c, off, len),
                want,
                &format!("step {step}: read at {off}"),
            );
        }
    }
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0, "final flush");
    drop(c);
    let d = dir.path();
    let mut c = Client::connect(&sock(d, "vm"), 1);
    assert_disk(&mut c, &model, "after reconnecting");
    drop(c);
    drop(daemon);
    let _daemon = Daemon::start(&thin_args(pool, d, &["name=vm"]), &[&sock(d, "vm")]);
    let mut c = Client::connect(&sock(d, "vm"), 1);
    assert_disk(&mut c, &model, "after restarting the daemon");
}

/// A client that goes away without flushing and connects again, several times, finds what it
/// wrote each time, and the export keeps serving new writes.
pub fn a_client_that_reconnects_finds_its_writes(pool: PoolArgs) {
    let (dir, _daemon, mut c) = one_new_disk(pool, 1);
    let d = dir.path();
    let mut written: Vec<(u64, Vec<u8>)> = Vec::new();
    for round in 0..4u64 {
        let off = round * (3 << 20) + 4096;
        let data = pattern(round + 40, off, 200 << 10);
        write_at(&mut c, 0, 0, off, &data);
        written.push((off, data));
        drop(c);
        c = Client::connect(&sock(d, "vm"), 1);
        assert_eq!(c.capacity(), DISK);
        for (off, data) in &written {
            assert_same(
                &read_at(&mut c, *off, data.len()),
                data,
                &format!("round {round}: at {off}"),
            );
        }
    }
}
