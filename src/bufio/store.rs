//! The seam to the metadata device, and its file and in-memory implementations.
//!
//! The cache never touches a device except through [`BlockStore`], so tests can put a memory
//! store or a power-cut simulator ([`super::CrashStore`]) underneath it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// A device of fixed-size blocks.
pub trait BlockStore: Send + Sync {
    /// Bytes per block (4096 for dm-thin metadata).
    fn block_size(&self) -> usize;
    /// Blocks on the device now; may grow after [`BlockStore::resize`].
    fn nr_blocks(&self) -> u64;
    /// Fills `buf` (exactly one block long) with the block's contents.
    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` (exactly one block long) to the block; durable only after a flush.
    fn write_block(&self, block: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Grows the device to `nr_blocks` blocks.
    fn resize(&self, nr_blocks: u64) -> io::Result<()>;
}

/// Counts of the operations a test store has served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounts {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
}

/// Rejects a request for a block past the end or a buffer of the wrong length, so a
/// miscomputed block number is an error rather than a write somewhere else.
pub(super) fn check_request(
    block: u64,
    len: usize,
    block_size: usize,
    nr_blocks: u64,
) -> io::Result<()> {
    if len != block_size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("buffer of {len} bytes for a block of {block_size}"),
        ));
    }
    if block >= nr_blocks {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("block {block} past the end of a {nr_blocks}-block device"),
        ));
    }
    Ok(())
}

pub(super) fn check_block_size(block_size: usize) -> io::Result<()> {
    if block_size == 0 || !block_size.is_multiple_of(512) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("block size {block_size} is not a positive multiple of 512"),
        ));
    }
    Ok(())
}

fn byte_len(nr_blocks: u64, block_size: usize) -> io::Result<u64> {
    nr_blocks
        .checked_mul(block_size as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "device size overflows"))
}

/// A metadata device in a regular file or a block device, read and written with
/// pread/pwrite through the page cache and made durable with fdatasync.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    block_size: usize,
    nr_blocks: AtomicU64,
    is_block_device: bool,
}

impl FileStore {
    /// Opens an existing file or block device for reading and writing. A trailing partial block
    /// is ignored.
    pub fn open(path: impl AsRef<Path>, block_size: usize) -> io::Result<Self> {
        Self::open_with(path, block_size, true)
    }

    /// Opens an existing file or block device for reading only (offline checks and dumps);
    /// writes, flushes and resizes then fail.
    pub fn open_read_only(path: impl AsRef<Path>, block_size: usize) -> io::Result<Self> {
        Self::open_with(path, block_size, false)
    }

    fn open_with(path: impl AsRef<Path>, block_size: usize, write: bool) -> io::Result<Self> {
        check_block_size(block_size)?;
        let mut file = OpenOptions::new().read(true).write(write).open(path)?;
        let is_block_device = file.metadata()?.file_type().is_block_device();
        // Seeking to the end gives the size of block devices too, where metadata().len() is 0.
        let bytes = file.seek(SeekFrom::End(0))?;
        Ok(FileStore {
            file,
            block_size,
            nr_blocks: AtomicU64::new(bytes / block_size as u64),
            is_block_device,
        })
    }

    /// Creates a new sparse file of `nr_blocks` blocks; fails if the path exists, so a pool
    /// is never overwritten by accident.
    pub fn create(path: impl AsRef<Path>, block_size: usize, nr_blocks: u64) -> io::Result<Self> {
        check_block_size(block_size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(byte_len(nr_blocks, block_size)?)?;
        Ok(FileStore {
            file,
            block_size,
            nr_blocks: AtomicU64::new(nr_blocks),
            is_block_device: false,
        })
    }

    /// Takes an advisory exclusive lock (flock) on the device without waiting, so a second
    /// daemon, or an offline tool that asks for [`FileStore::lock_shared`], sees the pool is in
    /// use. Released when the store is dropped.
    pub fn lock_exclusive(&self) -> io::Result<()> {
        self.file
            .try_lock()
            .map_err(|err| lock_error(err, "exclusively"))
    }

    /// Takes an advisory shared lock without waiting: several readers, no daemon.
    pub fn lock_shared(&self) -> io::Result<()> {
        self.file
            .try_lock_shared()
            .map_err(|err| lock_error(err, "for reading"))
    }

    fn offset(&self, block: u64) -> io::Result<u64> {
        byte_len(block, self.block_size)
    }
}

impl BlockStore for FileStore {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn nr_blocks(&self) -> u64 {
        self.nr_blocks.load(Ordering::Acquire)
    }

    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        check_request(block, buf.len(), self.block_size, self.nr_blocks())?;
        self.file.read_exact_at(buf, self.offset(block)?)
    }

    fn write_block(&self, block: u64, buf: &[u8]) -> io::Result<()> {
        check_request(block, buf.len(), self.block_size, self.nr_blocks())?;
        self.file.write_all_at(buf, self.offset(block)?)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn resize(&self, nr_blocks: u64) -> io::Result<()> {
        let current = self.nr_blocks();
        if nr_blocks < current {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot shrink metadata from {current} to {nr_blocks} blocks"),
            ));
        }
        let bytes = byte_len(nr_blocks, self.block_size)?;
        if self.is_block_device {
            // A block device is grown outside (lvextend); accept the new size once it is there.
            let mut file = &self.file;
            let available = file.seek(SeekFrom::End(0))?;
            if bytes > available {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("device holds {available} bytes, {bytes} requested"),
                ));
            }
        } else {
            self.file.set_len(bytes)?;
            self.file.sync_all()?;
        }
        self.nr_blocks.store(nr_blocks, Ordering::Release);
        Ok(())
    }
}

fn lock_error(err: std::fs::TryLockError, how: &str) -> io::Error {
    match err {
        std::fs::TryLockError::WouldBlock => io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("cannot lock the metadata device {how}: another process holds it"),
        ),
        std::fs::TryLockError::Error(err) => err,
    }
}

/// An in-memory, sparse store: unwritten blocks read as zeros.
#[derive(Debug)]
pub struct MemStore {
    block_size: usize,
    inner: Mutex<MemInner>,
}

#[derive(Debug)]
struct MemInner {
    nr_blocks: u64,
    blocks: HashMap<u64, Box<[u8]>>,
    counts: IoCounts,
}

impl MemStore {
    pub fn new(block_size: usize, nr_blocks: u64) -> Self {
        MemStore {
            block_size,
            inner: Mutex::new(MemInner {
                nr_blocks,
                blocks: HashMap::new(),
                counts: IoCounts::default(),
            }),
        }
    }

    /// How many reads, writes and flushes the store has served.
    pub fn io_counts(&self) -> IoCounts {
        self.inner.lock().counts
    }

    /// A block's contents without counting a read; zeros if never written or out of range.
    pub fn peek(&self, block: u64) -> Vec<u8> {
        let inner = self.inner.lock();
        match inner.blocks.get(&block) {
            Some(data) => data.to_vec(),
            None => vec![0; self.block_size],
        }
    }
}

impl BlockStore for MemStore {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn nr_blocks(&self) -> u64 {
        self.inner.lock().nr_blocks
    }

    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut inner = self.inner.lock();
        check_request(block, buf.len(), self.block_size, inner.nr_blocks)?;
        inner.counts.reads += 1;
        match inner.blocks.get(&block) {
            Some(data) => buf.copy_from_slice(data),
            None => buf.fill(0),
        }
        Ok(())
    }

    fn write_block(&self, block: u64, buf: &[u8]) -> io::Result<()> {
        let mut inner = self.inner.lock();
        check_request(block, buf.len(), self.block_size, inner.nr_blocks)?;
        inner.counts.writes += 1;
        inner.blocks.insert(block, buf.into());
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.lock().counts.flushes += 1;
        Ok(())
    }

    fn resize(&self, nr_blocks: u64) -> io::Result<()> {
        let mut inner = self.inner.lock();
        if nr_blocks < inner.nr_blocks {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot shrink a memory store",
            ));
        }
        inner.nr_blocks = nr_blocks;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_store_reads_back_what_was_written_and_zeros_elsewhere() {
        let store = MemStore::new(512, 4);
        store.write_block(2, &[7u8; 512]).unwrap();
        let mut buf = [1u8; 512];
        store.read_block(2, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 512]);
        store.read_block(3, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 512]);
        assert_eq!(
            store.io_counts(),
            IoCounts {
                reads: 2,
                writes: 1,
                flushes: 0
            }
        );
    }

    #[test]
    fn mem_store_rejects_blocks_past_the_end_and_short_buffers() {
        let store = MemStore::new(512, 4);
        let mut buf = [0u8; 512];
        assert!(store.read_block(4, &mut buf).is_err());
        assert!(store.write_block(0, &buf[..100]).is_err());
        store.resize(5).unwrap();
        assert!(store.read_block(4, &mut buf).is_ok());
        assert!(store.resize(3).is_err());
    }

    #[test]
    fn file_store_round_trips_blocks_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let store = FileStore::create(&path, 4096, 8).unwrap();
        let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        store.write_block(5, &data).unwrap();
        store.flush().unwrap();
        drop(store);

        let store = FileStore::open(&path, 4096).unwrap();
        assert_eq!(store.nr_blocks(), 8);
        let mut buf = vec![0u8; 4096];
        store.read_block(5, &mut buf).unwrap();
        assert_eq!(buf, data);
        store.read_block(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(store.read_block(8, &mut buf).is_err());
    }

    #[test]
    fn file_store_create_refuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        FileStore::create(&path, 4096, 1).unwrap();
        assert!(FileStore::create(&path, 4096, 1).is_err());
    }

    #[test]
    fn file_store_grows_on_resize_and_refuses_to_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let store = FileStore::create(&path, 4096, 2).unwrap();
        store.resize(10).unwrap();
        assert_eq!(store.nr_blocks(), 10);
        store.write_block(9, &[1u8; 4096]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10 * 4096);
        assert!(store.resize(3).is_err());
        assert_eq!(FileStore::open(&path, 4096).unwrap().nr_blocks(), 10);
    }

    #[test]
    fn a_locked_file_store_cannot_be_locked_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let daemon = FileStore::create(&path, 4096, 2).unwrap();
        daemon.lock_exclusive().unwrap();
        let tool = FileStore::open_read_only(&path, 4096).unwrap();
        let err = tool.lock_shared().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(daemon);
        tool.lock_shared().unwrap();
        let other = FileStore::open_read_only(&path, 4096).unwrap();
        other.lock_shared().unwrap();
        assert!(other.write_block(0, &[0u8; 4096]).is_err());
    }

    #[test]
    fn file_store_rejects_block_sizes_that_are_not_sector_multiples() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FileStore::create(dir.path().join("a"), 0, 1).is_err());
        assert!(FileStore::create(dir.path().join("b"), 1000, 1).is_err());
    }
}
