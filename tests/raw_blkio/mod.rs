//! The scenarios of a raw export driven through libblkio's vhost-user-blk driver, written once
//! for any backing: tests/blkio_raw_export.rs runs them on a file, tests/blkio_rbd_export.rs
//! on an RBD image of the test cluster. A scenario makes its backings through `NewBacking`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use blkio::ReqFlags;

use crate::common::*;

/// Every backing has this many bytes.
pub const DISK: u64 = 64 << 20;

/// What a raw export serves, as a scenario sees it.
pub trait Backing {
    /// A daemon exporting the backing, `extra` appended to the export's options
    /// (",queues=2").
    fn serve(&self, extra: &str) -> Daemon;
    fn socket(&self) -> &Path;
    /// `len` bytes at `offset` as another reader of the backing sees them.
    fn bytes(&self, offset: u64, len: usize) -> Vec<u8>;
    /// Whether a discarded range reads back as zeros (a file's punched hole); otherwise
    /// discard is advisory (RBD): zeros or the old data.
    fn discard_reads_zeros(&self) -> bool;
}

/// Makes a fresh backing of DISK bytes; the name tells the test it is for.
pub type NewBacking<'a> = &'a dyn Fn(&str) -> Box<dyn Backing>;

fn connect(b: &dyn Backing, queues: i32) -> Client {
    Client::connect(b.socket(), queues)
}

fn read_back(c: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    let p = c.buf_ptr(0);
    assert_eq!(
        read(&mut c.queues[0], p, offset, len),
        0,
        "read {len} at {offset}"
    );
    c.buf()[..len].to_vec()
}

pub fn write_pattern(c: &mut Client, seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let data = pattern(seed, offset, len);
    c.buf()[..len].copy_from_slice(&data);
    let p = c.buf_ptr(0);
    assert_eq!(
        write(&mut c.queues[0], p, offset, len),
        0,
        "write {len} at {offset}"
    );
    data
}

fn flush(c: &mut Client) {
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0, "flush");
}

/// Waits for `n` completions on the first queue; every one must have succeeded.
fn wait_all(c: &mut Client, n: usize, what: &str) {
    for i in 0..n {
        assert_eq!(wait_one(&mut c.queues[0]), 0, "{what} {i} of {n}");
    }
}

pub fn capacity_is_the_backing_size(new: NewBacking) {
    let b = new("capacity");
    let _d = b.serve("");
    assert_eq!(connect(&*b, 1).capacity(), DISK);
}

pub fn writes_at_many_offsets_and_sizes_read_back_and_reach_the_backing(new: NewBacking) {
    let b = new("offsets");
    let _d = b.serve("");
    let mut c = connect(&*b, 1);
    let cases: &[(u64, usize)] = &[
        (0, 512),
        (512, 4096),
        (4096 * 3, 65536),
        (DISK - 512, 512),
        (DISK - (2 << 20), 1 << 20),
        (12345 * 512, 3 * 512),
        // Across an RBD object boundary (4 MiB objects).
        ((4 << 20) - 8192, 16384),
        (7 << 20, 2 << 20),
    ];
    let mut written = Vec::new();
    for (i, &(off, len)) in cases.iter().enumerate() {
        written.push((off, write_pattern(&mut c, i as u64, off, len)));
    }
    for (off, data) in &written {
        assert_eq!(
            &read_back(&mut c, *off, data.len()),
            data,
            "read-back at {off}"
        );
    }
    flush(&mut c);
    for (off, data) in &written {
        assert_eq!(
            &b.bytes(*off, data.len()),
            data,
            "backing contents at {off}"
        );
    }
}

pub fn multi_segment_requests_scatter_and_gather(new: NewBacking) {
    let b = new("segments");
    let _d = b.serve("");
    let mut c = connect(&*b, 1);
    // Five buffers of different sizes, spread over the region out of order.
    let pieces: &[(usize, usize)] = &[
        (1 << 20, 512),
        (0, 4096),
        (2 << 20, 1536),
        (3 << 20, 8192),
        (8192, 512),
    ];
    let total: usize = pieces.iter().map(|p| p.1).sum();
    let data = pattern(99, 0, total);
    let mut pos = 0;
    let mut iov = Vec::new();
    for &(at, len) in pieces {
        c.buf()[at..at + len].copy_from_slice(&data[pos..pos + len]);
        iov.push(libc::iovec {
            iov_base: c.buf_ptr(at).cast(),
            iov_len: len,
        });
        pos += len;
    }
    c.queues[0].writev(
        1 << 20,
        iov.as_ptr(),
        iov.len() as u32,
        0,
        ReqFlags::empty(),
    );
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    assert_eq!(read_back(&mut c, 1 << 20, total), data);

    for &(at, len) in pieces {
        c.buf()[at..at + len].fill(0);
    }
    c.queues[0].readv(
        1 << 20,
        iov.as_ptr(),
        iov.len() as u32,
        0,
        ReqFlags::empty(),
    );
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    let mut pos = 0;
    for &(at, len) in pieces {
        assert_eq!(&c.buf()[at..at + len], &data[pos..pos + len]);
        pos += len;
    }
}

pub fn discard_and_write_zeroes_read_back_zeros(new: NewBacking) {
    let b = new("zeroes");
    let _d = b.serve("");
    let mut c = connect(&*b, 1);
    write_pattern(&mut c, 5, 0, 1 << 20);
    c.queues[0].write_zeroes(4096, 8192, 0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    c.queues[0].write_zeroes(65536, 65536, 0, ReqFlags::NO_UNMAP);
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    c.queues[0].discard(512 << 10, 128 << 10, 0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    let got = read_back(&mut c, 0, 1 << 20);
    let want = pattern(5, 0, 1 << 20);
    for (range, zero) in [
        (0..4096, false),
        (4096..12288, true),
        (12288..65536, false),
        (65536..131072, true),
        (131072..(512 << 10), false),
        ((640 << 10)..(1 << 20), false),
    ] {
        if zero {
            assert!(
                got[range.clone()].iter().all(|&b| b == 0),
                "{range:?} not zero"
            );
        } else {
            assert_eq!(got[range.clone()], want[range.clone()], "{range:?} changed");
        }
    }
    let discarded = (512 << 10)..(640 << 10);
    let zeros = got[discarded.clone()].iter().all(|&b| b == 0);
    if b.discard_reads_zeros() {
        assert!(zeros, "the discarded range {discarded:?} is not zero");
    } else {
        assert!(
            zeros || got[discarded.clone()] == want[discarded],
            "a discarded range holds neither zeros nor its old data"
        );
    }
}

pub fn io_past_the_end_fails(new: NewBacking) {
    let b = new("end");
    let _d = b.serve("");
    let mut c = connect(&*b, 1);
    let p = c.buf_ptr(0);
    assert_ne!(read(&mut c.queues[0], p, DISK, 4096), 0);
    assert_ne!(write(&mut c.queues[0], p, DISK - 512, 4096), 0);
    c.queues[0].write_zeroes(DISK, 4096, 0, ReqFlags::empty());
    assert_ne!(wait_one(&mut c.queues[0]), 0);
    // The queue still works afterwards.
    assert_eq!(read(&mut c.queues[0], p, DISK - 4096, 4096), 0);
}

pub fn two_queues_work_in_parallel(new: NewBacking) {
    const ROUNDS: u64 = 100;
    let b = new("queues");
    let _d = b.serve(",queues=2");
    let mut c = connect(&*b, 2);
    assert_eq!(c.queues.len(), 2);
    let base = c.region.addr;
    let mut queues = std::mem::take(&mut c.queues);
    let q1 = queues.pop().unwrap();
    let q0 = queues.pop().unwrap();
    let workers: Vec<_> = [q0, q1]
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || {
                // Each queue owns half of the region and half of the disk.
                let buf = (base + qi * (REGION_LEN / 2)) as *mut u8;
                for i in 0..ROUNDS {
                    let off = (qi as u64) * (DISK / 2) + i * 65536;
                    let data = pattern(qi as u64, off, 65536);
                    // SAFETY: this thread alone uses its half of the mapped region.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
                    assert_eq!(write(&mut q, buf, off, 65536), 0);
                    assert_eq!(read(&mut q, buf, off, 65536), 0);
                    // SAFETY: as above.
                    let back = unsafe { std::slice::from_raw_parts(buf, 65536) };
                    assert_eq!(back, &data[..]);
                }
                q
            })
        })
        .collect();
    c.queues = workers.into_iter().map(|w| w.join().unwrap()).collect();
    for qi in 0..2u64 {
        let off = qi * (DISK / 2) + (ROUNDS - 1) * 65536;
        assert_eq!(read_back(&mut c, off, 65536), pattern(qi, off, 65536));
    }
}

pub fn a_second_client_connects_after_the_first_disconnects(new: NewBacking) {
    let b = new("reconnect");
    let _d = b.serve("");
    let mut first = connect(&*b, 1);
    let data = write_pattern(&mut first, 7, 4096, 8192);
    drop(first);
    let mut second = connect(&*b, 1);
    assert_eq!(read_back(&mut second, 4096, 8192), data);
    drop(second);
    let mut third = connect(&*b, 1);
    assert_eq!(read_back(&mut third, 4096, 8192), data);
}

pub fn a_read_only_export_is_offered_read_only(new: NewBacking) {
    let b = new("readonly");
    let _d = b.serve(",readonly=on");
    let path = b.socket().to_str().unwrap();
    // libblkio refuses to start a writable client on a device that offers VIRTIO_BLK_F_RO.
    let mut rw = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    rw.set_str("path", path).unwrap();
    rw.connect().unwrap();
    assert!(
        rw.start().is_err(),
        "a writable client started on a read-only export"
    );
    drop(rw);

    let mut ro = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    ro.set_str("path", path).unwrap();
    ro.set_bool("read-only", true).unwrap();
    ro.connect().unwrap();
    let mut q = ro.start().unwrap().queues.pop().unwrap();
    let region = ro.alloc_mem_region(1 << 20).unwrap();
    ro.map_mem_region(&region).unwrap();
    let p = region.addr as *mut u8;
    assert_eq!(read(&mut q, p, 0, 4096), 0);
    assert_ne!(write(&mut q, p, 0, 4096), 0);
}

pub fn many_requests_in_flight_complete_whatever_the_submit_batch(new: NewBacking) {
    // 48 does not divide into batches of 5 or 32: the last requests of a pass must still be
    // submitted, not left waiting for a batch to fill.
    const IN_FLIGHT: usize = 48;
    const LEN: usize = 16 << 10;
    for batch in [1, 5, 32, 1024] {
        let b = new("inflight");
        let _d = b.serve(&format!(",queues=1,submit-batch={batch}"));
        let mut c = connect(&*b, 1);
        let offset = |i: usize| (i as u64 * 7 + 3) * LEN as u64;
        let data: Vec<Vec<u8>> = (0..IN_FLIGHT)
            .map(|i| pattern(batch, offset(i), LEN))
            .collect();
        for (i, d) in data.iter().enumerate() {
            c.buf()[i * LEN..(i + 1) * LEN].copy_from_slice(d);
        }
        for i in 0..IN_FLIGHT {
            let p = c.buf_ptr(i * LEN);
            c.queues[0].write(offset(i), p, LEN, 0, ReqFlags::empty());
        }
        wait_all(&mut c, IN_FLIGHT, "write");
        c.buf()[..IN_FLIGHT * LEN].fill(0);
        for i in 0..IN_FLIGHT {
            let p = c.buf_ptr(i * LEN);
            c.queues[0].read(offset(i), p, LEN, 0, ReqFlags::empty());
        }
        wait_all(&mut c, IN_FLIGHT, "read");
        for (i, d) in data.iter().enumerate() {
            assert!(
                c.buf()[i * LEN..(i + 1) * LEN] == d[..],
                "submit-batch={batch}: request {i} read back wrong data"
            );
        }
    }
}

/// A small deterministic generator (xorshift), so a failure repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn random_io_with_many_requests_in_flight_matches_a_model(new: NewBacking) {
    // The first 8 MiB (two RBD objects), so requests overlap often; 512-byte sectors.
    const SPAN: u64 = 8 << 20;
    const SLOT: usize = 64 << 10;
    let b = new("model");
    let _d = b.serve(",queues=1");
    let mut c = connect(&*b, 1);
    let mut model = vec![0u8; SPAN as usize];
    // Discarded bytes may read as zeros or as what they held (discard is advisory): not
    // compared until written again.
    let mut known = vec![true; SPAN as usize];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for round in 0..40u64 {
        // A batch of non-overlapping writes, discards and write-zeroes in flight together
        // (overlapping requests in flight have no defined order), then reads of random
        // ranges checked against the model.
        let depth = 1 + rng.below(16) as usize;
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut submitted = 0;
        for slot in 0..depth {
            let len = 512 * (1 + rng.below(SLOT as u64 / 512));
            let off = 512 * rng.below((SPAN - len) / 512);
            if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            taken.push((off, len));
            let range = off as usize..(off + len) as usize;
            match rng.below(6) {
                0 => {
                    c.queues[0].discard(off, len, 0, ReqFlags::empty());
                    known[range].fill(false);
                }
                1 => {
                    c.queues[0].write_zeroes(off, len, 0, ReqFlags::empty());
                    model[range.clone()].fill(0);
                    known[range].fill(true);
                }
                _ => {
                    let data = pattern(round * 100 + slot as u64, off, len as usize);
                    c.buf()[slot * SLOT..slot * SLOT + len as usize].copy_from_slice(&data);
                    let p = c.buf_ptr(slot * SLOT);
                    c.queues[0].write(off, p, len as usize, 0, ReqFlags::empty());
                    model[range.clone()].copy_from_slice(&data);
                    known[range].fill(true);
                }
            }
            submitted += 1;
        }
        wait_all(&mut c, submitted, &format!("round {round}, request"));
        for _ in 0..4 {
            let len = 512 * (1 + rng.below(4 * SLOT as u64 / 512));
            let off = 512 * rng.below((SPAN - len) / 512);
            let got = read_back(&mut c, off, len as usize);
            let at = off as usize;
            let bad = (0..got.len()).find(|&i| known[at + i] && got[i] != model[at + i]);
            assert!(
                bad.is_none(),
                "round {round}: {len} bytes at {off} differ from the model at byte {:?}",
                bad.map(|i| off + i as u64)
            );
        }
    }
    flush(&mut c);
    let backing = b.bytes(0, SPAN as usize);
    let bad = (0..backing.len()).find(|&i| known[i] && backing[i] != model[i]);
    assert!(
        bad.is_none(),
        "after a flush the backing differs from the model at byte {bad:?}"
    );
}
