//! What a COW device reports: the kernel's snapshot status line, as a struct.

use std::sync::atomic::Ordering;

use super::device::{CowDevice, Mode};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeState {
    None,
    Running,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CowStatus {
    pub valid: bool,
    pub persistent: bool,
    /// Bytes.
    pub chunk_size: u64,
    /// Store chunks in use (header and metadata areas included) and in all.
    pub used_chunks: u64,
    pub total_chunks: u64,
    /// Chunks with an exception, and the runs they form in memory.
    pub exceptions: u64,
    pub runs: usize,
    pub merge: MergeState,
}

impl CowStatus {
    /// used / total, 0.0 to 1.0.
    pub fn fraction_full(&self) -> f64 {
        if self.total_chunks == 0 {
            return 1.0;
        }
        self.used_chunks as f64 / self.total_chunks as f64
    }
}

impl CowDevice {
    pub fn status(&self) -> CowStatus {
        let (exceptions, runs) = {
            let t = self.tables.read();
            (t.table.len(), t.table.runs())
        };
        let (usage, persistent, store_valid) = {
            let s = self.store.lock();
            (s.usage(), s.persistent(), s.valid())
        };
        let mode = self.mode.read().clone();
        let merge = match mode {
            Mode::Merged(_) => MergeState::Done,
            _ if self.merge_running.load(Ordering::Acquire) => MergeState::Running,
            _ => MergeState::None,
        };
        CowStatus {
            valid: store_valid && !matches!(mode, Mode::Invalid),
            persistent,
            chunk_size: self.chunk,
            used_chunks: usage.used,
            total_chunks: usage.total,
            exceptions,
            runs,
            merge,
        }
    }
}
