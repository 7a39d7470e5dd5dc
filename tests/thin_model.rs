//! The thin engine against a reference model: a byte image per device, a snapshot copies it.
#![allow(clippy::unwrap_used)]

#[path = "external/mod.rs"]
mod external;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thinblk::engine::{Bufs, BufsMut};

use thinblk::engine::pdata::check::check_pool;
use thinblk::engine::thin::{Pool, PoolGeometry, PoolOptions, Volumes};
use thinblk::engine::BlockDevice;

const BS: u64 = 64 << 10;
const DISK: u64 = 2 << 20;

struct Files {
    _dir: tempfile::TempDir,
    meta: PathBuf,
    data: PathBuf,
    catalog: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    Files {
        meta: dir.path().join("metadata"),
        data: dir.path().join("data"),
        catalog: dir.path().join("devices.json"),
        _dir: dir,
    }
}

fn open(f: &Files, data_size: u64) -> Arc<Volumes> {
    let geometry = PoolGeometry {
        block_size: BS,
        metadata_size: 4 << 20,
        data_size,
    };
    let options = PoolOptions {
        direct: false,
        error_if_no_space: true,
        ..PoolOptions::default()
    };
    let pool = Pool::open(&f.meta, &f.data, &geometry, options).unwrap();
    Volumes::open(pool, &f.catalog).unwrap()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut out = vec![0u8; dev.size() as usize];
    dev.read(0, &mut BufsMut::one(&mut out)).unwrap();
    out
}

fn assert_clean(meta: &Path) {
    let store = Arc::new(thinblk::bufio::FileStore::open_read_only(meta, 4096).unwrap());
    let nr = thinblk::bufio::BlockStore::nr_blocks(&*store);
    let cache = Arc::new(thinblk::bufio::BufferCache::new(store, Default::default()));
    let bm = Arc::new(thinblk::engine::pdata::BlockManager::new(cache, nr));
    let report = check_pool(&bm);
    assert!(report.is_clean(), "{:?}", report.problems);
    let exe = external::tool("thin_check");
    let out = std::process::Command::new(exe).arg(meta).output().unwrap();
    assert!(
        out.status.success(),
        "thin_check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_model(seed: u64, steps: usize) {
    let f = files();
    let mut pool = open(&f, 32 << 20);
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut rng = Rng(seed | 1);
    let mut next = 0;
    pool.create("d0", DISK).unwrap();
    model.insert("d0".into(), vec![0; DISK as usize]);
    for step in 0..steps {
        let names: Vec<String> = model.keys().cloned().collect();
        let name = names[rng.below(names.len() as u64) as usize].clone();
        let dev = pool.device(&name).unwrap();
        let image = model.get_mut(&name).unwrap();
        match rng.below(100) {
            0..=44 => {
                let sector = rng.below(DISK / 512);
                let max = (DISK / 512 - sector).min(300);
                let n = 1 + rng.below(max);
                let off = sector * 512;
                let data: Vec<u8> = (0..n * 512)
                    .map(|i| (i ^ rng.0 ^ step as u64) as u8 | 1)
                    .collect();
                // Two pieces, to exercise scatter-gather across block boundaries.
                let cut = (data.len() / 3) & !511;
                dev.write(
                    off,
                    &Bufs::from(
                        &[
                            std::io::IoSlice::new(&data[..cut]),
                            std::io::IoSlice::new(&data[cut..]),
                        ][..],
                    ),
                )
                .unwrap();
                image[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            45..=59 => {
                let off = rng.below(DISK / 512) * 512;
                let n = (1 + rng.below((DISK - off) / 512)).min(512) * 512;
                let mut got = vec![0u8; n as usize];
                dev.read(off, &mut BufsMut::one(&mut got)).unwrap();
                assert_eq!(
                    got,
                    image[off as usize..(off + n) as usize],
                    "seed {seed} step {step} read {name}"
                );
            }
            60..=67 => {
                let off = rng.below(DISK / 512) * 512;
                let n = (1 + rng.below((DISK - off) / 512)).min(1024) * 512;
                dev.write_zeroes(off, n, rng.below(2) == 0).unwrap();
                image[off as usize..(off + n) as usize].fill(0);
            }
            68..=73 => {
                // Discard whole blocks only: partial blocks keep data, whole ones read zeros.
                let first = rng.below(DISK / BS);
                let count = 1 + rng.below(DISK / BS - first);
                dev.discard(first * BS, count * BS).unwrap();
                image[(first * BS) as usize..((first + count) * BS) as usize].fill(0);
            }
            74..=80 if model.len() < 6 => {
                next += 1;
                let snap = format!("s{next}");
                drop(dev);
                pool.snapshot(&name, &snap).unwrap();
                let copy = model[&name].clone();
                model.insert(snap, copy);
            }
            81..=84 if model.len() > 1 => {
                drop(dev);
                pool.delete(&name, false).unwrap();
                model.remove(&name);
            }
            85..=92 => dev.flush().unwrap(),
            93..=96 => {
                drop(dev);
                dev_flush_and_reopen(&f, &mut pool);
                for (n, img) in &model {
                    let d = pool.device(n).unwrap();
                    assert!(
                        read_all(&*d) == *img,
                        "seed {seed} step {step}: {n} differs after reopen"
                    );
                }
            }
            _ => {}
        }
    }
    for (n, img) in &model {
        let d = pool.device(n).unwrap();
        assert!(read_all(&*d) == *img, "seed {seed}: {n} differs at the end");
    }
    drop(pool);
    assert_clean(&f.meta);
}

fn dev_flush_and_reopen(f: &Files, pool: &mut Arc<Volumes>) {
    let fresh;
    {
        let old = std::mem::replace(pool, open_placeholder());
        drop(old);
        fresh = open(f, 32 << 20);
    }
    *pool = fresh;
}

thread_local! {
    static PLACEHOLDER: Files = files();
}

/// A throwaway pool to stand in while the real one is closed and reopened.
fn open_placeholder() -> Arc<Volumes> {
    PLACEHOLDER.with(|f| open(f, 1 << 20))
}

#[test]
fn random_operations_match_the_model_across_reopens() {
    for seed in [1, 7, 42, 1234] {
        run_model(seed, 400);
    }
}

#[test]
fn a_new_disk_never_shows_a_deleted_disks_data() {
    let f = files();
    let pool = open(&f, 4 << 20);
    pool.create("a", 4 << 20).unwrap();
    let a = pool.device("a").unwrap();
    let secret = vec![0x5Au8; 4 << 20];
    // Fill every data block of the pool with A's data.
    match a.write(0, &Bufs::one(&secret)) {
        Ok(()) | Err(thinblk::engine::BlockError::NoSpace) => {}
        Err(e) => panic!("{e}"),
    }
    a.flush().unwrap();
    drop(a);
    pool.delete("a", false).unwrap();
    pool.create("b", 4 << 20).unwrap();
    let b = pool.device("b").unwrap();
    // Partial writes into every block B gets.
    for blk in 0..(4 << 20) / BS {
        b.write(blk * BS + 4096, &Bufs::one(&[1u8; 512])).unwrap();
    }
    let all = read_all(&*b);
    assert!(!all.contains(&0x5A), "B reads A's old data");
}

#[test]
fn out_of_space_fails_writes_when_asked_to_and_reads_keep_working() {
    let f = files();
    let pool = open(&f, 4 * BS);
    pool.create("a", 1 << 20).unwrap();
    let a = pool.device("a").unwrap();
    for blk in 0..4 {
        a.write(blk * BS, &Bufs::one(&[blk as u8 + 1; 512]))
            .unwrap();
    }
    let err = a.write(4 * BS, &Bufs::one(&[9u8; 512])).unwrap_err();
    assert!(matches!(err, thinblk::engine::BlockError::NoSpace), "{err}");
    let mut got = [0u8; 512];
    a.read(3 * BS, &mut BufsMut::one(&mut got)).unwrap();
    assert_eq!(got, [4u8; 512]);
    // Writes into mapped blocks still work.
    a.write(0, &Bufs::one(&[7u8; 512])).unwrap();
}

#[test]
fn snapshots_of_snapshots_keep_every_generation() {
    let f = files();
    let pool = open(&f, 16 << 20);
    pool.create("g0", 1 << 20).unwrap();
    for gen in 0..20u8 {
        let cur = format!("g{gen}");
        let d = pool.device(&cur).unwrap();
        d.write(u64::from(gen) * 4096, &Bufs::one(&[gen + 1; 4096]))
            .unwrap();
        drop(d);
        pool.snapshot(&cur, &format!("g{}", gen + 1)).unwrap();
    }
    for gen in 0..=20u8 {
        let d = pool.device(&format!("g{gen}")).unwrap();
        let img = read_all(&*d);
        for g in 0..20u8 {
            let at = usize::from(g) * 4096;
            // Generation `gen` holds what it and every generation before it wrote.
            let want = if g <= gen { g + 1 } else { 0 };
            assert_eq!(img[at], want, "generation {gen}, block written by {g}");
        }
    }
    drop(pool);
    assert_clean(&f.meta);
}

fn read_mapping(m: &thinblk::engine::Mapping) -> Vec<u8> {
    let mut out = Vec::new();
    for e in &m.extents {
        match *e {
            thinblk::engine::Extent::Zero { len } => out.extend(vec![0u8; len as usize]),
            thinblk::engine::Extent::File {
                fd, offset, len, ..
            } => {
                // The O_DIRECT descriptor wants aligned memory: read through a page-aligned buffer.
                let layout = std::alloc::Layout::from_size_align(len as usize, 4096).unwrap();
                // SAFETY: the layout has a non-zero size; the buffer is freed below.
                let buf = unsafe { std::alloc::alloc(layout) };
                // SAFETY: `buf` holds `len` writable bytes; `fd` is open for reading.
                let n = unsafe { libc::pread(fd, buf.cast(), len as usize, offset as i64) };
                assert_eq!(n, len as isize);
                // SAFETY: `n` bytes were read into `buf`.
                out.extend_from_slice(unsafe { std::slice::from_raw_parts(buf, len as usize) });
                // SAFETY: allocated above with this layout.
                unsafe { std::alloc::dealloc(buf, layout) };
            }
            thinblk::engine::Extent::Below { .. } => {
                panic!("a pool on a data file mapped a range to the device below")
            }
        }
    }
    out
}

#[test]
fn mappings_read_what_reads_read_and_hold_commits_back() {
    let f = files();
    let pool = open(&f, 16 << 20);
    pool.create("a", 1 << 20).unwrap();
    let a = pool.device("a").unwrap();
    a.write(BS + 4096, &Bufs::one(&[3u8; 8192])).unwrap();
    a.write(4 * BS, &Bufs::one(&vec![4u8; BS as usize]))
        .unwrap();
    for (off, len) in [(0, 3 * BS), (BS, 4096 * 3), (3 * BS + 512, 2 * BS)] {
        let m = a
            .map(thinblk::engine::MapOp::Read, off, len)
            .unwrap()
            .unwrap();
        let mut want = vec![0u8; len as usize];
        a.read(off, &mut BufsMut::one(&mut want)).unwrap();
        assert_eq!(read_mapping(&m), want, "mapped read at {off}+{len}");
    }
    use thinblk::engine::MapOp;
    // A first write into an unprovisioned block gets a new block at once (the rest of it
    // zeroed); a mapping dropped without being finished gives the block back.
    let free_before = pool.pool().meta().free_data_blocks();
    let first = a.map(MapOp::Write, 2 * BS, 4096).unwrap().unwrap();
    assert_eq!(first.extents.len(), 1);
    assert_eq!(pool.pool().meta().free_data_blocks(), free_before - 1);
    drop(first);
    assert_eq!(pool.pool().meta().free_data_blocks(), free_before);
    assert!(
        a.map(MapOp::Write, BS, 4096).unwrap().is_some(),
        "provisioned, not shared"
    );
    drop(a);
    pool.snapshot("a", "s").unwrap();
    let a = pool.device("a").unwrap();
    assert!(
        a.map(MapOp::Write, BS, 4096).unwrap().is_none(),
        "shared after a snapshot: a partial write copies, synchronously"
    );
    let whole = a.map(MapOp::Write, BS, BS).unwrap().unwrap();
    drop(whole);
    // A commit waits for the I/O that began before it, not for I/O that begins during it; it
    // holds first writes back.
    let held = a.map(MapOp::Read, 0, BS).unwrap().unwrap();
    a.write(8 * BS, &Bufs::one(&[1u8; 512])).unwrap();
    let flusher = {
        let a = a.clone();
        std::thread::spawn(move || a.flush())
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !flusher.is_finished(),
        "a commit ran with older I/O in flight"
    );
    let during = a.map(MapOp::Read, 0, BS).unwrap();
    assert!(during.is_some(), "a read waited for a commit");
    assert!(
        a.map(MapOp::Write, 9 * BS, 4096).unwrap().is_none(),
        "a block was provisioned during a commit"
    );
    drop(during);
    drop(held);
    flusher.join().unwrap().unwrap();
}
