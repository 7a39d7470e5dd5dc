//! Whole virtqueues: a split ring of 16 entries whose descriptor table, available ring and
//! buffers all come from the fuzzer (so chains may be indirect, loop, or point anywhere),
//! served by `BlkBackend::handle_event` on a memory disk exactly as a worker thread would.
//!
//! Input: a flags byte, then guest RAM from address 0: descriptor table at 0x0, available
//! ring at 0x100, used ring at 0x200, buffers anywhere after.

use std::sync::Arc;

use thinblk::engine::memory::MemoryDevice;
use thinblk::vhost::config::WRITEBACK_OFFSET;
use thinblk::vhost::{BlkBackend, DeviceSettings};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

pub fn run(data: &[u8]) {
    let Some((&flags, ram)) = data.split_first() else {
        return;
    };
    let mem = super::guest_memory(ram);
    let dev = Arc::new(MemoryDevice::new(64 << 10).expect("memory disk"));
    let backend = BlkBackend::new(
        dev,
        DeviceSettings {
            serial: "fuzz".into(),
            num_queues: 1,
            queue_size: QUEUE_SIZE,
            read_only: flags & 1 != 0,
            poll: std::time::Duration::ZERO,
            submit_batch: 4,
        },
    );
    // As a connection does when a frontend connects.
    backend.open_queues();
    let event_idx = flags & 2 != 0;
    let flush = if flags & 4 != 0 {
        1u64 << VIRTIO_BLK_F_FLUSH
    } else {
        0
    };
    backend.acked_features(flush);
    backend.set_event_idx(event_idx);
    if flags & 8 != 0 {
        backend
            .set_config(WRITEBACK_OFFSET, &[0])
            .expect("writeback is writable");
    }
    let atomic = GuestMemoryAtomic::new(mem);
    backend
        .update_memory(atomic.clone())
        .expect("update memory");
    let vring = VringRwLock::new(atomic, QUEUE_SIZE).expect("vring");
    vring
        .set_queue_info(DESC_TABLE, AVAIL, USED)
        .expect("queue addresses");
    vring.set_queue_size(QUEUE_SIZE);
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    // Two kicks: the second must find nothing new (or the same broken ring) and return.
    for _ in 0..2 {
        let _ = backend.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0);
    }
}
