//! The inflight region's bookkeeping, without a ring: chains taken, completed out of order,
//! a "crash" at each point of a return, and what a new process recovers from the same file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use super::*;

const RING: u16 = 8;

/// A region for one ring of `RING` entries, and its fd (what the frontend keeps).
fn fresh() -> (Arc<InflightRegion>, File) {
    let (region, file) = InflightRegion::create(1, RING, 16, 1024).unwrap();
    (Arc::new(region), file)
}

/// What a new process maps when the frontend hands the fd back (SET_INFLIGHT_FD).
fn reopen(file: &File) -> Arc<InflightRegion> {
    let size = region_size(1, RING) as u64;
    Arc::new(InflightRegion::open(file, size, 0, (1, RING), (16, 1024)).unwrap())
}

fn queue(region: &Arc<InflightRegion>) -> QueueInflight {
    let mut q = QueueInflight::new(0);
    q.region = Some(region.clone());
    q
}

/// One chain returned the way `add_used` does it, with the used index moving to `used`.
fn complete(q: &mut QueueInflight, head: u16, used: u16) {
    q.returning(head);
    q.returned(head, used);
}

fn resubmitted(q: &mut QueueInflight) -> Vec<u16> {
    std::iter::from_fn(|| q.take_resubmit()).collect()
}

#[test]
fn the_layout_is_the_specifications() {
    assert_eq!(queue_stride(1), 64);
    assert_eq!(queue_stride(4), 128);
    assert_eq!(queue_stride(128), 16 + 16 * 128 + 48);
    assert_eq!(region_size(2, 256), 2 * (16 + 16 * 256 + 48));
    let (region, file) = fresh();
    // The queues' bytes, then the device state (cache_mode.rs).
    assert_eq!(region.len(), 192 + DEVICE_STATE_LEN);
    assert_eq!(file.metadata().unwrap().len(), 192 + 64);
}

#[test]
fn a_fresh_region_is_initialized_and_leaves_the_ring_where_the_frontend_put_it() {
    let (region, file) = fresh();
    let mut q = queue(&region);
    assert_eq!(q.recover(RING, 5), None);
    assert!(resubmitted(&mut q).is_empty());
    // version 1, desc_num, used_idx, as another process sees them in the file.
    let mut header = [0u8; 16];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0).unwrap();
    assert_eq!(u16::from_ne_bytes([header[8], header[9]]), VERSION);
    assert_eq!(u16::from_ne_bytes([header[10], header[11]]), RING);
    assert_eq!(u16::from_ne_bytes([header[14], header[15]]), 5);
}

/// Takes heads 3, 7, 1, 5 (in that order), completes 7 then 5, then starts returning 1.
fn out_of_order_session(region: &Arc<InflightRegion>) -> QueueInflight {
    let mut q = queue(region);
    assert_eq!(q.recover(RING, 0), None);
    for head in [3, 7, 1, 5] {
        q.taken(head);
    }
    complete(&mut q, 7, 1);
    complete(&mut q, 5, 2);
    q
}

#[test]
fn out_of_order_completion_then_a_crash_before_the_used_index_moves_resubmits_both_in_order() {
    let (region, file) = fresh();
    let mut old = out_of_order_session(&region);
    // Returning 1 began (batch list updated) but its used entry was never published.
    old.returning(1);
    drop(old);
    drop(region);

    let mut new = queue(&reopen(&file));
    let restart = new.recover(RING, 2).unwrap();
    assert_eq!(
        restart,
        Restart {
            next_avail: 4,
            next_used: 2,
            resubmit: 2
        }
    );
    assert_eq!(
        resubmitted(&mut new),
        vec![3, 1],
        "by the order they were taken"
    );
}

#[test]
fn a_crash_after_the_used_index_moved_clears_the_published_chain_from_the_last_batch() {
    let (region, file) = fresh();
    let mut old = out_of_order_session(&region);
    // 1's used entry and the used index (3) were published; inflight and used_idx were not.
    old.returning(1);
    drop(old);
    drop(region);

    let mut new = queue(&reopen(&file));
    let restart = new.recover(RING, 3).unwrap();
    assert_eq!(restart.next_avail, 4, "3 used + 1 inflight = 4 taken");
    assert_eq!(restart.next_used, 3);
    assert_eq!(resubmitted(&mut new), vec![3]);
}

#[test]
fn new_chains_are_ordered_after_the_resubmitted_ones_across_a_second_crash() {
    let (region, file) = fresh();
    let mut old = out_of_order_session(&region);
    old.returning(1);
    drop(old);
    drop(region);

    let region = reopen(&file);
    let mut second = queue(&region);
    second.recover(RING, 2).unwrap();
    assert_eq!(resubmitted(&mut second), vec![3, 1]);
    // The second process takes a new chain, completes 1, and dies.
    second.taken(0);
    complete(&mut second, 1, 3);
    drop(second);

    let mut third = queue(&reopen(&file));
    let restart = third.recover(RING, 3).unwrap();
    assert_eq!(restart.next_avail, 5, "3 used + 3 and 0 inflight");
    assert_eq!(resubmitted(&mut third), vec![3, 0]);
}

#[test]
fn a_clean_stop_leaves_nothing_to_resubmit() {
    let (region, file) = fresh();
    let mut old = out_of_order_session(&region);
    complete(&mut old, 1, 3);
    complete(&mut old, 3, 4);
    drop(old);
    let mut new = queue(&reopen(&file));
    let restart = new.recover(RING, 4).unwrap();
    assert_eq!(restart.resubmit, 0);
    assert_eq!(restart.next_avail, 4);
}

#[test]
fn a_region_made_for_another_ring_size_starts_afresh() {
    let (region, _file) = fresh();
    let mut q = out_of_order_session(&region);
    assert_eq!(q.recover(4, 2), None, "ring of 4 on a region of 8");
    assert!(resubmitted(&mut q).is_empty());
}

#[test]
fn garbage_written_by_the_frontend_never_panics_and_names_only_heads_of_the_ring() {
    let (region, mut file) = fresh();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..200 {
        let mut bytes = vec![0u8; region.len()];
        for b in &mut bytes {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        // A plausible header now and then, so the batch walk and the sort run.
        if round % 2 == 0 {
            bytes[8..10].copy_from_slice(&VERSION.to_ne_bytes());
            bytes[10..12].copy_from_slice(&RING.to_ne_bytes());
        }
        std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0).unwrap();
        let mut q = queue(&region);
        let used = seed as u16;
        if let Some(r) = q.recover(RING, used) {
            let heads = resubmitted(&mut q);
            assert_eq!(heads.len(), r.resubmit);
            assert!(heads.len() <= usize::from(RING));
            assert!(heads.iter().all(|&h| h < RING));
            assert_eq!(r.next_avail, used.wrapping_add(heads.len() as u16));
        }
        q.taken(seed as u16);
        q.returning(u16::MAX);
        q.returned(u16::MAX, 0);
    }
    file.flush().unwrap();
}

#[test]
fn a_region_is_checked_before_it_is_mapped() {
    let (_, file) = fresh();
    let size = region_size(1, RING) as u64;
    let limits = (16, 1024);
    let err = |r: Result<InflightRegion, InflightError>| r.err().unwrap().to_string();
    assert!(err(InflightRegion::open(&file, size - 1, 0, (1, RING), limits)).contains("less"));
    assert!(err(InflightRegion::open(&file, size, 100, (1, RING), limits)).contains("aligned"));
    assert!(err(InflightRegion::open(&file, size, 4096, (1, RING), limits)).contains("past"));
    assert!(err(InflightRegion::open(&file, 2 * size, 0, (2, RING), limits)).contains("past"));
    assert!(err(InflightRegion::open(&file, size, 0, (1, 6), limits)).contains("power"));
    assert!(err(InflightRegion::open(&file, size, 0, (0, RING), limits)).contains("power"));
    assert!(err(InflightRegion::open(&file, size, 0, (17, RING), limits)).contains("16 queues"));
    // A memfd anyone may truncate under the mapping.
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    // SAFETY: a fresh fd.
    let unsealed = unsafe { File::from_raw_fd(fd) };
    unsealed.set_len(4096).unwrap();
    assert!(err(InflightRegion::open(&unsealed, size, 0, (1, RING), limits)).contains("shrink"));
    let dir = std::env::temp_dir();
    let plain = File::open(&dir).unwrap();
    assert!(err(InflightRegion::open(&plain, size, 0, (1, RING), limits)).contains("regular"));
}

#[test]
fn the_tracker_locks_nothing_without_a_region() {
    let t = Tracker::new(2);
    assert!(t.queue(0).is_none());
    let (region, _file) = fresh();
    t.attach(region);
    assert!(t.queue(0).is_some());
    assert!(t.queue(1).is_none(), "the region has one queue");
    t.detach();
    assert!(t.queue(0).is_none());
}

/// The process before published chain 3's used entry and died before the interrupt (and
/// before clearing it in the region); the guest has nothing else in flight. The next process
/// must interrupt the guest when the ring starts, or the guest waits forever.
#[test]
fn a_restarted_ring_interrupts_the_guest_for_entries_the_dead_process_never_signalled() {
    use std::os::fd::AsRawFd;

    use vhost_user_backend::VhostUserBackend;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use crate::engine::memory::MemoryDevice;
    use crate::vhost::backend::{BlkBackend, DeviceSettings};

    const SIZE: u16 = 16;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let q = MockSplitQueue::new(&mem, SIZE);
    // What the guest and the dead process left: chain 3 taken from avail[0] and returned.
    mem.write_obj(3u16, q.avail_addr().unchecked_add(4))
        .unwrap();
    mem.write_obj(1u16, q.avail_addr().unchecked_add(2))
        .unwrap();
    mem.write_obj(3u32, q.used_addr().unchecked_add(4)).unwrap();
    mem.write_obj(1u32, q.used_addr().unchecked_add(8)).unwrap();
    mem.write_obj(1u16, q.used_addr().unchecked_add(2)).unwrap();
    let (region, _file) = InflightRegion::create(1, SIZE, 1, SIZE).unwrap();
    let region = Arc::new(region);
    let mut dead = QueueInflight::new(0);
    dead.region = Some(region.clone());
    dead.recover(SIZE, 0);
    dead.taken(3);
    dead.returning(3);
    drop(dead);

    let settings = DeviceSettings {
        serial: "restarted".into(),
        num_queues: 1,
        queue_size: SIZE,
        read_only: false,
        poll: std::time::Duration::ZERO,
        submit_batch: 4,
    };
    let backend = BlkBackend::new(Arc::new(MemoryDevice::new(1 << 20).unwrap()), settings);
    backend.open_queues();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    backend.update_memory(atomic.clone()).unwrap();
    backend.inflight().attach(region);
    let vring = VringRwLock::new(atomic, SIZE).unwrap();
    vring
        .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
        .unwrap();
    vring.set_queue_size(SIZE);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: dup of an eventfd we own; the File owns the copy.
    let copy = unsafe { File::from_raw_fd(libc::dup(call.as_raw_fd())) };
    vring.set_call(Some(copy));

    // The frontend's kick after the reconnect.
    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .unwrap();
    assert!(call.read().is_ok(), "the guest was not interrupted");
    // Chain 3 was returned: not resubmitted, and the ring goes on after it.
    let used: u16 = mem.read_obj(q.used_addr().unchecked_add(2)).unwrap();
    assert_eq!(used, 1);
    assert_eq!(vring.get_ref().get_queue().next_avail(), 1);
}
