//! thinblk driven by the `vhost` crate's vhost-user frontend, the code cloud-hypervisor uses,
//! in cloud-hypervisor's message order, with every descriptor chain built by hand in guest
//! memory shared through a memfd.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod frontend;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use common::{pattern, raw_export, scratch, Daemon, Scratch};
use frontend::{r, w, wanted_protocol_features, Desc, Used, Vm, GUEST_BASE, GUEST_SIZE};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserVirtioFeatures};
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_SECURE_ERASE, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::ByteValued;

const DISK: u64 = 16 << 20;
const SECTORS: u64 = DISK / 512;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// What an untouched status byte holds.
const NOT_WRITTEN: u8 = 0xFF;
const UNMAP: u32 = 1;
/// Guest physical addresses just past, and well below, the guest's only memory region.
const GUEST_END: u64 = GUEST_BASE + GUEST_SIZE;
const BELOW_GUEST: u64 = 0x1000;

/// A raw export of `DISK` bytes served by a `thinblk serve` child process.
///
/// Field order matters: the daemon must stop before the scratch directory (and the socket in
/// it) is removed, because thinblk wakes its accepting thread by connecting to that socket.
struct Served {
    _daemon: Daemon,
    s: Scratch,
}

fn serve(extra: &str) -> Served {
    let s = scratch(DISK);
    let daemon = Daemon::start(&raw_export(&s, extra), &[&s.socket]);
    Served { s, _daemon: daemon }
}

impl Served {
    fn connect(&self, queues: usize) -> Vm {
        Vm::connect(&self.s.socket, queues)
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = std::fs::File::open(&self.s.image).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut v = vec![0; len];
        f.read_exact(&mut v).unwrap();
        v
    }
}

fn bit(n: u32) -> u64 {
    1 << n
}

/// A 16-byte request header in fresh guest memory.
fn header(vm: &mut Vm, kind: u32, sector: u64) -> u64 {
    let at = vm.alloc(16);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    vm.put(at, &h);
    at
}

/// A status byte in fresh guest memory, holding `NOT_WRITTEN`.
fn status_byte(vm: &mut Vm) -> u64 {
    let at = vm.alloc(1);
    vm.put(at, &[NOT_WRITTEN]);
    at
}

/// A guest buffer holding `bytes`.
fn buffer(vm: &mut Vm, bytes: &[u8]) -> u64 {
    let at = vm.alloc(bytes.len() as u64);
    vm.put(at, bytes);
    at
}

/// DISCARD / WRITE_ZEROES segments: (sector, sectors, flags).
fn segments(vm: &mut Vm, segs: &[(u64, u32, u32)]) -> Desc {
    let mut bytes = Vec::new();
    for &(sector, n, flags) in segs {
        bytes.extend_from_slice(&sector.to_le_bytes());
        bytes.extend_from_slice(&n.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
    }
    r(buffer(vm, &bytes), bytes.len() as u32)
}

/// Header, `data`, status: one direct chain on queue `q`. Returns the status and used element.
fn request(vm: &mut Vm, q: usize, kind: u32, sector: u64, data: &[Desc]) -> (u8, Used) {
    let h = header(vm, kind, sector);
    let st = status_byte(vm);
    let chain: Vec<Desc> = [r(h, 16)]
        .into_iter()
        .chain(data.iter().copied())
        .chain([w(st, 1)])
        .collect();
    let (heads, used) = vm.run(q, &[&chain]);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].id, u32::from(heads[0]), "used id is not the head");
    (vm.get(st, 1)[0], used[0])
}

fn write(vm: &mut Vm, q: usize, sector: u64, bytes: &[u8]) -> u8 {
    let buf = buffer(vm, bytes);
    let (status, used) = request(
        vm,
        q,
        VIRTIO_BLK_T_OUT,
        sector,
        &[r(buf, bytes.len() as u32)],
    );
    assert_eq!(used.len, 1, "a write uses the status byte only");
    status
}

fn read(vm: &mut Vm, q: usize, sector: u64, len: usize) -> (u8, Vec<u8>) {
    let buf = vm.alloc(len as u64);
    let (status, used) = request(vm, q, VIRTIO_BLK_T_IN, sector, &[w(buf, len as u32)]);
    if status == OK {
        assert_eq!(
            used.len as usize,
            len + 1,
            "a read uses its data and status"
        );
    }
    (status, vm.get(buf, len))
}

fn read_ok(vm: &mut Vm, q: usize, sector: u64, len: usize) -> Vec<u8> {
    let (status, data) = read(vm, q, sector, len);
    assert_eq!(status, OK, "read of {len} bytes at sector {sector}");
    data
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn setup_in_cloud_hypervisor_order_negotiates_what_it_needs() {
    let d = serve("");
    let vm = d.connect(2);
    let f = vm.negotiated.device_features;
    for (name, b) in [
        ("VERSION_1", VIRTIO_F_VERSION_1),
        ("INDIRECT_DESC", VIRTIO_RING_F_INDIRECT_DESC),
        ("EVENT_IDX", VIRTIO_RING_F_EVENT_IDX),
        ("BLK_SIZE", VIRTIO_BLK_F_BLK_SIZE),
        ("SEG_MAX", VIRTIO_BLK_F_SEG_MAX),
        ("FLUSH", VIRTIO_BLK_F_FLUSH),
        ("CONFIG_WCE", VIRTIO_BLK_F_CONFIG_WCE),
        ("MQ", VIRTIO_BLK_F_MQ),
        ("DISCARD", VIRTIO_BLK_F_DISCARD),
        ("WRITE_ZEROES", VIRTIO_BLK_F_WRITE_ZEROES),
    ] {
        assert_ne!(f & bit(b), 0, "{name} is not offered");
    }
    assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0, "a writable export offers RO");
    assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    assert!(
        vm.negotiated
            .protocol_features
            .contains(wanted_protocol_features()),
        "protocol features offered: {:?}",
        vm.negotiated.protocol_features
    );
    assert_eq!(vm.negotiated.queue_num, 2);
    assert!(vm.event_idx(), "the driver runs with EVENT_IDX");
}

#[test]
fn config_space_reports_capacity_geometry_queues_and_range_limits() {
    let d = serve("");
    let mut vm = d.connect(1);
    let c = vm.config(0, 60);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), SECTORS);
    assert_eq!(
        le32(&c, 12),
        254,
        "seg_max: queue size less header and status"
    );
    assert_eq!(le32(&c, 20), 512, "blk_size");
    assert_eq!(
        c[32], 1,
        "writeback: the cache is on after FLUSH is negotiated"
    );
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2, "num_queues");
    let (max_discard, discard_segs, discard_align) = (le32(&c, 36), le32(&c, 40), le32(&c, 44));
    let (max_zeroes, zeroes_segs) = (le32(&c, 48), le32(&c, 52));
    assert!(max_discard > 0 && discard_segs > 0 && discard_align > 0);
    assert!(max_zeroes > 0 && zeroes_segs > 0);
    assert_eq!(max_discard % discard_align, 0);
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    // A read of one field answers that field alone.
    assert_eq!(vm.config(34, 2), vec![2, 0]);
}

#[test]
fn written_data_reads_back_and_reaches_the_backing_file() {
    let d = serve("");
    let mut vm = d.connect(1);
    let data = pattern(1, 4096, 8192);
    assert_eq!(write(&mut vm, 0, 8, &data), OK);
    assert_eq!(read_ok(&mut vm, 0, 8, 8192), data);
    let last = pattern(2, DISK - 512, 512);
    assert_eq!(write(&mut vm, 0, SECTORS - 1, &last), OK);
    assert_eq!(read_ok(&mut vm, 0, SECTORS - 1, 512), last);
    assert_eq!(d.file_bytes(4096, 8192), data);
    assert_eq!(d.file_bytes(DISK - 512, 512), last);
}

#[test]
fn a_request_split_across_many_descriptors_scatters_and_gathers() {
    let d = serve("");
    let mut vm = d.connect(1);
    let data = pattern(3, 0, 4096);
    // Header cut in two, data in three uneven pieces, none of them page aligned.
    let h = header(&mut vm, VIRTIO_BLK_T_OUT, 64);
    let pieces = [(0usize, 512usize), (512, 1536), (2048, 2048)];
    let mut chain = vec![r(h, 10), r(h + 10, 6)];
    for (i, &(at, len)) in pieces.iter().enumerate() {
        let buf = vm.alloc(len as u64 + 4096) + 512 + 8 * i as u64;
        vm.put(buf, &data[at..at + len]);
        chain.push(r(buf, len as u32));
    }
    let st = status_byte(&mut vm);
    chain.push(w(st, 1));
    let (_, used) = vm.run(0, &[&chain]);
    assert_eq!((vm.get(st, 1)[0], used[0].len), (OK, 1));

    // Read it back cut differently: seven pieces, the status sharing the last buffer.
    let h = header(&mut vm, VIRTIO_BLK_T_IN, 64);
    let cuts = [512usize, 512, 1024, 512, 512, 512, 512];
    let mut bufs = Vec::new();
    let mut chain = vec![r(h, 16)];
    for (i, &len) in cuts.iter().enumerate() {
        let extra = if i + 1 == cuts.len() { 1 } else { 0 };
        let buf = vm.alloc(len as u64 + extra);
        chain.push(w(buf, (len as u64 + extra) as u32));
        bufs.push((buf, len));
    }
    let (_, used) = vm.run(0, &[&chain]);
    let (last_buf, last_len) = *bufs.last().unwrap();
    assert_eq!(vm.get(last_buf + last_len as u64, 1)[0], OK);
    assert_eq!(used[0].len, 4096 + 1);
    let back: Vec<u8> = bufs
        .iter()
        .flat_map(|&(buf, len)| vm.get(buf, len))
        .collect();
    assert_eq!(back, data);
}

#[test]
fn an_indirect_chain_is_followed() {
    let d = serve("");
    let mut vm = d.connect(1);
    let data = pattern(4, 0, 3 * 512);
    let h = header(&mut vm, VIRTIO_BLK_T_OUT, 100);
    let a = buffer(&mut vm, &data[..512]);
    let b = buffer(&mut vm, &data[512..]);
    let st = status_byte(&mut vm);
    let head = vm.add_indirect(0, &[r(h, 16), r(a, 512), r(b, 1024), w(st, 1)]);
    vm.kick(0);
    let used = vm.wait_used(0, 1);
    assert_eq!(
        used,
        vec![Used {
            id: head.into(),
            len: 1
        }]
    );
    assert_eq!(vm.get(st, 1)[0], OK);

    // Read back through an indirect table as well, and directly.
    let h = header(&mut vm, VIRTIO_BLK_T_IN, 100);
    let buf = vm.alloc(3 * 512);
    let st = status_byte(&mut vm);
    let head = vm.add_indirect(0, &[r(h, 16), w(buf, 3 * 512), w(st, 1)]);
    vm.kick(0);
    let used = vm.wait_used(0, 1);
    assert_eq!(
        used,
        vec![Used {
            id: head.into(),
            len: 3 * 512 + 1
        }]
    );
    assert_eq!(vm.get(st, 1)[0], OK);
    assert_eq!(vm.get(buf, 3 * 512), data);
    assert_eq!(read_ok(&mut vm, 0, 100, 3 * 512), data);
}

#[test]
fn flush_completes_with_ok() {
    let d = serve("");
    let mut vm = d.connect(1);
    assert_eq!(write(&mut vm, 0, 0, &pattern(5, 0, 4096)), OK);
    let (status, used) = request(&mut vm, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((status, used.len), (OK, 1));
}

#[test]
fn get_id_returns_the_export_id_nul_padded() {
    let d = serve(",id=vm7-root");
    let mut vm = d.connect(1);
    let buf = vm.alloc(u64::from(VIRTIO_BLK_ID_BYTES));
    let (status, used) = request(
        &mut vm,
        0,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[w(buf, VIRTIO_BLK_ID_BYTES)],
    );
    assert_eq!(status, OK);
    assert_eq!(used.len, VIRTIO_BLK_ID_BYTES + 1);
    let mut want = b"vm7-root".to_vec();
    want.resize(VIRTIO_BLK_ID_BYTES as usize, 0);
    assert_eq!(vm.get(buf, VIRTIO_BLK_ID_BYTES as usize), want);
}

#[test]
fn discard_and_write_zeroes_with_several_segments_read_back_zeros() {
    let d = serve("");
    let mut vm = d.connect(1);
    let len = 256 * 1024;
    let data = pattern(6, 0, len);
    assert_eq!(write(&mut vm, 0, 0, &data), OK);

    // WRITE_ZEROES: three segments, one allowed to unmap.
    let zeroes = [(8, 8, 0), (40, 16, UNMAP), (100, 3, 0)];
    let segs = segments(&mut vm, &zeroes);
    let (status, used) = request(&mut vm, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[segs]);
    assert_eq!((status, used.len), (OK, 1));
    // DISCARD: two 4 KiB aligned segments.
    let discards = [(128u64, 16u32, 0u32), (256, 64, 0)];
    let segs = segments(&mut vm, &discards);
    let (status, used) = request(&mut vm, 0, VIRTIO_BLK_T_DISCARD, 0, &[segs]);
    assert_eq!((status, used.len), (OK, 1));

    let mut want = data.clone();
    for &(sector, n, _) in zeroes.iter().chain(discards.iter()) {
        let (a, b) = (sector as usize * 512, (sector as usize + n as usize) * 512);
        want[a..b].fill(0);
    }
    assert_eq!(read_ok(&mut vm, 0, 0, len), want);
}

#[test]
fn range_requests_with_unknown_flags_are_unsupported_and_change_nothing() {
    let d = serve("");
    let mut vm = d.connect(1);
    let data = pattern(7, 0, 8192);
    assert_eq!(write(&mut vm, 0, 0, &data), OK);
    let cases = [
        // An unknown flag in the second segment: the first must not run either.
        (VIRTIO_BLK_T_WRITE_ZEROES, [(0u64, 8u32, 0u32), (8, 8, 2)]),
        (VIRTIO_BLK_T_DISCARD, [(0, 8, 0), (8, 8, 0x8000_0000)]),
        // The specification reserves UNMAP for WRITE_ZEROES.
        (VIRTIO_BLK_T_DISCARD, [(0, 8, 0), (8, 8, UNMAP)]),
    ];
    for (kind, segs) in cases {
        let segs = segments(&mut vm, &segs);
        let (status, used) = request(&mut vm, 0, kind, 0, &[segs]);
        assert_eq!((status, used.len), (UNSUPP, 1), "type {kind}");
    }
    assert_eq!(read_ok(&mut vm, 0, 0, 8192), data);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let d = serve("");
    let mut vm = d.connect(1);
    for kind in [0x99, VIRTIO_BLK_T_SECURE_ERASE, 0x8000_0001] {
        let buf = vm.alloc(512);
        let (status, used) = request(&mut vm, 0, kind, 0, &[w(buf, 512)]);
        assert_eq!((status, used.len), (UNSUPP, 1), "type {kind:#x}");
    }
    assert_eq!(read(&mut vm, 0, 0, 512).0, OK);
}

/// A malformed chain and what the device must answer: the used length and status byte.
struct Bad {
    what: &'static str,
    head: u16,
    status_at: Option<u64>,
    want_status: u8,
    want_len: u32,
}

/// A request the device must answer: what it is, request type, sector, data descriptors,
/// header length, and the status expected.
type Answered = (&'static str, u32, u64, Vec<Desc>, u32, u8);

/// Adds a chain that is not a request at all, built descriptor by descriptor.
fn add_raw(vm: &mut Vm, descs: &[Descriptor]) -> u16 {
    let first = vm.reserve_descs(0, descs.len() as u16);
    for (i, d) in descs.iter().enumerate() {
        vm.put_raw_desc(0, first + i as u16, *d);
    }
    vm.make_available(0, first);
    first
}

#[test]
fn every_bad_chain_returns_to_the_used_ring() {
    let d = serve("");
    let mut vm = d.connect(1);
    let mut bad: Vec<Bad> = Vec::new();

    // Requests with a writable status byte: answered with IOERR or UNSUPP, status only.
    let buf = vm.alloc(8192);
    let seg_past_end = segments(&mut vm, &[(SECTORS - 4, 8, 0)]);
    let ragged_segs = r(segments(&mut vm, &[(0, 8, 0)]).addr, 12);
    #[rustfmt::skip]
    let cases: Vec<Answered> = vec![
        ("header too short", VIRTIO_BLK_T_IN, 0, vec![], 8, IOERR),
        ("read past capacity", VIRTIO_BLK_T_IN, SECTORS, vec![w(buf, 512)], 16, IOERR),
        ("write straddling capacity", VIRTIO_BLK_T_OUT, SECTORS - 1, vec![r(buf, 1024)], 16, IOERR),
        ("sector overflowing u64 bytes", VIRTIO_BLK_T_IN, u64::MAX / 256, vec![w(buf, 512)], 16, IOERR),
        ("write of 1000 bytes", VIRTIO_BLK_T_OUT, 0, vec![r(buf, 1000)], 16, IOERR),
        ("read of 100 bytes", VIRTIO_BLK_T_IN, 0, vec![w(buf, 100)], 16, IOERR),
        ("write data outside guest memory", VIRTIO_BLK_T_OUT, 0, vec![r(GUEST_END + 0x1000, 512)], 16, IOERR),
        ("read data below guest memory", VIRTIO_BLK_T_IN, 0, vec![w(BELOW_GUEST, 512)], 16, IOERR),
        ("read data straddling the end of guest memory", VIRTIO_BLK_T_IN, 0, vec![w(GUEST_END - 512, 1024)], 16, IOERR),
        ("read with device-readable data", VIRTIO_BLK_T_IN, 0, vec![r(buf, 512)], 16, IOERR),
        ("write with device-writable data", VIRTIO_BLK_T_OUT, 0, vec![w(buf, 512)], 16, IOERR),
        ("readable after writable", VIRTIO_BLK_T_IN, 0, vec![w(buf, 512), r(buf + 4096, 512)], 16, IOERR),
        ("flush carrying data", VIRTIO_BLK_T_FLUSH, 0, vec![r(buf, 512)], 16, IOERR),
        ("write zeroes past capacity", VIRTIO_BLK_T_WRITE_ZEROES, 0, vec![seg_past_end], 16, IOERR),
        ("discard with a ragged segment list", VIRTIO_BLK_T_DISCARD, 0, vec![ragged_segs], 16, IOERR),
        ("unknown request type", 0x77, 0, vec![], 16, UNSUPP),
    ];
    for (what, kind, sector, data, hdr_len, want) in cases {
        let h = header(&mut vm, kind, sector);
        let st = status_byte(&mut vm);
        let chain: Vec<Desc> = [r(h, hdr_len)]
            .into_iter()
            .chain(data)
            .chain([w(st, 1)])
            .collect();
        let head = vm.add(0, &chain);
        bad.push(Bad {
            what,
            head,
            status_at: Some(st),
            want_status: want,
            want_len: 1,
        });
    }
    // Headers the device cannot read, with a writable status.
    for (what, at) in [
        ("header below guest memory", BELOW_GUEST),
        ("header past guest memory", GUEST_END),
        ("header straddling the end of guest memory", GUEST_END - 8),
    ] {
        let st = status_byte(&mut vm);
        let head = vm.add(0, &[r(at, 16), w(st, 1)]);
        bad.push(Bad {
            what,
            head,
            status_at: Some(st),
            want_status: IOERR,
            want_len: 1,
        });
    }

    // Chains with nowhere to put a status: returned with length 0, nothing written.
    let mut unanswered = |what, head, st: Option<u64>| {
        bad.push(Bad {
            what,
            head,
            status_at: st,
            want_status: NOT_WRITTEN,
            want_len: 0,
        });
    };
    let h = header(&mut vm, VIRTIO_BLK_T_IN, 0);
    let rbuf = vm.alloc(512);
    let st = status_byte(&mut vm);
    let head = vm.add(0, &[r(h, 16), w(rbuf, 512), r(st, 1)]);
    unanswered("device-readable status", head, Some(st));
    let h = header(&mut vm, VIRTIO_BLK_T_FLUSH, 0);
    let head = vm.add(0, &[r(h, 16), w(GUEST_END, 1)]);
    unanswered("status outside guest memory", head, None);
    let h = header(&mut vm, VIRTIO_BLK_T_FLUSH, 0);
    let head = vm.add(0, &[r(h, 16)]);
    unanswered("header only", head, None);

    let (next, ind) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_INDIRECT as u16);
    let h = header(&mut vm, VIRTIO_BLK_T_FLUSH, 0);
    // A descriptor whose `next` is itself.
    let first = vm.reserve_descs(0, 1);
    vm.put_raw_desc(0, first, Descriptor::new(h, 16, next, first));
    vm.make_available(0, first);
    unanswered("descriptor looping onto itself", first, None);
    let head = add_raw(
        &mut vm,
        &[Descriptor::new(h, 16, next, frontend::QUEUE_SIZE + 7)],
    );
    unanswered("next index past the table", head, None);
    let head = add_raw(&mut vm, &[Descriptor::new(GUEST_END, 64, ind, 0)]);
    unanswered("indirect table outside guest memory", head, None);
    let table = vm.alloc(64);
    vm.put(table, &[0; 64]);
    let head = add_raw(&mut vm, &[Descriptor::new(table, 40, ind, 0)]);
    unanswered("indirect table of 2.5 descriptors", head, None);
    // An indirect table whose descriptor is itself indirect.
    let inner = vm.alloc(32);
    let outer = vm.alloc(16);
    let d0 = Descriptor::new(inner, 32, ind, 0);
    vm.put(outer, RawDescriptor::from(d0).as_slice());
    let head = add_raw(&mut vm, &[Descriptor::new(outer, 16, ind, 0)]);
    unanswered("nested indirect table", head, None);

    // The device may already be working through them: it is free to look before a kick.
    vm.kick(0);
    let used = vm.wait_used(0, bad.len() as u16);
    assert_eq!(
        vm.used_idx(0),
        bad.len() as u16,
        "used idx of a fresh queue"
    );
    let by_id: HashMap<u32, u32> = used.iter().map(|u| (u.id, u.len)).collect();
    assert_eq!(
        by_id.len(),
        bad.len(),
        "a chain was returned twice: {used:?}"
    );
    for b in &bad {
        let len = by_id.get(&u32::from(b.head));
        assert_eq!(len, Some(&b.want_len), "{}: used length", b.what);
        if let Some(st) = b.status_at {
            assert_eq!(vm.get(st, 1)[0], b.want_status, "{}: status", b.what);
        }
    }
    assert_eq!(
        vm.get(rbuf, 512),
        vec![0xEE; 512],
        "a rejected read wrote data"
    );
    // The disk was all zeros; the rejected writes aimed at its first and last sectors.
    assert_eq!(
        d.file_bytes(0, 4096),
        vec![0; 4096],
        "a rejected write landed"
    );
    assert_eq!(
        d.file_bytes(DISK - 4096, 4096),
        vec![0; 4096],
        "a rejected write landed"
    );

    // The queue still works.
    let data = pattern(8, 0, 4096);
    assert_eq!(write(&mut vm, 0, 16, &data), OK);
    assert_eq!(read_ok(&mut vm, 0, 16, 4096), data);
}

#[test]
fn a_read_only_export_refuses_every_change() {
    let d = serve(",readonly=on");
    let original = pattern(9, 0, 4096);
    std::fs::write(&d.s.image, {
        let mut v = original.clone();
        v.resize(DISK as usize, 0);
        v
    })
    .unwrap();
    let mut vm = d.connect(1);
    assert_ne!(vm.negotiated.device_features & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(write(&mut vm, 0, 0, &[0x55; 4096]), IOERR);
    for kind in [VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD] {
        let segs = segments(&mut vm, &[(0, 8, 0)]);
        let (status, used) = request(&mut vm, 0, kind, 0, &[segs]);
        assert_eq!((status, used.len), (IOERR, 1), "type {kind}");
    }
    assert_eq!(read_ok(&mut vm, 0, 0, 4096), original);
    assert_eq!(d.file_bytes(0, 4096), original);
}

#[test]
fn clearing_the_writeback_byte_switches_to_writethrough() {
    let d = serve("");
    let mut vm = d.connect(1);
    assert_eq!(vm.config(32, 1), vec![1]);
    vm.fe
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(vm.config(32, 1), vec![0], "writeback after clearing it");
    let data = pattern(10, 0, 65536);
    assert_eq!(write(&mut vm, 0, 2048, &data), OK);
    assert_eq!(read_ok(&mut vm, 0, 2048, 65536), data);
    assert_eq!(d.file_bytes(2048 * 512, 65536), data);
    let (status, _) = request(&mut vm, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(status, OK);
    vm.fe
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[1])
        .unwrap();
    assert_eq!(vm.config(32, 1), vec![1]);
}

#[test]
fn config_writes_other_than_the_writeback_byte_are_refused() {
    let d = serve("");
    for (offset, bytes) in [
        (0u32, vec![0u8; 8]),
        (32, vec![2]),
        (32, vec![0, 0]),
        (34, vec![9, 0]),
    ] {
        let mut vm = d.connect(1);
        let refused = vm
            .fe
            .set_config(offset, VhostUserConfigFlags::WRITABLE, &bytes);
        assert!(
            refused.is_err(),
            "{} bytes at {offset} accepted",
            bytes.len()
        );
        // vhost-user-backend ends the connection after any refused request; the export
        // itself lives on, unchanged.
        drop(vm);
        let mut vm = d.connect(1);
        let c = vm.config(0, 60);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), SECTORS);
        assert_eq!((c[32], c[34]), (1, 2));
    }
}

#[test]
fn requests_on_the_second_queue_complete() {
    let d = serve("");
    let mut vm = d.connect(2);
    let data = pattern(11, 0, 8192);
    assert_eq!(write(&mut vm, 1, 512, &data), OK);
    assert_eq!(read_ok(&mut vm, 1, 512, 8192), data);
    assert_eq!(read_ok(&mut vm, 0, 512, 8192), data);

    // Both queues busy at once, each answering on its own call eventfd.
    let other = pattern(12, 0, 4096);
    let b0 = buffer(&mut vm, &other);
    let h0 = header(&mut vm, VIRTIO_BLK_T_OUT, 4096);
    let s0 = status_byte(&mut vm);
    let b1 = vm.alloc(8192);
    let h1 = header(&mut vm, VIRTIO_BLK_T_IN, 512);
    let s1 = status_byte(&mut vm);
    vm.add(0, &[r(h0, 16), r(b0, 4096), w(s0, 1)]);
    vm.add(1, &[r(h1, 16), w(b1, 8192), w(s1, 1)]);
    vm.kick(1);
    vm.kick(0);
    assert_eq!(vm.wait_used(1, 1)[0].len, 8193);
    assert_eq!(vm.wait_used(0, 1)[0].len, 1);
    assert_eq!((vm.get(s0, 1)[0], vm.get(s1, 1)[0]), (OK, OK));
    assert_eq!(vm.get(b1, 8192), data);
    assert_eq!(read_ok(&mut vm, 1, 4096, 4096), other);
}

#[test]
fn a_new_connection_reads_what_the_previous_one_wrote() {
    let d = serve("");
    let data = pattern(13, 0, 16384);
    {
        let mut vm = d.connect(2);
        assert_eq!(write(&mut vm, 0, 1000, &data), OK);
        assert_eq!(write(&mut vm, 1, 3000, &data), OK);
        vm.fe
            .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
            .unwrap();
    }
    let mut vm = d.connect(2);
    assert_eq!(read_ok(&mut vm, 0, 3000, 16384), data);
    assert_eq!(read_ok(&mut vm, 1, 1000, 16384), data);
    assert_eq!(
        vm.config(32, 1),
        vec![1],
        "a new driver starts with the cache on"
    );
    // And a third time, after a disconnect with requests never kicked.
    let h = header(&mut vm, VIRTIO_BLK_T_FLUSH, 0);
    vm.add(0, &[r(h, 16)]);
    drop(vm);
    let mut vm = d.connect(1);
    assert_eq!(read_ok(&mut vm, 0, 1000, 16384), data);
}

#[test]
fn a_head_index_past_the_ring_does_not_stop_the_queue() {
    let d = serve("");
    let mut vm = d.connect(1);
    vm.make_available(0, frontend::QUEUE_SIZE + 3);
    vm.kick(0);
    // Nothing legal can be returned for that head; what matters is that the queue lives on.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let h = header(&mut vm, VIRTIO_BLK_T_FLUSH, 0);
    let st = status_byte(&mut vm);
    vm.add(0, &[r(h, 16), w(st, 1)]);
    vm.kick(0);
    let used = vm.wait_used(0, 1);
    assert_eq!(used[0].len, 1);
    assert_eq!(vm.get(st, 1)[0], OK);
}
