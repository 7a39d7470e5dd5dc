//! Copying a range of a device into an NBD export: only what the device stores is read and
//! written; holes go over as WRITE_ZEROES without NO_HOLE, so a thin target leaves them
//! unmapped (a target without WRITE_ZEROES gets written zeros instead: correct, not sparse).
//! Writes are pipelined: the client keeps several in flight while the next piece is read.

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::MirrorError;
use crate::engine::{Allocation, BlockDevice, BufsMut};
use crate::nbd::client::{Command, NbdClient, ReplyError};
use crate::nbd::proto::FLAG_SEND_WRITE_ZEROES;

/// Bytes read and written per request (below every server's maximum payload).
const DATA_CHUNK: u64 = 4 << 20;
/// Bytes zeroed per request: NBD lengths are 32-bit.
const ZERO_CHUNK: u64 = 1 << 30;

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
struct Batch {
    state: Mutex<(usize, Option<ReplyError>)>,
    done: Condvar,
}

impl Batch {
    fn submit(self: &Arc<Self>, target: &NbdClient, cmd: Command<'_>) -> Result<(), MirrorError> {
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
    progress: &dyn Fn(u64),
) -> Result<Copied, MirrorError> {
    let batch = Arc::new(Batch::default());
    let r = copy_pieces(source, target, (offset, len), holes, progress, &batch);
    // Even after an error, the requests sent must be answered before their batch goes.
    let waited = batch.wait();
    let copied = r?;
    waited?;
    Ok(copied)
}

fn copy_pieces(
    source: &dyn BlockDevice,
    target: &NbdClient,
    (offset, len): (u64, u64),
    holes: Holes,
    progress: &dyn Fn(u64),
    batch: &Arc<Batch>,
) -> Result<Copied, MirrorError> {
    let chunk = DATA_CHUNK.min(u64::from(target.info().max_payload));
    let can_zero = target.info().has(FLAG_SEND_WRITE_ZEROES);
    let end = offset + len;
    let mut copied = Copied::default();
    let mut at = offset;
    let mut buf = Vec::new();
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
            if run.state == Allocation::Hole && holes == Holes::Skip {
                progress(run_end - at);
                at = run_end;
                continue;
            }
            while at < run_end {
                let hole = run.state == Allocation::Hole && can_zero;
                let n = (run_end - at).min(if hole { ZERO_CHUNK } else { chunk });
                if hole {
                    // n <= ZERO_CHUNK, below 2^32.
                    let cmd = Command::WriteZeroes {
                        offset: at,
                        len: n as u32,
                        fua: false,
                    };
                    batch.submit(target, cmd)?;
                    copied.zeroed += n;
                } else {
                    buf.resize(n as usize, 0);
                    if run.state == Allocation::Hole {
                        buf.fill(0);
                    } else {
                        source.read(at, &mut BufsMut::one(&mut buf))?;
                    }
                    let cmd = Command::Write {
                        offset: at,
                        data: &buf,
                        fua: false,
                    };
                    batch.submit(target, cmd)?;
                    copied.data += n;
                }
                progress(n);
                at += n;
            }
            if at >= end {
                break;
            }
        }
    }
    Ok(copied)
}
