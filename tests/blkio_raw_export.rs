//! A raw export driven by libblkio's vhost-user-blk driver, a frontend written by others.

mod common;

use std::io::{Read, Seek, SeekFrom};

use blkio::ReqFlags;
use common::*;

const DISK: u64 = 64 << 20;

fn read_back(c: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    let p = c.buf_ptr(0);
    assert_eq!(
        read(&mut c.queues[0], p, offset, len),
        0,
        "read {len} at {offset}"
    );
    c.buf()[..len].to_vec()
}

fn write_pattern(c: &mut Client, seed: u64, offset: u64, len: usize) -> Vec<u8> {
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

#[test]
fn capacity_is_the_backing_file_size() {
    let s = scratch(DISK);
    let _d = Daemon::start(&raw_export(&s, ""), &[&s.socket]);
    let c = Client::connect(&s.socket, 1);
    assert_eq!(c.capacity(), DISK);
}

#[test]
fn writes_at_many_offsets_and_sizes_read_back_and_reach_the_file() {
    let s = scratch(DISK);
    let _d = Daemon::start(&raw_export(&s, ""), &[&s.socket]);
    let mut c = Client::connect(&s.socket, 1);
    let cases: &[(u64, usize)] = &[
        (0, 512),
        (512, 4096),
        (4096 * 3, 65536),
        (DISK - 512, 512),
        (DISK - (2 << 20), 1 << 20),
        (12345 * 512, 3 * 512),
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
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    let mut f = std::fs::File::open(&s.image).unwrap();
    for (off, data) in &written {
        let mut on_disk = vec![0u8; data.len()];
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.read_exact(&mut on_disk).unwrap();
        assert_eq!(&on_disk, data, "file contents at {off}");
    }
}

#[test]
fn multi_segment_requests_scatter_and_gather() {
    let s = scratch(DISK);
    let _d = Daemon::start(&raw_export(&s, ""), &[&s.socket]);
    let mut c = Client::connect(&s.socket, 1);
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

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let s = scratch(DISK);
    let _d = Daemon::start(&raw_export(&s, ""), &[&s.socket]);
    let mut c = Client::connect(&s.socket, 1);
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
        ((512 << 10)..(640 << 10), true),
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
}

#[test]
fn io_past_the_end_fails() {
    let s = scratch(DISK);
    let _d = Daemon::start(&raw_export(&s, ""), &[&s.socket]);
    let mut c = Client::connect(&s.socket, 1);
    let p = c.buf_ptr(0);
    assert_ne!(read(&mut c.queues[0], p, DISK, 4096), 0);
    assert_ne!(write(&mut c.queues[0], p, DISK - 512, 4096), 0);
    c.queues[0].write_zeroes(DISK, 4096, 0, ReqFlags::empty());
    assert_ne!(wait_one(&mut c.queues[0]), 0);
    // The queue still works afterwards.
    assert_eq!(read(&mut c.queues[0], p, DISK - 4096, 4096), 0);
}

#[test]
fn two_queues_work_in_parallel() {
    let s = scratch(DISK);
    let _d = Daemon::start(&raw_export(&s, ",queues=2"), &[&s.socket]);
    let mut c = Client::connect(&s.socket, 2);
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
                for i in 0..200u64 {
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
        let off = qi * (DISK / 2) + 199 * 65536;
        assert_eq!(read_back(&mut c, off, 65536), pattern(qi, off, 65536));
    }
}

#[test]
fn a_second_client_connects_after_the_first_disconnects() {
    let s = scratch(DISK);
    let _d = Daemon::start(&raw_export(&s, ""), &[&s.socket]);
    let mut first = Client::connect(&s.socket, 1);
    let data = write_pattern(&mut first, 7, 4096, 8192);
    drop(first);
    let mut second = Client::connect(&s.socket, 1);
    assert_eq!(read_back(&mut second, 4096, 8192), data);
    drop(second);
    let mut third = Client::connect(&s.socket, 1);
    assert_eq!(read_back(&mut third, 4096, 8192), data);
}

#[test]
fn a_read_only_export_is_offered_read_only() {
    let s = scratch(DISK);
    let _d = Daemon::start(&raw_export(&s, ",readonly=on"), &[&s.socket]);
    // libblkio refuses to start a writable client on a device that offers VIRTIO_BLK_F_RO.
    let mut rw = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    rw.set_str("path", s.socket.to_str().unwrap()).unwrap();
    rw.connect().unwrap();
    assert!(
        rw.start().is_err(),
        "a writable client started on a read-only export"
    );
    drop(rw);

    let mut ro = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    ro.set_str("path", s.socket.to_str().unwrap()).unwrap();
    ro.set_bool("read-only", true).unwrap();
    ro.connect().unwrap();
    let mut q = ro.start().unwrap().queues.pop().unwrap();
    let region = ro.alloc_mem_region(1 << 20).unwrap();
    ro.map_mem_region(&region).unwrap();
    let p = region.addr as *mut u8;
    assert_eq!(read(&mut q, p, 0, 4096), 0);
    assert_ne!(write(&mut q, p, 0, 4096), 0);
}

/// Waits for `n` completions on the first queue; every one must have succeeded.
fn wait_all(c: &mut Client, n: usize) {
    for i in 0..n {
        assert_eq!(wait_one(&mut c.queues[0]), 0, "completion {i} of {n}");
    }
}

#[test]
fn many_requests_in_flight_complete_whatever_the_submit_batch() {
    // 48 does not divide into batches of 5 or 32: the last requests of a pass must still be
    // submitted, not left waiting for a batch to fill.
    const IN_FLIGHT: usize = 48;
    const LEN: usize = 16 << 10;
    for batch in [1, 5, 32, 1024] {
        let s = scratch(DISK);
        let _d = Daemon::start(
            &raw_export(&s, &format!(",queues=1,submit-batch={batch}")),
            &[&s.socket],
        );
        let mut c = Client::connect(&s.socket, 1);
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
        wait_all(&mut c, IN_FLIGHT);
        c.buf()[..IN_FLIGHT * LEN].fill(0);
        for i in 0..IN_FLIGHT {
            let p = c.buf_ptr(i * LEN);
            c.queues[0].read(offset(i), p, LEN, 0, ReqFlags::empty());
        }
        wait_all(&mut c, IN_FLIGHT);
        for (i, d) in data.iter().enumerate() {
            assert!(
                c.buf()[i * LEN..(i + 1) * LEN] == d[..],
                "submit-batch={batch}: request {i} read back wrong data"
            );
        }
    }
}
