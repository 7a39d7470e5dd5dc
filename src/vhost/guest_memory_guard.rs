//! Keeps the SIGBUS table ([`super::sigbus`]) in step with one connection's guest memory
//! mappings.
//!
//! A memory table message maps new regions; the old table stays mapped as long as anything
//! still holds it (a request in flight keeps the `GuestMemoryMmap` it was started with). So a
//! range is registered from the moment its region is mapped until no table that contains it
//! is alive any more, which is seen through a weak reference to every table installed. Ranges
//! whose tables are gone are unregistered at the next memory message; whatever is left is
//! released by the connection when it ends, after its workers are joined and its requests
//! finished (see `connection.rs`): until then an unmapped range's entry is stale, which is
//! harmless (see `Table::lookup`).
//!
//! Slots for the new regions are reserved before they are mapped, so that a full table refuses
//! the message instead of leaving memory mapped that a SIGBUS could not be traced to.

use std::io;
use std::sync::{Arc, Weak};

use log::warn;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::sigbus::{self, Reserved, TableFull, SLOTS};

/// One connection's registrations.
pub struct GuestMemoryGuard {
    owner: u64,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Every table installed that may still be alive.
    tables: Vec<Weak<GuestMemoryMmap>>,
    /// Registered ranges: (start, len, slot).
    registered: Vec<(usize, usize, usize)>,
}

/// Slots taken for regions about to be mapped.
pub type Reservation = Vec<Reserved<'static, SLOTS>>;

impl GuestMemoryGuard {
    /// Watches the tables installed in `memory` (the one given to the vhost-user handler),
    /// for the connection `owner` ([`sigbus::new_owner`]). Installs the SIGBUS handler.
    pub fn new(memory: GuestMemoryAtomic<GuestMemoryMmap>, owner: u64) -> io::Result<Self> {
        sigbus::install()?;
        Ok(GuestMemoryGuard {
            owner,
            memory,
            tables: Vec::new(),
            registered: Vec::new(),
        })
    }

    /// Takes `regions` slots for regions about to be mapped; refused if the table is full.
    pub fn reserve(&self, regions: usize) -> Result<Reservation, TableFull> {
        (0..regions)
            .map(|_| sigbus::table().reserve(self.owner))
            .collect()
    }

    /// After a memory table message: registers the mapped ranges of the table now installed
    /// (in the slots of `reserved` first) and unregisters those of tables no longer alive.
    pub fn installed(&mut self, reserved: Reservation) {
        let current = self.memory.memory().into_inner();
        if !self
            .tables
            .iter()
            .any(|t| t.ptr_eq(&Arc::downgrade(&current)))
        {
            self.tables.push(Arc::downgrade(&current));
        }
        drop(current);
        let mut live: Vec<(usize, usize)> = Vec::new();
        self.tables.retain(|t| match t.upgrade() {
            Some(table) => {
                for region in table.iter() {
                    let range = (region.as_ptr() as usize, region.len() as usize);
                    if !live.contains(&range) {
                        live.push(range);
                    }
                }
                true
            }
            None => false,
        });
        let owner = self.owner;
        self.registered.retain(|&(start, len, slot)| {
            let keep = live.contains(&(start, len));
            if !keep {
                sigbus::table().unregister(owner, slot);
            }
            keep
        });
        let mut reserved = reserved.into_iter();
        for (start, len) in live {
            if self
                .registered
                .iter()
                .any(|&(s, l, _)| (s, l) == (start, len))
            {
                continue;
            }
            let slot = match reserved.next() {
                Some(r) => Ok(r.set(start, len)),
                None => sigbus::table().register(owner, start, len),
            };
            match slot {
                Ok(slot) => self.registered.push((start, len, slot)),
                // Reserved before mapping, so this is not reached; if it were, a truncation
                // of this range would end the daemon as it did before this module.
                Err(e) => warn!("guest memory at {start:#x} is not guarded: {e}"),
            }
        }
    }
}
