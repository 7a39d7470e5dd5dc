//! Copying a range of a device into an NBD export: only what the device stores is read and
//! written; holes go over as WRITE_ZEROES without NO_HOLE, so a thin target leaves them
//! unmapped (a target without WRITE_ZEROES gets written zeros instead: correct, not sparse).
//! Writes are pipelined: the client keeps several in flight while the next pieces are read.
//! The job's streams (`CopyStream::queued`) read the source through its own I/O queue, up to
//! `READ_WINDOW` bytes read and not yet sent, overlapped with the walk of the allocation
//! (`reads.rs`), and send on a thread of their own (`sender.rs`); a single copy
//! (`copy_range`: a guest write's range once write-blocking) reads synchronously, a copy
//! with several data pieces on a few threads at once. Reads go
//! into page-aligned buffers: the source's O_DIRECT path takes them (no page-cache copy, no
//! page cache filled with a whole disk's data; an unaligned `Vec` went buffered).
//! Each copy logs at debug level where its time went (source reads against sends, which
//! wait for room in the client's window, and the wait for the last replies).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::reads::{aligned, QueuedReads};
use super::sender::PieceSender;
use super::MirrorError;
use crate::engine::{Allocation, BlockDevice, BufsMut};
use crate::nbd::client::{Command, NbdClient, ReplyError};
use crate::nbd::proto::FLAG_SEND_WRITE_ZEROES;

/// Bytes read and written per request (below every server's maximum payload).
const DATA_CHUNK: u64 = 4 << 20;
/// Bytes zeroed per request: NBD lengths are 32-bit.
const ZERO_CHUNK: u64 = 1 << 30;
/// Threads reading the source's data pieces of one copy.
const READERS: usize = 4;
/// Requests in flight on the mirror's connection to its target. The pieces are as small as
/// the source's mapped runs (a pool block and up), so a window counted in requests must be
/// deep to keep the target's disk busy: 16 requests of 1 MiB ran at 0.6x of the 4 MiB
/// sequential-write reference (its window holding 64 MiB). Servers that take fewer at once
/// (qemu-nbd: 16) just read the socket later.
pub const TARGET_IN_FLIGHT: usize = 64;
/// Bytes of a queued stream read and not yet sent (reads in flight, and pieces waiting for
/// the sender). Where source and target share a disk (the bench), deeper reads slow the
/// target's writes, which bound the copy: before the sender thread, against main's 4
/// synchronous readers, 32 MiB and 16 MiB lost 7 rounds of 7; 8 MiB won 5 of 7 and 3 of 7
/// (docs/benchmarks.md, mirror throughput).
pub const READ_WINDOW: u64 = 8 << 20;

/// What a copy does with the source's holes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holes {
    /// Zeroes them on the target (a full copy: the target may hold anything there).
    Zero,
    /// Leaves the target alone there (`sync: top`: the target holds the rest already).
    Skip,
}

/// What one copy moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub data: u64,
    pub zeroed: u64,
}

/// Requests of one copy still in flight, and the first error among their replies.
#[derive(Default)]
pub(super) struct Batch {
    state: Mutex<(usize, Option<ReplyError>)>,
    done: Condvar,
}

impl Batch {
    pub(super) fn submit(
        self: &Arc<Self>,
        target: &NbdClient,
        cmd: Command<'_>,
    ) -> Result<(), MirrorError> {
        self.state.lock().0 += 1;
        let me = self.clone();
        let r = target.submit(
            cmd,
            Box::new(move |r| {
                let mut s = me.state.lock();
                s.0 -= 1;
                if let Err(e) = r {
                    s.1.get_or_insert(e);
                }
                drop(s);
                me.done.notify_all();
            }),
        );
        if let Err(e) = r {
            self.state.lock().0 -= 1;
            return Err(e.into());
        }
        Ok(())
    }

    /// Waits for every reply; the first error, if any.
    fn wait(&self) -> Result<(), MirrorError> {
        let mut s = self.state.lock();
        while s.0 > 0 {
            self.done.wait(&mut s);
        }
        match s.1.take() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// Copies `[offset, offset + len)` of `source` to the same place on `target`, calling
/// `progress` with the bytes of each piece once it is sent. Returns once every write was
/// answered (not flushed: the caller flushes when it needs durability).
pub fn copy_range(
    source: &dyn BlockDevice,
    target: &NbdClient,
    offset: u64,
    len: u64,
    holes: Holes,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Copied, MirrorError> {
    let mut copy = CopyStream::new(source, target);
    let r = copy.range(offset, len, holes, progress);
    // Even after an error, the requests sent must be answered before their batch goes.
    let waited = copy.finish(progress);
    let copied = r?;
    waited?;
    Ok(copied)
}

/// Several ranges copied with one batch of replies: the writes of one range are still in
/// flight while the next is read, and only `settle` or `finish` waits for them (a wait after
/// each 256 MiB window of the first pass cost a fifth of its time, the window of 64 writes
/// draining while nothing was read). A stream made by `queued` reads the source through
/// its own I/O queue (`reads.rs`): reads of one range are still in flight while the next
/// range's allocation is walked, and the pieces read are sent as they finish. Whoever
/// needs a range on the target before going on (the copy lock's holders) calls `settle`
/// after it, or uses `copy_range`.
pub struct CopyStream<'a> {
    source: &'a dyn BlockDevice,
    target: &'a NbdClient,
    batch: Arc<Batch>,
    /// The source's queue and the thread sending what it read (both or neither).
    queued: Option<(QueuedReads, PieceSender)>,
    /// Time the walk waited for room in the read window (queued reads only).
    read_wait: Duration,
}

impl<'a> CopyStream<'a> {
    /// A stream reading the source synchronously, on a few threads per range.
    pub fn new(source: &'a dyn BlockDevice, target: &'a NbdClient) -> CopyStream<'a> {
        CopyStream {
            source,
            target,
            batch: Arc::new(Batch::default()),
            queued: None,
            read_wait: Duration::ZERO,
        }
    }

    /// A stream reading the source through its own queue, `READ_WINDOW` bytes read and not
    /// yet sent, a thread of its own sending them; synchronous reads if the device cannot
    /// open a queue.
    pub fn queued(source: &'a Arc<dyn BlockDevice>, target: &'a Arc<NbdClient>) -> CopyStream<'a> {
        let mut stream = CopyStream::new(&**source, target);
        let queued = QueuedReads::open(source.clone(), READ_WINDOW).and_then(|reads| {
            PieceSender::start(target.clone(), stream.batch.clone()).map(|s| (reads, s))
        });
        match queued {
            Ok(q) => stream.queued = Some(q),
            Err(e) => {
                log::warn!("mirror: no I/O queue on the source ({e}): reading it synchronously")
            }
        }
        stream
    }

    /// Reads and sends `[offset, offset + len)`; its reads and writes may still be in
    /// flight.
    pub fn range(
        &mut self,
        offset: u64,
        len: u64,
        holes: Holes,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Copied, MirrorError> {
        let started = Instant::now();
        let r = self.pieces((offset, len), holes, progress);
        log::debug!(
            "walked and started {len} bytes at {offset} in {:?}",
            started.elapsed()
        );
        r
    }

    /// Waits until every piece started was read, sent and answered; the first error.
    pub fn settle(&mut self, progress: &(dyn Fn(u64) + Sync)) -> Result<(), MirrorError> {
        let read = match &mut self.queued {
            Some((reads, sender)) => {
                let mut deliver = |at, storage, len| sender.send(at, storage, len);
                let r = reads.finish_all(&mut deliver);
                // Every buffer handed to the sender comes back once it was sent.
                while reads.held() > 0 {
                    match sender.wait_back() {
                        Some((storage, len)) => reads.give_back(storage, len),
                        None => break,
                    }
                }
                progress(sender.take_sent());
                r.and_then(|()| sender.check())
            }
            None => Ok(()),
        };
        // Even after an error, the requests sent must be answered before their batch goes.
        let replies = self.batch.wait();
        read?;
        replies
    }

    /// Waits for every read and reply; the first error among them, if any.
    pub fn finish(mut self, progress: &(dyn Fn(u64) + Sync)) -> Result<(), MirrorError> {
        let drain = Instant::now();
        let r = self.settle(progress);
        log::debug!(
            "waited {:?} for the last reads and replies; in all {:?} waiting for room in the \
             read window, {:?} sending (on the sender's thread, with waits for room in the \
             target's window)",
            drain.elapsed(),
            self.read_wait,
            self.queued
                .as_ref()
                .map_or(Duration::ZERO, |(_, s)| s.send_time()),
        );
        r
    }

    /// Walks the allocation of a range: holes are zeroed (or skipped) at once, data pieces
    /// started on the queue as they are found (or listed and copied at the end, without one).
    fn pieces(
        &mut self,
        (offset, len): (u64, u64),
        holes: Holes,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Copied, MirrorError> {
        let (source, target) = (self.source, self.target);
        let chunk = DATA_CHUNK.min(u64::from(target.info().max_payload));
        let can_zero = target.info().has(FLAG_SEND_WRITE_ZEROES);
        let end = offset + len;
        let mut copied = Copied::default();
        let mut listed: Vec<DataPiece> = Vec::new();
        let mut at = offset;
        while at < end {
            // The allocation may answer for less than asked: ask again from where it stops.
            let runs = source.allocation(at, end - at)?;
            if runs.is_empty() {
                return Err(MirrorError::Source(format!(
                    "no allocation answer at byte {at}"
                )));
            }
            for run in runs {
                let run_end = at + run.len.min(end - at);
                let hole = run.state == Allocation::Hole;
                if hole && holes == Holes::Skip {
                    progress(run_end - at);
                    at = run_end;
                }
                while at < run_end {
                    let n = (run_end - at).min(if hole && can_zero { ZERO_CHUNK } else { chunk });
                    if hole && can_zero {
                        // n <= ZERO_CHUNK, below 2^32.
                        let cmd = Command::WriteZeroes {
                            offset: at,
                            len: n as u32,
                            fua: false,
                        };
                        self.batch.submit(target, cmd)?;
                        copied.zeroed += n;
                        progress(n);
                    } else if self.queued.is_some() {
                        self.start_piece((at, n, hole), progress)?;
                        copied.data += n;
                    } else {
                        listed.push((at, n, hole));
                        copied.data += n;
                    }
                    at += n;
                }
                if at >= end {
                    break;
                }
            }
        }
        copy_data(source, target, &listed, progress, &self.batch)?;
        Ok(copied)
    }

    /// Starts reading a data piece once the window has room for it, handing the pieces that
    /// finished meanwhile to the sender; a hole written as data goes at once.
    fn start_piece(
        &mut self,
        (at, n, zeros): DataPiece,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), MirrorError> {
        let (target, batch) = (self.target, &self.batch);
        let Some((reads, sender)) = self.queued.as_mut() else {
            return Ok(());
        };
        if zeros {
            return send_data(target, batch, at, &vec![0u8; n as usize], progress);
        }
        let mut deliver = |off, storage, len| sender.send(off, storage, len);
        let waiting = Instant::now();
        loop {
            while let Some((storage, len)) = sender.try_back() {
                reads.give_back(storage, len);
            }
            sender.check()?;
            if reads.has_room(n) {
                break;
            }
            if reads.reading() {
                reads.wait_some(&mut deliver)?;
            } else {
                // The window is full of pieces waiting to be sent.
                match sender.wait_back() {
                    Some((storage, len)) => reads.give_back(storage, len),
                    None => {
                        sender.check()?;
                        return Err(MirrorError::Io(std::io::Error::other(
                            "the mirror's sender stopped",
                        )));
                    }
                }
            }
        }
        self.read_wait += waiting.elapsed();
        progress(sender.take_sent());
        // n <= DATA_CHUNK.
        reads.start(at, n as usize);
        Ok(())
    }
}

/// Sends a piece read from the source to the target.
fn send_data(
    target: &NbdClient,
    batch: &Arc<Batch>,
    at: u64,
    data: &[u8],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), MirrorError> {
    batch.submit(
        target,
        Command::Write {
            offset: at,
            data,
            fua: false,
        },
    )?;
    progress(data.len() as u64);
    Ok(())
}

/// A data piece to read and write: its offset and length, and whether it is a hole to
/// write as zero data (a target without WRITE_ZEROES).
type DataPiece = (u64, u64, bool);

/// Where a copy's data time went, summed over its reader threads.
#[derive(Default)]
struct Timings {
    read_ns: AtomicU64,
    send_ns: AtomicU64,
}

impl Timings {
    fn add(counter: &AtomicU64, since: Instant) {
        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        counter.fetch_add(ns, Ordering::Relaxed);
    }
}

/// Reads `pieces` from the source and writes them to the target, on up to `READERS`
/// threads when there are several.
fn copy_data(
    source: &dyn BlockDevice,
    target: &NbdClient,
    pieces: &[DataPiece],
    progress: &(dyn Fn(u64) + Sync),
    batch: &Arc<Batch>,
) -> Result<(), MirrorError> {
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<MirrorError>> = Mutex::new(None);
    let timings = Timings::default();
    let started = Instant::now();
    let work = || {
        let mut storage = Vec::new();
        while failed.lock().is_none() {
            let Some(&(at, n, zeros)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            let buf = aligned(&mut storage, n as usize);
            let t = Instant::now();
            let r = if zeros {
                buf.fill(0);
                Ok(())
            } else {
                source.read(at, &mut BufsMut::one(buf))
            };
            Timings::add(&timings.read_ns, t);
            let t = Instant::now();
            let r = r.map_err(MirrorError::from).and_then(|()| {
                let cmd = Command::Write {
                    offset: at,
                    data: buf,
                    fua: false,
                };
                batch.submit(target, cmd)
            });
            Timings::add(&timings.send_ns, t);
            match r {
                Ok(()) => progress(n),
                Err(e) => {
                    failed.lock().get_or_insert(e);
                }
            }
        }
    };
    let threads = READERS.min(pieces.len());
    if threads <= 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(work);
            }
        });
    }
    if !pieces.is_empty() {
        log::debug!(
            "copied {} data pieces on {threads} threads in {:?}: reading {:?}, sending {:?} \
             (summed over the threads; sending includes waiting for room in the window)",
            pieces.len(),
            started.elapsed(),
            Duration::from_nanos(timings.read_ns.into_inner()),
            Duration::from_nanos(timings.send_ns.into_inner()),
        );
    }
    match failed.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
