//! A COW device: a writable disk over a read-only origin and an exception store.
//!
//! Reads come from the store where a chunk has an exception and from the origin otherwise.
//! The first write to a chunk copies the origin chunk (zeros past the origin's end) into a
//! new store chunk, overlays the write and records the exception; exceptions are made durable
//! on FLUSH (and every [`COMMIT_EVERY`] copies), after the data they point to. When the store
//! fills, the snapshot is invalidated: every later request fails, the origin is untouched.

use crate::engine::{Bufs, BufsMut};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use log::{error, warn};
use parking_lot::{Mutex, RwLock};

use super::runs::ExceptionTable;
use super::store::ExceptionStore;
use super::CowError;
use crate::engine::{check_range, BlockDevice, BlockError};

/// Copies recorded in memory before they are committed without waiting for a FLUSH.
pub const COMMIT_EVERY: usize = 256;

/// What a COW device tells its listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CowEvent {
    /// The store filled up (or failed) and the snapshot is invalid from now on.
    Invalidated { reason: String },
    /// A merge folded every exception into the origin.
    MergeCompleted { chunks: u64 },
}

pub type CowEventSink = Arc<dyn Fn(&CowEvent) + Send + Sync>;

/// Where a device is in its life.
#[derive(Clone)]
pub(super) enum Mode {
    Normal,
    /// Full store or failed store I/O: every request fails.
    Invalid,
    /// Exceptions are being folded into this writable origin; chunks without an exception
    /// are read from and written to it directly.
    Merging(Arc<dyn BlockDevice>),
    /// Every exception was folded in: the device is the origin.
    Merged(Arc<dyn BlockDevice>),
}

#[derive(Default)]
pub(super) struct Tables {
    pub table: ExceptionTable,
    /// Copied chunks whose exceptions are not committed yet, in prepare order.
    pub pending: Vec<(u64, u64)>,
}

pub struct CowDevice {
    pub(super) origin: Arc<dyn BlockDevice>,
    pub(super) size: u64,
    pub(super) chunk: u64,
    pub(super) data: Arc<dyn BlockDevice>,
    pub(super) tables: RwLock<Tables>,
    pub(super) store: Mutex<Box<dyn ExceptionStore>>,
    /// Serializes first writes (copy-ups), so two writers cannot both copy one chunk.
    copy_lock: Mutex<()>,
    /// Held shared by every request, exclusively by a merge step.
    pub(super) io_gate: RwLock<()>,
    pub(super) mode: RwLock<Mode>,
    events: Mutex<Vec<CowEventSink>>,
    pub(super) merge_running: AtomicBool,
}

/// The part of one chunk a byte range covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    chunk: u64,
    within: u64,
    len: u64,
}

fn pieces(offset: u64, len: u64, chunk: u64) -> impl Iterator<Item = Piece> {
    let mut pos = offset;
    let end = offset + len;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let within = pos % chunk;
        let n = (chunk - within).min(end - pos);
        let p = Piece {
            chunk: pos / chunk,
            within,
            len: n,
        };
        pos += n;
        Some(p)
    })
}

impl CowDevice {
    /// A device over `origin` (only ever read) with the exceptions `table` already in `store`.
    /// Its size is the origin's.
    pub fn new(
        origin: Arc<dyn BlockDevice>,
        store: Box<dyn ExceptionStore>,
        table: ExceptionTable,
    ) -> CowDevice {
        let mode = if store.valid() {
            Mode::Normal
        } else {
            Mode::Invalid
        };
        CowDevice {
            size: origin.size() & !511,
            chunk: store.chunk_size(),
            data: store.device().clone(),
            origin,
            tables: RwLock::new(Tables {
                table,
                pending: Vec::new(),
            }),
            store: Mutex::new(store),
            copy_lock: Mutex::new(()),
            io_gate: RwLock::new(()),
            mode: RwLock::new(mode),
            events: Mutex::new(Vec::new()),
            merge_running: AtomicBool::new(false),
        }
    }

    pub(super) fn copy_lock(&self) -> &Mutex<()> {
        &self.copy_lock
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    pub fn subscribe(&self, sink: CowEventSink) {
        self.events.lock().push(sink);
    }

    pub(super) fn emit(&self, event: CowEvent) {
        let sinks = self.events.lock().clone();
        for s in sinks {
            s(&event);
        }
    }

    /// The device reads and writes of unexcepted chunks go to, when a merge made the origin
    /// writable; `Err` when the snapshot is invalid.
    fn target(&self) -> Result<Option<Arc<dyn BlockDevice>>, BlockError> {
        match &*self.mode.read() {
            Mode::Normal => Ok(None),
            Mode::Invalid => Err(CowError::Invalid.into()),
            Mode::Merging(t) | Mode::Merged(t) => Ok(Some(t.clone())),
        }
    }

    fn lookup(&self, chunk: u64) -> Option<u64> {
        self.tables.read().table.lookup(chunk)
    }

    /// Marks the snapshot invalid in memory and, if it can, on disk; tells listeners.
    fn invalidate(&self, store: &mut dyn ExceptionStore, reason: &str) {
        *self.mode.write() = Mode::Invalid;
        if let Err(e) = store.invalidate() {
            warn!("cannot mark the snapshot store invalid: {e}");
        }
        error!("snapshot invalidated: {reason}");
        self.emit(CowEvent::Invalidated {
            reason: reason.into(),
        });
    }

    /// Commits the copies made so far (after flushing their data).
    pub(super) fn commit(&self) -> Result<(), CowError> {
        let mut store = self.store.lock();
        if !store.valid() {
            return Err(CowError::Invalid);
        }
        let pending = std::mem::take(&mut self.tables.write().pending);
        if let Err(e) = store.commit(&pending) {
            self.invalidate(
                store.as_mut(),
                &format!("committing exceptions failed: {e}"),
            );
            return Err(e);
        }
        Ok(())
    }

    /// Reads the origin's part of chunk `chunk` into `buf`, zeros past the origin's end.
    fn read_origin_chunk(&self, chunk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let start = chunk * self.chunk;
        let n = self.size.saturating_sub(start).min(self.chunk) as usize;
        let (head, tail) = buf.split_at_mut(n.min(buf.len()));
        if !head.is_empty() {
            self.origin.read(start, &mut BufsMut::one(head))?;
        }
        tail.fill(0);
        Ok(())
    }

    fn write_piece(&self, p: Piece, part: &Bufs<'_>) -> Result<(), BlockError> {
        if let Some(new) = self.lookup(p.chunk) {
            return self.data.write(new * self.chunk + p.within, part);
        }
        if let Some(t) = self.target()? {
            return t.write(p.chunk * self.chunk + p.within, part);
        }
        let copy = self.copy_lock.lock();
        // Another writer (or a merge) may have come first.
        if let Some(new) = self.lookup(p.chunk) {
            return self.data.write(new * self.chunk + p.within, part);
        }
        if let Some(t) = self.target()? {
            return t.write(p.chunk * self.chunk + p.within, part);
        }
        let new = {
            let mut store = self.store.lock();
            match store.prepare() {
                Ok(n) => n,
                Err(CowError::Full) => {
                    self.invalidate(store.as_mut(), "the snapshot store is full");
                    return Err(CowError::Invalid.into());
                }
                Err(e) => return Err(e.into()),
            }
        };
        let base = new * self.chunk;
        if p.within == 0 && p.len == self.chunk {
            self.data.write(base, part)?;
        } else {
            let mut buf = vec![0u8; self.chunk as usize];
            self.read_origin_chunk(p.chunk, &mut buf)?;
            if let Some(at) = buf.get_mut(p.within as usize..) {
                part.copy_to(at);
            }
            self.data.write(base, &Bufs::one(&buf))?;
        }
        let due = {
            let mut t = self.tables.write();
            t.table.insert(p.chunk, new);
            t.pending.push((p.chunk, new));
            t.pending.len() >= COMMIT_EVERY
        };
        drop(copy);
        if due {
            self.commit()?;
        }
        Ok(())
    }

    fn zero_piece(&self, p: Piece, may_unmap: bool) -> Result<(), BlockError> {
        if let Some(new) = self.lookup(p.chunk) {
            return self
                .data
                .write_zeroes(new * self.chunk + p.within, p.len, may_unmap);
        }
        if let Some(t) = self.target()? {
            return t.write_zeroes(p.chunk * self.chunk + p.within, p.len, may_unmap);
        }
        let zeros = vec![0u8; p.len as usize];
        self.write_piece(p, &Bufs::one(&zeros))
    }
}

impl BlockDevice for CowDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        let len = bufs.len();
        check_range(offset, len, self.size)?;
        let _gate = self.io_gate.read();
        let base = self.target()?.unwrap_or_else(|| self.origin.clone());
        let mut done = 0;
        for p in pieces(offset, len, self.chunk) {
            let mut part = bufs.range_mut(done, p.len);
            done += p.len;
            match self.lookup(p.chunk) {
                Some(new) => self.data.read(new * self.chunk + p.within, &mut part)?,
                None => base.read(p.chunk * self.chunk + p.within, &mut part)?,
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        let len = bufs.len();
        check_range(offset, len, self.size)?;
        let _gate = self.io_gate.read();
        self.target()?;
        let mut done = 0;
        for p in pieces(offset, len, self.chunk) {
            self.write_piece(p, &bufs.range(done, p.len))?;
            done += p.len;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        if let Some(t) = self.target()? {
            t.flush()?;
        }
        Ok(self.commit()?)
    }

    /// Whole chunks with an exception are unmapped in the store (they then read as zeros);
    /// the rest is left alone: discard is advisory and the origin is never touched.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.size)?;
        let _gate = self.io_gate.read();
        self.target()?;
        for p in pieces(offset, len, self.chunk) {
            if p.len == self.chunk {
                if let Some(new) = self.lookup(p.chunk) {
                    self.data.write_zeroes(new * self.chunk, self.chunk, true)?;
                }
            }
        }
        Ok(())
    }

    /// Zeros go into the store: chunks without an exception get one, of zeros.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        check_range(offset, len, self.size)?;
        let _gate = self.io_gate.read();
        self.target()?;
        for p in pieces(offset, len, self.chunk) {
            self.zero_piece(p, may_unmap)?;
        }
        Ok(())
    }
}
