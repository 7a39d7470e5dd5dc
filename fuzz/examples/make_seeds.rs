//! Writes the seed corpora under `fuzz/corpus/<target>/`: a few valid requests and queues,
//! QMP lines, and the blocks and image of a small pool. Run from `fuzz/`:
//! `cargo run --release --example make_seeds`. Deterministic: rerunning rewrites the same files.

use std::path::Path;

use thinblk::engine::pdata::check::check_pool;
use thinblk::engine::pdata::superblock::BLOCK_SIZE;
use thinblk::nbd::proto::*;
use thinblk_fuzz::vhost_user::{encode, FdKind, Op};
use thinblk_fuzz::{block_manager, pool_image};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

fn range_segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend_from_slice(&sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

/// A `virtio_request` input: flags, descriptors, and RAM with `ram` placed at each address.
fn request(flags: u8, descs: &[(u64, u32, bool)], ram: &[(usize, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![flags, descs.len() as u8];
    for &(addr, len, w) in descs {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.push(u8::from(w));
    }
    let mut mem = vec![0u8; 0x400];
    for (at, bytes) in ram {
        if mem.len() < at + bytes.len() {
            mem.resize(at + bytes.len(), 0);
        }
        mem[*at..at + bytes.len()].copy_from_slice(bytes);
    }
    out.extend_from_slice(&mem);
    out
}

fn virtio_request() {
    let t = "virtio_request";
    let rd = header(VIRTIO_BLK_T_IN, 8);
    write(
        t,
        "read",
        &request(
            0,
            &[(0x100, 16, false), (0x200, 1024, true), (0x80, 1, true)],
            &[(0x100, rd)],
        ),
    );
    let wr = header(VIRTIO_BLK_T_OUT, 1);
    write(
        t,
        "write-split-header",
        &request(
            2,
            &[(0x100, 10, false), (0x10a, 6 + 512, false), (0x80, 1, true)],
            &[(0x100, wr)],
        ),
    );
    write(
        t,
        "flush",
        &request(
            0,
            &[(0x100, 16, false), (0x80, 1, true)],
            &[(0x100, header(VIRTIO_BLK_T_FLUSH, 0))],
        ),
    );
    write(
        t,
        "get-id",
        &request(
            0xa8,
            &[(0x100, 16, false), (0x200, 20, true), (0x80, 1, true)],
            &[(0x100, header(VIRTIO_BLK_T_GET_ID, 0))],
        ),
    );
    let mut dz = header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dz.extend(range_segment(2, 4, 1));
    dz.extend(range_segment(16, 8, 0));
    write(
        t,
        "write-zeroes",
        &request(0, &[(0x100, 48, false), (0x80, 1, true)], &[(0x100, dz)]),
    );
    let mut ds = header(VIRTIO_BLK_T_DISCARD, 0);
    ds.extend(range_segment(4, 4, 0));
    write(
        t,
        "discard",
        &request(0, &[(0x100, 32, false), (0x80, 1, true)], &[(0x100, ds)]),
    );
    let rd2 = header(VIRTIO_BLK_T_IN, 0);
    write(
        t,
        "read-across-regions",
        &request(
            0,
            &[(0x100, 16, false), (0xff00, 512, true), (0x2_0000, 1, true)],
            &[(0x100, rd2)],
        ),
    );
}

const QUEUE_SIZE: usize = 16;
const AVAIL: usize = 0x100;
const BUFS: usize = 0x1000;

fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    d
}

/// A `virtio_queue` input: `flags`, then RAM holding the chains (each a list of buffers) in
/// the descriptor table, their heads in the available ring, and `bufs` placed in memory.
fn queue(flags: u8, chains: &[Vec<(u64, u32, u16)>], bufs: &[(usize, Vec<u8>)]) -> Vec<u8> {
    let mut ram = vec![0u8; 0x1400];
    let mut next = 0usize;
    let mut heads = Vec::new();
    for chain in chains {
        heads.push(next as u16);
        for (i, &(addr, len, f)) in chain.iter().enumerate() {
            let more = if i + 1 < chain.len() {
                VRING_DESC_F_NEXT as u16
            } else {
                0
            };
            let d = raw_desc(addr, len, f | more, (next + 1) as u16);
            ram[16 * next..16 * next + 16].copy_from_slice(&d);
            next += 1;
        }
    }
    ram[AVAIL + 2..AVAIL + 4].copy_from_slice(&(heads.len() as u16).to_le_bytes());
    for (i, h) in heads.iter().enumerate() {
        ram[AVAIL + 4 + 2 * i..AVAIL + 6 + 2 * i].copy_from_slice(&h.to_le_bytes());
    }
    assert!(next <= QUEUE_SIZE);
    for (at, b) in bufs {
        ram[*at..at + b.len()].copy_from_slice(b);
    }
    let mut out = vec![flags];
    out.extend_from_slice(&ram);
    out
}

fn virtio_queue() {
    let t = "virtio_queue";
    let w = VRING_DESC_F_WRITE as u16;
    let b = BUFS as u64;
    let wr = header(VIRTIO_BLK_T_OUT, 2);
    let rd = header(VIRTIO_BLK_T_IN, 2);
    let chains = vec![
        vec![(b, 16, 0), (b + 0x100, 512, 0), (b + 0x20, 1, w)],
        vec![(b + 0x40, 16, 0), (b + 0x300, 512, w), (b + 0x21, 1, w)],
    ];
    let bufs = vec![(BUFS, wr.clone()), (BUFS + 0x40, rd.clone())];
    write(t, "write-then-read", &queue(0, &chains, &bufs));
    write(
        t,
        "write-then-read-event-idx",
        &queue(2 | 4, &chains, &bufs),
    );
    // One indirect descriptor whose table holds a flush.
    let mut table = raw_desc(b + 0x40, 16, VRING_DESC_F_NEXT as u16, 1);
    table.extend(raw_desc(b + 0x22, 1, w, 0));
    let chains = vec![vec![(b + 0x200, 32, VRING_DESC_F_INDIRECT as u16)]];
    let bufs = vec![
        (BUFS + 0x40, header(VIRTIO_BLK_T_FLUSH, 0)),
        (BUFS + 0x200, table),
    ];
    write(t, "indirect-flush", &queue(4 | 8, &chains, &bufs));
    let mut dz = header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    dz.extend(range_segment(0, 8, 1));
    let chains = vec![
        vec![(b, 32, 0), (b + 0x20, 1, w)],
        vec![(b + 0x40, 16, 0), (b + 0x300, 20, w), (b + 0x21, 1, w)],
    ];
    let bufs = vec![(BUFS, dz), (BUFS + 0x40, header(VIRTIO_BLK_T_GET_ID, 0))];
    write(t, "write-zeroes-and-get-id", &queue(1, &chains, &bufs));
}

fn qmp() {
    let t = "qmp";
    let lines: &[(&str, u8, &str)] = &[
        ("negotiate", 0, r#"{"execute":"qmp_capabilities"}{"execute":"query-version","id":1}"#),
        ("query-all", 1, "{\"execute\":\"query-commands\"}\r\n{\"execute\":\"query-block-exports\"}\n{\"execute\":\"query-named-block-nodes\",\"id\":\"x\"}"),
        ("export-add", 1, r#"{"execute":"block-export-add","arguments":{"type":"vhost-user-blk","id":"e0","node-name":"disk0","addr":{"type":"unix","path":"/tmp/x.sock"},"writable":true,"num-queues":2,"queue-size":128}}"#),
        ("export-del", 1, r#"{"execute":"block-export-del","arguments":{"id":"e0","mode":"hard"}}"#),
        ("garbage", 0, r#" }{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}} 42 "str\"ing" [1,{"a":null}] nonsense{"#),
        ("bad-frames", 1, r#"{"execute":1}{"arguments":[]}{"execute":"x","id":[1],"extra":0}[]"#),
    ];
    for (name, mode, text) in lines {
        let mut b = vec![*mode];
        b.extend_from_slice(text.as_bytes());
        write(t, name, &b);
    }
}

fn pdata(image: &[u8]) {
    for (b, blk) in image.chunks_exact(BLOCK_SIZE).enumerate() {
        if blk.iter().any(|&x| x != 0) {
            let mut seed = blk.to_vec();
            // Parameters: a key, a key, entry/from/to, ...: something in range.
            for p in [3u64, 7, 5, 0, 200] {
                seed.extend_from_slice(&p.to_le_bytes());
            }
            write("pdata_blocks", &format!("pool-block-{b:02}"), &seed);
        }
    }
    let t = "pdata_image";
    write(t, "pool-intact", &[0]);
    // Edit block 0's data_mapping_root to point at block 1.
    write(
        t,
        "pool-edited-root",
        &[0, 0, 0x40, 0x01, 8, 1, 0, 0, 0, 0, 0, 0, 0],
    );
    let mut raw = vec![3u8];
    raw.extend_from_slice(&image[..16 * BLOCK_SIZE]);
    write(t, "pool-raw-first-16-blocks", &raw);
}

/// A vhost-user message with `payload` and descriptors of `fds`.
fn msg(code: u8, payload: Vec<u8>, fds: &[FdKind]) -> Op {
    Op::Message {
        code,
        need_reply: false,
        payload,
        fds: fds.to_vec(),
    }
}

fn le(words: &[u64], widths: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    for (w, n) in words.iter().zip(widths) {
        out.extend_from_slice(&w.to_le_bytes()[..*n]);
    }
    out
}

/// A memory region: guest address 0, 1 MiB, at the frontend's address `UADDR`, file offset 0.
const UADDR: u64 = 0x7f00_0000_0000;
fn region() -> Vec<u8> {
    le(&[0, 1 << 20, UADDR, 0], &[8, 8, 8, 8])
}

/// Negotiation in cloud-hypervisor's order, then a config read.
fn negotiation() -> Vec<Op> {
    let virtio = (1u64 << 32) | (1 << 30) | (1 << VIRTIO_BLK_F_FLUSH);
    let protocol = 0x8209u64; // MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS
    vec![
        msg(3, vec![], &[]),
        msg(1, vec![], &[]),
        msg(15, vec![], &[]),
        msg(16, le(&[protocol], &[8]), &[]),
        msg(17, vec![], &[]),
        msg(2, le(&[virtio], &[8]), &[]),
        msg(24, [le(&[0, 60, 0], &[4, 4, 4]), vec![0; 60]].concat(), &[]),
    ]
}

/// Queue 0 of 16 entries in the 1 MiB memfd, with call and kick eventfds, enabled.
fn queue_setup() -> Vec<Op> {
    vec![
        msg(
            5,
            [le(&[1, 0], &[4, 4]), region()].concat(),
            &[FdKind::Memfd(3)],
        ),
        msg(8, le(&[0, 16], &[4, 4]), &[]),
        msg(
            9,
            le(
                &[0, 0, UADDR, UADDR + 0x200, UADDR + 0x100, 0],
                &[4, 4, 8, 8, 8, 8],
            ),
            &[],
        ),
        msg(10, le(&[0, 0], &[4, 4]), &[]),
        msg(13, le(&[0], &[8]), &[FdKind::EventFd]),
        msg(12, le(&[0], &[8]), &[FdKind::EventFd]),
        msg(18, le(&[0, 1], &[4, 4]), &[]),
    ]
}

/// Request number `n` (of at most 5) of `kind` in the memfd: descriptors 3n to 3n+2, header
/// at 0x1000 + 16n, 512 bytes of data at 0x2000 + 0x1000n, status byte at 0x8000 + n (0xff
/// until the device writes it); made available in ring slot n, and kicked.
fn request_ops(kind: u32, n: u64) -> Vec<Op> {
    let data_flags = if kind == VIRTIO_BLK_T_IN {
        VRING_DESC_F_WRITE
    } else {
        0
    };
    let next = u64::from(VRING_DESC_F_NEXT);
    let (hdr, data, status) = (0x1000 + 16 * n, 0x2000 + 0x1000 * n, 0x8000 + n);
    let table = [
        le(&[hdr, 16, next, 3 * n + 1], &[8, 4, 2, 2]),
        le(
            &[data, 512, next | u64::from(data_flags), 3 * n + 2],
            &[8, 4, 2, 2],
        ),
        le(
            &[status, 1, u64::from(VRING_DESC_F_WRITE), 0],
            &[8, 4, 2, 2],
        ),
    ]
    .concat();
    let fill = |offset: u64, bytes| Op::Fill {
        memfd: 0,
        offset: offset as u32,
        bytes,
    };
    vec![
        fill(48 * n, table),
        fill(hdr, header(kind, 8 * n)),
        fill(status, vec![0xff]),
        // Slot n holds head 3n; then the index moves past it.
        fill(
            0x100,
            [
                le(&[0, n + 1], &[2, 2]),
                (0..=n).flat_map(|i| le(&[3 * i], &[2])).collect(),
            ]
            .concat(),
        ),
        Op::Kick(1),
    ]
}

fn vhost_user() {
    let t = "vhost_user";
    write(t, "negotiate", &encode(0, &negotiation()));
    let mut session = negotiation();
    session.extend(queue_setup());
    session.extend(request_ops(VIRTIO_BLK_T_OUT, 0));
    session.extend(request_ops(VIRTIO_BLK_T_IN, 1));
    // Stop the queue (GET_VRING_BASE), then reset.
    session.push(msg(11, le(&[0, 0], &[4, 4]), &[]));
    session.push(msg(4, vec![], &[]));
    write(t, "session-read-write", &encode(0, &session));
    let mut slots = negotiation();
    slots.extend([
        msg(36, vec![], &[]),
        msg(37, [le(&[0], &[8]), region()].concat(), &[FdKind::Memfd(3)]),
        msg(38, [le(&[0], &[8]), region()].concat(), &[]),
    ]);
    write(t, "mem-slots", &encode(1, &slots));
}

fn main() {
    let image = pool_image();
    let report = check_pool(&block_manager(&image));
    assert!(
        report.is_clean(),
        "seed pool is not clean: {:?}",
        report.problems
    );
    println!(
        "seed pool: {} devices, {} mappings, {} metadata blocks used",
        report.devices, report.mappings, report.metadata_blocks_used
    );
    virtio_request();
    virtio_queue();
    qmp();
    pdata(&image);
    vhost_user();
    nbd();
    nbd_client();
}

fn nbd_option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn nbd_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn nbd_request(out: &mut Vec<u8>, kind: u16, flags: u16, offset: u64, len: u32) {
    let h = RequestHeader {
        magic: REQUEST_MAGIC,
        flags,
        kind,
        cookie: out.len() as u64,
        offset,
        len,
    };
    out.extend_from_slice(&h.encode());
}

/// NBD sessions: structured replies with both meta contexts and every command; the old
/// EXPORT_NAME way into a read-only export; listing and aborting.
fn nbd() {
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
    let mut s = flags.to_vec();
    nbd_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    let mut meta = Vec::new();
    nbd_string(&mut meta, "");
    meta.extend_from_slice(&2u32.to_be_bytes());
    nbd_string(&mut meta, "base:allocation");
    nbd_string(&mut meta, "qemu:dirty-bitmap:base");
    nbd_option(&mut s, OPT_LIST_META_CONTEXT, &meta);
    nbd_option(&mut s, OPT_SET_META_CONTEXT, &meta);
    let mut go = Vec::new();
    nbd_string(&mut go, "");
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    nbd_option(&mut s, OPT_GO, &go);
    nbd_request(&mut s, CMD_READ, CMD_FLAG_DF, 0, 4096);
    nbd_request(&mut s, CMD_WRITE, CMD_FLAG_FUA, 65536, 512);
    s.extend_from_slice(&[0xab; 512]);
    nbd_request(&mut s, CMD_BLOCK_STATUS, 0, 512, 1 << 20);
    nbd_request(&mut s, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20);
    nbd_request(&mut s, CMD_TRIM, 0, 0, 65536);
    nbd_request(&mut s, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 65536);
    nbd_request(&mut s, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 65536);
    nbd_request(&mut s, CMD_CACHE, 0, 0, 65536);
    nbd_request(&mut s, CMD_FLUSH, 0, 0, 0);
    nbd_request(&mut s, CMD_WRITE, 0, 1 << 20, 1024);
    s.extend_from_slice(&[0xcd; 1024]);
    nbd_request(&mut s, CMD_DISC, 0, 0, 0);
    write("nbd", "structured-go", &s);

    let mut s = flags.to_vec();
    nbd_option(&mut s, OPT_EXPORT_NAME, b"ro");
    nbd_request(&mut s, CMD_READ, 0, 0, 512);
    nbd_request(&mut s, CMD_WRITE, 0, 0, 512);
    s.extend_from_slice(&[1; 512]);
    nbd_request(&mut s, 200, 0xffff, u64::MAX - 511, u32::MAX);
    write("nbd", "export-name-ro", &s);

    let mut s = flags.to_vec();
    nbd_option(&mut s, OPT_LIST, &[]);
    let mut info = Vec::new();
    nbd_string(&mut info, "ro");
    info.extend_from_slice(&2u16.to_be_bytes());
    info.extend_from_slice(&INFO_NAME.to_be_bytes());
    info.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
    nbd_option(&mut s, OPT_INFO, &info);
    nbd_option(&mut s, OPT_STARTTLS, &[]);
    nbd_option(&mut s, 4242, b"unknown");
    nbd_option(&mut s, OPT_ABORT, &[]);
    write("nbd", "list-info-abort", &s);
}

fn simple_reply(out: &mut Vec<u8>, errno: u32, cookie: u64, data: &[u8]) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(data);
}

fn chunk(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Replies to the client's five waiting requests (cookies 1 to 5: read 4096 at 0, write,
/// read 65536 at 65536, write of zeroes, flush): simple ones, and structured chunks of
/// every kind the client knows.
fn nbd_client() {
    let mut s = vec![0u8];
    simple_reply(&mut s, 0, 1, &[0x5a; 4096]);
    simple_reply(&mut s, 0, 2, &[]);
    simple_reply(&mut s, 0, 3, &[0xa5; 65536]);
    simple_reply(&mut s, 28, 4, &[]);
    simple_reply(&mut s, 0, 5, &[]);
    write("nbd_client", "simple", &s);

    let mut s = vec![1u8];
    let mut data = 0u64.to_be_bytes().to_vec();
    data.extend_from_slice(&[7; 2048]);
    chunk(&mut s, 0, REPLY_TYPE_OFFSET_DATA, 1, &data);
    let mut hole = 2048u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&2048u32.to_be_bytes());
    chunk(&mut s, REPLY_FLAG_DONE, 2, 1, &hole);
    chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 2, &[]);
    let mut err = 5u32.to_be_bytes().to_vec();
    err.extend_from_slice(&3u16.to_be_bytes());
    err.extend_from_slice(b"bad");
    chunk(&mut s, 0, REPLY_TYPE_ERROR, 3, &err);
    let mut hole = 65536u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&65536u32.to_be_bytes());
    chunk(&mut s, REPLY_FLAG_DONE, 2, 3, &hole);
    let mut err = 28u32.to_be_bytes().to_vec();
    err.extend_from_slice(&0u16.to_be_bytes());
    err.extend_from_slice(&(1u64 << 20).to_be_bytes());
    chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_ERROR + 1, 4, &err);
    simple_reply(&mut s, 0, 5, &[]);
    write("nbd_client", "structured", &s);
}
