#![allow(clippy::unwrap_used)]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;
use crate::engine::allocation::{push_run, AllocationRun};
use crate::engine::memory::MemoryDevice;
use crate::engine::{Allocation, BlockDevice, Bufs, BufsMut};
use crate::nbd::client::{NbdClient, DEFAULT_IN_FLIGHT};
use crate::nbd::{NbdAddr, NbdExport, NbdServer};

const SIZE: u64 = 16 << 20;
const BLOCK: u64 = 64 << 10;

/// A memory disk whose allocation is a list of data blocks (the rest are holes), as a thin
/// device's would be; it counts what reaches it as a target.
struct Disk {
    mem: MemoryDevice,
    mapped: Vec<bool>,
    written: AtomicU64,
    zeroed: AtomicU64,
    /// Reads fail from this byte on (a bad sector, as a source).
    bad_from: AtomicU64,
}

impl Disk {
    fn new(mapped: impl Fn(u64) -> bool) -> Arc<Disk> {
        Arc::new(Disk {
            mem: MemoryDevice::new(SIZE).unwrap(),
            mapped: (0..SIZE / BLOCK).map(mapped).collect(),
            written: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            bad_from: AtomicU64::new(u64::MAX),
        })
    }
}

impl BlockDevice for Disk {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        if offset + bufs.len() > self.bad_from.load(Ordering::SeqCst) {
            return Err(BlockError::io(
                offset,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.mem.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        self.written.fetch_add(bufs.len(), Ordering::SeqCst);
        self.mem.write(offset, bufs)
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.mem.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        assert!(may_unmap, "NO_HOLE reached the target");
        self.zeroed.fetch_add(len, Ordering::SeqCst);
        self.mem.write_zeroes(offset, len, may_unmap)
    }
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<AllocationRun>, BlockError> {
        let mut runs = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let n = (BLOCK - at % BLOCK).min(offset + len - at);
            let state = if self.mapped[(at / BLOCK) as usize] {
                Allocation::Data
            } else {
                Allocation::Hole
            };
            push_run(&mut runs, n, state);
            at += n;
        }
        Ok(runs)
    }
}

fn serve(dir: &tempfile::TempDir, disk: &Arc<Disk>, writable: bool) -> (NbdServer, String) {
    let path = dir.path().join("nbd.sock");
    let server = NbdServer::start(NbdAddr::Unix(path.clone())).unwrap();
    let dev: Arc<dyn BlockDevice> = disk.clone();
    server
        .add(NbdExport {
            name: "t".into(),
            description: String::new(),
            dev: dev.clone(),
            node: dev,
            writable,
            fast_zero: false,
            bitmap: None,
        })
        .unwrap();
    (server, format!("nbd+unix:///t?socket={}", path.display()))
}

fn fill(disk: &Disk) {
    for b in 0..SIZE / BLOCK {
        if disk.mapped[b as usize] {
            let data = vec![(b % 251) as u8 + 1; BLOCK as usize];
            disk.mem.write(b * BLOCK, &Bufs::one(&data)).unwrap();
        }
    }
}

fn content(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    d.read(0, &mut BufsMut::one(&mut v)).unwrap();
    v
}

#[test]
fn a_copy_writes_data_and_zeroes_holes_without_reading_them() {
    let source = Disk::new(|b| b % 4 == 1 || (100..140).contains(&b));
    fill(&source);
    let target = Disk::new(|_| true);
    // The target starts with other content everywhere: holes must become zeros.
    target
        .mem
        .write(0, &Bufs::one(&vec![0xee; SIZE as usize]))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_server, uri) = serve(&dir, &target, true);
    let client = NbdClient::connect_uri(&uri, DEFAULT_IN_FLIGHT).unwrap();
    let moved = AtomicU64::new(0);
    let copied = copy_range(&*source, &client, 0, SIZE, Holes::Zero, &|n| {
        moved.fetch_add(n, Ordering::SeqCst);
    })
    .unwrap();
    let data_blocks = source.mapped.iter().filter(|m| **m).count() as u64;
    assert_eq!(copied.data, data_blocks * BLOCK);
    assert_eq!(copied.zeroed, SIZE - data_blocks * BLOCK);
    assert_eq!(moved.load(Ordering::SeqCst), SIZE);
    assert_eq!(target.written.load(Ordering::SeqCst), data_blocks * BLOCK);
    assert_eq!(
        target.zeroed.load(Ordering::SeqCst),
        SIZE - data_blocks * BLOCK
    );
    assert!(content(&*target) == content(&*source));
}

#[test]
fn a_part_of_a_device_and_a_dirty_run_copy_alone() {
    let source = Disk::new(|_| true);
    fill(&source);
    let target = Disk::new(|_| true);
    let dir = tempfile::tempdir().unwrap();
    let (_server, uri) = serve(&dir, &target, true);
    let client = NbdClient::connect_uri(&uri, 4).unwrap();
    let dirty = DirtyMap::new(SIZE, BLOCK);
    dirty.mark(3 * BLOCK + 5, 10);
    let (off, len) = dirty.take(0, 1 << 30).unwrap();
    copy_range(&*source, &client, off, len, Holes::Zero, &|_| {}).unwrap();
    assert_eq!(target.written.load(Ordering::SeqCst), BLOCK);
    let t = content(&*target);
    let s = content(&*source);
    let r = (3 * BLOCK) as usize..(4 * BLOCK) as usize;
    assert!(t[r.clone()] == s[r]);
    assert!(t[..(3 * BLOCK) as usize].iter().all(|b| *b == 0));
}

#[test]
fn a_target_that_refuses_writes_fails_the_copy() {
    let source = Disk::new(|_| true);
    let target = Disk::new(|_| true);
    let dir = tempfile::tempdir().unwrap();
    let (_server, uri) = serve(&dir, &target, false);
    let client = NbdClient::connect_uri(&uri, 4).unwrap();
    let e = copy_range(&*source, &client, 0, SIZE, Holes::Zero, &|_| {}).unwrap_err();
    assert!(matches!(e, MirrorError::Target(_)), "{e}");
}

/// A queued stream (the job's: source reads through the device's queue, several ranges
/// without a wait between them) moves the same bytes as `copy_range`.
#[test]
fn a_queued_stream_copies_several_ranges_with_reads_in_flight() {
    let source = Disk::new(|b| b % 3 == 0 || (50..90).contains(&b));
    fill(&source);
    let target = Disk::new(|_| true);
    target
        .mem
        .write(0, &Bufs::one(&vec![0xee; SIZE as usize]))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_server, uri) = serve(&dir, &target, true);
    let client = Arc::new(NbdClient::connect_uri(&uri, DEFAULT_IN_FLIGHT).unwrap());
    let src: Arc<dyn BlockDevice> = source.clone();
    let moved = AtomicU64::new(0);
    let progress = |n| {
        moved.fetch_add(n, Ordering::SeqCst);
    };
    let mut stream = copy::CopyStream::queued(&src, &client);
    let mut copied = Copied::default();
    // Ranges that cut blocks and runs (at 512-byte boundaries, which the server asks for).
    for (off, len) in [
        (0, 5 * BLOCK + 512),
        (5 * BLOCK + 512, SIZE / 2),
        (SIZE / 2 + 5 * BLOCK + 512, SIZE / 2 - 5 * BLOCK - 512),
    ] {
        let c = stream.range(off, len, Holes::Zero, &progress).unwrap();
        copied.data += c.data;
        copied.zeroed += c.zeroed;
    }
    stream.finish(&progress).unwrap();
    assert_eq!(copied.data + copied.zeroed, SIZE);
    assert_eq!(moved.load(Ordering::SeqCst), SIZE);
    assert_eq!(target.written.load(Ordering::SeqCst), copied.data);
    assert_eq!(target.zeroed.load(Ordering::SeqCst), copied.zeroed);
    assert!(content(&*target) == content(&*source));
}

/// A source read that fails fails the queued stream's copy (and it returns: nothing waits
/// for a read that never came).
#[test]
fn a_failed_source_read_fails_the_queued_stream() {
    let source = Disk::new(|_| true);
    fill(&source);
    source.bad_from.store(SIZE / 2, Ordering::SeqCst);
    let target = Disk::new(|_| true);
    let dir = tempfile::tempdir().unwrap();
    let (_server, uri) = serve(&dir, &target, true);
    let client = Arc::new(NbdClient::connect_uri(&uri, DEFAULT_IN_FLIGHT).unwrap());
    let src: Arc<dyn BlockDevice> = source.clone();
    let mut stream = copy::CopyStream::queued(&src, &client);
    let started = stream.range(0, SIZE, Holes::Zero, &|_| {});
    let settled = stream.settle(&|_| {});
    let e = started.and(settled).unwrap_err();
    assert!(matches!(e, MirrorError::Source(_)), "{e}");
    assert!(target.written.load(Ordering::SeqCst) <= SIZE / 2);
}

/// The read window bounds the bytes read and not given back (in flight, or delivered and
/// still being sent), whatever the number of reads; every read started is handed back
/// once, with the bytes at its offset.
#[test]
fn queued_reads_stay_within_their_window_and_all_come_back() {
    let source = Disk::new(|_| true);
    fill(&source);
    let src: Arc<dyn BlockDevice> = source.clone();
    let mut reads = reads::QueuedReads::open(src, 3 * BLOCK).unwrap();
    let want = content(&*source);
    let mut seen = vec![false; (SIZE / BLOCK) as usize];
    let back = std::cell::RefCell::new(Vec::new());
    let mut check = |off: u64, mut storage: Vec<u8>, len: usize| -> Result<(), MirrorError> {
        let b = (off / BLOCK) as usize;
        assert!(!seen[b], "block {b} came back twice");
        seen[b] = true;
        let data = reads::aligned(&mut storage, len);
        assert!(*data == want[off as usize..off as usize + len]);
        back.borrow_mut().push((storage, len));
        Ok(())
    };
    let mut most = 0;
    for b in 0..SIZE / BLOCK {
        loop {
            // Every other time, the delivered buffers stay out: the window stays full of them.
            if b % 2 == 0 || !reads.reading() {
                for (storage, len) in back.borrow_mut().drain(..) {
                    reads.give_back(storage, len);
                }
            }
            if reads.has_room(BLOCK) {
                break;
            }
            reads.wait_some(&mut check).unwrap();
        }
        reads.start(b * BLOCK, BLOCK as usize);
        most = most.max(reads.bytes_in_flight() + reads.held());
    }
    reads.finish_all(&mut check).unwrap();
    assert_eq!(most, 3 * BLOCK);
    assert!(reads.held() > 0, "the last buffers were not given back");
    assert!(seen.iter().all(|s| *s));
}

/// The write-blocking handshake: a write that started before `start_sync` is waited for;
/// one after is synced, its range copied now or on the copy thread; a target that fails is
/// recorded and later copies are not tried.
#[test]
fn write_blocking_waits_for_earlier_writes_and_copies_later_ones() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let target = Disk::new(|_| false);
    let (_server, uri) = serve(&dir, &target, true);
    let source = Disk::new(|b| b % 2 == 0);
    fill(&source);
    let client = Arc::new(NbdClient::connect_uri(&uri, DEFAULT_IN_FLIGHT).unwrap());
    let hook = WriteHook::default();
    assert!(hook.start(Arc::new(DirtyMap::new(SIZE, BLOCK))));
    assert!(!hook.start_write(), "no mirror is write-blocking yet");
    let src: Arc<dyn BlockDevice> = source.clone();
    let active = ActiveSync::start(src, client.clone(), Default::default()).unwrap();
    hook.start_sync(active.clone());
    assert!(
        !hook.wait_unsynced(Duration::from_millis(30)),
        "a write that started before is still in flight"
    );
    hook.finish_write(false);
    assert!(hook.wait_unsynced(Duration::from_millis(30)));
    assert!(hook.start_write(), "a write that starts now is synced");
    hook.finish_write(true);

    assert!(active.copy_now(0, BLOCK));
    let (tx, rx) = std::sync::mpsc::channel();
    active.copy_later(
        smallvec::smallvec![(2 * BLOCK, 3 * BLOCK)],
        Box::new(move |ok| {
            let _ = tx.send(ok);
        }),
    );
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
    let (want, got) = (content(&*source), content(&*target));
    assert!(want[..BLOCK as usize] == got[..BLOCK as usize]);
    assert!(
        want[2 * BLOCK as usize..5 * BLOCK as usize] == got[2 * BLOCK as usize..5 * BLOCK as usize]
    );
    assert!(active.failure().is_none());

    client.hang_up_handle().unwrap().hang_up();
    assert!(!active.copy_now(6 * BLOCK, BLOCK));
    assert!(active.failure().is_some());
    let (tx, rx) = std::sync::mpsc::channel();
    active.copy_later(
        smallvec::smallvec![(0, BLOCK)],
        Box::new(move |ok| {
            let _ = tx.send(ok);
        }),
    );
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(false));
    hook.stop();
    assert!(hook.active_sync().is_none());
    assert!(!hook.tracking());
}
