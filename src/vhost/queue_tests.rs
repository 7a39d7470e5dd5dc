//! Whole-queue tests: chains built in guest memory with virtio-queue's mock split queue, run
//! through the backend's event handler exactly as a worker thread runs them.

use crate::engine::{Bufs, BufsMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic};

use super::dirty_log::{GuestMemoryMmap, VringRwLock};
use vmm_sys_util::epoll::EventSet;

use super::backend::{BlkBackend, DeviceSettings};
use crate::engine::memory::MemoryDevice;
use crate::engine::{BlockDevice, BlockError};

/// A memory disk that counts flushes, to see the write cache mode at work, and whose reads
/// take `read_delay` (on the queue's blocking thread), to see what a worker does meanwhile.
struct CountingDevice {
    inner: MemoryDevice,
    flushes: AtomicUsize,
    read_delay: std::time::Duration,
}

impl BlockDevice for CountingDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        std::thread::sleep(self.read_delay);
        self.inner.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        self.inner.write(offset, bufs)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
}

const QUEUE_SIZE: u16 = 64;
const MEM_SIZE: u64 = 0x40_0000;
const DISK: u64 = 1 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Where headers, data and status bytes live, well past the rings.
const BUFS: u64 = 0x10_0000;

/// One buffer of a chain: guest address, length, device-writable.
type Buf = (u64, u32, bool);

struct Harness {
    mem: GuestMemoryMmap,
    backend: BlkBackend,
    vring: VringRwLock,
    dev: Arc<CountingDevice>,
    next_desc: u16,
    heads: Vec<u16>,
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
}

/// The descriptors of a chain of `bufs` starting at table index `head`.
fn chain_at(head: u16, bufs: &[Buf]) -> Vec<RawDescriptor> {
    bufs.iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let last = i + 1 == bufs.len();
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, head + i as u16 + 1))
        })
        .collect()
}

impl Harness {
    fn new(read_only: bool) -> Self {
        Self::polling(read_only, std::time::Duration::ZERO)
    }

    /// A harness whose worker polls for `poll` after activity.
    fn polling(read_only: bool, poll: std::time::Duration) -> Self {
        Self::slow_reads(read_only, poll, std::time::Duration::ZERO)
    }

    /// [`Harness::polling`] over a device whose reads take `read_delay`.
    fn slow_reads(
        read_only: bool,
        poll: std::time::Duration,
        read_delay: std::time::Duration,
    ) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let dev = Arc::new(CountingDevice {
            inner: MemoryDevice::new(DISK).unwrap(),
            flushes: AtomicUsize::new(0),
            read_delay,
        });
        let settings = DeviceSettings {
            serial: "disk-under-test".into(),
            num_queues: 1,
            queue_size: QUEUE_SIZE,
            read_only,
            poll,
            submit_batch: 4,
        };
        let backend = BlkBackend::new(dev.clone(), settings);
        // As a connection does when a frontend connects.
        backend.open_queues();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        backend.update_memory(atomic.clone()).unwrap();
        let q = MockSplitQueue::new(&mem, QUEUE_SIZE);
        // virtio-queue 0.18's mock places the used ring `QUEUE_SIZE` bytes (not entries) into
        // the avail ring; it goes after the whole avail ring instead (tests/frontend has the
        // same fix).
        let used_at = (q.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE) + 2).next_multiple_of(4);
        let vring = VringRwLock::new(atomic, QUEUE_SIZE).unwrap();
        vring
            .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, used_at)
            .unwrap();
        vring.set_queue_size(QUEUE_SIZE);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let (desc_table, avail, used) =
            (q.desc_table_addr(), q.avail_addr(), GuestAddress(used_at));
        Harness {
            mem,
            backend,
            vring,
            dev,
            next_desc: 0,
            heads: Vec::new(),
            desc_table,
            avail,
            used,
        }
    }

    /// Writes descriptors at `first` and publishes `head` in the available ring. (The mock
    /// queue re-initialises its rings whenever one is constructed, so it is only used once.)
    fn publish(&self, first: u16, descs: &[RawDescriptor], head: u16) {
        for (i, d) in descs.iter().enumerate() {
            let at = self
                .desc_table
                .unchecked_add(16 * u64::from(first + i as u16));
            self.mem.write_obj(*d, at).unwrap();
        }
        let idx: u16 = self.mem.read_obj(self.avail.unchecked_add(2)).unwrap();
        let slot = self
            .avail
            .unchecked_add(4 + 2 * u64::from(idx % QUEUE_SIZE));
        self.mem.write_obj(head, slot).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), self.avail.unchecked_add(2))
            .unwrap();
    }

    /// Places a chain in the descriptor table and makes it available.
    fn push(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        let descs = chain_at(head, bufs);
        self.publish(head, &descs, head);
        self.next_desc += bufs.len() as u16;
        self.heads.push(head);
        head
    }

    /// Places an indirect table at `table` holding `bufs`, and a chain of one descriptor to it.
    fn push_indirect(&mut self, table: u64, bufs: &[Buf]) -> u16 {
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1));
            self.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = self.next_desc;
        let d = SplitDescriptor::new(
            table,
            16 * bufs.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        self.publish(head, &[RawDescriptor::from(d)], head);
        self.next_desc += 1;
        self.heads.push(head);
        head
    }

    /// `n` reads of one sector each (sector `i` into its own buffers), not yet published: for
    /// each its head, its descriptors and the address of its status byte.
    fn one_sector_reads(&mut self, n: u16) -> Vec<(u16, Vec<RawDescriptor>, u64)> {
        (0..n)
            .map(|i| {
                let at = HDR + u64::from(i) * 0x1000;
                self.header(at, VIRTIO_BLK_T_IN, u64::from(i));
                let head = self.next_desc;
                self.next_desc += 3;
                let bufs = [
                    (at, 16, false),
                    (at + 0x200, 512, true),
                    (at + 0x800, 1, true),
                ];
                (head, chain_at(head, &bufs), at + 0x800)
            })
            .collect()
    }

    /// Serves the queue as a kick does, then waits for what went to the device's queue
    /// (this device's requests run on its blocking thread) and completes it.
    fn run(&self) {
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
        self.backend.stop_vring(0).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(self.used.unchecked_add(2))
            .unwrap()
    }

    /// The (descriptor id, length) of used element `i`.
    fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i));
        let id = self.mem.read_obj::<u32>(at).unwrap();
        let len = self.mem.read_obj::<u32>(at.unchecked_add(4)).unwrap();
        (id, len)
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn fill(&self, at: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(at))
            .unwrap();
    }

    fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn disk(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.dev.read(offset, &mut BufsMut::one(&mut v)).unwrap();
        v
    }
}

const HDR: u64 = BUFS;
const DATA: u64 = BUFS + 0x1000;
const STATUS: u64 = BUFS + 0x800;

#[test]
fn a_write_then_a_read_move_data_and_report_used_lengths() {
    let mut h = Harness::new(false);
    h.header(HDR, VIRTIO_BLK_T_OUT, 8);
    h.fill(DATA, 4096, 0x5a);
    h.push(&[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)]);
    h.header(HDR + 16, VIRTIO_BLK_T_IN, 8);
    h.push(&[
        (HDR + 16, 16, false),
        (DATA + 0x2000, 4096, true),
        (STATUS + 1, 1, true),
    ]);
    h.run();
    assert_eq!(h.used_idx(), 2);
    assert_eq!(h.used(0), (0, 1));
    assert_eq!(h.used(1), (3, 4097));
    assert_eq!((h.status(STATUS), h.status(STATUS + 1)), (OK, OK));
    assert_eq!(h.bytes(DATA + 0x2000, 4096), vec![0x5a; 4096]);
    assert_eq!(h.disk(4096, 4096), vec![0x5a; 4096]);
}

#[test]
fn indirect_chains_are_served() {
    let mut h = Harness::new(false);
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    h.fill(DATA, 512, 1);
    h.fill(DATA + 512, 1024, 2);
    let table = BUFS + 0x8000;
    h.push_indirect(
        table,
        &[
            (HDR, 16, false),
            (DATA, 512, false),
            (DATA + 512, 1024, false),
            (STATUS, 1, true),
        ],
    );
    h.run();
    assert_eq!(h.status(STATUS), OK);
    let mut want = vec![1u8; 512];
    want.extend(vec![2u8; 1024]);
    assert_eq!(h.disk(0, 1536), want);
}

#[test]
fn get_id_returns_the_export_name_padded() {
    let mut h = Harness::new(false);
    h.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    h.fill(DATA, 20, 0xff);
    h.push(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    h.run();
    assert_eq!(h.status(STATUS), OK);
    let mut want = b"disk-under-test".to_vec();
    want.resize(20, 0);
    assert_eq!(h.bytes(DATA, 20), want);
    assert_eq!(h.used(0).1, 21);
}

fn range_segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend(sectors.to_le_bytes());
    s.extend(flags.to_le_bytes());
    s
}

#[test]
fn discard_and_write_zeroes_take_several_segments() {
    let mut h = Harness::new(false);
    h.fill(DATA, 65536, 0x77);
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    h.push(&[(HDR, 16, false), (DATA, 65536, false), (STATUS, 1, true)]);
    let mut segs = range_segment(0, 8, 1);
    segs.extend(range_segment(16, 8, 0));
    h.mem
        .write_slice(&segs, GuestAddress(DATA + 0x20000))
        .unwrap();
    h.header(HDR + 16, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    h.push(&[
        (HDR + 16, 16, false),
        (DATA + 0x20000, 32, false),
        (STATUS + 1, 1, true),
    ]);
    h.mem
        .write_slice(&range_segment(64, 16, 0), GuestAddress(DATA + 0x20100))
        .unwrap();
    h.header(HDR + 32, VIRTIO_BLK_T_DISCARD, 0);
    h.push(&[
        (HDR + 32, 16, false),
        (DATA + 0x20100, 16, false),
        (STATUS + 2, 1, true),
    ]);
    h.run();
    assert_eq!(
        [h.status(STATUS), h.status(STATUS + 1), h.status(STATUS + 2)],
        [OK; 3]
    );
    let disk = h.disk(0, 65536);
    assert!(disk[..4096].iter().all(|&b| b == 0));
    assert!(disk[4096..8192].iter().all(|&b| b == 0x77));
    assert!(disk[8192..12288].iter().all(|&b| b == 0));
    assert!(disk[32768..40960].iter().all(|&b| b == 0));
    assert!(disk[40960..].iter().all(|&b| b == 0x77));
}

#[test]
fn unknown_flags_and_unknown_types_are_unsupported() {
    let mut h = Harness::new(false);
    h.mem
        .write_slice(&range_segment(0, 8, 0x4), GuestAddress(DATA))
        .unwrap();
    h.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    h.push(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
    h.mem
        .write_slice(&range_segment(0, 8, 1), GuestAddress(DATA + 16))
        .unwrap();
    h.header(HDR + 16, VIRTIO_BLK_T_DISCARD, 0);
    h.push(&[
        (HDR + 16, 16, false),
        (DATA + 16, 16, false),
        (STATUS + 1, 1, true),
    ]);
    h.header(HDR + 32, 0x55, 0);
    h.push(&[(HDR + 32, 16, false), (STATUS + 2, 1, true)]);
    h.run();
    assert_eq!(
        [h.status(STATUS), h.status(STATUS + 1), h.status(STATUS + 2)],
        [UNSUPP; 3]
    );
}

#[test]
fn every_bad_chain_gets_an_error_and_returns_to_the_used_ring() {
    let mut h = Harness::new(false);
    let far = MEM_SIZE + 0x1000;
    let mut expect = Vec::new();
    let mut case = |h: &mut Harness, bufs: &[Buf], status: Option<u64>, want: u8| {
        if let Some(s) = status {
            h.mem.write_obj(0xeeu8, GuestAddress(s)).unwrap();
        }
        h.push(bufs);
        expect.push((status, want));
    };
    // Chain too short for a header.
    case(
        &mut h,
        &[(HDR, 8, false), (STATUS, 1, true)],
        Some(STATUS),
        IOERR,
    );
    // Header outside guest memory.
    case(
        &mut h,
        &[(far, 16, false), (STATUS + 1, 1, true)],
        Some(STATUS + 1),
        IOERR,
    );
    // Data buffer outside guest memory.
    h.header(HDR + 0x40, VIRTIO_BLK_T_IN, 0);
    case(
        &mut h,
        &[
            (HDR + 0x40, 16, false),
            (far, 4096, true),
            (STATUS + 2, 1, true),
        ],
        Some(STATUS + 2),
        IOERR,
    );
    // Status descriptor the device may not write: nowhere to report, but the chain returns.
    h.header(HDR + 0x80, VIRTIO_BLK_T_IN, 0);
    case(
        &mut h,
        &[
            (HDR + 0x80, 16, false),
            (DATA, 512, true),
            (STATUS + 3, 1, false),
        ],
        None,
        0,
    );
    // Sector range past the capacity.
    h.header(HDR + 0xc0, VIRTIO_BLK_T_IN, DISK / 512);
    case(
        &mut h,
        &[
            (HDR + 0xc0, 16, false),
            (DATA, 512, true),
            (STATUS + 4, 1, true),
        ],
        Some(STATUS + 4),
        IOERR,
    );
    // Length not a multiple of 512.
    h.header(HDR + 0x100, VIRTIO_BLK_T_OUT, 0);
    case(
        &mut h,
        &[
            (HDR + 0x100, 16, false),
            (DATA, 100, false),
            (STATUS + 5, 1, true),
        ],
        Some(STATUS + 5),
        IOERR,
    );
    // Sector number whose byte offset overflows.
    h.header(HDR + 0x140, VIRTIO_BLK_T_IN, u64::MAX / 256);
    case(
        &mut h,
        &[
            (HDR + 0x140, 16, false),
            (DATA, 512, true),
            (STATUS + 6, 1, true),
        ],
        Some(STATUS + 6),
        IOERR,
    );
    // A good request after all of them still works.
    h.header(HDR + 0x180, VIRTIO_BLK_T_IN, 0);
    case(
        &mut h,
        &[
            (HDR + 0x180, 16, false),
            (DATA, 512, true),
            (STATUS + 7, 1, true),
        ],
        Some(STATUS + 7),
        OK,
    );

    h.run();
    assert_eq!(
        h.used_idx() as usize,
        expect.len(),
        "every chain is returned"
    );
    for (i, ((status, want), head)) in expect.iter().zip(&h.heads).enumerate() {
        assert_eq!(
            h.used(i as u16).0,
            u32::from(*head),
            "used element {i} names its chain"
        );
        if let Some(s) = status {
            assert_eq!(h.status(*s), *want, "status of case {i}");
        } else {
            assert_eq!(h.used(i as u16).1, 0, "case {i} wrote nothing");
        }
    }
}

#[test]
fn a_read_only_export_fails_writes_but_serves_reads_and_flushes() {
    let mut h = Harness::new(true);
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    h.push(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    h.mem
        .write_slice(&range_segment(0, 8, 0), GuestAddress(DATA + 0x1000))
        .unwrap();
    h.header(HDR + 16, VIRTIO_BLK_T_DISCARD, 0);
    h.push(&[
        (HDR + 16, 16, false),
        (DATA + 0x1000, 16, false),
        (STATUS + 1, 1, true),
    ]);
    h.header(HDR + 32, VIRTIO_BLK_T_IN, 0);
    h.push(&[
        (HDR + 32, 16, false),
        (DATA, 512, true),
        (STATUS + 2, 1, true),
    ]);
    h.header(HDR + 48, VIRTIO_BLK_T_FLUSH, 0);
    h.push(&[(HDR + 48, 16, false), (STATUS + 3, 1, true)]);
    h.run();
    let got = [
        h.status(STATUS),
        h.status(STATUS + 1),
        h.status(STATUS + 2),
        h.status(STATUS + 3),
    ];
    assert_eq!(got, [IOERR, IOERR, OK, OK]);
}

#[test]
fn the_guest_can_turn_the_write_cache_off() {
    let h = Harness::new(false);
    h.backend.acked_features(h.backend.features());
    assert!(h.backend.writeback());
    assert_eq!(h.backend.get_config(32, 1), vec![1]);
    h.backend.set_config(32, &[0]).unwrap();
    assert!(!h.backend.writeback());
    assert_eq!(h.backend.get_config(32, 1), vec![0]);
    assert!(
        h.backend.set_config(0, &[0; 8]).is_err(),
        "capacity is not writable"
    );
    assert!(h.backend.set_config(32, &[7]).is_err());
}

#[test]
fn writes_are_flushed_before_completing_only_in_writethrough_mode() {
    let mut h = Harness::new(false);
    h.backend.acked_features(h.backend.features());
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    h.push(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    h.run();
    assert_eq!(
        h.dev.flushes.load(Ordering::SeqCst),
        0,
        "writeback: no flush per write"
    );
    h.backend.set_config(32, &[0]).unwrap();
    h.push(&[(HDR, 16, false), (DATA, 512, false), (STATUS + 1, 1, true)]);
    h.run();
    assert_eq!(h.status(STATUS + 1), OK);
    assert_eq!(
        h.dev.flushes.load(Ordering::SeqCst),
        1,
        "writethrough: flushed before completion"
    );
}

/// Runs the queue on another thread and hands the harness back, failing instead of hanging
/// if the handler never returns.
fn run_returning(h: Harness) -> Harness {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        h.run();
        let _ = tx.send(h);
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("the queue handler returns on a broken ring")
}

fn with_event_idx(h: &Harness) {
    h.backend.set_event_idx(true);
    h.vring.set_queue_event_idx(true);
}

#[test]
fn an_available_index_more_than_a_queue_ahead_does_not_spin_the_worker() {
    // Found by fuzz/virtio_queue: with EVENT_IDX, re-enabling notifications kept reporting
    // work that could never be popped.
    let h = Harness::new(false);
    with_event_idx(&h);
    h.mem.write_obj(512u16, h.avail.unchecked_add(2)).unwrap();
    let mut h = run_returning(h);
    assert_eq!(h.used_idx(), 0);
    // The guest repairs its ring: the next kick serves it.
    h.mem.write_obj(0u16, h.avail.unchecked_add(2)).unwrap();
    h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    h.push(&[(HDR, 16, false), (STATUS, 1, true)]);
    let h = run_returning(h);
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.status(STATUS), OK);
}

#[test]
fn a_polling_worker_serves_what_arrives_and_still_returns_on_a_broken_ring() {
    let poll = std::time::Duration::from_millis(5);
    let mut h = Harness::polling(false, poll);
    with_event_idx(&h);
    h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    h.push(&[(HDR, 16, false), (STATUS, 1, true)]);
    let started = std::time::Instant::now();
    let h = run_returning(h);
    assert!(started.elapsed() >= poll, "returned without polling");
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.status(STATUS), OK);
    h.mem.write_obj(512u16, h.avail.unchecked_add(2)).unwrap();
    let h = run_returning(h);
    assert_eq!(h.used_idx(), 1);
}

#[test]
fn a_request_in_memory_the_frontend_added_while_the_worker_polls_is_served() {
    // Found by the kill test in CI: a client maps a new buffer region (ADD_MEM_REG) and at once
    // submits a read into it, while the worker polls with the memory table of before.
    let h = Harness::polling(false, std::time::Duration::from_millis(300));
    with_event_idx(&h);
    let region = vm_memory::MmapRegion::new(0x10000).unwrap();
    let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(MEM_SIZE)).unwrap();
    let grown = h.mem.insert_region(Arc::new(region)).unwrap();
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    let head = h.next_desc;
    let descs = chain_at(
        head,
        &[(HDR, 16, false), (MEM_SIZE, 512, true), (STATUS, 1, true)],
    );
    std::thread::scope(|s| {
        s.spawn(|| h.run());
        std::thread::sleep(std::time::Duration::from_millis(50));
        h.backend
            .update_memory(GuestMemoryAtomic::new(grown.clone()))
            .unwrap();
        h.publish(head, &descs, head);
    });
    assert_eq!(h.used_idx(), 1);
    assert_eq!(
        h.status(STATUS),
        OK,
        "the buffer was looked up in the old memory table"
    );
}

#[test]
fn an_available_ring_ending_outside_guest_memory_does_not_spin_the_worker() {
    let h = Harness::new(false);
    with_event_idx(&h);
    // The index is the ring's last readable u16; its first entry lies past guest memory.
    let avail = MEM_SIZE - 4;
    h.vring
        .set_queue_info(h.desc_table.0, avail, h.used.0)
        .unwrap();
    h.mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    let h = run_returning(h);
    assert_eq!(h.used_idx(), 0);
}

#[test]
fn wrapping_addresses_and_overflowing_segments_are_refused_and_change_nothing() {
    let mut h = Harness::new(false);
    h.fill(DATA, 8192, 0x66);
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    h.push(&[(HDR, 16, false), (DATA, 8192, false), (STATUS, 1, true)]);
    h.run();
    assert_eq!(h.status(STATUS), OK);
    let wrap = u64::MAX - 255;
    let segs = DATA + 0x20000;
    // Segments: one whose sector + count wraps, one whose byte offset overflows, and a good
    // one followed by a wrapping one (all are checked before any runs).
    let mut mixed = range_segment(0, 8, 0);
    mixed.extend(range_segment(u64::MAX - 3, 8, 0));
    for (i, s) in [
        range_segment(u64::MAX - 3, 8, 0),
        range_segment(u64::MAX / 256, 8, 0),
        mixed,
    ]
    .iter()
    .enumerate()
    {
        h.mem
            .write_slice(s, GuestAddress(segs + 0x100 * i as u64))
            .unwrap();
    }
    #[rustfmt::skip]
    let cases: [(u32, Vec<Buf>); 8] = [
        // Data whose guest address + length wraps around 2^64.
        (VIRTIO_BLK_T_IN, vec![(wrap, 512, true)]),
        (VIRTIO_BLK_T_OUT, vec![(wrap, 512, false)]),
        // Data split so the second piece wraps.
        (VIRTIO_BLK_T_OUT, vec![(DATA, 512, false), (wrap, 512, false)]),
        (VIRTIO_BLK_T_DISCARD, vec![(segs, 16, false)]),
        (VIRTIO_BLK_T_WRITE_ZEROES, vec![(segs, 16, false)]),
        (VIRTIO_BLK_T_DISCARD, vec![(segs + 0x100, 16, false)]),
        (VIRTIO_BLK_T_WRITE_ZEROES, vec![(segs + 0x200, 32, false)]),
        // A segment list whose address wraps.
        (VIRTIO_BLK_T_DISCARD, vec![(wrap, 16, false)]),
    ];
    let n = cases.len() as u64;
    for (i, (kind, data)) in cases.iter().enumerate() {
        let i = i as u64 + 1;
        h.header(HDR + 16 * i, *kind, 0);
        let chain: Vec<Buf> = [(HDR + 16 * i, 16, false)]
            .into_iter()
            .chain(data.iter().copied())
            .chain([(STATUS + i, 1, true)])
            .collect();
        h.push(&chain);
    }
    // A header whose address wraps, with a good status byte.
    h.push(&[(u64::MAX - 7, 16, false), (STATUS + n + 1, 1, true)]);
    h.run();
    assert_eq!(u64::from(h.used_idx()), n + 2, "every chain is returned");
    for i in 1..=n + 1 {
        assert_eq!(h.status(STATUS + i), IOERR, "case {i}");
    }
    assert_eq!(
        h.disk(0, 8192),
        vec![0x66; 8192],
        "a refused request changed the disk"
    );
}

#[test]
fn a_polling_worker_leaves_no_completion_announced_when_it_goes_to_sleep() {
    // Polling reaps without reading the completion eventfd (a system call per reap); the
    // worker must reset it before it sleeps, or its epoll wakes it at once, again and again.
    let mut h = Harness::polling(false, std::time::Duration::from_millis(20));
    with_event_idx(&h);
    for i in 0..8u64 {
        let hdr = HDR + i * 0x1000;
        let data = hdr + 0x100;
        let status = hdr + 0x800;
        h.header(hdr, VIRTIO_BLK_T_OUT, i);
        h.push(&[(hdr, 16, false), (data, 512, false), (status, 1, true)]);
    }
    h.backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
        .unwrap();
    assert_eq!(h.used_idx(), 8, "the polling worker completed every write");
    let fd = h.backend.completion_fd(0).unwrap();
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert_eq!(ready, 0, "the completion eventfd is left readable");
    h.backend.stop_vring(0).unwrap();
}

#[test]
fn a_polling_worker_keeps_polling_after_a_completion_for_the_guests_next_request() {
    // At queue depth 1 the guest's next request follows a completion by microseconds. The
    // window counted only from the last request taken when the completion was reaped at the
    // end of a pass: with a device slower than the window the worker was asleep by then, and
    // the request cost a kick and a wakeup (issue 13's QD1 reads). Here each read takes half
    // the window, and the next request comes after the window counted from the read's
    // submission but well within it counted from its completion. Which of the worker's two
    // looks at the device's queue sees a completion first is a race, hence several reads.
    const READS: u16 = 4;
    let poll = std::time::Duration::from_millis(1000);
    let mut h = Harness::slow_reads(false, poll, poll / 2);
    with_event_idx(&h);
    let chains = h.one_sector_reads(READS);
    std::thread::scope(|s| {
        let (head, descs, _) = &chains[0];
        h.publish(*head, descs, *head);
        let worker = s.spawn(|| {
            h.backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
                .unwrap()
        });
        let mut published = std::time::Instant::now();
        for (i, (head, descs, _)) in chains.iter().enumerate().skip(1) {
            let deadline = published + std::time::Duration::from_secs(20);
            while usize::from(h.used_idx()) < i && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert_eq!(
                usize::from(h.used_idx()),
                i,
                "read {} did not complete (the worker stopped polling before it came)",
                i - 1
            );
            // The guest does not kick, as one does not while the device has notifications
            // off: a worker that went to sleep never takes this request.
            let next = published + poll + poll / 4;
            std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
            h.publish(*head, descs, *head);
            published = std::time::Instant::now();
        }
        worker.join().unwrap();
    });
    assert_eq!(
        h.used_idx(),
        READS,
        "the worker stopped polling before a request that followed a completion"
    );
    for (_, _, status) in &chains {
        assert_eq!(h.status(*status), OK);
    }
    h.backend.stop_vring(0).unwrap();
}

#[test]
fn a_worker_polls_its_whole_window_for_completions_however_late_they_come() {
    // Issues 13 and 23: windows for completions that halved after four late ones in a row
    // cost first writes at queue depth 1 6-8% of their rate and saved no CPU (poll_window.rs).
    // Here every read takes three windows. The guest publishes each next read, without a
    // kick, a little after the last completion, so each completion's call takes it and then
    // polls for its completion: that poll must stay the whole window, and the polling for
    // the guest's requests must go on too, or the reads would wait for a kick that never
    // comes.
    const READS: u16 = 7;
    let poll = std::time::Duration::from_millis(100);
    let delay = 3 * poll;
    let mut h = Harness::slow_reads(false, poll, delay);
    with_event_idx(&h);
    let chains = h.one_sector_reads(READS);
    let kick = |h: &Harness| {
        h.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
            .unwrap()
    };
    // The device queue's completion event: queue 0 of a one-queue backend.
    let completion = |h: &Harness| {
        h.backend
            .handle_event(2, EventSet::IN, std::slice::from_ref(&h.vring), 0)
            .unwrap()
    };
    // How long each call polled after the worker took its read.
    let mut polled = Vec::new();
    let (head, descs, _) = &chains[0];
    h.publish(*head, descs, *head);
    let mut taken_at = std::time::Instant::now();
    kick(&h);
    polled.push(taken_at.elapsed());
    for (i, (head, descs, _)) in chains.iter().enumerate().skip(1) {
        // Past the read's delay: its completion is there when the event is handled.
        std::thread::sleep(delay + poll);
        std::thread::scope(|s| {
            let worker = s.spawn(|| {
                completion(&h);
                std::time::Instant::now()
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while usize::from(h.used_idx()) < i && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(
                usize::from(h.used_idx()),
                i,
                "read {} did not complete",
                i - 1
            );
            std::thread::sleep(poll / 5);
            h.publish(*head, descs, *head);
            taken_at = std::time::Instant::now();
            let returned = worker.join().unwrap();
            polled.push(returned.saturating_duration_since(taken_at));
        });
    }
    std::thread::sleep(delay + poll);
    completion(&h);
    assert_eq!(
        h.used_idx(),
        READS,
        "a read the guest published without a kick after a completion was not taken: \
         the worker stopped polling for requests (polled {polled:?})"
    );
    for (_, _, status) in &chains {
        assert_eq!(h.status(*status), OK);
    }
    // Halving windows polled 100, 100, 100, 100, 50, 25 and 12.5 ms.
    for (read, p) in polled.iter().enumerate() {
        assert!(
            *p >= poll * 9 / 10,
            "read {read}: the worker polled {p:?} for its completion, not its window \
             ({poll:?}): {polled:?}"
        );
    }
    h.backend.stop_vring(0).unwrap();
}

#[test]
fn a_polling_worker_stops_polling_when_the_frontend_stops_its_ring() {
    // Seen in the migration traces (issue 14): at the switchover GET_VRING_BASE marks the ring
    // not ready and drains it, but a worker polling it went on with passes until its polling
    // window ran out, each pass logging virtio-queue's "queue that's not ready" error, and
    // then re-enabled notifications in the ring it no longer owned. Here the window is far
    // longer than the test waits for the worker.
    let poll = std::time::Duration::from_secs(20);
    let mut h = Harness::polling(false, poll);
    with_event_idx(&h);
    h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    h.push(&[(HDR, 16, false), (STATUS, 1, true)]);
    // The avail_event field, after the used ring's entries.
    let avail_event = h.used.unchecked_add(4 + 8 * u64::from(QUEUE_SIZE));
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            h.backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
                .unwrap();
            std::time::Instant::now()
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while h.used_idx() < 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(h.used_idx(), 1, "the worker did not serve the request");
        // As the vhost-user handler does for GET_VRING_BASE.
        h.vring.set_queue_ready(false);
        h.backend.stop_vring(0).unwrap();
        let stopped = std::time::Instant::now();
        h.mem.write_obj(0xbeefu16, avail_event).unwrap();
        while !worker.is_finished() && stopped.elapsed() < poll / 4 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            worker.is_finished(),
            "the worker still polls a ring the frontend stopped {:?} ago",
            stopped.elapsed()
        );
        worker.join().unwrap();
    });
    assert_eq!(
        h.mem.read_obj::<u16>(avail_event).unwrap(),
        0xbeef,
        "the worker wrote to the ring after it was stopped"
    );
}
