//! How a device tells its ring where a range lives on host files. Only the engine's queues
//! (and the devices that implement [`crate::engine::BlockDevice::map`]) use these.

use std::os::fd::RawFd;

use crate::engine::BlockError;

/// What a mapped range is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    Read,
    Write,
}

/// A device range resolved to host storage.
pub struct Mapping {
    /// In order, covering the range exactly.
    pub extents: Vec<Extent>,
    /// Whatever keeps the extents valid (for a thin device, its place in the pool's I/O gate),
    /// and what must happen once their I/O is done (for a first write, the new mappings).
    pub hold: Option<Box<dyn Hold>>,
}

impl Mapping {
    pub fn unheld(extents: Vec<Extent>) -> Self {
        Mapping {
            extents,
            hold: None,
        }
    }
}

/// Kept while a mapping's I/O is in flight.
pub trait Hold: Send + Sync {
    /// The mapping's host I/O has ended; `ok` says whether all of it
    /// succeeded. An error fails the request. A hold dropped without this call treats the I/O
    /// as failed.
    fn finish(self: Box<Self>, ok: bool) -> Result<(), BlockError>;
}

/// A piece of a device range resolved to host storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes that read as zeros (only in mappings for reads).
    Zero { len: u64 },
    /// `len` bytes at `offset` of the open file `fd`. With `direct`, `fd` was opened O_DIRECT
    /// and I/O must be aligned to [`crate::engine::DIRECT_ALIGN`]: unaligned requests take
    /// the synchronous path instead.
    File {
        fd: RawFd,
        offset: u64,
        len: u64,
        direct: bool,
    },
    /// `len` bytes at `offset` of the device below (a thin pool's data device that has no
    /// host file to map: an RBD image), done as a request of its own on that device's queue
    /// (see `stacked.rs`). Only devices whose queue is a [`super::StackedQueue`] map to it;
    /// other queues take the synchronous path.
    Below { offset: u64, len: u64 },
}
