//! Shared pieces of the COW tests: a power-cut device, a byte model, a small random source.
#![allow(dead_code, clippy::unwrap_used)]

use thinblk::engine::{Bufs, BufsMut};

use parking_lot::Mutex;
use thinblk::engine::{check_range, BlockDevice, BlockError};

/// A device in memory that keeps only flushed data across a power cut. Writes since the last
/// flush survive a cut whole, not at all, or (torn) sector by sector at random. With
/// [`PowerCutDevice::fail_after`] the power goes off after that many more writes and flushes:
/// every later request fails until [`PowerCutDevice::cut_power`].
pub struct PowerCutDevice {
    st: Mutex<St>,
}

struct St {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<(usize, Vec<u8>)>,
    ops_left: Option<u64>,
}

fn dead() -> BlockError {
    BlockError::Unsupported("power is off")
}

impl PowerCutDevice {
    pub fn new(bytes: Vec<u8>) -> Self {
        PowerCutDevice {
            st: Mutex::new(St {
                current: bytes.clone(),
                durable: bytes,
                pending: Vec::new(),
                ops_left: None,
            }),
        }
    }

    pub fn fail_after(&self, ops: u64) {
        self.st.lock().ops_left = Some(ops);
    }

    pub fn is_dead(&self) -> bool {
        self.st.lock().ops_left == Some(0)
    }

    /// Loses unflushed writes; with `torn`, each of their sectors survives with chance 1/2.
    pub fn cut_power(&self, torn: Option<&mut Rng>) {
        let mut st = self.st.lock();
        let pending = std::mem::take(&mut st.pending);
        if let Some(rng) = torn {
            for (at, bytes) in pending {
                for (i, sector) in bytes.chunks(512).enumerate() {
                    if rng.below(2) == 0 {
                        let o = at + i * 512;
                        st.durable[o..o + sector.len()].copy_from_slice(sector);
                    }
                }
            }
        }
        st.current = st.durable.clone();
        st.ops_left = None;
    }

    pub fn durable(&self) -> Vec<u8> {
        self.st.lock().durable.clone()
    }

    pub fn current(&self) -> Vec<u8> {
        self.st.lock().current.clone()
    }

    fn tick(st: &mut St) -> Result<(), BlockError> {
        match &mut st.ops_left {
            Some(0) => Err(dead()),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn put(&self, offset: u64, bytes: Vec<u8>) -> Result<(), BlockError> {
        let mut st = self.st.lock();
        check_range(offset, bytes.len() as u64, st.current.len() as u64)?;
        Self::tick(&mut st)?;
        let at = offset as usize;
        st.current[at..at + bytes.len()].copy_from_slice(&bytes);
        st.pending.push((at, bytes));
        Ok(())
    }
}

impl BlockDevice for PowerCutDevice {
    fn size(&self) -> u64 {
        self.st.lock().current.len() as u64
    }

    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        let st = self.st.lock();
        if st.ops_left == Some(0) {
            return Err(dead());
        }
        let len = bufs.len();
        check_range(offset, len, st.current.len() as u64)?;
        let at = offset as usize;
        bufs.copy_from(&st.current[at..at + len as usize]);
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        let mut bytes = vec![0u8; bufs.len() as usize];
        bufs.copy_to(&mut bytes);
        self.put(offset, bytes)
    }

    fn flush(&self) -> Result<(), BlockError> {
        let mut st = self.st.lock();
        Self::tick(&mut st)?;
        for (at, bytes) in std::mem::take(&mut st.pending) {
            st.durable[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        self.put(offset, vec![0; len as usize])
    }
}

/// xorshift: reproducible without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let seed = self.next();
        (0..n)
            .map(|i| (seed.rotate_left((i % 64) as u32) as u8) ^ (i / 64) as u8)
            .collect()
    }
}

pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut out = vec![0u8; dev.size() as usize];
    dev.read(0, &mut BufsMut::one(&mut out)).unwrap();
    out
}

/// A random sector-aligned request inside a disk of `size` bytes, at most `max` long.
pub fn random_range(rng: &mut Rng, size: u64, max: u64) -> (u64, u64) {
    let sectors = size / 512;
    let start = rng.below(sectors);
    let len = 1 + rng.below((max / 512).min(sectors - start));
    (start * 512, len * 512)
}
