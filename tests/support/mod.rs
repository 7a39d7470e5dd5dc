//! Shared pieces of the crash, fault and security tests: self-describing block stamps, a
//! seeded generator, an in-memory data device that loses unflushed writes at a power cut, a
//! fault-injecting wrapper, a power switch shared by the metadata and data devices, and the
//! offline checkers run over a metadata image.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use thinblk::engine::{Bufs, BufsMut};

#[path = "../external/mod.rs"]
pub mod external;

use parking_lot::Mutex;
use thinblk::bufio::{BlockStore, CrashStore};
use thinblk::engine::{check_range, BlockDevice, BlockError, DataDevice};

/// Size of one stamped block: the unit the tests write and verify.
pub const STAMP: usize = 4096;
const MAGIC: &[u8; 8] = b"THBLKSTP";

/// What a stamped block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Content {
    /// Never written (or discarded).
    Zero,
    /// Generation `gen` of block `block` written by the writer tagged `tag`.
    Stamp { tag: u64, block: u64, gen: u64 },
    /// Anything else: torn, foreign or random bytes.
    Garbage,
}

/// The bytes of a stamp: a header, then filler derived from it, so any torn or misplaced
/// byte is noticed.
pub fn stamp(tag: u64, block: u64, gen: u64) -> Vec<u8> {
    let mut out = vec![0u8; STAMP];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&tag.to_le_bytes());
    out[16..24].copy_from_slice(&block.to_le_bytes());
    out[24..32].copy_from_slice(&gen.to_le_bytes());
    let mut rng = Rng::new(tag ^ block.rotate_left(20) ^ gen.rotate_left(40));
    for chunk in out[32..].chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    out
}

pub fn content_bytes(c: Content) -> Vec<u8> {
    match c {
        Content::Zero => vec![0; STAMP],
        Content::Stamp { tag, block, gen } => stamp(tag, block, gen),
        Content::Garbage => vec![0xEE; STAMP],
    }
}

/// Recognises a stamped block.
pub fn parse(buf: &[u8]) -> Content {
    if buf.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    if buf.len() != STAMP || &buf[..8] != MAGIC {
        return Content::Garbage;
    }
    let word = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
    let (tag, block, gen) = (word(8), word(16), word(24));
    if stamp(tag, block, gen) == buf {
        Content::Stamp { tag, block, gen }
    } else {
        Content::Garbage
    }
}

/// SplitMix64: deterministic, no dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The seed of a test: `THINBLK_SEED` if set, else `default`. Printed, so that a failure
/// (whose output cargo shows) says how to replay it.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("THINBLK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("seed {seed} (replay with THINBLK_SEED={seed})");
    seed
}

/// A number from the environment (`THINBLK_<NAME>`), for longer runs by hand.
pub fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(format!("THINBLK_{name}"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Power for a machine's devices: each write or flush of a device on it spends one unit of
/// budget, and when the budget runs out the power is off: every later I/O fails until
/// [`Power::restore`]. Cuts land anywhere in a commit, not only between operations.
#[derive(Debug, Default)]
pub struct Power {
    off: AtomicBool,
    budget: AtomicI64,
}

impl Power {
    pub fn new() -> Arc<Power> {
        let p = Power::default();
        p.budget.store(i64::MAX, Ordering::Release);
        Arc::new(p)
    }

    /// The power goes off after `n` more writes or flushes.
    pub fn fail_after(&self, n: i64) {
        self.budget.store(n, Ordering::Release);
    }

    pub fn cut(&self) {
        self.off.store(true, Ordering::Release);
    }

    pub fn restore(&self) {
        self.budget.store(i64::MAX, Ordering::Release);
        self.off.store(false, Ordering::Release);
    }

    pub fn is_off(&self) -> bool {
        self.off.load(Ordering::Acquire)
    }

    /// Spends one unit; fails when the power is (or just went) off.
    fn spend(&self) -> io::Result<()> {
        if self.budget.fetch_sub(1, Ordering::AcqRel) <= 0 {
            self.off.store(true, Ordering::Release);
        }
        self.alive()
    }

    fn alive(&self) -> io::Result<()> {
        if self.is_off() {
            Err(io::Error::other("power is off"))
        } else {
            Ok(())
        }
    }
}

/// A metadata store on `power`.
pub struct PoweredStore {
    pub inner: Arc<CrashStore>,
    pub power: Arc<Power>,
}

impl BlockStore for PoweredStore {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }

    fn nr_blocks(&self) -> u64 {
        self.inner.nr_blocks()
    }

    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        self.power.alive()?;
        self.inner.read_block(block, buf)
    }

    fn write_block(&self, block: u64, buf: &[u8]) -> io::Result<()> {
        self.power.spend()?;
        self.inner.write_block(block, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.power.spend()?;
        self.inner.flush()
    }

    fn resize(&self, nr_blocks: u64) -> io::Result<()> {
        self.power.alive()?;
        self.inner.resize(nr_blocks)
    }
}

struct Image {
    /// What survives a power cut.
    durable: Vec<u8>,
    /// What reads see.
    latest: Vec<u8>,
    /// Unflushed writes in issue order: (offset, length); the bytes are in `latest`.
    pending: Vec<(u64, Vec<u8>)>,
}

/// A data device in memory that keeps only what was flushed when the power is cut. Discard
/// and write-zeroes are writes of zeros (a punched hole reads as zeros).
pub struct PowerCutDevice {
    size: u64,
    image: Mutex<Image>,
    power: Option<Arc<Power>>,
    pub writes: AtomicU64,
}

fn eio(what: &str) -> BlockError {
    BlockError::Io {
        offset: 0,
        source: io::Error::other(what.to_string()),
    }
}

impl PowerCutDevice {
    pub fn new(size: u64, power: Option<Arc<Power>>) -> Arc<PowerCutDevice> {
        Arc::new(PowerCutDevice {
            size,
            image: Mutex::new(Image {
                durable: vec![0; size as usize],
                latest: vec![0; size as usize],
                pending: Vec::new(),
            }),
            power,
            writes: AtomicU64::new(0),
        })
    }

    fn spend(&self) -> Result<(), BlockError> {
        match &self.power {
            Some(p) => p.spend().map_err(|e| BlockError::Io {
                offset: 0,
                source: e,
            }),
            None => Ok(()),
        }
    }

    fn put(&self, offset: u64, bytes: Vec<u8>) -> Result<(), BlockError> {
        check_range(offset, bytes.len() as u64, self.size)?;
        self.spend()?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        let mut img = self.image.lock();
        let at = offset as usize;
        img.latest[at..at + bytes.len()].copy_from_slice(&bytes);
        img.pending.push((offset, bytes));
        Ok(())
    }

    /// Power cut: unflushed writes are lost. With `torn`, each one independently is dropped,
    /// kept, or kept in part (a prefix of whole 4 KiB sectors), in issue order, as a disk
    /// with a volatile cache may leave them. Returns how many were kept whole or in part.
    pub fn cut(&self, torn: Option<u64>) -> usize {
        let mut img = self.image.lock();
        let pending = std::mem::take(&mut img.pending);
        let mut kept = 0;
        if let Some(seed) = torn {
            let mut rng = Rng::new(seed);
            for (offset, bytes) in pending {
                let sectors = bytes.len().div_ceil(STAMP) as u64;
                let keep = match rng.below(3) {
                    0 => 0,
                    1 => bytes.len(),
                    _ => ((rng.below(sectors) as usize) * STAMP).min(bytes.len()),
                };
                if keep > 0 {
                    kept += 1;
                    let at = offset as usize;
                    img.durable[at..at + keep].copy_from_slice(&bytes[..keep]);
                }
            }
        }
        let durable = img.durable.clone();
        img.latest = durable;
        kept
    }

    /// Reads the durable image directly (what a power cut now would keep at the least).
    pub fn durable_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let img = self.image.lock();
        img.durable[offset as usize..offset as usize + len].to_vec()
    }
}

impl BlockDevice for PowerCutDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        let len = bufs.len();
        check_range(offset, len, self.size)?;
        if let Some(p) = &self.power {
            p.alive()
                .map_err(|e| BlockError::Io { offset, source: e })?;
        }
        let img = self.image.lock();
        let at = offset as usize;
        bufs.copy_from(&img.latest[at..at + len as usize]);
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        let mut bytes = vec![0u8; bufs.len() as usize];
        bufs.copy_to(&mut bytes);
        self.put(offset, bytes)
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.spend()?;
        let mut img = self.image.lock();
        let pending = std::mem::take(&mut img.pending);
        for (offset, bytes) in pending {
            let at = offset as usize;
            img.durable[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.put(offset, vec![0; len as usize])
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        self.put(offset, vec![0; len as usize])
    }
}

impl DataDevice for PowerCutDevice {
    fn grow_to(&self, _size: u64) -> Result<u64, BlockError> {
        Ok(self.size)
    }
}

/// A fault a [`FaultyDevice`] injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The request fails with EIO and transfers nothing.
    Eio,
    /// The host transfers the first half, then reports what `RawDevice` reports when the
    /// next transfer moves nothing (end of file, full device): an error, never success.
    Short,
}

#[derive(Default)]
struct Faults {
    read: Option<Fault>,
    write: Option<Fault>,
    flush: bool,
    /// Only requests touching `[start, end)` fail; everything when `None`.
    range: Option<(u64, u64)>,
}

/// Wraps a data device and fails what it is told to fail.
pub struct FaultyDevice {
    inner: Arc<dyn DataDevice>,
    faults: Mutex<Faults>,
    /// Faults injected so far.
    pub injected: AtomicU64,
}

impl FaultyDevice {
    pub fn new(inner: Arc<dyn DataDevice>) -> Arc<FaultyDevice> {
        Arc::new(FaultyDevice {
            inner,
            faults: Mutex::new(Faults::default()),
            injected: AtomicU64::new(0),
        })
    }

    pub fn fail_reads(&self, f: Fault) {
        self.faults.lock().read = Some(f);
    }

    pub fn fail_writes(&self, f: Fault) {
        self.faults.lock().write = Some(f);
    }

    pub fn fail_flushes(&self) {
        self.faults.lock().flush = true;
    }

    /// Limits faults to requests that touch `[start, end)`.
    pub fn only_in(&self, start: u64, end: u64) {
        self.faults.lock().range = Some((start, end));
    }

    pub fn clear(&self) {
        *self.faults.lock() = Faults::default();
    }

    fn hits(&self, offset: u64, len: u64, which: Option<Fault>) -> Option<Fault> {
        let f = self.faults.lock();
        let fault = which?;
        let inside = f.range.is_none_or(|(s, e)| offset < e && offset + len > s);
        inside.then(|| {
            self.injected.fetch_add(1, Ordering::Relaxed);
            fault
        })
    }

    fn read_fault(&self) -> Option<Fault> {
        self.faults.lock().read
    }

    fn write_fault(&self) -> Option<Fault> {
        self.faults.lock().write
    }
}

fn short_error(offset: u64, kind: io::ErrorKind) -> BlockError {
    BlockError::Io {
        offset,
        source: kind.into(),
    }
}

impl BlockDevice for FaultyDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        let len = bufs.len();
        match self.hits(offset, len, self.read_fault()) {
            None => self.inner.read(offset, bufs),
            Some(Fault::Eio) => Err(eio("injected read EIO")),
            Some(Fault::Short) => {
                // The first half arrives, the rest never does.
                let mut half = vec![0u8; (len / 2) as usize];
                self.inner.read(offset, &mut BufsMut::one(&mut half))?;
                bufs.copy_from(&half);
                Err(short_error(offset + len / 2, io::ErrorKind::UnexpectedEof))
            }
        }
    }

    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        let len = bufs.len();
        match self.hits(offset, len, self.write_fault()) {
            None => self.inner.write(offset, bufs),
            Some(Fault::Eio) => Err(eio("injected write EIO")),
            Some(Fault::Short) => {
                let mut bytes = vec![0u8; len as usize];
                bufs.copy_to(&mut bytes);
                let half = &bytes[..bytes.len() / 2 / 512 * 512];
                if !half.is_empty() {
                    self.inner.write(offset, &Bufs::one(half))?;
                }
                Err(short_error(
                    offset + half.len() as u64,
                    io::ErrorKind::WriteZero,
                ))
            }
        }
    }

    fn flush(&self) -> Result<(), BlockError> {
        if self.faults.lock().flush {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(eio("injected flush EIO"));
        }
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match self.hits(offset, len, self.write_fault()) {
            None => self.inner.discard(offset, len),
            Some(_) => Err(eio("injected discard EIO")),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        match self.hits(offset, len, self.write_fault()) {
            None => self.inner.write_zeroes(offset, len, may_unmap),
            Some(_) => Err(eio("injected write-zeroes EIO")),
        }
    }
}

impl DataDevice for FaultyDevice {
    fn grow_to(&self, size: u64) -> Result<u64, BlockError> {
        self.inner.grow_to(size)
    }
}

/// A metadata store whose `n`-th write from now fails once with EIO, as a transient error
/// does (the writes after it succeed).
pub struct FlakyStore {
    pub inner: Arc<CrashStore>,
    fail_at: AtomicI64,
}

impl FlakyStore {
    pub fn new(inner: Arc<CrashStore>) -> Arc<FlakyStore> {
        Arc::new(FlakyStore {
            inner,
            fail_at: AtomicI64::new(-1),
        })
    }

    /// The write after the next `n` fails once.
    pub fn fail_write_once_after(&self, n: i64) {
        self.fail_at.store(n, Ordering::Release);
    }
}

impl BlockStore for FlakyStore {
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }

    fn nr_blocks(&self) -> u64 {
        self.inner.nr_blocks()
    }

    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_block(block, buf)
    }

    fn write_block(&self, block: u64, buf: &[u8]) -> io::Result<()> {
        if self.fail_at.fetch_sub(1, Ordering::AcqRel) == 0 {
            return Err(io::Error::other(format!(
                "transient EIO writing block {block}"
            )));
        }
        self.inner.write_block(block, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn resize(&self, nr_blocks: u64) -> io::Result<()> {
        self.inner.resize(nr_blocks)
    }
}

/// Writes what a metadata store holds now (as reads see it) to `path`.
pub fn save_image(store: &CrashStore, path: &Path) {
    let mut bytes = Vec::with_capacity(store.nr_blocks() as usize * store.block_size());
    for b in 0..store.nr_blocks() {
        bytes.extend_from_slice(&store.peek(b));
    }
    std::fs::write(path, bytes).unwrap();
}

/// Output of a checker run.
pub struct CheckRun {
    pub ok: bool,
    pub output: String,
}

/// `thinblk check ARGS... META`.
pub fn thinblk_check(meta: &Path, args: &[&str]) -> CheckRun {
    run(Command::new(env!("CARGO_BIN_EXE_thinblk"))
        .arg("check")
        .args(args)
        .arg(meta))
}

/// Debian's `thin_check`; a missing one fails the test.
pub fn thin_check(meta: &Path) -> CheckRun {
    let exe = external::tool("thin_check");
    run(Command::new(exe).arg(meta))
}

fn run(cmd: &mut Command) -> CheckRun {
    let out = cmd.output().expect("run checker");
    CheckRun {
        ok: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Both checkers pass on the metadata at `meta`.
pub fn assert_checks_pass(meta: &Path, context: &str) {
    let t = thinblk_check(meta, &[]);
    assert!(t.ok, "{context}: thinblk check failed:\n{}", t.output);
    let c = thin_check(meta);
    assert!(c.ok, "{context}: thin_check failed:\n{}", c.output);
}
