//! Failing devices under a thin pool: EIO and short transfers on the data device, EIO on
//! metadata reads, writes and flushes. In every case the request that hit the fault fails
//! with an error (never a silent success or garbage), the pool says what it became through
//! `PoolEvent::ModeChanged`, reads of committed data keep working where the device can serve
//! them, nothing committed is damaged, and once the fault is gone a reopen brings the pool
//! back (after `thinblk check --clear-needs-check` when the metadata asked for a check).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use thinblk::engine::{Bufs, BufsMut};

use parking_lot::Mutex;
use support::*;
use thinblk::bufio::{BlockStore, CrashStore, WriteFault};
use thinblk::engine::thin::{
    Pool, PoolEvent, PoolGeometry, PoolMode, PoolOptions, ThinDevice, Volumes,
};
use thinblk::engine::{BlockDevice, BlockError};

const BS: u64 = 64 << 10;
const DATA: u64 = 8 << 20;
const META_BLOCKS: u64 = 1024;
const DISK: u64 = 1 << 20;

struct Rig {
    dir: tempfile::TempDir,
    store: Arc<CrashStore>,
    flaky: Arc<FlakyStore>,
    data: Arc<FaultyDevice>,
    events: Arc<Mutex<Vec<PoolEvent>>>,
}

impl Rig {
    fn new() -> Rig {
        let store = Arc::new(CrashStore::new(4096, META_BLOCKS));
        Rig {
            dir: tempfile::tempdir().unwrap(),
            flaky: FlakyStore::new(store.clone()),
            store,
            data: FaultyDevice::new(PowerCutDevice::new(DATA, None)),
            events: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn open(&self) -> Arc<Volumes> {
        self.try_open().unwrap()
    }

    fn try_open(&self) -> Result<Arc<Volumes>, thinblk::engine::thin::PoolOpenError> {
        let geometry = PoolGeometry {
            block_size: BS,
            metadata_size: META_BLOCKS * 4096,
            data_size: DATA,
        };
        let options = PoolOptions {
            commit_interval: Duration::from_secs(3600),
            error_if_no_space: true,
            ..PoolOptions::default()
        };
        let pool = Pool::open_with(self.flaky.clone(), self.data.clone(), &geometry, options)?;
        let events = self.events.clone();
        pool.subscribe(Arc::new(move |e: &PoolEvent| events.lock().push(e.clone())));
        Ok(Volumes::open(pool, &self.dir.path().join("devices.json")).unwrap())
    }

    fn mode_changes(&self) -> Vec<PoolMode> {
        self.events
            .lock()
            .iter()
            .filter_map(|e| match e {
                PoolEvent::ModeChanged(m) => Some(*m),
                _ => None,
            })
            .collect()
    }

    fn image(&self) -> std::path::PathBuf {
        let path = self.dir.path().join("metadata.img");
        save_image(&self.store, &path);
        path
    }
}

fn put(dev: &ThinDevice, block: u64, c: Content) -> Result<(), BlockError> {
    dev.write(block * STAMP as u64, &Bufs::one(&content_bytes(c)))
}

fn get(dev: &ThinDevice, block: u64) -> Result<Content, BlockError> {
    let mut buf = vec![0u8; STAMP];
    dev.read(block * STAMP as u64, &mut BufsMut::one(&mut buf))?;
    Ok(parse(&buf))
}

fn st(block: u64, gen: u64) -> Content {
    Content::Stamp { tag: 1, block, gen }
}

/// Stamped blocks 0, 16, 32, ... (one per data block) written and committed.
fn committed_disk(thin: &Volumes, blocks: u64) -> Arc<ThinDevice> {
    thin.create("a", DISK).unwrap();
    let a = thin.device("a").unwrap();
    for i in 0..blocks {
        put(&a, i * 16, st(i * 16, 1)).unwrap();
    }
    a.flush().unwrap();
    a
}

fn assert_committed_intact(a: &ThinDevice, blocks: u64) {
    for i in 0..blocks {
        assert_eq!(
            get(a, i * 16).unwrap(),
            st(i * 16, 1),
            "committed block {i}"
        );
    }
}

/// Where the data of stamped block `block` of `a` lives on the data device.
fn data_range(a: &ThinDevice, block: u64) -> (u64, u64) {
    let vblock = block * STAMP as u64 / BS;
    let l = a
        .pool()
        .meta()
        .find_block(a.id(), vblock, true)
        .unwrap()
        .unwrap();
    (l.block * BS, (l.block + 1) * BS)
}

fn reopen_writable(rig: &Rig) -> Arc<Volumes> {
    let thin = rig.open();
    assert_eq!(thin.pool().mode(), PoolMode::Write, "the pool came back");
    assert_checks_pass(&rig.image(), "after the fault cleared");
    thin
}

fn data_write_fault_turns_the_pool_read_only(fault: Fault) {
    let rig = Rig::new();
    let thin = rig.open();
    let a = committed_disk(&thin, 4);
    // Acknowledged but not flushed, into a new block: never committed from now on.
    put(&a, 6 * 16, st(96, 2)).unwrap();
    rig.data.fail_writes(fault);
    // A new block (zero-filled around the write) and an overwrite of a mapped one.
    assert!(matches!(
        put(&a, 5 * 16, st(80, 2)),
        Err(BlockError::Io { .. })
    ));
    assert_eq!(thin.pool().mode(), PoolMode::ReadOnly);
    assert_eq!(rig.mode_changes(), vec![PoolMode::ReadOnly]);
    assert!(matches!(put(&a, 2, st(2, 2)), Err(BlockError::ReadOnly)));
    assert!(a.flush().is_err(), "a FLUSH after a lost write succeeded");
    assert_committed_intact(&a, 4);
    assert!(rig.data.injected.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    drop((a, thin));
    rig.data.clear();
    let thin = reopen_writable(&rig);
    let a = thin.device("a").unwrap();
    assert_committed_intact(&a, 4);
    assert_eq!(
        get(&a, 96).unwrap(),
        Content::Zero,
        "an unflushed write was committed"
    );
    assert_eq!(
        get(&a, 80).unwrap(),
        Content::Zero,
        "a failed write was committed"
    );
    put(&a, 2, st(2, 3)).unwrap();
    a.flush().unwrap();
    assert_eq!(get(&a, 2).unwrap(), st(2, 3));
}

#[test]
fn a_data_write_eio_fails_the_write_and_turns_the_pool_read_only_until_reopened() {
    data_write_fault_turns_the_pool_read_only(Fault::Eio);
}

#[test]
fn a_short_data_write_is_an_error_and_is_never_committed() {
    data_write_fault_turns_the_pool_read_only(Fault::Short);
}

#[test]
fn a_short_write_into_a_mapped_block_fails_and_leaves_other_blocks_alone() {
    let rig = Rig::new();
    let thin = rig.open();
    let a = committed_disk(&thin, 4);
    let (start, end) = data_range(&a, 16);
    rig.data.only_in(start, end);
    rig.data.fail_writes(Fault::Short);
    let two = [content_bytes(st(16, 2)), content_bytes(st(17, 2))].concat();
    assert!(a.write(16 * STAMP as u64, &Bufs::one(&two)).is_err());
    assert_eq!(thin.pool().mode(), PoolMode::ReadOnly);
    drop((a, thin));
    rig.data.clear();
    let thin = reopen_writable(&rig);
    let a = thin.device("a").unwrap();
    for i in [0u64, 2, 3] {
        assert_eq!(get(&a, i * 16).unwrap(), st(i * 16, 1));
    }
    // The failed range holds, stamp by stamp, the old or the new version: this disk's data.
    for (block, old) in [(16, st(16, 1)), (17, Content::Zero)] {
        let got = get(&a, block).unwrap();
        assert!(got == old || got == st(block, 2), "block {block}: {got:?}");
    }
}

fn data_read_fault_fails_only_that_read(fault: Fault) {
    let rig = Rig::new();
    let thin = rig.open();
    let a = committed_disk(&thin, 4);
    let (start, end) = data_range(&a, 32);
    rig.data.only_in(start, end);
    rig.data.fail_reads(fault);
    let mut buf = vec![0xAAu8; STAMP];
    let r = a.read(32 * STAMP as u64, &mut BufsMut::one(&mut buf));
    assert!(matches!(r, Err(BlockError::Io { .. })), "{r:?}");
    // The rest of the disk reads and writes on: a read error says nothing about the pool.
    assert_eq!(get(&a, 0).unwrap(), st(0, 1));
    assert_eq!(get(&a, 48).unwrap(), st(48, 1));
    put(&a, 1, st(1, 2)).unwrap();
    a.flush().unwrap();
    assert_eq!(thin.pool().mode(), PoolMode::Write);
    assert!(rig.mode_changes().is_empty());
    rig.data.clear();
    assert_eq!(get(&a, 32).unwrap(), st(32, 1));
    drop((a, thin));
    let thin = reopen_writable(&rig);
    let a = thin.device("a").unwrap();
    assert_committed_intact(&a, 4);
    assert_eq!(get(&a, 1).unwrap(), st(1, 2));
}

#[test]
fn a_data_read_eio_fails_that_read_only() {
    data_read_fault_fails_only_that_read(Fault::Eio);
}

#[test]
fn a_short_data_read_is_an_error_not_a_partial_success() {
    data_read_fault_fails_only_that_read(Fault::Short);
}

#[test]
fn a_failed_data_flush_commits_nothing_and_turns_the_pool_read_only() {
    let rig = Rig::new();
    let thin = rig.open();
    let a = committed_disk(&thin, 4);
    put(&a, 64 + 16, st(80, 2)).unwrap();
    rig.data.fail_flushes();
    assert!(a.flush().is_err());
    assert_eq!(thin.pool().mode(), PoolMode::ReadOnly);
    assert_eq!(rig.mode_changes(), vec![PoolMode::ReadOnly]);
    // Even if a later flush would succeed (fsync may forget the pages it failed to write),
    // the mappings of that transaction are never committed.
    rig.data.clear();
    assert!(
        a.flush().is_err(),
        "a FLUSH committed after a failed data flush"
    );
    assert_committed_intact(&a, 4);
    drop((a, thin));
    let thin = reopen_writable(&rig);
    let a = thin.device("a").unwrap();
    assert_committed_intact(&a, 4);
    assert_eq!(get(&a, 80).unwrap(), Content::Zero);
}

/// Loads a metadata image back into a fresh store, as after an offline repair.
fn store_from(path: &Path) -> Arc<CrashStore> {
    let bytes = std::fs::read(path).unwrap();
    let store = CrashStore::new(4096, META_BLOCKS);
    for (i, block) in bytes.chunks(4096).enumerate() {
        store.write_block(i as u64, block).unwrap();
    }
    store.flush().unwrap();
    Arc::new(store)
}

#[test]
fn a_metadata_device_that_keeps_failing_leaves_the_last_commit_intact() {
    let rig = Rig::new();
    let thin = rig.open();
    let a = committed_disk(&thin, 4);
    put(&a, 64 + 16, st(80, 2)).unwrap();
    rig.store.fail_after_writes(3, WriteFault::Error);
    assert!(
        a.flush().is_err(),
        "a commit onto failing metadata succeeded"
    );
    assert_eq!(thin.pool().mode(), PoolMode::ReadOnly);
    assert_eq!(rig.mode_changes(), vec![PoolMode::ReadOnly]);
    assert!(matches!(put(&a, 2, st(2, 2)), Err(BlockError::ReadOnly)));
    assert_committed_intact(&a, 4);
    drop((a, thin));
    // needs_check could not be written either: the device refused everything.
    rig.store.cut_power();
    rig.store.clear_faults();
    let thin = reopen_writable(&rig);
    let a = thin.device("a").unwrap();
    assert_committed_intact(&a, 4);
    assert_eq!(get(&a, 80).unwrap(), Content::Zero);
}

fn metadata_fault_sets_needs_check(fail_after: i64) {
    let mut rig = Rig::new();
    let thin = rig.open();
    let a = committed_disk(&thin, 4);
    put(&a, 64 + 16, st(80, 2)).unwrap();
    rig.flaky.fail_write_once_after(fail_after);
    assert!(
        a.flush().is_err(),
        "a commit onto failing metadata succeeded"
    );
    assert_eq!(thin.pool().mode(), PoolMode::ReadOnly);
    assert_eq!(rig.mode_changes(), vec![PoolMode::ReadOnly]);
    assert!(matches!(put(&a, 2, st(2, 2)), Err(BlockError::ReadOnly)));
    assert_committed_intact(&a, 4);
    drop((a, thin));
    // The flag reached the superblock: the pool reopens read-only and the checker says why.
    let thin = rig.open();
    assert_eq!(thin.pool().mode(), PoolMode::ReadOnly);
    assert!(thin.pool().meta().needs_check());
    assert_committed_intact(&thin.device("a").unwrap(), 4);
    drop(thin);
    let image = rig.image();
    let check = thinblk_check(&image, &[]);
    assert!(!check.ok, "thinblk check passed a pool that needs a check");
    assert!(check.output.contains("needs_check"), "{}", check.output);
    let cleared = thinblk_check(&image, &["--clear-needs-check"]);
    assert!(cleared.ok, "{}", cleared.output);
    assert_checks_pass(&image, "after --clear-needs-check");
    rig.store = store_from(&image);
    rig.flaky = FlakyStore::new(rig.store.clone());
    let thin = reopen_writable(&rig);
    let a = thin.device("a").unwrap();
    assert_committed_intact(&a, 4);
    assert_eq!(get(&a, 80).unwrap(), Content::Zero);
    put(&a, 2, st(2, 3)).unwrap();
    a.flush().unwrap();
}

#[test]
fn a_metadata_write_eio_sets_needs_check_which_check_reports_and_clears() {
    metadata_fault_sets_needs_check(0);
}

#[test]
fn a_metadata_write_failing_midway_through_a_commit_sets_needs_check() {
    metadata_fault_sets_needs_check(2);
}

#[test]
fn a_failed_metadata_flush_commits_nothing_and_turns_the_pool_read_only() {
    let rig = Rig::new();
    let thin = rig.open();
    let a = committed_disk(&thin, 4);
    put(&a, 64 + 16, st(80, 2)).unwrap();
    rig.store.fail_flush(true);
    assert!(a.flush().is_err());
    assert_eq!(thin.pool().mode(), PoolMode::ReadOnly);
    assert_eq!(rig.mode_changes(), vec![PoolMode::ReadOnly]);
    assert_committed_intact(&a, 4);
    drop((a, thin));
    // Nothing written since the last good flush is durable.
    rig.store.cut_power();
    rig.store.clear_faults();
    let thin = reopen_writable(&rig);
    let a = thin.device("a").unwrap();
    assert_committed_intact(&a, 4);
    assert_eq!(get(&a, 80).unwrap(), Content::Zero);
}

#[test]
fn unreadable_metadata_fails_the_io_that_needs_it_and_damages_nothing() {
    let rig = Rig::new();
    {
        let thin = rig.open();
        committed_disk(&thin, 4);
    }
    // Nothing but the superblock can be read: opening fails with an error, not a panic.
    for b in 1..META_BLOCKS {
        rig.store.fail_read(b);
    }
    assert!(rig.try_open().is_err());
    // Opened with a cold cache, then every lookup must read the mapping tree, which fails.
    rig.store.clear_faults();
    let thin = rig.open();
    for b in 1..META_BLOCKS {
        rig.store.fail_read(b);
    }
    let a = thin.device("a").unwrap();
    let mut buf = vec![0xAAu8; STAMP];
    assert!(a.read(0, &mut BufsMut::one(&mut buf)).is_err());
    assert!(put(&a, 3, st(3, 2)).is_err());
    drop((a, thin));
    rig.store.clear_faults();
    let thin = rig.open();
    if thin.pool().mode() != PoolMode::Write {
        // A change failed half-way: the pool asked for a check; the check clears it.
        drop(thin);
        let cleared = thinblk_check(&rig.image(), &["--clear-needs-check"]);
        assert!(cleared.ok, "{}", cleared.output);
        return;
    }
    assert_committed_intact(&thin.device("a").unwrap(), 4);
    assert_checks_pass(&rig.image(), "after unreadable metadata");
}
