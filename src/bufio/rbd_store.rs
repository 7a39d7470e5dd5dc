//! A metadata device in an RBD image, read and written through librbd.
//!
//! Durability is the file store's, with librbd in the place of the page cache: a write that
//! returned may still sit in librbd's client cache (or be on its way to the OSDs), and
//! `rbd_flush` returns once every write that completed before it is stored by the cluster.
//! The commit protocol asks for nothing more: it writes the new blocks, flushes, writes the
//! superblock, flushes.
//!
//! A client the cluster has blocklisted (another daemon took the pool over) gets ESHUTDOWN
//! for everything; that is said once, loudly, and every such call fails, so the pool above
//! turns read-only and commits nothing more.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use log::error;

use super::store::{check_block_size, check_request, BlockStore};
use crate::engine::rbd::lock::is_fenced;
use crate::engine::rbd::RbdImage;

/// The metadata of a pool in an RBD image (whose exclusive lock the pool holds).
pub struct RbdStore {
    image: Arc<RbdImage>,
    /// `POOL/IMAGE`, for messages.
    name: String,
    block_size: usize,
    nr_blocks: AtomicU64,
    fenced: AtomicBool,
}

impl std::fmt::Debug for RbdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdStore")
            .field("name", &self.name)
            .field("nr_blocks", &self.nr_blocks())
            .finish()
    }
}

impl RbdStore {
    /// The store in `image`, of as many whole blocks as the image holds.
    pub fn new(image: Arc<RbdImage>, name: &str, block_size: usize) -> io::Result<Self> {
        check_block_size(block_size)?;
        let bytes = image.size()?;
        Ok(RbdStore {
            image,
            name: name.to_string(),
            block_size,
            nr_blocks: AtomicU64::new(bytes / block_size as u64),
            fenced: AtomicBool::new(false),
        })
    }

    fn offset(&self, block: u64) -> io::Result<u64> {
        block
            .checked_mul(self.block_size as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows"))
    }

    /// Passes `result` on, saying once that this client has been fenced when it has.
    fn noticed<T>(&self, result: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &result {
            if is_fenced(e) && !self.fenced.swap(true, Ordering::AcqRel) {
                error!(
                    "rbd:{}: the cluster refuses this client (ESHUTDOWN): another daemon has \
                     taken the pool over; nothing more is written",
                    self.name
                );
            }
        }
        result
    }
}

impl BlockStore for RbdStore {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn nr_blocks(&self) -> u64 {
        self.nr_blocks.load(Ordering::Acquire)
    }

    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        check_request(block, buf.len(), self.block_size, self.nr_blocks())?;
        let offset = self.offset(block)?;
        self.noticed(self.image.read(offset, buf))
    }

    fn write_block(&self, block: u64, buf: &[u8]) -> io::Result<()> {
        check_request(block, buf.len(), self.block_size, self.nr_blocks())?;
        let offset = self.offset(block)?;
        self.noticed(self.image.write(offset, buf))
    }

    fn flush(&self) -> io::Result<()> {
        self.noticed(self.image.flush())
    }

    fn resize(&self, nr_blocks: u64) -> io::Result<()> {
        let current = self.nr_blocks();
        if nr_blocks < current {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot shrink metadata from {current} to {nr_blocks} blocks"),
            ));
        }
        let bytes = self.offset(nr_blocks)?;
        self.noticed(self.image.resize(bytes))?;
        self.nr_blocks.store(nr_blocks, Ordering::Release);
        Ok(())
    }
}
