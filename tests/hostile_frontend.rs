//! A frontend that misbehaves never harms the daemon or anyone else's disk (issue 21).
//!
//! Each test starts a `thinblk serve` with two raw exports, attacks one of them with a
//! hand-written vhost-user frontend (`hostile/wire.rs`) and, after every case, checks that the
//! daemon lives, that both exports serve a write-read-flush round trip through libblkio, and
//! that the daemon's descriptor and thread counts are back where they were.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod hostile;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use hostile::guest::{
    self, blocking_eventfd, eventfd, kick, memfd, pipe, Guest, GUEST, QUEUE, SIZE, USER,
};
use hostile::watch::{counts, Watched};
use hostile::wire::*;

const MIB: u64 = 1 << 20;

fn region(guest: u64, size: u64, user: u64, offset: u64) -> RegionMsg {
    RegionMsg {
        guest,
        size,
        user,
        offset,
    }
}

/// A negotiated connection to the attacked export.
fn negotiated(w: &Watched) -> Wire {
    let mut wire = Wire::connect(&w.socket());
    wire.negotiate();
    wire
}

#[test]
fn the_raw_frontend_does_real_io() {
    // Without this the "wrong order" cases below could pass by never reaching the data path.
    let mut w = Watched::start();
    let mut wire = negotiated(&w);
    let g = Guest::new();
    let (k, c) = (eventfd(), eventfd());
    g.set_up_queue(&mut wire, k.as_raw_fd(), c.as_raw_fd());
    let mut data = common::pattern(7, 0, 4096);
    g.submit(0, guest::T_OUT, 8, &mut data);
    kick(k.as_raw_fd());
    assert_eq!(g.complete(0, 0).expect("write completes").0, 0);
    let mut back = vec![0u8; 4096];
    g.submit(1, guest::T_IN, 8, &mut back);
    kick(k.as_raw_fd());
    let (status, got) = g.complete(1, 4096).expect("read completes");
    assert_eq!(status, 0);
    assert!(got == data, "read back what was written");
    drop(wire);
    w.check("raw I/O");
}

// ---- Finding 1: descriptors and threads of every connection are released ----

#[test]
fn connections_that_only_negotiate_leave_no_descriptor_behind() {
    let mut w = Watched::start();
    let before = counts(w.daemon.pid());
    for _ in 0..40 {
        let mut wire = Wire::connect(&w.socket());
        let f = wire.get(GET_FEATURES, &[]).u64();
        wire.send(SET_FEATURES, 0, &u64_payload(f), &[]).unwrap();
        wire.send(SET_OWNER, 0, &[], &[]).unwrap();
        // A reply proves the daemon handled both before the hang-up.
        wire.get(GET_FEATURES, &[]);
    }
    let after = w.settled(Some(before));
    eprintln!("40 feature-only connections: (fds, threads) {before:?} -> {after:?}");
    assert_eq!(after, before);
    w.check("feature-only connections");
}

/// One connect/disconnect cycle of the kind `i` picks: bare, negotiated, with a memory table,
/// or with a running queue and a request done.
fn cycle(w: &Watched, i: usize) {
    match i % 4 {
        0 => drop(UnixStream::connect(w.socket()).unwrap()),
        1 => drop(negotiated(w)),
        2 => {
            let mut wire = negotiated(w);
            let g = Guest::new();
            wire.ok(SET_MEM_TABLE, &mem_table(&[g.region()]), &[g.fd()]);
        }
        _ => {
            let mut wire = negotiated(w);
            let g = Guest::new();
            let (k, c) = (eventfd(), eventfd());
            g.set_up_queue(&mut wire, k.as_raw_fd(), c.as_raw_fd());
            g.submit(0, guest::T_FLUSH, 0, &mut []);
            kick(k.as_raw_fd());
            assert_eq!(g.complete(0, 0).expect("flush completes").0, 0);
        }
    }
}

#[test]
fn a_thousand_connect_disconnect_cycles_leave_the_counts_flat() {
    let mut w = Watched::start();
    let before = w.baseline();
    for i in 0..1000 {
        cycle(&w, i);
    }
    let after = w.settled(Some(before));
    eprintln!("1000 connect/disconnect cycles: (fds, threads) {before:?} -> {after:?}");
    assert_eq!(after, before);
    w.check("1000 cycles");
}

// ---- Finding 2: memory the daemon could fault on is never mapped ----

#[test]
fn a_region_longer_than_its_file_is_refused() {
    let mut w = Watched::start();
    let small = memfd(8 * MIB, true);
    let mut wire = negotiated(&w);
    wire.refused(
        SET_MEM_TABLE,
        &mem_table(&[region(GUEST, 32 * MIB, USER, 0)]),
        &[small.as_raw_fd()],
    );
    w.check("32 MiB region of an 8 MiB memfd");
    let mut wire = negotiated(&w);
    wire.refused(
        SET_MEM_TABLE,
        &mem_table(&[region(GUEST, 4 * MIB, USER, 6 * MIB)]),
        &[small.as_raw_fd()],
    );
    w.check("region past the end through its offset");
    let mut wire = negotiated(&w);
    wire.refused(
        ADD_MEM_REG,
        &single_region(&region(GUEST, 32 * MIB, USER, 0)),
        &[small.as_raw_fd()],
    );
    w.check("ADD_MEM_REG past the end");
}

#[test]
fn a_mapped_sealable_memfd_can_no_longer_shrink() {
    let mut w = Watched::start();
    let g = Guest::new();
    let mut wire = negotiated(&w);
    wire.ok(SET_MEM_TABLE, &mem_table(&[g.region()]), &[g.fd()]);
    assert!(
        g.file.set_len(SIZE / 2).is_err(),
        "the frontend could shrink memory the daemon has mapped"
    );
    drop(wire);
    w.check("sealed memfd");
}

/// The frontend maps `file` as its guest memory, puts a write on queue 0, truncates the file to
/// `keep` bytes and kicks: the daemon's accesses past the new end fault (SIGBUS). Only that
/// frontend's connection may end.
fn truncated_under_the_daemon(w: &mut Watched, file: std::fs::File, keep: u64, case: &str) {
    let g = Guest::with_file(file);
    let mut wire = negotiated(w);
    let (k, c) = (eventfd(), eventfd());
    g.set_up_queue(&mut wire, k.as_raw_fd(), c.as_raw_fd());
    let mut data = common::pattern(3, 0, 4096);
    g.submit(0, guest::T_OUT, 8, &mut data);
    g.file.set_len(keep).unwrap();
    kick(k.as_raw_fd());
    assert!(
        wire.hung_up(),
        "{case}: the connection of the frontend that truncated its memory stays open"
    );
    // The test's own mapping of the file is not touched again: it would fault here too.
    drop(wire);
    drop(g);
    w.check(case);
}

#[test]
fn a_frontend_truncating_an_unsealable_memfd_loses_only_its_own_disk() {
    // libblkio's memfds cannot be sealed, so such memory is mapped; truncating it afterwards
    // killed the whole daemon with SIGBUS.
    let mut w = Watched::start();
    truncated_under_the_daemon(
        &mut w,
        memfd(SIZE, false),
        Guest::BUFFERS,
        "unsealable memfd truncated under the request's buffers",
    );
    truncated_under_the_daemon(
        &mut w,
        memfd(SIZE, false),
        0,
        "unsealable memfd truncated under the rings",
    );
}

#[test]
fn a_frontend_truncating_a_memory_file_loses_only_its_own_disk() {
    // As QEMU's memory-backend-file: a plain file, which nothing can seal.
    let mut w = Watched::start();
    for dir in [std::env::temp_dir(), "/dev/shm".into()] {
        if !dir.is_dir() {
            continue;
        }
        let file = tempfile::tempfile_in(&dir).unwrap();
        let case = format!("file in {} truncated after mapping", dir.display());
        truncated_under_the_daemon(&mut w, file, Guest::BUFFERS, &case);
    }
}

#[test]
fn memory_tables_that_cannot_be_trusted_are_refused() {
    let mut w = Watched::start();
    let f = memfd(4 * MIB, true);
    let fd = f.as_raw_fd();
    let (pr, _pw) = pipe();
    let (sock, _peer) = UnixStream::pair().unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let ev = eventfd();
    let cases: Vec<(&str, Vec<RegionMsg>, Vec<RawFd>)> = vec![
        ("zero size", vec![region(0, 0, USER, 0)], vec![fd]),
        ("huge size", vec![region(0, 1 << 62, USER, 0)], vec![fd]),
        (
            "guest wrap",
            vec![region(u64::MAX - MIB + 1, 2 * MIB, USER, 0)],
            vec![fd],
        ),
        (
            "user wrap",
            vec![region(0, 2 * MIB, u64::MAX - MIB + 1, 0)],
            vec![fd],
        ),
        (
            "offset wrap",
            vec![region(0, 2 * MIB, USER, u64::MAX - MIB + 1)],
            vec![fd],
        ),
        (
            "offset past the end",
            vec![region(0, MIB, USER, 4 * MIB)],
            vec![fd],
        ),
        (
            "a pipe",
            vec![region(0, MIB, USER, 0)],
            vec![pr.as_raw_fd()],
        ),
        (
            "a socket",
            vec![region(0, MIB, USER, 0)],
            vec![sock.as_raw_fd()],
        ),
        (
            "/dev/null",
            vec![region(0, MIB, USER, 0)],
            vec![null.as_raw_fd()],
        ),
        (
            "an eventfd",
            vec![region(0, MIB, USER, 0)],
            vec![ev.as_raw_fd()],
        ),
        (
            "guest overlap",
            vec![
                region(0, 2 * MIB, USER, 0),
                region(MIB, MIB, USER + 8 * MIB, 0),
            ],
            vec![fd, fd],
        ),
        (
            "user overlap",
            vec![
                region(0, MIB, USER, 0),
                region(8 * MIB, MIB, USER + MIB / 2, 0),
            ],
            vec![fd, fd],
        ),
        (
            "more regions than fds",
            vec![
                region(0, MIB, USER, 0),
                region(8 * MIB, MIB, USER + 8 * MIB, 0),
            ],
            vec![fd],
        ),
        (
            "more fds than regions",
            vec![region(0, MIB, USER, 0)],
            vec![fd, fd],
        ),
        ("no fd", vec![region(0, MIB, USER, 0)], vec![]),
        ("no region", vec![], vec![fd]),
    ];
    for (name, regions, fds) in cases {
        let mut wire = negotiated(&w);
        let ack = wire.ack(SET_MEM_TABLE, &mem_table(&regions), &fds);
        assert!(!matches!(ack, Some(0)), "{name}: SET_MEM_TABLE accepted");
        assert!(wire.hung_up(), "{name}: connection left open");
        w.check(name);
        // The same region through ADD_MEM_REG (one region, one fd).
        if regions.len() == 1 && fds.len() == 1 {
            let mut wire = negotiated(&w);
            let ack = wire.ack(ADD_MEM_REG, &single_region(&regions[0]), &fds);
            assert!(!matches!(ack, Some(0)), "{name}: ADD_MEM_REG accepted");
            w.check(&format!("ADD_MEM_REG {name}"));
        }
    }
    // An added region overlapping one already there.
    let mut wire = negotiated(&w);
    wire.ok(ADD_MEM_REG, &single_region(&region(0, MIB, USER, 0)), &[fd]);
    wire.refused(
        ADD_MEM_REG,
        &single_region(&region(MIB / 2, MIB, USER + 8 * MIB, 0)),
        &[fd],
    );
    w.check("ADD_MEM_REG overlapping an earlier region");
}

// ---- Finding 4: protocol limits hold at the message ----

#[test]
fn more_than_eight_regions_are_refused() {
    let mut w = Watched::start();
    let files: Vec<_> = (0..9).map(|_| memfd(MIB, true)).collect();
    let regions: Vec<_> = (0..9u64)
        .map(|i| region(i * 2 * MIB, MIB, USER + i * 2 * MIB, 0))
        .collect();
    let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
    let mut wire = negotiated(&w);
    wire.ok(SET_MEM_TABLE, &mem_table(&regions[..8]), &fds[..8]);
    wire.refused(SET_MEM_TABLE, &mem_table(&regions), &fds);
    w.check("9 regions");
}

#[test]
fn regions_beyond_the_slots_announced_are_refused() {
    let mut w = Watched::start();
    let f = memfd(4 * MIB, true);
    let mut wire = negotiated(&w);
    let slots = wire.get(GET_MAX_MEM_SLOTS, &[]).u64();
    assert!(slots > 8 && slots < 4096, "{slots} slots");
    for i in 0..slots {
        wire.ok(
            ADD_MEM_REG,
            &single_region(&region(i * 8192, 4096, USER + i * 8192, 0)),
            &[f.as_raw_fd()],
        );
    }
    wire.refused(
        ADD_MEM_REG,
        &single_region(&region(slots * 8192, 4096, USER + slots * 8192, 0)),
        &[f.as_raw_fd()],
    );
    w.check("one region past GET_MAX_MEM_SLOTS");
}

#[test]
fn ring_sizes_that_are_not_powers_of_two_or_too_large_are_refused() {
    let mut w = Watched::start();
    for num in [0, 3, 255, 257, 512, 1 << 15, u32::MAX] {
        let mut wire = negotiated(&w);
        wire.refused(SET_VRING_NUM, &vring_state(0, num), &[]);
        w.check(&format!("SET_VRING_NUM {num}"));
    }
    let mut wire = negotiated(&w);
    wire.ok(SET_VRING_NUM, &vring_state(0, 1), &[]);
    wire.ok(SET_VRING_NUM, &vring_state(0, 256), &[]);
    wire.refused(SET_VRING_NUM, &vring_state(1, 16), &[]);
    w.check("SET_VRING_NUM for a queue that does not exist");
}

#[test]
fn ring_fds_that_are_not_eventfds_are_refused() {
    let mut w = Watched::start();
    for code in [SET_VRING_CALL, SET_VRING_KICK, SET_VRING_ERR] {
        let (r, wr) = pipe();
        let (sock, _peer) = UnixStream::pair().unwrap();
        let f = memfd(4096, true);
        for (name, fd) in [
            ("pipe write end", wr.as_raw_fd()),
            ("pipe read end", r.as_raw_fd()),
            ("socket", sock.as_raw_fd()),
            ("memfd", f.as_raw_fd()),
        ] {
            let mut wire = negotiated(&w);
            let g = Guest::new();
            wire.ok(SET_MEM_TABLE, &mem_table(&[g.region()]), &[g.fd()]);
            wire.ok(SET_VRING_NUM, &vring_state(0, QUEUE), &[]);
            wire.ok(SET_VRING_ADDR, &g.ring_addr(), &[]);
            wire.refused(code, &u64_payload(0), &[fd]);
            w.check(&format!("request {code} with a {name}"));
        }
    }
}

#[test]
fn a_call_fd_nobody_reads_cannot_block_a_worker() {
    // The case: a pipe as call fd that fills up. Refused at SET_VRING_CALL; the queue
    // is then run with an eventfd the frontend never reads, for more notifications than a
    // pipe holds (65536 / 8).
    let mut w = Watched::start();
    let mut wire = negotiated(&w);
    let g = Guest::new();
    let (_r, full) = pipe();
    wire.ok(SET_MEM_TABLE, &mem_table(&[g.region()]), &[g.fd()]);
    wire.refused(SET_VRING_CALL, &u64_payload(0), &[full.as_raw_fd()]);
    w.check("pipe as call fd");
    let mut wire = negotiated(&w);
    let (k, c) = (eventfd(), eventfd());
    g.set_up_queue(&mut wire, k.as_raw_fd(), c.as_raw_fd());
    let mut buf = vec![0u8; 512];
    for n in 0..9000u16 {
        g.submit(n, guest::T_IN, 0, &mut buf);
        kick(k.as_raw_fd());
        assert_eq!(
            g.complete(n, 0).expect("read completes").0,
            0,
            "request {n}"
        );
    }
    drop(wire);
    w.check("9000 notifications nobody reads");
}

#[test]
fn a_ring_that_refills_itself_cannot_keep_its_connection_from_ending() {
    // Found by the vhost_user fuzz target (a libFuzzer timeout in CI): the worker served such
    // a ring in one endless call, never back in its event loop to see the exit event, so the
    // hang-up's join of the worker never returned and the export never served again.
    let mut w = Watched::start();
    let mut wire = negotiated(&w);
    let g = Guest::new();
    let (k, c) = (eventfd(), eventfd());
    g.set_up_self_refilling_queue(&mut wire, k.as_raw_fd(), c.as_raw_fd());
    kick(k.as_raw_fd());
    // The device goes round and round the ring: the used index keeps moving.
    let first = g.device_used_idx();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while g.device_used_idx().wrapping_sub(first) < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the device did not serve the ring"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(wire);
    w.check("a ring that refills itself");
}

#[test]
fn a_call_eventfd_held_at_its_maximum_cannot_hang_the_export() {
    // An eventfd write blocks when the counter would pass 2^64 - 2. A frontend that puts its
    // call eventfd there blocked the queue's worker in write(), and the connection's teardown,
    // which joins the worker, with it: the export never served anyone again.
    let mut w = Watched::start();
    let mut wire = negotiated(&w);
    let g = Guest::new();
    let (k, c) = (blocking_eventfd(), blocking_eventfd());
    g.set_up_queue(&mut wire, k.as_raw_fd(), c.as_raw_fd());
    let max = (u64::MAX - 1).to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd the test owns.
    let n = unsafe { libc::write(c.as_raw_fd(), max.as_ptr() as *const libc::c_void, 8) };
    assert_eq!(n, 8);
    let mut buf = vec![0u8; 512];
    g.submit(0, guest::T_IN, 0, &mut buf);
    kick(k.as_raw_fd());
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(wire);
    w.check("call eventfd at its maximum");
    // The same with the frontend reading its own kick eventfd away: nothing to block on.
    let mut wire = negotiated(&w);
    let (k, c) = (blocking_eventfd(), blocking_eventfd());
    g.set_up_queue(&mut wire, k.as_raw_fd(), c.as_raw_fd());
    for _ in 0..100 {
        kick(k.as_raw_fd());
        let mut sink = [0u8; 8];
        // (The kick was written just before, so this read does not block.)
        // SAFETY: reads 8 bytes into a live buffer from an eventfd the test owns.
        unsafe { libc::read(k.as_raw_fd(), sink.as_mut_ptr() as *mut libc::c_void, 8) };
    }
    drop(wire);
    w.check("kick eventfd read by the frontend");
}

#[test]
fn protocol_features_the_device_did_not_offer_are_refused() {
    let mut w = Watched::start();
    for extra in [P_HOST_NOTIFIER, 1 << 63] {
        let mut wire = Wire::connect(&w.socket());
        let f = wire.get(GET_FEATURES, &[]).u64();
        wire.send(SET_FEATURES, 0, &u64_payload(f), &[]).unwrap();
        wire.get(GET_PROTOCOL_FEATURES, &[]);
        wire.send(
            SET_PROTOCOL_FEATURES,
            0,
            &u64_payload(P_REPLY_ACK | extra),
            &[],
        )
        .unwrap();
        assert!(wire.hung_up(), "acking {extra:#x} was accepted");
        w.check(&format!("protocol feature {extra:#x}"));
    }
}

// ---- Malformed messages of every type ----

#[test]
fn malformed_messages_of_every_type_end_only_their_connection() {
    let mut w = Watched::start();
    let codes: Vec<u32> = (0..=LAST_CODE + 2).chain([1000, u32::MAX]).collect();
    for code in codes {
        let ev = eventfd();
        let fd = ev.as_raw_fd();
        // Each connection is dropped before the next: the export serves one at a time.
        {
            // A header announcing a payload that never comes, before any negotiation.
            let mut wire = Wire::connect(&w.socket());
            wire.send_bytes(&header(code, VERSION, 8), &[]).unwrap();
        }
        {
            // A 4-byte payload: no request takes one.
            let mut wire = Wire::connect(&w.socket());
            wire.send(code, 0, &[1, 2, 3, 4], &[]).unwrap();
            assert!(
                wire.refuses(),
                "request {code} with a 4-byte payload was taken"
            );
        }
        {
            // The size field past the largest message.
            let mut wire = Wire::connect(&w.socket());
            let mut m = header(code, VERSION, 0x1001);
            m.extend(vec![0u8; 0x1001]);
            let _ = wire.send_bytes(&m, &[]);
            assert!(wire.hung_up(), "request {code} of 4097 bytes was taken");
        }
        // A reply flag, a wrong version, reserved flag bits.
        for flags in [REPLY | VERSION, 2, VERSION | 0x100] {
            let mut wire = negotiated(&w);
            let mut m = header(code, flags, 8);
            m.extend_from_slice(&0u64.to_le_bytes());
            let _ = wire.send_bytes(&m, &[]);
            assert!(
                wire.refuses(),
                "request {code} with flags {flags:#x} was taken"
            );
        }
        {
            // Three fds with an 8-byte payload, before negotiation...
            let mut wire = Wire::connect(&w.socket());
            let _ = wire.send(code, NEED_REPLY, &u64_payload(0), &[fd, fd, fd]);
            assert!(wire.hung_up(), "request {code} with three fds was taken");
        }
        {
            // ...and after.
            let mut wire = negotiated(&w);
            let _ = wire.send(code, NEED_REPLY, &u64_payload(0), &[fd, fd, fd]);
            assert!(wire.hung_up(), "request {code} with three fds was taken");
        }
        {
            // An 8-byte payload and no fd, before negotiation, then a hang-up.
            let mut wire = Wire::connect(&w.socket());
            let _ = wire.send(code, NEED_REPLY, &u64_payload(0), &[]);
        }
        w.check(&format!("malformed request {code}"));
    }
}

#[test]
fn a_short_header_or_a_half_sent_message_ends_only_its_connection() {
    let mut w = Watched::start();
    let ev = eventfd();
    let steps: Vec<(&str, Vec<u8>, Vec<RawFd>)> = vec![
        ("one byte", vec![1], vec![]),
        (
            "11 header bytes",
            header(GET_FEATURES, VERSION, 0)[..11].to_vec(),
            vec![],
        ),
        (
            "half a payload",
            {
                let mut m = header(SET_FEATURES, VERSION, 8);
                m.extend_from_slice(&[0, 0, 0, 0]);
                m
            },
            vec![],
        ),
        (
            "an fd with half a header",
            header(SET_VRING_CALL, VERSION, 8)[..6].to_vec(),
            vec![ev.as_raw_fd()],
        ),
        (
            "an fd and a header, no payload",
            header(SET_VRING_CALL, VERSION, 8),
            vec![ev.as_raw_fd()],
        ),
    ];
    for (name, bytes, fds) in steps {
        let mut wire = negotiated(&w);
        wire.send_bytes(&bytes, &fds).unwrap();
        drop(wire);
        w.check(name);
    }
}

// ---- Ring setup in every wrong order ----

#[test]
fn ring_setup_in_wrong_orders_harms_nobody() {
    let mut w = Watched::start();
    type Step = fn(&mut Wire, &Guest, RawFd, RawFd);
    let mem: Step = |wire, g, _, _| {
        let _ = wire.ack(SET_MEM_TABLE, &mem_table(&[g.region()]), &[g.fd()]);
    };
    let num: Step = |wire, _, _, _| {
        let _ = wire.ack(SET_VRING_NUM, &vring_state(0, QUEUE), &[]);
    };
    let addr: Step = |wire, g, _, _| {
        let _ = wire.ack(SET_VRING_ADDR, &g.ring_addr(), &[]);
    };
    let base: Step = |wire, _, _, _| {
        let _ = wire.ack(SET_VRING_BASE, &vring_state(0, 0), &[]);
    };
    let kick_fd: Step = |wire, _, k, _| {
        let _ = wire.ack(SET_VRING_KICK, &u64_payload(0), &[k]);
    };
    let call_fd: Step = |wire, _, _, c| {
        let _ = wire.ack(SET_VRING_CALL, &u64_payload(0), &[c]);
    };
    let enable: Step = |wire, _, _, _| {
        let _ = wire.ack(SET_VRING_ENABLE, &vring_state(0, 1), &[]);
    };
    let disable: Step = |wire, _, _, _| {
        let _ = wire.ack(SET_VRING_ENABLE, &vring_state(0, 0), &[]);
    };
    let stop: Step = |wire, _, _, _| {
        let _ = wire.send(GET_VRING_BASE, 0, &vring_state(0, 0), &[]);
        let _ = wire.recv();
    };
    let remove: Step = |wire, g, _, _| {
        let _ = wire.ack(REM_MEM_REG, &single_region(&g.region()), &[]);
    };
    let orders: Vec<(&str, Vec<Step>)> = vec![
        (
            "kick before the memory table",
            vec![kick_fd, enable, mem, num, addr],
        ),
        (
            "enable before the addresses",
            vec![mem, num, kick_fd, call_fd, enable],
        ),
        (
            "addresses before the memory table",
            vec![addr, num, kick_fd, enable],
        ),
        (
            "addresses before the size",
            vec![mem, addr, num, kick_fd, enable],
        ),
        ("no call fd", vec![mem, num, addr, kick_fd, enable]),
        (
            "stopped and kicked",
            vec![mem, num, addr, kick_fd, call_fd, enable, stop],
        ),
        (
            "disabled and kicked",
            vec![mem, num, addr, kick_fd, call_fd, enable, disable],
        ),
        (
            "memory removed under a running queue",
            vec![mem, num, addr, kick_fd, call_fd, enable, remove],
        ),
        (
            "memory replaced under a running queue",
            vec![mem, num, addr, kick_fd, call_fd, enable, mem],
        ),
        (
            "everything twice",
            vec![
                mem, mem, num, num, addr, addr, base, kick_fd, kick_fd, call_fd, enable, enable,
            ],
        ),
    ];
    for (name, steps) in orders {
        let mut wire = negotiated(&w);
        let g = Guest::new();
        let (k, c) = (eventfd(), eventfd());
        for step in steps {
            step(&mut wire, &g, k.as_raw_fd(), c.as_raw_fd());
        }
        let mut data = vec![0u8; 4096];
        g.submit(0, guest::T_IN, 0, &mut data);
        kick(k.as_raw_fd());
        // Give the worker a moment to look at what it was kicked for.
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(wire);
        w.check(name);
    }
    // Rings outside guest memory, and for queues that do not exist: refused.
    let mut wire = negotiated(&w);
    let g = Guest::new();
    wire.ok(SET_MEM_TABLE, &mem_table(&[g.region()]), &[g.fd()]);
    wire.refused(SET_VRING_ADDR, &vring_addr(0, USER + SIZE, USER, USER), &[]);
    w.check("descriptor table outside memory");
    let mut wire = negotiated(&w);
    wire.ok(SET_MEM_TABLE, &mem_table(&[g.region()]), &[g.fd()]);
    wire.refused(SET_VRING_ADDR, &vring_addr(3, USER, USER, USER), &[]);
    w.check("addresses for a queue that does not exist");
}

#[test]
fn a_disconnect_at_every_step_of_a_session_harms_nobody() {
    let mut w = Watched::start();
    let g = Guest::new();
    let (k, c) = (eventfd(), eventfd());
    let (k, c) = (k.as_raw_fd(), c.as_raw_fd());
    let steps: Vec<(u32, Vec<u8>, Vec<RawFd>)> = vec![
        (SET_MEM_TABLE, mem_table(&[g.region()]), vec![g.fd()]),
        (SET_VRING_NUM, vring_state(0, QUEUE), vec![]),
        (SET_VRING_BASE, vring_state(0, 0), vec![]),
        (SET_VRING_ADDR, g.ring_addr(), vec![]),
        (SET_VRING_KICK, u64_payload(0), vec![k]),
        (SET_VRING_CALL, u64_payload(0), vec![c]),
        (SET_VRING_ENABLE, vring_state(0, 1), vec![]),
    ];
    for stop_after in 0..=steps.len() + 1 {
        let mut wire = negotiated(&w);
        for (code, payload, fds) in steps.iter().take(stop_after) {
            wire.ok(*code, payload, fds);
        }
        if stop_after > steps.len() {
            // With a request in flight.
            let mut data = vec![0u8; 4096];
            g.submit(0, guest::T_IN, 0, &mut data);
            kick(k);
        }
        drop(wire);
        w.check(&format!("disconnect after {stop_after} setup steps"));
    }
}
