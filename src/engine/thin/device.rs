//! A thin device: a virtual disk whose blocks are provisioned from the pool on first write.

use crate::engine::{Bufs, BufsMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::warn;

use super::metadata::Lookup;
use super::pool::{Pool, PoolMode};
use super::provision::{ready_new_block, FirstWrites, NewBlock, CHUNK};
use crate::engine::io::{default_queue, StackedQueue};
use crate::engine::{
    check_range, BlockDevice, BlockError, Extent, Hold, IoQueue, MapOp, Mapping, QueueOptions,
};

pub struct ThinDevice {
    pool: Arc<Pool>,
    dev: u64,
    size: AtomicU64,
    /// An external origin (read-only): what unmapped blocks hold instead of zeros.
    origin: Option<Arc<dyn BlockDevice>>,
}

/// The part of one data block a byte range covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    vblock: u64,
    within: u64,
    len: u64,
}

/// Cuts `[offset, offset + len)` at block boundaries.
fn pieces(offset: u64, len: u64, block: u64) -> impl Iterator<Item = Piece> {
    let mut pos = offset;
    let end = offset + len;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let vblock = pos / block;
        let within = pos % block;
        let n = (block - within).min(end - pos);
        pos += n;
        Some(Piece {
            vblock,
            within,
            len: n,
        })
    })
}

/// Reads `bufs` from `origin` at `offset`; what lies past the origin's end reads as zeros.
fn read_origin(
    origin: &dyn BlockDevice,
    offset: u64,
    bufs: &mut BufsMut<'_>,
) -> Result<(), BlockError> {
    let len = bufs.len();
    let avail = origin.size().saturating_sub(offset).min(len);
    if avail == len {
        return origin.read(offset, bufs);
    }
    bufs.zero();
    if avail == 0 {
        return Ok(());
    }
    origin.read(offset, &mut bufs.range_mut(0, avail))
}

/// Appends `ext`, merging it into the last extent when they are contiguous.
fn push_coalesced(extents: &mut Vec<Extent>, ext: Extent) {
    match (extents.last_mut(), ext) {
        (Some(Extent::Zero { len }), Extent::Zero { len: more }) => *len += more,
        (
            Some(Extent::File {
                fd,
                offset,
                len,
                direct,
            }),
            Extent::File {
                fd: fd2,
                offset: off2,
                len: more,
                direct: direct2,
            },
        ) if *fd == fd2 && *direct == direct2 && *offset + *len == off2 => *len += more,
        (
            Some(Extent::Below { offset, len }),
            Extent::Below {
                offset: off2,
                len: more,
            },
        ) if *offset + *len == off2 => *len += more,
        _ => extents.push(ext),
    }
}

/// Where `[offset, offset + len)` of the pool's data device is, as one extent: the host file
/// range it maps to, or the range itself on a data device reached through its own queue.
pub(super) fn data_extent(
    pool: &Pool,
    op: MapOp,
    offset: u64,
    len: u64,
) -> Result<Option<Extent>, BlockError> {
    let data = pool.data();
    if data.through_queue() {
        check_range(offset, len, data.size())?;
        return Ok(Some(Extent::Below { offset, len }));
    }
    let mapped = data.map(op, offset, len)?;
    Ok(mapped
        .and_then(|m| m.extents.into_iter().next())
        .filter(|e| matches!(e, Extent::File { len: l, .. } if *l == len)))
}

impl ThinDevice {
    pub fn new(pool: Arc<Pool>, dev: u64, size: u64) -> Self {
        ThinDevice {
            pool,
            dev,
            size: AtomicU64::new(size & !511),
            origin: None,
        }
    }

    /// Unmapped blocks read from `origin` (never written), and a first write copies the
    /// origin block around itself, zeros past the origin's end.
    pub fn with_origin(mut self, origin: Arc<dyn BlockDevice>) -> Self {
        self.origin = Some(origin);
        self
    }

    pub fn id(&self) -> u64 {
        self.dev
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    fn origin_size(&self) -> u64 {
        self.origin.as_ref().map_or(0, |o| o.size())
    }

    /// Changes the virtual size (growing a disk).
    pub fn set_size(&self, size: u64) {
        self.size.store(size & !511, Ordering::Release);
    }

    fn writable(&self) -> Result<(), BlockError> {
        match self.pool.mode() {
            PoolMode::Write | PoolMode::OutOfDataSpace => Ok(()),
            PoolMode::ReadOnly | PoolMode::Fail => Err(BlockError::ReadOnly),
        }
    }

    /// Where virtual block `vblock` is mapped, if it is.
    fn find(&self, vblock: u64) -> Result<Option<Lookup>, BlockError> {
        Ok(self.pool.meta().find_block(self.dev, vblock, true)?)
    }

    /// Writes `part` at `within` of virtual block `vblock`, provisioning or unsharing the
    /// block first when it needs it.
    fn write_piece(&self, p: Piece, part: &Bufs<'_>) -> Result<(), BlockError> {
        let pool = &self.pool;
        let started = Instant::now();
        loop {
            {
                let _io = pool.io_gate();
                if let Some(l) = self.find(p.vblock)?.filter(|l| !l.shared) {
                    return pool.write_data(l.block, p.within, part);
                }
            }
            // Provisioning: the provision gate before the I/O gate (see gate.rs).
            let provision = pool.provision_ticket();
            let io = pool.io_gate();
            let cell = pool.prison.lock((self.dev, p.vblock));
            // Another writer may have provisioned the block while this one waited.
            let found = self.find(p.vblock)?;
            if let Some(l) = found.filter(|l| !l.shared) {
                return pool.write_data(l.block, p.within, part);
            }
            // The same allocation and mapping as first writes in the ring: the block is
            // mapped once its data is written, and given back if anything fails first.
            let mut first = FirstWrites::new(pool.clone(), self.dev, io, provision);
            let new = match first.allocate(p.vblock) {
                Ok(b) => b,
                Err(BlockError::NoSpace) => {
                    // Wait without holding anything a commit or a resize needs.
                    drop(cell);
                    drop(first);
                    if pool.wait_for_space(started) {
                        continue;
                    }
                    return Err(BlockError::NoSpace);
                }
                Err(e) => return Err(e),
            };
            self.fill_new_block(new, found.map(|l| l.block), p, part)?;
            return Box::new(first).finish(true);
        }
    }

    /// Makes a newly allocated block hold `part` and, around it, the old block's data (when
    /// breaking sharing) or zeros: a new block never shows what it held before.
    fn fill_new_block(
        &self,
        new: u64,
        old: Option<u64>,
        p: Piece,
        part: &Bufs<'_>,
    ) -> Result<(), BlockError> {
        let pool = &self.pool;
        let bs = pool.block_size();
        // The bytes around the piece: the shared block's, the origin's, or zeros.
        type Source<'a> = Box<dyn Fn(u64, &mut [u8]) -> Result<(), BlockError> + 'a>;
        let read_around: Option<Source<'_>> = match (old, &self.origin) {
            (Some(old), _) => Some(Box::new(move |at, buf| {
                pool.read_data(old, at, &mut BufsMut::one(buf))
            })),
            (None, Some(origin)) => Some(Box::new(move |at, buf| {
                let from = p.vblock * bs + at;
                read_origin(origin.as_ref(), from, &mut BufsMut::one(buf))
            })),
            (None, None) => None,
        };
        ready_new_block(pool, new, p.within, p.len, read_around.as_deref())?;
        self.write_into_new(new, p, part)
    }

    /// Reads a run of `read`: `len` bytes at byte `data_at` of the pool's data device into
    /// `bufs` from byte `at`.
    fn read_run(
        &self,
        (data_at, at, len): (u64, u64, u64),
        bufs: &mut BufsMut<'_>,
    ) -> Result<(), BlockError> {
        let bs = self.pool.block_size();
        let mut part = bufs.range_mut(at, len);
        self.pool.read_data(data_at / bs, data_at % bs, &mut part)
    }

    /// Writes `part` where `p` says in data block `new`.
    fn write_into_new(&self, new: u64, p: Piece, part: &Bufs<'_>) -> Result<(), BlockError> {
        let pool = &self.pool;
        // Small pieces go in one write together with nothing else; gathering first keeps
        // O_DIRECT alignment for callers whose buffers are fragmented.
        if p.len <= CHUNK {
            let mut buf = vec![0u8; p.len as usize];
            part.copy_to(&mut buf);
            pool.write_data(new, p.within, &Bufs::one(&buf))
        } else {
            pool.write_data(new, p.within, part)
        }
    }

    /// Unmaps whole blocks `[begin, end)` and releases the data blocks nobody else uses.
    fn unmap_blocks(&self, begin: u64, end: u64) -> Result<(), BlockError> {
        if begin >= end {
            return Ok(());
        }
        let pool = &self.pool;
        // Held until the holes are punched: no commit, so the freed blocks cannot be reused
        // meanwhile.
        let _provision = pool.provision_ticket();
        let mapped = pool
            .meta()
            .mappings(self.dev, begin, end)
            .map_err(BlockError::from)?;
        if mapped.is_empty() {
            return Ok(());
        }
        pool.change(|m| m.remove_range(self.dev, begin, end))
            .map_err(BlockError::from)?;
        let bs = pool.block_size();
        let meta = pool.meta();
        let mut freed: Vec<u64> = mapped
            .iter()
            .map(|(_, bt)| bt.block)
            .filter(|b| meta.data_block_count(*b).map(|c| c == 0).unwrap_or(false))
            .collect();
        drop(meta);
        freed.sort_unstable();
        let mut i = 0;
        while i < freed.len() {
            let start = freed[i];
            let mut n = 1;
            while freed.get(i + n as usize) == Some(&(start + n)) {
                n += 1;
            }
            if let Err(e) = pool.data().discard(start * bs, n * bs) {
                warn!("discard of data blocks {start}+{n} failed: {e}");
            }
            i += n as usize;
        }
        Ok(())
    }

    /// Zeroes a byte range inside mapped blocks (unmapped ones already read as zeros, unless
    /// they read from an origin: those get a block of zeros).
    fn zero_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        for p in pieces(offset, len, self.pool.block_size()) {
            let mapped = self.find(p.vblock)?.is_some();
            if !mapped && self.origin.is_none() {
                continue;
            }
            let mut done = 0;
            while done < p.len {
                let n = CHUNK.min(p.len - done);
                let buf = zeros.get(..n as usize).unwrap_or_default();
                let sub = Piece {
                    vblock: p.vblock,
                    within: p.within + done,
                    len: n,
                };
                self.write_piece(sub, &Bufs::one(buf))?;
                done += n;
            }
        }
        Ok(())
    }

    /// Whole blocks inside `[offset, offset + len)`, and the partial edges around them.
    fn split_whole(&self, offset: u64, len: u64) -> (u64, u64, Vec<(u64, u64)>) {
        let bs = self.pool.block_size();
        let end = offset + len;
        let first = offset.div_ceil(bs);
        let last = end / bs;
        if first >= last {
            return (0, 0, vec![(offset, len)]);
        }
        let mut edges = Vec::new();
        if offset < first * bs {
            edges.push((offset, first * bs - offset));
        }
        if last * bs < end {
            edges.push((last * bs, end - last * bs));
        }
        (first, last, edges)
    }
}

impl BlockDevice for ThinDevice {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Mapped blocks are data, unmapped ones holes (see allocation.rs).
    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<crate::engine::AllocationRun>, BlockError> {
        self.allocation_runs(offset, len)
    }

    /// Reads of any blocks, and writes into mapped blocks nobody shares, map straight to the
    /// data device. So do first writes that need no copy (whole blocks, or parts of blocks
    /// that read as zeros): they get new blocks here, mapped once their I/O is done (see
    /// provision.rs). Everything else takes the synchronous path.
    fn map(&self, op: MapOp, offset: u64, len: u64) -> Result<Option<Mapping>, BlockError> {
        check_range(offset, len, self.size())?;
        if op == MapOp::Write && self.writable().is_err() {
            return Ok(None);
        }
        // Never wait for a commit here: the caller may hold tickets of its own.
        let Some(ticket) = self.pool.try_ticket() else {
            return Ok(None);
        };
        let bs = self.pool.block_size();
        let meta = self.pool.meta();
        let mut planned: Vec<Result<Extent, NewBlock>> = Vec::new();
        for p in pieces(offset, len, bs) {
            let found = meta
                .find_block(self.dev, p.vblock, true)
                .map_err(BlockError::from)?;
            let ext = match found {
                Some(l) if op == MapOp::Read || !l.shared => {
                    match data_extent(&self.pool, op, l.block * bs + p.within, p.len)? {
                        Some(e) => e,
                        None => return Ok(None),
                    }
                }
                None if op == MapOp::Read => match &self.origin {
                    None => Extent::Zero { len: p.len },
                    // The origin's bytes, where it maps them whole; else the synchronous path.
                    Some(_) if p.vblock * bs + p.within >= self.origin_size() => {
                        Extent::Zero { len: p.len }
                    }
                    Some(origin) => {
                        let at = p.vblock * bs + p.within;
                        if at.saturating_add(p.len) > origin.size() {
                            return Ok(None);
                        }
                        let m = origin.map(MapOp::Read, at, p.len)?;
                        match m.and_then(|m| m.extents.into_iter().next()) {
                            // Not `Below`: that would be the origin's own device below.
                            Some(e @ (Extent::File { .. } | Extent::Zero { .. })) => e,
                            _ => return Ok(None),
                        }
                    }
                },
                // A write that needs a new block: without a copy only if it covers the whole
                // block, or the rest of the block reads as zeros.
                found => {
                    let whole = p.len == bs;
                    if !whole && (found.is_some() || self.origin.is_some()) {
                        return Ok(None);
                    }
                    // Zeroing the rest of a new block on a data device reached through its
                    // queue is a round trip to it: the blocking thread waits for that, not
                    // the worker.
                    if !whole && self.pool.data().through_queue() {
                        return Ok(None);
                    }
                    planned.push(Err(NewBlock {
                        vblock: p.vblock,
                        within: p.within,
                        len: p.len,
                        old: found.map(|l| l.block),
                    }));
                    continue;
                }
            };
            planned.push(Ok(ext));
        }
        drop(meta);
        let mut extents: Vec<Extent> = Vec::with_capacity(planned.len());
        if planned.iter().all(Result::is_ok) {
            for ext in planned.into_iter().flatten() {
                push_coalesced(&mut extents, ext);
            }
            return Ok(Some(Mapping {
                extents,
                hold: Some(Box::new(ticket)),
            }));
        }
        let Some(provision) = self.pool.try_provision_ticket() else {
            return Ok(None);
        };
        let mut writes = FirstWrites::new(self.pool.clone(), self.dev, ticket, provision);
        for plan in planned {
            let ext = match plan {
                Ok(ext) => ext,
                Err(new) => match writes.provision(new)? {
                    Some(ext) => ext,
                    None => return Ok(None),
                },
            };
            push_coalesced(&mut extents, ext);
        }
        Ok(Some(Mapping {
            extents,
            hold: Some(Box::new(writes)),
        }))
    }

    /// On a pool whose data device is reached through its own queue (RBD), a queue stacked
    /// on one of that device's queues; otherwise the default (io_uring on host files).
    fn open_queue(self: Arc<Self>, opts: &QueueOptions) -> std::io::Result<Box<dyn IoQueue>> {
        let data = self.pool.data_device();
        if !data.through_queue() {
            return default_queue(self, opts);
        }
        let data: Arc<dyn BlockDevice> = data;
        // A request becomes pieces below, one per data block it touches (fewer where blocks
        // are adjacent): room for 8 per request in flight. A piece refused for want of room
        // fails its request over to the synchronous path, which is slower, not wrong.
        let below = data.open_queue(&QueueOptions {
            entries: opts.entries.saturating_mul(8),
            ..*opts
        })?;
        StackedQueue::open(self, below, opts)
    }

    fn read(&self, offset: u64, bufs: &mut BufsMut<'_>) -> Result<(), BlockError> {
        let len = bufs.len();
        check_range(offset, len, self.size())?;
        let _gate = self.pool.io_gate();
        let bs = self.pool.block_size();
        // Mapped pieces whose data follows on in the pool are read in one request (blocks
        // are mostly allocated in order): a 1 MiB read of 64 KiB blocks was 16 reads, one
        // after another. A run: (byte in the data device, byte in `bufs`, length).
        let mut run: Option<(u64, u64, u64)> = None;
        let mut done = 0;
        for p in pieces(offset, len, bs) {
            let at = done;
            done += p.len;
            let found = self.find(p.vblock)?;
            if let Some(l) = found {
                let data_at = l.block * bs + p.within;
                match &mut run {
                    Some((start, _, n)) if *start + *n == data_at => *n += p.len,
                    _ => {
                        if let Some(r) = run.replace((data_at, at, p.len)) {
                            self.read_run(r, bufs)?;
                        }
                    }
                }
                continue;
            }
            if let Some(r) = run.take() {
                self.read_run(r, bufs)?;
            }
            let mut part = bufs.range_mut(at, p.len);
            match &self.origin {
                Some(origin) => {
                    let at = p.vblock * bs + p.within;
                    read_origin(origin.as_ref(), at, &mut part)?
                }
                None => part.zero(),
            }
        }
        if let Some(r) = run {
            self.read_run(r, bufs)?;
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &Bufs<'_>) -> Result<(), BlockError> {
        self.writable()?;
        let len = bufs.len();
        check_range(offset, len, self.size())?;
        let mut done = 0;
        for p in pieces(offset, len, self.pool.block_size()) {
            self.write_piece(p, &bufs.range(done, p.len))?;
            done += p.len;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.pool.commit()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        // Partial blocks keep their data: discard is advisory. With an external origin,
        // unmapped blocks read the origin again (as in dm-thin).
        let (first, last, _) = self.split_whole(offset, len);
        self.unmap_blocks(first, last)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.writable()?;
        check_range(offset, len, self.size())?;
        // Unmapped blocks of a device with an origin read the origin, not zeros.
        if !may_unmap || self.origin.is_some() {
            return self.zero_range(offset, len);
        }
        let (first, last, edges) = self.split_whole(offset, len);
        self.unmap_blocks(first, last)?;
        for (at, n) in edges {
            self.zero_range(at, n)?;
        }
        Ok(())
    }
}

#[path = "allocation.rs"]
mod allocation;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_cut_at_block_boundaries() {
        let got: Vec<Piece> = pieces(100, 300, 128).collect();
        assert_eq!(
            got,
            vec![
                Piece {
                    vblock: 0,
                    within: 100,
                    len: 28
                },
                Piece {
                    vblock: 1,
                    within: 0,
                    len: 128
                },
                Piece {
                    vblock: 2,
                    within: 0,
                    len: 128
                },
                Piece {
                    vblock: 3,
                    within: 0,
                    len: 16
                },
            ]
        );
    }
}
