//! A virtio-blk driver in the test process, talking to thinblk through the `vhost` crate's
//! vhost-user frontend (the code cloud-hypervisor uses), with guest memory in a memfd both
//! processes map.
//!
//! The driver side of the split virtqueue is written here rather than with
//! `virtio_queue::mock::MockSplitQueue`'s submission helpers: those write avail ring slots
//! without wrapping and place every chain at the start of the descriptor table, which a test
//! that submits many chains, some of them malformed, cannot use. `MockSplitQueue::create` still
//! places and zeroes the descriptor table and the avail ring, but not the used ring: see
//! [`used_ring_after`].
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod logging;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest physical base of the one memory region: above 4 GiB, so that a backend confusing
/// guest addresses with offsets, or truncating them to 32 bits, fails loudly.
pub const GUEST_BASE: u64 = 0x1_0000_0000;
pub const GUEST_SIZE: u64 = 8 << 20;
/// Ring size the driver uses (the export's default `queue-size`).
pub const QUEUE_SIZE: u16 = 256;
const RING_AREA: u64 = 0x1_0000;
const DATA_START: u64 = 0x10_0000;
/// How long any completion may take before the test fails.
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol features cloud-hypervisor's vhost-user-blk asks for.
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// One descriptor of a chain, in guest physical addresses.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A device-readable buffer.
pub fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: false,
    }
}

/// A device-writable buffer.
pub fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: true,
    }
}

/// One element the device put in the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// The driver's view of one split virtqueue.
pub struct Vq {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    pub call: EventFd,
    pub kick: EventFd,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// What feature negotiation produced.
#[derive(Clone, Copy, Debug)]
pub struct Negotiated {
    pub device_features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    pub queue_num: u64,
}

/// Guest memory in a memfd, mapped here and handed to the backend by file descriptor.
pub fn shared_guest_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"thinblk-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(GUEST_SIZE).unwrap();
    let mapping = MmapRegion::from_file(
        FileOffset::new(file, 0),
        usize::try_from(GUEST_SIZE).unwrap(),
    )
    .unwrap();
    let region = GuestRegionMmap::new(mapping, GuestAddress(GUEST_BASE)).unwrap();
    GuestMemoryMmap::from_regions(vec![region]).unwrap()
}

/// A connected, configured vhost-user-blk device as a guest driver sees it.
pub struct Vm {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Vq>,
    pub negotiated: Negotiated,
    pub acked_features: u64,
    next_buf: u64,
}

impl Vm {
    /// Connects and sets the device up in cloud-hypervisor's order, with `queues` queues.
    pub fn connect(socket: &Path, queues: usize) -> Vm {
        Self::connect_with(
            socket,
            queues,
            VhostUserProtocolFeatures::empty(),
            &mut |_| {},
        )
    }

    /// [`Vm::connect`], asking also for the protocol features `extra`; `before_rings` sends
    /// what QEMU sends after SET_FEATURES and before the memory table (the inflight region).
    pub fn connect_with(
        socket: &Path,
        queues: usize,
        extra: VhostUserProtocolFeatures,
        before_rings: &mut dyn FnMut(&mut Frontend),
    ) -> Vm {
        let (mut fe, negotiated, acked_features) = negotiate(socket, extra);
        before_rings(&mut fe);
        let mem = shared_guest_memory();
        let region = mem.iter().next().unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        fe.set_mem_table(&[info]).unwrap();

        let mut vm = Vm {
            fe,
            mem,
            queues: Vec::new(),
            negotiated,
            acked_features,
            next_buf: GUEST_BASE + DATA_START,
        };
        for q in 0..queues {
            vm.setup_queue(q);
        }
        vm
    }

    /// The backend restarted: connects to `socket` again as QEMU does with `reconnect=`, with
    /// the same guest memory, rings and eventfds, each ring's base at its used index (what
    /// QEMU sends after losing a backend).
    pub fn reconnect(
        &mut self,
        socket: &Path,
        extra: VhostUserProtocolFeatures,
        before_rings: &mut dyn FnMut(&mut Frontend),
    ) {
        let (mut fe, negotiated, acked_features) = negotiate(socket, extra);
        before_rings(&mut fe);
        let region = self.mem.iter().next().unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        fe.set_mem_table(&[info]).unwrap();
        self.fe = fe;
        self.negotiated = negotiated;
        self.acked_features = acked_features;
        for q in 0..self.queues.len() {
            let base = self.used_idx(q);
            self.start_ring(q, base);
        }
    }

    fn host_addr(&self, gpa: GuestAddress) -> u64 {
        self.mem.get_host_address(gpa).unwrap() as u64
    }

    /// The guest address of queue `q`'s used ring.
    pub fn used_ring(&self, q: usize) -> u64 {
        self.queues[q].used.0
    }

    /// Sends queue `q`'s addresses again, with the used ring logged (`VHOST_VRING_F_LOG`,
    /// at `log_addr`) or not, as QEMU does when migration starts and ends.
    pub fn set_ring_log(&mut self, q: usize, log_addr: Option<u64>) -> vhost::Result<()> {
        let config = self.ring_config(q, log_addr);
        self.fe.set_vring_addr(q, &config)
    }

    /// Queue `q`'s SET_VRING_ADDR payload, its used ring logged at `log_addr` or not.
    pub fn ring_config(&self, q: usize, log_addr: Option<u64>) -> VringConfigData {
        let vq = &self.queues[q];
        VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: if log_addr.is_some() {
                VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
            } else {
                0
            },
            desc_table_addr: self.host_addr(vq.desc),
            used_ring_addr: self.host_addr(vq.used),
            avail_ring_addr: self.host_addr(vq.avail),
            log_addr,
        }
    }

    fn setup_queue(&mut self, index: usize) {
        let start = GuestAddress(GUEST_BASE + RING_AREA * index as u64);
        let (desc, avail) = {
            let mock = MockSplitQueue::create(&self.mem, start, QUEUE_SIZE);
            (mock.desc_table_addr(), mock.avail_addr())
        };
        let used = used_ring_after(avail, QUEUE_SIZE);
        let used_len = 4 + 8 * usize::from(QUEUE_SIZE) + 2;
        self.mem.write_slice(&vec![0; used_len], used).unwrap();
        let vq = Vq {
            desc,
            avail,
            used,
            call: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap(),
            kick: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap(),
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        self.queues.push(vq);
        self.start_ring(index, 0);
    }

    /// Sends queue `index`'s ring to the backend, starting at avail index `base`.
    fn start_ring(&mut self, index: usize, base: u16) {
        let vq = &self.queues[index];
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            // vhost-user rings are given in the frontend's virtual addresses.
            desc_table_addr: self.host_addr(vq.desc),
            used_ring_addr: self.host_addr(vq.used),
            avail_ring_addr: self.host_addr(vq.avail),
            log_addr: None,
        };
        self.fe.set_vring_num(index, QUEUE_SIZE).unwrap();
        self.fe.set_vring_addr(index, &config).unwrap();
        self.fe.set_vring_base(index, base).unwrap();
        self.fe.set_vring_call(index, &vq.call).unwrap();
        self.fe.set_vring_kick(index, &vq.kick).unwrap();
        self.fe.set_vring_enable(index, true).unwrap();
    }

    /// Reads `len` bytes of config space at `offset`.
    pub fn config(&mut self, offset: u32, len: usize) -> Vec<u8> {
        let (_, payload) = self
            .fe
            .get_config(
                offset,
                len as u32,
                VhostUserConfigFlags::empty(),
                &vec![0; len],
            )
            .unwrap();
        payload
    }

    /// A fresh, 4 KiB aligned guest buffer of `len` bytes, filled with 0xEE.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buf;
        self.next_buf = (addr + len).next_multiple_of(4096);
        assert!(
            self.next_buf <= GUEST_BASE + GUEST_SIZE,
            "test guest memory exhausted"
        );
        self.put(addr, &vec![0xEE; len as usize]);
        addr
    }

    pub fn put(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }

    pub fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    fn store_desc(&self, table: GuestAddress, index: u16, d: Descriptor) {
        let at = table.unchecked_add(u64::from(index) * 16);
        self.mem.write_obj(RawDescriptor::from(d), at).unwrap();
    }

    /// Writes `chain` into free slots of queue `q`'s descriptor table; returns the head index.
    fn place_chain(&mut self, q: usize, chain: &[Desc]) -> u16 {
        let table = self.queues[q].desc;
        let first = self.queues[q].next_desc;
        for (i, d) in chain.iter().enumerate() {
            let index = (first + i as u16) % QUEUE_SIZE;
            let last = i + 1 == chain.len();
            let mut flags = if d.writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = (index + 1) % QUEUE_SIZE;
            self.store_desc(table, index, Descriptor::new(d.addr, d.len, flags, next));
        }
        self.queues[q].next_desc = (first + chain.len().max(1) as u16) % QUEUE_SIZE;
        first
    }

    /// Makes descriptor `head` available on queue `q` without kicking.
    pub fn make_available(&mut self, q: usize, head: u16) {
        let vq = &mut self.queues[q];
        let slot = vq
            .avail
            .unchecked_add(4 + 2 * u64::from(vq.avail_idx % QUEUE_SIZE));
        self.mem.write_obj(head.to_le(), slot).unwrap();
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        let (seen, avail_idx, idx) = (vq.used_seen, vq.avail_idx, vq.avail.unchecked_add(2));
        // Interrupt me as soon as anything past what I have seen is used.
        self.set_used_event(q, seen);
        self.mem
            .store(avail_idx.to_le(), idx, Ordering::Release)
            .unwrap();
    }

    /// The avail ring's `used_event` (EVENT_IDX): signal once the used index passes `idx`.
    fn set_used_event(&self, q: usize, idx: u16) {
        let at = self.queues[q]
            .avail
            .unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
        self.mem.store(idx.to_le(), at, Ordering::Release).unwrap();
    }

    /// Adds a direct chain to queue `q` (not kicked yet); returns its head index.
    pub fn add(&mut self, q: usize, chain: &[Desc]) -> u16 {
        let head = self.place_chain(q, chain);
        self.make_available(q, head);
        head
    }

    /// Adds `chain` as an indirect table referenced by one descriptor of queue `q`.
    pub fn add_indirect(&mut self, q: usize, chain: &[Desc]) -> u16 {
        let table = GuestAddress(self.alloc(16 * chain.len() as u64));
        for (i, d) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let mut flags = if d.writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let desc = Descriptor::new(d.addr, d.len, flags, i as u16 + 1);
            self.store_desc(table, i as u16, desc);
        }
        let head = self.reserve_descs(q, 1);
        let flags = VRING_DESC_F_INDIRECT as u16;
        let desc = Descriptor::new(table.0, 16 * chain.len() as u32, flags, 0);
        self.store_desc(self.queues[q].desc, head, desc);
        self.make_available(q, head);
        head
    }

    /// Stores a raw descriptor at `index` of queue `q`'s table, for chains no driver would build.
    pub fn put_raw_desc(&mut self, q: usize, index: u16, d: Descriptor) {
        self.store_desc(self.queues[q].desc, index, d);
    }

    /// Takes the next `n` free descriptor slots of queue `q`; returns the first.
    pub fn reserve_descs(&mut self, q: usize, n: u16) -> u16 {
        let first = self.queues[q].next_desc;
        self.queues[q].next_desc = (first + n) % QUEUE_SIZE;
        first
    }

    pub fn kick(&self, q: usize) {
        self.queues[q].kick.write(1).unwrap();
    }

    /// Queue `q`'s rings as the driver sees them, for a failure message: the avail and used
    /// indices, and the avail and used entries of the last `n` chains.
    pub fn ring_state(&self, q: usize, n: u16) -> String {
        let vq = &self.queues[q];
        let used_idx = self.used_idx(q);
        let avail_idx: u16 = self.mem.read_obj(vq.avail.unchecked_add(2)).unwrap();
        let mut out = format!(
            "avail idx {avail_idx} (driver {}), used idx {used_idx}, seen {};",
            vq.avail_idx, vq.used_seen
        );
        for i in 0..n {
            let k = vq.avail_idx.wrapping_sub(n).wrapping_add(i);
            let slot = |ring: GuestAddress, size: u64| {
                ring.unchecked_add(4 + size * u64::from(k % QUEUE_SIZE))
            };
            let head: u16 = self.mem.read_obj(slot(vq.avail, 2)).unwrap();
            let used: VirtqUsedElem = self.mem.read_obj(slot(vq.used, 8)).unwrap();
            out.push_str(&format!(" [{k}] avail {head} used {}", used.id()));
        }
        out
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        let at = self.queues[q].used.unchecked_add(2);
        u16::from_le(self.mem.load(at, Ordering::Acquire).unwrap())
    }

    /// Waits, on queue `q`'s call eventfd, until `n` more chains are used; returns them.
    ///
    /// Fails if the device does not signal the call eventfd, or uses more than `n` chains.
    pub fn wait_used(&mut self, q: usize, n: u16) -> Vec<Used> {
        let deadline = Instant::now() + COMPLETION_TIMEOUT;
        let target = self.queues[q].used_seen.wrapping_add(n);
        loop {
            let done = self.used_idx(q).wrapping_sub(self.queues[q].used_seen);
            assert!(
                done <= n,
                "queue {q}: device used {done} chains, only {n} were outstanding"
            );
            if done == n {
                break;
            }
            if done > 0 {
                // Partly done: ask to be signalled for anything past what is used now, then
                // look again before sleeping, as a driver re-enabling callbacks does.
                let now = self.used_idx(q);
                self.set_used_event(q, now);
                if self.used_idx(q) != now {
                    continue;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "queue {q}: used idx is {} after {COMPLETION_TIMEOUT:?}, expected {target}",
                self.used_idx(q)
            );
            if poll_readable(&self.queues[q].call, left) {
                // Reset the counter; the used index decides whether we are done.
                let _ = self.queues[q].call.read();
            }
        }
        let vq = &mut self.queues[q];
        let mut out = Vec::new();
        while vq.used_seen != target {
            let slot = vq
                .used
                .unchecked_add(4 + 8 * u64::from(vq.used_seen % QUEUE_SIZE));
            let e: VirtqUsedElem = self.mem.read_obj(slot).unwrap();
            out.push(Used {
                id: e.id(),
                len: e.len(),
            });
            vq.used_seen = vq.used_seen.wrapping_add(1);
        }
        out
    }

    /// Adds each chain, kicks once, and returns the used elements in device order.
    pub fn run(&mut self, q: usize, chains: &[&[Desc]]) -> (Vec<u16>, Vec<Used>) {
        let heads: Vec<u16> = chains.iter().map(|c| self.add(q, c)).collect();
        self.kick(q);
        let used = self.wait_used(q, heads.len() as u16);
        (heads, used)
    }

    pub fn event_idx(&self) -> bool {
        self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }
}

/// Connects and negotiates features as cloud-hypervisor does, with the protocol features
/// `extra` too if offered.
fn negotiate(socket: &Path, extra: VhostUserProtocolFeatures) -> (Frontend, Negotiated, u64) {
    let mut fe = Frontend::connect(socket, 1).expect("connect to the export");
    fe.set_owner().unwrap();
    let device_features = fe.get_features().unwrap();
    let offered = fe.get_protocol_features().unwrap();
    let protocol_features = offered & (wanted_protocol_features() | extra);
    fe.set_protocol_features(protocol_features).unwrap();
    if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        // As cloud-hypervisor does: every later request is acknowledged, so a backend
        // refusing one fails the call instead of going unnoticed.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let queue_num = fe.get_queue_num().unwrap();
    // A Linux guest acks everything a virtio-blk device offers here; the VMM turns dirty
    // logging on only while it migrates.
    let acked_features = device_features & !VhostUserVirtioFeatures::LOG_ALL.bits();
    fe.set_features(acked_features).unwrap();
    let negotiated = Negotiated {
        device_features,
        protocol_features: offered,
        queue_num,
    };
    (fe, negotiated, acked_features)
}

/// Whether `fd` became readable within `timeout`.
fn poll_readable(fd: &EventFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis())
        .unwrap_or(i32::MAX)
        .max(1);
    // SAFETY: p is one valid pollfd that outlives the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// Where the used ring of a queue of `size` entries goes: 4-aligned after the whole avail ring
/// at `avail` (flags, index, `size` entries, `used_event`). virtio-queue 0.18's
/// `MockSplitQueue` puts it `size` *bytes* past the avail ring's first entry, inside the avail
/// ring for any queue of more than two entries: the device's used entries and `avail_event`
/// then overwrite avail entries, and a chain is lost now and then (a head read back as a ring
/// index) on devices fast enough to complete while the driver still fills the ring.
pub fn used_ring_after(avail: GuestAddress, size: u16) -> GuestAddress {
    let end = avail.0 + 4 + 2 * u64::from(size) + 2;
    GuestAddress(end.next_multiple_of(4))
}
