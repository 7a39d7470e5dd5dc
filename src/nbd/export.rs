//! What the server exports: named devices, each with what its meta contexts ask, and the
//! table of them that connections look names up in.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::proto::*;
use crate::engine::{BlockDevice, BlockError};

/// Which bytes of `[offset, offset + len)` changed since a base: consecutive
/// `(length, changed)` runs from `offset` (possibly stopping short of `len`).
pub type ChangedRuns = dyn Fn(u64, u64) -> Result<Vec<(u64, bool)>, BlockError> + Send + Sync;

/// A dirty bitmap as QEMU exports one: context `qemu:dirty-bitmap:NAME`.
pub struct Bitmap {
    pub name: String,
    pub changed: Box<ChangedRuns>,
}

/// One export.
pub struct NbdExport {
    pub name: String,
    pub description: String,
    /// What requests go to (the daemon may wrap the node, to watch writes).
    pub dev: Arc<dyn BlockDevice>,
    /// The node itself, asked for its allocation (`base:allocation`).
    pub node: Arc<dyn BlockDevice>,
    pub writable: bool,
    /// Whether write-zeroes that may leave holes is fast here (unmapping thin blocks), so
    /// NBD_CMD_FLAG_FAST_ZERO requests without NO_HOLE are taken, not refused with ENOTSUP.
    pub fast_zero: bool,
    pub bitmap: Option<Bitmap>,
}

impl NbdExport {
    /// Transmission flags. Every export may be used over several connections at once
    /// (CAN_MULTI_CONN): a device's flush makes every completed write durable, whichever
    /// connection (or vhost queue) made it, and nothing here caches data per connection, so
    /// a FLUSH or FUA reply on one connection covers what all of them were told was written.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_CACHE
            | FLAG_CAN_MULTI_CONN;
        if self.writable {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        } else {
            f |= FLAG_READ_ONLY;
        }
        if structured {
            // Every read is answered in one chunk anyway.
            f |= FLAG_SEND_DF;
        }
        f
    }

    pub fn size(&self) -> u64 {
        self.dev.size()
    }
}

/// The exports by name, shared by the listener and every connection.
#[derive(Default)]
pub struct Exports {
    map: RwLock<BTreeMap<String, Arc<NbdExport>>>,
}

impl Exports {
    pub fn get(&self, name: &str) -> Option<Arc<NbdExport>> {
        self.map.read().get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.map.read().keys().cloned().collect()
    }

    pub fn all(&self) -> Vec<Arc<NbdExport>> {
        self.map.read().values().cloned().collect()
    }

    /// Adds `export`; false if its name is taken.
    pub fn insert(&self, export: Arc<NbdExport>) -> bool {
        let mut map = self.map.write();
        if map.contains_key(&export.name) {
            return false;
        }
        map.insert(export.name.clone(), export);
        true
    }

    pub fn remove(&self, name: &str) -> Option<Arc<NbdExport>> {
        self.map.write().remove(name)
    }
}
