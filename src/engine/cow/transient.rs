//! The transient store: data chunks on a device, exceptions only in memory. Nothing survives
//! a reopen; a throwaway overlay.

use std::sync::Arc;

use super::format::check_chunk_size;
use super::store::{ExceptionStore, Usage};
use super::CowError;
use crate::engine::BlockDevice;

pub struct TransientStore {
    dev: Arc<dyn BlockDevice>,
    chunk_size: u64,
    next_free: u64,
    total: u64,
    committed: Vec<(u64, u64)>,
    valid: bool,
}

impl TransientStore {
    /// A fresh, empty store on `dev` (its contents are ignored).
    pub fn new(dev: Arc<dyn BlockDevice>, chunk_size: u64) -> Result<Self, CowError> {
        let chunk_size = check_chunk_size(chunk_size)?;
        let total = dev.size() / chunk_size;
        if total == 0 {
            return Err(CowError::TooSmall {
                size: dev.size(),
                chunk: chunk_size,
            });
        }
        Ok(TransientStore {
            dev,
            chunk_size,
            next_free: 0,
            total,
            committed: Vec::new(),
            valid: true,
        })
    }
}

impl ExceptionStore for TransientStore {
    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    fn persistent(&self) -> bool {
        false
    }

    fn valid(&self) -> bool {
        self.valid
    }

    fn prepare(&mut self) -> Result<u64, CowError> {
        if self.next_free >= self.total {
            return Err(CowError::Full);
        }
        self.next_free += 1;
        Ok(self.next_free - 1)
    }

    fn commit(&mut self, exceptions: &[(u64, u64)]) -> Result<(), CowError> {
        // Nothing survives a restart, so there is nothing to make durable.
        self.committed.extend_from_slice(exceptions);
        Ok(())
    }

    fn invalidate(&mut self) -> Result<(), CowError> {
        self.valid = false;
        Ok(())
    }

    fn usage(&self) -> Usage {
        Usage {
            used: self.next_free,
            total: self.total,
        }
    }

    fn newest(&mut self, max: usize) -> Result<Vec<(u64, u64)>, CowError> {
        Ok(self.committed.iter().rev().take(max).copied().collect())
    }

    fn forget_newest(&mut self, n: usize) -> Result<(), CowError> {
        let keep = self.committed.len().saturating_sub(n);
        self.committed.truncate(keep);
        if self.committed.is_empty() {
            self.next_free = 0;
        }
        Ok(())
    }
}
